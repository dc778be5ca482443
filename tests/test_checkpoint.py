"""Checkpoints: strict state_dict/load_state_dict (config, Ω, θ*, task sums and counts), the round trip
across ReferenceMAS and FusedMAS, refusals that list every problem and load nothing, and the atomic
``save`` (a save killed mid-write leaves the previous file whole)."""
import io
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch
import torch.nn as nn

import mas_ext

CLASSES = [mas_ext.ReferenceMAS, mas_ext.FusedMAS]
IDS = ["Reference", "Fused"]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_model(out=2, extra=False, seed=0):
    torch.manual_seed(seed)
    layers = [nn.Conv1d(2, 3, 3), nn.Tanh(), nn.Flatten(), nn.Linear(18, 4), nn.LayerNorm(4), nn.Linear(4, out)]
    if extra:
        layers += [nn.Tanh(), nn.Linear(out, out)]
    return nn.Sequential(*layers)


def batches(sizes, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, 2, 8, generator=g) for n in sizes]


def perturb_(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))


def busy(cls, model=None, **kw):
    """A MAS in the middle of its second task: Ω, θ*, a running task sum and count, non-default config."""
    model = model if model is not None else make_model()
    kw = {"lam": 0.7, "mode": "global", "per_sample": True, "merge": "ema", "alpha": 0.25, **kw}
    mas = cls(model, show_progress=False, **kw)
    mas.accumulate(batches([5, 3], 1)).consolidate()
    perturb_(model, 2)
    mas.accumulate(batches([4], 3))
    return mas


def snapshot(mas):
    """Everything a load could change, copied."""
    sd = mas.state_dict()
    return {**sd, "attrs": (mas.lam, mas.mode, mas.per_sample, mas.merge, mas.alpha, mas.num_samples,
                            mas.num_tasks)}


def assert_same_state(a, b):
    assert a["config"] == b["config"]
    assert a["attrs"] == b["attrs"]
    assert (a["num_samples"], a["num_tasks"]) == (b["num_samples"], b["num_tasks"])
    for section in ("importance", "star", "task_importance"):
        assert set(a[section]) == set(b[section]), section
        for k in a[section]:
            assert torch.equal(a[section][k], b[section][k]), f"{section}.{k} changed"


# ----------------------------------------------------------------------------- contents and round trip
@pytest.mark.parametrize("mode", ["global", "local"])
@pytest.mark.parametrize("cls", CLASSES, ids=IDS)
def test_state_dict_contents(cls, mode):
    mas = busy(cls, mode=mode, per_sample=False)
    sd = mas.state_dict()
    assert set(sd) == {"config", "importance", "star", "task_importance", "num_samples", "num_tasks"}
    assert sd["config"] == {"lam": 0.7, "mode": mode, "per_sample": False, "merge": "ema", "alpha": 0.25}
    names = {n for n, _ in make_model().named_parameters()}
    assert set(sd["importance"]) == set(sd["star"]) == set(sd["task_importance"]) == names
    assert sd["num_samples"] == 4 and sd["num_tasks"] == 1
    for n, p in mas.params.items():
        assert sd["importance"][n].dtype == torch.float32
        assert torch.equal(sd["importance"][n], mas.importance[n])
        assert torch.equal(sd["star"][n], mas.star[n])
        assert not torch.equal(sd["star"][n], p.detach())  # the model moved on since θ*
        assert torch.equal(sd["task_importance"][n], mas.task_importance[n])
        assert sd["task_importance"][n].abs().sum() > 0
    # a copy: changing it changes nothing in the MAS
    before = {n: t.clone() for n, t in mas.importance.items()}
    for t in list(sd["importance"].values()) + list(sd["star"].values()) + list(sd["task_importance"].values()):
        t.fill_(123.0)
    for n in before:
        assert torch.equal(mas.importance[n], before[n])
    assert not torch.equal(mas.star[n], torch.full_like(mas.star[n], 123.0))


@pytest.mark.parametrize("dst_cls", CLASSES, ids=IDS)
@pytest.mark.parametrize("src_cls", CLASSES, ids=IDS)
def test_round_trip_across_classes(src_cls, dst_cls, tmp_path):
    src = busy(src_cls)
    model = make_model()
    model.load_state_dict(src.model.state_dict())
    dst = dst_cls(model, show_progress=False)  # default config: the checkpoint's replaces it
    path = tmp_path / "mas.pt"
    src.save(path)
    dst.load(path)
    assert (dst.lam, dst.mode, dst.per_sample, dst.merge, dst.alpha) == (0.7, "global", True, "ema", 0.25)
    assert (dst.num_samples, dst.num_tasks) == (4, 1)
    for n in src.params:
        assert torch.equal(dst.importance[n], src.importance[n])
        assert torch.equal(dst.star[n], src.star[n])
        assert torch.equal(dst.task_importance[n], src.task_importance[n])
    assert dst.penalty().item() == pytest.approx(src.penalty().item(), rel=1e-6)
    assert dst.penalty().item() > 0
    # carrying on from the checkpoint gives what carrying on without it gives (config merge="ema", α=0.25)
    more = batches([6, 2], 4)
    src.accumulate(more).consolidate()
    dst.accumulate(more).consolidate()
    assert dst.num_tasks == src.num_tasks == 2
    for n in src.params:
        torch.testing.assert_close(dst.importance[n], src.importance[n], rtol=1e-5, atol=1e-7)
    # the same as one uninterrupted run
    ref = src_cls(make_model(), lam=0.7, merge="ema", alpha=0.25, show_progress=False)
    ref.accumulate(batches([5, 3], 1)).consolidate()
    perturb_(ref.model, 2)
    ref.accumulate(batches([4], 3) + more).consolidate()
    for n in src.params:
        torch.testing.assert_close(dst.importance[n], ref.importance[n], rtol=1e-5, atol=1e-7)


def test_file_holds_only_plain_data(tmp_path):
    """``load`` uses weights_only=True: the file must contain tensors, numbers and strings only."""
    path = tmp_path / "mas.pt"
    busy(mas_ext.FusedMAS).save(path)
    sd = torch.load(path, weights_only=True)
    assert sd["config"]["mode"] == "global" and isinstance(sd["num_samples"], int)


def test_loaded_tensors_are_copies():
    src = busy(mas_ext.ReferenceMAS)
    sd = src.state_dict()
    dst = mas_ext.FusedMAS(src.model, show_progress=False)
    dst.load_state_dict(sd)
    want = {n: t.clone() for n, t in dst.importance.items()}
    for t in sd["importance"].values():
        t.zero_()
    for n in want:
        assert torch.equal(dst.importance[n], want[n])


def test_load_before_any_task():
    """A fresh MAS (no Ω yet) round-trips too: empty importance and star, zero task sums."""
    src = mas_ext.ReferenceMAS(make_model(), show_progress=False)
    dst = busy(mas_ext.FusedMAS)
    dst.load_state_dict(src.state_dict())
    assert dst.importance == {} and dst.star == {} and dst.num_samples == 0 and dst.num_tasks == 0
    assert dst.penalty().item() == 0.0


# ----------------------------------------------------------------------------- refusals
def _refused(dst, sd, *needles):
    before = snapshot(dst)
    with pytest.raises(ValueError) as err:
        dst.load_state_dict(sd)
    msg = str(err.value)
    for needle in needles:
        assert needle in msg, f"{needle!r} not in the error: {msg}"
    assert_same_state(snapshot(dst), before)  # nothing half-loaded
    return msg


@pytest.mark.parametrize("cls", CLASSES, ids=IDS)
def test_missing_unexpected_and_wrong_shapes_all_listed(cls):
    sd = busy(mas_ext.ReferenceMAS).state_dict()
    # the destination: last Linear has 3 outputs (wrong shapes) and two more layers (missing names)
    dst = busy(cls, model=make_model(out=3, extra=True), lam=2.0, merge="sum")
    for section in ("importance", "star", "task_importance"):
        sd[section]["bogus.weight"] = torch.zeros(3)  # unexpected name
    msg = _refused(dst, sd, "missing", "unexpected", "bogus.weight", "7.weight", "7.bias", "5.weight", "5.bias",
                   "(2, 4)", "(3, 4)")
    for section in ("importance", "star", "task_importance"):
        assert section in msg


@pytest.mark.parametrize("cls", CLASSES, ids=IDS)
def test_a_model_that_gained_a_head_takes_the_state_with_strict_false(cls):
    """The paper's task-incremental setting: a head added for task 2 after the MAS was built was untracked without a
    word (no Ω, no penalty), and a new MAS for the grown model refused the old state (its names missing). accumulate()
    warns, naming it; load_state_dict(strict=False) carries Ω, θ* and Ω_t over by name, and the new head starts with
    none. Shapes are still checked."""
    model = make_model()
    old = busy(cls, model)
    model.append(nn.Linear(2, 2))
    with pytest.warns(UserWarning, match=r"2 trainable parameters are not tracked \(6.weight, 6.bias\).*strict=False"):
        old.accumulate(batches([2], 4))
    sd = old.state_dict()
    new = cls(model, show_progress=False)
    msg = _refused(new, sd, "missing", "6.weight", "strict=False")
    keys = new.load_state_dict(sd, strict=False)
    assert keys.missing_keys == ["6.bias", "6.weight"] and keys.unexpected_keys == []
    for section in ("importance", "star", "task_importance"):
        for g, t in sd[section].items():
            torch.testing.assert_close(new.state_dict()[section][g], t)
    assert "6.weight" not in new.importance and not new.task_importance["6.weight"].any()
    assert (new.lam, new.merge, new.alpha, new.num_samples, new.num_tasks) == (
        old.lam, old.merge, old.alpha, old.num_samples, old.num_tasks)
    torch.testing.assert_close(new.penalty(), old.penalty())
    # and back: the grown state into a MAS of the model without the head (an unexpected name)
    smaller = cls(make_model(), show_progress=False)
    keys = smaller.load_state_dict(new.state_dict(), strict=False)
    assert keys.missing_keys == [] and keys.unexpected_keys == ["6.bias", "6.weight"]
    assert "strict" not in _refused(cls(make_model(out=3), show_progress=False), sd, "(2, 4)")  # shapes: no hint


@pytest.mark.parametrize("cls", CLASSES, ids=IDS)
def test_nonfinite_importance_or_star_refused(cls):
    src = busy(mas_ext.FusedMAS)
    for section, name, bad in [("importance", "3.weight", float("nan")), ("importance", "0.bias", float("inf")),
                               ("star", "5.weight", float("-inf")), ("star", "4.bias", float("nan")),
                               ("task_importance", "0.weight", float("nan"))]:
        sd = src.state_dict()
        sd[section][name].view(-1)[1] = bad
        dst = busy(cls, model=make_model(seed=5), lam=3.0)
        _refused(dst, sd, f"{section}.{name}", "non-finite")


@pytest.mark.parametrize("cls", CLASSES, ids=IDS)
def test_malformed_state_dicts_refused_whole(cls):
    src = busy(mas_ext.ReferenceMAS)
    dst = busy(cls, model=make_model(seed=5), lam=3.0, merge="sum", alpha=0.5)

    def variant(edit):
        sd = src.state_dict()
        edit(sd)
        return sd

    _refused(dst, variant(lambda sd: sd.pop("num_tasks")), "num_tasks")
    _refused(dst, variant(lambda sd: sd.update(extra=1)), "extra")
    _refused(dst, "not a dict", "state_dict")
    # config: every key checked before anything is assigned
    _refused(dst, variant(lambda sd: sd["config"].pop("merge")), "merge")
    _refused(dst, variant(lambda sd: sd["config"].update(mode="hebbian")), "hebbian")
    _refused(dst, variant(lambda sd: sd["config"].update(merge="max")), "max")
    _refused(dst, variant(lambda sd: sd["config"].update(alpha=1.5)), "alpha")
    _refused(dst, variant(lambda sd: sd["config"].update(lam="big")), "lam")
    _refused(dst, variant(lambda sd: sd["config"].update(lam=float("nan"))), "lam")
    # counts
    _refused(dst, variant(lambda sd: sd.update(num_samples=-3)), "num_samples")
    _refused(dst, variant(lambda sd: sd.update(num_tasks=1.5)), "num_tasks")
    # entries that are not tensors; Ω without θ*
    _refused(dst, variant(lambda sd: sd["importance"].update({"3.weight": [[1.0]]})), "importance.3.weight")
    _refused(dst, variant(lambda sd: sd["star"].pop("3.bias")), "star", "3.bias")


# ----------------------------------------------------------------------------- atomic save
def _fill(mas, value):
    """A recognisable state: every Ω entry equal to ``value``."""
    sd = mas.state_dict()
    for t in list(sd["importance"].values()) + list(sd["star"].values()):
        t.fill_(value)
    sd["num_tasks"] = int(value)
    mas.load_state_dict(sd)
    return mas


def _assert_file_is(path, mas_cls, value):
    mas = mas_cls(make_model(), show_progress=False).load(path)
    assert mas.num_tasks == int(value)
    for t in mas.importance.values():
        assert torch.all(t == value)


def test_failed_save_keeps_previous_file_and_cleans_up(tmp_path, monkeypatch):
    path = tmp_path / "mas.pt"
    mas = busy(mas_ext.ReferenceMAS)
    _fill(mas, 1.0).save(path)
    real_save = torch.save

    def half_then_fail(obj, f, *a, **k):
        buf = io.BytesIO()
        real_save(obj, buf, *a, **k)
        f.write(buf.getvalue()[: len(buf.getvalue()) // 2])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", half_then_fail)
    with pytest.raises(OSError, match="No space left"):
        _fill(mas, 2.0).save(path)
    monkeypatch.undo()
    _assert_file_is(path, mas_ext.FusedMAS, 1.0)
    assert sorted(os.listdir(tmp_path)) == ["mas.pt"], "the temporary file was left behind"


_KILLED_SAVE = textwrap.dedent("""
    import io, os, sys
    import torch
    sys.path.insert(0, {tests!r})
    import mas_ext
    from test_checkpoint import busy, _fill

    mas = _fill(busy(mas_ext.FusedMAS), 2.0)
    real_save = torch.save

    def die_mid_write(obj, f, *a, **k):
        buf = io.BytesIO()
        real_save(obj, buf, *a, **k)
        data = buf.getvalue()
        f.write(data[: len(data) // 2])
        f.flush()
        os._exit(17)  # the process dies here: no finally, no cleanup, no rename

    torch.save = die_mid_write
    mas.save({path!r})
    sys.exit(0)  # not reached
""")


def test_save_killed_mid_write_keeps_previous_file(tmp_path):
    path = str(tmp_path / "mas.pt")
    _fill(busy(mas_ext.ReferenceMAS), 1.0).save(path)
    size = os.path.getsize(path)
    script = _KILLED_SAVE.format(tests=os.path.join(ROOT, "tests"), path=path)
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 17, proc.stderr
    # the dead process left its half-written temporary file beside the checkpoint, never at its path
    leftovers = [f for f in os.listdir(tmp_path) if f != "mas.pt"]
    assert len(leftovers) == 1 and leftovers[0].startswith("mas.pt.tmp"), leftovers
    assert 0 < os.path.getsize(tmp_path / leftovers[0]) < size
    assert os.path.getsize(path) == size
    _assert_file_is(path, mas_ext.ReferenceMAS, 1.0)
    _assert_file_is(path, mas_ext.FusedMAS, 1.0)


_REPEATED_SAVES = textwrap.dedent("""
    import sys
    import torch, torch.nn as nn
    import mas_ext

    torch.manual_seed(0)
    mas = mas_ext.ReferenceMAS(nn.Linear(1024, 1024), show_progress=False)  # 3 x 4 MiB per checkpoint
    mas.accumulate([torch.randn(2, 1024)]).consolidate()
    sd = mas.state_dict()
    for i in range(1, 10**6):
        for t in sd["importance"].values():
            t.fill_(float(i))
        sd["num_tasks"] = i
        mas.load_state_dict(sd)
        mas.save({path!r})
        print(i, flush=True)
""")


def test_save_sigkilled_at_random_times_leaves_a_whole_file(tmp_path):
    path = str(tmp_path / "big.pt")
    script = _REPEATED_SAVES.format(path=path)
    for delay in (0.05, 0.13, 0.31):
        proc = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, stdout=subprocess.PIPE, text=True)
        try:
            assert proc.stdout.readline().strip() == "1"  # one whole save done
            time.sleep(delay)
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=60)
            proc.stdout.close()
        mas = mas_ext.FusedMAS(nn.Linear(1024, 1024), show_progress=False).load(path)
        i = mas.num_tasks
        assert i >= 1
        for t in mas.importance.values():
            assert torch.all(t == float(i)), "the checkpoint mixes two saves"
        for f in os.listdir(tmp_path):
            if f != "big.pt":
                os.remove(tmp_path / f)


# ----------------------------------------------------------------------------- safetensors files
def test_safetensors_round_trip_and_plain_contents(tmp_path):
    safetensors_torch = pytest.importorskip("safetensors.torch")
    src = busy(mas_ext.FusedMAS)
    path = tmp_path / "omega.safetensors"
    src.save(path)
    tensors = safetensors_torch.load_file(str(path))  # readable by any safetensors reader, no pickle
    assert set(tensors) == {f"{s}/{n}" for s in ("importance", "star", "task_importance") for n in src.params}
    model = make_model()
    model.load_state_dict(src.model.state_dict())
    dst = mas_ext.ReferenceMAS(model, show_progress=False).load(path)
    assert_same_state(snapshot(dst), snapshot(src))


def test_safetensors_truncated_or_foreign_file_refused_whole(tmp_path):
    safetensors_torch = pytest.importorskip("safetensors.torch")
    src = busy(mas_ext.FusedMAS)
    good = tmp_path / "omega.safetensors"
    src.save(good)
    dst = busy(mas_ext.FusedMAS, lam=0.3)
    before = snapshot(dst)
    data = good.read_bytes()
    bad = tmp_path / "bad.safetensors"
    for cut in (len(data) // 2, 12, 3):
        bad.write_bytes(data[:cut])
        with pytest.raises(ValueError, match="nothing was loaded"):
            dst.load(bad)
        assert_same_state(snapshot(dst), before)
    safetensors_torch.save_file({"w": torch.zeros(2)}, str(bad))  # a safetensors file, not ours
    with pytest.raises(ValueError, match="mas_ext's metadata"):
        dst.load(bad)
    assert_same_state(snapshot(dst), before)
