"""The controller: hotness in, precision decisions out, between forward steps.

After every step the engine hands over the banks' routing statistics: the hotness EMA is updated (on the
device, no sync), and every `update_every_tokens` routed tokens (or `update_every` steps) a copy of it goes to
the controller's thread, where the planner compares it with the *target* assignment (what the map will be once
every fetch is done, so decisions do not depend on how fast fetches run: the same statistics stream gives the
same sequence of maps) and the residency moves the published map toward the new target (runtime/residency.py).
A fetch that failed is tried again at the next decision: the target is applied to what is published. Policy
runs here, never inside a forward pass and never on the inference thread.
Its settings are `dynaexq.config.RuntimeConfig`.
"""
from __future__ import annotations

import queue
import threading

from dynaexq.config import RuntimeConfig
from dynaexq.threads import limit_this_thread


def observe(controller, stats: dict, tokens_at_decision: int) -> bool:
    """One step's statistics into the controller's hotness and counters -> whether a decision is due (every
    `update_every_tokens` routed tokens, or every `update_every` steps). The controller and the trace replay's
    clock (runtime/replay.py) use it."""
    controller.hotness.update(stats)
    controller.steps += 1
    controller.tokens += max((t for t, _ in stats.values()), default=0)
    c = controller.config
    if c.update_every_tokens:
        return controller.tokens - tokens_at_decision >= c.update_every_tokens
    return controller.steps % c.update_every == 0


class Controller:
    """Hotness in, a target map out. `plan` is the planner's live state: a slot plan (dynaexq, multilevel,
    frozen: planners/dynamic.py SlotPlan) or, below the floor, the cache policy (planners/offload.py); its
    `target(S, resident)` is the map the residency is to move to. The inference thread only updates the hotness
    and, when a decision is due, takes a copy of it; the decision (the planner's work) and `Residency.apply` run
    on the controller's own thread, in the order the copies were taken (so the sequence of maps depends on the
    statistics alone). `blocking` runs them inline and waits for the fetches (the ablation)."""

    def __init__(self, plan, hotness, residency, config: RuntimeConfig):
        self.plan, self.hotness, self.residency, self.config = plan, hotness, residency, config
        self.steps = self.tokens = self.decisions = 0
        self._tokens_at_decision = 0
        self._lock = threading.Lock()  # the plan: decisions write it, target_map (stats, other threads) reads it
        self._due: queue.Queue = queue.Queue()  # hotness copies of decisions not yet taken (None: stop)
        self._closing = False  # decisions still queued at close are skipped
        self._thread = None if config.blocking else threading.Thread(target=self._run, name="dynaexq-controller",
                                                                     daemon=True)
        if self._thread is not None:
            self._thread.start()

    def on_step(self, stats: dict) -> None:
        """stats: {layer: (routed tokens, routed mass [E])} of one step (the inference thread)."""
        if observe(self, stats, self._tokens_at_decision):
            self._tokens_at_decision = self.tokens
            if self._thread is None:
                self.decide()
                self.residency.drain()
            else:
                self._due.put(self.hotness.snapshot())

    def decide(self, S: dict | None = None) -> dict:
        """Decide now, from the hotness S (default: as it is now) -> the target handed to the residency."""
        S = self.hotness.snapshot() if S is None else S
        with self._lock:
            target = self.plan.target(S, self.residency.resident())
            self.decisions += 1
        self.residency.apply(target)
        return target

    def _run(self) -> None:
        limit_this_thread(1)  # the planner's work must not take the forward pass's cores
        while (S := self._due.get()) is not None:
            try:
                if not self._closing:
                    self.decide(S)
            except Exception as err:  # a decision that fails changes nothing; the next one starts over
                self.residency.errors.append(f"FATAL decision: {type(err).__name__}: {err}")
            finally:
                self._due.task_done()

    def drain(self) -> None:
        """Wait until the decisions due so far are taken (their fetches may still run: Residency.drain)."""
        if self._thread is not None:
            self._due.join()

    @property
    def pairs(self) -> int:
        return getattr(self.plan, "pairs", 0)

    def target_map(self) -> dict:
        """{(layer, e): precision} the controller wants (below the floor: of the resident experts)."""
        with self._lock:
            return self.plan.map(self.residency.resident())

    def close(self) -> None:
        """Stop deciding, then the residency's fetches (queued ones are dropped, the one in flight ends), and save
        the hotness file, whatever happens while stopping."""
        try:
            if self._thread is not None:
                self._closing = True
                self._due.put(None)
                self._thread.join(30)
            self.residency.close()
        finally:
            if self.config.hotness_file:
                self.hotness.save(self.config.hotness_file)
