"""The offload regime: decode speed, hit rate, bytes read, prefetch recall, stall and quality below the all-low budget.

For each model (the bundled one; a Qwen3-30B-A3B-shaped synthetic checkpoint, bench/_common.py, whose store is
several times the budgets) and each expert budget (50 %, 25 %, 10 % of every expert at int2), every policy runs on
the same engine (runtime started and stopped in turn, cache cold at each start): greedy decode of B prompts
(B = 1, 8), `--warm` tokens first (the cache fills, the controller decides), then `--repeats` windows of
`--tokens` tokens, median tok/s. Reads go to the disk (O_DIRECT): the page cache does not hold the store.
Every version's digest is checked once before the runs (a first-read cost). Reported per run: decode tok/s, hit rate, bytes read per token, look-ahead recall, stall (forward waiting for
misses) ms per token, and the physical floor = the disk bandwidth measured here / bytes read per token (what the
run would reach if compute were free). Ratios vs `lru-offload:int4` (mixtral-offloading) at the same budget.
Quality (bundled model): mean KL per token on its eval texts against the model at bf16, and against the
stall-free all-low reference (uniform:int2, every expert resident), for each policy at each budget.
Human table, then one JSON line.

  .venv/bin/python bench/offload.py --models bundled                  # bundled_offload.out (2 min, KL too)
  .venv/bin/python bench/offload.py --models synthetic --batches 1    # synthetic_b1 (5 min; a prepared store is reused)
  .venv/bin/python bench/offload.py --models synthetic --batches 8 --warm 8 --tokens 6 \
      --policies "lru-offload:int4;dynaexq:hi=int4,lo=int2,hi_share=0.25;dynaexq:hi=int4,lo=int2"   # synthetic_b8
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import fmt_bytes, synthetic_checkpoint, synthetic_name  # noqa: E402

POLICIES = ["lru-offload:int4", "lru-offload+prefetch:int4", "dynaexq:hi=int4,lo=int2,hi_share=0.25",
            "dynaexq:hi=int4,lo=int2,hi_share=0.25,prefetch=1", "dynaexq:hi=int4,lo=int2"]  # the last: the default
BASELINE = "lru-offload:int4"


def disk_bandwidth(reader, precision, n: int = 64) -> float:
    """Bytes/s of O_DIRECT reads of whole expert versions (as the cache reads them), over `n` distinct ones."""
    from dynaexq.store.direct import DirectReader
    io = DirectReader(reader, "direct")
    lazy, reader.lazy = reader.lazy, False  # the disk alone: no digest check in the figure
    layer = reader.layers[-1]
    t0 = time.perf_counter()
    for e in range(min(n, reader.num_experts)):
        io.read(layer, e, precision)
    dt = time.perf_counter() - t0
    io.close()
    reader.lazy = lazy
    return io.stats["bytes"] / dt


def verify_once(reader) -> None:
    """Check every version's digest now (the reader checks each on its first read): a first-read cost that would
    otherwise fall on whichever policy runs first."""
    from dynaexq.store.direct import DirectReader
    io = DirectReader(reader, "direct")
    for p in reader.precisions:
        for layer in reader.layers:
            for e in range(reader.num_experts):
                io.read(layer, e, p)
    io.close()


@torch.inference_mode()
def decode(engine, prompt, warm: int, tokens: int, repeats: int):
    """Greedy decode of prompt [B, S]: -> (tok/s per repeat window, runtime stats after each window)."""
    out = engine.run(input_ids=prompt, use_cache=True, logits_to_keep=1)  # each forward one engine step
    cache, tok = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)

    def run(n):
        nonlocal tok
        for _ in range(n):
            out = engine.run(input_ids=tok, past_key_values=cache, use_cache=True)
            tok = out.logits[:, -1].argmax(-1, keepdim=True)

    run(warm)
    rates, windows = [], []
    for _ in range(repeats):
        before = engine.runtime.residency.report()
        t0 = time.perf_counter()
        run(tokens)
        dt = time.perf_counter() - t0
        after = engine.runtime.residency.report()
        rates.append(prompt.shape[0] * tokens / dt)
        windows.append((before, after, dt))
    return rates, windows


def window_stats(windows, batch: int, tokens: int) -> dict:
    """Per token of the measured windows (medians over windows): hits, bytes, stall."""
    rows = []
    for b, a, dt in windows:
        d = {k: a.get(k, 0) - b.get(k, 0) for k in ("hits", "misses", "stall_s", "prefetches_done", "prefetch_hits")}
        io = a["io"]["bytes"] - b["io"]["bytes"]
        n = batch * tokens
        rows.append({"hit_rate": d["hits"] / max(1, d["hits"] + d["misses"]), "bytes_per_token": io / n,
                     "stall_ms_per_token": 1e3 * d["stall_s"] / tokens, "step_ms": 1e3 * dt / tokens,
                     "prefetch_hits": d["prefetch_hits"], "prefetches_done": d["prefetches_done"]})
    return {k: statistics.median(r[k] for r in rows) for k in rows[0]}


def budgets_of(reader, slot_int2: int, fractions) -> dict:
    low = len(reader.layers) * reader.num_experts * slot_int2
    return {f: int(low * f) for f in fractions}


def kl_scores(engine, windows, ref_logp: dict, policy: str, budget: int, config) -> dict:
    from dynaexq.engine.dynamic import start_runtime, stop_runtime
    from dynaexq.runtime.planners import parse_policy
    rt = start_runtime(engine, parse_policy(policy), budget, config, None, progress=False)
    try:
        logp = _logp(engine, windows)
    finally:
        stop_runtime(engine, rt)
    return {name: _kl(r, logp) for name, r in ref_logp.items()}


@torch.inference_mode()
def _logp(engine, windows):
    out = []
    for w in windows:
        out.append(F.log_softmax(engine.run(input_ids=w[None]).logits[0, :-1].float(), -1))
    return out


def _kl(ref, got) -> float:
    return float(sum((r.exp() * (r - g)).sum() for r, g in zip(ref, got)) / sum(r.shape[0] for r in ref))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="bundled,synthetic")
    ap.add_argument("--workdir", default="/tmp/dynaexq-bench")
    ap.add_argument("--synthetic-layers", type=int, default=8)
    ap.add_argument("--fractions", default="0.5,0.25,0.1")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--warm", type=int, default=24)
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--update-every-tokens", type=int, default=16)
    ap.add_argument("--kl-windows", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--policies", default=";".join(POLICIES), help="separated by ;  (lru-offload:int4 is the baseline)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    import dynaexq
    from dynaexq.demo import BUNDLED
    from dynaexq.engine.dynamic import measure, start_runtime, stop_runtime
    from dynaexq.engine.engine import read_text, text_windows
    from dynaexq.errors import UserError
    from dynaexq.quant.precision import Precision
    from dynaexq.config import RuntimeConfig
    from dynaexq.runtime.planners import parse_policy

    config = RuntimeConfig(update_every_tokens=args.update_every_tokens)
    fractions = [float(f) for f in args.fractions.split(",")]
    batches = [int(b) for b in args.batches.split(",")]
    policies = args.policies.split(";")
    results = {"threads": args.threads, "update_every_tokens": args.update_every_tokens, "models": {}}
    for model in args.models.split(","):
        if model == "bundled":
            path = BUNDLED
        else:
            name = synthetic_name(args.synthetic_layers, 128, 8192)  # a prepared store is used as it is
            path = next(Path(args.workdir).glob(f"store-{name}-*int4_int2*"), None)
            if path is None:
                from dynaexq.store.prepare import prepare
                ckpt = synthetic_checkpoint(args.workdir, layers=args.synthetic_layers, experts=128, vocab=8192)
                path = prepare(ckpt, Path(args.workdir) / f"store-{ckpt.name}-int4_int2",
                               precisions=("int4", "int2"), progress=True)
        engine = dynaexq.load(path, "uniform:int2", progress=False)
        reader = engine.reader
        slots = measure(engine, parse_policy("dynaexq:hi=int4,lo=int2"), 1 << 50, config)[0]
        slot2 = slots[(reader.layers[0], Precision.INT2)]
        bw = disk_bandwidth(reader, Precision.INT2)
        verify_once(reader)
        engine.close()
        tok = engine.tokenizer
        text = read_text(sorted((BUNDLED / "eval").glob("*.txt"))[0])
        ids = tok(text, add_special_tokens=False)["input_ids"]
        m = {"store": str(reader.path), "layers": len(reader.layers), "experts": reader.num_experts,
             "all_int2_bytes": len(reader.layers) * reader.num_experts * slot2, "disk_bytes_per_s": bw, "runs": []}
        print(f"\n== {model}: {len(reader.layers)} MoE layers x {reader.num_experts} experts, every expert at int2 "
              f"{fmt_bytes(m['all_int2_bytes'])}; O_DIRECT read bandwidth {bw / 1e9:.2f} GB/s", flush=True)
        print(f"{'budget':>8} {'B':>2} {'policy':<42} {'tok/s':>7} {'x lru':>6} {'floor':>7} {'hit':>5} "
              f"{'MB/tok':>7} {'recall':>6} {'stall ms/t':>10}", flush=True)
        for frac, budget in budgets_of(reader, slot2, fractions).items():
            for B in batches:
                prompt = torch.tensor([ids[i * 97:i * 97 + 16] for i in range(B)])
                row = {}
                for pol in policies:
                    try:
                        rt = start_runtime(engine, parse_policy(pol), budget, config, None, progress=False)
                    except UserError as err:
                        print(f"{frac:>7.0%} {B:>2} {pol:<42} refused: {str(err)[:90]}", flush=True)
                        m["runs"].append({"fraction": frac, "batch": B, "policy": pol, "refused": str(err)})
                        continue
                    try:
                        rates, windows = decode(engine, prompt, args.warm, args.tokens, args.repeats)
                        rep = rt.stats()["offload"]
                    finally:
                        stop_runtime(engine, rt)
                    ws = window_stats(windows, B, args.tokens)
                    r = {"fraction": frac, "budget": budget, "batch": B, "policy": pol,
                         "tok_s": statistics.median(rates), "rates": rates, **ws,
                         "floor_tok_s": bw / ws["bytes_per_token"] if ws["bytes_per_token"] else None,
                         "recall": rep["mean_recall"], "recall_per_layer": rep["recall"],
                         "resident": rep["resident"], "cache": {p: n for p, n in
                                                                ((p.value, n) for p, n in rt.planner.counts.items())}}
                    row[pol] = r
                    m["runs"].append(r)
                    base = row.get(BASELINE)
                    ratio = f"{r['tok_s'] / base['tok_s']:.2f}" if base else "-"
                    floor = f"{r['floor_tok_s']:.1f}" if r["floor_tok_s"] else "inf"
                    rec = f"{r['recall']:.2f}" if r["recall"] is not None else "-"
                    print(f"{frac:>7.0%} {B:>2} {pol:<42} {r['tok_s']:>7.1f} {ratio:>6} {floor:>7} "
                          f"{r['hit_rate']:>5.2f} {r['bytes_per_token'] / 1e6:>7.2f} {rec:>6} "
                          f"{r['stall_ms_per_token']:>10.1f}", flush=True)
        if model == "bundled":  # quality: KL on the eval text windows
            windows = text_windows(tok, text, args.kl_windows, 128, "eval text")
            refs = {}
            for name, spec in (("bf16", "uniform:bf16"), ("all-int2", "uniform:int2")):
                eng_ref = dynaexq.load(path, spec, progress=False)
                refs[name] = _logp(eng_ref, windows)
                eng_ref.close()
            m["kl"] = []
            print(f"\nmean KL per token on {len(windows)} eval windows x 128 tokens: vs bf16 | vs all-int2 (stall-free)")
            for frac, budget in budgets_of(reader, slot2, fractions).items():
                for pol in policies:
                    try:
                        kl = kl_scores(engine, windows, refs, pol, budget, config)
                    except UserError:
                        continue
                    m["kl"].append({"fraction": frac, "policy": pol, **kl})
                    print(f"{frac:>7.0%} {pol:<42} {kl['bf16']:.5f} | {kl['all-int2']:.5f}", flush=True)
            eng_int4 = dynaexq.load(path, "uniform:int4", progress=False)
            m["kl_uniform_int4_vs_bf16"] = _kl(refs["bf16"], _logp(eng_int4, windows))
            eng_int4.close()
            m["kl_uniform_int2_vs_bf16"] = _kl(refs["bf16"], refs["all-int2"])
            print(f"  (resident references: uniform:int4 {m['kl_uniform_int4_vs_bf16']:.5f}, uniform:int2 "
                  f"{m['kl_uniform_int2_vs_bf16']:.5f} vs bf16)")
        results["models"][model] = m
    print(json.dumps(results))


if __name__ == "__main__":
    main()
