"""`dynaexq trace import | replay`: routing traces (dynaexq/trace.py) and their replay through the residency
policies (runtime/replay.py)."""
from __future__ import annotations

import json
import sys


def cmd_trace(args) -> int:
    from dynaexq.trace import import_trace

    if args.trace_cmd == "import":
        trace = import_trace(args.source)
        path = trace.save(args.out)
        print(f"dynaexq: {len(trace)} token rows x {len(trace.layers)} MoE layers x top-{trace.experts.shape[2]} of "
              f"{trace.num_experts} experts -> {path}", file=sys.stderr)
        return 0
    from dynaexq.config import RuntimeConfig
    from dynaexq.runtime.replay import replay, replay_budget, replay_sizes
    from dynaexq.sizes import format_size
    config = RuntimeConfig(half_life_tokens=args.half_life_tokens, update_every_tokens=args.update_every_tokens)
    trace = import_trace(args.trace)
    sizes = replay_sizes(trace, args.store, args.expert_shape)
    score_from = len(trace) // 2 if args.score_second_half else 0
    rows = []
    for b in args.budget:
        budget = replay_budget(b, trace, sizes)
        for policy in args.policy:
            r = replay(trace, policy, budget, sizes, config, score_from)
            rows.append({"budget": b, "budget_bytes": budget, **r})
            if not args.json:
                mass = ", ".join(f"{p} {v:.2f}" for p, v in r["mass_served"].items())
                print(f"{b:>12} {r['policy']:<48} {r['regime']:<9} hit {r['hit_rate']:.3f}  read/token "
                      f"{format_size(int(r['read_bytes_per_token'])):>10}  fetches/token {r['fetches_per_token']:6.1f}"
                      f"  mass: {mass}")
    if args.json:
        print(json.dumps({"trace": args.trace, "tokens": len(trace), "rows": rows}))
    return 0


def add_trace_parser(sub) -> None:
    st = sub.add_parser("trace", help="routing traces: import the public formats, replay one through the residency "
                        "policies (hit rate, bytes read per token, routed mass per precision)")
    tsub = st.add_subparsers(dest="trace_cmd", required=True)
    ti = tsub.add_parser("import", help="a *.route.csv or a FLAME-MoE folder -> a dynaexq trace (.npz)")
    ti.add_argument("source")
    ti.add_argument("out", help="the .npz to write")
    ti.set_defaults(fn=cmd_trace)
    tr = tsub.add_parser("replay", help="drive the policies with a trace's routing (no weights needed)")
    tr.add_argument("trace", help="a dynaexq .npz, a *.route.csv or a FLAME-MoE folder")
    tr.add_argument("--budget", nargs="+", required=True, metavar="B", help="expert budgets: a size (2GiB), a "
                    "precision (int2: every expert at it) or a share of one (25%%int2)")
    tr.add_argument("--policy", nargs="+", default=["dynaexq:hi=int4,lo=int2", "lru-offload:int2"], metavar="P",
                    help="runtime policies (dynaexq, multilevel, frozen, lru-offload) or the baselines "
                    "lfu-offload[:P], static-offload[:P] (default: %(default)s)")
    tr.add_argument("--store", help="a store of the traced model: expert sizes from it")
    tr.add_argument("--expert-shape", metavar="H,I", help="without a store: hidden size and expert intermediate size "
                    "(sizes from the registered formats; default: Qwen3-30B-A3B's 2048,768)")
    tr.add_argument("--score-second-half", action="store_true", help="the first half warms the policies up (and is "
                    "the static profile's), the second is scored")
    tr.add_argument("--json", action="store_true")
    tr.add_argument("--half-life-tokens", type=float, help="hotness half-life (the runtime's default unless given)")
    tr.add_argument("--update-every-tokens", type=int, help="decide every N routed tokens (the runtime's default unless "
                    "given)")
    tr.set_defaults(fn=cmd_trace)
