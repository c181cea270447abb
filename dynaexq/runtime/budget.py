"""Budget initialization (DynaExq Eq. 4) on measured bytes.

  M_fixed = non-expert weights (measured on the loaded model) + KV-cache reserve + activation reserve
            + safety margin + K staging slots of the largest expert version
  M_exp   = budget - M_fixed                       (or given directly as --expert-budget)
  per layer n_hi[l] high-precision slots with  sum_l n_hi[l]*m_hi[l] + (E_l - n_hi[l])*m_lo[l] <= M_exp,
  m = the measured slot size of a version (packed codes + scales, aligned; `version.slot_layout`).

Allocations: `proportional` (the same fraction r of every layer, the largest r by bisection) and `depth` (DyMoE:
more high-precision slots in shallow layers, a cosine decay from 1 to 1/2 with depth, scaled by bisection).
If even every expert at the low precision does not fit, the error states the minimum budget.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from dynaexq.errors import UserError
from dynaexq.sizes import format_size

ALLOCATIONS = ("proportional", "depth")


def _bisect(feasible, hi: float) -> float:
    lo = 0.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if feasible(mid) else (lo, mid)
    return lo


def depth_weights(layers, alloc: str) -> dict:
    """{layer: weight}: 1 everywhere (`proportional`), or DyMoE's cosine decay with depth from 1 (first MoE layer)
    to 1/2 (last) (`depth`)."""
    L = len(layers)
    if alloc == "proportional":
        return dict.fromkeys(layers, 1.0)
    return {layer: 0.75 + 0.25 * math.cos(math.pi * i / max(1, L - 1)) for i, layer in enumerate(layers)}


def two_tier_counts(layers, num_experts: int, m_hi: dict, m_lo: dict, expert_budget: int,
                    alloc: str = "proportional") -> dict:
    """-> {layer: n_hi}: high-precision slots per layer under Eq. 4."""
    if alloc not in ALLOCATIONS:
        raise UserError(f"unknown allocation {alloc!r}; valid: {', '.join(ALLOCATIONS)}")
    E = num_experts
    low = sum(E * m_lo[layer] for layer in layers)
    if low > expert_budget:
        raise UserError(f"the expert budget {format_size(expert_budget)} ({expert_budget} bytes) cannot hold even every "
                        f"expert at the low precision: the minimum expert budget is {format_size(low)} ({low} bytes)")
    weight = depth_weights(layers, alloc)

    def counts(s):
        return {layer: min(E, int(math.floor(s * weight[layer] * E + 1e-9))) for layer in layers}

    def feasible(s):
        n = counts(s)
        return sum(n[layer] * m_hi[layer] + (E - n[layer]) * m_lo[layer] for layer in layers) <= expert_budget

    return counts(_bisect(feasible, 1.0 / min(weight.values()) + 1e-6))


@dataclass
class BudgetPlan:
    """What the runtime will hold: per (layer, precision) slot counts and sizes, staging, and the reserves."""
    counts: dict  # (layer, Precision) -> slots
    slot_bytes: dict  # (layer, Precision) -> bytes of one slot
    staging: tuple  # (K slots, bytes each)
    expert_budget: int
    total: int | None = None  # the --budget it was derived from, if any
    reserves: dict = field(default_factory=dict)  # name -> bytes (M_fixed, staging included)

    def tier_bytes(self) -> dict:
        out = {}
        for (_, p), n in self.counts.items():
            out[p.value] = out.get(p.value, 0) + n * self.slot_bytes[(_, p)]
        return out

    def expert_bytes(self) -> int:
        return sum(self.tier_bytes().values())

    def describe(self) -> str:
        lines = []
        if self.total is not None:
            lines.append(f"budget {format_size(self.total)} = fixed {format_size(sum(self.reserves.values()))} ("
                         + ", ".join(f"{k} {format_size(v)}" for k, v in self.reserves.items())
                         + f") + experts {format_size(self.expert_budget)}")
        else:
            lines.append(f"expert budget {format_size(self.expert_budget)}" + (
                f"; staging {self.staging[0]} x {format_size(self.staging[1])} on top" if self.staging[0] else ""))
        tiers = sorted({p for _, p in self.counts}, key=lambda p: -p.bits)
        layers = sorted({layer for layer, _ in self.counts})
        for p in tiers:  # below the floor a cache's slots are counted once, not per layer
            held = " ".join(str(self.counts.get((layer, p), 0)) for layer in layers)
            lines.append(f"  {p.value:>5}: " + (f"slots per layer {held}" if len(layers) > 1 else f"{held} slots")
                         + f"  ({format_size(self.tier_bytes().get(p.value, 0))})")
        lines.append(f"  experts use {format_size(self.expert_bytes())} of {format_size(self.expert_budget)}")
        return "\n".join(lines)


def split_budget(total: int, reserves: dict) -> int:
    """--budget minus M_fixed -> the expert budget; refuses when the reserves alone do not fit."""
    fixed = sum(reserves.values())
    if fixed >= total:
        raise UserError(f"--budget {format_size(total)} does not cover the fixed part {format_size(fixed)} ("
                        + ", ".join(f"{k} {format_size(v)}" for k, v in reserves.items())
                        + "); give a larger --budget or set --expert-budget directly")
    return total - fixed


class SizedReader:
    """A store reader whose expert sizes are the bytes a version really occupies where it runs (measured by
    laying one out: `version.slot_layout`), not the bytes it takes in the store: they differ on the aten
    fallback and on CUDA, where the low-bit codes are held as int4 codes with bf16 tables. Planners and budget
    checks read sizes through it; everything else goes to the store reader."""

    def __init__(self, reader, sizes: dict, where: str = "this device", weights: int | None = None):
        self._reader, self.sizes, self.where = reader, sizes, where  # sizes: {precision: bytes per expert}
        self.weights = weights  # weights per expert (gate_up + down), for bits per weight in messages
        self.layers, self.num_experts, self.precisions = reader.layers, reader.num_experts, reader.precisions

    def expert_bytes(self, layer, e, p):
        return self.sizes[p]

    def output_error(self, layer, e, p):
        return self._reader.output_error(layer, e, p)

    def __getattr__(self, name):
        return getattr(self._reader, name)

    def dominated(self) -> dict:
        """{precision: the highest precision above it whose resident form here is no larger}."""
        out = {}
        for p in self.sizes:
            better = [q for q in self.sizes if q.bits > p.bits and self.sizes[q] <= self.sizes[p]]
            if better:
                out[p] = max(better, key=lambda q: q.bits)
        return out

    def check(self, precisions) -> None:
        """Refuse a precision whose resident form here is no smaller than a higher precision's (it would cost
        as many bytes and lose quality): name both, with their bits per weight."""
        bad = self.dominated()
        for p in precisions:
            if p in bad:
                q = bad[p]

                def bpw(x):
                    return f" ({8 * self.sizes[x] / self.weights:.2f} bits per weight)" if self.weights else ""
                raise UserError(f"{p.value} takes {format_size(self.sizes[p])} per expert resident on {self.where}"
                                f"{bpw(p)}, no less than {q.value}'s {format_size(self.sizes[q])}{bpw(q)}: give "
                                f"{q.value} or another precision above it")
