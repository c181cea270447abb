"""Replay a routing trace (dynaexq/trace.py) through the residency policies, without weights.

The trace's routing drives the real policy code: the hotness EMA (runtime/hotness.py) and the controller's
cadence (`controller.observe`: a decision every `update_every_tokens` routed tokens), the planners' decisions
(DynamicPlanner.decide above the budget of every expert at the lowest precision; below it the offload
policies of planners/offload.py: HotPolicy for dynaexq/multilevel, LruPolicy for lru-offload, and the two
baselines here, LFU and a static profile). What is simulated is only the mechanism that moves bytes: a
fetch completes at once (above the floor: a decision's target is published before the next token; below it: a
miss is read before the layer runs, a wanted higher copy after the token, as the residency's background
fetches), so the figures are the policies' own, not the machine's.

Per replay: hit rate (routed (token, layer, expert) slots served by a resident version), bytes read from the store
per token (misses, upgrades and, above the floor, the version each changed expert reads), the routed weight mass
served at each precision, and fetches per token. Token rows before `score_from` warm the
policy up and are not scored (a profile learned on the first half is scored on the second).

Sizes: one expert's resident bytes per precision, from a store (`sizes_from_store`) or from the model's expert
shapes and the registered formats (`sizes_from_shapes`).
"""
from __future__ import annotations

import dataclasses
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import torch

from dynaexq.config import RuntimeConfig
from dynaexq.errors import UserError
from dynaexq.quant import formats
from dynaexq.quant.precision import Precision
from dynaexq.runtime.controller import observe
from dynaexq.runtime.hotness import Hotness
from dynaexq.runtime.planners import parse_policy
from dynaexq.runtime.planners.offload import LruPolicy

NOMINAL_ERROR = {Precision.BF16: 0.0, Precision.INT8: 0.004, Precision.INT6: 0.015, Precision.INT4: 0.06,
                 Precision.INT3: 0.13, Precision.INT2: 0.3}  # relative output error per precision when no store is given (typical GPTQ)


def sizes_from_shapes(gate_up: tuple, down: tuple, precisions=tuple(NOMINAL_ERROR)) -> dict:
    """{precision: bytes of one expert} from its matrices' shapes ([2I, H], [H, I]) and the registered formats."""
    return {p: formats.spec(p, "gate_up").nbytes(*gate_up) + formats.spec(p, "down").nbytes(*down) for p in precisions}


def sizes_from_store(reader) -> dict:
    layer = reader.layers[0]
    return {p: reader.expert_bytes(layer, 0, p) for p in reader.precisions}


def replay_sizes(trace, store=None, expert_shape: str | None = None) -> dict:
    """One expert's bytes per precision: from a store of the traced model, else from `H,I` (hidden, expert
    intermediate; default Qwen3-30B-A3B's 2048,768) and the registered formats."""
    if store is not None:
        from dynaexq.store.reader import StoreReader
        reader = StoreReader(store)
        if reader.num_experts != trace.num_experts:
            raise UserError(f"store {str(store)!r} has {reader.num_experts} experts per layer, the trace "
                            f"{trace.num_experts}: it is not the traced model's")
        return sizes_from_store(reader)
    try:
        h, i = (int(x) for x in (expert_shape or "2048,768").split(","))
    except ValueError:
        raise UserError(f"--expert-shape {expert_shape!r}: give the hidden size and the expert intermediate size, "
                        "e.g. 2048,768") from None
    return sizes_from_shapes((2 * i, h), (h, i))


def replay_budget(spec: str, trace, sizes: dict) -> int:
    """'2GiB' | 'int2' (every expert at int2) | '25%int2' -> bytes."""
    from dynaexq.sizes import parse_size
    share, _, name = spec.rpartition("%")
    try:
        p = Precision.parse(name)
    except UserError:
        if share:
            raise
        return parse_size(spec)
    if p not in sizes:
        raise UserError(f"budget {spec!r}: no {p.value} size (have {', '.join(q.value for q in sizes)})")
    try:
        frac = float(share) / 100 if share else 1.0
    except ValueError:
        raise UserError(f"budget {spec!r}: a share is written like 25%int2") from None
    return int(frac * len(trace.layers) * trace.num_experts * sizes[p])


@dataclass
class ShapeReader:
    """What the planners read of a store, for a trace: layers, experts, precisions and (nominal) output errors."""
    layers: list
    num_experts: int
    sizes: dict
    errors: dict = field(default_factory=lambda: dict(NOMINAL_ERROR))

    @property
    def precisions(self) -> list:
        return sorted(self.sizes, key=lambda p: -p.bits)

    def output_error(self, layer, e, p) -> float:
        return self.errors[p]

    def expert_bytes(self, layer, e, p) -> int:
        return self.sizes[p]


@dataclass
class LfuPolicy(LruPolicy):
    """Baseline: per-layer slots of one precision, evicting the least frequently routed expert so far."""
    freq: Counter = field(default_factory=Counter)

    def victim(self, layer, precision, candidates, free, held, key=None, demand=True, now=0):
        if held < self.per_layer and free:
            return None
        own = [(self.freq[k], t, k) for k, t in candidates if k[0] == layer]
        return min(own)[2] if own else False

    def __str__(self):
        return f"lfu-offload:{self.precision.value}"


@dataclass
class StaticPolicy(LruPolicy):
    """Baseline: a static profile: per layer the experts routed most often in the profile rows stay resident;
    top-k more slots per layer take the others for one token (read, used, dropped)."""
    profile: dict = field(default_factory=dict)  # {layer: set of pinned experts}

    def learn(self, trace, rows: slice) -> None:
        keep = max(0, self.per_layer - trace.experts.shape[2])
        for i, layer in enumerate(trace.layers):
            ids = trace.experts[rows, i].reshape(-1)
            counts = np.bincount(ids[ids >= 0], minlength=trace.num_experts)
            self.profile[layer] = set(np.argsort(-counts, kind="stable")[:keep].tolist())

    def victim(self, layer, precision, candidates, free, held, key=None, demand=True, now=0):
        if held < self.per_layer and free:
            return None
        own = [(t, k) for k, t in candidates if k[0] == layer and k[1] not in self.profile.get(layer, ())]
        return min(own)[1] if own else False

    def __str__(self):
        return f"static-offload:{self.precision.value}"


BASELINES = {"lfu-offload": LfuPolicy, "static-offload": StaticPolicy}


def _policy(spec: str):
    name, _, arg = spec.partition(":")
    if name in BASELINES:
        return BASELINES[name](Precision.parse(arg) if arg else Precision.INT4)
    return parse_policy(spec)


class _Cache:
    """The residency's decisions below the floor (runtime/residency.py) without bytes or threads: slots per
    precision shared by all layers, the routed experts of the running layer pinned, the policy's want/victim."""

    def __init__(self, policy, sizes: dict):
        self.policy, self.sizes = policy, sizes
        self.where: dict = {}  # key -> precision
        self.used, self.held, self.last = Counter(), Counter(), {}
        self.tick = 0
        self.pending: list = []
        self.count, self.served = Counter(), Counter()
        self.read = 0
        self.uses = getattr(policy, "freq", None)  # LFU's routing counts, kept here as experts are routed

    def layer(self, layer: int, experts, weights, score: bool) -> None:
        self.tick += 1
        pins = {(layer, int(e)) for e in experts}
        transient = []
        for e, w in zip(experts.tolist(), weights.tolist()):
            key = (layer, e)
            self.last[key] = self.tick
            if self.uses is not None:
                self.uses[key] += 1
            want = self.policy.want(layer, e)
            if key in self.where:
                self.count["hits"] += score
                self.served[self.where[key]] += w * score
                if want.bits > self.where[key].bits:
                    self.pending.append((key, want))
                continue
            self.count["misses"] += score
            self.served[want] += w * score
            if not self._fetch(key, want, pins, demand=True, score=score):
                transient.append(key)  # no slot to keep it in: read for this token only
        self.count["transient"] += len(transient) * score

    def _fetch(self, key, p, pins, demand: bool, score: bool) -> bool:
        layer = key[0]
        cands = [(k, self.last.get(k, 0)) for k, q in self.where.items() if q == p and k not in pins]
        free = self.used[p] < self.policy.counts.get(p, 0)
        victim = self.policy.victim(layer, p, cands, free, self.held[(layer, p)], key, demand, self.tick)
        self.read += self.sizes[p] * score
        self.count["fetches"] += score
        if victim is False or (victim is None and not free):
            return False
        if victim is None:
            self.used[p] += 1
        else:
            del self.where[victim]
            self.held[(victim[0], p)] -= 1
            self.count["evictions"] += score
        if key in self.where:  # an upgrade: the lower copy's slot is reclaimed
            q = self.where.pop(key)
            self.used[q] -= 1
            self.held[(layer, q)] -= 1
        self.where[key] = p
        self.held[(layer, p)] += 1
        return True

    def end_token(self, score: bool) -> None:
        for key, p in self.pending:
            if key in self.where and self.where[key].bits < p.bits:
                self.count["upgrades"] += score
                self._fetch(key, p, set(), demand=False, score=score)
        self.pending = []


def replay(trace, policy: str, budget: int, sizes: dict, config: RuntimeConfig = RuntimeConfig(),
           score_from: int = 0, errors: dict | None = None) -> dict:
    """Replay `trace` through `policy` at an expert `budget` (bytes) -> the figures (module docstring)."""
    planner = _policy(policy)
    reader = ShapeReader(trace.layers, trace.num_experts, sizes, dict(errors or NOMINAL_ERROR))
    k = trace.experts.shape[2]
    if not getattr(planner, "dynamic", False):
        raise UserError(f"policy {policy}: a trace replays the runtime policies (dynaexq, multilevel, frozen, "
                        f"lru-offload) and the baselines {', '.join(BASELINES)}")
    live = planner.start(reader, {(layer, p): sizes[p] for layer in trace.layers for p in planner.tiers(reader)},
                         budget, None, k)
    hotness = Hotness(trace.layers, trace.num_experts, config.alpha, "cpu", config.half_life_tokens)
    clock = _Clock(config)
    if live.complete:
        return _replay_resident(trace, str(planner), live, sizes, hotness, clock, score_from)
    return _replay_offload(trace, live, sizes, hotness, clock, score_from)


@dataclass
class _Clock:
    """The controller's counters, for `observe`."""
    config: RuntimeConfig
    hotness: Hotness = None
    steps: int = 0
    tokens: int = 0


def _step_stats(trace, t: int) -> dict:
    """{layer: (1 token, routed mass [E])} of one token row, as the banks hand them over."""
    out = {}
    for i, layer in enumerate(trace.layers):
        ids, w = trace.experts[t, i], trace.weights[t, i]
        ok = ids >= 0
        mass = torch.zeros(trace.num_experts, dtype=torch.float64)
        if ok.any():
            mass.index_add_(0, torch.from_numpy(ids[ok].astype(np.int64)), torch.from_numpy(w[ok].astype(np.float64)))
        out[layer] = (int(ok.any()), mass)
    return out


def _replay_offload(trace, policy, sizes, hotness, clock, score_from) -> dict:
    if isinstance(policy, StaticPolicy):
        policy.learn(trace, slice(0, score_from or len(trace)))
    cache = _Cache(policy, sizes)
    clock.hotness, at = hotness, 0
    for t in range(len(trace)):
        score = t >= score_from
        for i, layer in enumerate(trace.layers):
            ok = trace.experts[t, i] >= 0
            if ok.any():
                cache.layer(layer, trace.experts[t, i][ok].astype(np.int64), trace.weights[t, i][ok], score)
        cache.end_token(score)
        if observe(clock, _step_stats(trace, t), at):
            at = clock.tokens
            policy.update(hotness.snapshot())
            for key, p in list(cache.where.items()):
                want = policy.want(*key)
                if want.bits > p.bits:
                    cache.pending.append((key, want))
            cache.end_token(score)
    return _report(trace, str(policy), "offload", cache.count, cache.served, cache.read, score_from,
                   {p.value: n for p, n in policy.counts.items()})


class _Residency:
    """The residency's interface to the controller, each target applied at once (every fetch reads the version it
    brings); `score` [bool] says whether the current token is scored."""

    def __init__(self, sizes: dict, score: list):
        self.sizes, self.score = sizes, score
        self.published, self.read, self.fetches = {}, 0, 0

    def apply(self, target: dict) -> None:
        for key, p in target.items():
            if self.published.get(key) != p:
                self.published[key] = p
                self.fetches += self.score[0]
                self.read += self.sizes[p] * self.score[0]

    def resident(self) -> dict:
        return self.published

    def drain(self) -> None:  # every fetch completes at once
        pass


def _replay_resident(trace, name, plan, sizes, hotness, clock, score_from) -> dict:
    from dynaexq.runtime.controller import Controller
    tiers = plan.tiers
    score = [False]
    moves = _Residency(sizes, score)
    ctl = Controller(plan, hotness, moves, dataclasses.replace(clock.config, blocking=True))  # decisions inline
    moves.apply(plan.map())  # the install: not scored
    served, count = Counter(), Counter()
    for t in range(len(trace)):
        score[0] = t >= score_from
        for i, layer in enumerate(trace.layers):
            ok = trace.experts[t, i] >= 0
            for e, w in zip(trace.experts[t, i][ok].tolist(), trace.weights[t, i][ok].tolist()):
                served[tiers[plan.assign[layer][e]]] += w * score[0]
                count["hits"] += score[0]
        ctl.on_step(_step_stats(trace, t))
    count["fetches"] = moves.fetches
    return _report(trace, name, "resident", count, served, moves.read, score_from,
                   {p.value: sum(n for (_, q), n in plan.counts.items() if q == p) for p in tiers})


def _report(trace, policy, regime, count, served, read, score_from, slots) -> dict:
    tokens = max(1, len(trace) - score_from)
    routed = count["hits"] + count["misses"]
    mass = sum(served.values()) or 1.0
    return {"policy": policy, "regime": regime, "tokens": tokens, "slots": slots,
            "hit_rate": count["hits"] / max(1, routed), "read_bytes_per_token": read / tokens,
            "mass_served": {p.value: v / mass for p, v in sorted(served.items(), key=lambda kv: -kv[0].bits)},
            "fetches_per_token": count["fetches"] / tokens,
            "counts": dict(count)}
