"""nn.MultiheadAttention through its four projections and the Linear kernel."""
import inspect
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import _ops
from .linear import linear_into


_MHA_SIGNATURE = inspect.signature(nn.MultiheadAttention.forward)


def _additive_mask(mask, shape):
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, device=mask.device).masked_fill(mask, float("-inf")).view(shape)
    return mask.float().view(shape)


def _mha_weights(module):
    """The q, k, v projection weights and biases of a MultiheadAttention."""
    if module._qkv_same_embed_dim:
        weights = list(module.in_proj_weight.chunk(3))
    else:
        weights = [module.q_proj_weight, module.k_proj_weight, module.v_proj_weight]
    biases = list(module.in_proj_bias.chunk(3)) if module.in_proj_bias is not None else [None] * 3
    return weights, biases


def _mha_bufs(module, bufs):
    """The Ω buffer slices matching :func:`_mha_weights`, or None where a parameter is not tracked."""
    if module._qkv_same_embed_dim:
        wbufs = list(bufs["in_proj_weight"].chunk(3)) if "in_proj_weight" in bufs else None
    else:
        names = ("q_proj_weight", "k_proj_weight", "v_proj_weight")
        wbufs = [bufs[k] for k in names] if all(k in bufs for k in names) else None
    bbufs = list(bufs["in_proj_bias"].chunk(3)) if "in_proj_bias" in bufs else [None] * 3
    if wbufs is None or "out_proj.weight" not in bufs or (module.in_proj_bias is not None and bbufs[0] is None):
        return None
    return wbufs, bbufs


def _mha_scores_mask(arg, n, h, length, src):
    """attn_mask and key_padding_mask merged into one additive float mask (or None)."""
    total = None
    attn = arg["attn_mask"]
    for mask, shape in ((attn, (-1, h, length, src) if attn is not None and attn.dim() == 3 else (1, 1, length, src)),
                        (arg["key_padding_mask"], (n, 1, 1, src))):
        m = _additive_mask(mask, shape)
        if m is not None:
            total = m if total is None else total + m
    return total


def _mha_supported(module, arg):
    return (module.bias_k is None and not module.add_zero_attn and arg["query"].dim() == 3
            and _ops.available("linear_importance_") and not (arg["is_causal"] and arg["attn_mask"] is None))


def mha_fused(module, call, bufs, per_sample):
    """nn.MultiheadAttention through its four projections: the attention is recomputed in float32 with the
    projection outputs as leaves, one autograd.grad gives ∂/∂q, ∂/∂k, ∂/∂v from the output gradients,
    and the Linear kernel turns each (input, gradient) pair into the exact per-sample Ω of its slice of
    the projection weights. Exotic configurations (bias_k/v, add_zero_attn, unbatched) return False and
    take the generic path. (g-MAS per sample avoids the recompute: see :func:`mha_tapped_forward`.)"""
    bound = _MHA_SIGNATURE.bind(module, *call.args, **call.kwargs)
    bound.apply_defaults()
    arg = bound.arguments
    query, key, value = arg["query"], arg["key"], arg["value"]
    parts = _mha_bufs(module, bufs) if _mha_supported(module, arg) else None
    if parts is None:
        return False
    e, h = module.embed_dim, module.num_heads
    (weights, biases), (wbufs, bbufs) = _mha_weights(module), parts
    first = (lambda t: t.transpose(0, 1)) if not module.batch_first else (lambda t: t)
    inputs = [first(t).float() for t in (query, key, value)]
    g_out = first(call.grads[0]).float()
    n, length, _ = inputs[0].shape
    with torch.enable_grad():
        proj = [F.linear(x, w.float(), None if b is None else b.float()).detach().requires_grad_()
                for x, w, b in zip(inputs, weights, biases)]
        qh, kh, vh = (p.view(n, p.shape[1], h, e // h).transpose(1, 2) for p in proj)
        scores = qh @ kh.transpose(-2, -1) / math.sqrt(e // h)
        mask = _mha_scores_mask(arg, n, h, length, kh.shape[2])
        if mask is not None:
            scores = scores + mask
        attn = scores.softmax(-1)
        ctx = (attn @ vh).transpose(1, 2).reshape(n, length, e)
        outs, grads = [ctx], [g_out @ module.out_proj.weight.float()]
        if arg["need_weights"] and len(call.grads) > 1:
            outs.append(attn.mean(1) if arg["average_attn_weights"] else attn)
            grads.append(call.grads[1].float())
        dq, dk, dv = torch.autograd.grad(outs, proj, grads, allow_unused=True)
    for x, d, wb, bb in zip(inputs, (dq, dk, dv), wbufs, bbufs):
        if d is not None:
            linear_into(wb, bb, x, d, n, per_sample)
    linear_into(bufs["out_proj.weight"], bufs.get("out_proj.bias"), ctx.detach(), g_out, n, per_sample)
    return True

def mha_tapped_forward(module, tap, *args, **kwargs):
    """nn.MultiheadAttention's forward, decomposed so that g-MAS needs no recompute: the q/k/v projection
    outputs and the output pass through ``tap(outputs, on_grads)``, whose ``on_grads(grads, bufs)`` runs
    in the backward with ∂ at those tensors and feeds the Linear kernel. Returns None where the call is
    not supported (the module's own forward then runs, with the per-call rule)."""
    bound = _MHA_SIGNATURE.bind(module, *args, **kwargs)
    bound.apply_defaults()
    arg = bound.arguments
    if not _mha_supported(module, arg):
        return None
    first = (lambda t: t.transpose(0, 1)) if not module.batch_first else (lambda t: t)
    inputs = [first(arg[k]) for k in ("query", "key", "value")]
    n, length, e = inputs[0].shape
    h = module.num_heads
    proj = [F.linear(x, w, b) for x, w, b in zip(inputs, *_mha_weights(module))]

    def on_proj(grads, bufs):
        for x, d, wb, bb in zip(inputs, grads, *_mha_bufs(module, bufs)):
            linear_into(wb, bb, x, d, n, True)
        inputs.clear()  # the graph outlives this closure: let the activations go now

    qh, kh, vh = (p.view(n, p.shape[1], h, e // h).transpose(1, 2) for p in tap(proj, on_proj))
    mask = _mha_scores_mask(arg, n, h, length, kh.shape[2])
    if mask is not None:
        mask = mask.to(qh.dtype)
    attn_weights = None
    if arg["need_weights"]:
        scores = qh @ kh.transpose(-2, -1) / math.sqrt(e // h)
        attn = (scores if mask is None else scores + mask).softmax(-1)
        ctx = attn @ vh
        attn_weights = attn.mean(1) if arg["average_attn_weights"] else attn
    else:
        ctx = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask)
    ctx = ctx.transpose(1, 2).reshape(n, length, e)
    out = F.linear(ctx, module.out_proj.weight, module.out_proj.bias)
    held = [ctx.detach()]

    def on_out(grads, bufs):
        linear_into(bufs["out_proj.weight"], bufs.get("out_proj.bias"), held.pop(), grads[0], n, True)

    (out,) = tap([out], on_out)
    return first(out), attn_weights
