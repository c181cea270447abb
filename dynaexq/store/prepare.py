"""`prepare`: checkpoint -> expert store, every routed expert at every requested precision.

Streams one (MoE layer, precision) at a time: each expert is read alone (`Checkpoint.get` slices),
quantized, and the layer's shard is written atomically, so peak memory is about one layer of experts
at the largest precision plus one expert's working copies, whatever the checkpoint size. The source
is re-read per precision (from the page cache) instead of holding the layer in memory. Every shard
carries the prepare parameters in its metadata: a killed run resumes by skipping finished shards.
Non-expert weights are copied unchanged (source dtype) into `nonexpert-*.safetensors`.
"""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm
from transformers import AutoConfig

from dynaexq.arch import get_arch
from dynaexq.errors import UserError
from dynaexq.quant.precision import DEFAULT_GROUP_SIZE, DEFAULT_PRECISIONS, Precision
from dynaexq.quant.quantize import dequantize, quantize
from dynaexq.store import layout
from dynaexq.store.checkpoint import INDEX, Checkpoint

NONEXPERT_SHARD_BYTES = 1 << 30
_COPIED_SUFFIXES = (".json", ".txt", ".model", ".jinja", ".md", ".tiktoken")


def prepare(src, out, precisions=DEFAULT_PRECISIONS, group_size: int = DEFAULT_GROUP_SIZE,
            progress: bool = True) -> Path:
    src, out = Path(src), Path(out)
    precisions = [Precision(p) for p in precisions]
    if group_size not in (32, 64, 128, 256):
        raise UserError(f"group size {group_size} is not supported; valid group sizes are 32, 64, 128, 256")
    ckpt = Checkpoint(src)
    arch = get_arch(ckpt.config)
    index = arch.index(ckpt.keys())
    if not index:
        raise UserError(f"{str(src)!r} is a {arch.model_type} checkpoint without routed expert weights "
                        "(a dense configuration?): there is nothing for dynaexq to manage")
    n_exp = arch.num_experts(AutoConfig.from_pretrained(src))
    params = {"format_version": layout.FORMAT_VERSION, "source": ckpt.fingerprint(),
              "precisions": [p.value for p in precisions], "group_size": group_size}
    params_hash = hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()
    if layout.is_store(out):
        manifest = json.loads((out / layout.MANIFEST).read_text())
        if manifest.get("params_sha256") == params_hash:
            return out
        raise UserError(f"{str(out)!r} already holds a store prepared from another checkpoint or with other "
                        "precisions/group size; choose another --out directory or delete that one")

    nonexpert = _copy_nonexpert(ckpt, arch, out, params_hash)
    for f in src.iterdir():
        if f.is_file() and f.suffix in _COPIED_SUFFIXES and f.name != INDEX:
            shutil.copyfile(f, out / f.name)
    _drop_expert_quantization(out / "config.json")

    stats: dict = {}
    jobs = [(layer, p) for layer in index for p in precisions]
    for layer, p in tqdm(jobs, desc="prepare experts", unit="layer-precision", disable=not progress):
        stats.setdefault(str(layer), {})[p.value] = _layer_shard(ckpt, arch, index[layer], layer, n_exp, p,
                                                                 group_size, out, params_hash)
        ckpt.close()
    first = arch.read_expert(ckpt, index[next(iter(index))], 0)
    shards = {name: {"size": (out / name).stat().st_size, "sha256": layout.sha256_file(out / name)}
              for name in [layout.expert_shard(layer, p) for layer, p in jobs] + nonexpert}
    manifest = {
        "format_version": layout.FORMAT_VERSION, "params_sha256": params_hash,
        "arch": arch.model_type, "config": ckpt.config, "source": {"path": str(src.resolve()), **params["source"]},
        "precisions": params["precisions"], "group_size": group_size, "num_experts": n_exp,
        "moe_layers": list(index), "shapes": {m: list(first[m].shape) for m in layout.MATRICES},
        "source_dtype": str(ckpt.dtype()).removeprefix("torch."), "experts": stats, "shards": shards,
    }
    layout.atomic_write_json(out / layout.MANIFEST, manifest)
    return out


def _layer_shard(ckpt, arch, layer_index, layer, n_exp, p, group_size, out, params_hash) -> dict:
    path = out / layout.expert_shard(layer, p)
    if path.is_file():  # resume: a finished shard of the same parameters is kept
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
        if meta.get("params_sha256") == params_hash:
            return json.loads(meta["stats"])
    tensors, nbytes, errors = {}, [], []
    for e in range(n_exp):
        if arch.layout == "per_expert" and e not in layer_index:
            raise UserError(f"checkpoint has no weights for expert {e} of layer {layer} (config says "
                            f"{n_exp} experts); the checkpoint is incomplete")
        w = arch.read_expert(ckpt, layer_index, e)
        num = den = 0.0
        size = 0
        for m in layout.MATRICES:
            qw = quantize(w[m], p, group_size)
            for name, t in qw.tensors().items():
                tensors[f"{e}.{m}.{name}"] = t
            size += qw.nbytes
            w64 = w[m].double()
            num += float((w64 - dequantize(qw, torch.float64)).pow(2).sum())
            den += float(w64.pow(2).sum())
        for b in layout.BIASES:
            if b in w:
                tensors[f"{e}.{b}"] = w[b].contiguous()
                size += w[b].numel() * w[b].element_size()
        nbytes.append(size)
        errors.append((num / max(den, 1e-30)) ** 0.5)
    stat = {"bytes": nbytes, "error": errors}
    meta = {"params_sha256": params_hash, "stats": json.dumps(stat), "group_size": str(group_size)}
    layout.atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))
    return stat


def _drop_expert_quantization(config_path: Path) -> None:
    """MXFP4 GPT-OSS: only the experts were quantized, and the store holds them itself; the non-expert
    weights are plain, so the store's config must not ask transformers for a quantized model."""
    config = json.loads(config_path.read_text())
    if config.get("quantization_config", {}).get("quant_method") == "mxfp4":
        del config["quantization_config"]
        layout.atomic_write_json(config_path, config)


def _copy_nonexpert(ckpt: Checkpoint, arch, out: Path, params_hash: str) -> list[str]:
    """Copy non-expert tensors into shards of <= 1 GiB; finished shards of the same parameters are kept."""
    groups, size = [[]], 0
    for key in sorted(k for k in ckpt.keys() if not arch.is_expert_key(k)):
        n = ckpt.nbytes(key)
        if groups[-1] and size + n > NONEXPERT_SHARD_BYTES:
            groups.append([])
            size = 0
        groups[-1].append(key)
        size += n
    weight_map, names = {}, []
    for i, keys in enumerate(groups, start=1):
        name = layout.nonexpert_shard(i)
        names.append(name)
        weight_map.update({k: name for k in keys})
        path = out / name
        if path.is_file():
            with safe_open(str(path), "pt") as f:
                if (f.metadata() or {}).get("params_sha256") == params_hash:
                    continue
        tensors = {k: ckpt.get(k).contiguous() for k in keys}
        layout.atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata={"params_sha256": params_hash,
                                                                                 "format": "pt"}))
        ckpt.close()
    layout.atomic_write_json(out / layout.NONEXPERT_INDEX, {"metadata": {}, "weight_map": weight_map})
    return names
