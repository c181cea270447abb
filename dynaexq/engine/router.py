"""The model's softmax routers as their logits then one native call (csrc/topk.cpp) instead of transformers' five
eager ops (softmax in fp32, top-k, renormalization, cast), which in a decode step cost ~0.1 ms a layer: the weight
stream has evicted their code and data from the caches by the time they run.

`install(model)` swaps the forward of every router of a class in ROUTERS; below DECODE_ROWS rows (a decode step,
a very short prompt), on the CPU without autograd it computes what transformers' forward does (other calls run
transformers' own: a longer prompt's or an eval window's routing is bit for bit transformers'). The experts are
aten's top-k of the probabilities, as transformers' (equal bf16 logits tie, and a tie goes where aten puts it);
the softmax's exp may differ from aten's in the last bit (a weight one rounding step away). Per class: whether
the top-k weights are renormalized (None: the module's `norm_topk_prob`) and whether they are cast to the
logits' dtype (Mixtral keeps fp32). The logits are the router's own F.linear (the native kernel at decode's few
rows, quant/dense.py's NativeWeight). Other routers (sigmoid, grouped, top-k before softmax) are left alone.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from dynaexq.engine.swap import swap_forward
from dynaexq.quant import lowbit_cpu

DECODE_ROWS = 8  # from here transformers' own forward (prompts, eval windows)
ROUTERS = {"Qwen3MoeTopKRouter": (None, True), "Qwen2MoeTopKRouter": (None, True), "OlmoeTopKRouter": (None, True),
           "MixtralTopKRouter": (True, False)}


def _forward(module, original, hidden_states: torch.Tensor):
    h = hidden_states.reshape(-1, module.hidden_dim)
    if (h.shape[0] >= DECODE_ROWS or h.device.type != "cpu" or h.dtype not in lowbit_cpu._DTYPE_CODE
            or torch.is_grad_enabled()):
        return original(hidden_states)
    logits = F.linear(h, module.weight)  # [T, E]
    renorm, cast = ROUTERS[type(module).__name__]
    weights, index = lowbit_cpu.extension().softmax_topk(
        logits, module.top_k, bool(module.norm_topk_prob if renorm is None else renorm),
        logits.dtype if cast else torch.float32)
    return logits, weights, index


def install(model) -> int:
    """Swap the forward of every known router in `model` (once) -> how many; none without the native library."""
    return 0 if lowbit_cpu.extension() is None else swap_forward(model, ROUTERS, _forward)
