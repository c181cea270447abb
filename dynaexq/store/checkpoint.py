"""Read a Hugging Face checkpoint directory (config.json + one or sharded safetensors) lazily.

`get(key, e)` reads one tensor, or only row `e` of a fused [E, ...] tensor, through
`safe_open(...).get_slice` so that a 60 GB checkpoint streams in bounded memory. Problems a user can
fix (missing directory, no config, truncated or corrupted shards) raise UserError naming the file.
"""
from __future__ import annotations

import hashlib
import json
import math
from functools import cached_property
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from dynaexq.errors import UserError

INDEX = "model.safetensors.index.json"


class Checkpoint:
    def __init__(self, path):
        self.path = Path(path)
        if not self.path.is_dir():
            raise UserError(f"checkpoint directory {str(self.path)!r} does not exist; give a directory holding a "
                            "Hugging Face checkpoint (config.json and *.safetensors) or a dynaexq store")
        cfg = self.path / "config.json"
        if not cfg.is_file():
            raise UserError(f"{str(self.path)!r} has no config.json: it is neither a Hugging Face checkpoint nor a "
                            "dynaexq store (which has manifest.json)")
        self.config = json.loads(cfg.read_text())
        self._handles: dict[str, object] = {}

    @cached_property
    def key_file(self) -> dict[str, str]:
        """Tensor name -> shard file name (read lazily: the config alone answers 'which architecture')."""
        index = self.path / INDEX
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            for f in sorted(set(weight_map.values())):
                if not (self.path / f).is_file():
                    raise UserError(f"{INDEX} in {str(self.path)!r} names shard {f!r}, which is missing")
            files = sorted(set(weight_map.values()))
        else:
            files = sorted(p.name for p in self.path.glob("*.safetensors"))
            if not files:
                raise UserError(f"{str(self.path)!r} holds no *.safetensors weights (only safetensors "
                                "checkpoints are supported; convert .bin checkpoints with transformers first)")
        out = {}
        for f in files:
            for key in self._open(f).keys():
                out[key] = f
        return out

    def _open(self, name: str):
        handle = self._handles.get(name)
        if handle is None:
            try:
                handle = safe_open(str(self.path / name), "pt")
            except (SafetensorError, OSError) as err:
                raise UserError(f"safetensors file {str(self.path / name)!r} is truncated or corrupted ({err}); "
                                "re-download or re-save the checkpoint") from None
            self._handles[name] = handle
        return handle

    def close(self):
        """Drop the open memory maps (their touched pages would otherwise count as resident)."""
        self._handles.clear()

    def keys(self):
        return self.key_file.keys()

    def files(self) -> list[str]:
        return sorted(set(self.key_file.values()))

    def get(self, key: str, e: int | None = None) -> torch.Tensor:
        handle = self._open(self.key_file[key])
        try:
            return handle.get_tensor(key) if e is None else handle.get_slice(key)[e]
        except SafetensorError as err:
            raise UserError(f"cannot read {key!r} from {self.key_file[key]!r}: {err}") from None

    def spec(self, key: str) -> tuple[torch.dtype, list[int]]:
        """(dtype, shape) of a tensor, from the header alone."""
        from dynaexq.store.shard_writer import TORCH_DTYPES

        sl = self._open(self.key_file[key]).get_slice(key)
        return TORCH_DTYPES[sl.get_dtype()], sl.get_shape()

    def nbytes(self, key: str) -> int:
        dtype, shape = self.spec(key)
        return dtype.itemsize * math.prod(shape)

    def dtype(self) -> torch.dtype:
        """Dtype of the first floating tensor (the checkpoint's own dtype)."""
        for key in self.key_file:
            dtype = self.spec(key)[0]
            if dtype.is_floating_point:
                return dtype
        return torch.float32

    def fingerprint(self, sample: int = 1 << 20) -> dict:
        """What identifies this checkpoint cheaply: config hash, and per shard its size and the sha256 of
        its header plus three 1 MiB samples of its data (start, middle, end) -- two checkpoints of the
        same shapes differ there, and hashing 60 GB in full on every load would take minutes."""
        files = {}
        for f in self.files():
            p = self.path / f
            size = p.stat().st_size
            h = hashlib.sha256()
            with open(p, "rb") as fh:
                n = int.from_bytes(fh.read(8), "little")
                h.update(fh.read(n))
                for offset in (8 + n, (8 + n + size) // 2, size - sample):
                    fh.seek(max(offset, 8 + n))
                    h.update(fh.read(sample))
            files[f] = {"size": size, "sha256_sampled": h.hexdigest()}
        cfg = hashlib.sha256((self.path / "config.json").read_bytes()).hexdigest()
        return {"config_sha256": cfg, "files": files}

