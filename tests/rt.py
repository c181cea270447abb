"""Test helpers for the dynamic runtime on a tiny Qwen3-MoE (2 MoE layers x 8 experts)."""
import torch

from dynaexq.engine.dynamic import start_runtime
from dynaexq.runtime.controller import RuntimeConfig
from dynaexq.runtime.planners import parse_policy, resolve_budget


def start(engine, spec="dynaexq:hi=int8,lo=int2", budget="int4", warm=None, **cfg):
    """Start the runtime on the engine (int4 bytes: 2 of 8 experts per layer fit at int8, the rest at int2)."""
    engine.close()
    rt = start_runtime(engine, parse_policy(spec), resolve_budget(budget, engine.reader), RuntimeConfig(**cfg),
                       (lambda floor: warm) if warm is not None else None, progress=False)
    assert engine.runtime is rt
    return rt


def random_stats(engine, g, tokens=16):
    E = engine.reader.num_experts
    return {layer: (tokens, torch.rand(E, generator=g) ** 4 * tokens) for layer in engine.banks}


def published(engine):
    return {(layer, e): v.precision for layer, b in engine.banks.items() for e, v in enumerate(b.versions)}
