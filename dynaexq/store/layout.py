"""The on-disk layout of an expert store, and atomic file writing.

STORE/
  manifest.json                  written last: a store without it is incomplete (prepare resumes)
  config.json, tokenizer files   copied from the checkpoint
  model.safetensors.index.json   maps the non-expert weights to their shard, so that transformers
  nonexpert.safetensors          loads the store directory like a checkpoint without experts
  experts/L003.int4.safetensors  one shard per (MoE layer, precision): for expert e the tensors
                                 `e.gate_up.data|scale|zero`, `e.down.data|scale|zero` (+ `e.gate_up_bias`,
                                 `e.down_bias`)
  experts/L003.int4.json         written after its shard: per-expert bytes and errors, sha256, and the
                                 prepare parameters (a resumed prepare skips shards whose sidecar matches)
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

from dynaexq.quant.precision import Precision

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
NONEXPERT_INDEX = "model.safetensors.index.json"
MATRICES = ("gate_up", "down")
BIASES = ("gate_up_bias", "down_bias")


def expert_shard(layer: int, precision: Precision) -> str:
    return f"experts/L{layer:03d}.{precision.value}.safetensors"


NONEXPERT_SHARD = "nonexpert.safetensors"


def is_store(path) -> bool:
    return (Path(path) / MANIFEST).is_file()


def atomic_write(path: Path, write) -> None:
    """Call write(tmp_path), then rename over `path`: readers never see a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600 files
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_json(path: Path, obj) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(obj, indent=1)))


def sha256_file(path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()
