"""The native RMSNorm (engine/norm.py) against float64 and against transformers' own modules."""
import pytest
import torch
import transformers as T

from dynaexq.engine import norm
from dynaexq.quant import lowbit_cpu

pytestmark = pytest.mark.skipif(lowbit_cpu.extension() is None, reason="needs the native CPU library")

ULP = {torch.bfloat16: 2.0 ** -7, torch.float16: 2.0 ** -10, torch.float32: 2.0 ** -22}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("round_first", [True, False])
@pytest.mark.parametrize("rows", [1, 7])
def test_kernel_matches_float64(dtype, round_first, rows):
    g = torch.Generator().manual_seed(rows)
    x = (torch.randn(rows, 3, 2048, generator=g) * 3).to(dtype)
    w = (1 + 0.2 * torch.randn(2048, generator=g)).to(dtype)
    got = norm.rms_norm(x, w, 1e-6, round_first).double()
    want = norm.reference(x, w, 1e-6, round_first).double()
    step = (want.abs() * ULP[dtype]).clamp(min=1e-30)  # one rounding step of the dtype at each value
    off = (got - want).abs() / step
    assert off.max() <= 2.01, off.max()  # the two roundings of the round-first form: at most one step each
    assert (off > 0.01).float().mean() < (0.02 if dtype != torch.float32 else 1.0)  # nearly all exact
    assert got.shape == x.shape


@pytest.mark.parametrize("arch", ["qwen3_moe", "gpt_oss", "deepseek_v3", "mixtral", "olmoe", "qwen2_moe"])
def test_installed_norms_match_transformers(arch):
    from models import configs
    torch.manual_seed(0)
    model = T.AutoModelForCausalLM.from_config(configs()[arch]).eval()
    with torch.no_grad():
        for m in model.modules():
            if type(m).__name__ in norm.ROUND_FIRST:
                m.weight.normal_(1, 0.3)
    mods = [m for m in model.modules() if type(m).__name__ in norm.ROUND_FIRST]
    ids = torch.randint(2, 128, (2, 9), generator=torch.Generator().manual_seed(1))
    g = torch.Generator().manual_seed(2)
    xs = [(torch.randn(5, m.weight.numel(), generator=g) * 2).to(torch.bfloat16) for m in mods]
    with torch.no_grad():
        logits = model(ids).logits  # float32, transformers' norms
        assert norm.install(model) == len(mods) > 0 and norm.install(model) == 0  # once
        assert torch.allclose(model(ids).logits, logits, rtol=1e-4, atol=1e-5)
        for m in mods:
            m.to(torch.bfloat16)
        before = [type(m).forward(m, x) for m, x in zip(mods, xs)]  # transformers' own forward
        after = [m(x) for m, x in zip(mods, xs)]
    for a, b in zip(before, after):  # bf16: one rounding step apart at most, nearly all equal
        step = (a.double().abs() * ULP[torch.bfloat16]).clamp(min=1e-30)
        assert ((a.double() - b.double()).abs() / step).max() <= 2.01
        assert (a != b).float().mean() < 0.05
    xg = torch.randn(3, mods[0].weight.numel(), requires_grad=True)
    mods[0](xg).sum().backward()  # with autograd on: transformers' own forward, gradients flow
    assert xg.grad is not None
