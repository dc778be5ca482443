"""The importance-pass rows: each method's set-up (untimed, once) and run (timed; returns Omega).

A method is `prepare(model, x) -> (run, reset)`: `run()` does one pass over the batch x and
returns {param name: Omega tensor} (None for the plain pass), `reset()` (untimed) drops what a
previous run left behind (e.g. `.grad`) so each measured run allocates its own outputs.
"""
from __future__ import annotations

import inspect

import torch

# key -> (label, letter in the issue, is a per-sample peer)
METHODS = {
    "plain": ("plain forward+backward of sum ||f(x)||^2", "a", False),
    "batch_abs": ("batch |grad| shortcut (existing MAS libraries)", "b", False),
    "reference": ("mas_ext.ReferenceMAS", "c", False),
    "fused": ("mas_ext.FusedMAS", "d", False),
    "loop": ("per-sample loop (autograd.grad per sample)", "e", True),
    "vmap": ("torch.func vmap(grad) + functional_call", "f", True),
    "opacus": ("Opacus GradSampleModule", "g", True),
    "backpack": ("BackPACK BatchGrad", "h", True),
}
PEERS = [k for k, v in METHODS.items() if v[2]]


class NotAvailable(Exception):
    """The method's library or API is not there (row says 'not available: ...')."""


class Unsupported(Exception):
    """The method does not support this model (row says 'unsupported: ...')."""


def _is_oom(e):
    msg = str(e).lower()
    return isinstance(e, MemoryError) or type(e).__name__ == "OutOfMemoryError" or any(
        s in msg for s in ("out of memory", "can't allocate memory", "cannot allocate memory", "std::bad_alloc"))


def _params(model):
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def _set_grads_none(model):
    for p in model.parameters():
        p.grad = None


def _sqnorm(out):
    if not torch.is_tensor(out):
        raise TypeError(f"model output is {type(out).__name__}, expected a tensor")
    return out.pow(2).sum()


def plain(model, x):
    def run():
        _sqnorm(model(x)).backward()
        return None

    return run, lambda: _set_grads_none(model)


def batch_abs(model, x):
    named = _params(model)
    n = x.shape[0]

    def run():
        grads = torch.autograd.grad(_sqnorm(model(x)), [p for _, p in named])
        return {name: g.abs().div_(n) for (name, _), g in zip(named, grads)}

    return run, lambda: None


def _mas(cls_name):
    def prepare(model, x):
        try:
            import mas_ext
        except Exception as e:  # noqa: BLE001 - any import failure means "not available"
            raise NotAvailable(f"import mas_ext failed: {type(e).__name__}: {e}") from e
        cls = getattr(mas_ext, cls_name, None)
        if cls is None:
            raise NotAvailable(f"mas_ext.{cls_name} does not exist yet")
        try:
            kw = {"show_progress": False} if "show_progress" in inspect.signature(cls.accumulate).parameters else {}
        except (TypeError, ValueError):
            kw = {}

        made = []

        def reset():
            # A fresh object per run, made untimed as Opacus' and BackPACK's wrapping is, and shown two samples first:
            # what it learns once about the model (where each layer's inputs hold the batch, which parameters are
            # read outside their layers) is set-up too. consolidate() then puts the timed batch in a task of its own.
            mas = cls(model, mode="global", per_sample=True)
            mas.accumulate([x[:2]], **kw).consolidate()
            made[:] = [mas]

        def run():
            mas = made[0]
            mas.accumulate([x], **kw)
            omega = mas.task_importance
            if mas.num_samples != x.shape[0]:
                raise RuntimeError(f"num_samples is {mas.num_samples}, expected {x.shape[0]}")
            return dict(omega)

        return run, reset

    return prepare


def loop(model, x):
    named = _params(model)
    ps = [p for _, p in named]
    n = x.shape[0]

    def run():
        acc = [torch.zeros_like(p) for p in ps]
        for k in range(n):
            gs = torch.autograd.grad(_sqnorm(model(x[k : k + 1])), ps)
            for a, g in zip(acc, gs):
                a.add_(g.abs())
        return {name: a.div_(n) for (name, _), a in zip(named, acc)}

    return run, lambda: None


def vmap(model, x):
    from torch.func import functional_call, grad, vmap as _vmap

    named = _params(model)
    n = x.shape[0]
    buffers = dict(model.named_buffers())

    def loss(params, xk):
        return _sqnorm(functional_call(model, (params, buffers), (xk.unsqueeze(0),)))

    per_sample = _vmap(grad(loss), in_dims=(None, 0))

    def run():
        params = {name: p.detach() for name, p in named}
        g = per_sample(params, x)
        return {name: g[name].abs().sum(0).div_(n) for name, _ in named}

    return run, lambda: None


def opacus(model, x):
    try:
        import opacus as _opacus  # noqa: F401
        from opacus import GradSampleModule
    except Exception as e:  # noqa: BLE001
        raise NotAvailable(f"import opacus failed: {type(e).__name__}: {e}") from e
    named = _params(model)
    n = x.shape[0]
    try:
        gsm = GradSampleModule(model, batch_first=True, loss_reduction="sum", strict=False)
    except Exception as e:  # noqa: BLE001
        raise Unsupported(f"GradSampleModule: {type(e).__name__}: {e}") from e
    # Opacus records activations only in train mode. Train mode equals eval mode for a model
    # without BatchNorm or active dropout; with them it would change f (samples not independent).
    if any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) or (isinstance(m, torch.nn.Dropout) and m.p > 0)
           for m in model.modules()):
        raise Unsupported("Opacus captures activations only in train mode, where BatchNorm/dropout change f")
    gsm.train()

    def reset():
        for _, p in named:
            p.grad = None
            p.grad_sample = None

    try:
        samplers = set(GradSampleModule.GRAD_SAMPLERS)
    except Exception:  # noqa: BLE001
        samplers = None
    no_sampler = sorted({type(m).__name__ for m in model.modules()
                         if samplers is not None and type(m) not in samplers and any(True for _ in m.parameters(recurse=False))})

    def run():
        try:
            _sqnorm(gsm(x)).backward()
        except Exception as e:  # noqa: BLE001
            if _is_oom(e):
                raise
            why = f"no Opacus grad sampler for {', '.join(no_sampler)}; its generic (functorch) fallback raised " if no_sampler else ""
            raise Unsupported(f"{why}{type(e).__name__}: {e}") from e
        omega = {}
        missing = []
        for name, p in named:
            gs = getattr(p, "grad_sample", None)
            if gs is None:
                missing.append(name)
                continue
            omega[name] = gs.abs().sum(0).div_(n)
        if missing:
            raise Unsupported(f"no grad_sample for {len(missing)} parameter(s), e.g. {missing[:3]}")
        return omega

    return run, reset


def backpack(model, x):
    try:
        from backpack import backpack as _bp_ctx, extend
        from backpack.extensions import BatchGrad
    except Exception as e:  # noqa: BLE001
        raise NotAvailable(f"import backpack failed: {type(e).__name__}: {e}") from e
    named = _params(model)
    n = x.shape[0]
    # first-order extensions (BatchGrad) need only each module's input and grad_output, so the
    # model is extended in place (no torch.fx converter, which fails on e.g. the transformer)
    try:
        ext_model = extend(model)
    except Exception as e:  # noqa: BLE001
        raise Unsupported(f"extend: {type(e).__name__}: {e}") from e
    lossfunc = extend(torch.nn.MSELoss(reduction="sum"))  # sum_k ||f(x_k) - 0||^2: grad_batch[k] = grad ||f(x_k)||^2
    ext_named = [(nm, p) for nm, p in ext_model.named_parameters() if p.requires_grad]
    if len(ext_named) != len(named) or any(a.shape != b.shape for (_, a), (_, b) in zip(named, ext_named)):
        raise Unsupported("converted model's parameters do not match the original's")

    def reset():
        for _, p in ext_named:
            p.grad = None
            if hasattr(p, "grad_batch"):
                del p.grad_batch

    def run():
        out = ext_model(x)
        loss = lossfunc(out, torch.zeros_like(out))
        with _bp_ctx(BatchGrad()):
            loss.backward()
        omega, missing = {}, []
        for (name, _), (_, p) in zip(named, ext_named):
            gb = getattr(p, "grad_batch", None)
            if gb is None:
                missing.append(name)
                continue
            omega[name] = gb.abs().sum(0).div_(n)
        if missing:
            owners = sorted({type(model.get_submodule(n.rpartition(".")[0])).__name__ for n in missing})
            raise Unsupported(f"BackPACK BatchGrad has no extension for {', '.join(owners)} "
                              f"(no grad_batch for {len(missing)} parameter(s), e.g. {missing[0]})")
        return omega

    return run, reset


PREPARE = {
    "plain": plain,
    "batch_abs": batch_abs,
    "reference": _mas("ReferenceMAS"),
    "fused": _mas("FusedMAS"),
    "loop": loop,
    "vmap": vmap,
    "opacus": opacus,
    "backpack": backpack,
}


def reference_omega(model, x, budget_s, clock):
    """Per-sample definition Omega = (1/N) sum_k |grad ||f(x_k)||^2|, float64 where it fits the budget.

    Returns (omega as float64 tensors, dtype used). Switches to float32 when the float64 loop is
    projected to take more than budget_s (after timing the first samples).
    """
    import copy

    n = x.shape[0]
    m64 = copy.deepcopy(model).double()
    x64 = x.double() if x.is_floating_point() else x
    named = _params(m64)
    ps = [p for _, p in named]
    acc = [torch.zeros_like(p) for p in ps]
    t0 = clock()
    for k in range(n):
        gs = torch.autograd.grad(_sqnorm(m64(x64[k : k + 1])), ps)
        for a, g in zip(acc, gs):
            a.add_(g.abs())
        if k in (0, 2) and (clock() - t0) / (k + 1) * n > budget_s:
            break
    else:
        return {name: a / n for (name, _), a in zip(named, acc)}, "float64"
    del m64, acc
    run, _ = loop(model, x)
    return {k: v.double() for k, v in run().items()}, "float32"
