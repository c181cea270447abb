"""The controller: hotness in, precision decisions out, between forward steps.

After every step the engine hands over the banks' routing statistics: the hotness EMA is updated (on the
device, no sync), and every `update_every_tokens` routed tokens (or `update_every` steps) the planner compares
S with the *target* assignment (what the map will be once every submitted pair is done, so decisions do not
depend on how fast transitions run: the same statistics stream gives the same sequence of maps) and submits the
pairs it wants to the transition engine. Policy runs here, never inside a forward pass.
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
    def __init__(self, planner, hotness, transitions, assign: dict, costs: dict, tiers: list,
                 config: RuntimeConfig, cold: bool):
        self.planner, self.hotness, self.transitions = planner, hotness, transitions
        self.assign, self.costs, self.tiers, self.config = assign, costs, tiers, config
        self.cold = cold  # no warm start: the first decision takes the top-n directly
        self.steps = self.tokens = self.decisions = 0
        self._tokens_at_decision = 0
        self.history: deque = deque(maxlen=HISTORY)  # the target map after the latest decisions (tier indices)

    def on_step(self, stats: dict) -> None:
        """stats: {layer: (routed tokens, routed mass [E])} of one forward pass."""
        self._sync()
        if observe(self, stats, self._tokens_at_decision):
            self.decide()

    def decide(self) -> list:
        self._sync()
        self._tokens_at_decision = self.tokens
        pairs = self.planner.decide(self.hotness.snapshot(), self.assign, self.costs, self.tiers, cold=self.cold)
        self.cold = False
        self.decisions += 1
        self.history.append(tuple(tuple(a.tolist()) for _, a in sorted(self.assign.items())))
        self.transitions.submit(pairs)
        return pairs

    def _sync(self) -> None:
        """Pairs were given up (a failed read and the pairs planned on it): the target of their layers becomes what
        is published plus what is still queued or in flight. Runs on the controller's thread, the assignment's
        only writer; the transition workers only leave a message (`take_failed`)."""
        layers = self.transitions.take_failed()
        if not layers:
            return
        published, pending = self.transitions.snapshot()
        for layer in layers:
            a = self.assign[layer]
            a[:] = [self.tiers.index(p) for p in published[layer]]
            for pair in pending:
                if pair.layer == layer:
                    a[pair.demote] = self.tiers.index(pair.lo)
                if pair.promote_layer == layer:
                    a[pair.promote] = self.tiers.index(pair.hi)

    def target_map(self) -> dict:
        self._sync()
        return {(layer, e): self.tiers[t] for layer, a in self.assign.items() for e, t in enumerate(a.tolist())}

    def close(self) -> None:
        """Stop the transitions (queued pairs are dropped, the one in flight ends) and save the hotness file,
        whatever happens while stopping."""
        try:
            self.transitions.close()
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
