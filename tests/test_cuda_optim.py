"""The CUDA kernels of mas_ext::add_penalty_grad_ / fused_sgd_mas_ / fused_adam_mas_ (csrc/cuda/optim_*)
and mas_ext.optim on CUDA parameters. Needs a GPU and a CUDA build (skipped otherwise); each test opts
in with MAS_EXT_CUDA_KERNELS=1 (the switch stays off until these pass: `make gpu-check`).

Oracles: torch.optim with R(θ) as a loss term (float32), the float32 specification step by step
(float16/bfloat16, as tests/test_optim.py), and the CPU kernels (already checked against torch.optim)
on copies of the same inputs."""
import copy
import warnings

import pytest
import torch
import torch.nn as nn

from mas_ext import _ops
from mas_ext import optim as mopt
from test_optim import ADAM_CASES, LAM, SGD_CASES, StubMAS, assert_state_close, float32_oracle_step, rel_err

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]
DEV = "cuda"


@pytest.fixture(autouse=True)
def cuda_kernels_on(monkeypatch):
    monkeypatch.setenv("MAS_EXT_CUDA_KERNELS", "1")
    assert _ops.cuda_kernels_enabled()
    for op in ("add_penalty_grad_", "fused_sgd_mas_", "fused_adam_mas_"):
        if not torch._C._dispatch_has_kernel_for_dispatch_key(f"mas_ext::{op}", "CUDA"):
            pytest.fail(f"a GPU is present but mas_ext::{op} has no CUDA kernel: build with CUDA_HOME set")


def make_model(dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(7, 13), nn.Tanh(), nn.Linear(13, 5)).to(DEV, dtype)


def make_stub(model, tracked=(0, 3)):
    terms = []
    g = torch.Generator().manual_seed(1)
    for i, p in enumerate(model.parameters()):
        if i in tracked:
            om = (torch.rand(p.shape, generator=g) * 2).to(DEV)
            star = (p.detach().float() + 0.2 * torch.randn(p.shape, generator=g).to(DEV)).to(p.dtype)
            terms.append((p, om, star))
    return StubMAS(LAM, terms)


def terms_by_index(model, mas):
    ids = {id(p): i for i, p in enumerate(model.parameters())}
    return {ids[id(p)]: (om, star) for p, om, star in mas.penalty_state()}


def loss_with_penalty(model, tbi):
    params = list(model.parameters())
    return LAM * sum((om * (params[i].float() - star.float()).pow(2)).sum() for i, (om, star) in tbi.items())


def no_reference_warnings(caught):
    ours = [str(w.message) for w in caught if "reference path" in str(w.message)]
    assert not ours, ours


def groups(model, lr):
    m = list(model.children())
    return [{"params": m[0].parameters()}, {"params": m[2].parameters(), "lr": lr * 0.5}]


# ---------------------------------------------------------------------------------- vs torch.optim
def run_against_torch(name, kw, steps=10):
    model = make_model()
    mas = make_stub(model)
    ref_model = copy.deepcopy(model)
    tbi = terms_by_index(model, mas)
    lr = kw.get("lr", 1e-2)
    fused = getattr(mopt, name)(groups(model, lr), mas=mas, **kw)
    ref = getattr(torch.optim, name)(groups(ref_model, lr), **kw)
    x, y = torch.randn(9, 7, device=DEV), torch.randn(9, 5, device=DEV)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(steps):
            for m, o, pen in ((model, fused, False), (ref_model, ref, True)):
                o.zero_grad()
                loss = (m(x) - y).pow(2).mean()
                if pen:
                    loss = loss + loss_with_penalty(m, tbi)
                loss.backward()
                o.step()
    no_reference_warnings(caught)
    assert_state_close(fused, ref, 1e-6)
    return max(rel_err(a, b) for a, b in zip(model.parameters(), ref_model.parameters()))


@pytest.mark.parametrize("kw", SGD_CASES, ids=str)
def test_sgd_equals_torch_with_penalty_loss(kw):
    assert run_against_torch("SGD", kw) < 1e-6


@pytest.mark.parametrize("name", ["Adam", "AdamW"])
@pytest.mark.parametrize("kw", ADAM_CASES, ids=str)
def test_adam_equals_torch_with_penalty_loss(name, kw):
    assert run_against_torch(name, kw) < 1e-6


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name,kw", [("SGD", kw) for kw in SGD_CASES] +
                         [(n, kw) for n in ("Adam", "AdamW") for kw in ADAM_CASES], ids=str)
def test_half_params_float32_math(dtype, name, kw):
    """10 steps, each against the float32 specification from the same state (one rounding to dtype)."""
    model = make_model(dtype)
    mas = make_stub(model)
    fused = getattr(mopt, name)(model.parameters(), mas=mas, **kw)
    x, y = torch.randn(9, 7, device=DEV, dtype=dtype), torch.randn(9, 5, device=DEV, dtype=dtype)
    ulp = torch.finfo(dtype).eps
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(10):
            fused.zero_grad()
            (model(x) - y).float().pow(2).mean().backward()
            want, oracle = float32_oracle_step(name, kw, fused, model, mas)
            fused.step()
            for p, w in zip(model.parameters(), want):
                torch.testing.assert_close(p.detach().float(), w.float(), rtol=ulp, atol=ulp * 1e-2)
            for st, so in zip(fused.state_dict()["state"].values(), oracle.state_dict()["state"].values()):
                for k in st:
                    if k != "step":
                        torch.testing.assert_close(st[k].float(), so[k].to(st[k].dtype).float(), rtol=ulp, atol=1e-6)
    no_reference_warnings(caught)


# ---------------------------------------------------------------------------------- vs the CPU kernels
def _inputs(dtypes, shapes, seed=0, misalign=True):
    """params (some views at an odd element offset: not 16-byte aligned), grads, Ω, θ* on the CPU."""
    g = torch.Generator().manual_seed(seed)
    params, grads, oms, stars = [], [], [], []
    k = 0
    for dtype in dtypes:
        for shape in shapes:
            p = torch.randn(shape, generator=g).to(dtype)
            if misalign and k % 3 == 2:
                buf = torch.empty(p.numel() + 1, dtype=dtype)
                buf[1:].copy_(p.flatten())
                p = buf[1:].view(shape)
            params.append(p)
            grads.append((torch.randn(shape, generator=g) * 0.5).to(dtype))
            tracked = k % 2 == 0
            oms.append(torch.rand(shape, generator=g) * 2 if tracked else None)
            stars.append((p.float() + 0.2 * torch.randn(shape, generator=g)).to(dtype) if tracked else None)
            k += 1
    return params, grads, oms, stars


def _to(xs, device):
    out = []
    for x in xs:
        if x is None or not torch.is_tensor(x):
            out.append(x)
        elif x.data_ptr() % 16 and device == DEV:  # keep the misalignment on the device
            buf = torch.empty(x.numel() + 1, dtype=x.dtype, device=device)
            out.append(buf[1:].view(x.shape).copy_(x))
        else:
            out.append(x.to(device, copy=True))
    return out


def assert_close_lists(gpu, cpu, ulps=1):
    """float16/bfloat16: `ulps` roundings of a float32 result may flip (float32 intermediates differ in their
    last bit, e.g. by FMA contraction); float32/float64: a few float rounding errors."""
    for a, b in zip(gpu, cpu):
        if a is None:
            continue
        a = a.cpu()
        if a.dtype in (torch.float16, torch.bfloat16):
            tol = ulps * torch.finfo(a.dtype).eps
            torch.testing.assert_close(a.float(), b.float(), rtol=tol, atol=tol * 1e-2)
        elif a.dtype == torch.float64:
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
        else:
            torch.testing.assert_close(a, b, rtol=2e-6, atol=1e-7)


ODD_SHAPES = [(1,), (3,), (4,), (5,), (65537,), (7, 9), (2 * 65536 + 13,)]
ALL = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


def _adam_op_kw(**over):
    kw = dict(penalty_scale=1.4, lr=1e-2, beta1=0.9, beta2=0.999, weight_decay=1e-2, eps=1e-8, amsgrad=True,
              maximize=False, decoupled_weight_decay=True)
    kw.update(over)
    return kw


@pytest.mark.parametrize("shapes", [ODD_SHAPES, [(3,), (1,), (17,), (8,), (65537,)] * 30],
                         ids=["small_odd_sizes", "many_tensors"])  # "small": also run under compute-sanitizer
def test_ops_match_cpu_kernels_odd_sizes_mixed_dtypes_many_tensors(shapes):
    """numel not a multiple of the vector width, misaligned views, four dtypes in one call, and (many)
    more tensors than one launch holds; three ops, several steps, against the CPU kernels."""
    params, grads, oms, stars = _inputs(ALL, shapes)
    # penalty op (tracked entries only)
    idx = [i for i, o in enumerate(oms) if o is not None]
    cpu = [[x[i] for i in idx] for x in (grads, params, oms, stars)]
    cpu[0] = [g.clone() for g in cpu[0]]
    gpu = [_to(x, DEV) for x in cpu]
    torch.ops.mas_ext.add_penalty_grad_(*cpu, 1.4)
    torch.ops.mas_ext.add_penalty_grad_(*gpu, 1.4)
    assert_close_lists(gpu[0], cpu[0])
    # SGD with momentum (first step, then with buffers), nesterov, weight decay
    sgd = dict(penalty_scale=1.4, lr=0.05, momentum=0.9, dampening=0.0, weight_decay=1e-2, nesterov=True,
               maximize=False)
    c = [[t.clone() for t in params], [t.clone() for t in grads], [torch.empty_like(p) for p in params]]
    d = [_to(x, DEV) for x in c]
    for step in range(3):
        torch.ops.mas_ext.fused_sgd_mas_(*c, oms, stars, is_first_step=step == 0, **sgd)
        torch.ops.mas_ext.fused_sgd_mas_(*d, _to(oms, DEV), _to(stars, DEV), is_first_step=step == 0, **sgd)
        assert_close_lists(d[0], c[0])
        assert_close_lists(d[2], c[2])
        d = [_to(x, DEV) for x in c]  # continue from the CPU state: no compounding
    # Adam(W), amsgrad
    c = [[t.clone() for t in params], [t.clone() for t in grads]] + [[torch.zeros_like(p) for p in params]
                                                                      for _ in range(3)]
    c_steps = [torch.zeros(()) for _ in params]
    for _ in range(3):
        d, d_steps = [_to(x, DEV) for x in c], [s.clone() for s in c_steps]
        torch.ops.mas_ext.fused_adam_mas_(*c, c_steps, oms, stars, **_adam_op_kw())
        torch.ops.mas_ext.fused_adam_mas_(*d, d_steps, _to(oms, DEV), _to(stars, DEV), **_adam_op_kw())
        assert all(torch.equal(a, b) for a, b in zip(c_steps, d_steps))
        for x, y in zip(d, c):
            assert_close_lists(x, y)


def test_mixed_dtype_param_group_matches_cpu():
    """One param group with float32, bfloat16, float16 and float64 params through mas_ext.optim.AdamW:
    the CUDA step equals the CPU step on copies."""
    params, grads, oms, stars = _inputs(ALL, [(5, 3), (40000,), (33,)], misalign=False)
    runs = {}
    for device in ("cpu", DEV):
        ps = [nn.Parameter(p.clone().to(device)) for p in params]
        terms = [(p, o.to(device), s.to(device)) for p, o, s in zip(ps, oms, stars) if o is not None]
        opt = mopt.AdamW(ps, lr=1e-2, weight_decay=0.1, amsgrad=True, mas=StubMAS(LAM, terms))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for step in range(5):
                for p, g in zip(ps, grads):
                    p.grad = (g * (step + 1)).to(device)
                opt.step()
        no_reference_warnings(caught)
        runs[device] = ps
    assert_close_lists([p.detach() for p in runs[DEV]], [p.detach() for p in runs["cpu"]], ulps=2)


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
    scaler = torch.amp.GradScaler("cuda", init_scale=2.0 ** 12)
    x, y = torch.randn(9, 7, device=DEV), torch.randn(9, 5, device=DEV)
    for step in range(4):
        fused.zero_grad()
        loss = (model(x) - y).pow(2).mean()
        want_grads = torch.autograd.grad(loss, list(model.parameters()), retain_graph=True)
        scaler.scale(loss).backward()
        if step == 2:
            next(model.parameters()).grad[0, 0] = float("inf")
            before = [p.detach().clone() for p in model.parameters()]
            state_before = copy.deepcopy(fused.state_dict())
        scaler.step(fused)
        scaler.update()
        if step == 2:
            assert scaler.get_scale() == 2.0 ** 11
            assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
            after = fused.state_dict()
            for k, v in state_before["state"].items():
                for n, t in v.items():
                    assert torch.equal(t, after["state"][k][n]), (k, n)
            continue
        for p, w in zip(model.parameters(), want_grads):
            torch.testing.assert_close(p.grad, w)
        ref.zero_grad()
        ((ref_model(x) - y).pow(2).mean() + loss_with_penalty(ref_model, tbi)).backward()
        ref.step()
    for a, b in zip(model.parameters(), ref_model.parameters()):
        assert rel_err(a, b) < 1e-6


def test_found_inf_on_device_skips_adam_with_device_steps():
    params, grads, oms, stars = [_to(x, DEV) for x in _inputs([torch.float32, torch.bfloat16], ODD_SHAPES)]
    state = [[torch.zeros_like(p) for p in params] for _ in range(3)]
    steps = [torch.zeros((), device=DEV) for _ in params]
    snap = [[t.clone() for t in xs] for xs in (params, grads, *state, steps)]
    torch.ops.mas_ext.fused_adam_mas_(params, grads, *state, steps, oms, stars, **_adam_op_kw(),
                                      grad_scale=torch.tensor([8.0], device=DEV),
                                      found_inf=torch.tensor([1.0], device=DEV))
    for xs, ys in zip((params, grads, *state, steps), snap):
        assert all(torch.equal(a, b) for a, b in zip(xs, ys))
    with pytest.raises(RuntimeError, match="found_inf needs the step counters on the device"):
        torch.ops.mas_ext.fused_adam_mas_(params, grads, *state, [s.cpu() for s in steps], oms, stars,
                                          **_adam_op_kw(), found_inf=torch.tensor([0.0], device=DEV))


def test_empty_tensor_device_step_counters_step_too():
    """The kernels skip empty tensors; their device counters still step (and stay put on found_inf), as torch's."""
    params = [torch.empty(0, device=DEV), torch.randn(5, device=DEV)]
    grads = [torch.empty(0, device=DEV), torch.randn(5, device=DEV)]
    oms, stars = [torch.empty(0, device=DEV), torch.rand(5, device=DEV)], [torch.empty(0, device=DEV), params[1].clone()]
    state = [[torch.zeros_like(p) for p in params] for _ in range(3)]
    steps = [torch.zeros((), device=DEV) for _ in params]
    torch.ops.mas_ext.fused_adam_mas_(params, grads, *state, steps, oms, stars, **_adam_op_kw())
    assert [s.item() for s in steps] == [1.0, 1.0]
    torch.ops.mas_ext.fused_adam_mas_(params, grads, *state, steps, oms, stars, **_adam_op_kw(),
                                      found_inf=torch.tensor([1.0], device=DEV))
    assert [s.item() for s in steps] == [1.0, 1.0]
    torch.ops.mas_ext.fused_adam_mas_(params[:1], grads[:1], *[x[:1] for x in state], steps[:1], oms[:1], stars[:1],
                                      **_adam_op_kw(), found_inf=torch.tensor([0.0], device=DEV))
    assert steps[0].item() == 2.0


def test_adam_keeps_float32_subnormals():
    """A 1e-19 gradient squares to a float32 subnormal: flushed to zero (nvcc's fast math), eps=0 would divide by
    zero; torch.optim.Adam keeps it."""
    p = nn.Parameter(torch.ones(4, device=DEV))
    q = nn.Parameter(torch.ones(4, device=DEV))
    for x in (p, q):
        x.grad = torch.full((4,), 1e-19, device=DEV)
    mopt.Adam([p], lr=1e-3, eps=0.0, mas=StubMAS(LAM, [(p, torch.zeros(4, device=DEV), p.detach().clone())])).step()
    torch.optim.Adam([q], lr=1e-3, eps=0.0).step()
    assert torch.isfinite(p).all()
    torch.testing.assert_close(p.detach(), q.detach())


def test_param_group_over_two_devices_steps_each_on_its_own():
    """A group holding CPU and CUDA parameters: one op call per device, equal to torch.optim."""
    torch.manual_seed(4)
    ps = [nn.Parameter(torch.randn(6)), nn.Parameter(torch.randn(6, device=DEV))]
    qs = [nn.Parameter(p.detach().clone()) for p in ps]
    terms = [(p, torch.rand(6, device=p.device), p.detach() + 0.1) for p in ps]
    opt = mopt.SGD(ps, lr=0.1, momentum=0.9, mas=StubMAS(LAM, terms))
    ref = torch.optim.SGD(qs, lr=0.1, momentum=0.9)
    for _ in range(3):
        for p, q in zip(ps, qs):
            g = torch.randn(6).to(p.device)
            p.grad, q.grad = g.clone(), g.clone()
        for q, (_, om, star) in zip(qs, terms):
            q.grad += 2 * LAM * om * (q.detach() - star)
        opt.step()
        ref.step()
    for p, q in zip(ps, qs):
        torch.testing.assert_close(p.detach(), q.detach())


# ---------------------------------------------------------------------------------- capturable
def test_device_steps_equal_host_steps():
    params, grads, oms, stars = [_to(x, DEV) for x in _inputs([torch.float32, torch.float16], ODD_SHAPES)]
    runs = []
    for device_steps in (False, True):
        p = [t.clone() for t in params]
        state = [[torch.zeros_like(t) for t in params] for _ in range(3)]
        steps = [torch.zeros((), device=DEV if device_steps else "cpu") for _ in params]
        for _ in range(4):
            torch.ops.mas_ext.fused_adam_mas_(p, grads, *state, steps, oms, stars, **_adam_op_kw())
        assert all(s.item() == 4 for s in steps)
        runs.append(p)
    assert_close_lists(runs[1], [t.cpu() for t in runs[0]])


def test_cuda_graph_captured_steps_equal_eager():
    """Adam with device step counters, grad_scale and found_inf on the device, SGD and the penalty op,
    captured in one CUDA graph and replayed: equal to the same calls run eagerly."""
    params, grads, oms, stars = [_to(x, DEV) for x in _inputs([torch.float32, torch.bfloat16], ODD_SHAPES)]
    g = torch.Generator(device=DEV).manual_seed(0)
    new_grads = [[torch.randn(t.shape, device=DEV, generator=g).to(t.dtype) * 4 for t in grads] for _ in range(5)]

    def make():
        p = [t.clone() for t in params]
        st = [[torch.zeros_like(t) for t in params] for _ in range(3)]
        bufs = [torch.zeros_like(t) for t in params]
        steps = [torch.zeros((), device=DEV) for _ in params]
        gr = [t.clone() for t in grads]
        return p, st, bufs, steps, gr

    scale = torch.tensor([4.0], device=DEV)
    found = torch.zeros(1, device=DEV)

    def step(p, st, bufs, steps, gr):
        torch.ops.mas_ext.add_penalty_grad_([gr[0]], [p[0]], [oms[0]], [stars[0]], 0.5)
        torch.ops.mas_ext.fused_adam_mas_(p, gr, *st, steps, oms, stars, **_adam_op_kw(), grad_scale=scale,
                                          found_inf=found)
        torch.ops.mas_ext.fused_sgd_mas_(p, gr, bufs, oms, stars, penalty_scale=1.4, lr=1e-3, momentum=0.9,
                                         dampening=0.0, weight_decay=0.0, nesterov=False, maximize=False,
                                         is_first_step=False)

    eager = make()
    graphed = make()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.stream(side):
        warm = make()
        step(*warm)  # warm-up outside the graph (on copies)
        with torch.cuda.graph(graph):
            step(*graphed)
    torch.cuda.current_stream().wait_stream(side)
    # capturing ran nothing: replay k times, each after loading the k-th grads
    for k, ng in enumerate(new_grads):
        for dst, src in zip(eager[4], ng):
            dst.copy_(src)
        for dst, src in zip(graphed[4], ng):
            dst.copy_(src)
        found.fill_(1.0 if k == 2 else 0.0)  # one skipped step, decided on the device
        step(*eager)
        graph.replay()
    torch.cuda.synchronize()
    assert all(s.item() == 4 for s in graphed[3])
    for a, b in zip(graphed[0] + graphed[2] + [t for xs in graphed[1] for t in xs],
                    eager[0] + eager[2] + [t for xs in eager[1] for t in xs]):
        assert torch.equal(a, b)


def test_optimizer_capturable_stays_on_reference_path():
    """mas_ext.optim routes capturable=True to torch's own (capturable) step; the kernels' capturable
    mode is reached through the op (test above)."""
    model = make_model()
    opt = mopt.Adam(model.parameters(), lr=1e-2, capturable=True, mas=make_stub(model))
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    with pytest.warns(UserWarning, match="capturable=True"):
        opt.step()


# ---------------------------------------------------------------------------------- opcheck
def test_opcheck_cuda():
    params, grads, oms, stars = [_to(x, DEV) for x in _inputs([torch.float32], [(3, 4), (33,)], misalign=False)]
    torch.library.opcheck(torch.ops.mas_ext.add_penalty_grad_.default,
                          ([g.clone() for g in grads], params, [torch.rand_like(p) for p in params],
                           [p.clone() for p in params], 0.5))
    torch.library.opcheck(torch.ops.mas_ext.fused_sgd_mas_.default,
                          ([p.clone() for p in params], [g.clone() for g in grads], [torch.randn_like(p) for p in params],
                           oms, stars),
                          dict(penalty_scale=1.4, lr=0.1, momentum=0.9, dampening=0.0, weight_decay=0.01, nesterov=True,
                               maximize=False, is_first_step=False, grad_scale=torch.tensor([2.0], device=DEV),
                               found_inf=torch.tensor([0.0], device=DEV)))
    for steps in ([torch.tensor(3.0), torch.tensor(1.0)], [torch.tensor(3.0, device=DEV), torch.tensor(1.0, device=DEV)]):
        torch.library.opcheck(torch.ops.mas_ext.fused_adam_mas_.default,
                              ([p.clone() for p in params], [g.clone() for g in grads],
                               [torch.randn_like(p) for p in params], [torch.rand_like(p) for p in params],
                               [torch.rand_like(p) for p in params], steps, oms, stars), _adam_op_kw())


def test_switch_off_keeps_cuda_params_on_reference_path(monkeypatch):
    monkeypatch.delenv("MAS_EXT_CUDA_KERNELS")
    model = make_model()
    opt = mopt.SGD(model.parameters(), lr=0.1, mas=make_stub(model))
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    with pytest.warns(UserWarning, match="MAS_EXT_CUDA_KERNELS=1"):
        opt.step()
