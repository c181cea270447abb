"""Quality at a memory budget: every policy against the full-precision model, on the same token windows.

The model is loaded once with its experts at the reference precision (the checkpoint's own dtype) and its
other weights and activations in `dtype` (default float32: exact for bf16/fp16 weights, and 3.5x faster than
bf16 matmuls on CPUs without native bf16; expert kernels keep their own compute dtype); its next-token
log-probabilities on every window are kept (in a temporary memory-mapped file, so a large vocabulary does not
need RAM) together with its routing (the oracle's hotness). Each policy x budget is then planned, published
into the same engine (only the experts whose precision changes are re-read from the store) and run on the same
windows: perplexity, mean KL(reference || policy) per token and top-1 agreement per domain, plus the expert
bytes actually resident afterwards (measured on the published versions).
Runtime policies (dynaexq, multilevel, frozen, the offload baselines) start the runtime on the same engine
(warm-started from the calibration texts, as `load` does) and stream each window in steps of `step_tokens` with a
KV cache, each chunk one engine step (`engine.run`: the controller steps after it), as in decoding and serving;
their transitions run live and each window is scored on whatever the runtime had published when it read it.
"""
from __future__ import annotations

import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from transformers import DynamicCache

from dynaexq import gguf_file
from dynaexq.config import CALIBRATION_WINDOWS, EVAL_WINDOWS, VERIFY, WINDOW_TOKENS, RuntimeConfig
from dynaexq.engine.dynamic import start_runtime, stop_runtime
from dynaexq.engine.engine import read_text, text_windows
from dynaexq.engine.kv_cache import SlotCache
from dynaexq.engine.load import load, resident_sizes, resolve_store
from dynaexq.engine.model import calibration_files, calibration_tokens, load_tokenizer
from dynaexq.errors import UserError
from dynaexq.quant.dense import apply_plan, restore
from dynaexq.runtime.planners import parse_budget, parse_policy, resolve_budget
from dynaexq.runtime.planners.weights import manual_plan, plan_dense
from dynaexq.store.reader import StoreReader

DEFAULT_POLICIES = ("uniform:int8", "uniform:int4", "uniform:int3", "uniform:int2")
HOTNESS_POLICIES = ("calibrated", "calibrated-multilevel", "oracle")
STEP_TOKENS = 32  # runtime policies: tokens per streamed step (one controller step each)


def budgeted(planner) -> bool:
    """Whether the policy runs at each --expert-budget (hotness and runtime policies) or at its own size."""
    return bool(planner.hotness_source or getattr(planner, "dynamic", False))


def stream_logits(engine, x: torch.Tensor, step_tokens: int) -> torch.Tensor:
    """x [B, T] through the model in steps of `step_tokens` with a preallocated KV cache (the logits equal one
    forward of the whole window), the controller stepping after each -> logits [B, T, V]."""
    config, chunks = engine.model.config, []
    slots = SlotCache.supports(config)
    cache = SlotCache(config, x.shape[0], x.shape[1]) if slots else DynamicCache(config=config)
    for s in range(0, x.shape[1], step_tokens):
        chunk = x[:, s:s + step_tokens]
        if slots:
            cache.select(0, x.shape[0], chunk.shape[1])
        chunks.append(engine.run(input_ids=chunk, past_key_values=cache, use_cache=True).logits)
        if slots:
            cache.advance(chunk.shape[1])
    return torch.cat(chunks, 1)


def parse_data(specs, model_dir: Path, subdir: str = "eval") -> dict[str, Path]:
    """['code=FILE', 'FILE'] -> {name: path}; none -> the model's own <subdir>/*.txt."""
    if not specs:
        files = sorted((Path(model_dir) / subdir).glob("*.txt"))
        if not files:
            raise UserError(f"the model at {str(model_dir)!r} ships no {subdir}/*.txt texts; give --data NAME=FILE")
        return {f.stem: f for f in files}
    out = {}
    for spec in specs:
        name, eq, file = spec.partition("=")
        name, file = (name, file) if eq else (Path(spec).stem, spec)
        if not name or not file:
            raise UserError(f"--data {spec!r}: write NAME=FILE (e.g. code=src.txt) or just FILE")
        path = Path(file)
        if not path.is_file():
            raise UserError(f"--data {spec!r}: {file!r} is not a file; give a UTF-8 text file")
        if name in out:
            raise UserError(f"--data: the name {name!r} is given twice; names must be unique")
        out[name] = path
    return out


class Evaluation:
    """A loaded engine plus the reference outputs on the given windows; `run(policy, budget)` -> one result."""

    def __init__(self, model, data: dict[str, Path], windows: int = EVAL_WINDOWS, window_tokens: int = WINDOW_TOKENS,
                 calibration=None, calibration_windows: int = CALIBRATION_WINDOWS, batch: int = 8,
                 progress: bool = True, store=None, dtype: torch.dtype | None = torch.float32, verify: str = VERIFY,
                 dense: str = "model", device="cpu", record_routing=None):
        if windows <= 0 or window_tokens < 2 or calibration_windows <= 0:
            raise UserError(f"--windows and --calibration-windows must be >= 1 and --window-tokens >= 2 (got "
                            f"{windows}, {calibration_windows}, {window_tokens})")
        self.model_path, self.batch, self.progress = Path(model), batch, progress
        store_dir = resolve_store(model, store, progress)
        reader = StoreReader(store_dir)
        held = {p.value: p for p in reader.precisions}  # reference: the checkpoint's own dtype, else the widest
        self.ref = held.get(reader.manifest["source_dtype"]) or max(reader.precisions, key=lambda p: p.bits)
        reader.close()
        self.calibration_files = calibration
        self.calibration_windows = calibration_windows
        tokenizer = load_tokenizer(store_dir)  # windows first: a bad text fails before the model loads
        self.windows = {name: text_windows(tokenizer, read_text(path), windows, window_tokens, f"--data {name} ({path})")
                        for name, path in data.items()}
        self.engine = load(model, f"uniform:{self.ref.value}", store=store_dir, progress=progress, dtype=dtype,
                           verify=verify, device=device)
        self.reader = self.engine.reader
        self.sized = resident_sizes(self.reader, self.engine.backend, self.engine.dtype, self.engine.model.device)
        self.reference_bytes = self.engine.expert_bytes()
        self.reference_weight_bytes = self.engine.weight_bytes()
        short = {n: len(w) for n, w in self.windows.items() if len(w) < windows}
        if short:
            print(f"dynaexq eval: text too short for {windows} windows of {window_tokens} tokens, using fewer: {short}",
                  file=sys.stderr)
        self._tmp = tempfile.TemporaryDirectory(prefix="dynaexq-eval-")
        self._batches = 0
        self.ref_logp, self.ref_stats = {}, {}
        self.engine.take_routing_stats()
        if record_routing is not None:  # the reference pass's routing: the model's own on every eval window
            self.engine.record_routing(record_routing)
        for name, w in self.windows.items():
            self.ref_logp[name] = []
            self.ref_stats[name] = self._score(w, ref=None, store=self.ref_logp[name], desc=f"reference {name}")
        if record_routing is not None:
            print(f"dynaexq eval: wrote the reference routing to {self.engine.stop_recording()}", file=sys.stderr)
        self.eval_hotness = {layer: mass.double().cpu() for layer, (_, mass) in self.engine.take_routing_stats().items()}
        self.dense = dense  # the reference keeps the dense weights in `dtype`; every policy runs with these
        self.dense_plan = manual_plan(self.reader, dense)
        apply_plan(self.engine.model, self.reader, self.dense_plan)
        self._calib_hotness, self._ref_hotness, self.calibration_token_counts = {}, {}, {}

    def calibration_texts(self) -> dict[str, Path]:
        return calibration_texts(self.model_path, self.reader, self.calibration_files)

    def calibration_hotness(self, floor: dict, text: str | None = None) -> dict:
        """Routed mass on the calibration texts (all of them, or only the one named `text`) with the model at
        `floor` (the planner's cheapest map, exactly as `load` measures it), cached per floor and text; the
        tokens it was measured on are in `calibration_token_counts[text]`."""
        texts = self.calibration_texts()
        if text is not None and text not in texts:
            raise UserError(f"no calibration text named {text!r}; the calibration texts are {', '.join(texts)} "
                            "(give others with --calibration NAME=FILE)")
        key = (text, tuple(sorted((k, p.value) for k, p in floor.items())))
        if key not in self._calib_hotness:
            files = list(texts.values()) if text is None else [texts[text]]
            w = calibration_tokens(self.engine.tokenizer, files, self.calibration_windows,
                                   next(iter(self.windows.values())).shape[1])
            self.engine.apply(floor)
            self._calib_hotness[key] = self.engine.routing_mass(w, self.batch, progress=self.progress)
            self.calibration_token_counts[text] = w.numel()
        return self._calib_hotness[key]

    def reference_hotness(self, name: str, idx: list) -> dict:
        """Routed mass of the windows `idx` of domain `name` with every expert at the reference precision (the
        oracle's routing, restricted to those windows), cached."""
        key = (name, tuple(idx))
        if key not in self._ref_hotness:
            self.engine.apply({(layer, e): self.ref for layer in self.reader.layers
                               for e in range(self.reader.num_experts)})
            self._ref_hotness[key] = self.engine.routing_mass(self.windows[name][idx], self.batch)
        return self._ref_hotness[key]

    @torch.inference_mode()
    def _score(self, windows: torch.Tensor, ref, store=None, desc: str = "", step_tokens: int | None = None) -> dict:
        nll = kl = agree = 0.0
        count = 0
        device = self.engine.model.device
        for i in tqdm(range(0, len(windows), self.batch), desc=desc, leave=False, disable=not self.progress):
            x = windows[i:i + self.batch].to(device)
            logits = (stream_logits(self.engine, x, step_tokens) if step_tokens else
                      self.engine.model(input_ids=x).logits)
            if self.engine.recorder is not None:  # each window one sequence, its rows in token order
                rows = [(desc, i + b) for b in range(x.shape[0])]
                self.engine.recorder.step([r for r in rows for _ in range(x.shape[1])], phase=0)
            logp = F.log_softmax(logits[:, :-1].float(), dim=-1).cpu()
            target = x[:, 1:].cpu()
            nll += -logp.gather(-1, target[..., None]).sum().item()
            count += target.numel()
            if store is not None:  # one memory-mapped .npy per batch: a large vocabulary needs no RAM
                path = Path(self._tmp.name) / f"{self._batches}.npy"
                self._batches += 1
                np.save(path, logp.numpy())
                store.append(np.load(path, mmap_mode="r"))
            if ref is not None:
                r = torch.from_numpy(np.array(ref[i // self.batch]))
                kl += (r.exp() * (r - logp)).sum().item()
                agree += (r.argmax(-1) == logp.argmax(-1)).sum().item()
        out = {"ppl": math.exp(nll / count)}
        if ref is not None:
            out.update(kl=kl / count, top1=agree / count)
        return out

    def run(self, policy: str, budget=None, config: RuntimeConfig | None = None,
            step_tokens: int = STEP_TOKENS, weight_budget=None, read_budget=None) -> dict:
        """One policy at an expert budget, or at a weight budget (every weight: the non-expert matrices are planned
        with the experts, runtime/planners/weights.py, and put back to the reference's after the run)."""
        planner = parse_policy(policy)
        wb, rb = gguf_file.budgets(weight_budget, read_budget)  # sizes or GGUF files (a file's reads by default)
        if rb is not None and wb is None:
            raise UserError("--read-budget caps the plan of every weight: give it with --weight-budget")
        budget_bytes = resolve_budget(budget, self.sized)
        swapped, dense_plan = {}, self.dense_plan
        if wb is not None:
            if self.dense_plan:
                raise UserError("--weight-budget plans the non-expert matrices itself; leave --dense at model")
            if planner.hotness_source == "calibration" or getattr(planner, "dynamic", False):
                floor = planner.floor(self.sized)
                hot = {k: m / self.calibration_token_counts[None] for k, m in self.calibration_hotness(floor).items()}
                dense_plan, budget_bytes, _ = plan_dense(self.sized, wb, self.engine.dtype, hot, read_budget=rb)
            elif planner.hotness_source == "eval":
                total = sum(self.windows[n].numel() for n in self.windows)
                hot = {k: m / total for k, m in self.eval_hotness.items()}
                dense_plan, budget_bytes, _ = plan_dense(self.sized, wb, self.engine.dtype, hot, read_budget=rb)
            else:
                dense_plan, _, _ = plan_dense(self.sized, wb, self.engine.dtype,
                                              expert_plan=planner.plan(self.sized, None), read_budget=rb)
            swapped = apply_plan(self.engine.model, self.reader, dense_plan)
        try:
            if getattr(planner, "dynamic", False):
                out = self._run_runtime(planner, budget_bytes, config or RuntimeConfig(), step_tokens)
            else:
                out = self._run_static(planner, budget_bytes)
        finally:
            restore(self.engine.model, swapped)
        counts = {}
        for p in dense_plan.values():
            counts[p.value] = counts.get(p.value, 0) + 1
        return {**out, "weight_budget": wb, "read_budget": rb, "dense_precisions": counts}

    def _run_static(self, planner, budget_bytes) -> dict:
        hotness = None
        if planner.hotness_source == "calibration":
            hotness = self.calibration_hotness(planner.floor(self.reader))
        elif planner.hotness_source == "eval":
            hotness = self.eval_hotness
        t0 = time.perf_counter()
        plan = planner.plan(self.sized, budget_bytes, hotness)
        self.sized.check(set(plan.values()))
        if planner.hotness_source is None and budget_bytes is not None:
            need = sum(self.sized.expert_bytes(layer, e, p) for (layer, e), p in plan.items())
            if need > budget_bytes:
                raise UserError(f"policy {planner} needs {need} expert bytes, over the budget {budget_bytes}")
        self.engine.apply(plan)
        t1 = time.perf_counter()
        domains = {name: self._score(w, self.ref_logp[name], desc=f"{planner} {name}")
                   for name, w in self.windows.items()}
        counts = {}
        for p in plan.values():
            counts[p.value] = counts.get(p.value, 0) + 1
        return {"policy": str(planner), "budget": budget_bytes, "expert_bytes": self.engine.expert_bytes(),
                "weight_bytes": self.engine.weight_bytes(), "precisions": counts, "domains": domains,
                "mean_kl": sum(d["kl"] for d in domains.values()) / len(domains),
                "seconds": {"publish": round(t1 - t0, 3), "eval": round(time.perf_counter() - t1, 3)}}

    def _run_runtime(self, planner, budget_bytes, config: RuntimeConfig, step_tokens: int) -> dict:
        """A runtime policy: started on this engine (warm start: the calibration texts, measured at the
        planner's floor as `load` does), every domain streamed with the controller live, then stopped."""
        if step_tokens < 1:
            raise UserError(f"--step-tokens must be >= 1, got {step_tokens}")

        def calibrate(floor):
            mass = self.calibration_hotness(floor)
            return {layer: m / self.calibration_token_counts[None] for layer, m in mass.items()}

        t0 = time.perf_counter()
        rt = start_runtime(self.engine, planner, budget_bytes, config, calibrate, progress=False)
        try:
            t1 = time.perf_counter()
            domains = {name: self._score(w, self.ref_logp[name], desc=f"{planner} {name}", step_tokens=step_tokens)
                       for name, w in self.windows.items()}
            s = rt.stats()
            counts = {}
            for lst in s["published"].values():
                for p in lst:
                    counts[p] = counts.get(p, 0) + 1
            return {"policy": str(planner), "budget": budget_bytes, "expert_bytes": self.engine.expert_bytes(),
                    "weight_bytes": self.engine.weight_bytes(), "precisions": counts, "domains": domains,
                    "mean_kl": sum(d["kl"] for d in domains.values()) / len(domains),
                    "runtime": {"step_tokens": step_tokens, "decisions": s["decisions"],
                                "transitions": {k: s["transitions"][k] for k in ("pairs", "bytes_moved", "failures")},
                                "offload": {k: s["offload"].get(k, 0) for k in ("hits", "misses", "hit_rate")}
                                if s["offload"] is not None else None},
                    "seconds": {"publish": round(t1 - t0, 3), "eval": round(time.perf_counter() - t1, 3)}}
        finally:
            stop_runtime(self.engine, rt)

    def report(self, results: list) -> dict:
        """The JSON report of `dynaexq eval` around these results."""
        return {"model": str(self.model_path), "reference_policy": f"uniform:{self.ref.value}", "dense": self.dense,
                "reference_expert_bytes": self.reference_bytes, "reference_weight_bytes": self.reference_weight_bytes,
                "windows": {n: list(w.shape) for n, w in self.windows.items()},
                "reference": {name: dict(s) for name, s in self.ref_stats.items()}, "results": results}

    def close(self):
        self.ref_logp.clear()
        self._tmp.cleanup()


def calibration_texts(model, reader, given) -> dict[str, Path]:
    """{name: file} of the calibration texts (--calibration NAME=FILE or FILE, else the model's own)."""
    files = calibration_files(model, reader, given)
    return {(s.partition("=")[0] if "=" in s and not Path(s).is_file() else f.stem): f
            for s, f in zip(given or [str(f) for f in files], files)}


def check_plans(model, planners, budgets, store=None, weight_budgets=()) -> Path:
    """Fail before any heavy work: resolve the store, then plan every policy x budget once with flat hotness
    (budget parsing, minimum budgets, ladders the store lacks). Returns the store directory."""
    store_dir = resolve_store(model, store)
    reader = StoreReader(store_dir)
    flat = {layer: torch.ones(reader.num_experts, dtype=torch.float64) for layer in reader.layers}
    for wb in weight_budgets:
        gguf_file.weight_budget(wb)
    if weight_budgets and not reader.dense_items():
        raise UserError(f"store {str(store_dir)!r} holds no quantized non-expert matrices; prepare the checkpoint "
                        "again to evaluate at --weight-budget")
    for pl in planners:
        if budgeted(pl) and not budgets and not weight_budgets:
            raise UserError(f"policy {pl} needs --expert-budget (a size such as 20MiB, or a precision such as int3)")
        if getattr(pl, "dynamic", False):
            for b in budgets:
                resolve_budget(b, reader)  # the runtime checks its minimum when it starts
            continue
        for b in (budgets if pl.hotness_source else [None]):
            pl.plan(reader, resolve_budget(b, reader), flat if pl.hotness_source else None)
    reader.close()
    return store_dir


def evaluate(model, data=None, policies=None, budgets=None, windows=EVAL_WINDOWS, window_tokens=WINDOW_TOKENS,
             calibration=None, calibration_windows=CALIBRATION_WINDOWS, progress=True, store=None, dtype=torch.float32,
             verify=VERIFY,
             dense: str = "model", config: RuntimeConfig | None = None, step_tokens: int = STEP_TOKENS,
             device="cpu", weight_budgets=None, read_budget=None, record_routing=None) -> dict:
    """The whole `dynaexq eval`: every policy (x expert budget, for hotness and runtime policies; x weight budget,
    for every policy, each capped at `read_budget` when given) -> the JSON report."""
    budgets = [parse_budget(b) for b in (budgets or [])]
    weight_budgets = list(weight_budgets or [])
    if read_budget is not None and gguf_file.read_budget(read_budget) is not None and not weight_budgets:
        raise UserError("--read-budget caps the plan of every weight: give it with --weight-budget")
    policies = list(policies) if policies else list(DEFAULT_POLICIES) + (
        list(HOTNESS_POLICIES) if budgets or weight_budgets else [])
    planners = [parse_policy(p) for p in policies]  # bad specs fail before any work
    data = parse_data(data, _model_dir(model))
    store = check_plans(model, planners, budgets, store, weight_budgets)
    ev = Evaluation(model, data, windows, window_tokens, calibration, calibration_windows, progress=progress,
                    store=store, dtype=dtype, verify=verify, dense=dense, device=device, record_routing=record_routing)
    try:
        results = []
        for spec, pl in zip(policies, planners):
            if not weight_budgets or budgets:
                for b in (budgets if budgeted(pl) else [None]):
                    results.append(ev.run(spec, b, config, step_tokens))
            for wb in weight_budgets:
                results.append(ev.run(spec, None, config, step_tokens, wb, read_budget))
        return ev.report(results)
    finally:
        ev.close()


def _model_dir(model) -> Path:
    from dynaexq.store import layout
    path = Path(model)
    if layout.is_store(path):
        return Path(StoreReader(path).manifest["source"]["path"])
    return path
