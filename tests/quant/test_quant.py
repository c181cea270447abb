"""Packing, quantization and kernels, each held to an independent reference."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dynaexq.quant.kernels import prepare
from dynaexq.quant.packing import pack, packed_nbytes, unpack
from dynaexq.quant.precision import Precision
from dynaexq.quant.formats import FORMATS
from dynaexq.quant.quantize import dequantize, expected_nbytes, quantize, quantize_many, relative_error
from dynaexq.errors import UserError

INT = [Precision.INT8, Precision.INT6, Precision.INT4, Precision.INT3, Precision.INT2]


@settings(max_examples=60, deadline=None)
@given(bits=st.sampled_from([2, 3, 4, 8]), n=st.integers(1, 300), seed=st.integers(0, 2**16))
def test_pack_unpack_roundtrip_and_exact_size(bits, n, seed):
    codes = torch.randint(0, 1 << bits, (n,), generator=torch.Generator().manual_seed(seed))
    packed = pack(codes, bits)
    assert packed.dtype == torch.uint8 and packed.numel() == packed_nbytes(n, bits)
    assert packed.numel() == -(-n * bits // 8) if bits != 3 else packed.numel() == 3 * -(-n // 8)
    assert torch.equal(unpack(packed, bits, n), codes.to(torch.int32))


def test_int3_packs_eight_codes_in_three_bytes_little_endian():
    codes = torch.tensor([1, 2, 3, 4, 5, 6, 7, 0])
    word = sum(int(c) << (3 * i) for i, c in enumerate(codes))
    assert pack(codes, 3).tolist() == [word & 0xFF, (word >> 8) & 0xFF, (word >> 16) & 0xFF]


def _weights(kind, shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    if kind == "normal":
        return torch.randn(shape, generator=g)
    u = torch.rand(shape, generator=g).clamp(1e-6, 1 - 1e-6)  # Student-t-like heavy tails via inverse CDF of Cauchy
    return torch.tan(torch.pi * (u - 0.5)).clamp(-50, 50) * 0.1


def _moment(k, seed=0, n=4096):
    """A realistic input second moment: correlated inputs with a few loud channels (as LLM activations)."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, k, generator=g) @ (torch.eye(k) + 0.3 * torch.randn(k, k, generator=g) / k ** 0.5)
    X *= torch.rand(k, generator=g) * 2 + (torch.rand(k, generator=g) > 0.98) * 8
    return X, X.T @ X / n


@pytest.mark.parametrize("kind", ["normal", "heavy"])
@pytest.mark.parametrize("matrix", ["gate_up", "down"])
def test_error_grows_as_bits_drop_and_matches_dequantize(kind, matrix):
    w = _weights(kind, (64, 256))
    errs = []
    for p in INT:
        qw = quantize(w, p, matrix)
        assert qw.nbytes == expected_nbytes(p, matrix, (64, 256))
        ref = float((w.double() - dequantize(qw, torch.float64)).norm() / w.double().norm())
        assert relative_error(w, qw) == pytest.approx(ref)
        errs.append(ref)
    assert errs == sorted(errs) and errs[0] < 0.02 and errs[-1] < 0.6, errs


@pytest.mark.parametrize("p", INT[1:])
def test_gptq_lowers_the_output_error_the_layer_sees(p):
    """Against H = E[x x^T] of its inputs GPTQ's output error ||(W - W') x|| (measured here directly on the
    inputs, in float64) is well below round-to-nearest's, and the formula the store records agrees."""
    w = _weights("heavy", (128, 256), seed=1)
    X, H = _moment(256)
    rtn, gptq = quantize(w, p, "gate_up"), quantize(w, p, "gate_up", H)

    def out_err(qw):
        d = X.double() @ (w.double() - dequantize(qw, torch.float64)).T
        return float(d.norm() / (X.double() @ w.double().T).norm())

    assert out_err(gptq) < 0.85 * out_err(rtn), (out_err(gptq), out_err(rtn))
    assert relative_error(w, gptq, H) == pytest.approx(out_err(gptq), rel=1e-6)


@pytest.mark.parametrize("g, qmax", [(32, 3), (32, 7), (64, 15)])
def test_the_native_group_fit_equals_the_torch_fit_but_at_rounding_boundaries(g, qmax, ext):
    """csrc/fit.cpp against quantize._fit_torch on normal and heavy-tailed groups at many scales, with nonuniform
    weights a: nearly every group's (s, b) agrees to fp32 precision (sums in another order can move a code
    across a rounding boundary, and the alternating fit from there), and the total weighted error is the same."""
    from dynaexq.quant import quantize as q
    gen = torch.Generator().manual_seed(g + qmax)
    w = torch.randn(2, 400, 3, g, generator=gen) * torch.rand(2, 400, 3, 1, generator=gen).pow(4)
    w[1] = torch.distributions.StudentT(2.0).sample((400, 3, g)) * 0.01
    a = torch.rand(2, 1, 3, g, generator=gen).pow(3) + 1e-3
    (s1, b1), (s0, b0) = q._fit(w, a, qmax), q._fit_torch(w, a, qmax)
    assert s1.shape == s0.shape == (2, 400, 3, 1)

    def err(s, b):
        codes = torch.round((w - b) / s).clamp(0, qmax)
        return (a * (w - s * codes - b) ** 2).sum(-1).double()

    same = torch.isclose(s1, s0, rtol=1e-4, atol=0) & torch.isclose(b1, b0, rtol=1e-4, atol=1e-6 * s0.abs().max())
    assert float(same.float().mean()) > 0.97, float(same.float().mean())
    assert float(err(s1, b1).sum()) == pytest.approx(float(err(s0, b0).sum()), rel=1e-3)


def test_a_batch_quantizes_each_matrix_as_alone_and_dead_inputs_stay_finite():
    W = torch.stack([_weights("normal", (32, 128), seed=s) for s in range(3)])
    H = torch.stack([_moment(128, seed=s)[1] for s in range(3)])
    H[1, :, 5] = H[1, 5, :] = 0  # an input that never fires
    many = quantize_many(W, Precision.INT3, "down", H)
    for i in range(3):
        alone = quantize(W[i], Precision.INT3, "down", H[i])
        assert all(torch.equal(a, b) for a, b in zip(many[i].tensors().values(), alone.tensors().values()))
        assert torch.isfinite(dequantize(many[i])).all()


def test_codes_in_range_and_grouped_metadata():
    qw = quantize(torch.randn(40, 128), Precision.INT3)
    assert int(qw.codes().min()) >= 0 and int(qw.codes().max()) <= 7 and qw.group_size == 32
    assert qw.scale.dtype == qw.zero.dtype == torch.uint8 and qw.scale.shape == (40, 4)
    assert qw.ranges.dtype == torch.float16 and qw.ranges.shape == (3, 3)  # 40 rows: 3 tiles of 16
    f = FORMATS[Precision.INT2]
    assert (f.gate_up.bits, f.down.bits) == (2, 3)  # int2 keeps the sensitive down projection at 3 bits


def test_int8_is_per_channel():
    qw = quantize(torch.randn(16, 96), Precision.INT8)
    assert qw.group_size == 96 and qw.scale.shape == (16, 1)


def test_unknown_precision_is_a_user_error():
    with pytest.raises(UserError, match="valid precisions are: fp32, bf16, fp16, int8, int6, int4, int3, int2"):
        Precision.parse("int5")


SHAPES = [(128, 256), (64, 64), (48, 128), (32, 96), (20, 70)]  # the last three are odd for some kernels


@pytest.mark.filterwarnings("ignore:.*no fast cpu kernel.*")
@pytest.mark.parametrize("p", [Precision.BF16, Precision.FP16, *INT])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("matrix", ["gate_up", "down"])
def test_cpu_kernel_matches_float64_dequantize_reference(p, shape, matrix):
    w = _weights("heavy", shape, seed=2)
    qw = quantize(w, p, matrix, _moment(shape[1])[1])
    x = torch.randn(5, shape[1], generator=torch.Generator().manual_seed(3))
    want = x.double() @ dequantize(qw, torch.float64).T  # independent: dequantize, then matmul in float64
    fast = prepare(qw, "cpu")
    got = fast(x)
    assert got.dtype == x.dtype and got.shape == (5, shape[0])
    rel = float((got.double() - want).norm() / want.norm())
    assert rel < (2e-2 if p in (Precision.INT8, Precision.BF16, Precision.FP16) else 1e-5), rel
    if p.is_float or p is Precision.INT8:
        assert fast.nbytes == qw.nbytes  # resident bytes are the stored bytes


def test_odd_shape_falls_back_with_a_warning():
    qw = quantize(torch.randn(20, 70), Precision.INT4)
    with pytest.warns(UserWarning, match="no fast cpu kernel"):
        prepare(qw, "cpu")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("p", INT)
def test_cuda_kernel_matches_float64_dequantize_reference(p):
    w = _weights("heavy", (256, 512), seed=4)
    qw = quantize(w, p, "gate_up", _moment(512)[1])
    x = torch.randn(8, 512)
    want = x.double() @ dequantize(qw, torch.float64).T
    got = prepare(qw, "cuda")(x.cuda()).cpu()
    assert float((got.double() - want).norm() / want.norm()) < 2e-2
