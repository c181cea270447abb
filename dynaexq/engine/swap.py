"""A model's modules of given classes given a new forward in place, once each: how dynaexq runs its native RMSNorm
(engine/norm.py), router top-k (engine/router.py) and decode attention block (engine/attention.py) inside
transformers' own module tree."""
from __future__ import annotations

import functools


def swap_forward(model, classes, forward) -> int:
    """Each module of `model` whose class name is in `classes` and that still has its class's forward gets
    `forward(module, its original forward, *args, **kwargs)` as its forward -> how many were swapped."""
    n = 0
    for m in model.modules():
        if type(m).__name__ in classes and "forward" not in vars(m):
            m.forward = functools.partial(forward, m, m.forward)
            n += 1
    return n
