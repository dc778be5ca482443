"""Continual-learning demo on scikit-learn's bundled 8x8 digits (offline, CPU, minutes).

Reproduces, at toy scale, the two claims of Aljundi et al., "Memory Aware Synapses: Learning
what (not) to forget" (ECCV 2018):

1. MAS forgets less than plain fine-tuning on a task sequence --
   :func:`permuted_digits` (one shared 10-way head, domain-incremental) and
   :func:`split_digits` (5 two-class tasks, one head per task, task-incremental evaluation,
   like the authors' MNIST demo). Methods: ``finetune``, ``g-mas`` (exact per-sample global
   importance, the paper's definition), ``l-mas`` (local / Hebbian) and ``g-mas-batch``
   (``per_sample=False``: |sum over a batch of gradients|, the approximation of the public code).
2. "Learn what (not) to forget" -- :func:`adaptation`: task 1's data is split into subsets A
   and B; importance comes from A only (offline via ``accumulate``, or online via
   ``mas.observe()`` over a stream of unlabeled A inputs); after the later tasks, forgetting on
   A is compared with forgetting on B and with importance from all of task 1 (and from B only).

Run ``python -m mas_ext.demo`` (full, a few minutes on 2 cores) or ``--quick``. Results go to
``benchmarks/results/demo-<name>.json`` and ``.png``.

Every experiment is a small function returning a dict with the accuracy matrix, so tests can
run it at tiny size.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import sys
import time
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
from torch import nn
import torch.nn.functional as F

import mas_ext

METHODS = ("finetune", "g-mas", "l-mas", "g-mas-batch")
# MAS variants -> FusedMAS keyword arguments
MAS_KW = {
    "g-mas": dict(mode="global", per_sample=True),
    "l-mas": dict(mode="local", per_sample=True),
    "g-mas-batch": dict(mode="global", per_sample=False),
}
DEFAULT_LAMS = (0.01, 0.03, 0.1, 0.3)  # λ sweep of the sequence experiments
ADAPT_LAMS = (0.01, 0.03, 0.1)  # λ values of the adaptation test (from the permuted sweep, not tuned on it)
IMPORTANCE_BATCH = 64  # batch size of the importance pass (matters only for g-mas-batch)

# Shared defaults of the sequence experiments (the full demo uses these).
PERMUTED_DEFAULTS = dict(n_tasks=5, epochs=10, hidden=100, lr=1e-3, batch_size=64)
SPLIT_DEFAULTS = dict(epochs=10, hidden=100, lr=1e-3, batch_size=64)


# --------------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------------
_DIGITS = None


def _digits():
    global _DIGITS
    if _DIGITS is None:
        from sklearn.datasets import load_digits

        d = load_digits()
        _DIGITS = (d.data.astype(np.float32), d.target.astype(np.int64))
    return _DIGITS


def load_digits_split(seed: int, test_frac: float = 0.3):
    """Stratified train/test split of the 1797 digits, standardised per pixel with the training
    mean and std (std floored at 1 grey level of 16, so near-constant border pixels are not blown
    up). Returns float32/int64 tensors ``xtr, ytr, xte, yte``."""
    from sklearn.model_selection import train_test_split

    x, y = _digits()
    xtr, xte, ytr, yte = train_test_split(x, y, test_size=test_frac, random_state=seed, stratify=y)
    mu = xtr.mean(0)
    sd = np.maximum(xtr.std(0), 1.0)
    xtr = (xtr - mu) / sd
    xte = (xte - mu) / sd
    return (torch.from_numpy(xtr), torch.from_numpy(ytr), torch.from_numpy(xte), torch.from_numpy(yte))


# --------------------------------------------------------------------------------------------
# model
# --------------------------------------------------------------------------------------------
class MultiHeadMLP(nn.Module):
    """64-hidden-hidden-(n_out per head) MLP. ``forward`` returns the logits of the *active*
    head only (``self.active``), as in the authors' code where the model holds only the
    current task's classifier: the importance is computed from the current head's output, and
    heads of other tasks are neither trained nor given importance during a task."""

    def __init__(self, n_in: int = 64, hidden: int = 100, n_out: int = 10, n_heads: int = 1):
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(n_in, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU())
        self.heads = nn.ModuleList([nn.Linear(hidden, n_out) for _ in range(n_heads)])
        self.active = 0

    def forward(self, x):
        return self.heads[self.active](self.trunk(x))

    def task_parameters(self, t: int):
        return list(self.trunk.parameters()) + list(self.heads[t].parameters())


# --------------------------------------------------------------------------------------------
# training / evaluation
# --------------------------------------------------------------------------------------------
_OPTIM = {"path": os.environ.get("MAS_DEMO_OPTIM", "auto")}  # auto | fused | grad


def _use_fused_optim() -> bool:
    if _OPTIM["path"] != "auto":
        return _OPTIM["path"] == "fused"
    try:
        from mas_ext import optim as _optim
    except ImportError:
        return False
    return hasattr(_optim, "Adam")


def optim_path() -> str:
    """How the penalty enters training: ``"mas_ext.optim.Adam(mas=...)"`` (the fused step; the
    default where mas_ext.optim is available) or ``"torch.optim.Adam + mas.add_penalty_grad_()"``
    (``--optim grad`` or MAS_DEMO_OPTIM=grad). By the contract both give the same updates."""
    return "mas_ext.optim.Adam(mas=...)" if _use_fused_optim() else "torch.optim.Adam + mas.add_penalty_grad_()"


def train_task(model, params, x, y, *, epochs, lr, batch_size, gen, mas=None):
    """Adam on cross-entropy, a fresh optimizer per task; with ``mas`` (and a consolidated
    task) the MAS penalty enters the update exactly as if it were part of the loss."""
    fused = mas is not None and _use_fused_optim()
    if fused:
        opt = mas_ext.optim.Adam(params, lr=lr, mas=mas)
    else:
        opt = torch.optim.Adam(params, lr=lr, foreach=True)
    model.train()
    n = x.shape[0]
    for _ in range(epochs):
        perm = torch.randperm(n, generator=gen)
        for i in range(0, n, batch_size):
            idx = perm[i : i + batch_size]
            opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(x[idx]), y[idx])
            loss.backward()
            if mas is not None and not fused:
                mas.add_penalty_grad_()
            opt.step()


@torch.no_grad()
def accuracy(model, x, y) -> float:
    model.eval()
    if x.shape[0] == 0:
        return float("nan")
    return float((model(x).argmax(1) == y).float().mean())


def accuracy_row(model, tasks) -> list:
    """Test accuracy on every task, each through its own head."""
    row = []
    for task in tasks:
        model.active = task["head"]
        row.append(accuracy(model, task["xte"], task["yte"]))
    return row


def _batches(x, batch_size):
    return [x[i : i + batch_size] for i in range(0, x.shape[0], batch_size)]


def make_mas(model, method, lam):
    if method == "finetune":
        return None
    if method not in MAS_KW:
        raise ValueError(f"unknown method {method!r}; expected one of {METHODS}")
    return mas_ext.FusedMAS(model, lam=lam, **MAS_KW[method])


def sequence_metrics(acc: Sequence[Sequence[float]]) -> Dict[str, float]:
    """``acc[i][j]`` = accuracy on task j after training task i. Average accuracy after the last
    task, and average forgetting over tasks 0..T-2: max_{i in [j, T-2]} acc[i][j] - acc[T-1][j]."""
    a = np.asarray(acc, dtype=np.float64)
    T = a.shape[0]
    avg_acc = float(a[T - 1].mean())
    if T < 2:
        return dict(avg_acc=avg_acc, forgetting=0.0)
    forg = [a[j : T - 1, j].max() - a[T - 1, j] for j in range(T - 1)]
    return dict(avg_acc=avg_acc, forgetting=float(np.mean(forg)))


def _run_sequence(tasks, model, method, lam, seed, *, epochs, lr, batch_size):
    """tasks: list of dicts xtr, ytr, xte, yte, head. Returns the T x T accuracy matrix."""
    gen = torch.Generator().manual_seed(10_000 + seed)
    mas = make_mas(model, method, lam)
    T = len(tasks)
    acc = []
    for t, task in enumerate(tasks):
        model.active = task["head"]
        train_task(model, model.task_parameters(task["head"]), task["xtr"], task["ytr"],
                   epochs=epochs, lr=lr, batch_size=batch_size, gen=gen, mas=mas if t > 0 else None)
        if mas is not None and t < T - 1:
            mas.accumulate(_batches(task["xtr"], IMPORTANCE_BATCH), show_progress=False)
            mas.consolidate()
        acc.append(accuracy_row(model, tasks))
    return acc


# --------------------------------------------------------------------------------------------
# experiment 1: permuted digits
# --------------------------------------------------------------------------------------------
def _permutations(seed, n_tasks, n_in=64):
    rng = np.random.RandomState(1_000 + seed)
    return [np.arange(n_in)] + [rng.permutation(n_in) for _ in range(n_tasks - 1)]


def permuted_tasks(seed: int, n_tasks: int = 5):
    xtr, ytr, xte, yte = load_digits_split(seed)
    tasks = []
    for p in _permutations(seed, n_tasks):
        p = torch.from_numpy(p)
        tasks.append(dict(xtr=xtr[:, p], ytr=ytr, xte=xte[:, p], yte=yte, head=0))
    return tasks


def permuted_digits(method: str, lam: float, seed: int, n_tasks: int = 5, epochs: int = 10,
                    hidden: int = 100, lr: float = 1e-3, batch_size: int = 64) -> dict:
    """Permuted digits: task 0 is the identity, tasks 1.. fixed random pixel permutations; one
    shared 10-way head. Returns dict(acc=T x T matrix, avg_acc, forgetting, ...)."""
    torch.manual_seed(seed)
    tasks = permuted_tasks(seed, n_tasks)
    model = MultiHeadMLP(64, hidden, 10, n_heads=1)
    acc = _run_sequence(tasks, model, method, lam, seed, epochs=epochs, lr=lr, batch_size=batch_size)
    return dict(method=method, lam=lam, seed=seed, acc=acc, **sequence_metrics(acc))


# --------------------------------------------------------------------------------------------
# experiment 2: split digits (task-incremental, one head per task)
# --------------------------------------------------------------------------------------------
SPLIT_PAIRS = ((0, 1), (2, 3), (4, 5), (6, 7), (8, 9))


def split_tasks(seed: int, pairs=SPLIT_PAIRS):
    xtr, ytr, xte, yte = load_digits_split(seed)
    tasks = []
    for h, (a, b) in enumerate(pairs):
        mtr = (ytr == a) | (ytr == b)
        mte = (yte == a) | (yte == b)
        tasks.append(dict(xtr=xtr[mtr], ytr=(ytr[mtr] == b).long(), xte=xte[mte], yte=(yte[mte] == b).long(),
                          head=h, classes=(a, b), yte_digit=yte[mte], ytr_digit=ytr[mtr]))
    return tasks


def split_digits(method: str, lam: float, seed: int, epochs: int = 10, hidden: int = 100,
                 lr: float = 1e-3, batch_size: int = 64) -> dict:
    """Split digits: 5 two-class tasks {0,1},{2,3},..; one 2-way head per task; evaluation with
    the task's own head (task-incremental). Returns dict(acc=5 x 5 matrix, avg_acc, forgetting)."""
    torch.manual_seed(seed)
    tasks = split_tasks(seed)
    model = MultiHeadMLP(64, hidden, 2, n_heads=len(tasks))
    acc = _run_sequence(tasks, model, method, lam, seed, epochs=epochs, lr=lr, batch_size=batch_size)
    return dict(method=method, lam=lam, seed=seed, acc=acc, **sequence_metrics(acc))


# --------------------------------------------------------------------------------------------
# experiment 3: learn what (not) to forget -- importance from a subset A of task 1
# --------------------------------------------------------------------------------------------
ADAPT_SETTINGS = ("permuted-classes", "permuted-clusters", "split-class", "split-clusters")
ADAPT_SOURCES = ("finetune", "all", "A", "B", "A-online")
MIN_FORGETTING = 0.05  # below this fine-tuning forgetting (on both subsets) the A/B test has nothing to measure


def _cluster_masks(x_tr, y_tr, x_te, y_te, seed):
    """Within each class, 2-means on the pixels; A = cluster 0 of every class (so A and B hold the
    same classes in different writing styles). Test points go to their nearest centroid."""
    from sklearn.cluster import KMeans

    a_tr = torch.zeros(len(y_tr), dtype=torch.bool)
    a_te = torch.zeros(len(y_te), dtype=torch.bool)
    for c in torch.unique(y_tr).tolist():
        itr = (y_tr == c).nonzero().flatten()
        ite = (y_te == c).nonzero().flatten()
        km = KMeans(n_clusters=2, n_init=4, random_state=seed).fit(x_tr[itr].numpy())
        a_tr[itr] = torch.from_numpy(km.labels_ == 0)
        if len(ite):
            a_te[ite] = torch.from_numpy(km.predict(x_te[ite].numpy()) == 0)
    return a_tr, a_te


def adaptation_tasks(setting: str, seed: int, n_tasks: int = 5):
    """Task list plus boolean masks (train/test) of subset A within task 0."""
    if setting.startswith("permuted"):
        tasks = permuted_tasks(seed, n_tasks)
        t0 = tasks[0]
        if setting == "permuted-classes":  # A = digits 0-4, B = digits 5-9
            a_tr, a_te = t0["ytr"] < 5, t0["yte"] < 5
        elif setting == "permuted-clusters":
            a_tr, a_te = _cluster_masks(t0["xtr"], t0["ytr"], t0["xte"], t0["yte"], seed)
        else:
            raise ValueError(setting)
        n_heads, n_out = 1, 10
    elif setting.startswith("split"):
        tasks = split_tasks(seed)[:n_tasks]
        t0 = tasks[0]
        if setting == "split-class":  # A = digit 0, B = digit 1 (the two classes of head 0)
            a_tr, a_te = t0["ytr"] == 0, t0["yte"] == 0
        elif setting == "split-clusters":
            a_tr, a_te = _cluster_masks(t0["xtr"], t0["ytr"], t0["xte"], t0["yte"], seed)
        else:
            raise ValueError(setting)
        n_heads, n_out = len(tasks), 2
    else:
        raise ValueError(f"unknown setting {setting!r}; expected one of {ADAPT_SETTINGS}")
    return tasks, a_tr, a_te, n_heads, n_out


def adaptation(setting: str, source: str, seed: int, lam: float = 0.03, n_tasks: int = 5,
               epochs: int = 10, hidden: int = 100, lr: float = 1e-3, batch_size: int = 64,
               stream_batch: int = 8) -> dict:
    """One run of the adaptation test with g-MAS (exact per-sample). ``source`` says where task
    1's importance comes from: ``all`` (all task-1 training inputs), ``A``/``B`` (that subset
    only, via ``accumulate``), ``A-online`` (a shuffled stream of unlabeled A inputs in batches
    of ``stream_batch`` passed through ``with mas.observe(): model(x)``), or ``finetune`` (no
    MAS). Later tasks' importance always comes from their own training inputs. Returns the
    accuracy matrix and accuracy on the A and B test subsets of task 1 after every task."""
    if source not in ADAPT_SOURCES:
        raise ValueError(f"unknown source {source!r}; expected one of {ADAPT_SOURCES}")
    torch.manual_seed(seed)
    tasks, a_tr, a_te, n_heads, n_out = adaptation_tasks(setting, seed, n_tasks)
    model = MultiHeadMLP(64, hidden, n_out, n_heads=n_heads)
    gen = torch.Generator().manual_seed(10_000 + seed)
    mas = None if source == "finetune" else mas_ext.FusedMAS(model, lam=lam, mode="global", per_sample=True)
    t0 = tasks[0]
    xa, xb = t0["xte"][a_te], t0["xte"][~a_te]
    ya, yb = t0["yte"][a_te], t0["yte"][~a_te]
    acc, acc_a, acc_b = [], [], []
    T = len(tasks)
    for t, task in enumerate(tasks):
        model.active = task["head"]
        train_task(model, model.task_parameters(task["head"]), task["xtr"], task["ytr"],
                   epochs=epochs, lr=lr, batch_size=batch_size, gen=gen, mas=mas if t > 0 else None)
        if mas is not None and t < T - 1:
            if t == 0 and source == "A-online":
                xs = task["xtr"][a_tr]
                # own generator: the stream must not shift the training shuffles of later tasks
                order = torch.randperm(xs.shape[0], generator=torch.Generator().manual_seed(20_000 + seed))
                model.eval()
                with mas.observe():
                    for i in range(0, xs.shape[0], stream_batch):
                        model(xs[order[i : i + stream_batch]])  # predictions are served, Ω learns
            else:
                xs = task["xtr"]
                if t == 0 and source == "A":
                    xs = xs[a_tr]
                elif t == 0 and source == "B":
                    xs = xs[~a_tr]
                mas.accumulate(_batches(xs, IMPORTANCE_BATCH), show_progress=False)
            mas.consolidate()
        acc.append(accuracy_row(model, tasks))
        model.active = t0["head"]
        acc_a.append(accuracy(model, xa, ya))
        acc_b.append(accuracy(model, xb, yb))
    return dict(setting=setting, source=source, seed=seed, lam=lam, acc=acc, acc_A=acc_a, acc_B=acc_b,
                forgetting_A=float(acc_a[0] - acc_a[-1]), forgetting_B=float(acc_b[0] - acc_b[-1]),
                n_A_train=int(a_tr.sum()), n_B_train=int((~a_tr).sum()),
                n_A_test=int(a_te.sum()), n_B_test=int((~a_te).sum()), **sequence_metrics(acc))


# --------------------------------------------------------------------------------------------
# grid runner, summaries, plots
# --------------------------------------------------------------------------------------------
def _ms(v):
    v = np.asarray(v, dtype=np.float64)
    return dict(mean=float(v.mean()), std=float(v.std(ddof=1)) if v.size > 1 else 0.0, n=int(v.size))


def _configs(lams):
    return [("finetune", 0.0)] + [(m, l) for m in METHODS[1:] for l in lams]


def run_sequence_grid(name, fn, lams, seeds, progress=True, **kw):
    from tqdm import tqdm

    runs = []
    grid = [(m, l, s) for (m, l) in _configs(lams) for s in seeds]
    for m, l, s in tqdm(grid, desc=name, disable=not progress, leave=True):
        t0 = time.perf_counter()
        r = fn(m, l, s, **kw)
        r["seconds"] = time.perf_counter() - t0
        runs.append(r)
    summary = []
    for m, l in _configs(lams):
        rs = [r for r in runs if r["method"] == m and r["lam"] == l]
        summary.append(dict(method=m, lam=l, avg_acc=_ms([r["avg_acc"] for r in rs]),
                            forgetting=_ms([r["forgetting"] for r in rs]),
                            acc_task1=_ms([r["acc"][-1][0] for r in rs]),
                            acc_mean=np.mean([r["acc"] for r in rs], 0).tolist()))
    return dict(name=name, settings=kw, seeds=list(seeds), lams=list(lams), summary=summary, runs=runs)


def run_adaptation_grid(settings, lams, seeds, progress=True, **kw):
    """All settings x importance sources x λ x seeds (finetune once per setting and seed)."""
    from tqdm import tqdm

    grid = [(st, "finetune", 0.0, s) for st in settings for s in seeds]
    grid += [(st, src, l, s) for st in settings for l in lams for src in ADAPT_SOURCES[1:] for s in seeds]
    runs = []
    for st, src, l, s in tqdm(grid, desc="adaptation", disable=not progress, leave=True):
        runs.append(adaptation(st, src, s, lam=l, **kw))
    summary, verdicts = [], []
    for st in settings:
        for l in lams:
            for src in ADAPT_SOURCES:
                rs = [r for r in runs if r["setting"] == st and r["source"] == src and (src == "finetune" or r["lam"] == l)]
                fa = [r["forgetting_A"] for r in rs]
                fb = [r["forgetting_B"] for r in rs]
                summary.append(dict(setting=st, lam=l, source=src, forgetting_A=_ms(fa), forgetting_B=_ms(fb),
                                    B_minus_A=_ms(np.subtract(fb, fa)),
                                    acc_A_after_task1=_ms([r["acc_A"][0] for r in rs]),
                                    acc_B_after_task1=_ms([r["acc_B"][0] for r in rs]),
                                    avg_acc=_ms([r["avg_acc"] for r in rs])))
            verdicts.append(dict(setting=st, lam=l, **adaptation_verdict(
                [r for r in runs if r["setting"] == st and (r["source"] == "finetune" or r["lam"] == l)], st)))
    return dict(name="adaptation", lams=list(lams), settings=list(settings), sources=list(ADAPT_SOURCES),
                params=kw, seeds=list(seeds), summary=summary, verdicts=verdicts, runs=runs)


def _tstat(d):
    d = np.asarray(d, dtype=np.float64)
    if d.size < 2:
        return 0.0
    sd = d.std(ddof=1)
    if sd == 0:
        return 0.0 if d.mean() == 0 else math.copysign(math.inf, d.mean())
    return float(d.mean() / (sd / math.sqrt(d.size)))


def adaptation_verdict(runs, setting) -> dict:
    """The paper's claim, tested per setting with differences paired over seeds (positive = as claimed):
    (i)   ``gap_A``: with Ω from A, forgetting on B minus forgetting on A;
    (ii)  ``gap_A_minus_gap_all``: that gap minus the same gap with Ω from all of task 1 (controls for
          one subset simply being easier to keep);
    (iii) ``swap_effect``: [F_A(Ω_B) − F_A(Ω_A)] + [F_B(Ω_A) − F_B(Ω_B)] -- each subset is forgotten
          less when the importance comes from it than when it comes from the other subset;
    (on)  ``gap_Aonline_minus_gap_all``: (ii) with Ω_A learned online through ``mas.observe()``.
    Verdict: "holds" when (ii) and (iii) are positive on the mean with paired t >= 2 (n seeds);
    "direction only" when both are positive on the mean but not both with t >= 2; "not testable"
    when fine-tuning itself forgets less than MIN_FORGETTING of either subset (nothing to protect);
    else "not shown"."""
    by = {}
    for r in runs:
        if r["setting"] == setting:
            by.setdefault(r["source"], {})[r["seed"]] = r
    seeds = sorted(by["A"])
    gap = lambda src, s: by[src][s]["forgetting_B"] - by[src][s]["forgetting_A"]  # noqa: E731
    diffs = dict(
        gap_A=[gap("A", s) for s in seeds],
        gap_A_minus_gap_all=[gap("A", s) - gap("all", s) for s in seeds],
        swap_effect=[(by["B"][s]["forgetting_A"] - by["A"][s]["forgetting_A"]) +
                     (by["A"][s]["forgetting_B"] - by["B"][s]["forgetting_B"]) for s in seeds],
        gap_Aonline_minus_gap_all=[gap("A-online", s) - gap("all", s) for s in seeds],
    )
    res = {}
    for k, d in diffs.items():
        res[k] = dict(_ms(d), t=_tstat(d), positive_seeds=int(np.sum(np.asarray(d) > 0)),
                      negative_seeds=int(np.sum(np.asarray(d) < 0)))

    def level(*keys):
        if all(res[k]["mean"] > 0 and res[k]["t"] >= 2 for k in keys):
            return "holds"
        if all(res[k]["mean"] > 0 for k in keys):
            return "direction only"
        return "not shown"

    res["finetune_forgetting_A"] = _ms([by["finetune"][s]["forgetting_A"] for s in seeds])
    res["finetune_forgetting_B"] = _ms([by["finetune"][s]["forgetting_B"] for s in seeds])
    testable = max(res["finetune_forgetting_A"]["mean"], res["finetune_forgetting_B"]["mean"]) >= MIN_FORGETTING
    res["verdict"] = level("gap_A_minus_gap_all", "swap_effect") if testable else "not testable"
    res["verdict_online"] = level("gap_Aonline_minus_gap_all") if testable else "not testable"
    res["holds"] = res["verdict"] == "holds"
    return res


def _fmt(ms, pct=True, digits=1):
    k = 100.0 if pct else 1.0
    return f"{ms['mean'] * k:.{digits}f} ± {ms['std'] * k:.{digits}f}"


def _meta(quick):
    return dict(date=datetime.datetime.now().isoformat(timespec="seconds"), torch=torch.__version__,
                python=platform.python_version(), machine=platform.machine(), processor=platform.processor(),
                threads=torch.get_num_threads(), quick=quick, optimizer_path=optim_path(),
                mas_backend=_backend_str(), importance_batch=IMPORTANCE_BATCH,
                data="sklearn.datasets.load_digits, 8x8, 70/30 stratified split, per-pixel standardised")


def _backend_str():
    try:
        b = mas_ext.backend()
        return b if isinstance(b, str) else repr(b)
    except Exception as e:  # pragma: no cover
        return f"unknown ({type(e).__name__})"


def _plots(perm, split, adapt, out, prefix):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    colors = {"finetune": "tab:red", "g-mas": "tab:blue", "l-mas": "tab:green", "g-mas-batch": "tab:orange"}
    # 1. accuracy on task 1 over the sequence (mean over seeds); per MAS variant the λ of the sweep with
    #    the best final average accuracy
    exps = [e for e in (perm, split) if e is not None]
    if exps:
        fig, axes = plt.subplots(1, len(exps), figsize=(5.5 * len(exps), 4), squeeze=False)
        for ax, e in zip(axes[0], exps):
            for m in METHODS:
                ss = [s for s in e["summary"] if s["method"] == m]
                s = max(ss, key=lambda s: s["avg_acc"]["mean"])  # best λ of the sweep for this method
                a = np.asarray(s["acc_mean"])[:, 0] * 100
                lbl = m if m == "finetune" else f"{m} (λ={s['lam']:g})"
                ax.plot(np.arange(1, len(a) + 1), a, marker="o", ms=3, color=colors[m], label=lbl)
            ax.set_xlabel("after training task")
            ax.set_ylabel("accuracy on task 1 (%)")
            ax.set_title(f"{e['name']} digits (mean of {len(e['seeds'])} seeds)")
            ax.grid(alpha=0.3)
            ax.set_xticks(np.arange(1, len(e["summary"][0]["acc_mean"]) + 1))
            ax.legend(fontsize=7, title="λ: best of the sweep", title_fontsize=7)
        fig.tight_layout()
        f = os.path.join(out, f"{prefix}task1.png")
        fig.savefig(f, dpi=110)
        plt.close(fig)
        files.append(f)
        # 2. bars: avg acc and forgetting per method/λ
        fig, axes = plt.subplots(len(exps), 2, figsize=(11, 3.6 * len(exps)), squeeze=False)
        for row, e in zip(axes, exps):
            labels = [s["method"] if s["method"] == "finetune" else f"{s['method']} λ={s['lam']:g}" for s in e["summary"]]
            cs = [colors[s["method"]] for s in e["summary"]]
            for ax, key, title in ((row[0], "avg_acc", "average accuracy after last task (%)"),
                                   (row[1], "forgetting", "average forgetting (%)")):
                mu = [s[key]["mean"] * 100 for s in e["summary"]]
                sd = [s[key]["std"] * 100 for s in e["summary"]]
                ax.bar(range(len(mu)), mu, yerr=sd, color=cs, capsize=2)
                ax.set_xticks(range(len(mu)))
                ax.set_xticklabels(labels, fontsize=6, rotation=60, ha="right", rotation_mode="anchor")
                ax.set_title(f"{e['name']} digits: {title}", fontsize=9)
                ax.grid(axis="y", alpha=0.3)
        fig.tight_layout()
        f = os.path.join(out, f"{prefix}summary.png")
        fig.savefig(f, dpi=110)
        plt.close(fig)
        files.append(f)
    # 3. adaptation: forgetting on A and on B per importance source; rows = λ, columns = settings
    if adapt is not None:
        sts, lams = adapt["settings"], adapt["lams"]
        fig, axes = plt.subplots(len(lams), len(sts), figsize=(3.9 * len(sts), 3.1 * len(lams)), squeeze=False)
        for r, lam in enumerate(lams):
            for c, st in enumerate(sts):
                ax = axes[r][c]
                ss = [s for s in adapt["summary"] if s["setting"] == st and s["lam"] == lam]
                x = np.arange(len(ss))
                for off, key, col, lbl in ((-0.2, "forgetting_A", "tab:blue", "forgetting on A"),
                                           (0.2, "forgetting_B", "tab:gray", "forgetting on B")):
                    ax.bar(x + off, [s[key]["mean"] * 100 for s in ss], 0.4,
                           yerr=[s[key]["std"] * 100 for s in ss], color=col, capsize=2, label=lbl)
                ax.set_xticks(x)
                ax.set_xticklabels(["finetune" if s["source"] == "finetune" else "Ω: " + s["source"] for s in ss],
                                   fontsize=7, rotation=20)
                v = [v for v in adapt["verdicts"] if v["setting"] == st and v["lam"] == lam][0]
                ax.set_title(f"{st}, λ={lam:g}: claim {v['verdict']}", fontsize=8)
                if c == 0:
                    ax.set_ylabel("task-1 subset forgetting (%)", fontsize=8)
                ax.grid(axis="y", alpha=0.3)
        axes[0][0].legend(fontsize=7)
        fig.tight_layout()
        f = os.path.join(out, f"{prefix}adaptation.png")
        fig.savefig(f, dpi=100)
        plt.close(fig)
        files.append(f)
    return files


def _print_tables(perm, split, adapt):
    for e in (perm, split):
        if e is None:
            continue
        print(f"\n{e['name']} digits ({len(e['seeds'])} seeds), mean ± std, %")
        print(f"{'method':<14}{'λ':>6}  {'avg acc':>14}  {'forgetting':>14}  {'task-1 final':>14}")
        for s in e["summary"]:
            print(f"{s['method']:<14}{s['lam']:>6g}  {_fmt(s['avg_acc']):>14}  {_fmt(s['forgetting']):>14}  "
                  f"{_fmt(s['acc_task1']):>14}")
    if adapt is not None:
        print(f"\nadaptation (g-MAS, {len(adapt['seeds'])} seeds): task-1 forgetting on subsets A / B, %")
        for v in adapt["verdicts"]:
            st, lam = v["setting"], v["lam"]
            print(f"  {st}, λ={lam:g}: claim {v['verdict'].upper()} -- gap_A - gap_all = "
                  f"{_fmt(v['gap_A_minus_gap_all'])} (t={v['gap_A_minus_gap_all']['t']:.1f}), swap effect = "
                  f"{_fmt(v['swap_effect'])} (t={v['swap_effect']['t']:.1f}); online: {v['verdict_online']} "
                  f"({_fmt(v['gap_Aonline_minus_gap_all'])})")
            for s in [s for s in adapt["summary"] if s["setting"] == st and s["lam"] == lam]:
                print(f"    {s['source']:<10} A: {_fmt(s['forgetting_A']):>14}   B: {_fmt(s['forgetting_B']):>14}")


def _write_json(obj, path):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, default=float)
    os.replace(tmp, path)


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m mas_ext.demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="2 seeds, 3 epochs, one λ; writes demo-quick-*")
    p.add_argument("--seeds", type=int, default=None, help="number of seeds (default 5; 2 with --quick)")
    p.add_argument("--lams", type=float, nargs="+", default=None, help=f"λ sweep (default {DEFAULT_LAMS})")
    p.add_argument("--adapt-lams", type=float, nargs="+", default=None,
                   help=f"λ values of the adaptation experiment (default {ADAPT_LAMS})")
    p.add_argument("--adapt-seeds", type=int, default=None, help="seeds of the adaptation test (default 8; 2 with --quick)")
    p.add_argument("--epochs", type=int, default=None, help="epochs per task (default 10; 3 with --quick)")
    p.add_argument("--tasks", type=int, default=None, help="tasks of the permuted/adaptation sequences (default 5)")
    p.add_argument("--only", default="permuted,split,adaptation", help="comma list of experiments")
    p.add_argument("--out", default=os.path.join("benchmarks", "results"))
    p.add_argument("--threads", type=int, default=1, help="torch threads (tiny MLPs: 1 is fastest)")
    p.add_argument("--optim", choices=("auto", "grad", "fused"), default=None,
                   help="penalty path: mas_ext.optim.Adam(mas=...) (fused; auto picks it where available) "
                        "or torch.optim.Adam + mas.add_penalty_grad_() (grad)")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)

    torch.set_num_threads(a.threads)
    if a.optim:
        _OPTIM["path"] = a.optim
    n_seeds = a.seeds or (2 if a.quick else 5)
    seeds = list(range(n_seeds))
    lams = tuple(a.lams) if a.lams else ((0.03,) if a.quick else DEFAULT_LAMS)
    adapt_lams = tuple(a.adapt_lams) if a.adapt_lams else ((0.03,) if a.quick else ADAPT_LAMS)
    prefix = "demo-quick-" if a.quick else "demo-"
    only = set(a.only.split(","))
    os.makedirs(a.out, exist_ok=True)
    pkw = dict(PERMUTED_DEFAULTS)
    skw = dict(SPLIT_DEFAULTS)
    akw = dict(epochs=PERMUTED_DEFAULTS["epochs"], n_tasks=PERMUTED_DEFAULTS["n_tasks"])
    epochs = a.epochs or (3 if a.quick else None)
    if epochs:
        pkw["epochs"] = skw["epochs"] = akw["epochs"] = epochs
    if a.tasks:
        pkw["n_tasks"] = akw["n_tasks"] = a.tasks
    adapt_seeds = list(range(a.adapt_seeds or (2 if a.quick else 8)))
    meta = _meta(a.quick)
    prog = not a.no_progress
    t_start = time.perf_counter()
    perm = split = adapt = None
    if "permuted" in only:
        perm = run_sequence_grid("permuted", permuted_digits, lams, seeds, progress=prog, **pkw)
        perm["meta"] = meta
        _write_json(perm, os.path.join(a.out, f"{prefix}permuted.json"))
    if "split" in only:
        split = run_sequence_grid("split", split_digits, lams, seeds, progress=prog, **skw)
        split["meta"] = meta
        _write_json(split, os.path.join(a.out, f"{prefix}split.json"))
    if "adaptation" in only:
        adapt = run_adaptation_grid(ADAPT_SETTINGS, adapt_lams, adapt_seeds, progress=prog, **akw)
        adapt["meta"] = meta
        _write_json(adapt, os.path.join(a.out, f"{prefix}adaptation.json"))
    _print_tables(perm, split, adapt)
    files = _plots(perm, split, adapt, a.out, prefix)
    print(f"\nwrote {a.out}/{prefix}*.json and {', '.join(os.path.basename(f) for f in files)} "
          f"in {time.perf_counter() - t_start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
