"""Optimizer-step benchmark (SPEC §6): the MAS penalty fused into the step vs the reference path.

    python benchmarks/optim_bench.py [--quick] [--device cpu]

Times one optimizer step over ~8M float32 parameters in 16 tensors (1M with --quick), gradients
already in place (no model: only the penalty gradient and the step are timed):

- ``mas_ext.optim.Adam`` with a consolidated MAS penalty: one fused multi-tensor CPU kernel;
- the reference path: R(θ) = λ Σ Ω (θ − θ*)² as a loss term, ``backward()`` into the grads, then
  ``torch.optim.Adam(foreach=True)``;
- the ``mas_ext::add_penalty_grad_`` op, then ``torch.optim.Adam(fused=True)`` (two passes);
- ``torch.optim.Adam(fused=True)`` with no penalty at all (the floor: 28 vs 36 bytes/param);
- the same for SGD with momentum.

Variants are timed round-robin (one step of each in turn) so load from other processes hits them
alike; each row reports the median. ``run()`` returns self-describing rows (name, optimizer,
penalty, median_s, bytes_per_step, gbps, ...); the fused Adam row also carries the ratios.
"""
from __future__ import annotations

import os
import statistics
import sys
import time
import warnings

import torch

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

LAM = 0.5
NUM_TENSORS = 16


class _Penalty:
    """What mas_ext.optim needs from a MAS object: ``lam`` and ``penalty_state()``."""

    def __init__(self, lam, terms):
        self.lam, self.terms = lam, terms

    def penalty_state(self):
        return self.terms


def _tensors(numel, device, seed):
    g = torch.Generator().manual_seed(seed)
    per = numel // NUM_TENSORS
    shapes = [(per // 1024, 1024)] * NUM_TENSORS
    params = [torch.nn.Parameter(torch.randn(s, generator=g).to(device)) for s in shapes]
    for p in params:
        p.grad = torch.randn(p.shape, generator=g).to(device) * 1e-2
    omegas = [torch.rand(s, generator=g).to(device) for s in shapes]
    stars = [(p.detach() + 1e-2 * torch.randn(p.shape, generator=g).to(device)) for p in params]
    return params, omegas, stars


def _penalty_loss_backward(params, omegas, stars):
    loss = LAM * sum((om * (p - st).pow(2)).sum() for p, om, st in zip(params, omegas, stars))
    loss.backward()


def _variants(numel, device):
    """(name, optimizer, penalty, bytes/param, step function, path) for every row."""
    from mas_ext import optim as mopt

    out = []

    def add(name, optimizer, penalty, bpp, make, path):
        params, omegas, stars = _tensors(numel, device, seed=len(out))
        out.append(dict(name=name, optimizer=optimizer, penalty=penalty, bytes_per_param=bpp, path=path,
                        step=make(params, omegas, stars), n=sum(p.numel() for p in params)))

    def fused_mas(cls, **kw):
        def make(params, omegas, stars):
            opt = cls(params, mas=_Penalty(LAM, list(zip(params, omegas, stars))), **kw)
            return opt.step
        return make

    def reference(cls, **kw):
        def make(params, omegas, stars):
            opt = cls(params, foreach=True, **kw)

            def step():
                _penalty_loss_backward(params, omegas, stars)
                opt.step()
            return step
        return make

    def op_then_torch_fused(cls, **kw):
        def make(params, omegas, stars):
            opt = cls(params, fused=True, **kw)
            op = torch.ops.mas_ext.add_penalty_grad_

            def step():
                op([p.grad for p in params], params, omegas, stars, 2 * LAM)
                opt.step()
            return step
        return make

    def torch_fused(cls, **kw):
        def make(params, omegas, stars):
            return cls(params, fused=True, **kw).step
        return make

    adam_kw = dict(lr=1e-3)
    sgd_kw = dict(lr=1e-3, momentum=0.9)
    # Row names are read by benchmarks/_report.py: keep "mas_ext" in the fused row, "reference"/"foreach"
    # in the reference row and "torch ... fused" (no "mas") in the torch fused row.
    add("mas_ext.optim.Adam + MAS penalty, one fused kernel", "Adam", True, 36, fused_mas(mopt.Adam, **adam_kw),
        "mas_ext fused CPU kernel")
    add("reference: torch.optim.Adam(foreach=True) + penalty as a loss term", "Adam", True, 36,
        reference(torch.optim.Adam, **adam_kw), "autograd of R(θ), then torch foreach Adam")
    add("torch.optim.Adam(fused=True), no penalty", "Adam", False, 28, torch_fused(torch.optim.Adam, **adam_kw),
        "torch fused Adam")
    add("add_penalty_grad_ op, then torch.optim.Adam(fused=True)", "Adam (two passes)", True, 36,
        op_then_torch_fused(torch.optim.Adam, **adam_kw), "mas_ext penalty op + torch fused Adam")
    add("mas_ext.optim.SGD(momentum) + MAS penalty, one fused kernel", "SGD", True, 28,
        fused_mas(mopt.SGD, **sgd_kw), "mas_ext fused CPU kernel")
    add("reference: torch.optim.SGD(momentum, foreach=True) + penalty as a loss term", "SGD", True, 28,
        reference(torch.optim.SGD, **sgd_kw), "autograd of R(θ), then torch foreach SGD")
    add("torch.optim.SGD(momentum, fused=True), no penalty", "SGD", False, 20,
        torch_fused(torch.optim.SGD, **sgd_kw), "torch fused SGD")
    return out


def _has_kernel(op, device):
    key = {"cpu": "CPU", "cuda": "CUDA"}.get(device.type, device.type.upper())
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(f"mas_ext::{op}", key)
    except RuntimeError:
        return False


def run(device="cpu", quick=False):
    """Rows: name, optimizer, penalty, median_s, bytes_per_step (what the step must read + write),
    gbps (bytes_per_step / median_s), params, tensors, dtype, device, repeats, threads, status."""
    from mas_ext import optim as mopt  # noqa: F401  (registers the ops; raises a clear ImportError unbuilt)

    device = torch.device(device)
    numel = (1 << 20) if quick else (1 << 23)
    repeats = 5 if quick else 15
    warmup = 2
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    variants = _variants(numel, device)
    rows = []
    runnable = []
    for v in variants:
        row = {k: v[k] for k in ("name", "optimizer", "penalty", "path")}
        row.update(params=v["n"], tensors=NUM_TENSORS, dtype="float32", device=str(device), repeats=repeats,
                   threads=torch.get_num_threads(), bytes_per_step=v["bytes_per_param"] * v["n"], status="ok")
        if "mas_ext" in v["path"] and not _has_kernel("fused_adam_mas_", device):
            row["status"] = f"skipped: no mas_ext kernel for {device.type} in this build"
        else:
            runnable.append((v, row))
        rows.append(row)

    times = {id(row): [] for _, row in runnable}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # e.g. sparse/fused notices from torch: not the point here
        for v, row in runnable:
            try:
                for _ in range(warmup):
                    v["step"]()
                sync()
            except Exception as e:  # noqa: BLE001  (a failing row says why; the others still run)
                row["status"] = f"failed: {type(e).__name__}: {e}"[:300]
        live = [(v, row) for v, row in runnable if row["status"] == "ok"]
        for _ in range(repeats):  # round-robin: one step of each variant in turn
            for v, row in live:
                sync()
                t0 = time.perf_counter()
                v["step"]()
                sync()
                times[id(row)].append(time.perf_counter() - t0)

    for v, row in live:
        t = statistics.median(times[id(row)])
        row["median_s"] = t
        row["gbps"] = row["bytes_per_step"] / t / 1e9
    by_name = {r["name"]: r for r in rows if "median_s" in r}

    def ratio(a, b):
        return by_name[b]["median_s"] / by_name[a]["median_s"] if a in by_name and b in by_name else None

    fa = "mas_ext.optim.Adam + MAS penalty, one fused kernel"
    fs = "mas_ext.optim.SGD(momentum) + MAS penalty, one fused kernel"
    if fa in by_name:
        r = by_name[fa]
        r["speedup_vs_reference"] = ratio(fa, "reference: torch.optim.Adam(foreach=True) + penalty as a loss term")
        r["adam_step_speedup_vs_reference"] = r["speedup_vs_reference"]
        tf = ratio(fa, "torch.optim.Adam(fused=True), no penalty")
        r["adam_step_vs_torch_fused"] = 1.0 / tf if tf else None
        r["speedup_vs_two_pass"] = ratio(fa, "add_penalty_grad_ op, then torch.optim.Adam(fused=True)")
    if fs in by_name:
        by_name[fs]["speedup_vs_reference"] = ratio(
            fs, "reference: torch.optim.SGD(momentum, foreach=True) + penalty as a loss term")
    return rows


def format_table(rows):
    lines = [f"{'step':<78} {'median ms':>10} {'MB/step':>9} {'GB/s':>7}  notes",
             "-" * 120]
    for r in rows:
        if "median_s" not in r:
            lines.append(f"{r['name']:<78} {'—':>10} {r['bytes_per_step'] / 1e6:>9.0f} {'—':>7}  {r['status']}")
            continue
        notes = []
        if r.get("speedup_vs_reference"):
            notes.append(f"{r['speedup_vs_reference']:.2f}x faster than the reference")
        if r.get("adam_step_vs_torch_fused"):
            notes.append(f"{r['adam_step_vs_torch_fused']:.2f}x torch fused Adam's time")
        if r.get("speedup_vs_two_pass"):
            notes.append(f"{r['speedup_vs_two_pass']:.2f}x faster than op + torch fused")
        lines.append(f"{r['name']:<78} {r['median_s'] * 1e3:>10.1f} {r['bytes_per_step'] / 1e6:>9.0f} "
                     f"{r['gbps']:>7.2f}  {'; '.join(notes)}")
    return "\n".join(lines)


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    rows = run(device=args.device, quick=args.quick)
    r0 = next((r for r in rows if "median_s" in r), rows[0])
    print(f"optimizer step, {r0['params'] / 1e6:.1f}M float32 params in {r0['tensors']} tensors, device "
          f"{r0['device']}, {r0['threads']} threads, torch {torch.__version__}, median of {r0['repeats']}")
    print(format_table(rows))
