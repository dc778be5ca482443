"""nn.Conv1d/2d/3d: per-sample weight gradients by im2col, or the compiled conv_importance_ op."""
import math

import torch
import torch.nn.functional as F

from .. import _ops


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
