"""`prepare`: checkpoint -> expert store, every routed expert at every requested precision.

Streams one (MoE layer, precision) shard at a time, one expert at a time: each expert is read alone
(`Checkpoint.get` slices, source unmapped right after), quantized, and written straight into the
shard (`shard_writer`), so peak memory is about one expert's working copies plus the interpreter,
whatever the checkpoint size. Shards are written under a temporary name and renamed; a sidecar
`experts/L003.int4.json` (per-expert bytes, errors, sha256 and the prepare parameters) is written
after its shard, so a killed run resumes by skipping the shards whose sidecar matches.
Non-expert weights are copied unchanged (source dtype) into `nonexpert.safetensors`.
"""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from tqdm.auto import tqdm
from transformers import AutoConfig

from dynaexq.arch import get_arch
from dynaexq.errors import UserError
from dynaexq.quant.precision import DEFAULT_GROUP_SIZE, DEFAULT_PRECISIONS, Precision
from dynaexq.quant.quantize import dequantize, quantize
from dynaexq.store import layout
from dynaexq.store.checkpoint import INDEX, Checkpoint
from dynaexq.store.shard_writer import write_streaming

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

    _copy_nonexpert(ckpt, arch, out, params_hash)
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
    name = layout.NONEXPERT_SHARD
    shards = {name: {"size": (out / name).stat().st_size, "sha256": layout.sha256_file(out / name)}}
    for layer, p in jobs:
        name = layout.expert_shard(layer, p)
        shards[name] = {"size": (out / name).stat().st_size, "sha256": stats[str(layer)][p.value].pop("sha256")}
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
    """Quantize one layer's experts at precision p into one shard, streamed one expert at a time.

    Returns {"bytes": [...], "error": [...], "sha256": ...}, also kept in a sidecar JSON written after
    the shard: a shard whose sidecar has the same parameters is finished and is skipped on resume."""
    path = out / layout.expert_shard(layer, p)
    stats_path = path.with_suffix(".json")
    if path.is_file() and stats_path.is_file():
        stat = json.loads(stats_path.read_text())
        if stat.pop("params_sha256", None) == params_hash:
            return stat
    nbytes, errors = [], []

    def expert(e: int) -> dict[str, torch.Tensor]:
        if arch.layout == "per_expert" and e not in layer_index:
            raise UserError(f"checkpoint has no weights for expert {e} of layer {layer} (config says "
                            f"{n_exp} experts); the checkpoint is incomplete")
        w = arch.read_expert(ckpt, layer_index, e)
        ckpt.close()  # unmap the source: its touched pages would otherwise stay resident
        tensors, num, den = {}, 0.0, 0.0
        for m in layout.MATRICES:
            qw = quantize(w[m], p, group_size)
            tensors.update({f"{m}.{name}": t for name, t in qw.tensors().items()})
            w64 = w[m].double()
            den += float(w64.pow(2).sum())
            if not (p.is_float and w[m].dtype == p.dtype):  # same dtype: exact copy, error 0
                num += float((w64 - dequantize(qw, torch.float64)).pow(2).sum())
        tensors.update({b: w[b] for b in layout.BIASES if b in w})
        nbytes.append(sum(t.numel() * t.element_size() for t in tensors.values()))
        errors.append((num / max(den, 1e-30)) ** 0.5)
        return tensors

    first = expert(0)
    specs = [(f"{e}.{name}", t.dtype, t.shape) for e in range(n_exp) for name, t in first.items()]

    def stream():
        yield from first.values()
        for e in range(1, n_exp):
            yield from expert(e).values()

    meta = {"params_sha256": params_hash, "group_size": str(group_size)}
    digest = []
    layout.atomic_write(path, lambda tmp: digest.append(write_streaming(tmp, specs, stream(), meta)))
    stat = {"bytes": nbytes, "error": errors, "sha256": digest[0]}
    layout.atomic_write_json(stats_path, {**stat, "params_sha256": params_hash})
    return stat


def _drop_expert_quantization(config_path: Path) -> None:
    """MXFP4 GPT-OSS: only the experts were quantized, and the store holds them itself; the non-expert
    weights are plain, so the store's config must not ask transformers for a quantized model."""
    config = json.loads(config_path.read_text())
    if config.get("quantization_config", {}).get("quant_method") == "mxfp4":
        del config["quantization_config"]
        layout.atomic_write_json(config_path, config)


def _copy_nonexpert(ckpt: Checkpoint, arch, out: Path, params_hash: str) -> None:
    """Stream every non-expert tensor, unchanged, into one shard (kept if already written with the same
    parameters); write the index that lets transformers load the store directory."""
    name = layout.NONEXPERT_SHARD
    keys = sorted(k for k in ckpt.keys() if not arch.is_expert_key(k))
    path = out / name
    done = False
    if path.is_file():
        with safe_open(str(path), "pt") as f:
            done = (f.metadata() or {}).get("params_sha256") == params_hash
    if not done:
        specs = [(k, *ckpt.spec(k)) for k in keys]

        def stream():
            for k in keys:
                yield ckpt.get(k)
                ckpt.close()

        layout.atomic_write(path, lambda tmp: write_streaming(tmp, specs, stream(), {"params_sha256": params_hash,
                                                                                     "format": "pt"}))
    layout.atomic_write_json(out / layout.NONEXPERT_INDEX, {"metadata": {}, "weight_map": {k: name for k in keys}})
