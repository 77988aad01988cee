"""Shared by the blocked schemes: each layer as torch's weight, blocks, packing, placing.

Blocked schemes (NF4, int4) read each layer as torch's ``(fan_out, fan_in)`` weight (the
kernel's matrix view, transposed), so their blocks and groups run along the fan-in as
bitsandbytes', GPTQ's and AWQ's run along a ``Linear`` weight's rows, whatever the order
in which the kernel stores its axes.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

from jlora.layouts import Layout

__all__ = ["cut_blocks", "from_rows", "pack_nibbles", "place", "rows", "unpack_nibbles"]


def rows(x: jax.Array, lay: Layout) -> jax.Array:
    """Each layer as torch's weight: ``(*stacked, fan_out, fan_in)``.

    Example:
      >>> rows(jnp.zeros((2, 5, 3)), Layout("sio")).shape
      (2, 3, 5)
    """
    return jnp.swapaxes(lay.to_matrix(x), -1, -2)


def from_rows(r: jax.Array, lay: Layout, shape: Sequence[int]) -> jax.Array:
    """The inverse of :func:`rows`: the kernel of ``shape`` in the layout's axis order."""
    return lay.from_matrix(jnp.swapaxes(r, -1, -2), tuple(shape))


def cut_blocks(x: jax.Array, ns: int, size: int) -> jax.Array:
    """``x`` flattened after its ``ns`` leading axes and zero-padded to whole blocks:
    ``(*lead, blocks, size)``.

    Example:
      >>> cut_blocks(jnp.ones((2, 3, 5)), 1, 4).shape
      (2, 4, 4)
    """
    lead = x.shape[:ns]
    flat = x.reshape(*lead, -1)
    n = -(-flat.shape[-1] // size)
    flat = jnp.pad(flat, [(0, 0)] * ns + [(0, n * size - flat.shape[-1])])
    return flat.reshape(*lead, n, size)


def pack_nibbles(codes: jax.Array) -> jax.Array:
    """Pairs of 4-bit codes along the last axis, one byte each, the first in the high
    nibble (as bitsandbytes packs NF4).

    Example:
      >>> pack_nibbles(jnp.array([1, 2, 15, 0], jnp.uint8)).tolist()
      [18, 240]
    """
    codes = codes.astype(jnp.uint8)
    return (codes[..., 0::2] << 4) | codes[..., 1::2]


def unpack_nibbles(values: jax.Array) -> jax.Array:
    """The inverse of :func:`pack_nibbles`: ``(..., 2 n)`` uint8 codes."""
    codes = jnp.stack([values >> 4, values & 0xF], axis=-1)
    return codes.reshape(*values.shape[:-1], -1)


def place(arr: jax.Array, lay: Layout) -> jax.Array:
    """``(*stacked, *one_layer)`` to the stored form: one layer's axes padded with
    trailing 1s to the layer's number of axes, the stacked axes moved to the kernel's
    positions (``lay``'s, stacked axes included).

    Example:
      >>> place(jnp.zeros((2, 7)), Layout("isoo")).shape
      (7, 2, 1, 1)
    """
    ns = lay.num_stacked
    arr = arr.reshape(*arr.shape, *([1] * (lay.ndim - ns - (arr.ndim - ns))))
    return jnp.moveaxis(arr, tuple(range(ns)), lay.stacked_axes)
