"""The native decode attention alone: one decode step's attention of a Qwen3-30B-A3B-shaped layer (32 query heads
of 128 over 4 kv heads, bf16, one row) at 32 / 512 / 2048 / 4096 positions, 2 threads, median of 200 calls.

    .venv/bin/python bench/attention.py

Output: a line per context (microseconds a call and the keys' and values' bytes read per second), then one JSON
object on the last stdout line.
"""
import json
import statistics
import time

import torch

from dynaexq.quant import attention_cpu


def main() -> None:
    torch.set_num_threads(2)
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 32, 1, 128, generator=g).to(torch.bfloat16)
    keys = torch.randn(1, 4, 4096, 128, generator=g).to(torch.bfloat16)
    values = torch.randn(1, 4, 4096, 128, generator=g).to(torch.bfloat16)
    out = {}
    for n in (32, 512, 2048, 4096):
        k, v, lens = keys[:, :, :n], values[:, :, :n], torch.tensor([n])
        for _ in range(10):
            attention_cpu.decode_attention(q, k, v, lens, 128 ** -0.5)
        ts = []
        for _ in range(200):
            t0 = time.perf_counter()
            attention_cpu.decode_attention(q, k, v, lens, 128 ** -0.5)
            ts.append(time.perf_counter() - t0)
        us = 1e6 * statistics.median(ts)
        out[n] = us
        print(f"{n:5d} positions: {us:7.1f} us  ({2 * 4 * n * 128 * 2 / us / 1e3:.1f} GB/s of keys and values)")
    print(json.dumps({"bench": "attention", "us": out}))


if __name__ == "__main__":
    main()
