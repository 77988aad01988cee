"""Per-output-channel schemes: one float32 scale per fan-out entry of each layer.

``"int8"``: symmetric int8, ``scale = absmax / 127`` (LLM.int8()'s and bitsandbytes'
``Int8Params`` weight format). ``"fp8"``: float8 e4m3 (``jnp.float8_e4m3fn``: 4
exponent bits, 3 mantissa bits, no infinities, largest 448), ``scale = absmax / 448``, the
value rounded to the nearest e4m3 number (ties to even), as the per-channel fp8 weight
formats of TensorRT-LLM, vLLM and torchao scale and cast.

The arrays keep the kernel's axes in its own order: ``values`` the kernel's shape,
``scales`` the kernel's shape with the fan-in axes of size 1 (the maximum runs over the
fan-in axes, per stacked layer and fan-out entry), so the arithmetic is elementwise.
"""

from __future__ import annotations

from typing import Any, ClassVar

import jax
import jax.numpy as jnp

from jlora.layouts import Layout
from jlora.quantization._scheme import Scheme, register_scheme

__all__ = ["FP8", "INT8", "PerChannel"]


class PerChannel(Scheme):
    """Symmetric, one scale per output channel: ``values = cast(x / (absmax / top))``."""

    top: ClassVar[float] = 1.0  # the largest stored value
    value_dtype: ClassVar[Any] = jnp.int8

    def to_values(self, scaled: jax.Array) -> jax.Array:
        """``x / scale`` (within ``[-top, top]``) as stored values."""
        raise NotImplementedError

    def quantize(self, x, lay: Layout, block_size, double_quant):
        absmax = jnp.max(jnp.abs(x), axis=lay.fan_in_axes, keepdims=True)
        scales = absmax / self.top
        scaled = x / jnp.where(scales > 0, scales, 1.0)
        return {"values": self.to_values(jnp.clip(scaled, -self.top, self.top)),
                "scales": scales}

    def dequantize(self, qk):
        return qk.values.astype(jnp.float32) * qk.scales.astype(jnp.float32)


class Int8(PerChannel):
    name, bits, top, value_dtype = "int8", 8, 127.0, jnp.int8

    def to_values(self, scaled):
        return jnp.round(scaled).astype(jnp.int8)


class Fp8(PerChannel):
    name, bits, top, value_dtype = "fp8", 8, 448.0, jnp.float8_e4m3fn

    def to_values(self, scaled):
        # Clipped first: e4m3fn has no infinity, so a value past 464 would become NaN.
        return scaled.astype(jnp.float8_e4m3fn)


INT8 = register_scheme(Int8())
FP8 = register_scheme(Fp8())
