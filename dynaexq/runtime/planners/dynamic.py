"""Online planners: which experts hold the high-precision slots, re-decided from the live hotness S.

dynaexq[:hi=int8,lo=int2,delta=0.01,alloc=proportional,max_pairs=0]
    DynaExq: per layer a fixed number n_hi[l] of `hi` slots (Eq. 4, runtime/budget.py), the rest `lo`. Target
    set H_l = the top-n_hi[l] experts of S. Cold start (no warm start): take the top-n directly. Afterwards pair
    the highest-scoring outsider with the lowest-scoring incumbent and swap only while S_out - S_in > delta;
    each swap is an indivisible (demote, promote) pair, highest gap first; max_pairs > 0 limits pairs per decision.
multilevel[:ladder=bf16/int8/int6/int4/int3/int2,power=2,delta=0.01,max_pairs=0]
    Beyond the paper: slots of every precision of a ladder, their counts per layer chosen at start by the greedy
    multilevel allocation (planners/calibrated.py) on the warm-start hotness within the budget. Online, experts
    trade slots: a swap of a (tier p) with b (tier q, lower) gains S_b*(c_b(q) - c_b(p)) - S_a*(c_a(q) - c_a(p)),
    c = (the store's output error of the expert, StoreReader.output_error)**power, and is taken while the gain
    exceeds delta times the mean cost step of the two (for two tiers and equal errors this is exactly DynaExq's
    rule). a and b may be of different layers: each precision's slots are shared by all layers (runtime/pool.py),
    so the number of each precision is fixed but how many a layer holds follows the workload (measured: with the
    start's per-layer counts held fixed instead, the best map per phase is 1.11x the per-phase oracle's KL under
    `--scenario shift`, 1.29x under `cold`; with per-precision totals only, 1.02x and 0.99x). The pools never
    re-carve and the bytes never move off the budget.
frozen[:hi=int8,lo=int2,alloc=proportional]
    The paper's static ablation: the warm-start map, never changed.

Below the budget of every expert at the lowest precision, dynaexq and multilevel run the offload regime
(`offload_policy`: planners/offload.py; options hi_share=0 and prefetch=0 apply there). With hi_share=0 every
byte below that budget buys residency at `lo`, so the map is continuous across it (bench/floor.py).
A planner never touches bytes: `start` gives the live plan (SlotPlan), whose `target` returns the map the residency
(runtime/residency.py) is to move to; `decide` returns the pairs and updates the assignment it is given.
"""
from __future__ import annotations

import heapq
from collections import deque
from dataclasses import dataclass

import numpy as np

from dynaexq.errors import UserError
from dynaexq.quant.precision import Precision
from dynaexq.runtime.budget import ALLOCATIONS, SizedReader, two_tier_counts
from dynaexq.runtime.planners.calibrated import LADDER, MultilevelPlanner, _options
from dynaexq.runtime.planners.offload import HotPolicy
from dynaexq.sizes import format_size


@dataclass(frozen=True)
class Pair:
    """One swap a decision makes: expert `demote` of `layer` goes from `hi` to `lo` and expert `promote` of
    `promote_in` (default: the same layer) from `lo` to `hi`, into the slot the first one leaves (the controller
    hands the resulting target map to the residency, runtime/residency.py, which moves the bytes)."""
    layer: int
    demote: int
    promote: int
    hi: Precision
    lo: Precision
    gap: float
    promote_in: int | None = None


@dataclass(frozen=True)
class DynamicPlanner:
    kind: str = "dynaexq"  # dynaexq | multilevel | frozen
    hi: Precision = Precision.INT8
    lo: Precision = Precision.INT2
    ladder: tuple = LADDER
    power: float = 2.0
    delta: float = 0.01
    alloc: str = "proportional"
    max_pairs: int = 0
    hi_share: float = 0.0  # offload regime: the share of the bytes for hi slots (0: every byte buys residency)
    prefetch: bool = False  # offload regime: look-ahead prefetch (off: measured, bench/offload.py)
    hotness_source = "calibration"  # the warm start (a --hotness-file replaces it)
    dynamic = True

    @classmethod
    def from_arg(cls, kind: str, arg: str):
        offload = {"hi_share", "prefetch"}
        allowed = {"dynaexq": {"hi", "lo", "delta", "alloc", "max_pairs", *offload}, "frozen": {"hi", "lo", "alloc"},
                   "multilevel": {"ladder", "power", "delta", "max_pairs", "alloc", *offload}}[kind]
        spec = f"{kind}:{arg}"
        o = _options(arg, allowed, spec)
        hi, lo = Precision.parse(o.get("hi", "int8")), Precision.parse(o.get("lo", "int2"))
        if hi.bits <= lo.bits:
            raise UserError(f"policy {spec}: hi ({hi.value}) must be a higher precision than lo ({lo.value})")
        ladder = tuple(Precision.parse(p) for p in o["ladder"].split("/")) if "ladder" in o else LADDER
        if len(ladder) < 2:
            raise UserError(f"policy {spec}: the ladder needs at least two precisions, e.g. ladder=int8/int4/int2")
        try:
            power, delta, max_pairs = float(o.get("power", 2)), float(o.get("delta", 0.01)), int(o.get("max_pairs", 0))
            hi_share, prefetch = float(o.get("hi_share", 0)), int(o.get("prefetch", 0))
        except ValueError:
            raise UserError(f"policy {spec}: power, delta and hi_share must be numbers, max_pairs and prefetch "
                            "integers") from None
        if not 0 <= hi_share < 1 or prefetch not in (0, 1):
            raise UserError(f"policy {spec}: hi_share is a fraction in [0, 1), prefetch 0 or 1")
        alloc = o.get("alloc", "proportional")
        if alloc not in ALLOCATIONS or power <= 0 or delta < 0 or max_pairs < 0:
            raise UserError(f"policy {spec}: alloc must be one of {', '.join(ALLOCATIONS)}, power > 0, delta >= 0, "
                            "max_pairs >= 0 (0 = no limit)")
        return cls(kind, hi, lo, tuple(sorted(ladder, key=lambda p: -p.bits)), power, delta, alloc, max_pairs,
                   hi_share, bool(prefetch))

    def offload_policy(self, reader):
        """The offload regime's policy (planners/offload.py): hi/lo of dynaexq, the ladder's two lowest precisions
        in the store for multilevel."""
        tiers = self.tiers(reader)
        return HotPolicy(self.kind, tiers[-2] if self.kind == "multilevel" else self.hi, tiers[-1], self.hi_share,
                         self.prefetch, self.alloc)

    def tiers(self, reader) -> list:
        """The precisions this planner uses, highest first."""
        if self.kind != "multilevel":
            tiers = [self.hi, self.lo]
        else:
            tiers = [p for p in self.ladder if p in reader.precisions]
        missing = [p.value for p in tiers if p not in reader.precisions]
        if missing or len(tiers) < 2:
            raise UserError(f"policy {self}: the store has no {', '.join(missing) or 'two of the ladder'} experts "
                            f"(it has {', '.join(p.value for p in reader.precisions)})")
        return tiers

    def floor(self, reader) -> dict:
        """The cheapest map, where the warm-start calibration routing is measured."""
        low = self.tiers(reader)[-1]
        return {(layer, e): low for layer in reader.layers for e in range(reader.num_experts)}

    def counts(self, reader, slot_bytes: dict, expert_budget: int, hotness=None) -> dict:
        """-> {(layer, precision): slots} within expert_budget (slot_bytes: measured, per (layer, precision))."""
        tiers, E = self.tiers(reader), reader.num_experts
        if self.kind != "multilevel":
            n_hi = two_tier_counts(reader.layers, E, {layer: slot_bytes[(layer, self.hi)] for layer in reader.layers},
                                   {layer: slot_bytes[(layer, self.lo)] for layer in reader.layers},
                                   expert_budget, self.alloc)
            return {(layer, p): (n if p == self.hi else E - n) for layer, n in n_hi.items() for p in tiers}
        flat = {layer: np.ones(E) for layer in reader.layers}
        sized = SizedReader(reader, {p: slot_bytes[(reader.layers[0], p)] for p in tiers})  # the measured slots
        plan = MultilevelPlanner(tuple(tiers), self.power).plan(sized, expert_budget, hotness or flat)
        out = {(layer, p): 0 for layer in reader.layers for p in tiers}
        for (layer, _), p in plan.items():
            out[(layer, p)] += 1
        return out

    def fits(self, reader, slot_bytes: dict, expert_budget: int) -> bool:
        """Whether every expert fits at the lowest tier (the slot plan's budgets; below: the cache policy's, a clear
        error naming the floor for frozen)."""
        low = self.tiers(reader)[-1]
        need = sum(reader.num_experts * slot_bytes[(layer, low)] for layer in reader.layers)
        if need > expert_budget and self.kind == "frozen":
            raise UserError(f"policy {self}: every expert at {low.value} needs {format_size(need)} but the expert "
                            f"budget is {format_size(expert_budget)}; the minimum expert budget for it is "
                            f"{format_size(need)} ({need} bytes); dynaexq and multilevel run below it (offload regime)")
        return need <= expert_budget

    def start(self, reader, slot_bytes: dict, expert_budget: int, hotness=None, top_k: int = 1):
        """The live plan at any expert budget from all-hi down to the offload minimum: where every expert fits at
        the lowest tier a SlotPlan (slot counts within the budget, `counts`, then the tiers filled in expert order
        and rearranged by the warm-start hotness with no hysteresis: the top-n directly); below that floor the
        cache policy's (`offload_policy`, CachePolicy.start)."""
        if not self.fits(reader, slot_bytes, expert_budget):
            return self.offload_policy(reader).start(reader, slot_bytes, expert_budget, hotness, top_k)
        counts, tiers, costs = self.counts(reader, slot_bytes, expert_budget, hotness), self.tiers(reader), \
            self.costs(reader)
        S = hotness or {layer: np.zeros(reader.num_experts) for layer in reader.layers}
        assign = {layer: np.array([i for i, p in enumerate(tiers) for _ in range(counts.get((layer, p), 0))],
                                  dtype=np.int64) for layer in reader.layers}
        self.decide(S, assign, costs, tiers, cold=True)
        return SlotPlan(self, counts, assign, costs, tiers, cold=hotness is None)

    def costs(self, reader) -> dict:
        """{layer: [E, P]} cost of each expert at each tier (0/1 for two tiers; error**power for multilevel)."""
        tiers = self.tiers(reader)
        if self.kind != "multilevel":
            return {layer: np.tile([0.0, 1.0], (reader.num_experts, 1)) for layer in reader.layers}
        return {layer: np.array([[reader.output_error(layer, e, p) ** self.power for p in tiers]
                                 for e in range(reader.num_experts)]) for layer in reader.layers}

    def decide(self, S: dict, assign: dict, costs: dict, tiers: list, cold: bool = False) -> list:
        """S {layer: [E]}, assign {layer: int [E] tier index, updated in place} -> pairs, highest gap first."""
        if self.kind == "frozen" and not cold:
            return []
        delta = 0.0 if cold else self.delta
        if self.kind == "multilevel":  # one market for the whole model: slots trade across layers too
            layers = sorted(assign)
            E = len(assign[layers[0]])
            tier = np.concatenate([assign[layer] for layer in layers])
            seq = _swaps(np.concatenate([np.asarray(S[layer], dtype=np.float64) for layer in layers]),
                         np.concatenate([costs[layer] for layer in layers]), tier, delta)
            if self.max_pairs and not cold:
                seq = seq[:self.max_pairs]
            pairs = []
            for a, b, p, q, gap in seq:
                la, lb = layers[a // E], layers[b // E]
                assign[la][a % E], assign[lb][b % E] = q, p
                pairs.append(Pair(la, int(a % E), int(b % E), tiers[p], tiers[q], float(gap), lb))
            return pairs
        per_layer = {layer: _swaps(np.asarray(S[layer], dtype=np.float64), costs[layer], assign[layer].copy(),
                                   delta) for layer in assign}
        # merge the layers' sequences by gap, keeping each layer's own order (a later swap may rely on an earlier)
        heap = [(-seq[0][4], layer, 0) for layer, seq in per_layer.items() if seq]
        heapq.heapify(heap)
        pairs = []
        while heap and (cold or not self.max_pairs or len(pairs) < self.max_pairs):
            _, layer, i = heapq.heappop(heap)
            a, b, p, q, gap = per_layer[layer][i]
            assign[layer][a], assign[layer][b] = q, p
            pairs.append(Pair(layer, int(a), int(b), tiers[p], tiers[q], float(gap)))
            if i + 1 < len(per_layer[layer]):
                heapq.heappush(heap, (-per_layer[layer][i + 1][4], layer, i + 1))
        return pairs

    def __str__(self):
        if self.kind == "multilevel":
            return f"multilevel:ladder={'/'.join(p.value for p in self.ladder)},power={self.power:g},delta={self.delta:g}"
        extra = "" if self.kind == "frozen" else f",delta={self.delta:g}"
        return f"{self.kind}:hi={self.hi.value},lo={self.lo.value}{extra},alloc={self.alloc}"


HISTORY = 64  # target maps kept for inspection (one per decision; older ones are dropped)


class SlotPlan:
    """A slot planner's live state: the tier each expert is to hold (`assign`: {layer: int [E]}), re-decided from
    the hotness by `target`. The target, not what is published, is what the next decision starts from, so the
    sequence of maps depends on the statistics alone, not on how fast the residency moves bytes."""

    complete = True  # every expert resident

    def __init__(self, planner: DynamicPlanner, counts: dict, assign: dict, costs: dict, tiers: list, cold: bool):
        self.planner, self.counts, self.assign, self.costs, self.tiers = planner, counts, assign, costs, tiers
        self.slots = counts  # {(layer, precision): slots} the arenas hold
        self.cold = cold  # no warm start: the first decision takes the top-n directly
        self.pairs = 0  # swaps decided so far
        self.history: deque = deque(maxlen=HISTORY)  # the target map after the latest decisions (tier indices)

    def target(self, S: dict, resident=None) -> dict:
        """Re-decide from the hotness S {layer: [E]} -> {(layer, e): precision} of every expert."""
        self.pairs += len(self.planner.decide(S, self.assign, self.costs, self.tiers, cold=self.cold))
        self.cold = False
        self.history.append(tuple(tuple(a.tolist()) for _, a in sorted(self.assign.items())))
        return self.map()

    def map(self, resident=None) -> dict:
        return {(layer, e): self.tiers[t] for layer, a in self.assign.items() for e, t in enumerate(a.tolist())}

    def initial(self) -> dict:
        return self.map()


def _swaps(S, C, tier, delta: float) -> list:
    """Greedy slot trades among experts S [N] with costs C [N, P] at tiers `tier` [N] (updated in place):
    repeatedly the (a in tier p, b in lower tier q) swap with the largest margin = gain - delta * mean cost step,
    while that margin is > 0 -> [(a, b, p, q, margin)]. The margin is (S_b - delta/2) dB_b - (S_a + delta/2) dA_a
    (dA: cost a gains going down, dB: cost b sheds going up): separable, so each tier pair costs O(N), not O(N^2)."""
    out = []
    P = C.shape[1]
    for _ in range(4 * len(S)):  # each swap lowers sum(S * cost) strictly, so this ends; the cap is a guard
        best = None
        for p in range(P):
            A = np.flatnonzero(tier == p)
            for q in range(p + 1, P):
                B = np.flatnonzero(tier == q)
                if not len(A) or not len(B):
                    continue
                dA, dB = C[A, q] - C[A, p], C[B, q] - C[B, p]
                i, j = np.argmin((S[A] + delta / 2) * dA), np.argmax((S[B] - delta / 2) * dB)
                gain = S[B[j]] * dB[j] - S[A[i]] * dA[i]
                margin = gain - delta * (dA[i] + dB[j]) / 2
                if margin > 1e-12 and gain > 0 and (best is None or margin > best[4]):
                    best = (A[i], B[j], p, q, float(margin))
        if best is None:
            break
        a, b, p, q, _ = best
        tier[a], tier[b] = q, p
        out.append(best)
    return out
