"""The bank inside transformers models: equal to transformers' own forward, for every family.

References are independent of the code under test: transformers' own model (its own experts module
and forward), and for quantized maps transformers' own model in float64 with each expert's fused
parameters replaced by the float64 dequantization of the store's version.
"""
import json
import random

import pytest
import torch
import transformers as T

import dynaexq
from dynaexq.arch import get_arch
from dynaexq.quant.precision import Precision
from dynaexq.quant.quantize import dequantize
from dynaexq.store.reader import StoreReader

ARCHS = ["qwen3_moe", "qwen3_next", "phimoe", "mixtral", "olmoe", "qwen2_moe", "deepseek_v3", "gpt_oss", "granitemoe"]
MIXED = ["bf16", "int8", "int4", "int3", "int2"]


def _ids(seed=0):
    return torch.randint(2, 128, (2, 11), generator=torch.Generator().manual_seed(seed))


def _random_map(reader, path, seed=0):
    rng = random.Random(seed)
    spec = {"layers": {str(layer): {str(e): rng.choice(MIXED) for e in range(reader.num_experts)}
                       for layer in reader.layers}}
    path.write_text(json.dumps(spec))
    return {(int(layer), int(e)): Precision(p) for layer, d in spec["layers"].items() for e, p in d.items()}


def _dequantized_reference(ckpt, reader, plan):
    """transformers' model in float64, experts replaced by the float64 dequantized store versions."""
    model = T.AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float64, experts_implementation="eager").eval()
    arch = get_arch(model.config)
    experts = {int(n.split(".")[n.split(".").index("layers") + 1]): m for n, m in model.named_modules()
               if type(m).__name__ == arch.experts_class}
    assert sorted(experts) == reader.layers
    with torch.no_grad():
        for layer, mod in experts.items():
            for e in range(reader.num_experts):
                w = reader.read_expert(layer, e, plan[(layer, e)])
                gu, dn = dequantize(w["gate_up"], torch.float64), dequantize(w["down"], torch.float64)
                if arch.layout == "gpt_oss":  # transformers keeps these transposed
                    gu, dn = gu.T, dn.T
                    mod.gate_up_proj_bias[e] = w["gate_up_bias"].double()
                    mod.down_proj_bias[e] = w["down_bias"].double()
                mod.gate_up_proj[e] = gu
                mod.down_proj[e] = dn
    return model


@pytest.mark.parametrize("arch", ARCHS)
def test_uniform_fp32_logits_equal_transformers(arch, checkpoints):
    ckpt, store = checkpoints(arch)
    ref = T.AutoModelForCausalLM.from_pretrained(ckpt).eval()
    eng = dynaexq.load(store, policy="uniform:fp32", progress=False)
    with torch.no_grad():
        a, b = ref(_ids()).logits, eng.model(_ids()).logits
    torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    assert eng.precision_counts() == {"fp32": len(eng.banks) * 8}


@pytest.mark.parametrize("arch", ARCHS)
def test_uniform_bf16_logits_equal_transformers_in_bf16(arch, checkpoints, monkeypatch):
    ckpt, store = checkpoints(arch)
    # the non-expert linears at these 22 rows as transformers runs them (aten's bf16 GEMM, which a CPU without
    # AVX512-BF16 would otherwise leave to the native kernel up to 128 rows): this comparison is about the experts
    from dynaexq.quant import dense, kernels
    monkeypatch.setattr(kernels, "native_half_gemm", lambda: True)
    monkeypatch.setattr(dense, "gemm_rows", lambda: dense.FLOAT_GEMM_ROWS)
    # transformers' default experts path (grouped_mm) rounds differently in bf16 and can flip a routing
    # decision; its eager path is the per-expert loop whose arithmetic the bank reproduces
    ref = T.AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.bfloat16, experts_implementation="eager").eval()
    eng = dynaexq.load(store, policy="uniform:bf16", dtype=torch.bfloat16, progress=False)
    for bank in eng.banks.values():
        bank.path = "reference"  # the per-expert loop: transformers' very kernel calls and roundings
    with torch.no_grad():
        a, b = ref(_ids()).logits.float(), eng.model(_ids()).logits.float()
    torch.testing.assert_close(b, a, rtol=0, atol=1e-3 * float(a.abs().max()))
    # the grouped path sums each product in its own order (one fp32 accumulation, one rounding, like aten's),
    # so a result can land one bf16 ulp off, and such an ulp can grow through later layers: it must stay within
    # the distance bf16 itself puts between transformers and its float64 model (on 8 of these 9 models it is 0)
    exact = T.AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float64, experts_implementation="eager").eval()
    for bank in eng.banks.values():
        bank.path = "grouped"
    with torch.no_grad():
        g, c = eng.model(_ids()).logits.float(), exact(_ids()).logits.float()
    assert float((g - a).abs().max()) <= max(1e-3 * float(a.abs().max()), float((a - c).abs().max()))


@pytest.mark.parametrize("arch", ARCHS)
def test_mixed_map_equals_float64_dequantize_reference(arch, checkpoints, tmp_path):
    ckpt, store = checkpoints(arch)
    reader = StoreReader(store)
    plan = _random_map(reader, tmp_path / "map.json", seed=ARCHS.index(arch))
    ref = _dequantized_reference(ckpt, reader, plan)
    eng = dynaexq.load(store, policy=f"map:{tmp_path / 'map.json'}", backend="reference", dtype=torch.float64,
                       progress=False)
    assert eng.plan == plan
    with torch.no_grad():
        a, b = ref(_ids(1)).logits, eng.model(_ids(1)).logits
    torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("arch", ["qwen3_moe", "gpt_oss", "deepseek_v3", "qwen2_moe"])
def test_mixed_map_cpu_kernels_close_to_float64_reference(arch, checkpoints, tmp_path):
    ckpt, store = checkpoints(arch)
    reader = StoreReader(store)
    plan = _random_map(reader, tmp_path / "map.json", seed=7)
    ref = _dequantized_reference(ckpt, reader, plan)
    eng = dynaexq.load(store, policy=f"map:{tmp_path / 'map.json'}", progress=False)
    with torch.no_grad():
        a, b = ref(_ids(2)).logits, eng.model(_ids(2)).logits.double()
    rel = float((a - b).norm() / a.norm())
    assert rel < 2e-2, rel
    # the check can fail: an all-int2 model is measurably further from this reference
    eng2 = dynaexq.load(store, policy="uniform:int2", progress=False)
    with torch.no_grad():
        c = eng2.model(_ids(2)).logits.double()
    assert float((a - c).norm() / a.norm()) > 2 * rel


def test_resident_bytes_equal_manifest_bytes(checkpoints, tmp_path):
    _, store = checkpoints("gpt_oss")  # has biases too
    reader = StoreReader(store)
    plan = _random_map(reader, tmp_path / "map.json", seed=3)
    eng = dynaexq.load(store, policy=f"map:{tmp_path / 'map.json'}", progress=False)
    assert eng.expert_bytes() == sum(reader.expert_bytes(layer, e, p) for (layer, e), p in plan.items())


def test_bank_records_routed_counts_and_mass(checkpoints):
    _, store = checkpoints("qwen3_moe")
    eng = dynaexq.load(store, policy="uniform:int4", progress=False)
    seen = {}
    hooks = [bank_parent.gate.register_forward_hook(lambda m, i, o, layer=layer: seen.__setitem__(layer, o))
             for layer, bank_parent in ((layer, eng.model.model.layers[layer].mlp) for layer in eng.banks)]
    eng.take_routing_stats()
    with torch.no_grad():
        eng.model(_ids(3))
    stats = eng.take_routing_stats()
    for h in hooks:
        h.remove()
    for layer, (counts, mass) in stats.items():
        _, scores, idx = seen[layer]
        want_counts = torch.bincount(idx.reshape(-1), minlength=8)
        want_mass = torch.zeros(8, dtype=torch.float64).index_add_(0, idx.reshape(-1), scores.reshape(-1).double())
        assert torch.equal(counts, want_counts)
        torch.testing.assert_close(mass.double(), want_mass, rtol=1e-5, atol=1e-6)
        assert int(counts.sum()) == 2 * 11 * 2  # T tokens x top-k
    assert all(int(c.sum()) == 0 for c, _ in eng.take_routing_stats().values())  # reset after reading
