"""Hotness planners on a fake store: budgets are filled and never exceeded, hot experts get the bytes."""
import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dynaexq.errors import UserError
from dynaexq.quant.precision import Precision as P
from dynaexq.runtime.planners import parse_budget, parse_policy, resolve_budget

BYTES = {P.BF16: 1600, P.INT8: 820, P.INT4: 450, P.INT3: 350, P.INT2: 250}
ERROR = {P.BF16: 0.0, P.INT8: 0.004, P.INT4: 0.07, P.INT3: 0.14, P.INT2: 0.3}


class FakeReader:
    def __init__(self, layers=3, experts=8, error_jitter=None):
        self.layers, self.num_experts = list(range(layers)), experts
        self.precisions = list(BYTES)
        self.jitter = error_jitter or {}

    def expert_bytes(self, layer, e, p):
        return BYTES[p]

    def expert_error(self, layer, e, p):
        return ERROR[p] * self.jitter.get((layer, e), 1.0)

    output_error = expert_error


def cost(plan, reader):
    return sum(reader.expert_bytes(layer, e, p) for (layer, e), p in plan.items())


def hot(layers, experts, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {layer: torch.rand(experts, generator=g) ** 3 for layer in range(layers)}


def test_calibrated_keeps_the_hottest_at_hi_and_fills_the_budget():
    r = FakeReader()
    h = hot(3, 8)
    budget = resolve_budget("int3", r)  # 24 x 350
    plan = parse_policy("calibrated:hi=int8,lo=int2").plan(r, budget, h)
    assert set(plan.values()) <= {P.INT8, P.INT2}
    assert cost(plan, r) <= budget
    assert budget - cost(plan, r) < BYTES[P.INT8] - BYTES[P.INT2]  # nothing more fits
    for layer in range(3):
        his = [e for e in range(8) if plan[(layer, e)] is P.INT8]
        los = [e for e in range(8) if plan[(layer, e)] is P.INT2]
        assert his and min(h[layer][e] for e in his) >= max(h[layer][e] for e in los)
    # 24*350 = 8400 = 24*250 + 4 * 570 + 120: one per layer (3), then the 4th to the hottest share left
    assert sum(p is P.INT8 for p in plan.values()) == 4


def test_multilevel_beats_uniform_at_equal_bytes_on_its_own_objective():
    r = FakeReader()
    h = hot(3, 8, seed=1)
    budget = resolve_budget("int3", r)
    plan = parse_policy("calibrated-multilevel").plan(r, budget, h)
    assert cost(plan, r) <= budget
    obj = lambda pl: sum(float(h[layer][e]) * r.expert_error(layer, e, p) ** 2 for (layer, e), p in pl.items())
    uniform = {k: P.INT3 for k in plan}
    assert obj(plan) < obj(uniform)
    # brute force over one layer with a third of the budget: the greedy is within one step of the optimum
    r1 = FakeReader(layers=1, experts=5)
    h1 = hot(1, 5, seed=2)
    b1 = 5 * 350
    greedy = parse_policy("calibrated-multilevel:ladder=int8/int4/int3/int2").plan(r1, b1, h1)
    best = min(
        (sum(float(h1[0][e]) * ERROR[p] ** 2 for e, p in enumerate(c)) for c in
         itertools.product([P.INT8, P.INT4, P.INT3, P.INT2], repeat=5) if sum(BYTES[p] for p in c) <= b1))
    g = sum(float(h1[0][e]) * ERROR[p] ** 2 for (_, e), p in greedy.items())
    assert cost(greedy, r1) <= b1
    assert g <= best * 1.5 + 1e-12


@settings(max_examples=60, deadline=None)
@given(st.integers(6000, 40000), st.integers(0, 1000), st.sampled_from(["calibrated", "calibrated:hi=int4,lo=int3",
                                                                        "calibrated-multilevel", "oracle",
                                                                        "calibrated-multilevel:power=1"]))
def test_budget_is_never_exceeded_and_every_step_helps(budget, seed, spec):
    r = FakeReader(error_jitter={(0, 1): 2.0, (2, 5): 0.5})
    h = hot(3, 8, seed)
    h[1][:] = 0  # a layer nobody routes to
    planner = parse_policy(spec)
    floor = min(BYTES[p] for p in ([planner.lo] if hasattr(planner, "lo") else planner.ladder) if p in BYTES) * 24
    if budget < floor:
        with pytest.raises(UserError, match="minimum budget"):
            planner.plan(r, budget, h)
        return
    plan = planner.plan(r, budget, h)
    assert len(plan) == 24 and cost(plan, r) <= budget
    floor_map = planner.floor(r)
    assert cost(floor_map, r) == floor and cost(plan, r) >= cost(floor_map, r)
    obj = lambda pl: sum(float(h[layer][e]) * r.expert_error(layer, e, p) ** 2 for (layer, e), p in pl.items())
    assert obj(plan) <= obj(floor_map) + 1e-12  # every step taken lowers the objective
    if hasattr(planner, "lo") and any(p is planner.lo for p in plan.values()):  # two tiers: nothing more fits
        assert budget - cost(plan, r) < BYTES[planner.hi] - BYTES[planner.lo]


def test_errors_are_clear():
    r = FakeReader()
    with pytest.raises(UserError, match="minimum budget for this policy is"):
        parse_policy("calibrated").plan(r, 1000, hot(3, 8))
    with pytest.raises(UserError, match="needs an expert budget"):
        parse_policy("calibrated").plan(r, None, hot(3, 8))
    with pytest.raises(UserError, match="options are hi=..., lo=..."):
        parse_policy("calibrated:high=int8")
    with pytest.raises(UserError, match="must be a higher precision"):
        parse_policy("calibrated:hi=int2,lo=int4")
    with pytest.raises(UserError, match="unknown precision|valid"):
        parse_policy("calibrated-multilevel:ladder=int8/int5")
    with pytest.raises(UserError, match="valid policies are"):
        parse_policy("hotness")
    with pytest.raises(UserError, match="precision name such as int3"):
        parse_budget("lots")
    assert parse_budget("int3") is P.INT3 and parse_budget("1KiB") == 1024
    assert resolve_budget("int2", r) == 24 * 250
