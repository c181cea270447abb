"""ServeConfig: every server default in one frozen dataclass; `dynaexq serve` derives its flags from it.
(Kept apart from app.py so that building the CLI parser imports no web framework.)"""
from __future__ import annotations

from dataclasses import dataclass

from dynaexq.runtime.controller import option


@dataclass(frozen=True)
class ServeConfig:
    served_model_name: str | None = option(None, "the model id clients send (default: the checkpoint's directory "
                                           "name)")
    api_key: str | None = option(None, "require 'Authorization: Bearer KEY' on /v1/* (default: no key)")
    max_batch: int = option(8, "sequences decoded together in one step (continuous batching)")
    max_queue: int = option(64, "requests that may wait beyond --max-batch; more get 429")
    prefill_chunk: int = option(128, "prompt tokens per prefill step: bounds how long a newcomer stalls the others")
    max_model_len: int | None = option(None, "context limit, prompt + completion tokens (default: the model's own)")
    max_body_bytes: int = option(1 << 20, "largest request body accepted; larger ones get 413")
