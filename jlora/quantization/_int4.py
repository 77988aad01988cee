"""``"int4"``: asymmetric 4-bit integers in groups along the fan-in (GPTQ/AWQ's format).

Each layer is read as torch's ``(fan_out, fan_in)`` weight (see :mod:`._blocks`); each
row (one output channel) is cut into groups of ``block_size`` (32, 64 or 128; 128 by
default, as GPTQ's and AWQ's ``group_size``) consecutive fan-in entries, the last one
zero-padded. Each group gets a float32 ``scale`` and an integer zero point ``zero`` in
``[0, 15]``, exactly as GPTQ's ``Quantizer`` (``sym=False``, ``bits=4``) finds them::

    lo, hi = min(x.min(), 0), max(x.max(), 0)      # [-1, 1] for an all-zero group
    scale  = (hi - lo) / 15
    zero   = round(-lo / scale)
    q      = clip(round(x / scale) + zero, 0, 15)  # dequantized: scale * (q - zero)

Asymmetric because the 16 levels then span each group's own range (a symmetric grid
wastes a code and, on a skewed group, up to half its levels); the range always holds 0,
so 0 (and the padding) is exact and the zero point never clips (AWQ's ``[min, max]``
clips it for a group of one sign). Rounding is to nearest, ties to even (``torch.round``,
``jnp.round``): round-to-nearest, without GPTQ's error-correcting updates.

One layer's arrays: ``values`` uint8 ``(groups, block_size // 2)``, two codes per byte
(the first in the high nibble), ``groups = fan_out * ceil(fan_in / block_size)``;
``scales`` float32 ``(groups,)``; ``zeros`` uint8 ``(groups,)``.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp

from jlora.layouts import Layout
from jlora.quantization._blocks import from_rows, pack_nibbles, rows, unpack_nibbles
from jlora.quantization._scheme import Scheme, register_scheme

__all__ = ["INT4"]

_TOP = 15  # 2**4 - 1


class Int4(Scheme):
    name, bits, default_block_size = "int4", 4, 128
    layer_ndim = {"values": 2, "scales": 1, "zeros": 1}

    def quantize(self, x, lay: Layout, block_size, double_quant):
        r = rows(x, lay)  # (*stacked, out, in)
        n = -(-r.shape[-1] // block_size)
        r = jnp.pad(r, [(0, 0)] * (r.ndim - 1) + [(0, n * block_size - r.shape[-1])])
        groups = r.reshape(*r.shape[:-2], r.shape[-2] * n, block_size)
        lo = jnp.minimum(jnp.min(groups, axis=-1), 0.0)
        hi = jnp.maximum(jnp.max(groups, axis=-1), 0.0)
        empty = (lo == 0) & (hi == 0)
        lo, hi = jnp.where(empty, -1.0, lo), jnp.where(empty, 1.0, hi)
        scales = (hi - lo) / _TOP
        zeros = jnp.round(-lo / scales)
        q = jnp.clip(jnp.round(groups / scales[..., None]) + zeros[..., None], 0, _TOP)
        return {"values": pack_nibbles(q.astype(jnp.uint8)), "scales": scales,
                "zeros": zeros.astype(jnp.uint8)}

    def dequantize(self, qk: Any) -> jax.Array:
        q = unpack_nibbles(qk.stacked_first("values")).astype(jnp.float32)
        zeros = qk.stacked_first("zeros").astype(jnp.float32)
        groups = (q - zeros[..., None]) * qk.stacked_first("scales")[..., None]
        lay, shape = qk.kernel_layout, qk.shape
        stacked, fan_in, fan_out = lay.split_shape(shape)
        n_out, n_in = math.prod(fan_out), math.prod(fan_in)
        r = groups.reshape(*stacked, n_out, -1)[..., :n_in]
        return from_rows(r, lay, shape)


INT4 = register_scheme(Int4())
