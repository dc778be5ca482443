"""SPEC §4: under torch.distributed each rank accumulates its own shard and consolidate() all-reduces
the Ω sums and sample counts, so Ω equals the single-process Ω on the union of the data; DDP-wrapped
models work as they are (names without ``module.``).

One spawn of 2 gloo ranks (127.0.0.1, a free port) runs every scenario; each rank writes its results to
a file and the test process compares them with single-process runs of the same class on all the data.
"""
import datetime
import os
import socket
import traceback
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn

import mas_ext

WORLD = 2
CLASSES = {"ReferenceMAS": mas_ext.ReferenceMAS, "FusedMAS": mas_ext.FusedMAS}
MODES = ("global", "local")
DATA_SEED = 1234
MODEL_SEED = 99


# ----------------------------------------------------------------------------- shared by ranks and the test
def make_model():
    """Conv + LayerNorm + Linear: the fused conv/linear kernels, the norm rule and a sequence Linear."""
    torch.manual_seed(MODEL_SEED)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(4, 4, 3, stride=2),
        nn.Flatten(2),  # (n, 4, 9): positions for the next Linear
        _Transpose(),  # (n, 9, 4)
        nn.LayerNorm(4),
        nn.Linear(4, 6),
        nn.Tanh(),
        nn.Flatten(1),
        nn.Linear(54, 5),
    )


class _Transpose(nn.Module):
    def forward(self, x):
        return x.transpose(1, 2)


def make_data(sizes, seed):
    """Batches of the given sizes, fresh random inputs (the same on every rank for one seed)."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, 3, 7, 7, generator=g) for n in sizes]


def perturb_(model, seed):
    """A deterministic 'training step' between tasks (the same on every rank, as DDP keeps them)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))


EQUAL = [6] * 6  # 6 batches: rank r takes batches r::2
UNEQUAL = [5, 3, 7, 2, 4, 6, 1, 8]  # rank 0 takes the first 5 batches, rank 1 the last 3
TASK2 = [4, 7, 5, 3]


def shard_equal(batches, rank):
    return batches[rank::WORLD]


def shard_unequal(batches, rank):
    return batches[:5] if rank == 0 else batches[5:]


def snapshot(mas):
    return {
        "importance": {k: v.clone() for k, v in mas.importance.items()},
        "star": {k: v.clone() for k, v in mas.star.items()},
        "num_samples": mas.num_samples,
        "num_tasks": mas.num_tasks,
    }


# ----------------------------------------------------------------------------- the ranks
def _scenarios(rank):
    out = {}
    for cname, cls in CLASSES.items():
        for mode in MODES:
            key = f"{cname}-{mode}"
            # 1. equal halves, one task
            mas = cls(make_model(), mode=mode, show_progress=False)
            mas.accumulate(shard_equal(make_data(EQUAL, DATA_SEED), rank))
            out[f"{key}/local_count"] = mas.num_samples
            out[f"{key}/halves"] = snapshot(mas.consolidate())

            # 2. two tasks with merge="ema" (the model changes between tasks identically on every rank)
            model = make_model()
            mas = cls(model, mode=mode, show_progress=False)
            mas.accumulate(shard_equal(make_data(EQUAL, DATA_SEED), rank))
            mas.consolidate(merge="ema", alpha=0.3)
            perturb_(model, 7)
            mas.accumulate(shard_equal(make_data(TASK2, DATA_SEED + 1), rank))
            out[f"{key}/ema2"] = snapshot(mas.consolidate(merge="ema", alpha=0.3))

        # 3. unequal numbers of batches (and batch sizes) per rank
        mas = cls(make_model(), show_progress=False)
        mas.accumulate(shard_unequal(make_data(UNEQUAL, DATA_SEED + 2), rank))
        out[f"{cname}/unequal"] = snapshot(mas.consolidate())

        # 4. rank 1 has no data at all: it calls consolidate() without accumulate()
        mas = cls(make_model(), show_progress=False)
        if rank == 0:
            mas.accumulate(make_data(EQUAL, DATA_SEED))
        out[f"{cname}/zero_rank"] = snapshot(mas.consolidate())
        # ... and a second task in which rank 0 has no data while rank 1 has all of it
        if rank == 1:
            mas.accumulate(make_data(TASK2, DATA_SEED + 1))
        out[f"{cname}/zero_rank_task2"] = snapshot(mas.consolidate())

        # 5. no rank has data: every rank gets the same ValueError (and no hang)
        mas = cls(make_model(), show_progress=False)
        try:
            mas.consolidate()
            out[f"{cname}/all_empty"] = "no error"
        except ValueError as e:
            out[f"{cname}/all_empty"] = f"ValueError: {e}"
        out[f"{cname}/all_empty_tasks"] = mas.num_tasks

    # 6. a DDP-wrapped model, trained a few steps with DDP, then importance on the shards
    model = make_model()
    ddp = nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.05)
    train = make_data([8] * 4, DATA_SEED + 3)
    for x in shard_equal(train, rank):
        opt.zero_grad()
        ddp(x).pow(2).mean().backward()
        opt.step()
    out["ddp_params"] = {k: v.detach().clone() for k, v in model.state_dict().items()}
    for cname, cls in CLASSES.items():
        mas = cls(ddp, lam=0.5, show_progress=False)
        out[f"{cname}/ddp_names"] = sorted(mas.params)
        grads_before = {n: p.grad.clone() for n, p in model.named_parameters()}
        mas.accumulate(shard_equal(make_data(EQUAL, DATA_SEED), rank))
        out[f"{cname}/ddp_grads_untouched"] = all(torch.equal(grads_before[n], p.grad)
                                                  for n, p in model.named_parameters())
        out[f"{cname}/ddp"] = snapshot(mas.consolidate())
        # the penalty through the wrapper's parameters, after a shift of every parameter by +0.01
        with torch.no_grad():
            for p in ddp.parameters():
                p.add_(0.01)
        out[f"{cname}/ddp_penalty"] = mas.penalty().item()
        with torch.no_grad():
            model.load_state_dict(out["ddp_params"])
    out["ddp_training"] = ddp.training
    # deployment under DDP: observe() learns from the wrapper's own inference calls on each rank's shard
    mas = mas_ext.FusedMAS(ddp, show_progress=False)
    with mas.observe(), torch.no_grad():
        for x in shard_equal(make_data(EQUAL, DATA_SEED), rank):
            ddp(x)
    out["ddp_observe_local_count"] = mas.num_samples
    out["ddp_observe"] = snapshot(mas.consolidate())
    return out


def _worker(rank, port, outdir):
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    try:
        # a short timeout: a rank that fails before a collective must not leave the other hanging
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
                                timeout=datetime.timedelta(seconds=60))
        try:
            result = _scenarios(rank)
        finally:
            dist.destroy_process_group()
    except BaseException:
        result = {"error": traceback.format_exc()}
    torch.save(result, os.path.join(outdir, f"rank{rank}.pt"))


def _free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    if not dist.is_available():
        pytest.skip("torch.distributed is not available in this build")
    outdir = str(tmp_path_factory.mktemp("dist"))
    mp.spawn(_worker, args=(_free_port(), outdir), nprocs=WORLD, join=True)
    results = [torch.load(os.path.join(outdir, f"rank{r}.pt"), weights_only=False) for r in range(WORLD)]
    for r, res in enumerate(results):
        assert "error" not in res, f"rank {r} failed:\n{res['error']}"
    return results


# ----------------------------------------------------------------------------- single-process references
def single(cls, batches, mode="global", model=None, **kw):
    mas = cls(model if model is not None else make_model(), mode=mode, show_progress=False, **kw)
    mas.accumulate(batches)
    return mas


def assert_close(got, want, what):
    assert set(got) == set(want), f"{what}: names {sorted(got)} != {sorted(want)}"
    for k in want:
        g, w = got[k].double(), want[k].double()
        assert g.shape == w.shape, f"{what}.{k}: shape {g.shape} != {w.shape}"
        assert torch.isfinite(g).all(), f"{what}.{k}: not finite"
        scale = w.abs().max().item()
        err = (g - w).abs().max().item()
        assert err <= 1e-5 * scale + 1e-12, f"{what}.{k}: max abs error {err:.3g} vs max |Ω| {scale:.3g}"


def assert_same_on_ranks(results, key):
    ref = results[0][key]
    for r in range(1, WORLD):
        for section in ("importance", "star"):
            for k, v in ref[section].items():
                assert torch.equal(results[r][key][section][k], v), f"{key}: rank {r} {section}.{k} differs"


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("cname", list(CLASSES))
def test_halves_equal_single_process(ranks, cname, mode):
    cls = CLASSES[cname]
    key = f"{cname}-{mode}"
    data = make_data(EQUAL, DATA_SEED)
    want = single(cls, data, mode).consolidate()
    # each rank saw its half only
    assert [res[f"{key}/local_count"] for res in ranks] == [sum(EQUAL[r::WORLD]) for r in range(WORLD)]
    assert_same_on_ranks(ranks, f"{key}/halves")
    for r, res in enumerate(ranks):
        got = res[f"{key}/halves"]
        assert_close(got["importance"], want.importance, f"{key} rank {r} Ω")
        assert_close(got["star"], want.star, f"{key} rank {r} θ*")
        assert got["num_samples"] == 0 and got["num_tasks"] == 1
    # the union really differs from either half alone (the all-reduce matters)
    half = single(cls, shard_equal(data, 0), mode).consolidate().importance
    assert any((half[k] - want.importance[k]).abs().max() > 1e-3 * want.importance[k].abs().max() for k in half)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("cname", list(CLASSES))
def test_two_tasks_ema_equal_single_process(ranks, cname, mode):
    cls = CLASSES[cname]
    model = make_model()
    mas = single(cls, make_data(EQUAL, DATA_SEED), mode, model=model)
    first = {k: v.clone() for k, v in mas.consolidate(merge="ema", alpha=0.3).importance.items()}
    perturb_(model, 7)
    mas.accumulate(make_data(TASK2, DATA_SEED + 1))
    omega_t = {k: v.clone() for k, v in mas.task_importance.items()}
    mas.consolidate(merge="ema", alpha=0.3)
    # the ema itself, as SPEC §1 writes it
    for k in first:
        torch.testing.assert_close(mas.importance[k], 0.3 * first[k] + 0.7 * omega_t[k])
    key = f"{cname}-{mode}/ema2"
    assert_same_on_ranks(ranks, key)
    for r, res in enumerate(ranks):
        assert res[key]["num_tasks"] == 2
        assert_close(res[key]["importance"], mas.importance, f"{key} rank {r} Ω")
        assert_close(res[key]["star"], mas.star, f"{key} rank {r} θ*")


@pytest.mark.parametrize("cname", list(CLASSES))
def test_unequal_batches_per_rank(ranks, cname):
    want = single(CLASSES[cname], make_data(UNEQUAL, DATA_SEED + 2)).consolidate()
    assert_same_on_ranks(ranks, f"{cname}/unequal")
    for r, res in enumerate(ranks):
        assert_close(res[f"{cname}/unequal"]["importance"], want.importance, f"{cname} unequal rank {r}")


@pytest.mark.parametrize("cname", list(CLASSES))
def test_rank_with_zero_samples(ranks, cname):
    cls = CLASSES[cname]
    model = make_model()
    want = single(cls, make_data(EQUAL, DATA_SEED), model=model)
    want.consolidate()
    task1 = {k: v.clone() for k, v in want.importance.items()}
    want.accumulate(make_data(TASK2, DATA_SEED + 1))
    want.consolidate()
    for r, res in enumerate(ranks):
        assert_close(res[f"{cname}/zero_rank"]["importance"], task1, f"{cname} zero-sample rank {r}, task 1")
        assert_close(res[f"{cname}/zero_rank_task2"]["importance"], want.importance,
                     f"{cname} zero-sample rank {r}, task 2")
        assert res[f"{cname}/zero_rank_task2"]["num_tasks"] == 2


@pytest.mark.parametrize("cname", list(CLASSES))
def test_no_rank_has_samples_raises_everywhere(ranks, cname):
    for r, res in enumerate(ranks):
        msg = res[f"{cname}/all_empty"]
        assert msg.startswith("ValueError") and "no samples" in msg, f"rank {r}: {msg}"
        assert res[f"{cname}/all_empty_tasks"] == 0


@pytest.mark.parametrize("cname", list(CLASSES))
def test_ddp_wrapped_model(ranks, cname):
    # DDP kept the parameters in sync; the importance equals a single process on the final parameters
    params = ranks[0]["ddp_params"]
    for k, v in ranks[1]["ddp_params"].items():
        assert torch.equal(v, params[k]), f"DDP parameters differ across ranks at {k}"
    model = make_model()
    model.load_state_dict(params)
    want = single(CLASSES[cname], make_data(EQUAL, DATA_SEED), model=model, lam=0.5).consolidate()
    names = sorted(n for n, _ in make_model().named_parameters())
    for r, res in enumerate(ranks):
        assert res[f"{cname}/ddp_names"] == names
        assert not any(n.startswith("module.") for n in res[f"{cname}/ddp"]["importance"])
        assert res[f"{cname}/ddp_grads_untouched"], "accumulate() changed the DDP model's .grad"
        assert res["ddp_training"], "accumulate() did not restore the wrapper's training mode"
        assert_close(res[f"{cname}/ddp"]["importance"], want.importance, f"{cname} DDP rank {r} Ω")
        assert_close(res[f"{cname}/ddp"]["star"], want.star, f"{cname} DDP rank {r} θ*")
    # the penalty on the wrapper's parameters after a shift of +0.01: λ Σ Ω 0.01²
    expect = 0.5 * sum(om.double().sum().item() for om in want.importance.values()) * 1e-4
    for r, res in enumerate(ranks):
        assert res[f"{cname}/ddp_penalty"] == pytest.approx(expect, rel=1e-4)


def test_ddp_observe(ranks):
    model = make_model()
    model.load_state_dict(ranks[0]["ddp_params"])
    want = single(mas_ext.FusedMAS, make_data(EQUAL, DATA_SEED), model=model).consolidate()
    for r, res in enumerate(ranks):
        assert res["ddp_observe_local_count"] == sum(EQUAL[r::WORLD])
        assert_close(res["ddp_observe"]["importance"], want.importance, f"observe under DDP, rank {r}")
