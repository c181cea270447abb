"""Planners turn what is known (store sizes and errors; later routing statistics) into a precision map.

A planner never touches bytes: it returns {(layer, expert): Precision} and the loader or the
transition engine makes it so. `parse_policy("uniform:int4")` is the one registry of policies.
"""
from __future__ import annotations

from dynaexq.errors import UserError
from dynaexq.runtime.planners.static import MapPlanner, UniformPlanner

PLANNERS = {"uniform": UniformPlanner, "map": MapPlanner}


def parse_policy(spec: str):
    name, _, arg = spec.partition(":")
    cls = PLANNERS.get(name.strip().lower())
    if cls is None:
        raise UserError(f"unknown policy {spec!r}; valid policies are: uniform:<precision> (e.g. uniform:int4) "
                        "and map:<file.json> (explicit precision per layer and expert)")
    return cls.from_arg(arg)


__all__ = ["PLANNERS", "parse_policy", "UniformPlanner", "MapPlanner"]
