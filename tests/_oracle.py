"""The one step the float64 l-MAS oracles of tests/test_importance.py and tests/test_model_edge_cases.py share
(they differ in which modules are layers and which parameters each owns)."""
import torch


def attributes(module):
    """The module's plain attributes that are tensors or None (state a forward may keep on the module)."""
    return {k: v for k, v in vars(module).items() if v is None or torch.is_tensor(v)}


def add_local_grads(sample, names, layer, own, args, kwargs, before=None):
    """sample[names[id(p)]] += ∂(½ Σ‖y‖²)/∂p for p in `own`, y the floating outputs of layer(*args, **kwargs): SPEC §1's
    l-MAS, in which the gradient arriving at a layer's output is that output itself: its own output, without the
    forward hooks on it (args: the call's arguments before its pre-hooks, which run again). ``before``: {module of
    the layer's subtree: its :func:`attributes`} as they were before the call, set for the run (a state kept on one)."""
    before = before or {}
    now = {m: attributes(m) for m in before}
    for m, values in before.items():
        vars(m).update(values)
    hooks, layer._forward_hooks = layer._forward_hooks, {}  # y is the layer's own output, before the user's hooks
    # its input fixed: a layer run on its own output (one module under two paths) passes nothing back through it
    args, kwargs = torch.utils._pytree.tree_map(lambda t: t.detach() if torch.is_tensor(t) else t, (args, kwargs))
    try:
        out = layer(*args, **kwargs)
    finally:
        layer._forward_hooks = hooks
        for m, values in now.items():
            vars(m).update(values)
    # every floating tensor of the output, nested ones too (an LSTM's (output, (h_n, c_n)))
    outs = [o for o in torch.utils._pytree.tree_flatten(out)[0] if torch.is_tensor(o) and o.is_floating_point()]
    gs = torch.autograd.grad(sum(0.5 * o.pow(2).sum() for o in outs), own, allow_unused=True)
    for p, g in zip(own, gs):
        if g is not None:
            sample[names[id(p)]] += g
