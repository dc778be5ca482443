"""Layers whose output all samples share (T5's relative-position bias on (T, T) buckets, BART's learned positions,
Swin's window bias): in g-MAS per sample each sample's gradient at that output is told by the ops that broadcast
it over the batch (mas_ext/_shared.py), and the batch keeps the batched path. Every case against the float64
one-sample oracle of test_model_edge_cases in the three modes; uses that cannot be told apart run the batch one
sample at a time, with a warning that names them, and stay exact.
"""
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import mas_ext
from test_model_edge_cases import CLASSES, CLS_IDS, MODE_IDS, MODES, check

V, D, H = 11, 8, 2


def _said(cls, model, batches, **kw):
    """(the MAS after ``batches``, the messages of its warnings that it runs one sample at a time)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        mas = cls(model, show_progress=False, **kw).accumulate(batches)
    return mas, [str(w.message) for w in caught if "one sample at a time" in str(w.message)]


class Buckets(nn.Module):
    """A relative-position bias: an Embedding on the (T, T) buckets of the positions, (T, T, H) out."""

    def __init__(self, span=3):
        super().__init__()
        self.span, self.table = span, nn.Embedding(2 * span + 1, H)

    def forward(self, t):
        pos = torch.arange(t)
        return self.table((pos[None, :] - pos[:, None]).clamp(-self.span, self.span) + self.span)


class Positions(nn.Module):
    """BART's learned positions: read from the tokens' shape, (T, D) out (the generic rule)."""

    def __init__(self, t=16):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(t, D))

    def forward(self, ids):
        return self.weight[: ids.shape[1]] * 1.5


class SharedBias(nn.Module):
    """Attention with a bias all samples share, used as ``kind`` says."""

    def __init__(self, kind):
        super().__init__()
        self.kind = kind
        self.emb, self.bias, self.pos = nn.Embedding(V, D), Buckets(), Positions()
        self.qk, self.out = nn.Linear(D, 2 * D), nn.Linear(D, 3)

    def attend(self, h, bias, mask=None):
        n, t, _ = h.shape
        q, k = self.qk(h).view(n, t, 2, H, D // H).permute(2, 0, 3, 1, 4)  # (n, H, T, D/H) each
        v = h.view(n, t, H, D // H).transpose(1, 2)
        b = bias.permute(2, 0, 1).unsqueeze(0)  # (1, H, T, T)
        if self.kind == "sdpa":
            if mask is not None:
                b = torch.where(mask[:, None, None, :], b, -1e4)
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=b)
        else:
            s = q @ k.transpose(-1, -2)
            if self.kind == "expand":  # MPNet: the bias expanded to the batch, added in place
                s += b.expand(n, -1, -1, -1).contiguous()
                s += b * 0.25  # and in place, unexpanded
            elif self.kind == "windows":  # Swin: two windows per sample, (2n, H, T/2, T/2)
                w = t // 2
                s = s[:, :, :w, :w].reshape(n, H, w, w).repeat_interleave(2, 0) + b[:, :, :w, :w]
                s = s.softmax(-1) @ v[:, :, :w].repeat_interleave(2, 0)
                return s.view(n, 2, H, w, -1).sum(1).transpose(1, 2).reshape(n, w, D).repeat(1, 2, 1)
            else:
                s = s + b * 0.5
            o = s.softmax(-1) @ v
        return o.transpose(1, 2).reshape(n, t, D)

    def forward(self, ids):
        n, t = ids.shape
        h = self.emb(ids) + self.pos(ids)  # (T, D) broadcast over the batch
        bias = self.bias(t)
        for _ in range(2):  # as T5, every layer reuses the first's bias
            h = torch.tanh(h + self.attend(h, bias))
        return self.out(h)


@pytest.mark.parametrize("kind", ["add", "sdpa", "expand", "windows"])
@pytest.mark.parametrize("mode,per_sample", MODES, ids=MODE_IDS)
@pytest.mark.parametrize("cls", CLASSES, ids=CLS_IDS)
def test_shared_outputs_keep_the_batched_path(request, cls, mode, per_sample, kind):
    """The bias's (T, T, H) output and the positions' (T, D), broadcast over the batch by an add, a where and the
    attn_mask of scaled_dot_product_attention, expanded by the model itself, added in place into the scores, or over
    n blocks of two windows per sample (Swin): exact in every mode, and in g-MAS per sample without a one-sample run (but the
    first batch's, which confirms the uses). Batches of 4 and 3 with T = 8, then T = 4 (T = n)."""
    torch.manual_seed(5)
    model = SharedBias(kind).eval()
    batches = [torch.randint(0, V, (4, 8)), torch.randint(0, V, (3, 8)), torch.randint(0, V, (4, 4))]
    check(request, cls, model, batches, mode=mode, per_sample=per_sample)
    mas, said = _said(cls, model, batches, mode=mode, per_sample=per_sample)
    assert bool(said) == (per_sample and mode == "local"), said
    if mode == "global" and per_sample:
        assert not mas._engine.by_sample and mas._engine.shares_confirmed


def test_shared_outputs_with_padding():
    """Right and left padding with a relative bias (the padded keys masked by where): the unpadded samples' Ω."""
    torch.manual_seed(6)
    model = SharedBias("sdpa").eval()

    class Masked(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = model

        def forward(self, input_ids, attention_mask=None):
            n, t = input_ids.shape
            h = self.inner.emb(input_ids)
            bias = self.inner.bias(t)
            mask = None if attention_mask is None else attention_mask.bool()
            return self.inner.out(torch.tanh(h + self.inner.attend(h, bias, mask)))

    wrapped = Masked().eval()
    lengths = [8, 5, 3, 6]
    seqs = [torch.randint(1, V, (k,)) for k in lengths]
    alone = mas_ext.FusedMAS(wrapped, show_progress=False)
    for s in seqs:
        alone.accumulate([s[None]])
    for side in ("right", "left"):
        ids = torch.zeros(4, 8, dtype=torch.long)
        mask = torch.zeros(4, 8, dtype=torch.long)
        for i, s in enumerate(seqs):
            at = slice(0, len(s)) if side == "right" else slice(8 - len(s), 8)
            ids[i, at], mask[i, at] = s, 1
        for cls in CLASSES:
            mas, said = _said(cls, wrapped, [{"input_ids": ids, "attention_mask": mask}])
            assert not said, said
            for k, v in alone.task_importance.items():
                assert torch.allclose(mas.task_importance[k], v, rtol=1e-4, atol=1e-7), (side, k)


class AddBias(torch.autograd.Function):
    """scores + bias in an autograd.Function: the add that broadcasts the bias is not an op the pass sees."""

    @staticmethod
    def forward(ctx, s, b):
        return s + b

    @staticmethod
    def backward(ctx, g):
        return g, g.sum(0, keepdim=True)


class UntoldUse(nn.Module):
    """The shared bias used as ``kind`` says, in a way that tells no sample's gradient apart: a matmul with the
    tokens, an autograd.Function, or an add with a (T, T) table of its own where T equals the batch size (its rows
    look like the samples)."""

    def __init__(self, kind):
        super().__init__()
        self.kind = kind
        self.emb, self.bias, self.out = nn.Embedding(V, D), Buckets(), nn.Linear(D, 3)
        self.register_buffer("table", torch.randn(8, 8))

    def forward(self, ids):
        h = self.emb(ids)
        b = self.bias(ids.shape[1]).sum(-1)  # (T, T)
        if self.kind == "matmul":
            s = (h @ h.transpose(1, 2)) + h @ b[: D, :D] @ h.transpose(1, 2) * 0.1
        elif self.kind == "function":
            s = AddBias.apply(h @ h.transpose(1, 2), b[None])
        else:  # "rows": (1, T) of the bias times the (T, T) table, then broadcast over the batch by an add
            s = (h @ h.transpose(1, 2)) + (b[:1] * self.table[: ids.shape[1], : ids.shape[1]])
        return self.out(s.softmax(-1) @ h)


@pytest.mark.parametrize("kind,why", [("matmul", "matmul"), ("function", "samples cannot be told apart"),
                                      ("rows", "output's uses do not tell")])
@pytest.mark.parametrize("cls", CLASSES, ids=CLS_IDS)
def test_uses_that_tell_no_samples_gradient_run_one_sample_at_a_time(request, cls, kind, why):
    """A matmul with the batch's rows is no broadcast (the pass says which op); a use inside an autograd.Function
    leaves the samples' gradients short of the batch's at the output; a (T, T) table at T = n looks like the batch's
    rows, and the first batch, run again one sample at a time, refutes it. Each runs the batch one sample at a time
    from then on, with one warning, exact."""
    torch.manual_seed(7)
    model = UntoldUse(kind).eval()
    batches = [torch.randint(0, V, (8, 8)), torch.randint(0, V, (3, 8))]
    check(request, cls, model, batches)
    mas, said = _said(cls, model, batches)
    assert len(said) == 1 and why in said[0] and "'bias.table'" in said[0], said
    assert mas._engine.by_sample


def test_a_use_that_looks_like_the_batch_later_is_confirmed_again(request):
    """The (T, T) table of UntoldUse is told apart from the batch's rows on a batch of 3 (T = 8); a later batch of
    8 makes it look like them: the uses differ from the confirmed ones, that batch is run again one sample at a
    time, which refutes them, and the pass stays exact."""
    torch.manual_seed(8)
    model = UntoldUse("rows").eval()
    batches = [torch.randint(0, V, (3, 8)), torch.randint(0, V, (8, 8))]
    for cls in CLASSES:
        check(request, cls, model, batches)
        mas, said = _said(cls, model, batches)
        assert len(said) == 1 and len(mas._engine.shares_confirmed) == 1, said
