"""dynaexq: serve Hugging Face Mixture-of-Experts models with each expert's precision as a runtime resource.

    import dynaexq
    engine = dynaexq.load("path/to/checkpoint-or-store", policy="uniform:int4", expert_budget="2GiB")
    engine.model(input_ids).logits

Nothing heavy happens at import time.
"""
from __future__ import annotations

__version__ = "0.1.0"

from dynaexq.config import POLICY  # noqa: E402  (light: the defaults)
from dynaexq.errors import UserError  # noqa: E402  (light: the error every user-fixable problem raises)


def load(path, policy=POLICY, expert_budget=None, **kwargs):
    """Load a checkpoint directory (prepared into a cached store on first use) or a store -> Engine.

    policy: "auto" (default: the checkpoint's own precision when the whole model fits the memory the machine can
    give now, else the multilevel runtime within it; see dynaexq/engine/auto.py), a static map such as
    "uniform:int4", or a runtime policy such as "multilevel" (README: Policies).

    expert_budget: bytes (int), a size string such as "20GiB", or a precision name such as "int3" (the bytes of
    every expert at int3); a plan needing more is refused. Keyword arguments: store, device, backend ("cpu" |
    "cuda" | "reference"), dtype, verify, progress, calibration (text files for the calibrated policies).
    """
    from dynaexq.engine.load import load as _load

    return _load(path, policy, expert_budget, **kwargs)


def prepare(checkpoint, out, **kwargs):
    """Checkpoint directory -> expert store, exactly as `dynaexq prepare` makes it: every expert at every precision,
    quantized (GPTQ) against the inputs routed to it on calibration text when the checkpoint has a tokenizer.
    Keyword arguments: precisions (default bf16, int8, int4, int3, int2), calibration (text files; default the
    model's calibration/*.txt, else dynaexq's own corpus; ["none"]: against the weight error only), windows
    (of 256 calibration tokens, default 128), progress. Resumes an interrupted prepare; returns the store path."""
    from dynaexq.engine.calibrate import prepare_store

    return prepare_store(checkpoint, out, **kwargs)


__all__ = ["load", "prepare", "UserError", "__version__"]
