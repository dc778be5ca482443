"""The Hugging Face mixture-of-experts layers (``*Experts`` of Mixtral, Qwen2/3-MoE, DeepSeek-V3, OLMoE, Jamba, ...):
expert e maps a token x routed to it with weight w to w · down_e(act(gate_e x) ⊙ up_e x) (or the class's own
``_apply_gate`` of [gate_e; up_e] x: a clamp, a two-argument activation), the weights stored as
``gate_up_proj`` (E, 2I, D) = [gate; up] and ``down_proj`` (E, D, I). Per expert, its tokens' gate/up activations
are recomputed, the gradient at its two projections taken through the activation, and each projection's
Σ_k |Σ_{t ∈ k} g_t a_tᵀ| added by the Linear kernel over the tokens of each sample, padded to a common count: never a
per-sample (E, ·, ·) gradient. The reference path is the generic rule (one VJP per sample)."""
import torch
import torch.nn as nn

from .. import _ops
from .base import close_to, matches_formula
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
