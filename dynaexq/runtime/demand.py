"""The forward pass's side of the residency (runtime/residency.py) where not every expert is resident: before a
layer computes, the experts it routed to are pinned and made resident in waves (`waves`: a miss is fetched at
demand priority and the forward waits, the stall measured; an expert held below the precision the policy wants
is served as it is and its wanted copy fetched in the background), and the look-ahead's guesses are fetched at
prefetch priority and their recall scored (`prefetch`). A mixin of `Residency`: the state (pins, last use,
predictions, recall) and the queue are the residency's; this is the code that reads the routing.
"""
from __future__ import annotations

import time

from dynaexq.runtime.fetch import BACKGROUND, DEMAND, PREFETCH, FetchError


class Demand:
    def waves(self, layer: int, experts: list):
        """Yield the routed `experts` of `layer` in waves -> (the wave's experts resident and pinned while the caller
        computes, {expert: FetchError} of the wave's experts that could not be made resident)."""
        cap = max(1, self.policy.wave_cap()) if self.policy is not None else len(experts) or 1
        self._score_prediction(layer, experts)
        for i in range(0, len(experts), cap):
            keys = [(layer, e) for e in experts[i:i + cap]]
            with self._cv:
                self.pins.update(keys)
            try:
                failed = self._ensure(keys)
                yield [k[1] for k in keys if k[1] not in failed], failed
            finally:
                with self._cv:
                    self.pins.subtract(keys)
                    for k in keys:
                        if not self.pins[k]:
                            del self.pins[k]

    def _ensure(self, keys, depth: int = 0) -> dict:
        """Make `keys` resident -> {expert: FetchError} of those that could not be: a read that failed for good,
        no slot, no answer within FETCH_TIMEOUT_S, or closed. The others are resident and pinned."""
        t0, failed, waits = time.perf_counter(), {}, []
        with self._cv:
            self._tick += 1
            for key in keys:
                self.last_use[key] = self._tick
                want = self.policy.want(*key) if self.policy is not None else None
                if key in self.where:
                    self.stats["hits"] += 1
                    if key in self.from_prefetch:
                        self.stats["prefetch_hits"] += 1
                        self.from_prefetch.discard(key)
                    if want is not None and want.bits > self.table.get(*key).precision.bits \
                            and key not in self.inflight and not self._closed:
                        self._submit(key, want, BACKGROUND)  # serve the low copy now, bring the wanted one
                    continue
                self.stats["misses"] += 1
                if self._closed:
                    failed[key[1]] = FetchError(key, "is not resident and the runtime is closed")
                    continue
                f = self.inflight.get(key)
                if f is None:
                    f = self._submit(key, want or self._lowest(), DEMAND)
                elif f.priority > DEMAND:
                    if f.priority == PREFETCH:
                        self.stats["late_prefetches"] += 1  # predicted, not there yet: part of the wait is hidden
                    self._promote(f)
                waits.append(f)
        deadline = time.monotonic() + self.FETCH_TIMEOUT_S
        for f in waits:
            while not f.done.wait(min(0.05, max(0.0, deadline - time.monotonic()))):
                if self._closed:
                    failed[f.key[1]] = FetchError(f.key, "was being read when the runtime closed")
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
            elif f.key not in self.where:  # a fetch dropped for lack of room just before it was promoted
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

    def prefetch(self, layer: int, experts) -> None:
        """Look-ahead: fetch the predicted `experts` of `layer` the policy would make room for (no wasted read)."""
        with self._cv:
            if self._closed:
                return
            self.predicted[layer] = set(experts)
            for key in [(layer, e) for e in experts]:
                if key in self.where or key in self.inflight:
                    continue
                p = self.policy.want(*key)
                pool = self.pools.pools.get(p)
                if pool is not None and self.policy.victim(layer, p, self._candidates(p), bool(pool._free),
                                                           self.held[(layer, p)], key, False, self._tick) is not False:
                    self._submit(key, p, PREFETCH)
