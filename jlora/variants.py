"""LoRA variants: DoRA (weight-decomposed LoRA).

DoRA (Liu et al. 2024) splits each adapted kernel into a direction and a trainable
magnitude per output feature: ``W' = m · (W + s·A@B) / ‖W + s·A@B‖``, the norm taken
over the fan-in axes (as PEFT does for Linear and Conv weights).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jlora import paths as paths_lib
from jlora.adapter import Adapter, Adapters

__all__ = ["dora_merged_kernel", "dora_norm", "init_dora_magnitudes"]


def dora_norm(kernel: jax.Array, adapter: Adapter) -> jax.Array:
    """``‖W + s·A@B‖`` over the fan-in axes, float32, shape ``(*stacked, *fan_out)``.

    Example:
      >>> import jax, jax.numpy as jnp, jlora
      >>> p = {"k": jnp.ones((4, 3))}
      >>> ads = jlora.init(jax.random.key(0), p, jlora.LoraConfig(rank=1, targets="k"))
      >>> dora_norm(p["k"], ads["k"]).shape
      (3,)
    """
    combined = kernel.astype(jnp.float32) + adapter.delta()
    return jnp.sqrt(jnp.sum(jnp.square(combined), axis=adapter.layout.fan_in_axes))


def _expand_to_kernel(vec: jax.Array, adapter: Adapter) -> jax.Array:
    return jnp.expand_dims(vec, adapter.layout.fan_in_axes)


def dora_merged_kernel(kernel: jax.Array, adapter: Adapter) -> jax.Array:
    """``m · (W + s·A@B) / ‖W + s·A@B‖`` in the kernel's dtype, computed in float32."""
    combined = kernel.astype(jnp.float32) + adapter.delta()
    norm = dora_norm(kernel, adapter)
    factor = adapter.magnitude.astype(jnp.float32) / norm
    return (combined * _expand_to_kernel(factor, adapter)).astype(kernel.dtype)


def init_dora_magnitudes(params, adapters: Adapters) -> Adapters:
    """Set each DoRA adapter's magnitude to ``‖W + s·A@B‖`` (so the model starts unchanged).

    Example:
      >>> import jax, jax.numpy as jnp, jlora
      >>> p = {"k": jnp.ones((4, 3))}
      >>> ads = jlora.init(jax.random.key(0), p,
      ...                  jlora.LoraConfig(rank=1, targets="k", variant="dora"))
      >>> ads["k"].magnitude.shape
      (3,)
    """
    flat = paths_lib.select(params, ".*", allow_empty=True)
    out = dict(adapters)
    for path, adapter in adapters.items():
        if adapter.variant == "dora":
            norm = dora_norm(flat[path], adapter).astype(adapter.a.dtype)
            out[path] = adapter.replace(magnitude=norm)
    return out
