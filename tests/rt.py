"""Test helpers for the dynamic runtime on a tiny Qwen3-MoE (2 MoE layers x 8 experts)."""
import torch

from dynaexq.config import RuntimeConfig
from dynaexq.engine.dynamic import measure, start_runtime
from dynaexq.quant.precision import Precision as P
from dynaexq.runtime.planners import parse_policy, resolve_budget


def two_hot(engine) -> int:
    """The expert bytes of 2 experts per layer at int8 and the other 6 at int2 (measured slot sizes)."""
    slots = measure(engine, parse_policy("dynaexq:hi=int8,lo=int2"), 1 << 40, RuntimeConfig())[0]
    return sum(2 * slots[(layer, P.INT8)] + 6 * slots[(layer, P.INT2)] for layer in engine.reader.layers)


def start(engine, spec="dynaexq:hi=int8,lo=int2", budget=None, warm=None, **cfg):
    """Start the runtime on the engine (default budget: 2 of 8 experts per layer fit at int8, the rest at int2)."""
    engine.close()
    budget = two_hot(engine) if budget is None else resolve_budget(budget, engine.reader)
    rt = start_runtime(engine, parse_policy(spec), budget, RuntimeConfig(**cfg),
                       (lambda floor: warm) if warm is not None else None, progress=False)
    assert engine.runtime is rt
    return rt


def random_stats(engine, g, tokens=16):
    E = engine.reader.num_experts
    return {layer: (tokens, torch.rand(E, generator=g) ** 4 * tokens) for layer in engine.banks}


def published(engine):
    return {(layer, e): v.precision for layer, b in engine.banks.items() for e, v in enumerate(b.versions)}
