"""Control flow: sub-jaxprs evaluated with the kernels still factored.

* nested ``jit`` and ``closed_call``: inlined (the outer ``jax.jit`` compiles them anyway);
* ``checkpoint`` (``nn.remat``): re-wrapped in ``jax.checkpoint`` with the same policy;
* ``scan``: a kernel scanned over its leading stacked axis is sliced with its factors
  (the carried arrays of a kernel are pytree leaves, so ``scan`` slices them all);
  kernels closed over stay factored in every iteration;
* ``while`` and ``cond``: body and branches interpreted with the kernels factored;
* ``custom_jvp``/``custom_vjp`` functions: their derivative rule is user code that
  expects the kernel as an array, so the kernel is formed there.

A loop carry cannot be a factored value (its factors would have to be carried too), so a
kernel that is a carry, or that a body returns, is formed.
"""

from __future__ import annotations

import dataclasses

import jax

from jlora import _jax_compat as jc
from jlora._transform.factored import CATEGORY, Factored, Unsupported
from jlora._transform.interpreter import describe, register


@register(jc.custom_jvp_call_p, jc.custom_vjp_call_p, kind="array")
def rule_custom_derivative(interp, eqn, invals):
    # Inlining the primal would silently drop the user's derivative rule.
    raise Unsupported("a custom_jvp/custom_vjp function takes the kernel as an array")


@register(jc.jit_p, jc.closed_call_p, kind="carry")
def rule_inline(interp, eqn, invals):
    closed = eqn.params.get("jaxpr", eqn.params.get("call_jaxpr"))
    if isinstance(closed, jc.ClosedJaxpr):
        return interp.eval_jaxpr(closed.jaxpr, closed.consts, invals)
    return interp.eval_jaxpr(closed, [], invals)


@register(jc.remat_p, kind="carry")
def rule_remat(interp, eqn, invals):
    p = eqn.params
    jaxpr = p["jaxpr"]
    inner = interp.sub()
    # An output that is one of the body's inputs (nnx.remat returns the module's state)
    # is that input, passed through as it is: a kernel stays factored.
    forwarded = {i: jaxpr.invars.index(v) for i, v in enumerate(jaxpr.outvars)
                 if v in jaxpr.invars}
    kept = [i for i in range(len(jaxpr.outvars)) if i not in forwarded]

    def body(*vals):
        outs = inner.eval_jaxpr(jaxpr, [], vals)
        reason = f"materialised: the kernel is returned from {describe(eqn)}"
        return inner.materialise_all([outs[i] for i in kept], reason), inner.flush()

    computed, flushed = jax.checkpoint(
        body, prevent_cse=p.get("prevent_cse", True), policy=p.get("policy")
    )(*invals)
    interp.absorb(flushed)
    return _with_forwarded(len(jaxpr.outvars), forwarded, computed, invals)


def _with_forwarded(n: int, forwarded: dict[int, int], computed, sources) -> list:
    """The ``n`` outputs: ``sources[forwarded[k]]`` for an output that only forwards an
    input (kept factored), the next of ``computed`` for the others."""
    rest = iter(computed)
    return [sources[forwarded[k]] if k in forwarded else next(rest) for k in range(n)]


@register(jc.scan_p, kind="carry")
def rule_scan(interp, eqn, invals):
    p = eqn.params
    nc, ncarry = p["num_consts"], p["num_carry"]
    consts, init, xs = invals[:nc], invals[nc : nc + ncarry], invals[nc + ncarry :]
    init = interp.materialise_all(
        init, f"materialised: the kernel is a loop carry of {describe(eqn)}"
    )
    xs_in, kinds = [], []
    for x in xs:
        if isinstance(x, Factored) and CATEGORY[x.roles[0]] != "s":
            x = interp.materialise(
                x, f"materialised: {describe(eqn)} scans over a non-stacked kernel axis"
            )
        if isinstance(x, Factored):
            # One iteration sees a slice without the scanned axis; the class is kept so
            # that an extension's kind of factored value stays what it is.
            kinds.append((type(x), dataclasses.replace(x.meta, roles=x.roles[1:])))
            xs_in.append(x.tree_flatten()[0])
        else:
            kinds.append(None)
            xs_in.append(x)
    closed = p["jaxpr"]
    inner = interp.sub()
    # ys index -> xs index: a factored slice the body returns as it came in (nnx.scan
    # returns the scanned modules' state) is that kernel again, kept factored.
    forwarded: dict[int, int] = {}

    def body(carry, x_slices):
        x_vals = [
            x if kind is None else kind[0](*x, meta=kind[1])
            for x, kind in zip(x_slices, kinds, strict=True)
        ]
        outs = inner.eval_jaxpr(closed.jaxpr, closed.consts, [*consts, *carry, *x_vals])
        for k, y in enumerate(outs[ncarry:]):
            for j, x in enumerate(x_vals):
                if kinds[j] and y is x:
                    forwarded[k] = j
        outs = [*outs[:ncarry], *(y for k, y in enumerate(outs[ncarry:]) if k not in forwarded)]
        reason = f"materialised: the kernel is an output of {describe(eqn)}"
        outs = inner.materialise_all(outs, reason)
        return outs[:ncarry], (outs[ncarry:], inner.flush())

    carry, (ys, flushed) = jax.lax.scan(
        body, list(init), xs_in, length=p["length"], reverse=p["reverse"],
        unroll=p.get("unroll", 1),
    )
    interp.absorb(flushed)
    return [*carry, *_with_forwarded(len(eqn.outvars) - ncarry, forwarded, ys, xs)]


@register(jc.while_p, kind="carry")
def rule_while(interp, eqn, invals):
    p = eqn.params
    cn, bn = p["cond_nconsts"], p["body_nconsts"]
    cconsts, bconsts, init = invals[:cn], invals[cn : cn + bn], invals[cn + bn :]
    init = interp.materialise_all(
        init, f"materialised: the kernel is a loop carry of {describe(eqn)}"
    )
    cond_j, body_j = p["cond_jaxpr"], p["body_jaxpr"]
    inner = interp.sub()
    reason = f"materialised: the kernel is an output of {describe(eqn)}"

    def cond_fun(carry):
        return inner.eval_jaxpr(cond_j.jaxpr, cond_j.consts, [*cconsts, *carry])[0]

    def body_fun(carry):
        outs = inner.eval_jaxpr(body_j.jaxpr, body_j.consts, [*bconsts, *carry])
        return inner.materialise_all(outs, reason)

    return list(jax.lax.while_loop(cond_fun, body_fun, list(init)))


@register(jc.cond_p, kind="carry")
def rule_cond(interp, eqn, invals):
    index, *ops = invals
    inner = interp.sub()
    reason = f"materialised: the kernel is an output of {describe(eqn)}"

    def branch_fn(closed):
        def run(*vals):
            outs = inner.eval_jaxpr(closed.jaxpr, closed.consts, vals)
            return inner.materialise_all(outs, reason)

        return run

    return list(jax.lax.switch(index, [branch_fn(b) for b in eqn.params["branches"]], *ops))
