"""The one allocation for every weight (runtime/planners/weights.py): the budget holds; without --read-budget the
plan is the error-optimal allocation; with it, no plan reads more per decode token than the read budget."""
import pytest
import torch

import dynaexq
from dynaexq.engine.load import resident_sizes
from dynaexq.errors import UserError
from dynaexq.quant.precision import Precision
from dynaexq.runtime.planners import weights
from dynaexq.runtime.planners.calibrated import LADDER, allocate
from dynaexq.store.reader import StoreReader

F32 = torch.float32


def _sized(store):
    return resident_sizes(StoreReader(store), "cpu", F32, torch.device("cpu"))


def _dense_read(sized, plan):
    """What a token reads of the dense matrices: all of each but an untied embedding (a row of it)."""
    items = sized.dense_items()
    return sum(weights.dense_bytes(sized, n, p, F32) for n, p in plan.items() if items[n]["role"] != "embedding")


def _dense_options(sized):
    ladder = [p for p in LADDER if p in sized.precisions]
    return {("dense", n): [(weights.dense_bytes(sized, n, p, F32), sized.dense_error(n, p) ** 2, p) for p in ladder]
            for n in sized.dense_items()}


def _fixed_map(sized):
    experts = {(layer, e): Precision.INT4 for layer in sized.layers for e in range(sized.num_experts)}
    total = sum(sized.expert_bytes(layer, e, p) for (layer, e), p in experts.items())
    return experts, total, total * sized.manifest["config"]["num_experts_per_tok"] // sized.num_experts


def test_a_fixed_expert_map_with_and_without_a_read_budget(checkpoints):
    _, store = checkpoints("qwen3_moe")
    sized = _sized(store)
    fixed = weights.fixed_bytes(sized, F32)
    experts, expert_bytes, expert_read = _fixed_map(sized)
    top = sum(weights.dense_bytes(sized, n, Precision.INT8, F32) for n in sized.dense_items())
    budget = fixed + expert_bytes + top  # room for every dense matrix at int8
    free = {k[1]: p for k, p in allocate(_dense_options(sized), budget - fixed - expert_bytes).items()}
    plan, _, shares = weights.plan_dense(sized, budget, F32, expert_plan=experts)
    assert plan == free  # no cap: the error-optimal allocation
    assert shares["read"] == fixed + _dense_read(sized, plan) + expert_read
    cap = fixed + expert_read + _dense_read(sized, free) * 2 // 3
    capped, _, shares = weights.plan_dense(sized, budget, F32, expert_plan=experts, read_budget=cap)
    used = sum(weights.dense_bytes(sized, n, p, F32) for n, p in capped.items())
    assert fixed + expert_bytes + used <= budget and shares["dense"] == used
    assert fixed + _dense_read(sized, capped) + expert_read == shares["read"] <= cap
    assert sum(p.bits for p in capped.values()) < sum(p.bits for p in free.values())
    # nothing is left on the table: no single matrix can go to a better option within both budgets
    items = sized.dense_items()
    for n, p in capped.items():
        now = (weights.dense_bytes(sized, n, p, F32), sized.dense_error(n, p))
        for q in LADDER:
            b, err = weights.dense_bytes(sized, n, q, F32), sized.dense_error(n, q)
            extra_read = (b - now[0]) * (items[n]["role"] != "embedding")
            if err < now[1] and b > now[0]:
                assert fixed + expert_bytes + used + b - now[0] > budget or shares["read"] + extra_read > cap, (n, q)


def test_the_joint_allocation_under_a_read_budget(checkpoints):
    _, store = checkpoints("qwen3_moe")
    sized = _sized(store)
    fixed = weights.fixed_bytes(sized, F32)
    g = torch.Generator().manual_seed(0)
    hot = {layer: torch.rand(sized.num_experts, generator=g, dtype=torch.float64) for layer in sized.layers}
    k = sized.manifest["config"]["num_experts_per_tok"]
    budget = fixed + sum(weights.dense_bytes(sized, n, Precision.INT8, F32) for n in sized.dense_items()) \
        + sum(sized.expert_bytes(layer, e, Precision.INT4) for layer in sized.layers for e in range(sized.num_experts))
    free_plan, free_left, free_shares = weights.plan_dense(sized, budget, F32, hotness=hot)
    cap = fixed + (free_shares["read"] - fixed) * 3 // 4
    plan, left, shares = weights.plan_dense(sized, budget, F32, hotness=hot, read_budget=cap)
    assert fixed + shares["dense"] + left == budget and free_shares["dense"] + free_left + fixed == budget
    assert shares["read"] <= cap < free_shares["read"] and plan != free_plan
    # the experts' reads are the rest: resident bytes x k x their share of the layer's routed mass, at most every
    # expert's largest option at its share
    expert_max = sum(max(sized.expert_bytes(layer, e, p) for p in LADDER) * k * float(hot[layer][e] / hot[layer].sum())
                     for layer in sized.layers for e in range(sized.num_experts))
    assert fixed + _dense_read(sized, plan) <= shares["read"] <= fixed + _dense_read(sized, plan) + expert_max + 1


def test_a_read_budget_below_the_minimum_is_refused_naming_it(checkpoints):
    _, store = checkpoints("qwen3_moe")
    sized = _sized(store)
    fixed = weights.fixed_bytes(sized, F32)
    experts, expert_bytes, expert_read = _fixed_map(sized)
    budget = fixed + expert_bytes + sum(weights.dense_bytes(sized, n, Precision.INT8, F32) for n in sized.dense_items())
    least = fixed + expert_read + sum(min(b for b, _, _ in o) for key, o in _dense_options(sized).items()
                                      if sized.dense_items()[key[1]]["role"] != "embedding")
    with pytest.raises(UserError, match="minimum --read-budget"):
        weights.plan_dense(sized, budget, F32, expert_plan=experts, read_budget=least - 1)
    plan, _, shares = weights.plan_dense(sized, budget, F32, expert_plan=experts, read_budget=least)
    assert shares["read"] <= least


def test_read_budget_needs_a_weight_budget(bundled_store):
    with pytest.raises(UserError, match="--read-budget caps the plan of every weight"):
        dynaexq.load(bundled_store, "uniform:int4", read_budget="1MiB", progress=False)


def test_the_capped_plan_spends_what_the_lagrangian_leaves():
    """A head whose upgrade is worth more per byte than the attention's: mu high enough to keep the head low
    also pushes the attention down, leaving reads unspent; the plan must take the attention's upgrade back.
    Against the exhaustive optimum of this small case."""
    import itertools

    options = {"head": [(50, 10.0, "lo"), (100, 2.0, "hi")], "attn": [(10, 5.0, "lo"), (20, 4.5, "hi")]}
    reads = {"head": 1.0, "attn": 1.0}
    plan = weights._capped(options, 1000, reads, 105)
    best = min((sum(c for _, c, _ in combo), {k: p for k, (_, _, p) in zip(options, combo)})
               for combo in itertools.product(*options.values())
               if sum(b for b, _, _ in combo) <= 105)[1]
    assert plan == best == {"head": "lo", "attn": "hi"}
