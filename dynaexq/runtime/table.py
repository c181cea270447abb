"""ExpertTable: (layer, expert) -> the published ExpertVersion, with read leases that make reclaiming safe.

`publish` is the only mutator: one list-item assignment (atomic for every reader, which copies the layer's list
once per forward) under the table lock, then the epoch advances. Each ExpertBank forward holds a read lease for
the time it reads its snapshot: `acquire()` returns the current epoch, `release(epoch)` ends the lease. A version
replaced at epoch r may still be read by leases taken at epochs <= r, so its slot is handed back only once none
of those is active (`wait_unread(r)`; fetch workers wait there, a forward pass never does). On CUDA a
lease ends when the compute stream has passed the point where the forward released it (an event), not when
Python returned; forwards run on one compute stream, so its events complete in order: completed ones are dropped
at every release and a newer event of the same epoch replaces the older one (the list stays a few entries long).
The lists are the banks' own `versions` lists: the table holds them, it never imports a bank.
"""
from __future__ import annotations

import threading
import time
from collections import deque

import torch


class ExpertTable:
    def __init__(self, versions: dict, device="cpu", event=None):
        self.versions = versions  # layer -> list[ExpertVersion | None] (the banks' lists)
        # CUDA: a lease ends when an event recorded at release completes (`event`: torch.cuda.Event, or a fake)
        self._event = event or (torch.cuda.Event if torch.device(device).type == "cuda" else None)
        self.epoch = 0
        self.readers: dict[int, int] = {}  # epoch at acquire -> active leases
        self._gpu_leases: deque = deque()  # (epoch, event) of leases whose kernels may still run, in record order
        self._cond = threading.Condition()
        self.published = 0
        self.lease_wait_s = 0.0  # time forward passes waited for the table lock (held by a publish or a reclaim)

    # --- readers (the forward pass) -----------------------------------------------------------------------
    def _lock(self) -> None:
        if not self._cond.acquire(blocking=False):  # contended: measure the wait (the only one a forward can have)
            t0 = time.perf_counter()
            self._cond.acquire()
            self.lease_wait_s += time.perf_counter() - t0

    def acquire(self) -> int:
        self._lock()
        try:
            e = self.epoch
            self.readers[e] = self.readers.get(e, 0) + 1
        finally:
            self._cond.release()
        return e

    def release(self, epoch: int) -> None:
        event = None
        if self._event is not None:
            event = self._event()
            event.record()  # on the current (compute) stream: the lease lasts until its kernels are done
        self._lock()
        try:
            if event is not None:  # bounded: one entry per epoch whose kernels may still run
                self._prune()
                if self._gpu_leases and self._gpu_leases[-1][0] == epoch:
                    self._gpu_leases[-1] = (epoch, event)  # later on the same stream: it completes last
                else:
                    self._gpu_leases.append((epoch, event))
            self.readers[epoch] -= 1
            if not self.readers[epoch]:
                del self.readers[epoch]
            self._cond.notify_all()
        finally:
            self._cond.release()

    # --- the mutator ---------------------------------------------------------------------------------------
    def publish(self, layer: int, e: int, version) -> tuple[object, int]:
        """Make `version` the one forward passes read for (layer, e) -> (the replaced version, its retire epoch)."""
        with self._cond:
            old = self.versions[layer][e]
            self.versions[layer][e] = version
            retired_at = self.epoch
            self.epoch += 1
            self.published += 1
        return old, retired_at

    def get(self, layer: int, e: int):
        return self.versions[layer][e]

    # --- reclaim (fetch workers) -------------------------------------------------------------------------------
    def _unread(self, retired_at: int) -> bool:
        """True once no lease that could have read a version retired at `retired_at` is active (lock held)."""
        self._prune()
        return all(ep > retired_at for ep in self.readers) and all(ep > retired_at for ep, _ in self._gpu_leases)

    def _prune(self) -> None:
        """Drop the leases whose events completed (lock held); events of one stream complete in order."""
        while self._gpu_leases and self._gpu_leases[0][1].query():
            self._gpu_leases.popleft()

    def unread(self, retired_at: int) -> bool:
        """Whether a version retired at `retired_at` can be reclaimed now (no waiting)."""
        with self._cond:
            return self._unread(retired_at)

    def wait_unread(self, retired_at: int, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        with self._cond:
            while not self._unread(retired_at):
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"a version retired at epoch {retired_at} is still read after {timeout} s")
                self._cond.wait(min(left, 0.001 if self._gpu_leases else left))

    def check(self, pools=None, quiescent: bool = True, absent: bool = False) -> None:
        """Every expert published exactly once (or, with `absent`, the offload regime: not resident), no slot
        holds two; with pools, every published slot is taken and, when no transition is in flight
        (`quiescent`), the taken slots are exactly the published ones."""
        seen = {}
        for layer, lst in self.versions.items():
            for e, v in enumerate(lst):
                assert v is not None or absent, f"expert ({layer}, {e}) has no published version"
                if v is not None and v.slot is not None:
                    assert v.slot not in seen, f"slot {v.slot} holds ({layer}, {e}) and {seen[v.slot]}"
                    seen[v.slot] = (layer, e)
        if pools is not None:
            for key, pool in pools.pools.items():
                taken = pool.in_use()
                published = {i for (k, i) in seen if k == key}
                assert published <= taken, f"pool {key}: published slots {published - taken} are not taken"
                assert not quiescent or published == taken, f"pool {key}: slots {taken - published} taken, unpublished"
