"""The Trainer callbacks (mas_ext.integrations) with the real libraries: tiny random models on the CPU.

Each run is two tasks in a row (two ``train()``/``fit()`` calls sharing one callback). Task 2's parameters are
compared with SGD steps computed here by hand from the loss gradient and 2λΩ(θ−θ*), with clipping where the
library puts it; Ω with a ReferenceMAS computed afresh on the trained model. Skipped where transformers (with
accelerate) or Lightning are not installed.
"""
import copy
import importlib
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mas_ext

LR, LAM, N, STEPS, CLIP = 0.1, 2.0, 16, 3, 0.2  # CLIP: below the loss gradient's norm (0.44)


class Net(nn.Module):
    """A regression net whose forward returns a dict with ``loss`` when given labels (what the HF Trainer takes)
    and ``logits`` (what MAS takes)."""

    def __init__(self):
        super().__init__()
        self.lin1, self.lin2 = nn.Linear(4, 8), nn.Linear(8, 3)

    def forward(self, x, labels=None):
        out = self.lin2(torch.tanh(self.lin1(x)))
        return {"logits": out} if labels is None else {"loss": F.mse_loss(out, labels), "logits": out}


def _task(seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(N, 4, generator=g), torch.randn(N, 3, generator=g)


TASKS = [_task(1), _task(2)]


def _hand_steps(model, x, y, omega, star, clip=None, clip_penalty=False):
    """STEPS full-batch SGD steps on mse + R by hand; the penalty gradient added after clipping (transformers,
    mas_ext.optim) or clipped with the loss gradient (``clip_penalty``: Lightning's hook)."""
    model = copy.deepcopy(model)
    params = dict(model.named_parameters())
    for _ in range(STEPS):
        model.zero_grad()
        F.mse_loss(model(x)["logits"], y).backward()
        with torch.no_grad():
            penalty = {n: 2 * LAM * omega[n] * (p - star[n]) for n, p in params.items()}
            if clip_penalty:
                for n, p in params.items():
                    p.grad += penalty[n]
            if clip is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
            if not clip_penalty:
                for n, p in params.items():
                    p.grad += penalty[n]
            for p in params.values():
                p -= LR * p.grad
    return model


def _omega(model, x):
    """Ω_t of ``model`` on ``x`` from a fresh ReferenceMAS (the ground truth)."""
    return mas_ext.ReferenceMAS(copy.deepcopy(model), show_progress=False).accumulate([x]).task_importance


def _check_continual_run(run, clip=None, clip_penalty=False):
    """``run(model, mas, task)`` trains one task with the callback (importance on that task's inputs). Checks Ω and
    θ* after task 1, task 2's parameters against the hand steps, Ω after task 2."""
    torch.manual_seed(0)
    model = Net()
    mas = mas_ext.FusedMAS(model, lam=LAM, show_progress=False)

    run(model, mas, 0)
    omega1 = _omega(model, TASKS[0][0])
    assert (mas.num_tasks, mas.num_samples) == (1, 0)
    torch.testing.assert_close(mas.importance, omega1)
    assert all(o.abs().sum() > 0 for o in omega1.values())
    torch.testing.assert_close(mas.star, {n: p.detach() for n, p in model.named_parameters()})

    before, star = copy.deepcopy(model), mas.star
    run(model, mas, 1)
    x, y = TASKS[1]
    expected = _hand_steps(before, x, y, omega1, star, clip, clip_penalty)
    torch.testing.assert_close(dict(model.named_parameters()), dict(expected.named_parameters()))
    no_penalty = _hand_steps(before, x, y, {n: torch.zeros_like(o) for n, o in omega1.items()}, star, clip)
    gap = max((p - q).abs().max() for p, q in zip(model.parameters(), no_penalty.parameters()))
    assert gap > 3e-4, "the penalty did not change task 2's steps: the test would not see it missing or doubled"
    if clip is not None:  # clipping is active and the order of clipping and penalty shows in the result
        swapped = _hand_steps(before, x, y, omega1, star, clip, not clip_penalty)
        assert max((p - q).abs().max() for p, q in zip(model.parameters(), swapped.parameters())) > 3e-4

    assert (mas.num_tasks, mas.num_samples) == (2, 0)
    omega2 = _omega(model, x)
    torch.testing.assert_close(mas.importance, {n: omega1[n] + omega2[n] for n in omega1})
    return model


def _sgd(kind, params, mas):
    return mas_ext.optim.SGD(params, lr=LR, mas=mas) if kind == "fused" else torch.optim.SGD(params, lr=LR)


# ---------------------------------------------------------------------------------------------- transformers
@pytest.fixture
def hf():
    pytest.importorskip("accelerate")
    transformers = pytest.importorskip("transformers")
    from mas_ext.integrations.transformers import MASCallback
    return transformers, MASCallback


def _hf_args(transformers, tmp_path, **overrides):
    kwargs = dict(output_dir=str(tmp_path), report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True,
                  dataloader_num_workers=0, max_steps=STEPS, per_device_train_batch_size=N,
                  lr_scheduler_type="constant", max_grad_norm=0.0, logging_strategy="no", seed=0)
    kwargs.update(overrides)
    return transformers.TrainingArguments(**kwargs)


def _dict_rows(x, y):
    return [{"x": xi, "labels": yi} for xi, yi in zip(x, y)]


@pytest.mark.parametrize("accumulation", [1, 2])
@pytest.mark.parametrize("kind", ["torch", "fused"])
def test_hf_trainer_two_tasks_equal_hand_steps(hf, tmp_path, kind, accumulation):
    """torch.optim.SGD: the callback adds the penalty; mas_ext.optim.SGD(mas=) through ``optimizers=``: the callback
    adds nothing (no double penalty). Gradient accumulation 2 (two micro-batches of N/2) gives the full-batch step."""
    transformers, MASCallback = hf
    callbacks = {}

    def run(model, mas, t):
        x, y = TASKS[t]
        if t == 0:
            callbacks["cb"] = MASCallback(mas)  # one callback for both tasks
        callback = callbacks["cb"]
        # importance on dict batches (labels present and dropped), as a DataLoader would give them
        callback.importance_data = torch.utils.data.DataLoader(_dict_rows(x, y), batch_size=8)
        args = _hf_args(transformers, tmp_path, per_device_train_batch_size=N // accumulation,
                        gradient_accumulation_steps=accumulation)
        trainer = transformers.Trainer(model=model, args=args, train_dataset=_dict_rows(x, y), callbacks=[callback],
                                       optimizers=(_sgd(kind, model.parameters(), mas), None))
        trainer.train()

    _check_continual_run(run)


@pytest.mark.parametrize("kind", ["torch", "fused"])
def test_hf_trainer_penalty_enters_after_clipping(hf, tmp_path, kind):
    """transformers clips before ``on_pre_optimizer_step``: the penalty gradient is not clipped, with the callback
    as with a mas_ext.optim optimizer."""
    transformers, MASCallback = hf

    def run(model, mas, t):
        x, y = TASKS[t]
        callback = MASCallback(mas, torch.utils.data.DataLoader(_dict_rows(x, y), batch_size=8))
        trainer = transformers.Trainer(model=model, args=_hf_args(transformers, tmp_path, max_grad_norm=CLIP),
                                       train_dataset=_dict_rows(x, y), callbacks=[callback],
                                       optimizers=(_sgd(kind, model.parameters(), mas), None))
        trainer.train()

    _check_continual_run(run, clip=CLIP)


@pytest.mark.parametrize("kind", ["torch", "fused"])
def test_hf_trainer_resumes_a_task_with_the_mas_state_of_its_checkpoint(hf, tmp_path, kind):
    """Task 2 stopped after checkpoint-1 and resumed with train(resume_from_checkpoint=...) on a model and a MAS built
    again (a fresh process): the checkpoint held no MAS state, so the rest of the task trained without the penalty
    and its Ω was stored as the first task's. The callback writes checkpoint-N/mas_ext.pt and loads it on resume."""
    transformers, MASCallback = hf

    class Stop(transformers.TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == 1:
                raise KeyboardInterrupt  # the job killed after checkpoint-1

    def run(model, mas, t):
        x, y = TASKS[t]
        args = _hf_args(transformers, tmp_path / f"task{t}", save_strategy="steps", save_steps=1)

        def trainer(net, net_mas, extra=()):
            callback = MASCallback(net_mas, torch.utils.data.DataLoader(_dict_rows(x, y), batch_size=8))
            return transformers.Trainer(model=net, args=args, train_dataset=_dict_rows(x, y),
                                        callbacks=[callback, *extra],
                                        optimizers=(_sgd(kind, net.parameters(), net_mas), None))

        if t == 0:
            trainer(model, mas).train()
            return
        with pytest.raises(KeyboardInterrupt):
            trainer(model, mas, [Stop()]).train()
        fresh = Net()
        fresh_mas = mas_ext.FusedMAS(fresh, lam=LAM, show_progress=False)
        trainer(fresh, fresh_mas).train(resume_from_checkpoint=str(tmp_path / "task1" / "checkpoint-1"))
        model.load_state_dict(fresh.state_dict())
        mas.load_state_dict(fresh_mas.state_dict())

    _check_continual_run(run)


def test_hf_llama_adamw_fused_equals_callback(hf, tmp_path):
    """A tiny random LlamaForCausalLM, two tasks, Trainer's usual AdamW with clipping: mas_ext.optim.AdamW(mas=)
    through ``optimizers=`` gives what torch.optim.AdamW + the callback's penalty gradient gives."""
    transformers, MASCallback = hf
    config = transformers.LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=24, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32)
    torch.manual_seed(0)
    base = transformers.LlamaForCausalLM(config)
    g = torch.Generator().manual_seed(3)
    tasks = []
    for _ in range(2):
        ids = torch.randint(0, 50, (8, 6), generator=g)
        mask = torch.ones_like(ids)
        mask[:2, :2] = 0  # left padding in two rows
        tasks.append([{"input_ids": i, "attention_mask": m, "labels": i.masked_fill(m == 0, -100)}
                      for i, m in zip(ids, mask)])

    results = {}
    for kind in ("torch", "fused"):
        model = copy.deepcopy(base)
        mas = mas_ext.FusedMAS(model, lam=50.0, show_progress=False)
        callback = MASCallback(mas)
        for rows in tasks:
            callback.importance_data = torch.utils.data.DataLoader(rows, batch_size=4)
            opt = (mas_ext.optim.AdamW(model.parameters(), lr=1e-2, mas=mas) if kind == "fused"
                   else torch.optim.AdamW(model.parameters(), lr=1e-2))
            args = _hf_args(transformers, tmp_path, per_device_train_batch_size=4, max_grad_norm=1.0)
            transformers.Trainer(model=model, args=args, train_dataset=rows, callbacks=[callback],
                                 optimizers=(opt, None)).train()
        assert (mas.num_tasks, mas.num_samples) == (2, 0)
        assert all(o.abs().sum() > 0 for o in mas.importance.values())
        results[kind] = (dict(model.named_parameters()), mas.importance)

    torch.testing.assert_close(results["fused"], results["torch"], rtol=1e-4, atol=1e-5)
    moved = max((p - q).abs().max() for p, q in zip(results["torch"][0].values(), base.parameters()))
    assert moved > 1e-3


# ---------------------------------------------------------------------------------------------- Lightning
@pytest.fixture
def lit():
    try:
        pl = importlib.import_module("lightning.pytorch")
    except ImportError:
        pl = pytest.importorskip("pytorch_lightning")
    from mas_ext.integrations.lightning import MASCallback

    class LitNet(pl.LightningModule):
        def __init__(self, net, make_optimizer):
            super().__init__()
            self.net, self.make_optimizer = net, make_optimizer

        def training_step(self, batch, batch_idx):
            x, y = batch
            return F.mse_loss(self.net(x)["logits"], y)

        def configure_optimizers(self):
            return self.make_optimizer(self.parameters())

    return pl, MASCallback, LitNet


# Lightning 2.6 builds torch's LeafSpec, which torch 2.13 deprecates: a warning about the two libraries, not about us.
lightning_pytree_warning = pytest.mark.filterwarnings(
    "ignore:`isinstance\\(treespec, LeafSpec\\)` is deprecated:FutureWarning")


def _fit(pl, callback, lit_module, x, y, batch_size, **trainer_args):
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=STEPS, enable_progress_bar=False, logger=False,
                         enable_checkpointing=False, enable_model_summary=False, callbacks=[callback], **trainer_args)
    trainer.fit(lit_module, torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=batch_size))


@lightning_pytree_warning
@pytest.mark.parametrize("accumulation", [1, 2])
@pytest.mark.parametrize("kind", ["torch", "fused"])
def test_lightning_two_tasks_equal_hand_steps(lit, kind, accumulation):
    """The MAS is built on the network inside the LightningModule; importance on (x, y) tuples."""
    pl, MASCallback, LitNet = lit
    callbacks = {}

    def run(model, mas, t):
        x, y = TASKS[t]
        if t == 0:
            callbacks["cb"] = MASCallback(mas)
        callback = callbacks["cb"]
        callback.importance_data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8)
        _fit(pl, callback, LitNet(model, lambda params: _sgd(kind, params, mas)), x, y, N // accumulation,
             accumulate_grad_batches=accumulation)

    _check_continual_run(run)


@lightning_pytree_warning
@pytest.mark.parametrize("kind", ["torch", "fused"])
def test_lightning_clipping_order(lit, kind):
    """Lightning clips after ``on_before_optimizer_step``: the callback's penalty gradient is clipped with the loss
    gradient (R as part of the loss); a mas_ext.optim optimizer adds it in its step, after clipping."""
    pl, MASCallback, LitNet = lit

    def run(model, mas, t):
        x, y = TASKS[t]
        callback = MASCallback(mas, [(x, y)])
        _fit(pl, callback, LitNet(model, lambda params: _sgd(kind, params, mas)), x, y, N,
             gradient_clip_val=CLIP, gradient_clip_algorithm="norm")

    _check_continual_run(run, clip=CLIP, clip_penalty=kind == "torch")


@lightning_pytree_warning
@pytest.mark.parametrize("kind", ["torch", "fused"])
def test_lightning_resumes_with_the_mas_state_of_its_checkpoint(lit, tmp_path, kind):
    """Task 2 from task 1's checkpoint on a model and a MAS built again (a fresh process): the checkpoint held no MAS
    state, so task 2 trained without the penalty and its Ω was stored as the first task's. The MAS's state is the
    callback's, saved and restored by Lightning."""
    pl, MASCallback, LitNet = lit
    ckpt = tmp_path / "task1.ckpt"

    def trainer(net_mas, x, y, max_steps):
        return pl.Trainer(accelerator="cpu", devices=1, max_steps=max_steps, enable_progress_bar=False, logger=False,
                          enable_checkpointing=False, enable_model_summary=False,
                          callbacks=[MASCallback(net_mas, [(x, y)])])

    def loader(x, y):
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=N)

    def run(model, mas, t):
        x, y = TASKS[t]
        if t == 0:
            first = trainer(mas, x, y, STEPS)
            first.fit(LitNet(model, lambda params: _sgd(kind, params, mas)), loader(x, y))
            first.save_checkpoint(ckpt)
            return
        fresh = Net()
        fresh_mas = mas_ext.FusedMAS(fresh, lam=LAM, show_progress=False)
        trainer(fresh_mas, x, y, 2 * STEPS).fit(LitNet(fresh, lambda params: _sgd(kind, params, fresh_mas)),
                                                loader(x, y), ckpt_path=str(ckpt))
        model.load_state_dict(fresh.state_dict())
        mas.load_state_dict(fresh_mas.state_dict())

    _check_continual_run(run)


@lightning_pytree_warning
@pytest.mark.parametrize("precision", ["bf16-mixed"])  # 16-mixed is bf16-mixed on a CPU
def test_lightning_clips_for_a_fused_optimizer_under_mixed_precision(lit, precision):
    """Lightning refuses gradient_clip_val for an optimizer that unscales in its step (_step_supports_amp_scaling),
    bf16-mixed too: a mas_ext.optim optimizer raised "Are you using a 'fused' optimizer?". Under clipping the callback
    has it take GradScaler's plain path (unscale, clip, step)."""
    pl, MASCallback, LitNet = lit
    torch.manual_seed(0)
    model = Net()
    mas = mas_ext.FusedMAS(model, lam=LAM, show_progress=False)
    x, y = TASKS[0]
    mas.accumulate([x]).consolidate()
    opts = []
    module = LitNet(model, lambda params: opts.append(_sgd("fused", params, mas)) or opts[-1])
    _fit(pl, MASCallback(mas, [(x, y)]), module, x, y, N, precision=precision, gradient_clip_val=CLIP)
    assert opts[0]._step_supports_amp_scaling is False and mas.num_tasks == 2


@lightning_pytree_warning
def test_lightning_strategies_that_spawn_are_refused(lit):
    """ddp_spawn / ddp_notebook fit in processes they start: the MAS there is a copy, and the caller's was never
    consolidated (the next task trained without a penalty, without a word). The callback refuses them by name."""
    pl, MASCallback, LitNet = lit
    trainer = pl.Trainer(accelerator="cpu", devices=1, strategy="ddp_spawn", max_steps=1, logger=False)

    class Spawned:  # the callback's check, as the started processes see their trainer
        strategy = trainer.strategy

    with pytest.raises(RuntimeError, match="strategy='ddp'"):
        MASCallback(mas_ext.FusedMAS(Net(), show_progress=False)).setup(Spawned, None, "fit")


# ---------------------------------------------------------------------------------------------- both
def test_import_mas_ext_imports_neither_library():
    code = ("import sys, mas_ext, mas_ext.integrations; "
            "print([m for m in ('transformers', 'accelerate', 'lightning', 'pytorch_lightning') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


@pytest.mark.parametrize("module, hidden, package", [
    ("transformers", ["transformers"], "pip install transformers"),
    ("lightning", ["lightning", "lightning.pytorch", "pytorch_lightning"], "pip install lightning"),
])
def test_missing_library_names_the_pip_package(monkeypatch, module, hidden, package):
    for name in hidden:
        monkeypatch.setitem(sys.modules, name, None)  # import of it raises ImportError
    monkeypatch.delitem(sys.modules, f"mas_ext.integrations.{module}", raising=False)
    with pytest.raises(ImportError, match=package):
        importlib.import_module(f"mas_ext.integrations.{module}")


@pytest.mark.parametrize("library", ["transformers", "lightning"])
def test_bad_arguments_and_foreign_model(request, library):
    MASCallback = request.getfixturevalue("hf" if library == "transformers" else "lit")[1]
    model = Net()
    mas = mas_ext.FusedMAS(model, show_progress=False)
    with pytest.raises(TypeError, match="mas must be"):
        MASCallback(model)
    with pytest.raises(TypeError, match="importance_data"):
        MASCallback(mas, importance_data=3)
    callback = MASCallback(mas)
    with pytest.raises(ValueError, match="not on a copy"):
        if library == "transformers":
            callback.on_train_begin(None, None, None, model=copy.deepcopy(model))
        else:
            callback.on_train_start(None, copy.deepcopy(model))
