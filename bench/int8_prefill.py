"""Prefill through int8 dense matrices: the native tile against Int8Cpu.gemm (fp32 GEMM on converted blocks), on
bench/whole_model.py's store, in one process, alternated.

Command (after `bench/whole_model.py` has built its 4-layer store; ~2 min):

    .venv/bin/python bench/int8_prefill.py

The plan is whole_model's "Q2_K = reads" one (`uniform:int2` experts, `--weight-budget` = the Q2_K file's bytes,
`--read-budget` = what a decode token reads of it), whose attention matrices are int8: prefill of --tokens tokens
in one chunk, with quant.dense.INT8_GEMM_ROWS set past any chunk (every int8 matrix on the native tile) and at its
default (the GEMM from that many rows), --repeats times each, alternated; medians.
Output: a line per side, then one JSON object on the last stdout line.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from whole_model import prefill_tok_s  # noqa: E402

STORE = "/tmp/dynaexq-bench/store-qwen3moe-L4-E128-H2048-I768-V151936-bfloat16-s0-bf16-int8-int4-int2-v4"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--store", default=STORE)
    ap.add_argument("--policy", default="uniform:int2")
    ap.add_argument("--weight-budget", type=int, default=1265301504)  # the 4-layer Q2_K GGUF's tensor bytes
    ap.add_argument("--read-budget", type=int, default=343345152)  # what a decode token reads of it
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    import dynaexq
    from dynaexq.quant import dense
    torch.set_num_threads(args.threads)
    engine = dynaexq.load(args.store, args.policy, weight_budget=args.weight_budget, read_budget=args.read_budget,
                          threads=args.threads, progress=False)
    plan = sorted({p.value for p in engine.dense_plan.values()})
    default = dense.INT8_GEMM_ROWS
    sides = {"native tile": 10 ** 9, f"gemm from {default} rows": default}
    res = {name: [] for name in sides}
    for r in range(args.repeats):
        for name, rows in sides.items():
            dense.INT8_GEMM_ROWS = rows
            res[name].append(prefill_tok_s(engine, args.tokens, seed=r))
    dense.INT8_GEMM_ROWS = default
    med = {k: statistics.median(v) for k, v in res.items()}
    print(f"dense precisions {plan}; prefill of {args.tokens} tokens, {args.threads} threads")
    for k, v in med.items():
        print(f"  {k:<22} {v:8.1f} tok/s  (samples {', '.join(f'{x:.1f}' for x in res[k])})")
    print(json.dumps({"bench": "int8_prefill", "dense": plan, "tokens": args.tokens, "tok_s": med, "samples": res}))


if __name__ == "__main__":
    main()
