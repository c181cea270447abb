"""The transition engine: moves expert versions between slots in the background, publish-before-reclaim.

A pair (demote a: hi -> lo, promote b: lo -> hi) of one layer runs as:
  0. read both new versions from the store (transient host memory): an I/O error here changes nothing, the
     previous versions keep serving and the pair is retried (then reported, and `on_failed` undoes the target);
  1. a's lo version into a staging slot -> publish;     2. once a's old hi slot is unread: b's hi version there
  -> publish;  3. once b's old lo slot is unread: a's lo version (from staging) there -> publish;  4. once the
  staging slot is unread, it goes back. Every publish swaps in a complete version; every reclaim waits for the
  leases of readers that may hold the old one (runtime/table.py) -- the waiting is the worker's, never the
  forward pass's. A single `move` (change one expert's precision within its pool) is steps 1 and 3.
`workers` threads run pairs concurrently (at most K = staging slots; on the CPU one, since the copies share the
cores with the forward pass); pairs that share an expert run in submission order.
CUDA: new versions are laid into their slots on a dedicated copy stream and published only after the copy's
event completes (UNVERIFIED on a GPU so far). `blocking=True` runs every pair inline at submit (the ablation).
"""
from __future__ import annotations

import itertools
import threading
import time
from collections import deque

import torch

from dynaexq.runtime.pool import STAGING
from dynaexq.runtime.version import place, slot_layout


class TransitionEngine:
    def __init__(self, table, pools, make, workers: int = 4, blocking: bool = False, retries: int = 2,
                 device="cpu"):
        self.table, self.pools, self.make = table, pools, make  # make(layer, e, precision) -> ExpertVersion
        self.blocking, self.retries = blocking, retries
        self.on_failed = None  # callback(pair) once a pair is given up
        self.stats = {"pairs": 0, "promotions": 0, "demotions": 0, "moves": 0, "deferrals": 0, "failures": 0,
                      "retries": 0, "bytes_moved": 0, "busy_s": 0.0, "errors": []}
        self._stats_lock = threading.Lock()
        self._numbers = itertools.count(1)
        self._queue: deque = deque()  # (pair, attempt)
        self._busy: set = set()  # (layer, expert) of the pairs in flight
        self._cond = threading.Condition()
        self._closed = False
        self.copy_stream = torch.cuda.Stream() if torch.device(device).type == "cuda" else None
        self._threads = [] if blocking else [threading.Thread(target=self._worker, name=f"dynaexq-transition-{i}",
                                                              daemon=True) for i in range(workers)]
        for t in self._threads:
            t.start()

    # --- submission ------------------------------------------------------------------------------------------
    def reset_stats(self) -> None:
        with self._stats_lock:
            self.stats.update({k: ([] if k == "errors" else 0) for k in self.stats})

    def submit(self, pairs) -> None:
        if self.blocking:
            for pair in pairs:
                self._attempt(pair, 0)
            return
        with self._cond:
            self._queue.extend((pair, 0) for pair in pairs)
            self._cond.notify_all()

    def in_flight(self) -> int:
        return len(self._busy) // 2

    def pending(self) -> int:
        return len(self._queue)

    def drain(self, timeout: float = 120.0) -> None:
        """Wait until every submitted pair is done or given up."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._queue or self._busy:
                if not self._cond.wait(max(0.0, deadline - time.monotonic())) and time.monotonic() >= deadline:
                    raise TimeoutError(f"transitions not drained after {timeout} s")

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._queue.clear()
            self._cond.notify_all()
        for t in self._threads:
            t.join()

    # --- workers ---------------------------------------------------------------------------------------------
    def _next(self):
        """The first queued pair whose experts are neither in flight nor in an earlier queued pair."""
        blocked = set(self._busy)
        for i, (pair, attempt) in enumerate(self._queue):
            keys = {(pair.layer, pair.demote), (pair.layer, pair.promote)}
            if not keys & blocked:
                del self._queue[i]
                self._busy |= keys
                return pair, attempt
            blocked |= keys
        if self._queue:
            self._count("deferrals")
        return None

    def _worker(self) -> None:
        torch.set_num_threads(1)  # per thread: the copies must not take the forward pass's OpenMP cores
        while True:
            with self._cond:
                job = None
                while not self._closed and (job := self._next()) is None:
                    self._cond.wait()
                if self._closed:
                    return
            try:
                self._attempt(*job)
            except Exception:
                pass  # recorded in stats["errors"] as FATAL; the runtime's check() reports the state
            finally:
                with self._cond:
                    self._busy -= {(job[0].layer, job[0].demote), (job[0].layer, job[0].promote)}
                    self._cond.notify_all()

    def _attempt(self, pair, attempt: int) -> None:
        t0 = time.perf_counter()
        while True:
            try:  # step 0: everything that can fail on I/O happens before the first publish
                va = self.make(pair.layer, pair.demote, pair.lo)
                vb = self.make(pair.layer, pair.promote, pair.hi)
                break
            except Exception as err:  # nothing was published: the previous versions keep serving
                self._count("failures")
                if attempt >= self.retries:
                    self.stats["errors"].append(f"{pair}: {type(err).__name__}: {err}")
                    if self.on_failed is not None:
                        self.on_failed(pair)
                    return
                self._count("retries")
                attempt += 1
                if not self.blocking:  # retry later, behind what is queued now
                    with self._cond:
                        self._queue.append((pair, attempt))
                        self._cond.notify_all()
                    return
        try:
            self._swap(pair, va, vb)
        except Exception as err:  # a bug or a reader that never leaves: say so loudly, keep the worker alive
            self.stats["errors"].append(f"FATAL {pair}: {type(err).__name__}: {err}")
            raise
        finally:
            self._count("busy_s", time.perf_counter() - t0)

    def _count(self, name: str, n=1) -> None:
        with self._stats_lock:
            self.stats[name] += n

    def _swap(self, pair, va, vb) -> None:
        layer, a, b = pair.layer, pair.demote, pair.promote
        st = self._take(STAGING)
        old_a = self._publish_into(layer, a, va, (STAGING, st))  # 1. a at lo, in staging
        assert old_a.slot[0] == (layer, pair.hi), (old_a.slot, pair)
        self.pools.reuse(*old_a.slot)
        old_b = self._publish_into(layer, b, vb, old_a.slot)  # 2. b at hi, in a's old slot
        assert old_b.slot[0] == (layer, pair.lo), (old_b.slot, pair)
        self.pools.reuse(*old_b.slot)
        staged = self._publish_into(layer, a, self.table.get(layer, a), old_b.slot)  # 3. a into b's old slot
        self.pools.reclaim(*staged.slot)  # 4. staging back
        for name in ("pairs", "promotions", "demotions"):
            self._count(name)

    def move(self, layer: int, e: int, precision) -> None:
        """Change one expert's version within its own pool (its slot must be large enough), through staging."""
        v = self.make(layer, e, precision)
        old = self.table.get(layer, e)
        if old is None or old.slot is None:  # first install: a fresh slot of the expert's pool
            key = (layer, precision)
            i = self._take(key)
            self._publish_into(layer, e, v, (key, i))
            return
        st = self._take(STAGING)
        old = self._publish_into(layer, e, v, (STAGING, st))
        self.pools.reuse(*old.slot)
        staged = self._publish_into(layer, e, self.table.get(layer, e), old.slot)
        self.pools.reclaim(*staged.slot)
        self._count("moves")

    def _take(self, key) -> int:
        """A slot of pool `key`; waits (deferral) while none is free -- only workers ever wait here."""
        while (i := self.pools.take(key)) is None:
            self._count("deferrals")
            time.sleep(0.0005)
        return i

    def _publish_into(self, layer: int, e: int, version, slot):
        """Lay `version` into the reserved `slot`, publish it, wait until the replaced version is unread -> it."""
        key, i = slot
        if self.copy_stream is not None:
            with torch.cuda.stream(self.copy_stream):
                new = place(version, self.pools.slot(key, i), next(self._numbers), slot, non_blocking=True)
                done = torch.cuda.Event()
                done.record(self.copy_stream)
            done.synchronize()  # publish only complete bytes
        else:
            new = place(version, self.pools.slot(key, i), next(self._numbers), slot)
        self.pools.commit(key)
        self._count("bytes_moved", slot_layout(new)[1])
        old, retired_at = self.table.publish(layer, e, new)
        self.table.wait_unread(retired_at)
        return old
