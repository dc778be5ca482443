"""MAS in the Hugging Face ``Trainer``: :class:`MASCallback`.

    mas = mas_ext.FusedMAS(model, lam=1.0)                  # the model the Trainer trains, on its device
    callback = MASCallback(mas, importance_data=task1_loader)
    Trainer(model=model, args=args, train_dataset=task1, callbacks=[callback]).train()
    callback.importance_data = task2_loader                  # then the next task
    Trainer(model=model, args=args, train_dataset=task2, callbacks=[callback]).train()

Needs ``pip install transformers accelerate`` (the Trainer needs accelerate).
"""
try:
    from transformers import TrainerCallback
except ImportError as e:
    raise ImportError("mas_ext.integrations.transformers needs Hugging Face transformers: "
                      "pip install transformers accelerate") from e

import os
import warnings

from ._common import check_arguments, check_model, end_task, penalty_in_step

__all__ = ["MASCallback"]


class MASCallback(TrainerCallback):
    """Continual learning with MAS in a Hugging Face ``Trainer``.

    Before every optimizer step the callback adds the penalty gradient 2λΩ(θ−θ*) to ``.grad`` with the fused
    op (``mas.add_penalty_grad_()``), so any optimizer the Trainer runs sees grad + ∂R/∂θ. When the Trainer's
    optimizer is a ``mas_ext.optim`` optimizer holding the same ``mas`` (also inside accelerate's
    ``AcceleratedOptimizer``), the optimizer applies the penalty in its fused step and the callback adds
    nothing (no double penalty): ``Trainer(..., optimizers=(mas_ext.optim.AdamW(model.parameters(), lr=...,
    mas=mas), None), callbacks=[MASCallback(mas, data)])``.

    With ``importance_data`` (a DataLoader or any re-iterable of batches: tensors, ``(x, y, ...)`` tuples,
    or dicts of model kwargs, as :meth:`~mas_ext.ReferenceMAS.accumulate` takes) the end of each
    ``trainer.train()`` accumulates Ω_t on it (batches moved to the parameters' device; MAS runs the model
    in eval mode and restores its modes) and calls ``mas.consolidate()``, so a sequence of ``train()`` calls
    is a continual-learning run. Set ``callback.importance_data`` to the next task's data between tasks.
    With ``importance_data=None`` the callback only adds the penalty.

    ``mas`` must be built on the model the Trainer trains — the same module object (or a submodule of
    it), not a copy; ``train()`` raises a ValueError otherwise — and after the model is on the device it
    trains on (the Trainer moves it in its constructor: ``mas_ext.FusedMAS(trainer.model)`` then
    ``trainer.add_callback(...)`` is always right).

    Where the penalty enters (read in transformers 5.23, ``Trainer._inner_training_loop``): after the last
    micro-batch's backward the Trainer clips the gradients (``max_grad_norm``; accelerate unscales fp16
    gradients first), then fires ``on_pre_optimizer_step``, then calls ``optimizer.step()``. The penalty
    gradient is therefore added *after* clipping: it is not clipped, and the logged ``grad_norm`` does not
    include it — the same as with a ``mas_ext.optim`` optimizer, which adds it inside its step. With
    gradient accumulation the event fires once per optimizer step, not per micro-batch, and the Trainer
    has already scaled each micro-batch loss so that the accumulated gradient is that of the step's mean
    loss; the penalty gradient is added once on top: exactly R(θ) added to the loss of the step.

    Each checkpoint the Trainer saves gets the MAS's state beside it (``checkpoint-N/mas_ext.pt``: Ω, θ*, Ω_t so
    far, counts, config); ``train(resume_from_checkpoint=...)`` of a checkpoint under ``output_dir``, in a fresh
    process too, loads it, so the task resumes as an uninterrupted run (before, a fresh process resumed with the
    MAS as built: no penalty, and the task's Ω stored as the first task's).

    Args:
        mas: a :class:`mas_ext.FusedMAS` or :class:`mas_ext.ReferenceMAS` built on the Trainer's model.
        importance_data: batches to accumulate Ω on at the end of each ``train()``, or None.
    """

    FILE = "mas_ext.pt"  # the MAS's state in each checkpoint folder

    def __init__(self, mas, importance_data=None):
        check_arguments(mas, importance_data)
        self.mas, self.importance_data = mas, importance_data

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        """Checks that ``mas`` tracks the parameters of the model the Trainer trains; on a resumed run (the Trainer
        at step N > 0), loads the MAS's state from ``output_dir/checkpoint-N``, or warns where it is not there."""
        check_model(self.mas, model)
        if state.global_step > 0:
            path = os.path.join(args.output_dir, f"checkpoint-{state.global_step}", self.FILE)
            if os.path.exists(path):
                self.mas.load(path)
            else:
                warnings.warn(f"MASCallback: the Trainer resumed at step {state.global_step}, but {path} does not hold "
                              "the MAS's state (a checkpoint saved without this callback, or elsewhere than "
                              "output_dir): the task goes on with the MAS as it is in this process", stacklevel=2)

    def on_save(self, args, state, control, **kwargs):
        """Writes the MAS's state into the checkpoint folder just saved (by the main process)."""
        folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        if state.is_world_process_zero and os.path.isdir(folder):
            self.mas.save(os.path.join(folder, self.FILE))

    def on_pre_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        """``.grad += 2λΩ(θ−θ*)``, unless ``optimizer`` applies this MAS's penalty in its own step."""
        if not penalty_in_step(optimizer, self.mas):
            self.mas.add_penalty_grad_()

    def on_train_end(self, args, state, control, **kwargs):
        """With ``importance_data``: accumulate Ω_t on it, then consolidate (Ω folded in, θ* ← θ)."""
        if self.importance_data is not None:
            end_task(self.mas, self.importance_data)
