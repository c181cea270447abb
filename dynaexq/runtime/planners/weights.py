"""One budget for every weight: the non-expert matrices and the experts in one allocation.

`--weight-budget SIZE` is the bytes of every weight tensor the model holds (what a GGUF file's tensors weigh, so a
user can ask for "the size of that Q4_K_M file"). Three parts: the *fixed* weights kept as they are (norms,
routers, biases, matrices no kernel takes; `fixed_bytes`), the *dense* items of store/dense.py (attention and
MLA projections, shared experts, dense MLPs, the output head, the embedding), and the *experts*.
`plan_dense(...)` decides the dense items' precisions:
  - with expert hotness (the budget-filling policies: calibrated-multilevel, calibrated, the runtime ones),
    dense items and experts share one greedy allocation (calibrated.allocate): each option costs
    hotness x output_error**power, where a dense item's hotness is 1 (every token reads it) and an expert's its
    routed probability mass per token, and output errors are on one scale (StoreReader.output_error /
    dense_error); whether a dense matrix goes below int8 is the measurement's call;
  - with a fixed expert map (uniform, map), the dense items share what the experts leave;
  - when not even every expert at its smallest precision fits (the runtime's offload regime: the experts become
    a cache), the dense items get a share of the room in proportion to their full size against the experts'
    smallest, and the experts' cache the rest.
With `read_budget` (`--read-budget SIZE`: the bytes one decode token may read of every weight, what a GGUF's
tensors but the embedding's give with the experts at top-k / E: batch-1 decode is bound by them) the plan is also
capped in what a token reads: every token reads every dense matrix (but an untied embedding, of which it reads a
row), the fixed weights, and per MoE layer its top-k experts (an expert's read share: k x its routed mass / the
layer's); each option's cost gains mu x the bytes it adds to a token's reads and mu is bisected until the plan
fits (the budget the dense matrices then leave goes to the experts). Without it the plan is the error-optimal one,
which on a large model reads more per token than a file of the same size quantized by llama.cpp's recipes (at
Q4_K_M's bytes on the 30B-shaped checkpoint: bf16 attention + an int8 head, 520 against 376 MiB), and on a small one
with a large vocabulary is the better for it (capped at a Q4_K_M file's reads, the bundled model's KL at that
file's bytes went from 0.00062 to 0.00092: README, bench/peer_llamacpp.py).
It returns the dense plan and the expert budget left (the policy then plans its experts, or the runtime switches
them, within it). Sizes are the bytes resident where the model runs (runtime/budget.SizedReader's measured
ratio to the store's bytes). `manual_plan` is `--dense P`: every attention/MLP linear at P, head and embedding kept.
"""
from __future__ import annotations

import heapq

import torch
from safetensors import safe_open

from dynaexq.errors import UserError
from dynaexq.quant.precision import Precision
from dynaexq.runtime.planners.calibrated import LADDER, allocate
from dynaexq.sizes import format_size
from dynaexq.store import layout


def manual_plan(reader, dense: str) -> dict:
    """--dense int8|bf16: every linear item but the output head at that precision; "model": none."""
    if dense == "model":
        return {}
    p = Precision(dense)
    return {name: p for name, it in reader.dense_items().items() if it["role"] == "linear" and "lm_head" not in name}


def fixed_bytes(reader, dtype: torch.dtype) -> int:
    """Bytes of the non-expert tensors that are not dense items (norms, routers, biases...), in `dtype` when
    floating point."""
    items = reader.dense_items()
    total = 0
    with safe_open(str(reader.path / layout.NONEXPERT_SHARD), "pt") as f:
        for key in f.keys():
            if key.removesuffix(".weight") in items and key.endswith(".weight"):
                continue
            sl = f.get_slice(key)
            numel = 1
            for d in sl.get_shape():
                numel *= d
            src = getattr(torch, {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}.get(sl.get_dtype(), "uint8"))
            total += numel * (dtype.itemsize if src.is_floating_point else src.itemsize)
    return total


def dense_bytes(sized, name: str, p: Precision, dtype: torch.dtype) -> int:
    """Resident bytes of dense item `name` at `p`: the model's own dtype is the module itself; otherwise the
    store's bytes times the ratio measured on the experts (SizedReader) for that precision."""
    it = sized.dense_items()[name]
    if p.is_float and p.dtype == dtype:
        return it["shape"][0] * it["shape"][1] * dtype.itemsize
    layer = sized.layers[0]
    ratio = sized.sizes[p] / sized._reader.expert_bytes(layer, 0, p)
    return int(sized.dense_bytes(name, p) * ratio)


def top_k(sized) -> int:
    config = sized.manifest["config"]
    return int(config.get("num_experts_per_tok") or config.get("experts_per_token") or 1)


def _capped(options: dict, room: int, reads: dict, limit: int) -> dict:
    """allocate(options, room) reading at most `limit` bytes per token ({key: share of its bytes a token reads}):
    each option's cost + mu x its bytes read, mu the smallest (bisected) that meets the limit."""
    def plan_at(mu):
        priced = {k: [(b, c + mu * b * reads[k], p) for b, c, p in o] for k, o in options.items()}
        plan = allocate(priced, room)
        return plan, sum(reads[k] * next(b for b, _, p in options[k] if p == plan[k]) for k in plan)

    plan, read = plan_at(0.0)
    if read <= limit:
        return plan
    hi = max((c for o in options.values() for _, c, _ in o), default=1.0) / max(limit, 1) or 1e-30
    for _ in range(200):  # grow mu until the reads fit (or nothing is left to shed)
        plan, read = plan_at(hi)
        if read <= limit:
            break
        hi *= 4
    lo = hi / 4
    for _ in range(24):
        mid = (lo * hi) ** 0.5
        got, r = plan_at(mid)
        if r <= limit:
            hi, plan = mid, got
        else:
            lo = mid
    return _fill(options, plan, room, reads, limit)


def _fill(options: dict, plan: dict, room: int, reads: dict, limit: int) -> dict:
    """The Lagrangian plan sits on the convex hull and can leave much of both budgets unspent (measured: a head
    pushed from int8 to int4 took the attention down with it, 275 of 376 MiB read): take upgrades that still fit
    both budgets, the largest cost reduction per share of the budgets left (at the start) first, each item's in
    byte order."""
    plan = dict(plan)
    size = {key: {q: (b, c) for b, c, q in o} for key, o in options.items()}
    used = sum(size[k][p][0] for k, p in plan.items())
    read = sum(reads[k] * size[k][p][0] for k, p in plan.items())
    scale_b, scale_r = max(1, room - used), max(1.0, limit - read)

    def push(heap, key):
        b0, c0 = size[key][plan[key]]
        ups = [(b, c, q) for b, c, q in sorted(options[key], key=lambda o: o[0]) if b > b0 and c < c0]
        if ups:
            b, c, q = ups[0]
            heapq.heappush(heap, (-(c0 - c) / ((b - b0) / scale_b + reads[key] * (b - b0) / scale_r), id(key), key, q))

    heap = []
    for key in plan:
        push(heap, key)
    while heap:
        _, _, key, q = heapq.heappop(heap)
        db = size[key][q][0] - size[key][plan[key]][0]
        if used + db <= room and read + reads[key] * db <= limit:
            plan[key], used, read = q, used + db, read + reads[key] * db
            push(heap, key)
    return plan


def plan_dense(sized, weight_budget: int, dtype: torch.dtype, hotness: dict | None = None,
               expert_plan: dict | None = None, ladder=LADDER, power: float = 2.0,
               read_budget: int | None = None) -> tuple[dict, int, dict]:
    """-> (dense plan {name: Precision}, the expert budget left, {"fixed", "dense", "experts", "read"} bytes
    planned, "read" being what one decode token reads: the fixed weights, the dense matrices and the experts as
    this allocation (or the fixed map) holds them).
    `hotness`: {layer: routed mass per token [E]} (joint allocation); else `expert_plan` is kept as it is."""
    items = sized.dense_items()
    if not items:
        raise UserError(f"store {str(sized.path)!r} holds no quantized non-expert matrices (prepared by an older "
                        "dynaexq?); prepare the checkpoint again to plan --weight-budget")
    fixed = fixed_bytes(sized, dtype)
    ladder = [p for p in ladder if p in sized.precisions and p not in sized.dominated()]
    options = {("dense", name): [(dense_bytes(sized, name, p, dtype), sized.dense_error(name, p) ** power, p)
                                 for p in ladder] for name in items}
    reads = {("dense", name): float(it["role"] != "embedding") for name, it in items.items()}
    k, expert_read = top_k(sized), 0  # expert_read: what a token reads of experts outside this allocation
    limit = None if read_budget is None else read_budget - fixed  # the fixed weights are read by every token
    if hotness is not None:
        mean = sum(float(h) for layer in sized.layers for h in hotness[layer]) / max(1, len(hotness) * sized.num_experts)
        for layer in sized.layers:
            for e in range(sized.num_experts):
                hot = max(float(hotness[layer][e]), 1e-6 * mean + 1e-30)
                options[(layer, e)] = [(sized.expert_bytes(layer, e, p), hot * sized.output_error(layer, e, p) ** power, p)
                                       for p in ladder]
            total = float(sum(hotness[layer])) or 1.0
            reads.update({(layer, e): k * float(hotness[layer][e]) / total for e in range(sized.num_experts)})
        room = weight_budget - fixed
    else:
        experts = sum(sized.expert_bytes(layer, e, p) for (layer, e), p in expert_plan.items())
        room = weight_budget - fixed - experts
        expert_read = experts * k // sized.num_experts
        limit = None if limit is None else limit - expert_read
    low = sum(min(b for b, _, _ in o) for o in options.values())
    if hotness is not None and room < low:
        # not even every expert at its smallest precision fits: the experts become a cache (the runtime's offload
        # regime); the non-expert matrices, read by every token, take a share in proportion to their full size
        dense_top = sum(max(b for b, _, _ in options[("dense", n)]) for n in items)
        floor = sum(min(b for b, _, _ in o) for k, o in options.items() if k[0] != "dense")
        options = {key: o for key, o in options.items() if key[0] == "dense"}
        room = int(room * dense_top / (dense_top + floor))
        expert_read = floor * k // sized.num_experts
        limit = None if limit is None else limit - expert_read
        low = sum(min(b for b, _, _ in o) for o in options.values())
    if room < low:
        cheapest = fixed + low + (0 if hotness is not None else experts)
        raise UserError(f"--weight-budget {format_size(weight_budget)} cannot hold the model: the weights kept as they "
                        f"are take {format_size(fixed)}, and every matrix at its smallest precision "
                        + ("with the experts' map " if hotness is None else "")
                        + f"needs {format_size(cheapest)} in all; the minimum --weight-budget is {format_size(cheapest)}")
    if limit is not None:
        least = sum(reads[key] * min(b for b, _, _ in o) for key, o in options.items())
        if limit < least:
            need = read_budget - limit + int(least)
            raise UserError(f"--read-budget {format_size(read_budget)} is below what a decode token reads with every "
                            f"matrix at its smallest precision: the minimum --read-budget is {format_size(need)}")
    plan = allocate(options, room) if limit is None else _capped(options, room, reads, limit)
    dense = {name: plan[("dense", name)] for name in items}
    dense_total = sum(dense_bytes(sized, name, p, dtype) for name, p in dense.items())
    read = sum(reads[key] * next(b for b, _, p in options[key] if p == plan[key]) for key in plan)
    shares = {"fixed": fixed, "dense": dense_total, "experts": weight_budget - fixed - dense_total,
              "read": fixed + int(read) + expert_read}
    return dense, weight_budget - fixed - dense_total, shares
