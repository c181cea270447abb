"""Streamed scenarios of `dynaexq eval --scenario ...`: the model reads a stream of windows with the controller live.

A stream is a list of phases, each a block of evaluation windows of one domain:
  shift     block r of every --data domain in order (code -> prose -> dict), for r in range(--repeats) (default 2);
  mismatch  the first --data domain in --repeats blocks (default 4), the runtime warm-started from a calibration
            text of *another* domain (the first one whose name differs): how fast does it recover?
  cold      the same stream, the runtime with no warm start at all (its first map: slot counts by the experts'
            errors alone, experts in index order);
  steady    the same stream, warm-started from all calibration texts: does it settle at the oracle, and stay?
Each window is streamed through the model in steps of `step_tokens` tokens with a KV cache (the logits equal one
full-window forward); every step is an engine step (`engine.run`: the routing goes to the controller), as the
decode loop and the server do. Runtime policies (dynaexq, multilevel, frozen) start the runtime on the
evaluation's engine and run with their transitions live in the background; static policies publish their map
once. A policy may name its warm start (runtime) or calibration (static calibrated policies): `SPEC@NAME` uses
only the calibration text NAME, `SPEC@none` no warm start (runtime only); plain `SPEC` uses every calibration
text. `phase-oracle[:OPTIONS]` is the static map `oracle[:OPTIONS]` would pick from each phase's *own* routing
(the reference model on exactly that phase's windows) at the same budget, re-published before each phase: the
bound a perfect, instant per-phase adaptation would reach. Per phase and in total: mean KL to the reference,
top-1 agreement, tokens streamed, and the transitions made (pairs, bytes moved) -- with the experts each window
actually read, whatever the transitions had published by then.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from dynaexq.engine.dynamic import start_runtime, stop_runtime
from dynaexq.errors import UserError
from dynaexq.eval.harness import (Evaluation, _model_dir, budgeted, calibration_texts, check_plans, parse_data,
                                  stream_logits)
from dynaexq.config import CALIBRATION_WINDOWS, EVAL_WINDOWS, VERIFY, WINDOW_TOKENS, RuntimeConfig
from dynaexq.runtime.planners import parse_policy, resolve_budget
from dynaexq.sizes import format_size

SCENARIOS = ("shift", "mismatch", "cold", "steady")
DEFAULT_REPEATS = {"shift": 2, "mismatch": 4, "cold": 4, "steady": 4}
SHIFT_POLICIES = ("dynaexq:hi=int8,lo=int2", "multilevel", "frozen:hi=int8,lo=int2", "calibrated:hi=int8,lo=int2",
                  "calibrated-multilevel", "uniform:int3", "phase-oracle")


def phases(windows: dict, repeats: int, scenario: str = "shift") -> list:
    """-> [(phase name, domain, [window indices])]: for `shift` block r of every domain, for r in range(repeats);
    otherwise the blocks of the first domain only."""
    out = []
    domains = windows if scenario == "shift" else dict([next(iter(windows.items()))])
    for r in range(repeats):
        for name, w in domains.items():
            n = len(w)
            if n < repeats:
                raise UserError(f"--scenario {scenario}: domain {name!r} has {n} windows, fewer than --repeats "
                                f"{repeats}")
            idx = list(range(r * n // repeats, (r + 1) * n // repeats))
            out.append((f"{r + 1}:{name}", name, idx))
    return out


def default_policies(scenario: str, streamed: str, texts: list) -> list:
    """The policies each scenario compares by default (texts: the calibration texts' names)."""
    if scenario == "shift":
        return list(SHIFT_POLICIES)
    if scenario == "mismatch":
        other = next((t for t in texts if t != streamed), None)
        if other is None:
            raise UserError(f"--scenario mismatch warm-starts from a calibration text of another domain than "
                            f"{streamed!r}, but the calibration texts are only {texts}; give more with "
                            "--calibration NAME=FILE")
        return ["calibrated-multilevel", f"calibrated-multilevel@{other}", f"multilevel@{other}", "phase-oracle"]
    if scenario == "cold":
        return ["uniform:int3", "calibrated-multilevel", "multilevel@none", "phase-oracle"]
    return ["calibrated-multilevel", "multilevel", "phase-oracle"]


def parse_spec(spec: str):
    """'multilevel@dict' -> (planner, warm-start text or None (all) or 'none', phase oracle?)."""
    base, at, source = spec.partition("@")
    oracle = base.split(":")[0].strip().lower() == "phase-oracle"
    planner = parse_policy("oracle" + base.strip()[len("phase-oracle"):] if oracle else base)
    dynamic = getattr(planner, "dynamic", False)
    if at:
        if oracle or (not dynamic and planner.hotness_source != "calibration"):
            raise UserError(f"policy {spec!r}: @TEXT names the calibration text of a runtime policy's warm start "
                            "or of a calibrated policy; this policy has none")
        if not source:
            raise UserError(f"policy {spec!r}: write SPEC@NAME (a calibration text's name) or SPEC@none")
        if source == "none" and not dynamic:
            raise UserError(f"policy {spec!r}: a calibrated policy needs a calibration; @none (no warm start) is "
                            "for the runtime policies")
    return planner, (source if at else None), oracle


@torch.inference_mode()
def stream_phase(ev, name: str, idx: list, step_tokens: int) -> tuple:
    """Stream windows `idx` of domain `name` through ev's engine -> (sum of KL, top-1 hits, scored positions,
    tokens streamed)."""
    kl = top1 = 0.0
    count = tokens = 0
    for i in idx:
        x = ev.windows[name][i:i + 1].to(ev.engine.model.device)  # [1, T]
        logp = F.log_softmax(stream_logits(ev.engine, x, step_tokens)[0, :-1].float(), dim=-1).cpu()
        ref = torch.from_numpy(np.array(ev.ref_logp[name][i // ev.batch][i % ev.batch]))
        kl += (ref.exp() * (ref - logp)).sum().item()
        top1 += (ref.argmax(-1) == logp.argmax(-1)).sum().item()
        count += logp.shape[0]
        tokens += x.shape[1]
    return kl, top1, count, tokens


@torch.inference_mode()
def run_shift(ev, policy: str, budget=None, repeats: int = 2, step_tokens: int = 32,
              config: RuntimeConfig = RuntimeConfig(), scenario: str = "shift") -> dict:
    """One policy through the scenario's stream on Evaluation `ev` -> result dict (see the module doc)."""
    if step_tokens < 1:
        raise UserError(f"--step-tokens must be >= 1, got {step_tokens}")
    planner, source, oracle = parse_spec(policy)
    budget_bytes = resolve_budget(budget, ev.sized)
    engine, rt = ev.engine, None
    stream = phases(ev.windows, repeats, scenario)
    if oracle:
        hot = {phase: ev.reference_hotness(name, idx) for phase, name, idx in stream}  # before any map is set
    elif getattr(planner, "dynamic", False):
        def calibrate(floor):
            mass = ev.calibration_hotness(floor, source)
            return {layer: m / ev.calibration_token_counts[source] for layer, m in mass.items()}
        rt = start_runtime(engine, planner, budget_bytes, config, None if source == "none" else calibrate,
                           progress=False)
    else:
        hotness = ev.calibration_hotness(planner.floor(ev.reader), source) if planner.hotness_source == "calibration" \
            else (ev.eval_hotness if planner.hotness_source == "eval" else None)
        engine.apply(planner.plan(ev.sized, budget_bytes, hotness))
    name_of = ("phase-" + str(planner)) if oracle else str(planner) + (f"@{source}" if source else "")
    try:
        t0 = time.perf_counter()
        per_phase, total, streamed = [], {"kl": 0.0, "top1": 0.0, "tokens": 0}, 0
        for phase, name, idx in tqdm(stream, desc=f"{scenario} {name_of}", disable=not ev.progress):
            if oracle:
                engine.apply(planner.plan(ev.sized, budget_bytes, hot[phase]))
            before = rt.stats()["transitions"] if rt else {}  # (both regimes: the offload one counts fetches)
            kl, top1, count, tokens = stream_phase(ev, name, idx, step_tokens)
            streamed += tokens
            row = {"phase": phase, "kl": kl / count, "top1": top1 / count, "tokens": streamed}
            if rt:
                after = rt.stats()["transitions"]
                row.update(pairs=after["pairs"] - before["pairs"], bytes_moved=after["bytes_moved"] - before["bytes_moved"])
            if oracle:
                row["expert_bytes"] = engine.expert_bytes()
            per_phase.append(row)
            total["kl"] += kl
            total["top1"] += top1
            total["tokens"] += count
        out = {"policy": name_of, "budget": budget_bytes,
               "expert_bytes": max(p["expert_bytes"] for p in per_phase) if oracle else engine.expert_bytes(),
               "mean_kl": total["kl"] / total["tokens"], "top1": total["top1"] / total["tokens"],
               "phases": per_phase, "seconds": round(time.perf_counter() - t0, 2)}
        if rt:
            s = rt.stats()
            out.update(switches=s["transitions"]["pairs"], bytes_moved=s["transitions"]["bytes_moved"],
                       decisions=s["decisions"], deferrals=s["transitions"]["deferrals"],
                       failures=s["transitions"]["failures"], forward_wait_s=s["forward_wait_s"],
                       staging_bytes=s["bytes"]["staging"], peak_bytes=s["bytes"]["peak_used"])
        else:
            counts = {}
            for v in (v for b in engine.banks.values() for v in b.versions):
                counts[v.precision.value] = counts.get(v.precision.value, 0) + 1
            out["precisions"] = counts
        return out
    finally:
        if rt is not None:
            stop_runtime(engine, rt)


def table(results: list) -> str:
    names = [p["phase"] for p in results[0]["phases"]]
    oracle = next((r for r in results if r["policy"].startswith("phase-oracle")), None)
    head = (f"{'policy':<56} {'MiB':>6} {'mean KL':>8} " + ("x oracle " if oracle else "")
            + " ".join(f"{n:>9}" for n in names) + f" {'switches':>8}")
    lines = [head, "-" * len(head)]
    for r in results:
        ratio = f"{r['mean_kl'] / oracle['mean_kl']:>8.2f} " if oracle else ""
        lines.append(f"{r['policy']:<56} {r['expert_bytes'] / 2**20:>6.2f} {r['mean_kl']:>8.5f} {ratio}"
                     + " ".join(f"{p['kl']:>9.5f}" for p in r["phases"]) + f" {r.get('switches', '-'):>8}")
    return "\n".join(lines)


def _short(policy: str) -> str:
    """'multilevel:ladder=...,delta=0.01@dict' -> 'multilevel@dict' (the legend's name)."""
    base, at, source = policy.partition("@")
    return base.split(":ladder")[0].split(",alloc")[0].split(",delta")[0] + at + source


def plot(report: dict, path: Path) -> None:
    """KL per phase against tokens streamed, one line per policy."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from dynaexq.eval.report import atomic_save

    fig, ax = plt.subplots(figsize=(7.5, 4.8), dpi=120)
    for r in report["results"]:
        oracle = r["policy"].startswith("phase-oracle")
        ax.plot([p["tokens"] for p in r["phases"]], [p["kl"] for p in r["phases"]], marker="o" if not oracle else "v",
                linestyle=":" if oracle else "-", color="k" if oracle else None,
                label=_short(r["policy"]))
    phases_ = report["results"][0]["phases"]
    ax.set_xticks([p["tokens"] for p in phases_], [f"{p['tokens']}\n{p['phase']}" for p in phases_], fontsize=7)
    ax.set_xlabel("tokens streamed (end of each phase)")
    ax.set_ylabel("mean KL to the reference in the phase")
    ax.set_yscale("log")
    budget = next((r["budget"] for r in report["results"] if r["budget"]), None)
    ax.set_title(f"{Path(report['model']).name}: --scenario {report['scenario']}"
                 + (f", expert budget {format_size(budget)}" if budget else ""), fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    atomic_save(path, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)


def write_outputs(report: dict, outdir: Path) -> list:
    """--plot: <scenario>.png, .md (the table) and .json in outdir -> the paths written."""
    from dynaexq.eval.report import atomic_save

    outdir = Path(outdir)
    name = report["scenario"]
    paths = [outdir / f"{name}.png", outdir / f"{name}.md", outdir / f"{name}.json"]
    plot(report, paths[0])
    md = (f"# --scenario {name}: {Path(report['model']).name}\n\n![{name}]({name}.png)\n\n```\n"
          f"{table(report['results'])}\n```\n")
    atomic_save(paths[1], lambda tmp: Path(tmp).write_text(md))
    atomic_save(paths[2], lambda tmp: Path(tmp).write_text(json.dumps(report, indent=1)))
    return paths


def evaluate_shift(model, data=None, policies=None, budgets=None, windows=EVAL_WINDOWS, window_tokens=WINDOW_TOKENS,
                   calibration=None, calibration_windows=CALIBRATION_WINDOWS, repeats: int | None = None,
                   step_tokens: int = 32, config: RuntimeConfig = RuntimeConfig(), progress=True, store=None,
                   dtype=torch.float32, verify=VERIFY, scenario: str = "shift", dense: str = "model",
                   device="cpu", record_routing=None) -> dict:
    """The whole `dynaexq eval --scenario ...` -> JSON report (every policy at every budget; default int3)."""
    from dynaexq.store.reader import StoreReader

    if scenario not in SCENARIOS:
        raise UserError(f"unknown scenario {scenario!r}; valid: {', '.join(SCENARIOS)}")
    repeats = DEFAULT_REPEATS[scenario] if repeats is None else repeats
    if repeats < 1:
        raise UserError(f"--repeats must be >= 1, got {repeats}")
    budgets = list(budgets or ["int3"])
    parsed = [parse_spec(p) for p in policies or []]  # bad specs fail before any work
    data = parse_data(data, _model_dir(model))
    store = check_plans(model, [pl for pl, _, _ in parsed], budgets, store)
    reader = StoreReader(store)
    texts = list(calibration_texts(model, reader, calibration))
    reader.close()
    policies = list(policies or default_policies(scenario, next(iter(data)), texts))
    parsed = [parse_spec(p) for p in policies]
    for _, source, _ in parsed:
        if source not in (None, "none") and source not in texts:
            raise UserError(f"@{source}: no calibration text named {source!r}; the calibration texts are "
                            f"{', '.join(texts)} (give others with --calibration NAME=FILE)")
    ev = None
    try:
        ev = Evaluation(model, data, windows, window_tokens, calibration, calibration_windows, progress=progress,
                        store=store, dtype=dtype, verify=verify, dense=dense, device=device,
                        record_routing=record_routing)
        stream = phases(ev.windows, repeats, scenario)  # too few windows fails before any policy runs
        results = [run_shift(ev, spec, b, repeats, step_tokens, config, scenario)
                   for spec, (pl, _, _) in zip(policies, parsed)
                   for b in (budgets if budgeted(pl) else [None])]
        return {**ev.report([]), "scenario": scenario, "repeats": repeats, "step_tokens": step_tokens,
                "phases": [{"phase": p, "domain": n, "windows": idx} for p, n, idx in stream],
                "runtime": {"alpha": config.alpha, "half_life_tokens": config.half_life_tokens,
                            "update_every": config.update_every, "update_every_tokens": config.update_every_tokens},
                "results": results}
    finally:
        if ev is not None:
            ev.close()
