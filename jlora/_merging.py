"""`merge` / `unmerge`: dense weights in, dense weights out.

``merge(params, adapters)`` replaces each adapted kernel ``W`` with ``W + s · A @ B``
(DoRA: ``m · (W + s·A@B) / ‖W + s·A@B‖``; each adapter's variant says how), computed in
float32 and cast back to the kernel's dtype, so bf16 kernels do not lose the update to
bf16 accumulation. Kernels may store their axes in any order (see :mod:`jlora.layouts`).
Pure and jittable; the params tree keeps its structure and every other leaf.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from jlora import _paths as paths_lib
from jlora._adapter import Adapter, Adapters, check_adapters
from jlora._variant import get_variant
from jlora.layouts import Layout

__all__ = ["check_adapters_fit", "delta", "merge", "safe_merge", "unmerge"]


def check_adapters_fit(params, adapters: Adapters) -> dict:
    """Check every adapter has a kernel of the right shape in ``params``.

    Returns the flat ``{path: leaf}`` of ``params``. Raises ``ValueError`` naming the path
    and both shapes when an adapter does not fit (adapters from another model).

    Example:
      >>> import jax, jax.numpy as jnp, jlora
      >>> p = {"d": {"kernel": jnp.ones((3, 2))}}
      >>> ads = jlora.init(jax.random.key(0), p, jlora.LoraConfig(rank=1))
      >>> sorted(check_adapters_fit(p, ads))
      ['d/kernel']
    """
    check_adapters(adapters)
    flat = paths_lib.select(params, ".*", allow_empty=True)
    for path, adapter in adapters.items():
        adapter.validate(path)
        get_variant(adapter.variant).check(adapter, path)
        if path not in flat:
            near = ", ".join(repr(p) for p in paths_lib.nearest_paths(path, flat, n=3))
            raise ValueError(
                f"The adapter for path {path!r} has no kernel in the params tree (adapters "
                f"from another model?). Closest real paths: {near}."
            )
        kernel_shape = tuple(getattr(flat[path], "shape", ()))
        if kernel_shape != adapter.kernel_shape:
            raise ValueError(
                f"The adapter for path {path!r} fits a kernel of shape {adapter.kernel_shape} "
                f"but the kernel there has shape {kernel_shape}."
            )
    return flat


def delta(adapters: Adapters) -> dict:
    """``{path: s · A @ B}`` in each kernel's shape, float32: the low-rank update every
    variant shares (DoRA's norm, which needs the kernel, not applied).

    Example:
      >>> import jax, jax.numpy as jnp, jlora
      >>> ads = jlora.init(jax.random.key(0), {"k": jnp.ones((3, 2))},
      ...                  jlora.LoraConfig(rank=1, targets="k"))
      >>> jlora.delta(ads)["k"].shape
      (3, 2)
    """
    check_adapters(adapters)
    return {path: adapter.delta() for path, adapter in adapters.items()}


# Largest float32 update formed at once. Bigger kernels (or stacks of them) are updated
# in place, one slice at a time, so a donated merge never holds a second copy of a big
# kernel (or a float32 copy of a bf16 one) as a temporary.
MAX_UPDATE_BYTES = 16 * 2**20


def _updated_kernel(kernel: jax.Array, adapter: Adapter, sign: float) -> jax.Array:
    """``kernel`` merged (``sign=+1``) or unmerged (``-1``) by its adapter's variant."""
    variant = get_variant(adapter.variant)
    return variant.merge(kernel, adapter) if sign > 0 else variant.unmerge(kernel, adapter)


def _slicing(shape, layout: Layout, whole_fan_in: bool):
    """How to cut a kernel into slices whose float32 update fits ``MAX_UPDATE_BYTES``.

    Every stacked axis is walked one index at a time. Then the other axes a slice may
    cut (all of them, or only the fan-out axes when the variant needs the whole fan-in)
    are walked in the kernel's order, the outermost first, until the rest of the slice
    fits; the axis where it first fits is cut into blocks of the largest size dividing
    it. Returns ``(walked axes, (blocked axis, block size) or None)``.
    """
    limit = max(1, MAX_UPDATE_BYTES // 4)
    walked = list(layout.stacked_axes)
    rest = [k for k in range(len(shape)) if k not in walked]
    cuttable = [k for k in rest if not (whole_fan_in and k in layout.fan_in_axes)]
    for n, axis in enumerate(cuttable):
        inner = math.prod(shape[k] for k in rest if k != axis and k not in walked)
        fitting = [d for d in range(1, shape[axis] + 1)
                   if shape[axis] % d == 0 and d * inner <= limit]
        if fitting or n == len(cuttable) - 1:
            return tuple(walked), (axis, max(fitting, default=1))
        walked.append(axis)
    return tuple(walked), None


def _updated_in_slices(kernel: jax.Array, adapter: Adapter, sign: float) -> jax.Array:
    """The same update, written into ``kernel`` in place one slice at a time.

    The slices are taken in the kernel's own axis order (stacked axes may be anywhere,
    e.g. MaxText's ``(embed, layers, heads, head_dim)``), so the loop updates the donated
    buffer itself; each slice keeps every axis and is merged with the matching slices of
    ``A``, ``B`` and the magnitude, under the same layout.
    """
    dequantized = getattr(kernel, "dequantized", None)  # a jlora.quantization.QuantizedKernel
    if dequantized is not None:
        # A quantized kernel merges into a float one (its dequantized values plus the
        # update), as a plain kernel merges into its own dtype.
        kernel = dequantized()
    lay, shape = adapter.layout, tuple(kernel.shape)
    walked, block = _slicing(shape, lay, get_variant(adapter.variant).merge_needs_whole_fan_in)
    sizes = [1 if k in walked else shape[k] for k in range(len(shape))]
    counts = [shape[k] for k in walked]
    if block is not None:
        sizes[block[0]] = block[1]
        counts.append(shape[block[0]] // block[1])
    if math.prod(counts) == 1:
        return _updated_kernel(kernel, adapter, sign)
    # Anything that reads as an array (a quantized kernel: its dequantized values) is
    # sliced as that array; for an array this is a no-op, so donation still applies.
    kernel = kernel.astype(kernel.dtype)
    ns, cut = lay.num_stacked, [*walked, *([block[0]] if block else [])]
    # Where each kernel axis sits in A (*stacked, *fan_in, r), B (*stacked, r, *fan_out)
    # and the magnitude (*stacked, *fan_out).
    stacked_at = {axis: pos for pos, axis in enumerate(lay.stacked_axes)}
    at = {
        "a": {**stacked_at, **{axis: ns + t for t, axis in enumerate(lay.fan_in_axes)}},
        "b": {**stacked_at, **{axis: ns + 1 + t for t, axis in enumerate(lay.fan_out_axes)}},
        "magnitude": {**stacked_at, **{axis: ns + t for t, axis in enumerate(lay.fan_out_axes)}},
    }

    def body(i, w):
        index = jnp.unravel_index(i, counts)
        starts = {axis: index[j] * sizes[axis] for j, axis in enumerate(cut)}

        def piece(name, x):
            if x is None:
                return None
            start, size = [0] * x.ndim, list(x.shape)
            for axis, pos in at[name].items():
                if axis in starts:
                    start[pos], size[pos] = starts[axis], sizes[axis]
            return jax.lax.dynamic_slice(x, start, size)

        part = adapter.replace(**{name: piece(name, getattr(adapter, name)) for name in at})
        w_start = [starts.get(k, 0) for k in range(len(shape))]
        updated = _updated_kernel(jax.lax.dynamic_slice(w, w_start, sizes), part, sign)
        return jax.lax.dynamic_update_slice(w, updated, w_start)

    return jax.lax.fori_loop(0, math.prod(counts), body, kernel)


def _apply_updates(params, adapters: Adapters, sign: float):
    check_adapters_fit(params, adapters)
    return paths_lib.tree_map_with_path(
        lambda path, w: _updated_in_slices(w, adapters[path], sign) if path in adapters else w,
        params,
    )


def merge(params, adapters: Adapters):
    """``params`` with each adapted kernel replaced by ``W + s · A @ B``.

    Example:
      >>> import jax, jax.numpy as jnp, jlora
      >>> params = {"dense": {"kernel": jnp.zeros((4, 3))}}
      >>> ads = jlora.init(jax.random.key(0), params, jlora.LoraConfig(rank=2))
      >>> merged = jlora.merge(params, ads)   # B is zero at init: merged == params
      >>> bool((merged["dense"]["kernel"] == 0).all())
      True
    """
    return _apply_updates(params, adapters, +1.0)


def unmerge(params, adapters: Adapters):
    """The inverse of :func:`merge`: ``W - s · A @ B`` for each adapted kernel.

    ``unmerge(merge(p, a), a)`` returns ``p`` within float32 rounding. DoRA merges are
    not invertible from the merged weights alone (the norm of the original kernel is
    lost), so they are refused: keep the original params instead.

    Example:
      >>> import jax, jax.numpy as jnp, jlora
      >>> params = {"dense": {"kernel": jnp.ones((4, 3))}}
      >>> ads = jlora.init(jax.random.key(0), params, jlora.LoraConfig(rank=2))
      >>> back = jlora.unmerge(jlora.merge(params, ads), ads)
      >>> bool(jnp.allclose(back["dense"]["kernel"], 1.0))
      True
    """
    check_adapters(adapters)
    for path, adapter in adapters.items():
        refusal = get_variant(adapter.variant).unmerge_refusal
        if refusal:
            raise ValueError(
                f"Cannot unmerge the {adapter.variant!r} adapter at path {path!r}: {refusal}"
            )
    return _apply_updates(params, adapters, -1.0)


def safe_merge(params, adapters: Adapters):
    """:func:`merge`, refusing to return non-finite weights.

    Checks every merged kernel on the host and raises ``FloatingPointError`` naming the
    kernel, how many entries are not finite, and whether the base kernel or the adapter
    was already non-finite (a bf16/fp16 kernel can also overflow when the update is
    added). Not jittable, since it inspects values: call it outside ``jit``, e.g. before
    saving or exporting merged weights.

    Example:
      >>> import jax, jax.numpy as jnp, jlora
      >>> params = {"d": {"kernel": jnp.full((2, 2), 60000.0, jnp.float16)}}
      >>> ads = jlora.init(jax.random.key(0), params, jlora.LoraConfig(rank=1))
      >>> ads = {"d/kernel": ads["d/kernel"].replace(b=jnp.full((1, 2), 1e4))}
      >>> jlora.safe_merge(params, ads)
      Traceback (most recent call last):
      ...
      FloatingPointError: Merging the adapter at path 'd/kernel' ...
    """
    merged = merge(params, adapters)
    base = paths_lib.select(params, ".*", allow_empty=True)
    flat = paths_lib.select(merged, ".*", allow_empty=True)
    for path, adapter in adapters.items():
        bad = int(jnp.size(flat[path]) - jnp.sum(jnp.isfinite(flat[path])))
        if not bad:
            continue
        if not bool(jnp.isfinite(base[path]).all()):
            cause = "the base kernel was already non-finite"
        elif not all(bool(jnp.isfinite(x).all()) for x in jax.tree.leaves(adapter)):
            cause = "the adapter's factors are non-finite"
        else:
            cause = (f"W + s·A@B overflows {jnp.dtype(flat[path].dtype).name} "
                     f"(scale {adapter.scale:g})")
        raise FloatingPointError(
            f"Merging the adapter at path {path!r} gives {bad} non-finite value(s) in a kernel "
            f"of shape {tuple(flat[path].shape)}: {cause}. Expected finite merged weights; "
            "nothing was returned."
        )
    return merged
