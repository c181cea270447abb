"""Hotness-driven static planners: the allocation is computed once from routing statistics.

calibrated[:hi=int8,lo=int2]   DynaExq's offline mixed precision ("MP-Offline"): rank experts per layer by routed
                               probability mass on a calibration text; the same top fraction of every layer is
                               kept at `hi`, the rest at `lo`; bytes left over go to the next-hottest experts.
calibrated-multilevel[:ladder=bf16/int8/int6/int4/int3/int2,power=2]
                               DynaMo-style: each expert's precision from a ladder, greedy by the largest
                               (hotness x reduction of error**power) per byte, on the lower convex hull of every
                               expert's (bytes, cost) options; `error` is the store's output error of the expert
                               (`StoreReader.output_error`: its relative error on the calibration inputs x the
                               size of its output). power=2: the output perturbation an expert adds is ~ p * err,
                               and KL is quadratic in it.
oracle[:hi=..,lo=..]           the multilevel (or, with hi/lo, the two-tier) allocation from the routing of the
                               evaluated text itself: an upper bound for a static map, only meaningful in `eval`.

Calibration routing is measured with the model at `floor(reader)` (every expert at the cheapest precision, as
DynaExq's warm start runs the model in all-low mode), so `load` and `eval` rank experts alike and the
calibration pass fits any budget the final map fits. Every planner fills the budget it is given (bytes measured in the store) and never exceeds it; if even the
cheapest map does not fit it says what the minimum is. Hotness: {layer: tensor [E] of routed mass}.
"""
from __future__ import annotations

import heapq
from dataclasses import dataclass

from dynaexq.errors import UserError
from dynaexq.quant.precision import Precision
from dynaexq.sizes import format_size

LADDER = (Precision.BF16, Precision.INT8, Precision.INT6, Precision.INT4, Precision.INT3, Precision.INT2)


def _options(arg: str, allowed: set[str], policy: str) -> dict[str, str]:
    out = {}
    for part in filter(None, (p.strip() for p in arg.split(","))):
        key, eq, value = part.partition("=")
        if not eq or key.strip() not in allowed:
            raise UserError(f"policy {policy!r}: bad option {part!r}; options are "
                            + ", ".join(f"{k}=..." for k in sorted(allowed)))
        out[key.strip()] = value.strip()
    return out


def _need(planner, budget, hotness):
    if budget is None:
        raise UserError(f"policy {planner} needs an expert budget (--expert-budget SIZE, or a precision such as "
                        "int3 meaning the bytes of every expert at that precision)")
    if hotness is None:
        raise UserError(f"policy {planner} needs routing statistics ({planner.hotness_source} text) to rank experts")


def _check_fits(planner, reader, budget: int, floor: Precision) -> int:
    low = sum(reader.expert_bytes(layer, e, floor) for layer in reader.layers for e in range(reader.num_experts))
    if low > budget:
        raise UserError(f"policy {planner}: even every expert at {floor.value} needs {low} bytes "
                        f"({format_size(low)}) but the expert budget is {budget} bytes ({format_size(budget)}); "
                        f"the minimum budget for this policy is {format_size(low)}; below it the runtime policies "
                        "dynaexq and multilevel keep the hot experts resident and read the rest from the store")
    return low


def _hot(hotness, layer, e) -> float:
    return float(hotness[layer][e])


@dataclass(frozen=True)
class TwoTierPlanner:
    hi: Precision = Precision.INT8
    lo: Precision = Precision.INT2
    hotness_source: str = "calibration"

    @classmethod
    def from_arg(cls, arg: str, hotness_source: str = "calibration"):
        name = "calibrated" if hotness_source == "calibration" else "oracle"
        o = _options(arg, {"hi", "lo"}, f"{name}:{arg}")
        hi, lo = Precision.parse(o.get("hi", "int8")), Precision.parse(o.get("lo", "int2"))
        if hi.bits <= lo.bits:
            raise UserError(f"policy {name}:{arg}: hi ({hi.value}) must be a higher precision than lo ({lo.value})")
        return cls(hi, lo, hotness_source)

    def floor(self, reader) -> dict:
        """The cheapest map (every expert at lo): where calibration routing is measured, as in DynaExq."""
        return {(layer, e): self.lo for layer in reader.layers for e in range(reader.num_experts)}

    def plan(self, reader, budget: int | None = None, hotness=None) -> dict:
        _need(self, budget, hotness)
        used = _check_fits(self, reader, budget, self.lo)
        E = reader.num_experts
        plan = {(layer, e): self.lo for layer in reader.layers for e in range(E)}
        order = {layer: sorted(range(E), key=lambda e, layer=layer: (-_hot(hotness, layer, e), e))
                 for layer in reader.layers}

        def extra(layer, e):
            return reader.expert_bytes(layer, e, self.hi) - reader.expert_bytes(layer, e, self.lo)

        # the same count n of high-precision experts in every layer, as large as fits
        n = 0
        while n < E and used + sum(extra(layer, order[layer][n]) for layer in reader.layers) <= budget:
            used += sum(extra(layer, order[layer][n]) for layer in reader.layers)
            for layer in reader.layers:
                plan[(layer, order[layer][n])] = self.hi
            n += 1
        # leftover bytes: the next expert in line of each layer, hottest (share of its layer's mass) first
        total = {layer: max(sum(float(h) for h in hotness[layer]), 1e-30) for layer in reader.layers}
        heap = [(-_hot(hotness, layer, order[layer][n]) / total[layer], layer, n) for layer in reader.layers if n < E]
        heapq.heapify(heap)
        while heap:
            _, layer, i = heapq.heappop(heap)
            e = order[layer][i]
            if used + extra(layer, e) <= budget:
                used += extra(layer, e)
                plan[(layer, e)] = self.hi
                if i + 1 < E:
                    heapq.heappush(heap, (-_hot(hotness, layer, order[layer][i + 1]) / total[layer], layer, i + 1))
        return plan

    def __str__(self):
        name = "calibrated" if self.hotness_source == "calibration" else "oracle"
        return f"{name}:hi={self.hi.value},lo={self.lo.value}"


@dataclass(frozen=True)
class MultilevelPlanner:
    ladder: tuple = LADDER
    power: float = 2.0
    hotness_source: str = "calibration"

    @classmethod
    def from_arg(cls, arg: str, hotness_source: str = "calibration"):
        name = "calibrated-multilevel" if hotness_source == "calibration" else "oracle"
        o = _options(arg, {"ladder", "power"}, f"{name}:{arg}")
        ladder = tuple(Precision.parse(p) for p in o["ladder"].split("/")) if "ladder" in o else LADDER
        try:
            power = float(o.get("power", 2.0))
        except ValueError:
            raise UserError(f"policy {name}:{arg}: power must be a number, e.g. power=2") from None
        if len(ladder) < 2 or not power > 0:
            raise UserError(f"policy {name}:{arg}: needs a ladder of at least two precisions (e.g. "
                            "ladder=int8/int4/int2) and power > 0")
        return cls(ladder, power, hotness_source)

    def _ladder(self, reader) -> list:
        ladder = [p for p in self.ladder if p in reader.precisions]
        if len(ladder) < 2:
            raise UserError(f"policy {self}: the store has only {[p.value for p in reader.precisions]} of the ladder")
        return ladder

    def floor(self, reader) -> dict:
        """The cheapest map (every expert at the ladder's smallest precision)."""
        low = min(self._ladder(reader), key=lambda p: reader.expert_bytes(reader.layers[0], 0, p))
        return {(layer, e): low for layer in reader.layers for e in range(reader.num_experts)}

    def plan(self, reader, budget: int | None = None, hotness=None) -> dict:
        _need(self, budget, hotness)
        ladder = self._ladder(reader)
        floor = min(ladder, key=lambda p: reader.expert_bytes(reader.layers[0], 0, p))
        _check_fits(self, reader, budget, floor)
        mean = sum(float(h) for layer in reader.layers for h in hotness[layer]) / max(1, len(hotness) * reader.num_experts)
        options = {}
        for layer in reader.layers:
            for e in range(reader.num_experts):
                hot = max(_hot(hotness, layer, e), 1e-6 * mean + 1e-30)  # unrouted experts: bytes left go by error
                options[(layer, e)] = [(reader.expert_bytes(layer, e, p), hot * reader.output_error(layer, e, p)
                                        ** self.power, p) for p in ladder]
        return allocate(options, budget)

    def __str__(self):
        name = "calibrated-multilevel" if self.hotness_source == "calibration" else "oracle"
        return f"{name}:ladder={'/'.join(p.value for p in self.ladder)},power={self.power:g}"


def _lower_hull(pts):
    """(bytes, cost, precision) sorted by bytes -> the options worth taking in order: cost strictly falling,
    each step with a smaller gain per byte than the one before (so greedy takes them in order)."""
    hull = []
    for b, c, p in pts:
        if hull and (b == hull[-1][0] or c >= hull[-1][1]):
            if b == hull[-1][0] and c < hull[-1][1]:
                hull.pop()
            else:
                continue
        while len(hull) >= 2:
            (b0, c0, _), (b1, c1, _) = hull[-2], hull[-1]
            if (c0 - c1) * (b - b1) <= (c1 - c) * (b1 - b0):  # the middle point lies above the chord
                hull.pop()
            else:
                break
        hull.append((b, c, p))
    return hull


def allocate(options: dict, budget: int) -> dict:
    """{item: [(bytes, cost, precision)]} -> {item: precision}: every item at its cheapest option on the lower hull
    of its (bytes, cost) options, then the upgrade with the largest cost reduction per byte that still fits, again
    and again (each item's upgrades come in hull order). The items may be experts and dense matrices alike."""
    plan, heap, used = {}, [], 0
    for n, (key, opts) in enumerate(options.items()):
        hull = _lower_hull(sorted(opts, key=lambda o: (o[0], o[1])))
        plan[key] = hull[0][2]
        used += hull[0][0]
        _push(heap, hull, 0, n, key)
    while heap:
        _, n, key, i, hull = heapq.heappop(heap)
        step = hull[i + 1][0] - hull[i][0]
        if used + step <= budget:
            used += step
            plan[key] = hull[i + 1][2]
            _push(heap, hull, i + 1, n, key)
    return plan


def _push(heap, hull, i, n, key):
    if i + 1 < len(hull):
        gain = (hull[i][1] - hull[i + 1][1]) / (hull[i + 1][0] - hull[i][0])
        heapq.heappush(heap, (-gain, n, key, i, hull))
