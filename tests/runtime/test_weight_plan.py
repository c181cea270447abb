"""The one allocation for every weight (runtime/planners/weights.py): the budget holds, and a plan never reads per
decode token more than a file with every planned weight at the budget's mean bits per weight would."""
import torch

from dynaexq.engine.load import resident_sizes
from dynaexq.quant.precision import Precision
from dynaexq.runtime.planners import weights
from dynaexq.runtime.planners.calibrated import LADDER, allocate
from dynaexq.store.reader import StoreReader


def _sized(store):
    return resident_sizes(StoreReader(store), "cpu", torch.float32, torch.device("cpu"))


def _limit_by_hand(sized, budget, fixed):
    """The cap from the shapes: (budget - fixed) x (weights a token reads) / (every planned weight)."""
    items = sized.dense_items()
    config = sized.manifest["config"]
    per_expert = sum(r * c for r, c in sized.manifest["shapes"].values())
    n_layers = len(sized.layers)
    every = sum(i["shape"][0] * i["shape"][1] for i in items.values()) + n_layers * sized.num_experts * per_expert
    read = sum(i["shape"][0] * i["shape"][1] for i in items.values() if i["role"] != "embedding") \
        + n_layers * config["num_experts_per_tok"] * per_expert
    return (budget - fixed) * read / every


def _dense_read(sized, plan):
    items = sized.dense_items()
    return sum(weights.dense_bytes(sized, n, p, torch.float32) for n, p in plan.items() if items[n]["role"] != "embedding")


def test_a_fixed_expert_map_leaves_the_dense_matrices_what_a_token_may_read(checkpoints):
    _, store = checkpoints("qwen3_moe")
    sized = _sized(store)
    fixed = weights.fixed_bytes(sized, torch.float32)
    experts = {(layer, e): Precision.INT4 for layer in sized.layers for e in range(sized.num_experts)}
    expert_bytes = sum(sized.expert_bytes(layer, e, p) for (layer, e), p in experts.items())
    k = sized.manifest["config"]["num_experts_per_tok"]
    items = sized.dense_items()
    top = sum(weights.dense_bytes(sized, n, Precision.INT8, torch.float32) for n in items)
    budget = fixed + expert_bytes + top  # room for every dense matrix at int8
    plan, left, shares = weights.plan_dense(sized, budget, torch.float32, expert_plan=experts)
    used = sum(weights.dense_bytes(sized, n, p, torch.float32) for n, p in plan.items())
    assert fixed + expert_bytes + used <= budget and shares["dense"] == used
    limit = _limit_by_hand(sized, budget, fixed) - expert_bytes * k / sized.num_experts
    assert _dense_read(sized, plan) <= limit + 1
    assert shares["read"] == _dense_read(sized, plan) + expert_bytes * k // sized.num_experts
    # the cap bites here: the error-optimal plan alone would read more
    options = {n: [(weights.dense_bytes(sized, n, p, torch.float32), sized.dense_error(n, p) ** 2, p)
                   for p in (Precision.INT8, Precision.INT4, Precision.INT3, Precision.INT2)] for n in items}
    free = allocate(options, budget - fixed - expert_bytes)
    assert _dense_read(sized, free) > limit
    # and where it does not bite, the plan is the error-optimal one
    loose, _, _ = weights.plan_dense(sized, fixed + expert_bytes + used // 3, torch.float32, expert_plan=experts)
    alone = allocate(options, used // 3)
    if _dense_read(sized, alone) <= _limit_by_hand(sized, fixed + expert_bytes + used // 3, fixed) \
            - expert_bytes * k / sized.num_experts:
        assert loose == alone


def test_the_joint_allocation_reads_no_more_than_the_cap_with_the_experts(checkpoints):
    _, store = checkpoints("qwen3_moe")
    sized = _sized(store)
    fixed = weights.fixed_bytes(sized, torch.float32)
    g = torch.Generator().manual_seed(0)
    hot = {layer: torch.rand(sized.num_experts, generator=g, dtype=torch.float64) for layer in sized.layers}
    k = sized.manifest["config"]["num_experts_per_tok"]
    full = fixed + sum(weights.dense_bytes(sized, n, Precision.INT8, torch.float32) for n in sized.dense_items()) \
        + sum(sized.expert_bytes(layer, e, Precision.INT8) for layer in sized.layers for e in range(sized.num_experts))
    bit = 0
    for budget in (int(full * 0.45), int(full * 0.7)):
        plan, left, shares = weights.plan_dense(sized, budget, torch.float32, hotness=hot)
        assert fixed + shares["dense"] + left == budget and left > 0
        assert shares["read"] <= _limit_by_hand(sized, budget, fixed) + 1
        # the error-optimal allocation of the same options, without the cap
        options = {("dense", n): [(weights.dense_bytes(sized, n, p, torch.float32), sized.dense_error(n, p) ** 2, p)
                                  for p in LADDER] for n in sized.dense_items()}
        for layer in sized.layers:
            for e in range(sized.num_experts):
                options[(layer, e)] = [(sized.expert_bytes(layer, e, p), float(hot[layer][e])
                                        * sized.output_error(layer, e, p) ** 2, p) for p in LADDER]
        free = allocate(options, budget - fixed)
        share = {(layer, e): k * float(hot[layer][e] / hot[layer].sum()) for layer in sized.layers
                 for e in range(sized.num_experts)}
        read = sum(next(b for b, _, p in o if p == free[key]) * (share[key] if key[0] != "dense" else
                   float(sized.dense_items()[key[1]]["role"] != "embedding")) for key, o in options.items())
        if read > _limit_by_hand(sized, budget, fixed) + 1:
            bit += 1
            assert plan != {key[1]: p for key, p in free.items() if key[0] == "dense"}
        else:
            assert plan == {key[1]: p for key, p in free.items() if key[0] == "dense"}
    assert bit  # at least one budget where the cap changes the plan
