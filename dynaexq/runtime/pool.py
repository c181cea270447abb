"""Fragmentation-free expert memory: one fixed-size slot arena per tier (precision), a staging pool, a budget tracker.

A tier's slots are shared by every MoE layer (a layer's experts all have the same shapes, so one slot size per
tier fits them all): the total of each precision is fixed at start, how many of them each layer holds is not,
so the planner may give a layer more int4 slots and another fewer as the workload moves.

Every arena is allocated once, when the runtime starts (`SlotPool.__init__` is the only allocation of resident
expert memory); afterwards taking and returning a slot is a list pop/push (O(1)) and changing an expert's
precision moves bytes into a slot, never calls an allocator. The staging pool holds K slots of the largest
version: a transition lays the new version of a demoted expert there first, so that a version is always
published before the one it replaces is reclaimed (publish-before-reclaim) without a spare slot in every tier.

`BudgetTracker` keeps the byte accounting per tier: `reserve` (pending) when a slot is taken, `commit` when the
version in it is published, `release` when the slot is reclaimed; a reservation over a tier's cap fails (the
transition is deferred, never forced). It records the peak of committed + pending bytes.
Pools move and count bytes; they never decide which expert goes where.
"""
from __future__ import annotations

import threading

import torch

STAGING = "staging"  # tier name of the staging pool


class SlotPool:
    def __init__(self, key, slot_bytes: int, count: int, device="cpu"):
        self.key, self.slot_bytes, self.count = key, slot_bytes, count
        self.arena = torch.empty(count, slot_bytes, dtype=torch.uint8, device=device)  # [S, slot bytes]
        self._free = list(range(count - 1, -1, -1))  # a stack: O(1) take and give back
        self._taken = [False] * count

    @property
    def nbytes(self) -> int:
        return self.count * self.slot_bytes

    def take(self) -> int | None:
        if not self._free:
            return None
        i = self._free.pop()
        self._taken[i] = True
        return i

    def give_back(self, i: int) -> None:
        assert self._taken[i], f"slot {i} of pool {self.key} given back twice"
        self._taken[i] = False
        self._free.append(i)

    def slot(self, i: int) -> torch.Tensor:
        return self.arena[i]  # uint8 [slot bytes], a view

    def in_use(self) -> set[int]:
        return {i for i, t in enumerate(self._taken) if t}

    def check(self) -> None:
        assert len(set(self._free)) == len(self._free), f"pool {self.key}: a slot is free twice"
        assert set(self._free) == {i for i, t in enumerate(self._taken) if not t}, f"pool {self.key}: free list " \
            "and taken flags disagree"


class BudgetTracker:
    """Bytes per tier: pending (reserved, not yet published) and committed (published or still being read)."""

    def __init__(self, caps: dict):
        self.caps = dict(caps)  # tier -> bytes
        self.total_cap = sum(self.caps.values())
        self.pending = dict.fromkeys(self.caps, 0)
        self.committed = dict.fromkeys(self.caps, 0)
        self.peak = 0
        self.refused = 0
        self._lock = threading.Lock()

    def reserve(self, tier, n: int) -> bool:
        with self._lock:
            if self.pending[tier] + self.committed[tier] + n > self.caps[tier]:
                self.refused += 1
                return False
            self.pending[tier] += n
            self.peak = max(self.peak, sum(self.pending.values()) + sum(self.committed.values()))
            return True

    def commit(self, tier, n: int) -> None:
        with self._lock:
            assert self.pending[tier] >= n, (tier, self.pending[tier], n)
            self.pending[tier] -= n
            self.committed[tier] += n

    def release(self, tier, n: int) -> None:
        with self._lock:
            assert self.committed[tier] >= n, (tier, self.committed[tier], n)
            self.committed[tier] -= n

    def check(self) -> None:
        for tier, cap in self.caps.items():
            assert 0 <= self.pending[tier] and 0 <= self.committed[tier], tier
            assert self.pending[tier] + self.committed[tier] <= cap, f"tier {tier} over its cap"
        assert self.peak <= self.total_cap, (self.peak, self.total_cap)


class Pools:
    """All arenas of one runtime: pools[precision] plus the staging pool, under one tracker.

    counts: {(layer, precision): slots} (the start's map: each tier's arena gets their sum); slot_bytes:
    {(layer, precision): bytes of one slot} (a tier's slot is its largest); staging: (K slots, bytes of the
    largest version)."""

    def __init__(self, counts: dict, slot_bytes: dict, staging: tuple[int, int], device="cpu"):
        total, size = {}, {}
        for (layer, p), n in counts.items():
            total[p] = total.get(p, 0) + n
            size[p] = max(size.get(p, 0), slot_bytes[(layer, p)])
        self.pools = {p: SlotPool(p, size[p], n, device) for p, n in total.items() if n > 0}
        self.pools[STAGING] = SlotPool(STAGING, staging[1], staging[0], device)
        caps = {}
        for key, pool in self.pools.items():
            tier = self.tier(key)
            caps[tier] = caps.get(tier, 0) + pool.nbytes
        self.tracker = BudgetTracker(caps)
        self._lock = threading.Lock()

    @staticmethod
    def tier(key) -> str:
        return STAGING if key == STAGING else key.value

    def expert_bytes(self) -> int:
        """Bytes of the tier arenas (what a static map of the same memory would hold), staging excluded."""
        return sum(p.nbytes for k, p in self.pools.items() if k != STAGING)

    def nbytes(self) -> int:
        return sum(p.nbytes for p in self.pools.values())

    def take(self, key) -> int | None:
        """Reserve a slot of pool `key` (pending bytes), or None when none is free / the tier is at its cap."""
        with self._lock:
            pool = self.pools.get(key)
            if pool is None or not pool._free or not self.tracker.reserve(self.tier(key), pool.slot_bytes):
                return None
            return pool.take()

    def commit(self, key) -> None:
        self.tracker.commit(self.tier(key), self.pools[key].slot_bytes)

    def reclaim(self, key, i: int) -> None:
        with self._lock:
            self.tracker.release(self.tier(key), self.pools[key].slot_bytes)
            self.pools[key].give_back(i)

    def reuse(self, key, i: int) -> None:
        """A slot whose version was replaced and is unread now holds the next version: committed -> pending."""
        tier, n = self.tier(key), self.pools[key].slot_bytes
        with self._lock:
            self.tracker.release(tier, n)
            assert self.tracker.reserve(tier, n), "re-reserving a slot just released cannot fail"

    def slot(self, key, i: int) -> torch.Tensor:
        return self.pools[key].slot(i)

    def occupancy(self) -> dict:
        out = {}
        for key, p in self.pools.items():
            name = self.tier(key)
            out[name] = {"slots": p.count, "used": p.count - len(p._free), "slot_bytes": p.slot_bytes}
        return out

    def check(self) -> None:
        """Each arena's free list, the tracker's caps, and the two agreeing: per tier, the tracker's pending +
        committed bytes are exactly the bytes of the taken slots."""
        with self._lock:
            taken = {}
            for key, p in self.pools.items():
                p.check()
                taken[self.tier(key)] = taken.get(self.tier(key), 0) + len(p.in_use()) * p.slot_bytes
            t = self.tracker
            counted = {tier: t.pending[tier] + t.committed[tier] for tier in t.caps}
            assert counted == taken, f"tracker bytes {counted} != taken slots {taken}"
            t.check()
