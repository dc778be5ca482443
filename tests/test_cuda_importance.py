"""The CUDA importance kernels (csrc/cuda/importance_cuda.cu) against the CPU ops and a float64 per-sample
loop, on fresh random inputs: shapes that are no tile multiples (1, 7, 33, 129), P = 1 (abs-GEMM) and P > 1
(per-sample tiles), float32/float16/bfloat16, conv groups/stride/padding/dilation in 1-3 d, the tied
embedding + linear op, the LayerNorm/RMSNorm affine op, accumulators poisoned with random values (the ops
add), a non-default stream, torch.library.opcheck, and FusedMAS end to end with the device gate forced open (test-only). Skipped
without a GPU; `make gpu-check` runs them (and `-k small` under compute-sanitizer)."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import mas_ext
from mas_ext import _ops

CUDA = torch.cuda.is_available() and _ops.error is None
pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU and the compiled extension"),
]
DEV = "cuda"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
IDS = ["fp32", "fp16", "bf16"]


def has_cuda_kernel(op):
    return CUDA and torch._C._dispatch_has_kernel_for_dispatch_key(f"mas_ext::{op}", "CUDA")


def tol(dtype, ref):
    """Same inputs, float32 sums in another order: float32 rounding of the largest entry."""
    scale = float(ref.abs().max()) if ref.numel() else 1.0
    return dict(rtol=2e-5, atol=2e-5 * max(scale, 1.0) * (1 if dtype == torch.float32 else 4))


def rand(*shape, dtype=torch.float32, gen=None):
    return torch.randn(*shape, generator=gen).to(dtype)


def poisoned(*shape, gen):
    """An accumulator already holding random values: the op must add, never overwrite."""
    return torch.rand(*shape, generator=gen) * 10


# ----------------------------------------------------------------------------- oracles (float64)
def linear_oracle(a, g):
    a, g = a.double(), g.double()
    return torch.einsum("npo,npi->noi", g, a).abs().sum(0), g.sum(1).abs().sum(0)


def conv_oracle(x, g, wshape, stride, padding, dilation, groups):
    x, g = x.double(), g.double()
    nd = x.dim() - 2
    w = torch.zeros(wshape, dtype=torch.float64, device=x.device)
    out = torch.zeros_like(w)
    for xk, gk in zip(x, g):
        _, gw, _ = torch.ops.aten.convolution_backward(gk[None], xk[None], w, None, stride, padding, dilation,
                                                       False, [0] * nd, groups, [False, True, False])
        out += gw.abs()
    return out, g.flatten(2).sum(2).abs().sum(0)


def tied_oracle(a, g, idx, rows, v):
    a, g, rows = a.double(), g.double(), rows.double()
    total = torch.zeros(v, a.shape[2], dtype=torch.float64, device=a.device)
    for ak, gk, ik, rk in zip(a, g, idx, rows):
        gw = gk.t() @ ak
        keep = ik >= 0
        gw.index_add_(0, ik[keep], rk[keep])
        total += gw.abs()
    return total


# ----------------------------------------------------------------------------- linear
# (N, P, I, O): sizes 1, 7, 33, 129 in every role; P = 1 takes the abs-GEMM
LINEAR = [(1, 1, 7, 33), (7, 1, 129, 1), (129, 1, 33, 7), (33, 1, 1, 129), (1, 7, 33, 129), (7, 33, 7, 1),
          (3, 129, 129, 33), (2, 1, 1, 1), (5, 2, 65, 64)]


def run_linear(n, p, i, o, dtype, bias=True, seed=0):
    gen = torch.Generator().manual_seed(seed)
    a, g = rand(n, p, i, dtype=dtype, gen=gen), rand(n, p, o, dtype=dtype, gen=gen)
    w0, b0 = poisoned(o, i, gen=gen), poisoned(o, gen=gen)
    w, b = w0.to(DEV, copy=True), b0.to(DEV, copy=True) if bias else None
    torch.ops.mas_ext.linear_importance_(w, b, a.to(DEV), g.to(DEV))
    cw, cb = w0.clone(), b0.clone()
    torch.ops.mas_ext.linear_importance_(cw, cb, a, g)  # the CPU op on the same (rounded) inputs
    ref_w, ref_b = linear_oracle(a, g)
    torch.testing.assert_close((w.cpu() - w0).double(), ref_w, **tol(dtype, ref_w))
    torch.testing.assert_close(w.cpu(), cw, **tol(dtype, cw))
    if bias:
        torch.testing.assert_close((b.cpu() - b0).double(), ref_b, **tol(dtype, ref_b))


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
@pytest.mark.parametrize("n,p,i,o", LINEAR)
def test_linear(n, p, i, o, dtype):
    run_linear(n, p, i, o, dtype, seed=n + p + i + o)


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
def test_linear_small(dtype):
    run_linear(3, 1, 7, 5, dtype)
    run_linear(3, 5, 7, 5, dtype, bias=False)


def test_linear_large_splits():
    """Many tiles, several sample splits, positions not a multiple of BK."""
    run_linear(9, 300, 513, 257, torch.bfloat16, seed=1)
    run_linear(4000, 1, 100, 70, torch.float32, seed=2)


def test_linear_mixed_dtypes_noncontiguous_and_stream():
    gen = torch.Generator().manual_seed(3)
    a = rand(5, 6, 40, gen=gen).to(DEV).to(torch.bfloat16).transpose(0, 1).contiguous().transpose(0, 1)
    g = rand(6, 5, 30, gen=gen).to(DEV).transpose(0, 1)  # float32, not contiguous
    w = torch.zeros(30, 40, device=DEV)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())  # a, g and w are made on the default stream
    with torch.cuda.stream(s):
        torch.ops.mas_ext.linear_importance_(w, None, a, g)
    torch.cuda.current_stream().wait_stream(s)
    ref, _ = linear_oracle(a.float().cpu(), g.cpu())
    torch.testing.assert_close(w.cpu().double(), ref, **tol(torch.float32, ref))


def test_linear_errors():
    a, g = torch.randn(2, 3, 4, device=DEV), torch.randn(2, 3, 5, device=DEV)
    with pytest.raises(RuntimeError, match="float32"):
        torch.ops.mas_ext.linear_importance_(torch.zeros(5, 4, device=DEV, dtype=torch.float16), None, a, g)
    with pytest.raises(RuntimeError, match="shape"):
        torch.ops.mas_ext.linear_importance_(torch.zeros(4, 5, device=DEV), None, a, g)
    with pytest.raises(RuntimeError):
        torch.ops.mas_ext.linear_importance_(torch.zeros(5, 4), None, a, g)  # accumulator on the CPU


# ----------------------------------------------------------------------------- conv
# (N, C, spatial, O, kernel, stride, padding, dilation, groups)
CONV = [
    (3, 2, (9,), 4, (3,), (1,), (0,), (1,), 1),
    (7, 4, (33,), 6, (3,), (2,), (1,), (2,), 2),
    (2, 4, (7, 6), 6, (3, 2), (2, 1), (1, 0), (1, 2), 2),
    (3, 3, (5, 4), 3, (1, 1), (1, 1), (0, 0), (1, 1), 3),  # depthwise 1x1
    (2, 6, (9, 7), 129, (3, 3), (1, 2), (1, 1), (1, 1), 3),
    (1, 1, (1, 1), 7, (1, 1), (1, 1), (0, 0), (1, 1), 1),  # L = 1
    (4, 33, (12, 12), 7, (3, 3), (1, 1), (1, 1), (1, 1), 1),
    (2, 2, (4, 5, 3), 4, (2, 3, 1), (1, 2, 1), (1, 1, 0), (1, 1, 1), 1),
    (3, 4, (3, 4, 5), 2, (3, 1, 2), (2, 1, 1), (1, 0, 1), (1, 1, 2), 2),
]
CONV_FN = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def run_conv(case, dtype, bias=True, seed=0):
    n, c, spatial, o, k, s, p, d, groups = case
    gen = torch.Generator().manual_seed(seed)
    x = rand(n, c, *spatial, dtype=dtype, gen=gen)
    wshape = (o, c // groups, *k)
    out_shape = CONV_FN[len(spatial)](x.float(), torch.zeros(wshape), None, s, p, d, groups).shape
    g = rand(*out_shape, dtype=dtype, gen=gen)
    w0, b0 = poisoned(*wshape, gen=gen), poisoned(o, gen=gen)
    w, b = w0.to(DEV, copy=True), b0.to(DEV, copy=True) if bias else None
    torch.ops.mas_ext.conv_importance_(w, b, x.to(DEV), g.to(DEV), list(k), list(s), list(p), list(d), groups)
    cw = w0.clone()
    torch.ops.mas_ext.conv_importance_(cw, None, x, g, list(k), list(s), list(p), list(d), groups)
    ref_w, ref_b = conv_oracle(x, g, wshape, s, p, d, groups)
    torch.testing.assert_close((w.cpu() - w0).double(), ref_w, **tol(dtype, ref_w))
    torch.testing.assert_close(w.cpu(), cw, **tol(dtype, cw))
    if bias:
        torch.testing.assert_close((b.cpu() - b0).double(), ref_b, **tol(dtype, ref_b))


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
@pytest.mark.parametrize("case", CONV, ids=[f"conv{len(c[2])}d-{i}" for i, c in enumerate(CONV)])
def test_conv(case, dtype):
    run_conv(case, dtype, seed=sum(case[:2]))


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
def test_conv_small(dtype):
    run_conv(CONV[2], dtype)
    run_conv(CONV[7], dtype, bias=False)


def test_conv_workspace_chunks():
    """More samples than the 64 MiB im2col workspace holds: several chunks, the workspace reused."""
    run_conv((16, 64, (64, 64), 16, (3, 3), (1, 1), (1, 1), (1, 1), 1), torch.float32, seed=4)


# ----------------------------------------------------------------------------- tied embedding + linear
TIED = [(1, 1, 7, 33, 1), (3, 7, 33, 129, 9), (2, 33, 1, 7, 33), (7, 1, 129, 65, 2), (2, 129, 64, 300, 129)]


def run_tied(n, p, d, v, q, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    a, g = rand(n, p, d, dtype=dtype, gen=gen), rand(n, p, v, dtype=dtype, gen=gen)
    idx = torch.randint(-2, v, (n, q), generator=gen)  # negatives are skipped
    if q > 1:
        idx[:, 1] = idx[:, 0]  # a repeated index within a sample
    rows = rand(n, q, d, dtype=dtype, gen=gen)
    w0 = poisoned(v, d, gen=gen)
    w = w0.to(DEV, copy=True)
    torch.ops.mas_ext.tied_embedding_importance_(w, a.to(DEV), g.to(DEV), idx.to(DEV), rows.to(DEV))
    ref = tied_oracle(a, g, idx, rows, v)
    torch.testing.assert_close((w.cpu() - w0).double(), ref, **tol(dtype, ref))
    cw = w0.clone()
    torch.ops.mas_ext.tied_embedding_importance_(cw, a, g, idx, rows)
    torch.testing.assert_close(w.cpu(), cw, **tol(dtype, cw))


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
@pytest.mark.parametrize("n,p,d,v,q", TIED)
def test_tied(n, p, d, v, q, dtype):
    if not has_cuda_kernel("tied_embedding_importance_"):
        pytest.skip("no CUDA kernel for tied_embedding_importance_ in this build")
    run_tied(n, p, d, v, q, dtype, seed=n + p + d + v + q)


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
def test_tied_small(dtype):
    run_tied(3, 5, 9, 70, 6, dtype)


# ----------------------------------------------------------------------------- LayerNorm / RMSNorm affine
def norm_oracle(x, g, eps, rms):
    x, g = x.double(), g.double()
    centred = x if rms else x - x.mean(-1, keepdim=True)
    xhat = centred * torch.rsqrt(centred.pow(2).mean(-1, keepdim=True) + eps)
    return (g * xhat).sum(1).abs().sum(0), g.sum(1).abs().sum(0)


def run_norm(n, p, c, dtype, rms, bias=True, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x, g = (rand(n, p, c, gen=gen) * 3 + 1).to(dtype), rand(n, p, c, dtype=dtype, gen=gen)
    w0, b0 = poisoned(c, gen=gen), poisoned(c, gen=gen)
    w, b = w0.to(DEV, copy=True), b0.to(DEV, copy=True) if bias else None
    torch.ops.mas_ext.norm_affine_importance_(w, b, x.to(DEV), g.to(DEV), 1e-5, rms)
    rw, rb = norm_oracle(x, g, 1e-5, rms)
    torch.testing.assert_close((w.cpu() - w0).double(), rw, **tol(dtype, rw))
    if bias:
        torch.testing.assert_close((b.cpu() - b0).double(), rb, **tol(dtype, rb))
    cw = w0.clone()
    torch.ops.mas_ext.norm_affine_importance_(cw, None, x, g, 1e-5, rms)  # the CPU op on the same inputs
    torch.testing.assert_close(w.cpu(), cw, **tol(dtype, cw))


@pytest.mark.parametrize("rms", [False, True], ids=["layernorm", "rmsnorm"])
@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
@pytest.mark.parametrize("n,p,c", [(1, 1, 1), (3, 7, 33), (2, 129, 7), (7, 1, 129), (2, 33, 2048)])
def test_norm_affine(n, p, c, dtype, rms):
    if not has_cuda_kernel("norm_affine_importance_"):
        pytest.skip("no CUDA kernel for norm_affine_importance_ in this build")
    run_norm(n, p, c, dtype, rms, bias=not rms, seed=n + p + c)


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
def test_norm_affine_small(dtype):
    run_norm(3, 5, 40, dtype, rms=False)
    run_norm(2, 4, 9, dtype, rms=True, bias=False)


# ----------------------------------------------------------------------------- opcheck
def test_opcheck_small():
    gen = torch.Generator().manual_seed(5)
    for dtype in (torch.float32, torch.bfloat16):
        a, g = rand(3, 4, 7, dtype=dtype, gen=gen).to(DEV), rand(3, 4, 5, dtype=dtype, gen=gen).to(DEV)
        torch.library.opcheck(torch.ops.mas_ext.linear_importance_,
                              (torch.zeros(5, 7, device=DEV), torch.zeros(5, device=DEV), a, g))
        torch.library.opcheck(torch.ops.mas_ext.linear_importance_, (torch.zeros(5, 7, device=DEV), None, a[:, :1], g[:, :1]))
        x, gy = rand(2, 4, 6, 5, dtype=dtype, gen=gen).to(DEV), rand(2, 6, 3, 5, dtype=dtype, gen=gen).to(DEV)
        torch.library.opcheck(torch.ops.mas_ext.conv_importance_,
                              (torch.zeros(6, 2, 2, 3, device=DEV), torch.zeros(6, device=DEV), x, gy,
                               [2, 3], [2, 1], [0, 1], [1, 1], 2))
        if has_cuda_kernel("norm_affine_importance_"):
            torch.library.opcheck(torch.ops.mas_ext.norm_affine_importance_,
                                  (torch.zeros(7, device=DEV), torch.zeros(7, device=DEV), a, a * 2, 1e-5, False))
        if has_cuda_kernel("tied_embedding_importance_"):
            idx = torch.randint(-1, 9, (3, 2), generator=gen).to(DEV)
            torch.library.opcheck(torch.ops.mas_ext.tied_embedding_importance_,
                                  (torch.zeros(9, 7, device=DEV), a, rand(3, 4, 9, dtype=dtype, gen=gen).to(DEV), idx,
                                   rand(3, 2, 7, dtype=dtype, gen=gen).to(DEV)))


# ----------------------------------------------------------------------------- FusedMAS end to end
class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1, groups=1)
        self.dw = nn.Conv2d(8, 8, 3, stride=2, groups=4)
        self.fc = nn.Linear(8 * 3 * 3, 33)
        self.seq = nn.Linear(33, 7)

    def forward(self, x):
        h = F.relu(self.dw(F.relu(self.conv(x)))).flatten(1)
        h = F.relu(self.fc(h))
        return self.seq(h.unsqueeze(1).expand(-1, 5, -1) * torch.arange(1, 6, device=x.device).view(1, 5, 1))


class TiedLM(nn.Module):
    def __init__(self, v=70, d=16):
        super().__init__()
        self.emb = nn.Embedding(v, d)
        self.mix = nn.Linear(d, d)
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, v, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, idx):
        return self.head(self.norm(torch.tanh(self.mix(self.emb(idx)))))


@pytest.mark.parametrize("mode", ["global", "local"])
@pytest.mark.parametrize("model_fn,data_fn", [
    (Net, lambda gen: [torch.randn(6, 3, 8, 8, generator=gen) for _ in range(2)]),
    (TiedLM, lambda gen: [torch.randint(0, 70, (4, 9), generator=gen) for _ in range(2)]),
], ids=["convnet", "tied"])
def test_fusedmas_end_to_end_forced(monkeypatch, model_fn, data_fn, mode):
    """FusedMAS does not send CUDA tensors to these kernels yet (no kernel path ships before it ran on a GPU):
    this test opens the device gate for itself (MAS_EXT_CUDA_KERNELS=1) and compares with ReferenceMAS on the
    same GPU model."""
    gen = torch.Generator().manual_seed(6)
    torch.manual_seed(6)
    model = model_fn().to(DEV)
    data = [b.to(DEV) for b in data_fn(gen)]
    ref = mas_ext.ReferenceMAS(model, mode=mode)
    ref.accumulate(data)
    monkeypatch.setenv("MAS_EXT_CUDA_KERNELS", "1")  # the test-only opt-in, until the first green gpu-check
    assert mas_ext.backend().startswith("cuda")
    fused = mas_ext.FusedMAS(model, mode=mode)
    fused.accumulate(data)
    assert fused.num_samples == ref.num_samples
    for name, r in ref.task_importance.items():
        f = fused.task_importance[name]
        assert f.device.type == "cuda"
        torch.testing.assert_close(f, r, rtol=1e-4, atol=1e-6 * max(float(r.abs().max()), 1.0), msg=name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", ["mlp", "cnn", "resnet18", "transformer", "llama", "gpt2", "bert"])
def test_fusedmas_benchmark_models_forced(monkeypatch, name, dtype):
    """FusedMAS with the CUDA kernels on every benchmark model at its --quick size (the three Hugging Face families
    among them) against ReferenceMAS on the same GPU model, with the device gate forced open (test-only); the
    kernels are asserted to have run on CUDA tensors."""
    import os
    import sys

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from benchmarks import _models

    size = _models.QUICK[name]
    model = _models.make_model(name, size["cfg"]).to(DEV, dtype)
    x = _models.make_input(name, size["cfg"], size["batch"]).to(DEV)
    x = x.to(dtype) if x.is_floating_point() else x
    ref = mas_ext.ReferenceMAS(model).accumulate([x]).task_importance
    monkeypatch.setenv("MAS_EXT_CUDA_KERNELS", "1")
    seen = []
    for op in ("linear_importance_", "conv_importance_", "tied_embedding_importance_", "norm_affine_importance_"):
        real = getattr(torch.ops.mas_ext, op)
        monkeypatch.setattr(torch.ops.mas_ext, op, lambda *a, real=real, op=op: (seen.append((op, a[2].device.type)),
                                                                               real(*a))[1])
    fused = mas_ext.FusedMAS(model).accumulate([x]).task_importance
    assert seen and all(dev == "cuda" for _, dev in seen), seen
    num = sum(float((fused[k].double() - r.double()).pow(2).sum()) for k, r in ref.items())
    den = sum(float(r.double().pow(2).sum()) for r in ref.values())
    # float32: the same activations and gradients, float32 sums in another order. bf16: as on the CPU, attention
    # is recomputed in float32 by FusedMAS while the reference differentiates the bf16 module.
    assert (num / den) ** 0.5 < (1e-5 if dtype == torch.float32 else 2e-2), (num / den) ** 0.5
