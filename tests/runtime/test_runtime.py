"""The dynamic runtime on a tiny Qwen3-MoE (2 MoE layers x 8 experts): pools, table, residency, controller."""
import threading
import time

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dynaexq.config import RuntimeConfig
from dynaexq.engine.dynamic import measure, start_runtime
from dynaexq.engine.load import load
from dynaexq.errors import UserError
from dynaexq.quant.precision import Precision as P
from dynaexq.quant.quantize import dequantize
from dynaexq.runtime.planners import parse_policy, resolve_budget
from rt import published, random_stats, start


@settings(max_examples=12, deadline=None)
@given(seed=st.integers(0, 10**6), steps=st.integers(1, 8), delta=st.sampled_from([0.0, 0.01, 0.05]),
       multilevel=st.booleans())
def test_invariants_hold_and_the_budget_is_never_exceeded_after_random_churn(engine, seed, steps, delta, multilevel):
    spec = (f"multilevel:ladder=int8/int4/int2,delta={delta}" if multilevel
            else f"dynaexq:hi=int8,lo=int2,delta={delta}")
    rt = start(engine, spec, update_every=1)
    try:
        g = torch.Generator().manual_seed(seed)
        for _ in range(steps):
            rt.controller.on_step(random_stats(engine, g))
            rt.check(quiescent=False)
        rt.drain()
        rt.check()
        assert rt.pools.tracker.peak <= rt.pools.nbytes() <= rt.plan.expert_budget + rt.plan.staging[0] * rt.plan.staging[1]
        assert rt.plan.expert_bytes() <= rt.plan.expert_budget
        assert published(engine) == rt.controller.target_map()
        assert not rt.residency.errors
    finally:
        engine.close()


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 10**6), rounds=st.integers(1, 4), fail=st.sampled_from([0.0, 0.3]))
def test_any_target_with_the_arenas_counts_is_reached_through_failed_reads(engine, seed, rounds, fail):
    """The residency alone: targets that permute the experts' tiers across layers (each arena's count kept), applied
    back to back while reads fail at random (a fraction `fail`, given up at once): whatever fails, the invariants
    hold and every expert keeps a version (one whose way out of staging also failed may still be served from
    there); with reads working again, one more apply reaches the last target exactly and gives staging back."""
    rt = start(engine, "multilevel:ladder=int8/int4/int2,delta=0", budget="int3", staging_slots=1, retries=0,
               update_every=10**6)
    try:
        g = np.random.default_rng(seed)
        real = rt.residency.read

        def flaky(layer, e, p):
            if g.random() < fail:
                raise OSError("injected")
            return real(layer, e, p)

        rt.residency.read = flaky
        keys = sorted(published(engine))
        for _ in range(rounds):
            tiers = [published(engine)[k] for k in keys]
            target = dict(zip(keys, g.permutation(np.array(tiers, dtype=object)).tolist()))
            rt.residency.apply(target)
        rt.residency.drain()
        rt.check()
        assert len(published(engine)) == len(keys)  # (published() reads every expert's precision: none is None)
        rt.residency.read = real
        rt.residency.apply(target)
        rt.residency.drain()
        rt.check()
        assert published(engine) == target and rt.pools.occupancy()["staging"]["used"] == 0
    finally:
        engine.close()


def _reference_weights(engine, layer):
    """float64 dequantized (gate_up, down) of every expert at int8 and int2, straight from the store."""
    out = {}
    for e in range(engine.reader.num_experts):
        for p in (P.INT8, P.INT2):
            w = engine.reader.read_expert(layer, e, p)
            out[(e, p)] = (dequantize(w["gate_up"], torch.float64), dequantize(w["down"], torch.float64))
    return out


def _reference_forward(ref, versions, x, idx, w):
    """float64 output of the bank computed from exactly the versions (precisions) a forward read."""
    flat = idx.reshape(-1).tolist()  # [T*K] experts
    gu = torch.stack([ref[(e, versions[e].precision)][0] for e in flat])  # [T*K, 2I, H]
    down = torch.stack([ref[(e, versions[e].precision)][1] for e in flat])  # [T*K, H, I]
    xs = x.double().repeat_interleave(idx.shape[1], 0)  # [T*K, H]
    gate, up = (gu @ xs[:, :, None])[..., 0].chunk(2, -1)
    y = (down @ (torch.nn.functional.silu(gate) * up)[:, :, None])[..., 0]  # [T*K, H]
    return (y * w.reshape(-1, 1).double()).view(*idx.shape, -1).sum(1)


def _race(engine, rt, overlaps: int, stop_at_first_tear: bool = False, max_forwards: int = 20_000):
    """A forward loop on one bank racing the transition workers (fed by a churn thread) -> (tears, overlapped).
    Each forward is held after it took its lease and snapshot, before it computes, until the transition engine
    publishes (then a further 2 ms, for a second publish that correct leases make impossible): every forward
    overlaps a publish, however loaded the machine, and a reclaim that ignored the lease would have overwritten
    the slots it is about to read."""
    layer = min(engine.banks)
    bank, ref = engine.banks[layer], _reference_weights(engine, layer)
    g = torch.Generator().manual_seed(0)
    stop = threading.Event()

    def churn():
        gc = torch.Generator().manual_seed(1)
        while not stop.is_set():
            if rt.residency.pending() == 0:
                rt.controller.on_step(random_stats(engine, gc))
            time.sleep(0.002)

    real_tiers, table = bank._tiers, rt.table

    def held(versions):  # inside the forward: lease held, snapshot taken, nothing computed yet
        start = table.published
        deadline = time.monotonic() + 5
        while table.published == start and time.monotonic() < deadline:
            time.sleep(0.0002)
        deadline = time.monotonic() + 0.002
        while table.published == start + 1 and time.monotonic() < deadline:
            time.sleep(0.0002)
        return real_tiers(versions)

    bank._tiers = held
    thread = threading.Thread(target=churn)
    thread.start()
    tears = overlapped = 0
    try:
        with torch.inference_mode():
            for _ in range(max_forwards):
                if overlapped >= overlaps:
                    break
                x = torch.randn(4, 64, generator=g)
                idx = torch.stack([torch.randperm(8, generator=g)[:2] for _ in range(4)])
                w = torch.rand(4, 2, generator=g)
                before = table.published
                y = bank(x, idx, w)
                overlapped += table.published != before
                expect = _reference_forward(ref, bank.last_read, x, idx, w)
                if (y.double() - expect).norm() > 0.05 * expect.norm():
                    tears += 1
                    if stop_at_first_tear:
                        break
    finally:
        stop.set()
        thread.join()
        del bank._tiers
    return tears, overlapped


def test_no_torn_reads_while_transitions_race_the_forward(engine):
    rt = start(engine, "dynaexq:hi=int8,lo=int2,delta=0", update_every=1)
    try:
        tears, overlapped = _race(engine, rt, overlaps=500)
        rt.drain()
        rt.check()
        assert tears == 0
        assert overlapped >= 500, overlapped  # the race did happen
        assert rt.residency.stats["promotions"] >= 100
    finally:
        engine.close()


def test_the_race_test_detects_tears_when_reclaim_ignores_leases(engine, monkeypatch):
    """Negative control: with slots reused while still leased, the reference comparison does catch torn reads."""
    rt = start(engine, "dynaexq:hi=int8,lo=int2,delta=0", update_every=1)
    monkeypatch.setattr(rt.table, "wait_unread", lambda retired_at, timeout=60.0: None)
    try:
        tears, _ = _race(engine, rt, overlaps=10**9, stop_at_first_tear=True, max_forwards=2_000)
        assert tears >= 1
    finally:
        engine.close()


def test_the_published_maps_do_not_depend_on_how_fast_transitions_run(engine):
    """The same statistics stream, with transitions inline (blocking), fast in the background and slowed down so
    that decisions are taken while earlier pairs still wait: after each drain the *published* maps are the same.
    (A controller deciding on what is published instead of its target would diverge in the slow run.)"""
    def run(blocking=False, slow=0.0):
        rt = start(engine, "dynaexq:hi=int8,lo=int2", update_every=3, blocking=blocking)
        read, lagging = rt.residency.read, []
        if slow:
            rt.residency.read = lambda *a: time.sleep(slow) or read(*a)
        decide = rt.controller.decide

        def watched(*a):
            lagging.append(rt.residency.pending() > 0)
            return decide(*a)
        rt.controller.decide = watched
        try:
            g = torch.Generator().manual_seed(5)
            maps = []
            for i in range(60):
                rt.controller.on_step(random_stats(engine, g))
                if i % 15 == 14:
                    rt.drain()
                    maps.append(published(engine))
            assert maps[-1] == rt.controller.target_map()
            return maps, rt.controller.pairs, sum(lagging)
        finally:
            engine.close()

    blocking, fast, slow = run(blocking=True), run(), run(slow=0.01)
    assert blocking[0] == fast[0] == slow[0] and blocking[1] == fast[1] == slow[1]
    assert blocking[1] > 0 and len({tuple(sorted(m.items())) for m in blocking[0]}) > 1  # the maps did change
    assert slow[2] > 0, "no decision was taken while transitions lagged: the slow run tested nothing"


def test_async_runtime_computes_exactly_what_a_static_map_computes(engine, checkpoints):
    rt = start(engine, "multilevel:ladder=int8/int4/int2", budget="int3", update_every=2)
    try:
        g = torch.Generator().manual_seed(3)
        ids = torch.randint(0, 128, (2, 12), generator=g)
        with torch.inference_mode():
            for _ in range(10):
                engine.model(input_ids=ids)
                rt.controller.on_step(random_stats(engine, g))
            rt.drain()
            got = engine.model(input_ids=ids).logits
        assert rt.residency.stats["promotions"] > 0
        static = load(checkpoints("qwen3_moe")[1], "uniform:int2", progress=False)
        static.apply(published(engine))
        with torch.inference_mode():
            assert torch.equal(got, static.model(input_ids=ids).logits)
    finally:
        engine.close()


def test_hysteresis_reduces_switches_on_a_noisy_stream():
    g = np.random.default_rng(0)
    E, n_hi = 32, 6
    true = g.random(E) ** 3
    true /= true.sum()

    def switches(delta):
        pl = parse_policy(f"dynaexq:hi=int8,lo=int2,delta={delta}")
        assign = {0: np.array([0] * n_hi + [1] * (E - n_hi))}
        costs = {0: np.tile([0.0, 1.0], (E, 1))}
        pl.decide({0: true}, assign, costs, [P.INT8, P.INT2], cold=True)
        n, kept = 0, []
        rng = np.random.default_rng(1)
        for _ in range(200):
            S = true + rng.normal(0, 0.006, E)
            n += len(pl.decide({0: S}, assign, costs, [P.INT8, P.INT2]))
            kept.append(true[assign[0] == 0].sum())
        return n, np.mean(kept)

    (with_h, mass_h), (without, _) = switches(0.01), switches(0.0)
    best = np.sort(true)[-n_hi:].sum()
    assert with_h < 0.25 * without, (with_h, without)
    assert mass_h > 0.9 * best  # and the hot set it keeps is still (nearly) the true one


def test_decisions_follow_the_papers_rule():
    pl = parse_policy("dynaexq:hi=int8,lo=int2,delta=0.1,max_pairs=0")
    costs = {0: np.tile([0.0, 1.0], (6, 1))}
    tiers = [P.INT8, P.INT2]
    assign = {0: np.array([0, 0, 1, 1, 1, 1])}  # experts 0, 1 hold the hi slots
    S = {0: np.array([0.30, 0.05, 0.50, 0.12, 0.0, 0.01])}
    pairs = pl.decide(S, assign, costs, tiers)
    # 2 (0.50) replaces 1 (0.05): gap 0.45 > 0.1; then best outsider 3 (0.12) vs worst incumbent 0 (0.30): stop
    assert [(p.demote, p.promote) for p in pairs] == [(1, 2)]
    assert assign[0].tolist() == [0, 1, 0, 1, 1, 1]
    cold = {0: np.array([0, 0, 1, 1, 1, 1])}
    pl.decide({0: np.array([0.0, 0.1, 0.2, 0.3, 0.4, 0.5])}, cold, costs, tiers, cold=True)
    assert sorted(np.flatnonzero(cold[0] == 0).tolist()) == [4, 5]  # cold start: the top-n directly
    limited = parse_policy("dynaexq:hi=int8,lo=int2,delta=0,max_pairs=1")
    a = {0: np.array([0, 0, 1, 1, 1, 1]), 1: np.array([0, 0, 1, 1, 1, 1])}
    pairs = limited.decide({0: S[0], 1: np.array([0, 0, 0.2, 0.9, 0, 0])}, a, {0: costs[0], 1: costs[0]}, tiers)
    assert [(p.layer, p.promote, round(p.gap, 3)) for p in pairs] == [(1, 3, 0.9)]  # the highest gap first


def test_infeasible_budgets_state_the_minimum(engine):
    engine.close()
    with pytest.raises(UserError, match=r"below the offload minimum .*\(\d+ bytes\)"):  # dynaexq: offload below int2
        start(engine, "dynaexq", budget=1000)
    lean = dict(activation_reserve="0", safety_margin=0.0, staging_slots=1)  # (offload: staging goes to the cache)
    reserves = measure(engine, parse_policy("dynaexq"), None, RuntimeConfig(budget="1GiB", **lean))[4]
    assert reserves["non-expert weights"] > 0 and reserves["staging"] > 0
    with pytest.raises(UserError, match=r"minimum --budget is"):  # covers the fixed part, not all-int2 experts
        start_runtime(engine, parse_policy("dynaexq"), None,
                      RuntimeConfig(budget=str(sum(reserves.values()) + 100), **lean), progress=False)
    with pytest.raises(UserError, match="does not cover the fixed part"):
        start_runtime(engine, parse_policy("dynaexq"), None, RuntimeConfig(budget="100KiB"), progress=False)


def test_failed_reads_keep_the_previous_versions_serving_and_are_retried_then_reported(engine):
    warm = {layer: torch.arange(8, dtype=torch.float32) / 28 for layer in engine.banks}  # experts 6, 7 hot
    rt = start(engine, "dynaexq:hi=int8,lo=int2,delta=0", warm=warm, update_every=1000)
    try:
        real, calls = rt.residency.read, {"n": 0}

        def flaky(layer, e, p):  # the first read fails, the retry succeeds
            calls["n"] += 1
            if calls["n"] == 1:
                raise OSError("injected I/O error")
            return real(layer, e, p)

        rt.residency.read = flaky
        rt.hotness.set({layer: torch.tensor([0.5, 0, 0, 0, 0, 0, 0, 0.5]) for layer in engine.banks})
        rt.controller.decide()
        assert rt.controller.pairs == 2  # expert 0 replaces expert 6 in both layers
        rt.drain()
        assert rt.residency.stats["failures"] == 0 and rt.residency.stats["retries"] == 1
        assert published(engine) == rt.controller.target_map() and rt.residency.stats["promotions"] == 2
        rt.check()

        def broken(layer, e, p):  # expert 1 can never be read
            if e == 1:
                raise OSError("injected I/O error on expert 1")
            return real(layer, e, p)

        rt.residency.read = broken
        before = published(engine)
        rt.hotness.set({layer: torch.tensor([0.4, 0.6, 0, 0, 0, 0, 0, 0]) for layer in engine.banks})
        rt.controller.decide()
        assert rt.controller.pairs == 4  # expert 1 replaces expert 7 in both layers
        rt.drain()
        assert published(engine) == before  # the previous versions kept serving (7 went back out of staging)
        assert rt.residency.stats["failures"] == 2 and rt.residency.stats["retries"] == 1 + 2 * 2  # 2 retries each
        errors = [m for m in rt.residency.errors if "retrying" not in m]
        assert len(errors) == 2 and all("expert 1 of layer" in m and "after 3 attempts" in m for m in errors)
        rt.check()
        rt.residency.read = real  # the store recovers: the next decision's target is applied again
        rt.controller.decide()
        rt.drain()
        assert published(engine) == rt.controller.target_map() != before
        rt.check()
    finally:
        engine.close()


def test_hotness_is_the_ema_of_routed_mass_per_token_and_persists(engine, tmp_path):
    from dynaexq.runtime.hotness import Hotness

    h = Hotness([0, 1], 4, alpha=0.9)
    steps = [{0: (10, torch.tensor([5.0, 3, 2, 0])), 1: (5, torch.tensor([0.0, 0, 1, 4]))},
             {0: (10, torch.tensor([0.0, 0, 0, 10])), 1: (5, torch.tensor([5.0, 0, 0, 0]))}]
    expect = {0: np.zeros(4), 1: np.zeros(4)}
    for s in steps:
        h.update(s)
        for layer, (n, mass) in s.items():
            expect[layer] = 0.9 * expect[layer] + 0.1 * mass.numpy() / n
    for layer in (0, 1):
        assert np.allclose(h.snapshot()[layer].numpy(), expect[layer])
    path = tmp_path / "hot.json"
    h.save(path)
    h2 = Hotness([0, 1], 4)
    h2.load(path)
    assert all(np.allclose(h2.snapshot()[k], h.snapshot()[k]) for k in (0, 1))
    with pytest.raises(UserError, match="belongs to another model"):
        Hotness([0, 1, 2], 4).load(path)


def test_a_half_life_in_tokens_weighs_each_step_by_its_evidence():
    from dynaexq.runtime.hotness import Hotness

    g = torch.Generator().manual_seed(0)
    chunk = Hotness([0], 4, half_life=64)  # one 32-token step ...
    tokens = Hotness([0], 4, half_life=64)  # ... or 32 one-token steps with the same mean routing
    start = {0: torch.tensor([0.7, 0.1, 0.1, 0.1])}
    chunk.set(start)
    tokens.set(start)
    mass = torch.rand(4, generator=g) * 32
    chunk.update({0: (32, mass)})
    for _ in range(32):
        tokens.update({0: (1, mass / 32)})
    a = 0.5 ** 0.5  # 32 tokens = half a half-life
    expect = a * start[0].double() + (1 - a) * mass.double() / 32
    assert torch.allclose(chunk.snapshot()[0], expect, atol=1e-6)
    assert torch.allclose(tokens.snapshot()[0], expect, atol=1e-6)
    with pytest.raises(UserError, match="half-life"):
        Hotness([0], 4, half_life=-1)


def test_the_controller_runs_from_the_engine_step_not_from_a_forward(engine):
    rt = start(engine, "dynaexq:hi=int8,lo=int2", update_every=1)
    try:
        ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))
        with torch.inference_mode():
            engine.model(input_ids=ids)  # a user's own forwards: no step, no decision
            engine.model(input_ids=ids[:, :5])
        assert rt.controller.steps == 0 and rt.controller.decisions == 0
        counts = {layer: bank.token_counts.clone() for layer, bank in engine.banks.items()}
        assert all(int(c.sum()) == 34 * engine.model.config.num_experts_per_tok for c in counts.values())
        seen = []
        real = rt.controller.on_step
        rt.controller.on_step = lambda stats: (seen.append(stats), real(stats))
        with torch.inference_mode():  # one step: the routing of all three forwards, 2 x (12 + 5 + 3) tokens
            engine.run(input_ids=ids[:, :3])
        rt.controller.drain()  # the decision runs on the controller's thread
        assert rt.controller.steps == 1 and rt.controller.decisions == 1 and rt.controller.tokens == 40
        (stats,) = seen  # each layer's routed mass: 1 per token (the router renormalizes its top-k weights)
        assert engine.model.config.norm_topk_prob and sorted(stats) == sorted(engine.banks)
        assert all(stats[layer][0] == 40 and abs(float(stats[layer][1].sum()) - 40) < 1e-3 for layer in stats)
        assert all(int(bank.token_counts.sum()) == 0 for bank in engine.banks.values())
    finally:
        engine.close()


def test_decisions_run_on_the_controllers_thread_in_the_order_they_came_due(engine):
    """The inference thread only hands over a copy of the hotness; the planner's work runs on the controller's
    thread, one decision per copy, in order (so the maps are those of a run deciding inline: compared with one)."""
    def run(blocking):
        rt = start(engine, "dynaexq:hi=int8,lo=int2", update_every=2, blocking=blocking)
        threads, real = [], rt.controller.plan.target
        rt.controller.plan.target = lambda *a: threads.append(threading.current_thread().name) or real(*a)
        try:
            g = torch.Generator().manual_seed(11)
            for _ in range(20):
                rt.controller.on_step(random_stats(engine, g))
            rt.drain()
            return threads, list(rt.controller.plan.history), published(engine)
        finally:
            engine.close()

    (off, maps, pub), (inline, maps_inline, pub_inline) = run(False), run(True)
    assert off == ["dynaexq-controller"] * 10 and inline == ["MainThread"] * 10
    assert maps == maps_inline and pub == pub_inline


def test_runtime_config_decides_by_tokens_unless_steps_are_asked_for():
    from dynaexq.config import HALF_LIFE_TOKENS, UPDATE_EVERY_TOKENS

    c = RuntimeConfig()
    assert (c.update_every_tokens, c.update_every, c.half_life_tokens) == (UPDATE_EVERY_TOKENS, 0, HALF_LIFE_TOKENS)
    c = RuntimeConfig(update_every=16, alpha=0.8)  # the paper's clock: steps and a per-step alpha
    assert (c.update_every_tokens, c.update_every, c.half_life_tokens, c.alpha) == (0, 16, 0, 0.8)
    with pytest.raises(UserError, match="--update-every-tokens N or --update-every N"):
        RuntimeConfig(update_every_tokens=0)
    with pytest.raises(UserError, match="N >= 1"):
        RuntimeConfig(update_every=-3)
    with pytest.raises(UserError, match="--fetch-workers >= 0"):
        RuntimeConfig(fetch_workers=-1)


def test_multilevel_trades_slots_across_layers_totals_per_precision_fixed(engine):
    E = engine.reader.num_experts
    L0, L1 = sorted(engine.banks)
    flat = {layer: torch.full((E,), 1.0 / E) for layer in (L0, L1)}
    rt = start(engine, "multilevel:ladder=int8/int4/int2,delta=0", budget="int3", warm=flat, update_every=1)
    try:
        def per_layer():
            return {(layer, p): sum(v.precision == p for v in engine.banks[layer].versions)
                    for layer in (L0, L1) for p in rt.controller.plan.tiers}
        before = per_layer()
        peaked = torch.zeros(E)
        peaked[:2] = 8.0  # layer L0: two experts take all of 16 tokens' mass (the others idle); layer L1 stays flat
        for _ in range(20):
            rt.controller.on_step({L0: (16, peaked), L1: (16, torch.full((E,), 2.0))})
        rt.drain()
        after = per_layer()
        assert after != before  # a layer's count of some precision moved ...
        for p in rt.controller.plan.tiers:  # ... while each precision's total did not
            assert after[(L0, p)] + after[(L1, p)] == before[(L0, p)] + before[(L1, p)]
        best = next(p for p in rt.controller.plan.tiers if before[(L0, p)] + before[(L1, p)])  # the highest one held
        assert engine.banks[L0].versions[0].precision == engine.banks[L0].versions[1].precision == best
        assert after[(L0, best)] == 2 and after[(L1, best)] > before[(L1, best)]  # L0's idle experts' slots went to L1
        assert published(engine) == rt.controller.target_map() and rt.residency.stats["failures"] == 0
        assert rt.pools.tracker.peak <= rt.pools.nbytes() and engine.expert_bytes() <= resolve_budget("int3", engine.reader)
        rt.check()
    finally:
        engine.close()
