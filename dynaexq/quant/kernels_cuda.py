"""CUDA kernels (selected only when the model runs on a CUDA device).

UNVERIFIED: written without a GPU in reach; the `gpu`-marked tests hold these to the float64
reference and must be run on a CUDA machine before they are trusted.
  grouped    2/3/4-bit codes are int4 codes: aten._convert_weight_to_int4pack once, then
             aten._weight_int4pack_mm (tinygemm, bf16 activations) with the (s, b + 8 s) table; 4 bits resident
  int8       codes + scale/zero resident; dequantized to bf16 per call, then F.linear
  6-bit      codes (a byte each) + the groups' (s, b) resident; dequantized to bf16 per call, then F.linear
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from dynaexq.quant.quantize import QuantizedWeight


def _inner_k_tiles(k: int) -> int:
    for tiles in (8, 4, 2):
        if k % (tiles * 16) == 0:
            return tiles
    raise ValueError(f"K={k} is not a multiple of 32: no CUDA int4 layout")


def _int4pack(codes: torch.Tensor) -> torch.Tensor:
    """[N, K] int codes on the GPU -> tinygemm layout."""
    u8 = ((codes[:, ::2] << 4) | codes[:, 1::2]).to(torch.uint8)
    return torch.ops.aten._convert_weight_to_int4pack(u8.contiguous(), _inner_k_tiles(codes.shape[1]))


def _table(qw: QuantizedWeight, device) -> torch.Tensor:
    """The [ng, N, 2] bf16 table of tinygemm, which computes (q - 8) * s + z: z = b + 8 s."""
    s, b = qw.group_params()
    return torch.stack([s, b + 8 * s], -1).transpose(0, 1).contiguous().to(torch.bfloat16).to(device)


@dataclass
class Int4Cuda:
    """Grouped 2/3/4-bit weights: <= 4-bit codes are int4 codes, packed once into tinygemm's layout."""
    packed: torch.Tensor
    group_size: int
    scale_zero: torch.Tensor
    tensor_data_names = ("packed", "scale_zero")

    @property
    def nbytes(self):
        return self.packed.nbytes + self.scale_zero.nbytes

    def __call__(self, x):
        return torch.ops.aten._weight_int4pack_mm(x.to(torch.bfloat16), self.packed, self.group_size,
                                                  self.scale_zero).to(x.dtype)


@dataclass
class Int8Cuda:
    q: torch.Tensor  # [N, K] uint8 codes
    scale: torch.Tensor  # [N, 1] bf16
    zero: torch.Tensor  # [N, 1] bf16
    tensor_data_names = ("q", "scale", "zero")

    @property
    def nbytes(self):
        return self.q.nbytes + self.scale.nbytes + self.zero.nbytes

    def __call__(self, x):
        w = (self.q.to(torch.bfloat16) - self.zero) * self.scale
        return F.linear(x.to(torch.bfloat16), w).to(x.dtype)


@dataclass
class GroupedCuda:
    """Grouped codes wider than 4 bits: one byte a code, dequantized per call."""
    q: torch.Tensor  # [N, K] uint8 codes
    s: torch.Tensor  # [N, K/G, 1] bf16
    b: torch.Tensor  # [N, K/G, 1] bf16
    tensor_data_names = ("q", "s", "b")

    @property
    def nbytes(self):
        return self.q.nbytes + self.s.nbytes + self.b.nbytes

    def __call__(self, x):
        n, k = self.q.shape
        w = (self.q.view(n, self.s.shape[1], -1).to(torch.bfloat16) * self.s + self.b).view(n, k)
        return F.linear(x.to(torch.bfloat16), w).to(x.dtype)


def prepare(qw: QuantizedWeight, device):
    """-> the kernel for `qw` on `device` (a CUDA device, e.g. cuda:1: every tensor is placed there)."""
    if qw.kind == "int8":
        return Int8Cuda(qw.codes().to(torch.uint8).to(device), qw.scale.to(torch.bfloat16).to(device),
                        qw.zero.to(torch.bfloat16).to(device))
    if qw.bits > 4:
        s, b = qw.group_params()
        return GroupedCuda(qw.codes().to(torch.uint8).to(device), s[..., None].to(torch.bfloat16).to(device),
                           b[..., None].to(torch.bfloat16).to(device))
    return Int4Cuda(_int4pack(qw.codes().to(device)), qw.group_size, _table(qw, device))
