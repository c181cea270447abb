"""`dynaexq export llama-cpp | sglang`: the learned plan as llama.cpp's --tensor-type-file or SGLang's
--init-expert-location file (dynaexq/export.py)."""
from __future__ import annotations

import sys


def cmd_export(args) -> int:
    from dynaexq import export
    from dynaexq.engine.load import resolve_store
    from dynaexq.runtime.planners import parse_budget
    from dynaexq.sizes import format_size
    from dynaexq.store.reader import StoreReader

    reader = StoreReader(resolve_store(args.model, progress=True))
    try:
        if args.target == "sglang":
            rows = export.sglang_logical_count(reader, args.hotness, args.trace)
            path = export.write_sglang(args.out, rows)
            print(f"dynaexq: expert statistics of {len(rows)} layers x {reader.num_experts} experts -> {path} "
                  f"(sglang --init-expert-location {path})", file=sys.stderr)
            return 0
        mass = export.routing_mass(reader, args.hotness, args.trace)
        plan = export.llama_cpp_plan(reader, mass, parse_budget(args.size))
        types = export.tensor_types(reader, plan)
        path = export.write_tensor_type_file(args.out, types)
        per_layer = ", ".join(f"{layer}: {types[f'blk.{layer}.ffn_gate_exps.weight']}" for layer in sorted(plan))
        print(f"dynaexq: expert tensors at {format_size(export.plan_bytes(reader, plan))} ({per_layer}) -> {path}\n"
              "  llama-quantize "
              f"--tensor-type-file {path} MODEL-bf16.gguf OUT.gguf TYPE  (TYPE sets every other tensor)",
              file=sys.stderr)
        return 0
    finally:
        reader.close()


def add_export_parser(sub) -> None:
    ex = sub.add_parser("export", help="write the learned plan for llama.cpp (--tensor-type-file) or SGLang "
                        "(--init-expert-location)")
    ex.add_argument("target", choices=["llama-cpp", "sglang"])
    ex.add_argument("--model", required=True, help="checkpoint or store directory")
    ex.add_argument("--hotness", metavar="FILE", help="a --hotness-file written by a run (the live hotness)")
    ex.add_argument("--trace", metavar="FILE.npz", help="a routing trace (--record-routing, or `dynaexq trace import`)")
    ex.add_argument("--size", help="llama-cpp: bytes the expert tensors may take in the GGUF (e.g. 12GiB) or a "
                    "precision name (int3: what every expert at q3_K takes)")
    ex.add_argument("--out", required=True, help="the file to write (.txt for llama-cpp, .json for sglang)")
    ex.set_defaults(fn=_checked)


def _checked(args) -> int:
    from dynaexq.errors import UserError
    if args.target == "llama-cpp" and not args.size:
        raise UserError("export llama-cpp needs --size SIZE (the expert tensors' bytes in the GGUF) or a precision "
                        "name such as int3")
    if args.target == "sglang" and args.size:
        raise UserError("--size applies to llama-cpp; SGLang's file holds statistics, not precisions")
    return cmd_export(args)
