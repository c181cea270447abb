"""Decode attention on the CPU: one query token per row over keys and values held in place (csrc/attention.cpp).

`decode_attention(q, k, v, lens, scale)`: q [B, Hq, 1, D], k/v [B, Hkv, L, D] views (last dim contiguous; rows,
heads and positions at any stride, as the SlotCache's row buffers give them), lens [B] the valid positions of each
row -> [B, 1, Hq, Dv] in q's dtype (transformers' attention-output layout). Grouped-query heads read each key and
value once. `reference` is the float64 softmax(q k^T * scale) v it is tested against. `supports` says whether the
native kernel takes these tensors (CPU, fp32/bf16/fp16, the extension built); the caller runs sdpa otherwise.
"""
from __future__ import annotations

import torch

from dynaexq.quant import lowbit_cpu

_DT = lowbit_cpu._DTYPE_CODE


def supports(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    return (q.device.type == "cpu" and q.dtype in _DT and k.dtype in _DT and v.dtype == k.dtype
            and q.shape[2] == 1 and k.stride(-1) == 1 and v.stride(-1) == 1 and q.shape[1] % k.shape[1] == 0
            and lowbit_cpu.extension() is not None)


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lens: torch.Tensor,
                     scale: float) -> torch.Tensor:
    return lowbit_cpu.extension().decode_attention(q, k, v, lens.to(torch.int64), scale)  # [B, 1, Hq, Dv]


def reference(q, k, v, lens, scale) -> torch.Tensor:
    """float64: each row over its first lens[b] positions -> [B, 1, Hq, Dv]."""
    B, Hq = q.shape[:2]
    G = Hq // k.shape[1]
    out = []
    for b in range(B):
        n = int(lens[b])
        kk = k[b, :, :n].double().repeat_interleave(G, 0)  # [Hq, n, D]
        vv = v[b, :, :n].double().repeat_interleave(G, 0)
        p = (q[b].double() @ kk.transpose(1, 2) * scale).softmax(-1)  # [Hq, 1, n]
        out.append((p @ vv).transpose(0, 1))  # [1, Hq, Dv]
    return torch.stack(out)
