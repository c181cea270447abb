"""Quantized weights as data, the quantizer that makes them, and the reference dequantizer.

A `QuantizedWeight` is a plain record (packed codes + per-group scale/offset codes + ranges + shape), never a
module: changing an expert's precision repoints a handle, it never edits the module tree. The formats are
quant/formats.py's:
  float    data [N, K] in the float dtype
  int8     data = uint8 codes, scale/zero fp16 [N, 1]:           W = (q - z) * s
  grouped  data = bit-packed codes, scale/zero uint8 [N, ng] (codes), ranges fp16 [ceil(N/16), 3] = (ds, db, bmin)
           per tile of 16 rows:                                  W = ds*sc * q + (bmin + db*oc)
Quantizer (`quantize_many`, a stack of matrices at once: the experts of a layer): GPTQ (Frantar et al. 2023)
against H = E[x x^T], the second moment of the matrix's input over the calibration tokens routed to the expert
(engine/calibrate.py), so the error minimized is the one the layer's output sees, ||(W - W') x||^2; without H
(no calibration) H = I and it is round-to-nearest. Per group, (s, b) is the weighted least-squares fit (weights
diag H) of the group's current (error-compensated) weights, best of a shrink grid, then coded in 8 bits against
its tile's ranges (fixed first from the min/max ranges of the original weights, with a margin). Columns are
processed in blocks of BLOCK with lazy updates; everything runs batched over the stack. int8 is round-to-nearest
per row (its error is already tiny), floats are copies.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from dynaexq.quant import lowbit_cpu
from dynaexq.quant.formats import TILE, spec
from dynaexq.quant.packing import pack, unpack
from dynaexq.quant.precision import Precision

DAMP = 0.01  # GPTQ dampening: H + DAMP * mean(diag H) * I
GRID = (1.0, 0.9, 0.8)  # shrink factors of the min/max range tried for each group's fit
FIT_ROWS = 256  # rows per block of the range fit in _tile_ranges
BLOCK = 32  # GPTQ lazy-update block (columns): small keeps the per-column in-block update cheap


@dataclass(frozen=True)
class QuantizedWeight:
    precision: Precision
    shape: tuple[int, int]  # [N out, K in]
    bits: int  # 0 for float formats
    group_size: int  # G along K; K for int8; 0 for floats
    data: torch.Tensor
    scale: torch.Tensor | None = None
    zero: torch.Tensor | None = None
    ranges: torch.Tensor | None = None  # grouped: fp16 [ceil(N/16), 3]

    @property
    def kind(self) -> str:
        return "float" if self.bits == 0 else "int8" if self.bits == 8 else "grouped"

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    def tensors(self) -> dict[str, torch.Tensor]:
        """The stored tensors, in file order."""
        out = {"data": self.data}
        for name in ("scale", "zero", "ranges"):
            if getattr(self, name) is not None:
                out[name] = getattr(self, name)
        return out

    @classmethod
    def from_tensors(cls, precision: Precision, matrix: str, shape, t: dict[str, torch.Tensor]):
        f = spec(precision, matrix)
        return cls(precision, tuple(shape), f.bits, f.group_for(shape[1]), t["data"], t.get("scale"), t.get("zero"),
                   t.get("ranges"))

    def codes(self) -> torch.Tensor:
        """Integer codes [N, K] (int32)."""
        n, k = self.shape
        return unpack(self.data, self.bits, n * k).view(n, k)

    def group_params(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Grouped formats: the decoded per-group (s, b) [N, ng] float32 of W = s * q + b."""
        n = self.shape[0]
        r = self.ranges.float().repeat_interleave(TILE, 0)[:n]  # [N, 3]
        return r[:, :1] * self.scale.float(), r[:, 2:] + r[:, 1:2] * self.zero.float()


def expected_nbytes(precision: Precision, matrix: str, shape: tuple[int, int]) -> int:
    return spec(precision, matrix).nbytes(*shape, precision.dtype.itemsize if precision.is_float else 2)


def dequantize(qw: QuantizedWeight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Reference dequantizer: [N, K] in `dtype` (use float64 for the independent reference)."""
    if qw.kind == "float":
        return qw.data.to(dtype)
    n, k = qw.shape
    q = qw.codes().to(dtype)
    if qw.kind == "int8":
        return (q - qw.zero.to(dtype)) * qw.scale.to(dtype)
    g = qw.group_size
    r = qw.ranges.to(dtype).repeat_interleave(TILE, 0)[:n]
    s = (r[:, :1] * qw.scale.to(dtype)).repeat_interleave(g, 1)[:, :k]
    b = (r[:, 2:] + r[:, 1:2] * qw.zero.to(dtype)).repeat_interleave(g, 1)[:, :k]
    return s * q + b


def quantize(w: torch.Tensor, precision: Precision, matrix: str = "gate_up", H: torch.Tensor | None = None):
    """w [N, K] float -> QuantizedWeight at `precision` (H [K, K]: the input's second moment, or None)."""
    return quantize_many(w[None], precision, matrix, None if H is None else H[None])[0]


def factor(H: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """H [B, K, K] -> (damped diag H [B, K], upper Cholesky factor of (damped H)^-1 [B, K, K]), float32: what GPTQ
    needs, the same for every precision of a matrix (compute it once, pass it to `quantize_many`)."""
    H = H.float().clone()
    diag = torch.diagonal(H, dim1=-2, dim2=-1)
    diag[diag <= 0] = 1  # inputs that never fire: any value serves
    diag += DAMP * diag.mean(-1, keepdim=True)
    # in float32 as GPTQ's reference code does (the damping keeps it well conditioned; float64 took 1.4x the
    # time). Each matrix single-threaded, the matrices spread over the threads: LAPACK's results with more
    # threads differ in the last bits, and a store must not depend on how many threads prepared it (a Ray
    # worker's against a local run: the same bytes). The upper factor U of H^-1 (U^T U = H^-1) is the inverse
    # of H's "reverse" Cholesky factor R (H = R R^T, R upper), and R is the lower factor of H with rows and
    # columns reversed: one factorization and one triangular solve, where factoring H, inverting it and
    # factoring the inverse took 1.5x the time.
    # (The output is allocated here, not stacked from the threads' results: glibc keeps the threads' freed 16 MB
    # blocks in their arenas, 0.4 GiB of a prepare's peak.)
    eye, Hinv = torch.eye(H.shape[-1]), torch.empty_like(H)
    inference = torch.is_inference_mode_enabled()  # thread-local: the pool's threads take the caller's

    def one(i):
        torch.set_num_threads(1)
        with torch.inference_mode(inference):
            L = torch.linalg.cholesky(H[i].flip(0, 1))
            Hinv[i].copy_(torch.linalg.solve_triangular(L, eye, upper=False).flip(0, 1))

    threads = torch.get_num_threads()
    try:
        with ThreadPoolExecutor(min(threads, len(H))) as pool:
            list(pool.map(one, range(len(H))))
    finally:
        torch.set_num_threads(threads)
    return diag.clone(), Hinv


def quantize_many(W: torch.Tensor, precision: Precision, matrix: str, H: torch.Tensor | None = None,
                  factored: tuple | None = None) -> list:
    """W [B, N, K] (a stack of same-shape matrices, e.g. one layer's experts), H [B, K, K] or None (or its
    `factor(H)`, `factored`) -> [QuantizedWeight] x B."""
    b, n, k = W.shape
    f = spec(precision, matrix)
    if f.kind == "float":
        return [QuantizedWeight(precision, (n, k), 0, 0, w.detach().to(precision.dtype).contiguous()) for w in W]
    if f.kind == "int8":
        return [_int8(w, precision) for w in W]
    g = f.group_for(k)
    if factored is None and H is not None:
        factored = factor(H)
    codes, sc, oc, ranges = _gptq(W.detach().float(), f.bits, g, factored)
    return [QuantizedWeight(precision, (n, k), f.bits, g, pack(codes[i], f.bits), sc[i].contiguous(),
                            oc[i].contiguous(), ranges[i].contiguous()) for i in range(b)]


def _int8(w: torch.Tensor, precision: Precision) -> QuantizedWeight:
    w = w.detach().float()
    mn, mx = w.amin(1, keepdim=True), w.amax(1, keepdim=True)
    s = ((mx - mn) / 255).clamp(min=1e-8).half().float()
    z = (-mn / s).half().float()
    q = torch.round(w / s + z).clamp(0, 255)
    return QuantizedWeight(precision, tuple(w.shape), 8, w.shape[1], pack(q, 8), s.half(), z.half())


def _fit(wg: torch.Tensor, a: torch.Tensor, qmax: int, iters: int = 4, grid=None):
    """Per group, s and b of w ~ s*q + b minimizing sum a*(w - s q - b)^2 -> (s, b) [B, R, C, 1].
    wg [B, R, C, G] fp32 (any strides), a [B, 1, C, G] (the same for every r). The native fused loop
    (csrc/fit.cpp: a group stays in registers) when the library is there, else `_fit_torch`."""
    ops = lowbit_cpu.extension()
    if ops is None or wg.dtype != torch.float32 or wg.device.type != "cpu":
        return _fit_torch(wg, a, qmax, iters, grid)
    b, _, c, g = wg.shape
    s, off = ops.fit(wg, a.float().expand(b, 1, c, g).reshape(b, c, g).contiguous(), qmax, iters,
                     list(grid or GRID))
    return s[..., None], off[..., None]


def _fit_torch(wg: torch.Tensor, a: torch.Tensor, qmax: int, iters: int = 4, grid=None):
    """`_fit` in torch, the reference: best over GRID of alternating least squares from a shrunk min/max range.
    wg [..., G], a >= 0 broadcastable to it -> (s, b) [..., 1]. The weighted moments come from sum(a q),
    sum(a q^2) and sum(q a w) (a w computed once), so an iteration makes ~10 passes over the group's weights
    instead of ~17."""
    mn, mx = wg.amin(-1, keepdim=True), wg.amax(-1, keepdim=True)
    mid = (mn + mx) / 2
    aw = a * wg
    sa = a.sum(-1, keepdim=True).clamp(min=1e-30)
    mw = aw.sum(-1, keepdim=True) / sa

    def codes(s, b):  # round((w - b) / s) clamped, as one fused multiply-add, a rounding and a clamp
        inv = 1 / s
        return torch.addcmul(-b * inv, wg, inv).round_().clamp_(0, qmax)

    best = None
    for shrink in grid or GRID:
        lo, hi = mid + (mn - mid) * shrink, mid + (mx - mid) * shrink
        s, b = ((hi - lo) / qmax).clamp(min=1e-12), lo
        for _ in range(iters):
            q = codes(s, b)
            aq = a * q
            saq = aq.sum(-1, keepdim=True)
            mq = saq / sa
            var = (aq * q).sum(-1, keepdim=True) - saq * mq  # sum a (q - mq)^2
            cov = (q * aw).sum(-1, keepdim=True) - saq * mw  # sum a (q - mq) (w - mw)
            s = torch.where(var > 1e-20, cov / var.clamp(min=1e-20), s).clamp(min=1e-12)
            b = mw - s * mq
        r = torch.addcmul(wg - b, codes(s, b), s, value=-1)  # w - s q - b
        err = (a * r * r).sum(-1, keepdim=True)
        if best is None:
            best = [s, b, err]
        else:
            take = err < best[2]
            best = [torch.where(take, s, best[0]), torch.where(take, b, best[1]), torch.minimum(err, best[2])]
    return best[0], best[1]


def _tile_ranges(W: torch.Tensor, a: torch.Tensor, qmax: int, g: int) -> torch.Tensor:
    """fp16 (ds, db, bmin) per tile of 16 rows [B, T, 3], from a fit of the original weights."""
    b, n, k = W.shape
    # in blocks of rows (each row's fit is its own): the fit's temporaries are a block's, not the whole stack's
    fits = [_fit(W[:, r:r + FIT_ROWS].reshape(b, -1, k // g, g), a.view(b, 1, k // g, g), qmax, 1, (1.0,))
            for r in range(0, n, FIT_ROWS)]
    s, off = torch.cat([f[0] for f in fits], 1), torch.cat([f[1] for f in fits], 1)
    pad = -n % TILE
    s, off = s.view(b, n, -1), off.view(b, n, -1)
    if pad:
        s = torch.cat([s, s[:, -1:].expand(b, pad, -1)], 1)
        off = torch.cat([off, off[:, -1:].expand(b, pad, -1)], 1)
    s, off = s.view(b, -1, TILE * (k // g)), off.view(b, -1, TILE * (k // g))
    lo, hi = off.amin(-1), off.amax(-1)
    margin = 0.1 * (hi - lo)  # the fits during GPTQ move a little: leave them room
    lo, hi = lo - margin, hi + margin
    return torch.stack([1.1 * s.amax(-1) / 255, (hi - lo) / 255, lo], -1).clamp(-65000, 65000).half()


def _code(s, off, r):
    """(s, b) [B, N, 1] -> their 8-bit codes against the rows' ranges r [B, N, 3] and the decoded values."""
    ds, db, lo = r[..., :1].clamp(min=1e-12), r[..., 1:2].clamp(min=1e-12), r[..., 2:]
    sc = torch.round(s / ds).clamp(1, 255)
    oc = torch.round((off - lo) / db).clamp(0, 255)
    return sc, oc, ds * sc, lo + db * oc


def _gptq(W: torch.Tensor, bits: int, g: int, factored: tuple | None):
    """Batched GPTQ into the grouped format -> (codes [B, N, K] uint8, scale codes, offset codes [B, N, ng] uint8,
    ranges [B, T, 3] fp16). factored: `factor(H)`, or None for no calibration (plain weight error: with H = I the
    error feedback below vanishes)."""
    b, n, k = W.shape
    qmax = (1 << bits) - 1
    diag, Hinv = (torch.ones(b, k), None) if factored is None else factored
    ranges = _tile_ranges(W, diag, qmax, g)
    r = ranges.float().repeat_interleave(TILE, 1)[:, :n]  # [B, N, 3]
    WT = W.transpose(1, 2).contiguous()  # [B, K, N]: a column of W is a contiguous row, updated in place
    codes = torch.empty(b, n, k, dtype=torch.uint8)  # each block's columns transposed in at its end
    sc_all = torch.empty(b, n, k // g, dtype=torch.uint8)
    oc_all = torch.empty_like(sc_all)
    block = max(g, BLOCK // g * g)
    for c0 in range(0, k, block):
        c1 = min(c0 + block, k)
        W1 = WT[:, c0:c1]  # [B, cols, N], a view
        err, qs = torch.empty_like(W1), torch.empty_like(W1)  # [B, cols, N] each: errors, codes
        for i in range(c1 - c0):
            j = c0 + i
            if j % g == 0:  # this group's (s, b), fitted on its current, error-compensated weights
                grp = W1[:, i:i + g].transpose(1, 2)[:, :, None]  # [B, N, 1 group, g], a view
                s, off = _fit(grp, diag[:, None, None, j:j + g], qmax)
                sc, oc, s, off = _code(s[:, :, 0], off[:, :, 0], r)
                sc_all[:, :, j // g], oc_all[:, :, j // g] = sc[..., 0].to(torch.uint8), oc[..., 0].to(torch.uint8)
                s, off = s[..., 0], off[..., 0]  # [B, N]
                inv_s = 1 / s
            c = W1[:, i] - off  # [B, N]
            q = torch.mul(c, inv_s, out=qs[:, i]).round_().clamp_(0, qmax)
            if Hinv is None:
                continue
            e = torch.addcmul(c, q, s, value=-1).div_(Hinv[:, j, j, None])  # (w - (s q + b)) / U_jj
            W1[:, i + 1:].addcmul_(Hinv[:, j, j + 1:c1, None], e[:, None, :], value=-1)  # in place, one pass
            err[:, i] = e
        codes[:, :, c0:c1] = qs.transpose(1, 2)  # a small transpose (one big one at the end cost 10 % of the run)
        if Hinv is not None and c1 < k:  # the lazy update of the later columns: one GEMM into them, in place
            WT[:, c1:].baddbmm_(Hinv[:, c0:c1, c1:].transpose(1, 2), err, alpha=-1)
    return codes, sc_all, oc_all, ranges


def relative_error(w: torch.Tensor, qw: QuantizedWeight, H: torch.Tensor | None = None) -> float:
    """sqrt(tr(dW H dW^T) / tr(W H W^T)) in float64 for inputs of second moment H; H = None (identity):
    ||W - W'||_F / ||W||_F."""
    w64 = w.double()
    d = w64 - dequantize(qw, torch.float64)

    def energy(m):
        return float(m.pow(2).sum()) if H is None else float(((m @ H.double()) * m).sum())
    return (energy(d) / max(energy(w64), 1e-30)) ** 0.5


__all__ = ["QuantizedWeight", "quantize", "quantize_many", "dequantize", "relative_error", "expected_nbytes"]
