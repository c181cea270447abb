"""Continuous batching: many sequences share every decode step; a sequence joins and leaves between steps.

`BatchDecoder` keeps the running sequences' keys and values in one preallocated SlotCache (engine/kv_cache.py):
row i is the i-th running sequence's, right-padded, and the row after the running ones is the prefilling
sequence's. One `step()`:
  1. prefill: one chunk (<= `prefill_chunk` tokens) of the oldest waiting sequence, written into its row; after
     its last chunk its first token is sampled and it joins the batch (its row is already the next one);
  2. decode: one forward of [B, 1] (every row's newest token at its own position, written at that position:
     nothing is concatenated), one token sampled per row (`sample_rows`: one batched call for all rows, each
     row's own warpers and generator);
  3. finished or cancelled rows leave: the last running row moves into each hole.
Chunked prefill bounds how long a newcomer stalls the running streams (one chunk per step). Padding never
reaches a router: prefill is per sequence and a decode step has one real token per row, so the experts'
routing statistics (and the hotness controller) see only real tokens. Models whose cache is not plain full
attention (sliding windows, linear attention) keep transformers' DynamicCache and are served one at a time.

`Sequence` holds one request's tokens, its sampler (transformers' logits warpers, its own torch.Generator)
and its detokenized text with stop strings applied; it knows nothing of HTTP.
"""
from __future__ import annotations

import contextlib
import sys
from collections import deque
from dataclasses import dataclass

import torch
from transformers import (DynamicCache, LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper,
                          TopPLogitsWarper)

from dynaexq.config import ServeConfig
from dynaexq.engine.kv_cache import SlotCache
from dynaexq.quant import lowbit_cpu

END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>", "</s>")  # chat templates' turn ends


def stop_token_ids(model, tokenizer, chat: bool = False) -> set[int]:
    """The tokens that end a generation: the model's and tokenizer's EOS, plus the chat templates' turn ends."""
    eos = model.generation_config.eos_token_id if model.generation_config else None
    ids = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    if chat and tokenizer is not None:
        vocab = tokenizer.get_vocab()
        ids |= {vocab[t] for t in END_OF_TURN if t in vocab}
    return ids


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    stop: tuple[str, ...] = ()
    seed: int | None = None

    def __post_init__(self):
        if not (isinstance(self.max_tokens, int) and self.max_tokens >= 1):
            raise ValueError(f"max_tokens must be a positive integer, got {self.max_tokens!r}")
        if not 0 <= self.temperature <= 2:
            raise ValueError(f"temperature must be in [0, 2], got {self.temperature!r}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k!r}")
        if any(not s for s in self.stop):
            raise ValueError("stop strings must be non-empty")


class Sequence:
    def __init__(self, prompt_ids, params: SamplingParams, tokenizer, stop_ids=(), context: int | None = None):
        self.prompt = [int(t) for t in prompt_ids]
        self.params, self.tokenizer, self.stop_ids = params, tokenizer, frozenset(stop_ids)
        self.context = context  # the model's maximum positions: generation stops there
        self.out: list[int] = []
        self.row = None  # its row of the decoder's SlotCache (from its first prefill chunk on)
        self.cache = None  # its own DynamicCache (models the SlotCache does not take: served one at a time)
        self.prefilled = 0
        self.finish_reason: str | None = None  # "stop" | "length" | "cancelled" | "error"
        self.error: str | None = None
        self.generator = torch.Generator()
        self.generator.manual_seed(params.seed if params.seed is not None else self.generator.seed())
        warpers = []
        if params.temperature > 0:
            warpers.append(TemperatureLogitsWarper(params.temperature))
            if params.top_k:
                warpers.append(TopKLogitsWarper(params.top_k))
            if params.top_p < 1:
                warpers.append(TopPLogitsWarper(params.top_p))
        self.warpers = LogitsProcessorList(warpers)
        self.text = ""  # generated text, cut at a stop string
        self._offsets = (0, 0)  # (prefix, read): out[prefix:read] is decoded context for the unread out[read:]
        self._sent = 0  # characters of `text` already handed out by delta()

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def sample(self, logits: torch.Tensor) -> int:
        """logits [V] -> the next token (argmax when temperature is 0)."""
        if self.params.temperature == 0:
            return int(argmax(logits[None])[0])
        cdf = self.warpers(None, logits.float()[None])[0].softmax(-1).cumsum(0)  # [V]
        u = torch.rand((), generator=self.generator).to(cdf.device) * cdf[-1]  # inverse-CDF draw (multinomial: ~10x)
        return int(torch.searchsorted(cdf, u, right=True).clamp(max=cdf.numel() - 1))

    def append(self, token: int) -> None:
        if token in self.stop_ids:
            self.finish_reason = "stop"
            self._detokenize(flush=True)
            return
        self.out.append(token)
        if self.finish_reason is None and (len(self.out) >= self.params.max_tokens or
                                           (self.context and len(self.prompt) + len(self.out) >= self.context)):
            self.finish_reason = "length"
        self._detokenize(flush=self.finished)

    def _detokenize(self, flush: bool) -> None:
        """Incremental (TGI's and vLLM's prefix-offset method): decode only out[prefix:] against out[prefix:read],
        the few tokens before the unread ones, so that a token's text comes out right (a leading space, a
        multi-byte character split across tokens) at a cost that does not grow with the output. Text waits while
        it ends in an incomplete character, unless the sequence is finishing (`flush`), when it is what a full
        decode gives."""
        if self.tokenizer is None or self.finish_reason == "stop" and not flush:
            return
        p, r = self._offsets
        prefix = self.tokenizer.decode(self.out[p:r], skip_special_tokens=True)
        new = self.tokenizer.decode(self.out[p:], skip_special_tokens=True)
        if len(new) <= len(prefix) or (new.endswith("\ufffd") and not flush):
            return
        old = len(self.text)
        self.text += new[len(prefix):]
        self._offsets = (r, len(self.out))
        if self.params.stop:
            start = max(0, old - max(map(len, self.params.stop)))
            hits = [i for i in (self.text.find(s, start) for s in self.params.stop) if i >= 0]
            if hits:
                self.text = self.text[:min(hits)]
                self.finish_reason = "stop"

    def delta(self) -> str:
        """New text safe to show: while running, hold back any tail that could still become a stop string."""
        end = len(self.text)
        if not self.finished:
            head, hold = self.text, 0
            for s in self.params.stop:
                hold = max(hold, next((k for k in range(min(len(s) - 1, len(head)), 0, -1) if head.endswith(s[:k])), 0))
            end -= hold
        end = max(end, self._sent)
        out, self._sent = self.text[self._sent:end], end
        return out


def sample_rows(seqs: list[Sequence], logits: torch.Tensor) -> list[int]:
    """logits [B, V] -> one token per sequence (see `sample_tokens`), on the host."""
    return sample_tokens(seqs, logits).tolist() if seqs else []


def argmax(logits: torch.Tensor) -> torch.Tensor:
    """logits [B, V] -> `logits.argmax(-1)`: natively on the CPU (csrc/argmax.cpp; aten's takes ~0.6 ms per
    vocabulary-wide bf16 row here), aten's elsewhere."""
    lib = lowbit_cpu.extension()
    if logits.device.type != "cpu" or logits.dtype not in lowbit_cpu._DTYPE_CODE or lib is None or logits.dim() != 2:
        return logits.argmax(-1)
    return lib.argmax(logits)


def sample_tokens(seqs: list[Sequence], logits: torch.Tensor) -> torch.Tensor:
    """logits [B, V] -> tokens [B] on the logits' device, one per sequence as each one's own `sample` draws it (its
    warpers, its generator), in a few batched calls: temperature, top-k and top-p as per-row tensors over one
    sort, one softmax and cumsum, one searchsorted; only the draws stay per row (each sequence's generator, on
    the host, in its order)."""
    dev = logits.device
    tokens = argmax(logits)  # [B]: greedy rows
    hot = [i for i, s in enumerate(seqs) if s.params.temperature > 0]
    if hot:
        x = logits[hot].float()  # [b, V]
        v = x.shape[-1]
        params = [seqs[i].params for i in hot]
        x = x / torch.tensor([[p.temperature] for p in params], device=dev)
        k = torch.tensor([[min(p.top_k, v) if p.top_k else v] for p in params], device=dev)  # [b, 1]
        kth = x.sort(-1, descending=True).values.gather(1, k - 1)  # [b, 1] (TopKLogitsWarper: keeps ties)
        x = x.masked_fill(x < kth, -float("inf"))
        top_p = torch.tensor([[p.top_p] for p in params], device=dev)
        if any(p.top_p < 1 for p in params):  # TopPLogitsWarper: drop the low tail holding <= 1 - top_p, keep the top
            asc, order = x.sort(-1)
            drop = asc.softmax(-1).cumsum(-1) <= 1 - top_p
            drop[:, -1] = False
            drop &= top_p < 1
            x = x.masked_fill(drop.scatter(1, order, drop), -float("inf"))
        cdf = x.softmax(-1).cumsum(-1)  # [b, V]
        u = torch.stack([torch.rand((), generator=seqs[i].generator) for i in hot]).to(dev)[:, None] * cdf[:, -1:]
        tokens[torch.tensor(hot, device=dev)] = torch.searchsorted(cdf, u, right=True)[:, 0].clamp(max=v - 1)
    return tokens


class BatchDecoder:
    def __init__(self, model, max_batch: int = ServeConfig.max_batch, prefill_chunk: int = ServeConfig.prefill_chunk,
                 faults=None, recorder=None):
        if max_batch < 1 or prefill_chunk < 1:
            raise ValueError(f"max_batch and prefill_chunk must be >= 1, got {max_batch}, {prefill_chunk}")
        self.model, self.prefill_chunk = model, prefill_chunk
        # Engine.faults: forwards inside it report tokens that lost an expert instead of raising (offload regime)
        self.faults = faults or (lambda: contextlib.nullcontext([]))
        self.recorder = recorder  # trace.RoutingRecorder: each forward's token rows, by sequence
        self.device = next(model.parameters()).device
        self.slots = SlotCache.supports(model.config)
        if not self.slots:  # sliding-window / linear-attention states: transformers' own cache, one sequence
            probe = DynamicCache(config=model.config)
            if max_batch > 1:
                print("dynaexq: continuous batching needs a full-attention KV cache; this model's cache "
                      f"({sorted({type(x).__name__ for x in probe.layers})}) is served one sequence at a time",
                      file=sys.stderr)
            max_batch = 1
        self.max_batch = max_batch
        self.kv = SlotCache(model.config, max_batch + 1) if self.slots else None  # + the row being prefilled
        self.waiting: deque[Sequence] = deque()
        self.rows: list[Sequence] = []  # running: row i of the cache is rows[i]'s
        self.decoded = 0  # rows decoded by the last step
        self.prefilling: Sequence | None = None  # the sequence whose prompt chunk the current step runs (set until
        # the step ends, popped from `waiting` or not: the scheduler fails it with the rows if the step raises)

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def idle(self) -> bool:
        return not self.rows and not self.waiting

    def reset(self) -> None:
        """Forget every row (after a step that raised: the scheduler has failed the sequences in it)."""
        for seq in [*self.rows, *self.waiting]:
            seq.row = seq.cache = None
        self.rows, self.prefilling = [], None
        if self.kv is not None:
            self.kv.lens[:] = [0] * self.kv.rows

    @torch.inference_mode()
    def step(self) -> list[Sequence]:
        """One prefill chunk and/or one decode step -> the sequences that got a token or finished."""
        self._drop_finished()
        touched, joining, self.decoded = [], None, 0
        if self.waiting and len(self.rows) < self.max_batch:
            seq = self.prefilling = self.waiting[0]
            if self._prefill_chunk(seq):
                self.waiting.popleft()
                touched.append(seq)
                joining = None if seq.finished else seq
        if self.rows:
            self._decode()
            touched.extend(self.rows)
        if joining is not None:  # after the others' decode: its first token is already sampled
            self.rows.append(joining)  # its row is the next one: nothing moves
        self.prefilling = None  # only now: a step that raises fails this sequence too, wherever it was
        self._drop_finished()
        return touched

    def _prefill_chunk(self, seq: Sequence) -> bool:
        """Run the next chunk of seq's prompt; True once the whole prompt is in its cache (first token sampled)."""
        chunk = seq.prompt[seq.prefilled:seq.prefilled + self.prefill_chunk]
        ids = torch.tensor([chunk], device=self.device)
        if self.slots:
            if seq.row is None:
                seq.row = len(self.rows)  # the row after the running ones
                self.kv.clear(seq.row)
            self.kv.select(seq.row, 1, len(chunk))
            cache = self.kv
        else:
            cache = seq.cache = seq.cache if seq.cache is not None else DynamicCache(config=self.model.config)
        with self.faults() as faults:
            logits = self.model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1).logits
        if self.recorder is not None:
            self.recorder.step([seq] * len(chunk), phase=0)
        if self.slots:
            self.kv.advance(len(chunk))
        seq.prefilled += len(chunk)
        if faults:  # every token is this sequence's: it fails, the batch goes on
            seq.finish_reason, seq.error = "error", faults[0][1]
            self._free(seq)
            return True
        if seq.prefilled < len(seq.prompt):
            return False
        seq.append(seq.sample(logits[0, -1]))
        if seq.finished:
            self._free(seq)
        return True

    def _decode(self) -> None:
        B = self.decoded = len(self.rows)
        ids = torch.tensor([[s.out[-1]] for s in self.rows], device=self.device)  # [B, 1]
        if self.slots:
            self.kv.select(0, B, 1)
            pos = torch.tensor([[n] for n in self.kv.lens[:B]], device=self.device)  # [B, 1]: each row's position
            kw = dict(attention_mask=self.kv.mask().to(self.device), position_ids=pos, past_key_values=self.kv,
                      dynaexq_lengths=self.kv.lengths())
        else:
            kw = dict(past_key_values=self.rows[0].cache)
        with self.faults() as faults:
            logits = self.model(input_ids=ids, use_cache=True, **kw).logits[:, -1]  # [B, V]
        if self.recorder is not None:
            self.recorder.step(self.rows, phase=1)
        if self.slots:
            self.kv.advance(1)
        for rows, message in faults:  # rows [B] that lost an expert: their sequences fail, the others go on
            for i in rows.nonzero().flatten().tolist():
                if not self.rows[i].finished:
                    self.rows[i].finish_reason, self.rows[i].error = "error", message
        live = [i for i, s in enumerate(self.rows) if not s.finished]
        rows = logits if len(live) == B else logits[live]  # (a copy of every row's logits only when some failed)
        for i, token in zip(live, sample_rows([self.rows[i] for i in live], rows)):
            self.rows[i].append(token)

    def _free(self, seq: Sequence) -> None:
        if seq.row is not None:
            self.kv.clear(seq.row)
        seq.row = seq.cache = None

    def _drop_finished(self) -> None:
        """Finished rows leave: the last running row moves into each hole (one sequence's copy, not the batch's),
        and a sequence half-way through its prefill follows to the row after the running ones."""
        for seq in [s for s in self.waiting if s.finished]:  # cancelled before they ran (or during prefill)
            self._free(seq)
        self.waiting = deque(s for s in self.waiting if not s.finished)
        i = 0
        while i < len(self.rows):
            if not self.rows[i].finished:
                i += 1
                continue
            gone, last = self.rows[i], len(self.rows) - 1
            if self.slots and i != last:
                self.kv.move(last, i)
                self.rows[last].row = i
            elif self.slots:
                self.kv.clear(i)
            self.rows[i] = self.rows[last]
            self.rows.pop()
            gone.row = gone.cache = None
        filling = self.waiting[0] if self.waiting and self.waiting[0].row is not None else None
        if filling is not None and filling.row != len(self.rows):
            self.kv.move(filling.row, len(self.rows))
            filling.row = len(self.rows)
