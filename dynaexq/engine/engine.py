"""Engine: the loaded model plus what the runtime knows about its experts, and the step that drives both.

`engine.model` is a plain transformers model (`engine.model(input_ids).logits` works as usual);
`engine.generate` streams text; the accessors report what is actually resident.

The step (nano-vllm's schedule -> run -> postprocess) is the engine's: `open_batch()` gives a continuous batch
(engine/batch.py) that sequences join, and `step(batch)` runs its next prefill chunk and decode rows, samples, then
hands the step's routing statistics to the runtime's controller (or, with a static map, to `hotness` when one
is set). `run(**inputs)` is the same step for a forward of the caller's own inputs (teacher-forced evaluation,
lm-eval). The routing statistics are one [L, E] buffer pair the MoE layers write into (each bank's counters are
its row), read and reset once per step. A forward the engine does not run (a user's own `engine.model(...)`)
only adds to the next step's statistics.
"""
from __future__ import annotations

import sys
import traceback
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from dynaexq.config import ServeConfig
from dynaexq.errors import UserError
from dynaexq.runtime.version import make_version


@dataclass
class Engine:
    model: torch.nn.Module
    tokenizer: object | None
    reader: object  # StoreReader
    banks: dict  # layer -> ExpertBank
    policy: str
    plan: dict = field(repr=False)  # (layer, expert) -> Precision
    backend: str = "cpu"
    dtype: torch.dtype = torch.bfloat16
    runtime: object | None = None  # engine.dynamic.Runtime while a dynamic policy runs
    threads: int = field(default_factory=torch.get_num_threads)  # cores a decode step computes on
    sizes: object | None = None  # runtime.budget.SizedReader: each precision's bytes per expert resident here
    dense_plan: dict = field(default_factory=dict)  # non-expert matrix -> Precision (the others as loaded)
    recorder: object | None = None  # trace.RoutingRecorder while `record_routing` records
    hotness: object | None = None  # runtime.hotness.Hotness fed by every step when no runtime runs (a dashboard's)
    errors: Counter = field(default_factory=Counter)  # controller steps that failed (no sequence failed with them)
    routed_tokens: int = 0  # tokens the MoE layers routed in every step so far (a replica's weight in a hotness merge)

    def __post_init__(self):
        """The banks' routing counters become rows of one [L, E] pair, so a step reads and resets them at once."""
        layers = sorted(self.banks)
        E = self.banks[layers[0]].num_experts if layers else 0
        dev = self.banks[layers[0]].token_counts.device if layers else "cpu"
        self._counts = torch.zeros(len(layers), E, dtype=torch.int64, device=dev)  # [L, E] routed tokens
        self._mass = torch.zeros(len(layers), E, dtype=torch.float32, device=dev)  # [L, E] routed probability mass
        for i, layer in enumerate(layers):
            self.banks[layer].token_counts, self.banks[layer].routed_mass = self._counts[i], self._mass[i]

    def record_routing(self, path) -> None:
        """Record every forward's routing from now on (generate, the server's batches) into the routing trace
        `path` (dynaexq/trace.py), written by `close()` (or `save_routing()`)."""
        from dynaexq.trace import RoutingRecorder
        if Path(path).suffix != ".npz":
            raise UserError(f"--record-routing {str(path)!r}: a routing trace is written as .npz")
        config = self.model.config
        name = Path(str(getattr(config, "_name_or_path", "") or self.reader.manifest["source"].get("path", ""))).name
        self.recorder = RoutingRecorder(sorted(self.banks), self.reader.num_experts,
                                        int(getattr(config, "num_experts_per_tok", 1)), name, Path(path))
        for bank in self.banks.values():
            bank.recorder = self.recorder

    def stop_recording(self):
        """Write the routing recorded so far and stop recording -> the trace's path (None when not recording)."""
        path = self.save_routing()
        self.recorder = None
        for bank in self.banks.values():
            bank.recorder = None
        return path

    def save_routing(self):
        """Write the routing recorded so far (atomically) -> its path, or None when not recording."""
        if self.recorder is None:
            return None
        return self.recorder.trace().save(self.recorder.path)

    def weight_bytes(self) -> int:
        """Bytes of every weight tensor resident now: the model's own (non-expert) ones, each storage once, plus
        the experts' (`expert_bytes`)."""
        from dynaexq.engine.dynamic import nonexpert_bytes
        return nonexpert_bytes(self.model) + self.expert_bytes()

    def use_threads(self) -> None:
        """Make the calling thread (the one about to run forwards) compute on `threads` cores. Called where a
        decode loop starts: a thread's torch default is whatever the last `set_num_threads` anywhere said."""
        if torch.get_num_threads() != self.threads:
            torch.set_num_threads(self.threads)

    def expert_bytes(self) -> int:
        """Bytes of expert weights resident right now: the runtime's tier arenas (staging not included), or the
        published versions of a static map."""
        if self.runtime is not None:
            return self.runtime.pools.expert_bytes()
        return sum(v.nbytes for bank in self.banks.values() for v in bank.versions if v is not None)

    def precision_counts(self) -> dict[str, int]:
        held = Counter(v.precision.value for bank in self.banks.values() for v in bank.versions if v is not None)
        return dict(held)

    def take_routing_stats(self) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        """Per MoE layer: (token counts [E], routed probability mass [E]) since the last call (or step)."""
        counts, mass = self._counts.clone(), self._mass.clone()
        self._counts.zero_()
        self._mass.zero_()
        return {layer: (counts[i], mass[i]) for i, layer in enumerate(sorted(self.banks))}

    def step_stats(self) -> dict:
        """{layer: (routed tokens, routed mass [E])} since the last step, every counter reset."""
        stats = {layer: (self.banks[layer].routed_tokens, mass)
                 for layer, (_, mass) in self.take_routing_stats().items()}
        for bank in self.banks.values():
            bank.routed_tokens = 0
        self.routed_tokens += max((t for t, _ in stats.values()), default=0)
        return stats

    def apply(self, plan: dict, progress: bool = False) -> int:
        """Publish, for every (layer, expert) whose precision differs, the planned version read from the store;
        returns how many experts changed. (Synchronous: the asynchronous residency is the runtime's.)"""
        if self.runtime is not None:
            raise RuntimeError("the dynamic runtime owns the experts; call engine.close() before applying a map")
        changed = [(key, p) for key, p in sorted(plan.items())
                   if self.banks[key[0]].versions[key[1]] is None or self.banks[key[0]].versions[key[1]].precision != p]
        try:
            for (layer, e), p in tqdm(changed, desc="load experts", unit="expert", disable=not progress):
                self.banks[layer].publish(e, self.make_version(layer, e, p))
        finally:
            self.reader.close()
        self.plan = dict(plan)
        return len(changed)

    def unpublish(self) -> None:
        """Every bank without versions, table or residency (no forward runs meanwhile): a runtime's start, before its
        arenas, and its stop."""
        for bank in self.banks.values():
            bank.table = bank.residency = None
            bank.versions[:] = [None] * len(bank.versions)

    def make_version(self, layer: int, e: int, p):
        """Expert e of `layer` at precision p, read from the store, kernel-ready on the model's device."""
        return make_version(self.reader.read_expert(layer, e, p), self.backend, self.dtype, self.model.device)

    def close(self) -> None:
        """Stop the dynamic runtime, if any (stops its transitions, saves --hotness-file); experts are unpublished.
        A routing recording is written."""
        self.save_routing()
        if self.runtime is not None:
            from dynaexq.engine.dynamic import stop_runtime
            stop_runtime(self, self.runtime)

    @contextmanager
    def faults(self):
        """Forwards run inside it fail per token, not per call: an expert the residency cannot make resident
        (an unreadable store range, no answer in time) zeroes only its own products, and the list this yields
        receives (tokens routed to it: bool [T], message) for each; outside it such a forward raises. The
        decoder fails the sequences of those tokens and goes on with the others."""
        residency = getattr(self.runtime, "residency", None)
        if residency is None:
            yield []
            return
        residency.collect = got = []
        try:
            yield got
        finally:
            residency.collect = None

    def open_batch(self, max_batch: int = ServeConfig.max_batch, prefill_chunk: int = ServeConfig.prefill_chunk):
        """A continuous batch (engine/batch.py BatchDecoder) for `step` to run; sequences join it with `add`."""
        from dynaexq.engine.batch import BatchDecoder
        return BatchDecoder(self.model, max_batch, prefill_chunk, faults=self.faults, recorder=self.recorder)

    def step(self, batch) -> list:
        """One engine step: the batch's next prefill chunk and decode rows, sampled, then the controller's part
        (`after_step`) -> the sequences that got a token or finished. If the forward raises, the exception
        propagates (its sequences are the caller's to fail); a controller that raises fails no sequence: the
        step's tokens stand, the failure is printed and counted in `errors["after_step"]`."""
        touched = batch.step()
        self._guarded_after_step()
        return touched

    def run(self, call=None, **inputs):
        """One forward of the caller's own inputs (`engine.model(**inputs)`, or `call()` for a caller that runs the
        model itself, e.g. lm-eval's generate) as an engine step -> its output."""
        out = call() if call is not None else self.model(**inputs)
        self._guarded_after_step()
        return out

    def _guarded_after_step(self) -> None:
        try:
            self.after_step()
        except Exception:
            traceback.print_exc(file=sys.stderr)
            self.errors["after_step"] += 1

    def after_step(self) -> None:
        """The controller's part of a step (`step` and `run` call it): the step's routing statistics go to the
        runtime's controller (hotness, then a decision when one is due), or to `hotness` with a static map."""
        stats = self.step_stats()
        if self.runtime is not None:
            self.runtime.on_step(stats)
        elif self.hotness is not None:
            self.hotness.update(stats)

    @torch.inference_mode()
    def routing_mass(self, windows: torch.Tensor, batch: int = 8, progress: bool = False) -> dict:
        """Routed probability mass per MoE layer and expert ({layer: float64 [E]}) over token windows [n, T]."""
        self.take_routing_stats()
        for i in tqdm(range(0, len(windows), batch), desc="routing statistics", disable=not progress):
            self.model(input_ids=windows[i:i + batch].to(self.model.device))
        return {layer: mass.double().cpu() for layer, (_, mass) in self.take_routing_stats().items()}

    def generate(self, prompt: str, max_new_tokens: int = 64, temperature: float = 0.0, top_p: float = 1.0,
                 top_k: int = 0, seed: int | None = None, on_text=None) -> str:
        """Sample a continuation of `prompt` with the server's sampler (the same seed gives the same text here
        and from `dynaexq serve`); `on_text(delta)` receives the text as it is generated."""
        from dynaexq.engine.batch import SamplingParams, Sequence, stop_token_ids

        if self.tokenizer is None:
            raise UserError("this model has no tokenizer files (tokenizer.json / tokenizer_config.json); "
                            "generation needs one")
        try:
            params = SamplingParams(max_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                                    seed=seed)
        except ValueError as err:
            raise UserError(str(err)) from None
        ids = self.tokenizer(prompt, add_special_tokens=False, verbose=False)["input_ids"]
        if not ids:
            raise UserError("the prompt is empty after tokenization; give some text")
        context = getattr(self.model.config, "max_position_embeddings", None)
        seq = Sequence(ids, params, self.tokenizer, stop_token_ids(self.model, self.tokenizer), context)
        batch = self.open_batch(max_batch=1)
        batch.add(seq)
        self.use_threads()
        while not seq.finished:
            self.step(batch)
            delta = seq.delta()
            if delta and on_text is not None:
                on_text(delta)
        if seq.finish_reason == "error":
            raise RuntimeError(f"generation failed: {seq.error}")
        return seq.text


def read_text(path) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise UserError(f"{str(path)!r} is not UTF-8 text ({err})") from None


def text_windows(tokenizer, text: str, n: int, length: int, what: str = "text") -> torch.Tensor:
    """n windows of `length` tokens spread evenly over the tokenized text -> [n', length] with n' <= n
    (fewer only when the text is short); a text shorter than one window is an error."""
    if tokenizer is None:
        raise UserError("this model has no tokenizer files; text evaluation needs one")
    # a whole text is longer than the model's context on purpose (windows come next): no length warning
    ids = torch.tensor(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"], dtype=torch.long)
    if len(ids) < length:
        raise UserError(f"{what} has {len(ids)} tokens, fewer than one window of {length}; give a longer text "
                        "or a smaller window")
    n = min(n, len(ids) // length)
    starts = torch.linspace(0, len(ids) - length, n).long() if n > 1 else torch.zeros(1, dtype=torch.long)
    return torch.stack([ids[s:s + length] for s in starts.tolist()])
