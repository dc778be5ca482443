"""mas_ext.optim (SGD/Adam/AdamW with the MAS penalty fused into the step) and the
mas_ext::add_penalty_grad_ op, against torch.optim with R(θ) = λ Σ Ω (θ − θ*)² as a loss term."""
import copy
import itertools
import warnings

import pytest
import torch
import torch.nn as nn

import mas_ext
from mas_ext import optim as mopt

LAM = 0.7


class StubMAS:
    """The interface the optimizers use: ``lam`` and ``penalty_state()`` -> [(param, Ω, θ*)]."""

    def __init__(self, lam, terms):
        self.lam, self.terms = lam, terms

    def penalty_state(self):
        return list(self.terms)


def make_model(dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(7, 13), nn.Tanh(), nn.Linear(13, 5)).to(dtype)


def make_stub(model, tracked=(0, 3)):
    """Tracks a mix of the model's parameters (by index), with fresh random Ω ≥ 0 and θ* = θ + noise."""
    terms = []
    for i, p in enumerate(model.parameters()):
        if i in tracked:
            om = torch.rand(p.shape, dtype=torch.float32) * 2
            star = (p.detach().float() + 0.2 * torch.randn(p.shape)).to(p.dtype)
            terms.append((p, om, star))
    return StubMAS(LAM, terms)


def penalty_loss(model, terms_by_index):
    """λ Σ Ω (θ − θ*)² over the tracked parameters of ``model`` (a copy: terms matched by index)."""
    params = list(model.parameters())
    return LAM * sum((om * (params[i].float() - star.float()).pow(2)).sum() for i, (om, star) in terms_by_index.items())


def terms_by_index(model, mas):
    ids = {id(p): i for i, p in enumerate(model.parameters())}
    return {ids[id(p)]: (om, star) for p, om, star in mas.penalty_state()}


def groups(model, lr):
    """Two param groups with different learning rates."""
    m = list(model.children())
    return [{"params": m[0].parameters()}, {"params": m[2].parameters(), "lr": lr * 0.5}]


def step_both(model, fused, ref_model, ref, tbi, task_loss):
    """One step of the fused optimizer on the task loss, and of torch.optim on task loss + R(θ)."""
    for m, o, pen in ((model, fused, False), (ref_model, ref, True)):
        o.zero_grad()
        loss = task_loss(m)
        if pen:
            loss = loss + penalty_loss(m, tbi)
        loss.backward()
        o.step()


def rel_err(a, b):
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def assert_state_close(opt_a, opt_b, tol):
    sa, sb = opt_a.state_dict(), opt_b.state_dict()
    assert sa["param_groups"] == sb["param_groups"]
    assert sa["state"].keys() == sb["state"].keys()
    for k in sa["state"]:
        assert sa["state"][k].keys() == sb["state"][k].keys()
        for name, va in sa["state"][k].items():
            vb = sb["state"][k][name]
            if torch.is_tensor(va):
                assert va.dtype == vb.dtype and va.shape == vb.shape, (k, name)
                if name == "step":
                    assert torch.equal(va, vb), (k, name, va, vb)
                else:
                    assert rel_err(va, vb) < tol, (k, name, rel_err(va, vb))
            else:
                assert va == vb


def run_against_torch(name, kw, steps=10, lr=None, roundtrip_at=5):
    """``steps`` steps of mas_ext.optim.<name> vs torch.optim.<name> with the penalty as a loss term,
    param groups with different lr, tracked and untracked params, and a state_dict round trip
    (fused -> torch.optim -> fused) mid-way. Returns the max relative error over params and state."""
    model = make_model()
    mas = make_stub(model)
    ref_model = copy.deepcopy(model)
    tbi = terms_by_index(model, mas)
    lr = kw.get("lr", 1e-2)
    fused = getattr(mopt, name)(groups(model, lr), mas=mas, **kw)
    ref = getattr(torch.optim, name)(groups(ref_model, lr), **kw)
    x, y = torch.randn(9, 7), torch.randn(9, 5)
    for step in range(steps):
        if step == roundtrip_at:
            # fused -> torch.optim -> fused: the checkpoint layout is torch's, both ways
            plain = getattr(torch.optim, name)(groups(model, lr), **kw)
            plain.load_state_dict(copy.deepcopy(fused.state_dict()))
            fused = getattr(mopt, name)(groups(model, lr), mas=mas, **kw)
            fused.load_state_dict(copy.deepcopy(plain.state_dict()))
        step_both(model, fused, ref_model, ref, tbi, lambda m: (m(x) - y).pow(2).mean())
    errs = [rel_err(a, b) for a, b in zip(model.parameters(), ref_model.parameters())]
    assert_state_close(fused, ref, 1e-6)
    return max(errs)


SGD_CASES = [
    dict(lr=0.05, momentum=mom, dampening=damp, nesterov=nest, weight_decay=wd, maximize=mx)
    for mom, damp, nest, wd, mx in itertools.product((0.0, 0.9), (0.0, 0.3), (False, True), (0.0, 1e-2), (False, True))
    if not (nest and (mom == 0 or damp != 0))
]
ADAM_CASES = [
    dict(lr=1e-2, betas=betas, eps=eps, amsgrad=ams, weight_decay=wd, maximize=mx)
    for (betas, eps), ams, wd, mx in itertools.product((((0.9, 0.999), 1e-8), ((0.3, 0.95), 1e-3)), (False, True),
                                                      (0.0, 5e-2), (False, True))
]


@pytest.mark.parametrize("kw", SGD_CASES, ids=str)
def test_sgd_equals_torch_with_penalty_loss(kw):
    assert run_against_torch("SGD", kw) < 1e-6


@pytest.mark.parametrize("name", ["Adam", "AdamW"])
@pytest.mark.parametrize("kw", ADAM_CASES, ids=str)
def test_adam_equals_torch_with_penalty_loss(name, kw):
    assert run_against_torch(name, kw) < 1e-6


@pytest.mark.parametrize("name,kw", [("SGD", dict(lr=0.1, momentum=0.9)), ("Adam", dict(lr=1e-2)),
                                     ("AdamW", dict(lr=1e-2, amsgrad=True))])
def test_defaults_and_state_dict_layout_match_torch(name, kw):
    model = make_model()
    fused = getattr(mopt, name)(model.parameters(), mas=make_stub(model), **kw)
    ref = getattr(torch.optim, name)(copy.deepcopy(model).parameters(), **kw)
    assert isinstance(fused, getattr(torch.optim, name))
    assert fused.defaults == ref.defaults
    for o, m in ((fused, model), (ref, None)):
        params = [p for g in o.param_groups for p in g["params"]]
        for p in params:
            p.grad = torch.randn_like(p)
        o.step()
    a, b = fused.state_dict(), ref.state_dict()
    assert a["param_groups"] == b["param_groups"]
    assert {k: sorted(v) for k, v in a["state"].items()} == {k: sorted(v) for k, v in b["state"].items()}
    for k in a["state"]:
        for n in a["state"][k]:
            assert a["state"][k][n].dtype == b["state"][k][n].dtype and a["state"][k][n].device == b["state"][k][n].device


@pytest.mark.parametrize("name,kw", [("SGD", dict(lr=0.1, momentum=0.9, nesterov=True)), ("Adam", dict(lr=1e-2)),
                                     ("AdamW", dict(lr=1e-2))])
@pytest.mark.parametrize("empty", ["none", "not_consolidated"])
def test_no_consolidated_task_is_exactly_torch(name, kw, empty):
    model = make_model()
    ref_model = copy.deepcopy(model)
    mas = None if empty == "none" else StubMAS(LAM, [])
    fused = getattr(mopt, name)(model.parameters(), mas=mas, **kw)
    ref = getattr(torch.optim, name)(ref_model.parameters(), **kw)
    x = torch.randn(6, 7)
    for _ in range(4):
        for m, o in ((model, fused), (ref_model, ref)):
            o.zero_grad()
            m(x).pow(2).sum().backward()
            o.step()
    for a, b in zip(model.parameters(), ref_model.parameters()):
        assert torch.equal(a, b)


# ---------------------------------------------------------------------------------- half types
def float32_oracle_step(name, kw, fused, model, mas):
    """The fused step's float32 specification, for half-precision params: widen params, grads and
    state to float32, add the penalty gradient in float32, run torch.optim's own float32 step, round
    the results to the parameter dtype once. (torch.optim run directly in bf16/fp16 rounds after every
    elementary op, which the fused kernel deliberately does not do; comparing one step at a time from
    the same state keeps rounding differences from compounding over steps.)"""
    params = list(model.parameters())
    p32 = [p.detach().float().clone().requires_grad_() for p in params]
    terms = {id(p): (om, star) for p, om, star in mas.penalty_state()}
    for p, q in zip(params, p32):
        q.grad = p.grad.float().clone()
        if id(p) in terms:
            om, star = terms[id(p)]
            q.grad += 2 * mas.lam * om * (q.detach() - star.float())
    oracle = getattr(torch.optim, name)(p32, **kw)
    oracle.load_state_dict(copy.deepcopy(fused.state_dict()))  # casts the state to float32 (a copy: `step`
    # tensors would otherwise be shared with the fused optimizer)
    oracle.step()
    return [q.detach().to(p.dtype) for p, q in zip(params, p32)], oracle


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name,kw", [
    ("SGD", dict(lr=0.05, momentum=0.9, weight_decay=1e-2)),
    ("SGD", dict(lr=0.05, momentum=0.9, nesterov=True, maximize=True)),
    ("Adam", dict(lr=1e-2, weight_decay=1e-2)),
    ("Adam", dict(lr=1e-2, amsgrad=True, maximize=True)),
    ("AdamW", dict(lr=1e-2, weight_decay=0.1)),
])
def test_half_params_float32_math(dtype, name, kw):
    model = make_model(dtype)
    mas = make_stub(model)
    fused = getattr(mopt, name)(model.parameters(), mas=mas, **kw)
    ref_model = make_model(dtype)  # the same init: torch.optim run in the same half dtype
    ref_model.load_state_dict(model.state_dict())
    tbi = terms_by_index(model, mas)
    ref = getattr(torch.optim, name)(ref_model.parameters(), **kw)
    x, y = torch.randn(9, 7, dtype=dtype), torch.randn(9, 5, dtype=dtype)
    ulp = torch.finfo(dtype).eps
    for step in range(10):
        for m, o, pen in ((model, fused, False), (ref_model, ref, True)):
            o.zero_grad()
            loss = (m(x) - y).float().pow(2).mean()
            if pen:
                loss = loss + penalty_loss(m, tbi)
            loss.backward()
            if not pen:
                want, oracle = float32_oracle_step(name, kw, fused, model, mas)
            o.step()
        # Against the float32 specification, step by step: equal up to one rounding of the result to
        # `dtype` (float32 intermediates may differ in their last bit and flip a rounding).
        for p, w in zip(model.parameters(), want):
            torch.testing.assert_close(p.detach().float(), w.float(), rtol=ulp, atol=ulp * 1e-2)
        for st, so in zip(fused.state_dict()["state"].values(), oracle.state_dict()["state"].values()):
            for k in st:
                if k != "step":
                    torch.testing.assert_close(st[k].float(), so[k].to(st[k].dtype).float(), rtol=ulp, atol=1e-6)
    # And the trajectory stays close to torch.optim run natively in the same dtype (which rounds every
    # op to `dtype`): a loose, dtype-scaled bound. Where torch's own float16 Adam breaks down (eps=1e-8
    # and the squared gradients underflow in float16: NaN), the float32-math step must stay finite.
    for a, b in zip(model.parameters(), ref_model.parameters()):
        assert torch.isfinite(a).all()
        if torch.isfinite(b).all():
            assert rel_err(a, b) < 8 * ulp, rel_err(a, b)
        else:
            assert dtype == torch.float16 and name.startswith("Adam")


# ---------------------------------------------------------------------------------- GradScaler
@pytest.mark.parametrize("name,kw", [("SGD", dict(lr=0.05, momentum=0.9)), ("Adam", dict(lr=1e-2, amsgrad=True)),
                                     ("AdamW", dict(lr=1e-2))])
def test_grad_scaler_skips_on_inf_and_unscales(name, kw):
    model = make_model()
    mas = make_stub(model)
    ref_model = copy.deepcopy(model)
    tbi = terms_by_index(model, mas)
    fused = getattr(mopt, name)(model.parameters(), mas=mas, **kw)
    ref = getattr(torch.optim, name)(ref_model.parameters(), **kw)
    assert fused._step_supports_amp_scaling
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 12)
    x, y = torch.randn(9, 7), torch.randn(9, 5)
    for step in range(4):
        fused.zero_grad()
        loss = (model(x) - y).pow(2).mean()
        want_grads = torch.autograd.grad(loss, list(model.parameters()), retain_graph=True)
        scaler.scale(loss).backward()
        if step == 2:  # an overflow: the step must leave params and state (step counters included) alone
            next(model.parameters()).grad[0, 0] = float("inf")
            before = [p.detach().clone() for p in model.parameters()]
            state_before = copy.deepcopy(fused.state_dict())
        scaler.step(fused)
        scaler.update()
        if step == 2:
            assert scaler.get_scale() == 2.0 ** 11  # the scaler saw the inf
            assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
            after = fused.state_dict()
            for k, v in state_before["state"].items():
                for n, t in v.items():
                    assert torch.equal(t, after["state"][k][n]), (k, n)
            continue
        # the grads were divided by the scale (and stored back unscaled, as torch's fused optimizers do)
        for p, w in zip(model.parameters(), want_grads):
            torch.testing.assert_close(p.grad, w)
        ref.zero_grad()
        ((ref_model(x) - y).pow(2).mean() + penalty_loss(ref_model, tbi)).backward()
        ref.step()
    for a, b in zip(model.parameters(), ref_model.parameters()):
        assert rel_err(a, b) < 1e-6


@pytest.mark.parametrize("name", ["SGD", "Adam"])
def test_step_kwargs_grad_scale_found_inf(name):
    model = make_model()
    mas = make_stub(model)
    ref_model = copy.deepcopy(model)
    tbi = terms_by_index(model, mas)
    fused = getattr(mopt, name)(model.parameters(), mas=mas, lr=1e-2)
    ref = getattr(torch.optim, name)(ref_model.parameters(), lr=1e-2)
    x = torch.randn(5, 7)
    scale = torch.tensor(64.0)
    fused.zero_grad()
    want_grads = torch.autograd.grad(model(x).pow(2).sum(), list(model.parameters()))
    (model(x).pow(2).sum() * 64).backward()
    before = [p.detach().clone() for p in model.parameters()]
    fused.step(grad_scale=scale, found_inf=torch.tensor(1.0))
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert len(fused.state) == 0
    fused.step(grad_scale=scale, found_inf=torch.tensor(0.0))
    ref.zero_grad()
    (ref_model(x).pow(2).sum() + penalty_loss(ref_model, tbi)).backward()
    ref.step()
    for a, b in zip(model.parameters(), ref_model.parameters()):
        assert rel_err(a, b) < 1e-6
    for p, w in zip(model.parameters(), want_grads):  # .grad now holds the unscaled task gradient
        torch.testing.assert_close(p.grad, w)


# ---------------------------------------------------------------------------------- reference paths
def _penalty_ref_run(name, kw, model_fn, loss_fn, steps=4):
    model = model_fn()
    mas = make_stub(model, tracked=(0,))
    ref_model = copy.deepcopy(model)
    tbi = terms_by_index(model, mas)
    fused = getattr(mopt, name)(model.parameters(), mas=mas, **kw)
    ref = getattr(torch.optim, name)(ref_model.parameters(), **kw)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(steps):
            step_both(model, fused, ref_model, ref, tbi, loss_fn)
    ours = [w for w in caught if "reference path" in str(w.message)]
    return max(rel_err(a, b) for a, b in zip(model.parameters(), ref_model.parameters())), ours


@pytest.mark.parametrize("name,kw,why", [
    ("SGD", dict(lr=torch.tensor(0.05), momentum=0.9), "lr given as a Tensor"),
    ("Adam", dict(lr=torch.tensor(1e-2)), "lr given as a Tensor"),
])
def test_unfusable_options_take_reference_path_with_one_warning(name, kw, why):
    x = torch.randn(6, 7)
    err, warned = _penalty_ref_run(name, kw, make_model, lambda m: m(x).pow(2).mean())
    assert err < 1e-6
    assert len(warned) == 1 and why in str(warned[0].message)


@pytest.mark.parametrize("name,kw", [("SGD", dict(lr=0.05, momentum=0.9)), ("AdamW", dict(lr=1e-2, amsgrad=True))])
def test_differentiable_takes_reference_path(name, kw):
    """differentiable=True (gradients through the step, on non-leaf params) is torch.optim's own step on
    grad + penalty, with the penalty gradient part of the graph."""
    torch.manual_seed(0)
    w0 = torch.randn(4, 3, requires_grad=True)
    om, star = torch.rand(4, 3), torch.randn(4, 3)
    results = []
    for fused in (True, False):
        p = w0.clone()  # non-leaf: differentiable optimizers step such params
        p.retain_grad()
        grad = torch.randn(4, 3, generator=torch.Generator().manual_seed(1))
        if fused:
            opt = getattr(mopt, name)([p], mas=StubMAS(LAM, [(p, om, star)]), differentiable=True, **kw)
            p.grad = grad.clone()
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                opt.step()
            assert any("differentiable=True" in str(c.message) for c in caught)
        else:
            opt = getattr(torch.optim, name)([p], differentiable=True, **kw)
            p.grad = grad + 2 * LAM * om * (p - star)
            opt.step()
        results.append(p)
    assert rel_err(results[0], results[1]) < 1e-6
    # the step is differentiable in both, through the penalty term too
    g_fused, = torch.autograd.grad(results[0].sum(), w0)
    g_ref, = torch.autograd.grad(results[1].sum(), w0)
    torch.testing.assert_close(g_fused, g_ref)


def test_sparse_grads_take_reference_path():
    idx = torch.tensor([1, 4, 4, 7])

    def model_fn():
        torch.manual_seed(0)
        return nn.Sequential(nn.Embedding(10, 3, sparse=True))

    err, warned = _penalty_ref_run("SGD", dict(lr=0.1, momentum=0.5), model_fn, lambda m: m(idx).pow(2).sum())
    assert err < 1e-6
    assert len(warned) == 1 and "sparse" in str(warned[0].message)


def test_mixed_layouts_and_dtypes_in_one_group():
    """channels_last conv weights (dense, permuted) take the kernel; a float64 param too; a transposed
    (non-contiguous but dense) weight as well; all equal torch.optim."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 4 * 4, 2)).to(memory_format=torch.channels_last)
    model[2].double()
    with torch.no_grad():
        model[2].weight = nn.Parameter(model[2].weight.detach().t().contiguous().t())
    mas = make_stub(model, tracked=(0, 2))
    ref_model = copy.deepcopy(model)
    tbi = terms_by_index(model, mas)
    fused = mopt.Adam(model.parameters(), mas=mas, lr=1e-2)
    ref = torch.optim.Adam(ref_model.parameters(), lr=1e-2)
    x = torch.randn(2, 3, 6, 6).to(memory_format=torch.channels_last)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no reference-path warning: everything is fused
        for _ in range(5):
            step_both(model, fused, ref_model, ref, tbi, lambda m: m[2](m[1](m[0](x)).double()).pow(2).sum())
    for a, b in zip(model.parameters(), ref_model.parameters()):
        assert rel_err(a, b) < 1e-6


def test_tracked_param_without_grad_gets_penalty_gradient():
    """As if R(θ) were in the loss: a tracked parameter the task loss does not touch still moves."""
    model = make_model()
    mas = make_stub(model, tracked=(0, 3))
    ref_model = copy.deepcopy(model)
    tbi = terms_by_index(model, mas)
    fused = mopt.Adam(model.parameters(), mas=mas, lr=1e-2)
    ref = torch.optim.Adam(ref_model.parameters(), lr=1e-2)
    x = torch.randn(4, 7)
    for _ in range(3):
        # the last layer (params 2, 3) is not in the task loss
        step_both(model, fused, ref_model, ref, tbi, lambda m: m[0](x).pow(2).sum())
    for a, b in zip(model.parameters(), ref_model.parameters()):
        assert rel_err(a, b) < 1e-6
    assert list(model.parameters())[2].grad is None  # untracked and untouched: skipped, as torch does


def test_deepcopy_keeps_the_penalty_and_signature_lists_mas():
    model = make_model()
    opt = mopt.Adam(model.parameters(), mas=make_stub(model), lr=1e-2)
    twin_model, twin = copy.deepcopy((model, opt))
    assert twin.mas is not None and twin.mas.terms[0][0] is next(twin_model.parameters())
    import inspect
    sig = inspect.signature(mopt.AdamW)
    assert sig.parameters["weight_decay"].default == 1e-2 and sig.parameters["mas"].default is None


def test_forced_reference_backend(monkeypatch):
    monkeypatch.setenv("MAS_EXT_BACKEND", "reference")
    x = torch.randn(6, 7)
    err, warned = _penalty_ref_run("Adam", dict(lr=1e-2, amsgrad=True), make_model, lambda m: m(x).pow(2).mean())
    assert err < 1e-6 and not warned


# ---------------------------------------------------------------------------------- the ops
def _penalty_inputs(dtype, shapes, layouts=None):
    grads, params, omegas, stars = [], [], [], []
    for i, shape in enumerate(shapes):
        p = torch.randn(shape, dtype=torch.float32).to(dtype)
        if layouts and layouts[i] == "t":
            p = p.t()  # a transposed view: dense but not contiguous
        params.append(p)
        grads.append(torch.randn(p.shape).to(dtype))
        omegas.append(torch.rand(p.shape))
        stars.append(torch.randn(p.shape).to(dtype))
    return grads, params, omegas, stars


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_add_penalty_grad_matches_torch(dtype):
    # sizes around the work-item size (2**14), vector tails, scalars, empty, and a multi-chunk tensor
    shapes = [(3, 5), (16384 + 7,), (1,), (0,), (70001,), (129, 257)]
    grads, params, omegas, stars = _penalty_inputs(dtype, shapes)
    # two entries the kernel cannot walk flat: a transposed grad, and a float32 grad for a float64 param
    params.append(torch.randn(6, 4).to(dtype))
    grads.append(torch.randn(4, 6).to(dtype).t())
    omegas.append(torch.rand(6, 4))
    stars.append(torch.randn(6, 4).to(dtype))
    want = [(g.double() + 1.4 * o.double() * (p.double() - s.double())).to(dtype)
            for g, p, o, s in zip(grads, params, omegas, stars)]
    torch.ops.mas_ext.add_penalty_grad_(grads, params, omegas, stars, 1.4)
    tol = {torch.float32: 1e-6, torch.float64: 1e-12}.get(dtype, torch.finfo(dtype).eps)
    for g, w in zip(grads, want):
        torch.testing.assert_close(g, w, rtol=tol, atol=tol)


def test_add_penalty_grad_errors():
    g, p, o, s = _penalty_inputs(torch.float32, [(3, 4)])
    with pytest.raises(RuntimeError, match="same length"):
        torch.ops.mas_ext.add_penalty_grad_(g, p, o[:0], s, 1.0)
    with pytest.raises(RuntimeError, match="float32"):
        torch.ops.mas_ext.add_penalty_grad_(g, p, [o[0].double()], s, 1.0)
    with pytest.raises(RuntimeError, match="shape"):
        torch.ops.mas_ext.add_penalty_grad_(g, p, [torch.rand(4, 3)], s, 1.0)


def _sgd_args():
    grads, params, omegas, stars = _penalty_inputs(torch.float32, [(5, 3), (40000,)])
    bufs = [torch.randn_like(p) for p in params]
    return (params, grads, bufs, [omegas[0], None], [stars[0], None]), dict(
        penalty_scale=1.4, lr=0.1, momentum=0.9, dampening=0.0, weight_decay=0.01, nesterov=True, maximize=False,
        is_first_step=False, grad_scale=torch.tensor([2.0]), found_inf=torch.tensor([0.0]))


def _adam_args(dtype=torch.float32):
    grads, params, omegas, stars = _penalty_inputs(dtype, [(5, 3), (40000,)])
    m = [torch.randn_like(p) for p in params]
    v = [torch.rand_like(p) for p in params]
    vmax = [x.clone() for x in v]
    steps = [torch.tensor(3.0), torch.tensor(1.0)]
    return (params, grads, m, v, vmax, steps, [None, omegas[1]], [None, stars[1]]), dict(
        penalty_scale=1.4, lr=1e-2, beta1=0.9, beta2=0.999, weight_decay=0.01, eps=1e-8, amsgrad=True,
        maximize=False, decoupled_weight_decay=True, grad_scale=None, found_inf=None)


def test_opcheck_all_ops():
    g, p, o, s = _penalty_inputs(torch.float32, [(3, 4), (33,)])
    torch.library.opcheck(torch.ops.mas_ext.add_penalty_grad_.default, (g, p, o, s, 0.5))
    args, kwargs = _sgd_args()
    torch.library.opcheck(torch.ops.mas_ext.fused_sgd_mas_.default, args, kwargs)
    args, kwargs = _adam_args()
    torch.library.opcheck(torch.ops.mas_ext.fused_adam_mas_.default, args, kwargs)


def test_fused_adam_op_multi_chunk_matches_torch():
    """The op alone, on tensors spanning several work items, against torch.optim.AdamW's step."""
    args, kw = _adam_args()
    params, grads, m, v, vmax, steps, oms, stars = [[t.clone() if torch.is_tensor(t) else t for t in a] for a in args]
    ref_p = [p.clone().requires_grad_() for p in params]
    for q, g, o, s in zip(ref_p, grads, oms, stars):
        q.grad = g.clone() + (1.4 * o * (q.detach() - s) if o is not None else 0)
    ref = torch.optim.AdamW(ref_p, lr=1e-2, weight_decay=0.01, amsgrad=True)
    for q, mm, vv, vm, st in zip(ref_p, m, v, vmax, steps):
        ref.state[q] = {"step": st.clone(), "exp_avg": mm.clone(), "exp_avg_sq": vv.clone(), "max_exp_avg_sq": vm.clone()}
    ref.step()
    torch.ops.mas_ext.fused_adam_mas_(params, grads, m, v, vmax, steps, oms, stars, **kw)
    for p, q in zip(params, ref_p):
        assert rel_err(p, q) < 1e-7
    for i, q in enumerate(ref_p):
        assert torch.equal(steps[i], ref.state[q]["step"])
        for x, name in ((m, "exp_avg"), (v, "exp_avg_sq"), (vmax, "max_exp_avg_sq")):
            assert rel_err(x[i], ref.state[q][name]) < 1e-6


# ---------------------------------------------------------------------------------- with the real MAS
@pytest.mark.skipif(not hasattr(mas_ext, "ReferenceMAS"), reason="mas_ext.ReferenceMAS not available")
@pytest.mark.parametrize("cls", ["ReferenceMAS", "FusedMAS"])
@pytest.mark.parametrize("name,kw", [("SGD", dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-3)),
                                     ("Adam", dict(lr=1e-2, amsgrad=True)), ("AdamW", dict(lr=1e-2, weight_decay=0.1))])
def test_with_mas_objects(cls, name, kw):
    model = make_model()
    x, y = torch.randn(11, 7), torch.randn(11, 5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mas = getattr(mas_ext, cls)(model, lam=LAM)
        mas.accumulate([x])
        mas.consolidate()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    ref_model = copy.deepcopy(model)
    tbi = terms_by_index(model, mas)
    fused = getattr(mopt, name)(model.parameters(), mas=mas, **kw)
    ref = getattr(torch.optim, name)(ref_model.parameters(), **kw)
    for _ in range(6):
        step_both(model, fused, ref_model, ref, tbi, lambda m: (m(x) - y).pow(2).mean())
    for a, b in zip(model.parameters(), ref_model.parameters()):
        assert rel_err(a, b) < 1e-6


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_sgd_warns_once_per_task_when_the_penalty_step_overshoots(momentum):
    """SPEC §2: lr · 2λ · max Ω ≥ 2 (2(1+momentum) with momentum) warns once per consolidated task, naming
    the largest stable λ; below the bound, no warning."""
    import warnings

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3))
    mas = mas_ext.FusedMAS(model, lam=1.0, show_progress=False)
    mas.accumulate([torch.randn(8, 4)])
    mas.consolidate()
    top = max(float(om.max()) for om in mas.importance.values())
    limit = 2 * (1 + momentum)
    stable = limit / (0.1 * 2 * top)

    def steps(opt, n=3):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for _ in range(n):
                opt.zero_grad()
                model(torch.randn(2, 4)).pow(2).sum().backward()
                opt.step()
        return [str(w.message) for w in caught if "overshoots" in str(w.message)]

    mas.lam = 1.01 * stable
    found = steps(mas_ext.optim.SGD(model.parameters(), lr=0.1, momentum=momentum, mas=mas))
    assert len(found) == 1 and f"largest stable λ at this lr" in found[0] and f"{stable:.4g}" in found[0], found
    mas.lam = 0.99 * stable
    assert steps(mas_ext.optim.SGD(model.parameters(), lr=0.1, momentum=momentum, mas=mas)) == []
    mas.lam = 1.01 * stable
    opt = mas_ext.optim.SGD(model.parameters(), lr=0.1, momentum=momentum, mas=mas)
    assert len(steps(opt)) == 1
    mas.accumulate([torch.randn(8, 4)])
    mas.consolidate()  # a new task: checked again
    assert len(steps(opt, 1)) <= 1
    assert steps(mas_ext.optim.Adam(model.parameters(), lr=10.0, mas=mas)) == []


def test_sgd_stability_checked_at_every_step_of_a_warm_up():
    """An lr warm-up (or λ raised within a task) that crosses the bound after the task's first step: the check ran on
    that first step only, and θ diverged from θ* without a warning. It runs at every step (max Ω read once per task),
    and still warns once per task."""
    import warnings

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3))
    mas = mas_ext.FusedMAS(model, lam=1.0, show_progress=False)
    mas.accumulate([torch.randn(8, 4)]).consolidate()
    top = max(float(om.max()) for om in mas.importance.values())
    lr = 3.0 / (2 * top)  # lr · 2λ · max Ω = 3 at the end of the warm-up
    opt = mas_ext.optim.SGD(model.parameters(), lr=lr, mas=mas)
    warm = torch.optim.lr_scheduler.LinearLR(opt, start_factor=0.1, total_iters=5)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for i in range(8):
            opt.zero_grad()
            model(torch.randn(2, 4)).pow(2).sum().backward()
            opt.step()
            warm.step()
    found = [str(w.message) for w in caught if "overshoots" in str(w.message)]
    assert len(found) == 1, found


def test_a_parameter_frozen_within_a_task_takes_no_penalty():
    """A backbone frozen mid-task whose .grad is kept (zero_grad(set_to_none=False)): the step added 2λΩ(θ−θ*) to it
    and moved the frozen weights (2.7e-3); the penalty as a loss term gives it no gradient, and add_penalty_grad_()
    none. Equal to torch.optim with the penalty as a loss term."""
    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    x = torch.randn(16, 5)

    def run(fused):
        model = copy.deepcopy(base)
        mas = mas_ext.FusedMAS(model, lam=5.0, show_progress=False).accumulate([x]).consolidate()
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.1)
        opt = (mopt.SGD(model.parameters(), lr=0.1, mas=mas) if fused
               else torch.optim.SGD(model.parameters(), lr=0.1))
        for step in range(4):
            if step == 2:
                model[0].requires_grad_(False)
            opt.zero_grad(set_to_none=False)
            (model(x).pow(2).mean() + (0 if fused else mas.penalty())).backward()
            opt.step()
        return model

    got, want = run(True), run(False)
    for a, b in zip(got.parameters(), want.parameters()):
        torch.testing.assert_close(a, b)


def test_a_parameter_whose_size_one_dim_has_another_stride():
    """A (1, 3) weight with stride 7 in its size-1 dim is contiguous, and its gradient and Ω (strides (1, 1), (3, 1))
    are too, but the kernel walks tensors of equal strides: the step's layout tests, cut short by is_contiguous(),
    handed them to it and it raised. They compare strides, and such a parameter takes the reference path."""
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    model.weight = torch.nn.Parameter(torch.empty_strided((1, 3), (7, 1)).copy_(torch.randn(1, 3)))
    ref_model = copy.deepcopy(model)
    x = torch.randn(4, 3)
    mas = mas_ext.FusedMAS(model, show_progress=False).accumulate([x]).consolidate()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1)
        for p in ref_model.parameters():
            p.add_(0.1)
    opt, ref = mopt.Adam(model.parameters(), lr=0.1, mas=mas), torch.optim.Adam(ref_model.parameters(), lr=0.1)
    for _ in range(2):
        opt.zero_grad()
        model(x).sum().backward()
        opt.step()
        ref.zero_grad()
        penalty = sum((mas.importance[n] * (p - mas.star[n]).pow(2)).sum() for n, p in ref_model.named_parameters())
        (ref_model(x).sum() + mas.lam * penalty).backward()
        ref.step()
    for a, b in zip(model.parameters(), ref_model.parameters()):
        torch.testing.assert_close(a, b)
