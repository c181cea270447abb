"""A decode step's native pieces against transformers' own code: the attention block (per-head q/k norm, rotary and
cache write in one call: engine/attention.py's BLOCK), the routers' softmax top-k (engine/router.py) and the
experts' SwiGLU (the bank). Each equals transformers' eager ops bit for bit where no sum is reordered, and within
one rounding step of the dtype where one is (nearly all values still equal); a decode run with them installed
picks the same tokens as one with transformers' forwards."""
import pytest
import torch
import torch.nn.functional as F
import transformers as T
from transformers.models.qwen3_moe import modeling_qwen3_moe as Q

import dynaexq
from dynaexq.engine import attention, router
from dynaexq.engine.batch import BatchDecoder, SamplingParams, Sequence
from dynaexq.quant import lowbit_cpu

pytestmark = pytest.mark.skipif(lowbit_cpu.extension() is None, reason="needs the native CPU library")

STEP = {torch.bfloat16: 2.0 ** -7, torch.float32: 2.0 ** -23}


def _steps(got: torch.Tensor, want: torch.Tensor, dtype) -> torch.Tensor:
    """|got - want| in rounding steps of dtype at want's magnitude."""
    return (got.double() - want.double()).abs() / (want.double().abs() * STEP[dtype]).clamp(min=1e-30)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("norms", [True, False])
def test_qk_rope_cache_is_transformers_norm_rotary_and_cache_write(dtype, norms):
    g = torch.Generator().manual_seed(0)
    B, Hq, Hk, D, R, C = 3, 4, 2, 16, 5, 12
    cfg = T.Qwen3MoeConfig(hidden_size=64, num_attention_heads=Hq, num_key_value_heads=Hk, head_dim=D)
    q, k, v = ((torch.randn(B, h, D, generator=g) * 2).to(dtype) for h in (Hq, Hk, Hk))
    pos = torch.tensor([0, 7, 11])
    cos, sin = Q.Qwen3MoeRotaryEmbedding(cfg)(q, pos[:, None])  # [B, 1, D], in q's dtype
    qn, kn = Q.Qwen3MoeRMSNorm(D, 1e-6).to(dtype), Q.Qwen3MoeRMSNorm(D, 1e-6).to(dtype)
    with torch.no_grad():
        qn.weight.normal_(1, 0.3, generator=g)
        kn.weight.normal_(1, 0.3, generator=g)
    keys, values = torch.randn(R, Hk, C, D, generator=g).to(dtype), torch.randn(R, Hk, C, D, generator=g).to(dtype)
    before_k, before_v = keys.clone(), values.clone()
    rows = torch.tensor([1, 3, 4])
    with torch.no_grad():  # transformers: norm per head, then rotary on [B, H, 1, D]
        q_in, k_in = (qn(q), kn(k)) if norms else (q, k)
        want_q, want_k = Q.apply_rotary_pos_emb(q_in[:, :, None], k_in[:, :, None], cos, sin)
        got_q = lowbit_cpu.extension().qk_rope_cache(
            q, k, v, qn.weight if norms else None, kn.weight if norms else None, 1e-6, cos.reshape(B, D).contiguous(),
            sin.reshape(B, D).contiguous(), keys, values, rows, pos)
    got_k = keys[rows, :, pos]
    if norms:  # the norms' sums run in another order: a value may land a few steps away at its head's scale
        for got, want in ((got_q, want_q[:, :, 0]), (got_k, want_k[:, :, 0])):  # (rotary's sums can cancel)
            scale = want.double().abs().amax(-1, keepdim=True) * STEP[dtype]
            assert ((got.double() - want.double()).abs() / scale).max() <= 4.01
            assert (got != want).float().mean() < (0.05 if dtype == torch.bfloat16 else 1.0)
    else:  # no sum: the same roundings, the same bits
        assert torch.equal(got_q, want_q[:, :, 0]) and torch.equal(got_k, want_k[:, :, 0])
    assert torch.equal(values[rows, :, pos], v)
    written = torch.zeros(R, Hk, C, D, dtype=torch.bool)
    written[rows, :, pos] = True
    assert torch.equal(keys[~written], before_k[~written]) and torch.equal(values[~written], before_v[~written])


def test_qk_rope_cache_refuses_a_position_outside_the_cache():
    q, k = torch.randn(1, 2, 8), torch.randn(1, 1, 8)
    cs = torch.ones(1, 8)
    keys = torch.zeros(2, 1, 4, 8)
    with pytest.raises(RuntimeError, match="inside the cache"):
        lowbit_cpu.extension().qk_rope_cache(q, k, k, None, None, 1e-6, cs, cs, keys, keys.clone(),
                                             torch.tensor([1]), torch.tensor([4]))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_swiglu_is_silu_times_up(dtype):
    h = (torch.randn(37, 96, generator=torch.Generator().manual_seed(1)) * 3).to(dtype)
    gate, up = h.chunk(2, dim=-1)
    want = F.silu(gate) * up  # aten's two ops
    got = lowbit_cpu.extension().swiglu(h)
    assert got.dtype == dtype and got.shape == want.shape
    # exp's last bits may differ from aten's (Sleef): one bf16 rounding step; in fp32, where nothing rounds them
    # away, a few fp32 steps
    assert _steps(got, want, dtype).max() <= (1.01 if dtype == torch.bfloat16 else 4.01)
    assert (got != want).float().mean() < (0.01 if dtype == torch.bfloat16 else 0.2)


@pytest.mark.parametrize("arch,norm_topk", [("qwen3_moe", True), ("qwen3_moe", False), ("qwen2_moe", False),
                                            ("olmoe", False), ("mixtral", None)])
def test_installed_routers_return_what_transformers_routers_return(arch, norm_topk):
    from models import configs
    cfg = configs()[arch]
    if norm_topk is not None:
        cfg.norm_topk_prob = norm_topk
    torch.manual_seed(0)
    model = T.AutoModelForCausalLM.from_config(cfg).to(torch.bfloat16).eval()
    gates = [m for m in model.modules() if type(m).__name__ in router.ROUTERS]
    assert gates and router.install(model) == len(gates) and router.install(model) == 0  # once
    x = torch.randn(7, cfg.hidden_size, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
    with torch.no_grad():
        for m in gates:
            m.weight.normal_(0, 0.5)
            m.weight[3] = m.weight[6]  # experts 3 and 6 tie in every row: each must go where aten's top-k puts it
            want = type(m).forward(m, x)  # transformers' own
            got = m(x)
            assert torch.equal(got[0], want[0])  # the logits: the same linear
            assert torch.equal(got[2], want[2])  # the experts, in the same order
            assert got[1].dtype == want[1].dtype  # Mixtral keeps fp32, the others cast
            # exp's last bits (Sleef in aten): one bf16 step; Mixtral's fp32 weights a few fp32 steps
            assert _steps(got[1], want[1], want[1].dtype).max() <= (1.01 if want[1].dtype == torch.bfloat16 else 4.01)
        long = torch.randn(router.DECODE_ROWS, cfg.hidden_size).to(torch.bfloat16)  # a prompt: transformers' own
        assert all(torch.equal(a, b) for a, b in zip(gates[0](long), type(gates[0]).forward(gates[0], long)))
    xg = torch.randn(3, cfg.hidden_size, requires_grad=True)
    gates[0].float()(xg)[1].sum().backward()  # with autograd: transformers' forward, gradients flow
    assert xg.grad is not None


@pytest.mark.parametrize("arch", ["qwen3_moe", "qwen2_moe", "mixtral"])
def test_decoding_with_the_native_block_picks_transformers_tokens(checkpoints, arch, monkeypatch):
    _, store = checkpoints(arch)
    engine = dynaexq.load(store, "uniform:bf16", dtype=torch.bfloat16, progress=False)
    blocks = [m for m in engine.model.modules() if type(m).__name__ in attention.BLOCK]
    assert blocks and all("forward" in vars(m) for m in blocks)
    calls = []
    real = attention.block
    monkeypatch.setattr(attention, "block", lambda m, original, *a, **k: (calls.append(1), real(m, original, *a,
                                                                                                 **k))[1])
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(2, 128, (n,), generator=g).tolist() for n in (9, 4)]

    def run():
        dec = BatchDecoder(engine.model, max_batch=2, prefill_chunk=16)
        seqs = [Sequence(p, SamplingParams(max_tokens=8, temperature=0), None) for p in prompts]
        for s in seqs:
            dec.add(s)
        logits = []
        hook = engine.model.lm_head.register_forward_hook(lambda m, a, out: logits.append(out[:, -1].float()))
        try:
            with torch.inference_mode():
                while not dec.idle():
                    dec.step()
        finally:
            hook.remove()
        return [s.out for s in seqs], logits

    tokens, logits = run()
    assert calls  # the decode steps went through the native block
    for m in blocks + [m for m in engine.model.modules() if type(m).__name__ in router.ROUTERS]:
        del m.forward  # transformers' own attention forward and routers from here
    calls.clear()
    want_tokens, want_logits = run()
    assert not calls and tokens == want_tokens
    for a, b in zip(logits, want_logits):
        assert a.shape == b.shape and (a - b).abs().max() <= 0.02 * b.abs().max()
    engine.close()
