"""A lower layer never imports a higher one (DESIGN.md): walk every import in the package."""
import ast
from pathlib import Path

import dynaexq

# rank of each top-level part of the package; a module may import only ranks <= its own
RANK = {"errors": 0, "sizes": 0, "threads": 0, "quant": 1, "arch": 2, "store": 3, "trace": 3, "runtime": 4, "bank": 5,
        "engine": 6, "demo": 6, "eval": 7, "serve": 7, "cli": 8, "cli_trace": 8, "__init__": 8}


def _part(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def violations(root: Path) -> list[str]:
    bad = []
    for path in root.rglob("*.py"):
        rel = path.relative_to(root.parent).with_suffix("")
        module = ".".join(rel.parts)
        own = _part(module if len(rel.parts) > 2 or rel.name != "__init__" else "dynaexq")
        assert own in RANK, f"{module}: give its layer a rank in this test"
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module] if isinstance(node, ast.ImportFrom) and node.module else [])
            bad += [f"{module} imports {n}" for n in names if n.startswith("dynaexq.") and RANK[_part(n)] > RANK[own]]
    return bad


def test_lower_layers_never_import_higher_ones():
    assert violations(Path(dynaexq.__file__).parent) == []


def test_an_upward_import_is_caught(tmp_path):
    (tmp_path / "dynaexq" / "quant").mkdir(parents=True)
    (tmp_path / "dynaexq" / "quant" / "k.py").write_text("from dynaexq.engine.load import load\n")
    assert violations(tmp_path / "dynaexq") == ["dynaexq.quant.k imports dynaexq.engine.load"]
