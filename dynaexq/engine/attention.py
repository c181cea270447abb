"""The model's attention as dynaexq runs it: transformers' sdpa, except a decode step over the SlotCache.

`install(model)` registers the attention function "dynaexq" with transformers (and sdpa's mask builder under
the same name) and sets it on the model. A forward the decoder runs as a decode step over its SlotCache passes
`dynaexq_lengths` (each row's valid positions): the attention then reads every row's keys and values in place up
to its own length with the native kernel (quant/attention_cpu.py): no mask, no repeated heads, no copy. Any
other forward (prefill chunks, eval windows, a user's own call, other devices) is transformers' sdpa as before.
In the Llama-family attention modules of BLOCK, such a decode step also skips transformers' forward between the
projections: the queries' and keys' per-head norm (Qwen3), the rotary embedding and the cache write are one native
call (`qk_rope_cache`, csrc/rope.cpp: transformers' roundings, ~15 small ops fewer a layer), then the native
attention and the output projection. The projections are the module's own (DenseLinear or nn.Linear).
"""
from __future__ import annotations

from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from dynaexq.engine.swap import swap_forward
from dynaexq.quant import attention_cpu, lowbit_cpu

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


# Llama-family attention classes (q/k/v/o projections, rotate-half rotary, optional per-head q_norm / k_norm of the
# round-first RMSNorm form) whose decode step `block` computes; the value is whether they have the per-head norms
BLOCK = {"Qwen3MoeAttention": True, "Qwen2MoeAttention": False, "MixtralAttention": False}


def block(module, original, hidden_states, position_embeddings, attention_mask, past_key_values=None, **kwargs):
    """A decode step over the SlotCache in one native call between the projections; any other call: `original`."""
    lengths = kwargs.get("dynaexq_lengths")
    if (lengths is None or hidden_states.shape[1] != 1 or module.training or hidden_states.device.type != "cpu"
            or hidden_states.dtype not in lowbit_cpu._DTYPE_CODE or not hasattr(past_key_values, "decode_buffers")):
        return original(hidden_states, position_embeddings, attention_mask, past_key_values=past_key_values,
                        **kwargs)
    B, D = hidden_states.shape[0], module.head_dim
    q = module.q_proj(hidden_states).view(B, -1, D)
    k = module.k_proj(hidden_states).view(B, -1, D)
    v = module.v_proj(hidden_states).view(B, -1, D)
    keys, values, rows, pos, k_rows, v_rows = past_key_values.decode_buffers(module.layer_idx, k)
    norms = (module.q_norm.weight, module.k_norm.weight, module.q_norm.variance_epsilon) if BLOCK[
        type(module).__name__] else (None, None, 0.0)
    cos, sin = (t.reshape(B, D) for t in position_embeddings)
    q = lowbit_cpu.extension().qk_rope_cache(q.contiguous(), k.contiguous(), v.contiguous(), *norms, cos, sin, keys,
                                             values, rows, pos)  # [B, Hq, D]; this step's keys and values written
    out = attention_cpu.decode_attention(q.unsqueeze(2), k_rows, v_rows, lengths, module.scaling)  # [B, 1, Hq, D]
    return module.o_proj(out.reshape(B, 1, -1)), None


def install(model) -> bool:
    """Use `attention` in `model` when it runs transformers' sdpa now, and `block` in its BLOCK attention modules
    when the native library is there; -> whether `attention` was installed."""
    if getattr(model.config, "_attn_implementation", None) not in ("sdpa", NAME):
        return False
    AttentionInterface.register(NAME, attention)
    AttentionMaskInterface.register(NAME, sdpa_mask)
    model.set_attn_implementation(NAME)
    if lowbit_cpu.extension() is not None:  # `block` looked up per call (tests wrap it)
        swap_forward(model, BLOCK, lambda m, original, *a, **k: block(m, original, *a, **k))
    return True
