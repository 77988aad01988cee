"""Grouped low-rank products: ``ragged_dot`` with factored expert kernels, and one batch
split over many adapters.

**Expert kernels.** A mixture-of-experts layer multiplies tokens sorted by expert with
``jax.lax.ragged_dot(x, W, group_sizes)``, ``W: (E, in, out)``. With per-expert factors
``A: (E, in, r)`` and ``B: (E, r, out)`` the transform computes
:func:`factored_ragged_dot`::

    y = ragged_dot(x, W) + s·ragged_dot(ragged_dot(x, A), B)      (same group sizes)

whose backward pass is written by hand, as ``_factored_ops.factored_dot``'s: with
``u = s·(dy ragged· Bᵀ)`` (``rows × r``), ``dx = dy·Wᵀ + u·Aᵀ``, ``dA = xᵀ·u`` and
``dB = tᵀ·dy`` per expert (ragged contractions: ``(E, in, r)`` and ``(E, r, out)``, never
``E×in×out``), the residuals are ``x`` and the thin ``t = s·(x·A)``, and the frozen
kernel's own cotangent is computed only when asked for.

**Many adapters in one batch** (:func:`bank_branch`): requests sorted by adapter, the
adapters' ``A`` concatenated along the rank axis (``g_cat``), their scaled ``B`` likewise
(``h_cat``). Adapter ``k`` has its own rank ``r_k``; no adapter is padded to the largest.
The rank axis is cut into *levels* at the distinct ranks (``r = 8, 16, 64`` gives columns
``[0, 8)``, ``[8, 16)``, ``[16, 64)``); a level is one ``ragged_dot`` over the rows of the
adapters that have those columns. Banks keep adapters in order of decreasing rank, so
those rows come first and every later row (other adapters, rows without an adapter)
lies beyond the level's group sizes: it costs nothing there. Each row thus meets exactly
its own adapter's ``r_k`` columns. The function is a ``jax.custom_batching.custom_vmap``:
it is written for one example and its adapter id, and its batched rule (under the
``vmap`` over examples that ``jlora.multi_adapter.grouped`` runs) is the ragged form.
Its derivative is JAX's (ragged contractions again; ``vmap`` runs inside ``grad``).

Example:
  >>> import jax, jax.numpy as jnp
  >>> from jlora import _jax_compat as jc
  >>> dims = jc.RaggedDims((1,), (1,), (), (), (0,), (0,))
  >>> x, w = jnp.ones((3, 2)), jnp.ones((2, 2, 4))
  >>> a, b = jnp.ones((2, 2, 1)), jnp.ones((2, 1, 4))
  >>> spec = RaggedSpec(dims, dims, jc.RaggedDims((1,), (1,), (), (), (0,), (0,)), 0.5)
  >>> factored_ragged_dot(spec, x, None, w, a, b, jnp.array([1, 2]))[0, 0].item()  # 2 + 0.5·2
  3.0
"""

from __future__ import annotations

import dataclasses
import functools
import string
from typing import Any

import jax
import jax.numpy as jnp
from jax.custom_batching import custom_vmap
from jax.custom_derivatives import SymbolicZero

from jlora import _jax_compat as jc
from jlora._factored_ops import Needed

__all__ = ["BankSpec", "RaggedSpec", "bank_branch", "factored_ragged_dot", "levels",
           "thin_ragged"]


# -- thin ragged products ------------------------------------------------------------------
#
# XLA lowers ragged_dot to a grouped matmul on TPU only; elsewhere (CPU, and GPU in
# current releases) it becomes one dense product per group with the other rows zeroed,
# through a materialised zero-padded copy of its lhs (groups × rows × in), and its ragged
# contraction (a weight gradient) pads both operands. For the thin products of the
# adapters the same FLOPs fit in plain matmuls without those copies: the lhs times every
# group's factor, then each row keeps its group's columns (``_select``: x·A), or the thin
# lhs spread over the groups first (``_spread``: t·B). Their transposes (dA, dB, dx) are
# thin too. ``jax.lax.platform_dependent`` keeps ragged_dot for TPU, at lowering.


def _row_groups(group_sizes, rows: int):
    """``(rows, groups)`` one-hot of each row's group (rows past the groups: none)."""
    ids = jnp.searchsorted(jnp.cumsum(group_sizes), jnp.arange(rows), side="right",
                           method="compare_all")
    return jax.nn.one_hot(ids, group_sizes.shape[0])


def _free(ndim: int, *used) -> list[int]:
    return [k for k in range(ndim) if not any(k in u for u in used)]


def _select(dims: jc.RaggedDims, lhs, rhs, group_sizes, precision=None,
            preferred_element_type=None):
    """``ragged_dot`` as ``lhs·rhs`` for every group, then each row's own group."""
    (lr,), (rg,) = dims.lhs_ragged, dims.rhs_group
    full = jax.lax.dot_general(lhs, rhs, ((dims.lhs_contract, dims.rhs_contract),
                                          (dims.lhs_batch, dims.rhs_batch)),
                               precision=precision,
                               preferred_element_type=preferred_element_type)
    lhs_free = _free(lhs.ndim, dims.lhs_contract, dims.lhs_batch)
    rhs_free = _free(rhs.ndim, dims.rhs_contract, dims.rhs_batch)
    nb = len(dims.lhs_batch)
    row_at, group_at = nb + lhs_free.index(lr), nb + len(lhs_free) + rhs_free.index(rg)
    shape = [1] * full.ndim
    shape[row_at], shape[group_at] = lhs.shape[lr], rhs.shape[rg]
    mask = _row_groups(group_sizes, lhs.shape[lr]).astype(full.dtype).reshape(shape)
    return jnp.sum(full * mask, axis=group_at)


def _spread(dims: jc.RaggedDims, lhs, rhs, group_sizes, precision=None,
            preferred_element_type=None):
    """``ragged_dot`` as the lhs spread over the groups (zero outside each row's own),
    contracted with the rhs over the groups as well."""
    (lr,), (rg,) = dims.lhs_ragged, dims.rhs_group
    shape = [1] * lhs.ndim + [rhs.shape[rg]]
    shape[lr] = lhs.shape[lr]
    mask = _row_groups(group_sizes, lhs.shape[lr]).astype(lhs.dtype).reshape(shape)
    spread = lhs[..., None] * mask
    contract = ((*dims.lhs_contract, lhs.ndim), (*dims.rhs_contract, rg))
    return jax.lax.dot_general(spread, rhs, (contract, (dims.lhs_batch, dims.rhs_batch)),
                               precision=precision,
                               preferred_element_type=preferred_element_type)


def thin_ragged(dims: jc.RaggedDims, lhs, rhs, group_sizes, *, spread: bool,
                precision=None, preferred_element_type=None):
    """``ragged_dot_general`` for a product with a factor (one group axis, 1-D group
    sizes): a ragged product on TPU, plain matmuls elsewhere (``spread``: the lhs is the
    thin one; see the comment above).

    Example:
      >>> dims = jc.RaggedDims((1,), (1,), (), (), (0,), (0,))
      >>> x, a, gs = jnp.ones((3, 2)), jnp.arange(8.0).reshape(2, 2, 2), jnp.array([1, 1])
      >>> thin_ragged(dims, x, a, gs, spread=False).tolist()   # row 2 is in no group
      [[2.0, 4.0], [10.0, 12.0], [0.0, 0.0]]
    """
    dense = _spread if spread else _select
    kw = dict(precision=precision, preferred_element_type=preferred_element_type)
    if group_sizes.ndim != 1 or len(dims.rhs_group) != 1:
        return jc.ragged_dot(lhs, rhs, group_sizes, dims, **kw)
    return jax.lax.platform_dependent(
        lhs, rhs, group_sizes,
        tpu=lambda lhs, rhs, gs: jc.ragged_dot(lhs, rhs, gs, dims, **kw),
        default=lambda lhs, rhs, gs: dense(dims, lhs, rhs, gs, **kw))


# -- expert kernels ------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class RaggedSpec:
    """Static description of one factored ``ragged_dot`` (a ``nondiff_argnums`` argument).

    ``base`` multiplies the input with W, ``first`` the input with the factor next to it
    (``g``: A for a fan-in contraction) into ``t``, ``second`` ``t`` with the other factor
    (``h``) into the branch, which has the base's shape and axis order.
    """

    base: jc.RaggedDims
    first: jc.RaggedDims
    second: jc.RaggedDims
    scale: float
    precision: Any = None
    preferred_element_type: Any = None

    def ragged(self, dims: jc.RaggedDims, lhs, rhs, group_sizes):
        """The base product (the model's own ``ragged_dot``)."""
        return jc.ragged_dot(lhs, rhs, group_sizes, dims, precision=self.precision,
                             preferred_element_type=self.preferred_element_type)

    def first_product(self, x, g, group_sizes):
        """``t = x·g`` per group (unscaled)."""
        return thin_ragged(self.first, x, g, group_sizes, spread=False,
                           precision=self.precision,
                           preferred_element_type=self.preferred_element_type)

    def second_product(self, t, h, group_sizes):
        """``t·h`` per group: the branch, in the base's shape."""
        return thin_ragged(self.second, t, h, group_sizes, spread=True,
                           precision=self.precision,
                           preferred_element_type=self.preferred_element_type)


def _forward(spec: RaggedSpec, x, x_in, w, g, h, group_sizes):
    base = spec.ragged(spec.base, x, w, group_sizes)
    t = spec.first_product(x if x_in is None else x_in, g, group_sizes)
    t = t * jnp.asarray(spec.scale, t.dtype)
    branch = spec.second_product(t, h, group_sizes)
    return base + branch.astype(base.dtype), t


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def factored_ragged_dot(spec: RaggedSpec, x, x_in, w, g, h, group_sizes):
    """``ragged(x, W) + s·ragged(ragged(x_in, g), h)``; ``x_in`` is ``x`` with dropout, or
    None (= ``x``). See the module docstring for the backward pass."""
    return _forward(spec, x, x_in, w, g, h, group_sizes)[0]


def _fwd(spec, x, x_in, w, g, h, group_sizes):
    # symbolic_zeros=True: skip what nobody differentiates (W's expert-sized gradient).
    needed = Needed(x.perturbed, x_in is not None and x_in.perturbed, w.perturbed,
                     g.perturbed, h.perturbed)
    x, w, g, h, group_sizes = x.value, w.value, g.value, h.value, group_sizes.value
    x_in = None if x_in is None else x_in.value
    y, t = _forward(spec, x, x_in, w, g, h, group_sizes)
    return y, (needed, x, x_in, w, g, h, group_sizes, t)


def _pullback(fn, primal, ct):
    """The cotangent of ``fn``'s (linear) argument: its transpose alone, no forward pass."""
    out = jax.eval_shape(fn, primal)
    (grad,) = jax.linear_transpose(fn, primal)(ct.astype(out.dtype))
    return grad.astype(primal.dtype)


def _bwd(spec, res, dy):
    needed, x, x_in, w, g, h, gs, t = res
    if isinstance(dy, SymbolicZero):
        return None, None, None, None, None, None
    dx = dx_in = dw = dg = dh = None
    if needed.x:
        dx = _pullback(lambda v: spec.ragged(spec.base, v, w, gs), x, dy)
    if needed.w:
        dw = _pullback(lambda v: spec.ragged(spec.base, x, v, gs), w, dy)
    # u = s·(dy ragged· hᵀ): the cotangent of the unscaled thin product.
    u = _pullback(lambda v: spec.second_product(v, h, gs), t, dy)
    u = u * jnp.asarray(spec.scale, u.dtype)
    src = x if x_in is None else x_in
    if needed.x if x_in is None else needed.x_in:
        branch_dx = _pullback(lambda v: spec.first_product(v, g, gs), src, u)
        if x_in is None:
            dx = dx + branch_dx
        else:
            dx_in = branch_dx
    if needed.g:
        dg = _pullback(lambda v: spec.first_product(src, v, gs), g, u)
    if needed.h:
        dh = _pullback(lambda v: spec.second_product(t, v, gs), h, dy)
    return dx, dx_in, dw, dg, dh, None


factored_ragged_dot.defvjp(_fwd, _bwd, symbolic_zeros=True)


# -- many adapters in one batch ------------------------------------------------------------


def levels(ranks: tuple[int, ...]) -> list[tuple[int, int, int]]:
    """``[(lo, hi, n)]``: rank columns ``[lo, hi)`` are one ragged product over the first
    ``n`` adapters (every adapter with a rank above ``lo`` is among them).

    Example:
      >>> levels((64, 16, 16, 8, 0))
      [(0, 8, 4), (8, 16, 3), (16, 64, 1)]
    """
    cuts = sorted({r for r in ranks if r > 0})
    out, lo = [], 0
    for hi in cuts:
        n = 1 + max(k for k, r in enumerate(ranks) if r > lo)
        out.append((lo, hi, n))
        lo = hi
    return out


@dataclasses.dataclass(frozen=True)
class BankSpec:
    """Static description of one dot with a bank's factors (einsum letters from the
    transform's dot plan: input, ``g_cat``, thin product, ``h_cat``, output; the rank
    letter; each adapter's rank in bank order)."""

    x_l: str
    g_l: str
    t_l: str
    h_l: str
    out_l: str
    r_l: str
    ranks: tuple[int, ...]
    precision: Any = None
    preferred_element_type: Any = None

    def einsum(self, spec: str, a, b):
        return jnp.einsum(spec, a, b, precision=self.precision,
                          preferred_element_type=self.preferred_element_type)


def _one_example(spec: BankSpec, x, gid, g, h):
    """One example with adapter ``gid`` (no adapter when out of range): the columns of
    every other adapter are masked out. What the batched rule computes, per example."""
    owner = jnp.repeat(jnp.arange(len(spec.ranks)), jnp.asarray(spec.ranks),
                       total_repeat_length=sum(spec.ranks))
    t = spec.einsum(f"{spec.x_l},{spec.g_l}->{spec.t_l}", x, g)
    mask = (owner == gid).astype(t.dtype)
    t = t * mask.reshape([-1 if c == spec.r_l else 1 for c in spec.t_l])
    return spec.einsum(f"{spec.t_l},{spec.h_l}->{spec.out_l}", t, h)


def _level_factor(mat, ranks, lo, hi, n, axis):
    """Columns (``axis=1``) or rows (``axis=0``) ``[lo, hi)`` of each of the first ``n``
    adapters' blocks of ``mat``, zero-padded where an adapter's rank ends inside them,
    stacked: ``(n, in, hi - lo)`` or ``(n, hi - lo, out)``."""
    blocks, start = [], 0
    for r in ranks[:n]:
        take = jax.lax.slice_in_dim(mat, start + min(lo, r), start + min(hi, r), axis=axis)
        if take.shape[axis] < hi - lo:
            pad = [(0, 0), (0, 0)]
            pad[axis] = (0, (hi - lo) - take.shape[axis])
            take = jnp.pad(take, pad)
        blocks.append(take)
        start += r
    return jnp.stack(blocks)


# jax.lax.ragged_dot's own dimension numbers: (rows, in) with (groups, in, out).
_PLAIN = jc.RaggedDims((1,), (1,), (), (), (0,), (0,))


def _levels(spec: BankSpec, x2, rows, g2, h2, ragged: bool):
    """Rows ``x2 (rows, in)`` through the rank levels (``rows``: rows per adapter):
    ragged products (TPU), or their plain-matmul forms."""
    kw = dict(precision=spec.precision, preferred_element_type=spec.preferred_element_type)
    out = jnp.zeros((x2.shape[0], h2.shape[1]), x2.dtype)
    for lo, hi, n in levels(spec.ranks):
        a = _level_factor(g2, spec.ranks, lo, hi, n, 1)
        b = _level_factor(h2, spec.ranks, lo, hi, n, 0)
        if ragged:
            y = jc.ragged_dot(jc.ragged_dot(x2, a, rows[:n], _PLAIN, **kw), b, rows[:n],
                              _PLAIN, **kw)
        else:
            y = _spread(_PLAIN, _select(_PLAIN, x2, a, rows[:n], **kw), b, rows[:n], **kw)
        out = out + y.astype(out.dtype)
    return out


def _gathered(spec: BankSpec, x3, gs, g2, h2):
    """Examples ``x3 (examples, rows, in)``, each with its adapter's factors gathered and
    zero-padded to the largest rank (a batched matmul per example)."""
    top = max(spec.ranks)
    blocks_a, blocks_b, start = [], [], 0
    for r in (*spec.ranks, 0):  # a zero adapter last, for examples without one
        blocks_a.append(jnp.pad(g2[:, start:start + r], [(0, 0), (0, top - r)]))
        blocks_b.append(jnp.pad(h2[start:start + r], [(0, top - r), (0, 0)]))
        start += r
    ids = jnp.searchsorted(jnp.cumsum(gs), jnp.arange(x3.shape[0]), side="right",
                           method="compare_all")
    a, b = jnp.stack(blocks_a)[ids], jnp.stack(blocks_b)[ids]
    t = spec.einsum("efc,ecr->efr", x3, a)
    return spec.einsum("efr,ero->efo", t, b).reshape(-1, h2.shape[1])


def _gather_is_cheaper(spec: BankSpec, rows_per_example: int) -> bool:
    """Without grouped matmuls, the levels' plain forms cost every adapter's rank per
    row; gathering costs the largest rank per row plus moving the gathered factors (one
    set per example, weighed as 16 rows' worth of work)."""
    columns = sum(n * (hi - lo) for lo, hi, n in levels(spec.ranks))
    return max(spec.ranks) * (rows_per_example + 16) < columns * rows_per_example


def _batched(spec: BankSpec, xs, gs, g, h):
    """All examples at once: ``xs`` has the example axis first, ``gs`` examples per
    adapter (in bank order; the rest have none)."""
    contracted = [c for c in spec.x_l if c in spec.g_l]
    free = [c for c in spec.x_l if c not in contracted]
    h_out = [c for c in spec.h_l if c != spec.r_l]
    b_l = next(c for c in string.ascii_letters if c not in spec.x_l + spec.h_l + spec.g_l)
    x_l = b_l + spec.x_l
    xt = jnp.transpose(xs, [x_l.index(c) for c in (b_l, *free, *contracted)])
    rows_per_example = 1
    for c in free:
        rows_per_example *= xs.shape[x_l.index(c)]
    in_size = g.size // g.shape[spec.g_l.index(spec.r_l)]
    x3 = xt.reshape(xt.shape[0], rows_per_example, in_size)
    g2 = jnp.transpose(g, [spec.g_l.index(c) for c in (*contracted, spec.r_l)])
    g2 = g2.reshape(in_size, -1)
    h2 = jnp.transpose(h, [spec.h_l.index(c) for c in (spec.r_l, *h_out)])
    h2 = h2.reshape(h2.shape[0], -1)
    if not any(spec.ranks):  # no adapter has this kernel
        out = jnp.zeros((x3.shape[0] * rows_per_example, h2.shape[1]), xs.dtype)
    else:
        rows = (gs * rows_per_example).astype(jnp.int32)
        x2 = x3.reshape(-1, in_size)
        if _gather_is_cheaper(spec, rows_per_example):
            def elsewhere(x2, rows, g2, h2):
                return _gathered(spec, x2.reshape(x3.shape), gs, g2, h2)
        else:
            def elsewhere(x2, rows, g2, h2):
                return _levels(spec, x2, rows, g2, h2, ragged=False)
        out = jax.lax.platform_dependent(
            x2, rows, g2, h2, tpu=lambda *a: _levels(spec, *a, ragged=True), default=elsewhere)
    shape = [xt.shape[k] for k in range(1 + len(free))]
    shape += [h.shape[spec.h_l.index(c)] for c in h_out]
    out = out.reshape(shape)
    have = [b_l, *free, *h_out]
    return jnp.transpose(out, [have.index(c) for c in b_l + spec.out_l])


@functools.lru_cache(maxsize=512)
def _bank_fn(spec: BankSpec):
    @custom_vmap
    def branch(x, gid, gs, g, h):
        del gs  # one example: its adapter is gid
        return _one_example(spec, x, gid, g, h)

    @branch.def_vmap
    def rule(axis_size, in_batched, x, gid, gs, g, h):
        x_b, _, gs_b, g_b, h_b = in_batched
        if x_b and not (gs_b or g_b or h_b):
            return _batched(spec, x, gs, g, h), True
        # Banks themselves mapped over (an outer vmap): example by example.
        axes = [0 if b else None for b in in_batched]
        one = functools.partial(_one_example, spec)
        return jax.vmap(lambda x, gid, gs, g, h: one(x, gid, g, h),
                        in_axes=axes)(x, gid, gs, g, h), True

    return branch


def bank_branch(spec: BankSpec, x, gid, group_sizes, g_cat, h_cat):
    """``s_k·((x·A_k)·B_k)`` for an example of adapter ``gid`` (scales inside ``h_cat``).

    Under ``jax.vmap`` over examples sorted by adapter (``group_sizes`` of them per
    adapter, in bank order, then examples without one), it runs as ragged products, one
    per rank level (see :func:`levels`).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> spec = BankSpec("ab", "bz", "az", "zc", "ac", "z", (2, 1))
      >>> g, h = jnp.ones((3, 3)), jnp.ones((3, 2))          # ranks 2 and 1, concatenated
      >>> xs, gs = jnp.ones((3, 1, 3)), jnp.array([1, 1])     # one example each, one without
      >>> ys = jax.vmap(lambda x, i: bank_branch(spec, x, i, gs, g, h))(xs, jnp.arange(3))
      >>> ys[:, 0, 0].tolist()
      [6.0, 3.0, 0.0]
    """
    return _bank_fn(spec)(x, gid, group_sizes, g_cat, h_cat)
