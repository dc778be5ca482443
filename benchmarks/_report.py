"""Summary ratios, the Markdown report and the PNG plots of benchmarks/bench.py."""
from __future__ import annotations

import math
import os

from benchmarks import _methods as M


def _ok(r):
    return r.get("status") == "ok" and r.get("time_s") is not None


def vs_plain(r, plain=None):
    """The row's time / plain forward+backward: paired (same process, alternating) where measured."""
    if not _ok(r):
        return None
    if r.get("method") == "plain":
        return 1.0
    if r.get("vs_plain_paired"):
        return r["vs_plain_paired"]
    return r["time_s"] / plain["time_s"] if plain and _ok(plain) else None


def _geomean(xs):
    xs = [x for x in xs if x is not None and x > 0 and math.isfinite(x)]
    return math.exp(sum(math.log(x) for x in xs) / len(xs)) if xs else None


# ---------------------------------------------------------------- optimizer rows
# benchmarks/optim_bench.py (another module) returns a list of dicts; the summary needs, for the Adam
# step: the fused mas_ext step (with the penalty), the reference path and torch.optim.Adam(fused=True).
# Rows may already carry the ratios; otherwise they are computed from times here.
_TIME_KEYS = (("time_s", 1.0), ("median_s", 1.0), ("seconds", 1.0), ("time_ms", 1e-3), ("median_ms", 1e-3),
              ("ms", 1e-3), ("time_us", 1e-6), ("us", 1e-6))


def _row_time(r):
    for k, scale in _TIME_KEYS:
        v = r.get(k)
        if isinstance(v, (int, float)) and v > 0:
            return v * scale
    return None


def _row_text(r):
    return " ".join(str(r.get(k, "")) for k in ("name", "optimizer", "impl", "method", "variant", "kind", "label", "row")).lower()


def _optim_kind(r):
    t = _row_text(r)
    if "adam" not in t or "adamw" in t:
        return None
    if "torch" in t and "fused" in t and "mas" not in t:
        return "torch_fused"
    if "reference" in t or "foreach" in t:
        return "reference"
    if "fused" in t or "mas_ext" in t:
        return "fused"
    return None


def optim_summary(rows, bw):
    out = {"adam_step_bandwidth_fraction": None, "adam_step_speedup_vs_reference": None, "adam_step_vs_torch_fused": None}
    direct = {}
    for r in rows:  # ratios the optimizer module computed itself win
        for k in out:
            if isinstance(r.get(k), (int, float)):
                direct[k] = float(r[k])
    kinds = {}
    for r in rows:
        if r.get("status", "ok") != "ok":
            continue
        k = _optim_kind(r)
        if k and k not in kinds and _row_time(r):
            kinds[k] = r
    f, ref, tf = kinds.get("fused"), kinds.get("reference"), kinds.get("torch_fused")
    if f and ref:
        out["adam_step_speedup_vs_reference"] = _row_time(ref) / _row_time(f)
    if f and tf:
        out["adam_step_vs_torch_fused"] = _row_time(f) / _row_time(tf)
    if f and bw and bw.get("gbps"):
        gbps = f.get("gbps") or f.get("GB/s")
        nbytes = f.get("bytes_per_step") or f.get("bytes")
        if not gbps and nbytes:
            gbps = nbytes / _row_time(f) / 1e9
        if gbps:
            out["adam_step_bandwidth_fraction"] = float(gbps) / bw["gbps"]
    out.update(direct)
    return out


# ---------------------------------------------------------------- importance summary
def summarise(rows, optim_rows, bw, models):
    by = {(r["model"], r["method"]): r for r in rows}
    s = {"importance_vs_plain": {}, "importance_speedup_vs_fastest_peer": {}, "importance_fastest_peer": {},
         "importance_extra_memory_vs_plain": {}, "importance_extra_rss_vs_plain": {}, "reference_vs_plain": {}}
    for m in models:
        plain, fused, ref = by.get((m, "plain")), by.get((m, "fused")), by.get((m, "reference"))
        okf = fused is not None and _ok(fused)
        s["importance_vs_plain"][m] = vs_plain(fused, plain) if okf else None
        s["reference_vs_plain"][m] = vs_plain(ref, plain) if ref else None
        peers = [by[(m, p)] for p in M.PEERS if (m, p) in by and vs_plain(by[(m, p)], plain)]
        best = min(peers, key=lambda r: vs_plain(r, plain)) if peers else None
        s["importance_fastest_peer"][m] = best["method"] if best else None
        fr = s["importance_vs_plain"][m]
        s["importance_speedup_vs_fastest_peer"][m] = vs_plain(best, plain) / fr if best and fr else None
        for summary_key, row_key in (("importance_extra_memory_vs_plain", "peak_mem_bytes"),
                                     ("importance_extra_rss_vs_plain", "peak_rss_bytes")):
            pm = plain.get(row_key) if plain and _ok(plain) else None
            fm = fused.get(row_key) if okf else None
            s[summary_key][m] = (fm - pm) / pm if pm and fm is not None else None
    s.update(optim_summary(optim_rows, bw))
    return s


# ---------------------------------------------------------------- formatting
def _f(x, fmt="{:.2f}", none="—"):
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return none
    return fmt.format(x)


def _ms(t):
    return _f(t * 1e3 if t is not None else None, "{:.1f}" if t is not None and t < 10 else "{:.0f}")


def _mb(b):
    return _f(b / 2**20 if b is not None else None, "{:.1f}")


def _err(e):
    if e is None:
        return "—"
    return f"{e:.1e}" if e < 1e-2 else f"{e:.3f}"


def _status(r):
    if _ok(r):
        return "ok"
    reason = (r.get("reason") or "").replace("|", "/").replace("\n", " ")
    if len(reason) > 160:
        reason = reason[:157] + "..."
    return f"**{r.get('status')}**: {reason}" if reason else f"**{r.get('status')}**"


def markdown(res):
    dev = res["device"]
    models = list(res["models"])
    L = [f"# mas_ext benchmark — {dev} ({res['device_name']})", "",
         f"torch {res['torch']}, {res['date']}, git {res.get('git')}, mas_ext backend: "
         f"{(res.get('mas_ext') or {}).get('backend')}" + (" — **--quick sizes (not a measurement)**" if res.get("quick") else ""),
         ""]
    L += ["## Summary vs SPEC §6 targets", "", "| ratio | " + " | ".join(models) + " | geomean | SPEC target |",
          "|---|" + "---:|" * (len(models) + 1) + "---|"]
    tg = res.get("spec_targets", {})
    for key, label in (("importance_vs_plain", "FusedMAS / plain fwd+bwd (time)"),
                       ("importance_speedup_vs_fastest_peer", "fastest per-sample peer / FusedMAS (time)"),
                       ("importance_extra_memory_vs_plain", "extra peak memory of FusedMAS over plain"),
                       ("importance_extra_rss_vs_plain", "same, peak RSS (CPU: also non-tensor memory)"),
                       ("reference_vs_plain", "ReferenceMAS / plain fwd+bwd (time)")):
        vals = res.get(key) or {}
        if key == "importance_extra_rss_vs_plain" and not any(v is not None for v in vals.values()):
            continue
        relative = key.startswith("importance_extra_")
        geo = _geomean(vals.get(m) for m in models) if not relative else None
        fmt = "{:+.0%}" if relative else "{:.2f}"
        cells = [_f(vals.get(m), fmt) for m in models]
        if key == "importance_speedup_vs_fastest_peer":
            fp = res.get("importance_fastest_peer") or {}
            cells = [c + (f" ({fp.get(m)})" if fp.get(m) and c != "—" else "") for c, m in zip(cells, models)]
        L.append(f"| {label} | " + " | ".join(cells) + f" | {_f(geo)} | {tg.get(key, '')} |")
    L.append("")
    L += ["| optimizer step | value | SPEC target |", "|---|---:|---|"]
    for key, label in (("adam_step_bandwidth_fraction", "fused Adam+penalty GB/s / copy GB/s"),
                       ("adam_step_speedup_vs_reference", "reference path / fused Adam+penalty (time)"),
                       ("adam_step_vs_torch_fused", "fused Adam+penalty / torch Adam(fused=True) (time)")):
        L.append(f"| {label} | {_f(res.get(key))} | {tg.get(key, '')} |")
    bw = res.get("copy_bandwidth") or {}
    L += ["", f"Copy bandwidth: {_f(bw.get('gbps'), '{:.1f}')} GB/s ({bw.get('what', bw.get('error', ''))}).", ""]

    L += ["## Importance pass", ""]
    rows = res["rows"]
    for m in models:
        mi = res["models"][m]
        L += [f"### {m}: {mi['description']}, batch {mi['batch']}, {mi['params']:,} parameters", "",
              f"Error reference: {mi.get('reference')}.", "",
              "| | method | time (ms) | × plain | peak mem (MiB) | × plain | rel. L2 err | reps | status |",
              "|---|---|---:|---:|---:|---:|---:|---:|---|"]
        mr = [r for r in rows if r["model"] == m]
        plain = next((r for r in mr if r["method"] == "plain" and _ok(r)), None)
        for r in mr:
            tr = vs_plain(r, plain)
            mm = (r["peak_mem_bytes"] / plain["peak_mem_bytes"]
                  if plain and _ok(r) and r.get("peak_mem_bytes") is not None and plain.get("peak_mem_bytes") else None)
            L.append(f"| ({r.get('letter')}) | {r.get('label', r['method'])} | {_ms(r.get('time_s'))} | {_f(tr)} | "
                     f"{_mb(r.get('peak_mem_bytes'))} | {_f(mm)} | {_err(r.get('rel_err'))} | {r.get('reps', '')} | "
                     f"{_status(r)} |")
        L.append("")
    L += ["## Optimizer step", ""]
    orows = res.get("optim_rows")
    if orows:
        r0 = orows[0]
        L += [f"{r0.get('params', 0) / 1e6:.1f}M float32 parameters in {r0.get('tensors')} tensors, "
              f"{r0.get('threads')} threads, median of {r0.get('repeats')} steps (benchmarks/optim_bench.py).", "",
              "| step | median (ms) | MB/step | GB/s | vs reference | × torch fused | vs two-pass | status |",
              "|---|---:|---:|---:|---:|---:|---:|---|"]
        for r in orows:
            t = r.get("median_s")
            L.append(f"| {_cell(r.get('name'))} | {_ms(t)} | {_f((r.get('bytes_per_step') or 0) / 1e6, '{:.0f}')} | "
                     f"{_f(r.get('gbps'))} | {_f(r.get('speedup_vs_reference'))} | {_f(r.get('adam_step_vs_torch_fused'))} | "
                     f"{_f(r.get('speedup_vs_two_pass'))} | {_cell(r.get('status'))} |")
    else:
        L.append("No optimizer rows (see notes).")
    L += ["", "## Notes", ""] + [f"- {n}" for n in res.get("notes", [])]
    warn = [(r["model"], r["method"], w) for r in rows for w in (r.get("warnings") or [])]
    if warn:
        L += ["", "Warnings raised during rows:", ""] + [f"- {m}/{meth}: {w}" for m, meth, w in warn[:20]]
    if res.get("plots"):
        L += ["", "## Plots", ""] + [f"![{p}]({p})" for p in res["plots"]]
    return "\n".join(L) + "\n"


def _cell(v):
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v).replace("|", "/") if v is not None else "—"


# ---------------------------------------------------------------- plots
def plots(res, out_dir, stem):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:  # noqa: BLE001
        return []
    models = list(res["models"])
    methods = [k for k in M.METHODS if any(r["method"] == k for r in res["rows"])]
    by = {(r["model"], r["method"]): r for r in res["rows"]}
    paths = []
    for what, fname, ylabel in (("time", "time", "time / plain forward+backward (log)"),
                                ("mem", "memory", "peak memory of the pass, MiB (log)")):
        fig, ax = plt.subplots(figsize=(11, 6))
        width = 0.8 / max(1, len(methods))
        cmap = plt.get_cmap("tab10")
        ymin = None
        for j, meth in enumerate(methods):
            xs, ys, fails = [], [], []
            for i, m in enumerate(models):
                r, p = by.get((m, meth)), by.get((m, "plain"))
                x = i - 0.4 + width * (j + 0.5)
                if r is None or not _ok(r):
                    if r is not None:
                        fails.append((x, r.get("status", "?")))
                    continue
                if what == "time":
                    y = vs_plain(r, p)
                    if y is None:
                        continue
                else:
                    if r.get("peak_mem_bytes") is None:
                        continue
                    y = max(r["peak_mem_bytes"] / 2**20, 0.01)
                xs.append(x)
                ys.append(y)
            ax.bar(xs, ys, width, label=f"({M.METHODS[meth][1]}) {M.METHODS[meth][0]}", color=cmap(j % 10))
            if ys:
                ymin = min(ys + ([ymin] if ymin else []))
            for x, st in fails:
                ax.text(x, 1.0 if what == "time" else (ymin or 1), {"not available": "n/a", "unsupported": "unsup.",
                        "out of memory": "OOM", "timeout": "time"}.get(st, st[:5]),
                        rotation=90, ha="center", va="bottom", fontsize=7, color=cmap(j % 10))
        ax.set_yscale("log")
        if what == "time":
            ax.axhline(1.0, color="k", lw=0.8)
            tgt = 1.25 if res["device"] == "cpu" else 1.5
            ax.axhline(tgt, color="r", lw=0.8, ls="--", label=f"SPEC target for FusedMAS ({tgt}× plain)")
        ax.set_xticks(range(len(models)))
        ax.set_xticklabels([f"{m}\nbatch {res['models'][m]['batch']}" for m in models])
        ax.set_ylabel(ylabel)
        ax.set_title(f"mas_ext importance pass — {res['device']} ({res['device_name']}), torch {res['torch']}"
                     + (" [quick]" if res.get("quick") else ""), fontsize=10)
        ax.legend(fontsize=7, ncol=3, loc="upper center", bbox_to_anchor=(0.5, -0.13), frameon=False)
        fig.tight_layout()
        path = os.path.join(out_dir, f"{stem}-{fname}.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths
