"""Grouped 2/3/4/6-bit CPU matmuls (`dynaexq.quant.lowbit_cpu`) held to the float64 dequantize-then-matmul
reference: the fused C++ kernel (AVX-512 here, and its AVX2 variant), aten's int4 fallback, resident bytes,
and calls from several threads at once."""
import threading
from pathlib import Path
import warnings

import pytest
import torch

from dynaexq.quant import kernels, lowbit_cpu
from dynaexq.quant.packing import pack
from dynaexq.quant.precision import Precision
from dynaexq.quant.quantize import QuantizedWeight, dequantize

TOL = 0.03
# bf16 x on an AVX2 build is rounded to int8 per 32 inputs (the int8-activation tile): against the heavy-tailed
# weights here (Student-t, 2 degrees of freedom: a few weights 100x the rest) that moves the product by 1-3 %
# (median) and up to 10 % (worst of 300 random x, int2 256 x 768); test_avx2_int8_activation_tile holds the tile
# to an independent rounding of x within 2**-8
TOL_INT8_X = 0.12
SHAPES = [(16, 64, 64), (48, 128, 32), (96, 512, 64), (256, 768, 128)]  # N, K, G
BITS = (2, 3, 4, 6)
MS = (1, 3, 8, 17)


def _weight(n, k, dist, seed):
    g = torch.Generator().manual_seed(seed)
    if dist == "normal":
        return torch.randn(n, k, generator=g)
    return torch.distributions.StudentT(2.0).sample((n, k)) * 0.1  # heavy tails


def _rel(y, ref):
    return float((y.double() - ref.double()).norm() / ref.double().norm())


@pytest.fixture(scope="module")
def weights():
    """(bits, dist, shape) -> QuantizedWeight, quantized once."""
    out = {}
    for bits in BITS:
        for dist in ("normal", "student_t"):
            for i, (n, k, g) in enumerate(SHAPES):
                w = _weight(n, k, dist, 100 * bits + i)
                out[bits, dist, (n, k, g)] = _grouped(w, bits, g)
    return out


def _grouped(w, bits, g):
    """w quantized in the grouped format with `bits` and groups of g (whatever precision normally uses them)."""
    from dynaexq.quant.quantize import _gptq

    codes, sc, oc, ranges = _gptq(w[None].float(), bits, g, None)
    return QuantizedWeight(Precision.INT4, tuple(w.shape), bits, g, pack(codes[0], bits), sc[0], oc[0], ranges[0])


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("dist", ["normal", "student_t"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_fused_matches_reference(ext, weights, bits, dist, shape):
    qw = weights[bits, dist, shape]
    fast, ref = kernels.prepare(qw, "cpu"), kernels.prepare(qw, "reference")
    assert isinstance(fast, lowbit_cpu.LowbitCpu) and fast.blob is not None
    for m in MS:
        x = torch.randn(m, shape[1], generator=torch.Generator().manual_seed(m))
        want = ref(x.double())
        for dtype in (torch.bfloat16, torch.float32):
            y = fast(x.to(dtype))
            assert y.dtype == dtype and y.shape == (m, shape[0])
            tol = TOL_INT8_X if dtype == torch.bfloat16 and bits in (2, 4) else TOL
            assert _rel(y, want) <= tol, (m, dtype, _rel(y, want))
        assert _rel(fast(x), want) < 1e-5  # fp32 in, fp32 accumulate: only summation order differs


@pytest.mark.parametrize("bits", (2, 4))
def test_the_bf16_pair_path_equals_float64_up_to_the_output_rounding(ext, weights, bits):
    """bf16 x with 4/2-bit codes take the vdpbf16ps tile where the CPU has AVX512-BF16: the products are exact, so
    against float64 of the same bf16 x only fp32 accumulation and the bf16 output rounding (2**-9) remain;
    fp32 x takes the fp32 tile (the other test) on the same blob."""
    if not ext.bf16_dot():
        pytest.skip("this CPU (or compiler) has no AVX512-BF16: bf16 x takes the fp32 tile")
    for dist in ("normal", "student_t"):
        for shape in SHAPES:
            qw = weights[bits, dist, shape]
            fast, ref = kernels.prepare(qw, "cpu"), kernels.prepare(qw, "reference")
            for m in (1, 2, 3, 8, 17):
                x = (torch.randn(m, shape[1], generator=torch.Generator().manual_seed(m)) * 3).to(torch.bfloat16)
                want = ref(x.double())
                y = fast(x)
                err = (y.double() - want).abs()
                assert float((err / want.abs().clamp_min(1e-3 * float(want.abs().max()))).max()) < 2 ** -8, (shape, m)
                # the bf16 result is the fp32 tile's result rounded (the same sums, another order)
                assert _rel(y, fast(x.float()).to(torch.bfloat16)) < 2 ** -8


def test_the_prefill_gemm_equals_float64_of_the_weights_rounded_to_bf16(ext, weights, monkeypatch):
    """LowbitCpu.gemm (W^T decoded into bf16 by the kernel, then aten's bf16 GEMM) against float64 of the stored
    weights rounded to bf16 here (torch's rounding, not the kernel's): within the bf16 output rounding; in blocks
    of weight rows (a small block here) the same values; a block that is not rows of the weight is refused."""
    monkeypatch.setattr(lowbit_cpu, "GEMM_BLOCK", 32)
    for (bits, dist, shape), qw in weights.items():
        n, k, g = shape
        fast = kernels.prepare(qw, "cpu")
        w = dequantize(qw, torch.float64).to(torch.bfloat16).double()
        x = (torch.randn(70, k, generator=torch.Generator().manual_seed(bits)) * 3).to(torch.bfloat16)
        want = x.double() @ w.T
        y = fast.gemm(x)
        assert y.dtype == torch.bfloat16 and y.shape == (70, n)
        err = (y.double() - want).abs() / want.abs().clamp_min(1e-3 * float(want.abs().max()))
        assert float(err.max()) < 2 ** -7, (bits, dist, shape, float(err.max()))
    with pytest.raises(RuntimeError, match="multiples of 16"):
        ext.lowbit_decode(fast.blob, qw.bits, qw.group_size, n, k, 8, 16)


def test_fallback_gives_same_results(ext, weights, monkeypatch):
    cases = []  # (qw, x, fused output), computed before the extension is switched off
    g = torch.Generator().manual_seed(0)  # inputs independent of what ran before (the global RNG's state)
    was = lowbit_cpu.int8_activations(False, ext)  # the fused kernel's exact tiles: the fallback is exact too
    for (bits, dist, shape), qw in weights.items():
        fast = kernels.prepare(qw, "cpu")
        for m in (1, 8):
            x = torch.randn(m, shape[1], generator=g).to(torch.bfloat16)
            cases.append((qw, fast.nbytes, x, fast(x)))
    lowbit_cpu.int8_activations(was, ext)
    monkeypatch.setattr(lowbit_cpu, "_loaded", False)
    monkeypatch.setattr(lowbit_cpu, "_lib", None)
    monkeypatch.setenv("DYNAEXQ_NO_CPU_EXT", "1")
    with pytest.warns(UserWarning, match="DYNAEXQ_NO_CPU_EXT"):
        assert lowbit_cpu.extension() is None
    for qw, nbytes, x, y_fast in cases:
        if qw.bits > 4:  # aten's int4 kernel cannot hold the codes: a per-call dequantize, and a warning says so
            with pytest.warns(UserWarning, match="cannot hold 6-bit codes"):
                slow = kernels.prepare(qw, "cpu")
            assert isinstance(slow, kernels.DequantFallback) and slow.nbytes == qw.nbytes
        else:
            slow = kernels.prepare(qw, "cpu")
            assert slow.blob is None and slow.packed is not None  # aten int4: 4 bits resident whatever the bits
        y_slow, want = slow(x), kernels.prepare(qw, "reference")(x.double())
        assert _rel(y_slow, want) <= TOL and _rel(y_slow, y_fast) <= TOL, (qw.precision, qw.shape, x.shape)


@pytest.mark.parametrize("bits", BITS)
def test_resident_bytes_are_true_bits(ext, bits):
    n, k, g = 64, 256, 32
    qw = _grouped(torch.randn(n, k), bits, g)
    p = kernels.prepare(qw, "cpu")
    # codes + an 8-bit scale and offset code per group and row + three fp16 ranges per 16 rows: the stored bytes
    assert p.nbytes == p.blob.numel() == n * k * bits // 8 + n * (k // g) * 2 + (n // 16) * 6 == qw.nbytes


def test_the_native_pack_equals_the_python_reference_byte_for_byte(ext, weights):
    for (bits, dist, shape), qw in weights.items():
        n, k, g = shape
        want = lowbit_cpu.pack_blob(qw.codes().view(n, k), bits, g, qw.scale, qw.zero, qw.ranges)
        assert torch.equal(lowbit_cpu.pack_blob_native(qw), want), (bits, dist, shape)


def test_avx2_kernel_matches_reference(weights, avx2):
    """The AVX2 build of the same source (what a CPU without AVX-512 gets)."""
    lib = avx2
    for (bits, dist, shape), qw in weights.items():
        n, k, g = shape
        blob = lowbit_cpu.pack_blob(qw.codes().view(n, k), bits, g, qw.scale, qw.zero, qw.ranges)
        for m in MS:
            x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)).to(torch.bfloat16)
            y = lib.lowbit_mm(x, blob, bits, g, n)
            tol = TOL_INT8_X if bits in (2, 4) else TOL  # bf16 x: the int8-activation tile
            assert _rel(y, kernels.prepare(qw, "reference")(x.double())) <= tol, (bits, dist, shape, m)


def _int8_rows(x: torch.Tensor, g: int) -> torch.Tensor:
    """x [m, K] as the int8-activation tile sees it: each block of g inputs rounded to int8 against its max
    (fp32 arithmetic, as the kernel's), returned as float64 values."""
    xg = x.float().view(x.shape[0], -1, g)
    d = xg.abs().amax(-1, keepdim=True) / 127
    q = torch.where(d > 0, torch.round(xg / torch.where(d > 0, d, 1)), 0)  # torch.round: half to even
    return (q.double() * d.double()).view(x.shape)


def _centred_terms(qw):
    """W = S * Q + B (quantize.dequantize's terms) -> (S * (Q - mid), B + mid * S), float64 [N, K] each, with
    mid = 2**(bits-1): the tile multiplies the rounded x by the first term and the exact x by the second."""
    n, k = qw.shape
    r = qw.ranges.double().repeat_interleave(16, 0)[:n]
    s = (r[:, :1] * qw.scale.double()).repeat_interleave(qw.group_size, 1)[:, :k]
    b = (r[:, 2:] + r[:, 1:2] * qw.zero.double()).repeat_interleave(qw.group_size, 1)[:, :k]
    mid = 2 ** (qw.bits - 1)
    return s * (qw.codes().view(n, k).double() - mid), b + mid * s


@pytest.mark.parametrize("bits", (2, 4))
def test_avx2_int8_activation_tile(weights, avx2, bits):
    """bf16 x times 4/2-bit codes (the AVX2 build's int8-activation tile) equals, up to fp32 accumulation and the
    bf16 output rounding, float64 of x rounded to int8 per block of 32 (rounded independently here) times the
    centred codes' term, plus the exact x times the offsets' term; it stays within TOL_INT8_X of the exact product;
    switched off, the exact fp32 tile's result; fp32 x is never rounded; a row's result does not depend on the
    other rows of the call."""
    lib = avx2
    was = lowbit_cpu.int8_activations(True, lib)
    try:
        for (b, dist, shape), qw in weights.items():
            if b != bits:
                continue
            n, k, g = shape
            blob = lowbit_cpu.pack_blob(qw.codes().view(n, k), bits, g, qw.scale, qw.zero, qw.ranges)
            sq, off = _centred_terms(qw)
            assert torch.allclose(sq + off, dequantize(qw, torch.float64))
            for m in (1, 2, 5, 17):
                x = (torch.randn(m, k, generator=torch.Generator().manual_seed(m)) * 3).to(torch.bfloat16)
                x[:, :g] *= 50  # one loud group: its rounding must not reach the others

                def run(xx, on):
                    lowbit_cpu.int8_activations(on, lib)
                    return lib.lowbit_mm(xx, blob, bits, g, n)

                y = run(x, True)
                want = _int8_rows(x, 32) @ sq.T + x.double() @ off.T
                exact = x.double() @ (sq + off).T
                err = (y.double() - want).abs() / want.abs().clamp_min(1e-3 * float(want.abs().max()))
                assert float(err.max()) < 2 ** -8, (shape, m, float(err.max()))
                assert _rel(y, exact) <= TOL_INT8_X, (shape, m, _rel(y, exact))
                y_exact = run(x, False)
                assert _rel(y_exact, exact) < 2 ** -8 and not torch.equal(y_exact, y), (shape, m)
                assert _rel(run(x.float(), True), exact) < 1e-5  # fp32 x: the fp32 tile
                if m > 1:  # each row's result is its own, whatever else shares the call (a batch's other rows)
                    assert torch.equal(run(x[m // 2:m // 2 + 1].clone(), True), y[m // 2:m // 2 + 1])
    finally:
        lowbit_cpu.int8_activations(was, lib)


def test_concurrent_calls(ext, weights):
    qw = weights[3, "normal", (256, 768, 128)]
    p = kernels.prepare(qw, "cpu")
    xs = [torch.randn(m, 768, dtype=torch.bfloat16) for m in (1, 8, 17, 70)]  # 70: two row blocks
    want = [p(x) for x in xs]
    errors = []

    def work():
        for _ in range(20):
            for x, w in zip(xs, want):
                if not torch.equal(p(x), w):
                    errors.append("mismatch")

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors


def test_build_failure_warns_and_falls_back(monkeypatch):
    monkeypatch.setattr(lowbit_cpu, "_loaded", False)
    monkeypatch.setattr(lowbit_cpu, "_lib", None)
    monkeypatch.delenv("DYNAEXQ_NO_CPU_EXT", raising=False)
    monkeypatch.setattr(lowbit_cpu, "build", lambda *a: (_ for _ in ()).throw(RuntimeError("no compiler")))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert lowbit_cpu.extension() is None
        assert lowbit_cpu.extension() is None
    assert len(caught) == 1 and "no compiler" in str(caught[0].message)
    qw = _grouped(torch.randn(32, 64), 2, 32)
    p = lowbit_cpu.LowbitCpu.from_weight(qw)
    assert p.blob is None
    x = torch.randn(2, 64)
    assert _rel(p(x), kernels.prepare(qw, "reference")(x.double())) <= TOL


def test_the_first_build_says_it_is_compiling_and_a_cached_one_is_silent(monkeypatch, tmp_path, capsys):
    from torch.utils import cpp_extension

    built = []

    class Loaded(Exception):
        pass

    def fake_load(name, sources, build_directory, **kw):  # what cpp_extension.load leaves behind: the library
        built.append(name)
        (Path(build_directory) / f"{name}.so").write_bytes(b"")
        raise Loaded  # (an empty file registers no operators: stop before build() looks them up)

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    monkeypatch.setattr(cpp_extension, "load", fake_load)
    said = []
    for _ in range(2):
        with pytest.raises(Loaded):
            lowbit_cpu.build(("-DDYNAEXQ_NEVER_LOADED",))  # a namespace no other test loads
        said.append(capsys.readouterr().err)
    assert "compiling the low-bit CPU kernel" in said[0] and said[1] == "" and len(built) == 2
