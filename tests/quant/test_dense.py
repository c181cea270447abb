"""Non-expert matrices from the store at planned precisions (store/dense.py, quant/dense.py): each module against
a float64 dequantize-then-matmul of the stored version, whole models against transformers' own model with every
weight replaced by its float64 dequantization, `--dense` as the manual override, and the store's records."""
import json

import pytest
import torch
import transformers as T
from torch import nn

import dynaexq
from dynaexq.cli import main
from dynaexq.quant import grouped_cpu, kernels
from dynaexq.quant.dense import INT8_GEMM_ROWS, LOWBIT_GEMM_ROWS, DenseEmbedding, DenseLinear
from dynaexq.quant.precision import Precision
from dynaexq.quant.quantize import dequantize, quantize
from dynaexq.store.reader import StoreReader
from test_load_equivalence import _dequantized_reference, _ids

LOW = [Precision.INT8, Precision.INT6, Precision.INT4, Precision.INT3, Precision.INT2]


def test_the_store_holds_every_non_expert_matrix_at_every_precision(checkpoints):
    ckpt, store = checkpoints("deepseek_v3")  # MLA projections, a dense first layer, shared experts
    reader = StoreReader(store)
    items = reader.dense_items()
    src = T.AutoModelForCausalLM.from_pretrained(ckpt)
    linear = {n: tuple(m.weight.shape) for n, m in src.named_modules() if isinstance(m, nn.Linear)}
    # every linear a kernel takes (rows % 16, inputs % 32; this tiny model's MLA and dense-MLP shapes do not)
    takes = {n for n, (rows, cols) in linear.items() if rows % 16 == 0 and cols % 32 == 0}
    assert {"model.layers.0.self_attn.q_proj", "model.layers.0.mlp.gate_proj", "model.layers.1.self_attn.o_proj",
            "model.layers.1.mlp.shared_experts.gate_proj", "lm_head"} <= takes
    assert set(items) == takes | {"model.embed_tokens"}
    assert items["model.embed_tokens"]["role"] == "embedding" and items["lm_head"]["role"] == "linear"
    assert not any(".gate" == n[-5:] for n in items)  # routers stay as they are
    for name, it in items.items():
        w = src.get_submodule(name).weight.detach().double()
        errs = []
        for p in reader.precisions:
            qw = reader.read_dense(name, p)
            assert it["precisions"][p.value]["bytes"] == qw.nbytes
            errs.append(float((dequantize(qw, torch.float64) - w).norm() / w.norm()))
        assert errs[0] == 0 and errs[-1] > errs[-3] > 0, (name, errs)  # fp32 exact; int2 further than int4


@pytest.mark.parametrize("p", LOW, ids=str)
def test_dense_linear_and_embedding_equal_float64_of_the_stored_version(checkpoints, p):
    _, store = checkpoints("qwen3_moe")
    reader = StoreReader(store)
    g = torch.Generator().manual_seed(0)
    for name, it in reader.dense_items().items():
        qw = reader.read_dense(name, p)
        kernel = kernels.prepare(qw, "cpu")
        w = dequantize(qw, torch.float64)
        if p == Precision.INT8:  # int8 keeps its row scale in bf16 resident (kernels.Int8Cpu): what the codes say
            stored, w = w, kernel.q.double() * kernel.scale.double()[:, None] + kernel.corr.double()[:, None]
            assert float((w - stored).norm() / stored.norm()) < 5e-3
        n, k = it["shape"]
        if it["role"] == "linear":
            x = torch.randn(5, k, generator=g)
            y = DenseLinear(kernel, None, k, n, p.value)(x)
            ref = x.double() @ w.T
            assert float((y.double() - ref).norm() / ref.norm()) < 1e-5, (name, p)
        else:
            ids = torch.tensor([[3, 0, 127], [64, 64, 17]])
            rows = DenseEmbedding(kernel, n, k, torch.float32, p.value)(ids)
            torch.testing.assert_close(rows.double(), w[ids], rtol=1e-6, atol=1e-6)


def test_int8_at_prefill_rows_takes_the_gemm_and_stays_within_one_rounding_of_float64(ext):
    """From INT8_GEMM_ROWS rows an int8 DenseLinear runs Int8Cpu.gemm (no native call), below them the native tile;
    both within one bf16 rounding of float64 (exact products, fp32 sums), here with inputs spanning 2^-20..1."""
    g = torch.Generator().manual_seed(3)
    kernel = kernels.prepare(quantize(torch.randn(96, 256, generator=g) * 0.05, Precision.INT8), "cpu")
    w = kernel.q.double() * kernel.scale.double()[:, None] + kernel.corr.double()[:, None]
    module = DenseLinear(kernel, None, 256, 96, "int8")
    for rows, native in ((INT8_GEMM_ROWS + 3, False), (5, True)):
        x = (torch.randn(rows, 256, generator=g) * torch.logspace(-6, 0, 256)[torch.randperm(256, generator=g)])
        x = x.bfloat16()
        calls = grouped_cpu.calls
        y = module(x).double()
        assert (grouped_cpu.calls > calls) == native
        ref = x.double() @ w.T
        assert ((y - ref).abs() <= ref.abs() * 2.0 ** -8 + 1e-12).all(), (rows, float((y - ref).abs().max()))


@pytest.mark.parametrize("p", [Precision.INT6, Precision.INT4], ids=str)
def test_lowbit_at_prefill_rows_takes_the_bf16_gemm_where_the_cpu_has_one(ext, p, monkeypatch):
    """From LOWBIT_GEMM_ROWS bf16 rows a low-bit DenseLinear runs LowbitCpu.gemm (no native tile call), below them
    the tile; both within the bf16 roundings of float64 of the stored weight; without a native bf16 GEMM (or with
    float32 x) the tile at every row count."""
    g = torch.Generator().manual_seed(4)
    qw = quantize(torch.randn(96, 256, generator=g) * 0.05, p)
    module = DenseLinear(kernels.prepare(qw, "cpu"), None, 256, 96, p.value)
    w = dequantize(qw, torch.float64)
    for half_gemm, dtype, rows, native in ((True, torch.bfloat16, LOWBIT_GEMM_ROWS, False),
                                           (True, torch.bfloat16, LOWBIT_GEMM_ROWS - 1, True),
                                           (True, torch.float32, LOWBIT_GEMM_ROWS + 5, True),
                                           (False, torch.bfloat16, LOWBIT_GEMM_ROWS + 5, True)):
        monkeypatch.setattr(kernels, "native_half_gemm", lambda: half_gemm)
        x = torch.randn(rows, 256, generator=g).to(dtype)
        calls = grouped_cpu.calls
        y = module(x).double()
        assert (grouped_cpu.calls > calls) == native, (half_gemm, dtype, rows)
        ref = x.double() @ w.T
        assert float((y - ref).norm() / ref.norm()) < 2 ** -7, (half_gemm, dtype, rows)


@pytest.mark.parametrize("arch", ["qwen3_moe", "deepseek_v3", "gpt_oss"])
def test_a_map_with_dense_precisions_equals_float64_with_every_weight_dequantized(arch, checkpoints, tmp_path):
    """transformers' model in float64, each expert and each non-expert matrix replaced by its stored version's
    float64 dequantization, against dynaexq's reference backend: equal to 1e-9."""
    ckpt, store = checkpoints(arch)
    reader = StoreReader(store)
    names = sorted(reader.dense_items())
    dense = {n: [Precision.INT4, Precision.INT8, Precision.INT2, Precision.INT3][i % 4] for i, n in enumerate(names)}
    spec = {"default": "int3", "dense": {n: p.value for n, p in dense.items()}}
    (tmp_path / "map.json").write_text(json.dumps(spec))
    ref = _dequantized_reference(ckpt, reader, {(layer, e): Precision.INT3 for layer in reader.layers
                                                for e in range(reader.num_experts)})
    with torch.no_grad():
        for name, p in dense.items():
            ref.get_submodule(name).weight.copy_(dequantize(reader.read_dense(name, p), torch.float64))
    eng = dynaexq.load(store, policy=f"map:{tmp_path / 'map.json'}", backend="reference", dtype=torch.float64,
                       progress=False)
    assert eng.dense_plan == dense
    with torch.no_grad():
        a, b = ref(_ids(3)).logits, eng.model(_ids(3)).logits
    torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-9)


def test_dense_bf16_override_and_its_bytes(bundled_store, capsys):
    plain = dynaexq.load(bundled_store, "uniform:int4", progress=False)
    int8 = dynaexq.load(bundled_store, "uniform:int4", dense="int8", progress=False)
    attn = [m for n, m in int8.model.named_modules() if "self_attn" in n and isinstance(m, DenseLinear)]
    assert len(attn) == 4 * int8.model.config.num_hidden_layers  # q, k, v, o of every layer; the head kept
    head = int8.model.get_output_embeddings()  # kept: its own bf16 tensor (on the native kernel at few rows)
    assert head.precision == "bf16" and head.weight.dtype == torch.bfloat16
    assert not any(n.startswith("w_") for n, _ in head.named_buffers())
    assert int8.weight_bytes() < plain.weight_bytes() and int8.expert_bytes() == plain.expert_bytes()
    args = ["eval", "--store", str(bundled_store), "--windows", "2", "--window-tokens", "64", "--policy",
            "uniform:bf16", "--json"]
    assert main(args) == 0
    ref = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert main(args + ["--dense", "int8"]) == 0
    q8 = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert ref["results"][0]["mean_kl"] < 1e-6 < q8["results"][0]["mean_kl"] < 5e-3  # the reference is not int8
    assert q8["results"][0]["weight_bytes"] < ref["results"][0]["weight_bytes"]


def test_float_linears_run_their_own_tensor_natively_at_few_rows(bundled_store):
    eng = dynaexq.load(bundled_store, "uniform:int4", progress=False)
    mods = {n: m for n, m in eng.model.named_modules() if isinstance(m, DenseLinear)}
    assert {"lm_head", "model.layers.0.self_attn.q_proj"} <= set(mods)  # nothing planned: the model's own weights
    assert not [n for n, m in eng.model.named_modules() if type(m) is nn.Linear]
    g = torch.Generator().manual_seed(0)
    for name in ("lm_head", "model.layers.0.self_attn.q_proj", "model.layers.3.self_attn.o_proj"):
        m = mods[name]
        assert m.precision == "bf16" and m.weight.dtype == torch.bfloat16
        for rows in (1, 3, 16):  # native below 8 rows, aten's GEMM from there
            x = torch.randn(rows, m.in_features, generator=g).to(torch.bfloat16)
            with torch.no_grad():
                got = m(x).double()
            want = x.double() @ m.weight.double().T  # float64 of the same bf16 operands
            step = want.abs() * 2.0 ** -8 + 1e-6  # one bf16 rounding of the fp32 sum (half an ulp) plus slack
            assert ((got - want).abs() <= step).all(), (name, rows)


def test_routers_run_their_own_weight_natively_and_route_as_transformers_does(bundled_store):
    from dynaexq.quant import grouped_cpu
    from dynaexq.quant.dense import NativeWeight, gemm_rows

    eng = dynaexq.load(bundled_store, "uniform:int4", progress=False)
    routers = {n: m for n, m in eng.model.named_modules() if type(m).__name__.endswith("Router")}
    assert routers and all(type(m.weight) is NativeWeight for m in routers.values())
    g = torch.Generator().manual_seed(1)
    for name, m in routers.items():
        plain = torch.nn.Parameter(m.weight.detach().clone(), requires_grad=False)  # transformers' own path
        for rows in (1, 3, 16, 200):  # native below gemm_rows() (8, or 128 without AVX512-BF16), a GEMM from there
            x = torch.randn(rows, m.weight.shape[1], generator=g).to(torch.bfloat16)
            before = grouped_cpu.calls
            with torch.no_grad():
                logits, scores, idx = m(x)
            assert (grouped_cpu.calls == before + 1) == (rows < gemm_rows()), (name, rows)
            want = x.double() @ m.weight.double().T  # float64 of the same bf16 operands
            assert type(logits) is torch.Tensor and logits.dtype == torch.bfloat16
            assert ((logits.double() - want).abs() <= want.abs() * 2.0 ** -8 + 1e-6).all(), (name, rows)
            native, m.weight = m.weight, plain
            try:
                with torch.no_grad():
                    ref_logits, ref_scores, ref_idx = m(x)
            finally:
                m.weight = native
            same = (logits == ref_logits).all(dim=-1)  # rows whose logits round alike route alike
            assert same.any(), (name, rows)
            assert torch.equal(idx[same], ref_idx[same]) and torch.equal(scores[same], ref_scores[same])


def test_float_gemm_without_native_bf16_converts_blocks_to_fp32(monkeypatch):
    """Where aten has no native bf16 GEMM (no AVX512-BF16), a bf16 weight multiplies as fp32 copies of FP32_BLOCK
    rows at a time: float64 of the same bf16 operands, up to the bf16 output rounding, for any leading shape."""
    from dynaexq.quant import kernels
    monkeypatch.setattr(kernels, "native_half_gemm", lambda: False)
    monkeypatch.setattr(kernels, "FP32_BLOCK", 16)  # 40 rows: two whole blocks and a partial one
    g = torch.Generator().manual_seed(0)
    w = torch.randn(40, 64, generator=g).to(torch.bfloat16)
    for shape in ((3, 64), (2, 5, 64)):
        x = torch.randn(*shape, generator=g).to(torch.bfloat16)
        y = kernels.FloatLinear(w)(x)
        want = x.double() @ w.double().T
        assert y.dtype == torch.bfloat16 and y.shape == (*shape[:-1], 40)
        assert ((y.double() - want).abs() <= want.abs() * 2.0 ** -8 + 1e-6).all()
