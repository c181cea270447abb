"""The model's RMSNorms as one native call each (csrc/norm.cpp) instead of transformers' seven eager ops.

`install(model)` gives every RMSNorm module of a known form a forward that runs the kernel on the CPU when the
input and weight share a float dtype, and transformers' own forward otherwise (other devices, mixed dtypes,
training). The two forms the supported models use (ROUND_FIRST, by class name):
  round first: w * round(x * rsqrt(mean(x^2) + eps))   (Llama, Qwen2/3 MoE, Mixtral, OLMoE, DeepSeek-V3)
  round last:  round(w * x * rsqrt(mean(x^2) + eps))   (GPT-OSS)
with round() into the activation dtype and the sum of squares in fp32, as transformers computes them (the sum's
order differs, so a value can land one rounding step away; tests bound it). Other norm classes are left alone.
`reference` is the float64 computation the kernel is tested against.
"""
from __future__ import annotations

import torch

from dynaexq.engine.swap import swap_forward
from dynaexq.quant import lowbit_cpu

ROUND_FIRST = {"LlamaRMSNorm": True, "MistralRMSNorm": True, "MixtralRMSNorm": True, "Qwen2MoeRMSNorm": True,
               "Qwen3MoeRMSNorm": True, "OlmoeRMSNorm": True, "DeepseekV3RMSNorm": True, "GptOssRMSNorm": False}


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, round_first: bool) -> torch.Tensor:
    """x [..., H] and weight [H] of one float dtype, on the CPU -> [..., H] in that dtype."""
    return lowbit_cpu.extension().rms_norm(x, weight, eps, round_first)


def reference(x: torch.Tensor, weight: torch.Tensor, eps: float, round_first: bool) -> torch.Tensor:
    """float64 up to the one intermediate rounding the model's form has -> x's dtype."""
    xd = x.double()
    y = xd * torch.rsqrt(xd.pow(2).mean(-1, keepdim=True) + eps)
    if round_first:
        y = y.to(x.dtype).double()
    return (weight.double() * y).to(x.dtype)


def _forward(module, original, hidden_states: torch.Tensor) -> torch.Tensor:
    w = module.weight
    if (hidden_states.device.type == "cpu" and hidden_states.dtype == w.dtype and w.is_contiguous()
            and hidden_states.dtype in lowbit_cpu._DTYPE_CODE and not torch.is_grad_enabled()):
        return rms_norm(hidden_states, w, module.variance_epsilon, ROUND_FIRST[type(module).__name__])
    return original(hidden_states)


def install(model) -> int:
    """Swap the forward of every known RMSNorm in `model` (once) -> how many; none without the native library."""
    return 0 if lowbit_cpu.extension() is None else swap_forward(model, ROUND_FIRST, _forward)
