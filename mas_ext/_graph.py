"""What a batch's autograd graph does with the tracked parameters, told by the calls that made its nodes.

Every autograd node the forward makes takes this thread's next sequence number, so the nodes of a unit's call are
those numbered from its start to its end (:class:`Span`: the engine's hooks read the counter around each call).
One walk of the whole graph of a g-MAS batch's loss (:class:`Graph`) then tells, against those spans
(:class:`Calls`), where a unit's rule would not see all of its parameters' gradient:

- a read outside every call of the parameter's units (a tied head ``h @ emb.weight.T``; a read that only some
  inputs make): an edge into the parameter from a node made outside them (``Engine._read_outside``);
- a gradient that reaches a call's nodes other than through its outputs, where the rule takes it (an intermediate
  kept on the module and read by its parent, an output in a plain dataclass or a complex tensor, a result written
  into an argument): an edge from a node made outside the call into one made inside it that leads to the unit's
  parameters (:meth:`Calls.escapes`);
- a call of a layer of the table whose output the loss reaches but that read one of its parameters nowhere
  (``torch.func.functional_call`` with another weight: its rule would take the gradient at that one as its own's):
  :meth:`Calls.substituted`.

A node that only casts a parameter (``.to(dtype)``; autocast keeps one such cast per weight for its whole region,
made by the first op that reads it) is read through: the nodes that read the cast read the parameter.
"""
import bisect

import torch

# The next autograd sequence number of this thread (the profiler's): peeked, not taken
next_sequence_nr = torch._C._autograd._get_sequence_nr


class Span:
    """A call of a unit: ``[start, end)`` the sequence numbers of the nodes its module made, ``[end, seam)`` those of
    the engine's own after it (the tap on its outputs, the expansion of a batch-size-1 output)."""

    __slots__ = ("unit", "start", "end", "seam", "call")

    def __init__(self, unit, start, end):
        self.unit, self.start, self.end, self.seam = unit, start, end, end
        self.call = None  # the rule's record of it (the engine's _rules.Call), where the generic rule takes it


def _cast_of(fn, params):
    """The id of the parameter among ``params``' ids that the node ``fn`` only casts, else None."""
    if type(fn).__name__ != "ToCopyBackward0":
        return None
    nxt = fn.next_functions
    v = getattr(nxt[0][0], "variable", None) if len(nxt) == 1 and nxt[0][0] is not None else None
    return id(v) if v is not None and id(v) in params else None


def _reads_of(fn, params):
    """The ids among ``params``' of the parameters that the edges of node ``fn`` lead to (directly, or a cast)."""
    out = []
    for nxt, _ in fn.next_functions:
        if nxt is None:
            continue
        v = getattr(nxt, "variable", None)
        i = id(v) if v is not None else _cast_of(nxt, params)
        if i is not None and i in params:
            out.append(i)
    return out


class Graph:
    """One walk of the whole graph of ``root`` (a loss's node), for the parameters whose ids ``params`` holds:
    ``reads`` [(parameter id, sequence number of a node that reads it)], ``edges`` [(the sequence number of a node,
    that of a node it reads, the latter)] between the nodes that are not leaves' accumulators or casts of a tracked
    parameter, ``seqs`` the sequence numbers of the nodes walked. A cast made from ``since`` on (in this pass) is a
    read where it was made as well as where it is read; one made before (autocast's, kept from an earlier batch) only
    where it is read. Through a node of class ``tap`` (the engine's), only the inputs whose outputs are read lead on.
    The nodes are kept alive while it is: their ids are not reused."""

    def __init__(self, root, params, since=0, tap=None):
        self.reads, self.edges = [], []
        seq = {id(root): root._sequence_nr()}
        todo, self._nodes, taps = [root], {id(root): root}, set()

        def follow(s, nxt, k):  # the edge from the node numbered s to output k of nxt
            v = getattr(nxt, "variable", None)
            if v is not None:  # a leaf's accumulator
                if id(v) in params:
                    self.reads.append((id(v), s))
                return
            cast = _cast_of(nxt, params)
            if cast is not None:
                self.reads.append((cast, s))
                made = nxt._sequence_nr()
                if made >= since:  # and a node of the call that made it, read by this one
                    self.reads.append((cast, made))
                    self.edges.append((s, made, nxt))
                return
            if id(nxt) not in seq:
                seq[id(nxt)] = nxt._sequence_nr()
                self._nodes[id(nxt)] = nxt
                if type(nxt) is not tap:
                    todo.append(nxt)
            self.edges.append((s, seq[id(nxt)], nxt))
            # the engine's tap (``tap``: its node's class) passes each output's gradient to its input of the same place,
            # after the anchor: only the outputs read lead on (CLIP's logits, tapped with the image states but not
            # read, do not lead to logit_scale)
            if type(nxt) is tap and (id(nxt), k) not in taps:
                taps.add((id(nxt), k))
                target, j = nxt.next_functions[1 + k]
                if target is not None:
                    follow(seq[id(nxt)], target, j)

        while todo:
            fn = todo.pop()
            s = seq[id(fn)]
            for nxt, k in fn.next_functions:
                if nxt is not None:
                    follow(s, nxt, k)
        self.seqs = set(seq.values())
        self._by_param = None

    def reads_in(self, i, start, end, besides=()):
        """Whether a node numbered from ``start`` to ``end``, other than those numbered as in ``besides``, reads the
        parameter whose id is ``i``."""
        if self._by_param is None:
            self._by_param = {}
            for j, s in self.reads:
                self._by_param.setdefault(j, []).append(s)
            for v in self._by_param.values():
                v.sort()
        at = self._by_param.get(i, ())
        k = bisect.bisect_left(at, start)
        while k < len(at) and at[k] < end:
            if at[k] not in besides:
                return True
            k += 1
        return False


class Calls:
    """The spans of one pass's calls, nested as the calls were (one thread: a call made within another's ends
    before it)."""

    def __init__(self, spans):
        self.spans = sorted(spans, key=lambda sp: (sp.start, -sp.seam))
        self.starts = [sp.start for sp in self.spans]
        self.parent, stack = [], []
        for i, sp in enumerate(self.spans):
            while stack and self.spans[stack[-1]].seam <= sp.start:
                stack.pop()
            self.parent.append(stack[-1] if stack else -1)
            stack.append(i)
        self._inner = {}

    def _innermost(self, seq):
        """The index of the innermost span around node number ``seq`` (its seam included), -1 where none is."""
        i = self._inner.get(seq)
        if i is None:
            i = bisect.bisect_right(self.starts, seq) - 1
            while i >= 0 and not seq < self.spans[i].seam:
                i = self.parent[i]
            self._inner[seq] = i
        return i

    def around(self, seq):
        """The spans of the calls that made node number ``seq`` (their seams included), innermost first."""
        i, out = self._innermost(seq), []
        while i >= 0:
            out.append(self.spans[i])
            i = self.parent[i]
        return out

    def made_by(self, seq, units):
        """Whether node number ``seq`` was made by a call of one of ``units`` (not in its seam)."""
        i = self._innermost(seq)
        while i >= 0:
            sp = self.spans[i]
            if sp.unit in units and seq < sp.end:
                return True
            i = self.parent[i]
        return False

    def escapes(self, graph, taps, ids_of):
        """{span: the sequence number of a node made outside its call that reads one made inside it} of the calls
        whose parameters (``ids_of(unit)``: their ids) a gradient reaches other than through the call's outputs. A
        call's outputs are read through its taps (``taps``: their nodes' sequence numbers) or the engine's nodes in
        its seam; any other edge into it from outside that leads, within the call, to its unit's parameters is an
        escape."""
        out = {}
        for s_fn, s_nxt, nxt in graph.edges:
            i = self._innermost(s_nxt)
            if i < 0 or self._innermost(s_fn) == i:
                continue  # made by no call, or by the reader's innermost call too (most edges)
            first = True
            while i >= 0:
                sp = self.spans[i]
                if sp.start <= s_fn < sp.seam:
                    break  # it and the calls around it made the reader too
                if not (first and (s_nxt >= sp.end or s_nxt in taps)) and sp not in out and self._leads_to(
                        nxt, sp, ids_of(sp.unit), taps):  # not the call's own outputs, through the engine's tap
                    out[sp] = s_fn
                i, first = self.parent[i], False
        return out

    def _leads_to(self, node, sp, ids, taps):
        """Whether ``node`` leads, through nodes made within the span ``sp`` and not through a tap of that call's own
        (where its rule takes the gradient: the taps inside a layer's tapped forward), to a parameter whose id ``ids``
        holds."""
        todo, seen = [node], {id(node)}
        while todo:
            fn = todo.pop()
            if _reads_of(fn, ids):
                return True
            for nxt, _ in fn.next_functions:
                if nxt is None or id(nxt) in seen or getattr(nxt, "variable", None) is not None:
                    continue
                s = nxt._sequence_nr()
                if sp.start <= s < sp.seam and not (s in taps and self.spans[self._innermost(s)] is sp):
                    seen.add(id(nxt))
                    todo.append(nxt)
        return False

    def substituted(self, graph, taps, table, ids_of):
        """[(span, parameter id)] of the calls of units for which ``table(unit)`` holds (a layer of the table, whose
        rule takes its weight to be the one its call read) whose taps the walk reached, and that read that parameter of
        theirs nowhere in the call."""
        reached = sorted(taps & graph.seqs)
        out = []
        for sp in self.spans:
            if not table(sp.unit):
                continue
            k = bisect.bisect_left(reached, sp.start)
            if k == len(reached) or reached[k] >= sp.seam:
                continue  # no gradient reaches its outputs
            out += [(sp, i) for i in ids_of(sp.unit) if not graph.reads_in(i, sp.start, sp.end)]
        return out
