"""Hand the plan dynaexq learns to the engines that run one precision per tensor: llama.cpp and SGLang.

No cluster engine runs different precisions for the experts of one layer, but two accept what dynaexq learns:
  - llama.cpp's `llama-quantize --tensor-type-file FILE` (tools/quantize/quantize.cpp): whitespace-separated
    `PATTERN=TYPE` entries, PATTERN a regular expression searched in each tensor's (lower-cased) GGUF name, the
    first match wins, TYPE a ggml type name. `llama_cpp_plan` gives every MoE layer's expert tensors
    (`blk.L.ffn_{gate,up,down}_exps.weight`, one tensor per projection holding all of the layer's experts) one
    ggml type, chosen at a byte target the way calibrated-multilevel chooses precisions (runtime/planners/
    calibrated.py `allocate`: the largest drop of sum over the layer's experts of hotness x output error**2 per
    byte, on each layer's lower hull), from the store's measured errors of the formats with the same bits
    (int8 -> q8_0, int4 -> q4_K, int3 -> q3_K, int2 -> q2_K, bf16 -> bf16). A projection whose rows are not a
    multiple of a k-quant's 256-block gets the type llama-quantize itself falls back to (q2_K, q3_K -> q4_0;
    q4_K -> q5_0), written out so that the file says what the GGUF will hold and the bytes are its bytes.
  - SGLang's `--init-expert-location FILE.json` (srt/eplb/expert_location.py): {"logical_count": [num_hidden_layers
    x num_experts]} tokens per expert, from which its EPLB places and replicates experts across GPUs; layers
    without experts are rows of zeros.
The hotness comes from a `--hotness-file` (the live EMA of routed mass) or a recorded routing trace (the routed
mass; for SGLang the routed token slots).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from dynaexq.errors import UserError
from dynaexq.quant.precision import Precision
from dynaexq.sizes import format_size
from dynaexq.store.layout import atomic_write

# dynaexq precision -> (ggml type, bits per weight, block size along a row)
GGML = {Precision.BF16: ("bf16", 16.0, 1), Precision.INT8: ("q8_0", 8.5, 32), Precision.INT6: ("q6_K", 6.5625, 256),
        Precision.INT4: ("q4_K", 4.5, 256), Precision.INT3: ("q3_K", 3.4375, 256), Precision.INT2: ("q2_K", 2.625, 256)}
FALLBACK = {"q2_K": ("q4_0", 4.5, 32), "q3_K": ("q4_0", 4.5, 32), "q4_K": ("q5_0", 5.5, 32),
            "q6_K": ("q8_0", 8.5, 32)}  # llama-quant.cpp
PROJECTIONS = ("gate", "up", "down")


def routing_mass(reader, hotness=None, trace=None) -> dict:
    """{MoE layer: float64 [E]} from a --hotness-file or a routing trace (its summed gate weights)."""
    if (hotness is None) == (trace is None):
        raise UserError("give the hotness as --hotness FILE (a --hotness-file written by a run) or --trace FILE.npz "
                        "(a recorded routing trace), one of them")
    if hotness is not None:
        from dynaexq.runtime.hotness import Hotness
        h = Hotness(reader.layers, reader.num_experts)
        h.load(hotness)
        return {layer: s.numpy() for layer, s in h.snapshot().items()}
    t = _trace_for(reader, trace)
    mass = {}
    for i, layer in enumerate(t.layers):
        ids, w = t.experts[:, i].reshape(-1), np.nan_to_num(t.weights[:, i].reshape(-1))
        mass[layer] = np.bincount(ids[ids >= 0], weights=w[ids >= 0], minlength=t.num_experts).astype(np.float64)
    return mass


def _trace_for(reader, path):
    from dynaexq.trace import import_trace
    t = import_trace(path)
    if sorted(t.layers) != sorted(reader.layers) or t.num_experts != reader.num_experts:
        raise UserError(f"trace {str(path)!r} routes MoE layers {t.layers} x {t.num_experts} experts; this model has "
                        f"layers {reader.layers} x {reader.num_experts}: it was recorded on another model")
    return t


def projection_shapes(reader) -> dict:
    """{"gate" | "up" | "down": (rows, cols)} of one expert: GGUF's ne1 x ne0 (cols = the input dimension)."""
    w = reader.read_expert(reader.layers[0], 0, reader.precisions[0])
    (n2, h), (h2, i) = w["gate_up"].shape, w["down"].shape
    assert n2 == 2 * i and h2 == h, (w["gate_up"].shape, w["down"].shape)
    return {"gate": (i, h), "up": (i, h), "down": (h, i)}


def ggml_type(p: Precision, cols: int) -> tuple[str, float]:
    """(the ggml type a projection with `cols`-long rows gets for precision p, its bits per weight)."""
    name, bpw, block = GGML[p]
    if cols % block:
        name, bpw, block = FALLBACK[name]
    if cols % block:
        raise UserError(f"rows of {cols} weights fit no block-quantized ggml type for {p.value}")
    return name, bpw


def layer_options(reader, mass: dict, shapes: dict) -> dict:
    """{layer: [(GGUF bytes of its expert tensors, hotness x output error**2 summed over its experts, precision)]}."""
    E, out = reader.num_experts, {}
    for layer in reader.layers:
        opts = []
        for p in (q for q in reader.precisions if q in GGML):
            cost = sum(float(mass[layer][e]) * reader.output_error(layer, e, p) ** 2 for e in range(E))
            opts.append((_layer_bytes(E, shapes, p), cost, p))
        out[layer] = opts
    return out


def llama_cpp_plan(reader, mass: dict, budget) -> dict:
    """{layer: Precision} within `budget` bytes of expert tensors (an int, or a Precision: every layer at it)."""
    from dynaexq.runtime.planners.calibrated import allocate
    shapes = projection_shapes(reader)
    options = layer_options(reader, mass, shapes)
    if isinstance(budget, Precision):
        if budget not in GGML or budget not in reader.precisions:
            raise UserError(f"--size {budget.value}: the store has no such experts or llama.cpp no matching type")
        budget = sum(b for opts in options.values() for b, _, p in opts if p == budget)
    low = sum(min(b for b, _, _ in opts) for opts in options.values())
    if budget < low:
        raise UserError(f"--size {format_size(budget)} is below the smallest plan: every MoE layer's experts at the "
                        f"cheapest type take {format_size(low)} ({low} bytes)")
    return allocate(options, budget)


def _layer_bytes(E: int, shapes: dict, p: Precision) -> int:
    """Bytes of one MoE layer's three expert tensors at the ggml types of precision p."""
    return int(sum(E * r * c * ggml_type(p, c)[1] / 8 for r, c in shapes.values()))


def plan_bytes(reader, plan: dict) -> int:
    """Bytes of the expert tensors of a GGUF quantized by `plan` ({layer: Precision})."""
    shapes = projection_shapes(reader)
    return sum(_layer_bytes(reader.num_experts, shapes, p) for p in plan.values())


def tensor_types(reader, plan: dict) -> dict:
    """{GGUF tensor name: ggml type} of every expert tensor under `plan`."""
    shapes = projection_shapes(reader)
    return {f"blk.{layer}.ffn_{proj}_exps.weight": ggml_type(p, shapes[proj][1])[0]
            for layer, p in sorted(plan.items()) for proj in PROJECTIONS}


def write_tensor_type_file(path, types: dict) -> Path:
    """One `^name$=type` entry per line (the name's dots escaped: each pattern matches its own tensor only)."""
    lines = [f"^{name.replace('.', chr(92) + '.')}$={t}" for name, t in types.items()]
    atomic_write(Path(path), lambda tmp: Path(tmp).write_text("\n".join(lines) + "\n"))
    return Path(path)


def sglang_logical_count(reader, hotness=None, trace=None) -> list:
    """[num_hidden_layers][num_experts]: routed token slots per expert (a trace) or routed mass per token (a hotness
    file); layers without experts are zeros."""
    if (hotness is None) == (trace is None):
        raise UserError("give --hotness FILE or --trace FILE.npz, one of them")
    n_layers = int(reader.manifest["config"]["num_hidden_layers"])
    rows = [[0] * reader.num_experts for _ in range(n_layers)]
    if trace is not None:
        t = _trace_for(reader, trace)
        for i, layer in enumerate(t.layers):
            ids = t.experts[:, i].reshape(-1)
            rows[layer] = np.bincount(ids[ids >= 0], minlength=t.num_experts).tolist()
    else:
        for layer, s in routing_mass(reader, hotness=hotness).items():
            rows[layer] = [float(x) for x in s]
    return rows


def write_sglang(path, rows: list) -> Path:
    atomic_write(Path(path), lambda tmp: Path(tmp).write_text(json.dumps({"logical_count": rows})))
    return Path(path)
