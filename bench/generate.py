"""Decode speed (tokens/s) of plain transformers vs dynaexq at bf16 / int4 / int2, batch 1 and 8, on the CPU.

Command (full run, ~5 min on 2 quiet cores; reuses the checkpoint and store of bench/prepare.py in
--workdir when present, else builds/prepares them first, a few minutes once; `--quick` is a ~1 min smoke
test on a 1-layer, 8-expert checkpoint):

    .venv/bin/python bench/generate.py                 # --workdir /tmp/dynaexq-bench
    .venv/bin/python bench/generate.py --quick

What it measures
  Model: the synthetic Qwen3MoeForCausalLM of bench/_common.py (Qwen3-30B-A3B layer shapes: hidden 2048,
  128 experts of moe_intermediate 768, top-8; 32 / 4 heads of 128; `--layers` layers, default 2; vocab 4096),
  random bf16 weights, no tokenizer: prompts are random input_ids.
  Variants, all loaded at once and timed interleaved (rotating order per repeat):
    transformers        AutoModelForCausalLM.from_pretrained(dtype=bf16), default experts implementation
                        (transformers 5.23: "grouped_mm")
    transformers-eager  the same model after model.set_experts_implementation("eager") (per-expert loop)
    dynaexq-bf16 / -int4 / -int2   dynaexq.load(checkpoint, policy="uniform:<p>", store=<prepared store>,
                        backend cpu, verify="off")
  One sample: prefill a random prompt of --prompt tokens per sequence (not timed), then --new-tokens greedy
  decode steps with the KV cache (model(input_ids=last, past_key_values=cache)), timed with
  perf_counter around the steps only. tokens/s = batch x steps / seconds. Median of --repeats samples,
  ratio to `transformers` taken in the same run. Each sample records how many cores other processes
  used meanwhile; the median is over the uncontended samples (< 0.3 cores) when at least 3 (or half)
  are, else over all (column n says how many). Sanity column: relative L2 difference of the prefill's
  last-position logits against `transformers` (same prompt), and the fraction of greedy tokens equal to
  transformers' (a random model's logits are nearly flat, so bf16 rounding alone flips some).
  Threads: torch.set_num_threads(--threads), default all cores.
Goals (pass/miss, per batch): dynaexq-bf16 >= 0.95x transformers; dynaexq-int4 faster than dynaexq-bf16
(and, for information, than transformers). Goal ratios are paired: per repeat, the ratio of the two
variants' samples (taken back to back), then the median over the uncontended repeats.
Runtime: ~4.5-5 min on a quiet 2-core machine (loading 5 variants ~1 min, ~30-40 s per repeat).

Output: human tables, then one JSON object on the last stdout line.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import CpuLoad, checkpoint_info, fmt_bytes, proc_status, synthetic_checkpoint, wait_for_quiet  # noqa: E402

NEEDED = ("bf16", "int4", "int2")
QUIET = 0.3  # cores used by other processes below which a sample counts as uncontended


def find_store(workdir: Path, ckpt: Path, needed):
    """A complete store of this checkpoint in workdir (e.g. bench/prepare.py's) holding the needed precisions."""
    from dynaexq.store import layout
    from dynaexq.store.checkpoint import Checkpoint
    fingerprint = Checkpoint(ckpt).fingerprint()
    for d in sorted(workdir.glob(f"store-{ckpt.name}-*")):
        m = d / "manifest.json"
        if not m.is_file():
            continue
        man = json.loads(m.read_text())
        src = man.get("source", {})
        if (set(needed) <= set(man.get("precisions", []))
                and man.get("format_version") == layout.FORMAT_VERSION
                and src.get("config_sha256") == fingerprint["config_sha256"] and src.get("files") == fingerprint["files"]):
            return d
    return None


class Variant:
    def __init__(self, name, model, experts_impl=None, nbytes=None, load_s=None, rss=None):
        self.name, self.model, self.experts_impl, self.nbytes, self.load_s = name, model, experts_impl, nbytes, load_s
        self.rss = rss  # growth of this process's anonymous RSS while loading it

    def activate(self):
        if self.experts_impl is not None:
            self.model.set_experts_implementation(self.experts_impl)


@torch.inference_mode()
def decode(model, prompt, steps):
    """-> (seconds of the `steps` decode steps, generated tokens [B, steps], prefill logits [B, V])."""
    out = model(input_ids=prompt, use_cache=True, logits_to_keep=1)
    cache = out.past_key_values
    first_logits = out.logits[:, -1].float()
    tok = first_logits.argmax(-1, keepdim=True)
    toks = []
    t0 = time.perf_counter()
    for _ in range(steps):
        out = model(input_ids=tok, past_key_values=cache, use_cache=True)
        tok = out.logits[:, -1].argmax(-1, keepdim=True)
        toks.append(tok)
    dt = time.perf_counter() - t0
    return dt, torch.cat(toks, 1), first_logits


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--workdir", default="/tmp/dynaexq-bench")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--experts", type=int, default=128)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--prompt", type=int, default=32, help="prompt tokens per sequence (prefill, not timed)")
    ap.add_argument("--new-tokens", type=int, default=32, help="timed decode steps per sample")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--policies", default="uniform:bf16,uniform:int4,uniform:int2")
    ap.add_argument("--no-eager", action="store_true", help="skip the transformers eager-experts row")
    ap.add_argument("--dense-int8", action="store_true", help="also each policy with --dense int8 (the attention "
                    "as int8 codes)")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--wait-quiet", type=float, default=0, metavar="S",
                    help="before timing, wait up to S seconds for other processes to use < 0.3 cores")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true",
                    help="smoke test: 1 layer x 8 experts, prompt 8, 4 decode steps, 2 repeats")
    args = ap.parse_args(argv)
    if args.quick:
        args.layers, args.experts, args.prompt, args.new_tokens, args.repeats = 1, 8, 8, 4, 2
    t_all = time.perf_counter()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    batches = [int(b) for b in args.batches.split(",")]
    policies = [p.strip() for p in args.policies.split(",") if p.strip()]
    needed = sorted({p.split(":", 1)[1] for p in policies if p.startswith("uniform:")})

    import transformers
    import dynaexq

    transformers.utils.logging.disable_progress_bar()
    from dynaexq.store.prepare import prepare

    print(f"bench/generate.py  torch {torch.__version__}  transformers {transformers.__version__}  threads "
          f"{torch.get_num_threads()}  layers {args.layers}  experts {args.experts}  prompt {args.prompt}  "
          f"decode steps {args.new_tokens}  repeats {args.repeats}{'  (quick)' if args.quick else ''}")
    ckpt = synthetic_checkpoint(workdir, layers=args.layers, experts=args.experts, vocab=args.vocab,
                                log=lambda m: print(m, file=sys.stderr))
    info = checkpoint_info(ckpt)
    store = find_store(workdir, ckpt, needed)
    prep_s = 0.0
    if store is None:
        store = workdir / f"store-{ckpt.name}-{'_'.join(['bf16', 'int4', 'int2'])}-g64"
        print(f"  preparing {store} (no prepared store with {','.join(needed)} in {workdir}; once)", file=sys.stderr)
        t0 = time.perf_counter()
        prepare(ckpt, store, precisions=sorted(set(needed) | set(NEEDED)), progress=True)
        prep_s = time.perf_counter() - t0
    print(f"  checkpoint {ckpt} ({info['total_bytes'] / 1e9:.2f} GB)\n  store {store}", file=sys.stderr)

    variants: list[Variant] = []
    rss0 = proc_status().get("RssAnon", 0)
    t0 = time.perf_counter()
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(ckpt), dtype=torch.bfloat16).eval()
    hf_load = time.perf_counter() - t0
    hf_rss = proc_status().get("RssAnon", 0) - rss0
    default_impl = hf.config._experts_implementation
    hf_expert_bytes = sum(p.numel() * p.element_size() for n, p in hf.named_parameters() if ".experts." in n)
    variants.append(Variant("transformers", hf, default_impl, hf_expert_bytes, hf_load, hf_rss))
    if not args.no_eager:
        variants.append(Variant("transformers-eager", hf, "eager", hf_expert_bytes, hf_load, 0))
    engines = {}
    for pol, dense in [(p, d) for p in policies for d in (("model", "int8") if args.dense_int8 else ("model",))]:
        t0 = time.perf_counter()
        r0 = proc_status().get("RssAnon", 0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            eng = dynaexq.load(str(ckpt), policy=pol, store=str(store), progress=False, verify="off", dense=dense)
        engines[(pol, dense)] = eng
        variants.append(Variant("dynaexq-" + pol.split(":", 1)[-1] + ("+dense-int8" if dense == "int8" else ""),
                                eng.model, None, eng.expert_bytes(), time.perf_counter() - t0,
                                proc_status().get("RssAnon", 0) - r0))
    rss_models = proc_status().get("RssAnon", 0) - rss0
    print(f"  loaded {len(variants)} variants (default experts implementation {default_impl!r}); "
          f"anon RSS grew by {fmt_bytes(rss_models)}", file=sys.stderr)

    g = torch.Generator().manual_seed(args.seed)
    prompts = {b: torch.randint(2, args.vocab, (b, args.prompt), generator=g) for b in batches}

    # warm-up + sanity (not timed): every variant once per batch, short
    ref = {}
    sanity = {}
    for b in batches:
        for v in variants:
            v.activate()
            _, toks, logits = decode(v.model, prompts[b], max(2, min(args.new_tokens, 8)))
            if v.name == "transformers":
                ref[b] = (toks, logits)
            rt, rl = ref[b]
            sanity.setdefault(v.name, {})[b] = {
                "logit_rel_diff": float((logits - rl).norm() / rl.norm()),
                "token_agreement": float((toks == rt).float().mean()),
            }

    if args.wait_quiet > 0:
        wait_for_quiet(args.wait_quiet)
    samples = {(v.name, b): [] for v in variants for b in batches}
    sample_load = {(v.name, b): [] for v in variants for b in batches}
    loads = []
    for r in range(args.repeats):
        rot = variants[r % len(variants):] + variants[:r % len(variants)]
        for b in batches:
            for v in rot:
                v.activate()
                with CpuLoad() as load:
                    dt, _, _ = decode(v.model, prompts[b], args.new_tokens)
                loads.append(load.others)
                sample_load[(v.name, b)].append(load.others)
                samples[(v.name, b)].append(b * args.new_tokens / dt)
        print(f"  repeat {r + 1}/{args.repeats} done ({time.perf_counter() - t_all:.0f}s)", file=sys.stderr)
    hf.set_experts_implementation(default_impl)

    res = {}
    for (name, b), s_all in samples.items():
        # samples taken while other processes used >= QUIET cores are contended (a 2-thread run on 2 cores
        # stalls); the median is over the quiet ones when at least 3 (or half) are quiet, else over all
        quiet = [x for x, ld in zip(s_all, sample_load[(name, b)]) if ld < QUIET]
        s = quiet if len(quiet) >= min(3, (len(s_all) + 1) // 2) else s_all
        med = statistics.median(s)
        res.setdefault(name, {})[b] = {"tok_s": med, "ms_per_step": 1e3 * b / med, "min": min(s), "max": max(s),
                                       "spread": (max(s) - min(s)) / med, "n_used": len(s), "samples": s_all,
                                       "others_cores": sample_load[(name, b)]}
    base = "transformers"
    print(f"\n== decode speed: median of {args.repeats} x {args.new_tokens} greedy steps after a {args.prompt}-token "
          f"prefill; random bf16 Qwen3-MoE, {args.layers} layers x {args.experts} experts (top-8), "
          f"{torch.get_num_threads()} threads")
    print(f"   x tf = ratio of tokens/s to `transformers` ({default_impl}) in this run; spread = (max-min)/median; "
          "logit diff / token agree vs transformers")
    print(f"   n = samples in the median: those taken while other processes used < {QUIET} cores (all if fewer "
          "than 3 / half were)")
    bcols = " ".join(f"{'B=' + str(b) + ' tok/s':>11} {'ms/step':>8} {'x tf':>6} {'spread':>6} {'n':>2}"
                     for b in batches)
    head = (f"{'variant':<19} {'expert bytes':>12} {'RSS +':>10} {'load s':>7} " + bcols +
            f" {'logit diff':>10} {'tok agree':>9}")
    print(head)
    print("-" * len(head))
    for v in variants:
        cells = []
        for b in batches:
            d = res[v.name][b]
            cells.append(f"{d['tok_s']:>11.2f} {d['ms_per_step']:>8.1f} {d['tok_s'] / res[base][b]['tok_s']:>6.3f} "
                         f"{d['spread']:>6.2f} {d['n_used']:>2}")
        sb = sanity[v.name][batches[0]]
        print(f"{v.name:<19} {fmt_bytes(v.nbytes):>12} {fmt_bytes(v.rss):>10} {v.load_s:>7.1f} " + " ".join(cells) +
              f" {sb['logit_rel_diff']:>10.4f} {sb['token_agreement']:>9.2f}")
    others = statistics.mean(loads) if loads else float("nan")
    print(f"(other processes used {others:.2f} of {os.cpu_count()} cores on average while timing, max "
          f"{max(loads):.2f}{'; CONTENDED: ratios are more trustworthy than absolute numbers' if others > 0.3 else ''})")

    def paired(a, c, b):
        """Median over repeats of tok/s(a) / tok/s(c), both from the same repeat; repeats where either sample
        was contended are left out unless that leaves fewer than 2. -> (ratio, repeats used)"""
        sa, sc = samples[(a, b)], samples[(c, b)]
        la, lc = sample_load[(a, b)], sample_load[(c, b)]
        rs = [x / y for x, y, u, v in zip(sa, sc, la, lc) if u < QUIET and v < QUIET]
        if len(rs) < 2:
            rs = [x / y for x, y in zip(sa, sc)]
        return statistics.median(rs), len(rs)

    goals = []
    names = {v.name for v in variants}
    for b in batches:
        for a, c, goal, info_only in (("dynaexq-bf16", base, 0.95, False), ("dynaexq-int4", "dynaexq-bf16", 1.0, False),
                                      ("dynaexq-int4", base, 1.0, True)):
            if a not in names or c not in names:
                continue
            r_, n_ = paired(a, c, b)
            ok = r_ >= goal if goal != 1.0 else r_ > goal
            goals.append({"name": f"B={b}: {a} / {c} tokens/s{' (info)' if info_only else ''}", "value": r_,
                          "goal": (">= " if goal != 1.0 else "> ") + str(goal), "pass": ok, "repeats_used": n_,
                          "ratio_of_medians": res[a][b]["tok_s"] / res[c][b]["tok_s"]})
    print("\n== goals (paired: median over repeats of the ratio of two samples from the same repeat; "
          "ratio of the medians in brackets)")
    for gl in goals:
        print(f"  {'PASS' if gl['pass'] else 'MISS'}  {gl['name']}: {gl['value']:.3f} [{gl['ratio_of_medians']:.3f}] "
              f"(goal {gl['goal']}; {gl['repeats_used']} repeats)")
    total = time.perf_counter() - t_all
    print(f"\ntotal {total:.0f}s (store preparation {prep_s:.0f}s)")
    out = {
        "bench": "generate", "quick": args.quick, "torch": torch.__version__, "transformers": transformers.__version__,
        "threads": torch.get_num_threads(), "checkpoint": str(ckpt), "store": str(store), "layers": args.layers,
        "experts": args.experts, "prompt": args.prompt, "new_tokens": args.new_tokens, "repeats": args.repeats,
        "default_experts_implementation": default_impl,
        "results": {n: {str(b): d for b, d in r.items()} for n, r in res.items()},
        "sanity": {n: {str(b): d for b, d in r.items()} for n, r in sanity.items()},
        "expert_bytes": {v.name: v.nbytes for v in variants}, "load_s": {v.name: v.load_s for v in variants},
        "rss_growth": {v.name: v.rss for v in variants},
        "others_cores_mean": others, "others_cores_max": max(loads) if loads else None,
        "goals": goals, "prepare_s": prep_s, "total_s": total,
    }
    del engines, variants, hf
    gc.collect()
    print(json.dumps(out))


if __name__ == "__main__":
    main()
