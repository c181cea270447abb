"""Failure paths of the runtime: failed and superseded fetches, retries, close, CUDA lease bookkeeping, bounded state,
and negative controls showing that every `check()` can fail."""
import contextlib
import json
import threading

import pytest
import torch

from dynaexq.quant.precision import Precision as P
from dynaexq.runtime.pool import STAGING, BudgetTracker, Pools, SlotPool
from dynaexq.runtime.table import ExpertTable
from rt import published, start

WARM = torch.arange(8, dtype=torch.float32) / 28  # experts 6 and 7 hold the two int8 slots of each layer


def hot(**experts):
    """A hotness vector over 8 experts: hot(e0=0.5, e7=0.4)."""
    s = torch.zeros(8)
    for name, v in experts.items():
        s[int(name[1:])] = v
    return s


def close_within(engine, seconds: float) -> bool:
    """engine.close() on a thread; True when it returned within `seconds` (a hang must not hang the suite)."""
    t = threading.Thread(target=engine.close, daemon=True)
    t.start()
    t.join(seconds)
    return not t.is_alive()


def decide(rt, layers: dict):
    """Set the hotness of the given layers (others keep theirs) and decide now -> the target applied."""
    S = rt.hotness.snapshot()
    rt.hotness.set({layer: layers.get(layer, S[layer]) for layer in S})
    return rt.controller.decide()


def gated(rt, fail=lambda layer, e, p, attempt: False):
    """Replace the runtime's store reads: they wait for the returned event, then fail where `fail` says."""
    real, gate, calls = rt.residency.read, threading.Event(), {}

    def read(layer, e, p):
        gate.wait(30)
        calls[(layer, e, p)] = calls.get((layer, e, p), 0) + 1
        if fail(layer, e, p, calls[(layer, e, p)]):
            raise OSError(f"injected I/O error on expert {e} of layer {layer} at {p.value}")
        return real(layer, e, p)

    rt.residency.read = read
    return gate


def test_a_failed_read_leaves_the_map_serving_without_leaks_or_hangs(engine, tmp_path):
    """A swap whose promotion cannot be read: its demoted expert went to staging first and comes back out into a
    free arena slot (no staging slot stays held, nothing is unpublished), the failed expert keeps its version,
    the other layer's swap is done; once the store reads again, the next decision reaches the target; close()
    returns."""
    hotfile = tmp_path / "hot.json"
    L0, L1 = sorted(engine.banks)
    rt = start(engine, "dynaexq:hi=int8,lo=int2,delta=0", warm={layer: WARM for layer in engine.banks},
               update_every=10**6, fetch_workers=2, staging_slots=1, retries=0, hotness_file=str(hotfile))
    closed = False
    try:
        real = rt.residency.read
        gate = gated(rt, fail=lambda layer, e, p, n: (layer, e, p) == (L0, 0, P.INT8))
        decide(rt, {L0: hot(e0=0.5, e7=0.4)})  # 0 replaces 6 in layer L0 -- its int8 read will fail
        decide(rt, {L1: hot(e0=0.5, e7=0.4)})  # independent: layer L1
        gate.set()
        rt.drain()
        stats, errors = rt.residency.stats, list(rt.residency.errors)
        assert stats["failures"] == 1 and stats["unstuck"] == 1 and len(errors) == 1, (stats, errors)
        assert "expert 0 of layer" in errors[0] and not any(e.startswith("FATAL") for e in errors)
        rt.check()  # nothing leaked: every taken slot is published, the staging slot is back
        assert rt.pools.occupancy()["staging"]["used"] == 0
        now = published(engine)
        assert now[(L0, 0)] == P.INT2 and now[(L1, 0)] == P.INT8  # (arenas serve every layer: 6 may be either)
        rt.residency.read = real
        decide(rt, {})
        rt.drain()
        assert published(engine) == rt.controller.target_map() and published(engine)[(L0, 0)] == P.INT8
        rt.check()
        closed = close_within(engine, 10)
        assert closed, "close() did not return"
        assert json.loads(hotfile.read_text())["num_experts"] == 8
    finally:
        if not closed:
            close_within(engine, 10)


def test_fetches_superseded_by_a_later_decision_end_at_its_target(engine):
    """Decisions taken while earlier fetches wait (reads held, one failing once): what is published in the end is
    the latest target, each expert at most once in flight."""
    L0, _ = sorted(engine.banks)
    rt = start(engine, "dynaexq:hi=int8,lo=int2,delta=0", warm={layer: WARM for layer in engine.banks},
               update_every=10**6, fetch_workers=2, retries=2)
    try:
        gate = gated(rt, fail=lambda layer, e, p, n: (layer, e, p) == (L0, 1, P.INT8) and n == 1)  # once
        decide(rt, {L0: hot(e0=0.5, e7=0.4)})
        decide(rt, {L0: hot(e1=0.6, e7=0.5)})
        gate.set()
        rt.drain()
        stats = rt.residency.stats
        assert stats["retries"] == 1 and stats["failures"] == 0, stats
        rt.check()
        assert published(engine) == rt.controller.target_map()
        assert [e for e in range(8) if published(engine)[(L0, e)] == P.INT8] == [1, 7]
    finally:
        assert close_within(engine, 10)


def test_close_returns_while_fetches_wait_for_a_staging_slot(engine, tmp_path):
    L0, _ = sorted(engine.banks)
    hotfile = tmp_path / "hot.json"
    rt = start(engine, "dynaexq:hi=int8,lo=int2,delta=0", warm={layer: WARM for layer in engine.banks},
               update_every=10**6, staging_slots=1, hotness_file=str(hotfile))
    held = rt.pools.take(STAGING)  # the only staging slot: the swap below can never start
    assert held is not None
    decide(rt, {L0: hot(e0=0.5, e7=0.4)})
    before = published(engine)
    assert close_within(engine, 10)
    assert before[(L0, 0)] == P.INT2 and hotfile.is_file()


def test_controller_history_is_bounded(engine):
    rt = start(engine, "dynaexq:hi=int8,lo=int2", warm={layer: WARM for layer in engine.banks}, update_every=1)
    try:
        g = torch.Generator().manual_seed(0)
        for _ in range(300):
            rt.controller.on_step({layer: (4, torch.rand(8, generator=g)) for layer in engine.banks})
        rt.drain()
        assert rt.controller.decisions == 300 and len(rt.controller.plan.history) <= 64
    finally:
        engine.close()


class FakeEvent:
    """Stands in for torch.cuda.Event on the CPU: 'completes' when the test says so."""
    pending: list = []

    def __init__(self):
        self.done = False

    def record(self, stream=None):
        FakeEvent.pending.append(self)

    def query(self) -> bool:
        return self.done

    @classmethod
    def complete_all(cls):
        for ev in cls.pending:
            ev.done = True
        cls.pending.clear()


def test_gpu_leases_stay_bounded_with_a_stable_hot_set_and_still_guard_reclaim():
    table = ExpertTable({0: [None] * 4}, event=FakeEvent)
    for step in range(5000):  # the GPU keeps up: events complete one step later
        table.release(table.acquire())
        if step % 2:
            FakeEvent.complete_all()
    assert len(table._gpu_leases) <= 4, len(table._gpu_leases)
    table.release(table.acquire())  # a lease whose kernels are still running
    _, retired_at = table.publish(0, 0, "v1")
    with pytest.raises(TimeoutError):
        table.wait_unread(retired_at, timeout=0.05)
    FakeEvent.complete_all()
    table.wait_unread(retired_at, timeout=1)


class FakeCopyStream:
    """Stands in for fetch.CopyStream on the CPU: records what ran on it and when it was synchronized."""

    def __init__(self, log):
        self.log, self.active = log, threading.local()

    @contextlib.contextmanager
    def use(self):
        self.active.on = True
        try:
            yield
        finally:
            self.active.on = False

    def on(self) -> bool:
        return getattr(self.active, "on", False)

    def synchronize(self):
        self.log.append("sync")


def test_cuda_transitions_build_and_copy_on_the_copy_stream_and_publish_after_it_completes(engine, monkeypatch):
    from dynaexq.runtime import residency as R

    L0, _ = sorted(engine.banks)
    rt = start(engine, "dynaexq:hi=int8,lo=int2,delta=0", warm={layer: WARM for layer in engine.banks},
               update_every=10**6)
    log = []
    stream = FakeCopyStream(log)
    rt.residency.copy_stream = stream
    read, place, publish = rt.residency.read, R.place, rt.table.publish
    rt.residency.read = lambda *a: log.append(("read", stream.on())) or read(*a)
    monkeypatch.setattr(R, "place", lambda *a, **k: log.append(("place", stream.on())) or place(*a, **k))
    monkeypatch.setattr(rt.table, "publish", lambda *a: log.append("publish") or publish(*a))
    try:
        decide(rt, {L0: hot(e0=0.5, e7=0.4)})
        rt.drain()
        assert rt.residency.stats["promotions"] == 1 and rt.residency.stats["relocations"] == 1
        # 6 down into staging, 0 up into 6's slot, 6 from staging into 0's: two reads, three copies
        assert [x for x in log if isinstance(x, tuple)] == [("read", True), ("place", True)] * 2 + [("place", True)]
        publishes = [i for i, x in enumerate(log) if x == "publish"]
        assert len(publishes) == 3 and all(log[i - 1] == "sync" for i in publishes)  # each copy complete first
    finally:
        engine.close()


def test_cuda_kernels_are_placed_on_the_engines_device_not_a_hard_coded_one(monkeypatch):
    from dynaexq.quant import kernels_cuda
    from dynaexq.quant.quantize import quantize
    from dynaexq.runtime.version import make_version

    seen = []
    monkeypatch.setattr(kernels_cuda, "prepare", lambda qw, device: seen.append(torch.device(device)) or qw)
    w = {m: quantize(torch.randn(64, 64), P.INT4) for m in ("gate_up", "down")}
    make_version(w, "cuda", torch.bfloat16, torch.device("cuda", 1))
    assert seen == [torch.device("cuda", 1)] * 2


def test_slot_pool_check_fails_on_a_corrupted_free_list():
    pool = SlotPool("k", 64, 4)
    pool.check()
    i = pool.take()
    pool._free.append(i)  # given back without clearing its flag
    with pytest.raises(AssertionError, match="disagree"):
        pool.check()
    pool._free[:] = [0, 0, 1]
    with pytest.raises(AssertionError, match="free twice"):
        pool.check()


def test_budget_tracker_check_fails_over_its_cap_or_below_zero():
    t = BudgetTracker({"int8": 100})
    assert t.reserve("int8", 60) and not t.reserve("int8", 60)
    t.check()
    t.committed["int8"] = 90  # 60 pending + 90 committed > the cap of 100
    with pytest.raises(AssertionError, match="over its cap"):
        t.check()
    t.committed["int8"], t.pending["int8"] = 0, -1
    with pytest.raises(AssertionError):
        t.check()


def test_pools_check_fails_when_the_tracker_and_the_slots_disagree():
    pools = Pools({(0, P.INT8): 2}, {(0, P.INT8): 64}, (1, 64))
    i = pools.take(P.INT8)
    pools.commit(P.INT8)
    pools.check()
    pools.pools[P.INT8].take()  # a slot taken behind the tracker's back: its bytes are not counted
    with pytest.raises(AssertionError, match="tracker"):
        pools.check()
    pools.pools[P.INT8].give_back(1 - i)
    pools.check()
    pools.tracker.release("int8", 64)  # bytes released while the slot is still taken
    with pytest.raises(AssertionError, match="tracker"):
        pools.check()


def test_expert_table_check_fails_on_double_slots_missing_versions_and_untracked_slots(engine):
    rt = start(engine, "dynaexq:hi=int8,lo=int2", warm={layer: WARM for layer in engine.banks}, update_every=10**6)
    try:
        rt.check()
        L0, _ = sorted(engine.banks)
        versions = rt.table.versions[L0]
        saved = list(versions)
        versions[1] = versions[0]  # two experts in one slot
        with pytest.raises(AssertionError, match="holds"):
            rt.table.check(rt.pools)
        versions[:] = saved
        versions[2] = None  # an expert with no version
        with pytest.raises(AssertionError, match="no published version"):
            rt.table.check(rt.pools)
        versions[:] = saved
        key, i = versions[0].slot
        rt.pools.pools[key].give_back(i)  # published in a slot the pool thinks is free
        with pytest.raises(AssertionError, match="not taken"):
            rt.table.check(rt.pools)
        rt.pools.pools[key]._free.remove(i)
        rt.pools.pools[key]._taken[i] = True
        spare = rt.pools.pools[STAGING].take()  # taken, never published: a leak when quiescent
        with pytest.raises(AssertionError, match="unpublished"):
            rt.table.check(rt.pools)
        rt.table.check(rt.pools, quiescent=False)  # mid-transition that is allowed
        rt.pools.pools[STAGING].give_back(spare)
        rt.check()
    finally:
        engine.close()
