"""int2/int3 on the CPU: resident at 2/3 bits per weight, run through PyTorch's int4 kernel.

Codes below 4 (int2) or 8 (int3) are valid int4 codes, so we take the int4-packed weight of
aten._convert_weight_to_int4pack_for_cpu (two nibbles per byte, whatever its internal layout) and
squeeze out the always-zero bits, working on int64 words so each step is one wide tensor op:
  int2: nibble bits 0-1 used (mask 0x3333...). Word halves A, B -> one word A | B << 2.
  int3: the low two bits as in int2, plus the third bit (0x4444...) of four word quarters folded into
        one word. 2/4 + 1/4 of the int4 bytes = exactly 3 bits per weight.
Per call the int4 bytes are rebuilt with 3 (int2) or 15 (int3) tensor ops, then the int4 kernel runs.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

_M2 = 0x3333333333333333  # the low two bits of every nibble
_M1 = 0x1111111111111111  # the lowest bit of every nibble


@dataclass
class LowbitCpu:
    bits: int
    low: torch.Tensor  # int64 words: low two bits of each nibble, two int4 words folded into one
    high: torch.Tensor | None  # int3 only: third bits, four int4 words folded into one
    shape: torch.Size  # shape of the int4-packed tensor
    group_size: int
    scale_zero: torch.Tensor  # [K/G, N, 2] bf16, as for int4

    @classmethod
    def from_int4pack(cls, packed: torch.Tensor, bits: int, group_size: int, scale_zero: torch.Tensor):
        w = packed.reshape(-1).view(torch.int64)
        assert w.numel() % 4 == 0
        h, q = w.numel() // 2, w.numel() // 4
        low = (w[:h] & _M2) | ((w[h:] & _M2) << 2)
        high = None
        if bits == 3:
            hb = (w >> 2) & _M1
            high = hb[:q] | (hb[q:2 * q] << 1) | (hb[2 * q:3 * q] << 2) | (hb[3 * q:] << 3)
        return cls(bits, low.contiguous(), high, packed.shape, group_size, scale_zero)

    @property
    def nbytes(self):
        return sum(t.numel() * t.element_size() for t in (self.low, self.high, self.scale_zero) if t is not None)

    def int4pack(self) -> torch.Tensor:
        h = self.low.numel()
        out = torch.empty(2 * h, dtype=torch.int64)
        torch.bitwise_and(self.low, _M2, out=out[:h])
        torch.bitwise_right_shift(self.low, 2, out=out[h:])
        out[h:].bitwise_and_(_M2)
        if self.high is not None:
            q = self.high.numel()
            for i in range(4):
                out[i * q:(i + 1) * q] |= ((self.high >> i) & _M1) << 2
        return out.view(torch.uint8).view(self.shape)

    def __call__(self, x):
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x.to(torch.bfloat16), self.int4pack(), self.group_size,
                                                       self.scale_zero)
        return y.to(x.dtype)
