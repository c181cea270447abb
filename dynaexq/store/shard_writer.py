"""Write a safetensors file whose tensors arrive one at a time.

`safetensors.torch.save_file` needs every tensor in memory at once; for a layer of 128 experts that
is a whole layer (1.2 GB at Qwen3-30B shapes) plus its serialized copy. When the names, dtypes and
shapes are known up front (every expert of a layer is alike; a checkpoint's header lists its
tensors), the header can be written first and each tensor streamed straight to disk. The file is
standard safetensors (8-byte header length, JSON header padded to 8 bytes, raw little-endian data),
read back by `safe_open`; this ~30-line writer is the one place we do not use the library.
"""
from __future__ import annotations

import hashlib
import json
import math

import torch

_DTYPES = {torch.uint8: "U8", torch.int8: "I8", torch.float16: "F16", torch.bfloat16: "BF16",
           torch.float32: "F32", torch.float64: "F64", torch.int16: "I16", torch.int32: "I32",
           torch.int64: "I64", torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2"}
TORCH_DTYPES = {v: k for k, v in _DTYPES.items()}


class StreamingWriter:
    """Write a safetensors file whose tensors arrive one at a time: `write(t)` each tensor of `specs`
    ([(name, torch dtype, shape)], in file order), then `close()` -> the file's sha256, computed while writing."""

    def __init__(self, path, specs, metadata: dict[str, str]):
        header: dict = {"__metadata__": metadata}
        offset = 0
        for name, dtype, shape in specs:
            nbytes = dtype.itemsize * math.prod(shape)
            header[name] = {"dtype": _DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        head = json.dumps(header, separators=(",", ":")).encode()
        head += b" " * (-len(head) % 8)
        self._specs, self.total, self.written = iter(specs), offset, 0
        self.digest = hashlib.sha256()
        self.fh = open(path, "wb")
        for chunk in (len(head).to_bytes(8, "little"), head):
            self._put(chunk)

    def _put(self, data) -> None:
        self.fh.write(data)
        self.digest.update(data)

    def write(self, t: torch.Tensor) -> None:
        name, dtype, shape = next(self._specs)
        assert t.dtype == dtype and tuple(t.shape) == tuple(shape), (name, t.dtype, t.shape, dtype, shape)
        data = t.contiguous().reshape(-1).view(torch.uint8).numpy()
        self._put(data)
        self.written += data.nbytes

    def close(self) -> str:
        self.fh.close()
        assert self.written == self.total, (self.written, self.total)
        return self.digest.hexdigest()


def write_streaming(path, specs, tensors, metadata: dict[str, str]) -> str:
    """specs: [(name, torch dtype, shape)] in file order; tensors: an iterable yielding them in that order.
    Returns the sha256 of the file, computed while writing."""
    w = StreamingWriter(path, specs, metadata)
    try:
        for t in tensors:
            w.write(t)
    finally:
        w.fh.close()
    return w.close()
