"""Read a Hugging Face checkpoint directory (config.json + one or sharded safetensors) lazily.

`get(key, e)` reads one tensor, or only row `e` of a fused [E, ...] tensor, through
`safe_open(...).get_slice` so that a 60 GB checkpoint streams in bounded memory. Problems a user can
fix (missing directory, no config, truncated or corrupted shards) raise UserError naming the file.
Block-scaled FP8 (DeepSeek-V3's release: `X.weight` float8_e4m3fn + `X.weight_scale_inv` float32, one scale per
`weight_block_size` block, in config.quantization_config) is dequantized on read, with transformers' own
fine-grained FP8 dequantizer, to the checkpoint's other floating dtype: `keys()` hides the scales and `spec()`
reports the dequantized dtype, so every reader above sees a plain checkpoint. A dtype that cannot be read (FP8
without scales, FP4, ...) is refused naming the tensor.
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
from dynaexq.store.layout import stamp

INDEX = "model.safetensors.index.json"
_FP8 = {torch.float8_e4m3fn: "float8_e4m3fn", torch.float8_e5m2: "float8_e5m2"}


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

    @cached_property
    def fp8_scales(self) -> dict[str, str]:
        """FP8 weight key -> its `weight_scale_inv` key (block-scaled FP8 checkpoints; empty otherwise)."""
        return {k.removesuffix("_scale_inv"): k for k in self.key_file if k.endswith(".weight_scale_inv")}

    @property
    def fp8_block(self) -> list[int]:
        return list(self.config.get("quantization_config", {}).get("weight_block_size") or [128, 128])

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
        """Tensor names, without FP8 scales (they are folded into their weights on read)."""
        scales = set(self.fp8_scales.values())
        return [k for k in self.key_file if k not in scales]

    def files(self) -> list[str]:
        return sorted(set(self.key_file.values()))

    def _raw(self, key: str, e: int | None) -> torch.Tensor:
        handle = self._open(self.key_file[key])
        try:
            return handle.get_tensor(key) if e is None else handle.get_slice(key)[e]
        except SafetensorError as err:
            raise UserError(f"cannot read {key!r} from {self.key_file[key]!r}: {err}") from None

    def get(self, key: str, e: int | None = None) -> torch.Tensor:
        dtype, _ = self.spec(key)  # refuses what cannot be read
        t = self._raw(key, e)
        if key in self.fp8_scales:
            from transformers.integrations.finegrained_fp8 import _dequantize_fp8_weight

            scale = self._raw(self.fp8_scales[key], e)  # in float32: one rounding, to the target dtype
            t = _dequantize_fp8_weight(t, scale, self.fp8_block, torch.float32).to(dtype)
        return t

    def spec(self, key: str) -> tuple[torch.dtype, list[int]]:
        """(dtype, shape) of a tensor as `get` returns it, from the header alone."""
        from dynaexq.store.shard_writer import TORCH_DTYPES

        sl = self._open(self.key_file[key]).get_slice(key)
        dtype = TORCH_DTYPES.get(sl.get_dtype())
        if key in self.fp8_scales:
            return self._plain_dtype, sl.get_shape()
        if dtype is None or dtype in _FP8:
            raise UserError(f"tensor {key!r} in {self.key_file[key]!r} has dtype "
                            f"{_FP8.get(dtype, sl.get_dtype())} without a {key.removesuffix('weight')}weight_scale_inv "
                            "block scale: dynaexq reads bf16/fp16/fp32 checkpoints, block-scaled FP8 (weight + "
                            "weight_scale_inv, as DeepSeek-V3 ships) and MXFP4 GPT-OSS; convert this one to bf16 first")
        return dtype, sl.get_shape()

    @cached_property
    def _plain_dtype(self) -> torch.dtype:
        """What FP8 weights are dequantized to: the dtype of the checkpoint's other floating tensors (bf16 if none)."""
        from dynaexq.store.shard_writer import TORCH_DTYPES

        scales = set(self.fp8_scales.values())
        for key in self.key_file:
            if key in self.fp8_scales or key in scales:
                continue
            dtype = TORCH_DTYPES.get(self._open(self.key_file[key]).get_slice(key).get_dtype())
            if dtype is not None and dtype.is_floating_point and dtype not in _FP8:
                return dtype
        return torch.bfloat16

    def quantization(self) -> str | None:
        """How the checkpoint's weights are stored, when not plainly (for `inspect`)."""
        if self.fp8_scales:
            return (f"fp8 e4m3 with {'x'.join(map(str, self.fp8_block))} block scales on {len(self.fp8_scales)} "
                    f"tensors (prepare dequantizes them to {str(self._plain_dtype).removeprefix('torch.')})")
        q = self.config.get("quantization_config", {}).get("quant_method")
        return f"{q} (experts dequantized by prepare)" if q == "mxfp4" else q

    def nbytes(self, key: str) -> int:
        """Bytes of a tensor on disk (an FP8 weight: its codes plus its scales)."""
        from dynaexq.store.shard_writer import TORCH_DTYPES

        keys = [key] + ([self.fp8_scales[key]] if key in self.fp8_scales else [])
        slices = [self._open(self.key_file[k]).get_slice(k) for k in keys]
        return sum(TORCH_DTYPES[sl.get_dtype()].itemsize * math.prod(sl.get_shape()) for sl in slices)

    def dtype(self) -> torch.dtype:
        """Dtype of the first floating tensor (the checkpoint's own dtype; FP8 ones count as what they read as)."""
        for key in self.keys():
            dtype = self.spec(key)[0]
            if dtype.is_floating_point:
                return dtype
        return torch.float32

    def fingerprint(self, sample: int = 1 << 20) -> dict:
        """What identifies this checkpoint cheaply: config hash, and per shard its size and the sha256 of
        its header plus three 1 MiB samples of its data (start, middle, end) -- two checkpoints of the
        same shapes differ there, and hashing 60 GB in full on every load would take minutes."""
        files = {f: stamp(self.path / f, sample) for f in self.files()}
        cfg = hashlib.sha256((self.path / "config.json").read_bytes()).hexdigest()
        return {"config_sha256": cfg, "files": files}

