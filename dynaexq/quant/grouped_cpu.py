"""Grouped expert matmuls on the CPU: one native call computes every routed row of every expert of one tier.

A tier is the experts of one layer whose kernels share a grouped kernel and a shape: `spec(kernel)` -> (tier
key, (pointer, pointer, pointer)) reads both off a prepared kernel (quant.kernels), or None for a kernel with
no grouped form (bias, float32 dequantize fallback, reference, CUDA): those run one call per expert. The bank
gathers the pointers of a tier's experts into an [E, 3] int64 tensor (0 = not this tier) and calls
`run(key, counts, ptrs, x, y)` with x [R, K] its routed rows grouped by expert and counts [E] (int64, never read
on the host): the kernels walk the experts themselves, so no count reaches Python and nothing syncs.

`route` and `combine` are the bank's dispatch and combine, one native call each per layer (csrc/route.cpp): the
pairs grouped by expert with their token rows gathered and the routing statistics added; then the weighted
products summed per token in ascending expert order, rounding as transformers' per-expert `index_add_` does.

A format plugs in by registering its kernel type in SPECS (how to read its key and pointers) and its key's kind
in RUNS (which native function computes the tier); csrc/lowbit.cpp and csrc/rowmajor.cpp hold the ones here.
"""
from __future__ import annotations

import torch

from dynaexq.quant import lowbit_cpu
from dynaexq.quant.kernels import FloatLinear, Int8Cpu

_DT = lowbit_cpu._DTYPE_CODE  # dtype codes of csrc/simd.h
_W_INT8 = 3
calls = 0  # native grouped calls made (bench/generate.py counts kernel calls per token with it)


def _lowbit(k: lowbit_cpu.LowbitCpu):
    if k.blob is None or k.blob.device.type != "cpu":  # the aten int4 fallback has no grouped form
        return None
    return ("lowbit", *k.shape, k.bits, k.group_size), (k.blob.data_ptr(), 0, 0)


def _int8(k: Int8Cpu):
    n, kk = k.q.shape
    if k.q.device.type != "cpu" or kk % 16 or n % 4:
        return None
    return ("rowmajor", n, kk, _W_INT8), (k.q.data_ptr(), k.scale.data_ptr(), k.corr.data_ptr())


def _float(k: FloatLinear):
    n, kk = k.w.shape
    if k.w.device.type != "cpu" or k.w.dtype not in _DT or kk % 16 or n % 4 or not k.w.is_contiguous():
        return None
    return ("rowmajor", n, kk, _DT[k.w.dtype]), (k.w.data_ptr(), 0, 0)


SPECS = {lowbit_cpu.LowbitCpu: _lowbit, Int8Cpu: _int8, FloatLinear: _float}  # kernel type -> spec reader


def spec(kernel) -> tuple[tuple, tuple[int, int, int]] | None:
    """-> (tier key (kind, N, K, format...), the kernel's three pointers) of a prepared kernel, or None: no grouped
    form."""
    read = SPECS.get(type(kernel))
    return read(kernel) if read is not None and lowbit_cpu.extension() is not None else None


def _run_lowbit(lib, key, counts, ptrs, x, y):
    _, n, k, bits, group = key
    return lib.dynaexq_lowbit_grouped(
        bits, group, n, k, counts.numel(), counts.data_ptr(), ptrs.data_ptr(), x.data_ptr(),
        _DT[x.dtype], y.data_ptr(), torch.get_num_threads())


def _run_rowmajor(lib, key, counts, ptrs, x, y):
    _, n, k, wt = key
    return lib.dynaexq_rowmajor_grouped(
        wt, n, k, counts.numel(), counts.data_ptr(), ptrs.data_ptr(), x.data_ptr(), _DT[x.dtype], y.data_ptr(),
        torch.get_num_threads())


RUNS = {"lowbit": _run_lowbit, "rowmajor": _run_rowmajor}  # tier key kind -> native call


def supports(dtype: torch.dtype) -> bool:
    return dtype in _DT


def run(key: tuple, counts: torch.Tensor, ptrs: torch.Tensor, x: torch.Tensor, y: torch.Tensor, lib=None) -> None:
    """y[rows of e] = x[rows of e] @ W_e^T for every expert e of the tier `key` (ptrs[e, 0] != 0).
    x [R, K] contiguous, rows grouped by expert (counts [E] int64 rows each, e ascending); y [R, N], x's dtype.
    lib: the native library (default: lowbit_cpu.extension(); tests pass the AVX2 build)."""
    global calls
    assert x.is_contiguous() and y.is_contiguous() and x.dtype == y.dtype and counts.dtype == torch.int64
    assert ptrs.dtype == torch.int64 and ptrs.shape == (counts.numel(), 3) and ptrs.is_contiguous()
    calls += 1
    if RUNS[key[0]](lib or lowbit_cpu.extension(), key, counts, ptrs, x, y) != 0:
        raise RuntimeError(f"the grouped CPU kernel refused tier {key}")


def route(idx: torch.Tensor, w: torch.Tensor, hidden: torch.Tensor, num_experts: int, token_counts: torch.Tensor,
          mass: torch.Tensor, lib=None):
    """idx/w [T, K] routing, hidden [T, H] -> (counts [E] int64, order [T*K]: the pair of each grouped row,
    x [T*K, H]: each grouped row's token); token_counts [E] += counts and mass [E] += the weights, in place."""
    t, k = idx.shape
    idx, w, hidden = idx.contiguous(), w.contiguous(), hidden.contiguous()
    assert idx.dtype == torch.int64 and token_counts.dtype == torch.int64 and mass.dtype == torch.float32
    counts = torch.empty(num_experts, dtype=torch.int64)
    order = torch.empty(t * k, dtype=torch.int64)
    x = torch.empty(t * k, hidden.shape[1], dtype=hidden.dtype)
    rc = (lib or lowbit_cpu.extension()).dynaexq_route(
        t, k, num_experts, hidden.shape[1], idx.data_ptr(), w.data_ptr(), _DT[w.dtype], hidden.data_ptr(),
        _DT[hidden.dtype], counts.data_ptr(), token_counts.data_ptr(), mass.data_ptr(), order.data_ptr(),
        x.data_ptr(), torch.get_num_threads())
    if rc != 0:
        raise ValueError(f"an expert index outside [0, {num_experts}) was routed to")
    return counts, order, x


def combine(idx: torch.Tensor, order: torch.Tensor, ys: torch.Tensor, w: torch.Tensor, lib=None) -> torch.Tensor:
    """ys [T*K, H] grouped rows -> out [T, H]: per token, the sum over its pairs of w * y in ascending expert order."""
    t, k = idx.shape
    out = torch.empty(t, ys.shape[1], dtype=ys.dtype)
    idx, w = idx.contiguous(), w.contiguous()
    rc = (lib or lowbit_cpu.extension()).dynaexq_combine(
        t, k, ys.shape[1], idx.data_ptr(), order.data_ptr(), ys.data_ptr(), w.data_ptr(), _DT[w.dtype], _DT[ys.dtype],
        out.data_ptr(), torch.get_num_threads())
    assert rc == 0, (t, k, ys.shape)
    return out


def combines(hidden_size: int, k: int) -> bool:
    """Whether `combine` takes this layer's shape (else the bank combines in torch)."""
    return hidden_size % 16 == 0 and k <= 64
