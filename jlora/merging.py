"""`merge` / `unmerge`: dense weights in, dense weights out.

``merge(params, adapters)`` replaces each adapted kernel ``W`` with ``W + s · A @ B``
(DoRA: ``m · (W + s·A@B) / ‖W + s·A@B‖``), computed in float32 and cast back to the
kernel's dtype, so bf16 kernels do not lose the update to bf16 accumulation.
Pure and jittable; the params tree keeps its structure and every other leaf.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from jlora import paths as paths_lib
from jlora.adapter import Adapter, Adapters, check_adapters
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
    """``{path: s · A @ B}`` in each kernel's shape, float32 (DoRA's norm not applied).

    Example:
      >>> import jax, jax.numpy as jnp, jlora
      >>> ads = jlora.init(jax.random.key(0), {"k": jnp.ones((3, 2))},
      ...                  jlora.LoraConfig(rank=1, targets="k"))
      >>> jlora.delta(ads)["k"].shape
      (3, 2)
    """
    return {path: adapter.delta() for path, adapter in adapters.items()}


# Largest float32 update formed at once. Bigger kernels (or stacks of them) are updated
# in place, one slice at a time, so a donated merge never holds a second copy of a big
# kernel (or a float32 copy of a bf16 one) as a temporary.
MAX_UPDATE_BYTES = 16 * 2**20


def _rows_per_slice(fan_in: int, fan_out: int) -> int:
    """The largest divisor of ``fan_in`` whose ``rows x fan_out`` float32 update fits."""
    limit = max(1, MAX_UPDATE_BYTES // (4 * fan_out))
    return max(d for d in range(1, min(fan_in, limit) + 1) if fan_in % d == 0)


def _updated_kernel(kernel: jax.Array, adapter: Adapter, sign: float) -> jax.Array:
    """``W ± s·A@B`` (or DoRA's merge) of one kernel, computed in float32."""
    if adapter.variant == "dora":
        from jlora import variants

        return variants.dora_merged_kernel(kernel, adapter)
    return (kernel.astype(jnp.float32) + sign * adapter.delta()).astype(kernel.dtype)


def _updated_in_slices(kernel: jax.Array, adapter: Adapter, sign: float) -> jax.Array:
    """The same update, written into ``kernel`` one (layer, row-block) slice at a time.

    Every layout is ``(*stacked, *fan_in, *fan_out)`` in that order, so the kernel is a
    ``(layers, fan_in, fan_out)`` array; each slice is a block of fan-in rows of one
    layer (a whole layer for DoRA, whose norm spans the fan-in).
    """
    lay = adapter.layout
    layers = math.prod(kernel.shape[: lay.num_stacked])
    fan_in = math.prod(kernel.shape[i] for i in lay.fan_in_axes)
    fan_out = math.prod(kernel.shape[i] for i in lay.fan_out_axes)
    rows = fan_in if adapter.variant == "dora" else _rows_per_slice(fan_in, fan_out)
    blocks = fan_in // rows
    if layers * blocks == 1:
        return _updated_kernel(kernel, adapter, sign)
    rank = adapter.rank
    w = kernel.reshape(layers * blocks, rows, fan_out)
    a = adapter.a.reshape(layers * blocks, rows, rank)
    b = adapter.b.reshape(layers, rank, fan_out)
    m = None
    if adapter.magnitude is not None:
        m = adapter.magnitude.reshape(layers, fan_out)
    flat = adapter.replace(layout=Layout("io"))

    def body(i, w):
        layer = i // blocks
        piece = flat.replace(a=a[i], b=b[layer], magnitude=None if m is None else m[layer])
        return w.at[i].set(_updated_kernel(w[i], piece, sign))

    return jax.lax.fori_loop(0, layers * blocks, body, w).reshape(kernel.shape)


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
    for path, adapter in adapters.items():
        if isinstance(adapter, Adapter) and adapter.variant == "dora":
            raise ValueError(
                f"Cannot unmerge the DoRA adapter at path {path!r}: the merged kernel "
                "m·V/‖V‖ no longer holds ‖V‖. Keep the original params to undo a DoRA merge."
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
