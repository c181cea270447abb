"""Where a batch-1 decode step's time goes: the weights' kernels against everything between them.

Command (reuses bench/generate.py's checkpoint and store in --workdir, else builds them: ~3 min at 16 x 16):

    .venv/bin/python bench/step_profile.py                 # 16 layers x 16 experts, vocab 8192, int4 experts
    .venv/bin/python bench/step_profile.py --layers 4 --experts 128 --vocab 151936   # the whole-model bench's shape
    .venv/bin/python bench/step_profile.py --layers 4 --experts 128 --vocab 151936 \
        --weight-budget ~/.cache/dynaexq/llamacpp/work/qwen3moe-L4-E128-H2048-I768-V151936-bfloat16-s0-whole-Q4_K_M.gguf

What it measures
  Model: bench/_common.py's synthetic Qwen3-30B-A3B-shaped checkpoint (hidden 2048, experts of 768, top-8,
  32 / 4 heads of 128), loaded as `dynaexq.load(..., policy=--policy, dense=--dense)`. One sequence of --prompt
  tokens is prefilled, then --steps decode steps run through the engine's own step (`engine.step` on a
  BatchDecoder, what `generate` and `serve` run), 2 threads.
  Each step is split by wall-clock timers wrapped around transformers' modules and dynaexq's native calls (the
  timers cost ~1 us a call): the dense projections (DenseLinear: q/k/v/o, one native call each), the experts'
  native calls (gate_up and down per tier), the head, and what is left of each part — the attention's norms,
  rotary, cache write and attention kernel, the router, the bank's routing/activation/combine and Python, the
  layer's own norms and residual adds, the model's embedding/rotary/final norm, the decoder's sampling.
  Then one router call timed alone in a loop (its code and data stay in the caches) and right after 64 MiB of
  other memory was written (as a decode step's weight stream leaves them): the small ops' cost in a real step is
  the second figure, not the first.
Output: a table, then one JSON object on the last stdout line.
"""
from __future__ import annotations

import argparse
import collections
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import synthetic_checkpoint  # noqa: E402
from generate import find_store  # noqa: E402


def timed(obj, name: str, label: str, acc: collections.Counter) -> None:
    """Wrap obj.<name> so its wall time adds to acc[label]."""
    f = getattr(obj, name)

    def wrapper(*a, **k):
        t = time.perf_counter()
        try:
            return f(*a, **k)
        finally:
            acc[label] += time.perf_counter() - t
    setattr(obj, name, wrapper)


def instrument(engine, acc: collections.Counter) -> None:
    import dynaexq.bank as bank_module
    model = engine.model
    for layer in model.model.layers:
        timed(layer, "forward", "layer", acc)
        timed(layer.self_attn, "forward", "attention", acc)
        for n in ("q_proj", "k_proj", "v_proj", "o_proj"):
            timed(getattr(layer.self_attn, n), "forward", "projections", acc)
        timed(layer.mlp, "forward", "moe block", acc)
        timed(layer.mlp.gate, "forward", "router", acc)
        timed(layer.mlp.experts, "forward", "bank", acc)
    run = bank_module.grouped_cpu.run  # the bank's tier calls (DenseLinear's go through quant.dense's import)

    class Tiers:  # the bank module's view of grouped_cpu, with `run` timed
        def __getattr__(self, name):
            return getattr(sys.modules["dynaexq.quant.grouped_cpu"], name)

        @staticmethod
        def run(*a, **k):
            t = time.perf_counter()
            try:
                return run(*a, **k)
            finally:
                acc["expert kernels"] += time.perf_counter() - t
    bank_module.grouped_cpu = Tiers()
    timed(model.lm_head, "forward", "head", acc)
    timed(model, "forward", "model", acc)


def router_hot_and_cold(engine, reps: int = 50) -> tuple[float, float]:
    """Median us of one router call in a loop, and right after 64 MiB of other memory was written."""
    router = engine.model.model.layers[0].mlp.gate
    x = torch.randn(1, engine.model.config.hidden_size, dtype=engine.dtype)
    junk = torch.zeros(64 << 20, dtype=torch.uint8)
    hot, cold = [], []
    for _ in range(reps):
        junk.add_(1)
        t = time.perf_counter()
        router(x)
        cold.append(time.perf_counter() - t)
        t = time.perf_counter()
        router(x)
        hot.append(time.perf_counter() - t)
    return 1e6 * statistics.median(hot), 1e6 * statistics.median(cold)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", default="/tmp/dynaexq-bench")
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--experts", type=int, default=16)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--policy", default="uniform:int4")
    ap.add_argument("--dense", default="bf16", help="model | int8 | bf16 (the non-expert matrices)")
    ap.add_argument("--weight-budget", help="SIZE | FILE.gguf: plan every weight in one budget instead of --dense "
                    "(a GGUF file also caps the reads at its own, as `dynaexq generate` does)")
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)

    import dynaexq
    from dynaexq.engine.batch import SamplingParams, Sequence
    from dynaexq.store.prepare import prepare
    torch.set_num_threads(args.threads)
    workdir = Path(args.workdir)
    ckpt = synthetic_checkpoint(workdir, layers=args.layers, experts=args.experts, vocab=args.vocab,
                                log=lambda *a: print(*a, file=sys.stderr))
    needed = [args.policy.split(":")[1]] + ([args.dense] if args.dense in ("int8",) else []) + \
        (["bf16", "int8", "int6", "int4"] if args.weight_budget else [])
    store = find_store(workdir, ckpt, needed)
    if store is None:
        store = workdir / f"store-{ckpt.name}-{'_'.join(needed)}"
        print(f"preparing {store} (once)", file=sys.stderr)
        prepare(ckpt, store, precisions=needed, progress=True)
    dense = "model" if args.weight_budget else args.dense
    engine = dynaexq.load(str(ckpt), policy=args.policy, store=str(store), dense=dense, progress=False,
                          verify="off", weight_budget=args.weight_budget)
    if args.weight_budget:
        held = collections.Counter(p.value for p in engine.dense_plan.values())
        print(f"non-expert matrices {dict(held)}", file=sys.stderr)
    acc = collections.Counter()
    with torch.inference_mode():
        hot, cold = router_hot_and_cold(engine)
        instrument(engine, acc)
        dec = engine.open_batch(max_batch=1, prefill_chunk=max(512, args.prompt))
        dec.kv.reserve(args.prompt + args.steps + 16)
        g = torch.Generator().manual_seed(0)
        dec.add(Sequence(torch.randint(2, args.vocab, (args.prompt,), generator=g).tolist(),
                         SamplingParams(max_tokens=args.steps + 16, temperature=0), None))
        while dec.waiting:
            engine.step(dec)
        for _ in range(5):
            engine.step(dec)
        acc.clear()
        t0 = time.perf_counter()
        for _ in range(args.steps):
            engine.step(dec)
        step = (time.perf_counter() - t0) / args.steps
    ms = {k: 1e3 * v / args.steps for k, v in acc.items()}
    parts = {
        "dense projections (kernels)": ms["projections"],
        "expert kernels": ms["expert kernels"],
        "head": ms["head"],
        "attention, but its projections": ms["attention"] - ms["projections"],
        "router": ms["router"],
        "bank, but its kernels": ms["bank"] - ms["expert kernels"],
        "MoE block, but router and bank": ms["moe block"] - ms["router"] - ms["bank"],
        "layer, but attention and MoE block": ms["layer"] - ms["attention"] - ms["moe block"],
        "model, but its layers and head": ms["model"] - ms["layer"] - ms["head"],
        "decoder step, but the model": 1e3 * step - ms["model"],
    }
    kernels = sum(list(parts.values())[:3])
    what = args.dense if not args.weight_budget else f"planned by --weight-budget {args.weight_budget}"
    print(f"decode step, batch 1, {args.layers} layers x {args.experts} experts, vocab {args.vocab}, "
          f"{args.policy}, dense {what}, {args.threads} threads: {1e3 * step:.2f} ms")
    for k, v in parts.items():
        print(f"  {k:38s} {v:7.2f} ms  {100 * v / (1e3 * step):5.1f} %")
    print(f"  weights' kernels {kernels:.2f} ms ({100 * kernels / (1e3 * step):.0f} %), everything else "
          f"{1e3 * step - kernels:.2f} ms ({100 - 100 * kernels / (1e3 * step):.0f} %; "
          f"{(1e3 * step - kernels) / args.layers:.2f} ms a layer)")
    print(f"one router call: {hot:.0f} us in a loop, {cold:.0f} us right after 64 MiB of other writes")
    print(json.dumps({"bench": "step_profile", "layers": args.layers, "experts": args.experts, "vocab": args.vocab,
                      "policy": args.policy, "dense": what, "threads": args.threads, "step_ms": 1e3 * step,
                      "parts_ms": parts, "router_us": {"hot": hot, "cold": cold}}))


if __name__ == "__main__":
    main()
