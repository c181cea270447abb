"""The workload-shift scenario of `dynaexq eval --scenario shift`: domains in phases, the controller live.

The evaluation windows of each domain are split into `repeats` blocks; the phases are block 0 of every domain in
order (e.g. code -> prose -> dict), then block 1 of every domain, and so on. Each window is streamed through the
model in steps of `step_tokens` tokens with a KV cache (the logits equal one full-window forward), so the
controller sees a step after every chunk, like decode steps of a batch. Runtime policies (dynaexq, multilevel,
frozen) start the runtime on the evaluation's engine with its calibration warm start and run with their
transitions live in the background; static policies publish their map once. Per phase and in total: mean KL to
the reference, top-1 agreement, and the transitions made (pairs, bytes moved) -- with the experts each window
actually read, whatever the transitions had published by then.
"""
from __future__ import annotations

import time

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import DynamicCache

from dynaexq.engine.dynamic import start_runtime, stop_runtime
from dynaexq.errors import UserError
from dynaexq.runtime.controller import RuntimeConfig
from dynaexq.runtime.planners import parse_policy, resolve_budget

DEFAULT_UPDATE_EVERY = 16  # steps of 32 tokens: 512 tokens between decisions, 4 per phase of 8 windows


def phases(windows: dict, repeats: int) -> list:
    """-> [(phase name, domain, [window indices])]: block r of every domain, for r in range(repeats)."""
    out = []
    for r in range(repeats):
        for name, w in windows.items():
            n = len(w)
            if n < repeats:
                raise UserError(f"--scenario shift: domain {name!r} has {n} windows, fewer than --repeats {repeats}")
            idx = list(range(r * n // repeats, (r + 1) * n // repeats))
            out.append((f"{r + 1}:{name}", name, idx))
    return out


@torch.inference_mode()
def run_shift(ev, policy: str, budget=None, repeats: int = 2, step_tokens: int = 32,
              config: RuntimeConfig = RuntimeConfig(update_every=DEFAULT_UPDATE_EVERY)) -> dict:
    """One policy through the shift scenario on Evaluation `ev` -> result dict (see the module doc)."""
    if step_tokens < 1:
        raise UserError(f"--step-tokens must be >= 1, got {step_tokens}")
    planner = parse_policy(policy)
    budget_bytes = resolve_budget(budget, ev.reader)
    engine, rt = ev.engine, None
    if getattr(planner, "dynamic", False):
        def calibrate(floor):
            mass = ev.calibration_hotness(floor)
            return {layer: m / ev.calibration_token_count for layer, m in mass.items()}
        rt = start_runtime(engine, planner, budget_bytes, config, calibrate, progress=False)
    else:
        hotness = ev.calibration_hotness(planner.floor(ev.reader)) if planner.hotness_source == "calibration" else (
            ev.eval_hotness if planner.hotness_source == "eval" else None)
        engine.apply(planner.plan(ev.reader, budget_bytes, hotness))
    try:
        t0 = time.perf_counter()
        per_phase = []
        total = {"kl": 0.0, "top1": 0.0, "tokens": 0}
        for phase, name, idx in tqdm(phases(ev.windows, repeats), desc=f"shift {planner}", disable=not ev.progress):
            before = dict(rt.transitions.stats) if rt else {}
            kl = top1 = 0.0
            count = 0
            for i in idx:
                x = ev.windows[name][i:i + 1].to(engine.model.device)  # [1, T]
                cache = DynamicCache(config=engine.model.config)
                chunks = []
                for s in range(0, x.shape[1], step_tokens):
                    chunks.append(engine.model(input_ids=x[:, s:s + step_tokens], past_key_values=cache,
                                               use_cache=True).logits)
                    engine.after_step()
                logits = torch.cat(chunks, 1)
                logp = F.log_softmax(logits[0, :-1].float(), dim=-1).cpu()  # [T-1, V]
                ref = torch.from_numpy(np.array(ev.ref_logp[name][i // ev.batch][i % ev.batch]))
                kl += (ref.exp() * (ref - logp)).sum().item()
                top1 += (ref.argmax(-1) == logp.argmax(-1)).sum().item()
                count += logp.shape[0]
            row = {"phase": phase, "kl": kl / count, "top1": top1 / count}
            if rt:
                after = rt.transitions.stats
                row.update(pairs=after["pairs"] - before["pairs"], bytes_moved=after["bytes_moved"] - before["bytes_moved"])
            per_phase.append(row)
            total["kl"] += kl
            total["top1"] += top1
            total["tokens"] += count
        out = {"policy": str(planner), "budget": budget_bytes, "expert_bytes": engine.expert_bytes(),
               "mean_kl": total["kl"] / total["tokens"], "top1": total["top1"] / total["tokens"],
               "phases": per_phase, "seconds": round(time.perf_counter() - t0, 2)}
        if rt:
            s = rt.stats()
            out.update(switches=s["transitions"]["pairs"], bytes_moved=s["transitions"]["bytes_moved"],
                       decisions=s["decisions"], deferrals=s["transitions"]["deferrals"],
                       failures=s["transitions"]["failures"], forward_wait_s=s["forward_wait_s"],
                       staging_bytes=s["bytes"]["staging"])
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
    head = f"{'policy':<52} {'MiB':>6} {'mean KL':>8} " + " ".join(f"{n:>9}" for n in names) + f" {'switches':>8}"
    lines = [head, "-" * len(head)]
    for r in results:
        lines.append(f"{r['policy']:<52} {r['expert_bytes'] / 2**20:>6.2f} {r['mean_kl']:>8.5f} "
                     + " ".join(f"{p['kl']:>9.5f}" for p in r["phases"]) + f" {r.get('switches', '-'):>8}")
    return "\n".join(lines)


SHIFT_POLICIES = ("dynaexq:hi=int8,lo=int2", "multilevel", "frozen:hi=int8,lo=int2", "calibrated:hi=int8,lo=int2",
                  "calibrated-multilevel", "uniform:int3")


def evaluate_shift(model, data=None, policies=None, budgets=None, windows=16, window_tokens=256, calibration=None,
                   calibration_windows=128, repeats: int = 2, step_tokens: int = 32,
                   config: RuntimeConfig = RuntimeConfig(update_every=DEFAULT_UPDATE_EVERY), progress=True, store=None,
                   dtype=torch.float32, verify="lazy") -> dict:
    """The whole `dynaexq eval --scenario shift` -> JSON report (every policy at every budget; default int3)."""
    from dynaexq.eval.harness import Evaluation, _model_dir, check_plans, parse_data

    policies = list(policies or SHIFT_POLICIES)
    budgets = list(budgets or ["int3"])
    planners = [parse_policy(p) for p in policies]
    data = parse_data(data, _model_dir(model))
    store = check_plans(model, [p for p in planners if not getattr(p, "dynamic", False)], budgets, store)
    ev = Evaluation(model, data, windows, window_tokens, calibration, calibration_windows, progress=progress,
                    store=store, dtype=dtype, verify=verify)
    try:
        phases(ev.windows, repeats)  # too few windows fails before any policy runs
        results = [run_shift(ev, spec, b, repeats, step_tokens, config)
                   for spec, pl in zip(policies, planners)
                   for b in (budgets if pl.hotness_source else [None])]
        return {**ev.report([]), "scenario": "shift", "repeats": repeats, "step_tokens": step_tokens,
                "runtime": {"alpha": config.alpha, "update_every": config.update_every,
                            "update_every_tokens": config.update_every_tokens}, "results": results}
    finally:
        ev.close()
