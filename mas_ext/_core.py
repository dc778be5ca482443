"""ReferenceMAS and FusedMAS: Ω_t as running means and counts, consolidation, the penalty and checkpoints.

The importance pass itself (units, hooks, taps, rules) is :class:`._engine.Engine`; a MAS object hands it
each batch and commits what the batch added only when the whole batch is finite. Checkpoint validation
and atomic writes are in ``_checkpoint``.
"""
import contextlib
import functools
import inspect
import numbers
import os
import signal
import sys
import threading
import warnings
from collections.abc import Mapping

import torch
import torch.nn as nn
from tqdm.autonotebook import tqdm  # not tqdm.auto, whose asyncio class calls iter() on the data twice

from . import _checkpoint, _ops
from ._engine import _DECODER_INPUTS, Engine, ZeroBuffers, ours, pass_running

__all__ = ["ReferenceMAS", "FusedMAS", "backend"]

def backend():
    """Which importance/penalty path ``FusedMAS`` runs on this machine, and why."""
    if os.environ.get("MAS_EXT_BACKEND", "").lower() == "reference":
        return "reference (forced by MAS_EXT_BACKEND=reference)"
    if _ops.error is not None:
        return f"reference (compiled kernels unavailable: {_ops.error})"
    cpu = f"cpu (C++ kernels: {_ops._C.cpu_kernel()}; OpenMP, {torch.get_num_threads()} threads)"
    if torch.cuda.is_available():
        if not _cuda_ops_built():
            return f"{cpu}; CUDA tensors take the reference path: no CUDA kernels in this build"
        if not _ops.cuda_kernels_enabled():
            return (f"{cpu}; CUDA tensors take the reference path: the CUDA kernels are built but not yet verified "
                    "on a GPU (MAS_EXT_CUDA_KERNELS=1 opts in, for testing)")
        return f"cuda (CUDA kernels, opted in by MAS_EXT_CUDA_KERNELS=1); {cpu}"
    return cpu


@functools.lru_cache(maxsize=None)
def _cuda_ops_built():
    """Whether this build registered CUDA kernels (fixed once the library is loaded)."""
    return _ops.error is None and torch._C._dispatch_has_kernel_for_dispatch_key("mas_ext::linear_importance_", "CUDA")


def _unwrap(model):
    """The module inside DistributedDataParallel/DataParallel and torch.compile wrappers, in any nesting
    (names without ``module.`` or ``_orig_mod.``)."""
    wrappers = (nn.parallel.DistributedDataParallel, nn.DataParallel)
    while True:
        if isinstance(model, wrappers):
            model = model.module
        elif type(model).__name__ == "OptimizedModule" and isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        else:
            return model


@contextlib.contextmanager
def _sigint_deferred():
    """Holds a Ctrl-C until the block ends, so a commit of Ω and the count is never half done."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught = []
    previous = signal.signal(signal.SIGINT, lambda *a: caught.append(a))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if caught:
            raise KeyboardInterrupt


def _engine_setting(name, doc):
    """A MAS setting that its engine reads at every pass (so a change, as by load_state_dict, applies)."""
    def set_(self, value):
        setattr(self._engine, name, _checked(name, value))

    return property(lambda self: getattr(self._engine, name), set_, doc=doc)


def _checked(name, value):
    """``value`` of the setting ``name`` as it is kept, or a ValueError (TypeError) naming a ``mode`` that is not
    "global" or "local", a ``per_sample`` that is not a bool (or 0/1), a ``lam`` that is not a finite number ≥ 0."""
    if name == "mode" and value not in ("global", "local"):
        raise ValueError(f"mode must be 'global' or 'local', got {value!r}")
    if name == "per_sample":
        if not isinstance(value, numbers.Integral) or value not in (0, 1):
            raise TypeError(f"per_sample must be True or False, got {value!r}")
        return bool(value)
    if name == "lam":
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0.0 <= float(value) < float("inf"):
            raise ValueError(f"lam must be a finite number >= 0, got {value!r}")
        return float(value)
    return value


_PLAIN = (numbers.Number, str, bytes, torch.dtype, torch.device, type(None))


def _stateful_argument(args, kwargs):
    """A description of the first argument of a model call that is neither a tensor nor a plain value (a Hugging
    Face ``past_key_values`` cache, any object the model may update in place), or None."""
    flat, _ = torch.utils._pytree.tree_flatten((args, kwargs))
    bad = next((x for x in flat if not torch.is_tensor(x) and not isinstance(x, _PLAIN)), None)
    if bad is None:
        return None
    name = next((k for k, v in kwargs.items() if v is bad), None)
    return f"{name}={type(bad).__name__}" if name else f"a {type(bad).__name__}"


# Model inputs that carry what the model's own encoder (or vision tower) would compute, computed before the call
# (generate() runs it once, without gradients): a pass on such a call cannot reach those parameters.
_COMPUTED_AHEAD = ("encoder_outputs", "mm_encoder_outputs")


def _decoder_from_labels(net, kwargs):
    """Whether a call of an encoder-decoder model passes labels but none of its decoder's inputs: the model would
    make them from the labels, which MAS drops (BART then makes them from the input_ids: another f, 77% off without a
    warning; T5 and Whisper fail with messages that mislead)."""
    if kwargs.get("labels") is None or any(kwargs.get(k) is not None for k in _DECODER_INPUTS):
        return False
    try:
        names = inspect.signature(net.forward).parameters
    except (TypeError, ValueError):
        return False
    return any(k in names for k in _DECODER_INPUTS)


@contextlib.contextmanager
def _requiring_grad(params):
    """``params`` with requires_grad=True inside the block, set back to False after."""
    for p in params:
        p.requires_grad_(True)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(False)


def _owners(net, params):
    """(lookup, key, value) links from ``net`` to each of ``params`` ({name: parameter}) along its name: each
    submodule in its parent's ``_modules``, each parameter in its module's ``_parameters``, shared links once. While
    every ``lookup(key) is value``, each name still leads to its parameter."""
    links = {}
    for name, p in params.items():
        *path, leaf = name.split(".")
        module = net
        for part in path:
            child = module._modules[part]
            links[id(module), part] = (module._modules.get, part, child)
            module = child
        links[id(module), leaf, "p"] = (module._parameters.get, leaf, p)
    return list(links.values())


def _inside_another(module, entries):
    """Whether this forward of ``module`` runs inside a forward of another of ``entries`` (read off the Python
    stack, which an interrupted forward leaves as it was)."""
    frame = sys._getframe(2)
    while frame is not None:
        if frame.f_code is _CALL_IMPL:
            owner = frame.f_locals.get("self")
            if owner is not module and owner in entries:
                return True
        frame = frame.f_back
    return False


_CALL_IMPL = nn.Module._call_impl.__code__


def _uncached_step(kwargs):
    """Whether a model call is one that generate(use_cache=False) makes: input_ids, use_cache=False and
    logits_to_keep, all by keyword."""
    return (kwargs.get("use_cache") is False and kwargs.get("logits_to_keep") is not None
            and torch.is_tensor(kwargs.get("input_ids")) and kwargs["input_ids"].dim() == 2)


def _empty_caches(args, kwargs):
    """The ids of a call's non-tensor arguments where every one is an empty Hugging Face cache (``get_seq_length()``
    is 0: the first call of ``generate()``), else an empty set."""
    flat, _ = torch.utils._pytree.tree_flatten((args, kwargs))
    objects = [x for x in flat if not torch.is_tensor(x) and not isinstance(x, _PLAIN)]
    try:
        if objects and all(callable(getattr(x, "get_seq_length", None)) and x.get_seq_length() == 0 for x in objects):
            return {id(x) for x in objects}
    except Exception:  # noqa: BLE001 - not a cache after all: the call is skipped as any other stateful one
        pass
    return set()


class ReferenceMAS:
    """Memory Aware Synapses in pure PyTorch: the ground truth that ``FusedMAS`` is tested against.

    Args:
        model: the network; parameters with ``requires_grad=False`` are not tracked. A DDP or
            DataParallel wrapper is accepted and its ``module.`` prefix dropped from the names.
        lam: λ of the penalty R(θ) = λ Σ Ω (θ − θ*)².
        mode: ``"global"`` (g-MAS: gradients of ‖f(x)‖²) or ``"local"`` (l-MAS: Hebbian, each
            layer's own output in place of the back-propagated gradient).
        per_sample: True (the paper's definition, |·| per sample) or False (the |batch gradient|
            approximation of the existing libraries, for comparison).
        output_fn: picks the tensor whose squared norm is taken (called with the model's output). Default:
            the output itself where it is a tensor, else its ``logits`` field (a Hugging Face ``ModelOutput``,
            a dict); any other output (a tuple) is a TypeError naming output_fn.
        merge, alpha: defaults of :meth:`consolidate`.
        show_progress: a tqdm bar over batches in :meth:`accumulate` when the data has a length.
    """

    _gate = None  # FusedMAS: _KernelGate, where the compiled kernels run

    mode = _engine_setting("mode", "``'global'`` (g-MAS) or ``'local'`` (l-MAS, Hebbian).")
    per_sample = _engine_setting("per_sample", "True: |·| per sample (the paper); False: |batch gradient|.")
    output_fn = _engine_setting("output_fn", "Picks the tensor whose squared norm is taken, or None.")

    @property
    def lam(self):
        """λ of the penalty (a finite float >= 0; a ValueError otherwise)."""
        return self._lam

    @lam.setter
    def lam(self, value):
        self._lam = _checked("lam", value)

    def __init__(self, model, lam=1.0, mode="global", per_sample=True, output_fn=None, merge="sum", alpha=0.5,
                 show_progress=True):
        mode, per_sample = _checked("mode", mode), _checked("per_sample", per_sample)
        self.lam = lam  # checked by its setter
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        self._check_merge(merge, alpha)
        self.model, self.net = model, _unwrap(model)
        self.params = {n: p for n, p in self.net.named_parameters() if p.requires_grad}
        self._shapes = {n: p.shape for n, p in self.params.items()}
        self._owners = _owners(self.net, self.params)
        self._untracked_said = ()
        if not self.params:
            raise ValueError("the model has no parameters with requires_grad=True: nothing to track")
        self._kernels_for = self._gate() if self._gate is not None else None
        self._engine = Engine(self.net, self.params, mode, per_sample, output_fn, self._kernels_for)
        self.merge, self.alpha, self.show_progress = merge, float(alpha), show_progress
        # Ω_t as running means (read without a copy) over _count samples; made on first use
        self._mean = ZeroBuffers(self.params)
        self._count = 0
        self._importance, self._star = {}, {}
        self.num_tasks = 0

    # ------------------------------------------------------------------ the importance pass
    def accumulate(self, batches, show_progress=None):
        """Adds the per-sample importance of every sample in ``batches``, an iterable of batches: tensors
        (``model(x)``), (x, y, ...) tuples or lists (``model(x)``, the rest ignored as labels), or dicts of model
        keyword arguments (``model(**batch)``, ``labels`` dropped). Returns self.

        Raises ValueError on empty data, TypeError on an output that is not a floating tensor, and
        FloatingPointError naming a batch whose output or gradients are not finite; Ω and the sample
        count then stay as they were after the last whole batch (also on KeyboardInterrupt).
        """
        if torch.is_tensor(batches):
            raise TypeError(f"accumulate() takes an iterable of batches, got one tensor of shape {tuple(batches.shape)} "
                            "(iterated, its rows would be batches, each of its dim 1 as samples): pass [x] for one "
                            "batch, or a DataLoader")
        self._check_params("accumulate()")
        self._warn_untracked("accumulate()")
        total = len(batches) if hasattr(batches, "__len__") else None
        if total == 0:
            raise ValueError("accumulate() got no data: the iterable of batches is empty")
        show = self.show_progress if show_progress is None else show_progress
        bar = tqdm(batches, total=total, disable=not show or total is None or total < 2, unit="batch",
                   desc=f"{type(self).__name__} {self.mode} importance", leave=False)
        seen = 0
        with self._engine.session():
            for i, batch in enumerate(bar):
                self._accumulate_batch(*self._input(batch, i), i)
                seen += 1
        if seen == 0:
            raise ValueError("accumulate() got no data: the iterable of batches is empty")
        return self

    @contextlib.contextmanager
    def observe(self):
        """Within this context every forward of the model also adds its inputs' importance
        (deployment: Ω learns from unlabeled traffic), positional and keyword calls alike (``labels``
        dropped). The model's outputs are unchanged, and the user's forward never fails because of MAS:
        a call whose importance cannot be taken is skipped with a warning saying why, Ω and the count
        unchanged.

        A call of a module inside the model that holds all the model's parameters, made on its own, is the model's
        call too (a PEFT model's ``generate()`` calls the model it wraps); one inside another such call is not
        observed again. ``generate()``'s first call, on the prompts with an empty cache, is observed without its
        cache and its ``logits_to_keep`` (Ω of the prompts, as :meth:`accumulate` takes them); the calls that
        follow, one token each on a filled cache, are skipped (one warning), and so are calls that pass
        ``encoder_outputs`` computed before them (an encoder-decoder's generate()). ``generate(use_cache=False)``
        runs the whole prefix at every step: its first call is observed as the prefill is, and a call whose
        input_ids are the last call's and one token more is a step, skipped. Where the model's layers ran
        but no call of the model was seen (PEFT's prompt tuning), observe() says so when it ends."""
        everything = {id(p) for p in self.net.parameters()}
        entries = {self.model} | {m for m in self.net.modules() if {id(p) for p in m.parameters()} == everything}
        calls, stateful, layers_ran, empty_caches, prefix = [0], [], [False], {}, [None]

        @torch.compiler.disable  # inside a compiled model: run as it is, after the compiled part (it reads the stack)
        def hook(module, args, kwargs, output):
            if pass_running() or _inside_another(module, entries):  # a pass's call, or the outer call is observed
                return
            where = f"observed #{calls[0]}"
            calls[0] += 1
            if _decoder_from_labels(self.net, kwargs):
                warnings.warn(f"{type(self).__name__}.observe(): call {where} skipped: it passes labels but no "
                              "decoder_input_ids, from which the model makes its decoder's inputs; MAS drops labels, "
                              "so the pass would see other inputs; importance and sample count unchanged", stacklevel=2)
                return
            kwargs = {k: v for k, v in kwargs.items() if k != "labels"}
            ahead = [k for k in _COMPUTED_AHEAD if kwargs.get(k) is not None]
            if ahead:  # generate() ran the encoder itself, without gradients: its parameters would get no Ω
                warnings.warn(f"{type(self).__name__}.observe(): call {where} skipped: it passes {ahead[0]}, "
                              "computed before the call (generate() runs the encoder or vision tower itself), whose "
                              "parameters the importance pass cannot reach; importance and sample count unchanged",
                              stacklevel=2)
                return
            if _uncached_step(kwargs):
                # generate(use_cache=False): each step runs the whole prefix, its last logits only. The first, on the
                # prompts, is observed as the cache's prefill is (without logits_to_keep: Ω of the prompts); a call
                # on the last one's tokens plus one is a step, skipped as the cached steps are
                ids, last = kwargs["input_ids"], prefix[0]
                prefix[0] = ids
                if (last is not None and ids.shape[0] == last.shape[0] and ids.shape[1] == last.shape[1] + 1
                        and torch.equal(ids[:, :-1], last)):
                    if not stateful:
                        warnings.warn(f"{type(self).__name__}.observe(): call {where} skipped, and every later step "
                                      "of generate(use_cache=False) (its input_ids are the last call's and one token "
                                      "more: the generated tokens, not traffic); importance and sample count "
                                      "unchanged", stacklevel=2)
                    stateful.append(where)
                    return
                kwargs = {k: v for k, v in kwargs.items() if k != "logits_to_keep"}
            state = _stateful_argument(args, kwargs)
            empty = empty_caches.pop(id(module), set()) if state is not None else set()
            if state is not None and empty:  # generate()'s prefill: the prompts, as accumulate() takes them
                kwargs = {k: v for k, v in kwargs.items() if id(v) not in empty and k != "logits_to_keep"}
                args = tuple(a for a in args if id(a) not in empty)
                state = _stateful_argument(args, kwargs)
            if state is not None:  # the pass runs the model again: it would advance the user's state (a KV cache)
                if not stateful:  # once per context: generate() makes such a call per token
                    warnings.warn(f"{type(self).__name__}.observe(): call {where} skipped, and every later call that "
                                  f"passes such a state (it passes {state}, which the model may update in place, and "
                                  "the importance pass runs the model again); importance and sample count unchanged",
                                  stacklevel=2)
                stateful.append(where)
                return
            self._engine.entry = self.net if module is self.model else module
            try:
                with self._engine.session():
                    self._accumulate_batch(args, kwargs, where)
            except Exception as e:  # never the user's forward: skip this call, say why
                warnings.warn(f"{type(self).__name__}.observe(): call {where} skipped ({type(e).__name__}: {e}); "
                              "importance and sample count unchanged", stacklevel=2)
            finally:
                self._engine.entry = self.net

        @ours
        def pre_hook(module, args, kwargs):  # whether its caches are empty, before the call fills them
            if not pass_running():
                empty_caches[id(module)] = _empty_caches(args, kwargs)

        @ours
        def ran(module, args):
            if not pass_running():
                layers_ran[0] = True

        tracked = {id(p) for p in self.params.values()}
        holders = {m for m in self.net.modules() if any(id(p) in tracked for p in m.parameters(recurse=False))}
        handles = [h for m in entries for h in (m.register_forward_pre_hook(pre_hook, with_kwargs=True),
                                                m.register_forward_hook(hook, with_kwargs=True))]
        handles += [m.register_forward_pre_hook(ran) for m in holders]
        try:
            yield self
        finally:
            for h in handles:
                h.remove()
        if calls[0] == 0 and layers_ran[0]:
            warnings.warn(f"{type(self).__name__}.observe(): the model's layers ran, but no call of the model was "
                          "seen (a wrapper that runs them without the model's forward: PEFT's prompt and prefix "
                          "tuning generate() this way); importance and sample count unchanged", stacklevel=3)

    def _input(self, batch, i):
        """(args, kwargs) of the model call for one batch: a tensor, an (x, y, ...) tuple (labels ignored),
        or a dict of keyword arguments (``model(**batch)``, ``labels`` dropped)."""
        if torch.is_tensor(batch):
            return (batch,), {}
        if isinstance(batch, (tuple, list)) and batch and torch.is_tensor(batch[0]):
            return (batch[0],), {}
        if isinstance(batch, Mapping) and batch:
            if _decoder_from_labels(self.net, batch):
                raise ValueError(
                    f"batch {i}: an encoder-decoder model's batch with labels but no decoder_input_ids: MAS drops "
                    "labels (its importance needs none), so the decoder would get other inputs; pass "
                    "decoder_input_ids (DataCollatorForSeq2Seq(tokenizer, model=model) adds them, as does "
                    "model.prepare_decoder_input_ids_from_labels(labels=...))")
            return (), {k: v for k, v in batch.items() if k != "labels"}
        raise TypeError(f"batch {i}: expected a tensor, an (x, y, ...) tuple of tensors or a dict of model keyword "
                        f"arguments, got {type(batch).__name__}")

    def _accumulate_batch(self, args, kwargs, where):
        """One batch through the engine, committed to Ω_t's running means and the count only when it is all
        finite."""
        n = self._engine.batch_size(args, kwargs, where)
        # With no samples yet in this task, Ω_t is zero: the batch accumulates into it in place and a failed
        # batch just drops it. Otherwise it fills buffers of its own, folded in only once the whole batch is
        # known finite. Either way a layer's buffer is made when its gradients arrive, as a plain backward
        # makes its .grad.
        fresh, committed = self._count == 0, False
        try:
            bufs = ZeroBuffers(self.params)
            if fresh:
                self._mean = bufs
            # The pass needs autograd: outside inference_mode (which an observed pipeline's forward may run in), on
            # normal copies of inputs made inside it, and gradients of tracked parameters frozen since (a backbone
            # frozen for the next task: its Ω is still its importance for this task's function)
            frozen = [p for p in self.params.values() if not p.requires_grad]
            with torch.inference_mode(False), _requiring_grad(frozen):
                args, kwargs = torch.utils._pytree.tree_map(
                    lambda t: t.clone() if torch.is_tensor(t) and t.is_inference() else t, (args, kwargs))
                try:
                    self._engine.run(args, kwargs, n, bufs, where)
                except RuntimeError as e:
                    named = self._engine.dtype_error(args, kwargs, where, e)
                    if named is None:
                        raise
                    raise named from e
            with _sigint_deferred():
                # Contributions are sums of |·| (≥ 0): a buffer's sum is finite exactly when all its entries are.
                finite = torch.isfinite(torch.stack([b.sum() for b in bufs.values()])).tolist() if bufs else []
                bad = [g for g, ok in zip(bufs, finite) if not ok]
                if bad:
                    raise FloatingPointError(f"batch {where}: non-finite importance for {bad[:3]} (a NaN or inf "
                                             "gradient); importance and sample count left as they were before this batch")
                total = self._count + n
                if fresh:
                    for b in bufs.values():
                        b.div_(n)
                else:  # every mean made so far is rescaled, the batch's buffers added
                    for g in self.params:
                        if g in self._mean or g in bufs:
                            m = self._mean[g].mul_(self._count / total)
                            if g in bufs:
                                m.add_(bufs[g], alpha=1.0 / total)
                self._count = total
                committed = True
        except BaseException:
            if fresh and not committed:
                self._mean = ZeroBuffers(self.params)
            raise

    # ------------------------------------------------------------------ tasks and penalty
    @property
    def num_samples(self):
        """Samples seen since the last :meth:`consolidate`."""
        return self._count

    @property
    def task_importance(self):
        """Ω_t so far: the mean importance over the samples seen since the last consolidate(),
        {name: float32 tensor}. The tensors are the live running means, read without a copy (as ``.grad``):
        the next :meth:`accumulate` changes them; clone them to keep a snapshot, and do not write to them."""
        return {g: self._mean[g] for g in self.params}

    @property
    def importance(self):
        """The consolidated Ω used by the penalty: {name: float32 tensor} (empty before the first task)."""
        return dict(self._importance)

    @property
    def star(self):
        """θ* snapshotted at the last :meth:`consolidate` (empty before the first task)."""
        return dict(self._star)

    @staticmethod
    def _check_merge(merge, alpha):
        if merge not in ("sum", "ema"):
            raise ValueError(f"merge must be 'sum' or 'ema', got {merge!r}")
        if not 0.0 <= float(alpha) <= 1.0:
            raise ValueError(f"alpha must lie in [0, 1], got {alpha}")

    def consolidate(self, merge=None, alpha=None):
        """Folds Ω_t into the stored Ω (``merge="sum"``: Ω + Ω_t; ``"ema"``: αΩ + (1−α)Ω_t, the first
        task taken as is), snapshots θ* ← θ and starts a new task. Under torch.distributed the sums and
        sample counts of all ranks are all-reduced first."""
        merge = self.merge if merge is None else merge
        alpha = self.alpha if alpha is None else float(alpha)
        self._check_merge(merge, alpha)
        self._check_params("consolidate()")
        self._warn_untracked("consolidate()")
        means, count = self.task_importance, self._count
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            means, count = self._all_reduce(means, count)
        if count == 0:
            raise ValueError("consolidate(): no samples seen since the last consolidate(); call accumulate() first")
        for g, omega_t in means.items():
            if g not in self._importance:
                self._importance[g] = omega_t
            elif merge == "sum":
                self._importance[g] = self._importance[g] + omega_t
            else:
                self._importance[g] = alpha * self._importance[g] + (1 - alpha) * omega_t
            self._star[g] = self.params[g].detach().clone()
        self._mean = ZeroBuffers(self.params)
        self._count = 0
        self.num_tasks += 1
        return self

    @staticmethod
    def _all_reduce(means, count):
        """The means and count over all ranks: each rank's sums (mean × count, in float64) all-reduced."""
        flat = torch.cat([m.flatten() for m in means.values()] + [torch.ones(1, device=next(
            iter(means.values())).device)]).double().mul_(count)
        torch.distributed.all_reduce(flat)
        total = int(round(flat[-1].item()))
        out, offset = {}, 0
        for g, m in means.items():
            out[g] = flat[offset:offset + m.numel()].view_as(m).div(max(total, 1)).float()
            offset += m.numel()
        return out, total

    def penalty_state(self):
        """(parameter, Ω, θ*) for every tracked parameter with a consolidated Ω."""
        self._check_params("the penalty")
        return [(self.params[g], om, self._star[g]) for g, om in self._importance.items()]

    def _check_params(self, what):
        """A ValueError naming the tracked parameters that are no longer the model's as they were (another
        Parameter under the name, another shape, gone): ``resize_token_embeddings`` resizes the input embedding in
        place and replaces an untied head, whose Ω was then zero at the old shape and whose penalty never reached
        the new one, without an error. Where every tracked parameter is still held where its name says, with its
        shape (the links of :func:`_owners`: cheap enough for every optimizer step), no walk of the model."""
        if all(held(key) is value for held, key, value in self._owners) and all(
                p.shape == self._shapes[g] for g, p in self.params.items()):
            return
        now = dict(self.net.named_parameters())
        changed = [f"'{g}' " + ("is gone" if g not in now else f"is another Parameter of shape {tuple(now[g].shape)}"
                                if now[g] is not p else f"has shape {tuple(p.shape)}")
                   + f" (was {tuple(self._shapes[g])})" for g, p in self.params.items()
                   if now.get(g) is not p or p.shape != self._shapes[g]]
        if not changed:
            return
        raise ValueError(f"{what}: the model's parameters changed since {type(self).__name__} was built: "
                         f"{'; '.join(changed[:4])}{'; …' if len(changed) > 4 else ''}. Build a new "
                         f"{type(self).__name__} for the model as it is now (resize_token_embeddings resizes or "
                         "replaces the embeddings), and carry Ω over for the parameters that kept their shape")

    def _warn_untracked(self, what):
        """Warns once per set of names about trainable parameters the MAS does not track (added since it was built:
        a new head for the next task; or unfrozen since): they get no Ω and no penalty."""
        tracked = {id(p) for p in self.params.values()}
        new = [g for g, p in self.net.named_parameters() if p.requires_grad and id(p) not in tracked]
        if not new or tuple(new) == self._untracked_said:
            return
        self._untracked_said = tuple(new)
        name = type(self).__name__
        warnings.warn(f"{what}: {len(new)} trainable parameters are not tracked ({', '.join(new[:4])}"
                      f"{', …' if len(new) > 4 else ''}): added or unfrozen since the {name} was built, they get no "
                      f"importance and no penalty. To track them, build a new {name} for the model as it is and "
                      "carry this one's over with new.load_state_dict(old.state_dict(), strict=False)", stacklevel=3)

    def _penalty_grad_state(self):
        """:meth:`penalty_state` of the parameters the penalty's gradient reaches: not those frozen since
        (requires_grad=False), as autograd gives them none."""
        return [(p, om, star) for p, om, star in self.penalty_state() if p.requires_grad]

    def penalty(self):
        """R(θ) = λ Σ Ω (θ − θ*)² as a differentiable float32 scalar (zero before the first task)."""
        terms = [(om * (p.float() - star.float()).pow(2)).sum() for p, om, star in self.penalty_state()]
        if not terms:
            return torch.zeros((), device=next(iter(self.params.values())).device)
        return self.lam * torch.stack(terms).sum()

    def add_penalty_grad_(self):
        """p.grad += 2λΩ(θ−θ*) in place for every tracked parameter (a zero .grad is created where
        there is none; none for a parameter frozen since, as autograd gives it none): the penalty's gradient for
        any optimizer."""
        with torch.no_grad():
            for p, om, star in self._penalty_grad_state():
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                p.grad.add_((2.0 * self.lam * om * (p.float() - star.float())).to(p.grad.dtype))

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self):
        """Config (λ, mode, per_sample, merge, alpha), Ω, θ*, the task's Ω_t so far (running means) and the
        counts."""
        return {
            "config": {"lam": self.lam, "mode": self.mode, "per_sample": self.per_sample, "merge": self.merge,
                       "alpha": self.alpha},
            "importance": {g: t.clone() for g, t in self._importance.items()},
            "star": {g: t.clone() for g, t in self._star.items()},
            "task_importance": {g: t.clone() for g, t in self.task_importance.items()},
            "num_samples": self._count,
            "num_tasks": self.num_tasks,
        }

    def load_state_dict(self, state_dict, strict=True):
        """Loads a :meth:`state_dict` whole or not at all: missing or unexpected names, wrong shapes or
        non-finite values raise a ValueError that lists them.

        ``strict=False`` carries a state over to a model that gained or lost parameters (a new head for the next
        task): parameters the state does not name start with no importance (no penalty until a task consolidates
        them), names the model lacks are left out; shapes and values are still checked. Returns the
        ``(missing_keys, unexpected_keys)`` named tuple, as ``nn.Module.load_state_dict`` does."""
        keys = _checkpoint.validate(state_dict, self.params, strict)
        if not strict:
            known = lambda section: {g: t for g, t in state_dict[section].items() if g in self.params}  # noqa: E731
            state_dict = {**state_dict, **{k: known(k) for k in ("importance", "star", "task_importance")}}
        cfg = state_dict["config"]
        self.lam, self.mode, self.per_sample = float(cfg["lam"]), cfg["mode"], bool(cfg["per_sample"])
        self.merge, self.alpha = cfg["merge"], float(cfg["alpha"])

        def placed(section, dtype=None):
            return {g: t.to(self.params[g].device, dtype or self.params[g].dtype).clone()
                    for g, t in state_dict[section].items()}

        self._importance = placed("importance", torch.float32)
        self._star = placed("star")
        self._mean = ZeroBuffers(self.params, placed("task_importance", torch.float32))
        self._count, self.num_tasks = int(state_dict["num_samples"]), int(state_dict["num_tasks"])
        return keys

    def save(self, path):
        """Writes :meth:`state_dict` to ``path`` atomically (a temporary file, fsync, then rename): a crash
        mid-save leaves the previous file whole. ``*.safetensors``: a safetensors file (Ω, θ*, Ω_t so far;
        config and counts in its metadata), shareable without pickle; otherwise torch.save's format."""
        _checkpoint.write(self.state_dict(), path)

    def load(self, path, strict=True):
        """Loads a file written by :meth:`save` (either format), whole or not at all (``strict``: as in
        :meth:`load_state_dict`)."""
        self.load_state_dict(_checkpoint.read(path), strict)
        return self

    def __repr__(self):
        return (f"{type(self).__name__}(params={len(self.params)}, units={len(self._engine.units)}, "
                f"lam={self.lam}, mode={self.mode!r}, per_sample={self.per_sample}, tasks={self.num_tasks}, "
                f"samples={self._count})")


class _KernelGate:
    """Where the compiled kernels run, decided in this one place: ``gate(tensors)`` is True when every tensor's
    device has enabled kernels, else False with one warning per reason (none where MAS_EXT_BACKEND=reference
    asks for the reference path). FusedMAS's engine and penalty consult it before any kernel runs."""

    def __init__(self):
        self.warned = set()

    def __call__(self, tensors):
        why = None
        if os.environ.get("MAS_EXT_BACKEND", "").lower() == "reference":
            return False  # the user asked for it: no warning
        if _ops.error is not None:
            why = f"compiled kernels unavailable ({_ops.error})"
        else:
            flat = (tensors if isinstance(tensors, (list, tuple)) and all(torch.is_tensor(t) for t in tensors)
                    else torch.utils._pytree.tree_flatten(tensors)[0])  # most calls: a flat tuple of tensors
            devices = {t.device.type for t in flat if torch.is_tensor(t)}
            # CUDA tensors reach the CUDA kernels only once they are verified on a GPU (the one switch in _ops).
            kernels = {"cpu", "cuda"} if _cuda_ops_built() and _ops.cuda_kernels_enabled() else {"cpu"}
            if devices - kernels:
                why = f"no enabled kernels for device(s) {sorted(devices - kernels)} in this build"
        if why is None:
            return True
        if why not in self.warned:
            self.warned.add(why)
            warnings.warn(f"FusedMAS: {why}; using the reference path", stacklevel=3)
        return False


class FusedMAS(ReferenceMAS):
    """The same API as :class:`ReferenceMAS`, with Linear/Conv importance in compiled kernels that never
    hold per-sample gradients, and the penalty gradient in one multi-tensor kernel. Where no kernel
    applies (no build, a device without kernels, a layer no fused rule covers) it takes the reference
    path with a one-time warning (none where ``MAS_EXT_BACKEND=reference`` asks for it); results equal the
    reference to float32 rounding."""

    _gate = _KernelGate

    def add_penalty_grad_(self):
        """p.grad += 2λΩ(θ−θ*) as :meth:`ReferenceMAS.add_penalty_grad_`, in one multi-tensor kernel where the
        parameters' device has one."""
        state = self._penalty_grad_state()
        if not state or not _ops.available("add_penalty_grad_") or not self._kernels_for([p for p, _, _ in state]):
            return super().add_penalty_grad_()
        with torch.no_grad():
            for p, _, _ in state:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
            torch.ops.mas_ext.add_penalty_grad_([p.grad for p, _, _ in state], [p for p, _, _ in state],
                                                [om for _, om, _ in state], [s for _, _, s in state], 2.0 * self.lam)
