"""PEFT's DoRA magnitude (``DoraLinearLayer``, recognised by name without importing peft): on the base layer's
output b (bias removed) and the LoRA path's L = s · B(A(x)), it returns

    y = (m / ‖W + s·BA‖ − 1) ⊙ b + (m / ‖W + s·BA‖) ⊙ L,

linear in the magnitude m with ∂y/∂m = (y + b) / m: each sample's gradient is Σ_positions g ⊙ (y + b) / m, from
the call's output and its ``base_result`` argument, N × out numbers. The generic rule reran the layer (its weight norm,
the LoRA path on an identity matrix and on x) under vmap. Each class's first call is checked to be linear in m so
(run again with 2m: y(2m) = 2y + b); a call without ``base_result`` (dropout in train mode), a zero in m, or a class
that fails the check takes the generic rule."""
import torch
import torch.nn as nn

from .base import add_abs_sum, close_to, matches_formula
from .generic import generic_grads


def is_peft_dora_linear(module):
    """PEFT's ``DoraLinearLayer`` (not its Embedding/Conv subclasses, whose forwards differ): one 1-D ``weight``."""
    w = getattr(module, "weight", None)
    return (type(module).__name__ == "DoraLinearLayer" and isinstance(w, nn.Parameter) and w.dim() == 1
            and [k for k, _ in module.named_parameters()] == ["weight"])


def _base(call):
    """The base layer's output without its bias, (…, out), or None where the call did not pass it."""
    b, layer = call.kwargs.get("base_result"), call.kwargs.get("base_layer")
    if not torch.is_tensor(b) or not torch.is_tensor(call.out) or b.shape != call.out.shape:
        return None
    bias = getattr(layer, "bias", None)
    return b.detach().float() - (bias.detach().float() if torch.is_tensor(bias) else 0.0)


def _linear_in_magnitude(module, call, b):
    """Whether y(2m) = 2y(m) + b: the call run again with the magnitude doubled (once per class)."""
    def holds(base, y):
        doubled = torch.func.functional_call(module, {"weight": 2 * module.weight.detach()}, call.args, call.kwargs)
        return close_to(2 * y + base, doubled.detach().float().reshape(y.shape))

    def rows(c):  # b decides whether the check could tell (y is zero where m is the norm and B is zero: PEFT's start)
        k = c.out.shape[-1]
        return b.reshape(-1, k), c.out.detach().float().reshape(-1, k)

    return matches_formula(module, call, holds, rows=rows, every_row=True)


def _usable(module, call):
    """The base output b where the rule applies to this call, else None (the generic rule then)."""
    b = _base(call)
    if (b is None or (call.out_dims is not None and call.out_dims[0] != 0)
            or not bool((module.weight != 0).all()) or not _linear_in_magnitude(module, call, b)):
        return None
    return b


def _per_sample(module, call, b, s, e):
    c = module.weight.numel()
    y, g = call.out.detach().float().reshape(call.n, -1, c)[s:e], call.g.float().reshape(call.n, -1, c)[s:e]
    return (g * (y + b.reshape(call.n, -1, c)[s:e])).sum(1) / module.weight.detach().float()


def dora_grads(module, call, s, e):
    b = None if call.whole else _usable(module, call)
    if b is None:
        return generic_grads(module, call, s, e)
    return {"weight": _per_sample(module, call, b, s, e)}


def dora_fused(module, call, bufs, per_sample):
    """N × out per-sample gradients: the fused form is to sum their |·| (|Σ| with per_sample=False) at once."""
    b = _usable(module, call)
    if b is None:
        return False
    add_abs_sum(bufs["weight"], _per_sample(module, call, b, 0, call.n), per_sample)
    return True
