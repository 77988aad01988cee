"""`merge` / `unmerge`: dense weights in, dense weights out.

``merge(params, adapters)`` replaces each adapted kernel ``W`` with ``W + s · A @ B``
(DoRA: ``m · (W + s·A@B) / ‖W + s·A@B‖``), computed in float32 and cast back to the
kernel's dtype, so bf16 kernels do not lose the update to bf16 accumulation.
Pure and jittable; the params tree keeps its structure and every other leaf.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jlora import paths as paths_lib
from jlora.adapter import Adapter, Adapters

__all__ = ["check_adapters_fit", "delta", "merge", "unmerge"]


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
    if not isinstance(adapters, dict):
        raise TypeError(
            f"`adapters` must be the dict {{path: Adapter}} that jlora.init returns, got "
            f"{type(adapters).__name__}."
        )
    flat = paths_lib.select(params, ".*", allow_empty=True)
    for path, adapter in adapters.items():
        if not isinstance(adapter, Adapter):
            raise TypeError(
                f"`adapters[{path!r}]` must be a jlora Adapter, got {type(adapter).__name__}."
            )
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


def _merged_kernel(kernel: jax.Array, adapter: Adapter) -> jax.Array:
    if adapter.variant == "dora":
        from jlora import variants

        return variants.dora_merged_kernel(kernel, adapter)
    merged = kernel.astype(jnp.float32) + adapter.delta()
    return merged.astype(kernel.dtype)


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
    check_adapters_fit(params, adapters)
    return paths_lib.tree_map_with_path(
        lambda path, w: _merged_kernel(w, adapters[path]) if path in adapters else w, params
    )


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
    check_adapters_fit(params, adapters)
    for path, adapter in adapters.items():
        if adapter.variant == "dora":
            raise ValueError(
                f"Cannot unmerge the DoRA adapter at path {path!r}: the merged kernel "
                "m·V/‖V‖ no longer holds ‖V‖. Keep the original params to undo a DoRA merge."
            )

    def sub(path, w):
        if path not in adapters:
            return w
        return (w.astype(jnp.float32) - adapters[path].delta()).astype(w.dtype)

    return paths_lib.tree_map_with_path(sub, params)
