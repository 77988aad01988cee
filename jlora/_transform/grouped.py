"""Grouped batches: every example with its own adapter from a bank, in one pass.

``jlora.multi_adapter.grouped`` runs the model under ``jax.vmap`` over examples; each
adapted kernel enters as a :class:`GroupedFactored` value holding *every* adapter of the
bank at once: their ``A`` concatenated along the rank axis, their ``B`` (times each
adapter's scale) likewise, and each adapter's rank (static, in :class:`GroupedMeta`).
The example's adapter id and the bank's group sizes are per call (:class:`GroupedRun`).
Moves and control flow treat the value like any factored kernel (the rank axis is one
block); a ``dot_general`` becomes ``x·W + bank_branch(x)``
(:func:`jlora._grouped_ops.bank_branch`: ragged products per rank level once ``vmap``
batches it). A grouped kernel cannot be formed as one ``W + s·A·B`` (it differs per
example), so a use that would need it is an error naming the path and the operation.

Example:
  >>> import jax.numpy as jnp
  >>> from jlora.layouts import Layout
  >>> entry = GroupedEntry(Layout("io"), jnp.ones((4, 3)), jnp.ones((3, 2)), (2, 1))
  >>> fv = entry.enter_factored("w", jnp.zeros((4, 2)), GroupedRun())
  >>> fv.meta.ranks, fv.a.shape
  ((2, 1), (4, 3))
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax

from jlora import _grouped_ops as gops
from jlora import _jax_compat as jc
from jlora._transform import dot
from jlora._transform.factored import CATEGORY, Factored, Meta, Unsupported
from jlora._transform.interpreter import Run, describe, operand_hook
from jlora.layouts import Layout


@dataclasses.dataclass(frozen=True)
class GroupedMeta(Meta):
    ranks: tuple[int, ...] = ()  # each adapter's rank in bank order (0: it has none here)


@jax.tree_util.register_pytree_node_class
class GroupedFactored(Factored):
    """A kernel with a bank of adapters, one per example (see the module docstring)."""

    meta: GroupedMeta

    def refuse(self, where: str):
        raise ValueError(
            f"jlora.multi_adapter.grouped: the adapted kernel at path {self.meta.path!r} "
            f"{where}. In a grouped batch each example has its own adapter, so the "
            "kernel cannot be formed as one W + s·A·B there. Use "
            "jlora.multi_adapter.per_example for this model, or leave this kernel out of "
            "the bank's adapters."
        )

    def materialise(self, run, reason: str):
        self.refuse(reason.removeprefix("materialised: "))


@dataclasses.dataclass(frozen=True)
class GroupedEntry:
    """How a kernel with a bank's adapters enters the interpreter (see ``entry.py``)."""

    layout: Layout
    a: Any  # (*stacked, *fan_in, sum of ranks)
    b: Any  # (*stacked, sum of ranks, *fan_out), each adapter's rows times its scale
    ranks: tuple[int, ...]

    def enter_factored(self, path: str, w, run) -> GroupedFactored:
        meta = GroupedMeta(path, self.layout.axes, w.dtype, 1.0, ranks=self.ranks)
        return GroupedFactored(w, self.a, self.b, None, None, None, meta=meta)


@dataclasses.dataclass
class GroupedRun(Run):
    """A call's state, plus ``groups``: ``(this example's adapter id, group sizes)``."""

    groups: tuple = ()


def emit_grouped_dot(interp, eqn, invals) -> list:
    """``x·W + bank_branch(x)`` for a dot with a grouped kernel."""
    lhs, rhs = invals
    if isinstance(lhs, Factored) and isinstance(rhs, Factored):
        interp.materialise(lhs, f"meets another kernel in {describe(eqn)}")
    kernel_is_lhs = isinstance(lhs, Factored)
    fv, x = (lhs, rhs) if kernel_is_lhs else (rhs, lhs)
    assert isinstance(fv, GroupedFactored)  # the hook sends only dots with one
    if any(CATEGORY[r] == "s" for r in fv.roles):
        fv.refuse(f"reaches {describe(eqn)} with stacked axes (slice or scan over them first)")
    try:
        plan = dot.plan_dot(eqn, fv, x, kernel_is_lhs)
    except Unsupported as e:
        fv.refuse(f"reaches {describe(eqn)} ({e})")
    (base,) = plan.base(x)
    gid, group_sizes = interp.run.groups
    kw = plan.einsum_kwargs()
    spec = gops.BankSpec(plan.x_l, plan.g_l, plan.t_l, plan.h_l, plan.out_l, plan.r_l,
                         fv.meta.ranks, kw["precision"], kw["preferred_element_type"])
    branch = gops.bank_branch(spec, x, gid, group_sizes, plan.factor(plan.g_field),
                              plan.factor(plan.h_field))
    interp.consumed(fv)
    return [base + branch.astype(base.dtype)]


@operand_hook
def grouped_operands(interp, eqn, rule, invals):
    """Dots with a grouped kernel are rewritten here; other consumers refuse it (moves and
    control flow take it as any factored value)."""
    grouped = [x for x in invals if isinstance(x, GroupedFactored)]
    if not grouped:
        return None, invals
    if eqn.primitive is jc.dot_general_p:
        return emit_grouped_dot(interp, eqn, invals), invals
    if rule is not None and rule.kind == "consumer":
        grouped[0].refuse(f"reaches {describe(eqn)}, which grouped batches do not rewrite")
    return None, invals
