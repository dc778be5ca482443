"""nn.Embedding (and transformers' ``*ScaledWordEmbedding``: rows times a scalar): per-sample rows summed by
(sample, index) key, |·| per key; and an Embedding whose weight the output Linear shares (tied input/output
embeddings), through the tied kernel."""
import torch
import torch.nn as nn

from .. import _ops
from .base import add_abs_sum, close_to, matches_formula
from .generic import generic_grads
from .linear import _linear_operands, linear_grads


def is_hf_scaled_embedding(module):
    """transformers' ``*ScaledWordEmbedding`` classes (Gemma 1–4, BART, mBART, M2M100, XGLM, ...), recognised by
    name: an nn.Embedding whose rows come out times a scalar ``embed_scale`` (a float or a 1-element buffer)."""
    scale = getattr(module, "embed_scale", None)
    return (isinstance(module, nn.Embedding) and type(module).__name__.endswith("ScaledWordEmbedding")
            and (isinstance(scale, (int, float)) or (torch.is_tensor(scale) and scale.numel() == 1))
            and [k for k, _ in module.named_parameters()] == ["weight"])  # T5Gemma2's writes an eoi_embedding in


def _output_scale(module):
    """The factor the module's rows come out times: 1 for nn.Embedding; embed_scale (a buffer in the weight's
    dtype, as Gemma's forward rounds it) for a scaled embedding."""
    if not is_hf_scaled_embedding(module):
        return 1.0
    scale = module.embed_scale
    return float(scale.to(module.weight.dtype)) if torch.is_tensor(scale) else float(scale)


def _matches(module, call):
    """True for nn.Embedding; for a scaled embedding, whether its class computes weight[index] · embed_scale (the
    formula the rule uses), checked once per class on the call's largest index."""
    if not is_hf_scaled_embedding(module):
        return True

    def rows(call):
        return call.args[0].detach().reshape(-1, 1), call.out.detach().reshape(-1, module.embedding_dim).float()

    def holds(index, y):
        return close_to(module.weight.detach()[index[0]].float() * _output_scale(module), y)

    return matches_formula(module, call, holds, rows)


def _embedding_operands(module, call):
    """(indices (n, T), the gradient at the rows as they were read (n, T, D)): the output's gradient times the
    module's output scale."""
    idx = call.args[0].reshape(call.n, -1)
    g = call.g.reshape(call.n, idx.shape[1], module.embedding_dim)
    scale = _output_scale(module)
    return idx, (g if scale == 1.0 else g.float() * scale)


def _embedding_rows(module, idx, g, per_sample):
    """Flat (key, row gradient) pairs of idx (n, T), g (n, T, D): key = sample * V + index, or index alone."""
    v = module.num_embeddings
    g = g.float().reshape(-1, module.embedding_dim)
    sample = torch.arange(idx.shape[0], device=idx.device).unsqueeze(1) if per_sample else 0
    key = (sample * v + idx).reshape(-1)
    if module.padding_idx is not None:
        g = g * (idx.reshape(-1) != module.padding_idx).unsqueeze(1)
    if module.scale_grad_by_freq:  # frequencies within each sample (within the batch when per_sample=False)
        _, inv, cnt = torch.unique(key, return_inverse=True, return_counts=True)
        g = g / cnt[inv].unsqueeze(1)
    return key, g


def embedding_grads(module, call, s, e):
    if not _matches(module, call):
        return generic_grads(module, call, s, e)
    v = module.num_embeddings
    idx, g = _embedding_operands(module, call)
    key, g = _embedding_rows(module, idx[s:e], g[s:e], per_sample=True)
    dense = torch.zeros((e - s) * v, module.embedding_dim, device=g.device).index_add_(0, key, g)
    return {"weight": dense.view(e - s, v, module.embedding_dim)}


def embedding_fused(module, call, bufs, per_sample):
    if "weight" not in bufs or not _matches(module, call):
        return False
    key, g = _embedding_rows(module, *_embedding_operands(module, call), per_sample)
    uniq, inv = torch.unique(key, return_inverse=True)
    per_key = torch.zeros(len(uniq), module.embedding_dim, device=g.device).index_add_(0, inv, g)
    bufs["weight"].index_add_(0, uniq % module.num_embeddings, per_key.abs())
    return True


def tied_fused(calls, bufs, per_sample):
    """One Embedding call and one Linear call sharing the weight (GPT-2, Qwen2, Llama 3.2, BERT's decoder):
    Σ_k |Σ_p g_kp a_kpᵀ + sample k's embedding rows at their indices| by the compiled tied kernel, one
    (V, D) gradient per thread, never N of them. ``calls`` are (unit, Call) pairs; False where they are not
    such a pair."""
    if len(calls) != 2 or not _ops.available("tied_embedding_importance_"):
        return False
    kinds = {u.rule.grads: (u, c) for u, c in calls}
    if set(kinds) != {embedding_grads, linear_grads}:
        return False
    (emb, ecall), (lin, lcall) = kinds[embedding_grads], kinds[linear_grads]
    shared = emb.names.get("weight")
    if shared is None or lin.names.get("weight") != shared or not _matches(emb.module, ecall):
        return False
    idx, g_emb = _embedding_operands(emb.module, ecall)
    _, rows = _embedding_rows(emb.module, idx, g_emb, per_sample)
    a, g = _linear_operands(lin.module, lcall)
    n = 1 if not per_sample else lcall.n  # per_sample=False: the whole batch as one sample
    torch.ops.mas_ext.tied_embedding_importance_(
        bufs[shared], a.reshape(n, -1, a.shape[-1]).contiguous(), g.reshape(n, -1, g.shape[-1]).contiguous(),
        idx.reshape(n, -1).long().contiguous(), rows.view(n, -1, rows.shape[-1]))  # nn.Embedding takes int32 too
    bias = lin.names.get("bias")
    if bias is not None:
        add_abs_sum(bufs[bias], g.float().sum(1), per_sample)
    return True
