"""The offload regime: a budget below every expert at the lowest precision holds a cache of versions; misses read
the store from disk. Outputs are checked against a float64 reference of exactly the versions each forward read,
under churn (prefetch, evictions, upgrades); the invariants of the resident regimes hold (budget never exceeded, a
failed read leaves what was published serving); a budget below the minimum is refused, naming it."""
import threading
import time

import pytest
import torch
import torch.nn.functional as F

import dynaexq
from dynaexq.config import RuntimeConfig
from dynaexq.errors import UserError
from dynaexq.quant.precision import Precision
from dynaexq.quant.quantize import dequantize
from dynaexq.runtime.planners.offload import HotPolicy, LruPolicy
from dynaexq.store.direct import DirectReader
from dynaexq.store.reader import StoreReader


def _slot(store, p):
    from dynaexq.engine.load import load
    eng = load(store, f"uniform:{p}", progress=False)
    from dynaexq.runtime.version import slot_layout
    v = eng.make_version(eng.reader.layers[0], 0, Precision(p))
    eng.close()
    return slot_layout(v)[1]


def _offload(store, spec, slots_lo, dtype=torch.float32, **cfg):
    """An engine in the offload regime whose budget is `slots_lo` int2 slots (the tiny model: 2 layers x 8)."""
    budget = int(slots_lo * _slot(store, "int2"))
    eng = dynaexq.load(store, spec, budget, dtype=dtype, progress=False, runtime=RuntimeConfig(**cfg))
    assert eng.runtime.regime == "offload"
    return eng


def _record(eng):
    """Wrap every bank's forward: [(bank, hidden, idx, w, out, versions read)] of each call."""
    calls = []
    for bank in eng.banks.values():
        orig = bank.forward

        def fwd(hidden, idx, w, _bank=bank, _orig=orig):
            out = _orig(hidden, idx, w)
            calls.append((_bank, hidden.clone(), idx.clone(), w.clone(), out.clone(), list(_bank.last_read)))
            return out
        bank.forward = fwd
    return calls


def _steps(eng, n, seed, vocab=128):
    """n forward steps of random token batches (1 to 12 tokens: decode- and prefill-sized), the controller after each
    (the tiny test model ships no tokenizer)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _ in range(n):
            t = int(torch.randint(1, 13, (1,), generator=g))
            eng.run(input_ids=torch.randint(0, vocab, (1, t), generator=g))


def _float64(reader, layer, read, hidden, idx, w):
    out = torch.zeros(hidden.shape, dtype=torch.float64)
    for t in range(hidden.shape[0]):
        for j in range(idx.shape[1]):
            e = int(idx[t, j])
            ws = reader.read_expert(layer, e, read[e].precision)  # the very version this forward read
            gate, up = (dequantize(ws["gate_up"], torch.float64) @ hidden[t].double()).chunk(2)
            out[t] += float(w[t, j]) * (dequantize(ws["down"], torch.float64) @ (F.silu(gate) * up))
    return out


@pytest.mark.parametrize("spec", ["dynaexq:hi=int4,lo=int2,hi_share=0.3,prefetch=1", "lru-offload+prefetch:int4",
                                  "multilevel:alloc=depth"])
def test_outputs_under_offload_equal_float64_of_the_versions_each_forward_read(spec, checkpoints):
    _, store = checkpoints("qwen3_moe")
    eng = _offload(store, spec, 6, update_every_tokens=4)  # 6 of 16 experts' int2 bytes: misses, evictions, upgrades
    calls = _record(eng)
    reader = StoreReader(store)
    _steps(eng, 30, seed=0)
    eng.runtime.residency.drain()
    rep, moves = eng.runtime.residency.report(), eng.runtime.stats()["transitions"]
    assert rep["misses"] > 0 and rep["evictions"] > 0 and rep["hits"] > 0, rep
    # one set of counters in both regimes: the residency's fetches and evictions
    assert moves["evictions"] == rep["evictions"] and moves["promotions"] == rep.get("promotions", 0)
    assert moves["bytes_moved"] == rep["bytes_moved"] > 0 and moves["pending"] == 0 and moves["pairs"] == 0
    assert len(calls) > 40
    for bank, hidden, idx, w, out, read in calls:
        routed = set(idx.flatten().tolist())
        assert {e for e, v in enumerate(read) if v is not None} == routed  # read exactly what was routed
        exact = _float64(reader, bank.layer, read, hidden, idx, w)
        assert float((out.double() - exact).norm() / exact.norm()) < 1e-4
    eng.runtime.residency.drain()
    eng.runtime.check(quiescent=False)
    eng.close()


def test_budget_never_exceeded_and_invariants_hold_under_churn(checkpoints):
    _, store = checkpoints("qwen3_moe")
    eng = _offload(store, "dynaexq:hi=int4,lo=int2,hi_share=0.4,prefetch=1", 7, update_every_tokens=2)
    assert eng.runtime.planner.counts[Precision.INT4] > 0
    rt = eng.runtime
    cap = rt.pools.tracker.total_cap
    assert rt.pools.expert_bytes() <= rt.plan.expert_budget
    seen, stop = [], threading.Event()

    def watch():  # the tracker from another thread while the cache churns
        while not stop.is_set():
            t = rt.pools.tracker
            with t._lock:  # one consistent reading (a commit moves bytes from pending to committed)
                seen.append(sum(t.pending.values()) + sum(t.committed.values()))
            time.sleep(0.0002)
    w = threading.Thread(target=watch)
    w.start()
    try:
        _steps(eng, 60, seed=1)
    finally:
        stop.set()
        w.join()
    assert max(seen) <= cap and rt.pools.tracker.peak <= cap
    rt.drain()
    rt.check(quiescent=False)
    r = rt.stats()["offload"]
    assert r["resident"] <= sum(rt.planner.counts.values())
    assert r["resident_by_precision"].get("int4", 0) > 0  # the hottest were fetched at hi (misses or upgrades)
    eng.close()


def test_an_upgrade_replaces_the_low_copy_and_a_failed_one_leaves_it_serving(checkpoints):
    _, store = checkpoints("qwen3_moe")
    eng = _offload(store, "dynaexq:hi=int4,lo=int2,hi_share=0.4,prefetch=0", 6, retries=1)
    cache, pol = eng.runtime.residency, eng.runtime.planner
    _steps(eng, 4, seed=2)
    cache.drain()
    low = [k for k, p in cache.resident().items() if p == Precision.INT2]
    good, bad = low[:2]
    pol.score.update({good: 1e9, bad: 1e12})  # hot enough to displace any int4 resident (guesses need 2x)
    cache.apply({good: Precision.INT4})
    cache.drain()
    v = eng.banks[good[0]].versions[good[1]]
    assert cache.resident()[good] == Precision.INT4 and v.precision == Precision.INT4 and v.slot[0] == Precision.INT4
    assert cache.report()["promotions"] == 1
    eng.runtime.check(quiescent=False)  # the int2 slot it left was reclaimed once unread
    real = cache.io.read

    def flaky(layer, e, precision):
        if (layer, e) == bad and precision == Precision.INT4:
            raise OSError("injected read error")
        return real(layer, e, precision)
    cache.io.read = flaky
    before = eng.banks[bad[0]].versions[bad[1]]
    cache.apply({bad: Precision.INT4})
    cache.drain()
    assert eng.banks[bad[0]].versions[bad[1]] is before  # the previous version keeps serving
    assert cache.resident()[bad] == Precision.INT2
    assert cache.report()["failures"] == 1 and any("injected" in e for e in cache.report()["errors"])
    eng.runtime.check(quiescent=False)
    eng.close()


def test_a_miss_that_cannot_be_read_raises_a_clear_error_and_nothing_is_published(checkpoints):
    _, store = checkpoints("qwen3_moe")
    eng = _offload(store, "lru-offload:int4", 4 * 1.6, retries=1)
    cache = eng.runtime.residency

    def broken(layer, e, precision):
        raise OSError("disk gone")
    cache.io.read = broken
    with pytest.raises(RuntimeError, match="expert 0 of layer 0 could not be read from the store at int4 after 2 attempts.*disk gone"):
        _steps(eng, 1, seed=3)
    assert all(v is None for bank in eng.banks.values() for v in bank.versions)
    eng.runtime.check(quiescent=True)
    eng.close()


def test_a_budget_below_the_offload_minimum_is_refused_naming_it(checkpoints):
    _, store = checkpoints("qwen3_moe")
    slot = _slot(store, "int2")
    with pytest.raises(UserError, match=r"below the offload minimum .*\(%d bytes\) = 2 slots \(top-k\)" % (4 * slot)):
        dynaexq.load(store, "dynaexq", 4 * slot - 1, progress=False)
    with pytest.raises(UserError, match="minimum expert budget for it is .* dynaexq and multilevel run below it"):
        dynaexq.load(store, "frozen:hi=int8,lo=int2", 4 * slot, progress=False)
    eng = dynaexq.load(store, "dynaexq", 4 * slot, progress=False)  # exactly the minimum runs
    assert eng.runtime.regime == "offload"
    _steps(eng, 3, seed=4)
    eng.close()


def test_the_resident_regime_is_kept_when_every_expert_fits_at_the_lowest_precision(checkpoints):
    _, store = checkpoints("qwen3_moe")
    from rt import start
    eng = dynaexq.load(store, "uniform:int2", progress=False)
    rt = start(eng, "dynaexq", int(16 * _slot(store, "int2")))
    assert rt.regime == "resident" and rt.residency.complete and rt.pools.expert_bytes() == 16 * _slot(store, "int2")
    eng.close()


def test_direct_reads_equal_the_memory_mapped_reader_in_every_mode(checkpoints):
    _, store = checkpoints("qwen3_moe")
    reader = StoreReader(store)
    reader.check("lazy")
    for mode in ("direct", "buffered", "cached"):
        io = DirectReader(reader, mode)
        for p in reader.precisions:
            for layer in reader.layers:
                a, b = reader.read_expert(layer, 3, p), io.read(layer, 3, p)
                for m in ("gate_up", "down"):
                    for f in ("data", "scale", "zero", "ranges"):
                        x, y = getattr(a[m], f), getattr(b[m], f)
                        assert (x is None and y is None) or torch.equal(x, y), (mode, p, m, f)
        assert io.stats["reads"] == len(reader.precisions) * len(reader.layers)
        assert io.stats["bytes"] == sum(io.nbytes(layer, 3, p) for p in reader.precisions for layer in reader.layers)
        io.close()
    with pytest.raises(UserError, match="direct, buffered, cached"):
        DirectReader(reader, "mmap")


def test_lru_evicts_the_layers_least_recently_used_and_keeps_its_quota():
    pol = LruPolicy(Precision.INT4)
    pol.size([0, 1], 8, 2, {Precision.INT4: 100}, 800)  # 4 slots a layer
    assert pol.per_layer == 4 and pol.counts == {Precision.INT4: 8}
    cands = [((0, 1), 5), ((0, 2), 3), ((1, 0), 1)]
    assert pol.victim(0, Precision.INT4, cands, True, 3) is None  # under its quota: a free slot
    assert pol.victim(0, Precision.INT4, cands, True, 4) == (0, 2)  # at quota: its own least recently used
    assert pol.victim(0, Precision.INT4, [((1, 0), 1)], False, 4) is False  # nothing of its own to evict: wait


def test_hot_policy_wants_the_hottest_high_and_a_guess_never_displaces_a_hotter_expert():
    pol = HotPolicy("dynaexq", Precision.INT4, Precision.INT2, hi_share=0.5, alloc="depth")
    pol.size([0, 1], 4, 1, {Precision.INT4: 200, Precision.INT2: 100}, 800)
    assert pol.counts == {Precision.INT4: 2, Precision.INT2: 4}
    pol.update({0: torch.tensor([0.9, 0.1, 0.0, 0.3]), 1: torch.tensor([0.8, 0.7, 0.0, 0.0])})
    assert pol.want(0, 0) == Precision.INT4 and pol.want(1, 0) == Precision.INT4  # depth: layer 1 weighs 1/2
    assert pol.want(1, 1) == Precision.INT2
    cands = [((0, 3), 9), ((1, 1), 2)]
    assert pol.victim(0, Precision.INT2, cands, False, 0, (0, 1), True) == (0, 3)  # lowest score (0.3 vs 0.35)
    assert pol.victim(0, Precision.INT2, cands, False, 0, (0, 1), False) is False  # a guess: 0.1 < 0.3
    assert pol.victim(0, Precision.INT2, cands, True, 0, (0, 1), False) is None
    # recency: an expert used within the last two tokens (4 layer forwards here) is kept whatever its score
    assert pol.recent == 4
    assert pol.victim(0, Precision.INT2, [((0, 3), 99), ((1, 1), 2)], False, 0, (0, 1), True, now=100) == (1, 1)


def test_a_layer_holding_its_share_makes_room_from_its_own_experts():
    pol = HotPolicy("dynaexq", Precision.INT4, Precision.INT2)
    pol.size([0, 1, 2], 8, 1, {Precision.INT2: 100}, 600)  # 6 slots: a share of 2 a layer
    pol.update({0: torch.tensor([0.0, 0.5, 0.4] + [0.0] * 5), 1: torch.tensor([0.1, 0.2] + [0.0] * 6),
                2: torch.zeros(8)})
    cands = [((0, 1), 1), ((0, 2), 2), ((1, 0), 3), ((1, 1), 4)]  # all older than two tokens at now=100
    assert pol.victim(0, Precision.INT2, cands, False, 2, (0, 0), True, now=100) == (0, 2)  # its share: its own
    assert pol.victim(2, Precision.INT2, cands, False, 0, (2, 0), True, now=100) == (1, 0)  # below: the lowest
    assert pol.victim(2, Precision.INT2, cands, False, 2, (2, 0), True, now=100) == (1, 0)  # none of its own


@pytest.mark.parametrize("spec", ["dynaexq:hi=int4,lo=int2", "multilevel:ladder=int8/int4/int2"])
def test_one_start_for_every_budget_holds_more_experts_as_the_budget_grows_without_a_jump_at_the_floor(spec):
    from dynaexq.runtime.planners import parse_policy
    from dynaexq.runtime.planners.offload import BelowMinimum
    from dynaexq.runtime.replay import ShapeReader
    layers, E, k = [0, 1, 2], 8, 2
    sizes = {Precision.INT8: 400, Precision.INT4: 220, Precision.INT2: 130}
    reader, planner = ShapeReader(layers, E, sizes), parse_policy(spec)
    slot_bytes = {(layer, p): sizes[p] for layer in layers for p in planner.tiers(reader)}
    floor = len(layers) * E * sizes[Precision.INT2]
    with pytest.raises(BelowMinimum) as err:
        planner.start(reader, slot_bytes, len(layers) * k * 130 - 1, None, k)
    assert err.value.minimum == len(layers) * k * 130
    held, used = [], []
    for budget in range(len(layers) * k * 130, 3 * floor, 97):
        live = planner.start(reader, slot_bytes, budget, None, k)
        assert live.complete == (budget >= floor)
        n = {p: sum(c for (_, q), c in live.slots.items() if q == p) for p in sizes}
        held.append(min(len(layers) * E, sum(n.values())))
        used.append(sum(c * sizes[p] for p, c in n.items()))
        assert used[-1] <= budget
        top = n[planner.tiers(reader)[0]] == len(layers) * E  # every expert at the top tier: nothing more to buy
        assert top or budget - used[-1] < len(layers) * sizes[Precision.INT8]  # at most a slot a layer left over
        if not live.complete:  # below the floor every byte buys residency at the lowest precision
            assert set(n[p] for p in n if p != Precision.INT2) == {0}
    assert held == sorted(held) and held[-1] == len(layers) * E
    assert all(b - a <= 1 for a, b in zip(held, held[1:]))  # one more expert per step at most: no jump at the floor


def test_lookahead_recall_is_what_the_predictions_and_the_routing_give_and_beats_chance(bundled_store):
    """On the (trained) bundled model: the recall the cache reports per layer equals |predicted & routed| / |routed|
    computed here from every prediction and every routing, and the look-ahead (layer l+1's norm and router on
    layer l's post-attention hidden state) finds the experts far better than chance (K / E)."""
    eng = dynaexq.load(bundled_store, "dynaexq:prefetch=1", "2MiB", progress=False)
    cache, k, E = eng.runtime.residency, 4, eng.reader.num_experts
    predicted, hits = {}, {layer: [0, 0] for layer in eng.banks}
    real = cache.prefetch

    def prefetch(layer, experts):
        predicted[layer] = set(experts)
        return real(layer, experts)
    cache.prefetch = prefetch

    def routed(bank, args):
        pred = predicted.pop(bank.layer, None)
        if pred is not None:
            got = set(args[1].flatten().tolist())
            hits[bank.layer][0] += len(pred & got)
            hits[bank.layer][1] += len(got)
    hooks = [b.register_forward_pre_hook(routed) for b in eng.banks.values()]
    eng.generate("def fibonacci(n):\n    if n < 2:", 24)
    eng.generate("The history of the", 16)
    for h in hooks:
        h.remove()
    rec = cache.report()["recall"]
    first, *rest = sorted(rec)
    assert rec[first] is None and hits[first][1] == 0  # nothing predicts the first MoE layer
    for layer in rest:
        a, b = hits[layer]
        assert b > 0 and rec[layer] == pytest.approx(a / b, abs=1e-12), (layer, rec[layer], a, b)
        assert rec[layer] > 3 * k / E, (layer, rec[layer])
    eng.close()


def test_the_grouped_path_under_offload_equals_float64_on_the_bundled_model(bundled_store):
    from dynaexq.quant import grouped_cpu, lowbit_cpu
    if lowbit_cpu.extension() is None:
        pytest.skip("the C++ kernels did not build here")
    eng = _offload(bundled_store, "dynaexq:hi=int4,lo=int2", 60, update_every_tokens=8)
    calls = _record(eng)
    before = grouped_cpu.calls
    eng.generate("The old lighthouse keeper", 12, 1.0, 1.0, 0, 0)
    assert grouped_cpu.calls > before and eng.runtime.residency.report()["misses"] > 0
    reader = StoreReader(bundled_store)
    for bank, hidden, idx, w, out, read in calls[::7]:
        exact = _float64(reader, bank.layer, read, hidden, idx, w)
        assert float((out.double() - exact).norm() / exact.norm()) < 1e-4
    eng.close()


def _forward(eng, tokens=6, seed=9):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        return eng.model(input_ids=torch.randint(0, 128, (1, tokens), generator=g))


def test_waits_have_deadlines_and_close_ends_them(checkpoints):
    _, store = checkpoints("qwen3_moe")
    eng = _offload(store, "lru-offload:int4", 4 * 1.6, retries=0)
    cache = eng.runtime.residency
    gate, real = threading.Event(), cache.io.read
    cache.io.read = lambda *key: gate.wait(30) and real(*key)  # a read that hangs until released
    cache.FETCH_TIMEOUT_S = 0.3
    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match=r"of layer 0 was not read within 0.3 s"):
        _forward(eng)
    assert time.monotonic() - t0 < 5
    cache.FETCH_TIMEOUT_S = 60.0
    out = {}

    def forward():
        try:
            _forward(eng, seed=10)
        except RuntimeError as err:
            out["err"] = err
    t = threading.Thread(target=forward)
    t.start()
    time.sleep(0.3)  # the forward waits on its miss
    t0 = time.monotonic()
    closer = threading.Thread(target=eng.runtime.residency.close, kwargs={"timeout": 2})
    closer.start()
    t.join(10)
    assert not t.is_alive() and time.monotonic() - t0 < 5, "close did not end the forward's wait"
    assert "runtime closed" in str(out["err"]), out
    gate.set()
    closer.join(10)
    cache.apply({(0, 1): Precision.INT4})  # after close: nothing is submitted, nothing waits
    cache.prefetch(0, [1, 2])
    assert not cache.inflight and not cache._queue
    with pytest.raises(RuntimeError, match="is not resident and the runtime is closed"):
        _forward(eng, seed=11)
    eng.close()


def test_every_failure_says_what_happened(checkpoints):
    _, store = checkpoints("qwen3_moe")
    eng = _offload(store, "lru-offload:int4", 4 * 1.6, retries=2)
    cache, real = eng.runtime.residency, eng.runtime.residency.io.read

    def corrupt(*key):
        raise UserError("expert 3 of layer 0 at int4 in 'x.safetensors' does not match its digest")
    cache.io.read = corrupt
    with pytest.raises(RuntimeError, match=r"at int4 could not be used: expert 3 .* does not match its digest") as info:
        _forward(eng)
    assert "attempts" not in str(info.value) and cache.report().get("retries", 0) == 0  # corruption: no retry
    cache.io.read = real
    _forward(eng)  # fine again
    cache.SLOT_TIMEOUT_S = 0.2
    assert all(not pool._free for pool in cache.pools.pools.values())  # the cache is full
    with cache._cv:  # and every slot pinned: a miss finds no room
        cache.pins.update(list(cache.where))
    with pytest.raises(RuntimeError, match=r"found no int4 slot free in 0.2 s"):
        _forward(eng, seed=12)
    with cache._cv:
        cache.pins.clear()
    eng.runtime.check(quiescent=True)
    eng.close()


def test_no_slot_leaks_when_placing_fails_or_a_replaced_copy_stays_read(checkpoints, monkeypatch):
    from dynaexq.runtime import residency as offload
    _, store = checkpoints("qwen3_moe")
    eng = _offload(store, "dynaexq:hi=int4,lo=int2,hi_share=0.4,prefetch=0", 6, retries=0)
    cache, pol, table = eng.runtime.residency, eng.runtime.planner, eng.runtime.table
    real_place, calls = offload.place, {"n": 0}

    def place_once_broken(*args, **kw):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("injected: the slot could not be filled")
        return real_place(*args, **kw)
    monkeypatch.setattr(offload, "place", place_once_broken)
    with pytest.raises(RuntimeError, match="injected: the slot could not be filled"):
        _forward(eng)
    eng.runtime.check(quiescent=True)  # the slot taken for it went back
    _steps(eng, 3, seed=2)
    cache.drain()
    low = next(k for k, p in cache.resident().items() if p == Precision.INT2)
    pol.score[low] = 1e12
    cache.UNREAD_TIMEOUT_S = 0.2
    failures = cache.report()["failures"]  # the injected one
    lease = table.acquire()  # a reader that holds the low copy past the timeout
    cache.apply({low: Precision.INT4})
    cache.drain()
    rep = cache.report()
    assert cache.resident()[low] == Precision.INT4 and rep["promotions"] == 1 and rep["failures"] == failures
    assert len(cache.retired) == 1 and any("reclaimed later" in e for e in rep["errors"])
    table.release(lease)
    cache._reclaim_retired()
    assert not cache.retired
    eng.runtime.check(quiescent=True)  # every taken slot is published: nothing stranded
    eng.close()


def test_closing_the_reader_never_closes_a_file_under_a_read(checkpoints, monkeypatch):
    import os

    from dynaexq.store import direct
    _, store = checkpoints("qwen3_moe")
    reader = StoreReader(store)
    io = DirectReader(reader, "cached")
    io.read(0, 1, Precision.INT4)  # the shard is open
    fd = next(iter(io._shards.values()))[0]
    entered, release, real = threading.Event(), threading.Event(), os.preadv

    def slow_preadv(*a):
        entered.set()
        release.wait(10)
        return real(*a)
    monkeypatch.setattr(direct.os, "preadv", slow_preadv)
    got = {}
    t = threading.Thread(target=lambda: got.update(v=io.read(0, 2, Precision.INT4)))
    t.start()
    assert entered.wait(10)
    io.close()
    os.fstat(fd)  # still open: a read uses it
    release.set()
    t.join(10)
    assert torch.equal(got["v"]["gate_up"].data, reader.read_expert(0, 2, Precision.INT4)["gate_up"].data)
    with pytest.raises(OSError):
        os.fstat(fd)  # the last read closed it
    with pytest.raises(OSError, match="closed"):
        io.read(0, 3, Precision.INT4)


@pytest.mark.parametrize("policy", ["dynaexq:hi=int4,lo=int2", "multilevel"])
def test_no_cliff_at_the_floor_just_below_all_int2_is_the_all_int2_model_minus_one_slot(bundled_store, policy):
    """The map is continuous across the budget of every expert at int2: just below it the default policy holds all
    but the experts one slot's worth of bytes would hold, all at int2 (no hi slots paid for by residency), so it
    computes exactly what the all-int2 model computes (misses are read at int2) -- checked against a static
    uniform:int2 map; just above it every expert is resident."""
    m = _slot(bundled_store, "int2")
    ref = dynaexq.load(bundled_store, "uniform:int2", progress=False)
    n_all = len(ref.reader.layers) * ref.reader.num_experts
    ids = torch.randint(0, ref.model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = ref.model(input_ids=ids).logits
    ref.close()
    for frac, regime in ((0.999, "offload"), (1.001, "resident")):
        eng = dynaexq.load(bundled_store, policy, int(frac * n_all * m), progress=False)
        try:
            assert eng.runtime.regime == regime
            if regime == "offload":
                assert eng.runtime.planner.counts == {Precision.INT2: int(frac * n_all * m) // m}
                assert eng.runtime.planner.counts[Precision.INT2] >= 0.99 * n_all
            else:
                assert set(eng.precision_counts()) == {"int2"}
            with torch.no_grad():
                got = eng.model(input_ids=ids).logits
            torch.testing.assert_close(got, want, rtol=0, atol=0)
        finally:
            eng.close()
