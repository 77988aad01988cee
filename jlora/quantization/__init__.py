"""A quantized frozen base (QLoRA): int8 and fp8 per output channel, NF4 and int4 in blocks.

A :class:`QuantizedKernel` stands in a params tree where a float kernel was. Its path
is the kernel's path (``jlora.paths`` treats it as one leaf), it has the ``shape`` and
the float ``dtype`` of the kernel it stores, so ``jlora.init`` and ``jlora.plan`` target
it like any kernel. The model reads it through :func:`dequantize`:

* outside ``jlora.lora``, ``dequantize(qk)`` is the float kernel (and ``dequantize`` of a
  plain array returns it unchanged, so one model runs on quantized and float params);
* inside ``jlora.lora``, the interpreter recognises ``dequantize`` and keeps the kernel
  quantized until a consumer (a ``dot``, conv or embedding gather) needs it: it is
  dequantized there, under ``jax.checkpoint`` so the backward pass dequantizes it again
  instead of keeping a float copy, and a stacked kernel scanned over its layers is
  dequantized one layer per iteration. The adapters (float32 or bf16) are applied
  factored on top, as for a float base.

Schemes (``quantize(w, scheme)``):

``"int8"``
  symmetric int8 with one float32 scale per output channel (per stacked layer and
  fan-out entry, the maximum over the fan-in axes), as LLM.int8()'s weight format.
``"fp8"``
  float8 e4m3 (``jnp.float8_e4m3fn``) with one float32 scale per output channel,
  ``absmax / 448``, rounded to nearest (ties to even).
``"nf4"``
  QLoRA's 4-bit NormalFloat: each layer is read as torch's ``(fan_out, fan_in)`` weight
  (its matrix view, transposed), flattened in C order and cut into blocks of
  ``block_size`` (64) values, so that blocks run along the fan-in as bitsandbytes'
  blocks run along a ``Linear`` weight's rows; each block is scaled by its absolute
  maximum and rounded to the nearest of bitsandbytes' 16 NF4 values; two codes per byte
  (the first in the high nibble, as bitsandbytes packs them). With ``double_quant=True``
  the block scales are quantized too, as bitsandbytes' ``compress_statistics``: minus
  their mean, in blocks of 256, to the nearest value of bitsandbytes' signed 8-bit
  dynamic code.
``"int4"``
  asymmetric 4-bit integers in groups of ``block_size`` (128; or 32, 64) along each
  output channel's fan-in, a float32 scale and a uint8 zero point per group, found as
  GPTQ's ``Quantizer`` finds them (``sym=False``; round to nearest).

The kernel's layout (``layout=`` / ``layouts=``, any axis order, see
:mod:`jlora.layouts`) says which axes are which: per-channel scales, NF4 blocks and int4
groups follow the roles of the axes, not their positions, so a kernel stored ``(out,
in)`` (``"oi"``) is quantized exactly as its transpose stored ``(in, out)``. Stacked
axes (``s``, wherever they are: MaxText's ``"isoo"`` has its layers second) are quantized
layer by layer, and every array of the :class:`QuantizedKernel` keeps them at the
kernel's own positions, so a scan or ``nn.scan`` over the layer axis slices the quantized
arrays like the kernel.

:func:`merge_quantized` merges adapters into a quantized base (and can quantize the
result again); ``jlora.variants.loftq_init`` initialises adapters and a quantized base
together (LoftQ).

Example:
  >>> import jax, jax.numpy as jnp, jlora
  >>> w = jax.random.normal(jax.random.key(0), (128, 64))
  >>> qk = jlora.quantization.quantize(w, "nf4", double_quant=True)
  >>> qk.shape, qk.dtype, qk.values.dtype
  ((128, 64), dtype('float32'), dtype('uint8'))
  >>> bool(jnp.abs(jlora.quantization.dequantize(qk) - w).max() < 0.5)
  True
"""

from jlora.quantization._codes import DYNAMIC_CODE as DYNAMIC_CODE
from jlora.quantization._codes import NF4_CODE as NF4_CODE
from jlora.quantization._kernel import SCHEMES as SCHEMES
from jlora.quantization._kernel import QuantizedKernel as QuantizedKernel
from jlora.quantization._kernel import dequantize as dequantize
from jlora.quantization._kernel import dequantize_p as dequantize_p
from jlora.quantization._kernel import is_quantized as is_quantized
from jlora.quantization._kernel import quantize as quantize
from jlora.quantization._params import QuantizationWarning as QuantizationWarning
from jlora.quantization._params import dequantize_params as dequantize_params
from jlora.quantization._params import merge as merge
from jlora.quantization._params import merge_quantized as merge_quantized
from jlora.quantization._params import quantize_params as quantize_params

__all__ = [
    "DYNAMIC_CODE",
    "NF4_CODE",
    "SCHEMES",
    "QuantizationWarning",
    "QuantizedKernel",
    "dequantize",
    "dequantize_params",
    "is_quantized",
    "merge",
    "merge_quantized",
    "quantize",
    "quantize_params",
]
