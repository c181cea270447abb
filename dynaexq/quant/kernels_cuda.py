"""CUDA kernels (selected only when the model runs on a CUDA device).

UNVERIFIED: written without a GPU in reach; the `gpu`-marked tests hold these to the float64
reference and must be run on a CUDA machine before they are trusted.
  int4       aten._convert_weight_to_int4pack + aten._weight_int4pack_mm (tinygemm, bf16 activations)
  int3/int2  bit-packed codes stay resident; per call they are unpacked to int4 on the GPU and run
             through the same int4 kernel (elementwise work that is cheap next to the matmul)
  int8       codes + scale/zero resident; dequantized to bf16 per call, then F.linear
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from dynaexq.quant.packing import unpack
from dynaexq.quant.precision import Precision
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


def _scale_zero(qw: QuantizedWeight, device) -> torch.Tensor:
    s, z = qw.scale.float(), qw.zero.float()
    return torch.stack([s, s * (8 - z)], -1).transpose(0, 1).contiguous().to(torch.bfloat16).to(device)


@dataclass
class Int4Cuda:
    packed: torch.Tensor
    group_size: int
    scale_zero: torch.Tensor

    @property
    def nbytes(self):
        return self.packed.nbytes + self.scale_zero.nbytes

    def __call__(self, x):
        return torch.ops.aten._weight_int4pack_mm(x.to(torch.bfloat16), self.packed, self.group_size,
                                                  self.scale_zero).to(x.dtype)


@dataclass
class LowbitCuda:
    data: torch.Tensor  # bit-packed codes (store format) on the GPU
    bits: int
    shape: tuple[int, int]
    group_size: int
    scale_zero: torch.Tensor

    @property
    def nbytes(self):
        return self.data.nbytes + self.scale_zero.nbytes

    def __call__(self, x):
        n, k = self.shape
        codes = unpack(self.data, self.bits, n * k).view(n, k)
        return torch.ops.aten._weight_int4pack_mm(x.to(torch.bfloat16), _int4pack(codes), self.group_size,
                                                  self.scale_zero).to(x.dtype)


@dataclass
class Int8Cuda:
    q: torch.Tensor  # [N, K] uint8 codes
    scale: torch.Tensor  # [N, 1] bf16
    zero: torch.Tensor  # [N, 1] bf16

    @property
    def nbytes(self):
        return self.q.nbytes + self.scale.nbytes + self.zero.nbytes

    def __call__(self, x):
        w = (self.q.to(torch.bfloat16) - self.zero) * self.scale
        return F.linear(x.to(torch.bfloat16), w).to(x.dtype)


def prepare(qw: QuantizedWeight, device):
    """-> the kernel for `qw` on `device` (a CUDA device, e.g. cuda:1: every tensor is placed there)."""
    if qw.precision is Precision.INT8:
        return Int8Cuda(qw.codes().to(torch.uint8).to(device), qw.scale.to(torch.bfloat16).to(device),
                        qw.zero.to(torch.bfloat16).to(device))
    if qw.precision is Precision.INT4:
        return Int4Cuda(_int4pack(qw.codes().to(device)), qw.group_size, _scale_zero(qw, device))
    return LowbitCuda(qw.data.to(device), qw.precision.bits, qw.shape, qw.group_size, _scale_zero(qw, device))
