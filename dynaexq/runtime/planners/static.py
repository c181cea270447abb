"""Static planners: the precision map is fixed at load time.

uniform:<precision>  every routed expert alike (static quantization, the baseline)
map:<file.json>      explicit precisions:
                     {"default": "int4", "layers": {"3": "int8", "5": {"0": "bf16", "7": "int2"}},
                      "dense": {"model.layers.0.self_attn.q_proj": "int8", "lm_head": "int4"}}
                     a layer maps to one precision or to {expert: precision}; unnamed ones get "default"
                     (required unless every expert is named); "dense" (optional) sets non-expert matrices by
                     module name (`dynaexq inspect` lists them; the others stay as loaded).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from dynaexq.errors import UserError
from dynaexq.quant.precision import Precision

PrecisionMap = dict[tuple[int, int], Precision]


@dataclass(frozen=True)
class UniformPlanner:
    precision: Precision
    hotness_source = None

    @classmethod
    def from_arg(cls, arg: str):
        if not arg:
            raise UserError("policy 'uniform' needs a precision, e.g. uniform:int4")
        return cls(Precision.parse(arg))

    def plan(self, reader, budget: int | None = None, hotness=None) -> PrecisionMap:
        return {(layer, e): self.precision for layer in reader.layers for e in range(reader.num_experts)}

    def __str__(self):
        return f"uniform:{self.precision.value}"


@dataclass(frozen=True)
class MapPlanner:
    path: str
    spec: dict
    hotness_source = None

    @classmethod
    def from_arg(cls, arg: str):
        p = Path(arg)
        if not arg or not p.is_file():
            raise UserError(f"precision map file {arg!r} does not exist; give map:<file.json>")
        try:
            spec = json.loads(p.read_text())
        except json.JSONDecodeError as err:
            raise UserError(f"precision map {arg!r} is not valid JSON ({err})") from None
        if not isinstance(spec, dict) or not isinstance(spec.get("layers", {}), dict):
            raise UserError(f"precision map {arg!r} must be an object like "
                            '{"default": "int4", "layers": {"3": "int8", "5": {"0": "bf16"}}}')
        return cls(arg, spec)

    def plan(self, reader, budget: int | None = None, hotness=None) -> PrecisionMap:
        default = self.spec.get("default")
        out: PrecisionMap = {}
        layers = self.spec.get("layers", {})
        for key in layers:
            if not str(key).isdigit() or int(key) not in reader.layers:
                raise UserError(f"precision map {self.path!r} names layer {key!r}, which is not a MoE layer "
                                f"(MoE layers: {reader.layers})")
        for layer in reader.layers:
            entry = layers.get(str(layer), default)
            for e in range(reader.num_experts):
                value = entry.get(str(e), default) if isinstance(entry, dict) else entry
                if value is None:
                    raise UserError(f"precision map {self.path!r} gives no precision for layer {layer} expert {e} "
                                    'and has no "default"')
                out[(layer, e)] = Precision.parse(value)
            if isinstance(entry, dict):
                bad = [k for k in entry if not str(k).isdigit() or int(k) >= reader.num_experts]
                if bad:
                    raise UserError(f"precision map {self.path!r} names expert(s) {bad} in layer {layer}; experts "
                                    f"are 0..{reader.num_experts - 1}")
        return out

    def dense_plan(self, reader) -> dict:
        """{non-expert matrix: Precision} of the map's "dense" section (empty without one)."""
        given, items = self.spec.get("dense", {}), reader.dense_items()
        if not isinstance(given, dict):
            raise UserError(f'precision map {self.path!r}: "dense" must map module names to precisions')
        bad = sorted(set(given) - set(items))
        if bad:
            raise UserError(f"precision map {self.path!r} names {bad[:3]}, not quantizable non-expert matrices of this "
                            f"store; they are: {', '.join(sorted(items)[:6])}{', ...' if len(items) > 6 else ''}")
        return {name: Precision.parse(p) for name, p in given.items()}

    def __str__(self):
        return f"map:{self.path}"
