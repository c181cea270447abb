"""`prepare`: checkpoint -> expert store, every routed expert at every requested precision.

Streams one MoE layer at a time, one expert at a time: each expert is read once (`Checkpoint.get` slices,
source unmapped right after), quantized at every precision, and each version written straight into its
(layer, precision) shard (`shard_writer`), so peak memory is about one expert's working copies plus the
interpreter, whatever the checkpoint size. Shards are written under a temporary name and renamed; a sidecar
`experts/L003.int4.json` (per-expert bytes, errors, digests, sha256 and the prepare parameters) is written
after its shard, so a killed run resumes by skipping the shards whose sidecar matches.
Non-expert weights are copied unchanged (source dtype) into `nonexpert.safetensors`.
"""
from __future__ import annotations

import contextlib
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
from dynaexq.store.shard_writer import StreamingWriter, write_streaming

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
    bar = tqdm(total=len(index) * n_exp, desc="prepare experts", unit="expert", disable=not progress)
    for layer in index:  # each expert is read once and written at every precision
        stats[str(layer)] = _layer_shards(ckpt, arch, index[layer], layer, n_exp, precisions, group_size, out,
                                          params_hash, bar)
        ckpt.close()
    bar.close()
    name = layout.NONEXPERT_SHARD
    shards = {name: {"size": (out / name).stat().st_size, "sha256": layout.sha256_file(out / name),
                     **layout.stamp(out / name)}}
    for layer in index:
        for p in precisions:
            name = layout.expert_shard(layer, p)
            shards[name] = {"sha256": stats[str(layer)][p.value].pop("sha256"), **layout.stamp(out / name)}
    first = stats[str(next(iter(index)))][precisions[0].value]
    manifest = {
        "format_version": layout.FORMAT_VERSION, "params_sha256": params_hash,
        "arch": arch.model_type, "config": ckpt.config, "source": {"path": str(src.resolve()), **params["source"]},
        "precisions": params["precisions"], "group_size": group_size, "num_experts": n_exp,
        "moe_layers": list(index), "shapes": first.pop("shapes"),
        "source_dtype": str(ckpt.dtype()).removeprefix("torch."), "experts": stats, "shards": shards,
    }
    for layer in stats.values():
        for stat in layer.values():
            stat.pop("shapes", None)
    layout.atomic_write_json(out / layout.MANIFEST, manifest)
    return out


def _layer_shards(ckpt, arch, layer_index, layer, n_exp, precisions, group_size, out, params_hash, bar) -> dict:
    """Quantize one layer's experts at every precision into one shard per precision, reading each expert of the
    source once (the quantizations of one expert are all that is in memory).

    Returns {precision: {"bytes": [...], "error": [...], "digest": [...], "sha256": ..., "shapes": ...}}, each also
    kept in a sidecar JSON written after its shard: a shard whose sidecar has the same parameters is finished and
    is skipped on resume."""
    out_stats, todo = {}, []
    for p in precisions:
        stats_path = (out / layout.expert_shard(layer, p)).with_suffix(".json")
        if (out / layout.expert_shard(layer, p)).is_file() and stats_path.is_file():
            stat = json.loads(stats_path.read_text())
            if stat.pop("params_sha256", None) == params_hash:
                out_stats[p.value] = stat
                continue
        todo.append(p)
    if not todo:
        bar.update(n_exp)
        return out_stats
    stats = {p: {"bytes": [], "error": [], "digest": []} for p in todo}
    shapes = {}  # matrix -> [N, K] of the source expert

    def expert(e: int) -> dict:
        """-> {precision: {name: tensor}} of expert e, read once."""
        if arch.layout == "per_expert" and e not in layer_index:
            raise UserError(f"checkpoint has no weights for expert {e} of layer {layer} (config says "
                            f"{n_exp} experts); the checkpoint is incomplete")
        w = arch.read_expert(ckpt, layer_index, e)
        ckpt.close()  # unmap the source: its touched pages would otherwise stay resident
        shapes.update({m: list(w[m].shape) for m in layout.MATRICES})
        w64 = {m: w[m].double() for m in layout.MATRICES}
        den = sum(float(w64[m].pow(2).sum()) for m in layout.MATRICES)
        result = {}
        for p in todo:
            tensors, num = {}, 0.0
            for m in layout.MATRICES:
                qw = quantize(w[m], p, group_size)
                tensors.update({f"{m}.{name}": t for name, t in qw.tensors().items()})
                if not (p.is_float and w[m].dtype == p.dtype):  # same dtype: exact copy, error 0
                    num += float((w64[m] - dequantize(qw, torch.float64)).pow(2).sum())
            tensors.update({b: w[b] for b in layout.BIASES if b in w})
            s = stats[p]
            s["bytes"].append(sum(t.numel() * t.element_size() for t in tensors.values()))
            s["error"].append((num / max(den, 1e-30)) ** 0.5)
            s["digest"].append(layout.expert_digest(tensors.values()))
            result[p] = tensors
        bar.update(1)
        return result

    first = expert(0)
    meta = {"params_sha256": params_hash, "group_size": str(group_size)}
    with contextlib.ExitStack() as stack:
        writers = {}
        for p in todo:
            tmp = stack.enter_context(layout.atomic_path(out / layout.expert_shard(layer, p)))
            specs = [(f"{e}.{name}", t.dtype, t.shape) for e in range(n_exp) for name, t in first[p].items()]
            writers[p] = StreamingWriter(tmp, specs, meta)
            stack.callback(writers[p].fh.close)  # closed before its temporary file is renamed or deleted
        for e in range(n_exp):
            for p, tensors in (first if e == 0 else expert(e)).items():
                for t in tensors.values():
                    writers[p].write(t)
        for p in todo:
            stats[p]["sha256"] = writers[p].close()
    for p in todo:
        stat = {**stats[p], "shapes": shapes}
        layout.atomic_write_json((out / layout.expert_shard(layer, p)).with_suffix(".json"),
                                 {**stat, "params_sha256": params_hash})
        out_stats[p.value] = stat
    return out_stats


def _drop_expert_quantization(config_path: Path) -> None:
    """MXFP4 GPT-OSS (experts quantized) and block-scaled FP8 (DeepSeek-V3: every linear weight): the store holds
    the experts itself and the non-expert weights dequantized, so its config must not ask transformers for a
    quantized model."""
    config = json.loads(config_path.read_text())
    if config.get("quantization_config", {}).get("quant_method") in ("mxfp4", "fp8"):
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
