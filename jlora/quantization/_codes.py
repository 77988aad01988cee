"""Code books (bitsandbytes' NF4 values and signed 8-bit dynamic map) and rounding to them."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["DQ_BLOCK", "DYNAMIC_CODE", "NF4_CODE", "nearest"]

DQ_BLOCK = 256  # bitsandbytes quantizes the NF4 block scales in blocks of 256

# bitsandbytes' NF4 values (functional.get_4bit_type("nf4"); QLoRA, Appendix E): the
# quantiles of N(0, 1) normalised to [-1, 1], with an exact zero and 8 positive values.
NF4_CODE = np.array(
    [
        -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
        -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
        0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
        0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
    ],
    dtype=np.float32,
)


def _dynamic_code() -> np.ndarray:
    """bitsandbytes' signed 8-bit dynamic code (``create_dynamic_map(signed=True)``).

    For each decade 10^-6 .. 10^0 it places the midpoints of ``2^i + 1`` points evenly
    spaced in [0.1, 1] (scaled by the decade), with both signs, then 0 and 1: 256 sorted
    values in [-1, 1], dense near zero.
    """
    data: list[float] = []
    for i in range(7):
        bounds = np.linspace(0.1, 1.0, 2**i + 1, dtype=np.float32)
        means = (bounds[:-1] + bounds[1:]) / 2.0
        data += list(10.0 ** (i - 6) * means) + list(-(10.0 ** (i - 6)) * means)
    data += [0.0, 1.0]
    return np.sort(np.asarray(data, dtype=np.float32))


DYNAMIC_CODE = _dynamic_code()


def nearest(code: np.ndarray, x: jax.Array) -> jax.Array:
    """Index (uint8) of the nearest value of the sorted ``code`` for each entry of ``x``.

    Example:
      >>> nearest(NF4_CODE, jnp.array([-1.0, 0.01, 0.9])).tolist()
      [0, 7, 15]
    """
    # The index is the number of midpoints below x: one fused pass of compares, no sort.
    mids = (code[1:] + code[:-1]) / 2.0
    index = jnp.zeros(x.shape, jnp.int32)
    for m in mids:
        index = index + (x > m)
    return index.astype(jnp.uint8)
