"""FP8 checkpoints as DeepSeek-V3 ships them: linear weights in float8_e4m3fn with `weight_scale_inv` block scales,
dequantized on read (experts and non-expert weights alike); dtypes nobody can read are refused by name."""
import json

import pytest
import torch
import transformers as T
from safetensors.torch import load_file, save_file

import dynaexq
from dynaexq.cli import main
from dynaexq.errors import UserError
from dynaexq.quant.precision import Precision
from dynaexq.store.prepare import prepare
from dynaexq.store.reader import StoreReader
from models import make_checkpoint

BLOCK = [16, 16]  # DeepSeek-V3 uses 128 x 128; 16 gives these small matrices several blocks and ragged edges


def _fp8(w: torch.Tensor):
    """Block-scaled FP8 (as DeepSeek's fp8 cast): -> (codes, weight_scale_inv, the exact dequantized float64)."""
    n, k = w.shape
    rows, cols = -(-n // BLOCK[0]), -(-k // BLOCK[1])
    scale = torch.zeros(rows, cols)
    for i in range(rows):
        for j in range(cols):
            blk = w[i * BLOCK[0]:(i + 1) * BLOCK[0], j * BLOCK[1]:(j + 1) * BLOCK[1]]
            scale[i, j] = blk.abs().max().clamp(min=1e-12) / 448
    full = scale.repeat_interleave(BLOCK[0], 0)[:n].repeat_interleave(BLOCK[1], 1)[:, :k]
    codes = (w / full).to(torch.float8_e4m3fn)
    return codes, scale, codes.double() * full.double()


def _fp8_checkpoint(tmp_path):
    ck = make_checkpoint("deepseek_v3", tmp_path / "ck", seed=3)
    truth = {}
    for shard in sorted(ck.glob("model-*.safetensors")):
        tensors = load_file(shard)
        for key in [k for k in tensors if k.endswith("proj.weight") and tensors[k].dim() == 2]:
            codes, scale, exact = _fp8(tensors[key])
            truth[key] = exact
            tensors[key], tensors[key.removesuffix("weight") + "weight_scale_inv"] = codes, scale
        save_file(tensors, shard, metadata={"format": "pt"})
    index = json.loads((ck / "model.safetensors.index.json").read_text())
    for key in truth:
        index["weight_map"][key.removesuffix("weight") + "weight_scale_inv"] = index["weight_map"][key]
    (ck / "model.safetensors.index.json").write_text(json.dumps(index))
    cfg = json.loads((ck / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                  "weight_block_size": BLOCK}
    (ck / "config.json").write_text(json.dumps(cfg))
    return ck, truth


def test_fp8_block_scaled_checkpoints_are_dequantized_exactly_and_run_like_transformers(tmp_path, capsys):
    ck, truth = _fp8_checkpoint(tmp_path)
    assert main(["inspect", str(ck)]) == 0
    assert "fp8" in capsys.readouterr().out  # inspect says what it found and that prepare dequantizes it
    store = prepare(ck, tmp_path / "st", precisions=["fp32", "int4"], progress=False)
    reader = StoreReader(store)
    n = 0
    for layer in reader.layers:
        for e in range(reader.num_experts):
            w = reader.read_expert(layer, e, Precision.FP32)
            pre = f"model.layers.{layer}.mlp.experts.{e}."
            gate_up = torch.cat([truth[pre + "gate_proj.weight"], truth[pre + "up_proj.weight"]])
            assert torch.equal(w["gate_up"].data, gate_up.float()) and torch.equal(w["down"].data,
                                                                                  truth[pre + "down_proj.weight"].float())
            n += 1
    assert n == 2 * 8 and "quantization_config" not in json.loads((store / "config.json").read_text())

    # the reference: transformers' own model holding the exactly dequantized weights in float32
    ref_dir = tmp_path / "ref"
    model = T.AutoModelForCausalLM.from_config(T.AutoConfig.from_pretrained(store), dtype=torch.float32)
    state = {}
    for shard in sorted(ck.glob("model-*.safetensors")):
        state.update({k: v for k, v in load_file(shard).items() if not k.endswith("_scale_inv")})
    state.update({k: v.float() for k, v in truth.items()})
    fused = model.state_dict()
    for layer in reader.layers:  # transformers' experts are fused [E, 2I, H] / [E, H, I]
        pre = f"model.layers.{layer}.mlp.experts"
        fused[f"{pre}.gate_up_proj"] = torch.stack([torch.cat([state.pop(f"{pre}.{e}.gate_proj.weight"),
                                                                state.pop(f"{pre}.{e}.up_proj.weight")])
                                                     for e in range(8)])
        fused[f"{pre}.down_proj"] = torch.stack([state.pop(f"{pre}.{e}.down_proj.weight") for e in range(8)])
    fused.update({k: v for k, v in state.items() if k in fused})
    model.load_state_dict(fused)
    model.save_pretrained(ref_dir)
    ref = T.AutoModelForCausalLM.from_pretrained(ref_dir, dtype=torch.float32, experts_implementation="eager").eval()
    ids = torch.randint(2, 128, (2, 9), generator=torch.Generator().manual_seed(0))
    eng = dynaexq.load(store, policy="uniform:fp32", progress=False)
    with torch.no_grad():
        assert torch.allclose(eng.model(ids).logits, ref(ids).logits, atol=1e-5, rtol=1e-4)


def test_unreadable_dtypes_are_refused_by_name(tmp_path):
    ck = make_checkpoint("qwen3_moe", tmp_path / "ck")
    shard = next(f for f in sorted(ck.glob("model-*.safetensors")) if any(k.endswith("proj.weight")
                                                                         for k in load_file(f)))
    tensors = load_file(shard)
    key = next(k for k in tensors if k.endswith("proj.weight"))
    tensors[key] = tensors[key].to(torch.float8_e4m3fn)  # FP8 without a scale: what would it mean?
    save_file(tensors, shard, metadata={"format": "pt"})
    with pytest.raises(UserError, match=rf"{key}.*float8_e4m3fn.*weight_scale_inv"):
        prepare(ck, tmp_path / "st", precisions=["int4"], progress=False)
