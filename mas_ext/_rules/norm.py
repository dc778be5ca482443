"""The affine parameters of LayerNorm/GroupNorm/BatchNorm/RMSNorm: per-sample gradients are only N×C.

The RMSNorm classes of the Hugging Face decoder families (LlamaRMSNorm, Qwen2RMSNorm, MistralRMSNorm, …:
``weight * x / sqrt(mean(x²) + eps)`` over the last dim, Gemma's ``(1 + weight) * …`` alike) are
recognised by name, without importing transformers, and each class's first call is checked against that
formula on one row: a class that computes something else takes the generic path.

nn.LayerNorm subclasses with a forward of their own and a ``data_format`` of "channels_last" or
"channels_first" (ConvNeXt's, SAM's, …: the latter normalises over dim 1) take the LayerNorm rule on their
input and gradient with the channels moved last, once each class and layout is seen to compute that."""
import dataclasses

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import _ops
from .base import _VERIFIED, add_abs_sum, close_to, matches_formula, settings_key
from .generic import generic_grads


# T5's RMS norm and its copies (MT5, UMT5, LongT5, Switch Transformers, Pop2Piano, Pix2Struct, UDOP): named LayerNorm
_T5_STYLE = ("T5LayerNorm", "SwitchTransformersLayerNorm", "Pop2PianoLayerNorm", "Pix2StructLayerNorm",
             "UdopLayerNorm")


def is_hf_rmsnorm(module):
    """A Hugging Face-style RMSNorm: a class named ``*RMSNorm`` (or T5's ``*T5LayerNorm`` and its copies) with one
    1-D ``weight`` and an epsilon. Each class is checked against the formula once (:func:`_hf_rmsnorm_matches`)."""
    w = getattr(module, "weight", None)
    name = type(module).__name__
    return ((name.endswith("RMSNorm") or name.endswith(_T5_STYLE)) and not isinstance(module, nn.RMSNorm)
            and isinstance(w, nn.Parameter) and w.dim() == 1 and _hf_eps(module) is not None
            and [k for k, _ in module.named_parameters()] == ["weight"])


def _hf_eps(module):
    eps = getattr(module, "variance_epsilon", getattr(module, "eps", None))
    return float(eps) if isinstance(eps, (int, float)) else None


def _rms(x, eps):
    x = x.float()
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def _hf_rmsnorm_matches(module, call):
    """Whether the class computes weight·x̂ or (1 + weight)·x̂ (the formula the rule uses) over the whole last dim,
    with g·x̂ its gradient at the weight, checked once per class and settings on the call's row of largest norm (a
    row of zeros, a padding token's, would match anything), then on random rows of that scale through the module
    again: a call's rows may not tell (Qwen4Exp's grouped norm on a hidden state repeated once per group, MuseSpark's
    rms((1 + w)·x), equal to (1 + w)·x̂ at its init w = 0 but not in its gradient: both 0.1-13% off until
    2026-12-05)."""
    ndim = call.args[0].dim() if call.args and torch.is_tensor(call.args[0]) else 2
    return matches_formula(module, call, lambda x, y: _rms_formula_holds(module, x, y, ndim), key=settings_key(module))


def hf_rmsnorm_unverified(module):
    """``needs_output`` of the Hugging Face RMSNorm rule: until its class and settings are checked."""
    return settings_key(module) not in _VERIFIED


def _rms_formula_holds(module, x, y, ndim=2):
    w = module.weight.detach().float()

    def holds(xhat, y, tol):
        return close_to(w * xhat, y, tol) or close_to((1 + w) * xhat, y, tol)

    if not holds(_rms(x, _hf_eps(module)), y, 2e-2):  # bfloat16 outputs round to 3 digits
        return False
    # random rows of the call's scale, and ∂⟨module(rows), u⟩/∂weight against Σ u·x̂ for a random u: the module's
    # forward run again in float32 (in bfloat16 a gradient 1/√D off, MuseSpark's at D = 8192, is within its rounding),
    # without its hooks
    gen = torch.Generator().manual_seed(0)
    rows = torch.randn((4, x.shape[-1]), generator=gen).to(x.device) * x.pow(2).mean().sqrt().clamp_min(1e-3)
    u = torch.randn(rows.shape, generator=gen).to(x.device)
    held = module._parameters["weight"]
    weight = held.detach().float().clone().requires_grad_(True)
    try:
        module._parameters["weight"] = weight
        with torch.enable_grad():
            out = module.forward(rows.reshape(*(1,) * max(0, ndim - 2), *rows.shape))  # as many dims as the call's
            got, = torch.autograd.grad(out, weight, u.to(out.dtype).reshape(out.shape))  # as many entries as rows
    except Exception:  # noqa: BLE001 - a forward of another signature or layout (b, t, d = x.shape): not the formula
        return False
    finally:
        module._parameters["weight"] = held
    xhat = _rms(rows, _hf_eps(module))
    return holds(xhat, out.detach().float().reshape(rows.shape), 1e-3) and close_to((u * xhat).sum(0), got.float(), 1e-3)


def _rmsnorm_eps(module, dtype):
    """nn.RMSNorm's epsilon. eps=None is the machine epsilon of the dtype F.rms_norm computes in: float32 for
    float16/bfloat16/float32 inputs, float64 for float64."""
    return torch.finfo(torch.promote_types(dtype, torch.float32)).eps if module.eps is None else module.eps


def _last_dim_norm(module, dtype):
    """(normalized_shape, eps, rms) of a norm over the trailing dims with an affine weight there (LayerNorm,
    RMSNorm, the Hugging Face RMSNorm classes), for an input of ``dtype``; None for the others (GroupNorm,
    BatchNorm: per channel, dim 1)."""
    if isinstance(module, nn.LayerNorm):
        return tuple(module.normalized_shape), module.eps, False
    if isinstance(module, nn.RMSNorm):
        return tuple(module.normalized_shape), _rmsnorm_eps(module, dtype), True
    if is_hf_rmsnorm(module):
        return tuple(module.weight.shape), _hf_eps(module), True
    return None


def _normalised(module, x, last):
    """x̂ of the float32 ``x``; ``last``: the module's :func:`_last_dim_norm`."""
    if last is not None:
        shape, eps, rms = last
        return (F.rms_norm if rms else F.layer_norm)(x, shape, eps=eps)
    if isinstance(module, nn.GroupNorm):
        return F.group_norm(x, module.num_groups, eps=module.eps)
    if module.running_mean is not None and not module.training:
        return F.batch_norm(x, module.running_mean.float(), module.running_var.float(), eps=module.eps)
    return F.batch_norm(x, None, None, training=True, eps=module.eps)  # no running stats: batch statistics


_LAYOUTS = ("channels_last", "channels_first")


def _layout(module):
    """What a LayerNorm subclass's formula is checked once for: its class and ``data_format`` (none: channels last)."""
    return type(module), getattr(module, "data_format", "channels_last")


def is_layernorm_subclass(module):
    """An nn.LayerNorm subclass with a forward of its own, an affine weight (and bias) only, and a ``data_format``
    of :data:`_LAYOUTS` (none: channels last)."""
    return (isinstance(module, nn.LayerNorm) and type(module).forward is not nn.LayerNorm.forward
            and _layout(module)[1] in _LAYOUTS and module.weight is not None
            and {k for k, _ in module.named_parameters()} <= {"weight", "bias"})


def _channels_last(module, call):
    """The call with its input, output and gradients in channels-last layout (as they are for "channels_last"), or
    None where its class is not seen to compute layer_norm over the channels there (the generic rule then)."""
    if _layout(module)[1] == "channels_first":
        def last(t):
            return t.movedim(1, -1) if torch.is_tensor(t) and t.dim() > 1 else t
        call = dataclasses.replace(call, args=(last(call.args[0]), *call.args[1:]), out=last(call.out),
                                   grads=None if call.grads is None else tuple(last(g) for g in call.grads))
    if not (len(call.args) == 1 and not call.kwargs and torch.is_tensor(call.args[0])
            and tuple(call.args[0].shape[-len(module.normalized_shape):]) == tuple(module.normalized_shape)):
        return None
    shape = tuple(module.normalized_shape)

    def holds(x, y):
        bias = None if module.bias is None else module.bias.detach().float()
        want = F.layer_norm(x, shape, module.weight.detach().float(), bias, module.eps)
        return close_to(want, y, 1e-4 if call.args[0].element_size() >= 4 else 2e-2)

    return call if matches_formula(module, call, holds, every_row=True, key=_layout(module)) else None


def layernorm_subclass_grads(module, call, s, e):
    plain = _channels_last(module, call)
    return generic_grads(module, call, s, e) if plain is None else norm_grads(module, plain, s, e)


def layernorm_subclass_fused(module, call, bufs, per_sample):
    plain = _channels_last(module, call)
    return plain is not None and norm_fused(module, plain, bufs, per_sample)


def layernorm_subclass_unverified(module):
    return _layout(module) not in _VERIFIED


def norm_grads(module, call, s, e):
    if is_hf_rmsnorm(module) and not _hf_rmsnorm_matches(module, call):
        return generic_grads(module, call, s, e)
    m = e - s
    last = _last_dim_norm(module, call.args[0].dtype)
    if last is not None:  # affine over the trailing normalized_shape, positions before it (by sample: n blocks)
        shape = (call.n, -1, *last[0])
        x, g = call.args[0].reshape(shape)[s:e].float(), call.g.reshape(shape)[s:e].float()
        xhat = _normalised(module, x, last)
        out = {"weight": (g * xhat).sum(1), "bias": g.sum(1)}
    else:  # per channel (dim 1), positions after it; by sample: n blocks of rows (LeViT's (n·T, C) tokens)
        x, g = call.args[0], call.g
        rows = x.shape[0] // call.n
        x, g = x[s * rows:e * rows].float(), g[s * rows:e * rows].float()
        xhat = _normalised(module, x, last)
        c = x.shape[1]
        out = {"weight": (g * xhat).reshape(m, rows, c, -1).sum((1, 3)), "bias": g.reshape(m, rows, c, -1).sum((1, 3))}
    return {k: v for k, v in out.items() if getattr(module, k, None) is not None}


def norm_fused(module, call, bufs, per_sample):
    """Per-sample norm-affine gradients are only N×C: the compiled op sums them in one pass over x and g (for
    norms over the trailing dims); otherwise they are computed whole, which is already the fused form."""
    if is_hf_rmsnorm(module) and not _hf_rmsnorm_matches(module, call):
        return False
    x = call.args[0]
    last = _last_dim_norm(module, x.dtype)
    if last is not None and "weight" in bufs and _ops.available("norm_affine_importance_"):
        _, eps, rms = last
        c = module.weight.numel()
        n = call.n if per_sample else 1  # per_sample=False: the whole batch as one sample
        bias = bufs["bias"].view(-1) if "bias" in bufs else None
        torch.ops.mas_ext.norm_affine_importance_(bufs["weight"].view(-1), bias, x.reshape(n, -1, c),
                                                  call.g.reshape(n, -1, c), float(eps), rms)
        return True
    pg = norm_grads(module, call, 0, call.n)
    for name, v in pg.items():
        if name in bufs:
            add_abs_sum(bufs[name], v, per_sample)
    return True
