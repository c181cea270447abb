"""Planners turn what is known (store sizes and errors, routing statistics) into a precision map.

Static planners give one map; dynamic ones (`dynamic = True`: dynaexq, multilevel, frozen) give slot counts and
re-decide which experts hold them while the model runs (runtime/planners/dynamic.py). A planner never touches bytes: `plan(reader, budget=None, hotness=None)` returns {(layer, expert): Precision}
and the loader or the runtime's residency (runtime/residency.py) makes it so. Planners whose `hotness_source` is
not None need routing statistics ({layer: routed mass [E]}) from that kind of text. `parse_policy(spec)` is the one registry.
"""
from __future__ import annotations


from dynaexq.errors import UserError
from dynaexq.quant.precision import Precision
from dynaexq.runtime.planners.calibrated import MultilevelPlanner, TwoTierPlanner
from dynaexq.runtime.planners.dynamic import DynamicPlanner
from dynaexq.runtime.planners.offload import HotPolicy, LruPolicy
from dynaexq.runtime.planners.static import MapPlanner, UniformPlanner
from dynaexq.sizes import parse_size

PLANNERS = {
    "uniform": UniformPlanner.from_arg,
    "map": MapPlanner.from_arg,
    "calibrated": TwoTierPlanner.from_arg,
    "calibrated-multilevel": MultilevelPlanner.from_arg,
    "oracle": lambda arg: (TwoTierPlanner.from_arg(arg, "eval") if "hi=" in arg or "lo=" in arg
                           else MultilevelPlanner.from_arg(arg, "eval")),
    "dynaexq": lambda arg: DynamicPlanner.from_arg("dynaexq", arg),
    "multilevel": lambda arg: DynamicPlanner.from_arg("multilevel", arg),
    "frozen": lambda arg: DynamicPlanner.from_arg("frozen", arg),
    "lru-offload": lambda arg: LruPolicy.from_arg(arg, prefetch=False),
    "lru-offload+prefetch": lambda arg: LruPolicy.from_arg(arg, prefetch=True),
}
VALID = ("auto (load, generate, serve: fit the machine), uniform:<precision> (e.g. uniform:int4), map:<file.json>, calibrated[:hi=int8,lo=int2], "
         "calibrated-multilevel[:ladder=bf16/int8/int6/int4/int3/int2,power=2], oracle[:hi=..,lo=..] (eval only); "
         "runtime policies: dynaexq[:hi=int8,lo=int2,delta=0.01,alloc=proportional|depth,max_pairs=0,hi_share=0,"
         "prefetch=0], multilevel[:ladder=..,power=2,delta=0.01], frozen[:hi=int8,lo=int2]; offload baselines: "
         "lru-offload[:int4], lru-offload+prefetch[:int4]")


def parse_policy(spec: str):
    name, _, arg = spec.partition(":")
    make = PLANNERS.get(name.strip().lower())
    if make is None:
        raise UserError(f"unknown policy {spec!r}; valid policies are: {VALID}")
    return make(arg)


def parse_budget(spec) -> int | Precision | None:
    """'20MiB' / 123456 -> bytes; 'int3' -> Precision (the bytes of every expert at it, see resolve_budget)."""
    if spec is None or isinstance(spec, (int, Precision)):
        return spec
    try:
        return Precision(str(spec).strip().lower())
    except ValueError:
        pass
    try:
        return parse_size(spec)
    except UserError as err:
        raise UserError(f"{err}; an expert budget may also be a precision name such as int3 (the bytes of every "
                        f"expert at that precision): {', '.join(p.value for p in Precision)}") from None


def resolve_budget(spec, reader) -> int | None:
    spec = parse_budget(spec)
    if isinstance(spec, Precision):
        if spec not in reader.precisions:
            raise UserError(f"expert budget {spec.value!r}: the store holds no {spec.value} experts "
                            f"(it has {', '.join(p.value for p in reader.precisions)})")
        return sum(reader.expert_bytes(layer, e, spec) for layer in reader.layers for e in range(reader.num_experts))
    return spec


__all__ = ["PLANNERS", "parse_policy", "parse_budget", "resolve_budget", "UniformPlanner", "MapPlanner",
           "TwoTierPlanner", "MultilevelPlanner", "DynamicPlanner",
           "HotPolicy", "LruPolicy"]
