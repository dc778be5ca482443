"""ReferenceMAS and FusedMAS: the exact per-sample MAS importance, consolidation and penalty.

How the importance pass works (both classes): every module with tracked parameters is a
*unit* with a rule from the table in ``_rules`` (or the generic torch.func rule). A forward hook
records each call's inputs. In global mode the unit's output passes through ``_Tap``, an
identity autograd node whose backward receives ∂‖f‖²/∂y; one ``torch.autograd.grad`` towards
a dummy anchor runs every tap's backward but no weight-gradient GEMM and no ``.grad``. In
local mode the output itself is the gradient, so the pass is a forward only. Units that share
a parameter, or run more than once in a forward, are summed per sample before ``|·|``.
Contributions go to per-batch buffers, committed only when the whole batch is finite.
"""
import contextlib
import functools
from collections.abc import Mapping
import os
import signal
import threading
import warnings

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from . import _ops, _rules

__all__ = ["ReferenceMAS", "FusedMAS", "backend"]


def backend():
    """Which importance/penalty path ``FusedMAS`` runs on this machine, and why."""
    if os.environ.get("MAS_EXT_BACKEND", "").lower() == "reference":
        return "reference (forced by MAS_EXT_BACKEND=reference)"
    if _ops.error is not None:
        return f"reference (compiled kernels unavailable: {_ops.error})"
    cpu = f"cpu (C++ kernels, OpenMP, {torch.get_num_threads()} threads)"
    if torch.cuda.is_available():
        if not _cuda_ops_built():
            return f"{cpu}; CUDA tensors take the reference path: no CUDA kernels in this build"
        if not _ops.cuda_kernels_enabled():
            return (f"{cpu}; CUDA tensors take the reference path: the CUDA kernels are built but not yet verified "
                    "on a GPU (MAS_EXT_CUDA_KERNELS=1 opts in, for testing)")
        return f"cuda (CUDA kernels, opted in by MAS_EXT_CUDA_KERNELS=1); {cpu}"
    return cpu


def _cuda_ops_built():
    return _ops.error is None and torch._C._dispatch_has_kernel_for_dispatch_key("mas_ext::linear_importance_", "CUDA")


def _unwrap(model):
    """The module inside DistributedDataParallel/DataParallel and torch.compile wrappers, in any nesting
    (names without ``module.`` or ``_orig_mod.``)."""
    wrappers = (nn.parallel.DistributedDataParallel, nn.DataParallel)
    while True:
        if isinstance(model, wrappers):
            model = model.module
        elif type(model).__name__ == "OptimizedModule" and isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        else:
            return model


_SAMPLE_KEYS = ("input_ids", "inputs_embeds", "pixel_values", "input_values", "input_features")


def _sample_tensor(args, kwargs):
    """The tensor whose dim 0 is the batch: the first positional tensor, else a Hugging Face input by its
    usual name, else the first keyword tensor."""
    for t in (*args, *(kwargs.get(k) for k in _SAMPLE_KEYS), *kwargs.values()):
        if torch.is_tensor(t) and t.dim() > 0:
            return t
    return None


def _mask_positions(t, mask):
    """``t`` with the positions where the (n, T) ``mask`` is 0 set to zero, where t's leading dims are (n, T);
    else t as it is. masked_fill, not a product: a NaN at a padded position stays out."""
    if mask is None or t.dim() < 2 or t.shape[:2] != mask.shape:
        return t
    return t.masked_fill(~mask.bool().view(*mask.shape, *([1] * (t.dim() - 2))), 0)


def _expand_broadcast(module, args, kwargs, outs, n):
    """A call whose first input has size 1 in the batch dim, where the batch has n samples (Hugging Face's
    (1, T) ``position_ids``), is every sample's own (SPEC §1): that input and the outputs of size 1 there are
    expanded to n, so each sample's gradient reaches the layer apart. Returns (args, kwargs, outs), outs None
    where nothing broadcasts."""
    dim = 1 if getattr(module, "batch_first", True) is False else 0
    flat, spec = torch.utils._pytree.tree_flatten((args, kwargs))
    first = next((i for i, t in enumerate(flat) if torch.is_tensor(t)), None)
    if n == 1 or first is None or flat[first].dim() <= dim or flat[first].shape[dim] != 1:
        return args, kwargs, None

    def expand(t):
        return t.expand(*t.shape[:dim], n, *t.shape[dim + 1:]) if t.dim() > dim and t.shape[dim] == 1 else t

    flat[first] = expand(flat[first])
    args, kwargs = torch.utils._pytree.tree_unflatten(flat, spec)
    return args, kwargs, [expand(o) for o in outs]


@contextlib.contextmanager
def _sigint_deferred():
    """Holds a Ctrl-C until the block ends, so a commit of Ω and the count is never half done."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught = []
    previous = signal.signal(signal.SIGINT, lambda *a: caught.append(a))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if caught:
            raise KeyboardInterrupt


class _Tap(torch.autograd.Function):
    """Identity on a unit's floating outputs; its backward hands their gradients to ``sink``.

    Outputs that no backward of their own saves (``in_place``: those of the table's layers) are passed
    on in place, without a copy; others are copied, since marking them dirty would invalidate a saved
    tensor (a module ending in sigmoid saves its output). Views are always copied."""

    @staticmethod
    def forward(ctx, anchor, sink, in_place, *outs):
        ctx.sink = sink
        res = []
        for o in outs:
            if in_place and not o._is_view():
                ctx.mark_dirty(o)
                res.append(o)
            else:
                res.append(o.clone())
        return tuple(res)

    @staticmethod
    def backward(ctx, *grads):
        ctx.sink(grads)
        return (None, None, None, *grads)


class _Unit:
    """A module with tracked parameters, its rule, and the global names of those parameters."""

    def __init__(self, name, module, rule, names):
        self.name, self.module, self.rule, self.names = name, module, rule, names  # names: local -> global
        self.group = None
        self.repeats = False  # seen running more than once in one forward
        self.handled = False  # its tapped forward has handled the call now ending


class _Group:
    """Units that must be summed per sample before |·|: they share a parameter or run repeatedly."""

    def __init__(self, units):
        self.units = units
        self.calls = []  # (unit, Call) recorded this batch
        self.pending = []  # calls whose gradients arrived

    @property
    def simple(self):
        return len(self.units) == 1 and len(self.calls) == 1


class _Pass:
    """State of the importance pass over one batch: ``mask`` is the batch's (n, T) attention_mask, if any."""

    def __init__(self, n, bufs, anchor, mask=None):
        self.n, self.bufs, self.anchor, self.mask = n, bufs, anchor, mask
        self.calls = {}  # unit -> number of calls in this forward
        self.busy = False  # a rule is running: its own module calls (torch.func) are not recorded


class ReferenceMAS:
    """Memory Aware Synapses in pure PyTorch: the ground truth that ``FusedMAS`` is tested against.

    Args:
        model: the network; parameters with ``requires_grad=False`` are not tracked. A DDP or
            DataParallel wrapper is accepted and its ``module.`` prefix dropped from the names.
        lam: λ of the penalty R(θ) = λ Σ Ω (θ − θ*)².
        mode: ``"global"`` (g-MAS: gradients of ‖f(x)‖²) or ``"local"`` (l-MAS: Hebbian, each
            layer's own output in place of the back-propagated gradient).
        per_sample: True (the paper's definition, |·| per sample) or False (the |batch gradient|
            approximation of the existing libraries, for comparison).
        output_fn: picks the tensor whose squared norm is taken when the model returns a
            tuple/dict (called with the model's output).
        merge, alpha: defaults of :meth:`consolidate`.
        show_progress: a tqdm bar over batches in :meth:`accumulate` when the data has a length.
    """

    _fused = False

    def __init__(self, model, lam=1.0, mode="global", per_sample=True, output_fn=None, merge="sum", alpha=0.5,
                 show_progress=True):
        if mode not in ("global", "local"):
            raise ValueError(f"mode must be 'global' or 'local', got {mode!r}")
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        self._check_merge(merge, alpha)
        self.model, self.net = model, _unwrap(model)
        self.lam, self.mode, self.per_sample = float(lam), mode, bool(per_sample)
        self.output_fn, self.merge, self.alpha, self.show_progress = output_fn, merge, float(alpha), show_progress
        self.params = {n: p for n, p in self.net.named_parameters() if p.requires_grad}
        if not self.params:
            raise ValueError("the model has no parameters with requires_grad=True: nothing to track")
        self._units = self._plan()
        self._sum = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in self.params.items()}
        self._count = 0
        self._importance, self._star = {}, {}
        self.num_tasks = 0
        self._pass = None
        self._last_calls = {}  # unit -> calls in the last pass's forward
        self._warned = set()

    # ------------------------------------------------------------------ planning
    def _plan(self):
        """Units: table modules own their direct parameters; any other module with direct parameters
        owns all its parameters (its forward may use submodules' weights directly, as MHA does)."""
        ids = {id(p): n for n, p in self.params.items()}
        units = []

        def visit(prefix, module):
            rule = _rules.rule_for(module)
            # Parameters that are only aliases of a child's (BERT's prediction-head bias) make no unit here.
            children = {id(p) for c in module.children() for p in c.parameters()}
            direct = [(k, p) for k, p in module.named_parameters(recurse=False) if id(p) not in children]
            whole = (rule is None and direct) or (rule is not None and rule.owns_children)
            if whole:
                owned = module.named_parameters(remove_duplicate=False)
            elif rule is not None:
                owned = direct
            else:
                owned = []
            names = {local: ids[id(p)] for local, p in owned if id(p) in ids}
            if names:
                units.append(_Unit(prefix.rstrip("."), module, rule or _rules.GENERIC, names))
            if not whole:
                for child_name, child in module.named_children():
                    visit(f"{prefix}{child_name}.", child)

        visit("", self.net)
        # Group units that share a parameter (tied weights): their per-sample gradients add up.
        owner = {}
        for u in units:
            groups = {owner[g] for g in u.names.values() if g in owner}
            merged = _Group([u] + [v for grp in groups for v in grp.units])
            for v in merged.units:
                v.group = merged
                for g in v.names.values():
                    owner[g] = merged
        return units

    # ------------------------------------------------------------------ the importance pass
    def accumulate(self, batches, show_progress=None):
        """Adds the per-sample importance of every sample in ``batches`` (tensors, or tuples whose first
        element is the input; labels are ignored). Returns self.

        Raises ValueError on empty data, TypeError on an output that is not a floating tensor, and
        FloatingPointError naming a batch whose output or gradients are not finite; Ω and the sample
        count then stay as they were after the last whole batch (also on KeyboardInterrupt).
        """
        total = len(batches) if hasattr(batches, "__len__") else None
        if total == 0:
            raise ValueError("accumulate() got no data: the iterable of batches is empty")
        show = self.show_progress if show_progress is None else show_progress
        bar = tqdm(batches, total=total, disable=not show or total is None or total < 2, unit="batch",
                   desc=f"{type(self).__name__} {self.mode} importance", leave=False)
        seen = 0
        with self._pass_context():
            for i, batch in enumerate(bar):
                self._accumulate_batch(*self._input(batch, i), i)
                seen += 1
        if seen == 0:
            raise ValueError("accumulate() got no data: the iterable of batches is empty")
        return self

    @contextlib.contextmanager
    def observe(self):
        """Within this context every forward of the model also adds its inputs' importance
        (deployment: Ω learns from unlabeled traffic), positional and keyword calls alike (``labels``
        dropped). The model's outputs are unchanged, and the user's forward never fails because of MAS:
        a call whose importance cannot be taken is skipped with a warning saying why, Ω and the count
        unchanged."""
        calls = [0]

        def hook(module, args, kwargs, output):
            if self._pass is not None:
                return
            where = f"observed #{calls[0]}"
            calls[0] += 1
            try:
                with self._pass_context():
                    self._accumulate_batch(args, {k: v for k, v in kwargs.items() if k != "labels"}, where)
            except Exception as e:  # never the user's forward: skip this call, say why
                warnings.warn(f"{type(self).__name__}.observe(): call {where} skipped ({type(e).__name__}: {e}); "
                              "importance and sample count unchanged", stacklevel=2)

        handle = self.model.register_forward_hook(hook, with_kwargs=True)
        try:
            yield self
        finally:
            handle.remove()

    @staticmethod
    def _input(batch, i):
        """(args, kwargs) of the model call for one batch: a tensor, an (x, y, ...) tuple (labels ignored),
        or a dict of keyword arguments (``model(**batch)``, ``labels`` dropped)."""
        if torch.is_tensor(batch):
            return (batch,), {}
        if isinstance(batch, (tuple, list)) and batch and torch.is_tensor(batch[0]):
            return (batch[0],), {}
        if isinstance(batch, Mapping) and batch:
            return (), {k: v for k, v in batch.items() if k != "labels"}
        raise TypeError(f"batch {i}: expected a tensor, an (x, y, ...) tuple of tensors or a dict of model keyword "
                        f"arguments, got {type(batch).__name__}")

    @contextlib.contextmanager
    def _pass_context(self):
        """Eval mode (restored per module), the MHA fast path off (it skips submodule hooks), unit hooks on."""
        modes = [(m, m.training) for m in self.net.modules()]
        fastpath = torch.backends.mha.get_fastpath_enabled()
        handles = [u.module.register_forward_hook(self._hook_for(u), with_kwargs=True) for u in self._units]
        tapped = [u for u in self._units if self._fused and self.mode == "global" and self.per_sample
                  and u.rule.tapped_forward is not None and len(u.group.units) == 1
                  and self._kernels_for(list(u.module.parameters()))]
        for u in tapped:
            u.module.forward = functools.partial(self._tapped_forward, u)
        self.net.eval()
        torch.backends.mha.set_fastpath_enabled(False)
        # Compiled submodules run eagerly: a compiled graph does not run the taps' backward as eager does
        # (g-MAS through a torch.compile'd forward gave wrong Ω).
        eager = getattr(torch.compiler, "set_stance", None)
        try:
            with eager("force_eager") if eager is not None else contextlib.nullcontext():
                yield
        finally:
            for u in tapped:
                del u.module.forward
            for h in handles:
                h.remove()
            torch.backends.mha.set_fastpath_enabled(fastpath)
            for m, training in modes:
                m.training = training

    def _hook_for(self, unit):
        def hook(module, args, kwargs, out):
            state = self._pass
            if state is None or state.busy:
                return None
            state.calls[unit] = state.calls.get(unit, 0) + 1
            if unit.handled:  # its tapped forward has already seen to this call
                unit.handled = False
                return None
            versions = self._versions(args)
            flat, spec = torch.utils._pytree.tree_flatten(out)
            pos = [i for i, t in enumerate(flat) if torch.is_tensor(t) and t.is_floating_point()]
            args, kwargs, expanded = _expand_broadcast(module, args, kwargs, [flat[i] for i in pos], state.n)
            if expanded is not None:  # the call's outputs become every sample's own (SPEC §1)
                for i, t in zip(pos, expanded):
                    flat[i] = t
                out = torch.utils._pytree.tree_unflatten(flat, spec)
            call = _rules.Call(state.n, args, kwargs, out, versions=versions)
            unit.group.calls.append((unit, call))
            if self.mode == "local":
                call.grads = tuple(_mask_positions(flat[i].detach(), state.mask) for i in pos)
                if unit.group.simple and not unit.repeats:
                    self._process(unit.group)  # now, before any in-place op changes the output
                else:
                    call.grads = tuple(g.clone() for g in call.grads)
                return None
            if not any(flat[i].requires_grad for i in pos):
                return out if expanded is not None else None

            def sink(grads):
                call.grads = grads
                unit.group.pending.append(call)
                if len(unit.group.pending) == len(unit.group.calls):
                    self._process(unit.group)

            tapped = self._tap(state.anchor, sink, unit.rule.grads is not _rules.generic_grads, [flat[i] for i in pos])
            for i, t in zip(pos, tapped):
                flat[i] = t
            return torch.utils._pytree.tree_unflatten(flat, spec)

        return hook

    @staticmethod
    def _tap(anchor, sink, in_place, outs):
        """``outs`` through a _Tap; ``sink`` gets the gradients at them, shaped like them. With ``in_place``
        an output that only reshapes its base (Linear on 3-D input) is tapped through that base, uncopied."""
        def reshaped_base(t):
            b = t._base
            return (in_place and b is not None and not b._is_view() and t.is_contiguous() and b.is_contiguous()
                    and t.numel() == b.numel() and t.storage_offset() == b.storage_offset())

        targets = [o._base if reshaped_base(o) else o for o in outs]
        shapes = [o.shape for o in outs]  # not the outputs themselves: the graph would keep them alive
        tapped = _Tap.apply(anchor, lambda grads: sink(tuple(g.view(s) for g, s in zip(grads, shapes))),
                            in_place, *targets)
        return [t.view(s) if t.shape != s else t for s, t in zip(shapes, tapped)]

    def _tapped_forward(self, unit, *args, **kwargs):
        """The forward installed on units whose rule taps its own internals (g-MAS per sample, FusedMAS)."""
        state = self._pass
        if state is not None and not state.busy and not unit.repeats:
            def tap(outs, on_grads):
                local = {k: state.bufs[g] for k, g in unit.names.items()}
                return self._tap(state.anchor, lambda grads: on_grads(grads, local), True, outs)

            out = unit.rule.tapped_forward(unit.module, tap, *args, **kwargs)
            if out is not None:
                unit.handled = True
                return out
        return type(unit.module).forward(unit.module, *args, **kwargs)

    @staticmethod
    def _versions(args):
        return [(t, t._version) for t in torch.utils._pytree.tree_flatten(args)[0] if torch.is_tensor(t)]

    def _process(self, group):
        """Adds a group's calls into the batch buffers: the fused rule where one call stands alone,
        else per-sample gradients summed over the calls before |·|."""
        bufs, calls = self._pass.bufs, group.calls
        for unit, call in calls:
            for t, version in call.versions:
                if t._version != version:
                    raise RuntimeError(f"module '{unit.name}': its input was modified in place after its forward; "
                                       "the importance needs it unchanged (use inplace=False there)")
        recorded, calls = calls, [(u, c) for u, c in calls if c.grads is not None]
        group.calls, group.pending = [], []
        self._pass.busy = True
        try:
            if len(calls) == 1:
                unit, call = calls[0]
                local = {k: bufs[g] for k, g in unit.names.items()}
                if (self._fused and unit.rule.fused is not None and self._kernels_for(call.args)
                        and unit.rule.fused(unit.module, call, local, self.per_sample)):
                    return
            elif (self._fused and self._kernels_for([c.args for _, c in calls])
                  and _rules.tied_fused(calls, bufs, self.per_sample)):
                return
            self._reduce_per_sample(calls, bufs)
        finally:
            self._pass.busy = False
            for _, call in recorded:  # the graph outlives this: let the activations go now
                call.release()

    def _reduce_per_sample(self, calls, bufs):
        """Σ_k |Σ_calls ∂_k| (or |Σ_k Σ_calls ∂_k|), over chunks of samples of bounded size."""
        if not calls:
            return
        n = calls[0][1].n
        cost = max(u.rule.cost(u.module, c) for u, c in calls)
        step = max(1, _rules.CHUNK_ELEMS // max(1, cost))
        total = {}
        for s in range(0, n, step):
            e = min(n, s + step)
            per_sample = {}
            for unit, call in calls:
                grads = (unit.rule.grads(unit.module, call, s, e, names=set(unit.names))
                         if unit.rule.grads is _rules.generic_grads else unit.rule.grads(unit.module, call, s, e))
                for local, pg in grads.items():
                    g = unit.names.get(local)
                    if g is not None:
                        per_sample[g] = per_sample[g] + pg if g in per_sample else pg
            for g, pg in per_sample.items():
                if self.per_sample:
                    bufs[g] += pg.abs().sum(0)
                else:
                    total[g] = total[g] + pg.sum(0) if g in total else pg.sum(0)
        for g, t in total.items():
            bufs[g] += t.abs()

    def _kernels_for(self, tensors):
        return False

    def _output(self, out, where, mask=None):
        """The tensor whose squared norm is taken (``output_fn``'s pick, else the output itself or its
        ``logits``), with the positions that ``mask`` marks as padding set to zero."""
        if self.output_fn is not None:
            out = self.output_fn(out)
        elif not torch.is_tensor(out):
            logits = out.get("logits") if isinstance(out, Mapping) else getattr(out, "logits", None)
            out = logits if torch.is_tensor(logits) else out
        if not torch.is_tensor(out):
            raise TypeError(f"batch {where}: the model returned {type(out).__name__}, not a tensor or an output "
                            "with a `logits` field; pass output_fn= to pick the tensor whose norm MAS takes")
        if not out.is_floating_point():
            raise TypeError(f"batch {where}: the model output has dtype {out.dtype}; MAS needs a floating tensor")
        out = _mask_positions(out, mask)
        if not torch.isfinite(out).all():
            raise FloatingPointError(f"batch {where}: the model output is not finite (NaN or inf); "
                                     "importance and sample count left as they were before this batch")
        return out

    def _check_input(self, args, kwargs, where):
        x = _sample_tensor(args, kwargs)
        if x is None:
            raise TypeError(f"batch {where}: no tensor input to take the batch size from")
        if x.dim() == 0 or x.shape[0] == 0:
            raise ValueError(f"batch {where}: empty input of shape {tuple(x.shape)}")
        p = next(iter(self.params.values()))
        if x.device != p.device:
            raise ValueError(f"batch {where}: input on {x.device} but the model's parameters are on {p.device}")
        if x.is_floating_point() and x.dtype != p.dtype:
            raise TypeError(f"batch {where}: input dtype {x.dtype} differs from the parameters' {p.dtype}")
        return x.shape[0]

    def _accumulate_batch(self, args, kwargs, where):
        n = self._check_input(args, kwargs, where)
        mask = kwargs.get("attention_mask")
        mask = mask if torch.is_tensor(mask) and mask.dim() == 2 and mask.shape[0] == n else None
        # With no samples yet in this task, Ω_t's sums are zero: the batch accumulates into them in place
        # (no second weight-sized buffer) and a failed batch just zeroes them again. Otherwise it fills
        # buffers of its own, added only once the whole batch is known to be finite.
        fresh, committed = self._count == 0, False
        try:
            for _attempt in range(2):
                if fresh:
                    bufs = self._sum
                    for b in bufs.values():
                        b.zero_()
                else:
                    bufs = {g: torch.zeros_like(s) for g, s in self._sum.items()}
                self._run_pass(args, kwargs, where, _Pass(n, bufs, torch.zeros(
                    (), device=next(iter(bufs.values())).device, requires_grad=True), mask))
                # A unit that ran more than once was handled call by call (local mode, or a tapped forward):
                # redo the batch with its calls summed per sample.
                repeats = [u for u, k in self._last_calls.items() if k > 1 and not u.repeats
                           and (self.mode == "local" or "forward" in u.module.__dict__)]
                if not repeats:
                    break
                for u in repeats:
                    u.repeats = True
            with _sigint_deferred():
                # Contributions are sums of |·| (≥ 0): a buffer's sum is finite exactly when all its entries are.
                finite = torch.isfinite(torch.stack([b.sum() for b in bufs.values()])).tolist()
                bad = [g for g, ok in zip(bufs, finite) if not ok]
                if bad:
                    raise FloatingPointError(f"batch {where}: non-finite importance for {bad[:3]} (a NaN or inf "
                                             "gradient); importance and sample count left as they were before this batch")
                if not fresh:
                    for g, b in bufs.items():
                        self._sum[g] += b
                self._count += n
                committed = True
        except BaseException:
            if fresh and not committed:
                for b in self._sum.values():
                    b.zero_()
            raise

    def _run_pass(self, args, kwargs, where, state):
        """One forward (and in g-MAS one backward) of the batch, every unit's contribution into state.bufs."""
        for u in self._units:
            u.group.calls, u.group.pending = [], []
        self._pass = state
        try:
            if self.mode == "global":
                with torch.enable_grad():
                    out = self._output(self.net(*args, **kwargs), where, state.mask)
                    loss = (out.float() if out.element_size() < 4 else out).pow(2).sum()
                    if loss.requires_grad:
                        torch.autograd.grad(loss, state.anchor, allow_unused=True)
            else:
                with torch.no_grad():
                    self._output(self.net(*args, **kwargs), where, state.mask)
            for u in self._units:  # calls whose gradients never arrived contribute zero
                if u.group.calls:
                    self._process(u.group)
        finally:
            self._pass = None
            self._last_calls = state.calls

    # ------------------------------------------------------------------ tasks and penalty
    @property
    def num_samples(self):
        """Samples seen since the last :meth:`consolidate`."""
        return self._count

    @property
    def task_importance(self):
        """Ω_t so far: the mean importance over the samples seen since the last consolidate()."""
        return {g: s / max(self._count, 1) for g, s in self._sum.items()}

    @property
    def importance(self):
        """The consolidated Ω used by the penalty: {name: float32 tensor} (empty before the first task)."""
        return dict(self._importance)

    @property
    def star(self):
        """θ* snapshotted at the last :meth:`consolidate` (empty before the first task)."""
        return dict(self._star)

    @staticmethod
    def _check_merge(merge, alpha):
        if merge not in ("sum", "ema"):
            raise ValueError(f"merge must be 'sum' or 'ema', got {merge!r}")
        if not 0.0 <= float(alpha) <= 1.0:
            raise ValueError(f"alpha must lie in [0, 1], got {alpha}")

    def consolidate(self, merge=None, alpha=None):
        """Folds Ω_t into the stored Ω (``merge="sum"``: Ω + Ω_t; ``"ema"``: αΩ + (1−α)Ω_t, the first
        task taken as is), snapshots θ* ← θ and starts a new task. Under torch.distributed the sums and
        sample counts of all ranks are all-reduced first."""
        merge = self.merge if merge is None else merge
        alpha = self.alpha if alpha is None else float(alpha)
        self._check_merge(merge, alpha)
        sums, count = self._sum, self._count
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            sums, count = self._all_reduce(sums, count)
        if count == 0:
            raise ValueError("consolidate(): no samples seen since the last consolidate(); call accumulate() first")
        for g, s in sums.items():
            omega_t = s / count
            if g not in self._importance:
                self._importance[g] = omega_t
            elif merge == "sum":
                self._importance[g] = self._importance[g] + omega_t
            else:
                self._importance[g] = alpha * self._importance[g] + (1 - alpha) * omega_t
            self._star[g] = self.params[g].detach().clone()
        self._sum = {g: torch.zeros_like(s) for g, s in self._sum.items()}
        self._count = 0
        self.num_tasks += 1
        return self

    @staticmethod
    def _all_reduce(sums, count):
        flat = torch.cat([s.flatten() for s in sums.values()] + [torch.tensor([float(count)], device=next(
            iter(sums.values())).device)]).double()
        torch.distributed.all_reduce(flat)
        out, offset = {}, 0
        for g, s in sums.items():
            out[g] = flat[offset:offset + s.numel()].view_as(s).float()
            offset += s.numel()
        return out, int(round(flat[-1].item()))

    def penalty_state(self):
        """(parameter, Ω, θ*) for every tracked parameter with a consolidated Ω."""
        return [(self.params[g], om, self._star[g]) for g, om in self._importance.items()]

    def penalty(self):
        """R(θ) = λ Σ Ω (θ − θ*)² as a differentiable float32 scalar (zero before the first task)."""
        terms = [(om * (p.float() - star.float()).pow(2)).sum() for p, om, star in self.penalty_state()]
        if not terms:
            return torch.zeros((), device=next(iter(self.params.values())).device)
        return self.lam * torch.stack(terms).sum()

    def add_penalty_grad_(self):
        """p.grad += 2λΩ(θ−θ*) in place for every tracked parameter (a zero .grad is created where
        there is none): the penalty's gradient for any optimizer."""
        with torch.no_grad():
            for p, om, star in self.penalty_state():
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                p.grad.add_((2.0 * self.lam * om * (p.float() - star.float())).to(p.grad.dtype))

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self):
        """Config (λ, mode, per_sample, merge, alpha), Ω, θ*, the running task sums and counts."""
        return {
            "config": {"lam": self.lam, "mode": self.mode, "per_sample": self.per_sample, "merge": self.merge,
                       "alpha": self.alpha},
            "importance": {g: t.clone() for g, t in self._importance.items()},
            "star": {g: t.clone() for g, t in self._star.items()},
            "task_sum": {g: t.clone() for g, t in self._sum.items()},
            "num_samples": self._count,
            "num_tasks": self.num_tasks,
        }

    def load_state_dict(self, state_dict):
        """Loads a :meth:`state_dict` whole or not at all: missing or unexpected names, wrong shapes or
        non-finite values raise a ValueError that lists them."""
        keys = {"config", "importance", "star", "task_sum", "num_samples", "num_tasks"}
        if not isinstance(state_dict, dict) or set(state_dict) != keys:
            got = sorted(state_dict) if isinstance(state_dict, dict) else type(state_dict).__name__
            raise ValueError(f"not a mas_ext state_dict: expected keys {sorted(keys)}, got {got}")
        problems = []
        cfg, cfg_keys = state_dict["config"], {"lam", "mode", "per_sample", "merge", "alpha"}
        if not isinstance(cfg, dict) or set(cfg) != cfg_keys:
            got = sorted(cfg) if isinstance(cfg, dict) else type(cfg).__name__
            problems.append(f"config: expected keys {sorted(cfg_keys)}, got {got}")
        else:  # checked here, so that a bad config never leaves the MAS half-loaded
            if cfg["mode"] not in ("global", "local"):
                problems.append(f"config.mode: {cfg['mode']!r} is not 'global' or 'local'")
            if cfg["merge"] not in ("sum", "ema"):
                problems.append(f"config.merge: {cfg['merge']!r} is not 'sum' or 'ema'")
            if not isinstance(cfg["per_sample"], bool):
                problems.append(f"config.per_sample: {cfg['per_sample']!r} is not a bool")
            for k in ("lam", "alpha"):
                v = cfg[k] if isinstance(cfg[k], (int, float)) and not isinstance(cfg[k], bool) else float("nan")
                if not abs(v) < float("inf") or (k == "alpha" and not 0.0 <= v <= 1.0):
                    problems.append(f"config.{k}: invalid value {cfg[k]!r}")
        for k in ("num_samples", "num_tasks"):
            v = state_dict[k]
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                problems.append(f"{k}: expected a non-negative int, got {v!r}")
        for section in ("importance", "star", "task_sum"):
            entries = state_dict[section]
            if not isinstance(entries, dict):
                problems.append(f"{section}: expected a dict of tensors, got {type(entries).__name__}")
                continue
            want = set(self.params) if section == "task_sum" or entries else set()
            missing, unexpected = sorted(want - set(entries)), sorted(set(entries) - set(self.params))
            if missing:
                problems.append(f"{section}: missing {missing}")
            if unexpected:
                problems.append(f"{section}: unexpected {unexpected}")
            for g, t in entries.items():
                if not torch.is_tensor(t):
                    problems.append(f"{section}.{g}: not a tensor ({type(t).__name__})")
                elif g in self.params and tuple(t.shape) != tuple(self.params[g].shape):
                    problems.append(f"{section}.{g}: shape {tuple(t.shape)} != {tuple(self.params[g].shape)}")
                elif not torch.isfinite(t).all():
                    problems.append(f"{section}.{g}: non-finite values")
        if (isinstance(state_dict["importance"], dict) and isinstance(state_dict["star"], dict)
                and set(state_dict["importance"]) != set(state_dict["star"])):
            problems.append("importance and star name different parameters")
        if problems:
            raise ValueError("cannot load the MAS state_dict (nothing was loaded): " + "; ".join(problems))
        self.lam, self.mode, self.per_sample = float(cfg["lam"]), cfg["mode"], bool(cfg["per_sample"])
        self.merge, self.alpha = cfg["merge"], float(cfg["alpha"])

        def placed(section, dtype=None):
            return {g: t.to(self.params[g].device, dtype or self.params[g].dtype).clone()
                    for g, t in state_dict[section].items()}

        self._importance = placed("importance", torch.float32)
        self._star = placed("star")
        self._sum = placed("task_sum", torch.float32)
        self._count, self.num_tasks = int(state_dict["num_samples"]), int(state_dict["num_tasks"])

    def save(self, path):
        """Writes :meth:`state_dict` to ``path`` atomically (a temporary file, fsync, then rename): a crash
        mid-save leaves the previous file whole."""
        path = os.fspath(path)
        tmp = f"{path}.tmp.{os.getpid()}"
        try:
            with open(tmp, "wb") as f:
                torch.save(self.state_dict(), f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)

    def load(self, path):
        """Loads a file written by :meth:`save`."""
        self.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        return self

    def __repr__(self):
        return (f"{type(self).__name__}(params={len(self.params)}, units={len(self._units)}, lam={self.lam}, "
                f"mode={self.mode!r}, per_sample={self.per_sample}, tasks={self.num_tasks}, "
                f"samples={self._count})")


class FusedMAS(ReferenceMAS):
    """The same API as :class:`ReferenceMAS`, with Linear/Conv importance in compiled kernels that never
    hold per-sample gradients, and the penalty gradient in one multi-tensor kernel. Where no kernel
    applies (no build, ``MAS_EXT_BACKEND=reference``, a device without kernels) it takes the reference
    path with a one-time warning; results equal the reference to float32 rounding."""

    _fused = True

    def _kernels_for(self, tensors):
        why = None
        if os.environ.get("MAS_EXT_BACKEND", "").lower() == "reference":
            return False  # the user asked for it: no warning
        if _ops.error is not None:
            why = f"compiled kernels unavailable ({_ops.error})"
        else:
            devices = {t.device.type for t in torch.utils._pytree.tree_flatten(tensors)[0] if torch.is_tensor(t)}
            # CUDA tensors reach the CUDA kernels only once they are verified on a GPU (the one switch in _ops).
            kernels = {"cpu", "cuda"} if _cuda_ops_built() and _ops.cuda_kernels_enabled() else {"cpu"}
            if devices - kernels:
                why = f"no enabled kernels for device(s) {sorted(devices - kernels)} in this build"
        if why is None:
            return True
        if why not in self._warned:
            self._warned.add(why)
            warnings.warn(f"FusedMAS: {why}; using the reference path", stacklevel=3)
        return False

    def add_penalty_grad_(self):
        state = self.penalty_state()
        if not state or not _ops.available("add_penalty_grad_") or not self._kernels_for([p for p, _, _ in state]):
            return super().add_penalty_grad_()
        with torch.no_grad():
            for p, _, _ in state:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
            torch.ops.mas_ext.add_penalty_grad_([p.grad for p, _, _ in state], [p for p, _, _ in state],
                                                [om for _, om, _ in state], [s for _, _, s in state], 2.0 * self.lam)
