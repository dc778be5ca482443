"""nn.Conv1d/2d/3d: per-sample weight gradients by im2col, or the compiled conv_importance_ op; a call on n blocks of
rows (Qwen2-VL's patch embedding) by the Linear kernel over each sample's im2col columns."""
import math

import torch
import torch.nn.functional as F

from .. import _ops
from .linear import linear_into


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


def _rows_per_sample(call):
    """How many of the call's input rows each sample has: 1, or m where the call holds the n samples as n blocks of m
    rows (Qwen2-VL's patch embedding: the patches of the batch's images, (n·m, C, t, p, p))."""
    return call.args[0].shape[0] // call.n if call.rows is not None else 1


def conv_grads(module, call, s, e):
    r = _rows_per_sample(call)
    x, pad = conv_input(module, call.args[0][s * r:e * r].float())
    g = call.g[s * r:e * r].float()
    m, groups, o = g.shape[0], module.groups, g.shape[1]
    cols = unfold_nd(x, module.kernel_size, module.stride, pad, module.dilation)
    cols = cols.reshape(m, groups, cols.shape[1] // groups, cols.shape[2])
    gg = g.reshape(m, groups, o // groups, -1)
    out = {"weight": torch.einsum("bgol,bgcl->bgoc", gg, cols).reshape(m, *module.weight.shape)}
    if module.bias is not None:
        out["bias"] = g.flatten(2).sum(2)
    return {k: v.reshape(e - s, r, *v.shape[1:]).sum(1) for k, v in out.items()} if r > 1 else out


def conv_cost(module, call):
    x = call.args[0]
    k = module.weight[0, 0].numel()
    return max(module.weight.numel(), x.shape[1] * k * call.g[0, 0].numel()) * _rows_per_sample(call)


def conv_fused(module, call, bufs, per_sample):
    x, g = call.args[0], call.g
    if "weight" not in bufs or not _ops.available("conv_importance_"):
        return False
    x, pad = conv_input(module, x)
    r = _rows_per_sample(call)
    if per_sample and r > 1:  # n blocks of r rows: each sample's im2col columns as the positions of one Linear sample
        if module.groups != 1 or not _ops.available("linear_importance_"):
            return False
        cols = unfold_nd(x, module.kernel_size, module.stride, pad, module.dilation)  # (n·r, C·K, L)
        a = cols.transpose(1, 2).reshape(call.n, -1, cols.shape[1])
        gl = g.flatten(2).transpose(1, 2).reshape(call.n, -1, g.shape[1])
        linear_into(bufs["weight"].view(g.shape[1], -1), bufs.get("bias"), a, gl, call.n, True)
        return True
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
