"""The offload regime of the runtime: a budget below every expert at the lowest precision.

`start_offload(engine, policy, slot_bytes, expert_budget, config, plan_info)` sizes the policy's slot pools
within the budget (refusing one below the minimum: top-k slots of the lowest precision per MoE layer), allocates
them, publishes every expert as not resident, attaches the cache (runtime/offload.py) to the banks and, when the
policy prefetches, installs the look-ahead: a forward pre-hook on each MoE layer's `post_attention_layernorm`
takes the hidden state after the attention residual of layer l, applies layer l+1's norm and router to it, and
prefetches the experts it predicts while layer l computes (DyMoE, Pre-gated MoE, MoE-Infinity).
Warm start: a --hotness-file (its hottest experts are fetched at start); otherwise the cache starts empty and
fills on demand (the calibration warm start of the resident regimes runs every expert at the lowest precision,
which is exactly what does not fit here).
The controller (`OffloadController`) runs between steps, as the resident regime's does: hotness in; every
`update_every_tokens` the policy re-scores the experts and the wanted copies of hot resident experts are fetched
in the background.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from dynaexq.errors import UserError
from dynaexq.runtime.budget import BudgetPlan
from dynaexq.runtime.controller import observe
from dynaexq.runtime.hotness import Hotness
from dynaexq.runtime.offload import ExpertCache
from dynaexq.runtime.planners.offload import minimum_budget
from dynaexq.runtime.pool import Pools
from dynaexq.runtime.table import ExpertTable
from dynaexq.runtime.version import make_version
from dynaexq.sizes import format_size
from dynaexq.store.direct import DirectReader


@dataclass
class OffloadController:
    policy: object
    hotness: Hotness
    cache: ExpertCache
    config: object
    steps: int = 0
    tokens: int = 0
    decisions: int = 0
    _at: int = 0

    def on_step(self, stats: dict) -> None:
        if observe(self, stats, self._at):
            self.decide()

    def decide(self) -> None:
        """Re-score (the policy), then bring the wanted copy of every hot expert resident below it."""
        self._at = self.tokens
        self.decisions += 1
        self.policy.update(self.hotness.snapshot())
        for key, p in self.cache.resident().items():
            want = self.policy.want(*key)
            if want.bits > p.bits:
                self.cache.request(key, want)

    def close(self) -> None:
        try:
            self.cache.close()
        finally:
            if self.config.hotness_file:
                self.hotness.save(self.config.hotness_file)


@dataclass
class OffloadRuntime:
    planner: object
    policy: object
    plan: BudgetPlan
    pools: Pools
    table: ExpertTable
    cache: ExpertCache
    controller: OffloadController
    hotness: Hotness
    hooks: list = field(default_factory=list)
    regime: str = "offload"

    def on_step(self, stats: dict) -> None:
        self.controller.on_step(stats)

    def stats(self) -> dict:
        c, r = self.controller, self.cache.report()
        published = {layer: [v.precision.value if v is not None else "none" for v in lst]
                     for layer, lst in self.table.versions.items()}
        return {"policy": str(self.policy), "regime": self.regime, "steps": c.steps, "tokens": c.tokens,
                "decisions": c.decisions,
                "hotness": {layer: s.tolist() for layer, s in self.hotness.snapshot().items()},
                "published": published,
                "target": {layer: [self.policy.want(layer, e).value for e in range(len(lst))]
                           for layer, lst in self.table.versions.items()},
                # the resident regime's counters, as the cache's moves are: a fetch lays a version into a slot
                # (a move; an upgrade is a promotion), an eviction makes an expert not resident (a demotion) and
                # pays for a fetch (a pair); nothing is deferred here
                "transitions": {"pairs": r.get("evictions", 0), "promotions": r.get("upgrades_done", 0),
                                "demotions": r.get("evictions", 0),
                                "moves": sum(r.get(f"{k}_done", 0) for k in ("misses", "prefetches", "upgrades")),
                                "deferrals": 0, "failures": r.get("failures", 0),
                                "bytes_moved": r.get("bytes_fetched", 0), "in_flight": r["in_flight"],
                                "pending": r["queued"], "errors": r["errors"]},
                "offload": r, "forward_wait_s": r.get("stall_s", 0.0) + self.table.lease_wait_s,
                "lease_s": self.table.lease_wait_s, "blocked_s": 0.0, "pools": self.pools.occupancy(),
                "bytes": {"experts": self.pools.expert_bytes(), "staging": 0, "peak_used": self.pools.tracker.peak,
                          "cap": self.pools.tracker.total_cap}}

    def check(self, quiescent: bool = True) -> None:
        self.pools.check()
        self.table.check(self.pools, quiescent, absent=True)
        self.cache.check()

    def close(self, engine) -> None:
        """Stop the cache's readers and the look-ahead (stop_runtime); the engine's experts are unpublished."""
        engine.runtime = None
        try:
            self.controller.close()
        finally:
            for h in self.hooks:
                h.remove()
            engine.unpublish()


def start_offload(engine, planner, slot_bytes: dict, expert_budget: int, config, total, reserves,
                  progress: bool = True) -> OffloadRuntime:
    reader, device = engine.reader, engine.model.device
    if device.type != "cpu":
        raise UserError("the offload regime (an expert budget below every expert at the lowest precision) runs on "
                        "the CPU only so far; give a larger budget on CUDA")
    policy = planner.offload_policy(reader) if hasattr(planner, "offload_policy") else planner
    tiers = policy.tiers(reader)
    top_k = int(getattr(engine.model.config, "num_experts_per_tok", 1))
    sizes = {p: slot_bytes[(reader.layers[0], p)] for p in tiers}
    low = minimum_budget(reader.layers, top_k, sizes[tiers[-1]])
    if expert_budget < low:
        what = (f"the expert budget {format_size(expert_budget)} ({expert_budget} bytes)" if total is None else
                f"--budget {format_size(total)} leaves the experts {format_size(expert_budget)} after the fixed part, "
                f"which")
        minimum = "" if total is None else \
            f"; the minimum --budget is {format_size(low + sum(reserves.values()))} ({low + sum(reserves.values())} bytes)"
        raise UserError(f"policy {policy}: {what} is below the offload minimum {format_size(low)} ({low} bytes) = "
                        f"{top_k} slots (top-k) of {format_size(sizes[tiers[-1]])} of {tiers[-1].value} per MoE layer "
                        f"x {len(reader.layers)} layers{minimum}")
    policy.size(reader.layers, reader.num_experts, top_k, sizes, expert_budget)
    tiers = [p for p in tiers if policy.counts.get(p, 0) > 0]
    # pools key counts and sizes by (layer, precision); a tier's slots serve every layer, so one layer names them
    counts = {(reader.layers[0], p): policy.counts[p] for p in tiers}
    slots = {(reader.layers[0], p): sizes[p] for p in tiers}
    plan = BudgetPlan(counts, slots, (0, 0), expert_budget, total, reserves)
    n_all = len(reader.layers) * reader.num_experts
    resident = sum(policy.counts.values())
    hotness = Hotness(reader.layers, reader.num_experts, config.alpha, device, config.half_life_tokens)
    warm = bool(config.hotness_file and Path(config.hotness_file).is_file())
    if progress:
        held = ", ".join(f"{policy.counts[p]} {p.value} slots of {format_size(sizes[p])}" for p in tiers)
        print(f"dynaexq: {policy}\n  regime: offload (the expert budget {format_size(expert_budget)} holds less than "
              f"every expert at {tiers[-1].value}: {format_size(n_all * sizes[tiers[-1]])})\n  cache: {held} = "
              f"{format_size(sum(policy.counts[p] * sizes[p] for p in tiers))}; at most {resident} of {n_all} "
              f"experts resident ({100 * min(resident, n_all) / n_all:.0f} %); the rest read from "
              f"{reader.path} on a miss\n  warm start: "
              + ("the hotness file" if warm else "none (the cache fills on demand)"), file=sys.stderr)

    engine.unpublish()
    pools = Pools(counts, slots, (0, 0), device)
    table = ExpertTable({layer: bank.versions for layer, bank in engine.banks.items()}, device)
    io = DirectReader(reader, config.offload_io)

    def build(tensors):
        return make_version(tensors, engine.backend, engine.dtype, device)

    cache = ExpertCache(table, pools, io, build, policy, config.io_workers, config.retries)
    controller = OffloadController(policy, hotness, cache, config)
    rt = OffloadRuntime(planner, policy, plan, pools, table, cache, controller, hotness)
    if warm:
        hotness.load(config.hotness_file)
        policy.update(hotness.snapshot())
        ranked = sorted(policy.score, key=lambda k: -policy.score[k]) if hasattr(policy, "score") else []
        for key in tqdm(ranked[:resident], desc="warm the cache", unit="expert", disable=not progress):
            cache.request(key, policy.want(*key))
        cache.drain()
    cache.stats.clear()
    io.stats.update(reads=0, bytes=0, seconds=0.0)
    if policy.prefetch:
        rt.hooks = install_lookahead(engine, cache)
    for bank in engine.banks.values():
        bank.table, bank.cache = table, cache
    engine.step_stats()  # the warm fill's statistics are not the run's
    rt.check(quiescent=False)
    engine.runtime = rt
    return rt


def _router_of(block):
    for name in ("gate", "router"):
        m = getattr(block, name, None)
        if isinstance(m, torch.nn.Module):
            return m
    return None


def _predicted(out, k: int) -> torch.Tensor:
    """A router's output -> its top-k expert indices [T, K]: the integer tensor it returns, or the top-k of its
    logits when it returns only scores (DeepSeek-V3's router)."""
    outs = out if isinstance(out, (tuple, list)) else (out,)
    for t in outs:
        if isinstance(t, torch.Tensor) and not t.is_floating_point() and t.dim() == 2:
            return t
    return torch.topk(outs[0].float(), k, dim=-1).indices


def install_lookahead(engine, cache) -> list:
    """Forward pre-hooks predicting layer l+1's experts from layer l's hidden state -> their handles."""
    model, layers = engine.model, sorted(engine.banks)
    names = {bank.layer: name for name, bank in model.named_modules() if bank in engine.banks.values()}
    k = int(getattr(model.config, "num_experts_per_tok", 1))
    found = {}
    for layer in layers:
        block_name = names[layer].rsplit(".", 1)[0]  # ...layers.L.mlp
        decoder = model.get_submodule(block_name.rsplit(".", 1)[0])
        norm, router = getattr(decoder, "post_attention_layernorm", None), _router_of(model.get_submodule(block_name))
        if norm is None or router is None:
            print(f"dynaexq: no post_attention_layernorm / router found for layer {layer}: look-ahead prefetch is off",
                  file=sys.stderr)
            return []
        found[layer] = (norm, router)
    handles = []
    for here, nxt in zip(layers, layers[1:]):
        norm_next, router_next = found[nxt]

        def hook(module, args, nxt=nxt, norm_next=norm_next, router_next=router_next):
            h = args[0]  # [B, S, H]: the residual stream after layer `here`'s attention
            x = norm_next(h).reshape(-1, h.shape[-1])
            idx = _predicted(router_next(x), k)
            cache.prefetch(nxt, torch.unique(idx).tolist())

        handles.append(found[here][0].register_forward_pre_hook(hook))
    return handles
