"""`load(path, policy, expert_budget) -> Engine`: a transformers model whose experts live in ExpertBanks.

1. Resolve the store: `path` is a store, or a Hugging Face checkpoint that is prepared once into a
   cache directory keyed by its fingerprint (we say so on stderr); an explicit `store=` must have been
   prepared from that very checkpoint.
2. Plan: the policy gives each (layer, expert) a precision; with `expert_budget`, a plan whose
   measured bytes exceed it is refused, naming the bytes it needs.
3. Build: the transformers class of the architecture, with its `<Arch>Experts` class swapped for
   ExpertBank while `from_pretrained` runs on the store directory, so the fused bf16 expert tensors
   are never materialized and every non-expert weight, buffer and tie is transformers' own.
4. Publish every expert's planned version into its bank.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
import threading
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM

from dynaexq.arch import get_arch
from dynaexq.bank import ExpertBank, ExpertVersion
from dynaexq.engine.engine import Engine
from dynaexq.errors import UserError
from dynaexq.quant import kernels
from dynaexq.runtime.planners import parse_policy
from dynaexq.sizes import format_size
from dynaexq.store import layout
from dynaexq.store.checkpoint import Checkpoint
from dynaexq.store.prepare import prepare
from dynaexq.store.reader import StoreReader

_PATCH_LOCK = threading.Lock()


def cache_root() -> Path:
    return Path(os.environ.get("DYNAEXQ_CACHE", Path.home() / ".cache" / "dynaexq"))


def resolve_store(path, store=None, progress: bool = True) -> Path:
    path = Path(path)
    if layout.is_store(path):
        return path
    ckpt = Checkpoint(path)  # raises a clear error for a missing directory / non-checkpoint
    get_arch(ckpt.config)
    fingerprint = ckpt.fingerprint()
    if store is not None:
        reader = StoreReader(store)
        if not reader.matches_source(fingerprint):
            raise UserError(f"store {str(store)!r} was prepared from {reader.manifest['source']['path']!r}, not from "
                            f"the checkpoint {str(path)!r} (config or shard headers differ); prepare this checkpoint "
                            "into its own store")
        return Path(store)
    digest = hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()[:16]
    target = cache_root() / "stores" / f"{path.resolve().name}-{digest}"
    if not layout.is_store(target):
        print(f"dynaexq: preparing {path} into the store {target} (once; later loads reuse it)", file=sys.stderr)
        prepare(path, target, progress=progress)
    return target


def load(path, policy="uniform:bf16", expert_budget: int | None = None, *, store=None, device="cpu",
         backend: str | None = None, dtype: torch.dtype | None = None, verify: bool = True,
         progress: bool = True) -> Engine:
    device = torch.device(device)
    backend = backend or ("cuda" if device.type == "cuda" else "cpu")
    reader = StoreReader(resolve_store(path, store, progress))
    planner = parse_policy(policy) if isinstance(policy, str) else policy
    plan = planner.plan(reader)
    need = sum(reader.expert_bytes(layer, e, p) for (layer, e), p in plan.items())
    if expert_budget is not None and need > expert_budget:
        fits = [p.value for p in reader.precisions
                if sum(reader.expert_bytes(layer, e, p) for (layer, e) in plan) <= expert_budget]
        hint = f"uniform precisions that fit: {', '.join(fits)}" if fits else "no uniform precision fits"
        raise UserError(f"policy {planner} needs {need} bytes ({format_size(need)}) of expert memory but the expert "
                        f"budget is {expert_budget} bytes ({format_size(expert_budget)}); {hint}")
    if verify:
        used = {layout.expert_shard(layer, p) for (layer, _), p in plan.items()}
        used.add(layout.NONEXPERT_SHARD)
        reader.verify(sorted(used), progress=progress)

    arch = get_arch(reader.manifest["config"])
    dtype = dtype or getattr(torch, reader.manifest["source_dtype"])
    model = _build_model(reader.path, arch, dtype, device)
    banks = {}
    for name, module in model.named_modules():
        if isinstance(module, ExpertBank):
            module.layer = _layer_of(name)
            banks[module.layer] = module
    assert sorted(banks) == sorted(reader.layers), (sorted(banks), reader.layers)
    for (layer, e), p in tqdm(sorted(plan.items()), desc="load experts", unit="expert", disable=not progress):
        banks[layer].publish(e, make_version(reader.read_expert(layer, e, p), backend, dtype))
    reader.close()  # every version owns its memory now; keep no store pages mapped
    return Engine(model=model, tokenizer=_tokenizer(reader.path), reader=reader, banks=banks,
                  policy=str(planner), plan=plan, backend=backend)


def make_version(weights: dict, backend: str, dtype: torch.dtype) -> ExpertVersion:
    """Store tensors of one expert -> a resident, kernel-ready ExpertVersion (biases in the model dtype)."""
    bias = {b: weights[b].to(dtype) for b in layout.BIASES if b in weights}
    return ExpertVersion(weights["gate_up"].precision,
                         kernels.prepare(weights["gate_up"], backend, bias.get("gate_up_bias")),
                         kernels.prepare(weights["down"], backend, bias.get("down_bias")))


def _build_model(store_dir: Path, arch, dtype, device):
    module = arch.modeling_module()
    bank_cls = type(arch.experts_class, (ExpertBank,), {
        "__init__": lambda self, config, *a, **k: ExpertBank.__init__(self, config, arch.num_experts(config), arch.glu)})
    with _PATCH_LOCK:
        original = getattr(module, arch.experts_class)
        setattr(module, arch.experts_class, bank_cls)
        try:
            model = AutoModelForCausalLM.from_pretrained(str(store_dir), dtype=dtype,
                                                         device_map=None if device.type == "cpu" else device)
        finally:
            setattr(module, arch.experts_class, original)
    return model.eval()


def _layer_of(module_name: str) -> int:
    parts = module_name.split(".")
    return int(parts[parts.index("layers") + 1])


def _tokenizer(path: Path):
    if not any((path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        return None
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(str(path))
