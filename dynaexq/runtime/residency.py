"""Residency: the one mechanism that moves expert versions between the store and the slot arenas.

For every (layer, expert) the table (runtime/table.py) publishes one version, or None: not resident. Every change
is one *fetch*: read the version from the store (or, for a relocation, from the staging slot it lies in), lay it
into a slot of its precision's arena (runtime/pool.py), publish it, and give the replaced version's slot back
once no forward reads it (publish-before-reclaim; the waiting is a worker's, never the forward pass's). An
eviction publishes None and gives the slot back the same way. Three callers:
  - `apply(target)` (the controller, between steps): {(layer, e): precision | None} -> background fetches and
    evictions of the experts whose published precision differs; other experts are left as they are.
  - `waves(layer, experts)` (the forward pass, only where some experts are not resident; runtime/demand.py):
    pins the routed experts and makes them resident, misses at demand priority, in waves when the layer routes
    to more than the arenas hold.
  - `prefetch(layer, experts)` (look-ahead; runtime/demand.py): predicted experts at prefetch priority.
Where a fetch finds its slot: a free one of its arena; else, where a policy makes room (`policy.victim`: budgets
below every expert at the lowest precision), the victim's (evicted); else, for a background fetch, a staging
slot: the expert is published from there and moved into its arena when a slot of it frees (a relocation), which
the fetch it waits for frees in turn -- so the paired swaps of full arenas (a hot expert up, a cooling one down)
need no spare slot in every arena; else the fetch is deferred until a slot is given back. A prefetch or an
upgrade that finds no room is dropped. Fetches that share an expert run one at a time, in priority order.
A read that fails is retried (`retries`, with a back-off), then given up: what was published keeps serving (a
miss then fails the rows routed to it, `FetchError`); `apply` at the next decision tries again.
Threads: `workers` readers (one on the CPU for the resident arenas: their copies share the forward pass's cores);
CUDA: versions are built and laid into slots on one copy stream and published after it completes (UNVERIFIED).
Nothing here decides which expert should be resident or at which precision: planners (runtime/planners) do.
"""
from __future__ import annotations

import contextlib
import heapq
import itertools
import threading
import time
from collections import Counter, deque

from dynaexq.runtime.demand import Demand
from dynaexq.runtime.fetch import KINDS, BACKGROUND, DEMAND, PREFETCH, RELOCATE, Fetch, FetchError
from dynaexq.runtime.pool import STAGING
from dynaexq.runtime.version import place, slot_layout
from dynaexq.threads import limit_this_thread

class Residency(Demand):
    RETRY_BACKOFF_S = 0.02  # x attempt
    SLOT_TIMEOUT_S = 30.0  # a miss finding every slot pinned or in flight this long fails
    FETCH_TIMEOUT_S = 60.0  # a forward waits this long for a miss, then fails the rows that routed to it
    UNREAD_TIMEOUT_S = 60.0  # a replaced version still read this long: its slot is reclaimed later, not now

    def __init__(self, table, pools, read, policy=None, workers: int = 1, retries: int = 2, copy_stream=None,
                 io=None):
        self.table, self.pools, self.read, self.policy = table, pools, read, policy  # read(layer, e, p) -> version
        self.retries, self.copy_stream, self.io = retries, copy_stream, io  # io: the offload reader (stats, close)
        self.complete = policy is None  # every expert stays resident: a forward needs no waves (no host sync)
        self.where: dict = {}  # (layer, e) -> (pool key, slot index) of its published version
        self.target: dict = {}  # (layer, e) -> precision | None: the latest `apply`'s (a fetch that lands checks it)
        self._active: set = set()  # the fetches running now
        self.last_use: dict = {}  # (layer, e) -> tick of its last forward
        self.pins: Counter = Counter()
        self.inflight: dict = {}  # (layer, e) -> Fetch (queued, running or deferred: one per expert at a time)
        self.held: Counter = Counter()  # (layer, precision) -> arena slots taken for that layer
        self.predicted: dict = {}  # layer -> experts the look-ahead predicted for its next forward
        self.from_prefetch: set = set()  # keys brought by a prefetch and not used yet
        self.retired: list = []  # [(retired at, slot, (layer, precision) held or None)]: reclaimed once unread
        self.collect: list | None = None  # set by the forward's caller to take per-expert failures (bank._fault)
        self.stats: Counter = Counter()
        self.errors: deque = deque(maxlen=256)
        self.recall = {layer: [0, 0] for layer in table.versions}  # layer -> [predicted and routed, routed]
        self._tick = 0
        self._numbers = itertools.count(1)  # version numbers
        self._seq = itertools.count()
        self._queue: list = []  # heap of Fetch
        self._deferred: list = []  # background fetches waiting for a slot to be given back
        self._cv = threading.Condition()
        self._closed = False
        self._threads = [threading.Thread(target=self._worker, name=f"dynaexq-fetch-{i}", daemon=True)
                         for i in range(workers)]
        for t in self._threads:
            t.start()

    # --- the controller -----------------------------------------------------------------------------------------
    def apply(self, target: dict) -> int:
        """Move the published map toward `target` {(layer, e): precision | None} in the background -> fetches and
        evictions submitted. Lower precisions first: they free the slots the higher ones need."""
        todo = []
        with self._cv:
            if self._closed:
                return 0
            self.target.update(target)
            for key, p in target.items():
                have, f = self.where.get(key), self.inflight.get(key)
                if f is not None:  # its fetch is under way: a queued one takes the new precision, a running one
                    if f.priority == BACKGROUND and p is not None and f not in self._active:  # is followed up
                        f.precision = p
                    continue
                if have is not None and have[0] == STAGING:  # left in staging: into its arena first
                    self._submit(key, self.table.get(*key).precision, RELOCATE)
                    continue
                if have is None and p is None:
                    continue
                if p is None:
                    todo.append((-1, key, None))
                elif have is None or self.table.get(*key).precision != p:
                    todo.append((p.bits, key, p))
            for _, key, p in sorted(todo, key=lambda t: (t[0], t[1])):
                if p is None:
                    self._evict(key)
                else:
                    self._submit(key, p, BACKGROUND)
        return len(todo)

    def _evict(self, key) -> None:  # lock held: publish None now, the slot goes back once unread
        pool_key, i = self.where.pop(key)
        old, retired_at = self.table.publish(*key, None)
        self.retired.append((retired_at, (pool_key, i), None if pool_key == STAGING else (key[0], old.precision)))
        self.stats["evictions"] += 1

    def _lowest(self):
        return min((k for k in self.pools.pools if k != STAGING), key=lambda k: k.bits)

    # --- the queue ----------------------------------------------------------------------------------------------
    def _submit(self, key, precision, priority) -> Fetch:  # lock held, not closed
        f = Fetch(key, precision, priority, next(self._seq))
        self.inflight[key] = f
        heapq.heappush(self._queue, f)
        self.stats[f"{KINDS[priority]}_issued"] += 1
        self._cv.notify()
        return f

    def _promote(self, f: Fetch) -> None:  # lock held: a queued or deferred fetch the forward now waits for
        if f in self._deferred:
            self._deferred.remove(f)
            heapq.heappush(self._queue, f)
        f.priority = DEMAND
        heapq.heapify(self._queue)
        self._cv.notify()

    def _worker(self) -> None:
        limit_this_thread(1)  # its copies and builds must not take the forward pass's cores
        while True:
            with self._cv:
                while not self._closed and not self._queue:
                    self._cv.wait()
                if self._closed:
                    return
                f = heapq.heappop(self._queue)
                self._active.add(f)
            try:
                self._fetch(f)
            except Exception as err:  # nothing of this fetch is published and its slot went back
                f.error = err if isinstance(err, FetchError) else FetchError(
                    f.key, f"failed: {type(err).__name__}: {err}")
                self.errors.append(f"{f.precision.value}: {f.error}")
                self._count("failures")
                with self._cv:
                    self.inflight.pop(f.key, None)
                f.done.set()
            finally:
                with self._cv:
                    self._active.discard(f)
                    if not self._queue and not self._active and self._deferred:
                        self._unstick()
                    self._cv.notify_all()

    def _unstick(self) -> None:  # lock held; nothing queued or running, yet fetches wait for a slot
        """The fetch that would have freed their slots failed (a read given up): deferred fetches are dropped (the
        next `apply` submits them again) and an expert waiting in staging goes to any arena with a free slot, read
        at that arena's precision (its old slot, freed when it went to staging), so no staging slot stays held."""
        relocations = [f for f in self._deferred if f.priority == RELOCATE]
        moved = False
        for f in relocations:  # out of staging: the others may then go on
            free = [k for k, pool in self.pools.pools.items() if k != STAGING and pool._free]
            if f.precision in free:  # its own arena has room after all: a plain relocation
                moved = True
            elif free:  # another arena's slot, read at its precision (its old slot)
                f.precision, f.priority, f.fallback = max(free, key=lambda k: k.bits), BACKGROUND, True
                self.stats["unstuck"] += 1
                moved = True
        if moved:
            for f in self._deferred:
                heapq.heappush(self._queue, f)
        else:  # nothing will free a slot: the next `apply` submits them again
            for f in self._deferred:
                self.inflight.pop(f.key, None)
                self.stats["dropped"] += 1
                f.done.set()
        self._deferred.clear()

    def _read(self, f: Fetch):
        """The version of f.key at f.precision, kernel-ready (owning its memory). An OSError is retried `retries`
        times; anything else (a digest mismatch: the store is corrupted) is not."""
        for attempt in range(self.retries + 1):
            try:
                with self._on_copy_stream():
                    return self.read(*f.key, f.precision)
            except OSError as err:
                if attempt == self.retries or self._closed:
                    raise FetchError(f.key, f"could not be read from the store at {f.precision.value} after "
                                     f"{attempt + 1} attempts ({type(err).__name__}: {err})") from err
                self._count("retries")
                self.errors.append(f"{f.key} {f.precision.value}: {err} (retrying)")
                time.sleep(self.RETRY_BACKOFF_S * (attempt + 1))
            except FetchError:
                raise
            except Exception as err:
                raise FetchError(f.key, f"at {f.precision.value} could not be used: {err}") from err

    def _fetch(self, f: Fetch) -> None:
        """Room first (a guess that finds none is dropped, a background fetch deferred, before anything is read),
        then the read, then publish. Until the publish any failure gives the slot back."""
        layer, e = f.key
        t0 = time.perf_counter()
        self._reclaim_retired()
        p = f.precision
        with self._cv:
            v = self.table.get(layer, e)
            if f.priority == BACKGROUND and v is not None and v.precision == p and self.where[f.key][0] != STAGING:
                del self.inflight[f.key]  # the target came back to what is published while it waited
                f.done.set()
                return
        slot = self._slot(f, wait=p == self._lowest())
        if slot is None and f.priority == DEMAND and p != self._lowest():  # no room at the wanted precision: a miss
            f.precision = p = self._lowest()  # is served at the lowest one (never a stall for quality alone)
            self._count("fallbacks")
            slot = self._slot(f)
        if slot is None:
            with self._cv:
                if f.priority in (BACKGROUND, RELOCATE) and self.complete and not self._closed:
                    self._deferred.append(f)  # a slot is given back when a fetch it waits for publishes
                    self.stats["deferrals"] += 1
                    return
                self.inflight.pop(f.key, None)
                self.stats["dropped"] += 1
            f.done.set()
            return
        key_, i = slot
        try:
            if f.priority == RELOCATE:
                version = self.table.get(layer, e)  # its copy in staging
            else:
                version = self._read(f)
            new = self._place(version, slot)
        except BaseException:  # nothing published: the slot goes back
            self.pools.commit(key_)
            self._give_back(slot, None if key_ == STAGING else (layer, p))
            raise
        self.pools.commit(key_)
        with self._cv:
            old, retired_at = self.table.publish(layer, e, new)
            prev = self.where.get(f.key)
            self.where[f.key] = slot
            del self.inflight[f.key]
            if old is not None:  # the replaced copy goes once unread
                self.retired.append((retired_at, prev, None if prev[0] == STAGING else (layer, old.precision)))
                kind = "relocations" if f.priority == RELOCATE else \
                    "promotions" if p.bits > old.precision.bits else "demotions" if p.bits < old.precision.bits \
                    else "moves"
                self.stats[kind] += 1
            want = self.target.get(f.key, p)
            if key_ == STAGING:  # published from staging: into its arena when a slot of it frees
                self._submit(f.key, p, RELOCATE)
            elif self.complete and want != p and not self._closed and not f.fallback:  # the target moved meanwhile
                if want is None:
                    self._evict(f.key)
                else:
                    self._submit(f.key, want, BACKGROUND)
            if f.priority == PREFETCH:
                self.from_prefetch.add(f.key)
                self.last_use[f.key] = self._tick  # as recent as the forward that predicted it
            self.stats[f"{KINDS[f.priority]}_done"] += 1
            self.stats["bytes_moved"] += slot_layout(new)[1]
            self.stats["busy_s"] += time.perf_counter() - t0
        f.done.set()  # the forward may go on: the old copy's reclaim is this worker's
        self._reclaim_retired(wait=True)

    def _place(self, version, slot):
        key, i = slot
        number = next(self._numbers)
        if self.copy_stream is None:
            return place(version, self.pools.slot(key, i), number, slot)
        with self.copy_stream.use():  # after the build's work on the same stream: ordered
            new = place(version, self.pools.slot(key, i), number, slot, non_blocking=True)
        self.copy_stream.synchronize()  # publish only complete bytes
        return new

    # --- slots --------------------------------------------------------------------------------------------------
    def _candidates(self, p, keep=()) -> list:  # lock held
        """[((layer, e), last use)] of the versions in arena p that may be evicted: not pinned, not in flight."""
        return [(k, self.last_use.get(k, 0)) for k, (q, _) in self.where.items()
                if q == p and not self.pins.get(k) and k not in self.inflight and k not in keep]

    def _slot(self, f: Fetch, wait: bool = True):
        """A slot for f -> (pool key, index), or None: no room now (see the module docstring). A miss waits for
        one (`wait`) until SLOT_TIMEOUT_S."""
        layer, p = f.key[0], f.precision
        deadline = time.monotonic() + self.SLOT_TIMEOUT_S
        while True:
            with self._cv:
                pool = self.pools.pools.get(p)
                free = pool is not None and bool(pool._free)
                victim = None
                if self.policy is not None and f.priority != RELOCATE:
                    wanted = set() if f.priority == DEMAND else {  # a guess does not evict another guess's fetch
                        (lay, e) for lay, es in self.predicted.items() for e in es}
                    victim = self.policy.victim(layer, p, self._candidates(p, wanted), free, self.held[(layer, p)],
                                                f.key, f.priority == DEMAND, self._tick)
                elif not free:
                    victim = False
                if victim is None:
                    i = self.pools.take(p)
                    if i is not None:
                        self.held[(layer, p)] += 1
                        return p, i
                elif victim is not False:
                    _, i = self.where.pop(victim)
                    self.from_prefetch.discard(victim)
                    _, retired_at = self.table.publish(*victim, None)
                    self.held[(victim[0], p)] -= 1
                    self.held[(layer, p)] += 1
                    self.stats["evictions"] += 1
                    break
                if f.priority == BACKGROUND and self.complete and f.key in self.where:  # a full arena: via staging
                    i = self.pools.take(STAGING)
                    if i is not None:
                        return STAGING, i
            if f.priority != DEMAND or self._closed or not wait:
                return None
            if time.monotonic() > deadline:
                raise FetchError(f.key, f"found no {p.value} slot free in {self.SLOT_TIMEOUT_S:g} s (every one pinned "
                                 "by a forward or being filled)")
            time.sleep(0.0005)  # every slot is pinned or in flight: one finishes soon
            self._reclaim_retired()
        try:
            self.table.wait_unread(retired_at, self.UNREAD_TIMEOUT_S)
        except TimeoutError:  # the victim is still read: its slot is reclaimed later, this fetch finds no room
            with self._cv:
                self.held[(layer, p)] -= 1
                self.held[(victim[0], p)] += 1
                self.retired.append((retired_at, (p, i), (victim[0], p)))
            raise FetchError(f.key, f"found no {p.value} slot: the evicted expert {victim} was still read after "
                             f"{self.UNREAD_TIMEOUT_S:g} s") from None
        self.pools.reuse(p, i)
        return p, i

    def _give_back(self, slot, held) -> None:
        """A slot back to its arena; the deferred fetches that can use it get another try (those of its precision;
        for a staging slot, the background ones), not every deferred fetch: a decision with many swaps would
        retry all of them at every slot given back."""
        self.pools.reclaim(*slot)
        key = slot[0]
        with self._cv:
            if held is not None:
                self.held[held] -= 1
            wait = []
            for f in self._deferred:
                if f.precision == key or (key == STAGING and f.priority == BACKGROUND):
                    heapq.heappush(self._queue, f)
                else:
                    wait.append(f)
            if len(wait) < len(self._deferred):
                self._deferred = wait
                self._cv.notify_all()

    def _reclaim_retired(self, wait: bool = False) -> None:
        """Give back the slots of replaced versions no reader holds any more; with `wait`, wait for them up to
        UNREAD_TIMEOUT_S (a reader still holding one then leaves it for a later call: never a failed fetch)."""
        with self._cv:
            todo, self.retired = self.retired, []
        keep = []
        for retired_at, slot, held in todo:
            try:
                if wait:
                    self.table.wait_unread(retired_at, self.UNREAD_TIMEOUT_S)
                elif not self.table.unread(retired_at):
                    keep.append((retired_at, slot, held))
                    continue
            except TimeoutError as err:
                self.errors.append(f"slot {slot}: {err}; reclaimed later")
                keep.append((retired_at, slot, held))
                continue
            self._give_back(slot, held)
        if keep:
            with self._cv:
                self.retired.extend(keep)

    def _count(self, name: str, n=1) -> None:
        with self._cv:
            self.stats[name] += n

    def _on_copy_stream(self):
        return self.copy_stream.use() if self.copy_stream is not None else contextlib.nullcontext()

    # --- observability and shutdown -----------------------------------------------------------------------------
    def resident(self) -> dict:
        """{(layer, e): precision} of every resident expert."""
        with self._cv:
            return {k: self.table.get(*k).precision for k in self.where}

    def pending(self) -> int:
        """Fetches queued, running or deferred."""
        with self._cv:
            return len(self.inflight)

    def report(self) -> dict:
        s = dict(self.stats)
        hits, misses = s.get("hits", 0), s.get("misses", 0)
        rec = {layer: (a / b if b else None) for layer, (a, b) in self.recall.items()}
        done = [v for v in rec.values() if v is not None]
        with self._cv:
            queued, deferred = len(self._queue), len(self._deferred)
        return {**s, "hit_rate": hits / max(1, hits + misses), "in_flight": len(self._active), "queued": queued,
                "deferred": deferred, "recall": rec, "mean_recall": sum(done) / len(done) if done else None,
                "io": None if self.io is None else dict(self.io.stats, mode=self.io.mode),
                "errors": list(self.errors)[-20:]}

    def reset_stats(self) -> None:
        with self._cv:
            self.stats.clear()
            self.errors.clear()
        if self.io is not None:
            self.io.stats.update(reads=0, bytes=0, seconds=0.0)

    def drain(self, timeout: float = 120.0) -> None:
        """Wait until no fetch is queued, running or deferred (and the replaced slots are back)."""
        deadline = time.monotonic() + timeout
        with self._cv:
            while self.inflight or self._active:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"fetches not done after {timeout} s: {len(self.inflight)} left")
                self._cv.wait(0.01)
        self._reclaim_retired(wait=True)

    def close(self, timeout: float = 30.0) -> None:
        """Stop: queued and deferred fetches fail ("closed"), a forward waiting on one returns at once, the
        workers stop after the fetch each is in; the store's files are closed once no read uses them."""
        with self._cv:
            self._closed = True
            for f in [*self._queue, *self._deferred]:
                f.error = FetchError(f.key, "was queued when the runtime closed")
                self.inflight.pop(f.key, None)
                f.done.set()
            self._queue.clear()
            self._deferred.clear()
            self._cv.notify_all()
        deadline = time.monotonic() + timeout
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))
            if t.is_alive():
                self.errors.append(f"FATAL {t.name} did not stop within {timeout} s")
        if self.io is not None:
            self.io.close()

    def check(self) -> None:
        """The resident map and the table agree: every resident expert is published from its slot, every other
        one is published as None; per arena, the slots held per layer are never negative."""
        with self._cv:
            for layer, lst in self.table.versions.items():
                for e, v in enumerate(lst):
                    w = self.where.get((layer, e))
                    if w is None:
                        assert v is None, f"({layer}, {e}) published, not resident"
                    else:
                        assert v is not None and v.slot == w, f"({layer}, {e}) resident at {w}, published {v}"
            assert all(n >= 0 for n in self.held.values()), self.held
