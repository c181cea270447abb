"""The default policy, `auto`: fit the machine, say why.

With no budget flag the budget is what the machine can give now: the memory available (Linux `MemAvailable`) on
the CPU, the device's free memory on CUDA. The policy is the best measured one for that budget (README's quality
tables): the checkpoint's own precision when every weight fits beside the reserves (KV cache for
`AUTO_KV_TOKENS` tokens unless --kv-reserve says otherwise, activations, a safety margin); otherwise the multilevel
runtime within that budget (DynaExq Eq. 4 on measured bytes), which itself runs the offload regime when even every
expert at its lowest precision does not fit. `--budget SIZE` replaces the machine's figure; with
`--expert-budget`, the experts alone are compared with it. The choice and the figures behind it are printed.
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import torch

from dynaexq.config import RuntimeConfig
from dynaexq.quant.precision import Precision
from dynaexq.sizes import format_size, parse_size
from dynaexq.store import layout

AUTO_KV_TOKENS = 16384  # KV cache kept free by default: 8 streams of 2,048 tokens (of the context, if shorter)
RUNTIME = "multilevel"  # the best measured policy below the full-precision size (README)


def available_memory(device: torch.device) -> tuple[int, str]:
    """-> (bytes the machine can give now, where the figure comes from)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free, f"free memory of {device}"
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024, "MemAvailable"
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"), "free physical pages"


def kv_bytes_per_token(config, dtype: torch.dtype) -> int:
    """Keys and values of one token over every layer (full attention; an estimate for other kinds)."""
    heads = getattr(config, "num_key_value_heads", None) or getattr(config, "num_attention_heads", 1)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return 2 * config.num_hidden_layers * heads * head_dim * torch.empty((), dtype=dtype).element_size()


def source_precision(reader) -> Precision:
    """The checkpoint's own precision (the widest in the store when it holds no such one)."""
    name = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}.get(reader.manifest["source_dtype"])
    held = {p.value: p for p in reader.precisions}
    return held.get(name) or max(reader.precisions, key=lambda p: p.bits)


def choose(reader, sized, dtype: torch.dtype, device: torch.device, expert_budget: int | None,
           config: RuntimeConfig | None, weight_budget: int | None = None) -> tuple[str, RuntimeConfig | None, str]:
    """-> (the policy, its runtime config, why): the checkpoint's precision when it fits, else the multilevel
    runtime within the budget (the offload regime below every expert at its lowest precision)."""
    from transformers import AutoConfig

    full = source_precision(reader)
    experts = len(reader.layers) * reader.num_experts * sized.sizes[full]
    config = config or RuntimeConfig()
    if weight_budget is not None:
        from dynaexq.runtime.planners.weights import fixed_bytes
        dense = sum(it["shape"][0] * it["shape"][1] for it in reader.dense_items().values()) * dtype.itemsize
        whole = fixed_bytes(reader, dtype) + dense + experts
        if whole <= weight_budget:
            return f"uniform:{full.value}", None, (f"every weight at {full.value} ({format_size(whole)}) fits the "
                                                   f"weight budget {format_size(weight_budget)}")
        return RUNTIME, config, (f"every weight at {full.value} needs {format_size(whole)}, over the weight budget "
                                 f"{format_size(weight_budget)}: one allocation plans the non-expert matrices, the "
                                 "multilevel runtime the experts")
    if expert_budget is not None:
        if experts <= expert_budget:
            return f"uniform:{full.value}", None, (f"every expert at {full.value} ({format_size(experts)}) fits the "
                                                   f"expert budget {format_size(expert_budget)}")
        return RUNTIME, config, (f"every expert at {full.value} needs {format_size(experts)}, over the expert budget "
                                 f"{format_size(expert_budget)}: the multilevel runtime fills it")
    source_bytes = torch.empty((), dtype=getattr(torch, reader.manifest["source_dtype"])).element_size()
    dense = (reader.path / layout.NONEXPERT_SHARD).stat().st_size * torch.empty((), dtype=dtype).element_size() \
        // source_bytes
    if config.budget is not None:
        total, where = parse_size(config.budget), "--budget"
    else:
        total, where = available_memory(device)
    kv = parse_size(config.kv_reserve)
    if not kv:
        model_config = AutoConfig.from_pretrained(reader.path)
        tokens = min(AUTO_KV_TOKENS, 8 * getattr(model_config, "max_position_embeddings", AUTO_KV_TOKENS))
        kv = tokens * kv_bytes_per_token(model_config, dtype)
        config = dataclasses.replace(config, kv_reserve=str(kv))
    reserves = kv + parse_size(config.activation_reserve) + int(total * config.safety_margin)
    need = dense + experts + reserves
    figures = (f"non-expert weights {format_size(dense)} + experts at {full.value} {format_size(experts)} + reserves "
               f"{format_size(reserves)} (KV cache {format_size(kv)}) = {format_size(need)}")
    if need <= total:
        return f"uniform:{full.value}", None, f"{figures} fit the {format_size(total)} of {where}"
    config = dataclasses.replace(config, budget=str(total))
    return RUNTIME, config, (f"{figures} exceed the {format_size(total)} of {where}: the multilevel runtime runs "
                             "within it")
