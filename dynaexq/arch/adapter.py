"""Architecture adapters: where a family keeps its routed experts on disk and in transformers.

Every supported family builds a transformers `<Arch>Experts` module called as
`experts(hidden [T, H], top_k_index [T, K], top_k_weights [T, K])`; we replace that class at build
time and read the expert weights ourselves. An adapter only knows names and layouts; it never
quantizes, allocates pools or decides precisions.

Canonical expert (what `read_expert` returns, float tensors in the source dtype):
  gate_up [2I, H]  rows = gate then up (swiglu) or interleaved gate/up rows (gpt_oss), as transformers
  down    [H, I]
  gate_up_bias [2I], down_bias [H]   (gpt_oss only)
On-disk layouts:
  per_expert  `...layers.L.<mlp|block_sparse_moe>.experts.e.<gate_proj|up_proj|down_proj|w1|w3|w2>.weight`
  gpt_oss     fused, transposed: `...layers.L.mlp.experts.gate_up_proj [E, H, 2I]` (+ `_bias`), `down_proj [E, I, H]`,
              or MXFP4 `gate_up_proj_blocks/_scales`, `down_proj_blocks/_scales` (dequantized to bf16 on read)
  granite     fused: `...layers.L.block_sparse_moe.input_linear.weight [E, 2I, H]`, `output_linear.weight [E, H, I]`
"""
from __future__ import annotations

import importlib
import re
from dataclasses import dataclass

import torch

from dynaexq.errors import UserError

_PER_EXPERT = re.compile(r"^(.*\.layers\.(\d+)\.(?:mlp|block_sparse_moe)\.experts)\.(\d+)\."
                         r"(gate_proj|up_proj|down_proj|w1|w2|w3)\.weight$")
_ROLE = {"gate_proj": "gate", "w1": "gate", "up_proj": "up", "w3": "up", "down_proj": "down", "w2": "down"}
_FUSED = {
    "gpt_oss": re.compile(r"^(.*\.layers\.(\d+)\.mlp\.experts)\.((?:gate_up|down)_proj(?:_bias|_blocks|_scales)?)$"),
    "granite": re.compile(r"^(.*\.layers\.(\d+)\.block_sparse_moe)\.(input_linear|output_linear)\.weight$"),
}


@dataclass(frozen=True)
class Arch:
    model_type: str
    experts_class: str  # class in transformers.models.<model_type>.modeling_<model_type>
    num_experts_attr: str  # config attribute holding E
    layout: str = "per_expert"  # per_expert | gpt_oss | granite
    glu: str = "swiglu"  # swiglu: act(gate) * up | gpt_oss: interleaved, clamped, (up + 1) * gate * sigmoid(alpha gate)

    def modeling_module(self):
        return importlib.import_module(f"transformers.models.{self.model_type}.modeling_{self.model_type}")

    def num_experts(self, config) -> int:
        return int(getattr(config, self.num_experts_attr))

    def index(self, keys) -> dict[int, dict]:
        """Checkpoint keys -> {layer: {expert e: {role: key}}} (per_expert) or {layer: {name: key}} (fused)."""
        out: dict[int, dict] = {}
        if self.layout == "per_expert":
            for key in keys:
                m = _PER_EXPERT.match(key)
                if m:
                    out.setdefault(int(m[2]), {}).setdefault(int(m[3]), {})[_ROLE[m[4]]] = key
        else:
            for key in keys:
                m = _FUSED[self.layout].match(key)
                if m:
                    out.setdefault(int(m[2]), {})[m[3]] = key
        return dict(sorted(out.items()))

    def is_expert_key(self, key: str) -> bool:
        return bool((_PER_EXPERT if self.layout == "per_expert" else _FUSED[self.layout]).match(key))

    def read_expert(self, ckpt, layer_index: dict, e: int) -> dict[str, torch.Tensor]:
        """One expert of one layer, reading only its bytes (`ckpt.get(key, e)` slices fused tensors)."""
        if self.layout == "per_expert":
            keys = layer_index[e]
            missing = {"gate", "up", "down"} - set(keys)
            if missing:
                raise UserError(f"checkpoint lacks the {', '.join(sorted(missing))} weight(s) of expert {e} "
                                f"(found {sorted(keys.values())}); the checkpoint is incomplete")
            gate_up = torch.cat([ckpt.get(keys["gate"]), ckpt.get(keys["up"])], dim=0)
            return {"gate_up": gate_up, "down": ckpt.get(keys["down"])}
        if self.layout == "granite":
            return {"gate_up": ckpt.get(layer_index["input_linear"], e),
                    "down": ckpt.get(layer_index["output_linear"], e)}
        gate_up, down = (_gpt_oss_matrix(ckpt, layer_index, name, e) for name in ("gate_up_proj", "down_proj"))
        return {"gate_up": gate_up.T.contiguous(),  # [H, 2I] -> [2I, H]
                "down": down.T.contiguous(),  # [I, H] -> [H, I]
                "gate_up_bias": ckpt.get(layer_index["gate_up_proj_bias"], e),
                "down_bias": ckpt.get(layer_index["down_proj_bias"], e)}


def _gpt_oss_matrix(ckpt, layer_index: dict, name: str, e: int) -> torch.Tensor:
    """Expert e of a GPT-OSS fused tensor, [in, out]; MXFP4 checkpoints (`_blocks` + `_scales`, as
    OpenAI ships them) are dequantized to bf16 with transformers' own converter."""
    if name in layer_index:
        return ckpt.get(layer_index[name], e)
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    blocks = ckpt.get(layer_index[f"{name}_blocks"], e)  # [out, in/32, 16] uint8: two FP4 codes a byte
    scales = ckpt.get(layer_index[f"{name}_scales"], e)  # [out, in/32] uint8: exponent + 127
    return convert_moe_packed_tensors(blocks[None], scales[None], dtype=torch.bfloat16)[0]  # [in, out]


ARCHS = {a.model_type: a for a in [
    Arch("qwen3_moe", "Qwen3MoeExperts", "num_experts"),
    Arch("qwen3_next", "Qwen3NextExperts", "num_experts"),
    Arch("qwen2_moe", "Qwen2MoeExperts", "num_experts"),
    Arch("phimoe", "PhimoeExperts", "num_local_experts"),
    Arch("mixtral", "MixtralExperts", "num_local_experts"),
    Arch("olmoe", "OlmoeExperts", "num_experts"),
    Arch("deepseek_v3", "DeepseekV3Experts", "n_routed_experts"),
    Arch("gpt_oss", "GptOssExperts", "num_local_experts", layout="gpt_oss", glu="gpt_oss"),
    Arch("granitemoe", "GraniteMoeExperts", "num_local_experts", layout="granite"),
]}


def get_arch(config) -> Arch:
    model_type = getattr(config, "model_type", None) or config.get("model_type")
    arch = ARCHS.get(model_type)
    if arch is None:
        raise UserError(f"unsupported architecture {model_type!r}: dynaexq runs Mixture-of-Experts models of the "
                        f"families {', '.join(sorted(ARCHS))}. A dense model has no experts to manage; "
                        "load it with plain transformers instead")
    return arch
