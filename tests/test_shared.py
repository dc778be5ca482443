"""Layers whose output all samples share (T5's relative-position bias on (T, T) buckets, BART's learned positions,
Swin's window bias): in g-MAS per sample each sample's gradient at that output is told by the ops that broadcast
it over the batch (mas_ext/_shared.py), and the batch keeps the batched path. Every case against the float64
one-sample oracle of test_model_edge_cases in the three modes; uses that cannot be told apart run the batch one
sample at a time, with a warning that names them, and stay exact.
"""
import gc

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import mas_ext
from mas_ext import _shared
from test_importance import _sample_by_sample_warnings
from test_model_edge_cases import CLASSES, CLS_IDS, MODE_IDS, MODES, check

V, D, H = 11, 8, 2


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
        if self.kind == "windows":  # Swin: the layers run on two windows of t/2 tokens per sample, (2n, t/2, D)
            n, t, h = 2 * n, t // 2, h.reshape(2 * n, t // 2, D)
        q, k = self.qk(h).view(n, t, 2, H, D // H).permute(2, 0, 3, 1, 4)  # (n, H, T, D/H) each
        v = h.reshape(n, t, H, D // H).transpose(1, 2)
        b = bias.permute(2, 0, 1).unsqueeze(0)[..., :t, :t]  # (1, H, T, T)
        if self.kind == "sdpa":
            if mask is not None:
                b = torch.where(mask[:, None, None, :], b, -1e4)
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=b)
        else:
            s = q @ k.transpose(-1, -2)
            if self.kind == "expand":  # MPNet: the bias expanded to the batch, added in place
                s += b.expand(n, -1, -1, -1).contiguous()
                s += b * 0.25  # and in place, unexpanded
            else:
                s = s + b * 0.5
            o = s.softmax(-1) @ v
        return o.transpose(1, 2).reshape(h.shape[0], -1, D).reshape(-1, t * (2 if self.kind == "windows" else 1), D)

    def forward(self, ids):
        n, t = ids.shape
        h = self.emb(ids) + self.pos(ids)  # (T, D) broadcast over the batch
        bias = self.bias(t)
        self.said = f"largest bias {bias.abs().max():.3f}"  # a model's log line formats a 0-dim tensor (it raised)
        for _ in range(2):  # as T5, every layer reuses the first's bias
            h = torch.tanh(h + self.attend(h, bias))
        return self.out(h)


@pytest.mark.parametrize("kind", ["add", "sdpa", "expand", "windows"])
@pytest.mark.parametrize("mode,per_sample", MODES, ids=MODE_IDS)
@pytest.mark.parametrize("cls", CLASSES, ids=CLS_IDS)
def test_shared_outputs_keep_the_batched_path(request, cls, mode, per_sample, kind):
    """The bias's (T, T, H) output and the positions' (T, D), broadcast over the batch by an add, a where and the
    attn_mask of scaled_dot_product_attention, expanded by the model itself, added in place into the scores, or over
    n blocks of two windows per sample (Swin): exact in every mode, and in g-MAS per sample on the batched path, with
    one run one sample at a time to confirm the uses where they change (here each batch: 4 and 3 with T = 8, then
    T = 4 = n)."""
    torch.manual_seed(5)
    model = SharedBias(kind).eval()
    batches = [torch.randint(0, V, (4, 8)), torch.randint(0, V, (3, 8)), torch.randint(0, V, (4, 4))]
    check(request, cls, model, batches, mode=mode, per_sample=per_sample)
    mas, said = _sample_by_sample_warnings(cls(model, mode=mode, per_sample=per_sample, show_progress=False), batches)
    assert bool(said) == (per_sample and mode == "local"), said
    if mode == "global" and per_sample:
        assert not mas._engine.by_sample and 1 <= len(mas._engine.shares_confirmed) <= len(batches)


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
            mas, said = _sample_by_sample_warnings(cls(wrapped, show_progress=False),
                                                   [{"input_ids": ids, "attention_mask": mask}])
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


class Uses(nn.Module):
    """The shared bias used as ``kind`` says. Uses that tell no sample's gradient apart: a matmul with the samples'
    (n, D) rows, an autograd.Function, an add with a (T, T) table of its own where T equals the batch size (its
    rows look like the samples). Uses that do: a matmul with the (n, T, D) tokens (its leading dim a batch dim), a
    layer (``proj``) that takes it as its input (its output shared in turn)."""

    def __init__(self, kind):
        super().__init__()
        self.kind = kind
        self.emb, self.bias, self.out = nn.Embedding(V, D), Buckets(), nn.Linear(D, 3)
        self.proj = nn.Linear(8, 8)
        self.register_buffer("table", torch.randn(8, 8))

    def forward(self, ids):
        h = self.emb(ids)
        b = self.bias(ids.shape[1]).sum(-1)  # (T, T)
        if self.kind == "matmul":
            s = (h @ h.transpose(1, 2)) + h @ b[: D, :D] @ h.transpose(1, 2) * 0.1
        elif self.kind == "rows-matmul":
            s = (h @ h.transpose(1, 2)) + (h.mean(1) @ b[:D, :D])[:, None, :] * 0.1
        elif self.kind == "function":
            s = AddBias.apply(h @ h.transpose(1, 2), b[None])
        elif self.kind == "layer":
            s = (h @ h.transpose(1, 2)) + self.proj(b)
        else:  # "rows": (1, T) of the bias times the (T, T) table, then broadcast over the batch by an add
            s = (h @ h.transpose(1, 2)) + (b[:1] * self.table[: ids.shape[1], : ids.shape[1]])
        return self.out(s.softmax(-1) @ h)


@pytest.mark.parametrize("kind,why", [("rows-matmul", "matmul"), ("function", "samples cannot be told apart"),
                                      ("rows", "whose uses gave another Ω")])
@pytest.mark.parametrize("cls", CLASSES, ids=CLS_IDS)
def test_uses_that_tell_no_samples_gradient_run_one_sample_at_a_time(request, cls, kind, why):
    """A matmul with the batch's (n, D) rows is no broadcast (the pass says which op); a use inside an
    autograd.Function leaves the samples' gradients short of the batch's at the output; a (T, T) table at T = n
    looks like the batch's rows, and the first batch, run again one sample at a time, refutes it. Each runs the
    batch one sample at a time from then on, with one warning that names the layer, exact."""
    torch.manual_seed(7)
    model = Uses(kind).eval()
    batches = [torch.randint(0, V, (8, 8)), torch.randint(0, V, (3, 8))]
    check(request, cls, model, batches)
    mas, said = _sample_by_sample_warnings(cls(model, show_progress=False), batches)
    assert len(said) == 1 and why in said[0] and "'bias.table'" in said[0], said
    assert mas._engine.by_sample


@pytest.mark.parametrize("kind", ["matmul", "layer"])
@pytest.mark.parametrize("cls", CLASSES, ids=CLS_IDS)
def test_a_matmul_or_a_layer_on_a_shared_output_keeps_the_batched_path(request, cls, kind):
    """The shared (T, T) bias as a matrix against the (n, T, D) tokens (a matmul whose leading dim broadcasts it
    over the batch), or as the input of a Linear (``proj``) whose output is shared in turn and added to the scores:
    each sample's gradient at the bias comes back through that Linear, whose rule takes each sample's gradient at
    its output. Exact, batched, with no warning (before 2026-12-05 both ran one sample at a time)."""
    torch.manual_seed(7)
    model = Uses(kind).eval()
    batches = [torch.randint(0, V, (8, 8)), torch.randint(0, V, (3, 8))]
    check(request, cls, model, batches)
    mas, said = _sample_by_sample_warnings(cls(model, show_progress=False), batches)
    assert not said and not mas._engine.by_sample and mas._engine.shares_confirmed, said


def test_a_use_that_looks_like_the_batch_later_is_confirmed_again(request):
    """The (T, T) table of Uses is told apart from the batch's rows on a batch of 3 (T = 8); a later batch of
    8 makes it look like them: the uses differ from the confirmed ones, that batch is run again one sample at a
    time, which refutes them, and the pass stays exact."""
    torch.manual_seed(8)
    model = Uses("rows").eval()
    batches = [torch.randint(0, V, (3, 8)), torch.randint(0, V, (8, 8))]
    for cls in CLASSES:
        check(request, cls, model, batches)
        mas, said = _sample_by_sample_warnings(cls(model, show_progress=False), batches)
        assert len(said) == 1 and len(mas._engine.shares_confirmed) == 1, said


class LearnedPositions(nn.Module):
    """BART's learned absolute positions, (T, D) from the tokens' shape, beside a per-token Linear; padded tokens
    get the positions of their place in the row, so a left-padded sample is another input than the sample alone."""

    def __init__(self):
        super().__init__()
        self.emb, self.pos, self.out = nn.Embedding(V, D), Positions(), nn.Linear(D, 3)

    def forward(self, input_ids, attention_mask=None):
        return self.out(torch.tanh(self.emb(input_ids) + self.pos(input_ids)))


def _padded(lengths, side, t=8):
    ids = torch.zeros(len(lengths), t, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, k in enumerate(lengths):
        at = slice(0, k) if side == "right" else slice(t - k, t)
        ids[i, at], mask[i, at] = torch.randint(1, V, (k,)), 1
    return {"input_ids": ids, "attention_mask": mask}


@pytest.mark.parametrize("cls", CLASSES, ids=CLS_IDS)
def test_left_padding_after_an_unpadded_batch(request, cls):
    """The uses of a shared output are confirmed with the batch's padding: an unpadded first batch does not confirm
    a later left-padded one, whose learned absolute positions are not the unpadded samples' (Ω was 34–54% off on
    MPNet and mBART, without a warning). That batch runs again one sample at a time, and so do later padded ones
    (every later one until 2026-12-05: the difference was laid on the uses, not the padding)."""
    torch.manual_seed(9)
    model = LearnedPositions().eval()
    batches = [_padded([8, 8, 8], "right"), _padded([8, 5, 3], "right"), _padded([6, 8, 2], "left")]
    check(request, cls, model, batches, unpad=True)
    mas, said = _sample_by_sample_warnings(cls(model, show_progress=False), batches)
    assert len(said) == 1 and "padded" in said[0] and mas._engine.pad_by_sample and not mas._engine.by_sample, said


class Routed(nn.Module):
    """Tokens chosen by value (an MoE's routing) or packed by the mask, k of them: a multiple of n that is no n blocks
    of one sample's rows each, scaled by a vector all samples share."""

    def __init__(self, by):
        super().__init__()
        self.by = by
        self.lin, self.scale, self.out = nn.Linear(D, D), nn.Embedding(1, D), nn.Linear(D, 3)

    def forward(self, x, attention_mask):
        n, t, _ = x.shape
        h = self.lin(x).reshape(n * t, D)
        keep = (attention_mask.reshape(-1) > 0) if self.by == "mask" else (x.reshape(n * t, D)[:, 0] > 0)
        chosen = torch.tanh(h[keep] * self.scale(torch.zeros((), dtype=torch.long)))  # (k, D)
        return self.out(h.masked_scatter(keep[:, None], chosen).view(n, t, D))


@pytest.mark.parametrize("by", ["value", "mask"])
@pytest.mark.parametrize("cls", CLASSES, ids=CLS_IDS)
def test_rows_chosen_by_value_or_mask_are_no_samples_blocks(request, cls, by):
    """Two samples with 2 and 2 tokens chosen, then 3 and 1 (k = 4 both times): rows of a multiple of n are the
    samples' blocks only where a layer took that many so (a Linear on the batch's n·T tokens): the 3-and-1 batch
    took the first batch's confirmation before (8–22% off, no warning). Exact."""
    torch.manual_seed(10)
    batches = []
    for counts in ([2, 2], [3, 1]):
        x = torch.randn(2, 4, D)
        x[..., 0] = -x[..., 0].abs() - 0.1
        mask = torch.zeros(2, 4, dtype=torch.long)
        for i, c in enumerate(counts):
            x[i, :c, 0] *= -1
            mask[i, :c] = 1
        batches.append({"x": x, "attention_mask": mask if by == "mask" else torch.ones_like(mask)})
    check(request, cls, Routed(by).eval(), batches, unpad=by == "mask")


class WrittenAfterUse(nn.Module):
    """A tensor computed from a shared output, used with the batch, then written in place and used again."""

    def __init__(self):
        super().__init__()
        self.pos, self.lin, self.out = Positions(), nn.Linear(D, D), nn.Linear(D, 3)

    def forward(self, x):
        q = self.pos(x) * 2
        h = self.lin(x) + q
        q[0] = 0
        return self.out(torch.tanh(h * q))


@pytest.mark.parametrize("cls", CLASSES, ids=CLS_IDS)
def test_a_shared_tensor_written_in_place_after_a_use(request, cls):
    """The use's graph back to the output is not the one it had (a RuntimeError, 'backward through the graph a
    second time'): the batch runs one sample at a time, exact."""
    torch.manual_seed(11)
    model = WrittenAfterUse().eval()
    batches = [torch.randn(3, 8, D), torch.randn(2, 8, D)]
    check(request, cls, model, batches)
    assert _sample_by_sample_warnings(cls(model, show_progress=False), batches)[1]


class RelativeKeys(nn.Module):
    """DeBERTa-v2's disentangled attention in small: relative embeddings read as a weight, outside their Embedding,
    normed by a LayerNorm (an output all samples share), projected by the same Linear as the tokens' keys (a layer
    called on the batch and on a shared input), and met by the queries as ``kind`` says: ``repeat``ed n times along
    the heads ((1, 2S, D) in, as DeBERTa-v2's: the model fails where that input is expanded to the batch), broadcast
    by a ``matmul``, or ``tile``d otherwise than by sample (repeat(n, 2, 1)); then gathered by relative position.
    ``direct``: the weight is also read by the batch's tokens, where its samples' gradients cannot be told apart.
    ``raw``: repeated as ``repeat``, the weight projected without the LayerNorm (DeBERTa-v2's default config)."""

    def __init__(self, kind, span=3):
        super().__init__()
        self.kind, self.span = kind, span
        self.emb, self.rel, self.norm = nn.Embedding(V, D), nn.Embedding(2 * span, D), nn.LayerNorm(D)
        self.query, self.key, self.out = nn.Linear(D, D), nn.Linear(D, D), nn.Linear(D, 3)

    def forward(self, ids):
        n, t = ids.shape
        d, k = D // H, 2 * self.span
        h = self.emb(ids)
        if self.kind == "direct":
            h = h + 0.1 * torch.tanh(h @ self.rel.weight.T) @ self.rel.weight
        heads = lambda x: x.view(x.shape[0], -1, H, d).transpose(1, 2)  # noqa: E731 - (n, H, T, d)
        q, key = heads(self.query(h)), heads(self.key(h))
        # (1, 2S, D); raw: the weight itself, a batch of one that the model fails on once it is expanded to n
        rel = self.key((self.rel.weight if self.kind == "raw" else self.norm(self.rel.weight))[None])
        if self.kind == "matmul":
            c2p = q @ heads(rel).transpose(-1, -2)  # (n, H, T, 2S)
        else:
            keys = heads(rel).reshape(H, k, d)
            keys = keys.repeat(n, 2, 1)[:, :k] if self.kind == "tile" else keys.repeat(rel.shape[0] * n, 1, 1)
            c2p = torch.bmm(q.reshape(n * H, t, d), keys.transpose(1, 2)).view(n, H, t, k)
        pos = torch.arange(t)
        at = ((pos[None, :] - pos[:, None]).clamp(-self.span, self.span - 1) + self.span).expand(n, H, t, t)
        s = q @ key.transpose(-1, -2) + torch.gather(c2p, -1, at)
        # tanh: a shift of the scores along the keys (the key bias) is no longer lost in the softmax
        return self.out(((3 * s.tanh()).softmax(-1) @ heads(h)).transpose(1, 2).reshape(n, t, D))


@pytest.mark.parametrize("kind", ["repeat", "matmul", "raw", "direct"])
@pytest.mark.parametrize("mode,per_sample", MODES, ids=MODE_IDS)
@pytest.mark.parametrize("cls", CLASSES, ids=CLS_IDS)
def test_relative_keys_keep_the_batched_path(request, cls, mode, per_sample, kind):
    """DeBERTa-v2's relative keys (RelativeKeys): the weight read outside its Embedding is a leaf whose samples'
    gradients come back through the LayerNorm's and the Linear's shared outputs, the Linear's two calls (tokens and
    relative keys) are summed per sample before |·| (the compiled op over their positions concatenated), and the
    repeat by the batch size tiles the keys to n blocks of H rows, one per sample. ``raw``: the model fails once the
    key Linear's (1, 2S, D) input is expanded to the batch, and the batch is run again with nothing expanded. Exact
    in every mode; in g-MAS per sample batched with no warning (it ran one sample at a time before 2026-12-05, as in
    l-MAS still). ``direct``: the weight also read by the batch's tokens, in a matmul that broadcasts it over them;
    read as a shared tensor from the pass's start (Engine.leaves, after a first try), that use tells each sample's
    gradient too (it ran one sample at a time until the afternoon of 2026-12-05)."""
    torch.manual_seed(13)
    model = RelativeKeys(kind).eval()
    batches = [torch.randint(0, V, (4, 8)), torch.randint(0, V, (3, 8)), torch.randint(0, V, (1, 8))]
    check(request, cls, model, batches, mode=mode, per_sample=per_sample)
    mas, said = _sample_by_sample_warnings(cls(model, mode=mode, per_sample=per_sample, show_progress=False), batches)
    # l-MAS: the LayerNorm's output is no sample's (raw: the key Linear's input is expanded, which l-MAS confirms)
    by_sample = per_sample and mode == "local" and kind != "raw"
    assert bool(said) == by_sample and mas._engine.by_sample == by_sample, said
    if mode == "global" and per_sample:
        assert mas._engine.shares_confirmed


@pytest.mark.parametrize("kind,why", [("tile", "'key' (Linear) returns an output that all samples share, and a tensor "
                                      "computed from its output meets the batch's rows in gather")])
@pytest.mark.parametrize("cls", CLASSES, ids=CLS_IDS)
def test_relative_keys_whose_samples_cannot_be_told_apart(request, cls, kind, why):
    """The keys tiled twice along the positions too (no sample's blocks): one sample at a time, with one warning,
    exact."""
    torch.manual_seed(14)
    model = RelativeKeys(kind).eval()
    batches = [torch.randint(0, V, (4, 8)), torch.randint(0, V, (3, 8))]
    check(request, cls, model, batches)
    mas, said = _sample_by_sample_warnings(cls(model, show_progress=False), batches)
    assert len(said) == 1 and why in said[0] and mas._engine.by_sample, said


class Interleaved(nn.Module):
    """A shared (K, d) table repeated n times by the batch size, then laid out head-major ((H·n, K, d) rows: copy c
    meets the queries of sample c mod n), against sample-major queries: the copies are not the samples' blocks."""

    def __init__(self):
        super().__init__()
        self.emb, self.q, self.out = nn.Embedding(V, D), nn.Linear(D, D), nn.Linear(3, 3)
        self.rel = nn.Linear(D // H, D // H)
        self.register_buffer("table", torch.randn(3, D // H))

    def forward(self, ids):
        n, t = ids.shape
        d = D // H
        q = self.q(self.emb(ids)).view(n, t, H, d).transpose(1, 2).reshape(n * H, t, d)
        keys = self.rel(self.table).unsqueeze(0).repeat(n, 1, 1)  # (n, K, d)
        keys = keys.unsqueeze(1).expand(n, H, 3, d).transpose(0, 1).reshape(n * H, 3, d)
        return self.out(torch.bmm(q, keys.transpose(1, 2)).view(n, H, t, 3).tanh().mean(1))


@pytest.mark.parametrize("cls", CLASSES, ids=CLS_IDS)
def test_a_first_batch_of_alike_samples_confirms_nothing(request, cls):
    """Samples all alike agree with any reading of whose rows are whose: a first batch of them (the same tokens three
    times) confirms nothing, and the next batch, of other samples, refutes the reading of Interleaved's copies as
    the samples' blocks (a confirmation by the first was 13% off on later batches, without a warning). Exact."""
    torch.manual_seed(15)
    model = Interleaved().eval()
    batches = [torch.randint(0, V, (1, 5)).repeat(3, 1), torch.randint(0, V, (3, 5)), torch.randint(0, V, (3, 5))]
    check(request, cls, model, batches)
    mas, said = _sample_by_sample_warnings(cls(model, show_progress=False), batches)
    assert len(said) == 1 and "'rel' (Linear)" in said[0] and mas._engine.by_sample, said


class TableLayer(nn.Module):
    """A layer of the table (``layer``) on a (1, C, ...) or (K, C) table that all samples share, from a layer of its
    own, added to the tokens: the conv and norm rules read dim 0 as their batch and dim 1 as the channels."""

    def __init__(self, layer, shape):
        super().__init__()
        self.layer, self.table = layer, Positions(shape[0])
        self.table.weight = nn.Parameter(torch.randn(*shape))
        self.lin, self.out = nn.Linear(D, D), nn.Linear(D, 3)

    def forward(self, x):  # (n, K, D)
        return self.out(torch.tanh(self.lin(x) + self.layer(self.table.weight * 1.5).reshape(-1, D)[: x.shape[1]]))


@pytest.mark.parametrize("layer", ["conv2d", "conv1d", "batchnorm", "groupnorm"])
@pytest.mark.parametrize("cls", CLASSES, ids=CLS_IDS)
def test_convs_and_norms_on_a_shared_table(request, cls, layer):
    """A conv on a (1, C, ...) table grows it to n samples in dim 0 (a sample dim put in front of its channels
    raised); a BatchNorm or GroupNorm on a (K, C) table, whose dim 0 is its batch, takes the generic rule (it
    raised). Batched and exact."""
    torch.manual_seed(16)
    make, shape = {"conv2d": (lambda: nn.Conv2d(2, 2, 3, padding=1), (1, 2, 2, 2)),
                   "conv1d": (lambda: nn.Conv1d(2, 2, 3, padding=1), (1, 2, 4)),
                   "batchnorm": (lambda: nn.BatchNorm1d(D), (4, D)),
                   "groupnorm": (lambda: nn.GroupNorm(2, D), (4, D))}[layer]
    model = TableLayer(make(), shape).eval()
    if layer == "batchnorm":
        model.layer.running_mean.normal_()
        model.layer.running_var.uniform_(0.5, 2)
    batches = [torch.randn(3, 4, D), torch.randn(2, 4, D)]
    check(request, cls, model, batches)
    mas, said = _sample_by_sample_warnings(cls(model, show_progress=False), batches)
    assert not said and not mas._engine.by_sample and mas._engine.shares_confirmed, said


class Twice(nn.Module):
    """A Linear called on the tokens and on their pooled mean (two calls, other position counts), and a pair of
    bias-free Linears with one weight."""

    def __init__(self):
        super().__init__()
        self.lin, self.a, self.b, self.out = nn.Linear(D, D), nn.Linear(D, D, bias=False), nn.Linear(D, D, bias=False), \
            nn.Linear(D, 3)
        self.b.weight = self.a.weight

    def forward(self, x):
        h = torch.tanh(self.lin(x) + self.lin(x.mean(1, keepdim=True)))
        return self.out(torch.tanh(self.a(h)) + self.b(h.flip(1)))


@pytest.mark.parametrize("mode,per_sample", MODES, ids=MODE_IDS)
@pytest.mark.parametrize("cls", CLASSES, ids=CLS_IDS)
def test_a_linear_called_more_than_once(request, cls, mode, per_sample):
    """Calls of one Linear, or of Linears with one weight, summed per sample before |·|: FusedMAS takes the compiled
    op once over each sample's positions of all the calls (with and without a bias), in chunks of samples; the same
    Ω as the reference and the float64 loop in every mode."""
    torch.manual_seed(17)
    check(request, cls, Twice().eval(), [torch.randn(4, 5, D), torch.randn(3, 5, D)], mode=mode, per_sample=per_sample)


def test_repeat_by_the_batch_size_in_every_form():
    """``repeat`` of a shared tensor by n in dim 0 and 1 elsewhere, however torch takes its sizes (ints, a tuple, a
    list, torch.Size, numpy ints, a keyword, a new leading dim) is n blocks of its rows, with the same values as
    torch's; other repeats stay torch's own."""
    np = pytest.importorskip("numpy")
    site = _shared.Site(4, set())
    root = site.share(torch.randn(2, 3, requires_grad=True) * 1)
    plain = _shared.plain(root)
    for reps in [(4, 1), ((4, 1),), ([4, 1],), (torch.Size([4, 1]),), (np.int64(4), 1), (4, 1, 1)]:
        got = root.repeat(*reps)
        assert type(got) is torch.Tensor and torch.equal(got, plain.repeat(*reps)), reps
        assert got.is_contiguous()  # as torch's: a model may view it
    assert type(root.repeat(repeats=(4, 1))) is torch.Tensor
    assert type(root[0].repeat(np.int64(4))) is torch.Tensor
    one = root[:1].repeat(4, 1)  # n blocks of one row: a stride-0 view, were it not made contiguous
    assert one.is_contiguous() and one.view(-1).shape == (12,)
    for reps in [(1, 4), (1, 4, 1)]:  # by n in another dim: n blocks of its columns there (a time-major batch)
        got = root.repeat(*reps)
        assert type(got) is torch.Tensor and got.is_contiguous() and torch.equal(got, plain.repeat(*reps)), reps
    for reps in [(2, 1), (4, 2), (4, 4)]:  # no sample's blocks: shared still, as torch computes it
        got = root.repeat(*reps)
        assert isinstance(got, _shared.Shared) and torch.equal(_shared.plain(got), plain.repeat(*reps)), reps
    assert len(site.signature) == 11
    site.close()


class TimeMajorQueries(nn.Module):
    """Mask2Former's decoder in small: learned queries, an Embedding's weight read outside it (the Embedding never
    runs), repeated over the batch in dim 1 of (Q, n, D) time-major hidden states (``tile``: (Q, 2, D) rows per
    sample, two copies of them each; ``columns``: the (Q, D) table repeated to (Q, n·D), n blocks of D columns,
    viewed as (Q, n, D));
    a time-major nn.MultiheadAttention over the tokens whose 3-dim attn_mask (n·heads, Q, T) is each sample's own,
    from its tokens; LayerNorms on the (Q, n, D) rows (their batch dim moved in front for their rule)."""

    def __init__(self, kind="queries"):
        super().__init__()
        self.kind = kind
        self.emb, self.queries = nn.Embedding(V, D), nn.Embedding(3, D)
        self.attn, self.norm = nn.MultiheadAttention(D, H), nn.LayerNorm(D)
        self.mask, self.out = nn.Linear(D, 3), nn.Linear(D, 3)

    def forward(self, ids):
        n, t = ids.shape
        tokens = self.emb(ids).transpose(0, 1)  # (T, n, D)
        if self.kind == "tile":
            q = self.queries.weight.view(3, 1, D).expand(3, 2, D).repeat(1, n, 1).view(3, n, 2, D).mean(2)
        elif self.kind == "columns":
            q = self.queries.weight.repeat(1, n).view(3, n, D)
        else:
            q = self.queries.weight.unsqueeze(1).repeat(1, n, 1)
        hidden = self.norm(q)
        for _ in range(2):
            # which tokens each query may see: each sample's own (n·H, Q, T), from its tokens and the queries
            blocked = (self.mask(tokens).permute(1, 2, 0) < -0.3).repeat_interleave(H, 0)  # (n·H, 3, T)
            blocked[..., 0] = False  # every query sees one token at least
            att, _ = self.attn(hidden, tokens, tokens, attn_mask=blocked, need_weights=False)
            hidden = self.norm(hidden + att)
        return self.out(hidden).transpose(0, 1)  # (n, Q, 3)


@pytest.mark.parametrize("kind", ["queries", "tile", "columns"])
@pytest.mark.parametrize("mode,per_sample", MODES, ids=MODE_IDS)
@pytest.mark.parametrize("cls", CLASSES, ids=CLS_IDS)
def test_time_major_queries_repeated_over_the_batch(request, cls, mode, per_sample, kind):
    """Mask2Former's decoder (TimeMajorQueries): exact in every mode; in g-MAS per sample batched, the queries'
    repeat over dim 1 being n blocks there (it ran one sample at a time before 2026-12-05, the repeat left the
    queries shared) and the attention's per-sample mask (n·heads, Q, T) cut by sample in the generic rule
    (ReferenceMAS's rerun of the attention took it as shared, and crashed)."""
    torch.manual_seed(15)
    model = TimeMajorQueries(kind).eval()
    batches = [torch.randint(0, V, (4, 6)), torch.randint(0, V, (3, 6)), torch.randint(0, V, (2, 6))]
    check(request, cls, model, batches, mode=mode, per_sample=per_sample)
    mas, said = _sample_by_sample_warnings(cls(model, mode=mode, per_sample=per_sample, show_progress=False), batches)
    if mode == "global" and per_sample:
        assert not said and not mas._engine.by_sample, said


def test_no_pass_outlives_its_batch():
    """Each batch's roots, site and buffers go with it (a cycle through a tap's backward kept them all: Ω buffers
    the size of the model per batch)."""
    torch.manual_seed(12)
    mas = mas_ext.FusedMAS(SharedBias("add").eval(), show_progress=False)
    mas.accumulate([torch.randint(0, V, (3, 8)) for _ in range(3)])
    gc.collect()
    assert not [o for o in gc.get_objects() if isinstance(o, (_shared.Site, _shared.Shared))]



class RelativeEinsum(nn.Module):
    """Wav2Vec2-BERT's relative position attention in small: an Embedding on the (T, T) distances (an output all
    samples share) met by the queries in ``torch.einsum(equation, query, positions)``."""

    def __init__(self, equation="bhld,lrd->bhlr"):
        super().__init__()
        self.equation = equation
        self.emb, self.dist, self.q, self.out = nn.Embedding(V, D), nn.Embedding(15, D // H), nn.Linear(D, D), \
            nn.Linear(D, 3)

    def forward(self, ids):
        n, t = ids.shape
        h = self.emb(ids)
        q = self.q(h).view(n, t, H, D // H).transpose(1, 2)  # (n, H, T, d)
        pos = torch.arange(t)
        rel = self.dist(pos[:, None] - pos[None, :] + 7)  # (T, T, d)
        scores = torch.einsum(self.equation, q, rel)
        if self.equation.endswith("->hblr"):
            scores = scores.transpose(0, 1)
        att = (scores / 2).softmax(-1)  # (n, H, T, T)
        ctx = (att @ h.view(n, t, H, D // H).transpose(1, 2)).transpose(1, 2).reshape(n, t, D)
        return self.out(torch.tanh(ctx))


@pytest.mark.parametrize("equation", ["bhld,lrd->bhlr", "bhld,lrd->hblr"], ids=["leading", "not-leading"])
@pytest.mark.parametrize("cls", CLASSES, ids=CLS_IDS)
def test_relative_positions_met_in_einsum(request, cls, equation):
    """A shared output met by the batch's queries in einsum (Wav2Vec2-BERT, which ran every batch one sample at a
    time): where the batch's subscript leads the output, the shared operand gets it in front, expanded to the n rows,
    and each sample's gradient is told, batched; elsewhere (the queries' subscripts read in another order) the batch
    runs one sample at a time, with one warning. Exact either way."""
    torch.manual_seed(16)
    model = RelativeEinsum(equation).eval()
    batches = [torch.randint(0, V, (4, 6)), torch.randint(0, V, (3, 6))]
    check(request, cls, model, batches)
    mas, said = _sample_by_sample_warnings(cls(model, show_progress=False), batches)
    leading = equation.endswith("->bhlr")
    assert bool(said) == (not leading) and mas._engine.by_sample == (not leading), said
