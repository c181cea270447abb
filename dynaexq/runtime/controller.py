"""The controller: hotness in, precision decisions out, between forward steps.

After every step the engine hands over the banks' routing statistics: the hotness EMA is updated (on the
device, no sync), and every `update_every_tokens` routed tokens (or `update_every` steps) the planner compares
S with the *target* assignment (what the map will be once every submitted pair is done, so decisions do not
depend on how fast transitions run: the same statistics stream gives the same sequence of maps) and submits the
pairs it wants to the transition engine. Policy runs here, never inside a forward pass.
`RuntimeConfig` holds every runtime default; the CLI derives its flags from it.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import numpy as np

from dynaexq.errors import UserError


UPDATE_EVERY_TOKENS = 128  # the defaults, from bench/adaptation.py and bench/switching.py (README)
HALF_LIFE_TOKENS = 256.0


def option(default, help: str):
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class RuntimeConfig:
    budget: str | None = option(None, "total device memory for the model (e.g. 2GiB): experts get what is left after "
                              "the non-expert weights, the reserves and the staging slots (DynaExq Eq. 4)")
    kv_reserve: str = option("0", "KV-cache bytes to keep free out of --budget")
    activation_reserve: str = option("16MiB", "activation bytes to keep free out of --budget")
    safety_margin: float = option(0.02, "fraction of --budget kept free")
    staging_slots: int = option(4, "K: transitions in flight, each with one staging slot of the largest version")
    transition_workers: int = option(0, "threads running transitions (0: K on CUDA, 1 on the CPU, where they share the "
                                     "forward pass's cores)")
    half_life_tokens: float | None = option(None, "hotness EMA by evidence: S <- a*S + (1-a)*c after every step with "
                                            "a = 0.5**(tokens in the step / this), so a 32-token prefill chunk weighs "
                                            f"32 decode tokens (default {HALF_LIFE_TOKENS:g} unless --alpha is given)")
    alpha: float | None = option(None, "hotness EMA per step instead: a = alpha whatever the step's tokens (DynaExq: 0.9)")
    update_every_tokens: int | None = option(None, "decide every N routed tokens (default "
                                             f"{UPDATE_EVERY_TOKENS} unless --update-every is given)")
    update_every: int | None = option(None, "decide every N steps (forward passes) instead (DynaExq: 200)")
    hotness_file: str | None = option(None, "load the hotness from this file at start (if it exists) and save it there "
                                    "on close")
    blocking: bool = option(False, "run transitions inline at each decision (ablation: the forward pass waits)")
    retries: int = option(2, "retries of a transition whose store read fails before it is given up")
    offload_io: str = option("direct", "offload regime: how misses read the store: direct (O_DIRECT), buffered (drop "
                             "the page cache after each read) or cached (keep it: not an offload figure)")
    io_workers: int = option(2, "offload regime: reader threads fetching experts from the store")

    def __post_init__(self):  # resolve the defaults: tokens unless steps were asked for (0 = that clock is off)
        steps, alpha = self.update_every is not None, self.alpha is not None
        resolved = {"update_every_tokens": 0 if steps else UPDATE_EVERY_TOKENS, "update_every": 0,
                    "half_life_tokens": 0 if alpha else HALF_LIFE_TOKENS, "alpha": 0.9}
        for name, value in resolved.items():
            if getattr(self, name) is None:
                object.__setattr__(self, name, value)
        if self.offload_io not in ("direct", "buffered", "cached") or self.io_workers < 1:
            raise UserError(f"--offload-io must be direct, buffered or cached and --io-workers >= 1 (got "
                            f"{self.offload_io!r}, {self.io_workers})")
        if not (self.update_every_tokens or self.update_every) or min(self.update_every, self.update_every_tokens) < 0:
            raise UserError(f"decisions need --update-every-tokens N or --update-every N with N >= 1 (got "
                            f"{self.update_every_tokens}, {self.update_every})")


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
