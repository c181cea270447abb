"""Decode speed (tokens/s) on the CPU: transformers vs dynaexq (grouped and per-expert paths) vs llama.cpp, batch
1/8/32, 1 and 2 threads, with kernel calls per MoE layer and the share of the memory-bandwidth limit.

Commands (reuse the checkpoint, store and GGUFs in --workdir / ~/.cache/dynaexq/llamacpp when present, else build
them first: the 8-layer checkpoint, its store and llama.cpp's GGUFs take ~25 min once):

    .venv/bin/python bench/generate.py          # 8 layers, int4/int2 vs llama.cpp Q4_0/Q4_K_M/Q2_K, ~25 min
    .venv/bin/python bench/generate.py --layers 2 --vocab 4096 --policies uniform:bf16,uniform:int4 \\
        --llamacpp none --batches 1,8 --threads 2      # bf16 vs transformers' grouped_mm (fits in RAM at 2 layers)
    .venv/bin/python bench/generate.py --quick  # ~1 min smoke test (1 layer x 8 experts, no llama.cpp)

What it measures
  Model: the synthetic Qwen3MoeForCausalLM of bench/_common.py (Qwen3-30B-A3B layer shapes: hidden 2048, 128
  experts of moe_intermediate 768, top-8; 32 / 4 heads of 128; --layers layers; vocab --vocab, 8192 = the bundled
  tokenizer, which llama.cpp's converter needs), random bf16 weights; prompts are random input_ids.
  Variants, all loaded at once and timed interleaved (rotating order per repeat):
    transformers          AutoModelForCausalLM.from_pretrained(dtype=bf16), default experts implementation
                          (transformers 5.23: "grouped_mm"); `--eager` adds its per-expert loop
    dynaexq-<p>           dynaexq.load(checkpoint, policy=<p>, store=<prepared store>), grouped expert path;
                          <p>+dense-bf16: with dense="bf16" (attention on the native bf16 kernel, same bytes)
    dynaexq-<p>-loop      the same engine with every bank on path="reference" (the per-expert loop), first policy
    llama.cpp <type>      llama.cpp 0.3.36 (bench/peer_llamacpp.py's build) on the same checkpoint, experts only at
                          <type>, the rest bf16 as in dynaexq: llama-bench (batch 1) and llama-batched-bench
                          (aggregate decode tok/s of B parallel sequences), run right after dynaexq per thread count
  One sample: prefill a random prompt of --prompt tokens per sequence (not timed), then --new-tokens greedy decode
  steps (model(input_ids=last, past_key_values=cache)), timed around the steps only; median of --repeats samples;
  samples taken while other processes used >= 0.3 cores are left out when enough quiet ones remain (column n).
  Kernel calls per MoE layer: one decode step profiled (torch.profiler): the aten ops the bank's forward makes
  (top level inside it) + native kernel calls (grouped tier calls, or per-expert low-bit calls), per layer.
  Bandwidth limit: read bandwidth measured here per thread count (sum of a 1 GiB fp32 tensor, median of 5) x batch
  / bytes one decode step really reads: the published versions of the experts its tokens routed to (counted in
  that step) + every non-expert weight but the embedding. llama.cpp's share uses its GGUF's expert bytes per
  expert with the same routed-expert count (the same weights and prompts route alike: an estimate).
Goals (dynaexq's +dense-bf16 row when present: attention bf16 in both): batch 1 dynaexq int4 >= 1.1x the better of llama.cpp Q4_0/Q4_K_M and int2 >= 1.1x Q2_K (every thread
count), >= 85 % of the bandwidth limit; batch 8 and 32 >= 1.0x llama.cpp's batched decode at the same format;
bf16 batch 8 >= 1.0x transformers (when a bf16 policy runs). Ratios are paired where both come from this process
(median over repeats of the ratio of samples taken back to back); llama.cpp's against dynaexq's medians.

Output: human tables, then one JSON object on the last stdout line.
"""
from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import CpuLoad, checkpoint_info, fmt_bytes, synthetic_checkpoint, wait_for_quiet  # noqa: E402

QUIET = 0.3  # cores used by other processes below which a sample counts as uncontended
LLAMA_FOR = {"int4": ("Q4_0", "Q4_K_M"), "int2": ("Q2_K",)}  # the same format class


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
    def __init__(self, name, model, experts_impl=None, engine=None, path="grouped", nbytes=None):
        self.name, self.model, self.experts_impl, self.engine, self.path = name, model, experts_impl, engine, path
        self.nbytes = nbytes

    def activate(self):
        if self.experts_impl is not None:
            self.model.set_experts_implementation(self.experts_impl)
        if self.engine is not None:
            for bank in self.engine.banks.values():
                bank.path = self.path


@torch.inference_mode()
def decode(model, prompt, steps):
    """-> (seconds of the `steps` decode steps, generated tokens [B, steps])."""
    out = model(input_ids=prompt, use_cache=True, logits_to_keep=1)
    cache = out.past_key_values
    tok = out.logits[:, -1].argmax(-1, keepdim=True)
    toks = []
    t0 = time.perf_counter()
    for _ in range(steps):
        out = model(input_ids=tok, past_key_values=cache, use_cache=True)
        tok = out.logits[:, -1].argmax(-1, keepdim=True)
        toks.append(tok)
    return time.perf_counter() - t0, torch.cat(toks, 1)


def bandwidth() -> float:
    """Read bandwidth (bytes/s) with the current torch threads: sum of a 1 GiB fp32 tensor, median of 5."""
    x = torch.ones(1 << 28)
    ts = []
    for _ in range(6):
        t0 = time.perf_counter()
        x.sum()
        ts.append(time.perf_counter() - t0)
    return x.numel() * 4 / statistics.median(ts[1:])


def dense_bytes(model) -> int:
    """Bytes of every non-expert weight a decode step reads (the embedding reads B rows: left out)."""
    named = [*model.named_parameters(), *model.named_buffers()]
    return sum(t.numel() * t.element_size() for n, t in named if "embed_tokens" not in n and ".experts." not in n)


@torch.inference_mode()
def step_profile(v: Variant, prompt) -> dict:
    """One decode step of an engine, profiled -> kernel calls per MoE layer, routed experts, bytes read."""
    from dynaexq.quant import grouped_cpu, lowbit_cpu
    eng = v.engine
    v.activate()
    out = v.model(input_ids=prompt, use_cache=True, logits_to_keep=1)
    tok = out.logits[:, -1].argmax(-1, keepdim=True)
    eng.take_routing_stats()
    scopes, native = {}, [0]

    def enter(m, args):
        scopes[m] = (torch.profiler.record_function("dynaexq.bank"), grouped_cpu.calls + lowbit_cpu.calls)
        scopes[m][0].__enter__()

    def leave(m, args, res):
        scope, before = scopes.pop(m)
        scope.__exit__(None, None, None)
        native[0] += grouped_cpu.calls + lowbit_cpu.calls - before  # the bank's own (not --dense linears')

    hooks = [h for b in eng.banks.values() for h in (b.register_forward_pre_hook(enter), b.register_forward_hook(leave))]
    try:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            v.model(input_ids=tok, past_key_values=out.past_key_values, use_cache=True)
    finally:
        for h in hooks:
            h.remove()
    native = native[0]
    ops = sum(1 for e in prof.events() if e.cpu_parent is not None and e.cpu_parent.name == "dynaexq.bank")
    stats = eng.take_routing_stats()
    used = {layer: (c > 0).nonzero().flatten().tolist() for layer, (c, _) in stats.items()}
    expert = sum(eng.banks[layer].versions[e].nbytes for layer, es in used.items() for e in es)
    layers = len(eng.banks)
    return {"aten_ops_per_layer": ops / layers, "native_calls_per_layer": native / layers,
            "calls_per_layer": (ops + native) / layers, "routed_experts_per_layer": sum(map(len, used.values())) / layers,
            "expert_bytes_read": expert, "dense_bytes_read": dense_bytes(v.model)}


def median_quiet(s_all, loads):
    quiet = [x for x, ld in zip(s_all, loads) if ld < QUIET]
    s = quiet if len(quiet) >= min(3, (len(s_all) + 1) // 2) else s_all
    return statistics.median(s), len(s)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--workdir", default="/tmp/dynaexq-bench")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--experts", type=int, default=128)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--threads", default="1,2", help="thread counts, each timed in turn")
    ap.add_argument("--prompt", type=int, default=32, help="prompt tokens per sequence (prefill, not timed)")
    ap.add_argument("--new-tokens", type=int, default=32, help="timed decode steps per sample")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--policies", default="uniform:int4,uniform:int4+bf16,uniform:int2+bf16",
                    help="comma list; POLICY+DENSE also converts the non-expert linears (--dense int8|bf16)")
    ap.add_argument("--eager", action="store_true", help="add transformers' per-expert loop (eager experts)")
    ap.add_argument("--no-loop", action="store_true", help="skip the dynaexq per-expert-loop row")
    ap.add_argument("--no-transformers", action="store_true")
    ap.add_argument("--llamacpp", default="auto", help="llama.cpp types to run (comma list), 'auto' (those of "
                    "the policies' formats when bench/peer_llamacpp.py's build is present) or 'none'")
    ap.add_argument("--wait-quiet", type=float, default=0, metavar="S",
                    help="before timing, wait up to S seconds for other processes to use < 0.3 cores")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="smoke test: 1 layer x 8 experts, prompt 8, 4 steps, "
                    "2 repeats, batches 1,8, no llama.cpp")
    args = ap.parse_args(argv)
    if args.quick:
        args.layers, args.experts, args.vocab, args.prompt, args.new_tokens, args.repeats = 1, 8, 4096, 8, 4, 2
        args.batches, args.llamacpp = "1,8", "none"
    t_all = time.perf_counter()
    torch.manual_seed(args.seed)
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    batches = [int(b) for b in args.batches.split(",")]
    threads = [int(t) for t in args.threads.split(",")]
    policies = [p.strip() for p in args.policies.split(",") if p.strip()]
    needed = sorted({p.split("+")[0].split(":", 1)[1] for p in policies if p.startswith("uniform:")})

    import transformers
    import dynaexq
    import peer_llamacpp as llama
    from dynaexq.store.prepare import prepare

    transformers.utils.logging.disable_progress_bar()
    if args.llamacpp == "auto":
        have = all((llama.BIN / t).is_file() for t in llama.TARGETS)
        types = [t for p in needed for t in LLAMA_FOR.get(p, ())] if have else []
        if not have:
            print(f"  llama.cpp: no build in {llama.BUILD} (run bench/peer_llamacpp.py once): not compared",
                  file=sys.stderr)
    else:
        types = [] if args.llamacpp == "none" else [t.strip() for t in args.llamacpp.split(",") if t.strip()]
        if types:
            llama.build()
    print(f"bench/generate.py  torch {torch.__version__}  transformers {transformers.__version__}  threads {threads}  "
          f"layers {args.layers}  experts {args.experts}  prompt {args.prompt}  decode steps {args.new_tokens}  "
          f"repeats {args.repeats}  llama.cpp {types or 'none'}{'  (quick)' if args.quick else ''}")
    ckpt = synthetic_checkpoint(workdir, layers=args.layers, experts=args.experts, vocab=args.vocab,
                                log=lambda m: print(m, file=sys.stderr))
    info = checkpoint_info(ckpt)
    store = find_store(workdir, ckpt, needed)
    if store is None:
        store = workdir / f"store-{ckpt.name}-{'_'.join(needed)}"
        print(f"  preparing {store} (once)", file=sys.stderr)
        prepare(ckpt, store, precisions=needed, progress=True)
    ggufs = {t: llama.experts_gguf(ckpt, t, llama.CACHE / "work") for t in types}
    print(f"  checkpoint {ckpt} ({info['total_bytes'] / 1e9:.2f} GB)\n  store {store}", file=sys.stderr)

    variants: list[Variant] = []
    if not args.no_transformers:
        hf = transformers.AutoModelForCausalLM.from_pretrained(str(ckpt), dtype=torch.bfloat16).eval()
        impl = hf.config._experts_implementation
        hf_bytes = sum(p.numel() * p.element_size() for n, p in hf.named_parameters() if ".experts." in n)
        variants.append(Variant("transformers", hf, impl, nbytes=hf_bytes))
        if args.eager:
            variants.append(Variant("transformers-eager", hf, "eager", nbytes=hf_bytes))
    for i, (pol, _, dense) in enumerate(p.partition("+") for p in policies):
        dense = dense or "model"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            eng = dynaexq.load(str(ckpt), policy=pol, store=str(store), progress=False, verify="off", dense=dense)
        name = "dynaexq-" + pol.split(":", 1)[-1] + ("" if dense == "model" else f"+dense-{dense}")
        variants.append(Variant(name, eng.model, engine=eng, nbytes=eng.expert_bytes()))
        if i == 0 and not args.no_loop:
            variants.append(Variant(name + "-loop", eng.model, engine=eng, path="reference", nbytes=eng.expert_bytes()))
    g = torch.Generator().manual_seed(args.seed)
    prompts = {b: torch.randint(2, args.vocab, (b, args.prompt), generator=g) for b in batches}
    profiles = {(v.name, b): step_profile(v, prompts[b]) for v in variants if v.engine is not None for b in batches}
    for v in variants:  # warm-up (not timed)
        v.activate()
        decode(v.model, prompts[batches[0]], 2)

    res, llama_res, bw = {}, {}, {}
    samples = {}
    for t in threads:
        torch.set_num_threads(t)
        bw[t] = bandwidth()
        if args.wait_quiet > 0:
            wait_for_quiet(args.wait_quiet)
        for r in range(args.repeats):
            rot = variants[r % len(variants):] + variants[:r % len(variants)]
            for b in batches:
                for v in rot:
                    v.activate()
                    with CpuLoad() as load:
                        dt, _ = decode(v.model, prompts[b], args.new_tokens)
                    samples.setdefault((v.name, b, t), []).append((b * args.new_tokens / dt, load.others))
            print(f"  threads {t}: repeat {r + 1}/{args.repeats} ({time.perf_counter() - t_all:.0f}s)", file=sys.stderr)
        for ty, path in ggufs.items():
            one = llama.bench_tok_s(path, t, args.new_tokens) if 1 in batches else None
            many = llama.batched_tok_s(path, t, [b for b in batches if b > 1], args.prompt, args.new_tokens) \
                if any(b > 1 for b in batches) else {}
            llama_res[(ty, t)] = {**({1: one} if one is not None else {}), **many}
            print(f"  threads {t}: llama.cpp {ty} {llama_res[(ty, t)]}", file=sys.stderr)
    for (name, b, t), s in samples.items():
        med, n = median_quiet([x for x, _ in s], [ld for _, ld in s])
        res[(name, b, t)] = {"tok_s": med, "n_used": n, "samples": [x for x, _ in s],
                             "others_cores": [ld for _, ld in s]}

    def paired(a, c, b, t):
        sa, sc = samples[(a, b, t)], samples[(c, b, t)]
        rs = [x / y for (x, u), (y, w) in zip(sa, sc) if u < QUIET and w < QUIET]
        return statistics.median(rs if len(rs) >= 2 else [x / y for (x, _), (y, _) in zip(sa, sc)])

    def limit(name, b, t):
        p = profiles.get((name, b))
        return None if p is None else bw[t] * b / (p["expert_bytes_read"] + p["dense_bytes_read"])

    print(f"\n== decode tokens/s (aggregate over the batch): median of {args.repeats} x {args.new_tokens} greedy steps "
          f"after a {args.prompt}-token prefill; random bf16 Qwen3-MoE, {args.layers} layers x {args.experts} experts")
    print("   % limit = share of (measured read bandwidth x batch / bytes the step reads); calls = aten ops + native "
          "kernel calls per MoE layer per step; routed = distinct experts per layer in the step")
    for t in threads:
        print(f"\n-- {t} thread(s), read bandwidth {bw[t] / 1e9:.1f} GB/s")
        head = f"{'variant':<22} {'expert bytes':>12} " + " ".join(
            f"{'B=' + str(b):>8} {'%lim':>5} {'calls':>6} {'n':>2}" for b in batches)
        print(head + "\n" + "-" * len(head))
        for v in variants:
            cells = []
            for b in batches:
                d, lim, p = res[(v.name, b, t)], limit(v.name, b, t), profiles.get((v.name, b))
                cells.append(f"{d['tok_s']:>8.1f} {100 * d['tok_s'] / lim if lim else float('nan'):>5.0f} "
                             f"{p['calls_per_layer'] if p else float('nan'):>6.1f} {d['n_used']:>2}")
            print(f"{v.name:<22} {fmt_bytes(v.nbytes):>12} " + " ".join(cells))
        for ty in types:
            nbytes, _ = llama.gguf_experts(ggufs[ty])
            per_expert = nbytes / (args.layers * args.experts)
            cells = []
            for b in batches:
                tok = llama_res[(ty, t)].get(b)
                ref = next((p for (n, bb), p in profiles.items() if bb == b), None)  # routes alike: same weights
                lim = None if ref is None or tok is None else bw[t] * b / (
                    per_expert * ref["routed_experts_per_layer"] * args.layers + ref["dense_bytes_read"])
                cells.append(f"{tok if tok else float('nan'):>8.1f} {100 * tok / lim if lim else float('nan'):>5.0f} "
                             f"{'':>6} {'':>2}")
            print(f"{'llama.cpp ' + ty:<22} {fmt_bytes(nbytes):>12} " + " ".join(cells))

    goals = []
    names = {v.name for v in variants}
    for t in threads:
        for fmt, tys in LLAMA_FOR.items():  # attention bf16 in both: prefer --dense bf16 (same bytes, native kernel)
            ours = next((n for n in (f"dynaexq-{fmt}+dense-bf16", f"dynaexq-{fmt}") if n in names), None)
            if ours is None:
                continue
            for b in batches:
                theirs = {ty: llama_res[(ty, t)].get(b) for ty in tys if (ty, t) in llama_res}
                theirs = {k: x for k, x in theirs.items() if x}
                if theirs:
                    best = max(theirs, key=theirs.get)
                    ratio = res[(ours, b, t)]["tok_s"] / theirs[best]
                    goal = 1.1 if b == 1 else 1.0
                    goals.append({"name": f"{t} thr B={b}: {ours} / llama.cpp {best}", "value": ratio,
                                  "goal": f">= {goal}", "pass": ratio >= goal})
            if 1 in batches:
                share = res[(ours, 1, t)]["tok_s"] / limit(ours, 1, t)
                goals.append({"name": f"{t} thr B=1: {ours} share of the bandwidth limit", "value": share,
                              "goal": ">= 0.85", "pass": share >= 0.85})
        if "dynaexq-bf16" in names and "transformers" in names and 8 in batches:
            r_ = paired("dynaexq-bf16", "transformers", 8, t)
            goals.append({"name": f"{t} thr B=8: dynaexq-bf16 / transformers", "value": r_, "goal": ">= 1.0",
                          "pass": r_ >= 1.0})
        first = f"dynaexq-{policies[0].split(':', 1)[-1]}" if policies and "+" not in policies[0] else None
        if first and first + "-loop" in names:
            for b in batches:
                r_ = paired(first, first + "-loop", b, t)
                goals.append({"name": f"{t} thr B={b}: {first} grouped / per-expert loop (info)", "value": r_,
                              "goal": "info", "pass": None})
    print("\n== goals")
    for gl in goals:
        mark = "INFO" if gl["pass"] is None else "PASS" if gl["pass"] else "MISS"
        print(f"  {mark}  {gl['name']}: {gl['value']:.3f} (goal {gl['goal']})")
    total = time.perf_counter() - t_all
    print(f"\ntotal {total:.0f}s")
    out = {
        "bench": "generate", "quick": args.quick, "torch": torch.__version__, "transformers": transformers.__version__,
        "threads": threads, "checkpoint": str(ckpt), "store": str(store), "layers": args.layers,
        "experts": args.experts, "prompt": args.prompt, "new_tokens": args.new_tokens, "repeats": args.repeats,
        "bandwidth": {str(t): x for t, x in bw.items()},
        "results": {f"{n}|B={b}|t={t}": d for (n, b, t), d in res.items()},
        "profiles": {f"{n}|B={b}": p for (n, b), p in profiles.items()},
        "llamacpp": {f"{ty}|t={t}": {str(b): x for b, x in d.items()} for (ty, t), d in llama_res.items()},
        "expert_bytes": {v.name: v.nbytes for v in variants}, "goals": goals, "total_s": total,
    }
    del variants
    gc.collect()
    print(json.dumps(out))


if __name__ == "__main__":
    main()
