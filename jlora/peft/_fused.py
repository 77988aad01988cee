"""Fused and split projections: one kernel that holds several PEFT modules
(:class:`Split`), or several kernels that one PEFT module holds (:class:`Part`).

Two exact moves, used in both directions:

* **fused -> separate**: every separate module gets the fused ``A`` and its own slice of
  ``B`` (``W_j + s·A·B[:, j]`` is the fused update's slice ``j``). When ``B`` is block
  diagonal (each part's columns fed by its own contiguous block of rank components, as
  in a fused adapter built from separate ones) each part gets just its block, so its
  own rank comes back.
* **separate -> fused**: when every part has the same ``A`` and scale (as the parts of a
  split fused adapter have), the fused adapter shares that ``A`` and concatenates the
  ``B`` s: the same rank. Otherwise the only exact fused adapter has rank
  ``r_1 + ... + r_n``: ``A`` concatenated along the rank, ``B`` block diagonal (a
  part's scale, where it differs from the first part's, goes into its block of ``B``).
  ``keep_rank=True`` refuses that instead.

A stacked axis (``s``) holds separate adapters already, so a split along it only moves
factors: exact both ways, with one rank and scale per kernel.
"""

from __future__ import annotations

import dataclasses
import math

import jax.numpy as jnp
import numpy as np

from jlora._adapter import Adapter
from jlora._jax_compat import is_tracer
from jlora.layouts import Layout
from jlora.peft._config import _alpha_for_scale

__all__ = ["Part", "Split"]


@dataclasses.dataclass(frozen=True)
class Split:
    """A kernel that holds several PEFT modules side by side along one of its axes.

    Give it as the module name of the kernel in ``names=`` (``jlora.peft.save`` and
    ``jlora.peft.load``). ``axis`` is an axis of the kernel (in its own order):

    * a stacked axis (``s`` in the layout): one module per index, e.g. the ``gemma``
      package's ``kv_einsum`` ``(2, K, D, H)`` with layout ``"soio"`` is
      ``Split(("model.layers.0.self_attn.k_proj", "model.layers.0.self_attn.v_proj"))``;
    * a fan-out axis (``o``) of a dense kernel: each module a slice of it (equal slices,
      or ``sizes``), e.g. a fused ``(in, 3·d)`` query/key/value kernel (``"io"``) is
      ``Split((q, k, v), axis=1)``.

    The names hold one ``{}`` per *other* stacked axis of the kernel, as any module name.

    Args:
      names: the PEFT module names, in the order of the parts along ``axis``.
      axis: the kernel axis the parts are stacked or concatenated along.
      sizes: for a fan-out axis, the size of each part (default: equal parts).
      keep_rank: on load, refuse modules whose factors differ rather than fuse them into
        an adapter of rank ``r_1 + ... + r_n`` (see the module docstring).

    Example:
      >>> Split(["q", "k", "v"], axis=1).names
      ('q', 'k', 'v')
    """

    names: tuple[str, ...]
    axis: int = 0
    sizes: tuple[int, ...] | None = None
    keep_rank: bool = False

    def __post_init__(self):
        names = (self.names,) if isinstance(self.names, str) else tuple(self.names)
        if len(names) < 2 or not all(isinstance(n, str) for n in names):
            raise ValueError(
                f"Split needs two or more module names (str), got {self.names!r}; a kernel "
                "that is one PEFT module takes its name as a plain str."
            )
        object.__setattr__(self, "names", names)
        if not (isinstance(self.axis, int) and not isinstance(self.axis, bool)):
            raise TypeError(f"Split `axis` must be an int (a kernel axis), got {self.axis!r}.")
        if self.sizes is not None:
            sizes = tuple(self.sizes)
            if len(sizes) != len(names) or not all(
                    isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in sizes):
                raise ValueError(
                    f"Split `sizes` must hold one positive int per name ({len(names)}), got "
                    f"{self.sizes!r}."
                )
            object.__setattr__(self, "sizes", sizes)


@dataclasses.dataclass(frozen=True)
class Part:
    """A kernel that is one slice of a fused PEFT module, e.g. separate query, key and
    value kernels for GPT-2's ``c_attn``: give each kernel
    ``Part("transformer.h.0.attn.c_attn", index)`` in ``names=``.

    The parts of one module (indices ``0 .. n-1``) are concatenated along their fan-out,
    in index order, each flattened as PEFT flattens a dense kernel; they must share the
    fan-in and the stacked axes. The name holds one ``{}`` per stacked axis.

    Args:
      name: the fused PEFT module's name.
      index: this kernel's place among the parts.
      keep_rank: on save, refuse parts whose factors differ rather than fuse them into
        an adapter of rank ``r_1 + ... + r_n`` (see the module docstring).

    Example:
      >>> Part("transformer.h.0.attn.c_attn", 2).index
      2
    """

    name: str
    index: int
    keep_rank: bool = False

    def __post_init__(self):
        if not isinstance(self.name, str):
            raise TypeError(f"Part `name` must be a module name (str), got {self.name!r}.")
        if not (isinstance(self.index, int) and not isinstance(self.index, bool)
                and self.index >= 0):
            raise ValueError(f"Part `index` must be an int >= 0, got {self.index!r}.")


# -- the two moves, on factors ----------------------------------------------------------


def _equal(x, y) -> bool:
    if is_tracer(x) or is_tracer(y):
        return False  # unknown under a trace: the general (fused-rank) form is exact anyway
    return x.shape == y.shape and x.dtype == y.dtype and bool(np.array_equal(x, y))


def _fields(first: Adapter, policies: set[str], rank: int) -> dict:
    """rank, alpha, scale and policy of an adapter with ``first``'s scale at ``rank``."""
    policy = first.policy if len(policies) == 1 else "custom"
    alpha = first.alpha
    if policy in ("standard", "rslora") and rank != first.rank:
        alpha = _alpha_for_scale(first.scale, rank, policy == "rslora")
    return dict(rank=rank, alpha=alpha, scale=first.scale, policy=policy)


def _take(x, axis: int, lo: int, hi: int):
    index = [slice(None)] * x.ndim
    index[axis] = slice(lo, hi)
    return x[tuple(index)]


def _blocks(b, rank_axis: int, out_axis: int, bounds) -> list[tuple[int, int]] | None:
    """The rank block of each part if ``b`` is block diagonal: part ``j``'s columns
    (``bounds[j]`` along ``out_axis``) fed only by rank rows ``blocks[j]``, contiguous, in
    order, none empty; else None (also under a trace, where values are unknown)."""
    if is_tracer(b):
        return None
    host = np.asarray(b)
    rank, start, out = host.shape[rank_axis], 0, []
    others = tuple(i for i in range(host.ndim) if i != rank_axis)
    for lo, hi in bounds:
        rows = np.flatnonzero(np.any(_take(host, out_axis, lo, hi) != 0, axis=others))
        if rows.size == 0 or not np.array_equal(rows, np.arange(start, start + rows.size)):
            return None
        out.append((start, start + rows.size))
        start += rows.size
    return out if start == rank else None


def split_fused(ad: Adapter, out_b: int, out_m: int, bounds) -> list[dict]:
    """The parts of a fused adapter along ``B``'s axis ``out_b`` (magnitude axis
    ``out_m``), part ``j`` being ``bounds[j]``: ``[{a, b, magnitude, rank, alpha, scale,
    policy}]``."""
    ns = ad.layout.num_stacked
    blocks = _blocks(ad.b, ns, out_b, bounds)
    parts = []
    for j, (lo, hi) in enumerate(bounds):
        a, b = ad.a, _take(ad.b, out_b, lo, hi)
        if blocks is not None:
            r0, r1 = blocks[j]
            a, b = _take(a, a.ndim - 1, r0, r1), _take(b, ns, r0, r1)
        m = None if ad.magnitude is None else _take(ad.magnitude, out_m, lo, hi)
        parts.append(dict(a=a, b=b, magnitude=m,
                          **_fields(ad, {ad.policy}, a.shape[-1])))
    return parts


def fuse(pieces: list[Adapter | None], widths: list[int], out_b: int, out_m: int,
         layout: Layout, keep_rank: bool, what: str) -> Adapter:
    """One adapter, with ``layout``, from the parts ``pieces`` (``None`` where a part has
    no adapter: its slice of the update is zero), each ``widths[j]`` wide along ``B``'s
    axis ``out_b`` (magnitude axis ``out_m``). ``what`` names the fused kernel in errors."""
    present = [p for p in pieces if p is not None]
    first = present[0]
    ns = layout.num_stacked
    policies = {p.policy for p in present}
    for p in present:
        if (p.variant, p.dropout) != (first.variant, first.dropout):
            raise ValueError(
                f"The parts of {what} mix variants or dropout rates ({first.variant!r}, "
                f"{first.dropout} and {p.variant!r}, {p.dropout}); one adapter has one of each."
            )
    if first.variant != "lora" and len(present) < len(pieces):
        raise ValueError(
            f"{what}: {len(pieces) - len(present)} of its {len(pieces)} parts have no "
            f"adapter, and a {first.variant!r} adapter cannot leave a part as it is without "
            "its base weights. Adapt every part, or none."
        )
    shared = (len(present) == len(pieces)
              and all(p.scale == first.scale and p.policy == first.policy
                      and p.alpha == first.alpha and _equal(p.a, first.a) for p in present))
    if shared:
        a, rank = first.a, first.rank
        b = jnp.concatenate([p.b for p in present], axis=out_b)
    else:
        rank = sum(p.rank for p in present)
        if keep_rank:
            ranks = [None if p is None else p.rank for p in pieces]
            raise ValueError(
                f"{what}: its parts (ranks {ranks}) have different lora_A factors or scales, "
                f"so no adapter of one part's rank gives all their updates. The exact fused "
                f"adapter has rank {rank} (A concatenated, B block diagonal); drop "
                "keep_rank=True to get it."
            )
        a = jnp.concatenate([p.a for p in present], axis=-1)
        rows = []  # one block of rank rows per present part, zero outside its own columns
        for j, p in enumerate(pieces):
            if p is None:
                continue
            scaled = p.b if p.scale == first.scale else p.b * (p.scale / first.scale)
            rows.append(jnp.concatenate([
                scaled if k == j else
                jnp.zeros((*p.b.shape[:out_b], w, *p.b.shape[out_b + 1:]), p.b.dtype)
                for k, w in enumerate(widths)], axis=out_b))
        b = jnp.concatenate(rows, axis=ns)
    magnitude = None
    if first.magnitude is not None:
        # the parts share one variant (checked above), so each has its magnitude
        magnitude = jnp.concatenate([p.magnitude for p in present if p.magnitude is not None],
                                    axis=out_m)
    return Adapter(a=a, b=b, magnitude=magnitude, layout=layout, variant=first.variant,
                   dropout=first.dropout, **_fields(first, policies, rank))


# -- kernels and their parts -------------------------------------------------------------


def kernel_axis(axis: int, layout: Layout, path: str) -> int:
    """``axis`` of the kernel at ``path`` (negative counts from the end), checked."""
    if not -layout.ndim <= axis < layout.ndim:
        raise ValueError(
            f"Split axis {axis} is out of range for the kernel at path {path!r} (layout "
            f"{layout.axes!r}, {layout.ndim} axes)."
        )
    return axis % layout.ndim


def bounds(spec: Split, layout: Layout, axis: int, size: int, path: str):
    """``[(lo, hi)]`` of each part along a fan-out ``axis`` of ``size``."""
    letter = layout.axes[axis]
    if letter != "o" or layout.kind != "dense":
        raise ValueError(
            f"Split axis {axis} of the kernel at path {path!r} has role {letter!r} in its "
            f"layout {layout.axes!r}: a split runs along a stacked axis ('s', one module per "
            "index) or a fan-out axis ('o') of a dense kernel."
        )
    n = len(spec.names)
    sizes = spec.sizes or ((size // n,) * n if size % n == 0 else None)
    if sizes is None or sum(sizes) != size:
        got = (f"which the sizes {spec.sizes} do not add up to" if spec.sizes else
               f"which does not divide into {n} equal parts")
        raise ValueError(
            f"The kernel at path {path!r} has size {size} along split axis {axis}, {got}. "
            f"Give `sizes=` with one size per module ({list(spec.names)})."
        )
    edges = np.cumsum((0, *sizes))
    return [(int(lo), int(hi)) for lo, hi in zip(edges[:-1], edges[1:], strict=True)]


def stacked_parts(spec: Split, layout: Layout, axis: int, size: int, path: str) -> Layout:
    """One part's layout when ``axis`` is stacked (checking one module per index)."""
    if size != len(spec.names):
        raise ValueError(
            f"Stacked axis {axis} of the kernel at path {path!r} has size {size} but the "
            f"Split names {len(spec.names)} modules {list(spec.names)}: give one per index."
        )
    return Layout(layout.axes[:axis] + layout.axes[axis + 1:], guessed=layout.guessed)


def split_for_export(path: str, ad: Adapter, spec: Split) -> list[tuple[str, Adapter, str]]:
    """``[(part path, adapter, module name)]`` of a kernel that :class:`Split` describes."""
    lay, ns = ad.layout, ad.layout.num_stacked
    axis = kernel_axis(spec.axis, lay, path)
    size = ad.kernel_shape[axis]
    if lay.axes[axis] == "s":
        inner = stacked_parts(spec, lay, axis, size, path)
        t = lay.stacked_axes.index(axis)
        out = []
        for j, name in enumerate(spec.names):
            m = None if ad.magnitude is None else jnp.take(ad.magnitude, j, axis=t)
            out.append((part_path(path, j), ad.replace(
                a=jnp.take(ad.a, j, axis=t), b=jnp.take(ad.b, j, axis=t), magnitude=m,
                layout=inner), name))
        return out
    edges = bounds(spec, lay, axis, size, path)  # checks the axis is a fan-out axis
    t = lay.fan_out_axes.index(axis)
    parts = split_fused(ad, ns + 1 + t, ns + t, edges)
    return [(part_path(path, j), ad.replace(**p), name)
            for j, (p, name) in enumerate(zip(parts, spec.names, strict=True))]


def part_path(path: str, j: int) -> str:
    """The path under which part ``j`` of the kernel at ``path`` is read and written."""
    return f"{path}[{j}]"


def check_parts(name: str, members: list, what: str) -> list:
    """``members`` (``(index, path, ...)``) of the fused module ``name`` in index order,
    checked to be exactly ``0 .. n-1``."""
    members = sorted(members, key=lambda m: m[0])
    indices = [m[0] for m in members]
    if indices != list(range(len(members))):
        paths = {m[0]: m[1] for m in members}
        raise ValueError(
            f"The Part indices of module {name!r} must be 0 .. n-1, each once; {what} gives "
            f"{paths}."
        )
    return members


def fuse_for_export(name: str, members: list) -> tuple[str, Adapter]:
    """``(path, adapter)`` of the fused module ``name`` from its parts' adapters
    ``[(index, path, adapter, keep_rank)]``."""
    members = check_parts(name, members, "`adapters`")
    first_path, first = members[0][1], members[0][2]
    ns = first.layout.num_stacked
    pieces = []
    for _, path, ad, _ in members:
        if ad.layout.kind != "dense" or ad.layout.num_stacked != ns or \
                ad.a.shape[:-1] != first.a.shape[:-1]:
            raise ValueError(
                f"The parts of module {name!r} must be dense kernels with the same stacked and "
                f"fan-in axes: path {first_path!r} has layout {first.layout.axes!r} and "
                f"factor A {tuple(first.a.shape)}, path {path!r} layout {ad.layout.axes!r} "
                f"and A {tuple(ad.a.shape)}."
            )
        a2, b2 = ad.layout.factor_matrices(ad.a, ad.b)
        m = None if ad.magnitude is None else ad.magnitude.reshape(*b2.shape[:ns], -1)
        pieces.append(ad.replace(a=a2, b=b2, magnitude=m))
    layout = Layout("s" * ns + "io")
    where = f"module {name!r} (paths {[m[1] for m in members]})"
    widths = [p.b.shape[-1] for p in pieces]
    fused = fuse(pieces, widths, ns + 1, ns, layout, any(m[3] for m in members), where)
    return "|".join(m[1] for m in members), fused


def fused_shape(name: str, members: list) -> tuple[tuple[int, ...], Layout]:
    """The shape and layout of the fused module ``name``'s kernel, from its parts
    ``[(index, path, shape, layout, keep_rank)]``: ``(*stacked, in, sum of outs)``."""
    first_path, first_shape, first_layout = members[0][1:4]
    stacked, fan_in, _ = first_layout.split_shape(first_shape)
    outs = []
    for _, path, shape, layout, _ in members:
        s, i, o = layout.split_shape(shape)
        if layout.kind != "dense" or (s, i) != (stacked, fan_in):
            raise ValueError(
                f"The parts of module {name!r} must be dense kernels with the same stacked and "
                f"fan-in axes: path {first_path!r} (shape {tuple(first_shape)}, layout "
                f"{first_layout.axes!r}) and path {path!r} (shape {tuple(shape)}, layout "
                f"{layout.axes!r}) differ."
            )
        outs.append(math.prod(o))
    guessed = any(m[3].guessed for m in members)
    return (*stacked, math.prod(fan_in), sum(outs)), Layout("s" * len(stacked) + "io",
                                                            guessed=guessed)


def split_for_import(path: str, shape, layout: Layout, spec: Split) -> list[tuple]:
    """``[(part path, part shape, part layout, module name)]`` of a kernel that
    :class:`Split` describes, read from a PEFT directory."""
    axis = kernel_axis(spec.axis, layout, path)
    shape = tuple(shape)
    if layout.axes[axis] == "s":
        inner = stacked_parts(spec, layout, axis, shape[axis], path)
        part_shape = shape[:axis] + shape[axis + 1:]
        return [(part_path(path, j), part_shape, inner, name)
                for j, name in enumerate(spec.names)]
    out = []
    for j, ((lo, hi), name) in enumerate(zip(bounds(spec, layout, axis, shape[axis], path),
                                             spec.names, strict=True)):
        out.append((part_path(path, j), shape[:axis] + (hi - lo,) + shape[axis + 1:], layout,
                    name))
    return out


def assemble_split(path: str, shape, layout: Layout, spec: Split, pieces: list) -> Adapter:
    """The adapter of the kernel at ``path`` from its parts' adapters (``None`` where the
    file has no module), the inverse of :func:`split_for_export`."""
    axis = kernel_axis(spec.axis, layout, path)
    present = [p for p in pieces if p is not None]
    first = present[0]
    names = [n for n, p in zip(spec.names, pieces, strict=True) if p is not None]
    if layout.axes[axis] != "s":
        t = layout.fan_out_axes.index(axis)
        ns = layout.num_stacked
        widths = [hi - lo for lo, hi in bounds(spec, layout, axis, tuple(shape)[axis], path)]
        return fuse(pieces, widths, ns + 1 + t, ns + t, layout, spec.keep_rank,
                    f"the kernel at path {path!r} (modules {list(spec.names)})")
    for field in ("rank", "scale", "policy", "variant", "dropout"):
        values = {getattr(p, field) for p in present}
        if len(values) > 1:
            fix = (f" Give the kernel a layout with 'o' for axis {axis} (e.g. "
                   f"{layout.axes[:axis] + 'o' + layout.axes[axis + 1:]!r}) to load them as "
                   "one adapter of their summed rank." if layout.kind == "dense" else "")
            raise ValueError(
                f"The modules {names} of the kernel at path {path!r} have different "
                f"{field}s ({sorted(map(str, values))}), but its stacked axis {axis} (layout "
                f"{layout.axes!r}) holds one adapter with one {field}.{fix}"
            )
    if first.variant != "lora" and len(present) < len(pieces):
        missing = [n for n, p in zip(spec.names, pieces, strict=True) if p is None]
        raise ValueError(
            f"The kernel at path {path!r} has no adapter for module(s) {missing} in the file, "
            f"and a {first.variant!r} adapter cannot leave them as they are without the base "
            "weights."
        )
    t = layout.stacked_axes.index(axis)

    def stack(field):
        parts = [getattr(p, field) if p is not None else None for p in pieces]
        if parts[pieces.index(first)] is None:
            return None
        like = getattr(first, field)
        return jnp.stack([x if x is not None else jnp.zeros_like(like) for x in parts], axis=t)

    return first.replace(a=stack("a"), b=stack("b"), magnitude=stack("magnitude"),
                         layout=layout)


def split_fused_for_import(fused: Adapter, members: list) -> dict[str, Adapter]:
    """``{path: adapter}`` of the parts ``[(index, path, shape, layout, keep_rank)]`` of a
    fused module read from a PEFT directory, the inverse of :func:`fuse_for_export`."""
    ns = fused.layout.num_stacked
    outs = [math.prod(m[3].split_shape(m[2])[2]) for m in members]
    edges = np.cumsum((0, *outs))
    parts = split_fused(fused, ns + 1, ns, list(zip(edges[:-1], edges[1:], strict=True)))
    out = {}
    for (_, path, shape, layout, _), part in zip(members, parts, strict=True):
        stacked, fan_in, fan_out = layout.split_shape(shape)
        rank = part["rank"]
        m = part["magnitude"]
        out[path] = fused.replace(
            a=part["a"].reshape(*stacked, *fan_in, rank),
            b=part["b"].reshape(*stacked, rank, *fan_out),
            magnitude=None if m is None else m.reshape(*stacked, *fan_out),
            layout=layout, **{k: part[k] for k in ("rank", "alpha", "scale", "policy")})
    return out
