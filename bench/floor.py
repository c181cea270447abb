"""Across the all-low floor: quality and residency just below and just above the budget of every expert at int2.

Above that budget the runtime keeps every expert resident; below it (the offload regime) some are read from the
store on a miss. A user moving the budget across it should see the map move a little, not jump. For each policy
and each fraction of the all-int2 expert bytes, `dynaexq eval`'s harness runs the policy live over the bundled
model's eval texts (windows streamed in 32-token steps, controller on) and reports the mean KL per token against
the reference and the share of experts resident and at the top precision at the end.

  .venv/bin/python bench/floor.py          # bench/results/floor.out (about 3 min)
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from dynaexq.eval.harness import Evaluation, parse_data
from dynaexq.runtime.planners import resolve_budget

BUNDLED = Path(__file__).resolve().parents[1] / "dynaexq" / "bundled" / "dxq-moe-mini"
FRACTIONS = [0.9, 0.99, 0.999, 1.001, 1.01, 1.1]
POLICIES = ["dynaexq:hi=int4,lo=int2", "multilevel"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--fractions", default=",".join(map(str, FRACTIONS)))
    ap.add_argument("--policies", default=";".join(POLICIES))
    ap.add_argument("--windows", type=int, default=8)
    args = ap.parse_args()
    ev = Evaluation(BUNDLED, parse_data(None, BUNDLED), windows=args.windows, window_tokens=128, progress=False)
    floor = resolve_budget("int2", ev.sized)
    rows = []
    print(f"bundled model; all-int2 expert bytes {floor}; {args.windows} windows x 128 tokens per domain")
    print(f"{'policy':<26} {'fraction':>8} {'mean KL':>9} {'resident':>9} {'precisions at the end'}")
    for policy in args.policies.split(";"):
        for f in (float(x) for x in args.fractions.split(",")):
            r = ev.run(policy, int(f * floor))
            n = sum(r["precisions"].values())
            resident = 1 - r["precisions"].get("none", 0) / n
            rows.append({"policy": policy, "fraction": f, "mean_kl": r["mean_kl"], "resident": resident,
                         "precisions": r["precisions"]})
            print(f"{policy:<26} {f:>8.3f} {r['mean_kl']:>9.5f} {resident:>9.1%} {r['precisions']}", flush=True)
        at = {row["fraction"]: row["mean_kl"] for row in rows if row["policy"] == policy}
        if 0.999 in at and 1.001 in at:
            print(f"  {policy}: KL at 0.999x / 1.001x = {at[0.999] / at[1.001]:.3f}")
    ev.close()
    print(json.dumps(rows))


if __name__ == "__main__":
    sys.exit(main())
