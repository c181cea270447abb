"""Look-ahead prefetch below the floor (DyMoE, Pre-gated MoE, MoE-Infinity): a forward pre-hook on each MoE layer's
`post_attention_layernorm` takes the hidden state after the attention residual of layer l, applies layer l+1's
norm and router to it, and has the residency (runtime/residency.py) prefetch the experts it predicts while layer
l computes. Installed by the runtime's start for policies with prefetch=1.
"""
from __future__ import annotations

import sys

import torch


def _router_of(block):
    for name in ("gate", "router"):
        m = getattr(block, name, None)
        if isinstance(m, torch.nn.Module):
            return m
    return None


def _predicted(out, k: int) -> torch.Tensor:
    """A router's output -> its top-k expert indices [T, K]: the integer tensor it returns, or the top-k of its
    logits when it returns only scores (DeepSeek-V3's router)."""
    outs = out if isinstance(out, (tuple, list)) else (out,)
    for t in outs:
        if isinstance(t, torch.Tensor) and not t.is_floating_point() and t.dim() == 2:
            return t
    return torch.topk(outs[0].float(), k, dim=-1).indices


def install_lookahead(engine, residency) -> list:
    """Forward pre-hooks predicting layer l+1's experts from layer l's hidden state -> their handles."""
    model, layers = engine.model, sorted(engine.banks)
    names = {bank.layer: name for name, bank in model.named_modules() if bank in engine.banks.values()}
    k = int(getattr(model.config, "num_experts_per_tok", 1))
    found = {}
    for layer in layers:
        block_name = names[layer].rsplit(".", 1)[0]  # ...layers.L.mlp
        decoder = model.get_submodule(block_name.rsplit(".", 1)[0])
        norm, router = getattr(decoder, "post_attention_layernorm", None), _router_of(model.get_submodule(block_name))
        if norm is None or router is None:
            print(f"dynaexq: no post_attention_layernorm / router found for layer {layer}: look-ahead prefetch is off",
                  file=sys.stderr)
            return []
        found[layer] = (norm, router)
    handles = []
    for here, nxt in zip(layers, layers[1:]):
        norm_next, router_next = found[nxt]

        def hook(module, args, nxt=nxt, norm_next=norm_next, router_next=router_next):
            h = args[0]  # [B, S, H]: the residual stream after layer `here`'s attention
            x = norm_next(h).reshape(-1, h.shape[-1])
            idx = _predicted(router_next(x), k)
            residency.prefetch(nxt, torch.unique(idx).tolist())

        handles.append(found[here][0].register_forward_pre_hook(hook))
    return handles
