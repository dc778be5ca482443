"""CUDA optimizer-step benchmark (SPEC §6): the fused Adam + MAS penalty step against the memory
bandwidth the GPU can reach and against torch's own Adam steps.

    python -m benchmarks.optim_cuda_bench [--params 134217728] [--tensors 64] [--repeats 25] [--out PATH]
    python -m benchmarks.optim_cuda_bench --quick --device cpu     # plumbing check without a GPU

Over ≥ 100M float32 parameters (64 tensors by default), gradients in place, each variant with its own
tensors, timed with CUDA events, median of repeats (variants interleaved round-robin):

- copy bandwidth: a device-to-device copy of a 1 GiB buffer (bytes read + written);
- ``mas_ext::fused_adam_mas_`` op: the fused Adam + penalty kernel (36 bytes/param: reads θ, g, m, v,
  Ω, θ*, writes θ, m, v);
- ``mas_ext.optim.Adam`` with a consolidated penalty: the same kernel through the optimizer (Python
  grouping included);
- torch.optim.Adam(foreach=True) with R(θ) = λ Σ Ω (θ − θ*)² as a loss term (autograd of R, then the step);
- torch.optim.Adam(fused=True) without any penalty (28 bytes/param: the floor).

Writes JSON (device name, torch version, date, rows, ratios against the SPEC targets) to
benchmarks/results/optim-cuda-<date>.json unless --out is given; prints a table.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time

import torch

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

LAM = 0.5
TARGETS = {
    "fused_vs_copy_bandwidth": (">=", 0.80),
    "speedup_vs_foreach_with_penalty_loss": (">=", 2.5),
    "time_vs_torch_fused_no_penalty": ("<=", 1.35),
}


class _Penalty:
    """What mas_ext.optim needs from a MAS object: ``lam`` and ``penalty_state()``."""

    def __init__(self, lam, terms):
        self.lam, self.terms = lam, terms

    def penalty_state(self):
        return self.terms


class _Timer:
    """Median seconds of a callable: CUDA events on a GPU, perf_counter (after a sync) elsewhere."""

    def __init__(self, device):
        self.cuda = device.type == "cuda"

    def once(self, fn):
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0


def _tensors(numel, ntensors, device, seed):
    g = torch.Generator(device=device).manual_seed(seed)
    per = numel // ntensors
    params = [torch.nn.Parameter(torch.randn(per, device=device, generator=g)) for _ in range(ntensors)]
    for p in params:
        p.grad = torch.randn(per, device=device, generator=g) * 1e-2
    omegas = [torch.rand(per, device=device, generator=g) for _ in range(ntensors)]
    stars = [p.detach() + 1e-2 * torch.randn(per, device=device, generator=g) for p in params]
    return params, omegas, stars


def _variants(numel, ntensors, device):
    from mas_ext import optim as mopt

    rows = []

    def add(name, key, bytes_per_param, make):
        params, omegas, stars = _tensors(numel, ntensors, device, seed=len(rows))
        rows.append(dict(name=name, key=key, bytes_per_param=bytes_per_param, params=ntensors * (numel // ntensors),
                         step=make(params, omegas, stars)))

    def fused_op(params, omegas, stars):
        grads = [p.grad for p in params]
        m = [torch.zeros_like(p) for p in params]
        v = [torch.zeros_like(p) for p in params]
        steps = [torch.zeros((), device=device) for _ in params]  # device counters: no host work per step
        kw = dict(penalty_scale=2 * LAM, lr=1e-3, beta1=0.9, beta2=0.999, weight_decay=0.0, eps=1e-8, amsgrad=False,
                  maximize=False, decoupled_weight_decay=False)
        data = [p.detach() for p in params]
        return lambda: torch.ops.mas_ext.fused_adam_mas_(data, grads, m, v, [], steps, omegas, stars, **kw)

    def fused_optim(params, omegas, stars):
        return mopt.Adam(params, lr=1e-3, mas=_Penalty(LAM, list(zip(params, omegas, stars)))).step

    def foreach_penalty_loss(params, omegas, stars):
        opt = torch.optim.Adam(params, lr=1e-3, foreach=True)

        def step():
            loss = LAM * sum((om * (p - st).pow(2)).sum() for p, om, st in zip(params, omegas, stars))
            loss.backward()  # accumulates the penalty gradient into the task gradient in .grad
            opt.step()
        return step

    def torch_fused(params, omegas, stars):
        return torch.optim.Adam(params, lr=1e-3, fused=True).step

    add("mas_ext::fused_adam_mas_ op (fused Adam + MAS penalty)", "fused_op", 36, fused_op)
    add("mas_ext.optim.Adam + MAS penalty", "fused_optim", 36, fused_optim)
    add("torch.optim.Adam(foreach=True) + penalty as a loss term", "foreach_penalty_loss", 36, foreach_penalty_loss)
    add("torch.optim.Adam(fused=True), no penalty", "torch_fused", 28, torch_fused)
    return rows


def copy_bandwidth(device, timer, repeats, nbytes):
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    t = statistics.median(timer.once(lambda: dst.copy_(src)) for _ in range(repeats))
    del src, dst
    return 2 * nbytes / t, t


def run(device="cuda", numel=1 << 27, ntensors=64, repeats=25, warmup=3):
    os.environ.setdefault("MAS_EXT_CUDA_KERNELS", "1")  # this benchmark is part of the GPU check
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("optim_cuda_bench: no CUDA device (use --device cpu for a plumbing check)")
    from mas_ext import _ops
    if not _ops.available("fused_adam_mas_"):
        raise SystemExit(f"optim_cuda_bench: mas_ext ops not built ({_ops.error})")
    key = {"cuda": "CUDA", "cpu": "CPU"}[device.type]
    if not torch._C._dispatch_has_kernel_for_dispatch_key("mas_ext::fused_adam_mas_", key):
        raise SystemExit(f"optim_cuda_bench: this build has no {key} kernel for mas_ext::fused_adam_mas_")
    timer = _Timer(device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    bw, copy_s = copy_bandwidth(device, timer, repeats, 1 << 30 if device.type == "cuda" else 1 << 26)
    rows = _variants(numel, ntensors, device)
    for r in rows:
        for _ in range(warmup):
            r["step"]()
    sync()
    times = {r["key"]: [] for r in rows}
    for _ in range(repeats):  # round-robin: drifting clocks/thermals hit every variant alike
        for r in rows:
            times[r["key"]].append(timer.once(r["step"]))
    out_rows = []
    for r in rows:
        med = statistics.median(times[r["key"]])
        nbytes = r["bytes_per_param"] * r["params"]
        out_rows.append(dict(name=r["name"], key=r["key"], median_s=med, min_s=min(times[r["key"]]),
                             bytes_per_param=r["bytes_per_param"], params=r["params"], tensors=ntensors,
                             gbps=nbytes / med / 1e9, fraction_of_copy_bandwidth=nbytes / med / bw))
    t = {r["key"]: r["median_s"] for r in out_rows}
    ratios = {
        "fused_vs_copy_bandwidth": 36 * out_rows[0]["params"] / t["fused_op"] / bw,
        "speedup_vs_foreach_with_penalty_loss": t["foreach_penalty_loss"] / t["fused_op"],
        "time_vs_torch_fused_no_penalty": t["fused_op"] / t["torch_fused"],
        "optim_wrapper_overhead": t["fused_optim"] / t["fused_op"],
    }
    verdict = {}
    for k, (op, target) in TARGETS.items():
        verdict[k] = dict(value=ratios[k], target=f"{op} {target}",
                          met=ratios[k] >= target if op == ">=" else ratios[k] <= target)
    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return dict(
        benchmark="optim_cuda_bench", device=dev_name, device_type=device.type, torch=torch.__version__,
        cuda=torch.version.cuda, date=datetime.datetime.now().isoformat(timespec="seconds"),
        params=out_rows[0]["params"], tensors=ntensors, dtype="float32", repeats=repeats,
        copy_bandwidth_gbps=bw / 1e9, copy_median_s=copy_s, rows=out_rows, ratios=ratios, targets=verdict,
    )


def _print(res):
    print(f"{res['device']}  torch {res['torch']}  {res['params'] / 1e6:.0f}M float32 params in {res['tensors']} "
          f"tensors, median of {res['repeats']}")
    print(f"  copy bandwidth (read+write): {res['copy_bandwidth_gbps']:.0f} GB/s")
    for r in res["rows"]:
        print(f"  {r['name']:<58} {r['median_s'] * 1e3:9.3f} ms  {r['gbps']:7.0f} GB/s  "
              f"({r['fraction_of_copy_bandwidth']:.0%} of copy)")
    for k, v in res["targets"].items():
        print(f"  {k:<40} {v['value']:.3f}  target {v['target']:<7} {'met' if v['met'] else 'MISSED'}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--params", type=int, default=1 << 27, help="float32 parameters in all (default 134M)")
    ap.add_argument("--tensors", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=25)
    ap.add_argument("--quick", action="store_true", help="1M params, 3 repeats (plumbing check)")
    ap.add_argument("--out", default=None, help="JSON path (default benchmarks/results/optim-cuda-<date>.json)")
    a = ap.parse_args(argv)
    if a.quick:
        a.params, a.repeats = 1 << 20, 3
    res = run(a.device, a.params, a.tensors, a.repeats)
    _print(res)
    out = a.out or os.path.join(_ROOT, "benchmarks", "results",
                                f"optim-{res['device_type']}-{datetime.date.today().isoformat()}.json")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        json.dump(res, f, indent=1)
    print(f"wrote {out}")
    return res


if __name__ == "__main__":
    main()
