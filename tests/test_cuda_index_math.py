"""The CUDA kernels' index and tiling arithmetic (csrc/cuda/index_math.cuh), checked on the CPU: the header
compiles as plain C++, and tests/cuda_index_math_test.cpp (built here with g++) prints its im2col mapping
(checked against F.unfold and the repo's unfold_nd), its tile and sample-split ranges (exact cover of
[0, n) for n = 1, 7, 33, 129), and runs a scalar emulation of the CUDA launchers (the same geometry,
block / split / item / BK-stage loops, tile loads and im2col workspace chunks; float loops in place of the
tensor-core tiles) whose Ω is compared with a float64 per-sample loop and the CPU ops; the CUDA binding
passes g++ -fsyntax-only against this torch's headers. What only a GPU can check (the wmma/FMA tiles,
shared memory, atomics, the launches) is in tests/test_cuda_importance.py."""
import math
import os
import shutil
import subprocess

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mas_ext import _ops
from mas_ext._rules import unfold_nd

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CXX = shutil.which("g++") or shutil.which("c++")
pytestmark = pytest.mark.skipif(CXX is None, reason="needs a C++ compiler")
BM, BN, BK, THREADS = 64, 64, 32, 128  # as in index_math.cuh
SIZES = [1, 7, 33, 129]


@pytest.fixture(scope="module")
def prog(tmp_path_factory):
    exe = str(tmp_path_factory.mktemp("index_math") / "cuda_index_math_test")
    subprocess.run([CXX, "-O2", "-std=c++17", "-Wall", "-Werror", "-I", os.path.join(ROOT, "csrc"),
                    os.path.join(ROOT, "tests", "cuda_index_math_test.cpp"), "-o", exe], check=True)
    return exe


def run(prog, *args):
    return subprocess.run([prog, *map(str, args)], check=True, capture_output=True, text=True).stdout


def pairs(text):
    return [tuple(map(int, line.split())) for line in text.strip().splitlines()]


def assert_cover(ranges, n):
    """Ranges are non-empty, in order, disjoint, and cover [0, n) exactly."""
    assert ranges[0][0] == 0 and ranges[-1][1] == n
    for (b, e), (b2, _) in zip(ranges, ranges[1:]):
        assert e == b2
    assert all(e > b for b, e in ranges)


def pad3(vals, fill):
    return [fill] * (3 - len(vals)) + list(vals)


# ----------------------------------------------------------------------------- im2col
def im2col(prog, x, kernel, stride, padding, dilation):
    """cols (C*K, L) of one sample x (C, *spatial) through im2col_offset."""
    nd = x.dim() - 1
    geo = [*pad3(x.shape[1:], 1), *pad3(kernel, 1), *pad3(stride, 1), *pad3(padding, 0), *pad3(dilation, 1)]
    out = run(prog, "im2col", x.shape[0], 1, 1, *geo).split()
    R, L = int(out[0]), int(out[1])
    off = torch.tensor(np.array(out[2:], dtype=np.int64)).view(R, L)
    flat = torch.cat([x.flatten(), torch.zeros(1, dtype=x.dtype)])
    assert ((off >= -1) & (off < x.numel())).all()
    return flat[torch.where(off < 0, x.numel(), off)], nd


def random_conv_geometry(gen, nd):
    while True:
        spatial = [int(torch.randint(1, 9 if nd < 3 else 6, (1,), generator=gen)) for _ in range(nd)]
        kernel = [int(torch.randint(1, 4, (1,), generator=gen)) for _ in range(nd)]
        stride = [int(torch.randint(1, 4, (1,), generator=gen)) for _ in range(nd)]
        padding = [int(torch.randint(0, 3, (1,), generator=gen)) for _ in range(nd)]
        dilation = [int(torch.randint(1, 3, (1,), generator=gen)) for _ in range(nd)]
        if all(s + 2 * p >= d * (k - 1) + 1 for s, p, d, k in zip(spatial, padding, dilation, kernel)):
            return spatial, kernel, stride, padding, dilation


@pytest.mark.parametrize("nd", [1, 2, 3])
def test_im2col_matches_unfold_nd(prog, nd):
    gen = torch.Generator().manual_seed(nd)
    for _ in range(12):
        spatial, kernel, stride, padding, dilation = random_conv_geometry(gen, nd)
        c = int(torch.randint(1, 4, (1,), generator=gen))
        x = torch.randn(c, *spatial, generator=gen)
        cols, _ = im2col(prog, x, kernel, stride, padding, dilation)
        ref = unfold_nd(x[None], kernel, stride, padding, dilation)[0]
        torch.testing.assert_close(cols, ref, rtol=0, atol=0)
        if nd == 2:
            torch.testing.assert_close(cols, F.unfold(x[None], kernel, dilation, padding, stride)[0], rtol=0, atol=0)


def test_conv_out_size_matches_torch(prog):
    gen = torch.Generator().manual_seed(0)
    for _ in range(10):
        spatial, kernel, stride, padding, dilation = random_conv_geometry(gen, 2)
        x = torch.randn(1, 2, *spatial, generator=gen)
        y = F.conv2d(x, torch.randn(3, 2, *kernel, generator=gen), None, stride, padding, dilation)
        out = run(prog, "im2col", 2, 3, 1, *pad3(spatial, 1), *pad3(kernel, 1), *pad3(stride, 1),
                  *pad3(padding, 0), *pad3(dilation, 1)).split()
        assert int(out[1]) == math.prod(y.shape[2:]) and int(out[0]) == 2 * math.prod(kernel)


# ----------------------------------------------------------------------------- tiles and splits
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("tile", [BM, BN, BK, THREADS, THREADS // 32])
def test_tiles_cover(prog, n, tile):
    ranges = pairs(run(prog, "tiles", n, tile))
    assert len(ranges) == math.ceil(n / tile)
    assert_cover(ranges, n)
    assert all(e - b <= tile for b, e in ranges)


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("tiles,groups,target", [(1, 1, 528), (2, 1, 8), (4, 2, 7), (1000, 1, 528), (3, 40000, 10 ** 6)])
def test_splits_cover(prog, n, tiles, groups, target):
    out = pairs(run(prog, "splits", n, tiles, groups, target))
    (nsplit, per), ranges = out[0], out[1:]
    assert len(ranges) == nsplit >= 1 and nsplit <= n
    assert_cover(ranges, n)
    assert all(e - b <= per for b, e in ranges)
    assert groups * nsplit <= 65535  # grid z
    if tiles >= target:  # `tiles` counts the blocks of one split (output tiles times groups)
        assert nsplit == 1  # enough blocks already: each block loops over every sample


@pytest.mark.parametrize("rows", SIZES + [100000])
@pytest.mark.parametrize("tiles,target", [(1, 528), (6, 8), (1000, 528)])
def test_abs_gemm_rows_per_item(prog, rows, tiles, target):
    rpi = int(run(prog, "absrows", rows, tiles, target))
    assert rpi % BK == 0 and rpi >= BK
    items = math.ceil(rows / rpi)
    assert items >= 1 and (items - 1) * rpi < rows
    assert items <= max(1, math.ceil(target / tiles)) + 1


# ----------------------------------------------------------------------------- emulated launches
def emulate(prog, tmp_path, cmd, arrays, *args):
    for name, t in arrays.items():
        t.contiguous().numpy().tofile(str(tmp_path / f"{name}.bin"))
    info = run(prog, cmd, str(tmp_path), *args)
    return info, {k: torch.from_numpy(np.fromfile(str(tmp_path / f"{k}.bin"), dtype=np.float32))
                  for k in ("w", "b") if (tmp_path / f"{k}.bin").exists()}


def linear_oracle(a, g):
    a, g = a.double(), g.double()
    return torch.einsum("npo,npi->noi", g, a).abs().sum(0), g.sum(1).abs().sum(0)


LINEAR = [(n, p, i, o) for (n, p), (i, o) in zip(
    [(1, 1), (7, 1), (33, 1), (129, 1), (1, 7), (7, 33), (3, 129), (2, 1)],
    [(7, 33), (129, 1), (33, 7), (7, 129), (129, 65), (33, 7), (7, 1), (1, 1)])]


@pytest.mark.parametrize("n,p,i,o", LINEAR)
@pytest.mark.parametrize("target", [1, 7, 528])
def test_emulated_linear(prog, tmp_path, n, p, i, o, target):
    gen = torch.Generator().manual_seed(n * 1000 + p * 10 + i + o)
    a, g = torch.randn(n, p, i, generator=gen), torch.randn(n, p, o, generator=gen)
    _, out = emulate(prog, tmp_path, "linear", {"a": a, "g": g}, n, p, i, o, target)
    ref_w, ref_b = linear_oracle(a, g)
    torch.testing.assert_close(out["w"].view(o, i).double(), ref_w, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(out["b"].double(), ref_b, rtol=1e-5, atol=1e-4)
    if _ops.available("linear_importance_"):
        w, b = torch.zeros(o, i), torch.zeros(o)
        torch.ops.mas_ext.linear_importance_(w, b, a, g)
        torch.testing.assert_close(out["w"].view(o, i), w, rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(out["b"], b, rtol=1e-5, atol=1e-4)


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


# (N, C, spatial, O, kernel, stride, padding, dilation, groups)
CONV = [
    (3, 2, (9,), 4, (3,), (1,), (0,), (1,), 1),
    (7, 4, (33,), 6, (3,), (2,), (1,), (2,), 2),
    (2, 4, (7, 6), 6, (3, 2), (2, 1), (1, 0), (1, 2), 2),
    (3, 3, (5, 4), 3, (1, 1), (1, 1), (0, 0), (1, 1), 3),
    (2, 6, (9, 7), 129, (3, 3), (1, 2), (1, 1), (1, 1), 3),
    (1, 1, (1, 1), 7, (1, 1), (1, 1), (0, 0), (1, 1), 1),
    (2, 2, (4, 5, 3), 4, (2, 3, 1), (1, 2, 1), (1, 1, 0), (1, 1, 1), 1),
    (3, 4, (3, 4, 5), 2, (3, 1, 2), (2, 1, 1), (1, 0, 1), (1, 1, 2), 2),
]


@pytest.mark.parametrize("case", CONV, ids=[f"conv{i}" for i in range(len(CONV))])
@pytest.mark.parametrize("target,budget", [(1, 1), (7, 300), (528, 1 << 24)])
def test_emulated_conv(prog, tmp_path, case, target, budget):
    n, c, spatial, o, k, s, p, d, groups = case
    gen = torch.Generator().manual_seed(n + c + o + len(spatial))
    x = torch.randn(n, c, *spatial, generator=gen)
    wshape = (o, c // groups, *k)
    y = [F.conv1d, F.conv2d, F.conv3d][len(spatial) - 1](x, torch.zeros(wshape), None, s, p, d, groups)
    g = torch.randn(y.shape, generator=gen)
    geo = [*pad3(spatial, 1), *pad3(k, 1), *pad3(s, 1), *pad3(p, 0), *pad3(d, 1)]
    info, out = emulate(prog, tmp_path, "conv", {"a": x, "g": g}, n, c, o, groups, *geo, target, budget)
    chunk = int(info.split()[1])
    if budget == 1:
        assert chunk == 1  # at least one sample whatever the budget
    ref_w, ref_b = conv_oracle(x, g, wshape, s, p, d, groups)
    torch.testing.assert_close(out["w"].view(wshape).double(), ref_w, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(out["b"].double(), ref_b, rtol=1e-5, atol=1e-4)
    if _ops.available("conv_importance_"):
        w, b = torch.zeros(wshape), torch.zeros(o)
        torch.ops.mas_ext.conv_importance_(w, b, x, g, list(k), list(s), list(p), list(d), groups)
        torch.testing.assert_close(out["w"].view(wshape), w, rtol=1e-5, atol=1e-4)


def tied_oracle(a, g, idx, rows, v):
    a, g, rows = a.double(), g.double(), rows.double()
    total = torch.zeros(v, a.shape[2], dtype=torch.float64)
    for ak, gk, ik, rk in zip(a, g, idx, rows):
        gw = gk.t() @ ak
        keep = ik >= 0
        gw.index_add_(0, ik[keep], rk[keep])
        total += gw.abs()
    return total


@pytest.mark.parametrize("n,p,d,v,q", [(1, 1, 7, 33, 1), (3, 7, 33, 129, 9), (2, 33, 1, 7, 33), (7, 1, 129, 65, 2),
                                       (2, 0, 5, 70, 4), (2, 3, 4, 200, 0)])
@pytest.mark.parametrize("target", [1, 528])
def test_emulated_tied(prog, tmp_path, n, p, d, v, q, target):
    gen = torch.Generator().manual_seed(n + p + d + v + q)
    a, g = torch.randn(n, p, d, generator=gen), torch.randn(n, p, v, generator=gen)
    idx = torch.randint(-2, v, (n, q), generator=gen)  # negatives are skipped; small v: repeats
    if q > 1:
        idx[:, 1] = idx[:, 0]  # a repeated index within a sample
    rows = torch.randn(n, q, d, generator=gen)
    _, out = emulate(prog, tmp_path, "tied", {"a": a, "g": g, "idx": idx, "rows": rows}, n, p, d, v, q, target)
    ref = tied_oracle(a, g, idx, rows, v)
    torch.testing.assert_close(out["w"].view(v, d).double(), ref, rtol=1e-5, atol=1e-4)
    if _ops.available("tied_embedding_importance_"):
        w = torch.zeros(v, d)
        torch.ops.mas_ext.tied_embedding_importance_(w, a, g, idx, rows)
        torch.testing.assert_close(out["w"].view(v, d), w, rtol=1e-5, atol=1e-4)


def test_header_compiles_as_cxx_and_cuda_sources_are_torch_free():
    """The kernels' files include no torch/ATen header (only the binding does)."""
    cuda_dir = os.path.join(ROOT, "csrc", "cuda")
    for name in ("index_math.cuh", "importance_cuda.cuh", "importance_cuda.cu"):
        text = open(os.path.join(cuda_dir, name)).read()
        for bad in ("<torch/", "<ATen/", "<c10/"):
            assert bad not in text, f"{name} includes {bad}"


def _cuda_include():
    nvcc = shutil.which("nvcc")
    homes = [os.environ.get("CUDA_HOME"), nvcc and os.path.dirname(os.path.dirname(os.path.realpath(nvcc))),
             "/usr/local/cuda"]
    incs = [os.path.join(h, "include") for h in homes if h]
    return next((i for i in incs if os.path.exists(os.path.join(i, "cuda_runtime_api.h"))), None)


@pytest.mark.skipif(_cuda_include() is None, reason="needs the CUDA toolkit's headers")
def test_binding_compiles(tmp_path):
    """importance_binding.cpp passes g++ -fsyntax-only against this torch's headers (a CPU wheel lacks the
    generated c10/cuda/impl/cuda_cmake_macros.h: a stub stands in for it)."""
    from torch.utils.cpp_extension import include_paths

    stub = tmp_path / "c10" / "cuda" / "impl"
    stub.mkdir(parents=True)
    (stub / "cuda_cmake_macros.h").write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
    cmd = [CXX, "-fsyntax-only", "-std=c++17", "-Wall", "-Wextra", "-DWITH_CUDA", "-I", os.path.join(ROOT, "csrc")]
    for p in include_paths():
        cmd += ["-isystem", p]
    cmd += ["-isystem", str(tmp_path), "-isystem", _cuda_include(), os.path.join(ROOT, "csrc", "cuda", "importance_binding.cpp")]
    res = subprocess.run(cmd, capture_output=True, text=True)
    assert res.returncode == 0 and "warning" not in res.stderr, res.stderr[-4000:]
