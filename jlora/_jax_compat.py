"""Every use of JAX internals (jaxprs, primitives, tracers) in one place, with version shims.

The factored transform reads jaxprs and re-binds their equations. The names it needs
live in ``jax.extend`` (the supported surface for this) or, in older releases, only in
private modules. Such a name is looked up in ``jax.extend`` first and in its private home
only when the public one is missing, so a current JAX never touches ``jax._src``, and a
JAX upgrade touches this file alone: the interpreter itself never imports ``jax._src``.

Tested with jax 0.8.2 (the lowest supported release) and 0.10.2.

Example:
  >>> import jax.numpy as jnp
  >>> from jlora import _jax_compat as jc
  >>> closed = jc.make_closed_jaxpr(lambda x: [x * 2], [jc.aval_of(jnp.ones(3))])
  >>> [eqn.primitive.name for eqn in closed.jaxpr.eqns]
  ['mul']
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
from collections.abc import Sequence
from typing import Any

import jax
from jax import core as jax_core
from jax.extend import core as jex_core
from jax.extend import source_info_util
from jax.extend.core import primitives as prims

__all__ = [
    "ClosedJaxpr",
    "DropVar",
    "Jaxpr",
    "Literal",
    "Var",
    "aval_of",
    "bind_eqn",
    "eqn_context",
    "explicit_sharding",
    "is_tracer",
    "make_closed_jaxpr",
    "ragged_dims",
    "ragged_dot",
    "source_summary",
]


def _public_or_private(public, name: str, private_module: str):
    """``public.name``, else ``jax._src.<private_module>.name`` (read only when missing)."""
    found = getattr(public, name, None)
    if found is not None:
        return found
    return getattr(importlib.import_module(f"jax._src.{private_module}"), name)


Jaxpr = jex_core.Jaxpr
ClosedJaxpr = jex_core.ClosedJaxpr
Literal = jex_core.Literal
Var = jex_core.Var
DropVar = _public_or_private(jex_core, "DropVar", "core")  # in jax.extend since jax 0.10

# Primitives the interpreter has rules for.
dot_general_p = prims.dot_general_p
conv_general_dilated_p = prims.conv_general_dilated_p
gather_p = prims.gather_p
convert_element_type_p = prims.convert_element_type_p
reshape_p = prims.reshape_p
transpose_p = prims.transpose_p
squeeze_p = prims.squeeze_p
broadcast_in_dim_p = prims.broadcast_in_dim_p
slice_p = prims.slice_p
dynamic_slice_p = prims.dynamic_slice_p
rev_p = prims.rev_p
copy_p = prims.copy_p
scan_p = prims.scan_p
while_p = prims.while_p
cond_p = prims.cond_p
remat_p = prims.remat_p
jit_p = prims.jit_p
closed_call_p = prims.closed_call_p
custom_jvp_call_p = prims.custom_jvp_call_p
custom_vjp_call_p = prims.custom_vjp_call_p
sharding_constraint_p = prims.sharding_constraint_p
device_put_p = prims.device_put_p
name_p = prims.name_p  # checkpoint_name
stop_gradient_p = prims.stop_gradient_p
# Moves and consumers the layout reader (jlora._layout_inference) also follows.
concatenate_p = prims.concatenate_p
pad_p = prims.pad_p
reduce_precision_p = prims.reduce_precision_p
split_p = jax.lax.split_p  # what jnp.split emits
optimization_barrier_p = jax.lax.optimization_barrier_p
# jax.lax.ragged_dot (mixture-of-experts); the primitive is in no public module.
ragged_dot_general_p = _public_or_private(prims, "ragged_dot_general_p", "lax.lax")


# -- ragged_dot ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class RaggedDims:
    """The dimension numbers of a ``ragged_dot_general`` in plain tuples.

    ``lhs_contract``/``rhs_contract`` and ``lhs_batch``/``rhs_batch`` pair up as in
    ``dot_general``; ``lhs_ragged`` are the lhs axes split into groups by ``group_sizes``
    and ``rhs_group`` the rhs axes indexed by group (one, for ``jax.lax.ragged_dot``).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from jlora import _jax_compat as jc
      >>> f = lambda x, w, g: [jax.lax.ragged_dot(x, w, g)]
      >>> avals = [jc.aval_of(jnp.ones(s, t)) for s, t in
      ...          [((6, 4), jnp.float32), ((3, 4, 5), jnp.float32), ((3,), jnp.int32)]]
      >>> d = ragged_dims(jc.make_closed_jaxpr(f, avals).jaxpr.eqns[0])
      >>> d.lhs_contract, d.rhs_contract, d.lhs_ragged, d.rhs_group
      ((1,), (1,), (0,), (0,))
    """

    lhs_contract: tuple[int, ...]
    rhs_contract: tuple[int, ...]
    lhs_batch: tuple[int, ...]
    rhs_batch: tuple[int, ...]
    lhs_ragged: tuple[int, ...]
    rhs_group: tuple[int, ...]

    def numbers(self):
        """As ``jax.lax.RaggedDotDimensionNumbers`` (the argument of ``ragged_dot_general``)."""
        return jax.lax.RaggedDotDimensionNumbers(
            dot_dimension_numbers=((list(self.lhs_contract), list(self.rhs_contract)),
                                   (list(self.lhs_batch), list(self.rhs_batch))),
            lhs_ragged_dimensions=list(self.lhs_ragged),
            rhs_group_dimensions=list(self.rhs_group),
        )


def ragged_dims(eqn) -> RaggedDims:
    """The :class:`RaggedDims` of a ``ragged_dot_general`` equation (the same params in
    jax 0.8.2 and 0.10; 0.10 adds ``out_sharding``, which the transform leaves alone)."""
    dn = eqn.params["ragged_dot_dimension_numbers"]
    (lc, rc), (lb, rb) = dn.dot_dimension_numbers
    return RaggedDims(tuple(lc), tuple(rc), tuple(lb), tuple(rb),
                      tuple(dn.lhs_ragged_dimensions), tuple(dn.rhs_group_dimensions))


def ragged_dot(lhs, rhs, group_sizes, dims: RaggedDims, *, precision=None,
               preferred_element_type=None):
    """``jax.lax.ragged_dot_general`` with :class:`RaggedDims` (no ``group_offset``)."""
    return jax.lax.ragged_dot_general(
        lhs, rhs, group_sizes, dims.numbers(), precision=precision,
        preferred_element_type=preferred_element_type,
    )


def is_tracer(x: Any) -> bool:
    """Whether ``x`` is a tracer of some JAX transformation (not a concrete value)."""
    return isinstance(x, jax_core.Tracer)


def aval_of(x: Any):
    """The abstract value (shape, dtype, weak type) of an array or tracer."""
    return jax.typeof(x)


def make_closed_jaxpr(flat_fn, avals) -> ClosedJaxpr:
    """Trace ``flat_fn(*arrays) -> list of arrays`` at ``avals`` to a closed jaxpr."""
    return jax.make_jaxpr(flat_fn)(*[_spec(a) for a in avals])


def _spec(aval) -> jax.ShapeDtypeStruct:
    """A ShapeDtypeStruct for ``aval``, keeping its weak type and any explicit sharding."""
    sharding = getattr(aval, "sharding", None)
    mesh = getattr(sharding, "mesh", None)
    if mesh is None or getattr(mesh, "empty", True):
        sharding = None  # no mesh in use: nothing to keep
    return jax.ShapeDtypeStruct(
        aval.shape, aval.dtype, weak_type=getattr(aval, "weak_type", False), sharding=sharding
    )


def _bind_params(primitive, params: dict) -> tuple[tuple, dict]:
    """``(positional subfuns, params)`` for ``primitive.bind``.

    Since jax 0.10 ``get_bind_params`` returns only the params (sub-functions travel
    inside them); before, it returned ``[subfuns], params`` and ``bind`` took the
    subfuns positionally.
    """
    out = primitive.get_bind_params(params)
    if isinstance(out, dict):
        return (), out
    subfuns, bind_params = out
    return tuple(subfuns), bind_params


def eqn_context(eqn):
    """Source info and context of ``eqn`` for ops emitted on its behalf (names in HLO/errors)."""
    name_stack = source_info_util.current_name_stack() + eqn.source_info.name_stack
    ctx = contextlib.ExitStack()
    ctx.enter_context(
        source_info_util.user_context(eqn.source_info.traceback, name_stack=name_stack)
    )
    manager = getattr(getattr(eqn, "ctx", None), "manager", None)
    if manager is not None:
        ctx.enter_context(manager)
    return ctx


def bind_eqn(eqn, invals: list, **param_overrides) -> list:
    """Re-emit ``eqn`` on ``invals`` under the current trace; always returns a list."""
    params = dict(eqn.params)
    params.update(param_overrides)
    subfuns, bind_params = _bind_params(eqn.primitive, params)
    with eqn_context(eqn):
        out = eqn.primitive.bind(*subfuns, *invals, **bind_params)
    return list(out) if eqn.primitive.multiple_results else [out]


def source_summary(eqn) -> str:
    """``file:line (function)`` of the user code that emitted ``eqn``, or ``""``."""
    try:
        return source_info_util.summarize(eqn.source_info)
    except Exception:  # pragma: no cover - best effort, only for messages
        return ""


def iter_eqns(jaxpr):
    """Every equation of ``jaxpr`` and, recursively, of its sub-jaxprs (jit, scan, remat,
    cond, custom_vjp, ...), in order. For inspecting traced programs (tests, reports).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> closed = jax.make_jaxpr(lambda x: jax.jit(jnp.sin)(x) * 2)(1.0)
      >>> sorted({str(e.primitive) for e in iter_eqns(closed.jaxpr)})
      ['jit', 'mul', 'sin']
    """
    for eqn in jaxpr.eqns:
        yield eqn
        for value in eqn.params.values():
            for sub in value if isinstance(value, tuple | list) else [value]:
                if isinstance(sub, ClosedJaxpr):
                    yield from iter_eqns(sub.jaxpr)
                elif isinstance(sub, Jaxpr):
                    yield from iter_eqns(sub)


# -- primitives of jlora's own ------------------------------------------------------------


def define_primitive(name: str, fn, *, batch_rule):
    """A primitive that computes ``fn(*arrays, **params)`` and stays one equation in jaxprs.

    So an interpreter can recognise the call (``jlora.quantization.dequantize``) by its
    primitive. Eager calls run ``fn`` under ``jax.jit``; shapes, dtypes and shardings are
    ``fn``'s (traced abstractly); it lowers to ``fn``'s HLO; its derivative is ``fn``'s
    (``jax.jvp`` along the operands with a non-zero tangent), so gradients reach exactly
    what they would without the primitive; ``batch_rule(args, dims, **params) ->
    (out, out_dim)`` handles ``vmap`` (a dim is None for an operand not mapped). ``params``
    must be hashable.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> double = define_primitive("double", lambda x, *, k: k * x,
      ...                           batch_rule=lambda args, dims, k: (k * args[0], dims[0]))
      >>> [e.primitive.name for e in jax.make_jaxpr(lambda x: double.bind(x, k=2.0))(1.0).eqns]
      ['double']
      >>> jax.grad(lambda x: double.bind(x, k=3.0))(1.0).item()
      3.0
    """
    import functools

    from jax.interpreters import ad, batching, mlir

    prim = jex_core.Primitive(name)

    @functools.lru_cache(maxsize=64)
    def compiled(params: tuple):
        return jax.jit(functools.partial(fn, **dict(params)))

    @functools.lru_cache(maxsize=256)
    def out_aval(avals: tuple, params: tuple):
        return make_closed_jaxpr(lambda *xs: [fn(*xs, **dict(params))], avals).out_avals[0]

    def jvp(primals, tangents, **params):
        out = prim.bind(*primals, **params)
        live = [i for i, t in enumerate(tangents) if not isinstance(t, ad.Zero)]

        def along(*xs):
            args = list(primals)
            for i, x in zip(live, xs, strict=True):
                args[i] = x
            return fn(*args, **params)

        _, tangent = jax.jvp(along, [primals[i] for i in live], [tangents[i] for i in live])
        return out, tangent

    prim.def_impl(lambda *args, **params: compiled(tuple(sorted(params.items())))(*args))
    prim.def_abstract_eval(
        lambda *avals, **params: out_aval(tuple(avals), tuple(sorted(params.items())))
    )
    mlir.register_lowering(prim, mlir.lower_fun(fn, multiple_results=False))
    ad.primitive_jvps[prim] = jvp
    batching.primitive_batchers[prim] = batch_rule
    return prim


def explicit_sharding(like: Any, order: Sequence[int] | None = None):
    """The sharding that an output shaped like ``like`` (transposed by ``order``) gets on
    a mesh with Explicit axes (sharding in types, the default of ``jax.make_mesh`` since
    jax 0.7): ``like``'s own, or replicated when ``like`` is not on that mesh (a factor
    made outside it). None when the current mesh has no Explicit axis.

    Under Explicit axes an ``einsum`` whose contracted axes are sharded must be told its
    output's sharding; a gradient gets the sharding of the array it is the gradient of.
    """
    explicit = jax.sharding.AxisType.Explicit
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or explicit not in tuple(mesh.axis_types):
        return None
    own = getattr(jax.typeof(like), "sharding", None)
    ndim = len(jax.typeof(like).shape)
    spec = (None,) * ndim
    if own is not None and not own.mesh.empty:
        spec = tuple(own.spec) + (None,) * (ndim - len(own.spec))
    if order is not None:
        spec = tuple(spec[i] for i in order)
    return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*spec))
