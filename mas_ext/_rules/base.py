"""The rule interface (Call, Rule), the table and its one way in, :func:`register_rule`.

Per-layer rules for the exact per-sample importance, one table for every module type.

A rule sees one call of a module: its inputs, its output and the gradient ``g`` arriving at
that output (∂‖f‖²/∂y for g-MAS, y itself for l-MAS). It offers two paths:

- ``grads(module, call, start, end)``: the per-sample parameter gradients of samples
  ``start:end`` as ``{param_name: (end - start, *shape)}`` in float32. Pure PyTorch and
  plainly the definition; the reference path sums ``|·|`` of these over chunks of samples, so
  at most ``CHUNK_ELEMS`` per-sample gradient elements are held at once.
- ``fused(module, call, bufs, per_sample)`` (optional): adds the same Σ_k |∂_k| into ``bufs``
  without materialising per-sample gradients (compiled kernels or non-materialising formulas).
  Returns False where it does not apply, and the reference path runs instead. Which devices have kernels
  is decided once, by FusedMAS's kernel gate (``_core._KernelGate``), before any fused rule runs.
"""
import warnings
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.nn as nn


CHUNK_ELEMS = 1 << 24  # per-sample gradient elements (64 MiB of float32) the reference path holds at once


@dataclass
class Call:
    """One call of a tracked module within a batch of ``n`` samples."""

    n: int
    args: tuple
    kwargs: dict
    out: object = None  # the module's output; in g-MAS only where the rule's ``needs_output`` says so
    grads: Optional[tuple] = None  # gradients at the floating outputs, in tree_flatten order
    versions: list = field(default_factory=list)
    # The call's input rows are no sample's own (MoE experts on (n·T, D) tokens, T5's (T, T) position buckets):
    # the whole call is one sample's (in a one-sample pass, n = 1) or the batch's (per_sample=False).
    whole: bool = False
    # The batch dim of each of the call's flattened inputs ``(args, kwargs)`` and outputs, None for a tensor the
    # samples share, as learned from the model run on one sample; None where not learned (read from shapes).
    in_dims: Optional[list] = None
    out_dims: Optional[list] = None
    # Which flattened inputs and outputs hold the n samples as n blocks of rows in dim 0 ((n·T, D) tokens), where the
    # call is read so: (inputs, outputs) of bools.
    rows: Optional[tuple] = None
    # Generic rule, inputs without a batch dim beside inputs with one: the flattened inputs that hold the batch's rows
    # flattened in dim 0 (DBRX's and Inkling's experts: (n, T, D) tokens beside their (n·T, k) routing), read as n
    # blocks of rows there, as learned from the model run on one sample
    in_blocks: frozenset = frozenset()
    # Generic rule: the tensor (or None) attributes of the module and the modules inside it (a recurrent state kept on
    # the module) as they were before the call ({module: {name: value, or ABSENT where the call added it}}); the rule
    # runs the module again with them.
    attributes: Optional[dict] = None
    # The output's version counter when the call returned, where the call keeps its output: a later in-place op on
    # it (Falcon's residual add into its MLP's output) shows there.
    out_version: Optional[int] = None
    # The flattened outputs that all samples share (BART's positions): their gradients carry each sample's in a dim 0
    # of their own (the engine's _shared), and a rule reruns the module to the output as it is.
    shared: Optional[list] = None
    # Generic rule: the local names of the unit's parameters that the call did not read, as the batch's graph shows
    # (torch.func.functional_call with another tensor in their place): the rule takes no gradient for them.
    unread: frozenset = frozenset()
    # A layer of the table: its settings (generic.settings) when called. Where they changed since (a conv run at two
    # dilations), the generic rule reruns the call with them instead of the table's rule.
    settings: Optional[dict] = None
    rerun: bool = False
    # Generic rule, g-MAS: the engine's record of the module's parameters read as shared tensors in the call, until the
    # backward ends; then, where their uses told it, each sample's gradient at them ({local name: (n, *shape)}), which
    # the rule takes instead of running the module again.
    params: object = None
    param_grads: Optional[dict] = None
    # Generic rule: the random number generators' states (generic.rng_state) before a call whose forward drew from
    # them (ViLT's patches sampled by torch.multinomial): its rerun draws the same numbers.
    rng: object = None
    # why the rule cannot run the call again (its output holds the batch's rows, its inputs none), where its
    # parameters' uses must tell each sample's gradient instead
    no_rerun: Optional[str] = None

    @property
    def g(self):
        return self.grads[0]

    def release(self):
        """Drops the tensors, once the call's importance is added."""
        self.args, self.kwargs, self.out, self.grads, self.versions, self.attributes = None, None, None, None, [], None
        self.params = self.param_grads = None


@dataclass
class Rule:
    """How one module type's parameters get their exact per-sample importance (see the module docstring).

    ``grads`` is required (the reference path); ``fused`` is optional (FusedMAS's path, which must give the
    same Σ_k |∂_k|). ``cost(module, call)`` bounds the per-sample gradient elements ``grads`` makes per
    sample (the reference path sizes its chunks by it). ``needs_output(module)``: whether the rule reads
    ``call.out`` in g-MAS; where it does not, the call does not hold the output until its gradient arrives
    (a plain backward frees most outputs early)."""

    grads: Callable
    fused: Optional[Callable] = None
    cost: Callable = lambda module, call: max(p.numel() for p in module.parameters())  # per-sample elements
    owns_children: bool = False  # the module's forward uses its submodules' parameters directly
    tapped_forward: Optional[Callable] = None  # g-MAS per sample: a forward that taps its own internals
    needs_output: Callable = lambda module: True
    # Whether ``grads`` and ``fused`` read an input of n·m rows in dim 0 as n blocks of m rows, one per sample (a
    # batch-major flattened input: OPT's and the MoE layers' (n·T, D) tokens), by reshaping it to (n, m, ...).
    # Such a call is taken by sample once a run of a batch one sample at a time agreed with it. A rule that reads them
    # as r copies of the batch's n·m rows, each n blocks (Llama 4's experts: one per expert), returns r.
    blocks: Callable = lambda module: False
    # Whether the per-sample gradients ``grads`` gives sum to the gradient of the call as a whole (not an Embedding
    # with scale_grad_by_freq: its counts are the call's). With per_sample=False a call where they do not is taken
    # whole, one "sample" of the batch's rows.
    sums: Callable = lambda module: True


_TABLE = []  # (what it was registered for, matcher, rule): the newest registration first


def register_rule(module_type, rule):
    """Gives every module of ``module_type`` the importance rule ``rule`` (a :class:`Rule`), for ReferenceMAS
    and FusedMAS alike; the built-in table is registered the same way, and a later registration wins.

    ``module_type`` is an ``nn.Module`` subclass (matched by isinstance, as long as the module's forward is
    that class's own: a subclass that overrides forward computes something else) or a predicate
    ``module -> bool`` (to recognise classes of packages that need not be installed, by name).

    Example, a layer ``y = x * scale`` with a per-feature parameter::

        def scale_grads(module, call, start, end):        # per-sample gradients, the reference path
            x, g = call.args[0][start:end].float(), call.g[start:end].float()
            return {"scale": (g * x).reshape(end - start, -1, x.shape[-1]).sum(1)}

        def scale_fused(module, call, bufs, per_sample):  # Σ_k |∂_k| straight into bufs
            ps = (call.g.float() * call.args[0].float()).reshape(call.n, -1, call.g.shape[-1]).sum(1)
            bufs["scale"] += ps.abs().sum(0) if per_sample else ps.sum(0).abs()
            return True

        mas_ext.register_rule(Scale, mas_ext.Rule(scale_grads, scale_fused))
    """
    if not isinstance(rule, Rule):
        raise TypeError(f"register_rule: rule must be a mas_ext.Rule, got {type(rule).__name__}")
    if isinstance(module_type, type):
        if not issubclass(module_type, nn.Module):
            raise TypeError(f"register_rule: {module_type.__name__} is not an nn.Module subclass")

        def match(module, cls=module_type):
            return isinstance(module, cls) and type(module).forward is cls.forward
    elif callable(module_type):
        match = module_type
    else:
        raise TypeError("register_rule: module_type must be an nn.Module subclass or a predicate module -> bool, "
                        f"got {type(module_type).__name__}")
    _TABLE.insert(0, (module_type, match, rule))


def rule_for(module):
    """The rule registered for this module, or None (the generic torch.func rule then applies)."""
    return next((rule for _, match, rule in _TABLE if match(module)), None)


def add_abs_sum(buf, per_sample_grads, per_sample):
    """buf += Σ_k |∂_k| over the leading (sample) dim of ``per_sample_grads``, or |Σ_k ∂_k| with
    ``per_sample=False``: the fused form wherever per-sample gradients are small enough to hold (N × C)."""
    buf += per_sample_grads.abs().sum(0) if per_sample else per_sample_grads.sum(0).abs()


_VERIFIED = set()  # classes recognised by name whose output was checked to follow their rule's formula
_WARNED = set()


def unverified(module):
    """``needs_output`` of the rules that use :func:`matches_formula`: the output is needed until the
    module's class is found to match its rule's formula (and for good where it does not: the generic path)."""
    return type(module) not in _VERIFIED


def settings_key(module):
    """A formula check's key for a class whose instances may compute other formulas at other settings (an RMSNorm
    class with a ``group_size``: Qwen4Exp's grouped hyper-connection norms beside its plain ones): the class and the
    instance's public attributes of plain values."""
    return type(module), tuple(sorted((k, v) for k, v in vars(module).items() if not k.startswith("_")
                                      and isinstance(v, (bool, int, float, str, type(None)))))


def close_to(want, got, tol=2e-2):
    """Whether ``got`` equals the formula's ``want`` to ``tol`` (relative, and of want's largest entry): the formula
    checks' comparison (2e-2: a bfloat16 output's rounding)."""
    return torch.allclose(want, got, rtol=tol, atol=tol * want.abs().max().item() + 1e-6)


def matches_formula(module, call, holds, rows=None, every_row=False, key=None):
    """For rules that recognise a class by name (transformers' layers, without importing transformers):
    whether the class computes what the rule assumes. ``holds(x, y)`` checks one input row x against its
    output row y (float32; ``rows(call)`` gives other aligned (rows, ·) pairs, as token ids against their
    embeddings); the row of largest norm is used, since a row of zeros (a padding token's) matches anything.
    ``every_row``: all rows at once (a class recognised by its base class, not its name, may differ on a few).
    A class found to match is trusted from then on; one that does not takes the generic path, with a
    warning. An output changed in place since the call (``call.out_version``) cannot tell: that call takes the
    generic path, and a later call decides. ``key``: what is checked once, where not the class alone (a class whose
    instances lay out their data two ways)."""
    key = type(module) if key is None else key
    if key in _VERIFIED:
        return True
    if torch.is_tensor(call.out) and call.out_version is not None and call.out._version != call.out_version:
        return False  # changed in place since the call: it cannot tell; the generic rule takes this call, exact
    if rows is not None:
        x, y = rows(call)
    else:
        x, y = call.args[0].detach(), call.out.detach()
        x, y = x.reshape(-1, x.shape[-1]).float(), y.reshape(-1, y.shape[-1]).float()
    row = x.abs().sum(1).argmax()
    if holds(*((x, y) if every_row else (x[row:row + 1], y[row:row + 1]))):
        if x[row].abs().sum() > 0:
            _VERIFIED.add(key)
        return True
    if key not in _WARNED:
        _WARNED.add(key)
        warnings.warn(f"{type(module).__name__} does not compute what mas_ext's rule for it assumes: its importance "
                      "takes the generic torch.func path", stacklevel=3)
    return False
