"""Time of `dynaexq eval` per policy on the bundled model: 3 domains x 16 windows x 256 tokens.

Command (~2 min on 2 cores; the first run also prepares the bundled model's store into the cache):

    .venv/bin/python bench/eval.py [--repeats 3] [--wait-quiet 120]

What it measures: one `Evaluation` (the model loaded once at bf16 and its reference log-probs computed once,
not timed per policy), then for each policy `run(policy, budget)` = plan + publish the experts whose precision
changes (re-read from the store) + the forward passes and metrics on all 48 windows; median of --repeats,
policies interleaved, the engine returned to bf16 before every sample so each one publishes a full map.
Goal: every policy <= 10 s. Each sample records how many cores other processes used meanwhile.
Output: a table, then one JSON object on the last stdout line.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import CpuLoad, wait_for_quiet  # noqa: E402

from dynaexq.demo import default_model  # noqa: E402
from dynaexq.eval.harness import Evaluation, parse_data  # noqa: E402
from dynaexq.runtime.planners import parse_policy  # noqa: E402

POLICIES = [("uniform:int4", None), ("uniform:int2", None), ("calibrated", "int3"), ("calibrated-multilevel", "int3"),
            ("oracle", "int3")]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--wait-quiet", type=float, default=0, help="first wait up to this many seconds for idle cores")
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model = default_model()
    if args.wait_quiet:
        wait_for_quiet(args.wait_quiet, log=lambda s: print(s, file=sys.stderr))
    t0 = time.perf_counter()
    ev = Evaluation(model, parse_data(None, model), windows=16, window_tokens=256, progress=False)
    setup = time.perf_counter() - t0
    for policy, budget in POLICIES:  # calibration routing is measured once per floor map, not timed
        pl = parse_policy(policy)
        if pl.hotness_source == "calibration":
            ev.calibration_hotness(pl.floor(ev.reader))
    samples = {p: [] for p, _ in POLICIES}
    for _ in range(args.repeats):
        for policy, budget in POLICIES:
            ev.engine.apply({k: ev.ref for k in ev.engine.plan})
            with CpuLoad() as load:
                t = time.perf_counter()
                r = ev.run(policy, budget)
                dt = time.perf_counter() - t
            samples[policy].append({"seconds": dt, "publish": r["seconds"]["publish"], "others": load.others,
                                    "mean_kl": r["mean_kl"]})
    ev.close()
    rows = []
    print(f"setup (load at bf16 + reference on {sum(len(w) for w in ev.windows.values())} windows): {setup:.1f} s")
    print(f"{'policy':<24}{'median s':>10}{'publish s':>11}{'others':>8}{'mean KL':>10}  goal <= 10 s")
    for policy, _ in POLICIES:
        s = samples[policy]
        med = statistics.median(x["seconds"] for x in s)
        pub = statistics.median(x["publish"] for x in s)
        oth = statistics.median(x["others"] for x in s)
        print(f"{policy:<24}{med:>10.2f}{pub:>11.2f}{oth:>8.2f}{s[0]['mean_kl']:>10.5f}  "
              f"{'pass' if med <= 10 else 'MISS'}")
        rows.append({"policy": policy, "median_s": med, "publish_s": pub, "others_cores": oth,
                     "mean_kl": s[0]["mean_kl"]})
    print(json.dumps({"bench": "eval", "windows": "3x16x256", "setup_s": setup, "results": rows}))


if __name__ == "__main__":
    main()
