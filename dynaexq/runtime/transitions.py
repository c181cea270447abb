"""The transition engine: moves expert versions between slots in the background, publish-before-reclaim.

A pair (demote a: hi -> lo, promote b: lo -> hi; a and b may be of different layers: a tier's slots serve every
layer) runs as:
  0. check the pair against the *published* table (its demoted expert at hi, its promoted one at lo; a pair planned
     on one that failed is cancelled here), then read both new versions from the store (transient host memory):
     an I/O error here changes nothing, the previous versions keep serving and the pair is retried in its place
     (then given up: it and every queued pair sharing an expert with it are reported, `take_failed`, and the
     controller re-syncs its target on its own thread);
  1. a's lo version into a staging slot -> publish;     2. once a's old hi slot is unread: b's hi version there
  -> publish;  3. once b's old lo slot is unread: a's lo version (from staging) there -> publish;  4. once the
  staging slot is unread, it goes back. Every publish swaps in a complete version; every reclaim waits for the
  leases of readers that may hold the old one (runtime/table.py) -- the waiting is the worker's, never the
  forward pass's. A single `move` (change one expert's precision within its pool) is steps 1 and 3.
`workers` threads run pairs concurrently (at most K = staging slots; on the CPU one, since the copies share the
cores with the forward pass); pairs that share an expert run in submission order, retries included. Waiting for a
slot has a deadline and ends at `close()`; both give the pair up before its first publish.
CUDA: versions are built (`make`) and laid into their slots on one dedicated copy stream, so the copy follows the
build, and are published only after that stream's work completes (UNVERIFIED on a GPU so far).
`blocking=True` runs every pair inline at submit (the ablation).
"""
from __future__ import annotations

import bisect
import contextlib
import itertools
import threading
import time
from collections import deque
from dataclasses import dataclass, field

import torch

from dynaexq.runtime.pool import STAGING, Pools
from dynaexq.runtime.version import place, slot_layout
from dynaexq.threads import limit_this_thread


class CopyStream:
    """CUDA: the stream transitions build and copy versions on; `synchronize` before a publish."""

    def __init__(self, device):
        self.stream = torch.cuda.Stream(device=device)

    def use(self):
        return torch.cuda.stream(self.stream)

    def synchronize(self) -> None:
        self.stream.synchronize()


class Closed(Exception):
    """The engine was closed while a pair waited for a slot (nothing of that pair was published)."""


def _errors() -> deque:
    return deque(maxlen=256)  # the latest error messages (bounded: a flaky store must not grow memory)


@dataclass(order=True)
class _Job:
    seq: int  # submission order: pairs that share an expert run in this order, retries included
    pair: object = field(compare=False)
    attempt: int = field(default=0, compare=False)
    not_before: float = field(default=0.0, compare=False)  # a retry waits a little (the store may recover)

    @property
    def keys(self) -> set:
        return {(self.pair.layer, self.pair.demote), (self.pair.promote_layer, self.pair.promote)}


class TransitionEngine:
    RETRY_BACKOFF_S = 0.05  # x attempt
    TAKE_TIMEOUT_S = 30.0  # a pair that cannot get a slot for this long is given up (before its first publish)

    def __init__(self, table, pools, make, workers: int = 4, blocking: bool = False, retries: int = 2,
                 copy_stream=None):
        self.table, self.pools, self.make = table, pools, make  # make(layer, e, precision) -> ExpertVersion
        self.blocking, self.retries = blocking, retries
        self.copy_stream = copy_stream  # CUDA: a CopyStream (make and place run on it); None on the CPU
        self.stats = {"pairs": 0, "promotions": 0, "demotions": 0, "moves": 0, "deferrals": 0, "failures": 0,
                      "retries": 0, "cancelled": 0, "bytes_moved": 0, "busy_s": 0.0, "errors": _errors()}
        self._stats_lock = threading.Lock()
        self._numbers = itertools.count(1)  # version numbers
        self._seqs = itertools.count()
        self._queue: list[_Job] = []  # sorted by seq
        self._running: dict[int, _Job] = {}  # seq -> the jobs in flight
        self._busy: set = set()  # (layer, expert) of the jobs in flight
        self._failed: deque = deque()  # layers of pairs given up, for the controller to re-sync its target
        self._cond = threading.Condition()
        self._closed = False
        self._threads = [] if blocking else [threading.Thread(target=self._worker, name=f"dynaexq-transition-{i}",
                                                              daemon=True) for i in range(workers)]
        for t in self._threads:
            t.start()

    # --- submission ------------------------------------------------------------------------------------------
    def reset_stats(self) -> None:
        with self._stats_lock:
            self.stats.update({k: (_errors() if k == "errors" else 0) for k in self.stats})

    def submit(self, pairs) -> None:
        jobs = [_Job(next(self._seqs), pair) for pair in pairs]
        if self.blocking:
            for job in jobs:
                while (job := self._attempt(job)) is not None:  # a retry, inline
                    time.sleep(max(0.0, job.not_before - time.monotonic()))
            return
        with self._cond:
            self._queue.extend(jobs)  # seqs grow: the queue stays sorted
            self._cond.notify_all()

    def in_flight(self) -> int:
        return len(self._running)

    def pending(self) -> int:
        return len(self._queue)

    def take_failed(self) -> set:
        """Layers with pairs given up since the last call (the controller re-syncs their target)."""
        out = set()
        while self._failed:
            out.add(self._failed.popleft())
        return out

    def snapshot(self) -> tuple[dict, list]:
        """({layer: published precisions [E]}, the pairs queued or in flight in submission order), consistent:
        a pair leaves `_running` (under the lock taken here) only after its last publish."""
        with self._cond:
            published = {layer: [v.precision for v in lst] for layer, lst in self.table.versions.items()}
            jobs = sorted([*self._running.values(), *self._queue])
            return published, [job.pair for job in jobs]

    def drain(self, timeout: float = 120.0) -> None:
        """Wait until every submitted pair is done or given up."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._queue or self._running:
                if not self._cond.wait(max(0.0, deadline - time.monotonic())) and time.monotonic() >= deadline:
                    raise TimeoutError(f"transitions not drained after {timeout} s")

    def close(self, timeout: float = 30.0) -> None:
        """Stop the workers: queued pairs are dropped, a pair waiting for a slot gives up (nothing published)."""
        with self._cond:
            self._closed = True
            self._queue.clear()
            self._cond.notify_all()
        deadline = time.monotonic() + timeout
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))
            if t.is_alive():
                self.stats["errors"].append(f"FATAL {t.name} did not stop within {timeout} s")

    # --- workers ---------------------------------------------------------------------------------------------
    def _next(self) -> tuple[_Job | None, float | None]:
        """-> (the first queued job whose experts are neither in flight nor in an earlier queued job and that is
        due, the time the first retry not yet due will be)."""
        blocked, now, wake = set(self._busy), time.monotonic(), None
        for i, job in enumerate(self._queue):
            if not job.keys & blocked and job.not_before <= now:
                del self._queue[i]
                self._busy |= job.keys
                self._running[job.seq] = job
                return job, None
            if job.not_before > now:
                wake = job.not_before if wake is None else min(wake, job.not_before)
            blocked |= job.keys
        if self._queue and wake is None:
            self._count("deferrals")
        return None, wake

    def _worker(self) -> None:
        limit_this_thread(1)  # its copies and builds must not take the forward pass's cores
        while True:
            with self._cond:
                while not self._closed:
                    job, wake = self._next()
                    if job is not None:
                        break
                    self._cond.wait(None if wake is None else max(0.0, wake - time.monotonic()))
                if self._closed:
                    return
            retry = None
            try:
                retry = self._attempt(job)
            except Exception:
                pass  # recorded in stats["errors"] as FATAL; the runtime's check() reports the state
            finally:
                with self._cond:
                    self._busy -= job.keys
                    del self._running[job.seq]
                    if retry is not None and not self._closed:
                        bisect.insort(self._queue, retry)  # its place in submission order: dependents wait
                    self._cond.notify_all()

    def _attempt(self, job: _Job) -> _Job | None:
        """Run one job -> None (done or given up) or the job to retry. Its preconditions are checked against the
        published table before anything is read or published; every failure before the first publish leaves the
        published versions as they were."""
        pair, t0 = job.pair, time.perf_counter()
        problem = self._precondition(pair)
        if problem is not None:
            self._give_up(job, f"cancelled {pair}: {problem}", "cancelled")
            return None
        try:  # step 0: everything that can fail on I/O happens before the first publish
            with self._on_copy_stream():
                va = self.make(pair.layer, pair.demote, pair.lo)
                vb = self.make(pair.promote_layer, pair.promote, pair.hi)
        except Exception as err:  # nothing was published: the previous versions keep serving
            self._count("failures")
            if job.attempt >= self.retries:
                self._give_up(job, f"{pair}: {type(err).__name__}: {err}")
                return None
            self._count("retries")
            job.attempt += 1
            job.not_before = time.monotonic() + self.RETRY_BACKOFF_S * job.attempt
            return job
        try:
            st = self._take(STAGING)
        except (Closed, TimeoutError) as err:
            self._give_up(job, f"{pair}: {err}")
            return None
        try:
            self._swap(pair, va, vb, st)
        except Exception as err:  # a bug or a reader that never leaves: say so loudly, keep the worker alive
            self.stats["errors"].append(f"FATAL {pair}: {type(err).__name__}: {err}")
            raise
        finally:
            self._count("busy_s", time.perf_counter() - t0)
        return None

    def _precondition(self, pair) -> str | None:
        """Why `pair` cannot run on the published table (None: it can): its demoted expert must be published at
        `hi` in a slot of pool hi, its promoted one at `lo` in pool lo."""
        for layer, e, want in ((pair.layer, pair.demote, pair.hi), (pair.promote_layer, pair.promote, pair.lo)):
            v = self.table.get(layer, e)
            if v is None or v.precision != want or v.slot is None or v.slot[0] != want:
                have = "nothing" if v is None else f"{v.precision.value} in {v.slot and Pools.tier(v.slot[0])}"
                return (f"expert {e} of layer {layer} is published as {have}, not {want.value} (planned on a pair "
                        "that failed)")
        return None

    def _give_up(self, job: _Job, message: str, counter: str | None = None) -> None:
        """Report `job` given up, and cancel every queued job that shares an expert with it or with a job
        cancelled so: they were planned on the map it would have made."""
        with self._cond:
            tainted, keep = set(job.keys), []
            for other in self._queue:  # later seqs only: earlier ones sharing an expert ran before `job`
                if other.keys & tainted and other.seq > job.seq:
                    tainted |= other.keys
                    self.stats["errors"].append(f"cancelled {other.pair}: planned on {job.pair}, which was given up")
                    self._count("cancelled")
                    self._failed.extend({other.pair.layer, other.pair.promote_layer})
                else:
                    keep.append(other)
            self._queue[:] = keep
            self.stats["errors"].append(message)
            if counter:
                self._count(counter)
            self._failed.extend({job.pair.layer, job.pair.promote_layer})

    def _count(self, name: str, n=1) -> None:
        with self._stats_lock:
            self.stats[name] += n

    def _swap(self, pair, va, vb, st: int) -> None:
        layer, a, lb, b = pair.layer, pair.demote, pair.promote_layer, pair.promote
        old_a = self._publish_into(layer, a, va, (STAGING, st))  # 1. a at lo, in staging
        assert old_a.slot[0] == pair.hi, (old_a.slot, pair)
        self.pools.reuse(*old_a.slot)
        old_b = self._publish_into(lb, b, vb, old_a.slot)  # 2. b at hi, in a's old slot
        assert old_b.slot[0] == pair.lo, (old_b.slot, pair)
        self.pools.reuse(*old_b.slot)
        staged = self._publish_into(layer, a, self.table.get(layer, a), old_b.slot)  # 3. a into b's old slot
        self.pools.reclaim(*staged.slot)  # 4. staging back
        for name in ("pairs", "promotions", "demotions"):
            self._count(name)

    def move(self, layer: int, e: int, precision) -> None:
        """Change one expert's version within its own pool (its slot must be large enough), through staging."""
        with self._on_copy_stream():
            v = self.make(layer, e, precision)
        old = self.table.get(layer, e)
        if old is None or old.slot is None:  # first install: a fresh slot of the precision's pool
            i = self._take(precision)
            self._publish_into(layer, e, v, (precision, i))
            return
        st = self._take(STAGING)
        old = self._publish_into(layer, e, v, (STAGING, st))
        self.pools.reuse(*old.slot)
        staged = self._publish_into(layer, e, self.table.get(layer, e), old.slot)
        self.pools.reclaim(*staged.slot)
        self._count("moves")

    def _take(self, key) -> int:
        """A slot of pool `key`; waits (deferral) while none is free -- only workers ever wait here -- until the
        engine closes (Closed) or TAKE_TIMEOUT_S pass (TimeoutError)."""
        deadline = time.monotonic() + self.TAKE_TIMEOUT_S
        while (i := self.pools.take(key)) is None:
            if self._closed:
                raise Closed(f"the transition engine closed while waiting for a slot of pool {key}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"no slot of pool {key} came free in {self.TAKE_TIMEOUT_S} s")
            self._count("deferrals")
            time.sleep(0.0005)
        return i

    def _on_copy_stream(self):
        return self.copy_stream.use() if self.copy_stream is not None else contextlib.nullcontext()

    def _publish_into(self, layer: int, e: int, version, slot):
        """Lay `version` into the reserved `slot`, publish it, wait until the replaced version is unread -> it."""
        key, i = slot
        if self.copy_stream is not None:
            with self.copy_stream.use():  # after `make`'s work on the same stream: ordered
                new = place(version, self.pools.slot(key, i), next(self._numbers), slot, non_blocking=True)
            self.copy_stream.synchronize()  # publish only complete bytes
        else:
            new = place(version, self.pools.slot(key, i), next(self._numbers), slot)
        self.pools.commit(key)
        self._count("bytes_moved", slot_layout(new)[1])
        old, retired_at = self.table.publish(layer, e, new)
        self.table.wait_unread(retired_at)
        return old
