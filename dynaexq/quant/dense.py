"""Non-expert weights at int8 (`--dense int8`): the attention projections and any dense or shared-expert MLP.

Every `nn.Linear` of the model outside the experts is replaced by an `Int8Linear`: the experts' own int8 format
(quant/formats.py: per-row codes with an fp16 scale and zero) run by the experts' int8 CPU kernel
(quant/kernels.py `Int8Cpu`: aten's `_weight_int8pack_mm` on bf16 activations), the result in the model's
dtype. Left as they are: the output head (often tied to the embedding, and the most sensitive matrix;
llama.cpp's mixes keep it higher too), the embedding, the norms and any router (a linear with one output per
expert): routing decides which experts run, its error is not averaged away. On CPUs without bf16 matmul units
the dense layers run in float32, so this quarters their bytes and, measured on 2048 x 2048 (2.13 CPU wheel):
0.14 ms vs 0.33 ms at one token.
"""
from __future__ import annotations

import torch
from torch import nn

from dynaexq.errors import UserError
from dynaexq.quant import kernels
from dynaexq.quant.precision import Precision
from dynaexq.quant.quantize import quantize

DENSE = ("model", "int8")


class Int8Linear(nn.Module):
    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.kernel = kernels.prepare(quantize(linear.weight.detach(), Precision.INT8), "cpu")
        held = self.kernel.qw.tensors() if isinstance(self.kernel, kernels.DequantFallback) else {
            name: getattr(self.kernel, name) for name in self.kernel.tensor_data_names}
        for name, t in held.items():  # buffers: counted among the model's bytes (engine/dynamic.nonexpert_bytes)
            self.register_buffer(name, t)
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.kernel(x.reshape(-1, self.in_features))
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 per row"


def quantize_dense(model, dense: str = "int8") -> int:
    """Replace the model's non-expert linears in place (see the module doc) -> how many were replaced."""
    if dense not in DENSE:
        raise UserError(f"--dense {dense!r}: valid values are {', '.join(DENSE)}")
    if dense == "model":
        return 0
    device = next(model.parameters()).device
    if device.type != "cpu":
        raise UserError(f"--dense int8 runs on the CPU only (aten's int8-weight kernel); the model is on {device}")
    experts = getattr(model.config, "num_local_experts", None) or getattr(model.config, "num_experts", None)
    head = model.get_output_embeddings()
    todo = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear) and m is not head
            and m.out_features != experts]
    for name, m in todo:
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, Int8Linear(m))
    return len(todo)
