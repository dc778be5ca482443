"""`make bench`: the mas_ext benchmark (SPEC §6).

    python -m benchmarks.bench [--device auto|cpu|cuda|cpu,cuda] [--quick] [--out DIR]

For each model (MLP, CNN, ResNet-18, transformer) it times the importance pass of
(a) a plain forward+backward of sum ||f(x)||^2, (b) the batch-|grad| shortcut of existing MAS
libraries, (c) mas_ext.ReferenceMAS, (d) mas_ext.FusedMAS and the per-sample peers (e) a
per-sample autograd loop, (f) torch.func vmap, (g) Opacus, (h) BackPACK, each with its peak
memory and its relative L2 error against the per-sample definition of Omega. Each row runs in
its own subprocess under a time budget; a row that fails says why. Then the optimizer-step rows of
benchmarks/optim_bench.py (when that module exists) and a copy-bandwidth measurement.

Writes <out>/<device>-<date>.json and .md plus PNG plots, and prints the tables.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if sys.path[0] != _ROOT:  # `python benchmarks/bench.py` and the opacus wheel's own top-level `benchmarks`
    sys.path.insert(0, _ROOT)

import torch  # noqa: E402

from benchmarks import _methods as M  # noqa: E402
from benchmarks import _models  # noqa: E402
from benchmarks import _report  # noqa: E402

try:
    from tqdm.auto import tqdm
except ImportError:  # pragma: no cover
    tqdm = None

RESULTS = os.path.join(_ROOT, "benchmarks", "results")

SPEC_TARGETS = {
    "importance_vs_plain": {"cpu": "<= 1.25", "cuda": "<= 1.25 (acceptance floor 1.5)"},
    "importance_speedup_vs_fastest_peer": {"cpu": ">= 1.2 on each model", "cuda": ">= 3 (geomean), > 1 on each model"},
    "importance_extra_memory_vs_plain": {"cpu": "<= 0.10", "cuda": "<= 0.10"},
    "adam_step_bandwidth_fraction": {"cpu": "(GPU target only)", "cuda": ">= 0.80"},
    "adam_step_speedup_vs_reference": {"cpu": ">= 2 (CPU fused vs CPU reference path)", "cuda": ">= 2.5 (vs Adam(foreach) + R as a loss term)"},
    "adam_step_vs_torch_fused": {"cpu": "(GPU target only)", "cuda": "<= 1.35"},
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", help="auto (cuda if present, else cpu), cpu, cuda, or a list: cpu,cuda")
    p.add_argument("--quick", action="store_true", help="tiny models and batches, 1 repeat (the smoke test)")
    p.add_argument("--out", default=None, help="output folder (default benchmarks/results; --quick: a temp folder)")
    p.add_argument("--models", default=",".join(_models.MODELS), help="comma list of " + ",".join(_models.MODELS))
    p.add_argument("--methods", default=",".join(M.METHODS), help="comma list of " + ",".join(M.METHODS))
    p.add_argument("--repeats", type=int, default=None, help="timed repeats per row (default 5; --quick 1)")
    p.add_argument("--row-budget", type=float, default=None, help="seconds per row before it is cut (default 150; --quick 20)")
    p.add_argument("--shrink-cpu", action="store_true",
                   help="on CPU, shrink the batch of the two largest models (ResNet-18 128->64, transformer 32->16)")
    p.add_argument("--mem-cap-gb", type=float, default=None, help="CPU rows: address-space cap per row (default 60%% of available RAM)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads in the rows (default: torch's; --quick: 1)")
    p.add_argument("--process", choices=("row", "model", "all"), default=None,
                   help="rows per worker process: row (CPU's default: memory figures isolated), model (CUDA's: one "
                        "process start and CUDA initialisation per model), all (--quick's)")
    p.add_argument("--no-optim", action="store_true", help="skip the optimizer-step rows")
    p.add_argument("--no-plots", action="store_true")
    return p.parse_args(argv)


def _devices(spec):
    out = []
    for d in spec.split(","):
        d = d.strip()
        if d == "auto":
            d = "cuda" if torch.cuda.is_available() else "cpu"
        if d == "cuda" and not torch.cuda.is_available():
            print("note: --device cuda asked for but no CUDA device; skipped", file=sys.stderr)
            continue
        if d not in out:
            out.append(d)
    return out


def _device_name(device):
    if device == "cuda":
        return torch.cuda.get_device_name(0)
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{name} ({torch.get_num_threads()} threads)"


def _mem_available():
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _git_rev():
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=_ROOT, capture_output=True, text=True,
                              timeout=10).stdout.strip() or None
    except Exception:  # noqa: BLE001
        return None


def _mas_info():
    info = {"mas_ext": None, "backend": None, "FusedMAS": False, "ReferenceMAS": False}
    try:
        import mas_ext
    except Exception as e:  # noqa: BLE001
        info["mas_ext"] = f"import failed: {type(e).__name__}: {e}"
        return info
    info["mas_ext"] = getattr(mas_ext, "__version__", "present")
    info["FusedMAS"] = hasattr(mas_ext, "FusedMAS")
    info["ReferenceMAS"] = hasattr(mas_ext, "ReferenceMAS")
    if hasattr(mas_ext, "backend"):
        try:
            info["backend"] = str(mas_ext.backend())
        except Exception as e:  # noqa: BLE001
            info["backend"] = f"backend() raised {type(e).__name__}: {e}"
    return info


def _peer_versions():
    out = {}
    for mod, dist in (("opacus", "opacus"), ("backpack", "backpack-for-pytorch")):
        try:
            from importlib.metadata import version

            __import__(mod)
            out[dist] = version(dist)
        except Exception as e:  # noqa: BLE001
            out[dist] = f"not importable: {type(e).__name__}: {e}"[:200]
    return out


def _blank(spec):
    return {"model": spec["model"], "method": spec["method"], "status": "error", "reason": None, "time_s": None,
            "times_s": [], "peak_mem_bytes": None, "rel_err": None, "warnings": []}


def _launch(specs, tmp, timeout):
    """Run specs (one row, or a list run in order) in a fresh process; returns (exit code or 'timeout', stderr)."""
    for spec in specs:
        spec["out"] = os.path.join(tmp, f"result-{spec['model']}-{spec['method']}.json")
        if os.path.exists(spec["out"]):
            os.remove(spec["out"])
    spec_path = os.path.join(tmp, f"spec-{specs[0]['model']}-{specs[0]['method']}-{len(specs)}.json")
    with open(spec_path, "w") as f:
        json.dump(specs if len(specs) > 1 else specs[0], f)
    env = dict(os.environ)
    env["PYTHONPATH"] = _ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("PYTHONWARNINGS", "ignore")
    try:
        proc = subprocess.run([sys.executable, "-m", "benchmarks._worker", spec_path], cwd=_ROOT, env=env,
                              capture_output=True, text=True, timeout=timeout)
        return proc.returncode, proc.stderr
    except subprocess.TimeoutExpired as e:
        err = e.stderr.decode(errors="replace") if isinstance(e.stderr, bytes) else (e.stderr or "")
        return "timeout", err


def _collect(spec, rc, err, timeout):
    """The row's result as the worker wrote it, or the reason it has none."""
    res = None
    if os.path.exists(spec["out"]):
        try:
            with open(spec["out"]) as f:
                res = json.load(f)
        except (OSError, ValueError):
            res = None
    started = res is not None
    if res is None:
        res = _blank(spec)
    if res.get("status") == "error" and not res.get("reason"):  # the worker never finished this row
        if not started:
            res["reason"] = f"not run: the worker process ended before this row ({rc})"
        elif rc == "timeout":
            res.update(status="timeout", reason=f"over the per-row time budget ({timeout:.0f} s wall, incl. start-up)")
        elif isinstance(rc, int) and rc < 0:
            res.update(status="out of memory" if rc == -9 else "error",
                       reason=f"worker killed by signal {-rc}" + (" (likely the OOM killer)" if rc == -9 else ""))
        else:
            tail = (err or "").strip().splitlines()[-1:] or [""]
            res["reason"] = f"worker exited {rc}: {tail[0][:300]}"
    return res


def _worker(spec, tmp, timeout):
    """Run one row in a fresh process; returns the row's result dict (a failure has status + reason)."""
    t0 = time.perf_counter()
    rc, err = _launch([spec], tmp, timeout)
    res = _collect(spec, rc, err, timeout)
    res["row_wall_s"] = time.perf_counter() - t0
    return res


def _group(specs, tmp, budget, startup):
    """Run one model's rows in order in one process (on CUDA: one process start and CUDA initialisation per model,
    not per row). A row that takes its process down (a crash, the time limit) is reported with its reason and the
    rows after it run in a fresh process. Returns their results in order."""
    results, rest = [], list(specs)
    while rest:
        total = budget * len(rest) + startup
        rc, err = _launch(rest, tmp, total)
        got = [_collect(s, rc, err, total) for s in rest]
        ran = next((i for i, r in enumerate(got) if str(r.get("reason") or "").startswith("not run")), len(got))
        if ran == 0:  # the process ended before its first row: no fresh process would do better
            results += got
            break
        for r in got[:ran]:
            r["row_wall_s"] = r.get("wall_s")
        results += got[:ran]
        rest = rest[ran:]
    return results


def _copy_bandwidth(device, quick):
    """Measured copy bandwidth (bytes read + written per second) of a big dst.copy_(src)."""
    nbytes = (32 if quick else (1024 if device == "cuda" else 256)) * 2**20
    n = nbytes // 4
    src = torch.ones(n, device=device)
    dst = torch.empty_like(src)
    ts = []
    for _ in range(3 if quick else 11):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        dst.copy_(src)
        if device == "cuda":
            torch.cuda.synchronize()
        ts.append(time.perf_counter() - t0)
    ts = sorted(ts[1:])
    t = ts[len(ts) // 2]
    return {"buffer_bytes": nbytes, "time_s": t, "gbps": 2 * nbytes / t / 1e9,
            "what": f"median of dst.copy_(src) on a {nbytes // 2**20} MiB float32 buffer; GB/s counts bytes read + written"}


def _run_optim(device, quick):
    try:
        from benchmarks import optim_bench
    except ImportError as e:
        return None, f"benchmarks/optim_bench.py not available ({e})"
    try:
        rows = optim_bench.run(device=device, quick=quick)
        return list(rows or []), None
    except Exception as e:  # noqa: BLE001
        return None, f"optim_bench.run raised {type(e).__name__}: {e}"[:300]


def run_device(device, args, out_dir):
    t_device = time.perf_counter()
    quick = args.quick
    sizes = _models.QUICK if quick else (_models.CUDA if device == "cuda" else _models.FULL)
    repeats = args.repeats or (1 if quick else 5)
    budget = args.row_budget or (20.0 if quick else 150.0)
    startup = 30.0 if quick else 90.0
    models = [m for m in args.models.split(",") if m]
    methods = [m for m in args.methods.split(",") if m]
    for m in models:
        if m not in sizes:
            raise SystemExit(f"unknown model {m!r}; choose from {','.join(_models.MODELS)}")
    for m in methods:
        if m not in M.METHODS:
            raise SystemExit(f"unknown method {m!r}; choose from {','.join(M.METHODS)}")
    now = _dt.datetime.now().astimezone()
    notes = []
    threads = args.threads or (1 if quick else None)
    if threads:
        notes.append(f"rows ran with torch.set_num_threads({threads}).")
    mem_cap = None
    if device == "cpu":
        avail = _mem_available()
        mem_cap = int(args.mem_cap_gb * 2**30) if args.mem_cap_gb else (int(0.6 * avail) if avail else None)
        notes.append(
            "peak memory (CPU): per row, a fresh process; after the timed passes, one more pass measured alone: the "
            "peak of the bytes torch's CPU allocator holds above what it held before the pass (the profiler's memory "
            "events, as CUDA's max_memory_allocated; mas_ext's kernels make their per-thread workspaces as torch "
            "tensors so it sees them). It counts what the pass allocates (activations, autograd graph, per-sample "
            "tensors, workspaces, the .grad or Omega it produces), not the model, the input or one-time set-up "
            "(e.g. Opacus/BackPACK wrapping). A further pass gives 'peak_rss_bytes': the peak RSS increase (VmHWM "
            "reset through /proc/self/clear_refs; glibc's mmap threshold fixed at 128 KiB and malloc_trim first), "
            "which also counts non-tensor memory and heap fragmentation and moves by a few MiB between runs.")
        if mem_cap:
            notes.append(f"CPU rows run under RLIMIT_DATA = {mem_cap / 2**30:.1f} GiB; a row that needs more fails with "
                         "'out of memory'.")
    else:
        notes.append("peak memory (CUDA): torch.cuda.max_memory_allocated during one pass (after the timed ones) "
                     "minus memory_allocated just before it; includes the .grad or Omega produced.")
    notes.append(f"times: median of up to {repeats} timed passes after one warm-up pass (fewer when a row's "
                 f"{budget:.0f} s budget would be exceeded; 'reps' says how many). Each row's process also times the "
                 "plain forward+backward (on its own copy of the model) in alternation with the method; '× plain' and "
                 "every ratio in the summary use these paired times (ratio of peers = ratio of their paired × plain), "
                 "so load from other processes hits both sides alike. A timed pass is the method's work on the batch: "
                 "(c)/(d) time accumulate() (and reading Ω_t) on a MAS object made fresh, untimed, before each pass, "
                 "as the peers' wrapping (Opacus' GradSampleModule, BackPACK's extend) is made untimed; before that "
                 "pass it has accumulated two samples and been consolidated (untimed), so that what it learns once "
                 "about a model (which layers' inputs hold the batch: a run of one sample alone; which parameters are "
                 "read outside their layers: a scan of the first forward) is set-up as well. Its Ω_t buffers are made "
                 "within the timed pass, as a plain pass makes its .grad.")
    notes.append("all importance rows run the model in eval mode (SPEC §1: samples independent); Opacus needs train "
                 "mode, which is used where it equals eval mode (no BatchNorm, no dropout).")
    notes.append("(b) batch_abs is hand-written: Omega = (1/N) |autograd.grad(sum_k ||f(x_k)||^2)| over the whole batch.")

    if hasattr(os, "getloadavg"):
        notes.append("load average at start (other processes share these cores): %.2f %.2f %.2f" % os.getloadavg())
    tmp = tempfile.mkdtemp(prefix="mas_bench_")
    info = {"models": {}}
    rows = []
    plan = []  # (spec, model info) in run order: per model its reference first, then the methods
    for name in models:
        batch = sizes[name]["batch"]
        cfg = sizes[name]["cfg"]
        if device == "cpu" and not quick and args.shrink_cpu and name in _models.CPU_BATCH:
            small = _models.CPU_BATCH[name]
            notes.append(f"{name}: batch shrunk on CPU from {batch} to {small} (--shrink-cpu)")
            batch = small
        model = _models.make_model(name, cfg)
        x = _models.make_input(name, cfg, batch)
        case = os.path.join(tmp, f"case-{name}.pt")
        torch.save({"name": name, "cfg": cfg, "state_dict": model.state_dict(), "x": x}, case)
        ref_path = os.path.join(tmp, f"ref-{name}.pt")
        minfo = {"description": _models.describe(name, cfg), "batch": batch, "params": _models.num_params(model),
                 "reference": None}
        info["models"][name] = minfo
        base = {"model": name, "case": case, "device": device, "repeats": repeats, "budget_s": budget,
                "mem_cap_bytes": mem_cap, "ref": ref_path, "threads": threads}
        plan.append((dict(base, method="ref", ref_out=ref_path), minfo))
        plan += [(dict(base, method=meth), minfo) for meth in methods]

    def record(spec, minfo, r):
        if spec["method"] == "ref":
            if r["status"] == "ok":
                minfo["reference"] = f"per-sample autograd loop in {r.get('dtype')}"
                minfo["reference_dtype"] = r.get("dtype")
            else:
                minfo["reference"] = f"failed: {r['status']}: {r.get('reason')}"
            return
        meth = spec["method"]
        r.update(label=M.METHODS[meth][0], letter=M.METHODS[meth][1], peer=M.METHODS[meth][2], batch=minfo["batch"],
                 reps=len(r.get("times_s") or []))
        rows.append(r)

    try:
        process = args.process or ("all" if quick else "model" if device == "cuda" else "row")
        if process == "all":  # start-up (import torch, peers) dominates at tiny sizes: one process runs every row
            notes.append("all rows ran in one worker process (memory figures not isolated per row).")
            total = budget * len(plan) + startup
            t0 = time.perf_counter()
            print(f"bench[{device}] --quick: {len(plan)} rows in one worker process ...", file=sys.stderr, flush=True)
            rc, err = _launch([p[0] for p in plan], tmp, total)
            for spec, minfo in plan:
                r = _collect(spec, rc, err, total)
                r["row_wall_s"] = r.get("wall_s")
                record(spec, minfo, r)
            print(f"bench[{device}] --quick: done in {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
        else:
            bar = tqdm(total=len(plan), desc=f"bench[{device}]", unit="row", dynamic_ncols=True) if tqdm else None
            try:
                if process == "model":  # CUDA's default; peak memory is reset per row
                    notes.append("each model's rows ran in one worker process, in order (a row that ends its "
                                 "process is reported and the rest run in a fresh one); the peak-memory figure of a "
                                 "row is measured from the bytes allocated just before its pass, so rows stay apart.")
                    for name in models:
                        group = [p for p in plan if p[0]["model"] == name]
                        if bar:
                            bar.set_postfix_str(f"{name}: {len(group)} rows")
                        for (spec, minfo), r in zip(group, _group([p[0] for p in group], tmp, budget, startup)):
                            record(spec, minfo, r)
                        if bar:
                            bar.update(len(group))
                else:  # one process per row: CPU memory figures isolated per row
                    for spec, minfo in plan:
                        if bar:
                            bar.set_postfix_str(f"{spec['model']}: {spec['method']}")
                        record(spec, minfo, _worker(spec, tmp, budget + startup))
                        if bar:
                            bar.update(1)
            finally:
                if bar:
                    bar.close()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    refs = {n: i.get("reference_dtype") for n, i in info["models"].items()}
    notes.append("rel_err: relative L2 error over all parameters concatenated against Omega = (1/N) sum_k "
                 "|grad ||f(x_k)||^2| from a per-sample autograd loop in float64 (float32 where float64 would take "
                 "too long); per model: " + ", ".join(f"{n}: {d or 'failed'}" for n, d in refs.items()) + ".")

    # optimizer step + copy bandwidth
    if hasattr(os, "getloadavg"):
        notes.append("load average after the importance rows: %.2f %.2f %.2f" % os.getloadavg())
    optim_rows, optim_note = (None, "skipped (--no-optim)") if args.no_optim else _run_optim(device, quick)
    if optim_note:
        notes.append("optimizer step: " + optim_note)
    try:
        bw = _copy_bandwidth(device, quick)
    except Exception as e:  # noqa: BLE001
        bw = {"error": f"{type(e).__name__}: {e}"}
    summary = _report.summarise(rows, optim_rows or [], bw, models)

    stem = f"{device}-{now.strftime('%Y-%m-%d')}"
    result = {
        "device": device,
        "device_name": _device_name(device),
        "torch": torch.__version__,
        "date": now.isoformat(timespec="seconds"),
        "quick": quick,
        "git": _git_rev(),
        "mas_ext": _mas_info(),
        "peers": _peer_versions(),
        **{k: summary[k] for k in ("importance_vs_plain", "importance_speedup_vs_fastest_peer", "adam_step_bandwidth_fraction",
                                   "adam_step_speedup_vs_reference", "adam_step_vs_torch_fused")},
        "importance_fastest_peer": summary["importance_fastest_peer"],
        "importance_extra_memory_vs_plain": summary["importance_extra_memory_vs_plain"],
        "importance_extra_rss_vs_plain": summary["importance_extra_rss_vs_plain"],
        "reference_vs_plain": summary["reference_vs_plain"],
        "copy_bandwidth": bw,
        "spec_targets": {k: v[device] for k, v in SPEC_TARGETS.items()},
        "models": info["models"],
        "notes": notes,
        "rows": rows,
        "optim_rows": optim_rows,
        "wall_s": time.perf_counter() - t_device,
    }
    os.makedirs(out_dir, exist_ok=True)
    json_path = os.path.join(out_dir, stem + ".json")
    with open(json_path, "w") as f:
        json.dump(result, f, indent=1, default=_json_default)
    plots = [] if args.no_plots else _report.plots(result, out_dir, stem)
    result["plots"] = [os.path.basename(p) for p in plots]
    with open(json_path, "w") as f:
        json.dump(result, f, indent=1, default=_json_default)
    md = _report.markdown(result)
    with open(os.path.join(out_dir, stem + ".md"), "w") as f:
        f.write(md)
    print(md)
    print(f"wrote {json_path}, {stem}.md" + (f", {', '.join(result['plots'])}" if plots else "") + f" in {out_dir}")
    return result


def _json_default(o):
    if isinstance(o, float) and not math.isfinite(o):
        return None
    if hasattr(o, "item"):
        return o.item()
    return str(o)


def main(argv=None):
    args = parse_args(argv)
    out_dir = args.out or (tempfile.mkdtemp(prefix="mas_bench_quick_") if args.quick else RESULTS)
    results = []
    for device in _devices(args.device):
        results.append(run_device(device, args, out_dir))
    return results


if __name__ == "__main__":
    main()
