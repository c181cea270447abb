"""Engine: the loaded model plus what the runtime knows about its experts.

`engine.model` is a plain transformers model (`engine.model(input_ids).logits` works as usual);
`engine.generate` streams text; the accessors report what is actually resident.
"""
from __future__ import annotations

from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

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
        """Per MoE layer: (token counts [E], routed probability mass [E]) since the last call."""
        return {layer: bank.take_stats() for layer, bank in self.banks.items()}

    def apply(self, plan: dict, progress: bool = False) -> int:
        """Publish, for every (layer, expert) whose precision differs, the planned version read from the store;
        returns how many experts changed. (Synchronous: the asynchronous transition engine is the runtime's.)"""
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
        """Forwards run inside it fail per token, not per call: an expert the offload cache cannot make resident
        (an unreadable store range, no answer in time) zeroes only its own products, and the list this yields
        receives (tokens routed to it: bool [T], message) for each; outside it such a forward raises. The
        decoder fails the sequences of those tokens and goes on with the others."""
        cache = getattr(self.runtime, "cache", None)
        if cache is None:
            yield []
            return
        cache.collect = got = []
        try:
            yield got
        finally:
            cache.collect = None

    def after_step(self) -> None:
        """Call after each forward step you drive yourself (generate, the server and the eval streams do): with
        the dynamic runtime, its controller sees the step's routing and decides when due; otherwise nothing."""
        if self.runtime is not None:
            self.runtime.after_step()

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
        from dynaexq.engine.batch import BatchDecoder, SamplingParams, Sequence, stop_token_ids

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
        decoder = BatchDecoder(self.model, max_batch=1, faults=self.faults, recorder=self.recorder)
        decoder.add(seq)
        self.use_threads()
        while not seq.finished:
            decoder.step()
            self.after_step()
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
