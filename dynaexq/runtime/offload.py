"""The offload tier: the expert budget holds a cache of versions; the rest of the experts are not resident.

`ExpertCache` is mechanism only (the policy, runtime/planners/offload.py, says which precision a fetch brings
and which version makes room). Its slots are the arenas of runtime/pool.py (one per precision, shared by all
layers, allocated once); the table (runtime/table.py) publishes `None` for an expert that is not resident.
  - `waves(layer, experts)` (the forward pass, before it takes its read lease): pins the experts the layer
    routed to, fetches the missing ones (a *miss*: demand priority; the forward waits, the stall is measured) and
    yields; an expert resident at a lower precision than the policy wants is a hit and its wanted copy is
    fetched in the background (never a stall for quality alone). When a layer routes to more experts than
    the cache holds, they come in waves of at most `policy.wave_cap()`.
  - `prefetch(layer, experts)` (look-ahead, engine/offload.py): fetch predicted experts at prefetch priority;
    the prediction's recall is scored when the layer runs.
  - `request(...)` (the controller, between steps): background fetches of wanted copies.
A fetch reads the version from disk on a pool of reader threads (store/direct.py: O_DIRECT), builds the
kernel-ready version, takes a free slot or evicts the policy's victim (publish None, wait until unread, reuse
the slot), lays the version into the slot and publishes it; an older copy of the same expert (an upgrade) is
reclaimed once unread. Every publish and every change of the resident map happens under one lock, so a victim
is never an expert being fetched or pinned. A read that fails leaves what was published serving (for a miss:
the forward raises after `retries`). One thread runs forwards (the engine's; the server's scheduler).
"""
from __future__ import annotations

import heapq
import itertools
import threading
import time
from collections import Counter, deque

from dynaexq.runtime.version import place, slot_layout
from dynaexq.threads import limit_this_thread

DEMAND, PREFETCH, BACKGROUND = 0, 1, 2  # fetch priorities: a miss first
_KINDS = {DEMAND: "misses", PREFETCH: "prefetches", BACKGROUND: "upgrades"}


class FetchError(RuntimeError):
    """An expert that could not be made resident for a forward: its message says what happened."""

    def __init__(self, key, message: str):
        super().__init__(f"expert {key[1]} of layer {key[0]} {message}")
        self.key = key


class _Fetch:
    def __init__(self, key, precision, priority):
        self.key, self.precision, self.priority = key, precision, priority
        self.done = threading.Event()
        self.error: Exception | None = None
        self.slot = None


class ExpertCache:
    RETRY_BACKOFF_S = 0.02
    SLOT_TIMEOUT_S = 30.0  # a fetch finding every slot pinned or in flight this long fails
    FETCH_TIMEOUT_S = 60.0  # a forward waits this long for a miss, then fails the rows that routed to it
    UNREAD_TIMEOUT_S = 60.0  # a replaced version still read this long: its slot is reclaimed later, not now

    def __init__(self, table, pools, io, build, policy, workers: int = 2, retries: int = 2):
        self.table, self.pools, self.io, self.build, self.policy = table, pools, io, build, policy
        self.retries = retries
        self.where: dict = {}  # (layer, e) -> (precision, slot index): the resident, published versions
        self.last_use: dict = {}  # (layer, e) -> tick of its last forward
        self.pins: Counter = Counter()
        self.inflight: dict = {}  # (layer, e) -> _Fetch (one fetch per expert at a time)
        self.held: Counter = Counter()  # (layer, precision) -> slots taken for that layer (resident + in flight)
        self.predicted: dict = {}  # layer -> set of experts the look-ahead predicted for its next forward
        self.from_prefetch: set = set()  # keys brought by a prefetch and not used yet
        self._tick = 0
        self._numbers = itertools.count(1)
        self._seq = itertools.count()
        self._queue: list = []  # heap of (priority, seq, _Fetch)
        self._cv = threading.Condition()
        self._closed = False
        self.stats = Counter()
        self.recall = {layer: [0, 0] for layer in table.versions}  # layer -> [predicted and routed, routed]
        self.errors: deque = deque(maxlen=64)
        self.retired: list = []  # [(retired at, (precision, slot), (layer, precision) held)]: reclaimed once unread
        self.collect: list | None = None  # set by the forward's caller to take per-expert failures (see waves)
        self._threads = [threading.Thread(target=self._worker, name=f"dynaexq-reader-{i}", daemon=True)
                         for i in range(workers)]
        for t in self._threads:
            t.start()

    # --- the forward pass ---------------------------------------------------------------------------------------
    def waves(self, layer: int, experts: list):
        """Yield the routed `experts` of `layer` in waves -> (the wave's experts resident and pinned while the caller
        computes, {expert: FetchError} of the wave's experts that could not be made resident)."""
        cap = max(1, self.policy.wave_cap())
        self._score_prediction(layer, experts)
        for i in range(0, len(experts), cap):
            wave = experts[i:i + cap]
            keys = [(layer, e) for e in wave]
            with self._cv:
                self.pins.update(keys)
            try:
                failed = self._ensure(keys)
                yield [e for e in wave if e not in failed], failed
            finally:
                with self._cv:
                    self.pins.subtract(keys)
                    for k in keys:
                        if not self.pins[k]:
                            del self.pins[k]

    def _ensure(self, keys, depth: int = 0) -> dict:
        """Make `keys` resident -> {expert: FetchError} of those that could not be: a read that failed for good,
        no slot, no answer within FETCH_TIMEOUT_S, or the cache closed. The others are resident and pinned."""
        t0 = time.perf_counter()
        failed = {}
        with self._cv:
            self._tick += 1
            waits = []
            for key in keys:
                self.last_use[key] = self._tick
                want = self.policy.want(*key)
                if key in self.where:
                    self.stats["hits"] += 1
                    if key in self.from_prefetch:
                        self.stats["prefetch_hits"] += 1
                        self.from_prefetch.discard(key)
                    if want.bits > self.where[key][0].bits and key not in self.inflight:
                        self._submit(key, want, BACKGROUND)  # serve the low copy now, bring the wanted one
                    continue
                self.stats["misses"] += 1
                if self._closed:
                    failed[key[1]] = FetchError(key, "is not resident and the offload cache is closed")
                    continue
                f = self.inflight.get(key)
                if f is None:
                    f = self._submit(key, want, DEMAND)
                elif f.priority > DEMAND:
                    self.stats["late_prefetches"] += 1  # predicted, not there yet: part of the wait is hidden
                    self._promote(f)
                waits.append(f)
        deadline = time.monotonic() + self.FETCH_TIMEOUT_S
        for f in waits:
            while not f.done.wait(min(0.05, max(0.0, deadline - time.monotonic()))):
                if self._closed:
                    failed[f.key[1]] = FetchError(f.key, "was being read when the offload cache closed")
                    break
                if time.monotonic() >= deadline:
                    failed[f.key[1]] = FetchError(f.key, f"was not read within {self.FETCH_TIMEOUT_S:g} s (the "
                                                  "store is too slow or a reader is stuck)")
                    break
        if waits:
            self._count("stall_s", time.perf_counter() - t0)
        for f in waits:
            if f.key[1] in failed:
                continue
            if f.error is not None:
                failed[f.key[1]] = f.error
            elif f.key not in self.where:  # a prefetch dropped for lack of room just before it was promoted
                failed.update(self._ensure([f.key], depth + 1) if depth < 3 else {f.key[1]: FetchError(
                    f.key, "lost its slot to other fetches three times in a row")})
        if failed:
            self._count("failed_misses", len(failed))
        return failed

    def _score_prediction(self, layer: int, experts: list) -> None:
        with self._cv:
            pred = self.predicted.pop(layer, None)
        if pred is not None:
            r = self.recall[layer]
            r[0] += len(pred.intersection(experts))
            r[1] += len(experts)

    # --- look-ahead and background ------------------------------------------------------------------------------
    def prefetch(self, layer: int, experts) -> None:
        with self._cv:
            if self._closed:
                return
            self.predicted[layer] = set(experts)
            todo = [(layer, e) for e in experts if (layer, e) not in self.where and (layer, e) not in self.inflight]
            if not todo:
                return
            room = {p: (bool(pool._free), self._candidates(p)) for p, pool in self.pools.pools.items()
                    if p in self.policy.counts}
            for key in todo:  # only guesses the policy would make room for: no read is wasted on a drop
                p = self.policy.want(*key)
                free, cands = room[p]
                if self.policy.victim(key[0], p, cands, free, self.held[(key[0], p)], key, False,
                                      self._tick) is not False:
                    self._submit(key, p, PREFETCH)

    def request(self, key, precision) -> None:
        """A background fetch (the controller's upgrades and warm fills), unless one is in flight."""
        with self._cv:
            have = self.where.get(key)
            if not self._closed and key not in self.inflight and (have is None or have[0].bits < precision.bits):
                self._submit(key, precision, BACKGROUND)

    def _submit(self, key, precision, priority) -> _Fetch:  # lock held, cache not closed
        assert not self._closed
        f = _Fetch(key, precision, priority)
        self.inflight[key] = f
        heapq.heappush(self._queue, (priority, next(self._seq), f))
        self.stats[f"{_KINDS[priority]}_issued"] += 1
        self._cv.notify()
        return f

    def _promote(self, f: _Fetch) -> None:  # lock held: a queued prefetch the forward now waits for
        for i, (_, seq, g) in enumerate(self._queue):
            if g is f:
                self._queue[i] = (DEMAND, seq, f)
                heapq.heapify(self._queue)
                break
        f.priority = DEMAND

    # --- the reader pool ------------------------------------------------------------------------------------------
    def _worker(self) -> None:
        limit_this_thread(1)  # its copies and builds must not take the forward pass's cores
        while True:
            with self._cv:
                while not self._queue and not self._closed:
                    self._cv.wait()
                if self._closed:
                    return
                _, _, f = heapq.heappop(self._queue)
            try:
                self._fetch(f)
            except Exception as err:  # nothing of this fetch is published and its slot went back
                f.error = err if isinstance(err, FetchError) else FetchError(f.key, f"failed: {type(err).__name__}: "
                                                                                    f"{err}")
                self.errors.append(f"{f.precision.value}: {f.error}")
                self._count("failures")
                with self._cv:
                    self.inflight.pop(f.key, None)
            finally:
                f.done.set()

    def _read(self, f: _Fetch):
        """The version of f.key at f.precision, from disk, kernel-ready (owning its memory). An OSError is retried
        `retries` times; any other error (a digest mismatch: the store is corrupted) is not."""
        for attempt in range(self.retries + 1):
            try:
                return self.build(self.io.read(*f.key, f.precision))
            except OSError as err:
                if attempt == self.retries or self._closed:
                    raise FetchError(f.key, f"could not be read from the store at {f.precision.value} after "
                                     f"{attempt + 1} attempts ({type(err).__name__}: {err})") from err
                self._count("retries")
                self.errors.append(f"{f.key} {f.precision.value}: {err} (retrying)")
                time.sleep(self.RETRY_BACKOFF_S * (attempt + 1))
            except Exception as err:
                raise FetchError(f.key, f"at {f.precision.value} could not be used: {err}") from err

    def _fetch(self, f: _Fetch) -> None:
        """Room first (a guess that finds none is dropped before it reads anything), then the read, then publish.
        Until the publish, any failure gives the slot back; after it the fetch has succeeded whatever happens to
        the older copy's reclaim."""
        layer, e = f.key
        t0 = time.perf_counter()
        self._reclaim_retired()
        p, lowest = f.precision, min(self.pools.pools, key=lambda k: getattr(k, "bits", 99))
        i = self._slot(layer, p, f, wait=p == lowest)
        if i is None and f.priority == DEMAND and p != lowest:  # no room at the wanted precision now: a miss is
            f.precision = p = lowest  # served at the lowest one (never a stall for quality alone)
            self._count("fallbacks")
            i = self._slot(layer, p, f)
        if i is None:  # a prefetch or an upgrade with no room: dropped
            with self._cv:
                self.inflight.pop(f.key, None)
            self._count("dropped")
            return
        try:
            new = place(self._read(f), self.pools.slot(p, i), next(self._numbers), (p, i))
        except BaseException:  # nothing published: the slot goes back
            self.pools.commit(p)
            self.pools.reclaim(p, i)
            with self._cv:
                self.held[(layer, p)] -= 1
            raise
        self.pools.commit(p)
        with self._cv:
            old, retired_at = self.table.publish(layer, e, new)
            prev = self.where.get(f.key)
            self.where[f.key] = (p, i)
            self.inflight.pop(f.key, None)
            if f.priority == PREFETCH:
                self.from_prefetch.add(f.key)
                self.last_use[f.key] = self._tick  # as recent as the forward that predicted it
            self.stats[f"{_KINDS[f.priority]}_done"] += 1
            self.stats["bytes_fetched"] += slot_layout(new)[1]
            self.stats["fetch_s"] += time.perf_counter() - t0
            if old is not None:  # an upgrade (or a different precision): the older copy goes once unread
                self.retired.append((retired_at, old.slot, (layer, prev[0])))
        f.done.set()  # the forward may go on: the old copy's reclaim is this worker's
        self._reclaim_retired(wait=True)

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
            self.pools.reclaim(*slot)
            with self._cv:
                self.held[held] -= 1
        if keep:
            with self._cv:
                self.retired.extend(keep)

    def _candidates(self, p, keep=()) -> list:  # lock held
        """[((layer, e), last use)] of the versions in pool p that may be evicted: not pinned, not in flight."""
        return [(k, self.last_use.get(k, 0)) for k, (q, _) in self.where.items()
                if q == p and not self.pins.get(k) and k not in self.inflight and k not in keep]

    def _slot(self, layer: int, p, f: _Fetch, wait: bool = True) -> int | None:
        """A slot of pool p for `layer`: free, or the policy's victim's (evicted: published None, then unread)."""
        deadline = time.monotonic() + self.SLOT_TIMEOUT_S
        while True:
            with self._cv:
                pool = self.pools.pools[p]
                wanted = set() if f.priority == DEMAND else {  # a guess does not evict another guess's fetch
                    (lay, e) for lay, es in self.predicted.items() for e in es}
                cands = self._candidates(p, wanted)
                victim = self.policy.victim(layer, p, cands, bool(pool._free), self.held[(layer, p)],
                                            f.key, f.priority == DEMAND, self._tick)
                if victim is None:
                    i = self.pools.take(p)
                    if i is not None:
                        self.held[(layer, p)] += 1
                        return i
                elif victim is not False:
                    _, i = self.where.pop(victim)
                    self.from_prefetch.discard(victim)
                    old, retired_at = self.table.publish(*victim, None)
                    self.held[(victim[0], p)] -= 1
                    self.held[(layer, p)] += 1
                    self.stats["evictions"] += 1
                    break
            if f.priority != DEMAND or self._closed or not wait:
                return None
            if time.monotonic() > deadline:
                raise FetchError(f.key, f"found no {p.value} slot of the offload cache free in {self.SLOT_TIMEOUT_S:g} "
                                 "s (every one pinned by a forward or being filled)")
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
        return i

    def _count(self, name: str, n=1) -> None:  # counters written outside the lock (forward and reader threads)
        with self._cv:
            self.stats[name] += n

    # --- observability and shutdown -----------------------------------------------------------------------------
    def resident(self) -> dict:
        with self._cv:
            return {k: p for k, (p, _) in self.where.items()}

    def report(self) -> dict:
        s = dict(self.stats)
        hits, misses = s.get("hits", 0), s.get("misses", 0)
        rec = {layer: (a / b if b else None) for layer, (a, b) in self.recall.items()}
        done = [v for v in rec.values() if v is not None]
        with self._cv:
            by_precision = Counter(p.value for p, _ in self.where.values())
            queued = len(self._queue)
        return {**s, "hit_rate": hits / max(1, hits + misses), "resident": sum(by_precision.values()),
                "resident_by_precision": dict(by_precision), "in_flight": len(self.inflight), "queued": queued,
                "recall": rec, "mean_recall": sum(done) / len(done) if done else None,
                "io": dict(self.io.stats, mode=self.io.mode), "errors": list(self.errors)[-20:]}

    def drain(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            with self._cv:
                if not self.inflight:
                    return
            if time.monotonic() > deadline:
                raise TimeoutError(f"offload fetches not done after {timeout} s")
            time.sleep(0.001)

    def close(self, timeout: float = 30.0) -> None:
        """Stop: queued fetches fail ("closed"), a forward waiting on one returns at once, the readers stop after
        the fetch each is in; the store's files are closed once no read uses them."""
        with self._cv:
            self._closed = True
            for _, _, f in self._queue:
                f.error = FetchError(f.key, "was queued when the offload cache closed")
                self.inflight.pop(f.key, None)
                f.done.set()
            self._queue.clear()
            self._cv.notify_all()
        deadline = time.monotonic() + timeout
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))
        self.io.close()

    def check(self) -> None:
        """The resident map and the table agree: every resident expert is published from its slot, every other
        one is published as None (or is in flight); per pool, the slots held are those published."""
        with self._cv:
            for layer, lst in self.table.versions.items():
                for e, v in enumerate(lst):
                    w = self.where.get((layer, e))
                    if w is None:
                        assert v is None or (layer, e) in self.inflight, f"({layer}, {e}) published, not resident"
                    else:
                        assert v is not None and v.slot == w, f"({layer}, {e}) resident at {w}, published {v}"
            assert all(n >= 0 for n in self.held.values()), self.held
