"""Read one expert version from the store with real disk I/O: the offload tier's reader.

A store shard lays an expert's tensors one after the other (store/prepare.py writes them expert by expert), so a
version is one contiguous byte range of its shard: one read. `DirectReader.read(layer, e, precision)` reads that
range (rounded out to 4 KiB) into a page-aligned buffer and returns the same dict as `StoreReader.read_expert`
(tensors viewing the buffer; the digest checked on the first read as there).
Modes, so that the page cache does not quietly hold the store the budget says is not resident:
  direct    `O_DIRECT`: the read goes to the disk, never through the page cache (the default where the file
            system takes it);
  buffered  a plain read followed by `posix_fadvise(DONTNEED)` on the range (for file systems without O_DIRECT:
            tmpfs, some overlays); the pages are dropped after each read;
  cached    plain reads, pages kept (what a machine with RAM to spare for the page cache would do; not the
            offload figure).
Reads release the GIL, so a pool of reader threads overlaps them with the forward pass. Bytes, reads and
seconds are counted. Nothing here knows which expert should be resident.
"""
from __future__ import annotations

import json
import mmap
import os
import threading
import time

import torch

from dynaexq.errors import UserError
from dynaexq.store import layout
from dynaexq.store.shard_writer import TORCH_DTYPES

MODES = ("direct", "buffered", "cached")
ALIGN = 4096  # O_DIRECT needs offset, length and buffer aligned to the logical block size (4 KiB covers it)


class DirectReader:
    def __init__(self, reader, mode: str = "direct"):
        if mode not in MODES:
            raise UserError(f"offload I/O mode must be one of {', '.join(MODES)}, got {mode!r}")
        self.reader, self.requested = reader, mode
        self.mode = mode  # may become "buffered" when the file system refuses O_DIRECT (said once on stderr)
        self._shards: dict[str, tuple[int, dict]] = {}  # name -> (fd, {expert: (start, end, {key: entry})})
        self._lock = threading.Lock()
        self._active = 0  # reads in progress: `close` never closes a file under one
        self._closed = False
        self.stats = {"reads": 0, "bytes": 0, "seconds": 0.0}

    def _shard(self, name: str):
        with self._lock:
            if name not in self._shards:
                self._shards[name] = self._open(name)
            return self._shards[name]

    def _open(self, name: str):
        path = self.reader.path / name
        fd = None
        if self.mode == "direct":
            try:
                fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECT", 0))
            except OSError as err:
                if not path.is_file():
                    raise UserError(f"store shard {str(path)!r} is missing; prepare the store again") from None
                import sys
                print(f"dynaexq: {path.parent} does not take O_DIRECT ({err.strerror}); offload reads drop the page "
                      "cache after each read instead (buffered)", file=sys.stderr)
                self.mode = "buffered"
        if fd is None:
            try:
                fd = os.open(path, os.O_RDONLY)
            except OSError as err:
                raise UserError(f"store shard {str(path)!r} cannot be opened ({err.strerror})") from None
        with open(path, "rb") as fh:  # the safetensors header: 8-byte length, JSON
            n = int.from_bytes(fh.read(8), "little")
            header = json.loads(fh.read(n))
        header.pop("__metadata__", None)
        experts: dict[int, list] = {}
        for key, entry in header.items():
            e = int(key.split(".", 1)[0])
            start, end = (8 + n + o for o in entry["data_offsets"])
            lo, hi, keys = experts.setdefault(e, [start, end, {}])
            experts[e][0], experts[e][1] = min(lo, start), max(hi, end)
            keys[key] = (TORCH_DTYPES[entry["dtype"]], tuple(entry["shape"]), start)
        return fd, experts

    def nbytes(self, layer: int, e: int, precision) -> int:
        """Bytes one read of this version moves (its range, rounded out to 4 KiB)."""
        _, experts = self._shard(layout.expert_shard(layer, precision))
        lo, hi, _ = experts[e]
        return -(-hi // ALIGN) * ALIGN - lo // ALIGN * ALIGN

    def read(self, layer: int, e: int, precision) -> dict:
        self.reader._check(layer, precision)
        with self._lock:
            if self._closed:
                raise OSError(f"the store reader is closed (expert {e} of layer {layer} at {precision.value})")
            self._active += 1
        try:
            return self._read(layer, e, precision)
        finally:
            with self._lock:
                self._active -= 1
                if self._closed and not self._active:  # the last read after close closes the files
                    self._close_files()

    def _read(self, layer: int, e: int, precision) -> dict:
        fd, experts = self._shard(layout.expert_shard(layer, precision))
        lo, hi, keys = experts[e]
        a0, a1 = lo // ALIGN * ALIGN, -(-hi // ALIGN) * ALIGN
        buf = mmap.mmap(-1, a1 - a0)  # anonymous: page-aligned, as O_DIRECT wants
        t0 = time.perf_counter()
        got = 0
        while got < hi - a0:  # a read may return short (signals, the end of the file)
            n = os.preadv(fd, [memoryview(buf)[got:]], a0 + got)
            if n <= 0:
                raise OSError(f"short read of expert {e} of layer {layer} at {precision.value}: {got} of "
                              f"{hi - a0} bytes")
            got += n
        if self.mode == "buffered":
            os.posix_fadvise(fd, a0, a1 - a0, os.POSIX_FADV_DONTNEED)
        dt = time.perf_counter() - t0
        with self._lock:
            self.stats["reads"] += 1
            self.stats["bytes"] += a1 - a0
            self.stats["seconds"] += dt
        raw = torch.frombuffer(buf, dtype=torch.uint8)  # holds `buf` alive for the views below

        def get(key):
            dtype, shape, start = keys[key]
            count = dtype.itemsize * (int(torch.Size(shape).numel()))
            return raw[start - a0:start - a0 + count].view(dtype).view(shape)

        return self.reader._assemble(layer, e, precision, keys, get)

    def close(self) -> None:
        """Close the store's files now, or, while reads are in progress, when the last of them ends."""
        with self._lock:
            self._closed = True
            if not self._active:
                self._close_files()

    def _close_files(self) -> None:  # lock held
        for fd, _ in self._shards.values():
            os.close(fd)
        self._shards.clear()
