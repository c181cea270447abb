"""The non-expert matrices of a store, at every precision: what `--weight-budget` plans with.

Items (`items`): every 2-D weight outside the experts that a kernel multiplies with, named after its module
(the checkpoint key without ".weight"): attention projections (and DeepSeek's MLA projections), shared experts,
dense MLP layers, the output head; and the input embedding, read by rows ("embedding"; "tied" when the head is
the same tensor). Left in the source dtype: routers (one output per expert: routing decides which experts run),
norms, biases, gates of one output, and any matrix whose shape no fast kernel takes (rows % 16, inputs % 32).
`DenseJob` quantizes each item at every precision of the store, GPTQ against the second moment of its own input
when the calibration pass gives one (engine/calibrate.py), else against its weight error; it records per item
and precision the bytes, the relative error on those inputs, the digest, and the item's output energy
tr(W H W^T) (per token), the same measures the experts have, so one planner can weigh both. A decoder layer's
items are one shard per precision, `dense/L003.int4.safetensors` (+ a sidecar: a killed prepare resumes by
skipping the groups already written); the head and embedding are the group "top".
Nothing here decides precisions or builds modules (quant/dense.py does, engine/load.py plans).
"""
from __future__ import annotations

import json
import re

import torch
from safetensors.torch import save_file

from dynaexq.quant.quantize import dequantize, quantize_many
from dynaexq.store import layout

ERROR_ROWS = 4  # errors measured on every 4th output row (as for the experts)
FORMAT_MATRIX = "gate_up"  # the formats' matrix kind dense items use (int2: 2-bit; the planner weighs the error)
_LAYER = re.compile(r"\.layers\.(\d+)\.")


def group_of(name: str) -> str:
    m = _LAYER.search(f".{name}.")
    return f"L{int(m[1]):03d}" if m else "top"


def items(specs: dict, config, num_experts: int) -> dict:
    """{key: (dtype, shape)} of the non-expert tensors -> {item name: {"role", "shape", "group"}}."""
    vocab = getattr(config, "vocab_size", None)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    out = {}
    for key, (dtype, shape) in specs.items():
        if not key.endswith(".weight") or len(shape) != 2 or not dtype.is_floating_point:
            continue
        name, (n, k) = key[:-len(".weight")], shape
        if n == num_experts or n < 16 or k % 32:
            continue  # routers, one-output gates, shapes no kernel takes
        embedding = n == vocab and "embed" in name
        if not embedding and n % 16:
            continue
        role = ("tied" if tied else "embedding") if embedding else "linear"
        out[name] = {"role": role, "shape": [n, k], "group": group_of(name)}
    return out


class DenseJob:
    """Quantize the items as they come (`add`), write each group once all its items are in (`groups` done by
    earlier runs are skipped: `finished`), then `finish()` -> the manifest's "dense" entry."""

    def __init__(self, out, precisions, params_hash: str, items: dict):
        self.out, self.precisions, self.params_hash, self.items = out, precisions, params_hash, items
        self.groups: dict = {}
        for name, it in items.items():
            self.groups.setdefault(it["group"], []).append(name)
        self.pending: dict = {}  # group -> {name: {precision: {tensor name: tensor}}}
        self.stats: dict = {}  # name -> {"energy", precision: {"bytes", "error", "digest"}}
        self.shards: dict = {}  # shard name -> sha256
        for group in self.groups:
            self._resume(group)

    def _sidecar(self, group, p):
        return (self.out / layout.dense_shard(group, p)).with_suffix(".json")

    def _resume(self, group: str) -> None:
        sides = [self._sidecar(group, p) for p in self.precisions]
        if not all(s.is_file() and (self.out / layout.dense_shard(group, p)).is_file()
                   for s, p in zip(sides, self.precisions)):
            return
        loaded = [json.loads(s.read_text()) for s in sides]
        if any(d.get("params_sha256") != self.params_hash for d in loaded):
            return
        for p, d in zip(self.precisions, loaded):
            self.shards[layout.dense_shard(group, p)] = d["sha256"]
            for name, st in d["items"].items():
                self.stats.setdefault(name, {"energy": st["energy"]})[p.value] = {
                    k: st[k] for k in ("bytes", "error", "digest")}

    def finished(self, name: str) -> bool:
        return name in self.stats

    def todo(self) -> list:
        return [name for name in self.items if not self.finished(name)]

    def add(self, name: str, W: torch.Tensor, H: torch.Tensor | None) -> None:
        """Item `name`'s weight W [N, K] (any float dtype) and its input's second moment H [K, K] per token (None:
        weight error): quantized at every precision; its group is written once complete."""
        if self.finished(name) or name in self.pending.get(self.items[name]["group"], {}):
            return
        W = W.detach()
        Wf = W.float()
        rows = slice(None, None, ERROR_ROWS)
        Hf = None if H is None else H.float()
        Ws = Wf[rows]
        den = float(((Ws @ Hf) * Ws).sum()) if Hf is not None else float(Ws.pow(2).sum())
        # output energy per token: E||W x||^2 (H = I: ||W||^2); an embedding's output is the one row a token reads
        rows_read = W.shape[0] if self.items[name]["role"] == "embedding" else 1
        stat = {"energy": den * ERROR_ROWS / rows_read}
        versions = {}
        for p in self.precisions:
            qw = quantize_many(W[None], p, FORMAT_MATRIX, None if Hf is None else Hf[None])[0]
            tensors = qw.tensors()
            if p.is_float and W.dtype == p.dtype:
                err = 0.0
            else:
                d = Ws - dequantize(qw, torch.float32)[rows]
                num = float(((d @ Hf) * d).sum()) if Hf is not None else float(d.pow(2).sum())
                err = (num / max(den, 1e-30)) ** 0.5
            stat[p.value] = {"bytes": sum(t.numel() * t.element_size() for t in tensors.values()), "error": err,
                             "digest": layout.expert_digest(tensors.values())}
            versions[p] = tensors
        group = self.items[name]["group"]
        self.pending.setdefault(group, {})[name] = (versions, stat)
        if set(self.pending[group]) == set(self.groups[group]):
            self._write(group)

    def _write(self, group: str) -> None:
        done = self.pending.pop(group)
        for p in self.precisions:
            path = self.out / layout.dense_shard(group, p)
            tensors = {f"{name}.{t}": v.contiguous() for name, (versions, _) in done.items()
                       for t, v in versions[p].items()}
            layout.atomic_write(path, lambda tmp: save_file(tensors, tmp, {"params_sha256": self.params_hash}))
            sha = layout.sha256_file(path)
            self.shards[layout.dense_shard(group, p)] = sha
            side = {"params_sha256": self.params_hash, "sha256": sha,
                    "items": {name: {"energy": st["energy"], **st[p.value]} for name, (_, st) in done.items()}}
            layout.atomic_write_json(self._sidecar(group, p), side)
        for name, (_, st) in done.items():
            self.stats[name] = st

    def finish(self) -> tuple[dict, dict]:
        """-> (the manifest's "dense" entry, {shard: sha256}); every item must have been added."""
        missing = self.todo()
        assert not missing and not self.pending, (missing, list(self.pending))
        entry = {name: {**self.items[name], "energy": self.stats[name]["energy"],
                        "precisions": {p.value: self.stats[name][p.value] for p in self.precisions}}
                 for name in self.items}
        return entry, dict(self.shards)
