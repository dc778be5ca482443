"""SPEC §5 end to end, for ReferenceMAS and FusedMAS: bad input gets a clear error, and nothing is lost.

Every failure leaves Ω, the task sums and the sample count as of the last whole batch, the model's
training flags, ``.grad`` and ``requires_grad`` as they were, no hook behind, and the MAS usable: carrying
on afterwards gives what a run without the failure gives.
"""
import signal
import warnings

import pytest
import torch
import torch.nn as nn

import mas_ext

CLASSES = [mas_ext.ReferenceMAS, mas_ext.FusedMAS]
IDS = ["Reference", "Fused"]


class Trip(nn.Module):
    """Identity that raises ``exc`` on its ``at``-th call (counting from 0)."""

    def __init__(self, exc=None, at=None):
        super().__init__()
        self.exc, self.at, self.calls = exc, at, 0

    def forward(self, x):
        self.calls += 1
        if self.exc is not None and self.calls - 1 == self.at:
            raise self.exc
        return x


class SqrtScale(nn.Module):
    """y = x √w: finite output at w = 0 but an infinite gradient ∂y/∂w = x / (2√w)."""

    def __init__(self, d):
        super().__init__()
        self.w = nn.Parameter(torch.rand(d) + 0.5)

    def forward(self, x):
        return x * torch.sqrt(self.w)


class SqrtOfSquare(nn.Module):
    """y = √(x²) = |x|: finite everywhere, but its gradient at x = 0 is inf·0 = NaN."""

    def forward(self, x):
        return torch.sqrt(x * x)


def make_model(middle=None, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), middle if middle is not None else nn.Tanh(), nn.Linear(8, 8), nn.Tanh(),
                         nn.Linear(8, 3))


def data(sizes, seed=1, positions=4):
    g = torch.Generator().manual_seed(seed)
    shape = (positions, 6) if positions else (6,)  # positions: the sequence kernel path; none: |G|ᵀ|A|
    return [torch.randn(n, *shape, generator=g) for n in sizes]


def state(mas):
    sd = mas.state_dict()
    return {"task": {k: v.clone() for k, v in sd["task_importance"].items()}, "count": mas.num_samples,
            "importance": {k: v.clone() for k, v in sd["importance"].items()}, "tasks": mas.num_tasks}


def assert_state(mas, want):
    got = state(mas)
    assert got["count"] == want["count"], f"num_samples {got['count']} != {want['count']}"
    assert got["tasks"] == want["tasks"]
    for section in ("task", "importance"):
        assert set(got[section]) == set(want[section])
        for k in want[section]:
            assert torch.equal(got[section][k], want[section][k]), f"{section}.{k} changed"


def assert_model_untouched(model, grads):
    """Training flags restored, .grad as before, no hook left behind."""
    for m in model.modules():
        assert m.training, f"{type(m).__name__} left in eval mode"
        assert not m._forward_hooks and not m._forward_pre_hooks, f"hook left on {type(m).__name__}"
    for n, p in model.named_parameters():
        assert p.requires_grad
        if grads[n] is None:
            assert p.grad is None, f"{n}.grad appeared"
        else:
            assert torch.equal(p.grad, grads[n]), f"{n}.grad changed"


def prepared(cls, model, mode="global", **kw):
    """The model in training mode with existing .grad (to check both are left alone), and its MAS."""
    model.train()
    model(torch.randn(2, 4, 6)).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    return cls(model, mode=mode, show_progress=False, **kw), grads


def after(cls, mode, batches, middle=None, **kw):
    """The state of an uninterrupted run over ``batches``."""
    mas = cls(make_model(middle), mode=mode, show_progress=False, **kw)
    if batches:
        mas.accumulate(batches)
    return state(mas)


# ----------------------------------------------------------------------------- KeyboardInterrupt
@pytest.mark.parametrize("mode", ["global", "local"])
@pytest.mark.parametrize("cls", CLASSES, ids=IDS)
def test_interrupted_batch_iterator_keeps_whole_batches(cls, mode):
    batches = data([5, 3, 4, 6])

    def interrupted():
        yield batches[0]
        yield batches[1]
        raise KeyboardInterrupt

    mas, grads = prepared(cls, make_model(), mode)
    with pytest.raises(KeyboardInterrupt):
        mas.accumulate(interrupted())
    assert mas.num_samples == 8
    assert_state(mas, after(cls, mode, batches[:2]))
    assert_model_untouched(mas.model, grads)
    # carry on: the same as one run over all the batches
    mas.accumulate(batches[2:])
    want = after(cls, mode, batches)
    assert mas.num_samples == 18
    for k, v in want["task"].items():
        torch.testing.assert_close(state(mas)["task"][k], v)


@pytest.mark.parametrize("mode", ["global", "local"])
@pytest.mark.parametrize("cls", CLASSES, ids=IDS)
def test_interrupt_inside_forward_drops_the_partial_batch(cls, mode):
    """Ctrl-C in the middle of batch 2's forward: the first layer of that batch already ran (and in local
    mode already produced its contribution), none of it may reach Ω."""
    batches = data([5, 3, 4, 6])
    # call 0 is prepared()'s forward, 1 the engine's run of batch 0's first sample alone (where the layers hold the
    # batch: Engine.learn_dims), then batches 0, 1, 2
    trip = Trip(KeyboardInterrupt(), at=4)
    mas, grads = prepared(cls, make_model(middle=trip), mode)
    with pytest.raises(KeyboardInterrupt):
        mas.accumulate(batches)
    assert trip.calls == 5
    assert_state(mas, after(cls, mode, batches[:2], middle=Trip()))
    assert_model_untouched(mas.model, grads)
    mas.accumulate(batches[2:])
    for k, v in after(cls, mode, batches, middle=Trip())["task"].items():
        torch.testing.assert_close(state(mas)["task"][k], v)


class _InterruptInBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        raise KeyboardInterrupt


class InterruptInBackward(nn.Module):
    def __init__(self):
        super().__init__()
        self.armed = False

    def forward(self, x):
        return _InterruptInBackward.apply(x) if self.armed else x


@pytest.mark.parametrize("cls", CLASSES, ids=IDS)
def test_interrupt_inside_backward_drops_the_partial_batch(cls):
    """g-MAS: Ctrl-C while the importance backward runs (later layers' contributions already computed)."""
    batches = data([5, 3])
    stop = InterruptInBackward()
    mas, grads = prepared(cls, make_model(middle=stop))
    mas.accumulate(batches[:1])
    before = state(mas)
    stop.armed = True
    with pytest.raises(KeyboardInterrupt):
        mas.accumulate(batches[1:])
    assert_state(mas, before)
    assert_model_untouched(mas.model, grads)
    stop.armed = False
    mas.accumulate(batches[1:])
    for k, v in after(cls, "global", batches, middle=InterruptInBackward())["task"].items():
        torch.testing.assert_close(state(mas)["task"][k], v)


@pytest.mark.parametrize("cls", CLASSES, ids=IDS)
def test_sigint_during_the_commit_is_deferred_until_it_is_whole(cls):
    """A real SIGINT arriving while a batch is being added into Ω: the batch goes in whole, then the
    KeyboardInterrupt is raised."""
    batches = data([5, 3, 4])
    mas = cls(make_model(), show_progress=False)

    class SignalOnFirstAdd(dict):
        fired = False

        def __getitem__(self, key):  # the commit reads each running mean to fold the batch in
            if not SignalOnFirstAdd.fired:
                SignalOnFirstAdd.fired = True
                signal.raise_signal(signal.SIGINT)  # Python runs the handler right here
            return super().__getitem__(key)

    mas.accumulate(batches[:1])
    mas._mean = SignalOnFirstAdd(mas._mean)
    with pytest.raises(KeyboardInterrupt):
        mas.accumulate(batches[1:])
    assert SignalOnFirstAdd.fired
    assert mas.num_samples == 8  # batch 1 committed whole, batch 2 never started
    want = after(cls, "global", batches[:2])
    for k, v in want["task"].items():
        torch.testing.assert_close(mas._mean[k], v, rtol=0, atol=0)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


# ----------------------------------------------------------------------------- non-finite output or gradient
@pytest.mark.parametrize("mode", ["global", "local"])
@pytest.mark.parametrize("cls", CLASSES, ids=IDS)
def test_nan_output_names_the_batch_and_loses_nothing(cls, mode):
    batches = data([5, 3, 4, 6])
    bad = batches[2].clone()
    bad[1, 2, 3] = float("nan")
    mas, grads = prepared(cls, make_model(), mode)
    with pytest.raises(FloatingPointError, match=r"batch 2\b.*not finite"):
        mas.accumulate(batches[:2] + [bad] + batches[3:])
    assert_state(mas, after(cls, mode, batches[:2]))
    assert_model_untouched(mas.model, grads)
    # an inf output, alone
    bad[1, 2, 3] = float("inf")
    with pytest.raises(FloatingPointError, match=r"batch 0\b"):
        mas.accumulate([bad])
    assert_state(mas, after(cls, mode, batches[:2]))
    mas.accumulate(batches[2:])
    for k, v in after(cls, mode, batches)["task"].items():
        torch.testing.assert_close(state(mas)["task"][k], v)


@pytest.mark.parametrize("positions", [4, 0], ids=["sequence", "flat"])
@pytest.mark.parametrize("cls", CLASSES, ids=IDS)
def test_nan_gradient_with_finite_output(cls, positions):
    """√(x²) at x = 0: the output is finite, the gradient reaching the first Linear is NaN."""
    model = make_model(middle=SqrtOfSquare())
    with torch.no_grad():
        model[0].bias.zero_()
    batches = data([5, 3, 4], positions=positions)
    bad = batches[1].clone()
    bad[2] = 0.0  # sample 2: the first Linear's output is exactly 0 there
    assert torch.isfinite(model(bad)).all()
    mas, grads = prepared(cls, model)
    with pytest.raises(FloatingPointError, match=r"batch 1\b.*(NaN|inf)") as err:
        mas.accumulate([batches[0], bad, batches[2]])
    assert "0.weight" in str(err.value)
    assert mas.num_samples == 5
    ref = cls(model, show_progress=False).accumulate(batches[:1])
    for k, v in state(ref)["task"].items():
        assert torch.equal(state(mas)["task"][k], v)
    assert_model_untouched(model, grads)


@pytest.mark.parametrize("cls", CLASSES, ids=IDS)
def test_inf_gradient_in_a_generic_module(cls):
    """A custom module (the generic torch.func path) whose parameter gradient is infinite: √w at w = 0."""
    model = make_model(middle=SqrtScale(8))
    with torch.no_grad():
        model[1].w[3] = 0.0
    batches = data([4, 2])
    mas, grads = prepared(cls, model)
    with pytest.raises(FloatingPointError, match=r"batch 0\b.*1\.w"):
        mas.accumulate(batches)
    assert mas.num_samples == 0
    assert all(torch.equal(s, torch.zeros_like(s)) for s in state(mas)["task"].values())
    assert_model_untouched(model, grads)
    # after consolidating a task, a failing batch leaves Ω and θ* alone too
    with torch.no_grad():
        model[1].w[3] = 0.5
    mas.accumulate(batches).consolidate()
    before = state(mas)
    star = {k: v.clone() for k, v in mas.star.items()}
    with torch.no_grad():
        model[1].w[3] = 0.0
    with pytest.raises(FloatingPointError):
        mas.accumulate(batches)
    assert_state(mas, before)
    assert all(torch.equal(mas.star[k], v) for k, v in star.items())


# ----------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("cls", CLASSES, ids=IDS)
def test_empty_data(cls):
    mas = cls(make_model(), show_progress=False)
    with pytest.raises(ValueError, match="empty"):
        mas.accumulate([])
    with pytest.raises(ValueError, match="empty"):
        mas.accumulate(iter([]))  # no len(): found out after the loop
    with pytest.raises(ValueError, match="empty"):
        mas.accumulate(x for x in [])
    with pytest.raises(ValueError, match=r"batch 1\b.*empty"):
        mas.accumulate([torch.randn(3, 4, 6), torch.randn(0, 4, 6)])
    assert mas.num_samples == 3  # the whole batch before the empty one stays
    with pytest.raises(ValueError, match="consolidate"):
        cls(make_model(), show_progress=False).consolidate()


class TupleOut(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = make_model()

    def forward(self, x):
        y = self.net(x)
        return y, y.detach().sum()


class IntOut(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = make_model()

    def forward(self, x):
        return self.net(x).argmax(-1)


@pytest.mark.parametrize("mode", ["global", "local"])
@pytest.mark.parametrize("cls", CLASSES, ids=IDS)
def test_output_that_is_not_a_floating_tensor(cls, mode):
    batches = data([3, 2])
    mas = cls(TupleOut(), mode=mode, show_progress=False)
    with pytest.raises(TypeError, match=r"batch 0\b.*tuple.*output_fn"), warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        mas.accumulate(batches)
    assert mas.num_samples == 0 and not said, [str(w.message) for w in said]  # no warning about another cause first
    # with output_fn it works, and equals the plain model
    mas = cls(TupleOut(), mode=mode, output_fn=lambda out: out[0], show_progress=False).accumulate(batches)
    want = after(cls, mode, batches)
    for k, v in want["task"].items():
        torch.testing.assert_close(state(mas)["task"][f"net.{k}"], v)
    mas = cls(IntOut(), mode=mode, show_progress=False)
    with pytest.raises(TypeError, match=r"batch 0\b.*int64.*floating"):
        mas.accumulate(batches)
    assert mas.num_samples == 0
    mas = cls(TupleOut(), mode=mode, output_fn=lambda out: out[0].long(), show_progress=False)
    with pytest.raises(TypeError, match="floating"):
        mas.accumulate(batches)


class CastsItsInput(nn.Module):
    """Casts its input to its weights' dtype, as Hugging Face vision models do with pixel_values."""

    def __init__(self):
        super().__init__()
        self.net = make_model()

    def forward(self, x):
        return self.net(x.to(self.net[0].weight.dtype))


@pytest.mark.parametrize("cls", CLASSES, ids=IDS)
def test_a_model_that_casts_its_input_takes_another_dtype(cls):
    """A bfloat16 model fed float32 inputs that it casts itself runs in PyTorch: MAS raised a TypeError before
    running it. A dtype is named where the model raises on it (an int64 batch into an MLP: torch's bare error)."""
    model = CastsItsInput().bfloat16().eval()
    x = data([3])[0]
    want = cls(model, show_progress=False).accumulate([x.bfloat16()]).task_importance
    got = cls(model, show_progress=False).accumulate([x]).task_importance
    for k, v in want.items():
        torch.testing.assert_close(got[k], v)
    mas = cls(make_model(), show_progress=False)
    with pytest.raises(TypeError, match=r"batch 0\b.*int64.*float32.*raised"):
        mas.accumulate([x.long()])
    assert mas.num_samples == 0


@pytest.mark.parametrize("cls", CLASSES, ids=IDS)
def test_input_of_another_dtype_or_device_or_kind(cls):
    mas = cls(make_model(), show_progress=False)
    mas.accumulate(data([2]))
    before = state(mas)
    with pytest.raises(TypeError, match=r"batch 1\b.*float64.*float32"):
        mas.accumulate([data([2])[0], data([2])[0].double()])
    assert mas.num_samples == 4  # batch 0 of that call was whole
    with pytest.raises(TypeError, match=r"bfloat16"):
        mas.accumulate([data([2])[0].bfloat16()])
    with pytest.raises(ValueError, match="meta"):
        mas.accumulate([torch.empty(2, 4, 6, device="meta")])
    with pytest.raises(TypeError, match=r"batch 0\b.*str"):
        mas.accumulate(["not a tensor"])
    assert mas.num_samples == 4
    batch0 = cls(make_model(), show_progress=False).accumulate(data([2]) + data([2]))
    assert_state(mas, state(batch0))  # only the whole batches went in
    assert before["count"] == 2
    # labels in a tuple are ignored
    x = data([3], seed=9)[0]
    a = cls(make_model(), show_progress=False).accumulate([(x, torch.arange(3))])
    b = cls(make_model(), show_progress=False).accumulate([x])
    for k, v in state(b)["task"].items():
        assert torch.equal(state(a)["task"][k], v)


@pytest.mark.parametrize("cls", CLASSES, ids=IDS)
def test_load_state_dict_refuses_nonfinite_importance_or_star(cls):
    src = cls(make_model(), show_progress=False).accumulate(data([4])).consolidate()
    dst = cls(make_model(seed=3), show_progress=False).accumulate(data([2], seed=5)).consolidate()
    before = state(dst)
    star = {k: v.clone() for k, v in dst.star.items()}
    for section, value in [("importance", float("nan")), ("importance", float("inf")), ("star", float("nan")),
                           ("star", float("-inf"))]:
        sd = src.state_dict()
        sd[section]["2.weight"][1, 1] = value
        with pytest.raises(ValueError, match=rf"{section}\.2\.weight: non-finite"):
            dst.load_state_dict(sd)
        assert_state(dst, before)
        assert all(torch.equal(dst.star[k], v) for k, v in star.items())
    dst.load_state_dict(src.state_dict())  # the clean one loads
    assert all(torch.equal(dst.importance[k], v) for k, v in src.importance.items())


@pytest.mark.parametrize("cls", CLASSES, ids=IDS)
def test_settings_are_checked_when_set(cls):
    """mode, per_sample and λ were checked by the constructor only (mode only): mas.mode = "Local" made every Ω 0
    while samples were counted, per_sample="False" was True, λ = NaN, inf or < 0 gave a NaN or inf penalty (and a
    checkpoint that its own load refused)."""
    mas = cls(make_model(), show_progress=False)
    with pytest.raises(ValueError, match="mode must be 'global' or 'local', got 'Local'"):
        mas.mode = "Local"
    with pytest.raises(TypeError, match="per_sample must be True or False, got 'False'"):
        mas.per_sample = "False"
    with pytest.raises(TypeError, match="per_sample"):
        cls(make_model(), per_sample="False")
    for lam in (float("nan"), float("inf"), -1.0, "1"):
        with pytest.raises(ValueError, match="lam must be a finite number >= 0"):
            mas.lam = lam
        with pytest.raises(ValueError, match="lam must be a finite number >= 0"):
            cls(make_model(), lam=lam)
    assert (mas.mode, mas.per_sample, mas.lam) == ("global", True, 1.0)
    mas.per_sample, mas.lam = 0, 2
    assert mas.per_sample is False and mas.lam == 2.0
    sd = mas.state_dict()
    sd["config"]["lam"] = -1.0
    with pytest.raises(ValueError, match="config.lam"):
        mas.load_state_dict(sd)


@pytest.mark.parametrize("cls", CLASSES, ids=IDS)
def test_a_tensor_passed_as_the_batches_is_named(cls):
    """accumulate(x) iterated the tensor: its rows became batches, and dim 1 the samples (an (N, T) id tensor counted
    N·T samples, 83% off; an MLP raised a bare reshape error)."""
    mas = cls(make_model(), show_progress=False)
    x = data([5])[0]
    with pytest.raises(TypeError, match=r"iterable of batches, got one tensor of shape \(5, 4, 6\).*\[x\]"):
        mas.accumulate(x)
    assert mas.num_samples == 0


@pytest.mark.parametrize("cls", CLASSES, ids=IDS)
def test_output_fn_that_returns_no_tensor_is_named(cls):
    mas = cls(TupleOut(), output_fn=lambda out: out[:1], show_progress=False)
    with pytest.raises(TypeError, match=r"batch 0\b: output_fn returned tuple, not a tensor"):
        mas.accumulate(data([2]))


def test_fused_names_the_layers_no_kernel_covers():
    """SPEC §2: FusedMAS takes the reference path with a warning where no kernel applies; an nn.Bilinear or a GRU took
    it without one. Once per class; none for layers of the table."""
    torch.manual_seed(0)

    class Pair(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin, self.bi = nn.Linear(6, 6), nn.Bilinear(6, 6, 3)

        def forward(self, x):
            return self.bi(self.lin(x), x)

    with pytest.warns(UserWarning, match="no fused kernel applies to Bilinear.*reference path") as caught:
        mas = mas_ext.FusedMAS(Pair(), show_progress=False).accumulate(data([3, 2]))
    assert len([w for w in caught if "no fused kernel" in str(w.message)]) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        mas_ext.FusedMAS(make_model(), show_progress=False).accumulate(data([3]))
        mas_ext.ReferenceMAS(Pair(), show_progress=False).accumulate(data([3]))
    assert mas.num_samples == 5
