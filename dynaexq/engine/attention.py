"""The model's attention as dynaexq runs it: transformers' sdpa, except a decode step over the SlotCache.

`install(model)` registers the attention function "dynaexq" with transformers (and sdpa's mask builder under
the same name) and sets it on the model. A forward the decoder runs as a decode step over its SlotCache passes
`dynaexq_lengths` (each row's valid positions): the attention then reads every row's keys and values in place up
to its own length with the native kernel (quant/attention_cpu.py): no mask, no repeated heads, no copy. Any
other forward (prefill chunks, eval windows, a user's own call, other devices) is transformers' sdpa as before.
"""
from __future__ import annotations

from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from dynaexq.quant import attention_cpu

NAME = "dynaexq"


def attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    """transformers' attention-function signature -> (output [B, q, H, Dv], None)."""
    lengths = kwargs.get("dynaexq_lengths")
    if lengths is not None and not module.training and attention_cpu.supports(query, key, value):
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        return attention_cpu.decode_attention(query, key, value, lengths, scale), None
    kwargs.pop("dynaexq_lengths", None)
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                  **kwargs)


def install(model) -> bool:
    """Use `attention` in `model` when it runs transformers' sdpa now; -> whether it was installed."""
    if getattr(model.config, "_attn_implementation", None) not in ("sdpa", NAME):
        return False
    AttentionInterface.register(NAME, attention)
    AttentionMaskInterface.register(NAME, sdpa_mask)
    model.set_attn_implementation(NAME)
    return True
