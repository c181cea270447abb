"""Kernels: turn a stored `QuantizedWeight` into a resident, kernel-ready form and multiply with it.

`prepare(qw, backend, bias, device)` returns a callable `y = p(x)` (x [T, K] -> y [T, N], same dtype as x) with
an `nbytes` attribute (the bytes it keeps resident) and `tensor_data_names` (the fields holding them: `place()`
lays exactly those into a slot). The kernel for a weight is looked up in one registry by (format kind, backend):
  reference  float64 dequantize-then-matmul: the independent slow path every fast path is held to.
  cpu        float -> F.linear (bf16/fp16 without AVX512-BF16: fp32 GEMM on converted blocks);
             int8 -> aten._weight_int8pack_mm (bf16 activations: fp32 is 10-60x slower);
             grouped 2/3/4/6-bit -> `lowbit_cpu` (the fused C++ kernel; codes stay at their bits).
  cuda       float -> F.linear; grouped <= 4-bit -> aten._weight_int4pack_mm (tinygemm; such codes are int4
             codes); int8 and 6-bit -> dequantize per call. UNVERIFIED: written without a GPU.
These are one expert's kernels (the bank's `reference` path calls them one expert at a time); the bank's default
`grouped` path reads the same resident tensors through quant/grouped_cpu.py, one native call per tier.
A weight whose shape the fast kernel cannot take (grouped CPU: N % 16 == 0 and G a multiple of 8/16/32/16 for
4/2/3/6 bits; int8 CPU: K % 32 == 0) runs a per-call float32 dequantize, and `prepare` warns, naming the shape;
so does a 6-bit weight on the CPU without the C++ kernel (aten's int4 kernel, the fallback, holds 4 bits).
"""
from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from dynaexq.quant.quantize import QuantizedWeight, dequantize

BACKENDS = ("reference", "cpu", "cuda")


def _nbytes(*tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


@functools.cache
def native_half_gemm() -> bool:
    """Whether aten multiplies bf16/fp16 matrices natively on this CPU (AVX512-BF16). Without it its GEMM is
    slower than converting the weight to fp32 (bench/int8_activations.py on an AVX2 EPYC, 2 threads, [512, 4096]
    x [4096, 2048]: 395 ms bf16, 69 ms converting to fp32 and multiplying)."""
    return bool(getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True)())


FP32_BLOCK = 4096  # weight rows converted to fp32 at a time (a vocabulary-wide head is never held twice)


@dataclass
class FloatLinear:
    w: torch.Tensor  # [N, K]
    tensor_data_names = ("w",)

    @property
    def nbytes(self):
        return _nbytes(self.w)

    def __call__(self, x, bias=None):
        """x [..., K] -> x @ w^T (+ bias, added before the one rounding, as F.linear does) [..., N] in x's dtype."""
        if self.w.dtype in (torch.bfloat16, torch.float16) and self.w.device.type == "cpu" and not native_half_gemm():
            return fp32_blocks(x.float(), self.w, bias).to(x.dtype)
        return F.linear(x.to(self.w.dtype), self.w, bias).to(x.dtype)


def fp32_blocks(xf: torch.Tensor, w: torch.Tensor, bias=None) -> torch.Tensor:
    """xf [..., K] fp32 @ w^T (+ bias) in fp32 by aten's fp32 GEMM on fp32 copies of FP32_BLOCK rows of w (any
    dtype) at a time: a vocabulary-wide matrix is never held twice."""
    y = torch.empty(*xf.shape[:-1], w.shape[0], dtype=torch.float32)
    for n0 in range(0, w.shape[0], FP32_BLOCK):
        b = None if bias is None else bias[n0:n0 + FP32_BLOCK].float()
        y[..., n0:n0 + FP32_BLOCK] = F.linear(xf, w[n0:n0 + FP32_BLOCK].float(), b)
    return y


@dataclass
class Biased:
    """Any kernel plus a bias added to its output, unfused, as transformers' `x @ W + b` rounds."""
    inner: object
    bias: torch.Tensor  # [N]
    tensor_data_names = ("inner", "bias")

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
    """Shapes no fast kernel takes: keep the stored form, dequantize in float32 per call."""
    qw: QuantizedWeight
    tensor_data_names = ("qw",)

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
    tensor_data_names = ("q", "scale", "corr")

    @property
    def nbytes(self):
        return _nbytes(self.q, self.scale, self.corr)

    def __call__(self, x):
        xb = x.to(torch.bfloat16)
        y = torch.ops.aten._weight_int8pack_mm(xb, self.q, self.scale).float()
        return (y + xb.float().sum(-1, keepdim=True) * self.corr.float()).to(x.dtype)

    def gemm(self, x):
        """x [M, K] -> [M, N] in x's dtype by aten's fp32 GEMM on fp32 copies of FP32_BLOCK rows of the codes: the
        native tile's arithmetic (exact products, fp32 sums, scale and correction in fp32, one rounding) at GEMM
        speed, for prefill's many rows (DenseLinear: from INT8_GEMM_ROWS rows)."""
        xf = x.float()
        return (fp32_blocks(xf, self.q) * self.scale.float() + xf.sum(-1, keepdim=True) * self.corr.float()).to(x.dtype)


def _float(qw, device):
    return FloatLinear(qw.data.to(device))


def _int8_cpu(qw, device):
    s, z = qw.scale.float()[:, 0], qw.zero.float()[:, 0]
    # resident bytes == stored bytes: int8 codes + 2 + 2 bytes per row
    return Int8Cpu((qw.codes() - 128).to(torch.int8).contiguous(), s.to(torch.bfloat16), (s * (128 - z)).half())


def _grouped_cpu(qw, device):
    from dynaexq.quant import lowbit_cpu
    if qw.bits > 4 and lowbit_cpu.extension() is None:
        warnings.warn(f"{qw.precision.value} weight of shape {list(qw.shape)}: without the C++ low-bit kernel (see "
                      f"its warning) aten's int4 kernel cannot hold {qw.bits}-bit codes; using a per-call float32 "
                      "dequantize (slower)", stacklevel=3)
        return DequantFallback(qw)
    return lowbit_cpu.LowbitCpu.from_weight(qw)


def _cuda(qw, device):
    from dynaexq.quant import kernels_cuda
    return kernels_cuda.prepare(qw, device)


def _fast_shape_ok(qw: QuantizedWeight, backend: str) -> bool:
    n, k = qw.shape
    if qw.kind == "int8":
        return backend != "cpu" or k % 32 == 0  # aten._weight_int8pack_mm reads past the row otherwise
    if backend == "cuda":
        return n % 16 == 0 and k % qw.group_size == 0 and qw.group_size in (32, 64, 128, 256)
    from dynaexq.quant.lowbit_cpu import CHUNKS
    return n % 16 == 0 and k % qw.group_size == 0 and qw.group_size % CHUNKS[qw.bits][0] == 0


KERNELS = {  # (format kind, backend) -> prepare(qw, device)
    ("float", "cpu"): _float, ("int8", "cpu"): _int8_cpu, ("grouped", "cpu"): _grouped_cpu,
    ("float", "cuda"): _float, ("int8", "cuda"): _cuda, ("grouped", "cuda"): _cuda,
}


def prepare(qw: QuantizedWeight, backend: str = "cpu", bias: torch.Tensor | None = None, device=None):
    """-> kernel-ready callable x [T, K] -> x @ W^T (+ bias) [T, N], with `.nbytes` resident on `device` (the
    model's device; default: the CPU, or the current CUDA device for the cuda backend)."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown kernel backend {backend!r}; valid: {', '.join(BACKENDS)}")
    device = torch.device(device if device is not None else "cuda" if backend == "cuda" else "cpu")
    if backend == "reference":
        kernel = Reference(qw)
    elif qw.kind != "float" and not _fast_shape_ok(qw, backend):
        warnings.warn(f"{qw.precision.value} weight of shape {list(qw.shape)} with group {qw.group_size}: no fast "
                      f"{backend} kernel takes it (int8: K % 32 == 0; grouped: N % 16 == 0, K % G == 0, G a multiple "
                      "of 8/16/32/16 for 4/2/3/6 bits); using a per-call float32 dequantize (slower)", stacklevel=2)
        kernel = DequantFallback(_to(qw, device))
    else:
        kernel = KERNELS[(qw.kind, backend)](qw, device)
    return kernel if bias is None else Biased(kernel, bias.to(device))


def _to(qw: QuantizedWeight, device) -> QuantizedWeight:
    if qw.data.device == torch.device(device):
        return qw
    return QuantizedWeight(qw.precision, qw.shape, qw.bits, qw.group_size,
                           *(None if t is None else t.to(device) for t in (qw.data, qw.scale, qw.zero, qw.ranges)))
