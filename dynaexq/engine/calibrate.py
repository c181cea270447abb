"""Calibrated `prepare`: quantize each expert against the inputs it really sees, in one streaming forward pass.

`prepare_store(src, out, precisions, calibration, windows, window_tokens)`:
  1. the calibration text (`calibration`: [NAME=]FILE..., default the model's calibration/*.txt, else dynaexq's
     own corpus, dynaexq/bundled/dxq-moe-mini/calibration) is cut into `windows` windows of `window_tokens`;
  2. store.prepare.PrepareJob copies the non-expert weights, and the transformers model is built on them with an
     ExpertBank per MoE layer and no expert resident;
  3. one forward of all windows in float32 (up to the output head's input: no logits): each non-expert matrix is
     quantized at every precision when the pass reaches it, against the second moment of its input
     (store/dense.py); when it reaches MoE layer l, that layer's bank hands the pass to
     `_LayerCalibrator`, which reads the layer's experts from the source (once), computes the layer's output with
     them, and the per-token second moments of each expert's two inputs, H_x = E[x x^T] over the tokens routed to
     it (gate_up's input) and H_h = E[h h^T] (down's input, h = act(gate_up x)), each pooled with the layer's
     mean as POOL pseudo-tokens (so an expert that sees few or no tokens gets the layer's statistics: never
     zero, never NaN); then the job quantizes and writes the layer (GPTQ against them) and the source experts
     are dropped. Memory: one layer of source experts, one expert's statistics at a time, one matrix's input
     moment, the activations of the calibration batch.
A checkpoint without a tokenizer (or `calibration=["none"]`) is prepared without calibration (weight error),
and it says so.
"""
from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import torch

from dynaexq.arch import get_arch
from dynaexq.config import CALIBRATION_WINDOWS, WINDOW_TOKENS
from dynaexq.engine.model import banks_of, build_model, calibration_files, calibration_tokens, load_tokenizer
from dynaexq.errors import UserError
from dynaexq.quant.precision import DEFAULT_PRECISIONS
from dynaexq.store.prepare import PrepareJob, prepare

POOL = 64  # pseudo-tokens of the layer's mean statistics added to each expert's own


class _Done(Exception):
    """Raised after the last MoE layer: the rest of the model (and the logits) is not needed."""


class _LayerCalibrator:
    def __init__(self, job: PrepareJob):
        self.job = job

    @torch.inference_mode()
    def __call__(self, bank, hidden, top_k_index, top_k_weights):
        job, layer = self.job, bank.layer
        experts = job.read_layer(layer)
        x = hidden.reshape(-1, hidden.shape[-1]).float()  # [T, H]
        k = top_k_index.shape[-1]
        flat_e, flat_w = top_k_index.reshape(-1), top_k_weights.reshape(-1).float()
        order = torch.argsort(flat_e, stable=True)
        counts = torch.bincount(flat_e, minlength=len(experts)).tolist()
        starts = [0] + torch.tensor(counts).cumsum(0).tolist()
        tokens = [order[starts[e]:starts[e + 1]] // k for e in range(len(experts))]  # [n_e] token rows

        def run(e):  # -> (x_e [n, H], h_e [n, I], y_e [n, H]) with the source expert e in float32
            w = experts[e]
            xe = x[tokens[e]]
            g = xe @ w["gate_up"].float().T + (w["gate_up_bias"].float() if "gate_up_bias" in w else 0)
            h = bank._activate(g)
            return xe, h, h @ w["down"].float().T + (w["down_bias"].float() if "down_bias" in w else 0)

        y = torch.zeros_like(x)
        h_sum, pairs = 0.0, 0
        for e in range(len(experts)):  # the layer's output, and the mean of down's input moment
            if not counts[e]:
                continue
            _, h, ye = run(e)
            wts = flat_w[order[starts[e]:starts[e + 1]]]
            y.index_add_(0, tokens[e], ye * wts[:, None])
            h_sum = h_sum + h.T @ h  # float32 GEMMs: sums of <= 10^5 terms, accurate to ~1e-5
            pairs += counts[e]
        if not job.finished(layer):
            mean_x = x.T @ x / max(len(x), 1)  # every token reaches k experts alike
            mean_h = h_sum / max(pairs, 1) if pairs else torch.eye(experts[0]["down"].shape[1])

            def hessians(e):
                xe, h, _ = run(e)
                n = len(xe)
                return {"gate_up": (xe.T @ xe + POOL * mean_x) / (n + POOL),
                        "down": (h.T @ h + POOL * mean_h) / (n + POOL)}

            job.write_layer(layer, experts, hessians)
        del experts
        return y.view_as(hidden).to(hidden.dtype)


def calibration_text(src, given) -> list[Path]:
    """The calibration files: `given` ([NAME=]FILE...), else the model's calibration/*.txt, else dynaexq's corpus;
    [] for ["none"]."""
    if given and [str(g).lower() for g in given] == ["none"]:
        return []
    return calibration_files(src, None, given)


def prepare_store(src, out, precisions=DEFAULT_PRECISIONS, calibration=None, windows: int = CALIBRATION_WINDOWS,
                  window_tokens: int = WINDOW_TOKENS, progress: bool = True, runner=None) -> Path:
    """Checkpoint -> store, calibrated when the checkpoint has a tokenizer and calibration text is at hand.
    `runner`: where the experts' chunks are quantized (store/prepare.py `local`, or store/distributed.py)."""
    if windows < 1 or window_tokens < 2:
        raise UserError(f"--calibration-windows must be >= 1 and the window >= 2 tokens, got {windows}, "
                        f"{window_tokens}")
    files = calibration_text(src, calibration)
    tokenizer = load_tokenizer(Path(src)) if files else None
    if tokenizer is None:
        why = "--calibration none" if not files else "the checkpoint has no tokenizer"
        print(f"dynaexq: prepare without calibration ({why}): experts are quantized against their weight error",
              file=sys.stderr)
        return prepare(src, out, precisions, progress, runner)
    ids = calibration_tokens(tokenizer, files, windows, window_tokens)
    desc = {"files": [{"name": f.name, "sha256": hashlib.sha256(f.read_bytes()).hexdigest()} for f in files],
            "windows": len(ids), "window_tokens": window_tokens, "tokens": ids.numel(), "pool": POOL}
    if progress and not (Path(out) / "manifest.json").is_file():
        print(f"dynaexq: calibrating on {ids.numel()} tokens of {', '.join(f.name for f in files)}", file=sys.stderr)
    job = PrepareJob(src, out, precisions, progress, calibration=desc, runner=runner)
    if job.done:
        return job.out
    model = build_model(Path(out), get_arch(job.ckpt.config), torch.float32, torch.device("cpu"))
    banks = banks_of(model)
    calibrator = _LayerCalibrator(job)
    for bank in banks.values():
        bank.calibrator = calibrator
    hooks = _dense_hooks(model, job)
    try:
        with torch.inference_mode():
            model(input_ids=ids, use_cache=False)
    except _Done:
        pass
    finally:
        for bank in banks.values():
            bank.calibrator = None
        for h in hooks:
            h.remove()
    left = job.dense.todo()
    if left:  # modules the forward did not reach (e.g. extra prediction layers): their weight error only
        print(f"dynaexq: {len(left)} non-expert matrices were not reached by the calibration pass ({left[:3]}...); "
              "quantized against their weight error", file=sys.stderr)
        for name in left:
            job.add_dense(name)
    return job.finish()


def _dense_hooks(model, job: PrepareJob) -> list:
    """Forward pre-hooks quantizing each non-expert matrix against the second moment of its input when the pass
    reaches it (the input is shared by q/k/v: computed once); the output head's hook ends the pass (no logits)."""
    items, last = job.dense.items, {}

    def moment(x):
        # the same tensor object (q, k and v share their input): held here, so its memory cannot be freed and
        # reused by a later layer's input of the same shape (an address as the key matched such a stale moment)
        if last.get("x") is not x:
            xf = x.reshape(-1, x.shape[-1]).float()
            last.update(x=x, H=xf.T @ xf / max(len(xf), 1))  # float32 GEMM over the calibration tokens
        return last["H"]

    hooks = []
    head = model.get_output_embeddings()
    for name, it in items.items():
        if it["role"] == "embedding" and not job.dense.finished(name):
            job.add_dense(name)  # read by rows: no input to weigh
        elif it["role"] == "linear" and not job.dense.finished(name) and model.get_submodule(name) is not head:
            hooks.append(model.get_submodule(name).register_forward_pre_hook(
                lambda m, args, name=name: job.add_dense(name, moment(args[0]))))
    head_items = [n for n, it in items.items() if it["role"] == "tied" or (it["role"] == "linear" and
                                                                          model.get_submodule(n) is head)]

    def end(m, args):
        for name in head_items:
            job.add_dense(name, moment(args[0]))
        raise _Done

    if head is not None:
        hooks.append(head.register_forward_pre_hook(end))
    return hooks
