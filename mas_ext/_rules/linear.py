"""nn.Linear: Σ_k |Σ_p g_kp a_kpᵀ| by the compiled linear_importance_ op, or per-sample bmm; an nn.Linear subclass
with a forward of its own (Falcon's FalconLinear) once its class is seen to compute x Wᵀ + b; and GPT-2's
``Conv1D`` (transformers.pytorch_utils), a Linear whose weight is stored transposed, (in, out)."""
import torch
import torch.nn as nn

from .. import _ops
from .base import CHUNK_ELEMS, add_abs_sum, close_to, matches_formula
from .generic import generic_grads


def _linear_operands(module, call):
    """(n, positions, features) views of input and gradient: leading dims are batch-major."""
    a, g = call.args[0], call.g
    return a.reshape(call.n, -1, a.shape[-1]), g.reshape(call.n, -1, g.shape[-1])


def linear_grads(module, call, s, e):
    a, g = _linear_operands(module, call)
    a, g = a[s:e].float(), g[s:e].float()
    out = {"weight": torch.bmm(g.transpose(1, 2), a)}
    if module.bias is not None:
        out["bias"] = g.sum(1)
    return out


def linear_into(buf_w, buf_b, a, g, n, per_sample):
    """Adds Σ_k |Σ_p g_kp a_kpᵀ| (or |Σ_kp g a ᵀ|) into buf_w/buf_b with the compiled kernel."""
    a, g = a.reshape(n, -1, a.shape[-1]), g.reshape(n, -1, g.shape[-1])
    if not per_sample:  # the whole batch as one sample: |Σ_k ∂_k|
        a, g = a.reshape(1, -1, a.shape[-1]), g.reshape(1, -1, g.shape[-1])
    torch.ops.mas_ext.linear_importance_(buf_w, buf_b, a.contiguous(), g.contiguous())


def linear_fused(module, call, bufs, per_sample):
    if "weight" not in bufs or not _ops.available("linear_importance_"):
        return False
    linear_into(bufs["weight"], bufs.get("bias"), call.args[0], call.g, call.n, per_sample)
    return True


def linear_calls_fused(calls, bufs, per_sample):
    """Several calls of nn.Linear layers with the same weight and bias in one pass (DeBERTa-v2's query_proj on the
    tokens and on its relative embeddings; ALBERT's layers, shared across depth): Σ_k |Σ_calls Σ_p g_kp a_kpᵀ| by
    one call of the compiled op over each sample's positions of all the calls, concatenated. ``calls`` are (unit,
    Call) pairs, ``bufs`` the batch's buffers by global name; False where they are not such calls."""
    if len(calls) < 2 or not _ops.available("linear_importance_"):
        return False
    unit, first = calls[0]
    weight, bias = unit.names.get("weight"), unit.names.get("bias")
    if weight is None or any(u.rule.grads is not linear_grads or c.n != first.n
                             or (u.names.get("weight"), u.names.get("bias")) != (weight, bias)
                             or c.args[0].dtype != first.args[0].dtype or c.g.dtype != first.g.dtype
                             for u, c in calls):
        return False
    operands = [_linear_operands(u.module, c) for u, c in calls]
    n = first.n
    # the concatenated copies, in chunks of samples of bounded size (Σ_k |·| adds up over samples; |Σ_k ·| does not)
    per = sum(a.shape[1] * (a.shape[2] + g.shape[2]) for a, g in operands)
    step = max(1, CHUNK_ELEMS // max(1, per)) if per_sample else n
    for s in range(0, n, step):
        e = min(n, s + step)
        linear_into(bufs[weight], None if bias is None else bufs[bias], torch.cat([a[s:e] for a, _ in operands], 1),
                    torch.cat([g[s:e] for _, g in operands], 1), e - s, per_sample)
    return True


def is_hf_conv1d(module):
    """GPT-2's Conv1D, recognised by name without importing transformers: ``y = x @ weight + bias``,
    weight (in, nf)."""
    w = getattr(module, "weight", None)
    return (type(module).__name__ == "Conv1D" and isinstance(w, torch.nn.Parameter) and w.dim() == 2
            and w.shape[1] == getattr(module, "nf", None))


def _affine_holds(module, weight_in_out, x, y, tol=2e-2):
    """Whether rows y are x @ weight_in_out + the module's bias, to ``tol`` (the Conv1D and Linear-subclass checks)."""
    want = x @ weight_in_out.detach().float()
    if module.bias is not None:
        want = want + module.bias.detach().float()
    return close_to(want, y, tol)


def _conv1d_matches(module, call):
    """Whether the class computes x @ weight + bias (a same-named class may differ), checked once per class."""
    return matches_formula(module, call, lambda x, y: _affine_holds(module, module.weight, x, y))


def conv1d_grads(module, call, s, e):
    if not _conv1d_matches(module, call):
        return generic_grads(module, call, s, e)
    out = linear_grads(module, call, s, e)
    out["weight"] = out["weight"].transpose(1, 2)  # (in, out), Conv1D's layout
    return out


def conv1d_fused(module, call, bufs, per_sample):
    """The Linear kernel with the roles of input and gradient swapped gives the (in, out) weight layout."""
    if "weight" not in bufs or not _ops.available("linear_importance_") or not _conv1d_matches(module, call):
        return False
    a, g = _linear_operands(module, call)
    linear_into(bufs["weight"], None, g, a, call.n, per_sample)
    if "bias" in bufs:
        add_abs_sum(bufs["bias"], g.float().sum(1), per_sample)
    return True


def is_linear_subclass(module):
    """An nn.Linear subclass whose forward is its own (Falcon's FalconLinear: ``input @ weight.T + bias``): the Linear
    rule once its class is seen to compute that, else the generic rule."""
    return (isinstance(module, nn.Linear) and type(module).forward is not nn.Linear.forward
            and {k for k, _ in module.named_parameters()} <= {"weight", "bias"})  # no parameters of its own beside


def _plain_call(module, call):
    """Whether the call is the Linear rule's: one floating input (…, in) as its only argument, one gradient (…, out)
    (a call with other arguments, as Ovis2.5's lookup=True, or other outputs, as the routers' tuples, is not)."""
    x = call.args[0] if len(call.args) == 1 and not call.kwargs else None
    g = call.grads[0] if call.grads is not None and len(call.grads) == 1 else None
    return (torch.is_tensor(x) and x.is_floating_point() and x.shape[-1] == module.in_features and g is not None
            and g.shape[:-1] == x.shape[:-1] and g.shape[-1] == module.out_features)


def _subclass_matches(module, call):
    """Whether the call is a plain one and the class computes x Wᵀ + b, checked once per class on every row of a
    call, to the rounding of its dtype (a subclass that scales its output by 1.015, or changes one token, fails)."""
    def rows(call):
        x = call.args[0].detach()
        return x.reshape(-1, x.shape[-1]).float(), call.out.detach().reshape(-1, module.out_features).float()

    def holds(x, y):
        return _affine_holds(module, module.weight.t(), x, y, 1e-4 if call.args[0].element_size() >= 4 else 1e-2)

    return _plain_call(module, call) and matches_formula(module, call, holds, rows, every_row=True)


def linear_subclass_grads(module, call, s, e):
    if not _subclass_matches(module, call):
        return generic_grads(module, call, s, e)
    return linear_grads(module, call, s, e)


def linear_subclass_fused(module, call, bufs, per_sample):
    return _subclass_matches(module, call) and linear_fused(module, call, bufs, per_sample)
