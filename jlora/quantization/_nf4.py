"""``"nf4"``: QLoRA's 4-bit NormalFloat in blocks, with optional double quantization.

Each layer is read as torch's ``(fan_out, fan_in)`` weight (see :mod:`._blocks`),
flattened in C order and cut into blocks of ``block_size`` (64) values, so that blocks
run along the fan-in as bitsandbytes' blocks run along a ``Linear`` weight's rows; each
block is scaled by its absolute maximum and rounded to the nearest of bitsandbytes' 16
NF4 values; two codes per byte (the first in the high nibble). With
``double_quant=True`` the block scales are quantized too, as bitsandbytes'
``compress_statistics``: minus their mean, in blocks of 256, to the nearest value of
bitsandbytes' signed 8-bit dynamic code.

One layer's arrays: ``values`` uint8 ``(blocks, block_size // 2)``; ``scales`` float32
``(blocks,)`` (uint8 codes when double quantized); ``scales_scale`` float32
``(ceil(blocks / 256),)`` and ``scales_offset`` float32 ``()`` when double quantized.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp

from jlora.layouts import Layout
from jlora.quantization._blocks import (
    cut_blocks,
    from_rows,
    pack_nibbles,
    rows,
    unpack_nibbles,
)
from jlora.quantization._codes import DQ_BLOCK, DYNAMIC_CODE, NF4_CODE, nearest
from jlora.quantization._scheme import Scheme, register_scheme

__all__ = ["NF4", "block_absmax"]


class Nf4(Scheme):
    name, bits, default_block_size, double_quant = "nf4", 4, 64, True
    layer_ndim = {"values": 2, "scales": 1, "scales_scale": 1, "scales_offset": 0}

    def quantize(self, x, lay: Layout, block_size, double_quant):
        ns = lay.num_stacked
        blocks = cut_blocks(rows(x, lay), ns, block_size)
        absmax = jnp.max(jnp.abs(blocks), axis=-1)
        normed = blocks / jnp.where(absmax > 0, absmax, 1.0)[..., None]
        values = pack_nibbles(nearest(NF4_CODE, normed))
        if not double_quant:
            return {"values": values, "scales": absmax}
        offset = jnp.mean(absmax, axis=-1)
        groups = cut_blocks(absmax - offset[..., None], ns, DQ_BLOCK)
        group_max = jnp.max(jnp.abs(groups), axis=-1)
        normed = groups / jnp.where(group_max > 0, group_max, 1.0)[..., None]
        codes = nearest(DYNAMIC_CODE, normed).reshape(*groups.shape[:-2], -1)
        return {"values": values, "scales": codes[..., : absmax.shape[-1]],
                "scales_scale": group_max, "scales_offset": offset}

    def dequantize(self, qk: Any) -> jax.Array:
        codes = unpack_nibbles(qk.stacked_first("values"))
        flat = jnp.asarray(NF4_CODE)[codes.astype(jnp.int32)] * block_absmax(qk)[..., None]
        lay, shape = qk.kernel_layout, qk.shape
        stacked, fan_in, fan_out = lay.split_shape(shape)
        flat = flat.reshape(*stacked, -1)[..., : math.prod(qk.layer_shape)]
        return from_rows(flat.reshape(*stacked, math.prod(fan_out), math.prod(fan_in)),
                         lay, shape)


def block_absmax(qk: Any) -> jax.Array:
    """Each NF4 block's scale, float32 ``(*stacked, blocks)`` (decoded if double quantized)."""
    scales = qk.stacked_first("scales")
    if not qk.double_quant:
        return scales.astype(jnp.float32)
    blocks = scales.shape[-1]
    step = jnp.repeat(qk.stacked_first("scales_scale"), DQ_BLOCK, axis=-1)[..., :blocks]
    code = jnp.asarray(DYNAMIC_CODE)[scales.astype(jnp.int32)]
    return code * step + qk.stacked_first("scales_offset")[..., None]


NF4 = register_scheme(Nf4())
