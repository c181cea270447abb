"""The grouped CPU kernels (`dynaexq.quant.grouped_cpu`): one call for every expert of a tier, held to the float64
dequantize-then-matmul of each expert, for every format with a grouped form; experts of other tiers untouched."""
import pytest
import torch

from dynaexq.quant import grouped_cpu, kernels, lowbit_cpu
from dynaexq.quant.precision import Precision
from dynaexq.quant.quantize import dequantize, quantize

FORMATS = [Precision.INT6, Precision.INT4, Precision.INT3, Precision.INT2, Precision.INT8, Precision.BF16,
           Precision.FP16, Precision.FP32]
# rows per expert: empty experts, one row, a decode batch, and one expert over a 256-row segment and the whole
# call over a 1024-row batch (the driver's cuts)
COUNTS = {"decode": [1, 0, 3, 1, 0, 8, 2, 1], "prefill": [300, 0, 17, 900, 5, 0, 64, 1]}
SENTINEL = 7.0


@pytest.fixture(scope="module")
def lib():
    if lowbit_cpu.extension() is None:
        pytest.skip("the C++ kernels did not build here (a warning said why)")
    return lowbit_cpu.extension()


def _tier(precision, n, k, experts, seed):
    g = torch.Generator().manual_seed(seed)
    qws = [quantize(torch.randn(n, k, generator=g) * 0.05, precision) for _ in range(experts)]
    return qws, [kernels.prepare(q, "cpu") for q in qws]


def _check(qws, counts, members, x, y, dtype):
    """each member's rows against float64; everyone else's rows still hold the sentinel"""
    tol = 1e-5 if dtype == torch.float32 and qws[0].precision == Precision.FP32 else 2e-2
    start = 0
    for e, n in enumerate(counts):
        rows = slice(start, start + n)
        if e in members:
            ref = x[rows].double() @ dequantize(qws[e], torch.float64).T
            if n:
                rel = float((y[rows].double() - ref).norm() / ref.norm())
                assert rel <= tol, (qws[0].precision, e, n, rel)
        else:
            assert (y[rows] == SENTINEL).all()
        start += n


@pytest.mark.parametrize("precision", FORMATS, ids=lambda p: p.value)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("case", sorted(COUNTS))
def test_one_call_computes_every_member_of_the_tier(lib, precision, dtype, case):
    counts = COUNTS[case]
    n, k = 128, 256
    qws, ks = _tier(precision, n, k, len(counts), seed=FORMATS.index(precision))
    specs = [grouped_cpu.spec(kk) for kk in ks]
    assert all(s is not None and s[0] == specs[0][0] for s in specs)  # one tier: one key
    members = {0, 2, 3, 6, 7}
    ptrs = torch.zeros(len(counts), 3, dtype=torch.int64)
    for e in members:
        ptrs[e] = torch.tensor(specs[e][1])
    x = torch.randn(sum(counts), k, generator=torch.Generator().manual_seed(1)).to(dtype)
    y = torch.full((sum(counts), n), SENTINEL, dtype=dtype)
    calls = grouped_cpu.calls
    grouped_cpu.run(specs[0][0], torch.tensor(counts), ptrs, x, y)
    assert grouped_cpu.calls == calls + 1
    _check(qws, counts, members, x, y, dtype)
    if precision in (Precision.INT6, Precision.INT4, Precision.INT3, Precision.INT2):  # the one-expert kernel's tiles
        start = 0
        for e, c in enumerate(counts):
            if e in members and c:
                assert torch.equal(y[start:start + c], ks[e](x[start:start + c]))
            start += c


@pytest.mark.parametrize("precision", [Precision.INT6, Precision.INT4, Precision.INT3, Precision.INT2],
                         ids=lambda p: p.value)
def test_long_units_cover_every_panel(lib, precision):
    """A decode call on wide experts (1024 rows: a unit spans many 16-row panels) and on one narrow expert among
    them: every row of every member equals float64."""
    counts = [1, 2, 0, 1, 1, 3, 1, 1]
    qws, ks = _tier(precision, 1024, 256, len(counts), seed=5)
    spec0 = grouped_cpu.spec(ks[0])
    members = {0, 1, 3, 4, 5, 6, 7}
    ptrs = torch.zeros(len(counts), 3, dtype=torch.int64)
    for e in members:
        ptrs[e] = torch.tensor(grouped_cpu.spec(ks[e])[1])
    x = torch.randn(sum(counts), 256, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
    y = torch.full((sum(counts), 1024), SENTINEL, dtype=torch.bfloat16)
    grouped_cpu.run(spec0[0], torch.tensor(counts), ptrs, x, y)
    _check(qws, counts, members, x, y, torch.bfloat16)


def test_the_avx2_build_computes_the_same_tiers(avx2):
    counts = COUNTS["prefill"]
    for precision in (Precision.INT6, Precision.INT4, Precision.INT3, Precision.INT8, Precision.BF16):
        qws, ks = _tier(precision, 64, 128, len(counts), seed=3)
        specs = [grouped_cpu.spec(kk) for kk in ks]
        ptrs = torch.tensor([s[1] for s in specs], dtype=torch.int64)
        x = torch.randn(sum(counts), 128, dtype=torch.bfloat16)
        y = torch.full((sum(counts), 64), SENTINEL, dtype=torch.bfloat16)
        grouped_cpu.run(specs[0][0], torch.tensor(counts), ptrs, x, y, lib=avx2)
        _check(qws, counts, set(range(len(counts))), x, y, torch.bfloat16)


def test_kernels_without_a_grouped_form_say_so(lib):
    w = torch.randn(64, 40)  # K % 16 != 0: no row-major tile takes it
    assert grouped_cpu.spec(kernels.prepare(quantize(w, Precision.BF16), "cpu")) is None
    biased = kernels.prepare(quantize(torch.randn(64, 64), Precision.INT4), "cpu", bias=torch.zeros(64))
    assert grouped_cpu.spec(biased) is None
    assert grouped_cpu.spec(kernels.prepare(quantize(torch.randn(64, 64), Precision.INT4), "reference")) is None


def _routing(t, k, e, h, dtype, wdtype, seed):
    g = torch.Generator().manual_seed(seed)
    idx = torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(t)])
    return idx, torch.rand(t, k, generator=g).to(wdtype), (torch.randn(t, h, generator=g) * 3).to(dtype)


def _torch_combine(idx, order, ys, w):
    """transformers' arithmetic: each pair's output times its weight in the model dtype, then each token's
    products added one by one in ascending expert order"""
    t, k = idx.shape
    y = (ys * w.reshape(-1)[order, None]).to(ys.dtype)  # rows' weights, rounded into ys' dtype
    row = torch.empty_like(order)
    row[order] = torch.arange(order.numel())
    out = torch.zeros(t, ys.shape[1], dtype=ys.dtype)
    for e in idx.unique().tolist():  # ascending experts, as the per-expert index_add_ loop
        tok, slot = (idx == e).nonzero(as_tuple=True)
        out.index_add_(0, tok, y[row[tok * k + slot]])
    return out


@pytest.mark.parametrize("dtype,wdtype", [(torch.bfloat16, torch.bfloat16), (torch.bfloat16, torch.float32),
                                          (torch.float32, torch.float32), (torch.float16, torch.float16)], ids=str)
@pytest.mark.parametrize("t", [1, 7, 300])
def test_route_and_combine_equal_torchs_grouping_and_index_add_loop(lib, dtype, wdtype, t):
    e, k, h = 16, 4, 96
    idx, w, hidden = _routing(t, k, e, h, dtype, wdtype, seed=t)
    counts0, mass0 = torch.arange(e), torch.rand(e)
    token_counts, mass = counts0.clone(), mass0.clone()
    counts, order, x = grouped_cpu.route(idx, w, hidden, e, token_counts, mass)
    flat = idx.reshape(-1)
    assert torch.equal(counts, torch.bincount(flat, minlength=e))
    assert torch.equal(order, torch.argsort(flat, stable=True))  # tokens ascending within an expert
    assert torch.equal(x, hidden[order // k])
    assert torch.equal(token_counts, counts0 + counts)
    torch.testing.assert_close(mass, mass0.index_add(0, flat, w.reshape(-1).float()), rtol=1e-6, atol=1e-6)
    ys = (torch.randn(t * k, h) * 5).to(dtype)
    assert torch.equal(grouped_cpu.combine(idx, order, ys, w), _torch_combine(idx, order, ys, w))


def test_route_and_combine_in_the_avx2_build(avx2):
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        idx, w, hidden = _routing(33, 8, 64, 64, dtype, dtype, seed=5)
        counts, order, x = grouped_cpu.route(idx, w, hidden, 64, torch.zeros(64, dtype=torch.int64), torch.zeros(64),
                                             lib=avx2)
        assert torch.equal(x, hidden[order // 8])
        ys = (torch.randn(33 * 8, 64) * 5).to(dtype)
        assert torch.equal(grouped_cpu.combine(idx, order, ys, w, lib=avx2), _torch_combine(idx, order, ys, w))


def test_route_refuses_an_expert_index_out_of_range(lib):
    idx, w, hidden = _routing(3, 2, 8, 32, torch.bfloat16, torch.bfloat16, seed=0)
    idx[1, 0] = 8
    with pytest.raises(ValueError, match=r"outside \[0, 8\)"):
        grouped_cpu.route(idx, w, hidden, 8, torch.zeros(8, dtype=torch.int64), torch.zeros(8))
