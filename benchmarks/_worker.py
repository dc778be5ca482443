"""One benchmark row in its own process: `python -m benchmarks._worker SPEC.json`.

A fresh process per row keeps rows independent (a peer that crashes or runs out of memory takes
only its own row down; the parent enforces the per-row time budget with a timeout) and isolates the
memory figures. CPU peak memory is measured twice, each on a pass of its own: the peak of the bytes
torch's CPU allocator holds (the profiler's memory events; the counterpart of CUDA's
max_memory_allocated, and the figure the summary uses) and the peak RSS increase (VmHWM, reset through
/proc/self/clear_refs), which also counts non-tensor memory and heap fragmentation.
"""
from __future__ import annotations

import gc
import json
import os
import resource
import sys
import time
import traceback
import warnings


def _status_kb(*keys):
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            if k in keys:
                out[k] = int(v.split()[0])
    return out


class CpuPeak:
    """Peak RSS increase of this process over one region (bytes)."""

    def __init__(self):
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.ok = True
        except OSError:
            self.ok = False

    def start(self):
        if self.ok:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM to the current RSS
            self.base = _status_kb("VmRSS")["VmRSS"]

    def stop(self):
        if not self.ok:
            return None
        return max(0, _status_kb("VmHWM")["VmHWM"] - self.base) * 1024


class CpuTensorPeak:
    """Peak increase of the bytes held by torch's CPU allocator over one region, read from the profiler's
    memory events (allocations made on the calling thread; mas_ext's kernels make their per-thread
    workspaces there too)."""

    def __init__(self, torch):
        self.torch = torch

    def start(self):
        profiler = self.torch.profiler
        self.prof = profiler.profile(activities=[profiler.ProfilerActivity.CPU], profile_memory=True)
        self.prof.__enter__()

    def stop(self):
        self.prof.__exit__(None, None, None)
        events = sorted((e.start_ns(), e.nbytes()) for e in self.prof.profiler.kineto_results.events()
                        if e.name() == "[memory]" and str(e.device_type()).endswith("CPU"))
        live = peak = 0
        for _, nbytes in events:
            live += nbytes
            peak = max(peak, live)
        del self.prof
        return peak


def _median(xs):
    xs = sorted(xs)
    n = len(xs)
    return xs[n // 2] if n % 2 else 0.5 * (xs[n // 2 - 1] + xs[n // 2])


def _fix_malloc():
    """glibc: fixed 128 KiB mmap threshold (big buffers are mmapped and unmapped on free), then trim."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 131072)  # M_MMAP_THRESHOLD
        libc.malloc_trim(0)
    except (OSError, AttributeError):
        pass


class CudaPeak:
    def __init__(self, torch, device):
        self.torch, self.device = torch, device
        self.ok = True

    def start(self):
        self.torch.cuda.synchronize(self.device)
        self.torch.cuda.reset_peak_memory_stats(self.device)
        self.base = self.torch.cuda.memory_allocated(self.device)

    def stop(self):
        self.torch.cuda.synchronize(self.device)
        return self.torch.cuda.max_memory_allocated(self.device) - self.base


def classify(e, methods_mod):
    """(status, reason) for an exception raised by a row."""
    msg = f"{type(e).__name__}: {e}".strip().replace("\n", " ")
    if len(msg) > 300:
        msg = msg[:297] + "..."
    if isinstance(e, methods_mod.NotAvailable):
        return "not available", str(e)
    if isinstance(e, methods_mod.Unsupported):
        return "unsupported", str(e)
    if methods_mod._is_oom(e):
        return "out of memory", msg
    if isinstance(e, NotImplementedError) or any(
        s in msg.lower() for s in ("not supported", "unsupported", "not implemented", "no extension", "doesn't support",
                                   "does not support", "not currently support")
    ):
        return "unsupported", msg
    return "error", msg


def rel_l2(omega, ref, torch):
    missing = sorted(set(ref) - set(omega))
    if missing:
        raise RuntimeError(f"Omega lacks {len(missing)} parameter(s), e.g. {missing[:3]}")
    num = den = 0.0
    for name, r in ref.items():
        o = omega[name].detach().to("cpu", torch.float64)
        num += float((o - r).pow(2).sum())
        den += float(r.pow(2).sum())
    return (num / den) ** 0.5 if den > 0 else float("nan")


_BENIGN = ("Full backward hook is firing when gradients are computed with respect to module outputs",
           "does not have an extension for Module <class 'benchmarks._models.")


def main(spec_path):
    with open(spec_path) as f:
        spec = json.load(f)
    for s in spec if isinstance(spec, list) else [spec]:  # --quick, and CUDA: several rows in one process
        run_spec(s)
        gc.collect()  # the row's model, wrappers and outputs go before the next row starts
        torch = sys.modules.get("torch")
        if torch is not None and torch.cuda.is_initialized():
            torch.cuda.empty_cache()


def run_spec(spec):
    result = {"model": spec["model"], "method": spec["method"], "status": "error", "reason": None,
              "times_s": [], "time_s": None, "peak_mem_bytes": None, "rel_err": None, "warnings": []}

    def write():
        tmp = spec["out"] + ".tmp"
        with open(tmp, "w") as f:
            json.dump(result, f)
        os.replace(tmp, spec["out"])

    cap = spec.get("mem_cap_bytes")
    if cap and spec["device"] == "cpu" and resource.getrlimit(resource.RLIMIT_DATA)[0] == resource.RLIM_INFINITY:
        try:  # a peer that materialises too much fails with an allocation error instead of the OOM killer
            resource.setrlimit(resource.RLIMIT_DATA, (int(cap), int(cap)))
        except (ValueError, OSError):
            pass

    t_start = time.perf_counter()
    write()  # a crash (e.g. OOM kill) still leaves a record
    try:
        import torch

        from benchmarks import _methods as M
        from benchmarks import _models

        if spec.get("threads"):
            torch.set_num_threads(int(spec["threads"]))
        device = torch.device(spec["device"])
        case = torch.load(spec["case"], weights_only=False)
        model = _models.build(case["name"], case["cfg"])
        model.load_state_dict(case["state_dict"])
        model = model.to(device).eval()
        x = case["x"].to(device)
        cuda = device.type == "cuda"

        def clock():
            if cuda:
                torch.cuda.synchronize(device)
            return time.perf_counter()

        if spec["method"] == "ref":
            omega, dtype = M.reference_omega(model, x, spec["budget_s"] * 0.8, clock)
            torch.save({k: v.detach().cpu() for k, v in omega.items()}, spec["ref_out"])
            result.update(status="ok", dtype=dtype, time_s=time.perf_counter() - t_start)
            return
        ref = torch.load(spec["ref"]) if spec.get("ref") and os.path.exists(spec["ref"]) else None
        peak = CudaPeak(torch, device) if cuda else CpuTensorPeak(torch)
        paired = spec.get("paired", True) and spec["method"] != "plain"
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            run, reset = M.PREPARE[spec["method"]](model, x)
            if paired:  # the plain pass, on its own copy of the model, timed in alternation with the method
                pmodel = _models.build(case["name"], case["cfg"])
                pmodel.load_state_dict(case["state_dict"])
                prun, preset = M.plain(pmodel.to(device).eval(), x)
            # warm-up run; its Omega gives the error column
            reset()
            t0 = clock()
            omega = run()
            t_warm = clock() - t0
            if omega is not None and ref is not None:
                result["rel_err"] = rel_l2(omega, ref, torch)
            del omega
            if paired:
                preset()
                t0 = clock()
                prun()
                t_warm += clock() - t0
            budget = spec["budget_s"] - (time.perf_counter() - t_start)
            reps = max(1, min(spec["repeats"], int(budget / max(t_warm, 1e-9)) - 1))
            plain_times = []
            for _ in range(reps):  # timing: the process's default allocator behaviour
                if paired:
                    preset()
                    t0 = clock()
                    prun()
                    plain_times.append(clock() - t0)
                reset()
                t0 = clock()
                out = run()
                result["times_s"].append(clock() - t0)
                del out
            if paired:
                preset()
                del prun, preset, pmodel
            # memory: one more pass, measured alone; on CPU a second one for the RSS (glibc's mmap
            # threshold fixed first, so freed big buffers go back to the OS)
            def measured(meter):
                reset()
                gc.collect()
                meter.start()
                out = run()
                got = meter.stop()
                del out
                return got

            result["peak_mem_bytes"] = measured(peak)
            if not cuda:
                _fix_malloc()
                result["peak_rss_bytes"] = measured(CpuPeak())
        if paired and plain_times:
            result["plain_times_s"] = plain_times
            result["plain_time_s"] = _median(plain_times)
        seen = []
        for w in caught:
            s = f"{w.category.__name__}: {w.message}"
            if s not in seen and not any(b in s for b in _BENIGN):
                seen.append(s)
        result["warnings"] = [s[:300] for s in seen[:5]]
        result["time_s"] = _median(result["times_s"])
        if result.get("plain_time_s"):
            result["vs_plain_paired"] = result["time_s"] / result["plain_time_s"]
        result["status"] = "ok"
    except KeyboardInterrupt:
        result["status"], result["reason"] = "error", "interrupted"
        raise
    except Exception as e:  # noqa: BLE001 - every failure is reported, never dropped
        try:
            from benchmarks import _methods as M
            result["status"], result["reason"] = classify(e, M)
        except Exception:  # noqa: BLE001
            result["status"], result["reason"] = "error", f"{type(e).__name__}: {e}"[:300]
        if os.environ.get("MAS_BENCH_TRACEBACK"):
            traceback.print_exc()
    finally:
        result["wall_s"] = time.perf_counter() - t_start
        write()


if __name__ == "__main__":
    main(sys.argv[1])
