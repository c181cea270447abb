"""Start the dynamic runtime on a loaded engine: budget (Eq. 4), pools, table, residency, controller.

`start_runtime(engine, planner, expert_budget, config, calibrate)`:
  1. measure: the slot size of every (layer, precision) the planner uses (a real version laid out), the
     non-expert bytes of the model; with `config.budget`, M_exp = budget - M_fixed (runtime/budget.py);
  2. warm start: the hotness file (if it exists), else `calibrate(floor_map)` -> routed mass per token measured
     with every expert at the lowest tier (DynaExq), else a cold start;
  3. the planner's live plan at that budget (`planner.start`, one interface for any budget): the slot plan's
     counts when every expert fits at its lowest tier; below that floor the cache policy's (planners/offload.py:
     dynaexq and multilevel have one, lru-offload is one), the rest of the experts not resident (refused, naming
     the minimum, below top-k slots a layer, or for frozen);
  4. unpublish the engine's own versions (no forward runs during start), allocate the arenas, start the one
     residency mechanism (runtime/residency.py), apply the initial target (every expert's tier; below the floor
     the hotness file's hottest experts, or nothing: the cache fills on demand), then attach it to the banks.
The controller runs from the engine's step (`Engine.step` / `Engine.run`), never from a forward hook: the step
hands the routing statistics since the last step to `Runtime.on_step`; a forward the engine does not run (a
user's own `engine.model(...)` call) only adds to the next step's statistics.
`Runtime.stats()` is the observability API (hotness, maps, transitions, waits, pools).
"""
from __future__ import annotations

import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

from dynaexq.config import RuntimeConfig
from dynaexq.engine.lookahead import install_lookahead
from dynaexq.errors import UserError
from dynaexq.runtime.budget import BudgetPlan, split_budget
from dynaexq.runtime.controller import Controller
from dynaexq.runtime.hotness import Hotness
from dynaexq.runtime.planners.offload import BelowMinimum
from dynaexq.runtime.pool import Pools
from dynaexq.runtime.fetch import CopyStream
from dynaexq.runtime.residency import Residency
from dynaexq.runtime.table import ExpertTable
from dynaexq.runtime.version import make_version, slot_layout
from dynaexq.store.direct import DirectReader
from dynaexq.sizes import format_size, parse_size


@dataclass
class Runtime:
    planner: object  # the slot planner (dynaexq, multilevel, frozen) or, below the floor, the cache policy
    plan: BudgetPlan
    pools: Pools
    table: ExpertTable
    residency: Residency
    controller: Controller
    hotness: Hotness
    hooks: list = field(default_factory=list)  # look-ahead hooks (engine/lookahead.py)
    blocked_s: float = 0.0  # time the inference thread spent on transitions (blocking mode only)

    @property
    def regime(self) -> str:
        """"resident" (every expert has a version) or "offload" (the arenas hold fewer than every expert)."""
        return "resident" if self.residency.complete else "offload"

    def on_step(self, stats: dict) -> None:
        """One engine step is over: its routing statistics ({layer: (routed tokens, routed mass [E])}, Engine.
        step_stats) go to the controller (hotness, then a decision when one is due). Called between forwards, on
        the thread that runs them."""
        t0 = time.perf_counter()
        self.controller.on_step(stats)
        if self.controller.config.blocking:
            self.blocked_s += time.perf_counter() - t0

    def stats(self) -> dict:
        c, r = self.controller, self.residency.report()
        published = {layer: [v.precision.value if v is not None else "none" for v in lst]
                     for layer, lst in self.table.versions.items()}
        target = c.target_map()
        moves = ("promotions", "demotions", "relocations", "evictions", "deferrals", "failures", "retries",
                 "bytes_moved", "busy_s")
        held = Counter(p for lst in published.values() for p in lst if p != "none")
        return {"policy": str(self.planner), "regime": self.regime, "steps": c.steps, "tokens": c.tokens,
                "decisions": c.decisions,
                "hotness": {layer: s.tolist() for layer, s in self.hotness.snapshot().items()},
                "published": published,
                "target": {layer: [_name(target.get((layer, e))) for e in range(len(lst))]
                           for layer, lst in self.table.versions.items()},
                "transitions": {"pairs": c.pairs, **{k: r.get(k, 0) for k in moves}, "in_flight": r["in_flight"],
                                "pending": r["queued"] + r["deferred"], "errors": r["errors"]},
                "offload": None if self.residency.complete else {
                    **r, "resident": sum(held.values()), "resident_by_precision": dict(held)},
                "forward_wait_s": r.get("stall_s", 0.0) + self.table.lease_wait_s + self.blocked_s,
                "lease_s": self.table.lease_wait_s, "blocked_s": self.blocked_s,
                "pools": self.pools.occupancy(),
                "bytes": {"experts": self.pools.expert_bytes(),
                          "staging": self.pools.nbytes() - self.pools.expert_bytes(),
                          "peak_used": self.pools.tracker.peak, "cap": self.pools.tracker.total_cap}}

    def drain(self) -> None:
        """Wait until the decisions due so far are taken and their fetches done (tests, benches)."""
        self.controller.drain()
        self.residency.drain()

    def check(self, quiescent: bool = True) -> None:
        self.pools.check()
        self.table.check(self.pools, quiescent, absent=not self.residency.complete)
        self.residency.check()

    def close(self, engine) -> None:
        """Stop the fetches and the look-ahead, save the hotness file; the engine's experts are unpublished."""
        engine.runtime = None
        try:
            self.controller.close()
        finally:
            for h in self.hooks:
                h.remove()
            engine.unpublish()


def _name(p) -> str:
    return "none" if p is None else p.value


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


def start_runtime(engine, planner, expert_budget=None, config: RuntimeConfig = RuntimeConfig(), calibrate=None,
                  progress: bool = True) -> Runtime:
    """-> the started Runtime, also set as `engine.runtime` (until `stop_runtime` / `engine.close()`)."""
    reader, device = engine.reader, engine.model.device
    slot_bytes, staging, expert_budget, total, reserves = measure(engine, planner, expert_budget, config)
    offload = not planner.fits(reader, slot_bytes, expert_budget)
    hotness = Hotness(reader.layers, reader.num_experts, config.alpha, device, config.half_life_tokens)
    warm = bool(config.hotness_file and Path(config.hotness_file).is_file())
    if warm:
        hotness.load(config.hotness_file)
    elif calibrate is not None and not offload:  # all-low calibration: exactly what does not fit below the floor
        hotness.set(calibrate(planner.floor(reader)))
        warm = True
    if offload:  # no staging slots below the floor: their reserve goes to the arenas
        staging = (0, 0)
        if total is not None:
            expert_budget += reserves.pop("staging")
    top_k = int(getattr(engine.model.config, "num_experts_per_tok", 1))
    try:
        live = planner.start(reader, slot_bytes, expert_budget, hotness.snapshot() if warm else None, top_k)
    except BelowMinimum as err:
        if total is None:
            raise
        least = err.minimum + sum(reserves.values())
        raise UserError(f"{err}: --budget {format_size(total)} leaves the experts {format_size(expert_budget)} after "
                        f"the fixed part; the minimum --budget is {format_size(least)} ({least} bytes)") from None
    plan = BudgetPlan(live.slots, slot_bytes, staging, expert_budget, total, reserves)
    if progress:
        print(f"dynaexq: {live if offload else planner}\n{plan.describe()}"
              + (_describe_offload(reader, live, slot_bytes, warm) if offload else ""), file=sys.stderr)

    engine.unpublish()  # no forward runs now: free the engine's own versions before the arenas
    pools = Pools(live.slots, slot_bytes, staging, device)
    table = ExpertTable({layer: bank.versions for layer, bank in engine.banks.items()}, device)
    if offload:
        if device.type != "cpu":
            raise UserError("a budget below every expert at the lowest precision runs on the CPU only so far; give "
                            "a larger budget on CUDA")
        io = DirectReader(reader, config.offload_io)

        def read(layer, e, p):
            return make_version(io.read(layer, e, p), engine.backend, engine.dtype, device)
        residency = Residency(table, pools, read, live, config.fetch_workers or 2, config.retries, io=io)
    else:
        workers = config.fetch_workers or (staging[0] if device.type == "cuda" else 1)
        residency = Residency(table, pools, engine.make_version, None, workers, config.retries,
                              CopyStream(device) if device.type == "cuda" else None)
    residency.apply(live.initial())  # every expert's tier; below the floor the warm start's hottest, or nothing
    controller = Controller(live, hotness, residency, config)
    _install(residency, "warm the cache" if offload else "install experts", progress)
    residency.reset_stats()  # the counters are about the run, not the install
    rt = Runtime(live if offload else planner, plan, pools, table, residency, controller, hotness)
    if getattr(live, "prefetch", False):
        rt.hooks = install_lookahead(engine, residency)
    for bank in engine.banks.values():
        bank.table, bank.residency = table, residency
    engine.step_stats()  # the install's forwards (none) and the calibration's are not the run's
    rt.check()
    engine.runtime = rt
    return rt


def _install(residency, desc: str, progress: bool) -> None:
    """Wait for the fetches submitted at start, with a progress bar over them."""
    n = residency.pending()
    with tqdm(total=n, desc=desc, unit="expert", disable=not progress or not n) as bar:
        while (left := residency.pending()):
            bar.update(n - left - bar.n)
            time.sleep(0.05)
        bar.update(n - bar.n)
    residency.drain()
    if residency.stats.get("failures"):
        raise UserError(f"the runtime could not read its experts from the store: {list(residency.errors)[-1]}")


def _describe_offload(reader, policy, slot_bytes: dict, warm: bool) -> str:
    n_all, resident = len(reader.layers) * reader.num_experts, sum(policy.counts.values())
    low = policy.tiers(reader)[-1]
    return (f"\n  regime: offload (less than every expert at {low.value}: "
            f"{format_size(n_all * slot_bytes[(reader.layers[0], low)])}); at most {resident} of {n_all} experts "
            f"resident ({100 * min(resident, n_all) / n_all:.0f} %), the rest read from {reader.path} on a miss"
            f"\n  warm start: " + ("the hotness file" if warm else "none (the cache fills on demand)"))


def stop_runtime(engine, rt) -> None:
    """Drain and stop the runtime (either regime); the engine's experts are unpublished (publish a map with
    `engine.apply`)."""
    rt.close(engine)
