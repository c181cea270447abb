"""The int8-activation tile (AVX2 builds) against the exact fp32 tile: speed of one 4/2-bit matmul per row count,
and what rounding x to int8 costs in quality on the bundled model; and the bf16 GEMMs a CPU without AVX512-BF16
chooses between.

Command:

    .venv/bin/python bench/int8_activations.py            # ~2 min

Speed: a [1536, 2048] gate_up-shaped weight at int4 and int2 (random, quantized by `quantize`), bf16 x of
--rows rows, median of 20 calls each way (`lowbit_cpu.int8_activations(True / False)`), 2 threads.
GEMM: a [2048, 4096] bf16 weight at 8-512 rows: aten's bf16 GEMM, kernels.FloatLinear (fp32 on converted
blocks where aten has no native bf16 GEMM, else aten's), the native row-major kernel; median of 5.
Quality: the bundled model at `uniform:int4`, `uniform:int2` (dense weights as loaded), --steps tokens of the
README decoded one token per forward (the KV cache, teacher-forced: the decode path, 1 row per expert), the
mean KL(bf16 model || quantized model) per token with each tile, and KL(exact tile || int8 tile).
On an AVX-512 build the switch does nothing (the tile is AVX2's): the script says so and stops.
Output: a human table, then one JSON object on the last stdout line.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def _median_s(f, n: int = 20) -> float:
    f()
    ts = []
    for _ in range(n):
        t = time.perf_counter()
        f()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def gemm(rows) -> list[dict]:
    """A [2048, 4096] bf16 weight times bf16 x: aten's bf16 GEMM, kernels.FloatLinear's fp32 blocks, the native
    row-major kernel (quant.dense picks between the last two by gemm_rows())."""
    import torch.nn.functional as F
    from dynaexq.quant import grouped_cpu, kernels
    w = (torch.randn(2048, 4096, generator=torch.Generator().manual_seed(0)) * 0.02).to(torch.bfloat16)
    blocks = kernels.FloatLinear(w)
    key, ptrs = grouped_cpu.spec(blocks)
    ptrs = torch.tensor([ptrs])
    out = []
    for m in rows:
        x = torch.randn(m, 4096, generator=torch.Generator().manual_seed(m)).to(torch.bfloat16)
        y = torch.empty(m, 2048, dtype=torch.bfloat16)
        out.append({"rows": m, "aten_bf16_ms": _median_s(lambda: F.linear(x, w), 5) * 1e3,
                    "fp32_blocks_ms": _median_s(lambda: blocks(x), 5) * 1e3,
                    "native_ms": _median_s(lambda: grouped_cpu.run(key, torch.tensor([m]), ptrs, x, y), 5) * 1e3})
    return out


def speed(rows) -> list[dict]:
    from dynaexq.quant import kernels, lowbit_cpu
    from dynaexq.quant.precision import Precision
    from dynaexq.quant.quantize import quantize
    out = []
    for p in (Precision.INT4, Precision.INT2):
        k = kernels.prepare(quantize(torch.randn(1536, 2048, generator=torch.Generator().manual_seed(0)) * 0.02,
                                     p, "gate_up"), "cpu")
        for m in rows:
            x = torch.randn(m, 2048, generator=torch.Generator().manual_seed(m)).to(torch.bfloat16)
            t = {}
            for on in (False, True):
                lowbit_cpu.int8_activations(on)
                t[on] = _median_s(lambda: k(x))
            out.append({"precision": p.value, "rows": m, "exact_us": t[False] * 1e6, "int8_us": t[True] * 1e6})
    lowbit_cpu.int8_activations(True)
    return out


@torch.inference_mode()
def decode_logits(engine, ids) -> torch.Tensor:
    from transformers import DynamicCache
    cache = DynamicCache(config=engine.model.config)
    return torch.stack([engine.run(input_ids=ids[:, t:t + 1], past_key_values=cache, use_cache=True)
                        .logits[0, -1].float() for t in range(ids.shape[1])])


def kl(p_logits, q_logits) -> float:
    lp, lq = p_logits.log_softmax(-1), q_logits.log_softmax(-1)
    return float((lp.exp() * (lp - lq)).sum(-1).mean())


def quality(steps: int) -> list[dict]:
    import dynaexq
    from dynaexq.demo import BUNDLED
    from dynaexq.quant import lowbit_cpu
    ref = dynaexq.load(BUNDLED, "uniform:bf16", progress=False)
    ids = torch.tensor([ref.tokenizer((ROOT / "README.md").read_text(encoding="utf-8")[:20000],
                                      verbose=False)["input_ids"][:steps]])
    want = decode_logits(ref, ids)
    ref.close()
    out = []
    for policy in ("uniform:int4", "uniform:int2"):
        engine = dynaexq.load(BUNDLED, policy, progress=False)
        lowbit_cpu.int8_activations(False)
        exact = decode_logits(engine, ids)
        lowbit_cpu.int8_activations(True)
        rounded = decode_logits(engine, ids)
        engine.close()
        out.append({"policy": policy, "kl_exact": kl(want, exact), "kl_int8": kl(want, rounded),
                    "kl_exact_vs_int8": kl(exact, rounded)})
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", default="1,2,4,8,64,512")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    from dynaexq.quant import lowbit_cpu
    torch.set_num_threads(args.threads)
    if lowbit_cpu.extension() is None or lowbit_cpu.extension().isa() != 256:
        print("this build is not AVX2's (or did not build): the int8-activation tile is not used here")
        return
    fast = speed([int(r) for r in args.rows.split(",")])
    dense = gemm([8, 32, 128, 512])
    good = quality(args.steps)
    print(f"{'':6} {'rows':>5} {'exact us':>9} {'int8 us':>8} {'speed-up':>9}")
    for r in fast:
        print(f"{r['precision']:6} {r['rows']:>5} {r['exact_us']:>9.1f} {r['int8_us']:>8.1f} "
              f"{r['exact_us'] / r['int8_us']:>8.2f}x")
    print(f"\nbf16 [2048, 4096] weight, ms: {'rows':>5} {'aten bf16':>10} {'fp32 blocks':>12} {'native':>8}")
    for r in dense:
        print(f"{'':29} {r['rows']:>5} {r['aten_bf16_ms']:>10.2f} {r['fp32_blocks_ms']:>12.2f} {r['native_ms']:>8.2f}")
    print(f"\nbundled model, {args.steps} decode steps: mean KL to the bf16 model")
    for r in good:
        print(f"  {r['policy']:14} exact tile {r['kl_exact']:.5f}  int8 tile {r['kl_int8']:.5f}  "
              f"exact vs int8 {r['kl_exact_vs_int8']:.5f}")
    print(json.dumps({"speed": fast, "gemm": dense, "quality": good}))


if __name__ == "__main__":
    main()
