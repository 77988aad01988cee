"""`jlora.lora`: adapters applied inside any JAX function without forming ``W + s·A·B``.

``jlora.lora(fn)(params, adapters, *args)`` returns ``fn(jlora.merge(params, adapters),
*args)``, but each adapted kernel ``W`` is never merged: ``fn`` is traced to a jaxpr once
per input shape, and an interpreter re-emits its equations carrying every adapted kernel
as a *factored value* ``(W, A, B)`` (plus DoRA's per-output multiplier, dropout keys and
the role of each axis: stacked, fan-in or fan-out):

* operations that only move or recast a kernel (dtype casts, transposes, reshapes that
  keep fan-in and fan-out groups, slicing and indexing, ``scan`` over stacked layers,
  nested ``jit``, ``checkpoint``, ``cond``, ``while``) move ``A`` and ``B`` alongside ``W``;
* consumers are rewritten: ``dot_general`` contracting a kernel's whole fan-in (or whole
  fan-out, as ``Embed.attend`` does) becomes ``x·W + s·((x·A)·B)``; ``conv_general_dilated``
  becomes the conv with ``W`` plus the conv with ``A`` (``rank`` output channels) followed
  by ``B`` on the channels; an embedding ``gather`` becomes ``W[ids] + s·(A[ids]·B)``;
* anything else gets ``W + s·A·B`` formed at that point (so the result is always right),
  with a :class:`FactoredFallbackWarning` once per kernel path; :func:`lora_report` says
  which paths fell back and why.

So a train step differentiating w.r.t. the adapters never builds an ``(in, out)``-sized
weight or weight gradient. See ``docs/factored.md`` for dropout, DoRA and
:func:`collect_inputs`.

Example:
  >>> import jax, jax.numpy as jnp, jlora
  >>> params = {"dense": {"kernel": jnp.ones((4, 3))}}
  >>> adapters = jlora.init(jax.random.key(0), params, jlora.LoraConfig(rank=2))
  >>> apply = lambda p, x: x @ p["dense"]["kernel"]
  >>> y = jax.jit(jlora.lora(apply))(params, adapters, jnp.ones((2, 4)))
  >>> bool(jnp.allclose(y, apply(jlora.merge(params, adapters), jnp.ones((2, 4)))))
  True
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import math
import string
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jlora import _factored_ops as _fops
from jlora import _jax_compat as jc
from jlora import paths as paths_lib
from jlora import quantization as quant_lib
from jlora.adapter import Adapter, Adapters
from jlora.initializers import kernel_key
from jlora.layouts import Layout, LayoutError, resolve_layout
from jlora.merging import check_adapters_fit

__all__ = ["FactoredFallbackWarning", "collect_inputs", "lora", "lora_report"]

FACTORED = "factored"
UNUSED = "unused"
_CACHE_SIZE = 32  # traced jaxprs kept per transformed function (one per input signature)


class FactoredFallbackWarning(UserWarning):
    """An adapted kernel reached an operation the factored transform cannot rewrite.

    The result is still exact: ``W + s·A·B`` is formed at that point, as ``merge`` would.
    Raised at most once per kernel path and transformed function.
    """


# ---------------------------------------------------------------------------------------
# The factored value: a kernel view with its factors.
#
# Every array carried next to W indexes some of W's axes. Its axes come in category blocks
# (s: stacked, i: fan-in, o: fan-out, r: rank), each block in W's current axis order:
#   a (s, i, r)   b (s, r, o)   m (s, o) DoRA multiplier   keys (s) dropout   index (s, i)
# so a move of W (transpose, reshape, slice, ...) is the same move on each block.
# ---------------------------------------------------------------------------------------

_CATEGORY = {"s": "s", "w": "i", "i": "i", "v": "i", "o": "o", "f": "o"}
_FIELDS = {"a": "sir", "b": "sro", "m": "so", "keys": "s", "index": "si"}
_LETTERS = string.ascii_letters


class _Unsupported(Exception):  # noqa: N818 - internal signal, never escapes this module
    """A rule cannot keep the kernel factored here; the reason goes into the report."""


@dataclasses.dataclass(frozen=True)
class _Meta:
    path: str
    roles: str  # one layout letter per axis of the current view of W
    dtype: Any  # the dtype the program sees; W itself stays in its parameter dtype
    scale: float
    # One array of a quantized kernel before the model's `dequantize`: (field, statics).
    part: tuple | None = None


@jax.tree_util.register_pytree_node_class
class _Factored:
    """One view of an adapted kernel: ``W + s·A·B`` (times DoRA's ``m``), never formed."""

    def __init__(self, w, a, b, m, keys, index, *, meta: _Meta):
        self.w, self.a, self.b, self.m, self.keys, self.index = w, a, b, m, keys, index
        self.meta = meta

    def tree_flatten(self):
        return (self.w, self.a, self.b, self.m, self.keys, self.index), self.meta

    @classmethod
    def tree_unflatten(cls, meta, children):
        return cls(*children, meta=meta)

    @property
    def roles(self) -> str:
        return self.meta.roles

    @property
    def adapted(self) -> bool:
        return self.a is not None

    def carried(self) -> dict[str, Any]:
        return {f: getattr(self, f) for f in _FIELDS if getattr(self, f) is not None}

    def replace(self, w, roles: str | None = None, dtype=None, **carried) -> _Factored:
        fields = {f: getattr(self, f) for f in _FIELDS}
        fields.update(carried)
        meta = dataclasses.replace(
            self.meta,
            roles=self.roles if roles is None else roles,
            dtype=self.meta.dtype if dtype is None else dtype,
        )
        return _Factored(w, **fields, meta=meta)


def _is_lazy(x) -> bool:
    """A kernel whose W is still quantized: dequantized only where it is consumed."""
    return isinstance(x, _Factored) and quant_lib.is_quantized(x.w)


def _is_part(x) -> bool:
    """One array of a quantized kernel, on its way to the model's ``dequantize`` call."""
    return isinstance(x, _Factored) and x.meta.part is not None


def _dense(w):
    return w.dequantized() if quant_lib.is_quantized(w) else w


def _bind_with_kernel(eqn, fv: _Factored, ops: list, k: int) -> list:
    """``eqn`` on ``ops`` with ``fv``'s kernel W (in the program's dtype) as operand ``k``.

    A quantized W is dequantized right here, inside ``jax.checkpoint``: the backward pass
    dequantizes it again instead of keeping the float kernel as a residual, so neither a
    whole float kernel per layer of a stack nor one per layer of the model is kept.
    """
    others = [x for i, x in enumerate(ops) if i != k]

    def product(w, *others):
        w = _dense(w).astype(fv.meta.dtype)
        return jc.bind_eqn(eqn, [*others[:k], w, *others[k:]])

    if not quant_lib.is_quantized(fv.w):
        return product(fv.w, *others)
    return jax.checkpoint(product)(fv.w, *others)


def _positions(roles: str, field: str) -> list[int | None]:
    """For each axis of W: its axis in the carried array ``field`` (None if absent)."""
    blocks = _FIELDS[field]
    counts = {c: sum(_CATEGORY[r] == c for r in roles) for c in "sio"}
    counts["r"] = 1
    offset, start = 0, {}
    for c in blocks:
        start[c] = offset
        offset += counts[c]
    seen = collections.Counter()
    out = []
    for r in roles:
        c = _CATEGORY[r]
        out.append(start[c] + seen[c] if c in blocks else None)
        seen[c] += 1
    return out


def _rank_position(roles: str, field: str) -> int | None:
    blocks = _FIELDS[field]
    if "r" not in blocks:
        return None
    return sum(sum(_CATEGORY[r] == c for r in roles) for c in blocks[: blocks.index("r")])


def _field_letters(roles: str, field: str, w_letters: Sequence[str], r_letter: str) -> str:
    pos = _positions(roles, field)
    n = sum(p is not None for p in pos) + ("r" in _FIELDS[field])
    out = [""] * n
    for k, p in enumerate(pos):
        if p is not None:
            out[p] = w_letters[k]
    rp = _rank_position(roles, field)
    if rp is not None:
        out[rp] = r_letter
    return "".join(out)


def _align(x, x_letters: str, out_letters: str):
    """``x`` transposed and expanded so that it broadcasts against ``out_letters``."""
    order = sorted(range(len(x_letters)), key=lambda i: out_letters.index(x_letters[i]))
    x = jnp.transpose(x, order)
    shape = [1] * len(out_letters)
    for i in order:
        shape[out_letters.index(x_letters[i])] = x.shape[order.index(i)]
    return jnp.reshape(x, shape)


def _merged_view(fv: _Factored):
    """``W + s·A·B`` (DoRA: times ``m``) for this view, as ``merge`` computes it."""
    w = _dense(fv.w)
    if not fv.adapted:
        return w.astype(fv.meta.dtype)
    letters = _LETTERS[: len(fv.roles) + 1]
    w_l, r_l = letters[:-1], letters[-1]
    a_l = _field_letters(fv.roles, "a", w_l, r_l)
    b_l = _field_letters(fv.roles, "b", w_l, r_l)
    product = jnp.einsum(
        f"{a_l},{b_l}->{w_l}", fv.a.astype(jnp.float32), fv.b.astype(jnp.float32),
        precision=jax.lax.Precision.HIGHEST,
    )
    merged = w.astype(jnp.float32) + fv.meta.scale * product
    if fv.m is not None:
        merged = merged * _align(fv.m, _field_letters(fv.roles, "m", w_l, r_l), w_l)
    return merged.astype(w.dtype).astype(fv.meta.dtype)


def _combine(base, branch, factor, dropped):
    """The consumer's output from ``base`` (with W) and ``branch`` (the scaled A·B path).

    LoRA: ``base + branch``. DoRA, with ``factor = m / stop_gradient(‖W + s·A·B‖)``:
    ``factor · (base + branch)``; with dropout active, PEFT feeds the dropped input ``x_d``
    to the whole adapter delta ``x_d·(W' - W)``, i.e. ``base + (factor - 1)·dropped +
    factor·branch`` with ``dropped = x_d·W`` (the same as above when ``x_d = x``).
    """
    branch = branch.astype(base.dtype)
    if factor is None:
        return base + branch
    factor = factor.astype(base.dtype)
    if dropped is None:
        return (factor * (base + branch)).astype(base.dtype)
    return (base + (factor - 1) * dropped + factor * branch).astype(base.dtype)


# --- moves: the same change of view on W and on every carried array ------------------


def _move_transpose(fv: _Factored, w, perm: Sequence[int]) -> _Factored:
    new_roles = "".join(fv.roles[p] for p in perm)
    carried = {}
    for field, arr in fv.carried().items():
        old, new = _positions(fv.roles, field), _positions(new_roles, field)
        arr_perm = list(range(arr.ndim))
        for k_new, k_old in enumerate(perm):
            if new[k_new] is not None:
                arr_perm[new[k_new]] = old[k_old]
        carried[field] = jnp.transpose(arr, arr_perm)
    return fv.replace(w, roles=new_roles, **carried)


def _reshape_groups(old: Sequence[int], new: Sequence[int]):
    """Pair runs of axes of ``old`` and ``new`` with equal products (size-1 axes alone)."""
    i = j = 0
    groups = []
    while i < len(old) or j < len(new):
        if i < len(old) and old[i] == 1:
            groups.append(([i], []))
            i += 1
            continue
        if j < len(new) and new[j] == 1:
            groups.append(([], [j]))
            j += 1
            continue
        if i >= len(old) or j >= len(new):
            raise _Unsupported("the reshape does not split the kernel's axes into groups")
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
                raise _Unsupported("the reshape does not split the kernel's axes into groups")
        groups.append((gi, gj))
    return groups


def _reshape_roles(roles: str, old: Sequence[int], new: Sequence[int]) -> str:
    """The roles after reshaping ``old`` to ``new``: only groups of one category merge."""
    if 0 in old or 0 in new:
        raise _Unsupported("the kernel view has a zero-sized axis")
    new_roles = [""] * len(new)
    for gi, gj in _reshape_groups(old, new):
        letters = {roles[i] for i in gi if old[i] != 1} or {roles[i] for i in gi}
        cats = {_CATEGORY[r] for r in letters}
        if not gj:  # a size-1 axis dropped
            continue
        if not gi:  # a new size-1 axis: a stacked axis of one layer
            new_roles[gj[0]] = "s"
            continue
        if len(cats) != 1:
            raise _Unsupported(
                "the reshape mixes stacked, fan-in and fan-out axes of the kernel "
                f"(roles {roles!r}, shape {tuple(old)} -> {tuple(new)})"
            )
        letter = letters.pop() if len(letters) == 1 else {"s": "s", "i": "i", "o": "o"}[cats.pop()]
        for j in gj:
            new_roles[j] = letter
    out = "".join(new_roles)
    for c, what in (("i", "fan-in"), ("o", "fan-out")):
        if not any(_CATEGORY[r] == c for r in out):
            raise _Unsupported(f"the reshape removes every {what} axis of the kernel")
    return out


def _move_reshape(fv: _Factored, w, new_shape: Sequence[int]) -> _Factored:
    old_shape = tuple(fv.w.shape)
    new_roles = _reshape_roles(fv.roles, old_shape, new_shape)
    carried = {}
    for field, arr in fv.carried().items():
        shape = []
        for c in _FIELDS[field]:
            if c == "r":
                shape.append(arr.shape[_rank_position(fv.roles, field)])
            else:
                shape += [n for n, r in zip(new_shape, new_roles, strict=True) if _CATEGORY[r] == c]
        carried[field] = jnp.reshape(arr, shape)
    return fv.replace(w, roles=new_roles, **carried)


def _move_broadcast(fv: _Factored, w, shape: Sequence[int], dims: Sequence[int]) -> _Factored:
    expanded = [1] * len(shape)
    for d, n in zip(dims, fv.w.shape, strict=True):
        expanded[d] = n
    view = _move_reshape(fv, None, expanded)
    for k, (have, want) in enumerate(zip(expanded, shape, strict=True)):
        if have != want and _CATEGORY[view.roles[k]] != "s":
            raise _Unsupported("the kernel is broadcast along one of its fan-in/fan-out axes")
    carried = {}
    for field, arr in view.carried().items():
        pos = _positions(view.roles, field)
        target = list(arr.shape)
        for k, p in enumerate(pos):
            if p is not None:
                target[p] = shape[k]
        carried[field] = jnp.broadcast_to(arr, target)
    return view.replace(w, **carried)


def _move_slice(fv: _Factored, w, start, limit, strides) -> _Factored:
    strides = strides or (1,) * len(start)
    carried = {}
    for field, arr in fv.carried().items():
        s, lim, st = [0] * arr.ndim, list(arr.shape), [1] * arr.ndim
        for k, p in enumerate(_positions(fv.roles, field)):
            if p is not None:
                s[p], lim[p], st[p] = start[k], limit[k], strides[k]
        carried[field] = jax.lax.slice(arr, s, lim, st)
    return fv.replace(w, **carried)


def _move_dynamic_slice(fv: _Factored, w, starts, sizes) -> _Factored:
    carried = {}
    for field, arr in fv.carried().items():
        st = [jnp.zeros((), jnp.asarray(starts[0]).dtype)] * arr.ndim
        sz = list(arr.shape)
        for k, p in enumerate(_positions(fv.roles, field)):
            if p is not None:
                st[p], sz[p] = starts[k], sizes[k]
        carried[field] = jax.lax.dynamic_slice(arr, st, sz)
    return fv.replace(w, **carried)


def _move_rev(fv: _Factored, w, dims) -> _Factored:
    carried = {}
    for field, arr in fv.carried().items():
        pos = _positions(fv.roles, field)
        axes = tuple(pos[k] for k in dims if pos[k] is not None)
        carried[field] = jax.lax.rev(arr, axes) if axes else arr
    return fv.replace(w, **carried)


# ---------------------------------------------------------------------------------------
# Interpreter
# ---------------------------------------------------------------------------------------


@dataclasses.dataclass
class _Run:
    """State shared by every (sub-)interpreter of one call of the transformed function."""

    rng: Any = None  # dropout key when dropout is active
    rates: dict = dataclasses.field(default_factory=dict)  # {path: dropout rate}
    report: dict = dataclasses.field(default_factory=dict)
    uses: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    custom_vjp: bool = False  # factored dots through jlora._factored_ops (see `lora`)
    fuse_shared_inputs: bool = False  # kernels dotted with the same input share x·[A|A'|..]

    def mark(self, path: str, status: str) -> None:
        if status == FACTORED:
            self.report.setdefault(path, FACTORED)
        elif self.report.get(path, FACTORED) == FACTORED:
            self.report[path] = status  # the first fallback reason is the one reported


def _describe(eqn) -> str:
    where = jc.source_summary(eqn)
    return f"`{eqn.primitive.name}`" + (f" at {where}" if where else "")


class _Interpreter:
    """Evaluates a jaxpr under the current trace, rewriting equations on factored kernels."""

    def __init__(self, run: _Run):
        self.run = run
        self.collected: dict[str, list] = collections.defaultdict(list)
        # Shared-input fusion: the jaxprs being evaluated (innermost last) as
        # (jaxpr, index of the current equation, env), and outputs computed ahead of time
        # for later equations, keyed by (id(jaxpr), equation index).
        self.frames: list = []
        self.pending: dict = {}
        self.dot_readers: dict = {}  # id(jaxpr) -> (jaxpr, {var: indices of dots reading it})

    # -- plumbing --------------------------------------------------------------------

    def eval_jaxpr(self, jaxpr, consts, args) -> list:
        env: dict = {}

        def read(v):
            return v.val if isinstance(v, jc.Literal) else env[v]

        def write(v, val):
            if not isinstance(v, jc.DropVar):
                env[v] = val

        for v, x in zip(jaxpr.constvars, consts, strict=True):
            write(v, x)
        for v, x in zip(jaxpr.invars, args, strict=True):
            write(v, x)
        frame = [jaxpr, 0, env]
        self.frames.append(frame)
        for i, eqn in enumerate(jaxpr.eqns):
            frame[1] = i
            outs = self.pending.pop((id(jaxpr), i), None)
            if outs is None:
                invals = [read(v) for v in eqn.invars]
                if any(isinstance(x, _Factored) for x in invals):
                    outs = self.factored_eqn(eqn, invals)
                else:
                    outs = jc.bind_eqn(eqn, invals)
            for v, x in zip(eqn.outvars, outs, strict=True):
                write(v, x)
        self.frames.pop()
        return [read(v) for v in jaxpr.outvars]

    def materialise(self, x, reason: str):
        if not isinstance(x, _Factored):
            return x
        if _is_part(x):
            return self.part_value(x, reason)
        if x.adapted:
            self.run.mark(x.meta.path, reason)
        return _merged_view(x)

    def materialise_all(self, xs, reason: str) -> list:
        return [self.materialise(x, reason) for x in xs]

    def fallback(self, eqn, invals, why: str = "") -> list:
        reason = f"materialised: the kernel reaches {_describe(eqn)}" + (f" ({why})" if why else "")
        return jc.bind_eqn(eqn, self.materialise_all(invals, reason))

    def factored_eqn(self, eqn, invals) -> list:
        if any(_is_part(x) or _is_lazy(x) for x in invals):
            out = self.quantized_eqn(eqn, invals)
            if out is not None:
                return out
            invals = self.settle_quantized(eqn, invals)
            if not any(isinstance(x, _Factored) for x in invals):
                return jc.bind_eqn(eqn, invals)
        rule = _rules().get(eqn.primitive)
        if rule is None:
            return self.fallback(eqn, invals)
        try:
            return rule(self, eqn, invals)
        except _Unsupported as e:
            return self.fallback(eqn, invals, str(e))

    # -- quantized kernels (jlora.quantization) ---------------------------------------
    #
    # A quantized kernel enters as one "part" per array (its path and field in meta.part);
    # structural equations (jit, scan, remat, cond, while) carry the parts like any
    # factored value. The model's `dequantize` call turns them into one factored value
    # whose W is the QuantizedKernel itself ("lazy"); consumers dequantize it (see
    # _bind_with_kernel), slicing a layer out of a stack slices the quantized arrays, and
    # any other equation gets the float kernel.

    def part_value(self, x: _Factored, reason: str):
        """A quantized kernel's raw array where the program uses it as such."""
        if x.adapted:
            where = reason.removeprefix("materialised: ")
            raise ValueError(
                f"jlora.lora: the adapted quantized kernel at path {x.meta.path!r} is used as "
                f"its raw `{x.meta.part[0]}` array ({where}), so the adapter cannot be "
                "applied. Read quantized kernels only through "
                "jlora.quantization.dequantize(kernel) and use the float kernel it returns."
            )
        return x.w

    def quantized_eqn(self, eqn, invals) -> list | None:
        """Equations that keep a quantized kernel quantized; None for the others."""
        prim = eqn.primitive
        if (prim is jc.jit_p and eqn.params.get("name") == quant_lib.DEQUANTIZE_NAME
                and any(map(_is_part, invals))):
            return self.rule_dequantize(eqn, invals)
        if prim in (jc.slice_p, jc.dynamic_slice_p, jc.squeeze_p) and isinstance(
                invals[0], _Factored):
            return self.stacked_move(eqn, invals)
        if prim in (jc.copy_p, jc.sharding_constraint_p, jc.name_p) and _is_lazy(invals[0]):
            return [invals[0]]
        return None

    def settle_quantized(self, eqn, invals) -> list:
        """Parts become raw arrays and lazy kernels float ones, except where they can stay."""
        prim = eqn.primitive
        if prim in (jc.jit_p, jc.closed_call_p, jc.remat_p, jc.scan_p, jc.cond_p, jc.while_p):
            return invals
        consumer = prim in (jc.dot_general_p, jc.conv_general_dilated_p, jc.gather_p,
                            jc.convert_element_type_p)
        out = []
        for x in invals:
            if _is_part(x):
                x = self.part_value(x, f"it reaches {_describe(eqn)}")
            elif _is_lazy(x) and not consumer:
                x = x.replace(x.w.dequantized())
            out.append(x)
        return out

    def rule_dequantize(self, eqn, invals):
        """The model's ``dequantize(kernel)``: one factored value whose W stays quantized."""
        first = invals[0]
        if not all(_is_part(x) and x.meta.path == first.meta.path for x in invals):
            reason = f"its arrays reach {_describe(eqn)} mixed with other arrays"
            return jc.bind_eqn(eqn, self.materialise_all(invals, reason))
        qk = quant_lib.QuantizedKernel.from_fields(
            first.meta.part[1], {x.meta.part[0]: x.w for x in invals}
        )
        meta = dataclasses.replace(first.meta, part=None, dtype=eqn.outvars[0].aval.dtype)
        return [_Factored(qk, first.a, first.b, first.m, first.keys, first.index, meta=meta)]

    def stacked_move(self, eqn, invals) -> list | None:
        """A slice or squeeze of leading stacked axes only (a layer out of a stack), done on
        the quantized arrays so that only that layer is ever dequantized."""
        fv, *rest = invals
        if not (_is_lazy(fv) or _is_part(fv)) or any(isinstance(x, _Factored) for x in rest):
            return None
        ns = len(fv.roles) - len(fv.roles.lstrip("s"))
        operand = tuple(eqn.invars[0].aval.shape)  # the kernel view, or a part's own array
        if _is_lazy(fv):
            kernel = tuple(fv.w.shape)
        else:
            kernel = tuple(fv.w.shape[:ns]) + tuple(fv.meta.part[1][2])
        shim = fv.replace(jax.ShapeDtypeStruct(kernel, fv.meta.dtype))
        p, prim, tail = eqn.params, eqn.primitive, len(kernel) - ns
        try:
            if prim is jc.squeeze_p:
                dims = tuple(p["dimensions"])
                if any(d >= ns for d in dims):
                    return None

                def move(arr):
                    return jax.lax.squeeze(arr, dims)

                new_kernel = [n for k, n in enumerate(kernel) if k not in dims]
                view = functools.partial(_move_reshape, shim, new_shape=new_kernel)
            elif prim is jc.slice_p:
                start, limit = p["start_indices"], p["limit_indices"]
                strides = p["strides"] or (1,) * len(start)
                if any((start[k], limit[k], strides[k]) != (0, operand[k], 1)
                       for k in range(ns, len(operand))):
                    return None

                def move(arr):
                    n = arr.ndim - ns
                    return jax.lax.slice(arr, (*start[:ns], *[0] * n),
                                         (*limit[:ns], *arr.shape[ns:]), (*strides[:ns], *[1] * n))

                view = functools.partial(
                    _move_slice, shim, start=(*start[:ns], *[0] * tail),
                    limit=(*limit[:ns], *kernel[ns:]), strides=(*strides[:ns], *[1] * tail),
                )
            else:  # dynamic_slice
                sizes = p["slice_sizes"]
                if len(rest) != len(operand) or any(
                        sizes[k] != operand[k] for k in range(ns, len(operand))):
                    return None
                zero = jnp.zeros((), jnp.asarray(rest[0]).dtype)

                def move(arr):
                    return jax.lax.dynamic_slice(arr, [*rest[:ns], *[zero] * (arr.ndim - ns)],
                                                 [*sizes[:ns], *arr.shape[ns:]])

                view = functools.partial(
                    _move_dynamic_slice, shim, starts=[*rest[:ns], *[zero] * tail],
                    sizes=[*sizes[:ns], *kernel[ns:]],
                )
            return [view(w=jax.tree.map(move, fv.w))]
        except _Unsupported:
            return None

    # -- dropout ---------------------------------------------------------------------

    def branch_input(self, fv: _Factored, x):
        """``x`` with PEFT's lora_dropout applied when this kernel's dropout is active."""
        if fv.keys is None:
            return x
        rate = self.run.rates[fv.meta.path]
        key = fv.keys if fv.keys.ndim == 0 else fv.keys.reshape(-1)[0]
        key = jax.random.fold_in(key, self.run.uses[fv.meta.path])
        keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
        return jnp.where(keep, x / (1.0 - rate), jnp.zeros((), x.dtype)).astype(x.dtype)

    def consumed(self, fv: _Factored) -> None:
        self.run.uses[fv.meta.path] += 1
        if fv.adapted:
            self.run.mark(fv.meta.path, FACTORED)

    # -- consumers -------------------------------------------------------------------

    def rule_dot(self, eqn, invals):
        lhs, rhs = invals
        (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
        if isinstance(lhs, _Factored) and isinstance(rhs, _Factored):
            lhs = self.materialise(lhs, f"materialised: two kernels meet in {_describe(eqn)}")
        kernel_is_lhs = isinstance(lhs, _Factored)
        fv, x = (lhs, rhs) if kernel_is_lhs else (rhs, lhs)
        k_con, x_con, k_bat, x_bat = (lc, rc, lb, rb) if kernel_is_lhs else (rc, lc, rb, lb)
        roles = fv.roles
        cats = {_CATEGORY[roles[k]] for k in k_con}
        if len(cats) != 1 or "s" in cats:
            raise _Unsupported("it contracts over no whole fan-in or fan-out group")
        group = cats.pop()
        if sorted(k_con) != [k for k, r in enumerate(roles) if _CATEGORY[r] == group]:
            raise _Unsupported("it contracts over part of the kernel's fan-in or fan-out axes")
        if fv.m is not None and group != "i":
            raise _Unsupported("DoRA kernels are factored only when contracting their fan-in")
        k_pos = 0 if kernel_is_lhs else 1

        def with_kernel(x):
            return _bind_with_kernel(eqn, fv, [None, x] if kernel_is_lhs else [x, None], k_pos)

        letters = iter(_LETTERS)
        w_l, x_l = [""] * len(roles), [""] * x.ndim
        for xa, ka in [*zip(x_con, k_con, strict=True), *zip(x_bat, k_bat, strict=True)]:
            w_l[ka] = x_l[xa] = next(letters)
        for ls in (w_l, x_l):
            for i, v in enumerate(ls):
                ls[i] = v or next(letters)
        r_l = next(letters)
        contracted = {w_l[k] for k in k_con}
        if not fv.adapted:
            self.consumed(fv)
            if group == "i" and fv.index is not None:
                self.collect(fv, x, x_l, w_l, k_bat)
            return with_kernel(x)
        lhs_l, rhs_l = (w_l, x_l) if kernel_is_lhs else (x_l, w_l)
        lhs_con, lhs_bat = (k_con, k_bat) if kernel_is_lhs else (x_con, x_bat)
        rhs_con, rhs_bat = (x_con, x_bat) if kernel_is_lhs else (k_con, k_bat)
        out_l = (
            [lhs_l[i] for i in lhs_bat]
            + [v for i, v in enumerate(lhs_l) if i not in lhs_con and i not in lhs_bat]
            + [v for i, v in enumerate(rhs_l) if i not in rhs_con and i not in rhs_bat]
        )
        g_field, h_field = ("a", "b") if group == "i" else ("b", "a")
        g_l = _field_letters(roles, g_field, w_l, r_l)
        h_l = _field_letters(roles, h_field, w_l, r_l)
        t_l = [v for v in x_l if v not in contracted] + [
            v for v in g_l if v not in x_l and v not in contracted
        ]
        kw = dict(
            precision=eqn.params.get("precision"),
            preferred_element_type=eqn.params.get("preferred_element_type"),
        )
        x_in = self.branch_input(fv, x)
        # (A quantized kernel takes the path below: W is dequantized inside the checkpoint.)
        if self.run.custom_vjp and fv.m is None and not _is_lazy(fv):
            w = fv.w.astype(fv.meta.dtype)
            # The same x·W + s·((x·A)·B), with a backward pass laid out for XLA (see
            # jlora/_factored_ops.py).
            spec = _fops.DotSpec(
                "".join(x_l), g_l, "".join(t_l), h_l, "".join(out_l), fv.meta.scale,
                eqn.params["dimension_numbers"], kw["precision"],
                kw["preferred_element_type"], kernel_is_lhs, r_l,
            )
            peers = self.shared_input_peers(eqn, fv, kernel_is_lhs) if x_in is x else []
            if peers:
                return self.fused_dots(spec, x, [(None, fv), *peers], g_field, h_field)
            self.consumed(fv)
            return [_fops.factored_dot(
                spec, x, None if x_in is x else x_in, w,
                getattr(fv, g_field).astype(fv.meta.dtype),
                getattr(fv, h_field).astype(fv.meta.dtype),
            )]
        (base,) = with_kernel(x)
        t = jnp.einsum(
            f"{''.join(x_l)},{g_l}->{''.join(t_l)}",
            x_in, getattr(fv, g_field).astype(fv.meta.dtype), **kw,
        )
        t = t * jnp.asarray(fv.meta.scale, t.dtype)
        branch = jnp.einsum(
            f"{''.join(t_l)},{h_l}->{''.join(out_l)}",
            t, getattr(fv, h_field).astype(fv.meta.dtype), **kw,
        )
        factor = dropped = None
        if fv.m is not None:
            factor = _align(fv.m, _field_letters(roles, "m", w_l, r_l), "".join(out_l))
            if x_in is not x:
                (dropped,) = with_kernel(x_in)
        self.consumed(fv)
        return [_combine(base, branch, factor, dropped)]

    def shared_input_peers(self, eqn, fv: _Factored, kernel_is_lhs: bool) -> list:
        """Later dots in this jaxpr that read the same input with another adapted kernel
        already at hand, in the same way (q, k, v; gate and up): ``[(index, kernel)]``."""
        if not (self.run.fuse_shared_inputs and self.frames) or fv.keys is not None:
            return []
        jaxpr, here, env = self.frames[-1]
        k_pos = 0 if kernel_is_lhs else 1
        x_var = eqn.invars[1 - k_pos]
        if isinstance(x_var, jc.Literal):
            return []
        cached = self.dot_readers.get(id(jaxpr))
        if cached is None or cached[0] is not jaxpr:
            readers = collections.defaultdict(list)
            for j, e in enumerate(jaxpr.eqns):
                if e.primitive is jc.dot_general_p:
                    for v in e.invars:
                        if not isinstance(v, jc.Literal):
                            readers[v].append(j)
            cached = self.dot_readers[id(jaxpr)] = (jaxpr, readers)
        peers = []
        for j in cached[1].get(x_var, ()):
            other = jaxpr.eqns[j]
            if j <= here or other.params != eqn.params:
                continue
            k_var = other.invars[k_pos]
            if other.invars[1 - k_pos] is not x_var or isinstance(k_var, jc.Literal):
                continue
            peer = env.get(k_var)
            if (isinstance(peer, _Factored) and peer.adapted and peer.m is None
                    and peer.keys is None and not _is_lazy(peer) and peer.roles == fv.roles
                    and peer.meta.dtype == fv.meta.dtype and peer.w.dtype == fv.w.dtype
                    and peer is not fv and all(p is not peer for _, p in peers)):
                peers.append((j, peer))
        return peers

    def fused_dots(self, spec, x, members, g_field: str, h_field: str) -> list:
        """The factored dots of ``members`` (``[(equation index or None, kernel)]``, the
        current equation first) as one :func:`jlora._factored_ops.factored_dots`; the
        later equations' outputs wait in ``pending``."""
        fvs = [fv for _, fv in members]
        ys = _fops.factored_dots(
            spec, tuple(fv.meta.scale for fv in fvs), x,
            [fv.w.astype(fv.meta.dtype) for fv in fvs],
            [getattr(fv, g_field).astype(fv.meta.dtype) for fv in fvs],
            [getattr(fv, h_field).astype(fv.meta.dtype) for fv in fvs],
        )
        jaxpr = self.frames[-1][0]
        for (j, fv), y in zip(members, ys, strict=True):
            self.consumed(fv)  # (no dropout in a fused group, so the order is immaterial)
            if j is not None:
                self.pending[(id(jaxpr), j)] = [y]
        return [ys[0]]

    def collect(self, fv: _Factored, x, x_l, w_l, k_bat) -> None:
        """Record the input reaching a listed kernel: ``(*batched stacked, N, fan_in)``."""
        roles = fv.roles
        stacked_batch = [w_l[k] for k in k_bat]
        fan_in = [w_l[k] for k, r in enumerate(roles) if _CATEGORY[r] == "i"]
        rest = [v for v in x_l if v not in stacked_batch and v not in fan_in]
        order = [x_l.index(v) for v in stacked_batch + rest + fan_in]
        xt = jnp.transpose(x, order)
        nb = len(stacked_batch)
        n = math.prod(xt.shape[nb : nb + len(rest)])
        f = math.prod(xt.shape[nb + len(rest) :])
        flat = xt.reshape(*xt.shape[:nb], n, f)
        index = fv.index.reshape(-1, f)[0]  # the same for every stacked slice
        self.collected[fv.meta.path].append(flat[..., jnp.argsort(index)])

    def collect_patches(self, eqn, fv: _Factored, x) -> None:
        """Record a conv filter's input patches as ``(N, window x in)`` rows."""
        p = eqn.params
        dn = p["dimension_numbers"]
        _, rhs_spec, out_spec = dn
        patches = jax.lax.conv_general_dilated_patches(
            x, tuple(fv.w.shape[d] for d in rhs_spec[2:]), p["window_strides"], p["padding"],
            lhs_dilation=p["lhs_dilation"], rhs_dilation=p["rhs_dilation"],
            dimension_numbers=dn, precision=jax.lax.Precision.HIGHEST,  # exact copies
        )
        patches = jnp.moveaxis(patches, out_spec[1], -1)
        # Patch features come as (in, *window in rhs_spec order); put them in W's axis order.
        feature_axes = [rhs_spec[1], *rhs_spec[2:]]
        sizes = [fv.w.shape[d] for d in feature_axes]
        rows = patches.reshape(-1, *sizes)
        order = sorted(range(len(feature_axes)), key=lambda i: feature_axes[i])
        rows = jnp.transpose(rows, [0, *(1 + i for i in order)]).reshape(rows.shape[0], -1)
        self.collected[fv.meta.path].append(rows[:, jnp.argsort(fv.index.reshape(-1))])

    def rule_conv(self, eqn, invals):
        x, fv = invals
        if isinstance(x, _Factored):
            raise _Unsupported("the kernel is not the conv's filter")
        p = eqn.params
        _, rhs_spec, out_spec = p["dimension_numbers"]
        if p["feature_group_count"] != 1 or p["batch_group_count"] != 1:
            raise _Unsupported("grouped convolutions are not factored")
        fan_out = [k for k, r in enumerate(fv.roles) if _CATEGORY[r] == "o"]
        if "s" in {_CATEGORY[r] for r in fv.roles} or fan_out != [rhs_spec[0]]:
            raise _Unsupported("the filter's output-feature axis is not its fan-out axis")
        (base,) = _bind_with_kernel(eqn, fv, [x, None], 1)
        if not fv.adapted:
            self.consumed(fv)
            if fv.index is not None:
                self.collect_patches(eqn, fv, x)
            return [base]
        a_filter = jnp.moveaxis(fv.a, -1, rhs_spec[0]).astype(fv.meta.dtype)
        x_in = self.branch_input(fv, x)
        (t,) = jc.bind_eqn(eqn, [x_in, a_filter])
        t = t * jnp.asarray(fv.meta.scale, t.dtype)
        branch = jnp.moveaxis(
            jnp.tensordot(t, fv.b.astype(fv.meta.dtype), axes=[[out_spec[1]], [0]],
                          precision=p.get("precision")),
            -1, out_spec[1],
        )
        factor = dropped = None
        if fv.m is not None:
            shape = [1] * base.ndim
            shape[out_spec[1]] = fv.m.shape[0]
            factor = fv.m.reshape(shape)
            if x_in is not x:
                (dropped,) = _bind_with_kernel(eqn, fv, [x_in, None], 1)
        self.consumed(fv)
        return [_combine(base, branch, factor, dropped)]

    def rule_gather(self, eqn, invals):
        fv, indices = invals
        if isinstance(indices, _Factored):
            raise _Unsupported("the kernel is used as indices")
        p = eqn.params
        dn = p["dimension_numbers"]
        roles = fv.roles
        fan_out = [k for k, r in enumerate(roles) if _CATEGORY[r] == "o"]
        if "s" in {_CATEGORY[r] for r in roles}:
            raise _Unsupported("gathers from stacked kernels are not factored")
        if len(fan_out) != 1:
            raise _Unsupported("embedding gathers need exactly one feature axis")
        (fo,) = fan_out
        untouched = (
            p["slice_sizes"][fo] == fv.w.shape[fo]
            and fo not in dn.start_index_map
            and fo not in dn.collapsed_slice_dims
            and fo not in getattr(dn, "operand_batching_dims", ())
        )
        if not untouched:
            raise _Unsupported("the gather indexes the kernel's feature axis")
        (base,) = _bind_with_kernel(eqn, fv, [None, indices], 0)
        if not fv.adapted:
            self.consumed(fv)
            return [base]
        a_table = jnp.moveaxis(fv.a, -1, fo).astype(fv.meta.dtype)
        sizes = list(p["slice_sizes"])
        sizes[fo] = a_table.shape[fo]
        (ag,) = jc.bind_eqn(eqn, [a_table, indices], slice_sizes=tuple(sizes))
        kept = [k for k in range(len(roles)) if k not in dn.collapsed_slice_dims
                and k not in getattr(dn, "operand_batching_dims", ())]
        out_axis = dn.offset_dims[kept.index(fo)]
        ag = ag * jnp.asarray(fv.meta.scale, ag.dtype)
        branch = jnp.moveaxis(
            jnp.tensordot(ag, fv.b.astype(fv.meta.dtype), axes=[[out_axis], [0]]), -1, out_axis
        )
        factor = None
        if fv.m is not None:
            shape = [1] * base.ndim
            shape[out_axis] = fv.m.shape[0]
            factor = fv.m.reshape(shape)
        self.consumed(fv)
        return [_combine(base, branch, factor, None)]

    # -- moves -----------------------------------------------------------------------

    def rule_convert(self, eqn, invals):
        (fv,) = invals
        new_dtype = eqn.params["new_dtype"]
        if not jnp.issubdtype(new_dtype, jnp.floating):
            raise _Unsupported(f"the kernel is cast to {np.dtype(new_dtype).name}")
        return [fv.replace(fv.w, dtype=new_dtype)]

    def rule_identity(self, eqn, invals):
        (fv,) = invals
        return [fv.replace(jc.bind_eqn(eqn, [fv.w])[0])]

    def rule_transpose(self, eqn, invals):
        (fv,) = invals
        (w,) = jc.bind_eqn(eqn, [fv.w])
        return [_move_transpose(fv, w, eqn.params["permutation"])]

    def rule_reshape(self, eqn, invals):
        fv, *dyn = invals
        if dyn or eqn.params.get("dimensions") is not None:
            raise _Unsupported("dynamic or transposing reshapes are not factored")
        new_shape = tuple(eqn.outvars[0].aval.shape)
        view = _move_reshape(fv, None, new_shape)  # checks before emitting anything
        return [view.replace(jc.bind_eqn(eqn, [fv.w])[0])]

    def rule_squeeze(self, eqn, invals):
        (fv,) = invals
        new_shape = tuple(eqn.outvars[0].aval.shape)
        view = _move_reshape(fv, None, new_shape)
        return [view.replace(jc.bind_eqn(eqn, [fv.w])[0])]

    def rule_broadcast(self, eqn, invals):
        fv, *dyn = invals
        if dyn:
            raise _Unsupported("dynamic shapes are not supported")
        shape, dims = eqn.params["shape"], eqn.params["broadcast_dimensions"]
        view = _move_broadcast(fv, None, shape, dims)
        return [view.replace(jc.bind_eqn(eqn, [fv.w])[0])]

    def rule_slice(self, eqn, invals):
        (fv,) = invals
        p = eqn.params
        (w,) = jc.bind_eqn(eqn, [fv.w])
        return [_move_slice(fv, w, p["start_indices"], p["limit_indices"], p["strides"])]

    def rule_dynamic_slice(self, eqn, invals):
        fv, *starts = invals
        if any(isinstance(s, _Factored) for s in starts) or len(starts) != len(fv.roles):
            raise _Unsupported("unexpected dynamic_slice operands")
        (w,) = jc.bind_eqn(eqn, [fv.w, *starts])
        return [_move_dynamic_slice(fv, w, starts, eqn.params["slice_sizes"])]

    def rule_rev(self, eqn, invals):
        (fv,) = invals
        (w,) = jc.bind_eqn(eqn, [fv.w])
        return [_move_rev(fv, w, eqn.params["dimensions"])]

    # -- sub-jaxprs ------------------------------------------------------------------

    def rule_custom_derivative(self, eqn, invals):
        # Its derivative rule is user code that expects the kernel as an array; inlining
        # the primal would silently drop that rule, so form the kernel instead.
        raise _Unsupported("a custom_jvp/custom_vjp function takes the kernel as an array")

    def rule_inline(self, eqn, invals):
        closed = eqn.params.get("jaxpr", eqn.params.get("call_jaxpr"))
        if isinstance(closed, jc.ClosedJaxpr):
            return self.eval_jaxpr(closed.jaxpr, closed.consts, invals)
        return self.eval_jaxpr(closed, [], invals)

    def rule_remat(self, eqn, invals):
        p = eqn.params
        jaxpr = p["jaxpr"]
        inner = _Interpreter(self.run)

        def body(*vals):
            outs = inner.eval_jaxpr(jaxpr, [], vals)
            reason = f"materialised: the kernel is returned from {_describe(eqn)}"
            return inner.materialise_all(outs, reason), inner.flush()

        outs, collected = jax.checkpoint(
            body, prevent_cse=p.get("prevent_cse", True), policy=p.get("policy")
        )(*invals)
        self.absorb(collected)
        return outs

    def rule_scan(self, eqn, invals):
        p = eqn.params
        nc, ncarry = p["num_consts"], p["num_carry"]
        consts, init, xs = invals[:nc], invals[nc : nc + ncarry], invals[nc + ncarry :]
        init = self.materialise_all(
            init, f"materialised: the kernel is a loop carry of {_describe(eqn)}"
        )
        xs_in, metas = [], []
        for x in xs:
            if isinstance(x, _Factored) and _CATEGORY[x.roles[0]] != "s":
                x = self.materialise(
                    x, f"materialised: {_describe(eqn)} scans over a non-stacked kernel axis"
                )
            if isinstance(x, _Factored):
                meta = dataclasses.replace(x.meta, roles=x.roles[1:])
                xs_in.append(x.tree_flatten()[0])
                metas.append(meta)
            else:
                xs_in.append(x)
                metas.append(None)
        closed = p["jaxpr"]
        inner = _Interpreter(self.run)

        def body(carry, x_slices):
            x_vals = [
                x if meta is None else _Factored(*x, meta=meta)
                for x, meta in zip(x_slices, metas, strict=True)
            ]
            outs = inner.eval_jaxpr(closed.jaxpr, closed.consts, [*consts, *carry, *x_vals])
            reason = f"materialised: the kernel is an output of {_describe(eqn)}"
            outs = inner.materialise_all(outs, reason)
            return outs[:ncarry], (outs[ncarry:], inner.flush())

        carry, (ys, collected) = jax.lax.scan(
            body, list(init), xs_in, length=p["length"], reverse=p["reverse"],
            unroll=p.get("unroll", 1),
        )
        self.absorb(collected)
        return [*carry, *ys]

    def rule_while(self, eqn, invals):
        p = eqn.params
        cn, bn = p["cond_nconsts"], p["body_nconsts"]
        cconsts, bconsts, init = invals[:cn], invals[cn : cn + bn], invals[cn + bn :]
        init = self.materialise_all(
            init, f"materialised: the kernel is a loop carry of {_describe(eqn)}"
        )
        cond_j, body_j = p["cond_jaxpr"], p["body_jaxpr"]
        inner = _Interpreter(self.run)
        reason = f"materialised: the kernel is an output of {_describe(eqn)}"

        def cond_fun(carry):
            return inner.eval_jaxpr(cond_j.jaxpr, cond_j.consts, [*cconsts, *carry])[0]

        def body_fun(carry):
            outs = inner.eval_jaxpr(body_j.jaxpr, body_j.consts, [*bconsts, *carry])
            return inner.materialise_all(outs, reason)

        return list(jax.lax.while_loop(cond_fun, body_fun, list(init)))

    def rule_cond(self, eqn, invals):
        index, *ops = invals
        inner = _Interpreter(self.run)
        reason = f"materialised: the kernel is an output of {_describe(eqn)}"

        def branch_fn(closed):
            def run(*vals):
                outs = inner.eval_jaxpr(closed.jaxpr, closed.consts, vals)
                return inner.materialise_all(outs, reason)

            return run

        return list(jax.lax.switch(index, [branch_fn(b) for b in eqn.params["branches"]], *ops))

    # -- collected inputs across sub-interpreters ------------------------------------

    def flush(self) -> dict:
        """This interpreter's collected inputs, one array per path (then forgotten)."""
        out = {k: jnp.concatenate(v, axis=-2) for k, v in self.collected.items()}
        self.collected.clear()
        return out

    def absorb(self, collected: dict) -> None:
        for k, v in collected.items():
            self.collected[k].append(v)


@functools.cache
def _rules() -> dict:
    I = _Interpreter  # noqa: E741, N806 - a table reads better with a short name
    rules = {
        jc.dot_general_p: I.rule_dot,
        jc.conv_general_dilated_p: I.rule_conv,
        jc.gather_p: I.rule_gather,
        jc.convert_element_type_p: I.rule_convert,
        jc.copy_p: I.rule_identity,
        jc.sharding_constraint_p: I.rule_identity,
        jc.transpose_p: I.rule_transpose,
        jc.reshape_p: I.rule_reshape,
        jc.squeeze_p: I.rule_squeeze,
        jc.broadcast_in_dim_p: I.rule_broadcast,
        jc.slice_p: I.rule_slice,
        jc.dynamic_slice_p: I.rule_dynamic_slice,
        jc.rev_p: I.rule_rev,
        jc.jit_p: I.rule_inline,
        jc.closed_call_p: I.rule_inline,
        jc.remat_p: I.rule_remat,
        jc.scan_p: I.rule_scan,
        jc.while_p: I.rule_while,
        jc.cond_p: I.rule_cond,
        jc.custom_jvp_call_p: I.rule_custom_derivative,
        jc.custom_vjp_call_p: I.rule_custom_derivative,
    }
    if jc.name_p is not None:
        rules[jc.name_p] = I.rule_identity
    return rules


# ---------------------------------------------------------------------------------------
# Tracing (cached per input signature) and the public transforms
# ---------------------------------------------------------------------------------------


def _is_array(x) -> bool:
    return isinstance(x, jax.Array | np.ndarray | np.generic) or jc.is_tracer(x)


@dataclasses.dataclass
class _Traced:
    """``fn`` traced at one input signature, and how its jaxpr inputs map to params."""

    closed: Any  # ClosedJaxpr of fn over the array leaves of (params, args, kwargs)
    out_tree: Any
    dynamic: list  # for each leaf of (params, args, kwargs): True if a jaxpr input
    param_paths: list  # for each jaxpr input: its path in params, or None (an argument)
    jitted: Any = None  # the interpretation under jax.jit, built on first use by `lora`
    # for each jaxpr input: (field, statics) if it is an array of a quantized kernel
    param_parts: list | None = None


def _param_leaf_info(params) -> list:
    """``(path, part)`` per leaf of ``params``; a quantized kernel's arrays all get the
    kernel's path and ``part = (field, statics)``, the others ``part = None``."""
    out = []
    flat = jax.tree_util.tree_flatten_with_path(params, is_leaf=quant_lib.is_quantized)[0]
    for kp, node in flat:
        path = paths_lib.keypath_to_str(kp)
        if quant_lib.is_quantized(node):
            out += [(path, (field, node.statics())) for field in node.fields()]
        else:
            out.append((path, None))
    return out


def _trace(fn, cache: collections.OrderedDict | None, params, args, kwargs):
    """``(traced, jaxpr input values)``; the trace is cached per input signature."""
    leaves, treedef = jax.tree_util.tree_flatten((params, args, kwargs))
    dynamic = [_is_array(x) for x in leaves]
    values = [x for x, d in zip(leaves, dynamic, strict=True) if d]
    avals = [jc.aval_of(x) for x in values]
    statics = tuple((i, x) for i, (x, d) in enumerate(zip(leaves, dynamic, strict=True)) if not d)
    key = (treedef, tuple(avals), statics)
    try:
        hash(key)
    except TypeError:  # an unhashable static argument: trace every call
        key = None
    if cache is not None and key is not None and key in cache:
        cache.move_to_end(key)
        return cache[key], values
    out_tree = []

    def flat_fn(*arrays):
        it = iter(arrays)
        full = [next(it) if d else x for x, d in zip(leaves, dynamic, strict=True)]
        p, a, kw = jax.tree_util.tree_unflatten(treedef, full)
        out_leaves, tree = jax.tree_util.tree_flatten(fn(p, *a, **kw))
        out_tree.append(tree)
        return out_leaves

    closed = jc.make_closed_jaxpr(flat_fn, avals)
    info = _param_leaf_info(params)
    param_paths = [info[i][0] if i < len(info) else None for i, d in enumerate(dynamic) if d]
    param_parts = [info[i][1] if i < len(info) else None for i, d in enumerate(dynamic) if d]
    traced = _Traced(closed, out_tree[0], dynamic, param_paths, param_parts=param_parts)
    # A jaxpr that closes over a tracer of an enclosing transformation is valid only there.
    if cache is not None and key is not None and not any(map(jc.is_tracer, closed.consts)):
        cache[key] = traced
        while len(cache) > _CACHE_SIZE:
            cache.popitem(last=False)
    return traced, values


def _entry(path: str, w, adapter: Adapter | None, layout: Layout, run: _Run):
    """The factored value a kernel enters the interpreter as."""
    ns = layout.num_stacked
    stacked = tuple(w.shape[:ns])
    if adapter is None:  # collect_inputs: no factors, just where each fan-in entry went
        fan_in = [w.shape[k] for k in layout.fan_in_axes]
        index = jnp.arange(math.prod(fan_in), dtype=jnp.int32).reshape(fan_in)
        index = jnp.broadcast_to(index, stacked + tuple(fan_in))
        meta = _Meta(path, layout.axes, w.dtype, 1.0)
        return _Factored(w, None, None, None, None, index, meta=meta)
    m = None
    if adapter.variant == "dora":
        if adapter.magnitude is None:
            raise ValueError(
                f"The DoRA adapter at path {path!r} has no magnitude: create it with "
                "jlora.init(..., LoraConfig(variant='dora')) so the magnitude is initialised."
            )
        from jlora import variants  # DoRA's norm lives with the other variant code

        norm = variants.dora_norm(_dense(w), adapter)
        m = adapter.magnitude.astype(jnp.float32) / jax.lax.stop_gradient(norm)
    keys = None
    # PEFT's Embedding LoRA has no dropout: its inputs are ids, not activations.
    rate = float(adapter.dropout) if layout.kind != "embed" else 0.0
    if run.rng is not None and rate > 0:
        run.rates[path] = rate
        keys = kernel_key(run.rng, path)
        if ns:
            keys = jax.random.split(keys, stacked)
    meta = _Meta(path, layout.axes, w.dtype, float(adapter.scale))
    return _Factored(w, adapter.a, adapter.b, m, keys, None, meta=meta)


def _quantized_entries(traced: _Traced, values, adapters, run: _Run, layouts) -> dict:
    """``{path: factored value}`` of each quantized kernel in params (W still quantized);
    its arrays enter the interpreter as parts of it. Kernels without adapters enter too,
    so that they are also dequantized only where they are consumed."""
    arrays, statics = collections.defaultdict(dict), {}
    for x, path, part in zip(values, traced.param_paths, traced.param_parts, strict=True):
        if part is not None:
            arrays[path][part[0]] = x
            statics[path] = part[1]
    out = {}
    for path, fields in arrays.items():
        qk = quant_lib.QuantizedKernel.from_fields(statics[path], fields)
        layout = adapters[path].layout if path in adapters else (layouts or {}).get(path)
        if layout is not None and layout.num_stacked != qk.num_stacked:
            raise ValueError(
                f"The quantized kernel at path {path!r} has {qk.num_stacked} stacked axes but "
                f"its layout {layout.axes!r} has {layout.num_stacked}: quantize it with "
                f"layout={layout.axes!r} so that every layer has its own scales."
            )
        if path in adapters:
            out[path] = _entry(path, qk, adapters[path], layout, run)
        elif layout is not None:
            out[path] = _entry(path, qk, None, layout, run)
        else:
            meta = _Meta(path, "s" * qk.num_stacked + qk.layout, qk.dtype, 1.0)
            out[path] = _Factored(qk, None, None, None, None, None, meta=meta)
    return out


def _interpret(traced: _Traced, values, consts, adapters, run: _Run, layouts=None):
    """Evaluate ``traced`` with the listed kernels factored: ``(outputs, interpreter)``.

    ``adapters`` maps paths to adapters; ``layouts`` (collect mode) maps paths to the
    layouts of kernels to watch without adapters.
    """
    interp = _Interpreter(run)
    quantized = _quantized_entries(traced, values, adapters, run, layouts)
    entered = []
    for x, path, part in zip(values, traced.param_paths, traced.param_parts, strict=True):
        if part is not None:
            fv = quantized[path]
            meta = dataclasses.replace(fv.meta, part=part)
            x = _Factored(x, fv.a, fv.b, fv.m, fv.keys, fv.index, meta=meta)
        elif path is not None and path in adapters:
            x = _entry(path, x, adapters[path], adapters[path].layout, run)
        elif path is not None and layouts and path in layouts:
            x = _entry(path, x, None, layouts[path], run)
        entered.append(x)
    outs = interp.eval_jaxpr(traced.closed.jaxpr, consts, entered)
    outs = interp.materialise_all(outs, "materialised: the kernel is returned by the function")
    return jax.tree_util.tree_unflatten(traced.out_tree, outs), interp


def _check_rng(rng):
    if rng is None:
        return None
    if not _is_array(rng):
        raise TypeError(f"`lora_rng` must be a JAX random key, got {type(rng).__name__}.")
    if jnp.issubdtype(rng.dtype, jax.dtypes.prng_key):
        if rng.shape != ():
            raise ValueError(f"`lora_rng` must be a single key (shape ()), got shape {rng.shape}.")
        return rng
    if rng.shape == (2,) and rng.dtype == jnp.uint32:  # a legacy jax.random.PRNGKey
        return jax.random.wrap_key_data(rng)
    raise TypeError(
        f"`lora_rng` must be a JAX random key (jax.random.key(...)), got an array of shape "
        f"{tuple(rng.shape)} and dtype {rng.dtype}."
    )


def _dropout_rng(adapters, rng, deterministic, default):
    """The key to drop adapter inputs with, or None (evaluation)."""
    if deterministic is None:
        deterministic = default
    if not (deterministic is None or isinstance(deterministic, bool)):
        raise TypeError(
            f"`lora_deterministic` must be True, False or None, got {deterministic!r}. It "
            "decides what is traced, so under jax.jit pass it as a static argument "
            "(jax.jit(g, static_argnames='lora_deterministic'))."
        )
    rng = _check_rng(rng)
    if deterministic is True:
        return None
    with_dropout = sorted(p for p, a in adapters.items() if a.dropout > 0)
    if deterministic is False and rng is None and with_dropout:
        raise ValueError(
            f"Training mode (`lora_deterministic=False`) needs a dropout key, but no "
            f"`lora_rng` was given and {len(with_dropout)} adapter(s) have dropout > 0 (e.g. "
            f"{with_dropout[0]!r}). Pass `lora_rng=jax.random.key(step)` (a fresh key each "
            "step), or `lora_deterministic=True` to evaluate without dropout."
        )
    return rng if with_dropout else None


def _check_fn(fn) -> None:
    if not callable(fn):
        raise TypeError(f"`fn` must be a callable fn(params, *args), got {type(fn).__name__}.")


def lora(fn: Callable, *, deterministic: bool | None = None, custom_vjp: bool = True,
         fuse_shared_inputs: bool = True) -> Callable:
    """Transform ``fn(params, *args, **kwargs)`` into ``g(params, adapters, *args, **kwargs)``.

    ``g`` returns ``fn(jlora.merge(params, adapters), *args, **kwargs)`` (and so do its
    gradients), computed with each adapted kernel kept factored: ``x·W + s·((x·A)·B)``.
    ``g`` composes with ``jax.jit``, ``grad``, ``vmap`` and ``checkpoint``; ``fn`` is traced
    once per input signature (array leaves' shapes and dtypes plus non-array leaves' values;
    non-array leaves such as Python bools stay static, as in a plain call of ``fn``).

    Dropout (adapters with ``dropout > 0``, PEFT's ``lora_dropout``): ``g`` takes the key
    as ``lora_rng=key`` and drops the input of each ``A·B`` branch only. Without a key it
    is the identity (evaluation). ``lora_deterministic=True`` forces evaluation, and
    ``lora_deterministic=False`` (or ``deterministic=False`` here, the per-call value
    wins) declares training: a missing ``lora_rng`` is then a ``ValueError`` instead of
    silently training without dropout.

    Args:
      fn: any JAX function whose first argument is a parameter pytree (a linen ``apply``,
        a function that calls ``nnx.merge(graphdef, state)``, plain JAX).
      deterministic: the default for ``lora_deterministic`` (see above).
      custom_vjp: compute each factored dot's backward pass by hand
        (``jlora/_factored_ops.py``: same values, laid out for XLA, keeps ``x·A`` instead
        of extra copies); faster train steps. ``False`` leaves the derivative to JAX,
        which forward-mode differentiation (``jax.jvp``, ``jax.jacfwd``) needs.
      fuse_shared_inputs: with ``custom_vjp``, adapted kernels dotted with the same input
        in the same way (query, key and value; gate and up) share one ``x·[A_q|A_k|A_v]``
        matmul forward and one ``xᵀ·[u_q|u_k|u_v]`` backward, reading ``x`` once (not for
        kernels with dropout or DoRA).

    Returns:
      ``g(params, adapters, *args, lora_rng=None, lora_deterministic=None, **kwargs)``.

    Example:
      >>> import jax, jax.numpy as jnp, jlora
      >>> params = {"w": jnp.ones((3, 2))}
      >>> ads = jlora.init(jax.random.key(0), params, jlora.LoraConfig(rank=1, targets="w"))
      >>> g = jlora.lora(lambda p, x: jnp.tanh(x @ p["w"]))
      >>> grads = jax.grad(lambda a: g(params, a, jnp.ones((4, 3))).sum())(ads)
      >>> grads["w"].a.shape
      (3, 1)
    """
    _check_fn(fn)
    if not (deterministic is None or isinstance(deterministic, bool)):
        raise TypeError(f"`deterministic` must be True, False or None, got {deterministic!r}.")
    cache: collections.OrderedDict = collections.OrderedDict()
    warned: set[str] = set()

    def interpret(traced, values, consts, adapters, rng):
        # Runs when jax.jit traces it: once per signature, so the warnings come once too.
        run = _Run(rng=rng, custom_vjp=custom_vjp,
                   fuse_shared_inputs=custom_vjp and fuse_shared_inputs)
        out, _ = _interpret(traced, values, consts, adapters, run)
        for path, status in run.report.items():
            if status != FACTORED and path not in warned:
                warned.add(path)
                warnings.warn(
                    f"jlora.lora: the adapted kernel at path {path!r} is {status}; W + s·A·B "
                    "is formed there (the result is still exact). jlora.lora_report(...) "
                    "lists every such path.",
                    FactoredFallbackWarning,
                    stacklevel=2,
                )
        return out

    @functools.wraps(fn)
    def transformed(params, adapters: Adapters, *args, lora_rng=None, lora_deterministic=None,
                    **kwargs):
        check_adapters_fit(params, adapters)
        rng = _dropout_rng(adapters, lora_rng, lora_deterministic, deterministic)
        traced, values = _trace(fn, cache, params, args, kwargs)
        if traced.jitted is None:
            # fn is a jaxpr now, so interpreting it under jit changes no semantics; it saves
            # compiling every primitive separately when called outside jit, and under an
            # outer jit it is inlined.
            traced.jitted = jax.jit(functools.partial(interpret, traced))
        return traced.jitted(values, list(traced.closed.consts), adapters, rng)

    # Keep fn's name and docstring but our own signature (jax.jit's static_argnames and
    # inspect read the signature through __wrapped__).
    del transformed.__wrapped__
    return transformed


def _abstract_call(body, params, args, kwargs):
    """Run ``body(params, args, kwargs)`` on shapes only, non-array leaves kept static."""
    leaves, treedef = jax.tree_util.tree_flatten((params, args, kwargs))
    dynamic = [_is_array(x) for x in leaves]

    def flat(*arrays):
        it = iter(arrays)
        full = [next(it) if d else x for x, d in zip(leaves, dynamic, strict=True)]
        return body(*jax.tree_util.tree_unflatten(treedef, full))

    return jax.eval_shape(flat, *[x for x, d in zip(leaves, dynamic, strict=True) if d])


def lora_report(fn: Callable, params, adapters: Adapters, *args, **kwargs) -> dict[str, str]:
    """Which adapted kernels ``jlora.lora(fn)`` keeps factored, and why the others are not.

    Traces ``fn`` on shapes only (nothing is computed). Each adapter path maps to
    ``"factored"`` (every use rewritten), ``"unused"`` (the kernel reaches no consumer) or
    a sentence starting ``"materialised: ..."`` naming the operation and source line where
    ``W + s·A·B`` had to be formed.

    Example:
      >>> import jax, jax.numpy as jnp, jlora
      >>> params = {"w": jnp.ones((3, 2)), "v": jnp.ones((3, 2))}
      >>> ads = jlora.init(jax.random.key(0), params, jlora.LoraConfig(rank=1, targets="w|v"))
      >>> rep = jlora.lora_report(lambda p, x: x @ p["w"] + (x @ (2 * p["v"])), params, ads,
      ...                         jnp.ones((4, 3)))
      >>> rep["w"], rep["v"].split(":")[0]
      ('factored', 'materialised')
    """
    _check_fn(fn)
    check_adapters_fit(params, adapters)
    run = _Run()

    def body(p, a, kw):
        traced, values = _trace(fn, None, p, a, kw)
        return _interpret(traced, values, traced.closed.consts, adapters, run)[0]

    _abstract_call(body, params, args, kwargs)
    return {path: run.report.get(path, UNUSED) for path in adapters}


def _layouts_for(params, paths) -> dict[str, Layout]:
    flat = paths_lib.select(params, ".*", allow_empty=True)
    if isinstance(paths, str):
        paths = [paths]
    items = paths.items() if isinstance(paths, Mapping) else ((p, None) for p in paths)
    out = {}
    for path, spec in items:
        if path not in flat:
            near = ", ".join(repr(p) for p in paths_lib.nearest_paths(path, flat, n=3))
            raise ValueError(
                f"collect_inputs: path {path!r} is not a leaf of `params`. Closest: {near}."
            )
        shape = tuple(flat[path].shape)
        if isinstance(spec, Adapter):
            spec = spec.layout
        elif isinstance(spec, Mapping):  # an entry of jlora.plan(...)
            spec = spec.get("layout")
        if spec is None:
            try:
                layout = resolve_layout(path, shape)
            except LayoutError as e:
                raise LayoutError(
                    f"collect_inputs: {e} For collect_inputs, pass `paths` as a mapping "
                    f"{{path: layout}}, e.g. {{{path!r}: 'iio'}}."
                ) from None
        else:
            layout = spec if isinstance(spec, Layout) else Layout(spec)
            layout.check_shape(shape, path)
        if layout.kind == "embed":
            raise ValueError(
                f"collect_inputs: the kernel at path {path!r} has layout {layout.axes!r}, an "
                "embedding table: its inputs are ids, not activations. List dense kernels."
            )
        out[path] = layout
    return out


def collect_inputs(fn: Callable, params, paths, *args, **kwargs) -> dict:
    """The input activations reaching each listed kernel, from one run of ``fn``.

    Runs ``fn(params, *args, **kwargs)`` once through the factored transform's interpreter
    (no adapters) and returns, per path, the rows ``x`` that were multiplied with the
    kernel, flattened over batch/sequence: ``(N, fan_in)`` with the fan-in axes in the
    kernel's own order (so ``x @ W.reshape(fan_in, -1)`` is what the model computed). A
    kernel consumed several times contributes all its inputs (concatenated along ``N``);
    a stacked kernel (``"s..."`` layouts, ``nn.scan``) gives ``(*stacked, N, fan_in)``, one
    set of inputs per layer; a conv filter gives its input patches, ``(N, window x in)``
    in the kernel's fan-in order (as PEFT flattens conv weights). This is what EVA and
    CorDA need for their input statistics.

    Args:
      fn: the model function, as for :func:`lora` (``fn(params, *args, **kwargs)``).
      params: its parameters.
      paths: kernel paths, or a mapping ``{path: layout}`` where a layout is a string,
        a :class:`~jlora.layouts.Layout`, an :class:`~jlora.Adapter` or a
        :func:`jlora.plan` entry (needed for stacked kernels, whose layout is not inferred).
      *args, **kwargs: the inputs of ``fn``.

    Returns:
      ``{path: array}`` as above. A listed kernel that no dot over its fan-in or conv
      reaches (e.g. used only inside a ``while`` loop or a ``cond``) is a ``ValueError``.

    Example:
      >>> import jax.numpy as jnp, jlora
      >>> params = {"w": jnp.ones((3, 2))}
      >>> xs = jlora.collect_inputs(lambda p, x: x @ p["w"], params, ["w"], jnp.ones((4, 5, 3)))
      >>> xs["w"].shape
      (20, 3)
    """
    _check_fn(fn)
    layouts = _layouts_for(params, paths)
    traced, values = _trace(fn, None, params, args, kwargs)

    @jax.jit
    def run_once(values, consts):
        _, interp = _interpret(traced, values, consts, {}, _Run(), layouts)
        return interp.flush()

    collected = run_once(values, list(traced.closed.consts))
    missing = [p for p in layouts if p not in collected]
    if missing:
        raise ValueError(
            f"collect_inputs: no input reached the kernel(s) at {missing} through a dot over "
            "their fan-in (kernels used only inside while loops or conds, in grouped "
            "convolutions, or not at all, cannot be collected)."
        )
    return collected
