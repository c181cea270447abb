"""Offload policies: which experts stay resident when the budget cannot hold every expert at the lowest precision.

The expert budget then holds a *cache* of versions (runtime/residency.py moves the bytes); a policy only says how
many slots each precision gets, which precision a miss fetches, and which resident version makes room.

lru-offload[:int4]            mixtral-offloading: one precision, the same number of slots in every layer; a miss
                              fetches that precision and evicts the layer's least recently used expert.
lru-offload+prefetch[:int4]   the same, plus look-ahead prefetch (layer l+1's router on layer l's hidden state).
dynaexq / multilevel          below the all-low budget (`HotPolicy`): by default (hi_share=0) every slot `lo`,
                              the hottest experts resident (a stall costs more than the precision a `hi` slot
                              buys; so the map is continuous with the resident one at the all-low budget,
                              bench/floor.py). With hi_share > 0 precision-aware (HOBBIT, DyMoE's mixed-
                              precision cache): `hi_share` of the bytes are `hi` slots, the rest `lo`; the
                              hottest experts by the live hotness S (routed probability mass: the gate score) are
                              wanted at hi and fetched so on a miss, every other one at lo (a fraction of the
                              bytes); a resident lo copy of an expert wanted hi serves while its hi copy is
                              fetched in the background, a resident hi copy serves an expert wanted lo; room is made
                              by evicting the resident version with the lowest S (x the depth weight with
                              alloc=depth: shallow layers keep more, DyMoE) among those not used in the last
                              two tokens, least recently used first on ties, of the missing layer's own once it
                              holds its share of the arena (a soft quota); a prefetch or an upgrade evicts
                              only a version scored below half of its own;
                              look-ahead prefetch with prefetch=1 (off by default: on this 2-core CPU its
                              wasted reads and CPU cost more than the stalls it hides, bench/offload.py).
The minimum budget is `top_k` slots of the lowest precision per MoE layer (one token's experts in every layer).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from dynaexq.errors import UserError
from dynaexq.quant.precision import Precision
from dynaexq.runtime.budget import depth_weights
from dynaexq.sizes import format_size


def minimum_budget(layers, top_k: int, slot_lo: int) -> int:
    """top-k slots of the lowest precision per MoE layer (checked by `CachePolicy.start`)."""
    return len(layers) * top_k * slot_lo


class BelowMinimum(UserError):
    """An expert budget below the offload minimum (`minimum`: bytes), which the message names."""

    def __init__(self, message: str, minimum: int):
        super().__init__(message)
        self.minimum = minimum


class CachePolicy:
    """A policy below the floor: its own live plan (runtime/controller.py); a subclass says `size`, `update`,
    `want` and `victim`."""
    complete = False  # not every expert is resident: a forward fetches its misses (runtime/demand.py)

    def fits(self, reader, slot_bytes: dict, budget: int) -> bool:
        return False  # a cache at any budget (lru-offload is one by definition)

    def start(self, reader, slot_bytes: dict, budget: int, hotness=None, top_k: int = 1) -> "CachePolicy":
        """The live plan at an expert `budget` (bytes): the cache sized (`slots`: {(first layer, precision): n}, a
        precision's arena serves every layer), scored by the warm-start `hotness` if given; below the minimum
        (top-k slots of the lowest precision per MoE layer) BelowMinimum names it."""
        tiers, layers = self.tiers(reader), reader.layers
        sizes = {p: slot_bytes[(layers[0], p)] for p in tiers}
        low = minimum_budget(layers, top_k, sizes[tiers[-1]])
        if budget < low:
            raise BelowMinimum(f"policy {self}: the expert budget {format_size(budget)} ({budget} bytes) is below the "
                               f"offload minimum {format_size(low)} ({low} bytes) = {top_k} slots (top-k) of "
                               f"{format_size(sizes[tiers[-1]])} of {tiers[-1].value} per MoE layer x {len(layers)} "
                               "layers", low)
        self.size(layers, reader.num_experts, top_k, sizes, budget)
        self.slots = {(layers[0], p): n for p, n in self.counts.items() if n > 0}
        if hotness is not None:
            self.update(hotness)
        return self

    def initial(self) -> dict:
        """The map installed at start: nothing (the cache fills on demand) unless a policy ranks experts."""
        return {}

    def target(self, S: dict, resident: dict) -> dict:
        """Re-score from the hotness S, then {key: precision} of the resident experts wanted higher than they are
        held (their wanted copies are fetched in the background; which experts are resident is the misses' and the
        victims' business, not a decision's)."""
        self.update(S)
        return {k: w for k, p in resident.items() if (w := self.want(*k)).bits > p.bits}

    def map(self, resident: dict) -> dict:
        return {k: self.want(*k) for k in resident}


@dataclass
class LruPolicy(CachePolicy):
    """mixtral-offloading's cache: `per_layer` slots of one precision in every layer, per-layer LRU."""
    precision: Precision = Precision.INT4
    prefetch: bool = False
    per_layer: int = 0
    counts: dict = field(default_factory=dict)  # {precision: slots of the whole model}
    hotness_source = None
    dynamic = True
    offload_only = True

    @classmethod
    def from_arg(cls, arg: str, prefetch: bool):
        return cls(Precision.parse(arg) if arg else Precision.INT4, prefetch)

    def tiers(self, reader) -> list:
        if self.precision not in reader.precisions:
            raise UserError(f"policy {self}: the store has no {self.precision.value} experts (it has "
                            f"{', '.join(p.value for p in reader.precisions)})")
        return [self.precision]

    def size(self, layers, num_experts: int, top_k: int, slot_bytes: dict, budget: int) -> None:
        m = slot_bytes[self.precision]
        self.per_layer = min(num_experts, budget // (m * len(layers)))
        self.counts = {self.precision: self.per_layer * len(layers)}

    def wave_cap(self) -> int:
        return self.per_layer

    def want(self, layer: int, e: int) -> Precision:
        return self.precision

    def victim(self, layer: int, precision, candidates: list, free: bool, held: int, key=None, demand=True,
               now: int = 0):
        """candidates [((layer, e), last use)] resident in pool `precision`, evictable -> the key to evict, None
        to take a free slot, or False: no room now (every candidate is pinned or in flight)."""
        if held < self.per_layer and free:
            return None
        own = [(t, k) for k, t in candidates if k[0] == layer]
        return min(own)[1] if own else False

    def update(self, S: dict) -> None:  # LRU needs no hotness
        pass

    def __str__(self):
        return f"lru-offload{'+prefetch' if self.prefetch else ''}:{self.precision.value}"


@dataclass
class HotPolicy(CachePolicy):
    """The dynaexq/multilevel planners below the all-low budget (see the module docstring)."""
    name: str
    hi: Precision
    lo: Precision
    hi_share: float = 0.0
    prefetch: bool = False
    alloc: str = "proportional"
    counts: dict = field(default_factory=dict)
    score: dict = field(default_factory=dict)  # (layer, e) -> S x depth weight, from the latest decision
    wanted_hi: set = field(default_factory=set)
    depth: dict = field(default_factory=dict)
    recent: int = 0  # layer forwards (cache ticks) during which a used expert is kept: two tokens

    def tiers(self, reader) -> list:
        return [self.hi, self.lo] if self.hi_share > 0 else [self.lo]

    def size(self, layers, num_experts: int, top_k: int, slot_bytes: dict, budget: int) -> None:
        m_lo, n_all = slot_bytes[self.lo], len(layers) * num_experts
        n_lo = 0
        if self.hi_share > 0:  # hi_share of the bytes, but never below the lo floor (top-k slots a layer)
            m_hi = slot_bytes[self.hi]
            n_hi = min(int(budget * self.hi_share) // m_hi, (budget - minimum_budget(layers, top_k, m_lo)) // m_hi,
                       n_all)
            self.counts = {self.hi: n_hi}
            n_lo = (budget - n_hi * m_hi) // m_lo
        else:
            self.counts, n_lo = {}, budget // m_lo
        self.counts[self.lo] = min(n_all, n_lo)
        self.recent = 2 * len(layers)
        self.depth = depth_weights(layers, self.alloc)

    def wave_cap(self) -> int:
        return self.counts[self.lo]

    def want(self, layer: int, e: int) -> Precision:
        return self.hi if (layer, e) in self.wanted_hi else self.lo

    def victim(self, layer: int, precision, candidates: list, free: bool, held: int, key=None, demand=True,
               now: int = 0):
        """The resident version with the lowest score among those not used in the last `recent` layer forwards
        (about two tokens: what decode reuses next is kept whatever its score), least recently used first, of
        `layer`'s own when it holds its share of the arena (the arena's slots over the layers) or more; a
        prefetch or an upgrade of `key` (not `demand`) evicts only a version scored below half of it: a guess
        never displaces an expert about as hot (the hysteresis that keeps noisy scores from churning the cache).
        The share is soft, a layer below it takes from the others: with one pool for all layers and stale or no
        scores, the least recently used version is of the layer that runs next (layers run in a cycle), which
        a global choice would evict just before it is needed (measured on real routing traces, bench/
        trace_policies.py: the share raises the hit rate at 10 % of all-int2 on all four)."""
        if free:
            return None
        own = [c for c in candidates if c[0][0] == layer]
        if own and held * len(self.depth) >= self.counts.get(precision, 0):
            candidates = own
        if not candidates:
            return False
        old = [c for c in candidates if now - c[1] > self.recent] or candidates
        k, _ = min(old, key=lambda c: (self.score.get(c[0], 0.0), c[1]))
        if not demand and not self.score.get(k, 0.0) < 0.5 * self.score.get(key, 0.0):
            return False
        return k

    def initial(self) -> dict:
        """The warm start's hottest experts (scored at `start`), as many as the arenas hold."""
        ranked = sorted(self.score, key=lambda k: -self.score[k])[:sum(self.counts.values())]
        return {k: self.want(*k) for k in ranked}

    def update(self, S: dict) -> None:
        """S {layer: [E]} (the hotness snapshot) -> scores, and the experts wanted at hi (the top n_hi)."""
        self.score = {(layer, e): float(s) * self.depth.get(layer, 1.0) for layer, v in S.items()
                      for e, s in enumerate(v.tolist())}
        n_hi = self.counts.get(self.hi, 0) if self.hi_share > 0 else 0
        ranked = sorted(self.score, key=lambda k: -self.score[k])
        self.wanted_hi = {k for k in ranked[:n_hi] if self.score[k] > 0}

    def __str__(self):
        extra = f"hi={self.hi.value},hi_share={self.hi_share:g}," if self.hi_share > 0 else ""
        return (f"{self.name}:{extra}lo={self.lo.value},prefetch={int(self.prefetch)},alloc={self.alloc} "
                "(offload regime)")
