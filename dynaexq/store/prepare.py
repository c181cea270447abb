"""`prepare`: checkpoint -> expert store, every routed expert at every requested precision.

Streams one MoE layer at a time: its experts are read from the source as they are used (`LayerExperts`:
`Checkpoint.get` slices, copied, source unmapped right after), quantized at every precision in chunks of up to
CHUNK experts (quant.quantize_many: batched GPTQ; `quantize_chunk`, run by the job's runner: here, or as Ray
tasks, store/distributed.py), and each version written straight into its (layer, precision) shard
(`shard_writer`), so peak memory is about one chunk's working copies, whatever the checkpoint size.
With calibration (engine/calibrate.py drives a `PrepareJob` from inside one forward pass of the calibration
text), each expert is quantized against the second moments of its own inputs, H = E[x x^T] over the tokens
routed to it (pooled with the layer's mean for experts that see few tokens), and the error recorded per expert
and precision is the activation-aware relative error sqrt(mean over its two matrices of
tr(dW H dW^T) / tr(W H W^T)), with the expert's output energy tr(W_down H_h W_down^T) beside it (the planners'
cost is error x sqrt(energy): the size of the output error, what the next layers see); without, H = I.
Shards are written under a temporary name and renamed; a sidecar `experts/L003.int4.json` (per-expert bytes,
errors, digests, sha256 and the prepare parameters) is written after its shard, so a killed run resumes by
skipping the shards whose sidecar matches. Non-expert weights are copied unchanged (source dtype) into
`nonexpert.safetensors`, and the non-expert matrices are also quantized at every precision (store/dense.py):
against their own inputs' second moments with calibration, their weight error without.
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
from dynaexq.quant.formats import manifest_entry
from dynaexq.quant.precision import DEFAULT_PRECISIONS, Precision
from dynaexq.quant.quantize import dequantize, factor, quantize_many
from dynaexq.store import dense, layout
from dynaexq.store.checkpoint import INDEX, Checkpoint
from dynaexq.store.shard_writer import StreamingWriter, write_streaming

_COPIED_SUFFIXES = (".json", ".txt", ".model", ".jinja", ".md", ".tiktoken")
CHUNK = 16  # experts quantized together at most (GPTQ is batched over them)
ERROR_ROWS = 4  # the recorded errors are measured on every 4th output row (an estimate; GEMMs are costly)
CHUNK_BYTES = 64 << 20  # ... and at most this many bytes of their float32 gate_up second moments (K x K each)


class PrepareJob:
    """One `prepare` run: checks and parameters up front, then `read_layer` / `write_layer` per MoE layer (in any
    order, each once), then `finish()` writes the manifest. `calibration`: a dict describing the calibration
    (file digests, windows) -- part of the parameters, so a store is never reused for another calibration."""

    def __init__(self, src, out, precisions=DEFAULT_PRECISIONS, progress: bool = True, calibration=None,
                 runner=None):
        self.src, self.out = Path(src), Path(out)
        self.runner = runner or local  # runner(fn, iterator of argument tuples) -> fn's results, in order
        self.precisions = [Precision(p) for p in precisions]
        self.ckpt = Checkpoint(self.src)
        self.arch = get_arch(self.ckpt.config)
        self.index = self.arch.index(self.ckpt.keys())
        if not self.index:
            raise UserError(f"{str(self.src)!r} is a {self.arch.model_type} checkpoint without routed expert weights "
                            "(a dense configuration?): there is nothing for dynaexq to manage")
        config = AutoConfig.from_pretrained(self.src)
        self.n_exp = self.arch.num_experts(config)
        self.calibration = calibration
        self.params = {"format_version": layout.FORMAT_VERSION, "source": self.ckpt.fingerprint(),
                       "precisions": [p.value for p in self.precisions], "calibration": calibration,
                       "formats": {p.value: manifest_entry(p) for p in self.precisions}}
        self.params_hash = hashlib.sha256(json.dumps(self.params, sort_keys=True).encode()).hexdigest()
        self.done = False
        if layout.is_store(self.out):
            manifest = json.loads((self.out / layout.MANIFEST).read_text())
            if manifest.get("params_sha256") != self.params_hash:
                raise UserError(f"{str(self.out)!r} already holds a store prepared from another checkpoint or with "
                                "other precisions or calibration; choose another --out directory or delete that one")
            self.done = True
            return
        _copy_nonexpert(self.ckpt, self.arch, self.out, self.params_hash)
        for f in self.src.iterdir():
            if f.is_file() and f.suffix in _COPIED_SUFFIXES and f.name != INDEX:
                shutil.copyfile(f, self.out / f.name)
        _drop_expert_quantization(self.out / "config.json")
        self.stats: dict = {}
        nonexpert = {k: self.ckpt.spec(k) for k in self.ckpt.keys() if not self.arch.is_expert_key(k)}
        self.dense = dense.DenseJob(self.out, self.precisions, self.params_hash,
                                    dense.items(nonexpert, config, self.n_exp))
        self.bar = tqdm(total=len(self.index) * self.n_exp, desc="prepare experts", unit="expert",
                        disable=not progress)
        self.dense_bar = tqdm(total=len(self.dense.items), initial=len(self.dense.items) - len(self.dense.todo()),
                              desc="prepare dense matrices", unit="matrix", disable=not progress)

    def add_dense(self, name: str, H: torch.Tensor | None = None, W: torch.Tensor | None = None) -> None:
        """Quantize non-expert matrix `name` at every precision (H: its input's second moment per token, None:
        weight error; W: its weight, default read from the source)."""
        if self.dense.finished(name):
            return
        if W is None:
            W = self.ckpt.get(f"{name}.weight")
            self.ckpt.close()
        self.dense.add(name, W, H)
        self.dense_bar.update(1)

    def finished(self, layer: int) -> bool:
        """True when every shard of `layer` is on disk from a run with the same parameters (then it is kept)."""
        return not self._todo(layer)

    def _todo(self, layer: int) -> list:
        todo = []
        for p in self.precisions:
            path = self.out / layout.expert_shard(layer, p)
            side = path.with_suffix(".json")
            if path.is_file() and side.is_file():
                stat = json.loads(side.read_text())
                if stat.pop("params_sha256", None) == self.params_hash:
                    self.stats.setdefault(str(layer), {})[p.value] = stat
                    continue
            todo.append(p)
        return todo

    def read_layer(self, layer: int) -> "LayerExperts":
        """`layer`'s experts in the source: [{"gate_up": [2I, H], "down": [H, I], (biases)}] by index, each read
        when it is indexed (checked complete now)."""
        layer_index = self.index[layer]
        if self.arch.layout == "per_expert":
            for e in range(self.n_exp):
                if e not in layer_index:
                    raise UserError(f"checkpoint has no weights for expert {e} of layer {layer} (config says "
                                    f"{self.n_exp} experts); the checkpoint is incomplete")
        return LayerExperts(self, layer_index)

    def write_layer(self, layer: int, experts: list[dict], hessians=None) -> None:
        """Quantize `experts` (read_layer's) at every precision still to do and write their shards.
        hessians(e) -> {"gate_up": H [H, H], "down": H [I, I]} per-token second moments of the inputs, or None.
        The chunks are quantized by `self.runner` (in this process, or as Ray tasks: store/distributed.py) and
        written in chunk order as their results come back."""
        todo = self._todo(layer)
        if not todo:
            self.bar.update(self.n_exp)
            return
        stats = {p: {"bytes": [], "error": [], "energy": [], "digest": []} for p in todo}
        first = experts[0]
        shapes = {m: list(first[m].shape) for m in layout.MATRICES}
        meta = {"params_sha256": self.params_hash}
        k = first["gate_up"].shape[1]
        del first
        size = max(1, min(CHUNK, CHUNK_BYTES // (4 * k * k)))
        chunks = [range(c0, min(c0 + size, self.n_exp)) for c0 in range(0, self.n_exp, size)]

        def work():  # each chunk's inputs, made only when the runner asks for them (its second moments are large;
            for chunk in chunks:  # no name here keeps a chunk's alive while the next one is made)
                yield chunk_inputs(experts, chunk, [hessians(e) for e in chunk] if hessians else None, todo)

        with contextlib.ExitStack() as stack:
            writers = {}
            for chunk, (versions, rows) in zip(chunks, self.runner(quantize_chunk, work())):
                if not writers:  # the shapes of every expert's tensors are those of the first
                    for p in todo:
                        tmp = stack.enter_context(layout.atomic_path(self.out / layout.expert_shard(layer, p)))
                        specs = [(f"{e}.{name}", t.dtype, t.shape) for e in range(self.n_exp)
                                 for name, t in versions[p][0].items()]
                        writers[p] = StreamingWriter(tmp, specs, meta)
                        stack.callback(writers[p].fh.close)  # closed before its temporary is renamed or deleted
                for p in todo:
                    for key in stats[p]:
                        stats[p][key] += rows[p][key]
                    for tensors in versions[p]:
                        for t in tensors.values():
                            writers[p].write(t)
                self.bar.update(len(chunk))
                del versions, rows  # (written: not held while the next chunk is quantized)
            for p in todo:
                stats[p]["sha256"] = writers[p].close()
        for p in todo:
            stat = {**stats[p], "shapes": shapes}
            layout.atomic_write_json((self.out / layout.expert_shard(layer, p)).with_suffix(".json"),
                                     {**stat, "params_sha256": self.params_hash})
            self.stats.setdefault(str(layer), {})[p.value] = stat

    def finish(self) -> Path:
        """Write the manifest (the store is complete from now on)."""
        if self.done:
            return self.out
        self.bar.close()
        self.dense_bar.close()
        out, stats = self.out, self.stats
        dense_entry, dense_shards = self.dense.finish()
        missing = [layer for layer in self.index
                   if str(layer) not in stats or len(stats[str(layer)]) < len(self.precisions)]
        assert not missing, f"layers {missing} were never written"
        name = layout.NONEXPERT_SHARD
        shards = {name: {"size": (out / name).stat().st_size, "sha256": layout.sha256_file(out / name),
                         **layout.stamp(out / name)}}
        for layer in self.index:
            for p in self.precisions:
                name = layout.expert_shard(layer, p)
                shards[name] = {"sha256": stats[str(layer)][p.value].pop("sha256"), **layout.stamp(out / name)}
        for name, sha in dense_shards.items():
            shards[name] = {"sha256": sha, **layout.stamp(out / name)}
        shapes = stats[str(next(iter(self.index)))][self.precisions[0].value]["shapes"]
        for layer in stats.values():
            for stat in layer.values():
                stat.pop("shapes", None)
        manifest = {
            "format_version": layout.FORMAT_VERSION, "params_sha256": self.params_hash, "arch": self.arch.model_type,
            "config": self.ckpt.config, "source": {"path": str(self.src.resolve()), **self.params["source"]},
            "precisions": self.params["precisions"], "formats": self.params["formats"],
            "calibration": self.calibration, "num_experts": self.n_exp, "moe_layers": list(self.index),
            "shapes": shapes, "source_dtype": str(self.ckpt.dtype()).removeprefix("torch."), "experts": stats,
            "dense": dense_entry, "shards": shards,
        }
        layout.atomic_write_json(out / layout.MANIFEST, manifest)
        self.done = True
        return out


class LayerExperts:
    """One MoE layer's source experts, a sequence read on indexing: each access copies that expert out of the
    checkpoint and unmaps it again, so no more than the experts in use are in memory (holding the layer took its
    size in anonymous memory plus as much of the mapped source, for the whole calibration and quantization of
    the layer). A calibrated prepare reads each expert once per calibration chunk and once per quantization:
    copies from the page cache, ~3 % of the layer's time at the 30B shape."""

    def __init__(self, job: PrepareJob, layer_index: dict):
        self.job, self.layer_index = job, layer_index
        self.last = (None, None)  # the expert read last (asked again at once, e.g. for the layer's shapes)

    def __len__(self) -> int:
        return self.job.n_exp

    def __getitem__(self, e: int) -> dict:
        if self.last[0] != e:
            job = self.job
            w = job.arch.read_expert(job.ckpt, self.layer_index, e)
            self.last = (e, {k: t.clone() for k, t in w.items()})  # own memory: nothing keeps the source mapped
            job.ckpt.close()
        return self.last[1]


def local(fn, inputs):
    """The in-process runner: each chunk quantized here, one after the other (a generator: one chunk in memory)."""
    for args in inputs:
        out = fn(*args)
        del args  # before the next chunk's inputs are made
        yield out


def chunk_inputs(experts: list, chunk: range, H, todo: list) -> tuple:
    """The arguments of `quantize_chunk` for the experts `chunk` of a layer (plain tensors: they may travel)."""
    ws = [experts[e] for e in chunk]  # (each read once)
    mats = {m: torch.stack([w[m] for w in ws]) for m in layout.MATRICES}  # [B, N, K] source dtype
    hess = None if H is None else {m: torch.stack([h[m] for h in H]).float() for m in layout.MATRICES}
    biases = [{b: w[b] for b in layout.BIASES if b in w} for w in ws]
    return mats, hess, biases, todo


def quantize_chunk(mats: dict, hess, biases: list, todo: list) -> tuple:
    """Experts of one chunk at every precision of `todo` -> ({precision: [{name: tensor} per expert]}, {precision:
    {"bytes", "error", "energy", "digest": one entry per expert}}). A pure function of its arguments (GPTQ is
    deterministic), so it gives the same bytes wherever it runs."""
    n = len(biases)
    out = {p: [{} for _ in range(n)] for p in todo}
    rel = {p: [0.0] * n for p in todo}
    energy = [0.0] * n  # tr(W_down H_h W_down^T): the expert's output energy per token (set below)
    for m in layout.MATRICES:
        W = mats[m]
        Hm = None if hess is None else hess[m]
        factored = None if Hm is None else factor(Hm)  # once for every precision of this matrix
        # errors on every ERROR_ROWS-th output row: one GEMM per (expert, precision) at a quarter of the cost
        rows = slice(None, None, ERROR_ROWS)
        Ws = W[:, rows].float()
        den = [float(((w @ h) * w).sum()) if Hm is not None else float(w.pow(2).sum())
               for w, h in zip(Ws, Hm if Hm is not None else Ws)]
        if m == "down":
            energy = [d * ERROR_ROWS for d in den]
        for p in todo:
            for i, qw in enumerate(quantize_many(W, p, m, Hm, factored)):
                out[p][i].update({f"{m}.{name}": t for name, t in qw.tensors().items()})
                if not (p.is_float and W.dtype == p.dtype):  # same dtype: exact copy, error 0
                    d = Ws[i] - dequantize(qw, torch.float32)[rows]
                    num = float(((d @ Hm[i]) * d).sum()) if Hm is not None else float(d.pow(2).sum())
                    rel[p][i] += num / max(den[i], 1e-30) / len(layout.MATRICES)
    stats = {p: {"bytes": [], "error": [], "energy": [], "digest": []} for p in todo}
    for p in todo:
        for i in range(n):
            out[p][i].update(biases[i])
            s = stats[p]
            s["bytes"].append(sum(t.numel() * t.element_size() for t in out[p][i].values()))
            s["error"].append(rel[p][i] ** 0.5)
            s["energy"].append(energy[i])
            s["digest"].append(layout.expert_digest(out[p][i].values()))
    return out, stats


def prepare(src, out, precisions=DEFAULT_PRECISIONS, progress: bool = True, runner=None) -> Path:
    """Weight-only prepare (H = I): every layer read once and written; see engine/calibrate.py for the calibrated
    one, which `dynaexq prepare` and `load` use when calibration text is at hand."""
    job = PrepareJob(src, out, precisions, progress, runner=runner)
    if job.done:
        return job.out
    for layer in job.index:
        if job.finished(layer):
            job.bar.update(job.n_exp)
            continue
        job.write_layer(layer, job.read_layer(layer))
    for name in job.dense.todo():
        job.add_dense(name)
    return job.finish()


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
