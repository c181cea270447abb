"""Grouped expert matmuls on the CPU: one native call computes every routed row of every expert of one tier.

A tier is the experts of one layer whose kernels share a grouped kernel and a shape: `spec(kernel)` -> (tier
key, (pointer, pointer, pointer)) reads both off a prepared kernel (quant.kernels), or None for a kernel with
no grouped form (bias, float32 dequantize fallback, reference, CUDA): those run one call per expert. The bank
gathers the pointers of a tier's experts into an [E, 3] int64 tensor (0 = not this tier) and calls
`run(key, counts, ptrs, x, y)` with x [R, K] its routed rows grouped by expert and counts [E] (int64, never read
on the host): the kernels walk the experts themselves, so no count reaches Python and nothing syncs.

`route` and `combine` are the bank's dispatch and combine, one native operator each per layer (csrc/route.cpp): the
pairs grouped by expert with their token rows gathered and the routing statistics added; then the weighted
products summed per token in ascending expert order, rounding as transformers' per-expert `index_add_` does.
`swiglu` is the activation between a tier's two calls (csrc/glu.cpp), one operator instead of three.

A format plugs in by registering its kernel type in SPECS (how to read its key and pointers) and its key's kind
in RUNS (which native operator computes the tier); csrc/lowbit.cpp and csrc/rowmajor.cpp hold the ones here.
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
    lib.lowbit_grouped(x, counts, ptrs, y, key[3], key[4])  # key: ("lowbit", N, K, bits, group)


def _run_rowmajor(lib, key, counts, ptrs, x, y):
    lib.rowmajor_grouped(x, counts, ptrs, y, key[3])


RUNS = {"lowbit": _run_lowbit, "rowmajor": _run_rowmajor}  # tier key kind -> native operator


def supports(dtype: torch.dtype) -> bool:
    return dtype in _DT


def available() -> bool:
    """Whether the native library is there (route and combine need it; else the bank's torch ones run)."""
    return lowbit_cpu.extension() is not None


def run(key: tuple, counts: torch.Tensor, ptrs: torch.Tensor, x: torch.Tensor, y: torch.Tensor, lib=None) -> None:
    """y[rows of e] = x[rows of e] @ W_e^T for every expert e of the tier `key` (ptrs[e, 0] != 0).
    x [R, K] contiguous, rows grouped by expert (counts [E] int64 rows each, e ascending); y [R, N], x's dtype.
    lib: the native operators (default: lowbit_cpu.extension(); tests pass the AVX2 build's)."""
    global calls
    assert x.shape[1] == key[2] and y.shape[1] == key[1], (key, x.shape, y.shape)
    calls += 1
    RUNS[key[0]](lib or lowbit_cpu.extension(), key, counts, ptrs, x, y)


def route(idx: torch.Tensor, w: torch.Tensor, hidden: torch.Tensor, num_experts: int, token_counts: torch.Tensor,
          mass: torch.Tensor, lib=None):
    """idx/w [T, K] routing, hidden [T, H] -> (counts [E] int64, order [T*K]: the pair of each grouped row,
    x [T*K, H]: each grouped row's token); token_counts [E] += counts and mass [E] += the weights, in place.
    An expert index outside [0, E) raises ValueError."""
    return (lib or lowbit_cpu.extension()).route(idx, w, hidden, num_experts, token_counts, mass)


def combine(idx: torch.Tensor, order: torch.Tensor, ys: torch.Tensor, w: torch.Tensor, lib=None) -> torch.Tensor:
    """ys [T*K, H] grouped rows -> out [T, H]: per token, the sum over its pairs of w * y in ascending expert order."""
    return (lib or lowbit_cpu.extension()).combine(idx, order, ys, w)


def swiglu(h: torch.Tensor, lib=None) -> torch.Tensor:
    """h [R, 2I] (gate | up) -> silu(gate) * up [R, I], rounded as transformers' two eager ops round."""
    return (lib or lowbit_cpu.extension()).swiglu(h)


def combines(hidden_size: int, k: int) -> bool:
    """Whether `combine` takes this layer's shape (else the bank combines in torch)."""
    return hidden_size % 16 == 0 and k <= 64
