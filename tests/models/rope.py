"""Rotary position embedding as both gemma and MaxText write it."""

import jax.numpy as jnp


def apply_rope(x, positions, base: float):
    """``x`` ``(B, L, heads, H)`` rotated by ``positions`` ``(B, L)``: the first half of
    ``H`` against the second, at frequencies ``base ** (-2k / H)``.

    Example:
      >>> x = jnp.ones((1, 3, 2, 4))
      >>> y = apply_rope(x, jnp.arange(3)[None], 10_000)
      >>> y.shape, bool(jnp.allclose(y[:, 0], x[:, 0]))
      ((1, 3, 2, 4), True)
    """
    half = x.shape[-1] // 2
    timescale = base ** (2.0 / x.shape[-1] * jnp.arange(half, dtype=jnp.float32))
    angles = (positions[..., None] / timescale[None, None, :])[..., None, :]
    sin, cos = jnp.sin(angles), jnp.cos(angles)
    first, second = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([first * cos - second * sin, second * cos + first * sin], axis=-1)
