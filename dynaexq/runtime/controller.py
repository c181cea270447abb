"""The controller: hotness in, precision decisions out, between forward steps.

After every step the engine hands over the banks' routing statistics: the hotness EMA is updated (on the
device, no sync), and every `update_every_tokens` routed tokens (or `update_every` steps) the planner compares
S with the *target* assignment (what the map will be once every fetch is done, so decisions do not depend on
how fast transitions run: the same statistics stream gives the same sequence of maps) and the residency moves
the published map toward the new target (runtime/residency.py). A fetch that failed is tried again at the next
decision: the target is applied to what is published. Policy runs here, never inside a forward pass.
Its settings are `dynaexq.config.RuntimeConfig`.
"""
from __future__ import annotations

from collections import deque

import numpy as np

from dynaexq.config import RuntimeConfig


def observe(controller, stats: dict, tokens_at_decision: int) -> bool:
    """One step's statistics into the controller's hotness and counters -> whether a decision is due (every
    `update_every_tokens` routed tokens, or every `update_every` steps). Both regimes' controllers use it."""
    controller.hotness.update(stats)
    controller.steps += 1
    controller.tokens += max((t for t, _ in stats.values()), default=0)
    c = controller.config
    if c.update_every_tokens:
        return controller.tokens - tokens_at_decision >= c.update_every_tokens
    return controller.steps % c.update_every == 0


HISTORY = 64  # target maps kept for inspection (one per decision; older ones are dropped)


class Controller:
    """Hotness in, a target map out, between steps. Two kinds of planner feed it: a slot planner (dynaexq,
    multilevel, frozen: `assign` given, its target is every expert's tier) and, below the floor, a cache policy
    (planners/offload.py: `assign` None; its target is the wanted higher copy of each resident expert, misses
    being the forward's). Either way the residency applies the target (`Residency.apply`)."""

    def __init__(self, planner, hotness, residency, config: RuntimeConfig, assign: dict | None = None,
                 costs: dict | None = None, tiers: list | None = None, cold: bool = False):
        self.planner, self.hotness, self.residency, self.config = planner, hotness, residency, config
        self.assign, self.costs, self.tiers = assign, costs, tiers
        self.cold = cold  # no warm start: the first decision takes the top-n directly
        self.steps = self.tokens = self.decisions = self.pairs = 0
        self._tokens_at_decision = 0
        self.history: deque = deque(maxlen=HISTORY)  # the target map after the latest decisions (tier indices)

    def on_step(self, stats: dict) -> None:
        """stats: {layer: (routed tokens, routed mass [E])} of one forward pass."""
        if observe(self, stats, self._tokens_at_decision):
            self.decide()

    def decide(self) -> dict:
        """Re-plan from the hotness -> the target handed to the residency."""
        self._tokens_at_decision = self.tokens
        self.decisions += 1
        S = self.hotness.snapshot()
        if self.assign is None:
            self.planner.update(S)
            target = {k: w for k, p in self.residency.resident().items() if (w := self.planner.want(*k)).bits > p.bits}
        else:
            self.pairs += len(self.planner.decide(S, self.assign, self.costs, self.tiers, cold=self.cold))
            self.cold = False
            self.history.append(tuple(tuple(a.tolist()) for _, a in sorted(self.assign.items())))
            target = self.target_map()
        self.residency.apply(target)
        if self.config.blocking:  # the ablation: the forward pass waits for the transitions
            self.residency.drain()
        return target

    def target_map(self) -> dict:
        """{(layer, e): precision} the controller wants (below the floor: the policy's wanted precision of each
        resident expert, None for the others)."""
        if self.assign is None:
            resident = self.residency.resident()
            return {(layer, e): (self.planner.want(layer, e) if (layer, e) in resident else None)
                    for layer in self.hotness.S for e in range(self.hotness.num_experts)}
        return {(layer, e): self.tiers[t] for layer, a in self.assign.items() for e, t in enumerate(a.tolist())}

    def close(self) -> None:
        """Stop the residency's fetches (queued ones are dropped, the one in flight ends) and save the hotness
        file, whatever happens while stopping."""
        try:
            self.residency.close()
        finally:
            if self.config.hotness_file:
                self.hotness.save(self.config.hotness_file)


def initial_assign(planner, S: dict, counts: dict, tiers: list, costs: dict) -> dict:
    """The target at start: tiers filled in expert order, then rearranged with no hysteresis (the top-n directly)."""
    assign = {}
    for layer in S:
        slots = [i for i, p in enumerate(tiers) for _ in range(counts.get((layer, p), 0))]
        assign[layer] = np.array(slots, dtype=np.int64)
    planner.decide(S, assign, costs, tiers, cold=True)
    return assign
