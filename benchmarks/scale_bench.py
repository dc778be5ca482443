"""Scale measurements of SPEC §6 beside `benchmarks.bench` (issue 12, item 4), made for a GPU:

    python -m benchmarks.scale_bench [--device cuda] [--parts llm,batch,kernels] [--quick] [--out DIR]
    python -m benchmarks.scale_bench --quick --device cpu      # plumbing check without a GPU (tiny sizes)

llm      The `llm-1b` row: a LLaMA-style decoder from a transformers config with random weights (22 layers,
         hidden 2048, ff 5632, 32 heads, 4 KV heads, vocab 32000, tied embeddings: 1.03B parameters), bf16,
         8 x 1024 tokens. FusedMAS pass / plain forward+backward (paired, median), the peak memory of each, Ω
         against ReferenceMAS on a 2-sample slice (relative L2 error), and the largest batch at which FusedMAS
         and the torch.func vmap peer (which materialises N x P per-sample gradients) fit.
batch    Per benchmark model (bench.py's sizes for the device): the largest batch at which FusedMAS fits
         beside the largest at which a materialising per-sample peer (vmap, Opacus, BackPACK) fits.
kernels  Per compiled importance op, on the shapes of the llm-1b layers, a ResNet-18 conv and the MLP: time,
         FLOPs, compulsory bytes, TFLOP/s and GB/s, the fraction of the bf16 GEMM peak measured in the same run
         (an 8192^3 torch.mm) and of the copy bandwidth, and time / the op it replaces in a plain backward
         (the weight-gradient GEMM, conv weight gradient, layer-norm backward).

"Fits" means one importance pass at that batch ends without running out of memory (on CUDA, the GPU's whole
memory; --mem-limit-gb counts the pass's measured peak against a limit instead, which is how --quick runs on a
CPU). Batches double from the benchmark's batch until a pass fails, then `--refine` bisection steps narrow the
gap; FusedMAS stops at --ratio-cap x the best peer's batch (then reported as at least that).

Sets MAS_EXT_CUDA_KERNELS=1 (this is part of the GPU check: `make gpu-check`). Writes
<out>/<device>-scale-<date>.json and .md (default out: benchmarks/results; --quick: a temp folder).
"""
from __future__ import annotations

import argparse
import datetime as _dt
import gc
import json
import math
import os
import statistics
import sys
import tempfile
import time

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if sys.path[0] != _ROOT:
    sys.path.insert(0, _ROOT)
os.environ.setdefault("MAS_EXT_CUDA_KERNELS", "1")  # before mas_ext is imported: this benchmark checks the kernels

import torch  # noqa: E402

from benchmarks import _methods as M  # noqa: E402
from benchmarks import _models  # noqa: E402
from benchmarks.optim_cuda_bench import _Timer  # noqa: E402

PARTS = ("llm", "batch", "kernels")
LLM = dict(vocab=32000, hidden=2048, layers=22, heads=32, kv_heads=4, ff=5632, seq=1024, batch=8)
LLM_QUICK = dict(vocab=64, hidden=32, layers=2, heads=4, kv_heads=2, ff=64, seq=16, batch=4)
MATERIALISING = ("vmap", "opacus", "backpack")  # peers that hold N x P per-sample gradients
TARGETS = {"llm_importance_vs_plain": ("<=", 1.5), "batch_ratio_vs_best_peer": (">=", 8.0)}


# ----------------------------------------------------------------------------- timing and memory
class Clock(_Timer):
    """Seconds of one call (``time``: CUDA events on a GPU, perf_counter elsewhere) and the median of repeats."""

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize()

    def time(self, fn):
        return self.once(fn)

    def median(self, fn, repeats, warmup=1):
        for _ in range(warmup):
            fn()
        self.sync()
        return statistics.median(self.time(fn) for _ in range(repeats))


def _meter(device):
    from benchmarks._worker import CpuTensorPeak, CudaPeak

    return CudaPeak(torch, device) if device.type == "cuda" else CpuTensorPeak(torch)


def _free(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _peak(device, reset, run):
    """Peak bytes one pass allocates above what was held before it."""
    reset()
    _free(device)
    meter = _meter(device)
    meter.start()
    out = run()
    got = meter.stop()
    del out
    return got


# ----------------------------------------------------------------------------- largest batch
def _fits(device, prepare, make_x, batch, limit, budget_s):
    """(fits, peak bytes or None, seconds, why not): one importance pass at `batch`."""
    x = make_x(batch)
    run = reset = None
    try:
        run, reset = prepare(x)
        t0 = time.perf_counter()
        if device.type == "cuda" or limit is not None:
            peak = _peak(device, reset, run)
        else:  # no limit to hold it against (and no profiler to start: its CPU teardown can crash the process)
            reset()
            run()
            peak = None
        secs = time.perf_counter() - t0
    except Exception as e:  # noqa: BLE001 - an OOM is the answer; anything else is reported
        if not M._is_oom(e):
            raise
        return False, None, None, "out of memory"
    finally:
        del x, run, reset
        _free(device)
    if limit is not None and peak > limit:
        return False, peak, secs, f"peak {peak / 2**20:.0f} MiB over the {limit / 2**20:.0f} MiB limit"
    if secs > budget_s:
        return True, peak, secs, f"one pass took {secs:.0f} s (> {budget_s:.0f} s): no larger batch tried"
    return True, peak, secs, None


def largest_batch(device, prepare, make_x, start, limit=None, cap=None, refine=2, budget_s=60.0, floor=1):
    """The largest batch at which one pass fits: doubling from `start` (halving when `start` fails), then `refine`
    bisection steps between the last fit and the first failure. Returns a dict with the batch (None when not even
    `floor` fits), the peak bytes there, whether `cap` stopped the search, and every probe made."""
    probes = []

    def probe(b):
        ok, peak, secs, why = _fits(device, prepare, make_x, b, limit, budget_s)
        probes.append(dict(batch=b, fits=ok, peak_bytes=peak, seconds=secs, note=why))
        return ok, why

    best, fail, stopped = None, None, None
    b = max(floor, start if cap is None else min(start, cap))
    ok, why = probe(b)
    if ok:
        best = b
        while why is None and (cap is None or best < cap):
            b = best * 2 if cap is None else min(best * 2, cap)
            ok, why = probe(b)
            if not ok:
                fail, why = b, None
                break
            best = b
        stopped = why  # a pass that fit but took too long to try a larger one
    else:
        fail = b
        while b > floor:
            b = max(floor, b // 2)
            ok, why = probe(b)
            if ok:
                best = b
                break
            fail = b
    if best is not None and fail is not None:
        for _ in range(refine):
            if fail - best <= 1:
                break
            mid = (best + fail) // 2
            ok, _ = probe(mid)
            best, fail = (mid, fail) if ok else (best, mid)
    at = next((p for p in reversed(probes) if p["fits"] and p["batch"] == best), None)
    return dict(batch=best, peak_bytes=at and at["peak_bytes"], capped=cap is not None and best == cap,
                stopped=stopped, first_failure=fail, probes=probes)


def _preparer(method, build):
    """prepare(x) -> (run, reset) of a bench method on a fresh model from `build()` (Opacus and BackPACK wrap the
    model they are given)."""
    def prepare(x):
        run, reset = M.PREPARE[method](build(), x)
        return run, reset
    return prepare


def batch_part(device, quick, limit, refine, ratio_cap, models):
    sizes = _models.QUICK if quick else (_models.CUDA if device.type == "cuda" else _models.FULL)
    out = {}
    for name in models:
        size = sizes[name]
        cfg, start = size["cfg"], size["batch"]
        state = _models.make_model(name, cfg).state_dict()

        def build(name=name, cfg=cfg, state=state):
            m = _models.build(name, cfg)
            m.load_state_dict(state)
            return m.to(device).eval()

        def make_x(b, name=name, cfg=cfg):
            return _models.make_input(name, cfg, b).to(device)

        row = {"description": _models.describe(name, cfg), "bench_batch": start, "peers": {}}
        for peer in MATERIALISING:
            _progress(f"batch: {name} {peer}")
            try:
                row["peers"][peer] = largest_batch(device, _preparer(peer, build), make_x, start, limit,
                                                   refine=refine)
            except (M.NotAvailable, M.Unsupported) as e:
                row["peers"][peer] = {"batch": None, "unsupported": str(e)[:300]}
            except Exception as e:  # noqa: BLE001 - a peer that breaks is reported, the rest go on
                row["peers"][peer] = {"batch": None, "error": f"{type(e).__name__}: {e}"[:300]}
        fits = {p: r["batch"] for p, r in row["peers"].items() if r.get("batch")}
        best = max(fits, key=fits.get) if fits else None
        row["best_peer"] = best
        cap = ratio_cap * fits[best] if best else None
        _progress(f"batch: {name} fused")
        row["fused"] = largest_batch(device, _preparer("fused", build), make_x, start, limit, cap=cap, refine=refine)
        fb = row["fused"]["batch"]
        row["ratio_vs_best_peer"] = fb / fits[best] if best and fb else None
        row["ratio_is_lower_bound"] = bool(row["fused"]["capped"] or row["fused"]["stopped"])
        out[name] = row
    return out


# ----------------------------------------------------------------------------- the llm-1b row
def llm_model(cfg, device, dtype, seed=0):
    """LlamaForCausalLM from a config with random weights (nothing downloaded), tied embeddings, made on `device`."""
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=cfg["vocab"], hidden_size=cfg["hidden"], intermediate_size=cfg["ff"],
        num_hidden_layers=cfg["layers"], num_attention_heads=cfg["heads"], num_key_value_heads=cfg["kv_heads"],
        max_position_embeddings=cfg["seq"], tie_word_embeddings=True)
    torch.manual_seed(seed)
    with torch.device(device):
        model = transformers.LlamaForCausalLM(config)
    return _models.Logits(model.to(dtype).eval())


def rel_l2(omega, ref):
    num = den = 0.0
    for name, r in ref.items():
        d = omega[name].double() - r.double()
        num += float(d.pow(2).sum())
        den += float(r.double().pow(2).sum())
    return math.sqrt(num / den) if den > 0 else float("nan")


def llm_part(device, quick, repeats, limit, refine, with_batch):
    import mas_ext

    cfg = LLM_QUICK if quick else LLM
    dtype = torch.bfloat16
    _progress("llm: building the model")
    model = llm_model(cfg, device, dtype)
    params = _models.num_params(model)
    gen = torch.Generator().manual_seed(1)

    def make_x(b):
        return torch.randint(0, cfg["vocab"], (b, cfg["seq"]), generator=gen).to(device)

    x = make_x(cfg["batch"])
    clock = Clock(device)
    row = {"name": "llm-1b", "config": dict(cfg), "params": params, "dtype": "bfloat16",
           "tokens": f"{cfg['batch']} x {cfg['seq']}", "backend": mas_ext.backend()}

    _progress("llm: timing plain and FusedMAS")
    prun, preset = M.plain(model, x)
    frun, freset = M.PREPARE["fused"](model, x)
    for reset, run in ((preset, prun), (freset, frun)):  # warm-up
        reset()
        out = run()
        del out
    plain_t, fused_t = [], []
    for _ in range(repeats):  # alternating: drifting clocks hit both alike
        preset()
        plain_t.append(clock.time(prun))
        freset()
        fused_t.append(clock.time(lambda: frun()))
    row.update(plain_s=statistics.median(plain_t), fused_s=statistics.median(fused_t), plain_times_s=plain_t,
               fused_times_s=fused_t)
    row["importance_vs_plain"] = row["fused_s"] / row["plain_s"]
    row["plain_peak_bytes"] = _peak(device, preset, prun)
    row["fused_peak_bytes"] = _peak(device, freset, frun)
    row["extra_memory_vs_plain"] = (row["fused_peak_bytes"] - row["plain_peak_bytes"]) / row["plain_peak_bytes"]
    preset()
    del prun, preset, frun, freset
    _free(device)

    _progress("llm: FusedMAS against ReferenceMAS on a 2-sample slice")
    xs = x[:2]
    fused = mas_ext.FusedMAS(model).accumulate([xs], show_progress=False).task_importance
    ref = mas_ext.ReferenceMAS(model).accumulate([xs], show_progress=False).task_importance
    row["rel_err_vs_reference_2_samples"] = rel_l2(fused, ref)
    row["omega_dtype"] = str(next(iter(fused.values())).dtype)
    del fused, ref
    _free(device)

    if with_batch:
        def prep(method):
            return lambda xb: M.PREPARE[method](model, xb)

        _progress("llm: largest batch, vmap")
        try:
            peer = largest_batch(device, prep("vmap"), make_x, 1, limit, refine=refine)
        except Exception as e:  # noqa: BLE001
            peer = {"batch": None, "error": f"{type(e).__name__}: {e}"[:300]}
        row["vmap_largest_batch"] = peer
        _progress("llm: largest batch, FusedMAS")
        row["fused_largest_batch"] = largest_batch(device, prep("fused"), make_x, cfg["batch"], limit, refine=refine)
        pb, fb = peer.get("batch"), row["fused_largest_batch"]["batch"]
        row["batch_ratio_vs_vmap"] = fb / pb if pb and fb else None
    del model, x
    _free(device)
    return row


# ----------------------------------------------------------------------------- kernels
def _kernel_cases(quick):
    """(name, op, dtype, shapes). Linear: n, P, K (in), M (out); conv: n, C, O, HW, k, stride; tied: n, P, D, V;
    norm: n, P, C."""
    if quick:
        return [
            ("linear, positions (tiny)", "linear", torch.bfloat16, dict(n=2, p=8, k=16, m=24)),
            ("linear, no positions (tiny)", "linear", torch.float32, dict(n=16, p=1, k=16, m=24)),
            ("conv 3x3 (tiny)", "conv", torch.float32, dict(n=2, c=4, o=8, hw=6, k=3, stride=1)),
            ("tied embedding + head (tiny)", "tied", torch.bfloat16, dict(n=2, p=8, d=16, v=40)),
            ("RMSNorm affine (tiny)", "norm", torch.bfloat16, dict(n=2, p=8, c=16)),
        ]
    n, p, h, ff, v = LLM["batch"], LLM["seq"], LLM["hidden"], LLM["ff"], LLM["vocab"]
    kv = h // LLM["heads"] * LLM["kv_heads"]
    return [
        ("llm-1b q/o proj 2048->2048", "linear", torch.bfloat16, dict(n=n, p=p, k=h, m=h)),
        ("llm-1b k/v proj 2048->256", "linear", torch.bfloat16, dict(n=n, p=p, k=h, m=kv)),
        ("llm-1b gate/up proj 2048->5632", "linear", torch.bfloat16, dict(n=n, p=p, k=h, m=ff)),
        ("llm-1b down proj 5632->2048", "linear", torch.bfloat16, dict(n=n, p=p, k=ff, m=h)),
        ("llm-1b tied embedding + head, vocab 32000", "tied", torch.bfloat16, dict(n=n, p=p, d=h, v=v)),
        ("llm-1b RMSNorm affine", "norm", torch.bfloat16, dict(n=n, p=p, c=h)),
        ("HF bench row gate proj 512->1376, 16 x 256 tokens, fp32", "linear", torch.float32,
         dict(n=16, p=256, k=512, m=1376)),
        ("MLP 1000->1000, batch 1024 (no positions), fp32", "linear", torch.float32, dict(n=1024, p=1, k=1000, m=1000)),
        ("MLP 1000->1000, batch 1024 (no positions), bf16", "linear", torch.bfloat16, dict(n=1024, p=1, k=1000, m=1000)),
        ("ResNet-18 conv 3x3 64->64 at 32x32, batch 256, fp32", "conv", torch.float32,
         dict(n=256, c=64, o=64, hw=32, k=3, stride=1)),
        ("ResNet-18 conv 3x3 256->256 at 8x8, batch 256, fp32", "conv", torch.float32,
         dict(n=256, c=256, o=256, hw=8, k=3, stride=1)),
        ("ResNet-18 conv 3x3 256->256 at 8x8, batch 256, bf16", "conv", torch.bfloat16,
         dict(n=256, c=256, o=256, hw=8, k=3, stride=1)),
    ]


def _case(kind, dtype, s, device):
    """(the importance op call, the call it replaces in a plain backward, flops, compulsory bytes)."""
    g = torch.Generator(device=device).manual_seed(3)
    el = torch.tensor([], dtype=dtype).element_size()

    def rnd(*shape):
        return torch.randn(*shape, device=device, generator=g).to(dtype)

    ops = torch.ops.mas_ext
    if kind == "linear":
        n, p, k, m = s["n"], s["p"], s["k"], s["m"]
        a, gr = rnd(n, p, k), rnd(n, p, m)
        ow, ob = torch.zeros(m, k, device=device), torch.zeros(m, device=device)
        a2, g2 = a.view(-1, k), gr.view(-1, m)
        return (lambda: ops.linear_importance_(ow, ob, a, gr), lambda: (torch.mm(g2.t(), a2), g2.sum(0)),
                2.0 * n * p * m * k, (n * p * (m + k)) * el + 2 * 4 * (m * k + m))
    if kind == "conv":
        n, c, o, hw, kk, st = s["n"], s["c"], s["o"], s["hw"], s["k"], s["stride"]
        pad = kk // 2
        x = rnd(n, c, hw, hw)
        w = rnd(o, c, kk, kk)
        out_hw = (hw + 2 * pad - kk) // st + 1
        gr = rnd(n, o, out_hw, out_hw)
        ow = torch.zeros(o, c, kk, kk, device=device)

        def wgrad():
            return torch.ops.aten.convolution_backward(gr, x, w, None, [st, st], [pad, pad], [1, 1], False, [0, 0], 1,
                                                       [False, True, False])

        return (lambda: ops.conv_importance_(ow, None, x, gr, [kk, kk], [st, st], [pad, pad], [1, 1], 1), wgrad,
                2.0 * n * out_hw * out_hw * o * c * kk * kk,
                (x.numel() + gr.numel()) * el + 2 * 4 * ow.numel())
    if kind == "tied":
        n, p, d, v = s["n"], s["p"], s["d"], s["v"]
        a, gr = rnd(n, p, d), rnd(n, p, v)
        idx = torch.randint(0, v, (n, p), device=device, generator=g)
        rows = torch.randn(n, p, d, device=device, generator=g)
        om = torch.zeros(v, d, device=device)
        a2, g2 = a.view(-1, d), gr.view(-1, v)

        def replaced():
            w = torch.mm(g2.t(), a2)
            return w.index_add_(0, idx.view(-1), rows.view(-1, d).to(dtype))

        return (lambda: ops.tied_embedding_importance_(om, a, gr, idx, rows), replaced,
                2.0 * n * p * v * d, (n * p * (v + d)) * el + n * p * (8 + 4 * d) + 2 * 4 * v * d)
    if kind == "norm":
        n, p, c = s["n"], s["p"], s["c"]
        x, gr = rnd(n, p, c), rnd(n, p, c)
        wt = torch.ones(c, device=device, dtype=dtype)
        ow = torch.zeros(c, device=device)
        _, mean, rstd = torch.ops.aten.native_layer_norm(x, [c], wt, None, 1e-5)

        def replaced():
            return torch.ops.aten.native_layer_norm_backward(gr, x, [c], mean, rstd, wt, None, [False, True, False])

        return (lambda: ops.norm_affine_importance_(ow, None, x, gr, 1e-5, True), replaced, 4.0 * n * p * c,
                2 * n * p * c * el + 2 * 4 * c)
    raise ValueError(kind)


def kernels_part(device, quick, repeats):
    from mas_ext import _ops

    clock = Clock(device)
    key = "CUDA" if device.type == "cuda" else "CPU"
    size, pdtype = (256, torch.float32) if quick else (8192, torch.bfloat16)
    a = torch.randn(size, size, device=device).to(pdtype)
    b = torch.randn(size, size, device=device).to(pdtype)
    peak = 2.0 * size**3 / clock.median(lambda: torch.mm(a, b), repeats)
    del a, b
    src = torch.ones((1 << 28 if not quick else 1 << 20) // 4, device=device)
    dst = torch.empty_like(src)
    copy_bw = 2 * src.numel() * 4 / clock.median(lambda: dst.copy_(src), repeats)
    del src, dst
    _free(device)
    rows = []
    for name, kind, dtype, shape in _kernel_cases(quick):
        op = {"linear": "linear_importance_", "conv": "conv_importance_", "tied": "tied_embedding_importance_",
              "norm": "norm_affine_importance_"}[kind]
        row = {"name": name, "op": op, "dtype": str(dtype).replace("torch.", ""), "shape": shape}
        if not _ops.available(op) or not torch._C._dispatch_has_kernel_for_dispatch_key(f"mas_ext::{op}", key):
            row["error"] = f"no {key} kernel for mas_ext::{op} in this build"
            rows.append(row)
            continue
        _progress(f"kernels: {name}")
        try:
            call, replaced, flops, nbytes = _case(kind, dtype, shape, device)
            t, tr = clock.median(call, repeats), clock.median(replaced, repeats)
        except Exception as e:  # noqa: BLE001 - a case that breaks is reported, the rest go on
            row["error"] = f"{type(e).__name__}: {e}"[:300]
            rows.append(row)
            continue
        row.update(time_s=t, replaced_time_s=tr, vs_replaced=t / tr, flops=flops, bytes=nbytes,
                   tflops=flops / t / 1e12, gbps=nbytes / t / 1e9, fraction_of_gemm_peak=flops / t / peak,
                   fraction_of_copy_bandwidth=nbytes / t / copy_bw, intensity_flop_per_byte=flops / nbytes)
        rows.append(row)
        _free(device)
    return {"gemm_peak_tflops": peak / 1e12, "gemm_peak_what": f"torch.mm {size}^3 {str(pdtype)[6:]}",
            "copy_gbps": copy_bw / 1e9, "rows": rows,
            "note": "bytes: what the op must read and write at least (its operands once, the float32 Ω read and "
                    "written); a tiled kernel re-reads operands per output tile. 'replaced': the call a plain "
                    "backward makes instead (weight-gradient GEMM with the bias sum, conv weight gradient, head GEMM "
                    "+ embedding index_add, layer-norm weight backward)."}


# ----------------------------------------------------------------------------- report
def _progress(msg):
    print(f"scale_bench: {msg}", file=sys.stderr, flush=True)


def _fmt(x, f="{:.2f}"):
    return "—" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f.format(x)


def _gib(b):
    return _fmt(b / 2**30 if b is not None else None, "{:.2f}")


def markdown(res):
    L = [f"# mas_ext scale benchmark — {res['device_name']}", "",
         f"torch {res['torch']}, {res['date']}, git {res.get('git')}" + (" — **--quick sizes (not a measurement)**"
                                                                        if res["quick"] else ""), ""]
    llm = res.get("llm")
    if llm:
        size = f"{llm['params'] / 1e9:.2f}B" if llm["params"] >= 1e8 else f"{llm['params'] / 1e3:.0f}K"
        L += [f"## {llm['name']}: {size} parameters, bf16, {llm['tokens']} tokens", "",
              f"backend: {llm['backend']}", "",
              "| what | value | target |", "|---|---:|---|",
              f"| plain forward+backward | {_fmt(llm['plain_s'] * 1e3, '{:.1f}')} ms | |",
              f"| FusedMAS importance pass | {_fmt(llm['fused_s'] * 1e3, '{:.1f}')} ms | |",
              f"| FusedMAS / plain | {_fmt(llm['importance_vs_plain'])} | <= 1.5 |",
              f"| peak memory plain / FusedMAS | {_gib(llm['plain_peak_bytes'])} / {_gib(llm['fused_peak_bytes'])} GiB "
              f"| extra <= 10% ({_fmt(100 * llm['extra_memory_vs_plain'], '{:+.1f}')}%) |",
              f"| rel. L2 error vs ReferenceMAS, 2 samples | {_fmt(llm['rel_err_vs_reference_2_samples'], '{:.1e}')} "
              "| equal to bf16 rounding |"]
        if "fused_largest_batch" in llm:
            fb, pb = llm["fused_largest_batch"], llm["vmap_largest_batch"]
            L.append(f"| largest batch FusedMAS / vmap | {fb.get('batch')} / {pb.get('batch') or pb.get('error')} | "
                     f"ratio {_fmt(llm.get('batch_ratio_vs_vmap'), '{:.1f}')} |")
        L.append("")
    batch = res.get("batch")
    if batch:
        L += ["## Largest batch: FusedMAS vs the materialising per-sample peers", "",
              "| model | bench batch | " + " | ".join(MATERIALISING) + " | FusedMAS | ratio to best peer (>= 8) |",
              "|---|---:|" + "---:|" * (len(MATERIALISING) + 2)]
        for name, r in batch.items():
            def cell(p):
                return str(p["batch"]) if p.get("batch") else ("unsupported" if p.get("unsupported") else
                                                               "error" if p.get("error") else "none fits")
            ratio = r.get("ratio_vs_best_peer")
            ratio = (">= " if r.get("ratio_is_lower_bound") else "") + _fmt(ratio, "{:.1f}") if ratio else "—"
            L.append(f"| {name} | {r['bench_batch']} | " + " | ".join(cell(r["peers"][p]) for p in MATERIALISING)
                     + f" | {cell(r['fused'])} | {ratio} |")
        L.append("")
    kern = res.get("kernels")
    if kern:
        L += [f"## Importance kernels (GEMM peak measured: {_fmt(kern['gemm_peak_tflops'], '{:.0f}')} TFLOP/s, "
              f"{kern['gemm_peak_what']}; copy {_fmt(kern['copy_gbps'], '{:.0f}')} GB/s)", "",
              "| case | dtype | ms | TFLOP/s | of GEMM peak | GB/s | of copy | FLOP/byte | / replaced op |",
              "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
        for r in kern["rows"]:
            if "error" in r:
                L.append(f"| {r['name']} | {r['dtype']} | **{r['error']}** | | | | | | |")
                continue
            L.append(f"| {r['name']} | {r['dtype']} | {_fmt(r['time_s'] * 1e3, '{:.3f}')} | "
                     f"{_fmt(r['tflops'], '{:.1f}')} | {_fmt(100 * r['fraction_of_gemm_peak'], '{:.0f}')}% | "
                     f"{_fmt(r['gbps'], '{:.0f}')} | {_fmt(100 * r['fraction_of_copy_bandwidth'], '{:.0f}')}% | "
                     f"{_fmt(r['intensity_flop_per_byte'], '{:.0f}')} | {_fmt(r['vs_replaced'])} |")
        L += ["", kern["note"], ""]
    return "\n".join(L)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--parts", default=",".join(PARTS), help="comma list of " + ",".join(PARTS))
    p.add_argument("--models", default=",".join(_models.MODELS), help="models of the batch part")
    p.add_argument("--quick", action="store_true", help="tiny sizes, 1 repeat, a 4 MiB limit (plumbing check)")
    p.add_argument("--repeats", type=int, default=None, help="timed repeats (default 5; --quick 1)")
    p.add_argument("--mem-limit-gb", type=float, default=None,
                   help="count a pass's measured peak against this limit (default: none on CUDA, the GPU's memory "
                        "decides; --quick: 4 MiB)")
    p.add_argument("--refine", type=int, default=None, help="bisection steps after doubling (default 2; --quick 1)")
    p.add_argument("--ratio-cap", type=float, default=32.0, help="FusedMAS's search stops at this x the best peer")
    p.add_argument("--no-llm-batch", action="store_true", help="llm part: skip the largest-batch search")
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    device = torch.device(a.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("scale_bench: no CUDA device (use --device cpu --quick for a plumbing check)")
    parts = [x for x in a.parts.split(",") if x]
    for x in parts:
        if x not in PARTS:
            raise SystemExit(f"unknown part {x!r}; choose from {','.join(PARTS)}")
    repeats = a.repeats or (1 if a.quick else 5)
    refine = a.refine if a.refine is not None else (1 if a.quick else 2)
    limit = int(a.mem_limit_gb * 2**30) if a.mem_limit_gb else (4 << 20 if a.quick else None)
    if device.type == "cpu" and limit is None:
        raise SystemExit("scale_bench: on a CPU give --mem-limit-gb (running the machine out of memory is no measure)")
    from benchmarks.bench import _device_name, _git_rev, _json_default

    now = _dt.datetime.now().astimezone()
    res = {"benchmark": "scale_bench", "device": device.type, "device_name": _device_name(device.type),
           "torch": torch.__version__, "cuda": torch.version.cuda, "date": now.isoformat(timespec="seconds"),
           "git": _git_rev(), "quick": a.quick, "mem_limit_bytes": limit,
           "targets": {k: f"{op} {v}" for k, (op, v) in TARGETS.items()}}
    t0 = time.perf_counter()
    if "kernels" in parts:
        res["kernels"] = kernels_part(device, a.quick, repeats)
    if "llm" in parts:
        res["llm"] = llm_part(device, a.quick, repeats, limit, refine, not a.no_llm_batch)
    if "batch" in parts:
        models = [m for m in a.models.split(",") if m]
        res["batch"] = batch_part(device, a.quick, limit, refine, a.ratio_cap, models)
    res["wall_s"] = time.perf_counter() - t0
    out = a.out or (tempfile.mkdtemp(prefix="mas_scale_quick_") if a.quick else
                    os.path.join(_ROOT, "benchmarks", "results"))
    os.makedirs(out, exist_ok=True)
    stem = os.path.join(out, f"{device.type}-scale-{now.strftime('%Y-%m-%d')}")
    with open(stem + ".json", "w") as f:
        json.dump(res, f, indent=1, default=_json_default)
    md = markdown(res)
    with open(stem + ".md", "w") as f:
        f.write(md)
    print(md)
    print(f"wrote {stem}.json and .md")
    return res


if __name__ == "__main__":
    main()
