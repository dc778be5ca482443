"""Any other module with parameters: exact per-sample gradients over that module alone (torch.func's vmap, else
autograd one sample at a time)."""
import collections
import enum
import inspect
import warnings

import torch
import torch.nn as nn
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

from .base import Rule


def _batch_dim(t, n, preferred):
    if not torch.is_tensor(t):
        return None
    if t.dim() > preferred and t.shape[preferred] == n:
        return preferred
    return next((i for i, size in enumerate(t.shape) if size == n), None)


def sample_dim(full, one, n, preferred=0):
    """The dim of a tensor that holds the batch, from its shape in the batch's call (``full``) and in one sample's
    (``one``): size n there, 1 here, every other dim equal (``preferred`` where several are). None where there is
    none: the samples share the tensor (T5's (T, T) position buckets, also where T equals n)."""
    if full is None or one is None or len(full) != len(one):
        return None
    dims = [i for i in range(len(full)) if full[i] == n and one[i] == 1
            and full[:i] + full[i + 1:] == one[:i] + one[i + 1:]]
    return preferred if preferred in dims else (dims[0] if dims else None)


# Arguments that hold no per-sample dim even where a size happens to equal the batch size.
_SHARED_ARGUMENTS = {nn.MultiheadAttention: ("attn_mask",)}


def _head_blocks(module, call):
    """nn.MultiheadAttention's 3-dim ``attn_mask`` of (n·heads, L, S): n blocks of rows, one per sample
    (Mask2Former's masked attention), which no dim of size n tells; None for any other call."""
    if type(module) is not nn.MultiheadAttention:
        return None
    bound = inspect.signature(type(module).forward).bind(module, *call.args, **call.kwargs).arguments
    mask = bound.get("attn_mask")
    if torch.is_tensor(mask) and mask.dim() == 3 and mask.shape[0] == call.n * module.num_heads:
        return mask
    return None


def _parameters(module, names):
    """(tracked, frozen): the module's parameters named in ``names`` (all where None), detached; the others and its
    buffers, which functional_call keeps as they are."""
    params = dict(module.named_parameters())
    tracked = {k: v.detach() for k, v in params.items() if names is None or k in names}
    frozen = {k: v.detach() for k, v in params.items() if k not in tracked}
    frozen.update(dict(module.named_buffers()))
    return tracked, frozen


def _floating_outputs(call):
    """The call's flattened outputs and the positions of the floating ones (those ``call.grads`` belong to)."""
    flat_out, _ = tree_flatten(call.out)
    return flat_out, [i for i, t in enumerate(flat_out) if torch.is_tensor(t) and t.is_floating_point()]


class SharedOutput(Exception):
    """A call whose floating output has no batch dim (BART's learned positions on (T, D)): every sample's gradient
    arrives summed there, and no per-sample gradient can be taken from it (the engine then runs the batch one sample
    at a time)."""

    def __init__(self, shape):
        super().__init__(f"returns an output of shape {shape} shared by the samples")
        self.shape = shape


class RandomForward(SharedOutput):
    """A call of n > 1 samples whose forward drew random numbers (ViLT takes its patches in an order drawn by
    torch.multinomial, in eval mode too): a rerun on one sample's inputs draws others, and would pair the batch's
    gradients at the output with other rows (6-9% off). The engine runs the batch one sample at a time, as for a
    :class:`SharedOutput`; a rerun of a whole call draws the call's numbers again (:attr:`Call.rng`)."""

    def __init__(self):
        Exception.__init__(self, "draws random numbers in its forward, which a rerun on one sample's inputs cannot "
                                 "draw again")


ABSENT = object()  # in Call.attributes: an attribute the call added


_SCALARS = frozenset((bool, int, float, str, type(None)))
_NOT_PLAIN = frozenset((dict, collections.OrderedDict, list, set))  # most of a module's vars: skipped at once


def _plain(v):
    t = type(v)  # the types most attributes have, by identity first: every call of every layer asks (settings)
    if t in _SCALARS:
        return True
    if t in _NOT_PLAIN:
        return False
    return (isinstance(v, (bool, int, float, str, type(None), enum.Enum))
            or (isinstance(v, tuple) and all(map(_plain, v))))


def settings(module):
    """The module's plain attributes that are values: numbers, strings, None, Enums and tuples of them (a conv's
    dilation, a scale its caller sets before each call)."""
    return {k: v for k, v in vars(module).items() if _plain(v)}


def attributes(module):
    """The module's plain attributes that are tensors (a state its forward may keep on it) or values
    (:func:`settings`)."""
    return {k: v for k, v in vars(module).items() if torch.is_tensor(v) or _plain(v)}


def rng_state():
    """The states of the CPU's random number generator and, where CUDA runs, the current device's."""
    cuda = torch.cuda.get_rng_state() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    return torch.random.get_rng_state(), cuda


def same_rng(a, b):
    """Whether two :func:`rng_state` are the same: no random number was drawn in between."""
    return torch.equal(a[0], b[0]) and (a[1] is None) == (b[1] is None) and (a[1] is None or torch.equal(a[1], b[1]))


def _set_rng(state):
    torch.random.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1])


def _rerun(module, call, params, args, kwargs):
    """The module's forward once more, on ``params`` (functional_call; None: its own), each time with its modules'
    tensor attributes as they were before the call (``Call.attributes``), and put back as they are after."""
    before = call.attributes or {}
    after = {m: {k: vars(m).get(k, ABSENT) for k in values} for m, values in before.items()}
    for m, values in before.items():
        _assign(vars(m), values)
    # functional_call puts a module's parameters back one name at a time: a submodule registered at two paths (a
    # layer used twice, ALBERT-style; a PEFT bank shared by its layers) got the last swapped-in tensor back
    # instead of its parameter, and the model was left with a dead functorch tensor
    held = [(m, k, p) for m in module.modules() for k, p in m._parameters.items()] if params is not None else []
    # its own output, as the engine's tap took it: without the forward hooks that come after the tap (a user's hook
    # that scales the output), nor its backward hooks, whose change to the gradient at the output the tap has already
    # taken (a full backward pre-hook applied twice: 3x was 9x); its pre-hooks run, as on the call (the engine keeps
    # its arguments from before them)
    hooks = module._forward_hooks, module._backward_pre_hooks, module._backward_hooks
    module._forward_hooks, module._backward_pre_hooks, module._backward_hooks = (collections.OrderedDict() for _ in hooks)
    # a forward that draws random numbers draws those of the call, and the generators go on as they were
    drawn = None
    if call.rng is not None:
        drawn = rng_state()
        _set_rng(call.rng)
    # an Embedding(max_norm) renormalised the rows the call read, in place: once more would change no value but bump
    # the weight's version, and the backward of a layer that saved it (a tied head) raised
    renorms = [(m, m.max_norm) for m in module.modules() if isinstance(m, nn.Embedding) and m.max_norm]
    for m, _ in renorms:
        m.max_norm = None
    try:
        if params is None:
            return module(*args, **kwargs)
        return torch.func.functional_call(module, params, tuple(args), kwargs)
    finally:
        for m, max_norm in renorms:
            m.max_norm = max_norm
        if drawn is not None:
            _set_rng(drawn)
        module._forward_hooks, module._backward_pre_hooks, module._backward_hooks = hooks
        for m, values in after.items():
            _assign(vars(m), values)
        for m, k, p in held:
            if m._parameters.get(k) is not p:
                m._parameters[k] = p


def _assign(namespace, values):
    for k, v in values.items():
        if v is ABSENT:
            namespace.pop(k, None)
        else:
            namespace[k] = v


@torch.enable_grad()  # it runs inside the backward, where grad mode is off: LSTM's forward then keeps no workspace
def generic_grads(module, call, s, e, names=None):
    """Per-sample gradients of the module's own parameters (recursively), over that module only: torch.func's vmap,
    else autograd one sample at a time; the module run again as it was called (``call.attributes``).

    Where the engine learned them from the model run on one sample (``call.in_dims``, ``call.out_dims``), the
    inputs' and outputs' batch dims are those. Else inputs carry the batch in dim 0 (dim 1 for modules with
    ``batch_first=False``), else in their first dim of the batch's size; tensors without one are shared by all
    samples; each output's batch dim is found by running the module on one sample: the dim that shrinks from n
    to 1. An output without one raises :class:`SharedOutput` (the engine then runs the batch one sample at a
    time), but for those that ``call.shared`` names: all samples share them, and each sample's gradient there comes
    in a dim 0 of its own.
    """
    n = call.n
    if call.whole or n == 1:  # the call is one sample's (or, whole, the batch's with per_sample=False)
        return _whole_call_grads(module, call, names)
    if call.rng is not None:
        raise RandomForward()
    if call.rows is not None:
        return _block_grads(module, call, s, e, names)
    preferred = 1 if getattr(module, "batch_first", True) is False else 0
    args, kwargs = call.args, call.kwargs
    shared = _SHARED_ARGUMENTS.get(type(module), ()) if call.in_dims is None else ()
    if shared:  # name every argument, so that those never indexed by sample are known
        bound = inspect.signature(type(module).forward).bind(module, *args, **kwargs).arguments
        args, kwargs = (), {k: v for k, v in bound.items() if k != "self"}
    flat_in, spec_in = tree_flatten((args, kwargs))
    in_dims = list(call.in_dims) if call.in_dims is not None else [_batch_dim(t, n, preferred) for t in flat_in]
    for name in shared:
        if kwargs.get(name) is not None:
            at = next(i for i, t in enumerate(flat_in) if t is kwargs[name])
            in_dims[at] = None
    # inputs of n blocks of rows in dim 0: taken as (n, rows, ...), each sample's block merged back for its rerun
    merged = set()
    mask = _head_blocks(module, call)
    if mask is not None:
        at = next(i for i, t in enumerate(flat_in) if t is mask)
        flat_in[at], in_dims[at] = mask.view(n, -1, *mask.shape[1:]), 0
        merged.add(at)
    for at in call.in_blocks - merged:
        t = flat_in[at]
        flat_in[at], in_dims[at] = t.view(n, -1, *t.shape[1:]), 0
        merged.add(at)

    def merge(xs):
        return [x.flatten(0, 1) if i in merged else x for i, x in enumerate(xs)]
    flat_out, out_pos = _floating_outputs(call)
    if call.out_dims is not None:
        out_dims = [call.out_dims[i] for i in out_pos]
    else:
        with torch.no_grad():
            first = [t.narrow(d, 0, 1) if d is not None else t for t, d in zip(flat_in, in_dims)]
            args, kwargs = tree_unflatten(merge(first), spec_in)
            probe = tree_flatten(_rerun(module, call, None, args, kwargs))[0]
        out_dims = [sample_dim(tuple(flat_out[i].shape), tuple(probe[i].shape), n) if torch.is_tensor(probe[i])
                    else None for i in out_pos]
    shared_out = set(call.shared or ())
    out_grads = call.grads
    unbatched = [j for j, (i, d) in enumerate(zip(out_pos, out_dims)) if d is None and i not in shared_out]
    if unbatched:
        # an output whose gradient is zero adds nothing to any sample's (CLIPModel's (n, n) logits, where the model's
        # output is its image embeddings): left out of the VJP, whether the samples share it or not
        zero = {j for j in unbatched if out_grads[j] is None or not bool(out_grads[j].any())}
        if len(zero) < len(unbatched):
            raise SharedOutput(tuple(flat_out[out_pos[next(j for j in unbatched if j not in zero)]].shape))
        out_pos, out_dims, out_grads = ([x for j, x in enumerate(xs) if j not in zero]
                                        for xs in (out_pos, out_dims, out_grads))
    # each sample's gradient at an output that all samples share is in a dim 0 of its own
    grad_dims = [0 if i in shared_out else d for i, d in zip(out_pos, out_dims)]
    tracked, frozen = _parameters(module, names)

    def outputs(theta, *inputs_k):
        inputs = [x.unsqueeze(d) if d is not None else x for x, d in zip(inputs_k, in_dims)]
        args, kwargs = tree_unflatten(merge(inputs), spec_in)
        out = tree_flatten(_rerun(module, call, {**theta, **frozen}, args, kwargs))[0]
        return tuple(out[i].squeeze(d) if d is not None else out[i] for i, d in zip(out_pos, out_dims))

    def one_sample(inputs_k, grads_k):
        _, vjp = torch.func.vjp(lambda theta: outputs(theta, *inputs_k), tracked)
        return vjp(tuple(grads_k))[0]

    def rows(t, d):
        return t.narrow(d, s, e - s) if d is not None else t

    inputs = tuple(rows(_detached(t), d) for t, d in zip(flat_in, in_dims))
    grads = tuple(rows(g if g is not None else torch.zeros_like(flat_out[i]), d)  # a shared output's never None
                  for g, i, d in zip(out_grads, out_pos, grad_dims))
    if type(module) not in _NO_VMAP:
        try:
            with warnings.catch_warnings():  # an op without a batching rule, which vmap runs sample by sample (SDPA on
                warnings.filterwarnings("ignore", message="There is a performance drop")  # the CPU): the rest batched
                per_sample = torch.func.vmap(one_sample, in_dims=(tuple(in_dims), tuple(grad_dims)))(inputs, grads)
            return {k: v.float() for k, v in per_sample.items()}
        except torch.OutOfMemoryError:
            raise
        except RuntimeError:
            # A forward vmap cannot batch (nn.GRU and nn.RNN write into a hidden state made inside; an
            # autograd.Function without setup_context): one VJP per sample by autograd, for this class from now on.
            _NO_VMAP.add(type(module))

    def select(ts, dims, k):
        return tuple(t.select(d, k) if d is not None else t for t, d in zip(ts, dims))

    each = [_vjp(lambda theta, x=select(inputs, in_dims, k): outputs(theta, *x), tracked, select(grads, grad_dims, k))
            for k in range(e - s)]
    return {name: torch.stack([g[name] for g in each]).float() for name in tracked}


def _vjp(outputs, tracked, grads):
    """{name: ∂⟨outputs(θ), grads⟩/∂θ_name} at θ = tracked, by autograd: unlike torch.func it runs any forward (an
    autograd.Function without setup_context, RecurrentGemma's; an in-place write into a captured tensor)."""
    theta = {k: v.detach().requires_grad_() for k, v in tracked.items()}
    pairs = [(o, g) for o, g in zip(outputs(theta), grads) if o.requires_grad]
    got = torch.autograd.grad([o for o, _ in pairs], list(theta.values()), [g for _, g in pairs],
                              allow_unused=True) if pairs else [None] * len(theta)
    return {k: g if g is not None else torch.zeros_like(v) for (k, v), g in zip(theta.items(), got)}


_NO_VMAP = set()  # module classes whose forward vmap could not batch
_NO_VMAP_BLOCKS = set()  # the same, for calls on n blocks of rows


def _detached(t):
    """A call's input without its autograd history: the rule runs with grad mode on, and a VJP over inputs that
    require grad would record a graph of its own that nothing uses."""
    return t.detach() if torch.is_tensor(t) else t


def _block_grads(module, call, s, e, names):
    """Per-sample gradients of samples s:e of a call that holds the n samples as n blocks of rows in dim 0 (the
    MoE routers and experts on the batch's (n·T, D) tokens): the module's VJP on each sample's rows, vmapped over the
    samples, or in turn where its forward routes them by their values (which vmap cannot: the experts)."""
    in_rows, out_rows = call.rows
    flat_in, spec_in = tree_flatten((call.args, call.kwargs))
    flat_out, out_pos = _floating_outputs(call)
    shared = next((flat_out[i] for i, g in zip(out_pos, call.grads) if g is not None and not out_rows[i]), None)
    if shared is not None:
        raise SharedOutput(tuple(shared.shape))
    tracked, frozen = _parameters(module, names)

    def rows(t, k):
        m = t.shape[0] // call.n
        return t[k * m:(k + 1) * m]

    if type(module) not in _NO_VMAP_BLOCKS:
        def blocks(t):  # samples s:e as (e - s, m, ...)
            m = t.shape[0] // call.n
            return t[s * m:e * m].reshape(e - s, m, *t.shape[1:])

        pos = [i for i in out_pos if out_rows[i]]  # outputs without rows have no gradient (checked above)

        def one_sample(inputs_k, grads_k):
            args, kwargs = tree_unflatten(list(inputs_k), spec_in)

            def outputs(theta):
                out = tree_flatten(_rerun(module, call, {**theta, **frozen}, args, kwargs))[0]
                return tuple(out[i] for i in pos)

            return torch.func.vjp(outputs, tracked)[1](tuple(grads_k))[0]

        inputs = tuple(blocks(_detached(t)) if r else _detached(t) for t, r in zip(flat_in, in_rows))
        grads = tuple(blocks(g if g is not None else torch.zeros_like(flat_out[i]))
                      for g, i in zip(call.grads, out_pos) if out_rows[i])
        try:
            in_dims = tuple(0 if r else None for r in in_rows)
            with warnings.catch_warnings(record=True) as said:
                warnings.simplefilter("always")
                per_sample = torch.func.vmap(one_sample, in_dims=(in_dims, 0))(inputs, grads)
            # an op vmap runs sample by sample itself (grouped_mm experts): the loop from now on, without its warnings
            if any("performance drop" in str(w.message) for w in said):
                _NO_VMAP_BLOCKS.add(type(module))
            for w in said:
                if "performance drop" not in str(w.message):
                    warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
            return {k: v.float() for k, v in per_sample.items()}
        except torch.OutOfMemoryError:
            raise
        except RuntimeError:  # routed by value (data-dependent shapes): one VJP per sample, for this class from now on
            _NO_VMAP_BLOCKS.add(type(module))

    per_sample = []
    for k in range(s, e):
        args, kwargs = tree_unflatten([rows(_detached(t), k) if r else _detached(t) for t, r in zip(flat_in, in_rows)],
                                      spec_in)

        def outputs(theta):
            out = tree_flatten(_rerun(module, call, {**theta, **frozen}, args, kwargs))[0]
            return tuple(out[i] for i in out_pos)

        grads = tuple(rows(g if g is not None else torch.zeros_like(flat_out[i]), k)
                      for g, i in zip(call.grads, out_pos))
        per_sample.append(_vjp(outputs, tracked, grads))
    return {name: torch.stack([g[name] for g in per_sample]).float() for name in tracked}


def _whole_call_grads(module, call, names):
    """The gradient of the module's own (tracked) parameters over the whole call, as one sample: (1, *shape)."""
    tracked, frozen = _parameters(module, names)
    flat_out, out_pos = _floating_outputs(call)

    def outputs(theta):
        args, kwargs = tree_map(_detached, (tuple(call.args), call.kwargs))
        out = tree_flatten(_rerun(module, call, {**theta, **frozen}, args, kwargs))[0]
        return tuple(out[i] for i in out_pos)

    grads = tuple(g if g is not None else torch.zeros_like(flat_out[i]) for g, i in zip(call.grads, out_pos))
    return {k: v.unsqueeze(0).float() for k, v in _vjp(outputs, tracked, grads).items()}


def counts_of_its_own(module):
    """Whether the per-sample gradients of a module (and its submodules) sum to its call's: not where an Embedding
    scales by frequency, dividing each row's gradient by its index's count in the call (in each sample's alone, per
    sample). Rule.sums of the Embeddings and of the generic rule (per_sample=False on a model run as one generic unit
    holding such an Embedding was 1.7% off)."""
    return not any(isinstance(m, nn.Embedding) and m.scale_grad_by_freq for m in module.modules())


# any module the table has no rule for; an input of n·m rows may be n blocks of rows (confirmed once by the engine)
GENERIC = Rule(generic_grads, blocks=lambda module: True, sums=counts_of_its_own)
