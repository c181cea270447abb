"""Kernels: turn a stored `QuantizedWeight` into a resident, kernel-ready form and multiply with it.

`prepare(qw, backend)` returns a callable `y = p(x)` (x [T, K] -> y [T, N], same dtype as x) with an
`nbytes` attribute: the bytes it keeps resident. Backends:
  reference  float64 dequantize-then-matmul: the independent slow path every fast path is held to.
  cpu        bf16/fp16/fp32 -> F.linear; int8 -> aten._weight_int8pack_mm; int4 ->
             aten._weight_int4pack_mm_for_cpu; int3/int2 -> `lowbit_cpu` (codes stay 2/3-bit resident).
             The aten integer kernels need bf16 activations (fp32 is 10-60x slower), so x is cast.
  cuda       float -> F.linear; int4 -> aten._weight_int4pack_mm; int3/int2 -> expanded to int4 codes
             on the GPU per call; int8 -> dequantize per call. UNVERIFIED: written without a GPU.
A weight whose shape a fast kernel cannot take (int4 CPU needs N % 16 == 0 and K % G == 0;
int8 CPU needs K % 32 == 0) falls
back to a per-call dequantize in float32 and `prepare` warns, naming the shape.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from dynaexq.quant.precision import Precision
from dynaexq.quant.quantize import QuantizedWeight, dequantize

BACKENDS = ("reference", "cpu", "cuda")


def _nbytes(*tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


@dataclass
class FloatLinear:
    w: torch.Tensor  # [N, K]

    @property
    def nbytes(self):
        return _nbytes(self.w)

    def __call__(self, x):
        return F.linear(x.to(self.w.dtype), self.w).to(x.dtype)


@dataclass
class Biased:
    """Any kernel plus a bias added to its output, unfused, as transformers' `x @ W + b` rounds."""
    inner: object
    bias: torch.Tensor  # [N]

    @property
    def nbytes(self):
        return self.inner.nbytes + _nbytes(self.bias)

    def __call__(self, x):
        return self.inner(x) + self.bias


@dataclass
class Reference:
    """Dequantize in float64 at every call: slow, exact, independent of any kernel."""
    qw: QuantizedWeight

    @property
    def nbytes(self):
        return self.qw.nbytes

    def __call__(self, x):
        return (x.double() @ dequantize(self.qw, torch.float64).T).to(x.dtype)


@dataclass
class DequantFallback:
    """Shapes no fast kernel takes: keep the packed form, dequantize in float32 per call."""
    qw: QuantizedWeight

    @property
    def nbytes(self):
        return self.qw.nbytes

    def __call__(self, x):
        return F.linear(x.float(), dequantize(self.qw, torch.float32).to(x.device)).to(x.dtype)


@dataclass
class Int8Cpu:
    q: torch.Tensor  # [N, K] int8 = code - 128
    scale: torch.Tensor  # [N] bf16
    corr: torch.Tensor  # [N] fp16 = s * (128 - z): W = s*q_signed + corr, so x@W^T = kernel + sum(x)*corr

    @property
    def nbytes(self):
        return _nbytes(self.q, self.scale, self.corr)

    def __call__(self, x):
        xb = x.to(torch.bfloat16)
        y = torch.ops.aten._weight_int8pack_mm(xb, self.q, self.scale).float()
        return (y + xb.float().sum(-1, keepdim=True) * self.corr.float()).to(x.dtype)


@dataclass
class Int4Cpu:
    packed: torch.Tensor  # uint8, layout of aten._convert_weight_to_int4pack_for_cpu
    group_size: int
    scale_zero: torch.Tensor  # [K/G, N, 2] bf16: (s, s*(8 - z)), the kernel computes (q - 8)*s + that

    @property
    def nbytes(self):
        return _nbytes(self.packed, self.scale_zero)

    def __call__(self, x):
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x.to(torch.bfloat16), self.packed, self.group_size,
                                                       self.scale_zero)
        return y.to(x.dtype)


def int4_scale_zero(qw: QuantizedWeight) -> torch.Tensor:
    """[N, ng] scale/zero -> the [ng, N, 2] bf16 table of PyTorch's int4 kernels (code offset 8)."""
    s, z = qw.scale.float(), qw.zero.float()
    return torch.stack([s, s * (8 - z)], dim=-1).transpose(0, 1).contiguous().to(torch.bfloat16)


def fast_int_shape_ok(qw: QuantizedWeight) -> bool:
    n, k = qw.shape
    if qw.precision is Precision.INT8:
        return k % 32 == 0  # aten._weight_int8pack_mm reads past the row otherwise (segfaults at K=70)
    return n % 16 == 0 and k % qw.group_size == 0 and qw.group_size in (32, 64, 128, 256)


def prepare(qw: QuantizedWeight, backend: str = "cpu", bias: torch.Tensor | None = None, device=None):
    """-> kernel-ready callable x [T, K] -> x @ W^T (+ bias) [T, N], with `.nbytes` resident on `device` (the
    model's device; default: the CPU, or the current CUDA device for the cuda backend)."""
    device = torch.device(device if device is not None else "cuda" if backend == "cuda" else "cpu")
    kernel = _prepare(qw, backend, device)
    if bias is None:
        return kernel
    return Biased(kernel, bias.to(device))


def _prepare(qw: QuantizedWeight, backend: str, device: torch.device):
    if backend == "reference":
        return Reference(qw)
    if qw.precision.is_float:
        return FloatLinear(qw.data.to(device))
    if not fast_int_shape_ok(qw):
        warnings.warn(f"{qw.precision.value} weight of shape {list(qw.shape)} with group {qw.group_size}: "
                      f"no fast {backend} kernel takes it (int8: K % 32 == 0; int4/3/2: N % 16 == 0, K % G == 0, G in 32..256); "
                      "using a per-call float32 dequantize (slower)", stacklevel=2)
        return DequantFallback(_to(qw, device))
    if backend == "cpu":
        return _prepare_cpu(qw)
    if backend == "cuda":
        from dynaexq.quant import kernels_cuda
        return kernels_cuda.prepare(qw, device)
    raise ValueError(f"unknown kernel backend {backend!r}; valid: {', '.join(BACKENDS)}")


def _prepare_cpu(qw: QuantizedWeight):
    codes = qw.codes()  # [N, K] int32
    if qw.precision is Precision.INT8:
        s, z = qw.scale.float()[:, 0], qw.zero.float()[:, 0]
        # resident bytes == stored bytes: int8 codes + 2 + 2 bytes per row (the rounding of the bf16 scale
        # the kernel demands dominates that of the fp16 offset)
        return Int8Cpu((codes - 128).to(torch.int8).contiguous(), s.to(torch.bfloat16), (s * (128 - z)).half())
    if qw.precision is not Precision.INT4:
        from dynaexq.quant import lowbit_cpu
        return lowbit_cpu.LowbitCpu.from_codes(codes, qw.precision.bits, qw.group_size, qw.scale, qw.zero)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.contiguous(), 1)
    return Int4Cpu(packed, qw.group_size, int4_scale_zero(qw))


def _to(qw: QuantizedWeight, device) -> QuantizedWeight:
    if qw.data.device == torch.device(device):
        return qw
    return QuantizedWeight.from_tensors(qw.precision, qw.shape, qw.group_size,
                                        {k: v.to(device) for k, v in qw.tensors().items()})
