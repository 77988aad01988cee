"""Following kernels through a jaxpr: one rule per primitive, registered next to its body."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

from jlora import _jax_compat as jc
from jlora._layout_inference._uses import _BROADCAST, _NONE, KernelUses, Use, _Piece, _View

# ---------------------------------------------------------------------------------------
# The interpreter: one loop, one small rule per primitive.
# ---------------------------------------------------------------------------------------


def _views(x) -> tuple:
    return x if type(x) is tuple else ()


def _each(x, move: Callable[[_View], _View]):
    return tuple(move(v) for v in x) if type(x) is tuple else None


def _shape(var) -> tuple[int, ...]:
    return tuple(var.aval.shape)


class _Reader:
    def __init__(self, kernels: list[KernelUses]):
        self.kernels = kernels
        self.calls: list[str] = []  # source lines of the enclosing calls (jit, scan, ...)
        # (kernel, use) -> the use that replaced it once its output showed a stacked axis.
        # Keyed by kernel too: two kernels consumed on one source line have equal uses.
        self.replaced: dict[tuple[int, Use], Use] = {}

    def where(self, eqn) -> str:
        """``file:line (function)`` of ``eqn``. Equations inside a library's cached jit
        (``jnp.take``, ``jnp.einsum``) have none; the line that called it stands in."""
        return jc.source_summary(eqn) or next((w for w in reversed(self.calls) if w), "")

    def describe(self, eqn) -> str:
        return f"{eqn.primitive.name} at {self.where(eqn) or 'an unknown line'}"

    def eval_sub(self, eqn, jaxpr, invals: Sequence) -> list:
        """Evaluate a sub-jaxpr of ``eqn`` (a jit, scan or cond body)."""
        self.calls.append(self.where(eqn))
        try:
            return self.eval_jaxpr(_open(jaxpr), invals)
        finally:
            self.calls.pop()

    def eval_jaxpr(self, jaxpr, invals: Sequence) -> list:
        env: dict = {}

        def read(v):
            return env.get(v) if isinstance(v, jc.Var) else None

        for v, x in zip(jaxpr.invars, invals, strict=True):
            if x is not None:
                env[v] = x
        for eqn in jaxpr.eqns:
            ins = [read(v) for v in eqn.invars]
            if any(type(x) is tuple for x in ins):
                outs = _RULES.get(eqn.primitive, _elementwise)(self, eqn, ins)
            else:
                outs = _untracked(eqn, ins)
            for v, x in zip(eqn.outvars, outs, strict=True):
                if x is not None:
                    env[v] = x
        return [read(v) for v in jaxpr.outvars]

    def move(self, view: _View, axes: Iterable[frozenset], picks: Iterable[tuple]) -> _View:
        """``view`` with ``axes``, after indexing away the axes ``picks`` (``(axis,
        where)``). Only whole kernel axes of size > 1 become stacked by it."""
        shape = self.kernels[view.kernel].shape
        stacked = [(a, where) for a, where in picks
                   if a and not isinstance(a, _Piece) and any(shape[k] > 1 for k in a)]
        if view.derived is None:
            return view.moved(axes, stacked)
        for sources, where in stacked:
            self.stack_output(view, sources, where)
        return view.moved(axes)

    def stack_output(self, view: _View, sources: frozenset, where: str) -> None:
        """The output of ``view.derived`` is indexed along the kernel's fan-out axes
        ``sources``: they hold separate outputs (a k/v pair), so they are stacked, as long
        as another fan-out axis remains (``logits[:, 0]`` does not stack a head)."""
        use = view.derived
        assert use is not None  # move() calls this for outputs only
        while (view.kernel, use) in self.replaced:
            use = self.replaced[view.kernel, use]
        roles = dict(use.roles)
        if any(roles.get(k) != "o" for k in sources):
            return
        roles.update((k, "s") for k in sources)
        if "o" not in roles.values():
            return
        new = Use(tuple(sorted(roles.items())), use.primitive, use.where,
                  (*use.stacked_by, where))
        kernel = self.kernels[view.kernel]
        kernel.uses = {(new if u == use else u): None for u in kernel.uses}
        self.replaced[view.kernel, use] = new

    def record(self, eqn, view: _View, letters: Sequence[str]) -> Use | None:
        """A consumer gives ``letters`` (one per axis of ``view``) to the kernel's axes."""
        if view.derived is not None or view.num_sourced < 2:
            return None  # a dot's output, or one row of a kernel used as a vector
        kernel = self.kernels[view.kernel]
        roles: dict[int, str] = {}
        given = [*zip(view.axes, letters, strict=True), *((a, "s") for a, _ in view.picks)]
        for sources, letter in given:
            for k in sources:
                if roles.setdefault(k, letter) != letter:
                    # A reshape on the way merged axes of different roles into one.
                    self.hide(view, f"{self.describe(eqn)}, through a reshape that merges "
                                    f"its axis {k} with axes of another role")
                    return None
        stacked_by = tuple(dict.fromkeys(where for _, where in view.picks))
        use = Use(tuple(sorted(roles.items())), eqn.primitive.name, self.where(eqn), stacked_by)
        kernel.uses[use] = None
        return use

    def hide(self, view: _View, what: str) -> None:
        """The kernel reaches ``what``, which uses it without showing its layout."""
        if view.derived is None and view.num_sourced >= 2:
            self.kernels[view.kernel].hidden_by[what] = None

    def hide_all(self, x, what: str) -> None:
        for view in _views(x):
            self.hide(view, what)


_RULES: dict[Any, Callable] = {}


def _rule(*primitives):
    """Register a rule ``(reader, eqn, ins) -> outs`` for ``primitives`` (absent ones skipped)."""

    def register(fn):
        for p in primitives:
            if p is not None:
                _RULES[p] = fn
        return fn

    return register


_KEEPS_BROADCAST = {
    jc.broadcast_in_dim_p, jc.convert_element_type_p, jc.reshape_p, jc.copy_p,
    jc.sharding_constraint_p,
}


def _untracked(eqn, ins) -> list:
    """Outputs of an equation without kernel inputs: only broadcasts are remembered, so
    that ``W * scale[None, :]`` still counts as a move of ``W``."""
    keeps = eqn.primitive is jc.broadcast_in_dim_p or (
        eqn.primitive in _KEEPS_BROADCAST and ins and ins[0] is _BROADCAST
    )
    return [_BROADCAST if keeps else None] * len(eqn.outvars)


def _elementwise(reader: _Reader, eqn, ins) -> list:
    """Any primitive without a rule: a move if it maps each element (``W * 2``, ``-W``,
    ``W + W2``), else an operation that hides the kernel's layout."""
    kernels = [v for x in ins for v in _views(x) if v.derived is None]
    outputs = [v for x in ins for v in _views(x) if v.derived is not None]
    out_ndim = len(_shape(eqn.outvars[0])) if len(eqn.outvars) == 1 else -1
    subjaxpr = any(isinstance(p, jc.ClosedJaxpr | jc.Jaxpr) for p in eqn.params.values())
    if out_ndim < 0 or subjaxpr or any(len(v.axes) != out_ndim for v in kernels + outputs):
        for v in kernels:
            reader.hide(v, reader.describe(eqn))
        return [None] * len(eqn.outvars)
    activations = any(
        type(x) is not tuple and x is not _BROADCAST and len(_shape(var)) > 0
        for var, x in zip(eqn.invars, ins, strict=True)
    )
    if activations or (kernels and outputs):
        _combined(reader, kernels)
        return [None]
    return [tuple(dict.fromkeys(kernels or outputs))]


def _combined(reader: _Reader, kernels: Sequence[_View]) -> None:
    """The kernels meet activations (added, multiplied, concatenated): a bias, a scale, a
    positional table or a learned token, not a kernel. Dot outputs are no longer followed."""
    for v in kernels:
        reader.kernels[v.kernel].combined = True


# -- consumers --------------------------------------------------------------------------


def _dot_letters(ndim: int, contract, batch, stacked=()) -> list[str]:
    return ["s" if k in batch or k in stacked else "i" if k in contract else "o"
            for k in range(ndim)]


@_rule(jc.dot_general_p)
def _dot(reader, eqn, ins):
    contract, batch = eqn.params["dimension_numbers"]
    free = [[k for k in range(len(_shape(v))) if k not in c and k not in b]
            for v, c, b in zip(eqn.invars, contract, batch, strict=True)]
    # dot_general's output axes: batch, then the lhs's free axes, then the rhs's.
    first_free = (len(batch[0]), len(batch[0]) + len(free[0]))
    out_ndim = len(_shape(eqn.outvars[0]))
    outputs = []
    for x, c, b, f, first in zip(ins, contract, batch, free, first_free, strict=True):
        for view in _views(x):
            use = reader.record(eqn, view, _dot_letters(len(view.axes), c, b))
            if use is None:
                continue
            axes = [_NONE] * out_ndim
            for j, k in enumerate(f):
                axes[first + j] = view.axes[k]
            outputs.append(_View(view.kernel, tuple(axes), derived=use))
    return [tuple(outputs) or None]


@_rule(jc.ragged_dot_general_p)
def _ragged_dot(reader, eqn, ins):
    dn = eqn.params["ragged_dot_dimension_numbers"]
    contract, batch = dn.dot_dimension_numbers
    groups = ((), tuple(dn.rhs_group_dimensions))  # the rhs's group axis: one expert each
    for x, c, b, g in zip(ins, contract, batch, groups, strict=False):
        for view in _views(x):
            reader.record(eqn, view, _dot_letters(len(view.axes), c, b, g))
    reader.hide_all(ins[2] if len(ins) > 2 else None, reader.describe(eqn))
    return [None]


@_rule(jc.conv_general_dilated_p)
def _conv(reader, eqn, ins):
    lhs, rhs = ins
    reader.hide_all(lhs, reader.describe(eqn) + " (as the conv input)")
    out_feature, in_feature, *_ = eqn.params["dimension_numbers"].rhs_spec
    for view in _views(rhs):
        letters = ["w"] * len(view.axes)
        letters[out_feature], letters[in_feature] = "o", "i"
        reader.record(eqn, view, letters)
    return [None]


@_rule(jc.gather_p)
def _gather(reader, eqn, ins):
    table, indices = ins
    reader.hide_all(indices, reader.describe(eqn) + " (as indices)")
    views = _views(table)
    if not views:
        return [None]
    dn, sizes = eqn.params["dimension_numbers"], eqn.params["slice_sizes"]
    shape = _shape(eqn.invars[0])
    lookups = _shape(eqn.invars[1])[:-1]  # gather's index vectors lie along the last axis
    indexed, batching = tuple(dn.start_index_map), tuple(dn.operand_batching_dims)
    if lookups and not batching:
        whole = [k for k in range(len(shape)) if k not in indexed and sizes[k] == shape[k]]
        if len(shape) == 2 and len(indexed) == 1 and sizes[indexed[0]] == 1 and len(whole) == 1:
            letters = ["v" if k == indexed[0] else "f" for k in range(2)]
            for view in views:
                reader.record(eqn, view, letters)
            return [None]
    if lookups or batching:
        reader.hide_all(table, reader.describe(eqn))
        return [None]
    # A single index (jnp.take(W, i, axis=0)): a move that picks one slice.
    where = reader.describe(eqn)
    collapsed = sorted(dn.collapsed_slice_dims)
    kept = [k for k in range(len(shape)) if k not in collapsed]
    out_ndim = len(_shape(eqn.outvars[0]))

    def pick(view):
        axes = [_NONE] * out_ndim
        for k, d in zip(kept, dn.offset_dims, strict=True):
            axes[d] = view.axes[k]
        return reader.move(view, axes, [(view.axes[k], where) for k in collapsed])

    return [_each(table, pick)]


# -- moves ------------------------------------------------------------------------------


@_rule(jc.convert_element_type_p, jc.copy_p, jc.sharding_constraint_p, jc.name_p,
       jc.reduce_precision_p, jc.device_put_p, jc.optimization_barrier_p)
def _same(reader, eqn, ins):
    return list(ins)  # n operands, n results, each unchanged


@_rule(jc.transpose_p)
def _transpose(reader, eqn, ins):
    perm = eqn.params["permutation"]
    return [_each(ins[0], lambda v: v.moved(v.axes[p] for p in perm))]


@_rule(jc.broadcast_in_dim_p)
def _broadcast(reader, eqn, ins):
    dims, ndim = eqn.params["broadcast_dimensions"], len(eqn.params["shape"])

    def move(view):
        axes = [_NONE] * ndim
        for k, d in enumerate(dims):
            axes[d] = view.axes[k]
        return view.moved(axes)

    return [_each(ins[0], move)]


@_rule(jc.reshape_p, jc.squeeze_p)
def _reshape(reader, eqn, ins):
    x, *dynamic = ins
    old, new = _shape(eqn.invars[0]), _shape(eqn.outvars[0])
    groups = reshape_groups(old, new)
    transposing = eqn.primitive is jc.reshape_p and eqn.params.get("dimensions") is not None
    if dynamic or transposing or groups is None:
        reader.hide_all(x, reader.describe(eqn))
        return [None]
    where = reader.describe(eqn)

    def move(view):
        axes, picks = [_NONE] * len(new), []
        for gi, gj in groups:
            held = [view.axes[i] for i in gi]
            sources = frozenset().union(*held)
            if not gj:
                picks.append((held[0], where))  # W[i]: sliced to one, then dropped
            elif sources and (len(gj) > 1 or any(isinstance(a, _Piece) for a in held)):
                for j in gj:
                    axes[j] = _Piece(sources)
            else:
                for j in gj:
                    axes[j] = sources
        return reader.move(view, axes, picks)

    return [_each(x, move)]


@_rule(jc.slice_p, jc.dynamic_slice_p, jc.rev_p, jc.pad_p)
def _keep_axes(reader, eqn, ins):
    x, *others = ins
    for other in others:
        reader.hide_all(other, reader.describe(eqn) + " (as a start index or padding value)")
    return [x if type(x) is tuple else None]


@_rule(jc.split_p)
def _split(reader, eqn, ins):
    return [ins[0]] * len(eqn.outvars)


@_rule(jc.concatenate_p)
def _concatenate(reader, eqn, ins):
    views = [v for x in ins for v in _views(x)]
    kernels = [v for v in views if v.derived is None]
    activations = any(type(x) is not tuple and x is not _BROADCAST for x in ins)
    if activations or (kernels and len(kernels) < len(views)):
        _combined(reader, kernels)  # ViT's class token joining the patch embeddings
        return [None]
    return [tuple(dict.fromkeys(views))]  # fused kernels, or the outputs of fused dots


# -- sub-jaxprs -------------------------------------------------------------------------


def _open(jaxpr):
    return jaxpr.jaxpr if isinstance(jaxpr, jc.ClosedJaxpr) else jaxpr


@_rule(jc.jit_p, jc.closed_call_p, jc.remat_p, jc.custom_jvp_call_p, jc.custom_vjp_call_p)
def _call(reader, eqn, ins):
    # custom_jvp/custom_vjp: the primal function, which is what the model computes
    # (`fun_jaxpr` in custom_vjp_call_jaxpr, before jax 0.7).
    body = next(eqn.params[k] for k in ("jaxpr", "call_jaxpr", "fun_jaxpr") if k in eqn.params)
    return reader.eval_sub(eqn, body, ins)


@_rule(jc.cond_p)
def _cond(reader, eqn, ins):
    outs: list[tuple] = [()] * len(eqn.outvars)
    for branch in eqn.params["branches"]:
        for k, x in enumerate(reader.eval_sub(eqn, branch, ins[1:])):
            outs[k] += _views(x)
    return [tuple(dict.fromkeys(views)) or None for views in outs]


@_rule(jc.while_p)
def _while(reader, eqn, ins):
    p = eqn.params
    nc, nb = p["cond_nconsts"], p["body_nconsts"]
    carry = ins[nc + nb :]
    reader.eval_sub(eqn, p["cond_jaxpr"], [*ins[:nc], *carry])
    reader.eval_sub(eqn, p["body_jaxpr"], [*ins[nc : nc + nb], *carry])
    return [None] * len(eqn.outvars)


@_rule(jc.scan_p)
def _scan(reader, eqn, ins):
    p = eqn.params
    n = p["num_consts"] + p["num_carry"]
    where = reader.describe(eqn)

    def slice_one(view):  # the body sees one slice along axis 0: a stacked axis
        return reader.move(view, view.axes[1:], [(view.axes[0], where)])

    xs = [_each(x, slice_one) for x in ins[n:]]
    reader.eval_sub(eqn, p["jaxpr"], [*ins[:n], *xs])
    return [None] * len(eqn.outvars)


def reshape_groups(old: Sequence[int], new: Sequence[int]):
    """Runs of axes of ``old`` and ``new`` with equal products, as ``[(old axes, new axes)]``;
    a size-1 axis is a group of its own (``([i], [])`` dropped, ``([], [j])`` added).
    ``None`` when the shapes do not pair up (a zero-sized axis).

    Example:
      >>> reshape_groups((4, 6), (4, 2, 3))
      [([0], [0]), ([1], [1, 2])]
    """
    if 0 in old or 0 in new:
        return None
    i = j = 0
    groups = []
    while i < len(old) or j < len(new):
        if i < len(old) and old[i] == 1:
            groups.append(([i], []))
            i += 1
        elif j < len(new) and new[j] == 1:
            groups.append(([], [j]))
            j += 1
        elif i >= len(old) or j >= len(new):
            return None
        else:
            gi, gj, po, pn = [i], [j], old[i], new[j]
            i, j = i + 1, j + 1
            while po != pn:
                if po < pn and i < len(old):
                    gi.append(i)
                    po *= old[i]
                    i += 1
                elif pn < po and j < len(new):
                    gj.append(j)
                    pn *= new[j]
                    j += 1
                else:
                    return None
            groups.append((gi, gj))
    return groups
