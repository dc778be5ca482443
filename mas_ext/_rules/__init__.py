"""The per-layer importance rules, one file per layer family, and the table that maps modules to them.

=====================  ==============  =========================================================
module                 file            fused path
=====================  ==============  =========================================================
nn.Linear, Conv1D      linear.py       linear_importance_ (no positions: |G|ᵀ|A|, one GEMM; positions: each
                                       sample's gradient tiles made in registers, |·| added into Ω); a layer
                                       called more than once: its calls' positions concatenated per sample
Linear subclasses      linear.py       the same, once the class is seen to compute x Wᵀ + b (FalconLinear)
nn.Conv1d/2d/3d        conv.py         conv_importance_ (im2col into the register kernel's operands; depthwise:
                                       row dot products, nothing unfolded; other groups > 1: per-sample im2col
                                       + grouped GEMM + |·|)
nn.Embedding, tied     embedding.py    per-(sample, index) rows; tied_embedding_importance_
*ScaledWordEmbedding   embedding.py    the same, the gradient times embed_scale (Gemma, BART)
LayerNorm, RMSNorm     norm.py         norm_affine_importance_ (one pass over x and g); Hugging Face *RMSNorm
                                       classes and T5's *LayerNorm (an RMS norm), each class checked once
LayerNorm subclasses   norm.py         the same, channels moved last (ConvNeXt's channels_first), class checked once
GroupNorm, BatchNorm   norm.py         per-sample N×C gradients, whole
MultiheadAttention     attention.py    its projections through linear_importance_
HF MoE *Experts        experts.py      each expert's two projections through linear_importance_, tokens by sample
Llama 4's *Experts     experts.py      the same, every expert on every token ((E·n·T, D) rows: block (e, k))
PEFT DoraLinearLayer   adapters.py     per-sample Σ g·(y + b)/m from the output and the base output (N × out)
anything else          generic.py      none: torch.func vmap(vjp) over that module (else autograd)
=====================  ==============  =========================================================

Every built-in rule enters the table through :func:`register_rule`, the same public call a user makes
for a custom layer (see :mod:`.base` for the interface).
"""
import torch.nn as nn

from .adapters import dora_fused, dora_grads, is_peft_dora_linear
from .attention import mha_fused, mha_tapped_forward
from .base import CHUNK_ELEMS, Call, Rule, register_rule, rule_for, unverified
from .conv import conv_cost, conv_fused, conv_grads, unfold_nd
from .experts import (dense_experts_fused, dense_experts_grads, experts_fused, is_dense_experts,
                      is_hf_experts)
from .embedding import embedding_fused, embedding_grads, is_hf_scaled_embedding, tied_fused
from .generic import (ABSENT, GENERIC, SharedOutput, attributes, counts_of_its_own, generic_grads, rng_state,
                      same_rng, sample_dim, settings)
from .linear import (conv1d_fused, conv1d_grads, is_hf_conv1d, is_linear_subclass, linear_calls_fused, linear_fused,
                     linear_grads, linear_into, linear_subclass_fused, linear_subclass_grads)
from .norm import (hf_rmsnorm_unverified, is_hf_rmsnorm, is_layernorm_subclass, layernorm_subclass_fused,
                   layernorm_subclass_grads, layernorm_subclass_unverified, norm_fused, norm_grads)

__all__ = ["ABSENT", "CHUNK_ELEMS", "Call", "Rule", "GENERIC", "SharedOutput", "attributes", "settings", "register_rule",
           "rule_for", "generic_grads", "sample_dim", "tied_fused", "linear_calls_fused", "linear_into", "unfold_nd",
           "leading_positions", "rng_state", "same_rng"]


def _no_output(module):
    return False


def _rows(module):
    return True


def _last_dim(module):
    return isinstance(module, (nn.LayerNorm, nn.RMSNorm))


def _row_wise(module):
    """A norm that normalises each row of its input on its own: all but a BatchNorm on batch statistics (training
    mode, or no running ones). n blocks of rows are then each sample's (LeViT's BatchNorm1d on (n·T, C) tokens)."""
    return not isinstance(module, nn.modules.batchnorm._BatchNorm) or (
        not module.training and module.running_mean is not None)


def leading_positions(rule, module):
    """Whether ``rule`` reads every dim of the module's input before the last as positions of a sample (Linear,
    GPT-2's Conv1D, Embedding, the norms over the last dim): an input with a dim of samples put in front is then
    each sample's own."""
    return (rule.grads in (linear_grads, conv1d_grads, linear_subclass_grads, embedding_grads)
            or (rule.grads is norm_grads and (_last_dim(module) or is_hf_rmsnorm(module))))


register_rule(nn.Linear, Rule(linear_grads, linear_fused, needs_output=_no_output, blocks=_rows))
register_rule(is_hf_conv1d, Rule(conv1d_grads, conv1d_fused, needs_output=unverified, blocks=_rows))
# a call that is not a plain one (Ovis2.5's lookup=True) takes the generic rule, which reads the output: kept
register_rule(is_linear_subclass, Rule(linear_subclass_grads, linear_subclass_fused, blocks=_rows))
for _conv in (nn.Conv1d, nn.Conv2d, nn.Conv3d):
    register_rule(_conv, Rule(conv_grads, conv_fused, conv_cost, needs_output=_no_output, blocks=_rows))
register_rule(nn.Embedding, Rule(embedding_grads, embedding_fused, lambda m, c: m.weight.numel(),
                                 needs_output=_no_output, blocks=_rows, sums=counts_of_its_own))
register_rule(is_hf_scaled_embedding, Rule(embedding_grads, embedding_fused, lambda m, c: m.weight.numel(),
                                           needs_output=unverified, blocks=_rows, sums=counts_of_its_own))
for _norm in (nn.LayerNorm, nn.GroupNorm, nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.RMSNorm):
    register_rule(_norm, Rule(norm_grads, norm_fused, needs_output=_no_output, blocks=_row_wise))
register_rule(is_hf_rmsnorm, Rule(norm_grads, norm_fused, needs_output=hf_rmsnorm_unverified, blocks=_rows))  # last dim
register_rule(is_layernorm_subclass, Rule(layernorm_subclass_grads, layernorm_subclass_fused,
                                          needs_output=layernorm_subclass_unverified))
register_rule(is_hf_experts, Rule(generic_grads, experts_fused, blocks=_rows))  # the generic rule reads the output
register_rule(is_dense_experts, Rule(dense_experts_grads, dense_experts_fused, needs_output=unverified,
                                     blocks=lambda module: module.gate_up_proj.shape[0]))  # a copy of the rows each
register_rule(is_peft_dora_linear, Rule(dora_grads, dora_fused))  # reads the output and base_result
register_rule(nn.MultiheadAttention, Rule(generic_grads, mha_fused, owns_children=True,
                                          tapped_forward=mha_tapped_forward))
