"""Tiny random checkpoints of every supported family, written with transformers' own save_pretrained.

Shapes are small but kernel-friendly (H = 64, I = 32: gate_up [64, 64], down [64, 32]) so the CPU fast
kernels run, and shards are tiny so the safetensors index is exercised.
"""
from __future__ import annotations

from pathlib import Path

import torch
import transformers as T

COMMON = dict(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=128, eos_token_id=1, bos_token_id=0, pad_token_id=None)


def configs():
    return {
        "qwen3_moe": T.Qwen3MoeConfig(**COMMON, moe_intermediate_size=32, num_experts=8, num_experts_per_tok=2,
                                      head_dim=16, norm_topk_prob=True),
        "qwen3_next": T.Qwen3NextConfig(**COMMON, moe_intermediate_size=32, num_experts=8, num_experts_per_tok=2,
                                        shared_expert_intermediate_size=32, head_dim=16, linear_num_value_heads=4,
                                        linear_num_key_heads=2, linear_key_head_dim=8, linear_value_head_dim=8,
                                        layer_types=["linear_attention", "full_attention"]),
        "phimoe": T.PhimoeConfig(**COMMON, intermediate_size=32, num_local_experts=8, num_experts_per_tok=2),
        "mixtral": T.MixtralConfig(**COMMON, intermediate_size=32, num_local_experts=8, num_experts_per_tok=2),
        "olmoe": T.OlmoeConfig(**COMMON, intermediate_size=32, num_experts=8, num_experts_per_tok=2),
        "qwen2_moe": T.Qwen2MoeConfig(**COMMON, moe_intermediate_size=32, num_experts=8, num_experts_per_tok=2,
                                      shared_expert_intermediate_size=32),
        "deepseek_v3": T.DeepseekV3Config(**{**COMMON, "num_hidden_layers": 3}, moe_intermediate_size=32,
                                          intermediate_size=48, n_routed_experts=8, num_experts_per_tok=2,
                                          n_shared_experts=1, first_k_dense_replace=1, kv_lora_rank=16,
                                          q_lora_rank=None, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16,
                                          n_group=2, topk_group=1),
        "gpt_oss": T.GptOssConfig(**COMMON, intermediate_size=32, num_local_experts=8, num_experts_per_tok=2,
                                  head_dim=16),
        "granitemoe": T.GraniteMoeConfig(**COMMON, intermediate_size=32, num_local_experts=8, num_experts_per_tok=2),
    }


def make_checkpoint(arch: str, path: Path, dtype=torch.float32, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    model = T.AutoModelForCausalLM.from_config(configs()[arch])
    with torch.no_grad():  # spread weights a little: random-init routers are nearly uniform otherwise
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.08)
    model.to(dtype).save_pretrained(path, max_shard_size="60KB")
    return path
