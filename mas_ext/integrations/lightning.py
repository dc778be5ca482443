"""MAS in a Lightning ``Trainer``: :class:`MASCallback`.

    mas = mas_ext.FusedMAS(module, lam=1.0)                 # the LightningModule (or the network inside it)
    callback = MASCallback(mas, importance_data=task1_loader)
    lightning.pytorch.Trainer(max_epochs=3, callbacks=[callback]).fit(module, task1_train_loader)
    callback.importance_data = task2_loader                  # then the next task
    lightning.pytorch.Trainer(max_epochs=3, callbacks=[callback]).fit(module, task2_train_loader)

Imports ``lightning.pytorch``, or ``pytorch_lightning`` where only that is installed; needs
``pip install lightning``.
"""
try:
    import lightning.pytorch as pl
except ImportError:
    try:
        import pytorch_lightning as pl
    except ImportError as e:
        raise ImportError("mas_ext.integrations.lightning needs PyTorch Lightning: pip install lightning") from e

from ._common import _FUSED, check_arguments, check_model, end_task, penalty_in_step, unwrapped

__all__ = ["MASCallback"]


class MASCallback(pl.Callback):
    """Continual learning with MAS in a Lightning ``Trainer``.

    In ``on_before_optimizer_step`` the callback adds the penalty gradient 2λΩ(θ−θ*) to ``.grad`` with the
    fused op (``mas.add_penalty_grad_()``), unless the optimizer is a ``mas_ext.optim`` optimizer holding the
    same ``mas`` (returned from ``configure_optimizers``), which applies it in its fused step. With
    ``importance_data`` (a DataLoader or any re-iterable of batches, as
    :meth:`~mas_ext.ReferenceMAS.accumulate` takes) the end of training accumulates Ω_t on it (batches moved
    to the parameters' device; MAS runs the model in eval mode and restores its modes) and calls
    ``mas.consolidate()``, so a sequence of ``fit()`` calls is a continual-learning run. This happens in
    ``on_train_end``, the last hook of the fit loop, while the model is still on its training device
    (``on_fit_end`` runs after the strategy's teardown, which moves a GPU model to the CPU). Set
    ``callback.importance_data`` to the next task's data between tasks.

    ``mas`` must be built on the LightningModule the Trainer fits, or on the network inside it whose
    parameters it trains (the same objects, not a copy; ``fit()`` raises a ValueError otherwise), after
    the module is on the device it trains on.

    Where the penalty enters (read in Lightning 2.6, ``Precision._after_closure``): after the backward of the last
    accumulated batch Lightning fires ``on_before_optimizer_step``, *then* clips the gradients
    (``gradient_clip_val``), then steps; under 16-bit AMP the gradients are unscaled before the hook. So
    the penalty gradient is clipped together with the loss gradient — exactly as if R(θ) were part of the
    loss. (A ``mas_ext.optim`` optimizer adds it inside its step, after clipping: with clipping on, the two
    ways differ; without it, they are equal.) With ``accumulate_grad_batches`` Lightning divides each
    batch's loss by the number of accumulated batches and fires the hook once per optimizer step, so the
    penalty gradient is added once per step: exactly R(θ) added to the loss of the step.

    The MAS's state (Ω, θ*, Ω_t so far, its counts and config) is the callback's state in Lightning's checkpoints:
    ``fit(ckpt_path=...)`` in a fresh process resumes the task with it, as an uninterrupted run. A strategy that fits
    in processes it starts (``ddp_spawn``, ``ddp_notebook``) never hands the MAS back to this one: a RuntimeError
    says so (``ddp``, one process per device started by the launcher, works).

    Args:
        mas: a :class:`mas_ext.FusedMAS` or :class:`mas_ext.ReferenceMAS` built on the trained model.
        importance_data: batches to accumulate Ω on at the end of each ``fit()``, or None.
    """

    def __init__(self, mas, importance_data=None):
        check_arguments(mas, importance_data)
        self.mas, self.importance_data = mas, importance_data

    def setup(self, trainer, pl_module, stage):
        """A RuntimeError where ``fit()`` runs in processes the strategy started: the consolidated Ω would stay there
        (the next task trained without a penalty, without a word)."""
        if type(getattr(trainer.strategy, "launcher", None)).__name__ == "_MultiProcessingLauncher":
            raise RuntimeError("MASCallback: this strategy fits in processes it starts (ddp_spawn, ddp_notebook, "
                               "ddp_fork), whose MAS is a copy: Ω and θ* would never reach this process's MAS. Use "
                               "strategy='ddp' (processes started by the launcher, each running the script)")

    def on_fit_start(self, trainer, pl_module):
        """A ``mas_ext.optim`` optimizer under ``gradient_clip_val`` takes GradScaler's plain path (unscale, then
        step): Lightning refuses to clip for an optimizer that unscales in its step, bf16-mixed too."""
        if trainer.gradient_clip_val:
            for optimizer in trainer.optimizers:
                optimizer = unwrapped(optimizer)
                if isinstance(optimizer, _FUSED):
                    optimizer._step_supports_amp_scaling = False

    def on_train_start(self, trainer, pl_module):
        """Checks that ``mas`` tracks parameters of the module being fitted."""
        check_model(self.mas, pl_module)

    def state_dict(self):
        """The MAS's :meth:`~mas_ext.ReferenceMAS.state_dict`, saved in Lightning's checkpoints."""
        return {"mas": self.mas.state_dict()}

    def load_state_dict(self, state_dict):
        """Restores the MAS from a checkpoint's callback state (``fit(ckpt_path=...)``)."""
        self.mas.load_state_dict(state_dict["mas"])

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        """``.grad += 2λΩ(θ−θ*)``, unless ``optimizer`` applies this MAS's penalty in its own step."""
        if not penalty_in_step(optimizer, self.mas):
            self.mas.add_penalty_grad_()

    def on_train_end(self, trainer, pl_module):
        """With ``importance_data``: accumulate Ω_t on it, then consolidate (Ω folded in, θ* ← θ)."""
        if self.importance_data is not None:
            end_task(self.mas, self.importance_data)
