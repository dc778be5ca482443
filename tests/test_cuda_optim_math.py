"""The CUDA optimizer kernels' host/device code (csrc/cuda/optim_cuda_math.h), checked on the CPU.

The header compiles as plain C++: tests/cuda_optim_host.cpp (built here with g++, loaded with ctypes)
runs the kernels' chunk planner and per-chunk bodies on the host, block after block and thread after
thread, as optim_cuda.cu launches them. This checks, without a GPU:

- the chunk tables: every element of every tensor visited exactly once, for numel 1, 3, 4, 5, 65537,
  multi-chunk and empty tensors, aligned and misaligned pointers per slot, more tensors than one launch
  holds, any grid size and block size; vector accesses only where all pointers are 16-byte aligned, and
  every vector access aligned;
- the host float <-> float16/bfloat16 conversions against torch's;
- the kernel bodies (penalty, SGD, Adam/AdamW, every option, float32/float64/float16/bfloat16) against
  torch.optim and the CPU kernels, grad_scale/found_inf, device-side step counters.

What needs a GPU (the device conversions, the launches, the bindings) is in tests/test_cuda_optim.py.
"""
import ctypes
import math
import os
import shutil
import subprocess

import pytest
import torch

from test_optim import ADAM_CASES, SGD_CASES

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KIND = {torch.float32: 0, torch.float64: 1, torch.float16: 2, torch.bfloat16: 3}
DTYPES = list(KIND)
OPS = {"penalty": 0, "sgd": 1, "adam": 2}
SLOTS = {"penalty": 4, "sgd": 5, "adam": 8}
OMEGA_SLOT = {"penalty": 2, "sgd": 3, "adam": 5}
P64 = ctypes.POINTER(ctypes.c_int64)


@pytest.fixture(scope="module")
def lib(tmp_path_factory):
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        pytest.skip("no C++ compiler")
    so = tmp_path_factory.mktemp("cuda_optim_host") / "cuda_optim_host.so"
    cmd = [cxx, "-std=c++17", "-O2", "-fno-strict-aliasing", "-Wall", "-Wextra", "-Werror", "-shared", "-fPIC",
           "-I", os.path.join(ROOT, "csrc"), os.path.join(ROOT, "tests", "cuda_optim_host.cpp"), "-o", str(so)]
    subprocess.run(cmd, check=True)
    lib = ctypes.CDLL(str(so))
    lib.mt_chunk_elems.restype = ctypes.c_int64
    lib.mt_launch_bytes.restype = ctypes.c_int64
    return lib


def i64(values):
    return (ctypes.c_int64 * max(1, len(values)))(*values)


def ptr(t):
    return ctypes.c_void_p(t.data_ptr()) if t is not None else ctypes.c_void_p(0)


# ------------------------------------------------------------------------------------------ chunk tables
def run_coverage(lib, op, dtype, numels, offsets, grid_cap=1 << 20, nthreads=512):
    n = len(numels)
    counts = (ctypes.c_int64 * max(1, sum(numels)))()
    vec = (ctypes.c_int64 * max(1, n))()
    viol, launches, max_t = ctypes.c_int64(0), ctypes.c_int64(0), ctypes.c_int64(0)
    flat = [o for row in offsets for o in row]
    rc = lib.mt_coverage(OPS[op], KIND[dtype], ctypes.c_int64(n), i64(numels), i64(flat), ctypes.c_int64(grid_cap),
                         nthreads, counts, vec, ctypes.byref(viol), ctypes.byref(launches), ctypes.byref(max_t))
    assert rc == 0
    return list(counts)[:sum(numels)], list(vec)[:n], viol.value, launches.value, max_t.value


def expected_vec_elems(lib, numel, aligned, kvec):
    if not aligned:
        return 0
    chunk = lib.mt_chunk_elems()
    return sum((min(numel, b + chunk) - b) // kvec * kvec for b in range(0, numel, chunk))


@pytest.mark.parametrize("op", list(OPS))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("grid_cap,nthreads", [(1 << 20, 512), (3, 7)])
def test_chunk_tables_cover_every_element_once(lib, op, dtype, grid_cap, nthreads):
    es = torch.empty((), dtype=dtype).element_size()
    kvec = lib.mt_vec(KIND[dtype])
    assert kvec * es == 16
    slots, om = SLOTS[op], OMEGA_SLOT[op]
    sizes = [1, 3, 4, 5, 65537, 0, 2 * 65536 + 13, 8, 7, 65536, 16]
    numels, offsets = [], []
    # each size: all slots aligned; the param slot one element off; only Ω one element off (16-byte
    # aligned for the param dtype but not for float32 when es < 4); every slot off by a different amount
    for k, size in enumerate(sizes):
        for pattern in range(4):
            row = [0] * slots
            if pattern == 1:
                row[0] = 1
            elif pattern == 2:
                row[om] = 1
            elif pattern == 3:
                row = [(d + k) % 5 for d in range(slots)]
            numels.append(size)
            offsets.append(row)
    counts, vec, viol, launches, max_t = run_coverage(lib, op, dtype, numels, offsets, grid_cap, nthreads)
    assert all(c == 1 for c in counts), f"{sum(c != 1 for c in counts)} elements visited != once"
    assert viol == 0
    for i, (numel, row) in enumerate(zip(numels, offsets)):
        aligned = all((o * (4 if d == om else es)) % 16 == 0 for d, o in enumerate(row))
        assert vec[i] == expected_vec_elems(lib, numel, aligned, kvec), (i, numel, row)
    nonempty = sum(1 for n in numels if n)
    assert launches == math.ceil(nonempty / max_t)


@pytest.mark.parametrize("op", list(OPS))
def test_more_tensors_than_one_launch_holds(lib, op):
    probe = run_coverage(lib, op, torch.float32, [1], [[0] * SLOTS[op]])
    max_t = probe[4]
    n = 3 * max_t + 5
    numels = [(1, 3, 4, 5, 65537, 0)[i % 6] for i in range(n)]
    offsets = [[i % 3] * SLOTS[op] for i in range(n)]
    counts, vec, viol, launches, _ = run_coverage(lib, op, torch.float16, numels, offsets)
    assert all(c == 1 for c in counts) and viol == 0
    assert launches == math.ceil(sum(1 for x in numels if x) / max_t) >= 3


def test_launch_arguments_fit_4kib(lib):
    for op in OPS.values():
        for kind in KIND.values():
            assert 0 < lib.mt_launch_bytes(op, kind) <= 4096


# ------------------------------------------------------------------------------------------ conversions
def _special_floats():
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(20000, generator=g) * s for s in (1e-8, 1e-6, 1e-4, 1, 100, 3e4, 1e5, 1e38)]
    ties = torch.arange(-2048, 2048, dtype=torch.float32) + 0.5  # halfway between halves near 2^11
    edge = torch.tensor([0.0, -0.0, 65504.0, 65519.99, 65520.0, 6e-8, 5.96e-8, 2.98e-8, 2.99e-8, 1e-45,
                         float("inf"), -float("inf"), 3.3895e38, -3.3896e38])
    bits = torch.randint(-2**31, 2**31 - 1, (50000,), generator=g, dtype=torch.int64).to(torch.int32).view(torch.float32)
    x = torch.cat(xs + [ties, ties * 2**-20, edge, bits])
    return x[~torch.isnan(x)].contiguous()


@pytest.mark.parametrize("dtype,fn", [(torch.float16, "mt_float_to_half"), (torch.bfloat16, "mt_float_to_bf16")])
def test_float_to_16bit_rounds_like_torch(lib, dtype, fn):
    x = _special_floats()
    out = torch.empty(x.shape, dtype=torch.int16)
    getattr(lib, fn)(ptr(x), ptr(out), ctypes.c_int64(x.numel()))
    want = x.to(dtype).view(torch.int16)
    bad = (out != want).nonzero().flatten()
    assert bad.numel() == 0, [(x[i].item(), int(out[i]), int(want[i])) for i in bad[:5]]
    nan = torch.tensor([float("nan"), -float("nan")])
    out = torch.empty(2, dtype=torch.int16)
    getattr(lib, fn)(ptr(nan), ptr(out), ctypes.c_int64(2))
    assert torch.isnan(out.view(dtype).float()).all()


@pytest.mark.parametrize("dtype,fn", [(torch.float16, "mt_half_to_float"), (torch.bfloat16, "mt_bf16_to_float")])
def test_16bit_to_float_exact_for_every_pattern(lib, dtype, fn):
    h = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).contiguous()
    out = torch.empty(h.shape, dtype=torch.float32)
    getattr(lib, fn)(ptr(h), ptr(out), ctypes.c_int64(h.numel()))
    want = h.view(dtype).float()
    nan = torch.isnan(want)
    assert torch.equal(torch.isnan(out), nan)
    assert torch.equal(out[~nan].view(torch.int32), want[~nan].view(torch.int32))


# ------------------------------------------------------------------------------------------ kernel bodies
class Emu:
    """The three ops with the CUDA ops' signatures, running the kernel bodies on the host (grouping by
    dtype and computing host-step bias corrections as csrc/cuda/optim_binding.cpp does)."""

    def __init__(self, lib, grid_cap=1 << 20, nthreads=512):
        self.lib, self.grid_cap, self.nthreads = lib, grid_cap, nthreads
        self.launches = 0

    def _groups(self, params):
        by = {}
        for i, p in enumerate(params):
            by.setdefault(p.dtype, []).append(i)
        return by.items()

    @staticmethod
    def _slots(lists, idx):
        """Slot-major pointer array and the present-slot mask."""
        arr, mask = [], 0
        for d, lst in enumerate(lists):
            if lst is not None:
                mask |= 1 << d
            arr += [lst[i].data_ptr() if lst is not None and lst[i] is not None else 0 for i in idx]
        return (ctypes.c_void_p * max(1, len(arr)))(*arr), mask

    def add_penalty_grad_(self, grads, params, omegas, stars, scale):
        for dtype, idx in self._groups(params):
            arr, _ = self._slots([grads, params, omegas, stars], idx)
            launches = ctypes.c_int64(0)
            rc = self.lib.mt_penalty(KIND[dtype], ctypes.c_int64(len(idx)), i64([params[i].numel() for i in idx]),
                                     arr, ctypes.c_double(scale), ctypes.c_int64(self.grid_cap), self.nthreads,
                                     ctypes.byref(launches))
            assert rc == 0
            self.launches += launches.value

    def fused_sgd_mas_(self, params, grads, bufs, omegas, stars, *, penalty_scale, lr, momentum, dampening,
                       weight_decay, nesterov, maximize, is_first_step, grad_scale=None, found_inf=None):
        for dtype, idx in self._groups(params):
            arr, mask = self._slots([params, grads, bufs if momentum != 0 else None, omegas, stars], idx)
            launches = ctypes.c_int64(0)
            rc = self.lib.mt_sgd(
                KIND[dtype], ctypes.c_int64(len(idx)), i64([params[i].numel() for i in idx]), arr, ctypes.c_uint32(mask),
                *[ctypes.c_double(x) for x in (penalty_scale, lr, momentum, dampening, weight_decay)],
                int(nesterov), int(maximize), int(is_first_step), ptr(grad_scale), ptr(found_inf),
                ctypes.c_int64(self.grid_cap), self.nthreads, ctypes.byref(launches))
            assert rc == 0
            self.launches += launches.value

    def fused_adam_mas_(self, params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, omegas, stars, *,
                        penalty_scale, lr, beta1, beta2, weight_decay, eps, amsgrad, maximize, decoupled_weight_decay,
                        grad_scale=None, found_inf=None, device_steps=False):
        if not device_steps:
            assert found_inf is None, "host step counters cannot skip on a device found_inf"
            extra = []
            for s in state_steps:
                s.add_(1)
                step = s.item()
                extra.append((lr / (1 - beta1 ** step), (1 - beta2 ** step) ** 0.5))
        for dtype, idx in self._groups(params):
            arr, mask = self._slots([params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs if amsgrad else None,
                                     omegas, stars, state_steps if device_steps else None], idx)
            host = None
            if not device_steps:
                host = (ctypes.c_double * (2 * len(idx)))(*[x for i in idx for x in extra[i]])
            launches = ctypes.c_int64(0)
            rc = self.lib.mt_adam(
                KIND[dtype], ctypes.c_int64(len(idx)), i64([params[i].numel() for i in idx]), arr, ctypes.c_uint32(mask),
                host, *[ctypes.c_double(x) for x in (penalty_scale, lr, beta1, beta2, weight_decay, eps)],
                int(amsgrad), int(maximize), int(decoupled_weight_decay), int(device_steps),
                int(device_steps and state_steps[0].dtype == torch.float64), ptr(grad_scale), ptr(found_inf),
                ctypes.c_int64(self.grid_cap), self.nthreads, ctypes.byref(launches))
            assert rc == 0
            self.launches += launches.value


def _offset(t, k):
    """A copy of t living k elements into a fresh buffer (k = 1: not 16-byte aligned)."""
    if k == 0:
        return t.clone()
    buf = torch.empty(t.numel() + k, dtype=t.dtype)
    out = buf[k:].view(t.shape)
    out.copy_(t)
    return out


SHAPES = [(5, 3), (40000,), (1,), (65537,), (7, 9), (4,)]


def make_inputs(dtypes, shapes=SHAPES, seed=0, misalign=True):
    """params, grads, Ω, θ* for shapes × dtypes; every other tensor tracked; some pointers misaligned."""
    g = torch.Generator().manual_seed(seed)
    params, grads, oms, stars = [], [], [], []
    k = 0
    for dtype in dtypes:
        for shape in shapes:
            off = (k % 3 == 2) if misalign else 0
            p = _offset((torch.randn(shape, generator=g)).to(dtype), off)
            params.append(p)
            grads.append(_offset((torch.randn(shape, generator=g) * 0.5).to(dtype), 0))
            if k % 2 == 0:
                oms.append(_offset(torch.rand(shape, generator=g) * 2, (k % 4 == 2) * 1))
                stars.append((p.float() + 0.2 * torch.randn(shape, generator=g)).to(dtype))
            else:
                oms.append(None)
                stars.append(None)
            k += 1
    return params, grads, oms, stars


def clone_all(xs):
    return [None if x is None else (_offset(x, int(x.data_ptr() % 16 != 0)) if torch.is_tensor(x) else x) for x in xs]


def assert_lists_close(got, want):
    for a, b in zip(got, want):
        if a is None:
            continue
        if a.dtype in (torch.float16, torch.bfloat16):
            # one rounding of a float32 result to the 16-bit type may flip where float32 intermediates differ
            tol = torch.finfo(a.dtype).eps
            torch.testing.assert_close(a.float(), b.float(), rtol=tol, atol=tol * 1e-2)
        elif a.dtype == torch.float64:
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
        else:
            torch.testing.assert_close(a, b, rtol=2e-6, atol=1e-7)


ALL = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


def test_penalty_body_matches_cpu_op_and_float64(lib):
    params, grads, oms, stars = make_inputs(ALL)
    idx = [i for i, o in enumerate(oms) if o is not None]
    args = [[x[i] for i in idx] for x in (grads, params, oms, stars)]
    want64 = [(g.double() + 1.4 * o.double() * (p.double() - s.double())).to(g.dtype) for g, p, o, s in zip(*args)]
    cpu = clone_all(args[0])
    torch.ops.mas_ext.add_penalty_grad_(cpu, args[1], args[2], args[3], 1.4)
    emu = Emu(lib)
    emu.add_penalty_grad_(args[0], args[1], args[2], args[3], 1.4)
    assert_lists_close(args[0], cpu)
    for g, w in zip(args[0], want64):
        tol = {torch.float32: 1e-6, torch.float64: 1e-12}.get(g.dtype, torch.finfo(g.dtype).eps)
        torch.testing.assert_close(g, w, rtol=tol, atol=tol)


def _sgd_state(params, momentum):
    return [torch.zeros_like(p) for p in params] if momentum != 0 else []


@pytest.mark.parametrize("dtype", ALL)
@pytest.mark.parametrize("kw", SGD_CASES, ids=str)
def test_sgd_body_matches_cpu_op(lib, kw, dtype):
    """10 steps; each from the CPU op's state, kernel body and CPU op compared (mixed alignments)."""
    params, grads, oms, stars = make_inputs([dtype], seed=1)
    momentum = kw["momentum"]
    bufs = _sgd_state(params, momentum)
    emu = Emu(lib)
    opt = dict(penalty_scale=1.4, lr=kw["lr"], momentum=momentum, dampening=kw["dampening"],
               weight_decay=kw["weight_decay"], nesterov=kw["nesterov"], maximize=kw["maximize"])
    g = torch.Generator().manual_seed(2)
    for step in range(10):
        for gr in grads:
            gr.copy_(torch.randn(gr.shape, generator=g).to(gr.dtype))
        first = step == 0 and momentum != 0
        e_p, e_g, e_b = clone_all(params), clone_all(grads), clone_all(bufs)
        emu.fused_sgd_mas_(e_p, e_g, e_b, oms, stars, is_first_step=first, **opt)
        torch.ops.mas_ext.fused_sgd_mas_(params, grads, bufs, oms, stars, is_first_step=first, **opt)
        assert_lists_close(e_p, params)
        assert_lists_close(e_b, bufs)


def _adam_state(params, amsgrad, step_dtype=torch.float32):
    m = [torch.zeros_like(p) for p in params]
    v = [torch.zeros_like(p) for p in params]
    vm = [torch.zeros_like(p) for p in params] if amsgrad else []
    steps = [torch.zeros((), dtype=step_dtype) for _ in params]
    return m, v, vm, steps


def _adam_kw(kw, decoupled):
    return dict(penalty_scale=1.4, lr=kw["lr"], beta1=kw["betas"][0], beta2=kw["betas"][1], eps=kw["eps"],
                weight_decay=kw["weight_decay"], amsgrad=kw["amsgrad"], maximize=kw["maximize"],
                decoupled_weight_decay=decoupled)


@pytest.mark.parametrize("dtype", ALL)
@pytest.mark.parametrize("decoupled", [False, True], ids=["Adam", "AdamW"])
@pytest.mark.parametrize("kw", ADAM_CASES, ids=str)
def test_adam_body_matches_cpu_op(lib, kw, decoupled, dtype):
    params, grads, oms, stars = make_inputs([dtype], seed=3)
    m, v, vm, steps = _adam_state(params, kw["amsgrad"])
    emu = Emu(lib)
    opt = _adam_kw(kw, decoupled)
    g = torch.Generator().manual_seed(4)
    for step in range(10):
        for gr in grads:
            gr.copy_(torch.randn(gr.shape, generator=g).to(gr.dtype))
        e = [clone_all(x) for x in (params, grads, m, v, vm)]
        e_steps = [s.clone() for s in steps]
        emu.fused_adam_mas_(*e, e_steps, oms, stars, **opt)
        torch.ops.mas_ext.fused_adam_mas_(params, grads, m, v, vm, steps, oms, stars, **opt)
        assert all(torch.equal(a, b) for a, b in zip(e_steps, steps))
        for got, want in zip(e, (params, grads, m, v, vm)):
            assert_lists_close(got, want)


@pytest.mark.parametrize("name,kw", [("SGD", kw) for kw in SGD_CASES] +
                         [(n, kw) for n in ("Adam", "AdamW") for kw in ADAM_CASES], ids=str)
def test_bodies_equal_torch_optim_with_penalty_loss_float32(lib, name, kw):
    """10 steps of the kernel body vs torch.optim on grad + 2λΩ(θ−θ*) (the loss term's gradient)."""
    params, grads, oms, stars = make_inputs([torch.float32], seed=5)
    ref_p = [p.detach().clone().requires_grad_() for p in params]
    ref = getattr(torch.optim, name)(ref_p, foreach=False, **kw)
    emu = Emu(lib)
    if name == "SGD":
        bufs = _sgd_state(params, kw["momentum"])
    else:
        m, v, vm, steps = _adam_state(params, kw["amsgrad"])
    g = torch.Generator().manual_seed(6)
    for step in range(10):
        for p, q, gr, o, s in zip(params, ref_p, grads, oms, stars):
            gr.copy_(torch.randn(gr.shape, generator=g))
            q.grad = gr.clone() if o is None else gr + (1.4 * o) * (q.detach() - s)
        if name == "SGD":
            emu.fused_sgd_mas_(params, grads, bufs, oms, stars, penalty_scale=1.4, lr=kw["lr"],
                               momentum=kw["momentum"], dampening=kw["dampening"], weight_decay=kw["weight_decay"],
                               nesterov=kw["nesterov"], maximize=kw["maximize"],
                               is_first_step=step == 0 and kw["momentum"] != 0)
        else:
            emu.fused_adam_mas_(params, grads, m, v, vm, steps, oms, stars, **_adam_kw(kw, name == "AdamW"))
        ref.step()
    for p, q in zip(params, ref_p):
        err = ((p.double() - q.detach().double()).norm() / q.detach().double().norm()).item()
        assert err < 1e-6, err


@pytest.mark.parametrize("step_dtype", [torch.float32, torch.float64])
def test_device_step_counters_equal_host_counters(lib, step_dtype):
    """Capturable mode: the step counters are read and incremented by the kernels (here on the host)."""
    kw = dict(ADAM_CASES[5])
    params, grads, oms, stars = make_inputs([torch.float32, torch.bfloat16], seed=7)
    st_h = _adam_state(params, kw["amsgrad"])
    st_d = _adam_state(params, kw["amsgrad"], step_dtype)
    pd = clone_all(params)
    emu = Emu(lib)
    for _ in range(5):
        emu.fused_adam_mas_(params, grads, *st_h, oms, stars, **_adam_kw(kw, True))
        emu.fused_adam_mas_(pd, grads, *st_d, oms, stars, **_adam_kw(kw, True), device_steps=True)
    assert all(torch.equal(a, b) for a, b in zip(params, pd))
    assert all(s.item() == 5 and s.dtype == step_dtype for s in st_d[3])


@pytest.mark.parametrize("op", ["sgd", "adam"])
def test_grad_scale_and_found_inf(lib, op):
    params, grads, oms, stars = make_inputs([torch.float32, torch.float16], seed=8)
    scale = torch.tensor([64.0])
    if op == "sgd":
        state = [_sgd_state(params, 0.9)]
        kw = dict(penalty_scale=1.4, lr=0.05, momentum=0.9, dampening=0.0, weight_decay=1e-2, nesterov=True,
                  maximize=False, is_first_step=True)
        call = lambda e, p, g, st, **x: e.fused_sgd_mas_(p, g, *st, oms, stars, **kw, **x)  # noqa: E731
    else:
        state = list(_adam_state(params, True))
        kw = _adam_kw(ADAM_CASES[3], True)
        call = lambda e, p, g, st, **x: e.fused_adam_mas_(p, g, *st, oms, stars, **kw, device_steps=True, **x)  # noqa: E731,E501
    emu = Emu(lib)
    scaled = [(g.float() * 64).to(g.dtype) for g in grads]
    # found_inf != 0: nothing moves (params, grads still scaled, state, step counters)
    p0, g0, s0 = clone_all(params), clone_all(scaled), [clone_all(x) for x in state]
    call(emu, p0, g0, s0, grad_scale=scale, found_inf=torch.tensor([1.0]))
    assert all(torch.equal(a, b) for a, b in zip(p0, params))
    assert all(torch.equal(a, b) for a, b in zip(g0, scaled))
    assert all(torch.equal(a, b) for x, y in zip(s0, state) for a, b in zip(x, y))
    # found_inf == 0: the grads are divided by the scale (stored back), then the same step as unscaled
    p1, s1 = clone_all(params), [clone_all(x) for x in state]
    call(emu, p1, g0, s1, grad_scale=scale, found_inf=torch.tensor([0.0]))
    p2, g2, s2 = clone_all(params), clone_all(grads), [clone_all(x) for x in state]
    call(emu, p2, g2, s2)
    assert_lists_close(g0, g2)
    assert_lists_close(p1, p2)


def test_many_tensors_mixed_dtypes_and_launch_geometry(lib):
    """More tensors than one launch holds, four dtypes in one call; a tiny grid and odd block size give
    bit-identical results (the block/thread split never changes what an element computes)."""
    shapes = [(3,), (1,), (17,), (8,), (65537,)] * 20
    params, grads, oms, stars = make_inputs(ALL, shapes=shapes, seed=9)
    kw = _adam_kw(ADAM_CASES[1], False)
    results = []
    for grid_cap, nthreads in ((1 << 20, 512), (2, 33)):
        st = _adam_state(params, kw["amsgrad"])
        p = clone_all(params)
        emu = Emu(lib, grid_cap, nthreads)
        for _ in range(3):
            emu.fused_adam_mas_(p, grads, *st, oms, stars, **kw)
        assert emu.launches >= 3 * 4 * 3  # per step: ≥ 3 launches per dtype (100 tensors, ≤ 40 per launch)
        results.append(p)
    assert all(torch.equal(a, b) for a, b in zip(*results))
    st = _adam_state(params, kw["amsgrad"])
    cpu = clone_all(params)
    for _ in range(3):
        torch.ops.mas_ext.fused_adam_mas_(cpu, grads, *st, oms, stars, **kw)
    assert_lists_close(results[0], cpu)


# ------------------------------------------------------------------------------------------ compilers
def _cuda_home():
    """(nvcc, the CUDA toolkit root with include/cuda_runtime_api.h), either None where absent."""
    from torch.utils.cpp_extension import CUDA_HOME

    roots = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), CUDA_HOME, "/usr/local/cuda"]
    home = next((r for r in roots if r and os.path.exists(os.path.join(r, "include", "cuda_runtime_api.h"))), None)
    nvcc = os.path.join(home, "bin", "nvcc") if home else None
    return (nvcc if nvcc and os.path.exists(nvcc) else shutil.which("nvcc")), home


@pytest.mark.parametrize("arch", ["80", "90"])
def test_nvcc_vector_accesses_and_no_spills(tmp_path, arch):
    """The .cu compiles for sm_80/sm_90 without spills, and its PTX has 16-byte global loads/stores."""
    nvcc, _ = _cuda_home()
    if nvcc is None:
        pytest.skip("no nvcc")
    src = os.path.join(ROOT, "csrc", "cuda", "optim_cuda.cu")
    base = [nvcc, "-O3", "-std=c++17", "-I", os.path.join(ROOT, "csrc")]
    r = subprocess.run(base + ["-c", f"-gencode=arch=compute_{arch},code=sm_{arch}", "-Xptxas", "-v", src, "-o",
                               str(tmp_path / "o.o")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    spills = [line for line in r.stderr.splitlines() if "spill" in line]
    assert spills and all(" 0 bytes spill stores, 0 bytes spill loads" in s for s in spills), spills
    assert "warning" not in r.stderr.lower()
    r = subprocess.run(base + ["-ptx", f"-arch=compute_{arch}", src, "-o", str(tmp_path / "o.ptx")],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    ptx = (tmp_path / "o.ptx").read_text()
    assert "ld.global.v4." in ptx and "st.global.v4." in ptx


def test_binding_compiles_against_torch_headers():
    """csrc/cuda/optim_binding.cpp parses against the installed torch's headers (c10/cuda included there)
    and the CUDA runtime headers: a syntax check where no CUDA torch is installed."""
    cxx = shutil.which("g++") or shutil.which("c++")
    _, home = _cuda_home()
    inc = os.path.join(os.path.dirname(torch.__file__), "include")
    if cxx is None or home is None or not os.path.exists(os.path.join(home, "include", "cuda_runtime_api.h")) \
            or not os.path.exists(os.path.join(inc, "c10", "cuda", "CUDAGuard.h")):
        pytest.skip("needs g++, the CUDA runtime headers and torch's c10/cuda headers")
    cmd = [cxx, "-fsyntax-only", "-std=c++17", "-Wall", "-Wextra", "-Werror", "-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE",
           "-I", os.path.join(ROOT, "csrc"), "-isystem", inc, "-isystem",
           os.path.join(inc, "torch", "csrc", "api", "include"), "-isystem", os.path.join(home, "include"),
           os.path.join(ROOT, "csrc", "cuda", "optim_binding.cpp")]
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
