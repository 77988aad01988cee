"""Moves: operations that change the view of a kernel, done on W and on every carried array.

A transpose, reshape (keeping fan-in and fan-out groups apart), broadcast along new
stacked axes, slice, dynamic slice or reversal of W is the same operation on each
category block of the carried arrays (see ``factored.py``); a cast changes only the
dtype the program sees. The ``move_*`` functions compute the new view (and raise
:class:`Unsupported` before anything is emitted when the move would mix categories); the
rules below bind the equation on W and return the new factored value.

Example:
  >>> import jax.numpy as jnp
  >>> from jlora._transform.factored import Factored, Meta
  >>> fv = Factored(jnp.zeros((4, 6)), jnp.zeros((4, 2)), jnp.zeros((2, 6)), None, None,
  ...               None, meta=Meta("w", "io", jnp.float32, 1.0))
  >>> view = move_reshape(fv, None, (4, 2, 3))
  >>> view.roles, view.b.shape
  ('ioo', (2, 2, 3))
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jlora import _jax_compat as jc
from jlora._layout_inference import reshape_groups
from jlora._transform.factored import (
    CATEGORY,
    FIELDS,
    Factored,
    Unsupported,
    positions,
    rank_position,
)
from jlora._transform.interpreter import register


def move_transpose(fv: Factored, w, perm: Sequence[int]) -> Factored:
    new_roles = "".join(fv.roles[p] for p in perm)
    carried = {}
    for field, arr in fv.carried().items():
        old, new = positions(fv.roles, field), positions(new_roles, field)
        arr_perm = list(range(arr.ndim))
        for k_new, k_old in enumerate(perm):
            to, at = new[k_new], old[k_old]
            if to is not None and at is not None:  # both or neither: the same field's axes
                arr_perm[to] = at
        carried[field] = jnp.transpose(arr, arr_perm)
    return fv.replace(w, roles=new_roles, **carried)


def _reshape_roles(roles: str, old: Sequence[int], new: Sequence[int]) -> str:
    """The roles after reshaping ``old`` to ``new``: only groups of one category merge."""
    if 0 in old or 0 in new:
        raise Unsupported("the kernel view has a zero-sized axis")
    groups = reshape_groups(old, new)
    if groups is None:
        raise Unsupported("the reshape does not split the kernel's axes into groups")
    new_roles = [""] * len(new)
    for gi, gj in groups:
        letters = {roles[i] for i in gi if old[i] != 1} or {roles[i] for i in gi}
        cats = {CATEGORY[r] for r in letters}
        if not gj:  # a size-1 axis dropped
            continue
        if not gi:  # a new size-1 axis: a stacked axis of one layer
            new_roles[gj[0]] = "s"
            continue
        if len(cats) != 1:
            raise Unsupported(
                "the reshape mixes stacked, fan-in and fan-out axes of the kernel "
                f"(roles {roles!r}, shape {tuple(old)} -> {tuple(new)})"
            )
        letter = letters.pop() if len(letters) == 1 else {"s": "s", "i": "i", "o": "o"}[cats.pop()]
        for j in gj:
            new_roles[j] = letter
    out = "".join(new_roles)
    for c, what in (("i", "fan-in"), ("o", "fan-out")):
        if not any(CATEGORY[r] == c for r in out):
            raise Unsupported(f"the reshape removes every {what} axis of the kernel")
    return out


def move_reshape(fv: Factored, w, new_shape: Sequence[int]) -> Factored:
    old_shape = tuple(fv.w.shape)
    new_roles = _reshape_roles(fv.roles, old_shape, new_shape)
    carried = {}
    for field, arr in fv.carried().items():
        shape = []
        for c in FIELDS[field]:
            if c == "r":
                shape.append(arr.shape[rank_position(fv.roles, field)])
            else:
                shape += [n for n, r in zip(new_shape, new_roles, strict=True) if CATEGORY[r] == c]
        carried[field] = jnp.reshape(arr, shape)
    return fv.replace(w, roles=new_roles, **carried)


def move_broadcast(fv: Factored, w, shape: Sequence[int], dims: Sequence[int]) -> Factored:
    expanded = [1] * len(shape)
    for d, n in zip(dims, fv.w.shape, strict=True):
        expanded[d] = n
    view = move_reshape(fv, None, expanded)
    for k, (have, want) in enumerate(zip(expanded, shape, strict=True)):
        if have != want and CATEGORY[view.roles[k]] != "s":
            raise Unsupported("the kernel is broadcast along one of its fan-in/fan-out axes")
    carried = {}
    for field, arr in view.carried().items():
        pos = positions(view.roles, field)
        target = list(arr.shape)
        for k, p in enumerate(pos):
            if p is not None:
                target[p] = shape[k]
        carried[field] = jnp.broadcast_to(arr, target)
    return view.replace(w, **carried)


def move_slice(fv: Factored, w, start, limit, strides) -> Factored:
    strides = strides or (1,) * len(start)
    carried = {}
    for field, arr in fv.carried().items():
        s, lim, st = [0] * arr.ndim, list(arr.shape), [1] * arr.ndim
        for k, p in enumerate(positions(fv.roles, field)):
            if p is not None:
                s[p], lim[p], st[p] = start[k], limit[k], strides[k]
        carried[field] = jax.lax.slice(arr, s, lim, st)
    return fv.replace(w, **carried)


def move_dynamic_slice(fv: Factored, w, starts, sizes) -> Factored:
    carried = {}
    for field, arr in fv.carried().items():
        st = [jnp.zeros((), jnp.asarray(starts[0]).dtype)] * arr.ndim
        sz = list(arr.shape)
        for k, p in enumerate(positions(fv.roles, field)):
            if p is not None:
                st[p], sz[p] = starts[k], sizes[k]
        carried[field] = jax.lax.dynamic_slice(arr, st, sz)
    return fv.replace(w, **carried)


def move_rev(fv: Factored, w, dims) -> Factored:
    carried = {}
    for field, arr in fv.carried().items():
        pos = positions(fv.roles, field)
        axes = tuple(pos[k] for k in dims if pos[k] is not None)
        carried[field] = jax.lax.rev(arr, axes) if axes else arr
    return fv.replace(w, **carried)


# --- rules ------------------------------------------------------------------------------


@register(jc.convert_element_type_p, kind="recast")
def rule_convert(interp, eqn, invals):
    (fv,) = invals
    new_dtype = eqn.params["new_dtype"]
    if not jnp.issubdtype(new_dtype, jnp.floating):
        raise Unsupported(f"the kernel is cast to {np.dtype(new_dtype).name}")
    return [fv.replace(fv.w, dtype=new_dtype)]


@register(jc.copy_p, jc.sharding_constraint_p, jc.name_p, kind="identity")
def rule_identity(interp, eqn, invals):
    (fv,) = invals
    return [fv.replace(jc.bind_eqn(eqn, [fv.w])[0])]


@register(jc.transpose_p, kind="array")
def rule_transpose(interp, eqn, invals):
    (fv,) = invals
    (w,) = jc.bind_eqn(eqn, [fv.w])
    return [move_transpose(fv, w, eqn.params["permutation"])]


@register(jc.reshape_p, kind="array")
def rule_reshape(interp, eqn, invals):
    fv, *dyn = invals
    if dyn or eqn.params.get("dimensions") is not None:
        raise Unsupported("dynamic or transposing reshapes are not factored")
    new_shape = tuple(eqn.outvars[0].aval.shape)
    view = move_reshape(fv, None, new_shape)  # checks before emitting anything
    return [view.replace(jc.bind_eqn(eqn, [fv.w])[0])]


@register(jc.squeeze_p, kind="array")
def rule_squeeze(interp, eqn, invals):
    (fv,) = invals
    new_shape = tuple(eqn.outvars[0].aval.shape)
    view = move_reshape(fv, None, new_shape)
    return [view.replace(jc.bind_eqn(eqn, [fv.w])[0])]


@register(jc.broadcast_in_dim_p, kind="array")
def rule_broadcast(interp, eqn, invals):
    fv, *dyn = invals
    if dyn:
        raise Unsupported("dynamic shapes are not supported")
    shape, dims = eqn.params["shape"], eqn.params["broadcast_dimensions"]
    view = move_broadcast(fv, None, shape, dims)
    return [view.replace(jc.bind_eqn(eqn, [fv.w])[0])]


@register(jc.slice_p, kind="array")
def rule_slice(interp, eqn, invals):
    (fv,) = invals
    p = eqn.params
    (w,) = jc.bind_eqn(eqn, [fv.w])
    return [move_slice(fv, w, p["start_indices"], p["limit_indices"], p["strides"])]


@register(jc.dynamic_slice_p, kind="array")
def rule_dynamic_slice(interp, eqn, invals):
    fv, *starts = invals
    if any(isinstance(s, Factored) for s in starts) or len(starts) != len(fv.roles):
        raise Unsupported("unexpected dynamic_slice operands")
    (w,) = jc.bind_eqn(eqn, [fv.w, *starts])
    return [move_dynamic_slice(fv, w, starts, eqn.params["slice_sizes"])]


@register(jc.rev_p, kind="array")
def rule_rev(interp, eqn, invals):
    (fv,) = invals
    (w,) = jc.bind_eqn(eqn, [fv.w])
    return [move_rev(fv, w, eqn.params["dimensions"])]
