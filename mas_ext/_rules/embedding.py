"""nn.Embedding: per-sample rows summed by (sample, index) key, |·| per key; and an Embedding whose weight
the output Linear shares (tied input/output embeddings), through the tied kernel."""
import torch

from .. import _ops
from .base import add_abs_sum
from .linear import _linear_operands, linear_grads


def _embedding_operands(module, call):
    idx = call.args[0].reshape(call.n, -1)
    return idx, call.g.reshape(call.n, idx.shape[1], module.embedding_dim)


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
    v = module.num_embeddings
    idx, g = _embedding_operands(module, call)
    key, g = _embedding_rows(module, idx[s:e], g[s:e], per_sample=True)
    dense = torch.zeros((e - s) * v, module.embedding_dim, device=g.device).index_add_(0, key, g)
    return {"weight": dense.view(e - s, v, module.embedding_dim)}


def embedding_fused(module, call, bufs, per_sample):
    if "weight" not in bufs:
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
    if shared is None or lin.names.get("weight") != shared:
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
