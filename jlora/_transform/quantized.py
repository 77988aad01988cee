"""Quantized kernels (``jlora.quantization``): dequantized only where they are consumed.

A quantized kernel in ``params`` enters the interpreter as a :class:`Lazy` factored
value whose W is the :class:`~jlora.quantization.QuantizedKernel` itself (a *lazy* W).
``fn`` was traced on the float kernel's shape and dtype (``jlora/_tracing.py``), so the model's
own code reads the kernel as the array it expects. A model that needs the
``QuantizedKernel`` object itself (a linen module declaring a quantized param) is traced
on the kernel's arrays instead: they enter as :class:`Part` s, which ``carry`` rules
(``jit``, ``scan``, ``checkpoint``, ``cond``, ``while``) take as they are, and the
model's :func:`jlora.quantization.dequantize` (a primitive of its own, ``dequantize_p``:
:func:`rule_dequantize`) assembles them into the same lazy value. Then, by the kind of
the rule an equation reaches (see ``interpreter.KINDS``), :func:`quantized_operands`:

* keeps a lazy W for ``consumer`` rules (dequantized inside ``jax.checkpoint`` by
  ``bind_with_kernel``), ``recast`` (a cast) and ``identity`` rules, and through a
  ``stop_gradient`` of a kernel without adapters (its arrays have no gradient to stop);
* moves the quantized arrays (of a part, or of a lazy W) with the kernel for a slice,
  dynamic slice or squeeze of stacked axes only (a layer out of a stack) and for a
  transpose that moves only stacked axes (``nn.scan`` over a layer axis that is not
  the first), wherever the stacked axes are (:data:`STACKED_MOVES`): every array of a
  quantized kernel has the kernel's axes, the stacked ones at the kernel's positions,
  so the same move applies to each, and only one layer is ever dequantized;
* records any other move of a lazy W (a transpose of its fan-in and fan-out as
  ``FlaxConv1D`` and tied embeddings do, a reshape, a slice, ...) as a :class:`View`,
  replayed on the float kernel where a consumer dequantizes it (:data:`VIEWS`);
* gives every other rule the float kernel, dequantized whole there (reported, as a
  fallback of an adapted kernel is), and a part reaching anything but a ``carry`` rule
  its raw array (an error for an adapted kernel: the adapter could not be applied).
"""

from __future__ import annotations

import collections
import dataclasses
import functools

import jax
import jax.numpy as jnp

from jlora import _jax_compat as jc
from jlora import quantization as quant_lib
from jlora._transform import moves
from jlora._transform.entry import enter_kernel
from jlora._transform.factored import Factored, Meta, Unsupported, positions
from jlora._transform.interpreter import describe, operand_hook, register


@jax.tree_util.register_pytree_node_class
class Lazy(Factored):
    """A kernel whose W is a quantized kernel, or a :class:`View` of one, until consumed."""

    def materialise(self, run, reason: str):
        """The kernel as an array (``W + s·A·B`` for an adapted one); a lazy W is dequantized
        whole here, which is reported for a kernel without adapters too."""
        if self.lazy and not self.adapted:
            run.mark(self.meta.path, reason)
        return super().materialise(run, reason)


@jax.tree_util.register_pytree_node_class
class View:
    """A move (transpose, reshape, slice, ...) of a lazy kernel, still to be done.

    It holds the kernel it moves (``base``: a quantized kernel or another view), the
    program's equation and that equation's other operands (e.g. a dynamic slice's
    starts); :meth:`dequantized` replays the equation on the float kernel, so a consumer
    (``bind_with_kernel``) dequantizes and moves it inside its ``jax.checkpoint``.

    Example:
      >>> import jax.numpy as jnp
      >>> from jlora import quantization as Q
      >>> qk = Q.quantize(jnp.arange(6.0).reshape(2, 3), "int8")
      >>> eqn = jc.make_closed_jaxpr(lambda w: [w.T], [jc.aval_of(jnp.ones((2, 3)))]).jaxpr.eqns[0]
      >>> view = View(qk, eqn, ())
      >>> view.shape, bool(jnp.allclose(view.dequantized(), qk.dequantized().T))
      ((3, 2), True)
    """

    def __init__(self, base, eqn, operands):
        self.base, self.eqn, self.operands = base, eqn, tuple(operands)

    def tree_flatten(self):
        return (self.base, self.operands), self.eqn  # an equation hashes by identity

    @classmethod
    def tree_unflatten(cls, eqn, children):
        return cls(children[0], eqn, children[1])

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.eqn.outvars[0].aval.shape)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def dtype(self):
        return self.base.dtype  # moves keep the dtype; the program's is the value's meta

    def dequantized(self) -> jax.Array:
        """The float kernel, moved."""
        return jc.bind_eqn(self.eqn, [self.base.dequantized(), *self.operands])[0]


@dataclasses.dataclass(frozen=True)
class PartMeta(Meta):
    field: str = ""  # which array of the QuantizedKernel ("values", "scales", ...)
    layer_shape: tuple = ()  # QuantizedKernel.layer_shape: one layer of the kernel


@jax.tree_util.register_pytree_node_class
class Part(Factored):
    """One array of a quantized kernel (W), with the kernel's factors and roles.

    The array has the kernel's number of axes, its stacked axes where ``roles`` has them.
    """

    meta: PartMeta

    @classmethod
    def of(cls, kernel: Factored, array, part: tuple) -> Part:
        field, _ = part  # (field, statics); the kernel's W is the QuantizedKernel itself
        known = {f.name: getattr(kernel.meta, f.name) for f in dataclasses.fields(Meta)}
        meta = PartMeta(**known, field=field, layer_shape=kernel.w.layer_shape)
        return cls(array, kernel.a, kernel.b, kernel.m, kernel.keys, kernel.index, meta=meta)

    def materialise(self, run, reason: str):
        """The raw array, where the program uses it as such (never for an adapted kernel)."""
        if self.adapted:
            where = reason.removeprefix("materialised: ")
            raise ValueError(
                f"jlora.lora: the adapted quantized kernel at path {self.meta.path!r} is used "
                f"as its raw `{self.meta.field}` array ({where}), so the adapter cannot be "
                "applied. Read quantized kernels only through "
                "jlora.quantization.dequantize(kernel) and use the float kernel it returns."
            )
        return self.w


def _quantized(x) -> bool:
    return isinstance(x, Part) or (isinstance(x, Factored) and x.lazy)


def _stacked_positions(roles: str) -> tuple[int, ...]:
    return tuple(k for k, r in enumerate(roles) if r == "s")


def _restacked(qk: quant_lib.QuantizedKernel, roles: str) -> quant_lib.QuantizedKernel:
    """``qk`` with its stacked axes where ``roles`` has them (its arrays already are)."""
    return dataclasses.replace(qk, stacked_axes=_stacked_positions(roles))


def _lazy(w, a, b, m, keys, index, meta: Meta) -> Lazy:
    return Lazy(w, a, b, m, keys, index, meta=meta)


@register(quant_lib.dequantize_p, kind="carry")
def rule_dequantize(interp, eqn, invals):
    """The model's ``dequantize(kernel)``: one factored value whose W stays quantized."""
    first = invals[0]
    if not all(isinstance(x, Part) and x.meta.path == first.meta.path
               and x.roles == first.roles for x in invals):
        reason = f"its arrays reach {describe(eqn)} mixed with other arrays"
        return jc.bind_eqn(eqn, interp.materialise_all(invals, reason))
    # The program's own statics describe these arrays (the parts went through the same
    # moves as the program's arrays); the parts' roles must agree on the stacked axes.
    qk = quant_lib.QuantizedKernel.from_fields(
        eqn.params["statics"], dict(zip(eqn.params["fields"], (x.w for x in invals), strict=True))
    )
    if qk.kernel_layout.stacked_axes != _stacked_positions(first.roles):
        reason = (f"its arrays reach {describe(eqn)} with stacked axes at "
                  f"{qk.kernel_layout.stacked_axes}, not where the kernel has them "
                  f"({first.roles!r})")
        return jc.bind_eqn(eqn, interp.materialise_all(invals, reason))
    # Everything the parts knew of the kernel (path, scale, variant, ...), less the part.
    known = {f.name: getattr(first.meta, f.name) for f in dataclasses.fields(Meta)}
    meta = Meta(**{**known, "roles": first.roles, "dtype": eqn.outvars[0].aval.dtype})
    w = _restacked(qk, first.roles)
    return [_lazy(w, first.a, first.b, first.m, first.keys, first.index, meta)]


def _settled(interp, x, eqn):
    """``x`` as an array-reading rule needs it: a part's raw array, or the kernel with its
    lazy W dequantized whole (reported: a float copy of the kernel is formed here)."""
    if isinstance(x, Part):
        return x.materialise(interp.run, f"it reaches {describe(eqn)}")
    if not x.adapted:  # an adapted kernel is reported by the fallback that follows
        interp.run.mark(x.meta.path, f"materialised: the kernel reaches {describe(eqn)}")
    return x.replace(x.w.dequantized())


@operand_hook
def quantized_operands(interp, eqn, rule, invals):
    """Quantized operands of ``eqn`` kept, moved or settled as the rule's kind needs."""
    if not any(map(_quantized, invals)):
        return None, invals
    kind = "array" if rule is None else rule.kind
    if eqn.primitive is jc.scan_p:
        return None, _scanned_views_settled(interp, eqn, invals)
    if kind == "carry":
        return None, invals
    fv, *rest = invals
    if _quantized(fv) and not any(isinstance(x, Factored) for x in rest):
        out = _moved(eqn, fv, rest)
        if out is not None:
            return [out], invals
    if isinstance(fv, Factored) and fv.lazy and (
            kind == "identity" or (eqn.primitive is jc.stop_gradient_p and not fv.adapted)):
        return [fv], invals  # (a frozen kernel's quantized arrays have no gradient to stop)
    keep = ("consumer", "recast")
    return None, [_settled(interp, x, eqn)
                  if _quantized(x) and (isinstance(x, Part) or kind not in keep) else x
                  for x in invals]


def _scanned_views_settled(interp, eqn, invals) -> list:
    """A scan slices the arrays of what it scans over along their first axis: right for a
    quantized kernel's arrays, not for a :class:`View`'s (its base is not moved yet)."""
    first = eqn.params["num_consts"] + eqn.params["num_carry"]
    return [_settled(interp, x, eqn) if k >= first and isinstance(x, Factored)
            and isinstance(x.w, View) else x for k, x in enumerate(invals)]


def _moved(eqn, fv: Factored, rest: list) -> Factored | None:
    """``fv`` after the move ``eqn``: its quantized arrays moved too (a move of stacked
    axes only), or the move kept as a :class:`View` of a lazy W; None if neither."""
    stacked_move = STACKED_MOVES.get(eqn.primitive)
    if stacked_move is not None and (isinstance(fv, Part) or quant_lib.is_quantized(fv.w)):
        out = _stacked_move(stacked_move, eqn, fv, rest)
        if out is not None:
            return out
    view = VIEWS.get(eqn.primitive)
    if view is None or isinstance(fv, Part):
        return None
    try:
        return view(fv, View(fv.w, eqn, rest), eqn, rest)
    except Unsupported:  # the move mixes the kernel's groups: it needs the float kernel
        return None


# Moves of stacked axes only, done on the quantized arrays (wherever the current view has
# its stacked axes): move(eqn, rest, stacked, operand, kernel, shim) -> (array move, view
# of the kernel), or None where the move touches more than the stacked axes. ``stacked``:
# the stacked positions; ``operand``: the shape the equation sees (the kernel view, or a
# part's own array); ``kernel``: the kernel view's shape; ``shim``: the factored value with
# a W of that shape, for the moves of ``moves.py``.
STACKED_MOVES: dict = {}


def _stacked(*primitives):
    def decorate(fn):
        for p in primitives:
            STACKED_MOVES[p] = fn
        return fn

    return decorate


def _kernel_shape(fv: Factored, stacked: tuple[int, ...]) -> tuple[int, ...]:
    """The shape of the kernel view ``fv`` holds (a part's array only has its stacked axes;
    its layer shape comes from the kernel's, in order since only stacked axes ever move)."""
    if not isinstance(fv, Part):
        return tuple(fv.w.shape)
    layer = iter(fv.meta.layer_shape)
    return tuple(fv.w.shape[k] if k in stacked else next(layer) for k in range(len(fv.roles)))


def _stacked_move(move, eqn, fv: Factored, rest: list) -> Factored | None:
    stacked = _stacked_positions(fv.roles)
    operand = tuple(eqn.invars[0].aval.shape)
    kernel = _kernel_shape(fv, stacked)
    shim = fv.replace(jax.ShapeDtypeStruct(kernel, fv.meta.dtype))
    try:
        found = move(eqn, rest, stacked, operand, kernel, shim)
        if found is None:
            return None
        array_move, view = found
        out = view(w=jax.tree.map(array_move, fv.w))
    except Unsupported:
        return None
    return out.replace(_restacked(out.w, out.roles)) if out.lazy else out

def _full_except(stacked, values, fill):
    """``values`` on the stacked axes, ``fill(k)`` on every other axis ``k``."""
    return [values[k] if k in stacked else fill(k) for k in range(len(values))]


def _squeezed(fv: Factored, w, dims) -> Factored:
    """The view without the stacked axes ``dims`` (of size 1)."""
    carried = {field: jax.lax.squeeze(arr, [positions(fv.roles, field)[d] for d in dims])
               for field, arr in fv.carried().items()}
    roles = "".join(r for k, r in enumerate(fv.roles) if k not in dims)
    return fv.replace(w, roles=roles, **carried)


@_stacked(jc.squeeze_p)
def _squeeze(eqn, rest, stacked, operand, kernel, shim):
    dims = tuple(d % len(operand) for d in eqn.params["dimensions"])
    if not set(dims) <= set(stacked):
        return None
    return (lambda arr: jax.lax.squeeze(arr, dims)), functools.partial(_squeezed, shim,
                                                                        dims=dims)


@_stacked(jc.slice_p)
def _slice(eqn, rest, stacked, operand, kernel, shim):
    p = eqn.params
    start, limit = p["start_indices"], p["limit_indices"]
    strides = p["strides"] or (1,) * len(start)
    if any((start[k], limit[k], strides[k]) != (0, operand[k], 1)
           for k in range(len(operand)) if k not in stacked):
        return None
    zeros, ones = (lambda k: 0), (lambda k: 1)

    def array_move(arr):
        return jax.lax.slice(arr, _full_except(stacked, start, zeros),
                             _full_except(stacked, limit, lambda k: arr.shape[k]),
                             _full_except(stacked, strides, ones))

    return array_move, functools.partial(
        moves.move_slice, shim, start=_full_except(stacked, start, zeros),
        limit=_full_except(stacked, limit, kernel.__getitem__),
        strides=_full_except(stacked, strides, ones),
    )


@_stacked(jc.dynamic_slice_p)
def _dynamic_slice(eqn, rest, stacked, operand, kernel, shim):
    sizes = eqn.params["slice_sizes"]
    if len(rest) != len(operand) or any(sizes[k] != operand[k] for k in range(len(operand))
                                        if k not in stacked):
        return None
    zero = jnp.zeros((), jnp.asarray(rest[0]).dtype)
    starts = _full_except(stacked, rest, lambda k: zero)

    def array_move(arr):
        return jax.lax.dynamic_slice(arr, starts,
                                     _full_except(stacked, sizes, lambda k: arr.shape[k]))

    return array_move, functools.partial(
        moves.move_dynamic_slice, shim, starts=starts,
        sizes=_full_except(stacked, sizes, kernel.__getitem__),
    )


@_stacked(jc.transpose_p)
def _transpose(eqn, rest, stacked, operand, kernel, shim):
    perm = tuple(eqn.params["permutation"])
    kept = [k for k in perm if k not in stacked]
    if kept != sorted(kept):  # the layer's own axes keep their order, or it is no move
        return None
    return (lambda arr: jnp.transpose(arr, perm)), functools.partial(
        moves.move_transpose, shim, perm=perm)


# Any other move of a lazy W, kept as a View: view(fv, w, eqn, rest) -> the value after the
# move with W = w (the View), its carried arrays moved by ``moves.py`` as for a float W.
def _out_shape(eqn) -> tuple[int, ...]:
    return tuple(eqn.outvars[0].aval.shape)


def _view_reshape(fv, w, eqn, rest):
    if rest or eqn.params.get("dimensions") is not None:
        raise Unsupported("dynamic or transposing reshapes are not factored")
    return moves.move_reshape(fv, w, _out_shape(eqn))


def _view_broadcast(fv, w, eqn, rest):
    if rest:
        raise Unsupported("dynamic shapes are not supported")
    p = eqn.params
    return moves.move_broadcast(fv, w, p["shape"], p["broadcast_dimensions"])


def _view_slice(fv, w, eqn, rest):
    p = eqn.params
    return moves.move_slice(fv, w, p["start_indices"], p["limit_indices"], p["strides"])


def _view_dynamic_slice(fv, w, eqn, rest):
    if len(rest) != len(fv.roles):
        raise Unsupported("unexpected dynamic_slice operands")
    return moves.move_dynamic_slice(fv, w, rest, eqn.params["slice_sizes"])


VIEWS = {
    jc.transpose_p: lambda fv, w, eqn, rest: moves.move_transpose(fv, w,
                                                                  eqn.params["permutation"]),
    jc.reshape_p: _view_reshape,
    jc.squeeze_p: lambda fv, w, eqn, rest: moves.move_reshape(fv, w, _out_shape(eqn)),
    jc.broadcast_in_dim_p: _view_broadcast,
    jc.slice_p: _view_slice,
    jc.dynamic_slice_p: _view_dynamic_slice,
    jc.rev_p: lambda fv, w, eqn, rest: moves.move_rev(fv, w, eqn.params["dimensions"]),
}


def stored_kernels(traced, values) -> dict[str, quant_lib.QuantizedKernel]:
    """``{path: quantized kernel}`` of the jaxpr's inputs: whole (traced as their float
    kernels) or rebuilt from their arrays (traced as parts)."""
    arrays, statics, out = collections.defaultdict(dict), {}, {}
    for x, path, part in zip(values, traced.param_paths, traced.param_parts, strict=True):
        if part is not None:
            arrays[path][part[0]] = x
            statics[path] = part[1]
        elif path is not None and quant_lib.is_quantized(x):
            out[path] = x
    for path, fields in arrays.items():
        out[path] = quant_lib.QuantizedKernel.from_fields(statics[path], fields)
    return out


def enter_kernels(traced, values, adapters, run, layouts) -> dict[str, Factored]:
    """``{path: factored value}`` of each quantized kernel in params (W still quantized);
    traced as parts, its arrays then enter as :class:`Part` s of it (``Part.of``). Kernels
    without adapters enter too, so that they are also dequantized only where consumed."""
    out = {}
    for path, qk in stored_kernels(traced, values).items():
        stored = qk.kernel_layout
        layout = adapters[path].layout if path in adapters else (layouts or {}).get(path)
        if layout is not None and layout.stacked_axes != stored.stacked_axes:
            raise ValueError(
                f"The quantized kernel at path {path!r} was quantized with layout "
                f"{stored.axes!r} (stacked axes at {stored.stacked_axes}) but its layout "
                f"here is {layout.axes!r} (stacked axes at {layout.stacked_axes}): quantize "
                f"it with layout={layout.axes!r} so that every layer has its own scales, or "
                f"give its adapter the layout the kernel was quantized with."
            )
        if layout is not None:
            fv = enter_kernel(path, qk, adapters.get(path), layout, run)
        else:
            fv = Factored(qk, None, None, None, None, None,
                          meta=Meta(path, stored.axes, qk.dtype, 1.0))
        # (An extension's own kind of value, as a grouped bank's, stays what it is.)
        out[path] = _lazy(*fv.tree_flatten()[0], meta=fv.meta) if type(fv) is Factored else fv
    return out
