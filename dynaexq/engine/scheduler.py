"""Scheduler: the one thread that runs the model for concurrent requests.

It keeps the queues, cancellations and callbacks; the step is the engine's. `submit(prompt_ids, params,
on_event)` admits a request (bounded: at most `max_batch` running plus `max_queue` waiting, else `QueueFull`),
and the scheduler thread loops: apply cancellations and newcomers to the engine's batch, run one
`engine.step(batch)`, hand every touched sequence's new text to its `on_event(seq, delta)` (called on the scheduler
thread: it must be quick, e.g. `loop.call_soon_threadsafe`). `on_step(info)` is called after each step with
{"batch": rows decoded (0 for a prefill-only step), "seconds": step time}; it runs on this thread, between
forwards. Every part of the loop is guarded: a step that raises fails the sequences in it (their
`finish_reason` becomes "error", with the message in `seq.error`); a failing controller step (counted by the
engine, `engine.errors`) or `on_step` fails none (the step's tokens are computed) and is counted in `errors`; a
callback that raises stops only its own sequence. If the thread ever ends for another reason, every sequence it
holds fails, `stopped` says why and `submit` raises `Unavailable`.
"""
from __future__ import annotations

import sys
import threading
import time
import traceback
from collections import Counter, deque

from dynaexq.config import ServeConfig
from dynaexq.engine.batch import SamplingParams, Sequence, stop_token_ids


class QueueFull(Exception):
    pass


class Unavailable(Exception):
    """The scheduler thread is gone: nothing submitted now would ever run."""


class Scheduler:
    def __init__(self, engine, max_batch: int = ServeConfig.max_batch, max_queue: int = ServeConfig.max_queue,
                 prefill_chunk: int = ServeConfig.prefill_chunk, on_step=None,
                 context: int | None = None):
        self.engine, self.max_queue, self.on_step = engine, max_queue, on_step
        self.decoder = engine.open_batch(max_batch, prefill_chunk)
        self.max_batch = self.decoder.max_batch
        self.context = context or getattr(engine.model.config, "max_position_embeddings", None)  # stops there
        self.stop_ids = {chat: stop_token_ids(engine.model, engine.tokenizer, chat) for chat in (False, True)}
        self.steps = 0
        self._new: list = []
        self._cancel: list = []
        self._callbacks: dict = {}
        self._cond = threading.Condition()
        self._closed = False
        self.stopped: str | None = None  # why the scheduler thread ended (None while it runs)
        self.errors: Counter = Counter()  # failures caught per part of a step (step, on_step, callback, add)
        self._thread = threading.Thread(target=self._loop, name="dynaexq-scheduler", daemon=True)
        self._thread.start()

    def load(self) -> tuple[int, int]:
        """(running, waiting) sequences."""
        with self._cond:
            return len(self.decoder.rows), len(self.decoder.waiting) + len(self._new)

    def submit(self, prompt_ids, params: SamplingParams, on_event, chat: bool = False) -> Sequence:
        seq = Sequence(prompt_ids, params, self.engine.tokenizer, self.stop_ids[chat], self.context)
        with self._cond:
            if self.stopped is not None:
                raise Unavailable(self.stopped)
            if self._closed:
                raise QueueFull("the server is shutting down")
            running = len(self.decoder.rows)
            waiting = len(self.decoder.waiting) + len(self._new)
            if waiting >= self.max_queue + max(0, self.max_batch - running):
                raise QueueFull(f"the server is at capacity ({running} running, {waiting} queued; --max-batch "
                                f"{self.max_batch}, --max-queue {self.max_queue}); retry later")
            self._new.append(seq)
            self._callbacks[id(seq)] = on_event
            self._cond.notify()
        return seq

    def cancel(self, seq: Sequence) -> None:
        """Stop generating for seq (a client went away); its slot is freed before the next step."""
        with self._cond:
            self._cancel.append(seq)
            self._cond.notify()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join(timeout=30)

    def _loop(self) -> None:
        reason = "the server shut down"
        try:
            self.engine.use_threads()
            while True:
                with self._cond:
                    while not (self._closed or self._new or self._cancel or not self.decoder.idle()):
                        self._cond.wait()
                    if self._closed:
                        break
                    new, self._new = self._new, []
                    cancel, self._cancel = self._cancel, []
                for seq in new:
                    self._guarded("add", self.decoder.add, seq, fails=[seq])
                for seq in cancel:
                    if not seq.finished:
                        seq.finish_reason = "cancelled"
                        self._callbacks.pop(id(seq), None)
                self._step()
        except BaseException as err:  # only what the guards let through (SystemExit, a bug in the guard itself)
            reason = f"the scheduler stopped ({type(err).__name__}: {err})"
            traceback.print_exc(file=sys.stderr)
        finally:  # nothing waits forever on a thread that is gone: every stream ends, new requests are refused
            with self._cond:
                self.stopped = reason
                pending = list(self.decoder.rows) + list(self.decoder.waiting) + self._new
                self._new = []
            for seq in pending:
                if not seq.finished:
                    self._fail(seq, reason)

    def _guarded(self, where: str, fn, *args, fails=()) -> bool:
        """Run one part of a step; an exception is counted and printed, and fails only the sequences `fails`."""
        try:
            fn(*args)
            return True
        except Exception as err:
            traceback.print_exc(file=sys.stderr)
            self.errors[where] += 1
            for seq in fails:
                self._fail(seq, f"{where} failed: {type(err).__name__}: {err}")
            return False

    def _step(self) -> None:
        t0 = time.perf_counter()
        try:
            touched = self.engine.step(self.decoder)  # the controller's part is guarded inside: engine.errors
        except Exception as err:  # a failing step must not take the server down: fail its sequences
            traceback.print_exc(file=sys.stderr)
            self.errors["step"] += 1
            d = self.decoder
            failed = d.rows + ([d.prefilling] if d.prefilling is not None and d.prefilling not in d.rows else [])
            with self._cond:  # the decoder is clean before any client hears of the failure
                d.waiting = deque(s for s in d.waiting if s is not d.prefilling)
                d.reset()
            for seq in failed:
                self._fail(seq, f"generation failed: {type(err).__name__}: {err}")
            return
        self.steps += 1
        if self.on_step is not None:
            self._guarded("on_step", self.on_step, {"batch": self.decoder.decoded,
                                                    "seconds": time.perf_counter() - t0})
        for seq in touched:
            callback = self._callbacks.get(id(seq))
            if seq.finished:
                self._callbacks.pop(id(seq), None)
            if callback is not None and not self._guarded("callback", callback, seq, seq.delta()):
                self._callbacks.pop(id(seq), None)  # its client cannot be told: the sequence stops
                if not seq.finished:
                    seq.finish_reason, seq.error = "error", "the client's event callback failed"

    def _fail(self, seq: Sequence, message: str) -> None:
        seq.finish_reason, seq.error, seq.cache = "error", message, None
        callback = self._callbacks.pop(id(seq), None)
        if callback is not None:
            callback(seq, "")
