"""Every use of JAX internals (jaxprs, primitives, tracers) in one place, with version shims.

The factored transform reads jaxprs and re-binds their equations. The names it needs
live in ``jax.extend`` (the supported surface for this) or, for a few, in private
modules whose location moves between JAX releases. Keeping them here means a JAX
upgrade touches one file: the interpreter itself never imports ``jax._src``.

Tested with jax 0.10.2.

Example:
  >>> import jax.numpy as jnp
  >>> from jlora import _jax_compat as jc
  >>> closed = jc.make_closed_jaxpr(lambda x: [x * 2], [jc.aval_of(jnp.ones(3))])
  >>> [eqn.primitive.name for eqn in closed.jaxpr.eqns]
  ['mul']
"""

from __future__ import annotations

import contextlib
from typing import Any

import jax
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
    "is_tracer",
    "make_closed_jaxpr",
    "source_summary",
]

Jaxpr = jex_core.Jaxpr
ClosedJaxpr = jex_core.ClosedJaxpr
Literal = jex_core.Literal
Var = jex_core.Var
DropVar = jex_core.DropVar

# Primitives the interpreter has rules for. `jit` was called `pjit` before jax 0.7.
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
jit_p = getattr(prims, "jit_p", None) or getattr(prims, "pjit_p", None)
closed_call_p = prims.closed_call_p
custom_jvp_call_p = prims.custom_jvp_call_p
custom_vjp_call_p = prims.custom_vjp_call_p
sharding_constraint_p = prims.sharding_constraint_p
device_put_p = prims.device_put_p
name_p = getattr(prims, "name_p", None)  # checkpoint_name; absent in old releases


def is_tracer(x: Any) -> bool:
    """Whether ``x`` is a tracer of some JAX transformation (not a concrete value)."""
    return isinstance(x, jax.core.Tracer)


def aval_of(x: Any):
    """The abstract value (shape, dtype, weak type) of an array or tracer."""
    typeof = getattr(jax, "typeof", None)
    if typeof is not None:
        return typeof(x)
    return jex_core.get_aval(x)  # pragma: no cover - jax < 0.6


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

    jax >= 0.6 returns only the params (sub-functions travel inside as ``subfuns=``);
    older releases returned ``(subfuns, params)`` and took the subfuns positionally.
    """
    out = primitive.get_bind_params(params)
    if isinstance(out, tuple):  # pragma: no cover - older jax
        return tuple(out[0]), out[1]
    return (), out


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
