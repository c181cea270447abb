"""One fetch, the residency's unit of work (runtime/residency.py): which expert at which precision, its priority,
and how it ends (done, or an error); the copy stream CUDA fetches build and copy on."""
from __future__ import annotations

import threading

import torch

DEMAND, RELOCATE, PREFETCH, BACKGROUND = 0, 1, 2, 3  # priorities: a miss first, then freeing a staging slot
KINDS = {DEMAND: "misses", RELOCATE: "relocations", PREFETCH: "prefetches", BACKGROUND: "fetches"}


class FetchError(RuntimeError):
    """An expert that could not be made resident: its message says what happened."""

    def __init__(self, key, message: str):
        super().__init__(f"expert {key[1]} of layer {key[0]} {message}")
        self.key = key


class CopyStream:
    """CUDA: the stream fetches build and copy versions on; `synchronize` before a publish."""

    def __init__(self, device):
        self.stream = torch.cuda.Stream(device=device)

    def use(self):
        return torch.cuda.stream(self.stream)

    def synchronize(self) -> None:
        self.stream.synchronize()


class Fetch:
    """One expert to make resident at one precision, queued by priority, then submission order."""

    def __init__(self, key, precision, priority, seq):
        self.key, self.precision, self.priority, self.seq = key, precision, priority, seq
        self.done = threading.Event()
        self.error: Exception | None = None
        self.fallback = False  # an expert moved out of staging by `_unstick`: not followed up to its target

    def __lt__(self, other):
        return (self.priority, self.seq) < (other.priority, other.seq)
