"""int2/int3 matmuls on the CPU with the weights resident at 2/3 bits per weight.

Fast path: the fused C++ kernel of `csrc/lowbit.cpp` (AVX-512 or AVX2, OpenMP over output rows)
reads the 2/3-bit codes of a private blob (`pack_blob`, layout in the .cpp header), turns each
code into a float in registers and accumulates x @ W^T in fp32; x (bf16/fp16/fp32) is converted
to fp32 once per call and the output is the only allocation. It is JIT-compiled with -march=native
on first use through torch.utils.cpp_extension (needs `ninja` and a C++ compiler) into
$TORCH_EXTENSIONS_DIR or ~/.cache/dynaexq/torch_extensions, then called through ctypes (the GIL
is released during the call).

Fallback (build failure, a CPU without AVX2/FMA/F16C, or DYNAEXQ_NO_CPU_EXT=1; one warning says
so): codes below 4 (int2) or 8 (int3) are valid int4 codes, so the int4-packed weight of
aten._convert_weight_to_int4pack_for_cpu is kept with its always-zero bits squeezed out, in int64
words, and rebuilt per call (4 tensor ops for int2, 16 for int3) for aten's int4 kernel:
  int2: nibble bits 0-1 used (mask 0x3333...). Word halves A, B -> one word A | B << 2.
  int3: the low two bits as in int2, plus the third bit (0x4444...) of four word quarters folded into
        one word. 2/4 + 1/4 of the int4 bytes = exactly 3 bits per weight.
The rebuilt nibbles are q + c (c = 6 for int2, 4 for int3: one carry-free add per word) so that the
offset term s * (8 - c - z) of the kernel's bf16 table stays small and loses little to bf16.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import sys
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

_SRC = Path(__file__).parent / "csrc" / "lowbit.cpp"
_DTYPE_CODE = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}  # as in lowbit.cpp
_M2 = 0x3333333333333333  # the low two bits of every nibble
_M1 = 0x1111111111111111  # the lowest bit of every nibble
_SHIFT = {2: (6, 0x6666666666666666), 3: (4, 0x4444444444444444)}  # c, and c in every nibble

_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_loaded = False


def extension() -> ctypes.CDLL | None:
    """The compiled kernel library (built on first call), or None after one warning."""
    global _lib, _loaded
    if not _loaded:
        with _lock:
            if not _loaded:
                _lib = _load()
                _loaded = True
    return _lib


def _load() -> ctypes.CDLL | None:
    slow = "int2/int3 CPU matmuls use the pure-torch fallback (2-7x slower)"
    if os.environ.get("DYNAEXQ_NO_CPU_EXT", "") not in ("", "0"):
        warnings.warn(f"DYNAEXQ_NO_CPU_EXT is set: {slow}", stacklevel=3)
        return None
    try:
        lib = build()
    except Exception as e:  # no compiler, no ninja, a compile error...
        warnings.warn(f"could not build the int2/int3 CPU kernel ({type(e).__name__}: {e}); {slow}", stacklevel=3)
        return None
    if lib.dynaexq_lowbit_isa() == 0:
        warnings.warn(f"this CPU has neither AVX-512F nor AVX2+FMA+F16C: {slow}", stacklevel=3)
        return None
    return lib


def build(extra_cflags: tuple[str, ...] = ()) -> ctypes.CDLL:
    """Compile csrc/lowbit.cpp for this CPU (or reuse the cached build) and load it; raises on failure.
    extra_cflags (e.g. "-mno-avx512f" to test the AVX2 kernel) get their own build and library name."""
    from torch.utils import cpp_extension
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or Path.home() / ".cache" / "dynaexq" / "torch_extensions"
    name = "dynaexq_lowbit" + (f"_{_sha(' '.join(extra_cflags))}" if extra_cflags else "")
    build_dir = Path(root) / f"{name}_{_sha(_cpu_tag())}"  # -march=native: one build per kind of CPU
    build_dir.mkdir(parents=True, exist_ok=True)
    if not (build_dir / f"{name}.so").is_file():  # the first load of a session would sit silently otherwise
        print(f"dynaexq: compiling the int2/int3 CPU kernel for this CPU (once, ~20 s; cached in {build_dir})",
              file=sys.stderr, flush=True)
    path = cpp_extension.load(name, [str(_SRC)], build_directory=str(build_dir), is_python_module=False,
                              extra_cflags=["-O3", "-march=native", "-fopenmp", *extra_cflags],
                              extra_ldflags=["-fopenmp"])
    lib = ctypes.CDLL(path)
    p, i = ctypes.c_void_p, ctypes.c_int
    lib.dynaexq_lowbit_mm.argtypes = [i, i, i, i, i, p, i, p, p, i]
    lib.dynaexq_lowbit_mm.restype = i
    return lib


def _cpu_tag() -> str:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return "generic"
    return "".join(dict.fromkeys(line for line in lines if line.startswith(("model name", "flags"))))


def _sha(text: str) -> str:
    return hashlib.sha1(text.encode()).hexdigest()[:10]


def pack_blob(codes: torch.Tensor, bits: int, group_size: int, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """codes [N, K] in [0, 2**bits), scale/zero [N, K/G] fp16 -> flat uint8 blob of lowbit.cpp."""
    n, k = codes.shape
    p, ng, ck = n // 16, k // group_size, 16 if bits == 2 else 32  # ck: k per chunk
    per = 16 if bits == 2 else 10  # codes per 32-bit word, `bits` apart
    c = codes.to(torch.int32).view(p, 16, ng, group_size // ck, ck).permute(4, 0, 2, 3, 1).contiguous()
    # c: [k in chunk, P, ng, chunk, row]; words: [P, ng, chunk, word (int2: 1; int3: A, B, C), row]
    words = torch.zeros(p, ng, group_size // ck, ck // per, 16, dtype=torch.int32)
    for j in range(per * words.shape[3]):
        words[:, :, :, j // per] |= c[j] << bits * (j % per)
    if bits == 3:  # k = 30, 31: low bits at the top of A and C, third bits at the top of B
        words[:, :, :, 0] |= (c[30] & 3) << 30
        words[:, :, :, 1] |= ((c[30] >> 2) << 30) | ((c[31] >> 2) << 31)
        words[:, :, :, 2] |= (c[31] & 3) << 30
    code_bytes = words.view(torch.uint8).reshape(p, ng, -1)
    sz = [t.to(torch.float16).view(p, 16, ng).transpose(1, 2).contiguous().view(torch.uint8) for t in (scale, zero)]
    return torch.cat([code_bytes, *sz], 2).reshape(-1)  # [P, ng, chunk x word x row x 4 B + 32 B s + 32 B z]


@dataclass(eq=False)
class LowbitCpu:
    bits: int
    shape: tuple[int, int]  # [N, K] of the weight
    group_size: int
    blob: torch.Tensor | None  # fused kernel: uint8 of `pack_blob`; None on the fallback
    low: torch.Tensor | None = None  # fallback: int64 words, low two bits of each int4 nibble
    high: torch.Tensor | None = None  # fallback, int3: third bits, four int4 words folded into one
    int4_shape: torch.Size | None = None  # fallback: shape of the int4-packed tensor
    scale_zero: torch.Tensor | None = None  # fallback: [K/G, N, 2] bf16 (s, s*(8 - c - z)), see above

    @classmethod
    def from_codes(cls, codes: torch.Tensor, bits: int, group_size: int, scale: torch.Tensor,
                   zero: torch.Tensor, fused: bool | None = None) -> "LowbitCpu":
        """codes [N, K] int in [0, 2**bits); scale, zero [N, K/G] (W = (codes - zero) * scale).
        Needs N % 16 == 0, K % G == 0, G % 32 == 0. fused=None: the C++ kernel if it builds."""
        n, k = codes.shape
        assert bits in (2, 3) and n % 16 == 0 and k % group_size == 0 and group_size % 32 == 0, (bits, n, k, group_size)
        if fused is None:
            fused = extension() is not None
        elif fused and extension() is None:
            raise RuntimeError("the C++ int2/int3 kernel is not available (see the warning)")
        if fused:
            return cls(bits, (n, k), group_size, pack_blob(codes, bits, group_size, scale, zero))
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32).contiguous(), 1)
        w = packed.reshape(-1).view(torch.int64)
        h, q = w.numel() // 2, w.numel() // 4
        low = (w[:h] & _M2) | ((w[h:] & _M2) << 2)
        high = None
        if bits == 3:
            hb = (w >> 2) & _M1
            high = hb[:q] | (hb[q:2 * q] << 1) | (hb[2 * q:3 * q] << 2) | (hb[3 * q:] << 3)
        s, z = scale.float(), zero.float()
        table = torch.stack([s, s * (8 - _SHIFT[bits][0] - z)], -1).transpose(0, 1).contiguous().to(torch.bfloat16)
        return cls(bits, (n, k), group_size, None, low.contiguous(), high, packed.shape, table)

    @property
    def nbytes(self) -> int:
        held = (self.blob, self.low, self.high, self.scale_zero)
        return sum(t.numel() * t.element_size() for t in held if t is not None)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., K] any float dtype -> [..., N] same dtype."""
        n, k = self.shape
        if x.dim() != 2:
            return self(x.reshape(-1, k)).view(*x.shape[:-1], n)
        if self.blob is None:
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x.to(torch.bfloat16), self._int4pack(),
                                                           self.group_size, self.scale_zero)
            return y.to(x.dtype)
        xc = (x if x.dtype in _DTYPE_CODE else x.float()).contiguous()
        m = xc.shape[0]
        y = torch.empty(m, n, dtype=xc.dtype)
        if m:
            _lib.dynaexq_lowbit_mm(self.bits, self.group_size, m, n, k, xc.data_ptr(), _DTYPE_CODE[xc.dtype],
                                   self.blob.data_ptr(), y.data_ptr(), torch.get_num_threads())
        return y if y.dtype == x.dtype else y.to(x.dtype)

    def _int4pack(self) -> torch.Tensor:
        """Fallback: rebuild the int4-packed bytes (codes + c) from the squeezed words."""
        h = self.low.numel()
        out = torch.empty(2 * h, dtype=torch.int64)
        torch.bitwise_and(self.low, _M2, out=out[:h])
        torch.bitwise_right_shift(self.low, 2, out=out[h:])
        out[h:].bitwise_and_(_M2)
        if self.high is not None:
            q = self.high.numel()
            for i in range(4):
                out[i * q:(i + 1) * q] |= ((self.high >> i) & _M1) << 2
        out.add_(_SHIFT[self.bits][1])  # nibbles q + c <= 11: no carry
        return out.view(torch.uint8).view(self.int4_shape)
