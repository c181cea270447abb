"""How fast the runtime adapts: `dynaexq eval`'s streamed scenarios over a grid of controller settings.

Command (~6 min on 2 cores, bundled model, expert budget = the bytes of uniform int3):

    .venv/bin/python bench/adaptation.py [--scenarios mismatch cold steady shift] [--grid NAME ...]

One `Evaluation` (reference computed once) on the model's eval texts; per scenario the static baselines and the
per-phase oracle run once, then the runtime policy (multilevel, with the scenario's warm start: another
domain's calibration text for mismatch, none for cold, all calibration texts for shift/steady) under each
setting of the grid: decision interval (in steps of 32 tokens or in tokens), hotness EMA (alpha per step or a
half-life in tokens) and the hysteresis delta. Reported per run: mean KL, its ratio to the per-phase oracle
(overall, per phase) and to the static multilevel map calibrated on every text, switches. Output: a table per
scenario, then one JSON object on the last stdout line.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from _common import wait_for_quiet  # noqa: E402

from dynaexq.config import RuntimeConfig  # noqa: E402
from dynaexq.demo import default_model  # noqa: E402
from dynaexq.engine.dynamic import measure  # noqa: E402
from dynaexq.eval.harness import Evaluation, parse_data  # noqa: E402
from dynaexq.eval.shift import default_policies, parse_spec, phases, run_shift, stream_phase  # noqa: E402
from dynaexq.runtime.planners import resolve_budget  # noqa: E402
from dynaexq.runtime.planners.dynamic import _swaps  # noqa: E402

GRID = {  # name -> (RuntimeConfig, delta of the multilevel policy)
    "every 200 steps, alpha 0.9 (DynaExq)": (RuntimeConfig(update_every=200, alpha=0.9), 0.01),
    "every 16 steps, alpha 0.9": (RuntimeConfig(update_every=16, alpha=0.9), 0.01),
    "every 256 tok, half-life 256": (RuntimeConfig(update_every_tokens=256, half_life_tokens=256), 0.01),
    "every 128 tok, half-life 256 (default)": (RuntimeConfig(update_every_tokens=128, half_life_tokens=256), 0.01),
    "every 64 tok, half-life 128": (RuntimeConfig(update_every_tokens=64, half_life_tokens=128), 0.01),
    "every 32 tok, half-life 64": (RuntimeConfig(update_every_tokens=32, half_life_tokens=64), 0.01),
    "every 32 tok, half-life 32": (RuntimeConfig(update_every_tokens=32, half_life_tokens=32), 0.01),
    "every 32 tok, half-life 64, inline transitions": (RuntimeConfig(update_every_tokens=32, half_life_tokens=64,
                                                                     blocking=True), 0.01),
    "every 32 tok, half-life 64, delta 0.03": (RuntimeConfig(update_every_tokens=32, half_life_tokens=64), 0.03),
    "every 64 tok, half-life 128, delta 0": (RuntimeConfig(update_every_tokens=64, half_life_tokens=128), 0.0),
}


def fixed_counts_oracle(ev, runtime_spec: str, budget, repeats: int, scenario: str, per_tier: bool = False) -> dict:
    """The per-phase oracle held to the runtime's slot counts: per phase, the best assignment of that phase's own
    routing into the (layer, precision) slot counts the runtime fixed at start from its warm start (per_tier:
    only each precision's total over the layers is fixed, a layer may hold more of it and another fewer). Its
    gap to the phase-oracle is what fixed counts cost; the runtime's gap to it is the adaptation lag."""
    planner, source, _ = parse_spec(runtime_spec)
    budget = resolve_budget(budget, ev.reader)
    slot_bytes = measure(ev.engine, planner, budget, RuntimeConfig())[0]
    warm = None
    if source != "none":
        mass = ev.calibration_hotness(planner.floor(ev.reader), source)
        warm = {layer: m / ev.calibration_token_counts[source] for layer, m in mass.items()}
    counts = planner.counts(ev.reader, slot_bytes, budget, warm)
    tiers, costs = planner.tiers(ev.reader), planner.costs(ev.reader)
    rows, total, streamed = [], [0.0, 0], 0
    stream = phases(ev.windows, repeats, scenario)
    hot = {phase: ev.reference_hotness(name, idx) for phase, name, idx in stream}
    for phase, name, idx in stream:
        assign = {layer: np.array([i for i, p in enumerate(tiers) for _ in range(counts.get((layer, p), 0))])
                  for layer in ev.reader.layers}
        if per_tier:  # the runtime's market: slots trade across layers too (one pool of each precision)
            layers = sorted(assign)
            S = np.concatenate([np.asarray(hot[phase][layer], dtype=np.float64) for layer in layers])
            tier = np.concatenate([assign[layer] for layer in layers])
            _swaps(S, np.concatenate([costs[layer] for layer in layers]), tier, 0.0)
            assign = {layer: tier[i * len(assign[layer]):(i + 1) * len(assign[layer])] for i, layer in enumerate(layers)}
        else:  # each layer keeps its count of each precision
            for layer in assign:
                _swaps(np.asarray(hot[phase][layer], dtype=np.float64), costs[layer], assign[layer], 0.0)
        ev.engine.apply({(layer, e): tiers[t] for layer, a in assign.items() for e, t in enumerate(a.tolist())})
        kl, _, count, tokens = stream_phase(ev, name, idx, 32)
        streamed += tokens
        rows.append({"phase": phase, "kl": kl / count, "tokens": streamed})
        total[0] += kl
        total[1] += count
    return {"policy": "phase-oracle, runtime's " + ("totals per precision" if per_tier else "slot counts"), "mean_kl": total[0] / total[1], "phases": rows}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--scenarios", nargs="+", default=["mismatch", "cold", "steady", "shift"])
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--budget", default="int3")
    ap.add_argument("--grid", nargs="+", help="names of GRID entries to run (default: all)")
    ap.add_argument("--wait-quiet", type=float, default=0)
    args = ap.parse_args()
    model = default_model()
    if args.wait_quiet:
        wait_for_quiet(args.wait_quiet, log=lambda s: print(s, file=sys.stderr))
    ev = Evaluation(model, parse_data(None, model), windows=args.windows, window_tokens=256, progress=False)
    grid = {k: v for k, v in GRID.items() if not args.grid or k in args.grid}
    out = {"bench": "adaptation", "budget": args.budget, "scenarios": {}}
    try:
        for scenario in args.scenarios:
            repeats = {"shift": 2}.get(scenario, 4)
            stream = phases(ev.windows, repeats, scenario)
            policies = default_policies(scenario, stream[0][1], list(ev.calibration_texts()))
            static = [p for p in policies if not p.startswith(("multilevel", "dynaexq", "frozen"))]
            runtime = next(p for p in policies if p.startswith("multilevel")) if scenario != "shift" else "multilevel"
            t0 = time.perf_counter()
            rows = [run_shift(ev, p, args.budget if not p.startswith("uniform") else None, repeats, 32,
                              RuntimeConfig(), scenario) for p in static]
            oracle = next(r for r in rows if r["policy"].startswith("phase-oracle"))
            mixed = next(r for r in rows if r["policy"].startswith("calibrated-multilevel") and "@" not in r["policy"])
            rows.append(fixed_counts_oracle(ev, runtime, args.budget, repeats, scenario))
            rows.append(fixed_counts_oracle(ev, runtime, args.budget, repeats, scenario, per_tier=True))
            base, _, warm = runtime.partition("@")
            for name, (config, delta) in grid.items():
                spec = f"{base}:delta={delta:g}" + (f"@{warm}" if warm else "")
                r = run_shift(ev, spec, args.budget, repeats, 32, config, scenario)
                r["setting"] = name
                rows.append(r)
            for r in rows:
                r["x_oracle"] = r["mean_kl"] / oracle["mean_kl"]
                r["x_static_mixed"] = r["mean_kl"] / mixed["mean_kl"]
                r["x_oracle_phases"] = [p["kl"] / o["kl"] for p, o in zip(r["phases"], oracle["phases"])]
            out["scenarios"][scenario] = {"runtime": runtime, "rows": rows, "seconds": time.perf_counter() - t0}
            names = [p for p, _, _ in stream]
            print(f"\n--scenario {scenario} (runtime: {runtime}); KL, and per phase x the per-phase oracle")
            print(f"{'policy / setting':<44} {'mean KL':>8} {'x oracle':>8} {'x static':>8}  "
                  + " ".join(f"{n:>7}" for n in names) + f" {'switches':>8}")
            for r in rows:
                label = r.get("setting") or (r["policy"].split(":ladder")[0].split(",alloc")[0]
                                             + ("@" + r["policy"].split("@")[1] if "@" in r["policy"] else ""))
                print(f"{label:<44} {r['mean_kl']:>8.5f} {r['x_oracle']:>8.2f} {r['x_static_mixed']:>8.2f}  "
                      + " ".join(f"{x:>7.2f}" for x in r["x_oracle_phases"]) + f" {r.get('switches', '-'):>8}")
            sys.stdout.flush()
    finally:
        ev.close()
    print(json.dumps(out))


if __name__ == "__main__":
    main()
