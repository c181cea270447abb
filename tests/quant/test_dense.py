"""`--dense int8|bf16`: the non-expert linears in an expert format on the native kernel, against a float64
reference and end to end."""
import json

import pytest
import torch
from torch import nn

import dynaexq
from dynaexq.cli import main
from dynaexq.engine.dynamic import nonexpert_bytes
from dynaexq.errors import UserError
from dynaexq.quant.dense import DenseLinear, quantize_dense


@pytest.mark.parametrize("bias", [False, True])
def test_int8_linear_matches_a_float64_dequantize_then_matmul(bias):
    g = torch.Generator().manual_seed(0)
    lin = nn.Linear(256, 96, bias=bias)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(96, 256, generator=g) * torch.rand(96, 1, generator=g))  # rows of unequal size
    q = DenseLinear(lin, "int8")
    x = torch.randn(3, 5, 256, generator=g)
    y = q(x)
    w = q.q.double() * q.scale.double()[:, None] + q.corr.double()[:, None]  # what the codes say (kernels.Int8Cpu)
    ref = x.double() @ w.T + (lin.bias.double() if bias else 0)
    assert y.shape == (3, 5, 96) and y.dtype == torch.float32
    assert ((y.double() - ref).norm() / ref.norm()).item() < 1e-6  # fp32 sums of the codes' exact values
    exact = x.double() @ lin.weight.double().T + (lin.bias.double() if bias else 0)
    assert ((y.double() - exact).norm() / exact.norm()).item() < 2e-2  # int8 per row: about 1/254 of each row's max
    err = (w - lin.weight.double()).abs().amax(1) / lin.weight.double().abs().amax(1)
    assert err.max().item() <= 1 / 254 + 1 / 128  # half a code step (+ the bf16 scale's rounding)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_bf16_linear_matches_a_float64_matmul_of_its_bf16_weight(dtype):
    g = torch.Generator().manual_seed(1)
    lin = nn.Linear(512, 64, bias=True)
    q = DenseLinear(lin, "bf16")
    x = torch.randn(2, 9, 512, generator=g).to(dtype)
    ref = x.double() @ lin.weight.to(torch.bfloat16).double().T + lin.bias.double()
    y = q(x)
    assert y.shape == (2, 9, 64) and y.dtype == dtype
    assert ((y.double() - ref).norm() / ref.norm()).item() < (1e-6 if dtype == torch.float32 else 5e-3)
    exact = x.double() @ lin.weight.double().T + lin.bias.double()
    assert ((y.double() - exact).norm() / exact.norm()).item() > 1e-4 or dtype == torch.bfloat16  # bf16 weights


def test_quantize_dense_replaces_the_attention_not_the_head_or_routers(bundled_store):
    eng = dynaexq.load(bundled_store, "uniform:int4", dtype=torch.float32, progress=False)
    before = nonexpert_bytes(eng.model)
    n = quantize_dense(eng.model, "int8")
    layers = eng.model.config.num_hidden_layers
    assert n == 4 * layers  # q, k, v, o of every layer
    assert isinstance(eng.model.get_output_embeddings(), nn.Linear)
    assert not any(isinstance(m, nn.Linear) for name, m in eng.model.named_modules() if "self_attn" in name)
    assert nonexpert_bytes(eng.model) < before
    with pytest.raises(UserError, match="valid values are model, int8, bf16"):
        quantize_dense(eng.model, "int4")


def test_eval_dense_int8_keeps_the_reference_and_reports_the_cost(bundled_store, capsys):
    args = ["eval", "--store", str(bundled_store), "--windows", "2", "--window-tokens", "64", "--policy",
            "uniform:bf16", "--json"]
    assert main(args) == 0
    plain = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert main(args + ["--dense", "int8"]) == 0
    int8 = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert plain["dense"] == "model" and int8["dense"] == "int8"
    assert plain["results"][0]["mean_kl"] < 1e-6 < int8["results"][0]["mean_kl"] < 5e-3  # the reference is not int8
    assert main(args + ["--dense", "bf16"]) == 0
    bf16 = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert bf16["dense"] == "bf16" and bf16["results"][0]["mean_kl"] < int8["results"][0]["mean_kl"]
