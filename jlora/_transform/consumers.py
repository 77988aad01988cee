"""Convolutions and embedding gathers with a factored kernel (dots: ``dot.py``).

* ``conv_general_dilated`` with the kernel as its filter becomes the conv with W plus
  ``B`` applied on the channels of the conv with ``A`` (a window-sized filter into
  ``rank`` channels): ``conv(x, W) + s·(conv(x, A)·B)``;
* an embedding ``gather`` of whole rows becomes ``W[ids] + s·(A[ids]·B)``.

Both read W through :func:`~jlora._transform.factored.bind_with_kernel` (so a quantized
W is dequantized only there) and finish with :func:`~jlora._transform.factored.combine`
(DoRA). A new consumer is one more rule of this shape (``ragged.py`` is one).
"""

from __future__ import annotations

import jax.numpy as jnp

from jlora import _jax_compat as jc
from jlora._transform.collect import Collector
from jlora._transform.factored import CATEGORY, Factored, Unsupported, bind_with_kernel, combine
from jlora._transform.interpreter import register


@register(jc.conv_general_dilated_p, kind="consumer")
def rule_conv(interp, eqn, invals):
    x, fv = invals
    if isinstance(x, Factored):
        raise Unsupported("the kernel is not the conv's filter")
    p = eqn.params
    _, rhs_spec, out_spec = p["dimension_numbers"]
    if p["feature_group_count"] != 1 or p["batch_group_count"] != 1:
        raise Unsupported("grouped convolutions are not factored")
    fan_out = [k for k, r in enumerate(fv.roles) if CATEGORY[r] == "o"]
    if "s" in {CATEGORY[r] for r in fv.roles} or fan_out != [rhs_spec[0]]:
        raise Unsupported("the filter's output-feature axis is not its fan-out axis")
    (base,) = bind_with_kernel(eqn, fv, [x, None], 1)
    if not fv.adapted:
        interp.consumed(fv)
        if fv.index is not None:
            interp.local(Collector).record_patches(eqn, fv, x)
        return [base]
    a_filter = jnp.moveaxis(fv.a, -1, rhs_spec[0]).astype(fv.meta.dtype)
    x_in = interp.run.dropout.branch_input(fv, x)
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
            (dropped,) = bind_with_kernel(eqn, fv, [x_in, None], 1)
    interp.consumed(fv)
    return [combine(fv, base, branch, factor, dropped)]


@register(jc.gather_p, kind="consumer")
def rule_gather(interp, eqn, invals):
    fv, indices = invals
    if isinstance(indices, Factored):
        raise Unsupported("the kernel is used as indices")
    p = eqn.params
    dn = p["dimension_numbers"]
    batching_dims = tuple(getattr(dn, "operand_batching_dims", ()))
    roles = fv.roles
    fan_out = [k for k, r in enumerate(roles) if CATEGORY[r] == "o"]
    if "s" in {CATEGORY[r] for r in roles}:
        raise Unsupported("gathers from stacked kernels are not factored")
    if len(fan_out) != 1:
        raise Unsupported("embedding gathers need exactly one feature axis")
    (fo,) = fan_out
    untouched = (
        p["slice_sizes"][fo] == fv.w.shape[fo]
        and fo not in dn.start_index_map
        and fo not in dn.collapsed_slice_dims
        and fo not in batching_dims
    )
    if not untouched:
        raise Unsupported("the gather indexes the kernel's feature axis")
    (base,) = bind_with_kernel(eqn, fv, [None, indices], 0)
    if not fv.adapted:
        interp.consumed(fv)
        return [base]
    a_table = jnp.moveaxis(fv.a, -1, fo).astype(fv.meta.dtype)
    sizes = list(p["slice_sizes"])
    sizes[fo] = a_table.shape[fo]
    (ag,) = jc.bind_eqn(eqn, [a_table, indices], slice_sizes=tuple(sizes))
    kept = [k for k in range(len(roles)) if k not in dn.collapsed_slice_dims
            and k not in batching_dims]
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
    interp.consumed(fv)
    return [combine(fv, base, branch, factor, None)]
