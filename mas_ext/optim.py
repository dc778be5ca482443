"""SGD, Adam and AdamW with the MAS penalty fused into the optimizer step.

``mas_ext.optim.SGD/Adam/AdamW`` are subclasses of the matching ``torch.optim`` classes: the
same constructor arguments and defaults, param groups, state and ``state_dict`` layout (a
checkpoint loads into either), plus a keyword ``mas=`` (a ``ReferenceMAS``/``FusedMAS``, or
None). Each ``step()`` applies

    g  ←  grad + 2λ Ω (θ − θ*)           (only for parameters MAS tracks)

and then the optimizer's own update, in one pass over all parameters of a param group: a
C++ multi-tensor CPU kernel (``torch.ops.mas_ext.fused_sgd_mas_`` / ``fused_adam_mas_``),
vectorised and parallel, float32 math for bfloat16/float16 parameters. The penalty enters
before weight decay, momentum and Adam's moments — exactly as if R(θ) = λ Σ Ω (θ − θ*)² were
added to the loss (``maximize=True`` therefore also negates it, as it would a loss term; a
tracked parameter without ``.grad`` gets a zero one, as autograd would give it the penalty's
gradient). AdamW keeps torch's decoupled weight decay.

- With no consolidated task (``mas`` None, nothing consolidated, or λ = 0) ``step()`` *is*
  torch.optim's step.
- Parameters MAS does not track take the same kernel with no penalty term.
- Whatever no kernel covers — ``lr``/``weight_decay`` given as a Tensor,
  ``differentiable=True``, ``capturable=True``, sparse gradients, complex or non-CPU
  parameters, gradients whose dtype or layout differ from the parameter's — takes the
  reference path (the penalty gradient in PyTorch, then the parent class's ``step``), with a
  one-time warning. ``MAS_EXT_BACKEND=reference`` forces that path everywhere (no warning).
- ``step(grad_scale=None, found_inf=None)`` works like torch's fused optimizers, and
  ``_step_supports_amp_scaling = True`` lets ``torch.amp.GradScaler`` hand them over: with
  ``found_inf`` non-zero the step is skipped (params, state and step counters unchanged);
  otherwise the gradients are divided by ``grad_scale`` (and stored back unscaled) first.
"""
import inspect
import os
import warnings

import torch

from . import _ops

__all__ = ["SGD", "Adam", "AdamW"]

_BUILD_HINT = "pip install --no-build-isolation -e ."

_OPS = ("add_penalty_grad_", "fused_sgd_mas_", "fused_adam_mas_")


def _ext_available():
    return all(_ops.available(name) for name in _OPS)


def _require_ext():
    """Raises an ImportError naming the build command when the compiled ops are missing."""
    if _ext_available():
        return
    why = f" ({_ops.error})" if _ops.error is not None else " (the built library predates these ops)"
    raise ImportError(
        "mas_ext.optim needs the compiled extension mas_ext._C" + why + f"; build it with `{_BUILD_HINT}` "
        "in the repository root (or set MAS_EXT_BACKEND=reference to run the pure-PyTorch path)")


_FUSED_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def _forced_reference():
    return os.environ.get("MAS_EXT_BACKEND", "").strip().lower() == "reference"


def _same_layout(t, p):
    """``t`` can be walked as a flat array element-aligned with ``p``."""
    return t.device == p.device and t.shape == p.shape and (p.numel() <= 1 or t.stride() == p.stride())


def _dense(t):
    """Non-overlapping and dense: contiguous up to a permutation of dimensions (e.g. channels_last)."""
    if t.is_contiguous():  # the common case, without the walk below (a step tests every parameter)
        return True
    expected = 1
    for size, stride in sorted(zip(t.shape, t.stride()), key=lambda ss: ss[1]):
        if size == 1:
            continue
        if stride != expected:
            return False
        expected *= size
    return True


def _unhooked(fn):
    """torch.optim patches ``step`` of every optimizer class it instantiates with a wrapper that runs the
    step hooks; calling the parent's step from ours must not run them a second time."""
    while getattr(fn, "hooked", False) and hasattr(fn, "__wrapped__"):
        fn = fn.__wrapped__
    return fn


_KERNELS = {}


def _has_kernel(op, device_type):
    """Whether torch.ops.mas_ext.<op> has a kernel for this device type (CPU here; CUDA if a build adds one)."""
    key = (op, device_type)
    if key not in _KERNELS:
        try:
            _KERNELS[key] = torch._C._dispatch_has_kernel_for_dispatch_key(f"mas_ext::{op}", device_type.upper())
        except RuntimeError:
            _KERNELS[key] = False
    return _KERNELS[key]


def _is_number(x):
    return isinstance(x, (int, float)) and not isinstance(x, bool)


class _MASStep:
    """The MAS part shared by the three optimizers (a mixin in front of the torch.optim class)."""

    _torch_cls = None  # set by each subclass
    _step_supports_amp_scaling = True

    def _mas_setup(self, mas):
        if mas is not None and not (hasattr(mas, "penalty_state") and hasattr(mas, "lam")):
            raise TypeError(f"mas= must be a mas_ext.ReferenceMAS/FusedMAS (with .lam and .penalty_state()), "
                            f"got {type(mas).__name__}")
        if not _forced_reference():
            _require_ext()
        self.mas = mas
        self._mas_warned = set()

    def __getstate__(self):  # torch.optim keeps only defaults/state/param_groups: keep the MAS link too
        state = super().__getstate__()
        state["mas"] = getattr(self, "mas", None)
        return state

    # ------------------------------------------------------------------ helpers
    def _warn_once(self, why):
        warned = self.__dict__.setdefault("_mas_warned", set())
        if why not in warned:
            warned.add(why)
            name = type(self).__name__
            warnings.warn(f"mas_ext.optim.{name}: {why}: no fused kernel applies, so these parameters take the "
                          f"reference path (penalty gradient in PyTorch, then torch.optim.{name}.step): same "
                          f"results, slower", stacklevel=4)

    def _penalty_terms(self):
        """{id(param): (param, omega, star)} and 2λ; empty before the first consolidate(). A parameter frozen since
        (requires_grad=False) has none, as the penalty as a loss term gives it no gradient (with a stale .grad kept
        by zero_grad(set_to_none=False), its penalty moved the frozen weights)."""
        mas = getattr(self, "mas", None)
        if mas is None:
            return {}, 0.0
        lam = float(mas.lam)
        state = mas.penalty_state()
        if not state or lam == 0.0:
            return {}, 0.0
        return {id(p): (p, om, star) for p, om, star in state if p.requires_grad}, 2.0 * lam

    def _check_stability(self, terms, scale):
        """SGD on the penalty alone is gradient descent on a quadratic of curvature 2λΩ: it overshoots when
        lr · 2λ · max Ω ≥ 2 (≥ 2(1 + momentum) with momentum). Checked at every step (an lr warm-up, λ raised within
        a task), against each group's max Ω read once per task; warns once per consolidated task, naming the largest
        stable λ (Adam's steps are normalised by their second moment: no such bound)."""
        if not isinstance(self, torch.optim.SGD):
            return
        key = (id(self.mas), getattr(self.mas, "num_tasks", 0), len(self.param_groups))
        checked = self.__dict__.get("_mas_checked")
        if checked is None or checked[0] != key:  # max Ω of each group, read once per task (lr and λ at every step)
            tracked = {i: float(om.max()) for i, (_, om, _) in terms.items() if om.numel()}
            checked = self._mas_checked = [key, [max((tracked.get(id(p), 0.0) for p in group["params"]), default=0.0)
                                                 for group in self.param_groups], False]
        if checked[2]:  # warned in this task
            return
        for group, top in zip(self.param_groups, checked[1]):
            lr, momentum = float(group["lr"]), float(group.get("momentum") or 0.0)
            limit = 2.0 * (1.0 + momentum)
            if top > 0 and lr * scale * top >= limit:
                checked[2] = True
                lam = scale / 2
                warnings.warn(
                    f"mas_ext.optim.SGD: lr · 2λ · max Ω = {lr:g} · {scale:g} · {top:.4g} = {lr * scale * top:.3g} "
                    f"≥ {limit:g}: a step on the MAS penalty alone overshoots and θ diverges from θ*; the largest "
                    f"stable λ at this lr{' and momentum' if momentum else ''} is {limit / (lr * 2 * top):.4g} "
                    f"(now {lam:g}); lower λ or lr", stacklevel=3)
                return

    def _parent_step(self):
        """torch.optim's own step, with the GradScaler attributes (already handled here) hidden from it."""
        hidden = {k: self.__dict__.pop(k) for k in ("grad_scale", "found_inf") if k in self.__dict__}
        try:
            return _unhooked(self._torch_cls.step)(self)
        finally:
            self.__dict__.update(hidden)

    def _group_unfusable(self, group):
        """Why this param group's hyperparameters rule the kernel out, or None."""
        if not _is_number(group["lr"]):
            return f"lr given as a {type(group['lr']).__name__}"
        for key in self._float_keys:
            if not _is_number(group[key]):
                return f"{key} given as a {type(group[key]).__name__}"
        if "betas" in group and not all(_is_number(b) for b in group["betas"]):
            return "betas given as Tensors"
        if group.get("differentiable", False):
            return "differentiable=True"
        if group.get("capturable", False):
            return "capturable=True"
        return None

    def _param_unfusable(self, p):
        """Why this parameter (with a .grad) cannot take the kernel, or None."""
        g = p.grad
        if p.device.type == "cuda" and not _ops.cuda_kernels_enabled():
            return "parameters on cuda (CUDA kernels off until verified on a GPU; MAS_EXT_CUDA_KERNELS=1 opts in)"
        if p.device.type != "cpu" and (p.device.type == "meta" or not _has_kernel(self._op, p.device.type)):
            return f"parameters on {p.device.type} (no {self._op} kernel for it in this build)"
        if g.is_sparse:
            return "sparse gradients"
        if torch.is_complex(p):
            return "complex parameters"
        if p.dtype not in _FUSED_DTYPES:
            return f"{p.dtype} parameters"
        if g.dtype != p.dtype:
            return "gradients whose dtype differs from the parameter's"
        if not _dense(p):
            return "non-dense parameters (views with gaps)"
        if not _same_layout(g, p):
            return "gradients whose memory layout differs from the parameter's"
        return None

    @staticmethod
    def _kernel_terms(p, term):
        """(omega, star) laid out like ``p`` for the kernel, or (None, None) for an untracked param."""
        if term is None:
            return None, None
        _, om, star = term
        if om.shape != p.shape or star.shape != p.shape:
            raise ValueError(f"MAS penalty state does not match the parameter: Ω {tuple(om.shape)}, "
                             f"θ* {tuple(star.shape)}, parameter {tuple(p.shape)}")
        if om.dtype != torch.float32 or not _same_layout(om, p):
            om = torch.empty_like(p, dtype=torch.float32).copy_(om)
        if star.dtype != p.dtype or not _same_layout(star, p):
            star = torch.empty_like(p).copy_(star)
        return om, star

    # ------------------------------------------------------------------ step
    def step(self, closure=None, *, grad_scale=None, found_inf=None):
        """One optimizer step on grad + 2λΩ(θ−θ*).

        Args:
            closure (Callable, optional): re-evaluates the model and returns the loss.
            grad_scale (Tensor, optional): the gradients are divided by it first (GradScaler).
            found_inf (Tensor, optional): when non-zero the step is skipped entirely.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if grad_scale is None:
            grad_scale = getattr(self, "grad_scale", None)
        if found_inf is None:
            found_inf = getattr(self, "found_inf", None)
        if found_inf is not None and float(found_inf) != 0.0:
            return loss  # skipped: params, state and step counters unchanged
        if grad_scale is not None:
            grad_scale = grad_scale.detach().to(dtype=torch.float32).reshape(1)

        terms, scale = self._penalty_terms()
        if terms:
            self._check_stability(terms, scale)
        if not terms:  # no consolidated task: exactly torch.optim
            if grad_scale is not None:
                with torch.no_grad():
                    for group in self.param_groups:
                        for p in group["params"]:
                            if p.grad is not None:
                                p.grad.div_(grad_scale.to(p.grad.device))
            self._parent_step()
            return loss

        reference = set()
        force = _forced_reference()
        with torch.no_grad():
            mine = {id(q) for g in self.param_groups for q in g["params"]}
            for p, _, _ in terms.values():  # as autograd would: R(θ) gives every tracked param a gradient
                if p.grad is None and p.requires_grad and id(p) in mine:
                    p.grad = torch.zeros_like(p)
            for group in self.param_groups:
                why = None if force else self._group_unfusable(group)
                fusable = []
                for p in group["params"]:
                    if p.grad is None:
                        continue
                    pwhy = "MAS_EXT_BACKEND=reference" if force else (why or self._param_unfusable(p))
                    if pwhy is None:
                        fusable.append(p)
                    else:
                        if not force:
                            self._warn_once(pwhy)
                        reference.add(p)
                by_device = {}  # one op call per device: a group may hold parameters on several
                for p in fusable:
                    by_device.setdefault(p.device, []).append(p)
                for ps in by_device.values():
                    reference.update(self._fused_group_step(group, ps, terms, scale, grad_scale))
        if reference:
            self._reference_step(reference, terms, scale, grad_scale)
        return loss

    def _reference_step(self, targets, terms, scale, grad_scale):
        """Penalty gradient in PyTorch, then the parent's step, for the parameters in ``targets``; every
        other parameter is hidden from the parent (its .grad set aside) and all grads are restored."""
        saved = []
        differentiable = bool(self.defaults.get("differentiable", False))
        try:
            for group in self.param_groups:
                for p in group["params"]:
                    g = p.grad
                    if g is None:
                        continue
                    saved.append((p, g))
                    if p not in targets:
                        p.grad = None
                        continue
                    if grad_scale is not None:
                        with torch.no_grad():
                            g.div_(grad_scale.to(g.device))  # stored back unscaled, as torch's fused steps do
                    term = terms.get(id(p))
                    if term is not None:
                        _, om, star = term
                        with torch.set_grad_enabled(differentiable and torch.is_grad_enabled()):
                            theta = p if differentiable else p.detach()
                            if torch.is_complex(p):
                                pen = scale * om.to(p.device) * (theta - star.to(p.device))
                            else:
                                pen = (scale * om.to(p.device) * (theta.float() - star.to(p.device).float())).to(g.dtype)
                            p.grad = pen + g  # dense + (possibly sparse) grad: dense, as autograd would sum them
        except BaseException:
            for p, g in saved:
                p.grad = g
            raise
        try:
            self._parent_step()
        finally:
            for p, g in saved:
                p.grad = g


class SGD(_MASStep, torch.optim.SGD):
    """torch.optim.SGD whose step adds the MAS penalty gradient 2λΩ(θ−θ*) in one fused CPU pass.

    Same arguments, defaults, param groups and state_dict as :class:`torch.optim.SGD`, plus
    ``mas=`` (a :class:`mas_ext.ReferenceMAS` / :class:`mas_ext.FusedMAS`, or None).
    """

    _torch_cls = torch.optim.SGD
    _op = "fused_sgd_mas_"
    _float_keys = ("momentum", "dampening", "weight_decay")

    def __init__(self, params, *args, mas=None, **kwargs):
        super().__init__(params, *args, **kwargs)
        self._mas_setup(mas)

    def _fused_group_step(self, group, fusable, terms, scale, grad_scale):
        params, grads, bufs = [], [], []
        self._init_group(dict(group, params=fusable), params, grads, bufs)
        momentum = float(group["momentum"])
        reference = []
        # Two batches at most: parameters with a momentum buffer, and those starting one (buf = grad).
        batches = {False: ([], [], [], [], []), True: ([], [], [], [], [])}
        for i, (p, g) in enumerate(zip(params, grads)):
            buf = bufs[i] if momentum != 0 else None
            first = momentum != 0 and buf is None
            if first:
                buf = torch.empty_like(p)
            elif buf is not None and not (buf.dtype == p.dtype and _same_layout(buf, p)):
                self._warn_once("momentum buffers whose dtype or layout differ from the parameter's")
                reference.append(p)
                continue
            om, star = self._kernel_terms(p, terms.get(id(p)))
            b = batches[first]
            b[0].append(p), b[1].append(g), b[2].append(buf), b[3].append(om), b[4].append(star)
        for first, (ps, gs, bs, oms, stars) in batches.items():
            if not ps:
                continue
            torch.ops.mas_ext.fused_sgd_mas_(
                ps, gs, bs if momentum != 0 else [], oms, stars, penalty_scale=scale, lr=float(group["lr"]),
                momentum=momentum, dampening=float(group["dampening"]), weight_decay=float(group["weight_decay"]),
                nesterov=bool(group["nesterov"]), maximize=bool(group["maximize"]), is_first_step=first,
                grad_scale=None if grad_scale is None else grad_scale.to(ps[0].device))
            if momentum != 0:
                for p, buf in zip(ps, bs):
                    self.state[p]["momentum_buffer"] = buf
        return reference


class Adam(_MASStep, torch.optim.Adam):
    """torch.optim.Adam whose step adds the MAS penalty gradient 2λΩ(θ−θ*) in one fused CPU pass.

    Same arguments, defaults, param groups and state_dict as :class:`torch.optim.Adam`, plus
    ``mas=`` (a :class:`mas_ext.ReferenceMAS` / :class:`mas_ext.FusedMAS`, or None).
    """

    _torch_cls = torch.optim.Adam
    _op = "fused_adam_mas_"
    _float_keys = ("eps", "weight_decay")

    def __init__(self, params, *args, mas=None, **kwargs):
        super().__init__(params, *args, **kwargs)
        self._mas_setup(mas)

    def _fused_group_step(self, group, fusable, terms, scale, grad_scale):
        params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps = [], [], [], [], [], []
        self._init_group(dict(group, params=fusable), params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps)
        amsgrad = bool(group["amsgrad"])
        keep = []
        reference = []
        for i, p in enumerate(params):
            state = [exp_avgs[i], exp_avg_sqs[i]] + ([max_exp_avg_sqs[i]] if amsgrad else [])
            if not all(s.dtype == p.dtype and _same_layout(s, p) for s in state) or not (
                    steps[i].numel() == 1 and steps[i].device.type == "cpu"):
                self._warn_once("optimizer state whose dtype, layout or device differ from the parameter's")
                reference.append(p)
            else:
                keep.append(i)
        if not keep:
            return reference
        pick = lambda xs: [xs[i] for i in keep]  # noqa: E731
        params = pick(params)
        oms, stars = zip(*[self._kernel_terms(p, terms.get(id(p))) for p in params])
        beta1, beta2 = group["betas"]
        torch.ops.mas_ext.fused_adam_mas_(
            params, pick(grads), pick(exp_avgs), pick(exp_avg_sqs), pick(max_exp_avg_sqs) if amsgrad else [],
            pick(steps), list(oms), list(stars), penalty_scale=scale, lr=float(group["lr"]), beta1=float(beta1),
            beta2=float(beta2), weight_decay=float(group["weight_decay"]), eps=float(group["eps"]), amsgrad=amsgrad,
            maximize=bool(group["maximize"]), decoupled_weight_decay=bool(group.get("decoupled_weight_decay", False)),
            grad_scale=None if grad_scale is None else grad_scale.to(params[0].device))
        return reference


class AdamW(_MASStep, torch.optim.AdamW):
    """torch.optim.AdamW (decoupled weight decay) whose step adds the MAS penalty gradient 2λΩ(θ−θ*)
    in one fused CPU pass.

    Same arguments, defaults, param groups and state_dict as :class:`torch.optim.AdamW`, plus
    ``mas=`` (a :class:`mas_ext.ReferenceMAS` / :class:`mas_ext.FusedMAS`, or None).
    """

    _torch_cls = torch.optim.AdamW
    _op = "fused_adam_mas_"
    _float_keys = ("eps", "weight_decay")
    _fused_group_step = Adam._fused_group_step

    def __init__(self, params, *args, mas=None, **kwargs):
        super().__init__(params, *args, **kwargs)
        self._mas_setup(mas)


def _advertise_signature(cls):
    """help()/inspect show the parent's arguments and defaults, plus ``mas=None``."""
    sig = inspect.signature(cls._torch_cls.__init__)
    params = [p for p in sig.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
    params.append(inspect.Parameter("mas", inspect.Parameter.KEYWORD_ONLY, default=None))
    cls.__init__.__signature__ = sig.replace(parameters=params)


for _cls in (SGD, Adam, AdamW):
    _advertise_signature(_cls)
del _cls
