"""``dot_general`` with a factored kernel: ``x·W + s·((x·A)·B)``.

:func:`plan_dot` does the index bookkeeping once, returning a :class:`DotPlan`: which
operand is the kernel, which of its groups the dot contracts (the fan-in, or the
fan-out as ``Embed.attend`` does) and einsum letters for the input, the factors, the
thin product ``t = x·g`` and the output. Emitters turn a plan into the result:

* :func:`emit_custom_vjp`: :func:`jlora._factored_ops.factored_dot`, whose backward
  pass is written by hand (the default); functions in :data:`GROUP_EMITTERS` may first
  take the dot together with later dots reading the same input (``fusion.py``);
* :func:`emit_einsum`: the same sum as plain einsums, differentiated by JAX (DoRA,
  quantized kernels, ``custom_vjp=False``).

Example:
  >>> import jax.numpy as jnp
  >>> from jlora import _jax_compat as jc
  >>> from jlora._transform.factored import Factored, Meta
  >>> closed = jc.make_closed_jaxpr(lambda x, w: [x @ w], [jc.aval_of(jnp.ones((5, 4))),
  ...                                                     jc.aval_of(jnp.ones((4, 3)))])
  >>> fv = Factored(jnp.ones((4, 3)), jnp.ones((4, 2)), jnp.ones((2, 3)), None, None, None,
  ...               meta=Meta("w", "io", jnp.float32, 1.0))
  >>> plan = plan_dot(closed.jaxpr.eqns[0], fv, jnp.ones((5, 4)), kernel_is_lhs=False)
  >>> plan.group, f"{plan.x_l},{plan.g_l}->{plan.t_l}", f"{plan.t_l},{plan.h_l}->{plan.out_l}"
  ('i', 'ca,ad->cd', 'cd,db->cb')
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax.numpy as jnp

from jlora import _factored_ops as fops
from jlora import _jax_compat as jc
from jlora._transform.collect import Collector
from jlora._transform.factored import (
    CATEGORY,
    LETTERS,
    Factored,
    Unsupported,
    align,
    bind_with_kernel,
    combine,
    field_letters,
)
from jlora._transform.interpreter import describe, register


@dataclasses.dataclass(frozen=True)
class DotPlan:
    """One dot of a factored kernel ``fv`` with an input ``x``, as einsum letters."""

    eqn: Any
    fv: Factored
    x: Any
    kernel_is_lhs: bool
    group: str  # "i": the dot contracts the kernel's fan-in; "o": its fan-out
    k_bat: tuple[int, ...]  # the kernel's batch axes (stacked axes paired with x's)
    w_l: str  # letters of W's axes, and of x's
    x_l: str
    r_l: str  # the rank
    g_field: str  # the factor next to the input ("a" for a fan-in contraction) ...
    h_field: str  # ... and the other one
    g_l: str
    h_l: str
    t_l: str  # t = x·g
    out_l: str

    def factor(self, field: str):
        return getattr(self.fv, field).astype(self.fv.meta.dtype)

    def base(self, x) -> list:
        """The original dot on ``x`` and W (a quantized W dequantized right there)."""
        ops, k = ([None, x], 0) if self.kernel_is_lhs else ([x, None], 1)
        return bind_with_kernel(self.eqn, self.fv, ops, k)

    def einsum_kwargs(self) -> dict:
        return dict(precision=self.eqn.params.get("precision"),
                    preferred_element_type=self.eqn.params.get("preferred_element_type"))

    def spec(self) -> fops.DotSpec:
        kw = self.einsum_kwargs()
        return fops.DotSpec(
            self.x_l, self.g_l, self.t_l, self.h_l, self.out_l, self.fv.meta.scale,
            self.eqn.params["dimension_numbers"], kw["precision"],
            kw["preferred_element_type"], self.kernel_is_lhs, self.r_l,
            self.eqn.params.get("out_sharding"),
        )


def kernel_dims(eqn, kernel_is_lhs: bool):
    """``(kernel contracted, x contracted, kernel batch, x batch)`` axes of the dot."""
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    return (lc, rc, lb, rb) if kernel_is_lhs else (rc, lc, rb, lb)


def plan_dot(eqn, fv: Factored, x, kernel_is_lhs: bool) -> DotPlan:
    """The :class:`DotPlan` of ``eqn``; :class:`Unsupported` unless it contracts the
    kernel's whole fan-in or whole fan-out (DoRA kernels: fan-in only)."""
    k_con, x_con, k_bat, x_bat = kernel_dims(eqn, kernel_is_lhs)
    roles = fv.roles
    cats = {CATEGORY[roles[k]] for k in k_con}
    if len(cats) != 1 or "s" in cats:
        raise Unsupported("it contracts over no whole fan-in or fan-out group")
    group = cats.pop()
    if sorted(k_con) != [k for k, r in enumerate(roles) if CATEGORY[r] == group]:
        raise Unsupported("it contracts over part of the kernel's fan-in or fan-out axes")
    if fv.m is not None and group != "i":
        raise Unsupported("DoRA kernels are factored only when contracting their fan-in")
    letters = iter(LETTERS)
    w_l, x_l = [""] * len(roles), [""] * x.ndim
    for xa, ka in [*zip(x_con, k_con, strict=True), *zip(x_bat, k_bat, strict=True)]:
        w_l[ka] = x_l[xa] = next(letters)
    for ls in (w_l, x_l):
        for i, v in enumerate(ls):
            ls[i] = v or next(letters)
    r_l = next(letters)
    contracted = {w_l[k] for k in k_con}
    lhs_l, rhs_l = (w_l, x_l) if kernel_is_lhs else (x_l, w_l)
    lhs_con, lhs_bat = (k_con, k_bat) if kernel_is_lhs else (x_con, x_bat)
    rhs_con, rhs_bat = (x_con, x_bat) if kernel_is_lhs else (k_con, k_bat)
    # dot_general's output order: batch axes, then lhs free axes, then rhs free axes.
    out_l = (
        [lhs_l[i] for i in lhs_bat]
        + [v for i, v in enumerate(lhs_l) if i not in lhs_con and i not in lhs_bat]
        + [v for i, v in enumerate(rhs_l) if i not in rhs_con and i not in rhs_bat]
    )
    g_field, h_field = ("a", "b") if group == "i" else ("b", "a")
    g_l = field_letters(roles, g_field, w_l, r_l)
    h_l = field_letters(roles, h_field, w_l, r_l)
    t_l = [v for v in x_l if v not in contracted] + [
        v for v in g_l if v not in x_l and v not in contracted
    ]
    return DotPlan(eqn, fv, x, kernel_is_lhs, group, tuple(k_bat), "".join(w_l),
                   "".join(x_l), r_l, g_field, h_field, g_l, h_l, "".join(t_l),
                   "".join(out_l))


# Emitters that may take a dot together with later dots of the same jaxpr:
# f(interp, plan) -> outputs or None. Tried by emit_custom_vjp when there is no dropout.
GROUP_EMITTERS: list[Callable] = []


def emit_custom_vjp(interp, plan: DotPlan, x_in) -> list | None:
    """:func:`jlora._factored_ops.factored_dot` (None where it does not apply: DoRA, a
    quantized W, ``custom_vjp=False``)."""
    fv = plan.fv
    if not interp.run.custom_vjp or fv.m is not None or fv.lazy:
        return None
    w = fv.w.astype(fv.meta.dtype)
    if x_in is plan.x:
        for emit in GROUP_EMITTERS:
            out = emit(interp, plan)
            if out is not None:
                return out
    interp.consumed(fv)
    return [fops.factored_dot(plan.spec(), plan.x, None if x_in is plan.x else x_in, w,
                              plan.factor(plan.g_field), plan.factor(plan.h_field))]


def emit_einsum(interp, plan: DotPlan, x_in) -> list:
    """``x·W + s·((x_in·g)·h)`` as einsums (DoRA: times ``m``, see ``factored.combine``)."""
    fv, x, kw = plan.fv, plan.x, plan.einsum_kwargs()
    (base,) = plan.base(x)
    t = jnp.einsum(f"{plan.x_l},{plan.g_l}->{plan.t_l}", x_in, plan.factor(plan.g_field), **kw)
    t = t * jnp.asarray(fv.meta.scale, t.dtype)
    branch = jnp.einsum(f"{plan.t_l},{plan.h_l}->{plan.out_l}", t, plan.factor(plan.h_field),
                        **kw)
    factor = dropped = None
    if fv.m is not None:
        factor = align(fv.m, field_letters(fv.roles, "m", plan.w_l, plan.r_l), plan.out_l)
        if x_in is not x:
            (dropped,) = plan.base(x_in)
    interp.consumed(fv)
    return [combine(fv, base, branch, factor, dropped)]


@register(jc.dot_general_p, kind="consumer")
def rule_dot(interp, eqn, invals):
    lhs, rhs = invals
    if isinstance(lhs, Factored) and isinstance(rhs, Factored):
        lhs = interp.materialise(lhs, f"materialised: two kernels meet in {describe(eqn)}")
    kernel_is_lhs = isinstance(lhs, Factored)
    fv, x = (lhs, rhs) if kernel_is_lhs else (rhs, lhs)
    k_con, _, k_bat, _ = kernel_dims(eqn, kernel_is_lhs)
    plan = plan_dot(eqn, fv, x, kernel_is_lhs)
    if not fv.adapted:
        interp.consumed(fv)
        if plan.group == "i" and fv.index is not None:
            interp.local(Collector).record_dot(plan)
        return plan.base(x)
    x_in = interp.run.dropout.branch_input(fv, x)
    out = emit_custom_vjp(interp, plan, x_in)
    return out if out is not None else emit_einsum(interp, plan, x_in)
