"""torch.compile and the custom ops: the importance ops inside ``torch.compile(fullgraph=True)`` give the
eager results, ``torch.library.opcheck`` passes on both (shapes, float32/bfloat16, with and without a bias
accumulator), and a model whose forward/backward is compiled trains with ``mas_ext.optim`` to the eager
parameters. Compiles on CPU need a C++ compiler (inductor); shapes are kept small."""
import shutil
import warnings

import pytest
import torch
import torch.nn as nn

import mas_ext
from mas_ext import _ops

pytestmark = [
    pytest.mark.skipif(_ops.error is not None, reason=f"compiled extension not built: {_ops.error}"),
]
needs_cxx = pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None,
                               reason="inductor on CPU needs a C++ compiler")


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def rand(*shape, dtype=torch.float32, g=None):
    return torch.randn(*shape, generator=g).to(dtype)


# ----------------------------------------------------------------------------- per-sample oracles (float64)
def linear_oracle(a, g):
    """a (N, P, I), g (N, P, O): Σ_k |Σ_p g a ᵀ| and Σ_k |Σ_p g|."""
    a, g = a.double(), g.double()
    return torch.einsum("npo,npi->noi", g, a).abs().sum(0), g.sum(1).abs().sum(0)


def conv_oracle(x, g, wshape, stride, padding, dilation, groups):
    x, g = x.double(), g.double()
    nd = x.dim() - 2
    w = torch.zeros(wshape, dtype=torch.float64)
    out = torch.zeros_like(w)
    for xk, gk in zip(x, g):
        _, gw, _ = torch.ops.aten.convolution_backward(gk[None], xk[None], w, None, stride, padding, dilation,
                                                       False, [0] * nd, groups, [False, True, False])
        out += gw.abs()
    return out, g.flatten(2).sum(2).abs().sum(0)


# ----------------------------------------------------------------------------- cases
# linear: (N, P, I, O)
LINEAR_CASES = [(6, 1, 5, 3), (4, 7, 6, 5), (1, 3, 2, 2), (9, 2, 1, 4)]
# conv: (N, C, spatial, O, kernel, stride, padding, dilation, groups)
CONV_CASES = [
    (3, 2, (9,), 4, (3,), (1,), (0,), (1,), 1),
    (2, 4, (7, 6), 6, (3, 2), (2, 1), (1, 0), (1, 2), 2),
    (3, 3, (5, 4), 3, (1, 1), (1, 1), (0, 0), (1, 1), 3),  # depthwise 1x1
    (2, 2, (4, 5, 3), 4, (2, 3, 1), (1, 2, 1), (1, 1, 0), (1, 1, 1), 1),
]


def linear_args(n, p, i, o, dtype, bias, seed=0):
    gen = torch.Generator().manual_seed(seed)
    w = torch.rand(o, i, generator=gen)  # accumulators start non-zero: the ops add into them
    b = torch.rand(o, generator=gen) if bias else None
    return w, b, rand(n, p, i, dtype=dtype, g=gen), rand(n, p, o, dtype=dtype, g=gen)


def conv_args(case, dtype, bias, seed=0):
    n, c, spatial, o, k, s, p, d, groups = case
    gen = torch.Generator().manual_seed(seed)
    out_sp = [(spatial[j] + 2 * p[j] - d[j] * (k[j] - 1) - 1) // s[j] + 1 for j in range(len(spatial))]
    w = torch.rand(o, c // groups, *k, generator=gen)
    b = torch.rand(o, generator=gen) if bias else None
    x, g = rand(n, c, *spatial, dtype=dtype, g=gen), rand(n, o, *out_sp, dtype=dtype, g=gen)
    return w, b, x, g, list(k), list(s), list(p), list(d), groups


def clone(t):
    return None if t is None else t.clone()


# ----------------------------------------------------------------------------- eager ops against the oracle
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("case", LINEAR_CASES, ids=str)
def test_linear_op_eager_matches_oracle(case, bias):
    w, b, a, g = linear_args(*case, torch.float32, bias, seed=11)
    w0, b0 = clone(w), clone(b)
    torch.ops.mas_ext.linear_importance_(w, b, a, g)
    ow, ob = linear_oracle(a, g)
    torch.testing.assert_close(w.double(), w0.double() + ow, rtol=1e-5, atol=1e-5)
    if bias:
        torch.testing.assert_close(b.double(), b0.double() + ob, rtol=1e-5, atol=1e-5)


def test_ops_accept_inputs_that_require_grad():
    """In g-MAS a layer's input requires grad; the op (parallel workers run with grad mode on) must not care."""
    w, b, a, g = linear_args(8, 5, 6, 4, torch.float32, True, seed=3)
    a.requires_grad_(True)
    w0 = w.clone()
    torch.ops.mas_ext.linear_importance_(w, b, a, g)
    torch.testing.assert_close(w.double(), w0.double() + linear_oracle(a.detach(), g)[0], rtol=1e-5, atol=1e-5)
    w, b, x, g, *rest = conv_args(CONV_CASES[1], torch.float32, True, seed=3)
    x.requires_grad_(True)
    w0 = w.clone()
    torch.ops.mas_ext.conv_importance_(w, b, x, g, *rest)
    want = conv_oracle(x.detach(), g, w.shape, *rest[1:])[0]
    torch.testing.assert_close(w.double(), w0.double() + want, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- inside torch.compile(fullgraph=True)
def _linear_step(w, b, a, weight):
    """A small graph around the op: the layer's output y = a Wᵀ is its own gradient (l-MAS), twice."""
    y = torch.nn.functional.linear(a, weight)
    torch.ops.mas_ext.linear_importance_(w, b, a, y)
    torch.ops.mas_ext.linear_importance_(w, b, a * 2, y)
    return w.sum() + (b.sum() if b is not None else 0)


# Inductor compiles (C++ codegen) take seconds on CPU: one inductor case per op, the rest through aot_eager
# (the same functionalised graph with the op's fake kernel, run eagerly).
def inductor(*values, id):
    return pytest.param(*values, "inductor", marks=[needs_cxx, pytest.mark.slow], id=id)


@pytest.mark.parametrize("bias,dtype,backend", [
    inductor(True, torch.float32, id="bias-fp32-inductor"),
    pytest.param(True, torch.float32, "aot_eager", id="bias-fp32"),
    pytest.param(False, torch.float32, "aot_eager", id="nobias-fp32"),
    pytest.param(True, torch.bfloat16, "aot_eager", id="bias-bf16"),
    pytest.param(False, torch.bfloat16, "aot_eager", id="nobias-bf16"),
])
def test_linear_op_in_compiled_graph(bias, dtype, backend):
    gen = torch.Generator().manual_seed(5)
    w, b, a, _ = linear_args(4, 3, 6, 5, dtype, bias, seed=5)
    weight = rand(5, 6, dtype=dtype, g=gen)
    we, be = clone(w), clone(b)
    total_e = _linear_step(we, be, a, weight)
    compiled = torch.compile(_linear_step, fullgraph=True, backend=backend)
    total_c = compiled(w, b, a, weight)
    torch.testing.assert_close(w, we, rtol=1e-5, atol=1e-5)  # the mutation reached the caller's tensor
    if bias:
        torch.testing.assert_close(b, be, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(total_c, total_e, rtol=1e-5, atol=1e-4)
    # and a second call on the same compiled graph accumulates again
    compiled(w, b, a, weight)
    _linear_step(we, be, a, weight)
    torch.testing.assert_close(w, we, rtol=1e-5, atol=1e-5)


def _conv_step(w, b, x, g, k, s, p, d, groups):
    torch.ops.mas_ext.conv_importance_(w, b, x, g.relu(), k, s, p, d, groups)
    return w.abs().sum()


@pytest.mark.parametrize("case,backend", [inductor(1, id="2d-groups-inductor")] + [
    pytest.param(c, "aot_eager", id=name) for c, name in enumerate(["1d", "2d-groups", "depthwise", "3d"])])
def test_conv_op_in_compiled_graph(case, backend):
    w, b, x, g, k, s, p, d, groups = conv_args(CONV_CASES[case], torch.float32, True, seed=case)
    we, be = w.clone(), b.clone()
    _conv_step(we, be, x, g, k, s, p, d, groups)
    compiled = torch.compile(_conv_step, fullgraph=True, backend=backend)
    compiled(w, b, x, g, k, s, p, d, groups)
    torch.testing.assert_close(w, we, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(b, be, rtol=1e-5, atol=1e-5)
    ow, ob = conv_oracle(x, g.relu(), w.shape, s, p, d, groups)
    w0, b0 = conv_args(CONV_CASES[case], torch.float32, True, seed=case)[:2]
    torch.testing.assert_close(w.double(), w0.double() + ow, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(b.double(), b0.double() + ob, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- opcheck
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_opcheck_linear_importance(dtype, bias):
    for case in LINEAR_CASES:
        torch.library.opcheck(torch.ops.mas_ext.linear_importance_.default, linear_args(*case, dtype, bias))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_opcheck_conv_importance(dtype, bias):
    for case in CONV_CASES:
        torch.library.opcheck(torch.ops.mas_ext.conv_importance_.default, conv_args(case, dtype, bias))


# ----------------------------------------------------------------------------- training with mas_ext.optim
def _optim():
    try:
        import mas_ext.optim as optim
    except ImportError as e:
        pytest.skip(f"mas_ext.optim does not import yet: {e}")
    return optim


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv1d(2, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(24, 16), nn.LayerNorm(16),
                         nn.GELU(), nn.Linear(16, 3))


def _train(model, opt_cls, opt_kw, mas_cls, compiled, steps=4):
    """Task 1 importance (eager, as MAS runs), then training steps on task 2 with the penalty in the optimizer;
    only the forward/backward is compiled in the compiled run."""
    optim = _optim()
    gen = torch.Generator().manual_seed(1)
    mas = mas_cls(model, lam=3.0, show_progress=False)
    mas.accumulate([torch.randn(8, 2, 8, generator=gen) for _ in range(2)]).consolidate()
    with torch.no_grad():  # move away from θ* so the penalty acts from the first step
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    opt = getattr(optim, opt_cls)(model.parameters(), mas=mas, **opt_kw)

    def loss_fn(x, y):
        return nn.functional.cross_entropy(model(x), y)

    fn = torch.compile(loss_fn, fullgraph=True) if compiled else loss_fn
    losses = []
    for _ in range(steps):
        x, y = torch.randn(16, 2, 8, generator=gen), torch.randint(0, 3, (16,), generator=gen)
        opt.zero_grad()
        loss = fn(x, y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses, mas


@needs_cxx
@pytest.mark.slow
@pytest.mark.parametrize("opt_cls,opt_kw", [("SGD", dict(lr=0.1, momentum=0.9, weight_decay=1e-3)),
                                            ("Adam", dict(lr=1e-2, weight_decay=1e-3))], ids=["SGD", "Adam"])
def test_compiled_forward_backward_trains_like_eager(opt_cls, opt_kw):
    eager_model, compiled_model = _net(), _net()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # inductor may warn about CPU features; irrelevant here
        losses_e, mas_e = _train(eager_model, opt_cls, opt_kw, mas_ext.FusedMAS, compiled=False)
        losses_c, mas_c = _train(compiled_model, opt_cls, opt_kw, mas_ext.FusedMAS, compiled=True)
    for n in mas_e.importance:
        torch.testing.assert_close(mas_c.importance[n], mas_e.importance[n])
    assert losses_c == pytest.approx(losses_e, rel=1e-4, abs=1e-6)
    for (n, pe), (_, pc) in zip(eager_model.named_parameters(), compiled_model.named_parameters()):
        torch.testing.assert_close(pc, pe, rtol=1e-4, atol=1e-5, msg=f"{opt_cls}: parameter {n} differs")
    # the penalty really took part: without it the parameters end elsewhere
    free = _net()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        optim = _optim()
        gen = torch.Generator().manual_seed(1)
        [torch.randn(8, 2, 8, generator=gen) for _ in range(2)]
        with torch.no_grad():
            for p in free.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=gen))
        opt = getattr(optim, opt_cls)(free.parameters(), **opt_kw)
        for _ in range(4):
            x, y = torch.randn(16, 2, 8, generator=gen), torch.randint(0, 3, (16,), generator=gen)
            opt.zero_grad()
            nn.functional.cross_entropy(free(x), y).backward()
            opt.step()
    diff = max((pf - pe).abs().max().item() for pf, pe in zip(free.parameters(), eager_model.parameters()))
    assert diff > 1e-4, "the MAS penalty had no effect on training"


# ----------------------------------------------------------------------------- MAS on a torch.compile'd model
class _Inner(nn.Module):
    def __init__(self):
        super().__init__()
        self.block = torch.compile(nn.Sequential(nn.Linear(6, 8), nn.Tanh()))  # a compiled submodule
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.block(x))


def _plain_twin(inner):
    """The same network without any compile wrapper, the same parameters, the plain names."""
    twin = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    with torch.no_grad():
        for (_, p), q in zip(inner.named_parameters(), twin.parameters()):
            q.copy_(p)
    return twin


@needs_cxx
@pytest.mark.slow
@pytest.mark.parametrize("mode", ["global", "local"])
@pytest.mark.parametrize("cls", [mas_ext.ReferenceMAS, mas_ext.FusedMAS], ids=["Reference", "Fused"])
def test_mas_on_a_compiled_model_equals_eager(cls, mode):
    """A torch.compile'd model is accepted as it is (like DDP: names without ``_orig_mod.``) and gives the
    eager Ω; a compiled submodule too. The compiled forward still works afterwards."""
    torch.manual_seed(3)
    inner = _Inner()
    twin = _plain_twin(inner)
    compiled = torch.compile(inner)
    gen = torch.Generator().manual_seed(4)
    batches = [torch.randn(5, 4, 6, generator=gen), torch.randn(3, 6, generator=gen)]
    out_before = compiled(batches[0]).detach()
    mas = cls(compiled, mode=mode, show_progress=False).accumulate(batches)
    want = cls(twin, mode=mode, show_progress=False).accumulate(batches)
    names = {"block._orig_mod.0.weight": "0.weight", "block._orig_mod.0.bias": "0.bias",
             "head.weight": "2.weight", "head.bias": "2.bias"}
    assert sorted(mas.params) == sorted(names)
    for n, m in names.items():
        torch.testing.assert_close(mas.task_importance[n], want.task_importance[m], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(compiled(batches[0]), out_before)
    assert all(mod.training for mod in inner.modules())
    # deployment: observe() on the compiled model's own calls
    seen = cls(compiled, mode=mode, show_progress=False)
    with seen.observe():
        out = compiled(batches[0])
    torch.testing.assert_close(out, out_before)
    assert seen.num_samples == 5
    want = cls(twin, mode=mode, show_progress=False).accumulate(batches[:1])
    for n, m in names.items():
        torch.testing.assert_close(seen.task_importance[n], want.task_importance[m], rtol=1e-5, atol=1e-7)
