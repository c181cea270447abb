"""GPT-OSS checkpoints as OpenAI ships them: experts in MXFP4 (`_blocks` + `_scales`)."""
import json

import torch
from safetensors.torch import load_file, save_file

import dynaexq
from dynaexq.quant.precision import Precision
from dynaexq.store.prepare import prepare
from dynaexq.store.reader import StoreReader
from models import make_checkpoint

FP4 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0])


def _mxfp4(rows: int, cols: int, e: int, g: torch.Generator):
    """Random exactly-representable weights [e, rows, cols] and their MXFP4 encoding (blocks of 32 along cols)."""
    codes = torch.randint(0, 16, (e, rows, cols), generator=g)
    exps = torch.randint(-4, 1, (e, rows, cols // 32), generator=g)
    w = FP4[codes] * torch.pow(2.0, exps.float()).repeat_interleave(32, dim=-1)
    pairs = codes.view(e, rows, cols // 32, 16, 2)
    blocks = (pairs[..., 0] | (pairs[..., 1] << 4)).to(torch.uint8)  # low nibble = even element
    return w, blocks, (exps + 127).to(torch.uint8)


def test_mxfp4_gpt_oss_experts_are_read_exactly(tmp_path):
    ck = make_checkpoint("gpt_oss", tmp_path / "ck")
    g = torch.Generator().manual_seed(0)
    truth = {}
    for shard in sorted(ck.glob("model-*.safetensors")):
        tensors = load_file(shard)
        for key in [k for k in tensors if k.endswith(("experts.gate_up_proj", "experts.down_proj"))]:
            e, a, b = tensors[key].shape  # transformers layout [E, in, out]
            w, blocks, scales = _mxfp4(b, a, e, g)  # MXFP4 rows are outputs, blocks along inputs
            truth[key] = w
            del tensors[key]
            tensors[f"{key}_blocks"], tensors[f"{key}_scales"] = blocks, scales
        save_file(tensors, shard, metadata={"format": "pt"})
    index = json.loads((ck / "model.safetensors.index.json").read_text())
    for key in truth:
        f = index["weight_map"].pop(key)
        index["weight_map"][f"{key}_blocks"] = index["weight_map"][f"{key}_scales"] = f
    (ck / "model.safetensors.index.json").write_text(json.dumps(index))
    cfg = json.loads((ck / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": ["model.layers.*.self_attn"]}
    (ck / "config.json").write_text(json.dumps(cfg))

    store = prepare(ck, tmp_path / "st", precisions=["fp32", "int4"], progress=False)
    reader = StoreReader(store)
    for layer in reader.layers:
        for e in range(reader.num_experts):
            w = reader.read_expert(layer, e, Precision.FP32)
            prefix = f"model.layers.{layer}.mlp.experts."
            assert torch.equal(w["gate_up"].data, truth[prefix + "gate_up_proj"][e])
            assert torch.equal(w["down"].data, truth[prefix + "down_proj"][e])
    assert "quantization_config" not in json.loads((store / "config.json").read_text())
    eng = dynaexq.load(store, policy="uniform:int4", progress=False)
    logits = eng.model(torch.tensor([[3, 5, 7, 9]])).logits
    assert logits.shape == (1, 4, 128) and torch.isfinite(logits).all()
