"""Rows gathered from the batch's tokens by an index: which sample each row is, told by the autograd graph.

A mixture of experts held as a list of MLPs (Switch Transformers, NLLB-MoE, DBRX, the eager loops of most MoE code
outside transformers) calls each expert on the tokens routed to it, ``x[token_idx]`` out of the batch's (n·T, D)
tokens: a call of P rows, any number from each sample, whose rows no shape tells. Their graph does: the input was
made by an index node (``IndexBackward0``, ``IndexSelectBackward0``) into a tensor that a view made out of (n, T, …),
so row p is sample ``idx[p] // T``. Layers after it on the same rows (the expert's second projection, after its
activation) are found through the row-wise ops between them and the first one's output (:func:`row_samples`).

l-MAS, whose pass needs no graph, records one (without activations) where the sample alone showed such rows. The
graph also refuses reading rows flattened time-major, (T·n, D) out of (T, n, D) tokens, as n blocks
(:func:`transposed_rows`).

The engine then packs such a call as n blocks of W rows, each sample's rows in their order, padded by copies of a
row whose gradient is zero (:class:`Packing`): every rule that reads n blocks of rows reads it. That reading is
confirmed once per batch size, against the batch run one sample at a time, as n blocks of rows are.
"""
import math

import torch

# nodes whose output row p is made of row p of their tensor inputs (elementwise, any broadcast operand without rows)
_ROW_WISE = frozenset(f"{name}Backward{k}" for name, k in (
    ("Gelu", 0), ("Relu", 0), ("Silu", 0), ("Sigmoid", 0), ("Tanh", 0), ("Elu", 0), ("LeakyRelu", 0), ("Mish", 0),
    ("Hardswish", 0), ("Hardsigmoid", 0), ("Hardtanh", 0), ("Softplus", 0), ("Threshold", 0), ("Neg", 0),
    ("Exp", 0), ("Pow", 0), ("Pow", 1), ("Sqrt", 0), ("Rsqrt", 0), ("Abs", 0), ("ToCopy", 0), ("Clone", 0),
    ("Clamp", 0), ("Clamp", 1), ("ClampMin", 0), ("ClampMax", 0), ("NativeDropout", 0), ("Mul", 0), ("Mul", 1),
    ("Div", 0), ("Div", 1), ("Add", 0), ("Add", 1), ("Sub", 0), ("Sub", 1), ("Rsub", 0), ("Rsub", 1)))
# views that keep the rows (checked on their input's shape) and leading dims of 1 put in or taken out
_VIEWS = frozenset(("ViewBackward0", "UnsafeViewBackward0", "ReshapeAliasBackward0"))
_UNIT_DIMS = frozenset(("UnsqueezeBackward0", "SqueezeBackward0", "SqueezeBackward1", "SqueezeBackward2"))
_NODES = 64  # nodes walked at most per input: the walk stops early on anything else
_NONE = object()  # a branch without the batch's rows (parameters, constants)


def _holds_rows(sizes, rows):
    """Whether a tensor of shape ``sizes`` holds ``rows`` rows in its first dim beyond leading dims of 1."""
    sizes = list(sizes)
    return any(sizes[k] == rows and all(s == 1 for s in sizes[:k]) for k in range(len(sizes)))


def _source_rows(node, rows, n, budget):
    """Whether the tensor that ``node`` made (R = ``rows`` rows) is the batch's rows flattened sample-major: a view of
    a (n, …) tensor whose leading dims hold the R rows, through leading dims of 1 put in or taken out, that tensor not
    made by a transpose or permute (time-major (T, n, D) tokens made contiguous: at T = n its dim 0 is no sample)."""
    for _ in range(budget):
        name = type(node).__name__ if node is not None else None
        if name in _UNIT_DIMS:
            node = node.next_functions[0][0]
            continue
        if name in _VIEWS:
            sizes = list(node._saved_self_sym_sizes)
            return (bool(sizes) and sizes[0] == n and any(math.prod(sizes[:j]) == rows for j in range(1, len(sizes)))
                    and not _transposed(node.next_functions[0][0], budget))
        return False
    return False


_TRANSPOSES = frozenset(("TransposeBackward0", "TransposeBackward1", "PermuteBackward0"))


def _walk_to(node, names, budget=_NODES):
    """The first node of a class named in ``names`` that ``node`` reaches through copies and elementwise ops of one
    tensor (parameters and constants aside: they keep its shape and layout), or None."""
    for _ in range(budget):
        name = type(node).__name__ if node is not None else None
        if name in names:
            return node
        if name not in ("CloneBackward0", "ToCopyBackward0") and name not in _ROW_WISE:
            return None
        tensors = [f for f, _ in node.next_functions if f is not None and type(f).__name__ != "AccumulateGrad"]
        if len(tensors) != 1:
            return None
        node = tensors[0]
    return None


def _transposed(node, budget):
    """Whether a tensor came out of a transpose or permute, through copies and elementwise ops of one tensor."""
    return _walk_to(node, _TRANSPOSES, budget) is not None


def _dim(d, rank):
    """A dim that autograd saved (as an unsigned 64-bit number: -1 is 2**64 - 1) as 0…rank-1."""
    return (d - 2 ** 64 if d >= 2 ** 63 else d) % rank


def transposed_rows(x, n):
    """Whether the graph shows ``x``'s rows (dim 0) to be a tensor's leading dims flattened after a transpose or
    permute moved a dim of size n behind another flattened dim: rows that may be time-major ((T·n, D) out of the
    (T, n, D) tokens), which n blocks of rows are not. No shape tells such rows from n blocks of T, nor the graph
    which moved dim is the batch's (a time-major block transposed back to (n, T, D) at T = n; heads moved behind the
    tokens where as many as the samples): such a reading is refused, and the batch runs one sample at a time. The
    first batch's check of the blocks could miss it: a gradient that a maximum over positions leaves at one row per
    sample and feature mixes by blocks without changing |·| (a fuzzer's BatchNorm1d on time-major rows: confirmed
    on the first batch, 11% off on the next)."""
    node = _walk_to(getattr(x, "grad_fn", None), _VIEWS)  # the view that flattens
    if node is None:
        return False
    sizes, rows = list(node._saved_self_sym_sizes), x.shape[0]
    # the dims flattened into the rows, with any of size 1 after them (a sample alone's (T, 1, D))
    lead = max((j for j in range(1, len(sizes) + 1) if math.prod(sizes[:j]) == rows), default=None)
    if lead is None:
        return False
    node = _walk_to(node.next_functions[0][0], _TRANSPOSES)  # the transpose or permute that made its tensor
    if node is None:
        return False
    if type(node).__name__ == "PermuteBackward0":
        at = [_dim(d, len(sizes)) for d in node._saved_dims].index(0)
    else:
        a, b = _dim(node._saved_dim0, len(sizes)), _dim(node._saved_dim1, len(sizes))
        at = b if a == 0 else a if b == 0 else 0  # where the dim 0 of the tensor before it went
    return 0 < at < lead and sizes[at] == n


def _source(node):
    """The node of the tensor an index node took rows out of, through views and dims of 1 put in (each
    ``x[None, idx]``, each expert's own ``h.reshape(-1, D)[idx]`` makes its own): the same for every gather out of one
    tensor."""
    node = node.next_functions[0][0]
    while type(node).__name__ in _UNIT_DIMS or type(node).__name__ in _VIEWS:
        node = node.next_functions[0][0]
    return node


def _index_samples(node, n, budget, taken=None):
    """The sample of each row an index node took, or None where it is not rows out of the batch's rows; ``taken``
    (a dict) gets the rows taken, by the tensor they were taken out of: {(source node, its rows): (its rows,
    [positions])} (views of one tensor with rows of another size, sub-tokens of its tokens, are apart)."""
    name = type(node).__name__
    sizes = list(node._saved_self_sym_sizes)
    if name == "IndexSelectBackward0":
        dim, index = node._saved_dim, node._saved_index
        entries = [None] * dim + [index]
    else:
        entries = list(node._saved_indices)
    held = [j for j, t in enumerate(entries) if t is not None]
    if len(held) != 1 or any(s != 1 for s in sizes[:held[0]]):
        return None
    j, index = held[0], entries[held[0]]
    if index.dtype == torch.bool:  # a mask over the leading dims: (n, T) over (n, T, D) tokens
        if index.dim() < 1 or list(index.shape) != sizes[j:j + index.dim()] or sizes[j] != n:
            return None
        rows, positions = index.numel(), index.reshape(-1).nonzero().squeeze(1)
    elif index.dim() == 1 and not index.is_floating_point() and not bool((index < 0).any()):
        rows, positions = sizes[j], index
        if not _source_rows(node.next_functions[0][0], rows, n, budget):
            return None
    else:
        return None
    if rows % n:
        return None
    if taken is not None:
        taken.setdefault((_source(node), rows), (rows, []))[1].append(positions)  # one tensor's rows, so counted
    return torch.div(positions, rows // n, rounding_mode="floor")


def row_samples(x, n, known, taken=None):
    """The sample (0…n-1) of each of the P rows of ``x`` (P, …), where the graph shows them gathered from the batch's
    rows (see the module's docstring); ``known`` maps the nodes of earlier such calls' outputs to their rows' samples;
    ``taken`` gets the positions an index took (:func:`_index_samples`, :func:`uneven`).
    None where it does not show it."""
    budget = [_NODES]

    def walk(node):
        """(the samples of the rows node's tensor holds, or _NONE, or None; whether a view or a dim of 1 put in or
        taken out was on the way)."""
        if node is None:
            return _NONE, False
        budget[0] -= 1
        if budget[0] < 0:
            return None, False
        got = known.get(node)
        if got is not None:
            return got, False
        name = type(node).__name__
        if name in ("IndexBackward0", "IndexSelectBackward0"):
            return _index_samples(node, n, budget[0], taken), False
        if name == "AccumulateGrad":
            return _NONE, False
        if name not in _ROW_WISE and name not in _VIEWS and name not in _UNIT_DIMS:
            return None, False
        found, viewed, holding = _NONE, name in _VIEWS or name in _UNIT_DIMS, 0
        for nxt, _ in node.next_functions:
            got, through = walk(nxt)
            if got is None or (got is not _NONE and found is not _NONE and got is not found
                               and not torch.equal(got, found)):
                return None, False
            if got is not _NONE:
                found, viewed, holding = got, viewed or through, holding + 1
        if holding > 1 and viewed:  # rows that a view or a dim of 1 may have moved, met by rows: no reading
            return None, False
        if found is not _NONE and name in _VIEWS and not _holds_rows(node._saved_self_sym_sizes, len(found)):
            return None, False
        return found, viewed

    if not torch.is_tensor(x) or x.dim() < 2:
        return None
    try:
        got, _ = walk(x.grad_fn)
    finally:
        walk = None  # noqa: F841 - the recursive closure's cycle kept ``known``, and the pass's graph in it, alive
    return got if torch.is_tensor(got) and len(got) == x.shape[0] else None


def uneven(taken, mask=None):
    """Whether the tokens of a tensor that several gathers took rows out of (the experts of one MoE layer) were taken
    unevenly in this batch: some more often than others (of the positions ``mask`` marks, where it has as many).
    Routing that drops tokens (an expert's capacity counted over the batch's tokens, experts that choose their
    tokens) does so; then a sample's routing may depend on the others', which a check of the first batch of each size
    cannot see, and such a batch runs one sample at a time."""
    for rows, positions in taken.values():
        if len(positions) < 2:
            continue
        counts = torch.bincount(torch.cat(positions), minlength=rows)
        if mask is not None and mask.numel() == rows:
            counts = counts[mask.reshape(-1).bool()]
        if counts.numel() and bool(counts.min() != counts.max()):
            return True
    return False


class Packing:
    """A call's P rows, of the samples ``samples`` (P,), laid out as n blocks of W rows (W: the most rows of any one
    sample), each sample's rows in their order; the slots beyond a sample's rows hold a copy of row 0 as inputs and
    outputs (a row the module has run on: finite) and zero as gradients (nothing of theirs reaches an Ω)."""

    def __init__(self, samples, n):
        counts = torch.bincount(samples, minlength=n)
        self.samples, self.n, self.width = samples, n, max(1, int(counts.max()))
        order = torch.argsort(samples, stable=True)
        starts = torch.cumsum(counts, 0) - counts
        rank = torch.empty_like(samples)
        rank[order] = torch.arange(len(samples), device=samples.device) - starts[samples[order]]
        self.slots = samples * self.width + rank  # row p's slot
        self.source = torch.zeros(n * self.width, dtype=torch.long, device=samples.device)
        self.source[self.slots] = torch.arange(len(samples), device=samples.device)

    def rows(self, t):
        """An input or output (P, …) as (n·W, …)."""
        return t[self.source]

    def grads(self, g):
        """A gradient (P, …) as (n·W, …), zero in the padding slots."""
        out = g.new_zeros((self.n * self.width, *g.shape[1:]))
        out[self.slots] = g
        return out
