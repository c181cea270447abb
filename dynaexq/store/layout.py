"""The on-disk layout of an expert store, and atomic file writing.

STORE/
  manifest.json                  written last: a store without it is incomplete (prepare resumes)
  config.json, tokenizer files   copied from the checkpoint
  model.safetensors.index.json   maps the non-expert weights to their shard, so that transformers
  nonexpert.safetensors          loads the store directory like a checkpoint without experts
  experts/L003.int4.safetensors  one shard per (MoE layer, precision): for expert e the tensors
                                 `e.gate_up.data|scale|zero|ranges`, `e.down.data|...` (those its format has;
                                 + `e.gate_up_bias`, `e.down_bias`)
  experts/L003.int4.json         written after its shard: per-expert bytes, errors and digests, sha256, and
                                 the prepare parameters (a resumed prepare skips shards whose sidecar matches)
  dense/L003.int4.safetensors    layer 3's non-expert matrices at int4 (`q_proj.data|scale|...` per module
                                 name), "top": head and embedding (store/dense.py), + sidecar .json
Integrity, at three costs: the manifest holds each shard's sha256 (`inspect --verify` hashes whole shards), a
*stamp* (size + sha256 of the header and three 64 KiB samples: what a load checks, milliseconds per shard), and
each expert's digest (sha256 of its tensors in file order, checked on the expert's first read).
Format 2: per-expert digests and shard stamps; prepare reads each expert once for all precisions. Format 3: the
grouped formats of quant/formats.py (8-bit scale/offset codes, `e.gate_up.ranges`), GPTQ against calibration
Hessians, activation-aware errors; the manifest records each precision's format and the calibration. Format 4:
the non-expert matrices too, at every precision (store/dense.py: `dense/L003.int4.safetensors`, the manifest's
"dense" entry with their bytes, errors, energies and digests), for one budget over every weight.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from pathlib import Path

import torch

from dynaexq.quant.precision import Precision

FORMAT_VERSION = 4
MANIFEST = "manifest.json"
NONEXPERT_INDEX = "model.safetensors.index.json"
MATRICES = ("gate_up", "down")
BIASES = ("gate_up_bias", "down_bias")


def expert_shard(layer: int, precision: Precision) -> str:
    return f"experts/L{layer:03d}.{precision.value}.safetensors"


NONEXPERT_SHARD = "nonexpert.safetensors"


def dense_shard(group: str, precision: Precision) -> str:
    """The shard of one group of non-expert matrices (a decoder layer's, or "top": head and embedding)."""
    return f"dense/{group}.{precision.value}.safetensors"


def is_store(path) -> bool:
    return (Path(path) / MANIFEST).is_file()


@contextlib.contextmanager
def atomic_path(path: Path):
    """with atomic_path(p) as tmp: write tmp -- renamed over `p` when the block ends, deleted if it raises: readers
    never see a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield tmp
        os.chmod(tmp, 0o644)  # mkstemp makes 0600 files
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write(path: Path, write) -> None:
    """Call write(tmp_path), then rename over `path`."""
    with atomic_path(path) as tmp:
        write(tmp)


def atomic_write_json(path: Path, obj) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(obj, indent=1)))


def sha256_file(path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def stamp(path, sample: int = 1 << 16) -> dict:
    """{"size", "sampled"}: the file's size and the sha256 of its safetensors header plus three `sample`-byte reads
    (start, middle and end of the data). Cheap at any size; catches truncation, replacement, most rewrites."""
    p = Path(path)
    size = p.stat().st_size
    h = hashlib.sha256()
    with open(p, "rb") as fh:
        n = int.from_bytes(fh.read(8), "little")
        h.update(fh.read(n))
        for offset in (8 + n, (8 + n + size) // 2, size - sample):
            fh.seek(max(offset, 8 + n))
            h.update(fh.read(sample))
    return {"size": size, "sampled": h.hexdigest()}


def expert_digest(tensors) -> str:
    """sha256 (128 bits, hex) of an expert's tensors in file order: checked when the expert is first read."""
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.contiguous().reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()[:32]
