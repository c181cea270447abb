"""The native decode attention (quant/attention_cpu.py, csrc/attention.cpp) against its float64 reference, on
cache-like strided views: the AVX-512 register path (up to 16 query heads per kv head, head dims that are multiples
of 16) and the plain loop (more heads per kv head, other head dims), rows of different lengths."""
import pytest
import torch

from dynaexq.quant import attention_cpu, lowbit_cpu

pytestmark = pytest.mark.skipif(lowbit_cpu.extension() is None, reason="needs the native CPU library")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("hq,hkv,d", [(8, 1, 128), (32, 4, 128), (4, 4, 64), (16, 1, 64), (32, 1, 32), (6, 2, 24)])
def test_decode_attention_matches_float64_on_cache_views(dtype, hq, hkv, d):
    g = torch.Generator().manual_seed(hq * 100 + d)
    R, C, lens = 3, 320, torch.tensor([300, 1, 17])  # rows of the cache, capacity, each row's valid positions
    keys = (torch.randn(R + 1, hkv, C, d, generator=g) * 2).to(dtype)  # a cache buffer; the view skips row 0
    values = torch.randn(R + 1, hkv, C, d, generator=g).to(dtype)
    k, v = keys[1:, :, :int(lens.max())], values[1:, :, :int(lens.max())]
    q = (torch.randn(R, hq, 1, d, generator=g) * 0.5).to(dtype)
    got = attention_cpu.decode_attention(q, k, v, lens, d ** -0.5)
    want = attention_cpu.reference(q, k, v, lens, d ** -0.5)
    assert got.shape == (R, 1, hq, d) and got.dtype == dtype
    step = 2.0 ** -7 if dtype == torch.bfloat16 else 2.0 ** -18  # the output's rounding; fp32 sums over L keys
    err = (got.double() - want).abs() / (want.abs().amax(-1, keepdim=True) * step)
    assert err.max() <= 1.0, err.max()
    assert torch.equal(got[1, 0], v[1, :, 0].repeat_interleave(hq // hkv, 0))  # one position: its value, exactly
