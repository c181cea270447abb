"""Packing, quantization and kernels, each held to an independent reference."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dynaexq.quant.kernels import prepare
from dynaexq.quant.packing import pack, packed_nbytes, unpack
from dynaexq.quant.precision import Precision
from dynaexq.quant.quantize import dequantize, expected_nbytes, quantize, relative_error
from dynaexq.errors import UserError

INT = [Precision.INT8, Precision.INT4, Precision.INT3, Precision.INT2]


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


@pytest.mark.parametrize("kind", ["normal", "heavy"])
def test_error_grows_as_bits_drop_and_matches_dequantize(kind):
    w = _weights(kind, (64, 256))
    errs = []
    for p in INT:
        qw = quantize(w, p)
        assert qw.nbytes == expected_nbytes(p, (64, 256), 64)
        ref = float((w.double() - dequantize(qw, torch.float64)).norm() / w.double().norm())
        assert relative_error(w, qw) == pytest.approx(ref)
        errs.append(ref)
    assert errs == sorted(errs) and errs[0] < 0.02 and errs[-1] < 0.6, errs


@pytest.mark.parametrize("p", INT[1:])
@pytest.mark.parametrize("refine", ["lsq", "hqq"])
def test_refinement_never_worse_than_round_to_nearest_and_helps_heavy_tails(p, refine):
    w = _weights("heavy", (128, 256), seed=1)
    rtn, ref = relative_error(w, quantize(w, p, refine="none")), relative_error(w, quantize(w, p, refine=refine))
    assert ref <= rtn + 1e-9
    if refine == "lsq":
        assert ref < 0.9 * rtn


def test_codes_in_range_and_fp16_metadata():
    qw = quantize(torch.randn(32, 128), Precision.INT3)
    assert int(qw.codes().min()) >= 0 and int(qw.codes().max()) <= 7
    assert qw.scale.dtype == torch.float16 and qw.scale.shape == (32, 2) and qw.group_size == 64


def test_int8_is_per_channel():
    qw = quantize(torch.randn(16, 96), Precision.INT8)
    assert qw.group_size == 96 and qw.scale.shape == (16, 1)


def test_unknown_precision_is_a_user_error():
    with pytest.raises(UserError, match="valid precisions are: fp32, bf16, fp16, int8, int4, int3, int2"):
        Precision.parse("int5")


SHAPES = [(128, 256), (64, 64), (48, 128), (32, 96), (20, 70)]  # the last three are odd for some kernels


@pytest.mark.filterwarnings("ignore:.*no fast cpu kernel.*")
@pytest.mark.parametrize("p", [Precision.BF16, Precision.FP16, *INT])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("kind", ["normal", "heavy"])
def test_cpu_kernel_matches_float64_dequantize_reference(p, shape, kind):
    w = _weights(kind, shape, seed=2)
    qw = quantize(w, p)
    x = torch.randn(5, shape[1], generator=torch.Generator().manual_seed(3))
    want = x.double() @ dequantize(qw, torch.float64).T  # independent: dequantize, then matmul in float64
    fast = prepare(qw, "cpu")
    got = fast(x)
    assert got.dtype == x.dtype and got.shape == (5, shape[0])
    rel = float((got.double() - want).norm() / want.norm())
    assert rel < 2e-2, rel
    assert fast.nbytes == qw.nbytes  # resident bytes are the stored bytes


@pytest.mark.parametrize("m", [1, 8, 33])
def test_int4_cpu_kernel_decode_shapes(m):
    w = torch.randn(256, 512)
    qw = quantize(w, Precision.INT4)
    x = torch.randn(m, 512).to(torch.bfloat16)
    want = x.double() @ dequantize(qw, torch.float64).T
    rel = float((prepare(qw, "cpu")(x).double() - want).norm() / want.norm())
    assert rel < 1e-2


def test_odd_shape_falls_back_with_a_warning():
    qw = quantize(torch.randn(20, 70), Precision.INT4)
    with pytest.warns(UserWarning, match="no fast cpu kernel"):
        prepare(qw, "cpu")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("p", INT)
def test_cuda_kernel_matches_float64_dequantize_reference(p):
    w = _weights("heavy", (256, 512), seed=4)
    qw = quantize(w, p)
    x = torch.randn(8, 512)
    want = x.double() @ dequantize(qw, torch.float64).T
    got = prepare(qw, "cuda")(x.cuda()).cpu()
    assert float((got.double() - want).norm() / want.norm()) < 2e-2
