"""Quantized weights as data, the quantizer that makes them, and the reference dequantizer.

A `QuantizedWeight` is a plain record (packed codes + per-group scale/zero + shape), never a module:
changing an expert's precision repoints a handle, it never edits the module tree.

Integer format (all integer precisions alike): groups of G consecutive input columns of a row share
an fp16 `scale` s and fp16 `zero` z; the weight is  W[n, k] = (q[n, k] - z[n, g]) * s[n, g],  g = k // G,
with codes q in [0, 2**bits). int8 uses one group per row (per channel). The zero is a float, so
the format is asymmetric and exactly what the int4 kernels of PyTorch compute.

Quantizer: round-to-nearest from the group min/max, then an error-minimizing refinement of
(scale, zero), chosen by `refine`:
  "lsq"  (default) alternating least squares: codes fixed -> exact least-squares scale and zero ->
         re-round, 5 rounds (10 rounds gained < 1% more);
  "hqq"  HQQ's half-quadratic zero update (Badri & Shaji 2023: alternate a proximal lp-norm shrinkage
         of the error with a closed-form zero; scale fixed), implemented here in ~10 lines rather
         than taken from the `hqq` package, whose import pulls CUDA extension builds and model-patching
         code we do not use;
  "none" round-to-nearest only.
Per group the candidate with the lowest squared error is kept, so refinement never loses to RTN.
int8 is always round-to-nearest: with 256 levels refinement changed its error by < 1% (measured),
and skipping it makes `prepare` ~40% faster.
Measured by `bench/kernels.py` on one [1536, 2048] matrix (seed 0), relative error at int2:
Gaussian RTN 0.450, HQQ 0.431, LSQ 0.327; Student-t (2 dof) RTN 0.450, HQQ 0.239, LSQ 0.217 (LSQ
7-10x faster than HQQ's 20 iterations). HQQ then LSQ was no better than LSQ alone.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from dynaexq.quant.packing import pack, packed_nbytes, unpack
from dynaexq.quant.precision import DEFAULT_GROUP_SIZE, Precision


@dataclass(frozen=True)
class QuantizedWeight:
    precision: Precision
    shape: tuple[int, int]  # [N out, K in]
    group_size: int  # G; == K for per-channel; 0 for float precisions
    data: torch.Tensor  # float precisions: [N, K] in their dtype; integer: flat packed uint8
    scale: torch.Tensor | None = None  # [N, ceil(K/G)] fp16
    zero: torch.Tensor | None = None  # [N, ceil(K/G)] fp16

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {"data": self.data}
        if self.scale is not None:
            out.update(scale=self.scale, zero=self.zero)
        return out

    @classmethod
    def from_tensors(cls, precision: Precision, shape, group_size: int, t: dict[str, torch.Tensor]):
        return cls(precision, tuple(shape), group_size, t["data"], t.get("scale"), t.get("zero"))

    def codes(self) -> torch.Tensor:
        """Integer codes [N, K] (int32)."""
        n, k = self.shape
        return unpack(self.data, self.precision.bits, n * k).view(n, k)


def expected_nbytes(precision: Precision, shape: tuple[int, int], group_size: int) -> int:
    n, k = shape
    if precision.is_float:
        return n * k * precision.dtype.itemsize
    g = precision.group_size(k, group_size)
    return packed_nbytes(n * k, precision.bits) + 2 * n * (-(-k // g)) * 2


REFINE = ("lsq", "hqq", "none")


def quantize(w: torch.Tensor, precision: Precision, group_size: int = DEFAULT_GROUP_SIZE,
             refine: str = "lsq") -> QuantizedWeight:
    """w: [N, K] float -> QuantizedWeight at `precision`."""
    n, k = w.shape
    if precision.is_float:
        return QuantizedWeight(precision, (n, k), 0, w.detach().to(precision.dtype).contiguous())
    g = precision.group_size(k, group_size)
    qmax = (1 << precision.bits) - 1
    wg = _grouped(w.detach().float(), g)  # [N, ng, G]
    mn, mx = wg.amin(-1, keepdim=True), wg.amax(-1, keepdim=True)
    scale = ((mx - mn) / qmax).clamp(min=1e-8)  # [N, ng, 1]
    zero = -mn / scale
    if precision is Precision.INT8:
        refine = "none"
    if refine == "lsq":
        scale, zero = _best(wg, qmax, [(scale, zero), _least_squares(wg, scale, zero, qmax)])
    elif refine == "hqq":
        scale, zero = _best(wg, qmax, [(scale, zero), (scale, _hqq_zero(wg, scale, zero, qmax))])
    else:
        assert refine == "none", refine
    scale, zero = scale.half().float(), zero.half().float()  # the stored values define the codes
    q = torch.round(wg / scale + zero).clamp(0, qmax)
    codes = q.view(n, -1)[:, :k]
    return QuantizedWeight(precision, (n, k), g, pack(codes, precision.bits),
                           scale.view(n, -1).half().contiguous(), zero.view(n, -1).half().contiguous())


def dequantize(qw: QuantizedWeight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Reference dequantizer: [N, K] in `dtype` (use float64 for the independent reference)."""
    if qw.precision.is_float:
        return qw.data.to(dtype)
    n, k = qw.shape
    g = qw.group_size
    q = qw.codes().to(dtype)
    s = qw.scale.to(dtype).repeat_interleave(g, dim=1)[:, :k]
    z = qw.zero.to(dtype).repeat_interleave(g, dim=1)[:, :k]
    return (q - z) * s


def relative_error(w: torch.Tensor, qw: QuantizedWeight) -> float:
    """||W - deq(Q(W))||_F / ||W||_F."""
    w64 = w.double()
    return float((w64 - dequantize(qw, torch.float64)).norm() / w64.norm().clamp(min=1e-30))


def _grouped(w: torch.Tensor, g: int) -> torch.Tensor:
    n, k = w.shape
    pad = (-k) % g
    if pad:  # repeat the last column so padding never widens a group's range
        w = torch.cat([w, w[:, -1:].expand(n, pad)], dim=1)
    return w.view(n, -1, g)


def _hqq_zero(wg, scale, zero, qmax, iters: int = 20, lp: float = 0.7, beta: float = 10.0, kappa: float = 1.01):
    """HQQ: minimize ||W - (Q - z) s||_p^p over z with half-quadratic splitting (scale fixed)."""
    inv = 1.0 / scale
    for _ in range(iters):
        q = torch.round(wg * inv + zero).clamp(0, qmax)
        err = wg - (q - zero) * scale
        # proximal step of the lp norm (p < 1): shrink the error, keep its sign
        e = torch.sign(err) * torch.relu(err.abs() - (1.0 / beta) * err.abs().clamp(min=1e-12).pow(lp - 1))
        zero = torch.mean(q - (wg - e) * inv, dim=-1, keepdim=True)
        beta *= kappa
    return zero


def _least_squares(wg, scale, zero, qmax, iters: int = 5):
    """Alternate: codes fixed -> least-squares (scale, offset) per group -> re-round the codes.

    With n = G codes q and weights w of a group, the fit w ~ s*q + b has s = cov(q, w) / var(q) and
    b = mean(w) - s*mean(q), i.e. z = -b/s; only four sums per group per round are needed."""
    n = wg.shape[-1]
    sw = wg.sum(-1, keepdim=True)
    for _ in range(iters):
        q = torch.round(wg / scale + zero).clamp_(0, qmax)
        sq = q.sum(-1, keepdim=True)
        var = (q * q).sum(-1, keepdim=True) - sq * sq / n
        cov = (q * wg).sum(-1, keepdim=True) - sq * sw / n
        scale = torch.where(var > 1e-6, cov / var.clamp(min=1e-6), scale).clamp(min=1e-8)
        zero = (sq - sw / scale) / n
    return scale, zero


def _best(wg, qmax, candidates):
    """Per group, the (scale, zero) candidate with the lowest squared error after fp16 rounding."""
    best_s, best_z, best_e = None, None, None
    for s, z in candidates:
        s, z = s.clamp(min=1e-8).half().float(), z.half().float()
        q = torch.round(wg / s + z).clamp(0, qmax)
        e = ((wg - (q - z) * s) ** 2).sum(-1, keepdim=True)
        if best_e is None:
            best_s, best_z, best_e = s, z, e
        else:
            take = e < best_e
            best_s, best_z, best_e = torch.where(take, s, best_s), torch.where(take, z, best_z), torch.minimum(e, best_e)
    return best_s, best_z
