"""``ragged_dot`` with a factored expert kernel (mixture-of-experts layers).

``jax.lax.ragged_dot(x, W, group_sizes)`` multiplies rows sorted by expert with their
expert's kernel, ``W: (E, in, out)``; it is the primitive ``ragged_dot_general``. With
per-expert factors (``A: (E, in, r)``, ``B: (E, r, out)``, any axis order of W) it becomes

    ragged(x, W) + s·ragged(ragged(x, A), B)        with the same group sizes,

through :func:`jlora._grouped_ops.factored_ragged_dot` (a hand-written backward pass;
no ``E×in×out`` gradient) or, for DoRA and quantized kernels, the same sum of ragged
products differentiated by JAX. :func:`plan_ragged` derives the dimension numbers of the
two thin products from the kernel's: the group axis and any batch axes must be the
kernel's stacked axes (all of them), and the contracted axes one whole group (fan-in,
or fan-out as a transposed use). DoRA's per-expert factor is gathered per row.

Example:
  >>> import jax, jax.numpy as jnp
  >>> from jlora import _jax_compat as jc
  >>> from jlora._transform.factored import Factored, Meta
  >>> avals = [jc.aval_of(jnp.ones(s, t)) for s, t in
  ...          [((6, 4), jnp.float32), ((3, 4, 5), jnp.float32), ((3,), jnp.int32)]]
  >>> eqn = jc.make_closed_jaxpr(lambda x, w, g: [jax.lax.ragged_dot(x, w, g)],
  ...                            avals).jaxpr.eqns[0]
  >>> fv = Factored(jnp.ones((3, 4, 5)), jnp.ones((3, 4, 2)), jnp.ones((3, 2, 5)), None,
  ...               None, None, meta=Meta("w", "sio", jnp.float32, 1.0))
  >>> spec = plan_ragged(eqn, fv, jnp.ones((6, 4))).spec
  >>> spec.first.rhs_contract, spec.second.lhs_contract, spec.second.rhs_group
  ((1,), (1,), (0,))
"""

from __future__ import annotations

import dataclasses
from typing import Any, cast

import jax.numpy as jnp

from jlora import _grouped_ops as gops
from jlora import _jax_compat as jc
from jlora._transform.factored import (
    CATEGORY,
    Factored,
    Unsupported,
    bind_with_kernel,
    combine,
    positions,
    rank_position,
)
from jlora._transform.interpreter import register


@dataclasses.dataclass(frozen=True)
class RaggedPlan:
    """One ragged product of a factored kernel ``fv`` with an input ``x``."""

    eqn: Any
    fv: Factored
    spec: gops.RaggedSpec
    group: str  # "i": the product contracts the kernel's fan-in; "o": its fan-out
    g_field: str  # the factor next to the input
    h_field: str
    x_free: tuple[int, ...]  # the input's axes that reach the output (batch axes aside)
    ragged: int  # the input's ragged axis

    def base(self, x, group_sizes):
        """The original product on ``x`` and W (a quantized W dequantized right there)."""
        return bind_with_kernel(self.eqn, self.fv, [x, None, group_sizes], 1)

    def factor(self, field: str):
        return getattr(self.fv, field).astype(self.fv.meta.dtype)


def plan_ragged(eqn, fv: Factored, x) -> RaggedPlan:
    """The :class:`RaggedPlan` of ``eqn``; :class:`Unsupported` unless the kernel is the
    grouped operand, its stacked axes are exactly the group and batch axes, and the
    product contracts one whole fan-in or fan-out group."""
    if eqn.params.get("group_offset") is not None:
        raise Unsupported("ragged products with a group offset are not factored")
    d = jc.ragged_dims(eqn)
    roles = fv.roles
    if len(d.lhs_ragged) != 1 or len(d.rhs_group) != 1:
        raise Unsupported("the kernel is not indexed by group (a ragged contraction or batch)")
    (lr,), (rg,) = d.lhs_ragged, d.rhs_group
    stacked = {k for k, r in enumerate(roles) if CATEGORY[r] == "s"}
    if CATEGORY[roles[rg]] != "s" or stacked != {rg, *d.rhs_batch}:
        raise Unsupported("the kernel's stacked axes are not exactly its group and batch axes")
    cats = {CATEGORY[roles[k]] for k in d.rhs_contract}
    if len(cats) != 1 or "s" in cats:
        raise Unsupported("it contracts over no whole fan-in or fan-out group")
    group = cats.pop()
    if sorted(d.rhs_contract) != [k for k, r in enumerate(roles) if CATEGORY[r] == group]:
        raise Unsupported("it contracts over part of the kernel's fan-in or fan-out axes")
    if fv.m is not None and (group != "i" or d.rhs_batch):
        raise Unsupported("DoRA experts are factored only contracting their fan-in, unbatched")
    g_field, h_field = ("a", "b") if group == "i" else ("b", "a")

    def axes(field: str, ks) -> tuple[int, ...]:  # W's axes ks in the carried array field
        pos = positions(roles, field)
        return tuple(cast(int, pos[k]) for k in ks)

    first = jc.RaggedDims(d.lhs_contract, axes(g_field, d.rhs_contract), d.lhs_batch,
                          axes(g_field, d.rhs_batch), (lr,), axes(g_field, (rg,)))
    x_free = tuple(k for k in range(x.ndim) if k not in d.lhs_contract + d.lhs_batch)
    nb = len(d.lhs_batch)
    # t = x·g: (batch, x's free axes, rank); then t·h: the base's (batch, free, W's free).
    second = jc.RaggedDims((nb + len(x_free),), (cast(int, rank_position(roles, h_field)),),
                           tuple(range(nb)), axes(h_field, d.rhs_batch),
                           (nb + x_free.index(lr),), axes(h_field, (rg,)))
    spec = gops.RaggedSpec(d, first, second, fv.meta.scale, eqn.params.get("precision"),
                           eqn.params.get("preferred_element_type"))
    return RaggedPlan(eqn, fv, spec, group, g_field, h_field, x_free, lr)


def _dora_factor(plan: RaggedPlan, x, group_sizes):
    """DoRA's ``m / ‖W'‖`` of each row's expert, broadcast against the output."""
    rows = x.shape[plan.ragged]
    ends = jnp.cumsum(group_sizes)
    experts = plan.fv.m.shape[0]
    # Rows past the last group have a zero output anyway; any expert will do for them.
    ids = jnp.minimum(jnp.searchsorted(ends, jnp.arange(rows), side="right"), experts - 1)
    per_row = jnp.take(plan.fv.m, ids, axis=0)  # (rows, *fan_out)
    lead = plan.x_free.index(plan.ragged)  # the output: (x's free axes, fan-out), no batch
    tail = len(plan.x_free) - lead - 1
    return per_row.reshape([1] * lead + [rows] + [1] * tail + list(per_row.shape[1:]))


@register(jc.ragged_dot_general_p, kind="consumer")
def rule_ragged_dot(interp, eqn, invals):
    x, fv, group_sizes = invals
    if isinstance(x, Factored) or isinstance(group_sizes, Factored):
        raise Unsupported("the kernel is not the grouped operand")
    plan = plan_ragged(eqn, fv, x)
    if not fv.adapted:
        interp.consumed(fv)
        return plan.base(x, group_sizes)
    x_in = interp.run.dropout.branch_input(fv, x)
    spec = plan.spec
    g, h = plan.factor(plan.g_field), plan.factor(plan.h_field)
    if interp.run.custom_vjp and fv.m is None and not fv.lazy:
        interp.consumed(fv)
        return [gops.factored_ragged_dot(spec, x, None if x_in is x else x_in,
                                         fv.w.astype(fv.meta.dtype), g, h, group_sizes)]
    (base,) = plan.base(x, group_sizes)
    t = spec.first_product(x_in, g, group_sizes)
    t = t * jnp.asarray(spec.scale, t.dtype)
    branch = spec.second_product(t, h, group_sizes)
    factor = dropped = None
    if fv.m is not None:
        factor = _dora_factor(plan, x, group_sizes)
        if x_in is not x:
            (dropped,) = plan.base(x_in, group_sizes)
    interp.consumed(fv)
    return [combine(fv, base, branch, factor, dropped)]
