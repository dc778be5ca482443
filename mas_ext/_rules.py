"""Per-layer rules for the exact per-sample importance, one table for every module type.

A rule sees one call of a module: its inputs, its output and the gradient ``g`` arriving at
that output (∂‖f‖²/∂y for g-MAS, y itself for l-MAS). It offers two paths:

- ``grads(module, call, start, end)``: the per-sample parameter gradients of samples
  ``start:end`` as ``{param_name: (end - start, *shape)}`` in float32. Pure PyTorch and
  plainly the definition; the reference path sums ``|·|`` of these over chunks of samples, so
  at most ``CHUNK_ELEMS`` per-sample gradient elements are held at once.
- ``fused(module, call, bufs, per_sample)`` (optional): adds the same Σ_k |∂_k| into ``bufs``
  without materialising per-sample gradients (compiled kernels or non-materialising formulas).
  Returns False where it does not apply, and the reference path runs instead. Which devices have kernels
  is decided once, by ``FusedMAS._kernels_for``, before any fused rule runs.
"""
import inspect
import math
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils._pytree import tree_flatten, tree_unflatten

from . import _ops

CHUNK_ELEMS = 1 << 24  # per-sample gradient elements (64 MiB of float32) the reference path holds at once


@dataclass
class Call:
    """One call of a tracked module within a batch of ``n`` samples."""

    n: int
    args: tuple
    kwargs: dict
    out: object = None
    grads: Optional[tuple] = None  # gradients at the floating outputs, in tree_flatten order
    versions: list = field(default_factory=list)

    @property
    def g(self):
        return self.grads[0]

    def release(self):
        """Drops the tensors, once the call's importance is added."""
        self.args, self.kwargs, self.out, self.grads, self.versions = None, None, None, None, []


@dataclass
class Rule:
    grads: Callable
    fused: Optional[Callable] = None
    cost: Callable = lambda module, call: max(p.numel() for p in module.parameters())  # per-sample elements
    owns_children: bool = False  # the module's forward uses its submodules' parameters directly
    tapped_forward: Optional[Callable] = None  # g-MAS per sample: a forward that taps its own internals


# ----------------------------------------------------------------------------- Linear
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


# ----------------------------------------------------------------------------- Conv
def conv_input(module, x):
    """The conv's input padded as the conv pads it, and the symmetric zero padding left to apply."""
    nd = x.dim() - 2
    if module.padding_mode != "zeros":
        return F.pad(x, module._reversed_padding_repeated_twice, mode=module.padding_mode), [0] * nd
    if isinstance(module.padding, str):  # 'valid' or 'same' (possibly asymmetric)
        return F.pad(x, module._reversed_padding_repeated_twice), [0] * nd
    return x, list(module.padding)


def unfold_nd(x, kernel, stride, padding, dilation):
    """im2col for 1-3 spatial dims: (n, C, *spatial) -> (n, C * prod(kernel), L), weight-layout order."""
    nd = x.dim() - 2
    pads = [p for i in reversed(range(nd)) for p in (padding[i], padding[i])]
    x = F.pad(x, pads)
    for i in range(nd):
        span = dilation[i] * (kernel[i] - 1) + 1
        x = x.unfold(2 + i, span, stride[i])[..., :: dilation[i]]
    # x: (n, C, L1..Lnd, k1..knd) -> (n, C, k1..knd, L1..Lnd)
    perm = [0, 1] + list(range(2 + nd, 2 + 2 * nd)) + list(range(2, 2 + nd))
    x = x.permute(perm)
    return x.reshape(x.shape[0], -1, math.prod(x.shape[2 + nd:]))


def conv_grads(module, call, s, e):
    x, pad = conv_input(module, call.args[0][s:e].float())
    g = call.g[s:e].float()
    m, groups, o = g.shape[0], module.groups, g.shape[1]
    cols = unfold_nd(x, module.kernel_size, module.stride, pad, module.dilation)
    cols = cols.reshape(m, groups, cols.shape[1] // groups, cols.shape[2])
    gg = g.reshape(m, groups, o // groups, -1)
    out = {"weight": torch.einsum("bgol,bgcl->bgoc", gg, cols).reshape(m, *module.weight.shape)}
    if module.bias is not None:
        out["bias"] = g.flatten(2).sum(2)
    return out


def conv_cost(module, call):
    x = call.args[0]
    k = module.weight[0, 0].numel()
    return max(module.weight.numel(), x.shape[1] * k * call.g[0, 0].numel())


def conv_fused(module, call, bufs, per_sample):
    x, g = call.args[0], call.g
    if "weight" not in bufs or not _ops.available("conv_importance_"):
        return False
    x, pad = conv_input(module, x)
    if per_sample:
        torch.ops.mas_ext.conv_importance_(bufs["weight"], bufs.get("bias"), x.contiguous(), g.contiguous(),
                                           list(module.kernel_size), list(module.stride), pad,
                                           list(module.dilation), module.groups)
        return True
    nd = x.dim() - 2
    g, x = g.float(), x.float()  # float32 math for half types, as everywhere else
    _, gw, _ = torch.ops.aten.convolution_backward(g, x, module.weight.float(), None, list(module.stride), pad,
                                                   list(module.dilation), False, [0] * nd, module.groups,
                                                   [False, True, False])
    bufs["weight"] += gw.float().abs()
    if "bias" in bufs:
        bufs["bias"] += g.float().flatten(2).sum((0, 2)).abs()
    return True


# ----------------------------------------------------------------------------- Embedding
def _embedding_operands(module, call):
    idx = call.args[0].reshape(call.n, -1)
    return idx, call.g.reshape(call.n, idx.shape[1], module.embedding_dim)


def _embedding_rows(module, idx, g, per_sample):
    """Flat (key, row gradient) pairs of idx (n, T), g (n, T, D): key = sample * V + index, or index alone."""
    v = module.num_embeddings
    g = g.float().reshape(-1, module.embedding_dim)
    sample = torch.arange(idx.shape[0], device=idx.device).unsqueeze(1) if per_sample else 0
    key = (sample * v + idx).reshape(-1)
    if module.padding_idx is not None:
        g = g * (idx.reshape(-1) != module.padding_idx).unsqueeze(1)
    if module.scale_grad_by_freq:  # frequencies within each sample (within the batch when per_sample=False)
        _, inv, cnt = torch.unique(key, return_inverse=True, return_counts=True)
        g = g / cnt[inv].unsqueeze(1)
    return key, g


def embedding_grads(module, call, s, e):
    v = module.num_embeddings
    idx, g = _embedding_operands(module, call)
    key, g = _embedding_rows(module, idx[s:e], g[s:e], per_sample=True)
    dense = torch.zeros((e - s) * v, module.embedding_dim, device=g.device).index_add_(0, key, g)
    return {"weight": dense.view(e - s, v, module.embedding_dim)}


def embedding_fused(module, call, bufs, per_sample):
    if "weight" not in bufs:
        return False
    key, g = _embedding_rows(module, *_embedding_operands(module, call), per_sample)
    uniq, inv = torch.unique(key, return_inverse=True)
    per_key = torch.zeros(len(uniq), module.embedding_dim, device=g.device).index_add_(0, inv, g)
    bufs["weight"].index_add_(0, uniq % module.num_embeddings, per_key.abs())
    return True


# ----------------------------------------------------------------------------- normalisation layers
def _normalised(module, x):
    if isinstance(module, nn.LayerNorm):
        return F.layer_norm(x, module.normalized_shape, eps=module.eps)
    if isinstance(module, nn.GroupNorm):
        return F.group_norm(x, module.num_groups, eps=module.eps)
    if module.running_mean is not None and not module.training:
        return F.batch_norm(x, module.running_mean.float(), module.running_var.float(), eps=module.eps)
    return F.batch_norm(x, None, None, training=True, eps=module.eps)  # no running stats: batch statistics


def norm_grads(module, call, s, e):
    x, g = call.args[0][s:e].float(), call.g[s:e].float()
    m = e - s
    xhat = _normalised(module, x)
    if isinstance(module, nn.LayerNorm):  # affine over the trailing normalized_shape, positions before it
        shape = (m, -1, *module.normalized_shape)
        out = {"weight": (g * xhat).reshape(shape).sum(1), "bias": g.reshape(shape).sum(1)}
    else:  # per channel (dim 1), positions after it
        c = x.shape[1]
        out = {"weight": (g * xhat).reshape(m, c, -1).sum(2), "bias": g.reshape(m, c, -1).sum(2)}
    return {k: v for k, v in out.items() if getattr(module, k, None) is not None}


def norm_fused(module, call, bufs, per_sample):
    """Per-sample norm-affine gradients are only N×C: computing them whole is already the fused form."""
    pg = norm_grads(module, call, 0, call.n)
    for name, v in pg.items():
        if name in bufs:
            bufs[name] += v.abs().sum(0) if per_sample else v.sum(0).abs()
    return True


# ----------------------------------------------------------------------------- any other module (torch.func)
def _batch_dim(t, n, preferred):
    if not torch.is_tensor(t):
        return None
    if t.dim() > preferred and t.shape[preferred] == n:
        return preferred
    return next((i for i, size in enumerate(t.shape) if size == n), None)


def _output_batch_dim(full, one, n):
    """The dim along which an output has the batch: size n in the batch's output, 1 in one sample's."""
    if not torch.is_tensor(one) or full.dim() != one.dim():
        return None
    dims = [i for i in range(full.dim()) if full.shape[i] == n and one.shape[i] == 1
            and full.shape[:i] + full.shape[i + 1:] == one.shape[:i] + one.shape[i + 1:]]
    return dims[0] if dims else None


# Arguments that hold no per-sample dim even where a size happens to equal the batch size.
_SHARED_ARGUMENTS = {nn.MultiheadAttention: ("attn_mask",)}


def generic_grads(module, call, s, e, names=None):
    """Per-sample gradients of the module's own parameters (recursively), by torch.func over that module only.

    Inputs carry the batch in dim 0 (dim 1 for modules with ``batch_first=False``), else in their first
    dim of the batch's size; tensors without one are shared by all samples. Each output's batch dim is
    found by running the module on one sample: the dim that shrinks from n to 1.
    """
    n = call.n
    preferred = 1 if getattr(module, "batch_first", True) is False else 0
    args, kwargs = call.args, call.kwargs
    shared = _SHARED_ARGUMENTS.get(type(module), ())
    if shared:  # name every argument, so that those never indexed by sample are known
        bound = inspect.signature(type(module).forward).bind(module, *args, **kwargs).arguments
        args, kwargs = (), {k: v for k, v in bound.items() if k != "self"}
    flat_in, spec_in = tree_flatten((args, kwargs))
    in_dims = [_batch_dim(t, n, preferred) for t in flat_in]
    for name in shared:
        if kwargs.get(name) is not None:
            at = next(i for i, t in enumerate(flat_in) if t is kwargs[name])
            in_dims[at] = None
    flat_out, _ = tree_flatten(call.out)
    out_pos = [i for i, t in enumerate(flat_out) if torch.is_tensor(t) and t.is_floating_point()]
    with torch.no_grad():
        first = [t.narrow(d, 0, 1) if d is not None else t for t, d in zip(flat_in, in_dims)]
        args, kwargs = tree_unflatten(first, spec_in)
        probe = tree_flatten(module(*args, **kwargs))[0]
    out_dims = [_output_batch_dim(flat_out[i], probe[i], n) for i in out_pos]
    params = dict(module.named_parameters())
    tracked = {k: v.detach() for k, v in params.items() if names is None or k in names}
    frozen = {k: v.detach() for k, v in params.items() if k not in tracked}
    frozen.update(dict(module.named_buffers()))

    def outputs(theta, *inputs_k):
        inputs = [x.unsqueeze(d) if d is not None else x for x, d in zip(inputs_k, in_dims)]
        args, kwargs = tree_unflatten(inputs, spec_in)
        out = tree_flatten(torch.func.functional_call(module, {**theta, **frozen}, tuple(args), kwargs))[0]
        return tuple(out[i].squeeze(d) if d is not None else out[i] for i, d in zip(out_pos, out_dims))

    def one_sample(inputs_k, grads_k):
        _, vjp = torch.func.vjp(lambda theta: outputs(theta, *inputs_k), tracked)
        return vjp(tuple(grads_k))[0]

    def rows(t, d):
        return t.narrow(d, s, e - s) if d is not None else t

    inputs = tuple(rows(t, d) for t, d in zip(flat_in, in_dims))
    grads = tuple(rows(g if g is not None else torch.zeros_like(flat_out[i]), d)
                  for g, i, d in zip(call.grads, out_pos, out_dims))
    per_sample = torch.func.vmap(one_sample, in_dims=(tuple(in_dims), tuple(out_dims)))(inputs, grads)
    return {k: v.float() for k, v in per_sample.items()}


GENERIC = Rule(generic_grads)


# ----------------------------------------------------------------------------- MultiheadAttention
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


RULES = {
    nn.Linear: Rule(linear_grads, linear_fused),
    nn.Conv1d: Rule(conv_grads, conv_fused, conv_cost),
    nn.Conv2d: Rule(conv_grads, conv_fused, conv_cost),
    nn.Conv3d: Rule(conv_grads, conv_fused, conv_cost),
    nn.Embedding: Rule(embedding_grads, embedding_fused, lambda m, c: m.weight.numel()),
    nn.LayerNorm: Rule(norm_grads, norm_fused),
    nn.GroupNorm: Rule(norm_grads, norm_fused),
    nn.BatchNorm1d: Rule(norm_grads, norm_fused),
    nn.BatchNorm2d: Rule(norm_grads, norm_fused),
    nn.BatchNorm3d: Rule(norm_grads, norm_fused),
    nn.MultiheadAttention: Rule(generic_grads, mha_fused, owns_children=True, tapped_forward=mha_tapped_forward),
}


def rule_for(module):
    """The table's rule for a module whose forward is its class's own, else None."""
    for cls, rule in RULES.items():
        if isinstance(module, cls) and type(module).forward is cls.forward:
            return rule
    return None
