"""mas_ext: exact, fast Memory Aware Synapses (Aljundi et al., ECCV 2018) for PyTorch.

- :class:`ReferenceMAS`: the whole API in pure PyTorch, the ground truth.
- :class:`FusedMAS`: the same API on compiled kernels (per-sample importance inside the
  backward pass, the penalty fused into the optimizer step).
- :mod:`mas_ext.optim`: SGD, Adam and AdamW taking ``mas=`` to apply the penalty in their step.
- :func:`backend`: which path runs here, and why.
- :func:`register_rule`, :class:`Rule`, :class:`Call`: give a custom layer its own fused rule.
- :mod:`mas_ext.integrations`: ``MASCallback`` for the Hugging Face and Lightning Trainers (not imported
  here: ``import mas_ext.integrations.transformers`` or ``.lightning``).
"""
from . import optim
from ._core import FusedMAS, ReferenceMAS, backend
from ._rules import Call, Rule, register_rule

__version__ = "0.1.0"
__all__ = ["ReferenceMAS", "FusedMAS", "backend", "optim", "register_rule", "Rule", "Call"]

