"""The factored dot ``x·W + s·((x·A)·B)`` with a hand-written backward pass.

:func:`jlora.lora` rewrites every dot that contracts an adapted kernel into the factored
form above. Left to JAX's own transpose rules, the backward pass of that expression is
correct but lays out its thin rank-``r`` matmuls in a way XLA:CPU runs poorly (extra
transposed copies of the layer input, separate passes over ``dy``). :func:`factored_dot`
computes the same values with a ``jax.custom_vjp`` whose backward pass is

* ``u  = s·(dy·Bᵀ)``                      (rank-``r``, tiny)
* ``dx = dy·Wᵀ + u·Aᵀ``                   (the frozen model's own ``dx`` plus one thin matmul)
* ``dA = xᵀ·u``,  ``dB = (s·(x·A))ᵀ·dy``

and keeps as residuals only ``x``, the factors and ``x·A`` (``batch × r``), which the
frozen model's backward pass does not need beyond ``x``. ``W``'s cotangent is computed
through ``jax.vjp`` of the original dot, so gradients w.r.t. the parameters still work
(XLA drops it when nobody asks for it).

The einsum letter strings come from the interpreter's dot plan
(``jlora/_transform/dot.py``), which knows which axes of ``x`` and of the kernel are
contracted, batched (stacked layers) or free; this module only does arithmetic on them.

Limitation: a ``custom_vjp`` function cannot be differentiated in forward mode
(``jax.jvp``, ``jax.jacfwd``); ``jlora.lora(fn, custom_vjp=False)`` uses JAX's own
derivative of the same expression instead.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.custom_derivatives import SymbolicZero

from jlora import _jax_compat as jc

__all__ = ["DotSpec", "factored_dot", "factored_dots"]


@dataclasses.dataclass(frozen=True)
class DotSpec:
    """Static description of one factored dot (hashable: a ``nondiff_argnums`` argument).

    ``x_l, g_l, t_l, h_l, out_l`` are einsum letter strings: the input, the factor next
    to the input (A for a fan-in contraction, B for a fan-out one), the thin product
    ``t = x·g``, the other factor and the output. ``dimension_numbers``, ``precision``,
    ``preferred_element_type`` and ``kernel_is_lhs`` rebuild the original base dot.
    """

    x_l: str
    g_l: str
    t_l: str
    h_l: str
    out_l: str
    scale: float
    dimension_numbers: Any
    precision: Any
    preferred_element_type: Any
    kernel_is_lhs: bool
    r_l: str = ""  # the rank letter (in g_l, t_l and h_l); needed by factored_dots
    # the original dot's out_sharding (a mesh with Explicit axes), given to every product
    # shaped like the output or like t
    out_sharding: Any = None

    def base(self, x, w):
        lhs, rhs = (w, x) if self.kernel_is_lhs else (x, w)
        extra = {} if self.out_sharding is None else {"out_sharding": self.out_sharding}
        return jax.lax.dot_general(
            lhs, rhs, self.dimension_numbers, precision=self.precision,
            preferred_element_type=self.preferred_element_type, **extra,
        )

    def sharding(self, letters: str):
        """The out_sharding of a product with axes ``letters``: the output's spec on the
        letters it shares with the output, unsharded on the others (the rank)."""
        if self.out_sharding is None:
            return None
        spec = tuple(self.out_sharding.spec) + (None,) * len(self.out_l)
        return jax.sharding.NamedSharding(self.out_sharding.mesh, jax.sharding.PartitionSpec(
            *(spec[self.out_l.index(c)] if c in self.out_l else None for c in letters)))

    def einsum(self, spec: str, a, b, out_sharding=None):
        # out_sharding only when given: a mesh with Explicit axes needs it for an output
        # whose contracted axes are sharded (see jc.explicit_sharding).
        extra = {} if out_sharding is None else {"out_sharding": out_sharding}
        return jnp.einsum(
            spec, a, b, precision=self.precision,
            preferred_element_type=self.preferred_element_type, **extra,
        )


def _dg(spec: DotSpec, u, x, g):
    """``dg = xᵀ·u`` computed as ``(uᵀ·x)ᵀ``: XLA:CPU's matmul wants the contracted axis
    of its left operand last, so ``xᵀ·u`` copies a transposed ``x`` (as big as the layer
    input) first, whereas ``uᵀ·x`` transposes only ``u`` (rank ``r`` wide) and the result.
    ``g`` (the factor) gives the gradient its sharding on a mesh with Explicit axes."""
    first = [c for c in spec.g_l if c in spec.t_l and c not in spec.x_l]  # the rank letter
    rest = [c for c in spec.g_l if c not in first]
    tmp_l = "".join(first + rest)
    sharding = jc.explicit_sharding(g, [spec.g_l.index(c) for c in tmp_l])
    tmp = spec.einsum(f"{spec.t_l},{spec.x_l}->{tmp_l}", u, x, sharding)
    return jnp.transpose(tmp, [tmp_l.index(c) for c in spec.g_l])


def _forward(spec: DotSpec, x, x_in, w, g, h):
    base = spec.base(x, w)
    t = spec.einsum(f"{spec.x_l},{spec.g_l}->{spec.t_l}", x if x_in is None else x_in, g,
                    spec.sharding(spec.t_l))
    t = t * jnp.asarray(spec.scale, t.dtype)
    branch = spec.einsum(f"{spec.t_l},{spec.h_l}->{spec.out_l}", t, h, spec.sharding(spec.out_l))
    return base + branch.astype(base.dtype), t


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def factored_dot(spec: DotSpec, x, x_in, w, g, h):
    """``base_dot(x, W) + s·((x_in·g)·h)``; ``x_in`` is ``x`` with dropout, or None (= x).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from jlora._factored_ops import DotSpec, factored_dot
      >>> x, w = jnp.ones((2, 3)), jnp.ones((3, 4))
      >>> a, b = jnp.ones((3, 1)), jnp.ones((1, 4))
      >>> spec = DotSpec("ab", "bz", "az", "zc", "ac", 0.5, (((1,), (0,)), ((), ())),
      ...                None, None, False)
      >>> factored_dot(spec, x, None, w, a, b)[0, 0].item()   # 3 + 0.5 * 3
      4.5
    """
    return _forward(spec, x, x_in, w, g, h)[0]


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class _Static:
    """A static value carried in the residuals' tree structure."""

    value: Any


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class Needed:
    """Which inputs want a cotangent (static: travels in the residuals' structure)."""

    x: bool
    x_in: bool
    w: bool
    g: bool
    h: bool


def _fwd(spec, x, x_in, w, g, h):
    # symbolic_zeros=True: each input arrives as CustomVJPPrimal(value, perturbed), so the
    # backward pass skips what nobody differentiates (in a LoRA step: W's gradient, which
    # would be kernel-sized, and the first layer's dx).
    needed = Needed(x.perturbed, x_in is not None and x_in.perturbed, w.perturbed,
                     g.perturbed, h.perturbed)
    x, w, g, h = x.value, w.value, g.value, h.value
    x_in = None if x_in is None else x_in.value
    y, t = _forward(spec, x, x_in, w, g, h)
    # Residuals: the inputs (references, not copies) and the thin t = s·(x·g).
    return y, (needed, x, x_in, w, g, h, t)


def _bwd(spec, res, dy):
    needed, x, x_in, w, g, h, t = res
    if isinstance(dy, SymbolicZero):
        return None, None, None, None, None
    dx = dw = dx_in = dg = dh = None
    # The frozen dot's own transpose, w.r.t. only what is needed (a traced dw would be
    # kernel-sized even if XLA later drops it).
    if needed.x and needed.w:
        dx, dw = jax.vjp(spec.base, x, w)[1](dy)
        dx, dw = dx.astype(x.dtype), dw.astype(w.dtype)
    elif needed.x:
        (dx,) = jax.vjp(lambda x: spec.base(x, w), x)[1](dy)
        dx = dx.astype(x.dtype)
    elif needed.w:
        (dw,) = jax.vjp(lambda w: spec.base(x, w), w)[1](dy)
        dw = dw.astype(w.dtype)
    dy_b = dy.astype(t.dtype)
    # u = s·(dy·hᵀ): the cotangent of the unscaled thin product x·g.
    u = spec.einsum(f"{spec.out_l},{spec.h_l}->{spec.t_l}", dy_b, h, jc.explicit_sharding(t))
    u = u * jnp.asarray(spec.scale, u.dtype)
    src = x if x_in is None else x_in
    if needed.x if x_in is None else needed.x_in:
        dx_branch = spec.einsum(f"{spec.t_l},{spec.g_l}->{spec.x_l}", u, g).astype(src.dtype)
        if x_in is None:
            dx = dx + dx_branch
        else:
            dx_in = dx_branch
    if needed.g:
        dg = _dg(spec, u, src, g).astype(g.dtype)
    if needed.h:
        dh = spec.einsum(f"{spec.t_l},{spec.out_l}->{spec.h_l}", t, dy_b,
                         jc.explicit_sharding(h)).astype(h.dtype)
    return dx, dx_in, dw, dg, dh


factored_dot.defvjp(_fwd, _bwd, symbolic_zeros=True)


# -- kernels sharing one input (q, k, v; gate and up) ------------------------------------


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def factored_dots(spec: DotSpec, scales: tuple, x, ws, gs, hs):
    """``[base_dot(x, W_k) + s_k·((x·g_k)·h_k) for each k]``, reading ``x`` once for the
    adapters: ``x·[g_1|g_2|...]`` in one matmul forward, and in the backward pass one
    ``xᵀ·[u_1|u_2|...]`` for every ``dg_k`` and one ``[u_1|u_2|...]·[g_1|g_2|...]ᵀ`` for
    the adapters' part of ``dx``. ``spec.scale`` is ignored (``scales`` holds each one).

    Example:
      >>> import jax.numpy as jnp
      >>> from jlora._factored_ops import DotSpec, factored_dots
      >>> x, w = jnp.ones((2, 3)), jnp.ones((3, 4))
      >>> a, b = jnp.ones((3, 1)), jnp.ones((1, 4))
      >>> spec = DotSpec("ab", "bz", "az", "zc", "ac", 1.0, (((1,), (0,)), ((), ())),
      ...                None, None, False, "z")
      >>> [y[0, 0].item() for y in factored_dots(spec, (0.5, 1.0), x, [w, w], [a, a], [b, b])]
      [4.5, 6.0]
    """
    # Not differentiated (inference): one factored dot per kernel, as without fusion;
    # measured on XLA:CPU, the shared x·[A|A'|..] pays only in a train step's backward.
    return [_forward(dataclasses.replace(spec, scale=s), x, None, w, g, h)[0]
            for w, g, h, s in zip(ws, gs, hs, scales, strict=True)]


def _forward_group(spec, scales, x, ws, gs, hs):
    g_axis, t_axis = spec.g_l.index(spec.r_l), spec.t_l.index(spec.r_l)
    ranks = [g.shape[g_axis] for g in gs]
    big = spec.einsum(f"{spec.x_l},{spec.g_l}->{spec.t_l}", x, jnp.concatenate(gs, g_axis),
                      spec.sharding(spec.t_l))
    ts = jnp.split(big, list(np.cumsum(ranks)[:-1]), axis=t_axis)
    ys = []
    for w, t, h, s in zip(ws, ts, hs, scales, strict=True):
        t = t * jnp.asarray(s, t.dtype)
        base = spec.base(x, w)
        branch = spec.einsum(f"{spec.t_l},{spec.h_l}->{spec.out_l}", t, h,
                             spec.sharding(spec.out_l))
        ys.append(base + branch.astype(base.dtype))
    return ys, big


def _fwd_group(spec, scales, x, ws, gs, hs):
    needed = (x.perturbed, tuple(w.perturbed for w in ws), any(g.perturbed for g in gs),
              any(h.perturbed for h in hs))
    x = x.value
    ws, gs, hs = ([v.value for v in vs] for vs in (ws, gs, hs))
    ys, big = _forward_group(spec, scales, x, ws, gs, hs)
    return ys, (_Static(needed), x, ws, gs, hs, big)


def _bwd_group(spec, scales, res, dys):
    static, x, ws, gs, hs, big = res
    need_x, need_ws, need_g, need_h = static.value
    n = len(ws)
    g_axis, t_axis = spec.g_l.index(spec.r_l), spec.t_l.index(spec.r_l)
    ranks = [g.shape[g_axis] for g in gs]
    cuts = list(np.cumsum(ranks)[:-1])
    live = [not isinstance(dy, SymbolicZero) for dy in dys]
    dx, dws = None, [None] * n
    us = []
    for k in range(n):
        w, h, dy = ws[k], hs[k], dys[k]
        if not live[k]:
            us.append(jnp.zeros(big.shape[:t_axis] + (ranks[k],) + big.shape[t_axis + 1:],
                                big.dtype))
            continue
        if need_x and need_ws[k]:
            dxk, dws[k] = jax.vjp(spec.base, x, w)[1](dy)
        elif need_x:
            (dxk,) = jax.vjp(lambda x, w=w: spec.base(x, w), x)[1](dy)
        elif need_ws[k]:
            dxk = None
            (dws[k],) = jax.vjp(lambda w: spec.base(x, w), w)[1](dy)
        else:
            dxk = None
        if dxk is not None:
            dx = dxk if dx is None else dx + dxk
        u = spec.einsum(f"{spec.out_l},{spec.h_l}->{spec.t_l}", dy.astype(big.dtype), h,
                        jc.explicit_sharding(big))
        us.append(u * jnp.asarray(scales[k], u.dtype))
    u_all = jnp.concatenate(us, t_axis)
    g_all = jnp.concatenate(gs, g_axis)
    if need_x:
        dx_branch = spec.einsum(f"{spec.t_l},{spec.g_l}->{spec.x_l}", u_all, g_all)
        dx = dx_branch.astype(x.dtype) if dx is None else (dx + dx_branch).astype(x.dtype)
    dgs = [None] * n
    if need_g:
        dg_all = _dg(spec, u_all, x, g_all)
        dgs = [d.astype(g.dtype) for d, g in
               zip(jnp.split(dg_all, cuts, axis=g_axis), gs, strict=True)]
    dhs = [None] * n
    if need_h:
        ts = jnp.split(big, cuts, axis=t_axis)
        for k in range(n):
            if live[k]:
                t = ts[k] * jnp.asarray(scales[k], big.dtype)
                dhs[k] = spec.einsum(f"{spec.t_l},{spec.out_l}->{spec.h_l}", t,
                                     dys[k].astype(big.dtype),
                                     jc.explicit_sharding(hs[k])).astype(hs[k].dtype)
    dws = [None if d is None else d.astype(w.dtype) for d, w in zip(dws, ws, strict=True)]
    return dx, dws, dgs, dhs


factored_dots.defvjp(_fwd_group, _bwd_group, symbolic_zeros=True)
