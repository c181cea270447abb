"""Start the dynamic runtime on a loaded engine: budget (Eq. 4), pools, table, transitions, controller.

`start_runtime(engine, planner, expert_budget, config, calibrate)`:
  1. measure: the slot size of every (layer, precision) the planner uses (a real version laid out), the
     non-expert bytes of the model; with `config.budget`, M_exp = budget - M_fixed (runtime/budget.py); a budget
     that cannot hold every expert at the lowest tier starts the offload regime (engine/offload.py) for the
     planners that have one, and is refused, naming the minimum, for the others;
  2. warm start: the hotness file (if it exists), else `calibrate(floor_map)` -> routed mass per token measured
     with every expert at the lowest tier (DynaExq), else a cold start;
  3. unpublish the engine's own versions (no forward runs during start), allocate the arenas, install the
     initial map into them, then attach the table to the banks.
The controller runs from the engine's step (`Engine.step` / `Engine.run`), never from a forward hook: the step
hands the routing statistics since the last step to `Runtime.on_step`; a forward the engine does not run (a
user's own `engine.model(...)` call) only adds to the next step's statistics.
`Runtime.stats()` is the observability API (hotness, maps, transitions, waits, pools).
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from dynaexq.config import RuntimeConfig
from dynaexq.errors import UserError
from dynaexq.runtime.budget import BudgetPlan, split_budget
from dynaexq.runtime.controller import Controller, initial_assign
from dynaexq.runtime.hotness import Hotness
from dynaexq.runtime.pool import Pools
from dynaexq.runtime.table import ExpertTable
from dynaexq.runtime.transitions import CopyStream, TransitionEngine
from dynaexq.runtime.version import slot_layout
from dynaexq.sizes import format_size, parse_size


@dataclass
class Runtime:
    planner: object
    plan: BudgetPlan
    pools: Pools
    table: ExpertTable
    transitions: TransitionEngine
    controller: Controller
    hotness: Hotness
    blocked_s: float = 0.0  # time the inference thread spent running transitions (blocking mode only)
    regime: str = "resident"  # every expert resident (engine/offload.py's OffloadRuntime: "offload")

    def on_step(self, stats: dict) -> None:
        """One engine step is over: its routing statistics ({layer: (routed tokens, routed mass [E])}, Engine.
        step_stats) go to the controller (hotness, then a decision when one is due). Called between forwards, on
        the thread that runs them."""
        t0 = time.perf_counter()
        self.controller.on_step(stats)
        if self.controller.config.blocking:
            self.blocked_s += time.perf_counter() - t0

    def stats(self) -> dict:
        c, t = self.controller, self.transitions
        published = {layer: [v.precision.value for v in lst] for layer, lst in self.table.versions.items()}
        return {"policy": str(self.planner), "regime": self.regime, "steps": c.steps, "tokens": c.tokens,
                "decisions": c.decisions,
                "hotness": {layer: s.tolist() for layer, s in self.hotness.snapshot().items()},
                "published": published,
                "target": {layer: [c.tiers[i].value for i in a.tolist()] for layer, a in c.assign.items()},
                "transitions": {**{k: v for k, v in t.stats.items() if k != "errors"}, "in_flight": t.in_flight(),
                                "pending": t.pending(), "errors": list(t.stats["errors"])[-20:]},
                "forward_wait_s": self.table.lease_wait_s + self.blocked_s,
                "lease_s": self.table.lease_wait_s, "blocked_s": self.blocked_s,
                "pools": self.pools.occupancy(),
                "bytes": {"experts": self.pools.expert_bytes(), "staging": self.pools.nbytes() - self.pools.expert_bytes(),
                          "peak_used": self.pools.tracker.peak, "cap": self.pools.tracker.total_cap}}

    def check(self, quiescent: bool = True) -> None:
        self.pools.check()
        self.table.check(self.pools, quiescent)

    def close(self, engine) -> None:
        """Drain and stop (stop_runtime); the engine's experts are unpublished."""
        engine.runtime = None
        try:
            self.controller.close()
        finally:
            engine.unpublish()


def nonexpert_bytes(model) -> int:
    """Bytes of the model's own parameters and buffers (each storage once: tied weights count once)."""
    from dynaexq.bank import ExpertBank  # noqa: layering: engine may import bank
    skip = {id(t) for m in model.modules() if isinstance(m, ExpertBank) for t in m.buffers()}
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) in skip or t.untyped_storage().data_ptr() in seen:
            continue
        seen.add(t.untyped_storage().data_ptr())
        total += t.untyped_storage().nbytes()
    return total


def measure(engine, planner, expert_budget, config: RuntimeConfig):
    """-> (slot_bytes {(layer, precision): bytes}, staging (K, bytes), expert budget, total, reserves)."""
    reader, tiers = engine.reader, planner.tiers(engine.reader)
    # the store's matrix shapes are the same in every MoE layer: lay out one real version per precision
    per_precision = {p: slot_layout(engine.make_version(reader.layers[0], 0, p))[1] for p in tiers}
    reader.close()
    slot_bytes = {(layer, p): per_precision[p] for layer in reader.layers for p in tiers}
    if config.staging_slots < 1:
        raise UserError(f"--staging-slots must be >= 1, got {config.staging_slots}")
    staging = (config.staging_slots, max(slot_bytes.values()))
    total, reserves = None, {}
    if config.budget is not None:
        total = parse_size(config.budget)
        if not 0 <= config.safety_margin < 1:
            raise UserError(f"--safety-margin is a fraction in [0, 1), got {config.safety_margin}")
        reserves = {"non-expert weights": nonexpert_bytes(engine.model), "kv cache": parse_size(config.kv_reserve),
                    "activations": parse_size(config.activation_reserve),
                    "safety margin": int(total * config.safety_margin), "staging": staging[0] * staging[1]}
        room = split_budget(total, reserves)
        if expert_budget is not None and expert_budget > room:
            raise UserError(f"--expert-budget {format_size(expert_budget)} does not fit in --budget "
                            f"{format_size(total)} after the fixed part; at most {format_size(room)}")
        expert_budget = room if expert_budget is None else expert_budget
    if expert_budget is None:
        raise UserError(f"policy {planner} needs a memory budget: --budget SIZE (everything) or --expert-budget "
                        "SIZE / a precision name such as int3 (expert weights only)")
    return slot_bytes, staging, expert_budget, total, reserves


def below_floor(reader, planner, slot_bytes, expert_budget) -> bool:
    """True when the budget cannot hold every expert at the planner's lowest precision: the offload regime for the
    planners that have one (dynaexq, multilevel), a clear error naming the minimum for the others."""
    low = planner.tiers(reader)[-1]
    need = sum(reader.num_experts * slot_bytes[(layer, low)] for layer in reader.layers)
    if need <= expert_budget:
        return False
    if not hasattr(planner, "offload_policy") or getattr(planner, "kind", None) == "frozen":
        raise UserError(f"policy {planner}: every expert at {low.value} needs {format_size(need)} but the expert "
                        f"budget is {format_size(expert_budget)}; the minimum expert budget for it is "
                        f"{format_size(need)} ({need} bytes); dynaexq and multilevel run below it (offload regime)")
    return True


def start_runtime(engine, planner, expert_budget=None, config: RuntimeConfig = RuntimeConfig(), calibrate=None,
                  progress: bool = True) -> Runtime:
    """-> the started Runtime, also set as `engine.runtime` (until `stop_runtime` / `engine.close()`)."""
    reader, device = engine.reader, engine.model.device
    tiers = planner.tiers(reader)
    slot_bytes, staging, expert_budget, total, reserves = measure(engine, planner, expert_budget, config)
    if getattr(planner, "offload_only", False) or below_floor(reader, planner, slot_bytes, expert_budget):
        from dynaexq.engine.offload import start_offload
        if total is not None:  # no staging slots in the offload regime: their reserve goes to the cache
            expert_budget += reserves.pop("staging")
        return start_offload(engine, planner, slot_bytes, expert_budget, config, total, reserves, progress)
    hotness = Hotness(reader.layers, reader.num_experts, config.alpha, device, config.half_life_tokens)
    warm = True
    if config.hotness_file and Path(config.hotness_file).is_file():
        hotness.load(config.hotness_file)
    elif calibrate is not None:
        hotness.set(calibrate(planner.floor(reader)))
    else:
        warm = False
    S0 = hotness.snapshot() if warm else None
    counts = planner.counts(reader, slot_bytes, expert_budget, S0)
    plan = BudgetPlan(counts, slot_bytes, staging, expert_budget, total, reserves)
    if progress:
        print(f"dynaexq: {planner}\n{plan.describe()}", file=sys.stderr)

    engine.unpublish()  # no forward runs now: free the engine's own versions before the arenas
    pools = Pools(counts, slot_bytes, staging, device)
    table = ExpertTable({layer: bank.versions for layer, bank in engine.banks.items()}, device)

    workers = config.transition_workers or (staging[0] if device.type == "cuda" else 1)
    transitions = TransitionEngine(table, pools, engine.make_version, workers, config.blocking, config.retries,
                                   CopyStream(device) if device.type == "cuda" else None)
    costs = planner.costs(reader)
    flat = {layer: torch.zeros(reader.num_experts, dtype=torch.float64) for layer in reader.layers}
    assign = initial_assign(planner, S0 or flat, counts, tiers, costs)
    todo = [(layer, e) for layer in reader.layers for e in range(reader.num_experts)]
    for layer, e in tqdm(todo, desc="install experts", unit="expert", disable=not progress):
        transitions.move(layer, e, tiers[assign[layer][e]])
    transitions.reset_stats()  # the counters are about the run, not the install
    controller = Controller(planner, hotness, transitions, assign, costs, tiers, config, cold=not warm)
    rt = Runtime(planner, plan, pools, table, transitions, controller, hotness)
    rt.check()
    for bank in engine.banks.values():
        bank.table = table
    engine.step_stats()  # the install's forwards (none) and the calibration's are not the run's
    engine.runtime = rt
    return rt


def stop_runtime(engine, rt) -> None:
    """Drain and stop the runtime (either regime); the engine's experts are unpublished (publish a map with
    `engine.apply`)."""
    rt.close(engine)
