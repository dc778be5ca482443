"""Per-sample gradients of a layer's output that all samples share (T5's relative-position bias, BART's learned
positions on (T,) indices): the output is computed once for the batch and broadcast over it by the model.

The gradient that reaches such an output is the batch's sum; Ω needs each sample's. The output goes on as a
:class:`Shared` tensor. An op that takes it with a tensor of the batch's rows (an add or ``where`` that broadcasts
it over the batch, the ``attn_mask`` of ``scaled_dot_product_attention``, a matmul whose leading dims broadcast
it, the model's own ``expand``) gets it expanded to those rows in dim 0 first, with the same values, so the op's
result is bitwise the same; so does the model's ``repeat`` of it by the batch size (DeBERTa-v2's relative keys, n
blocks of its rows; Mask2Former's queries, over dim 1 of its time-major (Q, n, D) hidden states). The gradient at those rows is each sample's, and is carried back through the ops between the
layer's output and that use (a permute, an unsqueeze: a vmapped backward) to each sample's gradient at the output,
and at every root upstream of it: a layer whose inputs are all shared (DeBERTa-v2's key_proj on its normed relative
embeddings) returns a root in turn, and the backward goes through it, and (:attr:`Site.leaves`) to parameters read
outside their modules into shared outputs. Ops with the output alone, or with tensors that do not hold the batch,
give Shared results. Any other op that meets the batch's rows (one that could mix them) marks the :class:`Site`
failed, as does a gradient at the output that the samples' do not sum to (a use not seen): the engine then runs
the batch one sample at a time, which is exact.

The same mechanism reads a module's own parameters within a call of the generic rule (``Site(params=True)``, one
site per call, ``Engine._swap_params``): each parameter is a root itself (:func:`param_root`), so that an op that
broadcasts it over the batch's rows (ConvNeXt's layer scale, a class token expanded to the batch) tells each
sample's gradient at it without running the module again. A failure there ends only that site: its call's rule
runs the module again.

Which tensors hold the batch is read from shapes: n rows in dim 0, or n blocks of rows where a layer of the pass
took that many rows so (:attr:`Site.blocks`), never a parameter. The engine confirms the sequence of such uses
(:attr:`Site.signature`), with the batch's padding, once against a run one sample at a time, and again whenever it
changes (a tensor of T rows where T equals n changes it).
"""
import threading

import torch
import torch.nn.functional as F
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten


def _names(*names):
    return {getattr(torch.Tensor, k) for k in names if hasattr(torch.Tensor, k)}


# Elementwise ops whose tensor arguments broadcast together (out of place: an in-place op on the shared tensor
# cannot grow it to the batch, and fails without us)
_BROADCAST = {torch.add, torch.sub, torch.mul, torch.div, torch.where, torch.maximum, torch.minimum, torch.rsub,
              *_names("add", "sub", "mul", "div", "where", "maximum", "minimum", "__add__", "__radd__", "__sub__",
                      "__rsub__", "__mul__", "__rmul__", "__truediv__", "__rtruediv__")}
# In place: into a tensor of the batch's rows, the shared one broadcast into it
_IN_PLACE = _names("add_", "sub_", "mul_", "div_", "__iadd__", "__isub__", "__imul__", "__itruediv__")
# The model's own broadcast of a shared tensor to the batch (MPNet expands its position bias to (n, H, T, T))
_EXPAND = {torch.broadcast_to, *_names("expand", "expand_as", "broadcast_to")}
# Its own tiling of one to the batch: DeBERTa-v2 repeats its (H, 2k, d) relative keys n times, to (n·H, 2k, d)
_REPEAT = _names("repeat")
# Products whose leading dims broadcast as batch dims (DeBERTa's relative keys against (n, H, T, d) queries)
_MATMUL = {torch.matmul, *_names("matmul", "__matmul__", "__rmatmul__")}


class Site:
    """The shared outputs of one batch's pass (its roots) and each sample's gradient at them, as it arrives."""

    def __init__(self, n, blocks, params=False):
        self.n = n
        # the parameters of one generic call (Engine._swap_params), whose roots are those parameters themselves, none
        # upstream of another: a failure ends the site at once (that call's rule runs the module again instead)
        self.params = params
        # parameters read outside their modules, which did not run this pass (DeBERTa's relative embeddings, read as
        # rel_embeddings.weight): each sample's gradient at them through the shared outputs is carried back too, and
        # counts where it adds up to theirs. Set before the backward.
        self.leaves = []
        # the row counts that layers of the pass so far took as n blocks of rows, one per sample, as learned from the
        # model run on one sample (Swin's n·windows): the engine's set, which grows as the forward goes on. Rows of
        # another multiple of n (tokens routed or packed by the mask) are no sample's blocks.
        self.blocks = blocks
        self.roots = []  # the Shared outputs of the layers, in call order
        self.per_sample = {}  # id(root) -> (n, *root.shape) float32: each sample's gradient so far
        self.failed = None  # why the samples' gradients cannot be told apart, once known
        # of each op that met tensors other than the shared ones: (op, where those have dims of size n, the rows per
        # sample it expanded to, 0 where none held the batch)
        self.signature = []
        self.live = True
        self._gathers = []  # the nodes of its uses (_Gather), whose references to it close() cuts

    def share(self, t, copy=False):
        """``t`` (an output of a layer whose call all samples share) as a root; with ``copy``, the model gets a copy
        of it, and ``t`` stays the root: an op the model makes on it in place (DeBERTa's ``pos_query_layer /=
        scale``) changes the copy, not the tensor whose gradient the layer's rule takes."""
        root = _as_shared(t.clone() if copy else t, self)
        self.roots.append(t if copy else root)
        return root

    def fail(self, why):
        self.failed = self.failed or why
        if self.params:  # its tensors act as plain ones from now on
            self.live = False

    def close(self):
        """Ends the pass: Shared tensors left in the model's outputs act as plain ones from now on, and a graph the
        model keeps (RecurrentGemma's recurrent state on its layer) keeps none of the site's."""
        self.live, self.roots, self.per_sample, self.leaves = False, [], {}, []
        for ctx in self._gathers:
            ctx.view = ctx.root = ctx.site = None
        self._gathers = []

    def _pull_back(self, view, grads, root=None):
        """Adds each sample's gradient at the roots from ``grads`` (n·m, *view.shape[1:]): the gradient at ``view``
        (a shared tensor of size 1 in dim 0) expanded to n blocks of m rows, sample k's the k-th. ``root``: the root
        that ``view`` only reshapes, in a site of parameters (no root upstream of another): its gradient, reshaped."""
        if self.failed is not None:  # the batch runs again one sample at a time: no backward through other taps
            return
        if root is not None:
            g = grads.reshape(self.n, -1, *view.shape[1:]).sum(1).reshape(self.n, *root.shape).float()
            acc = self.per_sample.get(id(root))
            self.per_sample[id(root)] = g if acc is None else acc + g
            return
        # _Tap outputs and tracked parameters: all require grad. A root upstream of another (a LayerNorm's output
        # before a Linear on it) gets the gradient through that one as well.
        roots = [*self.roots, *self.leaves]
        cot = grads.reshape(self.n, -1, *view.shape[1:]).sum(1, keepdim=True)
        _PULLS.count = getattr(_PULLS, "count", 0) + 1
        with torch._C.DisableTorchFunctionSubclass():  # the roots are Shared: autograd.grad would come to them
            try:
                try:
                    got = torch.autograd.grad(view, roots, cot, is_grads_batched=True, retain_graph=True,
                                              allow_unused=True)
                except RuntimeError:  # an op between the root and this use that vmap cannot batch: one by one
                    per = [torch.autograd.grad(view, roots, c, retain_graph=True, allow_unused=True) for c in cot]
                    got = [None if per[0][i] is None else torch.stack([p[i] for p in per])
                           for i in range(len(roots))]
            except torch.OutOfMemoryError:
                raise
            except RuntimeError as e:  # a graph the pass cannot take back (freed): the batch runs sample by sample
                self.fail(f"a use of its output goes through a graph the pass cannot take back ({str(e)[:120]})")
                return
            finally:
                _PULLS.count -= 1
        for r, g in zip(roots, got):
            if g is not None:
                acc = self.per_sample.get(id(r))
                self.per_sample[id(r)] = g.float() if acc is None else acc + g.float()

    def take(self, root, total):
        """Each sample's gradient at ``root`` (a root or a leaf) ((n, *shape), in ``total``'s dtype), where the
        samples' sum to ``total``, the batch's gradient there (float32 rounding; bf16/fp16: theirs); else None (and,
        for a root, failed: a leaf's other reads fail only that parameter)."""
        per = self.per_sample.pop(id(root), None)
        if self.failed is not None:
            return None
        if per is None:
            per = torch.zeros((self.n, *root.shape), device=total.device)
        tol = 1e-3 if total.element_size() >= 4 else 3e-2
        if float((per.sum(0) - total.float()).norm()) > tol * float(total.float().norm()) + 1e-30:
            if not any(root is leaf for leaf in self.leaves):
                self.fail("its output reaches the model's output through a use whose samples cannot be told apart")
            return None
        return per.to(total.dtype)


_PULLS = threading.local()  # .count: the pull-backs (Site._pull_back) now running in this thread


def pulling():
    """Whether a pull-back runs in this thread: the backward it runs through the ops between a root and a use passes
    by the taps of layers on its way (a Linear on a shared input) and by other uses (a tensor expanded to the batch's
    rows, summed, then met again): the gradients there are the pull-back's own, one per sample, not the batch's."""
    return getattr(_PULLS, "count", 0) > 0


class _Gather(torch.autograd.Function):
    """Identity on a shared tensor expanded to the batch's rows; its backward hands the gradient at those rows to
    the site, which carries it back to each sample's gradient at the roots."""

    @staticmethod
    def forward(ctx, expanded, view, site, root=None):
        ctx.view, ctx.site, ctx.version, ctx.root = view, site, view._version, root
        site._gathers.append(ctx)
        return expanded.view_as(expanded)

    @staticmethod
    def backward(ctx, grad):
        if pulling() or ctx.site is None:  # within another use's pull-back (an identity on the way to the roots),
            return grad, None, None, None  # or after its pass
        if ctx.view._version != ctx.version:  # written in place since: its graph back to the roots is another
            ctx.site.fail("a tensor computed from its output was changed in place after a use")
        ctx.site._pull_back(ctx.view, grad, ctx.root)
        return grad, None, None, None


def param_root(site, param):
    """(``param`` as a root of ``site``, a site of parameters: a Shared view of it, whose uses with the batch's rows
    tell each sample's gradient at it; None: a plain view; the plain view, at which the backward takes the batch's
    gradient; the sequence number of the node that reads ``param``, None under no_grad)."""
    t = param.view_as(param)
    return (t if site is None else site.share(t)), t, (t.grad_fn._sequence_nr() if t.grad_fn is not None else None)


def plain(t):
    """``t`` as a plain tensor (the same data and graph) where it is Shared; anything else as it is."""
    if isinstance(t, Shared):
        with torch._C.DisableTorchFunctionSubclass():
            return t.as_subclass(torch.Tensor)
    return t


def plain_inputs(args, kwargs):
    """(args, kwargs, whether any was Shared), the Shared tensors among them made :func:`plain`."""
    if not kwargs and all(torch.is_tensor(a) for a in args):  # most layers: no pytree walk
        if not any(isinstance(a, Shared) for a in args):
            return args, kwargs, False
        return tuple(plain(a) for a in args), kwargs, True
    flat, spec = tree_flatten((args, kwargs))
    if not any(isinstance(t, Shared) for t in flat):
        return args, kwargs, False
    args, kwargs = tree_unflatten([plain(t) for t in flat], spec)
    return args, kwargs, True


def _as_shared(t, site):
    s = t.as_subclass(Shared)
    s._site = site
    return s


def _expand(t, ndim, rows, site):
    """``t`` (shared) as an operand of an op whose result has ``ndim`` dims and the batch's ``rows`` (n, or n
    blocks of m: Swin's windows) in dim 0: leading dims of size 1 added, dim 0 expanded to those rows, through
    :class:`_Gather`; None where its dim 0 is not of size 1 there."""
    view = t.reshape((1,) * (ndim - t.dim()) + tuple(t.shape)) if t.dim() < ndim else t
    if view.dim() != ndim or view.shape[0] != 1:
        return None
    root = t if site.params and any(t is r for r in site.roots) else None  # its gradient needs no backward
    return _Gather.apply(view.expand(rows, *view.shape[1:]), view, site, root)


def _batch_rows(tensors, site, ndim):
    """The rows in dim 0 of the tensors among ``tensors`` (none of them shared) that hold the batch, where one
    does: n, or n blocks of rows where a layer of the pass took that many so (:attr:`Site.blocks`); a parameter
    never does. None where none does."""
    rows = {t.shape[0] for t in tensors if t.dim() == ndim and not isinstance(t, torch.nn.Parameter)}
    rows = [r for r in rows if r == site.n or r in site.blocks]
    return max(rows) if ndim > 0 and rows else None


class Shared(torch.Tensor):
    """A tensor that all samples of the batch share, computed from a shared layer output (see the module's
    docstring). ``_site``: the :class:`Site` of its pass."""

    def __format__(self, spec):  # as a plain tensor's (a 0-dim one formats its item: a model's log line)
        with torch._C.DisableTorchFunctionSubclass():
            plain = self.as_subclass(torch.Tensor)
        return plain.__format__(spec)

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        flat, spec = tree_flatten((args, kwargs))
        sites = {id(t._site): t._site for t in flat if isinstance(t, Shared)}
        for other in sites.values():
            if not other.params:
                continue
            if len(sites) > 1:  # a parameter's tensor with another site's (a shared layer output): that one goes on
                other.fail("a tensor computed from it meets one computed from another shared tensor")
            elif torch._C._autograd._top_saved_tensors_default_hooks(False) is not None:
                # within a checkpoint, whose recompute reads the parameter plain: what the op saves must be the same
                other.fail("a tensor computed from it is used within a checkpoint")
        if any(not st.live for st in sites.values()) and len(sites) > 1:  # those of ended sites as plain ones
            flat = [plain(t) if isinstance(t, Shared) and not t._site.live else t for t in flat]
            args, kwargs = tree_unflatten(flat, spec)
        site = next((t._site for t in flat if isinstance(t, Shared)), None)
        with torch._C.DisableTorchFunctionSubclass():
            if site is None or not site.live:
                return func(*args, **kwargs)
            others = [t for t in flat if torch.is_tensor(t) and not isinstance(t, Shared)]
            if others:
                out = _with_batch(func, args, kwargs, flat, spec, others, site)
                if out is not NotImplemented:
                    return out
            t = args[0] if args else None
            if func in _REPEAT and not others and isinstance(t, Shared):
                tiled = _tile(t, args[1:] or (kwargs.get("repeats", ()),), site)
                if tiled is not None:
                    return tiled
            out = func(*args, **kwargs)
            if (func in _EXPAND and not others and isinstance(t, Shared) and out.dim() > 0
                    and (t.dim() < out.dim() or t.shape[0] == 1) and _batch_rows([out], site, out.dim())):
                # its dim 0 broadcast to the batch's rows by the model itself
                site.signature.append((getattr(func, "__name__", repr(func)), (), out.shape[0] // site.n))
                return func(_expand(t, out.dim(), out.shape[0], site), *args[1:], **kwargs)
        # results that a gradient can reach stay shared (views, reshapes, casts, adds of constants)
        return tree_map(lambda r: _as_shared(r, site) if torch.is_tensor(r) and r.requires_grad
                        and r.is_floating_point() and not isinstance(r, Shared) else r, out)


def _tile(t, reps, site):
    """``t.repeat(*reps)`` where it tiles ``t`` n times in one dim d and nothing else: n blocks of its rows there,
    one per sample, through :class:`_Gather` (DeBERTa-v2's relative keys, repeated by the batch size in dim 0;
    Mask2Former's (Q, 1, D) queries, in dim 1 of its time-major decoder); else None (other repeats, and arguments
    torch rejects, are left to torch)."""
    if len(reps) == 1 and isinstance(reps[0], (tuple, list)):  # one sequence (torch.Size is a tuple)
        reps = tuple(reps[0])
    try:
        reps = tuple(int(r) for r in reps)
    except (TypeError, ValueError, RuntimeError):
        return None
    tiled = [d for d, r in enumerate(reps) if r != 1]
    if site.n < 2 or len(reps) < max(t.dim(), 1) or len(tiled) != 1 or reps[tiled[0]] != site.n:
        return None
    d = tiled[0]
    shape = (1,) * (len(reps) - t.dim()) + tuple(t.shape)  # t aligned to the dims of reps
    view = t.reshape(1, *shape)
    site.signature.append(("repeat", (d,), shape[d]))
    # sample k's copy moved to dim d, before the rows it tiles: (.., n, m, ..) merged to n·m there. Contiguous, as
    # torch's repeat is (a (1, ...) tensor tiled is a stride-0 view of it else: WavLM views it)
    grown = _Gather.apply(view.expand(site.n, *shape), view, site).movedim(0, d)
    return grown.reshape(*shape[:d], site.n * shape[d], *shape[d + 1:]).contiguous()


def _einsum(args, kwargs, site, entry):
    """``torch.einsum(equation, *operands)`` of shared operands with others (within DisableTorchFunctionSubclass):
    where an operand not shared has the batch's n rows in dim 0, under a letter that leads the output's subscript
    (Wav2Vec2-BERT's "bhld,lrd->bhlr", its relative position embeddings against the queries), each shared operand
    gets that letter in front and is expanded to the n rows, the same values; NotImplemented where no operand holds
    the batch; else the site fails."""
    equation, operands = args[0], list(args[1:])
    if len(operands) == 1 and isinstance(operands[0], (list, tuple)):
        operands = list(operands[0])
    lhs, arrow, out = equation.replace(" ", "").partition("->")
    subs = lhs.split(",")
    shared = [i for i, t in enumerate(operands) if isinstance(t, Shared)]
    rows = {i: _batch_rows([t], site, t.dim()) for i, t in enumerate(operands) if torch.is_tensor(t) and i not in shared}
    if not any(rows.values()):
        site.signature.append((*entry, 0))
        return NotImplemented
    batch = [i for i, r in rows.items() if r == site.n and len(subs[i]) == operands[i].dim()]
    letter = subs[batch[0]][0] if batch else None
    if (kwargs or not arrow or "." in equation or len(subs) != len(operands) or letter is None
            or not out.startswith(letter) or any(letter in subs[i] for i in shared)):
        site.fail("a tensor computed from its output meets the batch's rows in einsum other than along a batch "
                  "subscript that leads the output")
        return torch.einsum(*args, **kwargs)
    site.signature.append((*entry, 1))
    for i in shared:
        operands[i] = _expand(operands[i], operands[i].dim() + 1, site.n, site)
        subs[i] = letter + subs[i]
    return torch.einsum(",".join(subs) + "->" + out, *operands)


def _with_batch(func, args, kwargs, flat, spec, others, site):
    """An op of shared tensors with ``others`` (tensors not shared), within DisableTorchFunctionSubclass: its
    result where one of them holds the batch (the shared ones expanded to its rows, or computed as they are and
    the site failed); NotImplemented where none does (the op's result is then shared too). Each such op adds to
    the site's signature its name, where the others have dims of size n, and the rows per sample it took (0:
    none held the batch)."""
    n = site.n
    name = getattr(func, "__name__", repr(func))
    entry = (name, tuple(tuple(i for i, s in enumerate(t.shape) if s == n) for t in others))
    if func is torch.einsum:
        return _einsum(args, kwargs, site, entry)
    if func is F.scaled_dot_product_attention:
        bound = dict(zip(("query", "key", "value", "attn_mask"), args), **kwargs)
        q, k, mask = bound.get("query"), bound.get("key"), bound.get("attn_mask")
        if not isinstance(mask, Shared) or any(isinstance(bound.get(x), Shared) for x in ("query", "key", "value")):
            site.fail(f"a tensor computed from its output is an input of {name} other than its attn_mask")
            return func(*args, **kwargs)
        ndim = len(torch.broadcast_shapes(mask.shape, (*q.shape[:-1], k.shape[-2])))
        shared = {"attn_mask": mask} if "attn_mask" in kwargs else {3: mask}
        rows = _batch_rows([q], site, ndim)
    else:
        ndim = max(t.dim() for t in flat if torch.is_tensor(t))
        shared = {i: t for i, t in enumerate(flat) if isinstance(t, Shared)}
        rows = _batch_rows(others, site, ndim)
        if rows is not None and func in _MATMUL:
            # a shared operand of 2 or more dims against a batch of 3 or more: its leading dims broadcast as batch
            # dims (a 1-dim one is a vector, whose dim is contracted)
            if ndim < 3 or any(t.dim() < 2 for t in shared.values()):
                site.fail(f"a tensor computed from its output meets the batch's rows in {name} other than as a "
                          "stack of matrices")
                return func(*args, **kwargs)
        elif rows is not None and not (func in _BROADCAST or func in _EXPAND
                                       or (func in _IN_PLACE and not isinstance(flat[0], Shared))):
            why = (f"is changed in place by {name} with the batch's rows" if func in _IN_PLACE else
                   f"meets the batch's rows in {name}, which may mix them")
            site.fail(f"a tensor computed from its output {why}")
            return func(*args, **kwargs)
    site.signature.append((*entry, 0 if rows is None else rows // n))
    if rows is None:
        return NotImplemented
    grown = {key: _expand(t, ndim, rows, site) for key, t in shared.items()}
    if any(g is None for g in grown.values()):
        site.fail(f"a tensor computed from its output has rows in dim 0 where {name} broadcasts it over the batch")
        return func(*args, **kwargs)
    if func is F.scaled_dot_product_attention:
        if "attn_mask" in grown:
            return func(*args, **{**kwargs, **grown})
        return func(*args[:3], grown[3], *args[4:], **kwargs)
    args, kwargs = tree_unflatten([grown.get(i, t) for i, t in enumerate(flat)], spec)
    return func(*args, **kwargs)
