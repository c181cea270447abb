"""Grouped 2/3/4/6-bit matmuls on the CPU with the weights resident at their true bits per weight.

Fast path: the fused C++ kernel of `csrc/lowbit.cpp` (AVX-512 or AVX2, OpenMP over output rows) reads the
codes, 8-bit scale/offset codes and per-panel ranges of a private blob (`pack_blob`, layout in the .cpp
header), turns each code into a float in registers and accumulates x @ W^T in fp32; x (bf16/fp16/fp32) is
converted to fp32 once per call and the output is the only allocation. With a bf16 x and 4- or 2-bit codes on a
CPU with AVX512-BF16 (`bf16_dot()` says), tiles of 1-2 rows (decode) make two codes a bf16 pair
that one vdpbf16ps multiplies (exact: x is bf16, the codes small integers), half the vector ops per weight of the
fp32 tile; tiles of more rows (prefill) stay on the fp32 tile, which is faster there. On AVX2 builds,
bf16/fp16 x with 4/2-bit codes takes the int8-activation tile instead, at every row count (so a row's result
does not depend on its batch): llama.cpp's Q8_0 scheme, each block of 32 inputs of x rounded to int8 against its
max (once per call), 32 byte codes times 32 int8 inputs in one vpmaddubsw: 1.8-2.6x the fp32 tile's speed at 1
row, 1.5-1.8x at 64-512 rows; the price is x rounded to 8 bits per 32 inputs (the weights' offsets still
multiply the exact x), which moves the bundled model's KL within its noise (bench/int8_activations.py).
DYNAEXQ_EXACT_KERNELS=1 (or `int8_activations(False)`) keeps every tile exact; fp32 x always is.
It is JIT-compiled with -march=native on first use through torch.utils.cpp_extension (needs `ninja` and a C++
compiler) into $TORCH_EXTENSIONS_DIR or ~/.cache/dynaexq/torch_extensions; csrc/ops.cpp registers the kernels as
PyTorch operators (`torch.ops.dynaexq.*`: shape, dtype and device checks in C++, the GIL released during the
call), and `_register_fakes` gives each its fake implementation (output shapes without computing), so they
trace under torch.compile. `extension()` returns that namespace.

Fallback (build failure, a CPU without AVX2/FMA/F16C, or DYNAEXQ_NO_CPU_EXT=1; one warning says so): codes of
<= 4 bits are valid int4 codes, so the weight runs through aten's int4 kernel (`_weight_int4pack_mm_for_cpu`,
groups of 32..256) on the codes shifted to centre on its offset 8: 4 bits resident whatever the precision,
and slower; 6-bit codes do not fit it, and quant/kernels.py dequantizes those per call instead.
"""
from __future__ import annotations

import hashlib
import os
import sys
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

CHUNKS = {2: (16, 16), 3: (32, 10), 4: (8, 8), 6: (16, 5)}  # bits -> (k per chunk, codes per 32-bit word)
GEMM_BLOCK = 4096  # weight rows decoded into bf16 at a time by LowbitCpu.gemm
_SRC = [Path(__file__).parent / "csrc" / f for f in (
    "lowbit.cpp", "rowmajor.cpp", "route.cpp", "attention.cpp", "norm.cpp", "rope.cpp", "glu.cpp", "topk.cpp",
    "argmax.cpp", "fit.cpp", "ops.cpp")]  # + simd.h
_DTYPE_CODE = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}  # as in csrc/simd.h

_lock = threading.Lock()
calls = 0  # fused one-expert calls made (bench/generate.py counts kernel calls per token with it)
_lib = None  # torch.ops.dynaexq once loaded
_loaded = False


def extension():
    """The compiled kernels' operator namespace `torch.ops.dynaexq` (built on first call), or None after one
    warning."""
    global _lib, _loaded
    if not _loaded:
        with _lock:
            if not _loaded:
                _lib = _load()
                _loaded = True
    return _lib


def _load():
    slow = "2/3/4-bit CPU matmuls use aten's int4 kernel (4 bits resident, slower)"
    if os.environ.get("DYNAEXQ_NO_CPU_EXT", "") not in ("", "0"):
        warnings.warn(f"DYNAEXQ_NO_CPU_EXT is set: {slow}", stacklevel=3)
        return None
    try:
        lib = build()
    except Exception as e:  # no compiler, no ninja, a compile error...
        warnings.warn(f"could not build the low-bit CPU kernel ({type(e).__name__}: {e}); {slow}", stacklevel=3)
        return None
    if lib.isa() == 0:
        warnings.warn(f"this CPU has neither AVX-512F nor AVX2+FMA+F16C: {slow}", stacklevel=3)
        return None
    return lib


def int8_activations(on: bool, lib=None) -> bool:
    """Whether bf16/fp16 x times 4/2-bit codes takes the int8-activation tile (AVX2 builds; see the module
    docstring) -> the previous setting. AVX-512 builds (and no native library) always compute exactly (False)."""
    lib = lib or extension()
    return bool(lib.set_int8_x(int(on))) if lib is not None else False


def build(extra_cflags: tuple[str, ...] = ()):
    """Compile csrc/ (the kernels and ops.cpp, their operators) for this CPU (or reuse the cached build), load it
    and -> its operator namespace (`torch.ops.dynaexq`); raises on failure.
    extra_cflags (e.g. "-mno-avx512f" to test the AVX2 kernel) get their own build, library and namespace."""
    from torch.utils import cpp_extension
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or Path.home() / ".cache" / "dynaexq" / "torch_extensions"
    variant = _sha(" ".join(extra_cflags)) if extra_cflags else ""
    name, ns = "dynaexq_lowbit" + (f"_{variant}" if variant else ""), "dynaexq" + (f"_{variant}" if variant else "")
    build_dir = Path(root) / f"{name}_{_sha(_cpu_tag())}"  # -march=native: one build per kind of CPU
    build_dir.mkdir(parents=True, exist_ok=True)
    if not (build_dir / f"{name}.so").is_file():  # the first load of a session would sit silently otherwise
        print(f"dynaexq: compiling the low-bit CPU kernel for this CPU (once, ~30 s; cached in {build_dir})",
              file=sys.stderr, flush=True)
    if not hasattr(getattr(torch.ops, ns), "isa"):  # not loaded yet in this process: load() loads it
        cpp_extension.load(name, [str(f) for f in _SRC], build_directory=str(build_dir), is_python_module=False,
                           extra_cflags=["-O3", "-march=native", "-fopenmp", f"-DDYNAEXQ_NS={ns}", *extra_cflags],
                           extra_ldflags=["-fopenmp"])
    lib = getattr(torch.ops, ns)
    _register_fakes(ns)
    if os.environ.get("DYNAEXQ_EXACT_KERNELS", "") not in ("", "0"):
        lib.set_int8_x(0)
    return lib


def _cpu_tag() -> str:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return "generic"
    return "".join(dict.fromkeys(line for line in lines if line.startswith(("model name", "flags"))))


def _sha(text: str) -> str:
    return hashlib.sha1(text.encode()).hexdigest()[:10]


def pack_blob(codes: torch.Tensor, bits: int, group_size: int, scale: torch.Tensor, zero: torch.Tensor,
              ranges: torch.Tensor) -> torch.Tensor:
    """codes [N, K] in [0, 2**bits), scale/zero codes [N, K/G] uint8, ranges [N/16, 3] fp16 (ds, db, bmin)
    -> flat uint8 blob of lowbit.cpp. The reference layout: the kernels build it with `pack_blob_native`."""
    n, k = codes.shape
    p, ng = n // 16, k // group_size
    ck, per = CHUNKS[bits]
    c = codes.to(torch.int64).view(p, 16, ng, group_size // ck, ck).permute(4, 0, 2, 3, 1).contiguous()
    # c: [k in chunk, P, ng, chunk, row]; words: [P, ng, chunk, word (int3/6: A, B, C), row]; code j of a chunk
    # goes to word j // per at bit bits * (j % per): the fields do not overlap, so a sum is their OR
    nw = ck // per
    shifts = (bits * torch.arange(per, dtype=torch.int64)).view(1, per, 1, 1, 1, 1)
    words = (c[:per * nw].view(nw, per, *c.shape[1:]) << shifts).sum(1).permute(1, 2, 3, 0, 4)
    words = (((words + 2**31) % 2**32) - 2**31).to(torch.int32)  # the low 32 bits, as a signed word
    if bits == 3:  # k = 30, 31: low bits at the top of A and C, third bits at the top of B
        words[:, :, :, 0] |= (c[30] & 3) << 30
        words[:, :, :, 1] |= ((c[30] >> 2) << 30) | ((c[31] >> 2) << 31)
        words[:, :, :, 2] |= (c[31] & 3) << 30
    if bits == 6:  # k = 15: its bits 0-1 / 2-3 / 4-5 at the top of A / B / C
        for w in range(3):
            words[:, :, :, w] |= (((c[15] >> (2 * w)) & 3) << 30).to(torch.int32)
    code_bytes = words.view(torch.uint8).reshape(p, ng, -1)
    sz = [t.to(torch.uint8).view(p, 16, ng).transpose(1, 2) for t in (scale, zero)]  # [P, ng, 16 rows]
    records = torch.cat([code_bytes, *sz], 2).reshape(p, -1)
    header = ranges.to(torch.float16).contiguous().view(torch.uint8).view(p, 6)
    return torch.cat([header, records], 1).reshape(-1)  # [P, 6 B + ng records]: as many bytes as stored


def pack_blob_native(qw) -> torch.Tensor:
    """`pack_blob` of a grouped QuantizedWeight, computed by the C++ library from the store's packed bytes
    (no unpacking in torch, and without the GIL: a transition building it does not stall the forward's Python)."""
    n, k = qw.shape
    src = [t.contiguous() for t in (qw.data, qw.scale.to(torch.uint8), qw.zero.to(torch.uint8),
                                    qw.ranges.to(torch.float16).view(torch.uint8))]
    return extension().lowbit_pack(*src, qw.bits, n, k, qw.group_size)


@dataclass(eq=False)
class LowbitCpu:
    bits: int
    shape: tuple[int, int]  # [N, K] of the weight
    group_size: int
    blob: torch.Tensor | None  # fused kernel: uint8 of `pack_blob`; None on the fallback
    packed: torch.Tensor | None = None  # fallback: aten int4-packed codes
    scale_zero: torch.Tensor | None = None  # fallback: [K/G, N, 2] bf16 (s, b + 2**(bits-1) s)
    tensor_data_names = ("blob", "packed", "scale_zero")  # what place() lays into a slot (None ones skipped)

    @classmethod
    def from_weight(cls, qw, fused: bool | None = None) -> "LowbitCpu":
        """A grouped QuantizedWeight (N % 16 == 0, K % G == 0, G a multiple of the chunk, CHUNKS)."""
        n, k = qw.shape
        if fused is None:
            fused = extension() is not None
        elif fused and extension() is None:
            raise RuntimeError("the C++ low-bit kernel is not available (see the warning)")
        if fused:
            return cls(qw.bits, (n, k), qw.group_size, pack_blob_native(qw))
        codes = qw.codes()
        # codes + c (c = 8 - 2**(bits-1)) are centred on aten's offset 8, so the table's offset term b + 2**(bits-1) s
        # (the group's middle) stays small and loses little to bf16
        s, b = qw.group_params()
        c = 8 - (1 << (qw.bits - 1))
        table = torch.stack([s, b + (8 - c) * s], -1).transpose(0, 1).contiguous().to(torch.bfloat16)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu((codes + c).contiguous(), 1)
        return cls(qw.bits, (n, k), qw.group_size, None, packed, table)

    def gemm(self, x: torch.Tensor) -> torch.Tensor:
        """x [M, K] bf16 -> [M, N] bf16 by aten's bf16 GEMM on W^T decoded into bf16 once per call (`lowbit_decode`):
        for a prefill's many rows, where the tile's work is the products, not the bytes. Not the tile's arithmetic:
        each weight s * q + b is rounded to bf16 first (2**-9 of it, far below the codes' own step; the products and
        sums are then exact / fp32 as the tile's). quant/dense.py calls it from LOWBIT_GEMM_ROWS rows. In blocks of
        GEMM_BLOCK weight rows: a vocabulary-wide head is never held decoded whole."""
        n, k = self.shape
        if n <= GEMM_BLOCK:
            return torch.mm(x, _lib.lowbit_decode(self.blob, self.bits, self.group_size, n, k, 0, n))
        y = torch.empty(x.shape[0], n, dtype=x.dtype)
        for n0 in range(0, n, GEMM_BLOCK):
            nn = min(GEMM_BLOCK, n - n0)
            torch.mm(x, _lib.lowbit_decode(self.blob, self.bits, self.group_size, n, k, n0, nn), out=y[:, n0:n0 + nn])
        return y

    def rows(self, idx: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """W[idx] [n, K] in `dtype` (fp32/bf16/fp16), decoded from the resident blob (an embedding's lookup)."""
        n, k = self.shape
        if self.blob is None:  # the aten fallback: its int4-packed codes are not row-addressable here
            raise RuntimeError("row lookup needs the native low-bit kernel (apply_plan refuses such an embedding)")
        return _lib.lowbit_rows(self.blob, idx.reshape(-1).to(torch.int64), self.bits, self.group_size, n, k, dtype)

    @property
    def nbytes(self) -> int:
        held = (self.blob, self.packed, self.scale_zero)
        return sum(t.numel() * t.element_size() for t in held if t is not None)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., K] any float dtype -> [..., N] same dtype."""
        n, k = self.shape
        if x.dim() != 2:
            return self(x.reshape(-1, k)).view(*x.shape[:-1], n)
        if self.blob is None:
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x.to(torch.bfloat16), self.packed, self.group_size,
                                                           self.scale_zero)
            return y.to(x.dtype)
        global calls
        calls += 1
        y = _lib.lowbit_mm(x if x.dtype in _DTYPE_CODE else x.float(), self.blob, self.bits, self.group_size, n)
        return y if y.dtype == x.dtype else y.to(x.dtype)


def _register_fakes(ns: str) -> None:
    """The fake implementations of the namespace's operators (shapes and dtypes only): what torch.compile and
    FakeTensor tracing run instead of the kernels."""
    if ns in _faked:
        return
    _faked.add(ns)
    fake = torch.library.register_fake
    fake(f"{ns}::lowbit_pack")(lambda data, scale, zero, ranges, bits, n, k, g: data.new_empty(
        n // 16 * (6 + k // g * (2 * g * bits + 32))))
    fake(f"{ns}::lowbit_mm")(lambda x, blob, bits, g, n: x.new_empty(x.shape[0], n))
    fake(f"{ns}::lowbit_grouped")(lambda x, counts, ptrs, y, bits, g: None)
    fake(f"{ns}::rowmajor_grouped")(lambda x, counts, ptrs, y, wt: None)
    fake(f"{ns}::lowbit_decode")(lambda blob, bits, g, n, k, n0, nn: blob.new_empty(k, nn, dtype=torch.bfloat16))
    fake(f"{ns}::lowbit_rows")(lambda blob, rows, bits, g, n, k, dtype: blob.new_empty(rows.numel(), k, dtype=dtype))
    fake(f"{ns}::route")(lambda idx, w, hidden, e, token_counts, mass: (
        idx.new_empty(e), idx.new_empty(idx.numel()), hidden.new_empty(idx.numel(), hidden.shape[1])))
    fake(f"{ns}::combine")(lambda idx, order, ys, w: ys.new_empty(idx.shape[0], ys.shape[1]))
    fake(f"{ns}::decode_attention")(lambda q, k, v, lens, scale: q.new_empty(q.shape[0], 1, q.shape[1], v.shape[3]))
    fake(f"{ns}::rms_norm")(lambda x, w, eps, round_first: torch.empty_like(x, memory_format=torch.contiguous_format))
    fake(f"{ns}::qk_rope_cache")(lambda q, k, v, qn, kn, eps, cos, sin, keys, values, rows, pos: torch.empty_like(q))
    fake(f"{ns}::swiglu")(lambda h: h.new_empty(h.shape[0], h.shape[1] // 2))
    fake(f"{ns}::softmax_topk")(lambda logits, k, renorm, dtype: (
        logits.new_empty(logits.shape[0], k, dtype=dtype), logits.new_empty(logits.shape[0], k, dtype=torch.int64)))
    fake(f"{ns}::argmax")(lambda x: x.new_empty(x.shape[0], dtype=torch.int64))
    fake(f"{ns}::fit")(lambda w, a, qmax, iters, grid: (w.new_empty(w.shape[:3]), w.new_empty(w.shape[:3])))


_faked: set[str] = set()
