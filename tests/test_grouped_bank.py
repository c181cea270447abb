"""The bank's grouped path (one native call per precision tier and matrix) against the per-expert loop it replaced
and against a float64 reference computed from the store; its calls are bounded by the tiers, and it never syncs."""
import json
import random

import pytest
import torch
import torch.nn.functional as F

import dynaexq
from dynaexq.quant import grouped_cpu, lowbit_cpu
from dynaexq.quant.quantize import dequantize
from dynaexq.store.reader import StoreReader

TIERS = ["bf16", "int8", "int4", "int3", "int2"]


@pytest.fixture(autouse=True)
def _kernels():
    if lowbit_cpu.extension() is None:
        pytest.skip("the C++ kernels did not build here: every expert runs the per-expert loop")


def _every_tier_map(reader, path, seed):
    """a random map holding every tier in every layer"""
    rng = random.Random(seed)
    layers = {}
    for layer in reader.layers:
        ps = (TIERS * reader.num_experts)[:reader.num_experts]
        rng.shuffle(ps)
        layers[str(layer)] = {str(e): p for e, p in enumerate(ps)}
    path.write_text(json.dumps({"layers": layers}))


def _inputs(bank, hidden_size, tokens, k, seed, dtype):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(tokens, hidden_size, generator=g).to(dtype)
    idx = torch.stack([torch.randperm(bank.num_experts, generator=g)[:k] for _ in range(tokens)])
    w = torch.rand(tokens, k, generator=g).softmax(-1).to(dtype)
    return hidden, idx, w


def _float64(reader, bank, versions, hidden, idx, w):
    """each token's sum over its experts of w * down(silu(gate) * up), in float64 from the store's versions"""
    out = torch.zeros(hidden.shape, dtype=torch.float64)
    for t in range(hidden.shape[0]):
        for j in range(idx.shape[1]):
            e = int(idx[t, j])
            ws = reader.read_expert(bank.layer, e, versions[e].precision)
            gate, up = (dequantize(ws["gate_up"], torch.float64) @ hidden[t].double()).chunk(2)
            out[t] += float(w[t, j]) * (dequantize(ws["down"], torch.float64) @ (F.silu(gate) * up))
    return out


@pytest.mark.parametrize("arch", ["qwen3_moe", "mixtral", "deepseek_v3"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("tokens", [1, 8, 40])
def test_grouped_equals_the_per_expert_loop_and_float64_with_every_tier(arch, dtype, tokens, checkpoints, tmp_path):
    _, store = checkpoints(arch)
    reader = StoreReader(store)
    _every_tier_map(reader, tmp_path / "map.json", seed=tokens)
    eng = dynaexq.load(store, policy=f"map:{tmp_path / 'map.json'}", dtype=dtype, progress=False)
    for bank in eng.banks.values():
        assert {v.precision.value for v in bank.versions} == set(TIERS)
        hidden, idx, w = _inputs(bank, eng.model.config.hidden_size, tokens, 2, seed=bank.layer, dtype=dtype)
        with torch.no_grad():
            bank.path = "reference"
            want = bank(hidden, idx, w)
            bank.path = "grouped"
            got = bank(hidden, idx, w)
        assert bank.last_read == bank.versions
        exact = _float64(reader, bank, bank.versions, hidden, idx, w)
        err_g = float((got.double() - exact).norm() / exact.norm())
        err_r = float((want.double() - exact).norm() / exact.norm())
        # one rounding of fp32 sums into the model dtype each matmul: no worse than the loop (whose int8 kernel
        # reads bf16 activations) beyond that rounding
        assert err_g <= err_r + (4e-3 if dtype == torch.bfloat16 else 1e-5), (err_g, err_r)
        assert float((got.double() - want.double()).norm() / exact.norm()) <= 1e-2


def test_calls_per_layer_are_bounded_by_the_tiers_not_the_experts(checkpoints, tmp_path):
    _, store = checkpoints("qwen3_moe")
    reader = StoreReader(store)
    _every_tier_map(reader, tmp_path / "map.json", seed=0)
    eng = dynaexq.load(store, policy=f"map:{tmp_path / 'map.json'}", progress=False)
    bank = eng.banks[min(eng.banks)]
    for tokens in (1, 4, 32):  # 2 .. all 8 experts routed
        hidden, idx, w = _inputs(bank, eng.model.config.hidden_size, tokens, 2, seed=tokens, dtype=torch.bfloat16)
        calls = grouped_cpu.calls
        with torch.no_grad():
            bank(hidden, idx, w)
        assert grouped_cpu.calls - calls == 2 * len(TIERS)  # gate_up and down, per tier present
    bank.path = "reference"
    calls = grouped_cpu.calls
    with torch.no_grad():
        bank(hidden, idx, w)
    assert grouped_cpu.calls == calls


def _syncs(fn, monkeypatch):
    """(aten::_local_scalar_dense events, Tensor.tolist/item calls) made by fn()"""
    seen = []
    for name in ("tolist", "item"):
        orig = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name, lambda self, *a, _o=orig, _n=name: seen.append(_n) or _o(self, *a))
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    monkeypatch.undo()
    return sum(e.name == "aten::_local_scalar_dense" for e in prof.events()), len(seen)


def test_a_decode_step_makes_no_host_sync_in_any_moe_layer(checkpoints, monkeypatch):
    _, store = checkpoints("qwen3_moe")
    eng = dynaexq.load(store, policy="uniform:int4", progress=False)
    calls = []
    hooks = [b.register_forward_hook(lambda m, args, out: calls.append((m, args))) for b in eng.banks.values()]
    ids = torch.randint(2, 128, (4, 6))
    with torch.no_grad():
        out = eng.model(ids, use_cache=True)
        calls.clear()
        eng.model(ids[:, -1:], past_key_values=out.past_key_values, use_cache=True)  # one decode step, batch 4
    for h in hooks:
        h.remove()
    assert len(calls) == len(eng.banks)
    for path, want_none in (("grouped", True), ("reference", False)):  # the loop syncs: the check can fail
        for bank, args in calls:
            bank.path = path
            with torch.no_grad():
                events, host = _syncs(lambda: bank(*args), monkeypatch)
            assert (events + host == 0) == want_none, (path, bank.layer, events, host)


def test_a_hidden_size_the_native_combine_does_not_take_is_combined_in_torch(checkpoints, tmp_path, monkeypatch):
    _, store = checkpoints("qwen3_moe")
    _every_tier_map(StoreReader(store), tmp_path / "map.json", seed=1)
    eng = dynaexq.load(store, policy=f"map:{tmp_path / 'map.json'}", progress=False)
    bank = eng.banks[min(eng.banks)]
    hidden, idx, w = _inputs(bank, eng.model.config.hidden_size, 8, 2, seed=3, dtype=torch.bfloat16)
    with torch.no_grad():
        bank.path = "reference"
        want = bank(hidden, idx, w)
        bank.path = "grouped"
        native = bank(hidden, idx, w)
        monkeypatch.setattr(grouped_cpu, "combines", lambda hidden_size, k: False)
        calls = grouped_cpu.calls
        torch_combined = bank(hidden, idx, w)
    assert grouped_cpu.calls - calls == 2 * len(TIERS)  # the tiers still run grouped
    assert torch.equal(torch_combined, native)  # the same arithmetic as the native combine
    assert float((torch_combined.double() - want.double()).norm() / want.double().norm()) <= 1e-2
