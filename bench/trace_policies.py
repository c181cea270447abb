"""Residency policies on real routing: every trace in ../shared/traces/ (README there) replayed at 10 / 25 / 50 % of
the bytes of every expert at int2 (the offload regime), through the real policy code (runtime/replay.py).

    .venv/bin/python bench/trace_policies.py          # bench/results/trace_policies.out (~1 min, 1 core)

Policies: dynaexq's hotness cache (`dynaexq:hi=int4,lo=int2`, the default: all int2, the hotness ranking alone;
and `hi_share=0.25`: a quarter of the bytes int4 slots for the hottest experts, the rest int2), LRU (`lru-offload:int2`,
mixtral-offloading), LFU (`lfu-offload:int2`) and a static profile learned on the first half
(`static-offload:int2`: per layer the most-routed experts pinned, top-k more slots for the others). Every policy
sees the first half of a trace as warm-up (and the profile's learning data) and is scored on the second half.
Reported: hit rate (routed slots served resident), bytes read from the store per token in units of what the
token's own routed experts weigh at int2 (1.0: every routed expert read once per token), and the routed weight
mass served at int4; then, per trace and budget, whether the default is on the Pareto front of (bytes read per
token, routed mass served below int4) and which policies beat it where not. Expert sizes: Qwen3-30B-A3B's expert
shape for every trace (hit rates do not depend on it; the read units scale it away). A trace that is absent is
skipped. Human table, then one JSON line.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from dynaexq.quant.precision import Precision  # noqa: E402
from dynaexq.runtime.replay import replay, sizes_from_shapes  # noqa: E402
from dynaexq.trace import import_trace  # noqa: E402

TRACES = Path(__file__).resolve().parent.parent.parent / "shared" / "traces"
SOURCES = {"Qwen3-30B-A3B": "bigmoe_route_trace/qwen.route.csv", "Gemma-4-26B-A4B": "bigmoe_route_trace/gemma.route.csv",
           "gpt-oss-120b": "bigmoe_route_trace/gptoss.route.csv", "FLAME-MoE-290M": "flame_moe_290m"}
POLICIES = ["dynaexq:hi=int4,lo=int2,hi_share=0.25", "dynaexq:hi=int4,lo=int2", "lru-offload:int2", "lfu-offload:int2",
            "static-offload:int2"]
SHARES = (0.10, 0.25, 0.50)
DEFAULT = "dynaexq:hi=int4,lo=int2"  # the runtime's default below the floor


def main() -> None:
    sizes = sizes_from_shapes((1536, 2048), (2048, 768))
    rows, t0 = [], time.time()
    for name, rel in SOURCES.items():
        path = TRACES / rel
        if not path.exists():
            print(f"{name}: {path} absent, skipped", file=sys.stderr)
            continue
        trace = import_trace(path)
        L, k, E = len(trace.layers), trace.experts.shape[2], trace.num_experts
        unit = L * k * sizes[Precision.INT2]
        for share in SHARES:
            budget = int(share * L * E * sizes[Precision.INT2])
            for policy in POLICIES:
                r = replay(trace, policy, budget, sizes, score_from=len(trace) // 2)
                rows.append({"trace": name, "tokens": len(trace), "layers": L, "experts": E, "top_k": k,
                             "share": share, "policy": policy, "hit_rate": r["hit_rate"],
                             "read_units": r["read_bytes_per_token"] / unit,
                             "int4_mass": r["mass_served"].get("int4", 0.0)})
    print("policies on real routing traces (second half scored), budgets as shares of every expert at int2")
    print(f"{'trace':<16} {'budget':>6} {'policy':<38} {'hit':>6} {'read/token':>10} {'int4 mass':>9}")
    for r in rows:
        print(f"{r['trace']:<16} {100 * r['share']:>5.0f}% {r['policy']:<38} {r['hit_rate']:>6.3f} "
              f"{r['read_units']:>10.3f} {r['int4_mass']:>9.3f}")
    print(f"\n{DEFAULT} on the Pareto front of (read/token, routed mass below int4)?")
    for key in dict.fromkeys((r["trace"], r["share"]) for r in rows):
        case = [r for r in rows if (r["trace"], r["share"]) == key]
        d = next(r for r in case if r["policy"] == DEFAULT)
        beaten = [r for r in case if r is not d and r["read_units"] <= d["read_units"] and r["int4_mass"] >= d[
            "int4_mass"] and (r["read_units"] < d["read_units"] or r["int4_mass"] > d["int4_mass"])]
        print(f"{key[0]:<16} {100 * key[1]:>5.0f}% " + ("on the front" if not beaten else "beaten by " + ", ".join(
            f"{r['policy']} ({r['read_units']:.3f} vs {d['read_units']:.3f})" for r in beaten)))
    print(json.dumps({"bench": "trace_policies", "rows": rows, "seconds": time.time() - t0}))


if __name__ == "__main__":
    main()
