"""Engine: the loaded model plus what the runtime knows about its experts.

`engine.model` is a plain transformers model (`engine.model(input_ids).logits` works as usual);
`engine.generate` streams text; the accessors report what is actually resident.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import torch

from dynaexq.errors import UserError


@dataclass
class Engine:
    model: torch.nn.Module
    tokenizer: object | None
    reader: object  # StoreReader
    banks: dict  # layer -> ExpertBank
    policy: str
    plan: dict = field(repr=False)  # (layer, expert) -> Precision
    backend: str = "cpu"

    def expert_bytes(self) -> int:
        """Bytes of expert weights resident right now (measured on the published versions)."""
        return sum(v.nbytes for bank in self.banks.values() for v in bank.versions if v is not None)

    def precision_counts(self) -> dict[str, int]:
        held = Counter(v.precision.value for bank in self.banks.values() for v in bank.versions if v is not None)
        return dict(held)

    def take_routing_stats(self) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        """Per MoE layer: (token counts [E], routed probability mass [E]) since the last call."""
        return {layer: bank.take_stats() for layer, bank in self.banks.items()}

    @torch.inference_mode()
    def generate(self, prompt: str, max_new_tokens: int = 64, temperature: float = 0.0, streamer=None,
                 seed: int | None = None) -> str:
        if self.tokenizer is None:
            raise UserError("this model has no tokenizer files (tokenizer.json / tokenizer_config.json); "
                            "generation needs one")
        if max_new_tokens <= 0:
            raise UserError(f"max_new_tokens must be a positive integer, got {max_new_tokens}")
        if temperature < 0:
            raise UserError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
        if seed is not None:
            torch.manual_seed(seed)
        inputs = self.tokenizer(prompt, return_tensors="pt").to(self.model.device)
        sampling = {"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False}
        out = self.model.generate(**inputs, max_new_tokens=max_new_tokens, streamer=streamer,
                                  pad_token_id=self.tokenizer.pad_token_id or self.tokenizer.eos_token_id,
                                  **sampling)
        return self.tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
