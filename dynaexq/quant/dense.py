"""Non-expert weights through the experts' own CPU kernels (`--dense int8|bf16`): the attention projections and
any dense or shared-expert MLP.

Every `nn.Linear` of the model outside the experts is replaced by a `DenseLinear` holding its weight in an
expert format (quant/formats.py) — int8: per-row codes with an fp16 scale and zero; bf16: the weight rounded to
bf16 — and run by the native row-major kernel of the grouped expert path (csrc/rowmajor.cpp through
quant/grouped_cpu.py, one "tier" of one expert: fp32 accumulation, one rounding into the model's dtype). Left as
they are: the output head (often tied to the embedding, and the most sensitive matrix; llama.cpp's mixes keep it
higher too), the embedding, the norms and any router (a linear with one output per expert): routing decides
which experts run, its error is not averaged away. Measured on this CPU (no bf16 matmul units; 2.13 CPU wheel,
1 thread, cold weights, bench/generate.py for end to end): a bf16 [4096, 2048] weight at one token 1.38 ms vs
F.linear's 2.28 ms, at 8 tokens 2.24 vs 6.83 ms; int8 halves the bytes again.
"""
from __future__ import annotations

import torch
from torch import nn

from dynaexq.errors import UserError
from dynaexq.quant import grouped_cpu, kernels
from dynaexq.quant.precision import Precision
from dynaexq.quant.quantize import quantize

DENSE = ("model", "int8", "bf16")
_PRECISION = {"int8": Precision.INT8, "bf16": Precision.BF16}


class DenseLinear(nn.Module):
    def __init__(self, linear: nn.Linear, dense: str):
        super().__init__()
        self.in_features, self.out_features, self.dense = linear.in_features, linear.out_features, dense
        self.kernel = kernels.prepare(quantize(linear.weight.detach(), _PRECISION[dense]), "cpu")
        held = self.kernel.qw.tensors() if isinstance(self.kernel, kernels.DequantFallback) else {
            name: getattr(self.kernel, name) for name in self.kernel.tensor_data_names}
        for name, t in held.items():  # buffers: counted among the model's bytes (engine/dynamic.nonexpert_bytes)
            self.register_buffer(name, t)
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().clone())
        spec = grouped_cpu.spec(self.kernel)  # None: no native form (the kernel's own call runs it)
        self._tier = None if spec is None else (spec[0], torch.tensor([spec[1]], dtype=torch.int64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features)
        if self._tier is not None and grouped_cpu.supports(x.dtype):
            x2 = x2.contiguous()
            y = torch.empty(x2.shape[0], self.out_features, dtype=x.dtype)
            grouped_cpu.run(self._tier[0], torch.tensor([x2.shape[0]]), self._tier[1], x2, y)
        else:
            y = self.kernel(x2)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.dense}"


def quantize_dense(model, dense: str = "int8") -> int:
    """Replace the model's non-expert linears in place (see the module doc) -> how many were replaced."""
    if dense not in DENSE:
        raise UserError(f"--dense {dense!r}: valid values are {', '.join(DENSE)}")
    if dense == "model":
        return 0
    device = next(model.parameters()).device
    if device.type != "cpu":
        raise UserError(f"--dense {dense} runs on the CPU only (the native row-major kernel); the model is on {device}")
    experts = getattr(model.config, "num_local_experts", None) or getattr(model.config, "num_experts", None)
    head = model.get_output_embeddings()
    todo = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear) and m is not head
            and m.out_features != experts]
    for name, m in todo:
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, DenseLinear(m, dense))
    return len(todo)
