"""What the Trainer callbacks share: argument checks, the fused-optimizer test, the end-of-task pass."""
from collections.abc import Mapping

import torch

from .. import optim

_FUSED = (optim.SGD, optim.Adam, optim.AdamW)


def check_arguments(mas, importance_data):
    """TypeError naming the argument when ``mas`` is not a MAS object or ``importance_data`` is not iterable."""
    if not all(hasattr(mas, name) for name in ("params", "accumulate", "consolidate", "add_penalty_grad_")):
        raise TypeError(f"MASCallback: mas must be a mas_ext.ReferenceMAS/FusedMAS, got {type(mas).__name__}")
    if importance_data is not None and not hasattr(importance_data, "__iter__"):
        raise TypeError("MASCallback: importance_data must be None or an iterable of batches (a DataLoader, a list "
                        f"of tensors, (x, y) tuples or dicts of model kwargs), got {type(importance_data).__name__}")


def check_model(mas, model):
    """ValueError when MAS tracks parameters that ``model`` (the module the trainer trains) does not hold."""
    held = {id(p) for p in model.parameters()}
    foreign = [name for name, p in mas.params.items() if id(p) not in held]
    if foreign:
        raise ValueError(
            f"MASCallback: the MAS object tracks {len(foreign)} parameter(s) that the trainer's model does not hold "
            f"(e.g. {foreign[:3]}): build the MAS on the very module passed to the trainer, not on a copy")


def unwrapped(optimizer):
    """The optimizer inside wrappers that hold it as ``.optimizer`` (accelerate's AcceleratedOptimizer,
    Lightning's LightningOptimizer)."""
    while not isinstance(optimizer, _FUSED) and isinstance(getattr(optimizer, "optimizer", None),
                                                            torch.optim.Optimizer):
        optimizer = optimizer.optimizer
    return optimizer


def penalty_in_step(optimizer, mas):
    """Whether ``optimizer`` applies this ``mas``'s penalty in its own step: a ``mas_ext.optim`` optimizer with
    ``opt.mas is mas``, possibly inside wrappers (:func:`unwrapped`)."""
    optimizer = unwrapped(optimizer)
    return isinstance(optimizer, _FUSED) and optimizer.mas is mas


def _to_device(batch, device):
    if torch.is_tensor(batch):
        return batch.to(device)
    if isinstance(batch, Mapping):
        return {k: _to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, list):
        return [_to_device(v, device) for v in batch]
    if isinstance(batch, tuple):  # a namedtuple becomes a plain tuple: MAS reads the input at index 0
        return tuple(_to_device(v, device) for v in batch)
    return batch


class _OnDevice:
    """The batches of ``data``, each with its tensors moved to ``device``."""

    def __init__(self, data, device):
        self.data, self.device = data, device

    def __iter__(self):
        return (_to_device(batch, self.device) for batch in self.data)


class _SizedOnDevice(_OnDevice):
    """:class:`_OnDevice` of sized data: its length feeds MAS's progress bar."""

    def __len__(self):
        return len(self.data)


def end_task(mas, importance_data):
    """Ω_t from ``importance_data`` (batches moved to the device of the tracked parameters; MAS runs the model
    in eval mode and restores its modes), then ``consolidate()``: Ω folded in, θ* ← θ."""
    device = next(iter(mas.params.values())).device
    wrap = _SizedOnDevice if hasattr(importance_data, "__len__") else _OnDevice
    mas.accumulate(wrap(importance_data, device))
    mas.consolidate()
