"""The importance pass: one batch in, its Σ_k |∂_k| (g-MAS or l-MAS) added into per-parameter buffers.

Every module with tracked parameters is a *unit* with a rule from the table in ``_rules`` (or the
generic torch.func rule). A forward hook records each call's inputs. In global mode the unit's output
passes through ``_Tap``, an identity autograd node whose backward receives ∂‖f‖²/∂y; one
``torch.autograd.grad`` towards a dummy anchor runs every tap's backward but no weight-gradient GEMM
and no ``.grad``. In local mode the output itself is the gradient, so the pass is a forward only.
Units that share a parameter, or run more than once in a forward, are summed per sample before
``|·|``. :class:`Engine` is the whole interface: ``session()`` around the batches, ``batch_size()``
and ``run()`` per batch; what a batch adds is committed (or not) by its caller.

Two things are learned, not read from shapes: where each call's inputs and outputs hold the batch (the first
batch's first sample run alone, :meth:`Engine.learn_dims`), and which parameters are read outside their units'
calls (in g-MAS, one walk of each batch's autograd graph, each call's nodes told by their sequence numbers,
:meth:`Engine._read_outside`). A call whose outputs
all samples share (T5's position bias) gives the model shared tensors whose broadcasts over the batch tell each
sample's gradient (:mod:`_shared`, :meth:`Engine._share`). Other calls whose rows are no sample's own, and such
parameters, make the batch run one sample at a time: exact, and slower.
"""
import contextlib
import functools
import gc
import inspect
import itertools
import threading
import warnings
from collections.abc import Mapping

import torch
import torch.nn.utils.parametrize

from . import _gathered, _graph, _rules, _shared


_SAMPLE_KEYS = ("input_ids", "inputs_embeds", "pixel_values", "input_values", "input_features")
# Hugging Face inputs that are one row per sample whatever their shape
_PER_SAMPLE_KEYS = (*_SAMPLE_KEYS, "attention_mask", "token_type_ids", "position_ids", "decoder_input_ids",
                    "decoder_attention_mask", "labels", "mm_token_type_ids")


def _sample_tensor(args, kwargs):
    """The tensor whose dim 0 is the batch: the first positional tensor, else a Hugging Face input by its
    usual name, else the first keyword tensor whose dim 0 is not 1 (one that is broadcasts over the batch, SPEC §1:
    read first, it made the batch one sample), else the first."""
    found = [t for t in (*args, *(kwargs.get(k) for k in _SAMPLE_KEYS)) if torch.is_tensor(t) and t.dim() > 0]
    if found:
        return found[0]
    found = [t for t in kwargs.values() if torch.is_tensor(t) and t.dim() > 0]
    return next((t for t in found if t.shape[0] != 1), found[0] if found else None)


def _mask_positions(t, mask, dim=None, rows=False):
    """``t`` with the positions where the (n, T) ``mask`` (or a multiple-choice (n, C, T) one) is 0 set to zero.
    ``dim``: where t holds the batch, as learned (0: (n, T, ...); 1: seq-first (T, n, ...)), or None where not
    learned (read as (n, T, ...) where t's shape is, else as it is); ``rows``: t holds the samples as n blocks of rows
    in dim 0, (n·T, ...). Where t has the padded length T in some other dim, its padding cannot be told: None.
    masked_fill, not a product: a NaN at a padded position stays out."""
    if mask is None:
        return t
    if mask.dim() > 2:  # (n, C, T): C rows of tokens per sample (multiple choice), n·C rows in the layers
        flat = mask.reshape(-1, mask.shape[-1])
        if dim not in (0, None):  # a seq-first layout of those rows: not told
            return t if mask.shape[-1] not in t.shape else None
        if t.shape[:mask.dim()] == mask.shape:
            keep = mask
        elif t.shape[:2] == flat.shape:
            keep = flat
        elif rows and t.dim() > 0 and t.shape[0] == mask.numel():
            keep = mask.reshape(-1)
        elif mask.shape[-1] not in t.shape[1:]:
            return t
        else:
            return None
    else:
        n, length = mask.shape
        if rows and t.dim() > 0 and t.shape[0] == n * length:
            keep = mask.reshape(n * length)
        elif dim in (0, None) and t.shape[:2] == mask.shape:
            keep = mask
        elif dim == 1 and t.shape[:2] == (length, n):
            keep = mask.T
        elif dim is None or dim >= t.dim() or length not in t.shape[:dim] + t.shape[dim + 1:]:
            return t  # no position dim (a pooled output)
        else:
            return None
    return t.masked_fill(~keep.bool().view(*keep.shape, *([1] * (t.dim() - keep.dim()))), 0)


_DECODER_INPUTS = ("decoder_input_ids", "decoder_inputs_embeds")


# Hugging Face inputs the pass reads by name (padding, an encoder-decoder's decoder): passed positionally, as in
# model(ids, mask), they are bound to their names first (_by_name)
_NAMED_INPUTS = ("attention_mask", "decoder_input_ids", "decoder_attention_mask", "decoder_inputs_embeds",
                 "token_type_ids", "position_ids")


def _by_name(module, args, kwargs):
    """The same call of ``module`` with its positional arguments from the first of :data:`_NAMED_INPUTS` on passed by
    keyword (``model(ids, mask)``: its padding was not read, 11-61% off), where its forward's signature binds them so;
    else as it is."""
    if len(args) < 2:
        return args, kwargs
    try:
        params = list(inspect.signature(module.forward).parameters.values())[:len(args)]
    except (TypeError, ValueError):
        return args, kwargs
    plain = inspect.Parameter.POSITIONAL_OR_KEYWORD
    first = next((i for i, p in enumerate(params) if i > 0 and p.name in _NAMED_INPUTS), None)
    if (first is None or len(params) < len(args) or any(p.kind is not plain for p in params)
            or any(p.name in kwargs for p in params[first:])):
        return args, kwargs
    return args[:first], {**{p.name: a for p, a in zip(params[first:], args[first:])}, **kwargs}


def _padding(kwargs, n):
    """(the (n, T) attention_mask of a batch's inputs, the mask of the model's output), each None where there is none
    or it marks no padding: an encoder-decoder model's output is the decoder's, whose positions are those that
    ``decoder_attention_mask`` marks (all where it has none), not the encoder's. An (n, C, T) mask of inputs of that
    shape (a multiple-choice head's C rows of tokens per sample) is one too, of an encoder; any other (a (n, 1, T, T)
    or (n, T, T) attention pattern) is no padding."""
    def padded(m, choices=False):
        if not torch.is_tensor(m) or m.shape[:1] != (n,) or m.all():
            return None
        if m.dim() == 2:
            return m
        if not choices or m.dim() != 3:
            return None
        ids, embeds = kwargs.get("input_ids"), kwargs.get("inputs_embeds")
        if torch.is_tensor(ids):
            return m if ids.shape == m.shape else None
        return m if torch.is_tensor(embeds) and embeds.dim() == 4 and embeds.shape[:3] == m.shape else None

    if any(kwargs.get(k) is not None for k in _DECODER_INPUTS):
        return padded(kwargs.get("attention_mask")), padded(kwargs.get("decoder_attention_mask"))
    mask = padded(kwargs.get("attention_mask"), choices=True)
    return mask, mask


def _squared_norms(rows):
    """The squared norm of each row of an (n, m) tensor, in float32 at least (a half one's are summed in float32)."""
    return torch.linalg.vector_norm(rows, dim=1, dtype=torch.float32 if rows.element_size() < 4 else None).pow(2)


def _padding_layout(mask):
    """How an (n, T) or (n, C, T) attention_mask pads: None (no mask, or no padding), "right" (each row's real tokens
    first), or "other" (left padding, or gaps)."""
    if mask is None or bool(mask.all()):
        return None
    return "right" if bool((mask[..., 1:] <= mask[..., :-1]).all()) else "other"


def _held_positions(keep):
    """Where a (T,) ``keep`` row, or a multiple-choice sample's (C, T) rows, hold a token in some row: (T,) bools."""
    return keep.reshape(-1, keep.shape[-1]).bool().any(0)


def _unpadded(args, kwargs, keep, decoder_keep=None, features=()):
    """A one-sample call with the positions its (T,) ``keep`` row marks as padding cut out (None: none), and those
    that ``decoder_keep`` marks out of the decoder's inputs (``decoder_*``) of an encoder-decoder model: the sample
    as it is alone (SPEC §1), whatever the layouts of the model's layers. A Hugging Face input (input_ids,
    position_ids, ...) of shape (1, T, ...) is cut in dim 1; any other tensor of shape (1, T, ...) in every dim of
    length T after the first (a (1, T, T) attention bias), but for the inputs named in ``features`` (keyword names,
    positions of positional arguments: an (n, T, F) input whose F equals T, :meth:`Engine._unpadded`), cut in dim 1
    only. A (C, T) ``keep`` (a multiple-choice sample's rows) cuts the positions padded in all its rows out of dim 2
    of its (1, C, T, ...) inputs. Returns (args, kwargs, the inputs cut in a dim after their first of length T)."""
    squares = set()

    def positions(row):  # (its shape, the indices it keeps), found once per call
        return None if row is None else (row.shape, _held_positions(row).nonzero().squeeze(1))

    def cut(t, kept, every, slot):
        if kept is None or not torch.is_tensor(t) or t.shape[:len(kept[0]) + 1] != (1, *kept[0]):
            return t
        first, length = len(kept[0]), kept[0][-1]
        for d in range(first, t.dim() if every else first + 1):
            if t.shape[d] == length:
                t = t.index_select(d, kept[1])
                if d > first:
                    squares.add(slot)
        return t

    enc, dec = positions(keep), positions(decoder_keep)
    args = tuple(torch.utils._pytree.tree_map(lambda t, i=i: cut(t, enc, i not in features, i), a)
                 for i, a in enumerate(args))
    kwargs = {k: torch.utils._pytree.tree_map(
        lambda t, k=k, kept=dec if k.startswith("decoder_") else enc,
        every=k not in _PER_SAMPLE_KEYS and k not in features: cut(t, kept, every, k), v) for k, v in kwargs.items()}
    return args, kwargs, squares


def _padded_rows(mask, where, engine):
    """A one-sample (1, C, T) ``mask`` once its positions padded in all rows are cut (:func:`_unpadded`): None where
    no row is padded any more, else that cut mask (the rows' own lengths differ: the sample alone is still padded, and
    its padded positions stay out of its output and, in l-MAS, of its layers'). Padded otherwise than on the right,
    its rows are other inputs than alone (absolute positions shift), which no run of the sample can undo: a
    warning, once."""
    if mask is None or mask.dim() < 3:
        return None
    rest = mask[..., _held_positions(mask)]
    if bool(rest.all()):
        return None
    if _padding_layout(rest) != "right" and not engine.rows_said:
        engine.rows_said = True
        warnings.warn(f"batch {where}: a sample's rows of tokens (an (n, C, T) attention_mask) have different lengths "
                      "and are padded on the left or with gaps: alone, the sample is still padded so, and its Ω is "
                      "that of its padded rows, which differs from theirs unpadded where positions count the pads; pad "
                      "on the right", stacklevel=5)
    return rest


def _moves_only(module):
    """Whether a forward patched on the instance is accelerate's wrapper (``add_hook_to_module``) around the class's
    own forward: its hooks move tensors between devices (dispatch, offload), and the values stay the class's."""
    old = module.__dict__.get("_old_forward")
    return hasattr(module, "_hf_hook") and getattr(old, "__func__", None) is type(module).forward


def _batch_dim(module):
    """Where a module's inputs hold the batch: dim 1 for ``batch_first=False`` modules, else dim 0."""
    # batch_first looked up where it can be (the instance, or its class: a plain value or a property) before
    # getattr: on a module lacking it, nn.Module.__getattr__ raises and catches an AttributeError, which cost
    # more than the rest of the hook.
    if "batch_first" in module.__dict__:
        batch_first = module.__dict__["batch_first"]
    else:
        batch_first = getattr(module, "batch_first") if hasattr(type(module), "batch_first") else True
    return 1 if batch_first is False else 0


def _first_tensor(args, kwargs):
    if args and torch.is_tensor(args[0]):
        return args[0]
    return next((t for t in torch.utils._pytree.tree_flatten((args, kwargs))[0] if torch.is_tensor(t)), None)


def _mixed_shape(module, args, kwargs, n):
    """None where the call's first tensor input holds the batch's n samples in its batch dim (or the call has no
    tensor input); else that input's shape: the call mixes the samples (MoE experts on (n·T, D) tokens) or is
    shared by them (T5's relative-position bias on (T, T) buckets), and its rows are no sample's own."""
    t = _first_tensor(args, kwargs)
    dim = _batch_dim(module)
    return None if t is None or (t.dim() > dim and t.shape[dim] == n) else tuple(t.shape)


# Hugging Face's flattened visual inputs (Qwen2-VL and its kin): the patches of all the batch's images (videos) in
# one (patches, features) tensor, each one's count the product of its (t, h, w) grid row; the value of
# mm_token_type_ids that marks that modality's tokens (a run of them per image, or per frame: Qwen3-VL's videos);
# and the inputs that hold one entry per image (video).
_VISUAL = (("pixel_values", "image_grid_thw", 1, ()),
           ("pixel_values_videos", "video_grid_thw", 2, ("second_per_grid_ts",)))


def _visual_layout(kwargs, n):
    """[(values key, grid key, per-image keys, images per sample (n,), patches per image)] of the batch's flattened
    visual inputs: a sample's images are its runs of that modality's tokens in ``mm_token_type_ids`` (frames, where
    the runs count the grid's frames, each video taking its own), or one each where the grid has n rows and there
    is no mm_token_type_ids. Inputs whose layout cannot be told are left out (cut as any other input)."""
    out = []
    for values_key, grid_key, kind, per_image in _VISUAL:
        values, grid = kwargs.get(values_key), kwargs.get(grid_key)
        if not (torch.is_tensor(values) and torch.is_tensor(grid) and grid.dim() == 2 and values.dim() >= 1):
            continue
        patches = grid.prod(-1)
        if int(patches.sum()) != values.shape[0]:
            continue
        types = kwargs.get("mm_token_type_ids")
        if torch.is_tensor(types) and types.dim() == 2 and types.shape[0] == n:
            marked = (types == kind).int()
            runs = ((marked[:, 1:] - marked[:, :-1]) == 1).sum(1) + marked[:, 0]
            if int(runs.sum()) == grid.shape[0]:
                counts = runs
            elif int(runs.sum()) == int(grid[:, 0].sum()):  # a run per frame: videos taken whole, in order
                ends = torch.cumsum(grid[:, 0], 0)
                bounds = torch.cumsum(runs, 0)
                if not set(bounds.tolist()) <= set(ends.tolist()) | {0}:
                    continue
                taken = torch.searchsorted(ends, bounds, right=True)  # videos ended by each sample's last frame
                counts = torch.diff(taken, prepend=torch.zeros(1, dtype=torch.long))
            else:
                continue
        elif grid.shape[0] == n:
            counts = torch.ones(n, dtype=torch.long)
        else:
            continue
        out.append((values_key, grid_key, per_image, counts.tolist(), patches.tolist()))
    return out


def _visual_cut(kwargs, n, k):
    """{key: sample k's part} of the flattened visual inputs of a batch of n (:func:`_visual_layout`): its images'
    patches, grid rows and per-image entries; None for a sample without any."""
    out = {}
    for values_key, grid_key, per_image, counts, patches in _visual_layout(kwargs, n):
        first = sum(counts[:k])
        images = slice(first, first + counts[k])
        start = sum(patches[:first])
        keys = (values_key, grid_key, *(key for key in per_image if kwargs.get(key) is not None))
        if counts[k] == 0:
            out.update({key: None for key in keys})
            continue
        out[values_key] = kwargs[values_key][start:start + sum(patches[images])]
        out[grid_key] = kwargs[grid_key][images]
        for key in keys[2:]:
            out[key] = kwargs[key][images]
    return out


def _visual_patches_differ(kwargs, n):
    """Whether the samples of the batch have different numbers of flattened visual patches: layers on those patches
    then hold no n equal blocks of rows, and the batch runs one sample at a time."""
    return any(len({sum(patches[sum(counts[:k]):sum(counts[:k + 1])]) for k in range(n)}) > 1
               for _, _, _, counts, patches in _visual_layout(kwargs, n))


def _rows_beside_batch(in_dims, rows):
    """The flattened inputs that hold the batch's rows flattened in dim 0 (as learned from the sample run alone)
    beside inputs with a batch dim (DBRX's experts: their (n·T, k) routing beside the (n, T, D) tokens); empty where
    the call has none such, or nothing was learned."""
    if in_dims is None or not any(d is not None for d in in_dims):
        return frozenset()
    return frozenset(i for i, (d, r) in enumerate(zip(in_dims, rows[0])) if r and d is None)


def _alike_blocks(t, n):
    """Whether a tensor's n blocks of rows in dim 0 are all the same."""
    v = t.reshape(n, -1)
    return bool((v == v[:1]).all())


def _alike(args, kwargs, n):
    """Whether the batch's samples are all the same: every tensor of its call with n rows in dim 0 has them equal
    (a run of them one at a time then cannot tell whose rows a layer read)."""
    rows = [t for t in torch.utils._pytree.tree_flatten((args, kwargs))[0]
            if torch.is_tensor(t) and t.dim() > 0 and t.shape[0] == n]
    return bool(rows) and all(bool((t == t[:1]).all()) for t in rows)


def _one_sample(args, kwargs, n, k):
    """The call ``(args, kwargs)`` of a batch of n samples cut to sample k: every tensor of n rows in dim 0
    (the batch's inputs, its attention_mask) to row k, the flattened visual inputs to sample k's images
    (:func:`_visual_cut`); anything else (broadcast inputs, options) as it is."""
    def cut(t):
        return t[k : k + 1] if torch.is_tensor(t) and t.dim() > 0 and t.shape[0] == n else t

    visual = _visual_cut(kwargs, n, k) if kwargs else {}
    args, kwargs = torch.utils._pytree.tree_map(cut, (args, {key: v for key, v in kwargs.items() if key not in visual}))
    return args, {**kwargs, **visual}


def _expand_broadcast(module, args, kwargs, outs, n, learned):
    """A call whose first input has size 1 in the batch dim, where the batch has n samples (Hugging Face's
    (1, T) ``position_ids``), is every sample's own (SPEC §1): that input and the outputs of size 1 there are
    expanded to n, so each sample's gradient reaches the layer apart. ``learned``: whether the one-sample run found
    the batch in that input (a seq-first (1, n, D) input holds it in dim 1, and is no broadcast), where known.
    Returns (args, kwargs, outs, which): ``which`` the positions in ``outs`` expanded, None where nothing broadcasts."""
    dim = _batch_dim(module)
    if n == 1 or learned or (args and torch.is_tensor(args[0]) and (args[0].dim() <= dim or args[0].shape[dim] != 1)):
        return args, kwargs, outs, None  # the common case, decided without flattening the arguments
    flat, spec = torch.utils._pytree.tree_flatten((args, kwargs))
    first = next((i for i, t in enumerate(flat) if torch.is_tensor(t)), None)
    if first is None or flat[first].dim() <= dim or flat[first].shape[dim] != 1:
        return args, kwargs, outs, None

    def expand(t):
        return t.expand(*t.shape[:dim], n, *t.shape[dim + 1:])

    flat[first] = expand(flat[first])
    args, kwargs = torch.utils._pytree.tree_unflatten(flat, spec)
    which = [i for i, o in enumerate(outs) if o.dim() > dim and o.shape[dim] == 1]
    return args, kwargs, [expand(o) if i in which else o for i, o in enumerate(outs)], which


def _flattens_samples(in_dims, out_dims, rows, flat_out, pos, state):
    """Whether a call whose inputs hold the batch in dim 0 (or not at all) returns a floating output with no batch
    dim but n blocks of rows, one per sample (the batch's (n, T) positions flattened; with padding, all of them), and
    every other floating output so or with the batch in dim 0: the generic rule then takes each sample's blocks."""
    n = state.n
    return (all(d is None or (d == 0 and r) for d, r in zip(in_dims, rows[0]))
            and all(rows[1][i] and (out_dims[i] == 0 or (flat_out[i].shape[0] % n == 0 and (
                state.mask is None or flat_out[i].shape[0] in state.positions))) for i in pos)
            and any(out_dims[i] is None for i in pos))


def _positional(module, args, kwargs):
    """(args, kwargs) of a call with its keyword arguments that the forward also takes by position moved into args
    (``linear(input=h)``: the table's rules read ``call.args``); as they are where they do not bind."""
    try:
        bound = inspect.signature(type(module).forward).bind(module, *args, **kwargs)
    except (TypeError, ValueError):
        return args, kwargs
    return tuple(bound.args[1:]), dict(bound.kwargs)


def _batch_state(attributes, n):
    """Why a call cannot be rerun one sample at a time, where it replaced a tensor of the batch's n rows kept on one of
    its modules (a state it started from: RecurrentGemma's RG-LRU with a cache set up for the batch), else None."""
    for m, before in attributes.items():
        for k, v in before.items():
            if torch.is_tensor(v) and v.dim() > 0 and v.shape[0] == n and vars(m).get(k, _ABSENT) is not v:
                return (f"starts from '{k}' of shape {tuple(v.shape)} kept on its {type(m).__name__}, a state of the "
                        "batch's rows")
    return None


def _learned_dims(flat_in, flat_out, one, n, preferred, padded=False):
    """(the batch dim of each flattened input, of each output; which inputs and which outputs have n times the rows
    of one sample's in dim 0: the samples' rows flattened there (OPT's and the MoE layers' (n·T, D) tokens), or
    mixed so) of a call of a batch of n, from its tensors and the shapes of the same call in a run of one sample
    (``one``: (inputs, outputs)). (None, None, None) where there is no such call or it differs in structure; but,
    with ``padded``, an input that is a tensor only in the batch's call (an attention mask the model leaves out for
    a sample without padding: Gemma3n's sliding-window layers) has its batch dim read from its shape (n in dim 0),
    which the batch's padding check confirms."""
    shapes = [[tuple(t.shape) if torch.is_tensor(t) else None for t in flat] for flat in (flat_in, flat_out)]
    if one is None or any(len(f) != len(o) for f, o in zip(shapes, one)):
        return None, None, None
    # (2 dims at least, as masks are: a (n,) index, a permutation of the samples that the model sorts by length,
    # is not read so; a reviewer's model was 34-42% off)
    masks = {i for i, (a, b) in enumerate(zip(shapes[0], one[0])) if a is not None and b is None
             and padded and len(a) >= 2 and a[0] == n}
    if any((a is None) != (b is None) and i not in masks for i, (a, b) in enumerate(zip(shapes[0], one[0]))) or any(
            (a is None) != (b is None) for a, b in zip(shapes[1], one[1])):
        return None, None, None
    in_dims, out_dims = ([0 if a is not None and b is None else _rules.sample_dim(a, b, n, preferred)
                          for a, b in zip(f, o)] for f, o in zip(shapes, one))
    rows = tuple([a is not None and b is not None and len(a) > 0 and a[0] == n * b[0] and a[1:] == b[1:]
                  for a, b in zip(f, o)] for f, o in zip(shapes, one))
    return in_dims, out_dims, rows


_SESSIONS = threading.local()  # .open: how many Engine.session()s, of any MAS, are open in this thread


def pass_running():
    """Whether an importance pass of any MAS runs in this thread: the model calls it makes are no user's (another
    MAS observing the same model took them for traffic: 2-4× the samples, Ω far off)."""
    return getattr(_SESSIONS, "open", 0) > 0


_UNKNOWN = object()  # a batch dim not learned yet
_ABSENT = _rules.ABSENT
_BY_SAMPLE = "each batch is run one sample at a time from now on, which is exact and slower"
_PADDED_BY_SAMPLE = "batches with padding run one sample at a time from now on, without it (exact, slower)"


class ZeroBuffers(dict):
    """{global name: float32 buffer}, each made as zeros shaped like its parameter on first use: a pass
    allocates a layer's buffer only when that layer's gradients arrive, as a plain backward does its .grad,
    and a parameter no sample reaches costs nothing."""

    def __init__(self, params, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.params = params

    def __missing__(self, name):
        buf = self[name] = torch.zeros_like(self.params[name], dtype=torch.float32,
                                            memory_format=torch.contiguous_format)
        return buf


class _Tap(torch.autograd.Function):
    """Identity on a unit's floating outputs; its backward hands their gradients to ``sink``.

    Outputs that no backward of their own saves (``in_place``: those of the table's layers) are passed
    on in place, without a copy; others are copied, since marking them dirty would invalidate a saved
    tensor (a module ending in sigmoid saves its output). Views are always copied. ``layout``: the gradients
    go on in their outputs' memory formats (:func:`_layouts`)."""

    @staticmethod
    def forward(ctx, anchor, sink, in_place, layout, *outs):
        ctx.sink = sink
        ctx.formats = _layouts(outs) if layout else None
        res = []
        for o in outs:
            if in_place and not o._is_view():
                ctx.mark_dirty(o)
                res.append(o)
            else:
                res.append(o.clone())
        return tuple(res)

    @staticmethod
    def backward(ctx, *grads):
        if ctx.sink is not None:  # None once its pass has ended (a graph the model keeps on itself)
            ctx.sink(grads)
        if ctx.formats is not None:
            grads = tuple(g if f is None or g is None else g.contiguous(memory_format=f)
                          for g, f in zip(grads, ctx.formats))
        return (None, None, None, None, *grads)


# the norms whose CPU backward meets torch 2.13's batch_norm bug on a non-contiguous gradient (:func:`_layouts`)
_BATCH_NORMS = (torch.nn.modules.batchnorm._BatchNorm, torch.nn.modules.instancenorm._InstanceNorm)


def _layouts(outs):
    """The memory format of each 4-dim or 5-dim output (None for the others). torch 2.13's CPU backward of an
    eval-mode BatchNorm2d on one sample gives wrong gradients (its weight's, bias's and input's) where the gradient
    arriving at its output is channels-last and the output is not (LeViT's patch embedding: its output flattened
    and transposed): a batch run one sample at a time, or a batch of one, was 30-85% off there. InstanceNorm meets it
    too. The tap after a BatchNorm or an InstanceNorm hands its backward the gradient in the output's own format."""
    def fmt(t):
        if t.dim() not in (4, 5) or t.is_contiguous():
            return torch.contiguous_format if t.dim() in (4, 5) else None
        last = torch.channels_last if t.dim() == 4 else torch.channels_last_3d
        return last if t.is_contiguous(memory_format=last) else None
    return tuple(fmt(t) for t in outs)


class _Unit:
    """A module with tracked parameters, its rule, and the global names of those parameters."""

    def __init__(self, name, module, rule, names):
        self.name, self.module, self.rule, self.names = name, module, rule, names  # names: local -> global
        self.group = None
        self.repeats = False  # seen running more than once in one forward
        self.handled = False  # its tapped forward has handled the call now ending
        # whose backward meets torch 2.13's batch_norm bug on a non-contiguous gradient (Engine._record)
        self.holds_batch_norm = any(isinstance(m, _BATCH_NORMS) for m in module.modules())
        # its n·m-row input read as n blocks of rows: None until a batch confirms it (then the set of the batch sizes
        # that did: a misreading may agree by chance at one n, as a time-major (T·n, C) input of a BatchNorm did at
        # n = 2, 19% off at n = 3) or refutes it (False)
        self.blocks = None
        self.expands = None  # its batch-size-1 input expanded to n: None until a batch confirms (refutes) it
        self.attributes = None  # generic rule: {module of its subtree: its tensor (or None) attributes} before a call
        self.raw = None  # generic rule: (args, kwargs) of the call before the module's own pre-hooks, where it has any
        self.whole = False  # it owns all the parameters of its module's subtree
        # the units whose modules hold its module: those owning their subtrees (its calls within theirs are theirs),
        # and g-MAS guards, modules of the generic rule with parameters of their own beside it (plan_units)
        self.within, self.guards = [], []
        self.versions = None  # generic rule: the versions of the call's inputs before it (Engine._attributes_before)
        self.rng = None  # generic rule: the random number generators' states before it (Engine._attributes_before)
        # g-MAS generic rule: False once a batch run one sample at a time refuted each sample's gradient at its
        # parameters as their uses told it (Engine._swap_params); it runs the module again for them from then on
        self.shares_params = None
        self.gathers = False  # seen called on rows gathered from the batch's tokens by an index (_gathered)


class _Group:
    """Units that must be summed per sample before |·|: they share a parameter or run repeatedly."""

    def __init__(self, units):
        self.units = units
        self.calls = []  # (unit, Call) recorded this batch
        self.pending = []  # calls whose gradients arrived

    @property
    def simple(self):
        return len(self.units) == 1 and len(self.calls) == 1


# the layers whose calls may have their batch dim moved in front (Engine._record)
_LAYOUT_FREE = (torch.nn.Linear, torch.nn.Embedding, torch.nn.LayerNorm, torch.nn.RMSNorm)


def _ready(group):
    """Whether the gradients of all of the group's calls have arrived, and its rules can run now: not while a call's
    parameters read as shared tensors wait for the rest of the backward (the group runs after it)."""
    return len(group.pending) == len(group.calls) and not any(
        c.params is not None and c.params.site is not None for _, c in group.calls)


class _Pass:
    """State of the importance pass over one batch: ``mask`` and ``out_mask`` mark the padding of its inputs and of
    the model's output (:func:`_padding`), if any; ``patches``: with padding, the totals of the batch's flattened
    visual patches (equal per sample), whose rows the vision tower's layers hold as n blocks."""

    def __init__(self, n, bufs, anchor, mask=None, out_mask=None, patches=(), positions=()):
        self.n, self.bufs, self.anchor, self.mask, self.out_mask = n, bufs, anchor, mask, out_mask
        self.patches = patches
        self.graph = False  # an l-MAS pass that records its graph (Engine._forward_backward)
        # with padding, the counts of the batch's (n, T) positions flattened: the inputs' and, where the decoder of an
        # encoder-decoder model has its own, the decoder's (NLLB-MoE's decoder routers on (n·T', D) tokens)
        self.positions = positions
        # and the counts of the tokens that the masks (the inputs', the decoder's) mark: packed tokens make those
        self.packed = {int(m.sum()) for m in (mask, out_mask) if m is not None and m.numel()}
        self.calls = {}  # unit -> number of calls in this forward
        self.nograd = []  # units seen running with gradients disabled, not yet warned of (g-MAS: nothing reaches them)
        self.busy = False  # a rule is running: its own module calls (torch.func) are not recorded
        self.mixed = []  # (unit, why) of calls whose rows are no sample's own (per_sample, n > 1)
        self.expanded = []  # units whose batch-size-1 input (and outputs) were expanded to n
        self.tentative = []  # units whose n·m-row input was read as n blocks of rows, not yet confirmed
        self.row_samples = {}  # the autograd node of each gathered call's tapped output -> its rows' samples
        self.alike_blocks = set()  # units whose rows read as n blocks (Call.in_blocks) were alike in every block
        self.taken = {}  # the rows the gathers took, by the tensor they took them out of (_gathered.row_samples)
        self.gathered_rows = {}  # unit -> the rows its gathered calls took in this batch
        # the calls of hosts (Engine._hosts): [module, the sequence numbers where it started and ended (None until
        # then)], in the order they started
        self.host_spans = []
        self.forward_failed = False  # the model's forward itself raised
        self.unlike_probe = False  # a call unlike any of the probe's (see Engine.learn_dims): learn again
        self.unmasked = None  # what holds the padded positions where they cannot be told (local mode, the output)
        self.norms = None  # with padding, each sample's ||f||^2 at its real positions, (n,) (Engine._spot_check)
        self.shared = None  # the _shared.Site of the outputs that all samples share (g-MAS per sample), once one shows
        self.sharing = []  # the units whose outputs those are
        self.block_rows = set()  # the row counts of the calls read as n blocks of rows, one per sample, so far
        # unit -> the _graph.Span of each of its calls (the autograd nodes each made), and the starts of its calls now
        # running; the span of the call that has just ended (its seam is the tap the engine puts after it), and the
        # sequence numbers of the taps' nodes
        self.spans, self.started, self.last, self.taps = {}, {}, None, set()
        self.since = _graph.next_sequence_nr()  # the first sequence number of the pass's nodes
        # {name: why} of parameters taken whole as a gradient reaches them past their rules
        self.escaped = {}
        self.modified = []  # the spans of generic calls that modified their own inputs in place (their reruns cannot)
        self.own_all = set()  # the modules of guards whose forwards read their units' weights outside their calls
        self.backward = False  # its backward runs (g-MAS)
        # the units called whose parameters the batch's graph does not read, and those parameters of the units called
        # (g-MAS: Engine._read_outside)
        self.idle, self.unread = set(), set()
        # the parameters of generic calls read as shared tensors (Engine._swap_params): the _Swap of each call now
        # running, that of the call that has just ended (for its record), and (unit, the uses' signature) of the calls
        # whose uses told each sample's gradient
        self.swapped, self.param_entry, self.params_used = [], None, []
        # the nodes of its taps, which the pass lets go of when it ends (a graph the model keeps on itself,
        # RecurrentGemma's recurrent state, kept the pass and its buffers), and the _Swap of each call whose parameters
        # a site reads (the backward takes the batch's gradient at their views; the pass closes their sites)
        self.tap_nodes, self.entries = [], []
        # parameters read as shared tensors for the whole pass ({global name: (module, {name: parameter}, root)}), and
        # those to be so in the batch's next try (Engine._swap_leaves)
        self.leaf_roots, self.new_leaves = {}, set()


class _Swap:
    """A call of the generic rule whose module's own parameters (``originals``, {local name: parameter}) read as the
    roots of ``site`` (``roots``: Shared where the site is not None), views of them (``views``, plain: the backward's
    inputs), made by the nodes numbered ``seqs``; ``box`` gets the batch's gradient at each after the backward.
    ``names``: every name of the module's parameters that holds one of them (a parameter registered twice)."""

    __slots__ = ("unit", "module", "originals", "site", "roots", "views", "box", "seqs", "names")

    def __init__(self, unit, module, originals, site, roots, views, seqs, names):
        self.unit, self.module, self.originals, self.site, self.roots, self.views, self.seqs, self.names = \
            unit, module, originals, site, roots, views, seqs, names
        self.box = {}

    def restore(self):
        for k, p in self.names.items():
            self.module._parameters[k] = p


@contextlib.contextmanager
def _probe(graph=False):
    """The engine's own run of the model outside a pass (a sample alone): without gradients (with ``graph``, its
    graph without activations: :func:`_graph_only`) and, as in a pass, without the cyclic collector (observers tell
    its calls from the user's by the session: :func:`pass_running`)."""
    with _graph_only() if graph else torch.no_grad(), _gc_paused():
        yield


def _drop_floating(t):
    return None if t.is_floating_point() or t.is_complex() else t


def _same(t):
    return t


@contextlib.contextmanager
def _graph_only():
    """Autograd records the graph of a forward that no backward follows (an l-MAS pass: :mod:`_gathered` reads
    which sample each gathered row is from its index nodes), keeping the index tensors its nodes save and none of
    the activations: a graph of the nodes and their integer tensors, not a training forward's memory."""
    with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(_drop_floating, _same):
        yield


@contextlib.contextmanager
def _rules_outside_graph():
    """A rule's arithmetic within a forward that :func:`_graph_only` records: no graph of it, and without that
    context's saved-tensor hooks where they are the innermost (torch.func's transforms, the generic rule's vmap,
    refuse any; a rerun for the gradient needs what it saves). Hooks the model set inside it stay (as in any pass)."""
    autograd = torch._C._autograd
    top = autograd._top_saved_tensors_default_hooks(False)
    ours = top is not None and top[0] is _drop_floating
    if ours:
        autograd._pop_saved_tensors_default_hooks()
    try:
        with torch.no_grad():
            yield
    finally:
        if ours:
            autograd._push_saved_tensors_default_hooks(*top)


@contextlib.contextmanager
def _gc_paused():
    """Python's cyclic garbage collector off within (where it was on); also a decorator."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def _holds_only(module):
    """Whether ``module`` has no forward of its own (ParameterDict, ParameterList, ModuleDict): a container."""
    return type(module).forward is torch.nn.Module.forward


def _held(module, prefix=""):
    """(name, parameter) of the parameters held for ``module``'s forward by containers (:func:`_holds_only`) among
    its children, theirs, and so on down a chain of containers."""
    for cn, c in module.named_children():
        if _holds_only(c):
            yield from ((f"{prefix}{cn}.{k}", p) for k, p in c.named_parameters(recurse=False))
            yield from _held(c, f"{prefix}{cn}.")


def ours(hook):
    """Marks a hook as the package's own (the engine's, observe()'s): :func:`user_pre_hooks` leaves it out."""
    hook.mas_ext = True
    return hook


def user_pre_hooks(module):
    """The module's forward pre-hooks that are not the package's own."""
    return [h for h in module._forward_pre_hooks.values() if not getattr(h, "mas_ext", False)]


def plan_units(net, params, local=False, owns_all=()):
    """The units of ``net`` for the tracked ``params`` ({global name: parameter}), each in its group.

    Table modules own their direct parameters; a table rule that reads its submodules' weights itself (MHA) and a
    parametrized layer own all their parameters. Any other module with direct parameters owns only those, and the
    layers inside it are units of their own (ConvNeXt's layer scale, ViT's class token, Swin's relative position
    table, CLIP's logit_scale beside their Linear and conv children): in l-MAS (``local``) each takes its own output;
    in g-MAS the module is a *guard* of the units inside it (:attr:`_Unit.guards`), whose forward may read their
    weights outside their calls, unseen by their rules. Every batch's graph tells (:meth:`Engine._read_outside`);
    where it does, the module owns all its parameters from then on (``owns_all``: its generic rule sees every read)."""
    ids = {id(p): n for n, p in params.items()}
    units, seen = [], set()

    def visit(prefix, module, holder=False):
        # A module registered at two paths is one unit (two made every call count twice), and one inside a unit that
        # owns its subtree is that unit's (a call of it elsewhere is a read outside that unit)
        if module in seen:
            return
        seen.add(module)
        rule = _rules.rule_for(module)
        parametrized = torch.nn.utils.parametrize.is_parametrized(module)
        if rule is not None and not rule.owns_children and (
                parametrized or any(torch.is_tensor(v) for v in vars(module).values())):
            # A weight computed from other parameters, by a parametrization (torch.nn.utils.parametrizations:
            # parametrizations.weight.original0/1) or by an old-style pre-hook (torch.nn.utils.weight_norm,
            # spectral_norm, prune: weight_g/weight_v, weight_orig, a plain tensor attribute): the table's rule, which
            # takes the gradient of `weight`, would give those parameters none. The generic rule over the whole layer
            # runs the parametrization or the hook; in l-MAS the layer's output, not the weight, is the gradient.
            rule = None
        # Parameters that are only aliases of a child's (BERT's prediction-head bias) make no unit here. A child
        # without a forward of its own that holds parameters (a ParameterDict: PEFT's IA³ scales and embedding LoRA
        # factors) holds them for this module's forward, which reads them: they are this module's direct ones.
        held = list(_held(module))
        if held:  # those that a layer below holds too (a PEFT bank shared by its layers) are that layer's
            below = {id(p) for m in module.modules() if m is not module and not _holds_only(m)
                     for _, p in (*m.named_parameters(recurse=False), *_held(m))}
            held = [(k, p) for k, p in held if id(p) not in below]
        if held and rule is not None and not rule.owns_children:
            rule = None  # the table's rule knows only the layer's own weights: the generic rule reads the rest too
        children = {id(p) for c in module.children() for p in c.parameters()} - {id(p) for _, p in held}
        direct = [] if holder else [(k, p) for k, p in (*module.named_parameters(recurse=False), *held)
                                    if id(p) not in children]
        whole = ((rule is None and (parametrized or (module in owns_all and not local)))
                 or (rule is not None and rule.owns_children))
        owned = module.named_parameters(remove_duplicate=False) if whole else direct
        names = {local: ids[id(p)] for local, p in owned if id(p) in ids}
        if names:
            units.append(_Unit(prefix.rstrip("."), module, rule or _rules.GENERIC, names))
            units[-1].whole = whole
        if whole:
            seen.update(module.modules())
        else:
            for child_name, child in module.named_children():
                visit(f"{prefix}{child_name}.", child, _holds_only(child))

    visit("", net)
    # The units inside another's module (a module registered under two parents is inside both): a guard's (g-MAS), and
    # one owning its subtree, whose rule takes the calls made within its own
    by_module = {u.module: u for u in units}
    for w in units:
        if w.whole or (not local and w.rule is _rules.GENERIC):
            for m in w.module.modules():
                u = by_module.get(m)
                if u is not None and u is not w:
                    (u.within if w.whole else u.guards).append(w)
    # Group units that share a parameter (tied weights): their per-sample gradients add up.
    owner = {}
    for u in units:
        groups = {owner[g] for g in u.names.values() if g in owner}
        merged = _Group([u] + [v for grp in groups for v in grp.units])
        for v in merged.units:
            v.group = merged
            for g in v.names.values():
                owner[g] = merged
    return units


class Engine:
    """The importance pass over a model's tracked parameters.

    Args:
        net: the unwrapped model.
        params: {global name: tracked parameter}.
        mode, per_sample, output_fn: as in :class:`ReferenceMAS` (read at every pass).
        kernels: the device gate of the compiled kernels, ``tensors -> bool`` (``FusedMAS._kernels_for``),
            or None: the reference path only.
    """

    def __init__(self, net, params, mode, per_sample, output_fn=None, kernels=None):
        self.net, self.params, self.kernels = net, params, kernels
        # the module a batch's call runs: the model, or (observe) a module inside it that holds all the model's
        # parameters and was called on its own (the model a PEFT wrapper's generate() calls)
        self.entry = net
        self.mode, self.per_sample, self.output_fn = mode, per_sample, output_fn
        self._plan = None  # (local, the units planned for that mode)
        self._owners = {}  # id(tracked parameter) -> (its global name, its units), planned with them
        # the guards (plan_units) that own all their parameters all the same (g-MAS): their forwards read a weight of a
        # unit inside them outside its calls (Engine._read_outside)
        self.owns_all = set()
        # global name -> the innermost host (Engine._hosts) around a read of it outside its units, which did not run
        # (LFM2's conv weight): it owns the parameter where a shared read of it cannot tell each sample's gradient
        self.host_of = {}
        self._installed = None  # the hooks and tapped forwards of the units (session), while installed
        self.no_expand = False  # set once the model failed on an expanded batch-size-1 input
        # the signatures (_shared.Site.signature) of the uses of shared outputs confirmed by a one-sample run
        self.shares_confirmed = set()
        # parameters of units that a pass did not call, read outside them into the batch's rows (DeBERTa's relative
        # embeddings, read as rel_embeddings.weight): read as shared tensors from the pass's start (_swap_leaves),
        # their uses tell each sample's gradient; and those whose uses could not
        self.leaves, self.leaves_refuted = set(), set()
        self.pads_confirmed = set()  # the padding layouts (inputs', output's) whose first batch agreed with its samples'
        self.pad_by_sample = False  # set once padding showed in a layout that cannot be told: padded batches by sample
        self.by_sample = False  # set once a batch showed rows that are no sample's own: one-sample passes from then
        self.visual_said = False  # the warning for batches whose samples have different numbers of visual patches
        self.uneven_said = False  # the warning for batches whose routing took some tokens more often than others
        self.batch_pad_said = False  # per_sample=False: the warning for a padded sample whose output is not its own
        # the inputs of the user's cut in a dim after their first of length T (Engine._unpadded): decided, and those
        # found to be (n, T, F) inputs whose F equalled T, cut in dim 1 only
        self.squares, self.features = set(), set()
        self.rows_said = False  # the warning for samples whose rows of tokens are still padded alone (_padded_rows)
        self.nograd_said = set()  # units warned of running with gradients disabled in a g-MAS pass (_record)
        self.generic_said = set()  # FusedMAS: the module classes warned of having no fused rule (units)
        self.alone_rows = None  # while a batch's check runs its samples alone: {unit: the rows its gathers took}
        # l-MAS: the names of units called in learn_dims's run on rows gathered by an index out of the batch's rows
        # (a count that depends on the data: x[mask], x[idx]; "index") or flattened time-major ("transposed"). The
        # pass records a graph then (_graph_only), in which :mod:`_gathered` tells each gathered row's sample, as
        # g-MAS's does (no shape can: n rows are not one per sample), and refuses time-major rows as n blocks
        self.gathered_alone = {}
        # set once the model's forward failed while that graph was recorded and ran without it (torch.func.grad within
        # it): the units of gathered rows then run their batches one sample at a time
        self.graph_refused = False
        # learn_dims: {unit: [(input shapes, output shapes) of each call]} in a run of one sample alone (False where the
        # model failed so: batch dims are read from shapes then), and {unit: [(in_dims, out_dims, rows) of each call]}
        self.one, self.dims = None, {}
        # the shape of the model's output (what _output picks) in that run, and where the output holds the batch,
        # learned from it on the first padded batch (_UNKNOWN until then)
        self.one_out, self.out_dim, self.one_lens, self.one_sizes = None, _UNKNOWN, set(), set()
        # whether dim 1 of the model's output holds its positions, where the probe's shapes could not tell (a
        # classifier's K logits where K was the probed sample's length): a padded sample alone says (_out_positions)
        self.out_positions = None
        self.out_probed = False  # that run done (once: where it failed or could not tell, the shapes decide)
        self._pass = None  # the _Pass of the batch now running

    def _use_kernels(self, tensors):
        return self.kernels is not None and self.kernels(tensors)

    @property
    def units(self):
        """The units of the current mode (:func:`plan_units`), planned again where the mode changed."""
        local = self.mode == "local"
        if self._plan is None or self._plan[0] != local:
            self._plan = (local, plan_units(self.net, self.params, local, self.owns_all))
            self.one, self.dims = None, {}  # learned per unit
            self._owners = {}  # id(parameter) -> (its global name, its units)
            for u in self._plan[1]:
                for g in u.names.values():
                    self._owners.setdefault(id(self.params[g]), (g, []))[1].append(u)
            self._say_generic()
        return self._plan[1]

    def _say_generic(self):
        """FusedMAS (SPEC §2: the reference path with a warning where no kernel applies): one warning naming the
        module classes of its units that no fused rule covers, once per class."""
        if self.kernels is None:
            return
        classes = sorted({type(u.module).__name__ for u in self._plan[1] if u.rule.fused is None} - self.generic_said)
        if classes:
            self.generic_said.update(classes)
            warnings.warn(f"FusedMAS: no fused kernel applies to {', '.join(classes)}: their parameters' importance "
                          "takes the reference path (torch.func per-sample gradients), exact and slower; "
                          "mas_ext.register_rule gives a layer its own", stacklevel=7)

    def batch_size(self, args, kwargs, where):
        """The number of samples n of the model call ``(args, kwargs)``, checked against the parameters'
        device (``where`` names the batch in errors). Their dtype is the model's to check: many cast their inputs
        (a bfloat16 ViT its float32 pixel_values); where the pass fails, :meth:`dtype_error` names a mismatch."""
        x = _sample_tensor(args, kwargs)
        if x is None:
            raise TypeError(f"batch {where}: no tensor input to take the batch size from")
        if x.dim() == 0 or x.shape[0] == 0:
            raise ValueError(f"batch {where}: empty input of shape {tuple(x.shape)}")
        p = next(iter(self.params.values()))
        if x.device != p.device:
            raise ValueError(f"batch {where}: input on {x.device} but the model's parameters are on {p.device}")
        return x.shape[0]

    def dtype_error(self, args, kwargs, where, error):
        """A TypeError naming the batch's inputs whose dtype none of the parameters has, where the pass failed with
        ``error`` (a RuntimeError) and there are such inputs (an int64 batch into an MLP, a float64 one into a float32
        model): else None, and the error stands as it is."""
        dtypes = {p.dtype for p in self.params.values()}
        flat = torch.utils._pytree.tree_flatten((args, kwargs))[0]
        odd = [t.dtype for t in flat if torch.is_tensor(t) and t.is_floating_point() and t.dtype not in dtypes]
        x = _sample_tensor(args, kwargs)
        if not odd and x is not None and not x.is_floating_point() and (
                "dtype" in str(error) or "scalar type" in str(error)):
            odd = [x.dtype]
        if not odd:
            return None
        return TypeError(f"batch {where}: input dtype {odd[0]} differs from the parameters' "
                         f"{', '.join(sorted(str(d) for d in dtypes))}, and the model raised on it "
                         f"({type(error).__name__}: {str(error)[:200]})")

    @contextlib.contextmanager
    def session(self):
        """Around :meth:`run`: eval mode (restored per module), the MHA fast path off (it skips submodule
        hooks), Hugging Face caches off, unit hooks on, tapped forwards installed, compiled submodules run
        eagerly."""
        modes = [(m, m.training) for m in self.net.modules()]
        fastpath = torch.backends.mha.get_fastpath_enabled()
        self._install()
        if any(training for _, training in modes):
            self.net.eval()
        torch.backends.mha.set_fastpath_enabled(False)
        # The pass reads no cache, and a layer that the generic rule runs again would advance one a second time
        # (Mamba's mixer updates its conv state in place: an error under torch.func). Configs are restored as modes.
        configs = {id(c): c for m in self.net.modules() for c in [getattr(m, "config", None)]
                   if getattr(c, "use_cache", None) is True}
        for c in configs.values():
            c.use_cache = False
        # Compiled submodules run eagerly: a compiled graph does not run the taps' backward as eager does
        # (g-MAS through a torch.compile'd forward gave wrong Ω).
        eager = getattr(torch.compiler, "set_stance", None)
        _SESSIONS.open = getattr(_SESSIONS, "open", 0) + 1
        try:
            with eager("force_eager") if eager is not None else contextlib.nullcontext():
                yield
        finally:
            _SESSIONS.open -= 1
            self._uninstall()
            torch.backends.mha.set_fastpath_enabled(fastpath)
            for c in configs.values():
                c.use_cache = True
            for m, training in modes:
                if m.training != training:
                    m.training = training

    def _install(self):
        """The units' hooks and tapped forwards (:meth:`session`), kept for :meth:`_uninstall`."""
        # First among the module's forward hooks: a user's hook that changes the output (accelerate's, a mask)
        # comes after the tap, so the gradient the rule gets is the one at the layer's own output.
        handles = [u.module.register_forward_hook(self._hook_for(u), with_kwargs=True, prepend=True)
                   for u in self.units]
        # global forward hooks (register_module_forward_hook) run within every call, before the engine's: a table rule
        # would not see what they compute (a term added to the output from the layer's weight; 33% off)
        hooked = bool(torch.nn.modules.module._global_forward_hooks)
        for u in self.units:  # a forward patched on the instance may compute something else than its class's rule
            if (("forward" in u.module.__dict__ and not _moves_only(u.module)) or hooked) and u.rule is not _rules.GENERIC:
                u.rule = _rules.GENERIC
            # a table rule whose reference path is the generic rule (MHA, the MoE experts): where the module has
            # pre-hooks of its own, both paths take the generic rule, which runs them again from the call's arguments
            # before them (the fused path reads them after: FusedMAS and ReferenceMAS differed by 36%)
            if u.rule is not _rules.GENERIC and u.rule.grads is _rules.generic_grads and user_pre_hooks(u.module):
                u.rule = _rules.GENERIC
        tapped = [u for u in self.units if self.mode == "global" and self.per_sample
                  and u.rule.tapped_forward is not None and len(u.group.units) == 1
                  and "forward" not in u.module.__dict__
                  and set(u.names) == {k for k, _ in u.module.named_parameters()}
                  and self._use_kernels(list(u.module.parameters()))]
        for u in tapped:
            u.module.forward = functools.partial(self._tapped_forward, u)
        # the generic rule runs a module again: its tensor attributes as they were before the call (RecurrentGemma's
        # RG-LRU keeps its last recurrent state on itself, which a second run would start from)
        handles += [u.module.register_forward_pre_hook(self._attributes_before(u), prepend=True, with_kwargs=True)
                    for u in self.units if u.rule.grads is _rules.generic_grads]
        # Each call's span of autograd sequence numbers (g-MAS: Engine._read_outside), from the first of the module's
        # pre-hooks where the generic rule runs it again (from the call's arguments before them), else from its forward,
        # to its own output (before the tap and the user's forward hooks, which its rule does not see)
        handles += [h for u in self.units for h in (
            u.module.register_forward_pre_hook(self._started(u), prepend=u.rule is _rules.GENERIC),
            u.module.register_forward_hook(self._ended(u), prepend=True, always_call=True))]
        if self.mode == "global" and self.per_sample:
            handles += [h for m in self._hosts() for h in (
                m.register_forward_pre_hook(self._host_started, prepend=True),
                m.register_forward_hook(self._host_ended, always_call=True))]
        self._installed = (handles, tapped)

    def _hosts(self):
        """The modules with a forward that hold units without being units (nor the model): LFM2's short conv, which
        hands its Conv1d's weight to a function. A unit's weight read within such a call, outside the unit's own, has
        the innermost one own all its parameters (:meth:`_read_outside`), as a guard does."""
        units = {u.module for u in self.units}
        hosts = {}
        for m in self.net.modules():
            if m is self.net or m is self.entry or m in units or type(m).forward is torch.nn.Module.forward:
                continue
            if any(c in units for c in m.modules() if c is not m):
                hosts[m] = None
        return list(hosts)

    @ours
    def _host_started(self, module, args):
        state = self._pass
        if state is not None and not state.busy and not state.backward:
            state.host_spans.append([module, _graph.next_sequence_nr(), None])

    @ours
    def _host_ended(self, module, args, out):
        state = self._pass
        if state is not None and not state.busy and not state.backward:
            span = next((sp for sp in reversed(state.host_spans) if sp[0] is module and sp[2] is None), None)
            if span is not None:
                span[2] = _graph.next_sequence_nr()

    def _uninstall(self):
        handles, tapped = self._installed or ((), ())
        self._installed = None
        for u in tapped:
            del u.module.forward
        for h in handles:
            h.remove()

    def _own_all(self, modules):
        """``modules``, guards whose forwards read a weight of a unit inside them outside its calls (Mamba's mixer
        hands its conv's weight to a function), own all their parameters from now on, through the generic rule, which
        sees every read: the units are planned again, their hooks installed again."""
        self.owns_all |= set(modules)
        installed = self._installed is not None
        if installed:
            self._uninstall()
        self._plan = None
        if installed:
            self._install()

    def run(self, args, kwargs, n, bufs, where):
        """One batch of n samples, the model called as ``net(*args, **kwargs)``, inside :meth:`session`: its
        Σ_k |∂_k| (|Σ_k ∂_k| with ``per_sample=False``) into ``bufs`` (a :class:`ZeroBuffers`, empty or all
        zero): a batch in which a unit turns out to run more than once is redone from zero, and one in
        which a unit's input rows are no sample's own (per_sample) is run one sample at a time. Padding
        marked by an (n, T) ``attention_mask`` keyword (or a multiple-choice head's (n, C, T)) is left out."""
        args, kwargs = _by_name(self.entry, args, kwargs)
        if kwargs.get("use_cache"):  # as the configs' (session): the pass keeps no cache
            kwargs = {**kwargs, "use_cache": False}
        if n > 1 and self.by_sample:
            return self._run_sample_by_sample(args, kwargs, n, bufs, where)
        if n > 1 and self.per_sample and kwargs and _visual_patches_differ(kwargs, n):
            if not self.visual_said:  # once: it is each such batch's own layout
                self.visual_said = True
                warnings.warn(f"batch {where}: its samples have different numbers of image or video patches (flattened "
                              "in one tensor, which no layer can split by sample): such batches run one sample at a "
                              "time, which is exact and slower", stacklevel=4)
            return self._run_sample_by_sample(args, kwargs, n, bufs, where)
        if n > 1 and self.one is None:
            self.learn_dims(args, kwargs, n, where)
        mask, out_mask = _padding(kwargs, n)
        # an encoder-decoder model: its own mask for the decoder's positions (which may be the encoder's tensor)
        decoder = any(kwargs.get(k) is not None for k in _DECODER_INPUTS)
        if n == 1 and all(m is None or not bool(m.any()) for m in (mask, out_mask)) and (
                mask is not None or out_mask is not None):
            return  # a sample all padding: ||f||^2 sums over no positions, and adds nothing (SPEC §1)
        if n == 1 and (mask is not None or out_mask is not None):  # one sample: as it is alone, without its padding
            args, kwargs = self._unpadded(args, kwargs, None if mask is None else mask[0],
                                          None if out_mask is None or not decoder else out_mask[0])
            mask = out_mask = _padded_rows(mask, where, self)
        if (out_mask is not None and self.one and not self.out_probed and len(self.one_out) > 1
                and self.one_out[1] in self.one_lens):
            self._out_positions(args, kwargs, n, mask, out_mask, decoder, where)
        # l-MAS of an encoder-decoder model: the encoder's mask cannot tell the decoder layers' positions
        if n > 1 and (self.pad_by_sample or (decoder and self.mode == "local")) and (
                mask is not None or out_mask is not None):
            return self._run_sample_by_sample(args, kwargs, n, bufs, where)
        # with padding, the totals of the flattened visual patches (equal per sample here): rows of the vision tower
        patches = {sum(layout[4]) for layout in _visual_layout(kwargs, n)} if mask is not None and kwargs else set()
        # with padding, the counts of the (n, T) positions flattened: the inputs', and the decoder's where they are not
        # as many as the inputs' tokens (which a layer on them packed by the mask would have)
        # (and with an (n, C, T) mask, the n·C rows of tokens: a multiple-choice head's pooled rows)
        positions = set() if mask is None else {mask.numel(), *(
            t.shape[0] * t.shape[1] for t in (kwargs.get(k) for k in _DECODER_INPUTS)
            if torch.is_tensor(t) and t.dim() > 1 and t.shape[0] * t.shape[1] != int(mask.sum())),
            *((mask.numel() // mask.shape[-1],) if mask.dim() > 2 else ())}
        learned_again = False
        for attempt in range(3):  # a retry once the dims are learned again, one once the units that repeat are marked
            if attempt:
                for b in bufs.values():
                    b.zero_()
            state = _Pass(n, bufs, torch.zeros((), device=next(iter(self.params.values())).device,
                                               requires_grad=True), mask, out_mask, patches, positions)
            try:
                calls = self._forward_backward(args, kwargs, where, state)
                while state.own_all or state.new_leaves:
                    # guards that read their units' weights outside their calls own them; parameters read outside
                    # units that did not run are read as shared tensors: again
                    if state.own_all:
                        self._own_all(state.own_all)
                        if n > 1:
                            self.learn_dims(args, kwargs, n, where)
                    self.leaves |= state.new_leaves
                    for b in bufs.values():
                        b.zero_()
                    state = _Pass(n, bufs, state.anchor, mask, out_mask, patches, positions)
                    calls = self._forward_backward(args, kwargs, where, state)
            except Exception as e:  # noqa: BLE001 - re-raised unless an expanded input explains it
                if self.mode == "local" and self.gathered_alone and not self.graph_refused:
                    # the model may not run while its graph is recorded without activations (_graph_only): again
                    # without it, which, where it runs, it is from now on
                    for b in bufs.values():
                        b.zero_()
                    self.graph_refused = True
                    try:
                        done = self.run(args, kwargs, n, bufs, where)
                    except Exception:
                        self.graph_refused = False
                        raise e  # noqa: B904 - the model's own error, as it was raised
                    self._say_graph_refused(e)
                    return done
                if not state.expanded or self.no_expand or not state.forward_failed:
                    raise
                # The model relied on that size-1 dim (DeBERTa-v2 repeats its (1, 2k, D) relative embeddings by
                # it): expand nothing from now on. Per sample, those calls are then no sample's own rows: in g-MAS,
                # outputs all samples share where their uses tell each sample's gradient (Engine._share), else the
                # batch runs one sample at a time (whose warning says why); in l-MAS, one sample at a time.
                self.no_expand = True
                names = ", ".join(f"'{u.name}'" for u in dict.fromkeys(state.expanded))
                why = (f"the model failed once {names} had an input of batch size 1 expanded to the batch's {n} "
                       f"({type(e).__name__}: {str(e)[:200]}); nothing is expanded from now on")
                if self.per_sample and self.mode == "local":
                    return self._by_sample_from_now(why, args, kwargs, n, bufs, where)
                if not self.per_sample:
                    warnings.warn(why, stacklevel=4)
                for b in bufs.values():
                    b.zero_()
                return self.run(args, kwargs, n, bufs, where)
            unlike = self._calls_unlike_probe(calls) if n > 1 and self.per_sample else None
            if unlike is not None:
                state.unlike_probe = True
                state.mixed.append(unlike)
            if state.mixed and state.unlike_probe and not learned_again:
                learned_again = True  # the model called its layers otherwise than in the batch it learned from
                self.learn_dims(args, kwargs, n, where)
                continue
            if state.unmasked is not None and not state.mixed:
                return self._by_sample_from_now(f"{state.unmasked} has the batch's padded length in a layout whose "
                                                "padding cannot be told", args, kwargs, n, bufs, where, padded=True)
            if state.mixed:
                unit, why = state.mixed[0]
                return self._by_sample_from_now(f"module '{unit.name}' ({type(unit.module).__name__}) {why}",
                                                args, kwargs, n, bufs, where)
            # A unit that ran more than once was handled call by call (local mode, or a tapped forward):
            # redo the batch with its calls summed per sample.
            repeats = [u for u, k in calls.items() if k > 1 and not u.repeats
                       and (self.mode == "local" or "forward" in u.module.__dict__)]
            if not repeats:
                break
            for u in repeats:
                u.repeats = True
        if state.taken and _gathered.uneven(state.taken, mask):
            # routing that dropped tokens in this batch (capacity counted over its tokens): each sample's own,
            # alone, is not the batch's to be read in it
            if not self.uneven_said:
                self.uneven_said = True
                warnings.warn(f"batch {where}: experts on the tokens routed to them took some tokens more often than "
                              "others (routing that drops tokens, by a capacity counted over the batch's tokens, may "
                              "depend on the other samples; so may routing that gives tokens other numbers of "
                              "experts): such batches run one sample at a time, which is exact and slower",
                              stacklevel=4)
            for b in bufs.values():
                b.zero_()
            return self._run_sample_by_sample(args, kwargs, n, bufs, where)
        sharing, signature, params = [], None, []
        if state.shared is not None or state.params_used:
            # the uses of the shared outputs and of the parameters read as shared tensors, and the batch's padding:
            # positions read by the samples' shape (learned absolute ones) are other inputs under left padding, which
            # an unpadded batch cannot have confirmed
            signature = (tuple(u.name for u in state.sharing),
                         tuple(state.shared.signature) if state.shared is not None else (),
                         _padding_layout(mask), _padding_layout(out_mask),
                         tuple((u.name, used) for u, used in state.params_used))
            if signature not in self.shares_confirmed:
                sharing = list(dict.fromkeys(state.sharing))
                params = list(dict.fromkeys(u for u, _ in state.params_used))
        # the first batch of each padding layout: is each padded sample's output the sample's alone (SPEC §1)?
        layout = (_padding_layout(mask), _padding_layout(out_mask))
        padding = (layout if n > 1 and self.per_sample and layout != (None, None) and layout not in self.pads_confirmed
                   else None)
        # the later batches of a layout: its most padded sample's output against the sample's alone, and where they
        # differ, the batch checked as the layout's first was (its Ω against its samples' alone: a half model's
        # rounding may move a small output by a few per cent where the positions shift, and its Ω by less);
        # per_sample=False, which no run of the samples alone gives: every padded batch, until the padding shows
        spotted = (self._spot_check(args, kwargs, n, mask, out_mask, decoder, state.norms, where)
                   if layout != (None, None) and n > 1 and state.norms is not None
                   and (padding is None if self.per_sample else not self.batch_pad_said) else None)
        if spotted and self.per_sample:
            padding = layout
        elif spotted:
            self.batch_pad_said = True
            warnings.warn(f"{spotted}: with per_sample=False, Ω is taken from the padded batch's gradient, which "
                          "is not the sum of its samples' alone here (per_sample=True runs such batches one sample "
                          "at a time, exact)", stacklevel=4)
        if state.tentative or sharing or padding or params:
            self._confirm_blocks(args, kwargs, n, bufs, where, list(dict.fromkeys(state.tentative)),
                                 set(state.expanded), signature, sharing, padding, params, state.alike_blocks,
                                 state.gathered_rows if mask is None and out_mask is None else None)

    def _unpadded(self, args, kwargs, keep, decoder_keep):
        """:func:`_unpadded`, which cuts an input of the user's (not a Hugging Face one) in every dim of length T after
        the first: a (1, T, T) attention bias, but also an (n, T, F) input whose F happens to equal the padded length
        T (a model of hidden size 128 on batches padded to 128 tokens failed: its Linear got F cut). The first time
        inputs are cut so, the sample runs alone with them cut so (a forward without gradients); where that fails
        and cutting some of them in dim 1 only does not, those are :attr:`features`, cut so from then on."""
        cut_args, cut_kwargs, squares = _unpadded(args, kwargs, keep, decoder_keep, self.features)
        new = squares - self.squares
        if not new:
            return cut_args, cut_kwargs
        self.squares |= new  # decided once
        if self._runs_alone(cut_args, cut_kwargs):
            return cut_args, cut_kwargs
        # the fewest of them cut in dim 1 only (features beside a (n, T, T) bias: the features), a few tries at most
        tries = itertools.islice((set(c) for size in range(1, len(new) + 1)
                                  for c in itertools.combinations(sorted(new, key=str), size)), 8)
        for features in tries:
            one_args, one_kwargs, _ = _unpadded(args, kwargs, keep, decoder_keep, self.features | features)
            if self._runs_alone(one_args, one_kwargs):
                self.features |= features
                return one_args, one_kwargs
        return cut_args, cut_kwargs  # the model's own error, as it comes

    def _runs_alone(self, args, kwargs):
        """Whether the model runs on a one-sample call (a forward without gradients, which the pass does not see)."""
        try:
            with _probe():
                self._output(self.entry(*args, **kwargs), "", check=False)
            return True
        except Exception:  # noqa: BLE001 - which cut runs is all that is asked
            return False

    def _output_alone(self, args, kwargs, n, k, mask, out_mask, decoder, where):
        """The output of sample ``k`` of a padded batch of n run alone without its padding (a forward without
        gradients): the tensor whose norm MAS takes."""
        with _probe():
            one_args, one_kwargs = self._unpadded(*_one_sample(args, kwargs, n, k), None if mask is None else mask[k],
                                                  out_mask[k] if decoder and out_mask is not None else None)
            return self._output(self.entry(*one_args, **one_kwargs), where, check=False)

    def _spot_check(self, args, kwargs, n, mask, out_mask, decoder, norms, where):
        """A later batch of a padding layout that its first batch confirmed (:meth:`_confirm_blocks`), or with
        per_sample=False any padded batch: is the output of its most padded sample, run alone without its padding (a
        forward, no gradients), the batch's ``norms`` of it? The first batch cannot show all that padding may do:
        padded positions that win a maximum over positions only where a sample is short, or tokens that a model
        reads as padding by their id (11-47% off without a warning until 2026-12-06). Returns None where it is, else
        what differs. ||f||^2 is compared (float32: to 1e-4 of it; bfloat16/float16: to 3e-2 of the batch's largest,
        their rounding between the batch and the sample alone)."""
        keep = (mask if mask is not None else out_mask).reshape(n, -1)
        real = keep.sum(1)
        real = real.masked_fill(real == 0, keep.shape[1])  # a sample all padding has no output to compare
        k = int(real.argmin())
        if int(real[k]) == keep.shape[1]:
            return None
        try:
            out = self._output_alone(args, kwargs, n, k, mask, out_mask, decoder, where)
        except Exception:  # noqa: BLE001 - a sample that does not run alone: the first batch's check stands
            return None
        alone, batched = float(_squared_norms(out.reshape(1, -1))[0]), float(norms[k])
        # bfloat16/float16: to 3e-2 of the batch's largest (a classifier's few logits near zero, left padded, move
        # by up to 40% of their own in bfloat16 where the positions shift)
        scale = max(alone, batched) if out.element_size() >= 4 else max(alone, float(norms.max()))
        if abs(alone - batched) <= (1e-4 if out.element_size() >= 4 else 3e-2) * scale + 1e-30:
            return None
        side = ", ".join(str(x) for x in (_padding_layout(mask), _padding_layout(out_mask)) if x)
        return (f"batch {where}: the output of its sample {k} ({side} padding) has ||f||^2 {batched:.6g} in the batch "
                f"but {alone:.6g} alone, without its padding (the model reads its padded positions: a maximum over "
                "positions that they win, a token read as padding by its id)")

    def _out_positions(self, args, kwargs, n, mask, out_mask, decoder, where):
        """Sets :attr:`out_positions` from a padded sample run alone without its padding, whose output's dim 1 is
        then its own length (positions) or the probe's again (K logits of a classifier whose K equalled the probed
        length: masked as positions, 14-28% off without a warning). Left unknown where no sample's length differs
        from K or the run fails (the shapes decide then, as before)."""
        width = self.one_out[1]
        lengths = out_mask.reshape(n, -1).sum(1).tolist()
        k = next((k for k, c in enumerate(lengths) if c != width), None)
        if k is None:
            return
        self.out_probed = True
        try:
            out = self._output_alone(args, kwargs, n, k, mask, out_mask, decoder, where)
        except Exception:  # noqa: BLE001 - the pass itself says what is wrong with the batch
            return
        if out.dim() == len(self.one_out):
            self.out_positions = (True if out.shape[1] == lengths[k] else False if out.shape[1] == width else None)

    def learn_dims(self, args, kwargs, n, where):
        """Runs the batch's first sample alone (without gradients) and keeps the shapes of each unit's calls there:
        the calls of the batch are then read against them (:meth:`_call_dims`), a tensor's batch dim being the one
        of size n in the batch's call and 1 in the sample's (:func:`_rules.sample_dim`). A shape alone cannot
        tell: T5's (T, T) buckets or BART's (T, D) positions look like n rows wherever T equals n, which gave a
        wrong Ω without an error."""
        seen = {}
        ambiguous = [k for k, t in kwargs.items() if k not in _PER_SAMPLE_KEYS and torch.is_tensor(t) and t.dim() > 1
                     and t.shape[0] == n and n in t.shape[1:] and not any(k in keys[:2] for keys in _VISUAL)]
        if ambiguous:
            warnings.warn(f"batch {where}: {', '.join(map(repr, ambiguous))} has the batch's {n} rows in dim 0 and is "
                          "taken as one row per sample (SPEC §1); a tensor that all samples share, such as a (T, T) "
                          "table at T = n, goes in with a leading dim of 1", stacklevel=4)

        local, known = self.mode == "local" and self.per_sample and not self.graph_refused, {}

        def record(unit):
            def hook(module, a, kw, out):
                flats = (torch.utils._pytree.tree_flatten(x)[0] for x in ((a, kw), out))
                seen.setdefault(unit, []).append([[tuple(t.shape) if torch.is_tensor(t) else None for t in flat]
                                                  for flat in flats])
                if local and a and torch.is_tensor(a[0]) and a[0].grad_fn is not None:
                    samples = _gathered.row_samples(a[0], 1, known)
                    if samples is not None:  # and the layers after it on the same rows
                        self.gathered_alone[unit.name] = "index"
                        if torch.is_tensor(out) and out.grad_fn is not None:
                            known[out.grad_fn] = samples
                    elif _gathered.transposed_rows(a[0], 1):
                        self.gathered_alone[unit.name] = "transposed"
            return hook

        # first among the hooks, as the taps are (Engine.session)
        handles = [u.module.register_forward_hook(record(u), with_kwargs=True, prepend=True) for u in self.units]
        try:
            one_args, one_kwargs = _one_sample(args, kwargs, n, 0)
            try:
                with _probe(graph=local):
                    raw = self.entry(*one_args, **one_kwargs)
            except Exception as e:  # noqa: BLE001 - without the graph, where it runs so
                if not local:
                    raise
                local = False
                seen.clear()  # the units it found gathered before it failed stay (one sample at a time)
                with _probe():
                    raw = self.entry(*one_args, **one_kwargs)
                self.graph_refused = True
                self._say_graph_refused(e, told=False)
        except Exception as e:  # noqa: BLE001 - the pass itself says what is wrong with the batch
            warnings.warn(f"batch {where}: the model did not run on one sample alone ({type(e).__name__}: "
                          f"{str(e)[:200]}); where its layers' inputs hold the batch is read from their shapes, "
                          "which cannot tell a dim of size n shared by the samples", stacklevel=4)
            self.one = False
            return
        finally:
            for h in handles:
                h.remove()
        out = self._output(raw, where, check=False)  # an output MAS cannot use: the batch's error, as it is
        self.one, self.dims, self.one_out, self.out_dim = seen, {}, tuple(out.shape), _UNKNOWN
        # the lengths of the sample's inputs (dim 1): an output whose dim 1 is none of them holds no positions
        inputs = [t for t in torch.utils._pytree.tree_flatten((one_args, one_kwargs))[0]
                  if torch.is_tensor(t) and t.dim() > 1]
        self.one_lens = {t.shape[1] for t in inputs}
        # and every size of theirs after dim 0: a layer's output with none of them holds no positions
        self.one_sizes = {size for t in inputs for size in t.shape[1:]}

    @staticmethod
    def _say_graph_refused(e, told=True):
        """The warning for a model whose forward fails while the l-MAS pass records its graph without activations
        (torch.func's transforms refuse saved-tensor hooks; a gradient taken within the forward needs them): the
        pass records none from then on, and the batches whose layers take gathered rows run one sample at a time;
        where the sample alone failed so (``told`` False), those found before it failed do, and other such rows are
        read by their shapes."""
        then = ("l-MAS runs the batches whose layers take rows gathered by an index one sample at a time from now on "
                "(exact, slower)" if told else "l-MAS reads the rows its layers gather by an index after that point "
                "by their shapes, which cannot tell n rows gathered from n rows of one sample each")
        warnings.warn(f"the model's forward fails while autograd records its graph without activations "
                      f"({type(e).__name__}: {str(e)[:120]}; a gradient or a torch.func transform within it, or an op "
                      f"in place on a view that autograd refuses) and runs without it: {then}", stacklevel=5)

    def _call_dims(self, unit, module, args, kwargs, flat_out, state):
        """(the shape of the call's first input where its rows are not the batch's samples, else None; the batch
        dims of its flattened inputs and outputs, or None where not learned; whether that input may be n blocks of
        rows; which inputs and outputs may be, where learned; the position of that input among the flattened ones,
        where learned). The same call of the unit in the one-sample run of :meth:`learn_dims` decides, read once and
        kept; before any batch of n > 1 (or where the model did not run on one sample), the first input's shape
        does. A call unlike the sample's is no sample's own, and asks to learn again."""
        if state.n == 1 or not self.one:
            return _mixed_shape(module, args, kwargs, state.n), None, None, True, None, None
        flat_in = (list(args) if not kwargs and all(torch.is_tensor(a) for a in args)  # most layers: no pytree walk
                   else torch.utils._pytree.tree_flatten((args, kwargs))[0])
        first = next((i for i, t in enumerate(flat_in) if torch.is_tensor(t)), None)
        k, learned = state.calls[unit] - 1, self.dims.setdefault(unit, [])
        if k == len(learned):  # this call's first batch since learn_dims
            learned.append(_learned_dims(flat_in, flat_out, self._alone(unit, k), state.n,
                                         _batch_dim(module), padded=state.mask is not None))
        in_dims, out_dims, rows = learned[k]
        if (in_dims is None or len(in_dims) != len(flat_in) or len(out_dims) != len(flat_out)
                or any(d is not None and (not torch.is_tensor(t) or t.dim() <= d or t.shape[d] != state.n)
                       for t, d in (*zip(flat_in, in_dims), *zip(flat_out, out_dims)))):
            state.unlike_probe = True
            return (tuple(flat_in[first].shape) if first is not None else ()), None, None, False, None, None
        # the generic rule reads each input's batch dim where it was learned (Gemma3n's decoder layer on its
        # (altup inputs, n, T, D) hidden states); the table's rules, in the layer's own batch dim
        own = first is None or in_dims[first] == _batch_dim(module) or (
            in_dims[first] is not None and unit.rule.grads is _rules.generic_grads)
        blocks = first is not None and rows[0][first]
        return (None if own else tuple(flat_in[first].shape)), in_dims, out_dims, blocks, rows, first

    def _alone(self, unit, k):
        """(input shapes, output shapes) of the unit's call ``k`` in the run of one sample of :meth:`learn_dims`, or
        None where there was no such call (or no such run)."""
        calls = self.one.get(unit, ()) if self.one else ()
        return calls[k] if k < len(calls) else None

    def _out_positions_alone(self, unit, state, i, out_dims):
        """False where the call's output ``i`` held no positions in the run of one sample of :meth:`learn_dims` (no
        dim but its batch dim of a size of the sample's inputs: a pooled head's (1, W)), so that its padding is
        none; True otherwise, or where not learned. A later batch padded to W tokens masked such an (n, W) output
        as positions in l-MAS (7-21% off)."""
        if out_dims is None or out_dims[i] is None:
            return True
        alone = self._alone(unit, state.calls[unit] - 1)
        if alone is None or alone[1][i] is None:
            return True
        return any(size in self.one_sizes for d, size in enumerate(alone[1][i]) if d != out_dims[i])

    def _calls_unlike_probe(self, calls):
        """A unit called a different number of times on the batch than on its first sample alone (its calls depend
        on the data: MoE experts), as (unit, why), or None."""
        if not self.one:
            return None
        for u in self.units:
            if u.gathers:  # its calls are read from the graph, not against the probe's (MoE experts in a list)
                continue
            got, alone = calls.get(u, 0), len(self.one.get(u, ()))
            if got != alone:
                return u, f"is called {got} times on the batch but {alone} times on one sample alone"
        return None

    def _by_sample_from_now(self, why, args, kwargs, n, bufs, where, padded=False):
        """Says ``why`` (once: later batches go straight to one-sample passes; with ``padded``, later batches with
        padding) and runs this batch again from zero, one sample at a time."""
        warnings.warn(f"{why}: {_PADDED_BY_SAMPLE if padded else _BY_SAMPLE}", stacklevel=5)
        if padded:
            self.pad_by_sample = True
        else:
            self.by_sample = True
        for b in bufs.values():
            b.zero_()
        self._run_sample_by_sample(args, kwargs, n, bufs, where)

    def _confirm_blocks(self, args, kwargs, n, bufs, where, units, expanded=(), signature=None, sharing=(),
                        padding=None, params=(), alike=(), gathered=None):
        """The first batch that reads a unit's n·m-row input as n blocks of rows, or expands its batch-size-1 input to
        the batch's n (``units``, ``expanded`` among them), or tells each sample's gradient at the outputs of
        ``sharing``, which all samples share, by their uses (the first batch with that ``signature``), or is the first
        with its ``padding`` layout ((inputs', output's): every unit is checked then; a model whose output for a padded
        sample is not the sample's alone, without its padding, such as sinusoidal or rotary positions that ignore the
        mask under left padding, has padded batches run one sample at a time from then on), runs again one
        sample at a time: where its Ω agrees (float32 rounding; bf16/fp16: their rounding, which moves Ω by 1-2%
        between the batch and a sample alone) the blocks (the expanded rows, the uses) are each
        sample's and later batches keep the fast path; where not, the rows are no sample's own (the model mixes the
        expanded rows: Swinv2's position-bias MLP on a shared table, read back through a view over all rows), the
        one-sample Ω is the batch's, and later batches run sample by sample. The units of ``params``, generic calls
        whose parameters' uses told each sample's gradient at them (:meth:`_swap_params`), are checked with the
        shared outputs; one that disagrees runs its module again for them from then on (only that). In a padded
        batch a difference may be the padding's (ConvBERT's conv over padded positions) as well as the reading's:
        it is laid on the padding (padded batches one sample at a time), and a batch without padding settles the
        blocks, expansions and uses that disagreed."""
        check = ZeroBuffers(self.params)
        self.alone_rows = {}
        try:
            self._run_sample_by_sample(args, kwargs, n, check, where)
        finally:
            alone, self.alone_rows = self.alone_rows, None
        # experts of a list that took other tokens in the batch than in its samples alone: routing that depends on
        # the batch (a capacity counted over the batch's tokens, which a sample alone fills otherwise); ``gathered``
        # only for a batch without padding (a sample alone has no padding to route)
        rerouted = {u for u, rows in (gathered or {}).items() if u in units and alone.get(u, 0) != rows}
        # samples all alike agree with any reading of their rows: a later batch confirms it
        vacuous = _alike(args, kwargs, n)
        # an Ω that is zero in exact arithmetic (Mixtral's router at top-1: its normalised weight is 1; an attention
        # key's bias) is rounding on both sides: below 1e-6 of the batch's largest Ω there is nothing to tell, below
        # 1e-4 in bfloat16/float16 (BERT's, OPT's, BART's key biases at 2e-6 to 1e-5 of it, 30-48% apart: their
        # right-padded batches ran one sample at a time)
        half = any(p.element_size() < 4 for p in self.params.values() if p.is_floating_point())
        floor = (1e-4 if half else 1e-6) * max((float(b.norm()) for b in check.values()), default=0.0)
        wrong = list(rerouted)
        for u in dict.fromkeys([*units, *sharing, *params, *(self.units if padding else ())]):
            for g in u.names.values() if u not in rerouted else ():
                want, got = check.get(g), bufs.get(g)
                want = want if want is not None else torch.zeros_like(self.params[g], dtype=torch.float32)
                got = got if got is not None else torch.zeros_like(want)
                # float32: the uses of a shared output are summed in another order than a sample's alone, 2e-4 off
                # (Switch Transformers' relative-position bias at hidden 256, 8 layers; exact in float64);
                # bfloat16/float16: 3e-2 for all (T5's at 48 tokens: 1-2% apart, as its feed-forward weights were)
                told = u in sharing or u in params
                tol = (1e-3 if told else 1e-4) if self.params[g].element_size() >= 4 else 3e-2
                if u.gathers:
                    # rows gathered by routing (experts of a list): an expert's Σ over its tokens of one sample may
                    # cancel, and float32's rounding differs between the batch and a sample alone by 1e-3 there
                    # (Switch at hidden 256; exact in float64); what the check is for, rows given to another sample,
                    # moves its Ω far more
                    tol = max(tol, 1e-2)
                if (float((got - want).norm()) > tol * float(want.norm()) + 1e-30
                        and max(float(got.norm()), float(want.norm())) > floor):
                    wrong.append(u)
                    break
            if ((vacuous or u in alike) and u not in wrong) or (padding and u in wrong):
                # padded: what differs may be the padding (a conv over the padded positions), not the reading of
                # the rows, which a batch without padding settles
                continue
            if u in expanded:
                u.expands = u not in wrong
            elif u in units:
                u.blocks = False if u in wrong else {*(u.blocks or ()), n}
        refuted = [u for u in wrong if u in params and u not in units and u not in sharing]
        for u in refuted:  # its rule runs its module again from now on: the batch's Ω is the one-sample run's
            u.shares_params = False
        rest = [u for u in wrong if u not in refuted]  # what else the check refuted
        if (sharing or params) and not wrong and not vacuous:
            self.shares_confirmed.add(signature)
        if padding and not wrong:
            self.pads_confirmed.add(padding)
        if rest and (padding or not any(u in units or u in sharing for u in rest)):  # the padding shows, or may
            warnings.warn(f"batch {where}: module '{rest[0].name}' ({type(rest[0].module).__name__}) has another Ω in "
                          f"a batch padded so ({', '.join(str(x) for x in padding if x)} padding) than with its samples "
                          "run alone, without their padding (the model's output for a padded sample is not the "
                          "sample's: positions that ignore the mask, a pooling over padded positions, a maximum over "
                          f"positions that padded ones win): {_PADDED_BY_SAMPLE}", stacklevel=5)
            self.pad_by_sample = True
        elif rest and all(u.guards for u in rest):
            # layers inside modules with parameters of their own (Swinv2's position-bias MLP on a table all samples
            # share, read back through a view over all its rows): each such module owns all its parameters from now on,
            # its generic rule over the whole (a later batch confirms that in turn)
            self._own_all({u.guards[-1].module for u in rest})
        elif rest:
            what = ("takes other tokens in the batch than in its samples alone (routing that depends on the batch: a "
                    "capacity counted over its tokens)" if rest[0] in rerouted else
                    "is called on an input of batch size 1 whose rows, expanded to the batch's, are not each sample's "
                    "own" if rest[0] in expanded else f"is called on an input whose rows are not {n} blocks of one "
                    "sample each" if rest[0] in units else "has its weight read outside it (it did not run), and the "
                    "uses of that read gave another Ω than the samples run alone"
                    if any(g in self.leaves for g in rest[0].names.values()) else "returns an output all samples "
                    "share, whose uses gave another Ω than the samples run alone (learned absolute positions under "
                    "left padding, or uses the pass misread)")
            warnings.warn(f"module '{rest[0].name}' ({type(rest[0].module).__name__}) {what}: {_BY_SAMPLE}",
                          stacklevel=5)
            self.by_sample = True
        if wrong:
            for g, b in bufs.items():
                b.zero_()
            for g, b in check.items():
                bufs[g] += b

    def _run_sample_by_sample(self, args, kwargs, n, bufs, where):
        """Σ_k |∂_k| of a batch as n passes of one sample each (every call of a one-sample pass is that
        sample's own, whatever its shape), each into buffers of its own, then added into ``bufs``."""
        for k in range(n):
            one = ZeroBuffers(self.params)
            self.run(*_one_sample(args, kwargs, n, k), 1, one, f"{where}, sample {k}")  # run() cuts out its padding
            for g, b in one.items():
                bufs[g] += b

    @_gc_paused()
    def _forward_backward(self, args, kwargs, where, state):
        """One forward (and in g-MAS one backward) of the batch, every unit's contribution into state.bufs.
        Returns {unit: its number of calls in the forward}. Python's cyclic collector is off meanwhile: the pass's
        many small objects (its records of the calls, the graph walk's) set it off, and with a model's classes
        loaded (transformers: 430,000 objects) its full collections took 23% of a small Llama's pass (17 of 75 ms
        per batch of 4 × 32 tokens, 16 layers); a pass's garbage that only the collector frees waits for its end."""
        for u in self.units:
            u.group.calls, u.group.pending = [], []
        self._pass = state
        outside, grads = {}, ()
        try:
            if self.mode == "global":
                with torch.enable_grad():
                    out = self._output(self._forward(state, args, kwargs), where, state, check=False)
                    loss = (out.float() if out.element_size() < 4 else out).pow(2).sum()
                    if not torch.isfinite(loss):  # one scalar to test; the output itself only when it fails
                        self._check_finite(out, where)
                    if loss.requires_grad:
                        # Parameters read outside their units' calls (a head reading emb.weight directly, DeBERTa's
                        # relative embeddings, a read that only some inputs make): their rules do not see all of their
                        # gradient, which is taken whole here.
                        called = {g for u in state.calls for g in u.names.values()}
                        outside = self._read_outside(loss, state)
                        if state.own_all:  # planned again, the batch runs again (Engine.run): no backward
                            return state.calls
                        if state.shared is not None:
                            # read outside modules that did not run (DeBERTa's relative embeddings): where those
                            # reads go into shared outputs, their uses tell each sample's gradient at them too
                            state.shared.leaves = [self.params[g] for g in outside
                                                   if g not in called and g not in state.leaf_roots]
                        state.backward = True  # a module run again in it (a checkpoint's recompute) is no call
                        # the batch's gradient at the parameters that sites read (_swap_params): at their views, the
                        # backward's inputs too, through which it runs to their uses
                        at = [(e, k) for e in state.entries if e.site.failed is None for k in e.views
                              if e.views[k].requires_grad]
                        try:
                            grads = torch.autograd.grad(loss, [state.anchor] + [self.params[g] for g in outside]
                                                        + [e.views[k] for e, k in at], allow_unused=True)[1:]
                        except RuntimeError as e:
                            if "use_reentrant=True" not in str(e):
                                raise
                            raise RuntimeError(
                                "the model runs torch.utils.checkpoint(use_reentrant=True), which the g-MAS pass's "
                                "torch.autograd.grad cannot run through: pass use_reentrant=False (exact, as fast), "
                                "or run the pass without checkpointing") from e
                        for (e, k), g in zip(at, grads[len(outside):]):
                            if g is not None:
                                e.box[k] = g
                        grads = grads[:len(outside)]
            else:
                # a batch's graph tells its gathered rows' samples; a sample alone's tells nothing
                state.graph = (self.per_sample and state.n > 1 and bool(self.gathered_alone)
                               and not self.graph_refused)
                with _graph_only() if state.graph else torch.no_grad():
                    self._output(self._forward(state, args, kwargs), where, state)
            if state.nograd:
                self.nograd_said.update(state.nograd)
                names = ", ".join(f"'{u.name}'" for u in state.nograd[:3])
                more = f" and {len(state.nograd) - 3} more" if len(state.nograd) > 3 else ""
                warnings.warn(f"module{'s' if len(state.nograd) > 1 else ''} {names}{more} ran with gradients disabled "
                              "in the pass (torch.no_grad in the model's forward, or torch.utils.checkpoint("
                              "use_reentrant=True) on inputs that need no gradient): no gradient of ||f(x)||^2 reaches "
                              "their parameters through such calls, which add zero to Ω (use_reentrant=False "
                              "checkpoints exactly)", stacklevel=4)
            with torch.no_grad():  # outside the backward: the rules' arithmetic records no graph into Ω
                for u in self.units:  # calls whose gradients never arrived contribute zero
                    if u.group.calls:
                        self._process(u.group)
                self._whole_grads(state, outside, grads)
                for g in state.unread:  # no gradient reaches it: what a rule added is another tensor's (functional_call)
                    if g in state.bufs:
                        state.bufs[g].zero_()
        finally:
            self._pass = None
            for u in self.units:  # a pass left before its backward (planned again): its calls let their tensors go
                for _, call in u.group.calls:
                    call.release()
                u.group.calls, u.group.pending = [], []
            while state.swapped:  # the forward raised within such a call
                state.swapped.pop().restore()
            for node in state.tap_nodes:
                node.sink = None
            for entry in state.entries:
                entry.site.close()
                entry.box.clear()
            state.tap_nodes, state.entries = [], []
            if state.shared is not None:
                state.shared.close()
        return state.calls

    def _forward(self, state, args, kwargs):
        if self.leaves and self.mode == "global" and self.per_sample and state.n > 1:
            self._swap_leaves(state)
        try:
            return self.entry(*args, **kwargs)
        except Exception:
            state.forward_failed = True
            raise
        finally:
            self._restore_leaves(state)

    def _swap_leaves(self, state):
        """The parameters of :attr:`leaves`, read as roots of the pass's shared site for its forward: where the model
        reads one outside its unit into the batch's rows (sliced, projected by a layer, broadcast or repeated by the
        batch size), its uses tell each sample's gradient at it (:meth:`_whole_grads`)."""
        if state.shared is None:
            state.shared = _shared.Site(state.n, state.block_rows)
        for g in self.leaves:
            p = self.params[g]
            for u in self._owners[id(p)][1]:
                own = u.module._parameters
                names = {k: v for k, v in own.items() if v is p}
                if names:
                    root = state.shared.share(p.view_as(p))
                    own.update(dict.fromkeys(names, root))
                    state.leaf_roots[g] = (u.module, names, root)
                    break

    @staticmethod
    def _restore_leaves(state):
        for module, names, _ in state.leaf_roots.values():
            module._parameters.update(names)

    def _read_outside(self, loss, state):
        """{global name: a unit of it} of the tracked parameters whose gradient this batch's graph takes, in part,
        where none of their units' rules sees it (:mod:`_graph`, one walk of the whole graph of ``loss``): a read
        outside every call of their units (a tied head; only edges count, so only reads a gradient takes, not a
        weight's dtype, shape, a detached copy or a read under no_grad; every batch is walked, so a read that only some
        inputs make counts where made), a gradient into a call other than through its outputs, a layer's call that
        read another tensor in place of its parameter. Where that happens within a call of a guard of their units
        (plan_units), the guard (the innermost call around it) goes into ``state.own_all``, to own all its parameters,
        and the batch is to run again (nothing is returned then); so does, for a read outside (n > 1), the innermost
        host around it (:meth:`_hosts`) where a unit of the parameter ran, else after a shared read of it failed
        (:attr:`host_of`, :meth:`_whole_grads`); ``state.escaped`` gets the names taken for the
        second and third reasons.

        The units none of whose parameters the graph reads go into ``state.idle``: their calls add nothing (a
        gradient that reaches their outputs passes by their parameters: CLIP's logit_scale, wav2vec2's
        masked_spec_embed in eval mode), and their rules are not run; the parameters it does not read, of the units
        called, go into ``state.unread``: their Ω from this batch is zero."""
        found = {}
        graph = _graph.Graph(loss.grad_fn, self._owners, state.since, _Tap._backward_cls)
        read = {i for i, _ in graph.reads}
        state.unread = {g for u in state.calls for g in u.names.values() if id(self.params[g]) not in read}
        state.idle = {u for u in state.calls if all(g in state.unread for g in u.names.values())}
        calls = _graph.Calls([sp for spans in state.spans.values() for sp in spans])

        def guard_or_found(units, at, within=None, names=(), hosts=False):
            # the innermost call of a guard of the units around sequence number `at` (and the call `within`); with
            # `hosts`, else of a host (Engine._hosts) holding one of them that was called (a batch of n > 1)
            around = [sp for sp in calls.around(at) if any(sp.unit in u.guards for u in units)
                      and (within is None or sp.start <= within.start < sp.seam)]
            if around:
                state.own_all.add(around[0].unit.module)
                return False
            if hosts and state.n > 1:
                held = {u.module for u in units}
                host = next((m for m, start, end in reversed(state.host_spans)
                             if start <= at and (end is None or at < end) and any(c in held for c in m.modules())), None)
                if host is not None and any(u in state.calls for u in units):
                    state.own_all.add(host)
                    return False
                if host is not None:  # its units did not run: a shared read is tried first (_whole_grads)
                    self.host_of.update(dict.fromkeys(names, host))
            for g in names:
                found.setdefault(g, units[0])
            return True

        for i, seq in graph.reads:
            g, units = self._owners[i]
            if g not in found and not calls.made_by(seq, units):
                guard_or_found(units, seq, names=[g], hosts=True)
        ids = {u: {id(self.params[g]) for g in u.names.values()} for u in state.calls}
        def read_names(unit):  # of a unit called
            return [g for g in unit.names.values() if g not in state.unread]

        for sp, at in calls.escapes(graph, state.taps, ids.get).items():
            names = read_names(sp.unit)
            if guard_or_found([sp.unit], at, sp, names):
                state.escaped.update(dict.fromkeys(names, "reached by a gradient other than through the module's "
                                                          "outputs"))
        for sp in state.modified:
            names = read_names(sp.unit)
            if guard_or_found([sp.unit], sp.start, sp, names):
                state.escaped.update(dict.fromkeys(names, "read by a call that modified its input in place, which "
                                                          "its rule cannot run again"))
        for sp in calls.spans:
            # a parameter that a generic call reads other than by its name (a reference kept elsewhere), which the
            # rule's rerun (on parameters put in by name) would not see: taken whole (Engine._swap_params)
            entry = sp.call.params if sp.call is not None else None
            if entry is not None and any(graph.reads_in(id(p), sp.start, sp.end, entry.seqs)
                                         for p in entry.originals.values()):
                if entry.site is not None:
                    entry.site.fail("its forward reads a parameter other than by its name")
                for k in entry.originals:
                    g = sp.unit.names[k]
                    found.setdefault(g, sp.unit)
                    state.escaped[g] = "read by its module's forward other than by its name (a reference kept elsewhere)"
        for sp in calls.spans:  # a call of the generic rule that did not read a parameter takes no gradient for it
            if sp.call is not None and (sp.unit.rule.grads is _rules.generic_grads or sp.call.whole):
                sp.call.unread = frozenset(k for k, g in sp.unit.names.items()
                                           if not graph.reads_in(id(self.params[g]), sp.start, sp.end))
        for sp, i in calls.substituted(graph, state.taps, lambda u: u.rule.grads is not _rules.generic_grads,
                                       ids.get):
            g = self._owners[i][0]
            if i in read and guard_or_found([sp.unit], sp.start, sp, [g]):
                state.escaped[g] = "not read by a call of its module, which read another tensor in its place"
        return {} if state.own_all else found

    def _whole_grads(self, state, outside, grads):
        """Puts |∂| of ``outside``'s parameters ({global name: a unit of it}: read outside their units' forwards)
        in place of what their rules added, where the pass is one sample (or per_sample=False: the batch's
        gradient). With n > 1 samples per sample, a parameter whose units did not run and whose reads went into
        shared outputs (a leaf of the site) adds Σ_k |∂_k| from its samples' gradients through those, where they add
        up to ∂; any other is not split, and the batch is run again sample by sample, but for a parameter whose units
        did not run, tried first as one of :attr:`leaves` (read as a shared tensor from the pass's start)."""
        called = {g for u in state.calls for g in u.names.values()}
        for (g, unit), grad in zip(outside.items(), grads):
            if grad is None:
                continue
            if self.per_sample and state.n > 1:
                site = state.shared
                leaf = self.params[g]
                if g in state.leaf_roots:
                    per = site.take(state.leaf_roots[g][2], grad)
                else:
                    per = site.take(leaf, grad) if site is not None and any(p is leaf for p in site.leaves) else None
                if per is None and g not in called and g not in self.leaves and g not in self.leaves_refuted:
                    state.new_leaves.add(g)  # the batch runs again, this parameter read as a shared tensor
                    continue
                if per is None and g in self.leaves:
                    self.leaves.discard(g)
                    self.leaves_refuted.add(g)
                if per is None and g in self.host_of:  # the host around its read owns it from now on: again
                    state.own_all.add(self.host_of[g])
                    return
                if per is None:
                    how = state.escaped.get(g, "used outside the module's own forward")
                    state.mixed.append((unit, f"has its parameter '{g}' {how}, where no per-sample gradient can be "
                                              "told apart"
                                              + (f" ({site.failed})" if site is not None and site.failed else "")))
                    return
                state.bufs[g] += per.float().abs().sum(0)
                state.sharing.append(unit)  # confirmed with the uses of the shared outputs
                continue
            state.bufs[g].copy_(grad.float().abs())

    def _output(self, out, where, state=None, check=True):
        """The tensor whose squared norm is taken (``output_fn``'s pick, else the output itself or its
        ``logits``), with the positions that ``state.out_mask`` marks as padding set to zero (where the output holds
        the batch learned from the one-sample run; where they cannot be told, ``state.unmasked`` says so); with
        ``check``, a FloatingPointError where it is not finite."""
        if self.output_fn is not None:
            out = self.output_fn(out)
        elif not torch.is_tensor(out):
            logits = out.get("logits") if isinstance(out, Mapping) else getattr(out, "logits", None)
            out = logits if torch.is_tensor(logits) else out
        if not torch.is_tensor(out):
            if self.output_fn is not None:
                raise TypeError(f"batch {where}: output_fn returned {type(out).__name__}, not a tensor: it must pick "
                                "the tensor whose norm MAS takes")
            raise TypeError(f"batch {where}: the model returned {type(out).__name__}, not a tensor or an output "
                            "with a `logits` field; pass output_fn= to pick the tensor whose norm MAS takes")
        if not out.is_floating_point():
            raise TypeError(f"batch {where}: the model output has dtype {out.dtype}; MAS needs a floating tensor")
        if state is not None and state.out_mask is not None:
            if self.one and self.out_dim is _UNKNOWN:  # the first padded batch since learn_dims: kept for the next
                # the dim of size n here and 1 in the sample's output (whose length may differ from this batch's)
                dims = ([i for i, (a, b) in enumerate(zip(out.shape, self.one_out)) if a == state.n and b == 1]
                        if out.dim() == len(self.one_out) else [])
                self.out_dim = dims[0] if len(dims) == 1 else None
            if (self.one and self.out_dim in (0, None, _UNKNOWN) and out.dim() == len(self.one_out) > 1
                    and (self.out_positions is False
                         or (self.out_positions is None and self.one_out[1] not in self.one_lens))):
                # (n, K, ...) where the sample's own output had K in dim 1, not its length: no positions (a
                # classifier's logits; masked where K equalled the padded length, 5% off without a warning)
                masked = out
            else:
                masked = _mask_positions(out, state.out_mask, None if self.out_dim is _UNKNOWN else self.out_dim)
            if masked is None:
                state.unmasked = "the model's output"
            out = out if masked is None else masked
        if state is not None and (state.mask is not None or state.out_mask is not None):
            d = self.out_dim if isinstance(self.out_dim, int) else 0
            if out.dim() > d and out.shape[d] == state.n:
                with torch.no_grad():
                    state.norms = _squared_norms(out.detach().movedim(d, 0).reshape(state.n, -1))
        if check:
            self._check_finite(out, where)
        return out

    @staticmethod
    def _check_finite(out, where):
        if not torch.isfinite(out).all():
            raise FloatingPointError(f"batch {where}: the model output is not finite (NaN or inf); "
                                     "importance and sample count left as they were before this batch")

    def _attributes_before(self, unit):
        """A pre-hook, first of the module's: its modules' tensor attributes before the call, and for the generic
        rule, where the module has pre-hooks of its own (which may change the call's arguments, reading parameters
        of the unit), the call's arguments before them: the rule runs the module again from those, hooks and all."""
        @ours
        def hook(module, args, kwargs):
            if self._pass is not None and not self._pass.busy and not self._pass.backward:
                unit.attributes = {m: _rules.attributes(m) for m in module.modules()}
                unit.versions = self._versions(args)  # an input the call modifies in place cannot be run again
                unit.rng = _rules.rng_state()  # a forward that draws random numbers: its rerun draws the same
                if unit.rule is _rules.GENERIC and user_pre_hooks(module):
                    unit.raw = (args, kwargs)
        return hook

    def _started(self, unit):
        """A pre-hook: the autograd sequence number where a call of the unit starts, in a pass."""
        @ours
        def hook(module, args):
            state = self._pass
            if state is not None and not state.busy and not state.backward:
                state.started.setdefault(unit, []).append(_graph.next_sequence_nr())
                if unit.rule is _rules.GENERIC and not unit.whole:
                    self._swap_params(unit, module, state)
        return hook

    def _swap_params(self, unit, module, state):
        """Within a call of the generic rule (g-MAS, per sample), the module's own parameters read as shared tensors
        (:mod:`_shared`, a site of their own): an op that broadcasts one over the batch's rows (ConvNeXt's and BEiT's
        layer scales, a class token expanded to the batch) tells each sample's gradient at it, so that the rule need
        not run the module again, layers and all. Where a use cannot tell (an op that may mix the rows, an input of a
        layer inside it), the site fails and the rule runs the module again as before. Parameters whose per-sample
        gradients would take more than a quarter of the reference path's chunk, and those of a module whose uses a
        one-sample run refuted, are read as plain tensors through a node of their own. Either way the graph walk
        (:meth:`_read_outside`) tells a read other than by the name (a reference kept elsewhere, which a rerun on
        parameters put in by name would not see either): that parameter is taken whole."""
        if (self.mode != "global" or len(state.started[unit]) > 1 or any(state.started.get(w) for w in unit.within)
                # a checkpoint (its recompute in the backward reads them plain, and must save what the call saved)
                or torch._C._autograd._top_saved_tensors_default_hooks(False) is not None):
            return
        own = module._parameters
        originals = {k: self.params[g] for k, g in unit.names.items() if own.get(k) is self.params[g]}
        if len(originals) != len(unit.names):
            return
        # one sample's pass, the batch's gradient, too large, or refuted: plain roots, which only tell a read other
        # than by the name (_read_outside)
        shares = (self.per_sample and state.n > 1 and unit.shares_params is not False
                  and state.n * sum(p.numel() for p in originals.values()) <= _rules.CHUNK_ELEMS // 4)
        site = _shared.Site(state.n, set(), params=True) if shares else None
        made = {k: _shared.param_root(site, p) for k, p in originals.items()}
        roots = {k: r for k, (r, _, _) in made.items()}
        of = {id(p): roots[k] for k, p in originals.items()}
        names = {k: v for k, v in own.items() if v is not None and id(v) in of}  # every name of each
        own.update({k: of[id(v)] for k, v in names.items()})
        entry = _Swap(unit, module, originals, site, roots, {k: v for k, (_, v, _) in made.items()},
                      {s for _, _, s in made.values() if s is not None}, names)
        state.swapped.append(entry)
        if site is not None:
            state.entries.append(entry)

    def _unshare(self, args, kwargs, state):
        """``(args, kwargs)`` with the tensors computed from the parameters of a generic call without the batch's rows
        (:meth:`_swap_params`) made plain, and their sites failed: a layer's input, which that call cannot follow."""
        if not state.entries:
            return args, kwargs
        flat, spec = ((list(args), None) if not kwargs and all(torch.is_tensor(a) for a in args)
                      else torch.utils._pytree.tree_flatten((args, kwargs)))
        hit = False
        for i, t in enumerate(flat):
            if isinstance(t, _shared.Shared) and t._site.params:
                t._site.fail("a tensor computed from its parameters is an input of a layer inside it")
                flat[i], hit = _shared.plain(t), True
        if not hit:
            return args, kwargs
        return (tuple(flat), kwargs) if spec is None else torch.utils._pytree.tree_unflatten(flat, spec)

    def _ended(self, unit):
        """A forward hook (before the unit's tap; also where the forward raised): the module's own parameters put back
        where :meth:`_swap_params` read them otherwise (the record of the call gets that), and the call's span of
        sequence numbers (:meth:`_started`)."""
        @ours
        def hook(module, args, out):
            state = self._pass
            if state is not None and state.swapped and state.swapped[-1].module is module:
                state.param_entry = state.swapped.pop()  # its parameters back in place, for the call's record
                state.param_entry.restore()
            started = state.started.get(unit) if state is not None and not state.busy and not state.backward else None
            if started:
                state.last = _graph.Span(unit, started.pop(), _graph.next_sequence_nr())
                state.spans.setdefault(unit, []).append(state.last)
        return hook

    def _hook_for(self, unit):
        """The forward hook of a unit's calls (:meth:`_record`), which closes the call's span after its own nodes."""
        def hook(module, args, kwargs, out):
            result = self._record(unit, module, args, kwargs, out)
            state = self._pass
            if state is not None and state.param_entry is not None and state.param_entry.unit is unit:
                if state.param_entry.site is not None:  # its rule runs it again
                    state.param_entry.site.fail("the call is not one of the rule's own")
                state.param_entry = None
            if state is not None and state.last is not None and state.last.unit is unit:
                state.last.seam, state.last = _graph.next_sequence_nr(), None
            return result

        return hook

    def _record(self, unit, module, args, kwargs, out):
        """A call of the unit ending: its inputs and output kept for its rule, its output tapped (g-MAS)."""
        state = self._pass
        if state is None or state.busy or state.backward:
            return None
        state.calls[unit] = state.calls.get(unit, 0) + 1
        if (self.mode == "global" and not torch.is_grad_enabled() and unit not in self.nograd_said
                and unit not in state.nograd):
            state.nograd.append(unit)
        if self.alone_rows is not None and unit.gathers and args and torch.is_tensor(args[0]) and args[0].dim():
            self.alone_rows[unit] = self.alone_rows.get(unit, 0) + args[0].shape[0]
        span = state.last if state.last is not None and state.last.unit is unit else None  # this call's (_ended)
        if self.mode == "global" and (any(state.started.get(w) for w in unit.within) or (
                state.started.get(unit) and unit.rule.grads is _rules.generic_grads)):
            # a call within one of a unit that owns its parameters too, whose rule covers it (in l-MAS each layer
            # takes its own output), or within one of its own (a layer of the generic rule that maps itself over a
            # list by calling itself: its rule reruns the outer call, inner calls and all); its dims are learned all
            # the same, as the next call's index counts it
            unit.raw = unit.attributes = unit.versions = unit.rng = None
            flat = [out] if torch.is_tensor(out) else torch.utils._pytree.tree_flatten(out)[0]
            self._call_dims(unit, module, args, kwargs, flat, state)
            if span is not None:  # its nodes are that unit's
                state.spans[unit].remove(span)
                state.last = None
            return None
        if unit.raw is not None:  # the generic rule reads the call from before the module's own pre-hooks
            (args, kwargs), unit.raw = unit.raw, None
        args, kwargs = self._unshare(args, kwargs, state)
        before, unit.versions = unit.versions, None
        if span is not None and before is not None and any(t._version != v for t, v in before):
            state.modified.append(span)  # it modified its input in place: its rule cannot run it again
        attributes = held = None
        if unit.attributes is not None:  # its modules' tensor attributes as they were before the call
            attributes, unit.attributes = unit.attributes, None
            held = _batch_state(attributes, state.n) if state.n > 1 else None
            if held is not None and self.per_sample:  # the batch runs again sample by sample
                state.mixed.append((unit, held))
                return None
            for m, before in attributes.items():  # and those the call added, to be absent
                before.update({k: _ABSENT for k, v in vars(m).items() if torch.is_tensor(v) and k not in before})
        rng, unit.rng = unit.rng, None
        if rng is not None and _rules.same_rng(rng, _rules.rng_state()):
            rng = None  # it drew no random number (else its rule's rerun draws the same: generic.RandomForward)
        if unit.handled:  # its tapped forward has already seen to this call
            unit.handled = False
            return None
        if kwargs and unit.rule.grads is not _rules.generic_grads:  # the table's rules read call.args
            args, kwargs = _positional(module, args, kwargs)
        # a call reading tensors that all samples share (_shared): the rules see them as the plain tensors they are
        reads_shared = False
        if state.shared is not None:
            args, kwargs, reads_shared = _shared.plain_inputs(args, kwargs)
        versions = self._versions(args)
        # A single tensor output (most layers) skips the pytree round trip.
        flat, spec = ([out], None) if torch.is_tensor(out) else torch.utils._pytree.tree_flatten(out)
        pos = [i for i, t in enumerate(flat) if torch.is_tensor(t) and t.is_floating_point()]
        mixed, in_dims, out_dims, blocks, rows, first = self._call_dims(unit, module, args, kwargs, flat, state)
        packing = self._gathered(unit, module, args, kwargs, out, state, reads_shared)
        if packing is not None:  # its rows' samples are told by the graph: none of the readings below applies
            mixed = in_dims = out_dims = None
        elif (self.mode == "local" and self.per_sample and state.n > 1 and unit.name in self.gathered_alone
              and (self.gathered_alone[unit.name] == "index" or self.graph_refused)):
            # rows gathered by an index (learn_dims) whose samples the graph does not tell in this call: n of them
            # are not one per sample, nor k·n rows k per sample (a first batch's even count, a later one's uneven);
            # without the graph, time-major rows too. On no row (an expert no token was routed to), it adds nothing.
            if args and torch.is_tensor(args[0]) and args[0].dim() and args[0].shape[0] == 0:
                return None
            state.mixed.append((unit, "is called on rows gathered by an index, whose samples the graph does not "
                                      "tell"))
            return None
        if reads_shared:
            if (in_dims is not None and _batch_dim(module) == 0 and not any(d is not None for d in in_dims)
                    and not any(rows[0])):
                # none of its inputs holds the batch (DeBERTa-v2's query_proj on its relative embeddings): its
                # outputs all samples share too, and each sample's gradient at them is told by their uses
                if not any(flat[i].requires_grad for i in pos):
                    return None
                return self._share(unit, args, kwargs, flat, spec, pos, state, versions, attributes, in_dims,
                                   out_dims)
            if in_dims is None or any(isinstance(flat[i], _shared.Shared) for i in pos):
                state.shared.fail(f"module '{unit.name}' reads a tensor computed from it beside the batch's rows "
                                  "in a way the pass cannot follow")
        moved = None
        if (mixed is not None and self.mode == "global" and self.per_sample and in_dims is not None
                and first is not None and not reads_shared and not kwargs and len(args) == len(in_dims) == 1
                and torch.is_tensor(out) and type(module) in _LAYOUT_FREE and "forward" not in module.__dict__
                and _rules.leading_positions(unit.rule, module)):
            # the batch in another dim than the layer's (Longformer's and LED's (T, n, D) projections), as learned
            # from the model run on one sample: moved in front for the rule, which reads the other dims as positions.
            # Only torch's own layers, whose forwards read every dim before the last alike: a subclass or a
            # same-named class that the table's rule hands to the generic one would run again on moved inputs
            d = in_dims[first]
            if (d is not None and d != _batch_dim(module) and not any(rows[0]) and not any(rows[1])
                    and all(e in (d, None) for e in in_dims) and all(out_dims[i] == d for i in pos)):
                moved, mixed = d, None
                args = tuple(a.movedim(d, 0) if torch.is_tensor(a) and e == d else a for a, e in zip(args, in_dims))
                in_dims = [0 if e == d else e for e in in_dims]
                out_dims = [0 if e == d else e for e in out_dims]
        expanded = False
        if not self.no_expand and unit.expands is not False and mixed is not None and not reads_shared:
            args, kwargs, outs, which = _expand_broadcast(
                module, args, kwargs, [flat[i] for i in pos], state.n,
                learned=in_dims is not None and first is not None and in_dims[first] is not None)
            if which is not None:  # the broadcast input and the outputs it made are every sample's own (SPEC §1)
                state.expanded.append(unit)
                if unit.expands is None and self.per_sample:
                    state.tentative.append(unit)  # confirmed once, as n blocks of rows are
                expanded = True
                for i, t in zip(pos, outs):
                    flat[i] = t
                out = flat[0] if spec is None else torch.utils._pytree.tree_unflatten(flat, spec)
                mixed, dim = None, _batch_dim(module)
                if in_dims is not None:
                    in_dims = [dim if i == first else d for i, d in enumerate(in_dims)]
                    grown = {pos[w] for w in which}
                    out_dims = [dim if j in grown else d for j, d in enumerate(out_dims)]
        no_rerun = None
        if (self.per_sample and state.n > 1 and mixed is None and unit.rule.grads is _rules.generic_grads
                and in_dims is not None and not any(d is not None for d in in_dims)
                and any(out_dims[i] is not None for i in pos)):
            # the batch's rows out of inputs none of which holds them (ProphetNet's positions from the batch's
            # shape, a tuple): a rerun of the module on one sample's inputs is the batch's again (it raised). Where
            # its parameters are read as shared tensors (Perceiver's latents expanded to the batch size), their uses
            # may tell each sample's gradient without a rerun; where they do not, the batch runs sample by sample.
            no_rerun = ("returns the batch's rows from inputs none of which holds them (the batch size comes as a "
                        "number), so its rerun cannot be cut by sample")
            entry = state.param_entry
            if entry is None or entry.unit is not unit or entry.site is None or entry.site.failed is not None:
                state.mixed.append((unit, no_rerun))
                return None
        block_rows, in_blocks = None, frozenset()
        beside = _rows_beside_batch(in_dims, rows) if unit.rule.grads is _rules.generic_grads else frozenset()
        if packing is not None:  # n blocks of rows once packed, confirmed as such blocks are
            block_rows = ([t is args[0] for t in torch.utils._pytree.tree_flatten((args, kwargs))[0]], [True])
            if unit.blocks is None or state.n not in unit.blocks:
                state.tentative.append(unit)
        elif mixed is not None and self.per_sample and state.n > 1:
            # n blocks of rows, one per sample (OPT's and the MoE layers' (n·T, D) tokens), confirmed once; the
            # generic rule reads them where it knows which of the call's tensors hold them
            # (with padding, only the batch's (n, T) positions flattened, or copies of them (k of each token: Ergo's
            # experts' norm on top-k rows) where the tokens packed by the mask could not make as many, or the visual
            # patches (merged or not) of a batch whose samples have as many: tokens packed by the mask are not)
            if (blocks and unit.blocks is not False and mixed and mixed[0] % state.n == 0
                    and (state.mask is None or mixed[0] in {p * unit.rule.blocks(module) for p in state.positions}
                         or (any(mixed[0] % p == 0 for p in state.positions)
                             and all(mixed[0] % c for c in state.packed))
                         or (mixed[0] != int(state.mask.sum()) and any(p % mixed[0] == 0 for p in state.patches)))
                    and _batch_dim(module) == 0 and unit.rule.blocks(module)
                    and (rows is not None or unit.rule.grads is not _rules.generic_grads)
                    and not _gathered.transposed_rows(_first_tensor(args, kwargs), state.n)):
                state.block_rows.add(mixed[0])
                mixed, block_rows = None, rows
                if unit.blocks is None or state.n not in unit.blocks:
                    state.tentative.append(unit)
            else:
                # the batch runs again sample by sample, in g-MAS only where a gradient reaches the call's output
                # (DoRA's weight norm calls its LoRA layers on an identity matrix, then detaches the result)
                why = (unit, f"is called on an input of shape {mixed}, whose rows are not the batch's {state.n} "
                             "samples (it mixes them, or all share it)")
                if self.mode == "local":  # its own output is its gradient
                    state.mixed.append(why)
                    return None
                reached = [i for i in pos if flat[i].requires_grad]
                if not reached:
                    return None
                if (in_dims is not None and _batch_dim(module) == 0  # g-MAS: l-MAS returned above
                        and not any(d is not None for d in (*in_dims, *out_dims))
                        and not any((*rows[0], *rows[1]))):
                    return self._share(unit, args, kwargs, flat, spec, pos, state, versions, attributes, in_dims,
                                       out_dims)
                tapped = self._tap(state.anchor, lambda grads: state.mixed.append(why), False,
                                   [flat[i] for i in reached])
                for i, t in zip(reached, tapped):
                    flat[i] = t
                return flat[0] if spec is None else torch.utils._pytree.tree_unflatten(flat, spec)
        elif (rows is not None and self.per_sample and state.n > 1 and unit.blocks is not False
              and unit.rule.grads is _rules.generic_grads and _flattens_samples(in_dims, out_dims, rows, flat, pos,
                                                                               state)):
            # an input with the batch in dim 0 and an output of the samples' rows flattened (DeepSeek-V3's
            # router: (n, T, D) in, (n·T, E) logits out), confirmed once as the blocks above
            block_rows = rows
            state.block_rows.update(flat[i].shape[0] for i in pos if rows[1][i] and out_dims[i] is None)
            if unit.blocks is None or state.n not in unit.blocks:
                state.tentative.append(unit)
        elif (mixed is None and self.per_sample and state.n > 1 and beside and unit.blocks is not False
              and not isinstance(module, torch.nn.MultiheadAttention)):  # its (n·heads, L, S) mask: _head_blocks
            # inputs with the batch in a dim beside inputs of its rows flattened (DBRX's experts: (n, T, D) tokens,
            # their (n·T, k) routing): those read as n blocks of rows, confirmed once as blocks are
            in_blocks = beside
            if unit.blocks is None or state.n not in unit.blocks:
                state.tentative.append(unit)
                flat_in = torch.utils._pytree.tree_flatten((args, kwargs))[0]
                if all(_alike_blocks(flat_in[i], state.n) for i in in_blocks):
                    # blocks all alike agree with any reading of their rows (a head-major (heads·n, T, T) mask of a
                    # batch without padding): a later batch confirms it
                    state.alike_blocks.add(unit)
        elif (mixed is None and self.mode == "global" and self.per_sample and state.n > 1
              and unit.rule.grads is _rules.generic_grads and out_dims is not None and pos
              and all(out_dims[i] is None for i in pos) and any(flat[i].requires_grad for i in pos)):
            # inputs that hold the batch, floating outputs that none does (BART's positions from its (n, T)
            # input_ids): the outputs all samples share
            return self._share(unit, args, kwargs, flat, spec, pos, state, versions, attributes, in_dims, out_dims)
        # The whole call is one sample's (a one-sample pass) or the batch's (per_sample=False): its rule is
        # the module's own gradient, through the generic rule, which keeps its output.
        # per_sample=False: a batch state, rerun whole; so are a rule whose per-sample gradients do not sum to the
        # call's (Rule.sums), and inputs with the batch in a dim beside inputs of its rows
        # flattened (the sum of the samples' gradients is the whole call's: cut by the batch dims, DBRX's experts'
        # (n, T, D) tokens beside their (n·T, k) routing crashed)
        whole = mixed is not None or held is not None or (not self.per_sample and state.n > 1 and (
            bool(beside) or not unit.rule.sums(module)))
        keep = self.mode == "local" or whole or unit.rule.needs_output(module)
        if self.mode == "local":  # the output itself is the gradient, but at the padded positions
            local = tuple(_mask_positions(flat[i].detach(), state.mask,
                                          out_dims[i] if out_dims is not None else None,
                                          rows is not None and rows[1][i])
                          if self._out_positions_alone(unit, state, i, out_dims) else flat[i].detach() for i in pos)
            if any(g is None for g in local):
                state.unmasked = f"the output of module '{unit.name}' ({type(module).__name__})"
                return None
        if moved is not None and keep:
            out = out.movedim(moved, 0)
        if packing is not None:
            args = (packing.rows(args[0]), *args[1:])
        call = _rules.Call(1 if whole else state.n, args, kwargs,
                           (out if packing is None else packing.rows(out)) if keep else None, versions=versions,
                           whole=whole, in_dims=in_dims, out_dims=out_dims, rows=block_rows, in_blocks=in_blocks,
                           attributes=attributes or None, rng=rng)
        unit.group.calls.append((unit, call))
        if span is not None:  # the graph walk tells which parameters it read
            span.call = call
        entry = state.param_entry
        if entry is not None and entry.unit is unit and not whole:
            call.params, state.param_entry = entry, None  # its uses may tell each sample's gradient at them
            call.no_rerun = no_rerun
        if unit.rule.grads is not _rules.generic_grads:
            call.settings = _rules.settings(module)
        if self.mode == "local":
            call.grads = local if packing is None else tuple(packing.grads(g) for g in local)
            if packing is not None and torch.is_tensor(out) and out.grad_fn is not None:
                state.row_samples[out.grad_fn] = packing.samples  # layers after it on the same rows read them
            if unit.group.simple and not unit.repeats:
                with _rules_outside_graph() if state.graph else contextlib.nullcontext():
                    self._process(unit.group)  # now, before any in-place op changes the output
            else:
                call.grads = tuple(g.clone() for g in call.grads)
            return None
        if not any(flat[i].requires_grad for i in pos):
            return out if expanded else None

        # the generic rule's vjp of a norm gets its gradient contiguous: torch 2.13's CPU batch_norm backward
        # (_BATCH_NORMS) gives wrong gradients for a non-contiguous one of the same shape (the output read as tokens)
        contiguous = unit.rule.grads is _rules.generic_grads and unit.holds_batch_norm

        def sink(grads):
            if unit in state.idle:
                return
            if packing is not None:
                grads = tuple(packing.grads(g) for g in grads)
            elif moved is not None:
                grads = tuple(g.movedim(moved, 0) for g in grads)
            call.grads = grads if not contiguous else tuple(
                g if g is None or g.is_contiguous() else g.contiguous() for g in grads)
            unit.group.pending.append(call)
            if _ready(unit.group):
                self._process(unit.group)

        tapped = self._tap(state.anchor, sink, unit.rule.grads is not _rules.generic_grads, [flat[i] for i in pos],
                           layout=isinstance(module, _BATCH_NORMS))
        if torch.is_tensor(call.out) and packing is None:  # as the tap left it (passed on in place, its version moved on)
            call.out_version = call.out._version
        if packing is not None:  # layers after it on the same rows read their samples through it
            state.row_samples[tapped[0].grad_fn] = packing.samples
        for i, t in zip(pos, tapped):
            flat[i] = t
        return flat[0] if spec is None else torch.utils._pytree.tree_unflatten(flat, spec)

    def _gathered(self, unit, module, args, kwargs, out, state, reads_shared):
        """The :class:`_gathered.Packing` of a call on rows gathered from the batch's tokens by an index (an expert
        of a list on the tokens routed to it, or a layer after it on its rows), told by the graph (g-MAS's, or the
        one an l-MAS pass records where learn_dims saw such rows); None where the call is not one: its first input
        and its one output (P, …), its other inputs without those rows, a rule that reads n blocks of rows (the
        table's that read every dim before the last as positions, or the generic rule), a reading no batch
        refuted."""
        if (not self.per_sample or state.n == 1 or unit.blocks is False or reads_shared
                or not args or not torch.is_tensor(args[0]) or not torch.is_tensor(out) or args[0].dim() < 2
                or out.shape[0] != args[0].shape[0] or _batch_dim(module) != 0
                or not (unit.rule.grads is _rules.generic_grads or _rules.leading_positions(unit.rule, module))):
            return None
        rows = args[0].shape[0]
        if rows == 0:  # an expert called on no token adds nothing
            return None
        if len(args) > 1 or kwargs:
            others = torch.utils._pytree.tree_flatten((args[1:], kwargs))[0]
            if any(torch.is_tensor(t) and t.dim() > 0 and t.shape[0] == rows for t in others):
                return None
        samples = _gathered.row_samples(args[0], state.n, state.row_samples, state.taken)
        if samples is None:
            return None
        unit.gathers = True
        state.gathered_rows[unit] = state.gathered_rows.get(unit, 0) + rows
        return _gathered.Packing(samples, state.n)

    def _tap(self, anchor, sink, in_place, outs, layout=False):
        """``outs`` through a _Tap; ``sink`` gets the gradients at them, shaped like them. With ``in_place``
        an output that only reshapes its base (Linear on 3-D input) is tapped through that base, uncopied. With
        ``layout``, the gradients go on in the outputs' memory formats (a BatchNorm's: :func:`_layouts`)."""
        def reshaped_base(t):
            b = t._base
            return (in_place and b is not None and not b._is_view() and t.is_contiguous() and b.is_contiguous()
                    and t.numel() == b.numel() and t.storage_offset() == b.storage_offset())

        targets = [o._base if reshaped_base(o) else o for o in outs]
        shapes = [o.shape for o in outs]  # not the outputs themselves: the graph would keep them alive
        tapped = _Tap.apply(anchor, lambda grads: sink(tuple(g.view(s) for g, s in zip(grads, shapes))),
                            in_place, layout, *targets)
        if self._pass is not None and tapped and tapped[0].grad_fn is not None:  # the call's outputs are read here
            self._pass.taps.add(tapped[0].grad_fn._sequence_nr())
            self._pass.tap_nodes.append(tapped[0].grad_fn)
        return [t.view(s) if t.shape != s else t for s, t in zip(shapes, tapped)]

    def _share(self, unit, args, kwargs, flat, spec, pos, state, versions, attributes, in_dims, out_dims):
        """A call of g-MAS per sample whose floating outputs hold no sample's rows (T5's relative-position bias on
        (T, T) buckets; BART's positions from its (n, T) input_ids, by the generic rule): they go on as shared
        tensors (:mod:`_shared`), whose uses tell each sample's gradient at them. A rule of the table sees the call
        as n samples with the same inputs (it has none that hold the batch), each with its own gradient; the generic
        rule reruns the module on each sample's inputs to the shared output. Returns the call's output for the
        model."""
        n, module = state.n, unit.module
        if state.shared is None:
            state.shared = _shared.Site(n, state.block_rows)
        site = state.shared
        state.sharing.append(unit)
        flat_in = torch.utils._pytree.tree_flatten((args, kwargs))[0]
        # outputs computed from shared inputs (a Linear on DeBERTa-v2's relative embeddings) are Shared: made roots
        flat = [_shared.plain(t) for t in flat]

        # a table rule sees n samples with the same inputs: a batch of one grown to n in dim 0, or a sample dim put in
        # front where the rule reads every dim before the last as positions (a Linear, an Embedding on (T, T)
        # buckets); any other call (a conv or BatchNorm on a (K, C) table, whose dim 0 is their batch) takes the
        # generic rule
        ones = all(t.dim() > 0 and t.shape[0] == 1 for t in flat_in if torch.is_tensor(t))
        squeeze = [False] * len(pos)  # the outputs grown so: each sample's gradient (n, 1, ...) there is (n, ...)
        if unit.rule.grads is _rules.generic_grads or not (ones or _rules.leading_positions(unit.rule, module)):
            call = _rules.Call(n, args, kwargs, flat[0] if spec is None else torch.utils._pytree.tree_unflatten(
                list(flat), spec), versions=versions, in_dims=in_dims, out_dims=out_dims, shared=pos,
                attributes=attributes or None)
        else:
            def grow(t):
                if not torch.is_tensor(t):
                    return t
                return t.expand(n, *t.shape[1:]) if ones and t.dim() > 0 else t.unsqueeze(0).expand(n, *t.shape)

            squeeze = [ones and flat[i].dim() > 0 and flat[i].shape[0] == 1 for i in pos]
            grown = [grow(t) for t in flat] if unit.rule.needs_output(module) else None
            call = _rules.Call(n, *torch.utils._pytree.tree_map(grow, (args, kwargs)), None if grown is None else
                               grown[0] if spec is None else torch.utils._pytree.tree_unflatten(grown, spec),
                               versions=versions, in_dims=[0 if torch.is_tensor(t) else None for t in flat_in],
                               out_dims=[0 if torch.is_tensor(t) else None for t in flat])
        unit.group.calls.append((unit, call))
        first = len(site.roots)  # this call's roots: read from the site, which lets them go when the pass ends

        def sink(grads):
            if _shared.pulling() or unit in state.idle:  # a pull-back to a root upstream of this call's passes through here
                return
            per = [site.take(r, g) for r, g in zip(site.roots[first:], grads)]
            if any(p is None for p in per):
                state.mixed.append((unit, f"returns an output that all samples share, and {site.failed}"))
                return
            call.grads = tuple(p.squeeze(1) if sq else p for p, sq in zip(per, squeeze))
            unit.group.pending.append(call)
            if _ready(unit.group):
                self._process(unit.group)

        for i, t in zip(pos, self._tap(state.anchor, sink, False, [flat[i] for i in pos])):
            flat[i] = site.share(t, copy=True)
        return flat[0] if spec is None else torch.utils._pytree.tree_unflatten(flat, spec)

    def _tapped_forward(self, unit, *args, **kwargs):
        """The forward installed on units whose rule taps its own internals (g-MAS per sample, FusedMAS)."""
        state = self._pass
        live = state is not None and not state.busy and not state.backward
        if live:
            args, kwargs = self._unshare(args, kwargs, state)
        if (live and not unit.repeats
                and not (state.shared is not None and _shared.plain_inputs(args, kwargs)[2])
                # not under a checkpoint, whose recompute in the backward runs the module's own forward: the two must
                # save the same tensors
                and torch._C._autograd._top_saved_tensors_default_hooks(False) is None):
            def tap(outs, on_grads):  # the buffers are looked up when the gradients arrive (made then)
                return self._tap(state.anchor, lambda grads: None if unit in state.idle else on_grads(
                    grads, {k: state.bufs[g] for k, g in unit.names.items()}), True, outs)

            out = (unit.rule.tapped_forward(unit.module, tap, *args, **kwargs)
                   if self._rows_are_samples(unit, args, kwargs, state) else None)
            if out is not None:
                unit.handled = True
                return out
        return type(unit.module).forward(unit.module, *args, **kwargs)

    def _rows_are_samples(self, unit, args, kwargs, state):
        """Whether a call's first input holds the batch's samples in its batch dim: as many rows as samples, one
        where the sample ran alone (learn_dims). Not so for attention over windows of tokens moved into the batch
        dim (Swin-style (n·T/w, w, D)), whose tapped forward took each window for a sample (12-65% off, no warning):
        the call is then recorded as any other, whose dims say what its rows are."""
        first = _first_tensor(args, kwargs)
        dim = _batch_dim(unit.module)
        if first is None or first.dim() <= dim or first.shape[dim] != state.n:
            return False
        alone = self._alone(unit, state.calls.get(unit, 0))
        if alone is None or not alone[0] or alone[0][0] is None:
            return state.n == 1 or not self.one  # no probe of this call: its size alone
        one = alone[0][0]
        return len(one) > dim and one[dim] == 1

    @staticmethod
    def _versions(args):
        flat = args if all(torch.is_tensor(a) for a in args) else torch.utils._pytree.tree_flatten(args)[0]
        return [(t, t._version) for t in flat if torch.is_tensor(t)]

    def _process(self, group):
        """Adds a group's calls into the batch buffers: the fused rule where one call stands alone,
        else per-sample gradients summed over the calls before |·|."""
        bufs, calls = self._pass.bufs, group.calls
        for unit, call in calls:
            for t, version in call.versions:
                if t._version != version:
                    raise RuntimeError(f"module '{unit.name}': its input was modified in place after its forward; "
                                       "the importance needs it unchanged (use inplace=False there)")
        group.calls, group.pending = [], []
        for unit, call in calls:
            if call.params is not None and call.grads is not None:
                self._take_params(unit, call)
        recorded, calls = calls, [(u, c) for u, c in calls if c.grads is not None]
        for unit, call in calls:
            if call.settings is not None and call.settings != _rules.settings(unit.module):
                # its settings changed since (a conv run at two dilations): the generic rule reruns it with them
                call.attributes = {**(call.attributes or {}), unit.module: call.settings}
                call.rerun = True
                if call.out is None:  # a layer of the table returns one tensor, shaped and typed as its gradient
                    call.out = call.grads[0]
        self._pass.busy = True
        try:
            if len(calls) == 1:
                unit, call = calls[0]
                local = {k: bufs[g] for k, g in unit.names.items()}
                if (unit.rule.fused is not None and not call.whole and call.shared is None and not call.rerun
                        and self._use_kernels(call.args)
                        and unit.rule.fused(unit.module, call, local, self.per_sample)):
                    return
            elif (not any(c.whole or c.shared is not None or c.rerun for _, c in calls)
                  and self._use_kernels([c.args for _, c in calls])
                  and (_rules.tied_fused(calls, bufs, self.per_sample)
                       or _rules.linear_calls_fused(calls, bufs, self.per_sample))):
                return
            self._reduce_per_sample(calls, bufs)
        finally:
            self._pass.busy = False
            for _, call in recorded:  # the graph outlives this: let the activations go now
                call.release()

    def _take_params(self, unit, call):
        """Each sample's gradient at the parameters of a generic call read as shared tensors (:meth:`_swap_params`)
        into ``call.param_grads``, where their uses told it (the samples' adding up to the batch's); else the rule
        runs the module again for them."""
        entry, call.params = call.params, None
        site, per = entry.site, {}
        for k, root in entry.roots.items():
            if site is None or site.failed is not None:  # take() fails the site where the samples' do not add up
                break
            if k not in call.unread:
                total = entry.box.get(k)
                per[k] = site.take(root, total if total is not None else torch.zeros_like(entry.originals[k]))
        if site is None or site.failed is not None:
            if call.no_rerun is not None:  # nor can it be run again: the batch runs sample by sample
                self._pass.mixed.append((unit, f"{call.no_rerun} ({site.failed if site else 'too large'})"))
                call.grads = None
            return
        call.param_grads = per
        self._pass.params_used.append((unit, tuple(site.signature)))

    @staticmethod
    def _reruns(unit, call):
        """Whether the call's gradients come from the generic rule, which runs its module again (on each sample's
        inputs, or whole), rather than from its table's rule."""
        return call.whole or call.shared is not None or call.rerun or unit.rule.grads is _rules.generic_grads

    def _call_grads(self, unit, call, s, e):
        """Per-sample gradients of samples s:e of one call (a whole call's: its own, as one sample)."""
        if call.param_grads is not None:  # told by the uses of its parameters (Engine._swap_params)
            return {k: g[s:e] for k, g in call.param_grads.items()}
        if (call.whole and not call.rerun and call.shared is None and (self._pass.n == 1 or not self.per_sample)
                and _rules.leading_positions(unit.rule, unit.module)):
            # the call is the one sample's, or the batch's: a rule that reads every dim before the last as positions
            # takes it as one sample, in float32 (the generic rule's vjp runs in the module's dtype: T5's relative
            # bias of bfloat16 summed its T² positions' gradients into 32 buckets in bfloat16, 16% off at T = 256,
            # where the batch's pass, by the Embedding's rule, was 2% off; the first batch's check then disagreed)
            return unit.rule.grads(unit.module, call, s, e)
        if Engine._reruns(unit, call):
            names = set(unit.names) - call.unread
            return _rules.generic_grads(unit.module, call, s, e, names=names) if names else {}
        return unit.rule.grads(unit.module, call, s, e)

    def _reduce_per_sample(self, calls, bufs):
        """Σ_k |Σ_calls ∂_k| (or |Σ_k Σ_calls ∂_k|), over chunks of samples of bounded size."""
        if not calls:
            return
        n = max(c.n for _, c in calls)  # a whole call counts as one sample: n is 1 where it comes per sample
        cost = max(u.rule.cost(u.module, c) for u, c in calls)
        step = max(1, _rules.CHUNK_ELEMS // max(1, cost))
        total = {}
        for s in range(0, n, step):
            e = min(n, s + step)
            per_sample = {}
            for unit, call in calls:
                if call.whole and s > 0:  # one "sample" (1, *shape): taken with the first chunk
                    continue
                try:
                    grads = self._call_grads(unit, call, s, e)
                except _rules.SharedOutput as shared:
                    if self.per_sample:  # the batch is run again sample by sample
                        self._pass.mixed.append((unit, str(shared)))
                        return
                    call.whole = True  # per_sample=False: the call's gradient whole is the batch's
                    grads = self._call_grads(unit, call, 0, 1)
                except Exception as e:  # noqa: BLE001 - re-raised but for a rerun on one sample's inputs
                    if (isinstance(e, torch.OutOfMemoryError) or not self.per_sample or call.whole or call.n == 1
                            or (call.rows is None and not call.in_blocks and not self._reruns(unit, call))):
                        raise
                    # its module cannot run on one sample's inputs as the pass cut them: rows that are no sample's
                    # (JetMoe's experts on rows sorted by expert, with the batch's expert sizes as a list), an input
                    # of the batch's rows flattened beside one that holds the samples (DBRX's experts, with the
                    # batch's (n·T, k) routing): the batch runs sample by sample (blocks not taken again)
                    if call.rows is not None or call.in_blocks:
                        unit.blocks = False
                    what = (f"is called on an input whose rows are not {call.n} blocks of one sample each"
                            if call.rows is not None or call.in_blocks else "is called on inputs that cannot be cut "
                            "by sample")
                    self._pass.mixed.append((unit, f"{what} (its module raised on one sample's: {type(e).__name__}: "
                                                   f"{str(e)[:120]})"))
                    return
                # per_sample=False: a whole call's gradient joins the batch's sum as it is (its n is not the chunk's)
                into = total if call.whole and not self.per_sample else per_sample
                for local, pg in grads.items():
                    g = unit.names.get(local)
                    if g is not None:
                        pg = pg.sum(0) if into is total else pg
                        into[g] = into[g] + pg if g in into else pg
            for g, pg in per_sample.items():
                if self.per_sample:
                    bufs[g] += pg.abs().sum(0)
                else:
                    total[g] = total[g] + pg.sum(0) if g in total else pg.sum(0)
        for g, t in total.items():
            bufs[g] += t.abs()
