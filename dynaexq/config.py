"""Every default of the engine, the runtime and the server, each written once; the CLI derives its flags from
these dataclasses (`option(default, help)`: the help text sits with the default), and the engine's and
scheduler's own defaults refer to them. (A module of its own, below everything else, so that building the CLI
parser imports neither torch nor a web framework.)
"""
from __future__ import annotations

from dataclasses import dataclass, field

from dynaexq.errors import UserError

# the engine (load, prepare, eval and their flags)
POLICY = "auto"  # fit the machine (engine/auto.py)
VERIFY = "lazy"  # store integrity at load: shard stamps now, each expert's digest on its first read
CALIBRATION_WINDOWS, WINDOW_TOKENS = 128, 256  # calibration text: windows x tokens (prepare's GPTQ and warm start)
EVAL_WINDOWS = 16  # eval: windows per domain (of WINDOW_TOKENS tokens)

# the runtime
UPDATE_EVERY_TOKENS = 128  # the defaults, from bench/adaptation.py and bench/switching.py (README)
HALF_LIFE_TOKENS = 256.0


def option(default, help: str):
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class RuntimeConfig:
    budget: str | None = option(None, "total device memory for the model (e.g. 2GiB): experts get what is left after "
                              "the non-expert weights, the reserves and the staging slots (DynaExq Eq. 4)")
    kv_reserve: str = option("0", "KV-cache bytes to keep free out of --budget")
    activation_reserve: str = option("16MiB", "activation bytes to keep free out of --budget")
    safety_margin: float = option(0.02, "fraction of --budget kept free")
    staging_slots: int = option(4, "K: staging slots of the largest version: swaps of full arenas in flight at once")
    fetch_workers: int = option(0, "threads fetching versions into the arenas (0: 2 below the floor, where they wait "
                                "on store reads; K on CUDA; else 1, sharing the forward pass's cores)")
    half_life_tokens: float | None = option(None, "hotness EMA by evidence: S <- a*S + (1-a)*c after every step with "
                                            "a = 0.5**(tokens in the step / this), so a 32-token prefill chunk weighs "
                                            f"32 decode tokens (default {HALF_LIFE_TOKENS:g} unless --alpha is given)")
    alpha: float | None = option(None, "hotness EMA per step instead: a = alpha whatever the step's tokens (DynaExq: 0.9)")
    update_every_tokens: int | None = option(None, "decide every N routed tokens (default "
                                             f"{UPDATE_EVERY_TOKENS} unless --update-every is given)")
    update_every: int | None = option(None, "decide every N steps (forward passes) instead (DynaExq: 200)")
    hotness_file: str | None = option(None, "load the hotness from this file at start (if it exists) and save it there "
                                    "on close")
    blocking: bool = option(False, "run transitions inline at each decision (ablation: the forward pass waits)")
    retries: int = option(2, "retries of a fetch whose store read fails before it is given up")
    offload_io: str = option("direct", "offload regime: how misses read the store: direct (O_DIRECT), buffered (drop "
                             "the page cache after each read) or cached (keep it: not an offload figure)")

    def __post_init__(self):  # resolve the defaults: tokens unless steps were asked for (0 = that clock is off)
        steps, alpha = self.update_every is not None, self.alpha is not None
        resolved = {"update_every_tokens": 0 if steps else UPDATE_EVERY_TOKENS, "update_every": 0,
                    "half_life_tokens": 0 if alpha else HALF_LIFE_TOKENS, "alpha": 0.9}
        for name, value in resolved.items():
            if getattr(self, name) is None:
                object.__setattr__(self, name, value)
        if self.offload_io not in ("direct", "buffered", "cached") or self.fetch_workers < 0:
            raise UserError(f"--offload-io must be direct, buffered or cached and --fetch-workers >= 0 (0: the "
                            f"default; got {self.offload_io!r}, {self.fetch_workers})")
        if not (self.update_every_tokens or self.update_every) or min(self.update_every, self.update_every_tokens) < 0:
            raise UserError(f"decisions need --update-every-tokens N or --update-every N with N >= 1 (got "
                            f"{self.update_every_tokens}, {self.update_every})")


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
