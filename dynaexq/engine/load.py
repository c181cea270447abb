"""`load(path, policy, expert_budget) -> Engine`: a transformers model whose experts live in ExpertBanks.

1. Resolve the store: `path` is a store, or a Hugging Face checkpoint that is prepared once into a
   cache directory keyed by its fingerprint (we say so on stderr); an explicit `store=` must have been
   prepared from that very checkpoint.
2. Plan: the policy gives each (layer, expert) a precision; with `expert_budget`, a plan whose
   measured bytes exceed it is refused, naming the bytes it needs.
3. Build (engine/model.py): the transformers class of the architecture, with its `<Arch>Experts` class
   swapped for ExpertBank while `from_pretrained` runs on the store directory.
4. Publish every expert's planned version into its bank.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys
from pathlib import Path

import torch

from dynaexq.arch import get_arch
from dynaexq.config import CALIBRATION_WINDOWS, POLICY, VERIFY, WINDOW_TOKENS, RuntimeConfig
from dynaexq.engine import auto
from dynaexq.engine.calibrate import prepare_store
from dynaexq.engine.dynamic import start_runtime
from dynaexq import gguf_file
from dynaexq.engine.engine import Engine
from dynaexq.engine.model import banks_of, build_model, calibration_files, calibration_tokens, load_tokenizer
from dynaexq.errors import UserError
from dynaexq.quant.dense import apply_plan, native_floats
from dynaexq.quant.precision import DEFAULT_PRECISIONS
from dynaexq.runtime.budget import SizedReader
from dynaexq.runtime.hotness import Hotness
from dynaexq.runtime.planners import parse_policy, resolve_budget
from dynaexq.runtime.planners.weights import manual_plan, plan_dense
from dynaexq.runtime.version import make_version, slot_layout
from dynaexq.sizes import format_size, parse_size
from dynaexq.store import layout
from dynaexq.store.checkpoint import Checkpoint
from dynaexq.store.reader import StoreReader
from dynaexq.threads import check_wait_policy


def cache_root() -> Path:
    return Path(os.environ.get("DYNAEXQ_CACHE", Path.home() / ".cache" / "dynaexq"))


def resolve_store(path, store=None, progress: bool = True) -> Path:
    path = Path(path)
    if layout.is_store(path):
        return path
    ckpt = Checkpoint(path)  # raises a clear error for a missing directory / non-checkpoint
    get_arch(ckpt.config)
    fingerprint = ckpt.fingerprint()
    if store is not None:
        reader = StoreReader(store)
        if not reader.matches_source(fingerprint):
            raise UserError(f"store {str(store)!r} was prepared from {reader.manifest['source']['path']!r}, not from "
                            f"the checkpoint {str(path)!r} (config or shard headers differ); prepare this checkpoint "
                            "into its own store")
        return Path(store)
    # the store format and the default precisions are part of the key: a dynaexq that reads another format or
    # plans with another ladder prepares its own store
    digest = hashlib.sha256(json.dumps({**fingerprint, "format": layout.FORMAT_VERSION,
                                        "precisions": [p.value for p in DEFAULT_PRECISIONS]},
                                       sort_keys=True).encode()).hexdigest()[:16]
    target = cache_root() / "stores" / f"{path.resolve().name}-{digest}"
    if not layout.is_store(target):
        print(f"dynaexq: preparing {path} into the store {target} (once; later loads reuse it)", file=sys.stderr)
        prepare_store(path, target, progress=progress)
    return target


def load(path, policy=POLICY, expert_budget=None, *, store=None, device="cpu",
         backend: str | None = None, dtype: torch.dtype | None = None, verify: str = VERIFY,
         progress: bool = True, calibration=None, calibration_windows: int = CALIBRATION_WINDOWS,
         window_tokens: int = WINDOW_TOKENS,
         runtime: RuntimeConfig | None = None, dense: str = "model", threads: int | None = None,
         weight_budget=None, read_budget=None) -> Engine:
    """`policy`: "auto" (fit the machine: engine/auto.py), a static map or a runtime policy (runtime/planners).
    `expert_budget`: bytes, a size string ('20MiB') or a precision name ('int3': every expert at int3).
    Policies that rank experts by hotness (calibrated, calibrated-multilevel) load every expert at their cheapest
    precision, measure routing on the calibration texts (`calibration`: paths; default: the model's
    calibration/*.txt) and then publish their final map. Runtime policies (dynaexq, multilevel, frozen) start the
    dynamic runtime (`runtime`: its RuntimeConfig, e.g. `budget='2GiB'` for Eq. 4 on the whole model) with the
    same calibration as warm start; call `engine.close()` to stop it (and save its hotness file).
    `verify`: "lazy" (shard stamps now, each expert's digest on its first read), "full" (hash every shard now) or
    "off" (store/reader.py). `dense`: "model" (the non-expert weights in `dtype`), "int8" or "bf16" (quant/dense.py).
    `weight_budget`: bytes (or a size string, or a llama.cpp .gguf file: its tensors' bytes) for every weight
    tensor: the non-expert matrices' precisions are planned with the experts' in one budget
    (runtime/planners/weights.py), instead of `expert_budget`; `read_budget`: with it, bytes (or a size string, or
    a .gguf file: what a decode token reads of it, gguf_file.py) one decode token may read of every weight (its
    batch-1 speed); a .gguf weight budget caps the reads at its file's unless `read_budget` is given ("none": no
    cap).
    `threads`: the cores a decode step computes on (default: torch's count on the calling thread)."""
    if threads is not None and (not isinstance(threads, int) or threads < 1):
        raise UserError(f"threads must be a positive integer, got {threads!r}")
    check_wait_policy()
    engine = _load(path, policy, expert_budget, store, device, backend, dtype, verify, progress, calibration,
                   calibration_windows, window_tokens, runtime, dense, weight_budget, read_budget)
    engine.threads = threads or torch.get_num_threads()
    return engine


def check_device(device) -> torch.device:
    """`device` as a torch.device that exists on this machine, else a UserError naming what would be valid."""
    try:
        dev = torch.device(device)
    except RuntimeError:
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda"):
        raise UserError(f"--device {str(device)!r}: valid devices are cpu, cuda, cuda:N")
    if dev.type == "cuda":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n == 0:
            build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
            raise UserError(f"--device {dev}: no CUDA device is available (torch {torch.__version__}, {build}); "
                            "use --device cpu")
        if dev.index is not None and dev.index >= n:
            raise UserError(f"--device {dev}: this machine has {n} CUDA device(s), cuda:0 to cuda:{n - 1}")
    return dev


def _load(path, policy, expert_budget, store, device, backend, dtype, verify, progress, calibration,
          calibration_windows, window_tokens, runtime, dense, weight_budget, read_budget=None) -> Engine:
    device = check_device(device)
    backend = backend or ("cuda" if device.type == "cuda" else "cpu")
    reader = StoreReader(resolve_store(path, store, progress))
    reader.check(verify, progress)
    dtype_ = dtype or getattr(torch, reader.manifest["source_dtype"])  # the non-expert weights' and activations'
    sized = resident_sizes(reader, backend, dtype_, device)
    budget = resolve_budget(expert_budget, sized)  # a precision name: the bytes every expert takes resident here
    wb, rb = gguf_file.budgets(weight_budget, read_budget)  # sizes or GGUF files (a file's reads by default)
    if rb is not None and wb is None and (runtime is None or runtime.budget is None):
        raise UserError("--read-budget caps the plan of every weight: give it with --weight-budget (or --budget)")
    if wb is not None and (budget is not None or dense != "model"):
        raise UserError("--weight-budget plans every weight, the non-expert matrices included: give it alone, not with "
                        "--expert-budget (experts only) or --dense (non-expert precisions by hand)")
    if isinstance(policy, str) and policy.strip().lower() == "auto":  # fit the machine (engine/auto.py)
        policy, runtime, why = auto.choose(reader, sized, dtype_, device, budget, runtime, wb)
        if progress:
            print(f"dynaexq: policy auto -> {policy}: {why}", file=sys.stderr)
    planner = parse_policy(policy) if isinstance(policy, str) else policy
    if getattr(planner, "dynamic", False):
        planner = _usable_ladder(planner, sized)
        sized.check(planner.tiers(reader))
        engine = _load_dynamic(path, reader, sized, planner, budget, wb, device, backend, dtype, progress,
                               calibration, calibration_windows, window_tokens, runtime or RuntimeConfig(), dense, rb)
        return engine
    if runtime is not None:
        raise UserError(f"runtime options are for the runtime policies (dynaexq, multilevel, frozen), not {planner}")
    if planner.hotness_source == "eval":
        raise UserError(f"policy {planner} is an upper bound computed from the evaluated text's own routing; it "
                        "exists only in `dynaexq eval`")
    if planner.hotness_source and budget is None and wb is None:
        raise UserError(f"policy {planner} needs an expert budget (--expert-budget SIZE, or a precision such as int3 "
                        "meaning the bytes of every expert at that precision) or a --weight-budget")
    calib_files = calibration_files(path, reader, calibration) if planner.hotness_source else []
    plan = planner.floor(sized) if planner.hotness_source else planner.plan(sized, budget)
    sized.check(set(plan.values()))
    dense_plan, shares = manual_plan(reader, dense), None
    if hasattr(planner, "dense_plan"):  # a map file's "dense" section
        dense_plan = {**dense_plan, **planner.dense_plan(reader)}
    if wb is not None and not planner.hotness_source:  # a fixed expert map: the non-expert matrices get the rest
        dense_plan, _, shares = plan_dense(sized, wb, dtype_, expert_plan=plan, read_budget=rb)
    need = sum(sized.expert_bytes(layer, e, p) for (layer, e), p in plan.items())
    if budget is not None and need > budget:
        fits = [p.value for p in reader.precisions
                if sum(sized.expert_bytes(layer, e, p) for (layer, e) in plan) <= budget]
        hint = f"uniform precisions that fit: {', '.join(fits)}" if fits else "no uniform precision fits"
        raise UserError(f"policy {planner} needs {need} bytes ({format_size(need)}) of expert memory resident on "
                        f"{sized.where} but the expert budget is {budget} bytes ({format_size(budget)}); {hint}")
    engine = _empty_engine(reader, planner, device, backend, dtype, dense_plan)
    engine.sizes = sized
    engine.apply(plan, progress=progress)  # every version owns its memory; the store is unmapped after
    if calib_files:
        windows = calibration_tokens(engine.tokenizer, calib_files, calibration_windows, window_tokens)
        mass = engine.routing_mass(windows, progress=progress)
        if wb is not None:  # one allocation for the non-expert matrices and the experts
            dense_plan, budget, shares = plan_dense(sized, wb, dtype_, {k: m / windows.numel() for k, m in mass.items()},
                                                    read_budget=rb)
            apply_plan(engine.model, reader, dense_plan, backend)
        final = planner.plan(sized, budget, mass)
        sized.check(set(final.values()))
        engine.apply(final, progress=progress)
    engine.dense_plan = dense_plan
    if shares is not None and progress:
        _say_shares(wb, shares, dense_plan, "")
    return engine


def _weight_room(config: RuntimeConfig, sized, tiers) -> int:
    """--budget minus what is not weights (KV cache, activations, margin, the runtime's staging slots)."""
    total = parse_size(config.budget)
    staging = config.staging_slots * max(sized.sizes[p] for p in tiers)
    return total - parse_size(config.kv_reserve) - parse_size(config.activation_reserve) \
        - int(total * config.safety_margin) - staging


def _say_shares(wb: int, shares: dict, dense_plan: dict, experts_note: str) -> None:
    """The plan printed at start: the weight budget's three shares."""
    held = {}
    for p in dense_plan.values():
        held[p.value] = held.get(p.value, 0) + 1
    counts = ", ".join(f"{n} {p}" for p, n in sorted(held.items())) or "as loaded"
    print(f"dynaexq: weight budget {format_size(wb)} = fixed {format_size(shares['fixed'])} + non-expert matrices "
          f"{format_size(shares['dense'])} ({counts}) + experts {format_size(shares['experts'])}{experts_note}; "
          f"a decode token reads {format_size(shares['read'])}", file=sys.stderr)


def _usable_ladder(planner, sized):
    """A multilevel ladder without the precisions that take no fewer bytes than a higher one where they run
    (aten's int4 fallback, CUDA: int3/int2 are held as int4 codes), said once; other planners as they are."""
    bad = sized.dominated()
    drop = [p for p in getattr(planner, "ladder", ()) if p in bad] if getattr(planner, "kind", "") == "multilevel" else []
    if not drop:
        return planner
    if len([p for p in planner.ladder if p not in bad and p in sized.precisions]) < 2:
        sized.check(drop)  # nothing left to trade between: say why
    print(f"dynaexq: {', '.join(p.value for p in drop)} take no fewer bytes than {bad[drop[0]].value} resident on "
          f"{sized.where}: the ladder of {planner} leaves them out", file=sys.stderr)
    return dataclasses.replace(planner, ladder=tuple(p for p in planner.ladder if p not in bad))


def resident_sizes(reader, backend: str, dtype, device) -> SizedReader:
    """The store reader with each precision's size as it is resident on `device` with `backend`'s kernels: one
    version per precision laid out for real (every MoE layer's experts have the same shapes)."""
    from dynaexq.quant import lowbit_cpu

    layer, sizes, weights = reader.layers[0], {}, 0
    for p in reader.precisions:
        tensors = reader.read_expert(layer, 0, p)
        sizes[p] = slot_layout(make_version(tensors, backend, dtype, device))[1]
        weights = sum(tensors[m].shape[0] * tensors[m].shape[1] for m in ("gate_up", "down"))
    reader.close()
    where = {"cuda": f"{device} (tinygemm int4 codes for every grouped precision)", "reference": "the reference "
             "backend"}.get(backend) or ("the CPU (native low-bit kernel)" if lowbit_cpu.extension() is not None else
                                         "the CPU (aten's int4 kernel: the native low-bit kernel is not built)")
    return SizedReader(reader, sizes, where, weights)


def _load_dynamic(path, reader, sized, planner, budget, wb, device, backend, dtype, progress, calibration,
                  calibration_windows, window_tokens, config: RuntimeConfig, dense: str = "model",
                  read_budget: int | None = None) -> Engine:
    if budget is None and config.budget is None and wb is None:
        raise UserError(f"policy {planner} needs a memory budget: --budget SIZE (the whole model, DynaExq Eq. 4), "
                        "--weight-budget SIZE (every weight) or --expert-budget SIZE / a precision name such as int3 "
                        "(expert weights only)")
    hot_file = config.hotness_file and Path(config.hotness_file).is_file()
    warm_files = None if hot_file else calibration_files(path, reader, calibration)
    engine = _empty_engine(reader, planner, device, backend, dtype, manual_plan(reader, dense))
    engine.sizes = sized
    measured = {}

    def calibrate(floor):  # DynaExq's warm start: the model in all-low mode, mean routed mass per token
        if "hot" not in measured:
            engine.apply(floor, progress=progress)
            windows = calibration_tokens(engine.tokenizer, warm_files, calibration_windows, window_tokens)
            mass = engine.routing_mass(windows, progress=progress)
            measured["hot"] = {layer: m / windows.numel() for layer, m in mass.items()}
        return measured["hot"]

    whole = wb is None and budget is None and config.budget is not None and bool(reader.dense_items())
    if whole:
        wb = _weight_room(config, sized, planner.tiers(reader))  # --budget spends on the same plan
    if wb is not None:  # the non-expert matrices' share first (one allocation with the experts), fixed from now on
        if hot_file:
            h = Hotness(reader.layers, reader.num_experts)
            h.load(config.hotness_file)
            hot = h.snapshot()
        else:
            hot = calibrate(planner.floor(sized))
        engine.dense_plan, budget, shares = plan_dense(sized, wb, engine.dtype, hot, read_budget=read_budget)
        if whole:  # Eq. 4 measures the model as it now is: the experts get what --budget leaves
            budget = None
        apply_plan(engine.model, reader, engine.dense_plan, backend)
        if progress:
            _say_shares(wb, shares, engine.dense_plan, " (the runtime's)")
    start_runtime(engine, planner, budget, config, calibrate if warm_files else None, progress)
    return engine


def _empty_engine(reader, planner, device, backend, dtype, dense_plan: dict) -> Engine:
    """The model built on the store with an ExpertBank per MoE layer, no expert published yet, its non-expert
    matrices at `dense_plan` ({module name: Precision}; the others as loaded)."""
    arch = get_arch(reader.manifest["config"])
    dtype = dtype or getattr(torch, reader.manifest["source_dtype"])
    model = build_model(reader.path, arch, dtype, device)
    if dense_plan and device.type != "cpu" and backend == "cpu":
        raise UserError(f"the non-expert matrices' kernels run where the model runs; {device} with the cpu backend")
    apply_plan(model, reader, dense_plan, backend)
    if backend == "cpu" and device.type == "cpu":
        native_floats(model)  # every float linear left on the native kernel at decode's few rows
    banks = banks_of(model)
    assert sorted(banks) == sorted(reader.layers), (sorted(banks), reader.layers)
    return Engine(model=model, tokenizer=load_tokenizer(reader.path), reader=reader, banks=banks,
                  policy=str(planner), plan={}, backend=backend, dtype=dtype, dense_plan=dict(dense_plan))
