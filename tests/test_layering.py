"""A lower layer never imports a higher one (DESIGN.md): walk every import in the package."""
import ast
from pathlib import Path

import dynaexq

# rank of each top-level part of the package; a module may import only ranks <= its own
RANK = {"errors": 0, "sizes": 0, "gguf_file": 0, "threads": 0, "config": 0, "cluster": 0, "quant": 1, "arch": 2,
        "store": 3, "trace": 3, "runtime": 4, "bank": 5, "engine": 6, "demo": 6, "eval": 7, "serve": 7, "export": 7,
        "cli": 8, "cli_trace": 8, "cli_export": 8, "cli_serve": 8, "__init__": 8}


# inside a package, the same rule between its modules (a subpackage counts as one module): no import circles
INNER = {
    "engine": {"swap": 0, "kv_cache": 0, "attention": 0, "norm": 0, "router": 0, "auto": 0, "batch": 1, "lookahead": 1,
               "dynamic": 2, "engine": 3, "model": 4, "calibrate": 5, "scheduler": 5, "load": 6, "__init__": 7},
    "runtime": {"version": 0, "hotness": 0, "budget": 0, "pool": 0, "table": 0, "fetch": 0, "demand": 1,
                "residency": 2, "controller": 1, "planners": 1, "replay": 2, "__init__": 3},
    "quant": {"precision": 0, "packing": 0, "lowbit_cpu": 0, "formats": 1, "attention_cpu": 1, "quantize": 2,
              "kernels_cuda": 3, "kernels": 4, "grouped_cpu": 5, "dense": 6, "__init__": 7},
    "store": {"layout": 0, "shard_writer": 0, "distributed": 0, "dense": 1, "checkpoint": 1, "direct": 1, "reader": 2,
              "prepare": 2, "inspect": 3, "__init__": 4},
    "eval": {"report": 0, "lm_eval_adapter": 0, "harness": 1, "shift": 2, "__init__": 3},
    "serve": {"protocol": 0, "metrics": 0, "app": 1, "replicas": 2, "__init__": 3},
    "arch": {"adapter": 0, "__init__": 1},
}


def _part(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _inner(module: str) -> str:
    """dynaexq.P.M[...] -> M (the module, or the subpackage, inside package P); dynaexq.P -> '__init__'."""
    parts = module.split(".")
    return parts[2] if len(parts) > 2 else "__init__"


def _imports(node) -> list[str]:
    """The dynaexq modules an import statement names (`from dynaexq.P import M` names dynaexq.P.M when M is one)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    if not isinstance(node, ast.ImportFrom) or not node.module:
        return []
    if node.module.count(".") == 1 and node.module.split(".")[1] in INNER:  # from dynaexq.P import M, ...
        return [f"{node.module}.{a.name}" if a.name in INNER[node.module.split(".")[1]] else node.module
                for a in node.names]
    return [node.module]


def violations(root: Path) -> list[str]:
    bad = []
    for path in root.rglob("*.py"):
        rel = path.relative_to(root.parent).with_suffix("")
        module = ".".join(rel.parts)
        own = _part(module if len(rel.parts) > 2 or rel.name != "__init__" else "dynaexq")
        assert own in RANK, f"{module}: give its layer a rank in this test"
        inner = INNER.get(own, {})
        me = _inner(module) if own != "__init__" else None
        assert not inner or me in inner, f"{module}: give it a rank inside {own} in this test"
        for node in ast.walk(ast.parse(path.read_text())):
            for n in _imports(node):
                if not n.startswith("dynaexq."):
                    continue
                if RANK[_part(n)] > RANK[own]:
                    bad.append(f"{module} imports {n}")
                elif _part(n) == own and inner and _inner(n) != me and inner[_inner(n)] > inner[me]:
                    bad.append(f"{module} imports {n} (inside {own})")
    return bad


def test_lower_layers_never_import_higher_ones():
    assert violations(Path(dynaexq.__file__).parent) == []


def test_an_upward_import_is_caught(tmp_path):
    (tmp_path / "dynaexq" / "quant").mkdir(parents=True)
    (tmp_path / "dynaexq" / "quant" / "kernels.py").write_text("from dynaexq.engine.load import load\n")
    assert violations(tmp_path / "dynaexq") == ["dynaexq.quant.kernels imports dynaexq.engine.load"]


def test_an_import_up_inside_a_package_is_caught(tmp_path):
    (tmp_path / "dynaexq" / "engine").mkdir(parents=True)
    (tmp_path / "dynaexq" / "engine" / "lookahead.py").write_text("def f():\n    from dynaexq.engine import dynamic\n")
    (tmp_path / "dynaexq" / "engine" / "dynamic.py").write_text("from dynaexq.engine.lookahead import f\n")
    assert violations(tmp_path / "dynaexq") == ["dynaexq.engine.lookahead imports dynaexq.engine.dynamic (inside engine)"]
