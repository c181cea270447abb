"""Decode speed with the DynaExq controller and transitions live vs a static map of the same bytes.

Command (~5 min on 2 quiet cores; `--quick` ~1 min):

    .venv/bin/python bench/switching.py                   # the bundled model, --expert-budget int3

What it measures
  Model: the bundled dxq-moe-mini (or --model), policy dynaexq:hi=int8,lo=int2 at --expert-budget (default int3 =
  the bytes of every expert at int3), warm start from its calibration texts (measured once, all-low, and
  reused by every run so that all modes start from the same map).
  Workload: greedy decode, batch 1, --new-tokens per prompt; the prompts are --prompt-tokens token prefixes
  taken in turn from the model's eval texts (code, prose, dict, code, ...): the routing shifts between
  prompts, so the controller keeps re-deciding (default: the runtime's, every 128 tokens with a 256-token
  hotness half-life; --update-every N decides every N steps with the paper's alpha 0.9 unless --half-life-tokens).
  Modes (one engine, the runtime restarted per sample; samples interleaved, rotating order; median of
  --repeats):
    static     frozen:hi=int8,lo=int2 -- the same pools and warm-start map, never changed
    live       dynaexq:hi=int8,lo=int2 -- decisions as configured, transitions on a background thread (the
               forward pass only takes read leases)
    blocking   the same with transitions run inline at each decision (the paper's blocking-migration
               ablation: the forward pass waits for them)
  tokens/s = new tokens / decode seconds (prefill included in neither). Forward wait = time the forward
  passes waited for the table lock (live) or for inline transitions (blocking). Switches = swaps decided.
Goals: live / static >= 0.97; forward wait of live = 0 ms (reported in ms: lock waits are microseconds).
Output: a human table, then one JSON object on the last stdout line.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import CpuLoad  # noqa: E402

from dynaexq.config import RuntimeConfig  # noqa: E402
from dynaexq.demo import default_model  # noqa: E402
from dynaexq.engine.dynamic import start_runtime, stop_runtime  # noqa: E402
from dynaexq.engine.load import load  # noqa: E402
from dynaexq.engine.model import calibration_files, calibration_tokens  # noqa: E402
from dynaexq.runtime.planners import parse_policy, resolve_budget  # noqa: E402

MODES = {"static": ("frozen:hi=int8,lo=int2", False), "live": ("dynaexq:hi=int8,lo=int2", False),
         "blocking": ("dynaexq:hi=int8,lo=int2", True)}


def prompts(engine, model_dir: Path, n: int, length: int) -> list:
    texts = [f.read_text() for f in sorted((model_dir / "eval").glob("*.txt"))]
    ids = [engine.tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    return [torch.tensor(ids[i % len(ids)][(i // len(ids)) * length:(i // len(ids) + 1) * length])[None]
            for i in range(n)]


@torch.inference_mode()
def sample(engine, planner, budget, warm, blocking, config, batch_prompts, new_tokens) -> dict:
    rt = start_runtime(engine, planner, budget, replace(config, blocking=blocking), lambda floor: warm, progress=False)
    try:
        seconds = 0.0
        with CpuLoad() as load_:
            for ids in batch_prompts:
                out = engine.run(input_ids=ids, use_cache=True)  # prefill, not timed
                cache, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
                t0 = time.perf_counter()
                for _ in range(new_tokens):  # each one engine step: the controller's part is timed, as in serving
                    out = engine.run(input_ids=nxt, past_key_values=cache, use_cache=True)
                    nxt = out.logits[:, -1:].argmax(-1)
                seconds += time.perf_counter() - t0
        s = rt.stats()
        return {"tok_s": len(batch_prompts) * new_tokens / seconds, "wait_ms": 1e3 * s["forward_wait_s"],
                "switches": s["transitions"]["pairs"], "moved_mib": s["transitions"]["bytes_moved"] / 2**20,
                "decisions": s["decisions"], "others": load_.others}
    finally:
        stop_runtime(engine, rt)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--expert-budget", default="int3")
    ap.add_argument("--prompts", type=int, default=6)
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--update-every", type=int, default=None, help="decide every N steps (default: the runtime's "
                    "default interval)")
    ap.add_argument("--update-every-tokens", type=int, default=None)
    ap.add_argument("--half-life-tokens", type=float, default=None)
    ap.add_argument("--alpha", type=float, default=None)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--calibration-windows", type=int, default=32)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--quick", action="store_true", help="3 prompts x 32 tokens, 3 repeats")
    a = ap.parse_args()
    if a.quick:
        a.prompts, a.new_tokens, a.repeats = 3, 32, 3
    if a.threads:
        torch.set_num_threads(a.threads)
    model = Path(a.model) if a.model else default_model()
    engine = load(model, "uniform:int2", progress=False)
    budget = resolve_budget(a.expert_budget, engine.reader)
    windows = calibration_tokens(engine.tokenizer, calibration_files(model, engine.reader, None),
                                 a.calibration_windows, 256)
    warm = {layer: m / windows.numel() for layer, m in engine.routing_mass(windows).items()}
    batch_prompts = prompts(engine, model, a.prompts, a.prompt_tokens)
    given = {k: getattr(a, k) for k in ("update_every", "update_every_tokens", "half_life_tokens", "alpha")
             if getattr(a, k) is not None}
    config = RuntimeConfig(**given)  # nothing given: the runtime's defaults
    runs = {m: [] for m in MODES}
    for r in range(a.repeats):
        order = list(MODES)[r % 3:] + list(MODES)[:r % 3]
        for mode in order:
            spec, blocking = MODES[mode]
            runs[mode].append(sample(engine, parse_policy(spec), budget, warm, blocking, config,
                                     batch_prompts, a.new_tokens))
    med = {m: {k: statistics.median(s[k] for s in runs[m]) for k in runs[m][0]} for m in MODES}
    ratio = {m: statistics.median(s["tok_s"] / b["tok_s"] for s, b in zip(runs[m], runs["static"])) for m in MODES}
    print(f"bench/switching.py: {model.name}, expert budget {a.expert_budget} ({budget} B), {a.prompts} prompts x "
          f"{a.new_tokens} tokens, decisions every "
          + (f"{config.update_every_tokens} tokens" if config.update_every_tokens else f"{config.update_every} steps")
          + f", hotness {f'half-life {config.half_life_tokens:g} tokens' if config.half_life_tokens else f'alpha {config.alpha}'}"
          f", {a.repeats} repeats (medians)")
    print(f"{'mode':<10} {'tok/s':>7} {'x static':>8} {'wait ms':>8} {'switches':>8} {'MiB moved':>9} {'others':>6}")
    for m in MODES:
        d = med[m]
        print(f"{m:<10} {d['tok_s']:>7.1f} {ratio[m]:>8.3f} {d['wait_ms']:>8.2f} {d['switches']:>8.0f} "
              f"{d['moved_mib']:>9.2f} {d['others']:>6.2f}")
    print(f"goals: live/static >= 0.97: {'pass' if ratio['live'] >= 0.97 else 'MISS'} ({ratio['live']:.3f}); "
          f"live forward wait {med['live']['wait_ms']:.3f} ms")
    print(json.dumps({"bench": "switching", "model": model.name, "expert_budget": budget, "args": vars(a),
                      "median": med, "ratio_to_static": ratio, "samples": runs}))


if __name__ == "__main__":
    main()
