"""Expert hotness: an exponential moving average of routed probability mass, per MoE layer.

Per step, for layer l with N_l routed tokens, c[l, e] = (1/N_l) * sum_t 1[e in topk(t)] * p[l, t, e] (the routing
weight the model gives expert e for token t, as the ExpertBank receives it), and S[l, e] <- a*S[l, e] + (1-a)*c[l, e]
after every step (DynaExq: a = 0.9). With a half-life of h tokens instead, a = 0.5**(N_l/h): a step's weight is
its evidence, so a 32-token prefill chunk moves S as much as 32 one-token decode steps. S stays on the model's device (no host sync per step); the controller reads
it only when it decides. `save`/`load` persist it as JSON (`--hotness-file`), written atomically.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from dynaexq.errors import UserError
from dynaexq.store.layout import atomic_write


class Hotness:
    def __init__(self, layers, num_experts: int, alpha: float = 0.9, device="cpu", half_life: float = 0):
        if not 0 <= alpha < 1 or half_life < 0:
            raise UserError(f"hotness alpha must be in [0, 1) and the half-life >= 0 tokens, got {alpha}, {half_life}")
        self.alpha, self.half_life, self.num_experts = alpha, half_life, num_experts
        self.S = {layer: torch.zeros(num_experts, dtype=torch.float32, device=device) for layer in layers}
        self.steps = 0

    def update(self, stats: dict) -> None:
        """stats: {layer: (routed tokens N_l, routed mass [E])} of one step."""
        for layer, (tokens, mass) in stats.items():
            if tokens:
                a = 0.5 ** (tokens / self.half_life) if self.half_life else self.alpha
                self.S[layer].mul_(a).add_(mass.float() / tokens, alpha=1 - a)
        self.steps += 1

    def set(self, values: dict) -> None:
        """Warm start: S <- values ({layer: mean routed mass per token [E]})."""
        for layer, v in values.items():
            self.S[layer].copy_(torch.as_tensor(v, dtype=torch.float32))

    def snapshot(self) -> dict:
        """{layer: float64 cpu [E]}: one host copy, taken when the controller decides."""
        return {layer: s.double().cpu() for layer, s in self.S.items()}

    def save(self, path) -> None:
        data = {"alpha": self.alpha, "steps": self.steps, "num_experts": self.num_experts,
                "hotness": {str(layer): s.tolist() for layer, s in self.snapshot().items()}}
        atomic_write(Path(path), lambda tmp: Path(tmp).write_text(json.dumps(data)))

    def load(self, path) -> None:
        try:
            data = json.loads(Path(path).read_text())
            values = {int(k): v for k, v in data["hotness"].items()}
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise UserError(f"hotness file {str(path)!r} cannot be read ({err}); it is written by a previous run "
                            "with --hotness-file") from None
        if sorted(values) != sorted(self.S) or any(len(v) != self.num_experts for v in values.values()):
            raise UserError(f"hotness file {str(path)!r} is for MoE layers {sorted(values)} with "
                            f"{len(next(iter(values.values()), []))} experts, this model has layers {sorted(self.S)} "
                            f"with {self.num_experts}: it belongs to another model")
        self.set(values)
