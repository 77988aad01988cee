"""Reading each kernel's layout from how a model uses it: :func:`infer_layouts`.

A layout (see :mod:`jlora.layouts`) says what the model does with each kernel axis. A
shape alone cannot tell ``(in, out)`` from ``(out, in)``, a head axis from a layer axis,
or a table from a projection; the model's program can. :func:`infer_layouts` traces
``fn(params, *args, **kwargs)`` once, on shapes only (a jaxpr, no FLOPs), and follows each
floating leaf with two or more axes through the program to the operations that consume
it:

* ``dot_general`` (``@``, ``einsum``, ``nn.Dense``): on the kernel's side, contracted axes
  are fan-in ``i``, batch axes stacked ``s``, the others fan-out ``o``;
  ``ragged_dot`` (mixture-of-experts) the same, its group axis stacked;
* ``conv_general_dilated``: the filter's spatial axes ``w``, its input-feature axis ``i``,
  its output-feature axis ``o``;
* a ``gather`` of whole rows of a 2-D table (``table[ids]``): the indexed axis ``v``, the
  other ``f``. The same table also used as ``x @ table.T`` (tied embeddings) stays ``vf``;
* an axis that a ``scan`` slices, or that is indexed away before the kernel reaches its
  consumer (``W[i]``, ``k_w, v_w = W[0], W[1]``), is stacked ``s``; so is a fan-out axis
  along which the model unpacks the dot's output (``k, v = jnp.einsum("BSD,CKDH->CBSKH",
  x, w)``, as the ``gemma`` package does), as long as another fan-out axis remains. A
  piece of a split axis (a fused QKV kernel reshaped to ``(..., 3, heads, head_dim)``)
  indexed away stays fan-out: the fused kernel gets one adapter, as in PEFT.

On the way it follows casts, copies, sharding constraints, ``checkpoint_name``,
transposes, reshapes (a merged axis gives its role to every kernel axis in it, a split
gives the role to every piece), squeezes, broadcasts, slices, ``rev``, ``split``,
``concatenate``, elementwise ops with a scalar or broadcast operand (``W * 2``) and the
bodies of ``jit``, ``checkpoint``, ``custom_jvp``/``custom_vjp`` functions, ``cond``
(every branch), ``while`` and ``scan``.

When shape inference is enough, and when to call :func:`infer_layouts`:

* Flax's own modules (``nn.Dense``, ``nn.DenseGeneral`` with default axes, attention,
  ``nn.Conv``, ``nn.Embed`` and their NNX versions) store kernels as
  :func:`jlora.layouts.infer_layout` guesses, and ``jlora.lora`` checks each guess against
  the model's use on its first call (:func:`check_guessed_layouts`): nothing to do.
* Everything else: einsum kernels (``gemma``, Tunix), kernels stored ``(out, in)``
  (transformers' ``FlaxConv1D``), scanned stacks (whatever the scan axis), embeddings not
  named ``embedding``. Call ``jlora.infer_layouts(fn, params, *args)`` once and pass its
  result as ``LoraConfig(layouts=...)``; its layouts are read, not guessed.

A kernel used in two incompatible ways is a :class:`jlora.LayoutError` naming both uses
and their source lines. Leaves whose layout the program does not show (never used, or
reaching only operations such as a reduction) get no entry and are listed in one
:class:`LayoutInferenceWarning` per call. Leaves only ever added to, multiplied with
or concatenated to activations (biases, norm scales, positional tables, a class token)
are not kernels and are left out silently, as are 1-D leaves.

Example:
  >>> import jax, jax.numpy as jnp
  >>> params = {"proj": {"kernel": jax.ShapeDtypeStruct((16, 8), jnp.float32)}}
  >>> infer_layouts(lambda p, x: x @ p["proj"]["kernel"].T, params, jnp.ones((2, 8)))
  {'proj/kernel': 'oi'}
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jlora import _jax_compat as jc
from jlora import _paths as paths_lib
from jlora import layouts as layouts_lib
from jlora.layouts import Layout, LayoutError

__all__ = [
    "InferredLayouts",
    "KernelUses",
    "LayoutInferenceWarning",
    "Use",
    "check_guessed_layouts",
    "check_layout",
    "infer_layouts",
    "read_kernel_uses",
    "reshape_groups",
]

_CATEGORY = {"s": "s", "i": "i", "w": "i", "v": "i", "o": "o", "f": "o"}
_ROLE = {
    "s": "stacked",
    "i": "fan-in (contracted)",
    "o": "fan-out",
    "w": "conv window",
    "v": "vocabulary (indexed by ids)",
    "f": "embedding features",
}
_FIX = "`LoraConfig(layouts=jlora.infer_layouts(fn, params, *args))`"


class LayoutInferenceWarning(UserWarning):
    """Floating leaves with two or more axes whose layout ``fn`` does not show."""


# ---------------------------------------------------------------------------------------
# What the reader knows about a value: which kernel axes each of its axes comes from.
# ---------------------------------------------------------------------------------------


class _Piece(frozenset):
    """The kernel axes an axis holds part of: a reshape split them (a fused QKV kernel's
    ``(3, heads, head_dim)`` pieces). Indexing a piece away does not make a stacked axis."""


@dataclasses.dataclass(frozen=True)
class _View:
    """One kernel seen through the moves that led to a value.

    With ``derived`` set, the value is not the kernel but the output of the dot
    ``derived``: its axes hold the kernel's fan-out axes, followed only to see whether the
    model indexes one of them away (``k, v = einsum("BSD,CKDH->CBSKH", x, w)``).
    """

    kernel: int  # index into _Reader.kernels
    axes: tuple[frozenset, ...]  # per axis of the value: the kernel axes it holds
    # kernel axes indexed away on the way (scan slices, W[i]), with the move that did it
    picks: tuple[tuple[frozenset, str], ...] = ()
    derived: Use | None = None

    def moved(self, axes: Iterable[frozenset], picks: Iterable[tuple] = ()) -> _View:
        return dataclasses.replace(self, axes=tuple(axes), picks=self.picks + tuple(picks))

    @property
    def num_sourced(self) -> int:
        return sum(1 for a in self.axes if a)


_BROADCAST = object()  # a non-kernel value broadcast from fewer elements (a scale, a constant)
_NONE = frozenset()


@dataclasses.dataclass(frozen=True)
class Use:
    """One consumer of a kernel: the role it gives each kernel axis, and where it is."""

    roles: tuple[tuple[int, str], ...]  # (kernel axis, layout letter), by axis
    primitive: str
    where: str  # "file:line (function)"
    stacked_by: tuple[str, ...] = ()  # the moves that index its stacked axes away

    def __str__(self) -> str:
        text = f"{self.primitive} at {self.where or 'an unknown line'}"
        if self.stacked_by:
            text += " (stacked by " + ", ".join(self.stacked_by) + ")"
        return text

    def letters(self, ndim: int) -> str:
        """The layout this use alone reads, ``?`` for the axes it says nothing about."""
        roles = dict(self.roles)
        return "".join(roles.get(k, "?") for k in range(ndim))


@dataclasses.dataclass
class KernelUses:
    """Everything the program shows about one kernel."""

    path: str
    shape: tuple[int, ...]
    uses: dict = dataclasses.field(default_factory=dict)  # Use -> None: an ordered set
    hidden_by: dict = dataclasses.field(default_factory=dict)  # ops hiding its layout
    combined: bool = False  # added to, multiplied with or joined to activations

    def roles(self) -> list[str | None]:
        """One letter per kernel axis from all uses together (``None``: not shown).

        Raises :class:`LayoutError` naming both uses when two of them disagree.
        """
        letters: list[str | None] = [None] * len(self.shape)
        origin: list[Use | None] = [None] * len(self.shape)
        embed = None  # (vocab axis, feature axis) once a row gather is seen
        for use in sorted(self.uses, key=lambda u: u.primitive != "gather"):
            roles = dict(use.roles)
            if embed and roles.get(embed[0]) == "o" and roles.get(embed[1]) == "i":
                del roles[embed[0]], roles[embed[1]]  # x @ table.T: tied embeddings attend
            for axis, letter in roles.items():
                have = letters[axis]
                if have is None or (have != letter and _refines(have, letter)):
                    letters[axis], origin[axis] = letter, use
                elif not _refines(letter, have):
                    raise self._conflict(axis, origin[axis], have, use, letter)
            if use.primitive == "gather" and embed is None:
                found = {letter: axis for axis, letter in use.roles}
                embed = (found["v"], found["f"])
        return letters

    def layout(self) -> tuple[str | None, str]:
        """``(layout string, "")`` or ``(None, why no layout was read)``."""
        if not self.uses:
            if self.hidden_by:
                return None, "it reaches only " + ", ".join(self.hidden_by) + (
                    ", which do not show its layout"
                )
            return None, "fn never passes it whole to a dot_general, conv or gather"
        letters = self.roles()
        # An axis of size 1 dropped on the way is a stack of one.
        letters = [c or ("s" if n == 1 else None) for c, n in zip(letters, self.shape, strict=True)]
        unknown = [k for k, c in enumerate(letters) if c is None]
        if unknown:
            return None, (
                f"its uses ({'; '.join(map(str, self.uses))}) do not show the role of axes "
                f"{unknown}"
            )
        axes = "".join(c for c in letters if c is not None)  # none is None: checked above
        problem = layouts_lib._layout_problem(axes)
        if problem:
            return None, f"its uses read {axes!r}, which is not a kernel layout: {problem}"
        return axes, ""

    def _conflict(self, axis: int, first: Use, a: str, second: Use, b: str) -> LayoutError:
        ndim = len(self.shape)
        return LayoutError(
            f"The kernel at path {self.path!r} (shape {self.shape}) is used in two "
            f"incompatible ways: {first} uses its axis {axis} as {_ROLE[a]} (layout "
            f"{first.letters(ndim)!r}), but {second} uses it as {_ROLE[b]} (layout "
            f"{second.letters(ndim)!r}). A kernel has one layout: use it one way, or give "
            f"the layout to adapt it with explicitly, {_explicit(self.path, first.letters(ndim))}."
        )


def _explicit(path: str, layout: str) -> str:
    """How to give ``path`` a layout, with ``layout`` as the example when it is complete."""
    if "?" in layout or layouts_lib._layout_problem(layout):
        return (f"`LoraConfig(layouts={{{path!r}: ...}})` (one letter per axis, see "
                "jlora.layouts)")
    return f"`LoraConfig(layouts={{{path!r}: {layout!r}}})`"


def _refines(have: str, new: str) -> bool:
    """Whether ``new`` agrees with ``have`` and says at least as much (``w`` refines ``i``)."""
    return new == have or (have in "io" and _CATEGORY[new] == have)


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


# ---------------------------------------------------------------------------------------
# Entry points
# ---------------------------------------------------------------------------------------


def _read(jaxpr, input_paths: Sequence[str | None], wanted) -> list[KernelUses]:
    """Run the reader over ``jaxpr`` with the inputs that ``wanted(path, aval)`` accepts
    entered as kernels."""
    kernels: list[KernelUses] = []
    invals = []
    for var, path in zip(jaxpr.invars, input_paths, strict=True):
        if path is None or not wanted(path, var.aval):
            invals.append(None)
            continue
        shape = _shape(var)
        invals.append((_View(len(kernels), tuple(frozenset([k]) for k in range(len(shape)))),))
        kernels.append(KernelUses(path, shape))
    if kernels:
        reader = _Reader(kernels)
        for x in reader.eval_jaxpr(jaxpr, invals):
            reader.hide_all(x, "the function's return value")
    return kernels


def read_kernel_uses(
    closed_jaxpr, input_paths: Sequence[str | None], paths: Iterable[str]
) -> dict[str, KernelUses]:
    """The uses of the kernels at ``paths`` in a traced program.

    Args:
      closed_jaxpr: the program, a ``ClosedJaxpr`` (or ``Jaxpr``).
      input_paths: for each jaxpr input, its parameter path, or ``None`` (an argument).
      paths: the kernels to read; each is read from the first input with that path.

    Returns:
      ``{path: KernelUses}`` for the listed paths present among the inputs; each has
      ``.uses`` (where and how the program consumes it), ``.roles()`` and ``.layout()``.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> closed = jax.make_jaxpr(lambda w, x: x @ w.T)(jnp.ones((3, 2)), jnp.ones((4, 2)))
      >>> read_kernel_uses(closed, ["head/kernel", None], ["head/kernel"])["head/kernel"].layout()
      ('oi', '')
    """
    wanted, seen = set(paths), set()

    def take(path, aval):
        if path in wanted and path not in seen:
            seen.add(path)
            return True
        return False

    kernels = _read(_open(closed_jaxpr), input_paths, take)
    return {k.path: k for k in kernels}


def _contradictions(layout: Layout, use: Use) -> list[tuple[int, str, str]]:
    """``(axis, layout letter, use letter)`` wherever ``use`` reads the kernel otherwise."""
    roles = dict(use.roles)
    axes = layout.axes
    if layout.kind == "embed":
        v, f = axes.index("v"), axes.index("f")
        if roles.get(v) == "o" and roles.get(f) == "i":
            del roles[v], roles[f]  # x @ table.T: attending with the table, as tied embeddings do
    out = []
    for k, letter in roles.items():
        kind_differs = (letter in "vf" and layout.kind != "embed") or (
            letter == "w" and layout.kind != "conv"
        )
        if kind_differs or _CATEGORY[letter] != _CATEGORY[axes[k]]:
            out.append((k, axes[k], letter))
    return out


def check_layout(found: KernelUses, layout: Layout) -> None:
    """Raise :class:`LayoutError` if the program uses the kernel against ``layout``.

    A contradiction is a use that gives an axis another role: a guessed ``'io'`` kernel
    contracted over axis 1 (stored ``(out, in)``: ``'oi'``), a guessed dense kernel whose
    rows are gathered (an embedding, ``'vf'``), a guessed ``'ioo'`` kernel that a scan
    slices along axis 0 (``'sio'``). ``x @ table.T`` on a ``'vf'`` table is not one.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> closed = jax.make_jaxpr(lambda w, x: x @ w.T)(jnp.ones((3, 2)), jnp.ones((4, 2)))
      >>> found = read_kernel_uses(closed, ["head/kernel", None], ["head/kernel"])
      >>> check_layout(found["head/kernel"], Layout("oi"))
      >>> check_layout(found["head/kernel"], Layout("io", guessed=True))
      Traceback (most recent call last):
        ...
      jlora.LayoutError: The kernel at path 'head/kernel' (shape (3, 2)) has the ...
    """
    if layout.ndim != len(found.shape):
        layout.check_shape(found.shape, found.path)
    for use in found.uses:
        bad = _contradictions(layout, use)
        if not bad:
            continue
        try:
            read, _ = found.layout()
        except LayoutError:
            read = None
        read = read or use.letters(len(found.shape))
        how = "; ".join(
            f"axis {k} is {_ROLE[letter]}, not {_ROLE[have]}" for k, have, letter in bad
        )
        origin = " (guessed from its shape and name)" if layout.guessed else ""
        raise LayoutError(
            f"The kernel at path {found.path!r} (shape {found.shape}) has the layout "
            f"{layout.axes!r}{origin}, but {use} uses it as {read!r}: {how}. Read the "
            f"layouts from the model with {_FIX}, or give this one explicitly: "
            f"{_explicit(found.path, read)}."
        )


def check_guessed_layouts(
    closed_jaxpr, input_paths: Sequence[str | None], layouts: Mapping[str, Layout]
) -> dict[str, KernelUses]:
    """Check every guessed layout in ``layouts`` against the program (one pass).

    Args:
      closed_jaxpr: the traced program.
      input_paths: for each jaxpr input, its parameter path or ``None``.
      layouts: ``{path: Layout}`` of the adapted kernels; only those with
        ``guessed=True`` are read and checked.

    Returns:
      ``{path: KernelUses}`` of the checked kernels.

    Raises:
      LayoutError: naming the path, the guess, the contradicting use and the fix.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> closed = jax.make_jaxpr(lambda w, x: x @ w)(jnp.ones((2, 3)), jnp.ones((4, 2)))
      >>> found = check_guessed_layouts(closed, ["w", None], {"w": Layout("io", guessed=True)})
      >>> [str(u).split(" at ")[0] for u in found["w"].uses]
      ['dot_general']
    """
    guessed = {path: lay for path, lay in layouts.items() if lay.guessed}
    if not guessed:
        return {}
    found = read_kernel_uses(closed_jaxpr, input_paths, guessed)
    for path, uses in found.items():
        check_layout(uses, guessed[path])
    return found


class InferredLayouts(dict):
    """``{path: layout string}``, as :func:`infer_layouts` read them.

    Attributes:
      unconsumed: paths of floating leaves with two or more axes whose layout the
        function does not show (see the warning for why, per path).
      uses: ``{path: [where and how the function consumes the kernel]}``.
    """

    def __init__(self, layouts=(), *, unconsumed: Sequence[str] = (),
                 uses: Mapping[str, list[str]] | None = None):
        super().__init__(layouts)
        self.unconsumed = list(unconsumed)
        self.uses = dict(uses or {})


def _is_array(x) -> bool:
    return isinstance(x, jax.Array | np.ndarray | np.generic | jax.ShapeDtypeStruct) or (
        jc.is_tracer(x)
    )


def _param_paths(params) -> list[str | None]:
    """The path of each array leaf of ``params``; ``None`` inside a quantized kernel (it
    carries its own layout)."""
    out: list[str | None] = []
    is_kernel = paths_lib._is_kernel_leaf
    for kp, node in jax.tree_util.tree_flatten_with_path(params, is_leaf=is_kernel)[0]:
        if is_kernel(node):
            out += [None] * len(jax.tree_util.tree_leaves(node))
        else:
            out.append(paths_lib.keypath_to_str(kp))
    return out


def _trace(fn, params, args, kwargs):
    """``(closed jaxpr, path or None per jaxpr input)`` of ``fn(params, *args, **kwargs)``;
    arrays (and ShapeDtypeStructs, tracers) become inputs, other leaves stay static."""
    leaves, treedef = jax.tree_util.tree_flatten((params, args, kwargs))
    dynamic = [_is_array(x) for x in leaves]

    def flat_fn(*arrays):
        it = iter(arrays)
        full = [next(it) if d else x for x, d in zip(leaves, dynamic, strict=True)]
        p, a, kw = jax.tree_util.tree_unflatten(treedef, full)
        return [x for x in jax.tree_util.tree_leaves(fn(p, *a, **kw)) if _is_array(x)]

    specs = [x if isinstance(x, jax.ShapeDtypeStruct) else jc.aval_of(x)
             for x, d in zip(leaves, dynamic, strict=True) if d]
    closed = jc.make_closed_jaxpr(flat_fn, specs)
    param_paths = _param_paths(params)
    param_paths += [None] * (len(leaves) - len(param_paths))
    input_paths = [path for path, d in zip(param_paths, dynamic, strict=True) if d]
    return closed, input_paths


def _is_candidate(path: str, aval) -> bool:
    return len(aval.shape) >= 2 and jnp.issubdtype(aval.dtype, jnp.floating)


def infer_layouts(fn: Callable, params, *args, **kwargs) -> InferredLayouts:
    """Read the layout of every kernel in ``params`` from how ``fn`` uses it.

    Traces ``fn(params, *args, **kwargs)`` once to a jaxpr, without computing anything:
    ``params`` and the arguments may be ``jax.ShapeDtypeStruct`` trees (a 7B model's
    shapes are read in about a second), arrays or tracers (it works under ``jax.jit`` and
    ``jax.eval_shape``). Leaves that are not arrays stay static, as in a plain call. See
    the module docstring for what gives each role and when a call is needed.

    Args:
      fn: the model, called as ``fn(params, *args, **kwargs)``.
      params: the parameter pytree (linen variables, an NNX state, any dict).
      *args: the model's inputs, or their shapes as ``jax.ShapeDtypeStruct``.
      **kwargs: keyword inputs.

    Returns:
      An :class:`InferredLayouts`: ``{path: layout string}`` for every floating leaf with
      two or more axes that ``fn`` consumes as a kernel, ready for
      ``LoraConfig(layouts=...)``. ``.uses`` says where each layout was read;
      ``.unconsumed`` lists leaves whose layout ``fn`` does not show, also reported in one
      :class:`LayoutInferenceWarning`.

    Raises:
      LayoutError: a kernel used in two incompatible ways, naming both uses.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> params = {"q_einsum": {"w": jax.ShapeDtypeStruct((4, 16, 8), jnp.bfloat16)}}
      >>> fn = lambda p, x: jnp.einsum("BTD,NDH->BTNH", x, p["q_einsum"]["w"])
      >>> infer_layouts(fn, params, jax.ShapeDtypeStruct((2, 5, 16), jnp.bfloat16))
      {'q_einsum/w': 'oio'}
    """
    closed, input_paths = _trace(fn, params, args, kwargs)
    kernels = _read(closed.jaxpr, input_paths, _is_candidate)
    layouts, uses, unread = {}, {}, {}
    for kernel in kernels:
        if kernel.uses:
            uses[kernel.path] = [str(u) for u in kernel.uses]
        axes, why = kernel.layout()
        if axes:
            layouts[kernel.path] = axes
        elif kernel.uses or kernel.hidden_by or not kernel.combined:
            unread[kernel.path] = why
    if unread:
        listed = "; ".join(f"{path!r}: {why}" for path, why in unread.items())
        warnings.warn(
            f"infer_layouts read no layout for {len(unread)} floating leaf(s) with two or "
            f"more axes, which get no entry: {listed}. To adapt one of them, call fn on "
            "arguments that use it, or give its layout in `LoraConfig(layouts=...)`.",
            LayoutInferenceWarning,
            stacklevel=2,
        )
    return InferredLayouts(layouts, unconsumed=list(unread), uses=uses)
