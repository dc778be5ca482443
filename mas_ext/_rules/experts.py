"""The Hugging Face mixture-of-experts layers (``*Experts`` of Mixtral, Qwen2/3-MoE, DeepSeek-V3, OLMoE, Jamba, ...):
expert e maps a token x routed to it with weight w to w · down_e(act(gate_e x) ⊙ up_e x) (or the class's own
``_apply_gate`` of [gate_e; up_e] x: a clamp, a two-argument activation), the weights stored as
``gate_up_proj`` (E, 2I, D) = [gate; up] and ``down_proj`` (E, D, I). Per expert, its tokens' gate/up activations
are recomputed, the gradient at its two projections taken through the activation, and each projection's
Σ_k |Σ_{t ∈ k} g_t a_tᵀ| added by the Linear kernel over the tokens of each sample, padded to a common count: never a
per-sample (E, ·, ·) gradient. The reference path is the generic rule (one VJP per sample).

Llama 4's ``*Experts`` store the projections transposed, ``gate_up_proj`` (E, D, 2I) and ``down_proj`` (E, I, D),
and run every expert on every token: the call's (E·N, D) rows are expert e's N tokens (scaled by their routing
score) in block e, each block the batch's tokens, sample-major. Sample k's rows of expert e are then block (e, k) of
the input viewed (E, n, T, D), for the reference path (per-sample einsums) and the fused one alike."""
import inspect

import torch
import torch.nn as nn

from .. import _ops
from .base import close_to, matches_formula
from .generic import generic_grads
from .linear import linear_into

_ARGS = ("hidden_states", "top_k_index", "top_k_weights")


def is_hf_experts(module):
    """A class named ``*Experts`` with exactly ``gate_up_proj`` (E, 2I, D) and ``down_proj`` (E, D, I) and an
    ``act_fn``: the layout above, checked once per class against a call's output."""
    params = dict(module.named_parameters())
    gu, down = params.get("gate_up_proj"), params.get("down_proj")
    return (type(module).__name__.endswith("Experts") and set(params) == {"gate_up_proj", "down_proj"}
            and callable(getattr(module, "act_fn", None)) and gu.dim() == 3 and down.dim() == 3
            and gu.shape[0] == down.shape[0] and gu.shape[1] == 2 * down.shape[2] and gu.shape[2] == down.shape[1])


def _operands(call):
    """(hidden_states (N, D), top_k_index (N, K), top_k_weights (N, K)) of the call, or None."""
    args = list(call.args) + [call.kwargs.get(k) for k in _ARGS[len(call.args):]]
    if len(args) != 3 or not all(torch.is_tensor(a) for a in args):
        return None
    x, idx, w = args
    if x.dim() != 2 or idx.shape != w.shape or idx.dim() != 2 or idx.shape[0] != x.shape[0]:
        return None
    return x, idx, w


def _gated(module, gate_up):
    """The expert's hidden (P, I) from its gate/up projection (P, 2I): the class's own ``_apply_gate`` where it has
    one (transformers' experts: a clamp, a two-argument activation), else act(gate) ⊙ up."""
    if callable(getattr(module, "_apply_gate", None)):
        return module._apply_gate(gate_up)
    gate, up = gate_up.chunk(2, dim=-1)
    return module.act_fn(gate) * up


def _hidden(module, e, x):
    """The hidden (P, I) of expert e on tokens x (P, D)."""
    return _gated(module, nn.functional.linear(x, module.gate_up_proj[e]))


def _matches(module, call, ops):
    """Whether the class computes Σ_k w_k · down_e(gated(gate_up_e x)), checked once per class on a row."""
    x, idx, w = ops
    k = idx.shape[1]

    def rows(call):  # the routing rides along with the output row
        y = call.out.detach().reshape(x.shape[0], -1).float() if torch.is_tensor(call.out) else torch.full(
            (x.shape[0], 1), float("nan"))
        return x.detach().float(), torch.cat([y, idx.float(), w.detach().float()], 1)

    def holds(xr, yr):
        y, ids, ws = yr[:, :-2 * k], yr[0, -2 * k:-k].long(), yr[0, -k:]
        if y.shape[1] != x.shape[1] or torch.isnan(y).any():
            return False
        want = torch.zeros_like(y)
        try:
            with torch.no_grad():
                for e, we in zip(ids.tolist(), ws):
                    if 0 <= e < module.gate_up_proj.shape[0]:
                        h = _hidden(module, e, xr.to(module.gate_up_proj.dtype))
                        want += we * nn.functional.linear(h, module.down_proj[e]).float()
        except (TypeError, RuntimeError):  # an act_fn of another signature, shapes of another layout
            return False
        return close_to(want, y)

    return matches_formula(module, call, holds, rows)


def experts_fused(module, call, bufs, per_sample):
    ops = _operands(call)
    if ops is None or not bufs or not _ops.available("linear_importance_") or not _matches(module, call, ops):
        return False
    x, idx, w = ops
    g = call.g.reshape(x.shape)
    n = call.n if per_sample else 1
    if x.shape[0] % n:
        return False
    m = x.shape[0] // n  # tokens per sample: the call's rows are n blocks, one per sample
    for e in torch.unique(idx).tolist():
        if not 0 <= e < module.gate_up_proj.shape[0]:
            continue
        tok, slot = torch.where(idx == e)  # ascending tokens: sample-major
        ge = (g[tok] * w[tok, slot, None]).to(x.dtype)  # the gradient at the expert's down projection output
        with torch.enable_grad():  # the gradient at the gate/up projection's output, through the activation
            gu = nn.functional.linear(x[tok].detach(), module.gate_up_proj[e].detach()).requires_grad_(True)
            h = _gated(module, gu)
            dgu, = torch.autograd.grad(h, gu, ge @ module.down_proj[e].detach())
        sample = tok // m
        counts = torch.bincount(sample, minlength=n)
        width = int(counts.max())
        pos = torch.arange(len(tok), device=tok.device) - (torch.cumsum(counts, 0) - counts)[sample]

        def packed(v):
            out = v.new_zeros(n, width, v.shape[-1])
            out[sample, pos] = v
            return out

        if "gate_up_proj" in bufs:
            linear_into(bufs["gate_up_proj"][e], None, packed(x[tok].detach()), packed(dgu), n, True)
        if "down_proj" in bufs:
            linear_into(bufs["down_proj"][e], None, packed(h.detach()), packed(ge), n, True)
    return True


def is_dense_experts(module):
    """A class named ``*Experts`` with exactly ``gate_up_proj`` (E, D, 2I) and ``down_proj`` (E, I, D), an ``act_fn``
    and a forward of one input (Llama 4's; Aria's routed experts take their routing too): every expert on every token,
    as above; its formula is checked once per class."""
    try:
        if len(inspect.signature(type(module).forward).parameters) != 2:
            return False
    except (TypeError, ValueError):
        return False
    params = dict(module.named_parameters())
    gu, down = params.get("gate_up_proj"), params.get("down_proj")
    return (type(module).__name__.endswith("Experts") and set(params) == {"gate_up_proj", "down_proj"}
            and callable(getattr(module, "act_fn", None)) and gu.dim() == 3 and down.dim() == 3
            and gu.shape[0] == down.shape[0] and gu.shape[2] == 2 * down.shape[1] and gu.shape[1] == down.shape[2]
            and not is_hf_experts(module))


def _dense_hidden(module, gate_up):
    """up ⊙ act(gate) from the (…, 2I) projection [gate, up]."""
    gate, up = gate_up.chunk(2, dim=-1)
    return up * module.act_fn(gate)


def _dense_operands(module, call):
    """The call's (E, n, T, D) input and output gradient (n = 1 for a whole call), or None where it is not one
    input of (E·n·T, D) rows."""
    if len(call.args) != 1 or call.kwargs or call.grads is None or len(call.grads) != 1:
        return None
    x, g = call.args[0], call.g
    e, d = module.gate_up_proj.shape[:2]
    if not torch.is_tensor(x) or x.dim() != 2 or x.shape[1] != d or g.shape != x.shape or x.shape[0] % (e * call.n):
        return None
    return x.reshape(e, call.n, -1, d), g.reshape(e, call.n, -1, d)


def _dense_matches(module, call):
    """Whether the class computes, on block e of its rows, (up ⊙ act(gate)) down_e with [gate, up] = x gate_up_e,
    checked once per class on a row."""
    e = module.gate_up_proj.shape[0]

    def rows(call):  # the expert of each row rides along with the output row
        x = call.args[0].detach()
        y = call.out.detach().float() if torch.is_tensor(call.out) and call.out.shape == x.shape else torch.full(
            x.shape, float("nan"))
        expert = torch.arange(e, device=x.device).repeat_interleave(x.shape[0] // e)[:, None].float()
        return x.float(), torch.cat([y, expert], 1)

    def holds(xr, yr):
        y, k = yr[:, :-1], int(yr[0, -1])
        if torch.isnan(y).any():
            return False
        with torch.no_grad():
            want = _dense_hidden(module, xr.to(module.gate_up_proj.dtype) @ module.gate_up_proj[k]) @ module.down_proj[k]
        return close_to(want.float(), y)

    return torch.is_tensor(call.args[0]) and call.args[0].shape[0] % e == 0 and matches_formula(
        module, call, holds, rows)


def _dense_backward(module, x, g, experts=slice(None)):
    """(h, ∂/∂[gate, up]) of the tokens of ``experts``: x, g (E, …, T, D) → h (E, …, T, I), dgu (E, …, T, 2I)."""
    w = module.gate_up_proj[experts].detach().to(x.dtype)
    down = module.down_proj[experts].detach().to(x.dtype)
    shape = x.shape
    x, g = x.reshape(shape[0], -1, shape[-1]), g.reshape(shape[0], -1, shape[-1])
    with torch.enable_grad():
        gu = torch.bmm(x.detach(), w).requires_grad_(True)
        h = _dense_hidden(module, gu)
        dgu, = torch.autograd.grad(h, gu, torch.bmm(g, down.transpose(1, 2)))
    return h.detach().reshape(*shape[:-1], -1), dgu.reshape(*shape[:-1], -1)


def dense_experts_grads(module, call, s, e):
    ops = _dense_operands(module, call) if _dense_matches(module, call) else None
    if ops is None:
        return generic_grads(module, call, s, e)
    x, g = (t[:, s:e].float() for t in ops)
    h, dgu = _dense_backward(module, x, g)
    return {"gate_up_proj": torch.einsum("ektd,ekto->kedo", x, dgu),
            "down_proj": torch.einsum("ekti,ektd->keid", h, g)}


def dense_experts_fused(module, call, bufs, per_sample):
    ops = _dense_operands(module, call)
    if ops is None or not bufs or not _ops.available("linear_importance_") or not _dense_matches(module, call):
        return False
    x, g = ops
    n = call.n if per_sample else 1
    for e in range(x.shape[0]):  # expert e: Σ_k |Σ_t x_tᵀ dgu_t| (D, 2I) and Σ_k |Σ_t h_tᵀ g_t| (I, D)
        xe, ge = x[e].detach(), g[e].to(x.dtype)
        h, dgu = _dense_backward(module, xe[None], ge[None], slice(e, e + 1))
        if "gate_up_proj" in bufs:
            linear_into(bufs["gate_up_proj"][e], None, dgu[0], xe, n, per_sample)
        if "down_proj" in bufs:
            linear_into(bufs["down_proj"][e], None, ge, h[0], n, per_sample)
    return True
