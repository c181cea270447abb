"""Calibrated `prepare`: quantize each expert against the inputs it really sees, in one streaming pass.

`prepare_store(src, out, precisions, calibration, windows, window_tokens)`:
  1. the calibration text (`calibration`: [NAME=]FILE..., default the model's calibration/*.txt, else dynaexq's
     own corpus, dynaexq/bundled/dxq-moe-mini/calibration) is cut into `windows` windows of `window_tokens`;
  2. store.prepare.PrepareJob copies the non-expert weights, and the transformers model is built on them with an
     ExpertBank per MoE layer and no expert resident;
  3. one pass over all windows in float32, decoder layer by decoder layer (GPTQ's sequential scheme, `_calibrate`;
     the model is built in the source's 16-bit dtype and each layer upcast only while it runs, `_in_float32`):
     the hidden states of every window are kept between layers, and each layer runs on chunks of CHUNK_TOKENS
     tokens. Each non-expert matrix is quantized at every precision once its layer's chunks have passed, against
     the second moment of its input (store/dense.py; the head's: the final norm's output, no logits are
     computed). An MoE layer's bank hands each chunk to `_LayerCalibrator`, which reads the routed experts from
     the source, computes the chunk's output with them, and keeps its inputs; after the layer's last chunk
     come the per-token second moments of each expert's two inputs, H_x = E[x x^T] over the tokens routed to it
     (gate_up's input) and H_h = E[h h^T] (down's input, h = act(gate_up x)), each pooled with the layer's mean
     as POOL pseudo-tokens (so an expert that sees few or no tokens gets the layer's statistics: never zero,
     never NaN); the job quantizes and writes the layer (GPTQ against them).
     Memory: the hidden states and one MoE layer's expert inputs of every token, one chunk's activations, one
     layer's weights in float32 (a forward of every window at once held 5.5 GiB for 32 k tokens of the 30B
     shape).
A checkpoint without a tokenizer (or `calibration=["none"]`) is prepared without calibration (weight error),
and it says so.
"""
from __future__ import annotations

import contextlib
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
CHUNK_TOKENS = 4096  # calibration tokens through a layer at once: bounds the activations the pass holds


class _Done(Exception):
    """Raised where a pass has what it needs: the rest of the model (and the logits) is not run."""


class _LayerCalibrator:
    """The MoE layers' part of the pass. Called by a layer's bank with one chunk of windows at a time: computes the
    chunk's output with the layer's source experts (store.prepare.LayerExperts: each read when a chunk routes to
    it) and keeps the chunk's inputs and routing; `finish()` after the layer's last chunk quantizes and writes the
    layer against every token's statistics."""

    def __init__(self, job: PrepareJob):
        self.job, self.layer = job, None

    @torch.inference_mode()
    def __call__(self, bank, hidden, top_k_index, top_k_weights):
        if self.layer != bank.layer:
            self.finish()
            self.layer, self.bank, self.experts = bank.layer, bank, self.job.read_layer(bank.layer)
            self.xs, self.routes, self.h_sum, self.pairs = [], [], 0.0, 0
        x = hidden.reshape(-1, hidden.shape[-1]).float()  # [t, H]
        y = torch.zeros_like(x)
        for e, xe, h, ye, w in self._run(x, top_k_index, top_k_weights):  # the output, and down's input moment
            y.index_add_(0, xe, ye * w[:, None])
            self.h_sum = self.h_sum + h.T @ h  # float32 GEMMs: sums of <= 10^5 terms, accurate to ~1e-5
            self.pairs += len(h)
        self.xs.append(x)
        self.routes.append((top_k_index.reshape(x.shape[0], -1), top_k_weights.reshape(x.shape[0], -1)))
        return y.view_as(hidden).to(hidden.dtype)

    def _run(self, x, top_k_index, top_k_weights, only=None):
        """Per routed expert (or only expert `only`): (e, its token rows [n], h_e [n, I], y_e [n, H] (None for
        `only`: the second moments need h alone), weights [n]) with the source expert in float32."""
        k = top_k_index.shape[-1]
        flat_e, flat_w = top_k_index.reshape(-1), top_k_weights.reshape(-1).float()
        order = torch.argsort(flat_e, stable=True)
        starts = [0] + torch.bincount(flat_e, minlength=len(self.experts)).cumsum(0).tolist()
        for e in range(len(self.experts)) if only is None else (only,):
            pick = order[starts[e]:starts[e + 1]]
            if not len(pick) and only is None:
                continue
            w, xe = self.experts[e], pick // k
            g = x[xe] @ w["gate_up"].float().T + (w["gate_up_bias"].float() if "gate_up_bias" in w else 0)
            h = self.bank._activate(g)
            y = None if only is not None else \
                h @ w["down"].float().T + (w["down_bias"].float() if "down_bias" in w else 0)
            yield e, xe, h, y, flat_w[pick]

    @torch.inference_mode()
    def finish(self) -> None:
        """The layer's every chunk has passed: quantize and write it (unless a previous run did)."""
        if self.layer is None:
            return
        job, layer, experts = self.job, self.layer, self.experts
        if not job.finished(layer):
            x = torch.cat(self.xs)  # [T, H]: every calibration token's input to this layer's experts
            self.xs = None  # (not held twice)
            idx, wts = (torch.cat(t) for t in zip(*self.routes))
            mean_x = x.T @ x / max(len(x), 1)  # every token reaches k experts alike
            mean_h = self.h_sum / self.pairs if self.pairs else torch.eye(experts[0]["down"].shape[1])  # (reads expert 0)

            def hessians(e):
                _, xe, h, _, _ = next(self._run(x, idx, wts, only=e))
                n, xe = len(xe), x[xe]
                return {"gate_up": (xe.T @ xe + POOL * mean_x) / (n + POOL),
                        "down": (h.T @ h + POOL * mean_h) / (n + POOL)}

            job.write_layer(layer, experts, hessians)
        self.layer = self.bank = self.experts = self.xs = self.routes = None


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
    # the model in the source's 16-bit dtype (or float32): the pass computes in float32, one decoder layer at a
    # time upcast (`_in_float32`), so the non-expert weights are not all held in float32
    dtype = job.ckpt.dtype() if job.ckpt.dtype() in (torch.bfloat16, torch.float16) else torch.float32
    model = build_model(Path(out), get_arch(job.ckpt.config), dtype, torch.device("cpu"))
    with torch.inference_mode():
        _calibrate(model, job, ids)
    left = job.dense.todo()
    if left:  # modules the forward did not reach (e.g. extra prediction layers): their weight error only
        print(f"dynaexq: {len(left)} non-expert matrices were not reached by the calibration pass ({left[:3]}...); "
              "quantized against their weight error", file=sys.stderr)
        for name in left:
            job.add_dense(name)
    return job.finish()


@contextlib.contextmanager
def _in_float32(module):
    """Within: `module`'s floating parameters and buffers are float32 copies (exact: upcasts); at exit the
    originals are back. A float32 model computes the same values, holding every layer in float32 at once."""
    saved = [(t, t.data) for t in (*module.parameters(), *module.buffers())
             if t.is_floating_point() and t.dtype != torch.float32]
    for t, data in saved:
        t.data = data.float()
    try:
        yield
    finally:
        for t, data in saved:
            t.data = data


def _run_to(model, ids, module, calibrator):
    """Run the model on ids until `module`'s forward starts -> (its positional args, its keyword args)."""
    got = {}

    def stop(m, args, kwargs):
        got.update(args=args, kwargs=kwargs)
        raise _Done

    for bank in banks_of(model).values():
        bank.calibrator = calibrator
    layers = model.get_decoder().layers
    with contextlib.ExitStack() as stack:  # each layer in float32 while it runs, the rest as built

        def enter(m, args):
            stack.enter_context(_in_float32(m))

        hooks = [module.register_forward_pre_hook(stop, with_kwargs=True),
                 model.get_input_embeddings().register_forward_hook(lambda m, args, out: out.float()),
                 *(layer.register_forward_pre_hook(enter) for layer in layers),
                 *(layer.register_forward_hook(lambda m, args, out: stack.close()) for layer in layers)]
        try:
            model(input_ids=ids, use_cache=False)
        except _Done:
            pass
        finally:
            for hook in hooks:
                hook.remove()
            for bank in banks_of(model).values():
                bank.calibrator = None
    return got["args"], got["kwargs"]


def _calibrate(model, job: PrepareJob, ids: torch.Tensor) -> None:
    """The pass, layer by layer over chunks of CHUNK_TOKENS tokens (GPTQ's sequential scheme): the hidden states of
    every window are kept between layers, a layer's activations only for one chunk at a time."""
    with _in_float32(model.get_decoder().norm):  # the final norm in float32 throughout (small; a LayerNorm
        _layers_pass(model, job, ids)  # refuses a float32 input with 16-bit weights)


def _layers_pass(model, job: PrepareJob, ids: torch.Tensor) -> None:
    dec = model.get_decoder()
    layers, final_norm, head = dec.layers, dec.norm, model.get_output_embeddings()
    # every layer's keyword arguments (masks, rotary embeddings: the same for every window, all of one length,
    # broadcast over a chunk's batch), from one window run through with the experts stubbed out
    kwargs = {}

    def grab(i):
        def hook(m, args, kw):
            kwargs[i] = {k: v for k, v in kw.items() if k != "hidden_states"}
        return hook

    hooks = [layer.register_forward_pre_hook(grab(i), with_kwargs=True) for i, layer in enumerate(layers)]
    try:
        _run_to(model, ids[:1], head, lambda bank, hidden, idx, w: torch.zeros_like(hidden))
    finally:
        for h in hooks:
            h.remove()
    args, kw = _run_to(model, ids, layers[0], None)  # the first layer's input, every window: [W, S, H]
    hidden = (args[0] if args else kw["hidden_states"]).clone()
    del args, kw  # (the embedding's output: every window's hidden states once more)
    per = max(1, CHUNK_TOKENS // ids.shape[1])  # windows per chunk
    calibrator, moments = _LayerCalibrator(job), _DenseMoments(model, job)
    banks = banks_of(model).values()
    for bank in banks:
        bank.calibrator = calibrator
    try:
        for i, layer in enumerate(layers):
            with _in_float32(layer):
                for c0 in range(0, len(hidden), per):
                    out = layer(hidden[c0:c0 + per], **kwargs[i])
                    hidden[c0:c0 + per] = out[0] if isinstance(out, tuple) else out
            calibrator.finish()
            moments.flush()
        for c0 in range(0, len(hidden), per):  # the output head's input: the final norm of the last layer's output
            moments.add(moments.head_items, final_norm(hidden[c0:c0 + per]))
        moments.flush()
    finally:
        moments.close()
        for bank in banks:
            bank.calibrator = None


class _DenseMoments:
    """Each non-expert matrix quantized against the second moment of its input over every calibration token:
    forward pre-hooks sum x^T x per chunk (one sum for q, k and v, which share their input) and `flush()` hands
    the means to the job once a layer's chunks have passed. The embedding is read by rows: no input to weigh."""

    def __init__(self, model, job: PrepareJob):
        self.job, self.sums, self.hooks, self.last = job, {}, [], {}
        head = model.get_output_embeddings()
        for name, it in job.dense.items.items():
            if it["role"] == "embedding" and not job.dense.finished(name):
                job.add_dense(name)
            elif it["role"] == "linear" and not job.dense.finished(name) and model.get_submodule(name) is not head:
                self.hooks.append(model.get_submodule(name).register_forward_pre_hook(
                    lambda m, args, name=name: self.add([name], args[0])))
        self.head_items = [n for n, it in job.dense.items.items() if not job.dense.finished(n) and (
            it["role"] == "tied" or (it["role"] == "linear" and model.get_submodule(n) is head))]

    def add(self, names, x) -> None:
        # the same tensor object (q, k and v share their input): held here, so its memory cannot be freed and
        # reused by a later input of the same shape (an address as the key matched such a stale moment)
        if self.last.get("x") is not x:
            xf = x.reshape(-1, x.shape[-1]).float()
            self.last.update(x=x, H=xf.T @ xf, n=len(xf))  # float32 GEMM over the chunk's tokens
        for name in names:
            H, n = self.sums.get(name, (0.0, 0))
            self.sums[name] = (H + self.last["H"], n + self.last["n"])

    def flush(self) -> None:
        for name, (H, n) in self.sums.items():
            self.job.add_dense(name, H / max(n, 1))
        self.sums, self.last = {}, {}

    def close(self) -> None:
        for h in self.hooks:
            h.remove()
