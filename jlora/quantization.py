"""A quantized frozen base (QLoRA): int8 per output channel and NF4 in blocks of 64.

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

Schemes:

``"int8"``
  symmetric int8 with one float32 scale per output channel (per stacked layer and
  fan-out entry, the maximum over the fan-in axes), as LLM.int8()'s weight format.
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

The kernel's layout (``layout=`` / ``layouts=``, any axis order, see
:mod:`jlora.layouts`) says which axes are which: int8 scales and NF4 blocks follow the
roles of the axes, not their positions, so a kernel stored ``(out, in)`` (``"oi"``) is
quantized exactly as its transpose stored ``(in, out)``. Stacked axes (``s``, wherever
they are: MaxText's ``"isoo"`` has its layers second) are quantized layer by layer, and
every array of the :class:`QuantizedKernel` keeps them at the kernel's own positions, so
a scan or ``nn.scan`` over the layer axis slices the quantized arrays like the kernel.

Example:
  >>> import jax, jax.numpy as jnp, jlora
  >>> w = jax.random.normal(jax.random.key(0), (128, 64))
  >>> qk = jlora.quantization.quantize(w, "nf4", double_quant=True)
  >>> qk.shape, qk.dtype, qk.values.dtype
  ((128, 64), dtype('float32'), dtype('uint8'))
  >>> bool(jnp.abs(jlora.quantization.dequantize(qk) - w).max() < 0.5)
  True
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
import warnings
from collections.abc import Mapping
from typing import Any, ClassVar, TypeGuard

import jax
import jax.numpy as jnp
import numpy as np

from jlora import _jax_compat as jc
from jlora import _paths as paths_lib
from jlora._merging import merge as _dense_merge
from jlora.layouts import Layout, LayoutError, resolve_layout

__all__ = [
    "DYNAMIC_CODE",
    "NF4_CODE",
    "QuantizationWarning",
    "QuantizedKernel",
    "dequantize",
    "dequantize_params",
    "is_quantized",
    "merge",
    "quantize",
    "quantize_params",
]

SCHEMES = ("int8", "nf4")
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

class QuantizationWarning(UserWarning):
    """Requantizing merged weights: the stored kernel differs from ``W + s·A·B`` by rounding."""


@dataclasses.dataclass(frozen=True)
class QuantizedKernel:
    """A frozen kernel stored quantized; :func:`dequantize` gives it back as floats.

    Every array has as many axes as the kernel, one set of quantized values and scales
    per layer, and the kernel's stacked axes at the kernel's own positions (first for
    ``"sio"``, second for MaxText's ``"isoo"``). So ``scan``, ``nn.scan`` (whatever its
    variable axis) and indexing a layer slice it like the float kernel, moving a stacked
    axis moves it in every array, and one layer's arrays have the same shapes however
    the layers were stacked. One layer's NF4 arrays, listed below, are padded with
    trailing axes of size 1 to the layer's number of axes.

    Attributes:
      values: ``"int8"``: int8, the kernel's shape. ``"nf4"``: uint8
        ``(blocks, block_size // 2, 1, ...)`` per layer, two 4-bit codes per byte.
      scales: ``"int8"``: float32, the kernel's shape with the fan-in axes of size 1.
        ``"nf4"``: each block's absolute maximum ``(blocks, 1, ...)`` per layer, float32,
        or its 8-bit code (uint8) when double quantized.
      scales_scale: double quantization only: float32 ``(ceil(blocks / 256), 1, ...)``
        per layer, the absolute maximum of each group of 256 centred block scales.
      scales_offset: double quantization only: float32 ``(1, 1, ...)`` per layer, the
        mean block scale.
      scheme: ``"int8"`` or ``"nf4"``.
      layout: the layout of one layer (no ``s``), e.g. ``"io"`` or ``"oi"``; int8 scales
        are per entry of its fan-out axes, NF4 blocks run along its fan-in axes.
      layer_shape: the shape of one layer of the kernel (its axes in the kernel's order).
      dtype: the dtype :func:`dequantize` returns (the float kernel's dtype).
      block_size: NF4 values per block.
      stacked_axes: where the stacked axes are in the whole kernel (and in every array),
        e.g. ``(1,)`` for ``"isoo"``. A scan that slices a layer off removes the first.

    Example:
      >>> import jax, jlora
      >>> w = jax.random.normal(jax.random.key(0), (128, 64))
      >>> qk = jlora.quantization.quantize(w, "int8")
      >>> qk.shape, qk.scheme, jlora.quantization.dequantize(qk).shape
      ((128, 64), 'int8', (128, 64))
    """

    values: jax.Array
    scales: jax.Array
    scales_scale: jax.Array | None = None
    scales_offset: jax.Array | None = None
    scheme: str = dataclasses.field(default="int8", metadata={"static": True})
    layout: str = dataclasses.field(default="io", metadata={"static": True})
    layer_shape: tuple[int, ...] = dataclasses.field(default=(), metadata={"static": True})
    dtype: Any = dataclasses.field(default=np.dtype("float32"), metadata={"static": True})
    block_size: int = dataclasses.field(default=64, metadata={"static": True})
    stacked_axes: tuple[int, ...] = dataclasses.field(default=(), metadata={"static": True})

    # jlora.paths treats objects of classes with this flag as single leaves, so the
    # kernel's path stays `.../kernel` rather than `.../kernel/values`.
    __jlora_kernel__: ClassVar[bool] = True

    @property
    def num_stacked(self) -> int:
        """How many stacked (layer) axes the arrays hold (fewer once a scan sliced one off)."""
        return self.values.ndim - len(self.layer_shape)

    @property
    def kernel_layout(self) -> Layout:
        """The layout of the float kernel these arrays hold, stacked axes included.

        Example:
          >>> import jax.numpy as jnp
          >>> quantize(jnp.ones((8, 3, 2, 4)), "nf4", layout="isoo").kernel_layout
          Layout('isoo')
        """
        return _current_layout(self.layout, self.stacked_axes, self.num_stacked)

    @classmethod
    def stacked_statics(cls, statics: tuple, values_ndim: int) -> tuple:
        """The :meth:`statics` of kernels that have ``statics`` (and ``values`` with
        ``values_ndim`` axes) stacked along a new first axis, as ``vmap`` stacks them.

        Example:
          >>> import jax.numpy as jnp
          >>> qk = quantize(jnp.ones((64, 3, 8)), "int8", layout="iso")
          >>> layer = jax.tree.map(lambda a: a[:, 0], qk)      # one layer: "io"
          >>> QuantizedKernel.stacked_statics(layer.statics(), layer.values.ndim)[-1]
          (0,)
        """
        scheme, layout, layer_shape, *rest, stacked_axes = statics
        current = _current_layout(layout, stacked_axes, values_ndim - len(layer_shape))
        return (scheme, layout, layer_shape, *rest, Layout("s" + current.axes).stacked_axes)

    @property
    def shape(self) -> tuple[int, ...]:
        """The float kernel's shape, in its own axis order."""
        lay = self.kernel_layout
        stacked = iter([self.values.shape[k] for k in lay.stacked_axes])
        layer = iter(self.layer_shape)
        return tuple(next(stacked) if c == "s" else next(layer) for c in lay.axes)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def double_quant(self) -> bool:
        return self.scales_scale is not None

    @property
    def nbytes(self) -> int:
        """Bytes held by the quantized arrays."""
        return sum(int(x.size) * x.dtype.itemsize for x in jax.tree.leaves(self))

    def statics(self) -> tuple:
        """The static fields, as ``from_fields`` takes them back."""
        return (self.scheme, self.layout, self.layer_shape, self.dtype, self.block_size,
                self.stacked_axes)

    def fields(self) -> tuple[str, ...]:
        """The array fields present, in the order ``jax.tree.leaves`` returns them."""
        return tuple(f for f in _DATA_FIELDS if getattr(self, f) is not None)

    @classmethod
    def from_fields(cls, statics: tuple, arrays: Mapping[str, Any]) -> QuantizedKernel:
        """Rebuild from :meth:`statics` and ``{field: array}``."""
        scheme, layout, layer_shape, dtype, block_size, stacked_axes = statics
        return cls(**arrays, scheme=scheme, layout=layout, layer_shape=layer_shape,
                   dtype=dtype, block_size=block_size, stacked_axes=stacked_axes)

    def dequantized(self) -> jax.Array:
        """The float kernel, computed here (no marker for the factored transform)."""
        if self.scheme == "int8":  # values and scales are in the kernel's own order
            out = self.values.astype(jnp.float32) * self.scales.astype(jnp.float32)
            return out.astype(self.dtype)
        values = self.stacked_first("values")
        stacked, blocks = values.shape[:-2], values.shape[-2]
        codes = jnp.stack([values >> 4, values & 0xF], axis=-1)
        codes = codes.reshape(*stacked, blocks, self.block_size)
        absmax = self.block_absmax()
        flat = jnp.asarray(NF4_CODE)[codes.astype(jnp.int32)] * absmax[..., None]
        lay, shape = self.kernel_layout, self.shape
        _, fan_in, fan_out = lay.split_shape(shape)
        rows = flat.reshape(*stacked, blocks * self.block_size)[..., : math.prod(self.layer_shape)]
        rows = rows.reshape(*stacked, math.prod(fan_out), math.prod(fan_in))
        return lay.from_matrix(jnp.swapaxes(rows, -1, -2), shape).astype(self.dtype)

    def stacked_first(self, field: str) -> jax.Array:
        """The array ``field`` with its stacked axes first and, for NF4, without the
        padding axes: ``values`` ``(*stacked, blocks, block_size // 2)``, ``scales``
        ``(*stacked, blocks)``, ``scales_scale`` ``(*stacked, groups)``, ``scales_offset``
        ``(*stacked,)``. int8 arrays keep one layer's axes in the kernel's order.

        Example:
          >>> import jax.numpy as jnp
          >>> qk = quantize(jnp.ones((64, 3, 8)), "nf4", layout="iso")
          >>> qk.scales.shape, qk.stacked_first("scales").shape
          ((8, 3, 1), (3, 8))
        """
        lay = self.kernel_layout
        ns = lay.num_stacked
        arr = jnp.moveaxis(getattr(self, field), lay.stacked_axes, tuple(range(ns)))
        if self.scheme == "int8":
            return arr
        return arr.reshape(arr.shape[: ns + _NF4_LAYER_NDIM[field]])

    def block_absmax(self) -> jax.Array:
        """NF4: each block's scale, float32 ``(*stacked, blocks)`` (decoded if double quantized)."""
        scales = self.stacked_first("scales")
        if not self.double_quant:
            return scales.astype(jnp.float32)
        blocks = scales.shape[-1]
        step = jnp.repeat(self.stacked_first("scales_scale"), DQ_BLOCK, axis=-1)[..., :blocks]
        code = jnp.asarray(DYNAMIC_CODE)[scales.astype(jnp.int32)]
        return code * step + self.stacked_first("scales_offset")[..., None]

    # Read-only array behaviour, so code that reads a kernel as an array (``jlora.merge``)
    # sees the dequantized kernel.
    def astype(self, dtype) -> jax.Array:
        """The dequantized kernel cast to ``dtype``."""
        return dequantize(self).astype(dtype)

    def reshape(self, *shape) -> jax.Array:
        """The dequantized kernel reshaped."""
        return dequantize(self).reshape(*shape)


_DATA_FIELDS = ("values", "scales", "scales_scale", "scales_offset")
jax.tree_util.register_dataclass(
    QuantizedKernel,
    data_fields=list(_DATA_FIELDS),
    meta_fields=["scheme", "layout", "layer_shape", "dtype", "block_size", "stacked_axes"],
)
def _current_layout(layout: str, stacked_axes: tuple[int, ...], ns: int) -> Layout:
    """The layout of a quantized kernel whose arrays hold ``ns`` stacked axes: one layer's
    ``layout`` with its stacked axes at ``stacked_axes``, less the first ones when a scan
    has sliced layers off; more stacked axes than that (kernels stacked by ``vmap``) lead."""
    letters = iter(layout)
    ndim = len(layout) + len(stacked_axes)
    whole = "".join("s" if k in stacked_axes else next(letters) for k in range(ndim))
    extra = ns - len(stacked_axes)
    if extra >= 0:
        return Layout("s" * extra + whole)
    # Sliced layers off: the arrays cannot tell which stacked axes went. Where the choice
    # changes the layout (stacked axes apart, e.g. 'sisoo'), refuse rather than guess.
    at = [k for k, c in enumerate(whole) if c == "s"]
    candidates = {"".join(c for k, c in enumerate(whole) if k not in gone)
                  for gone in itertools.combinations(at, -extra)}
    if len(candidates) > 1:
        raise LayoutError(
            f"A quantized kernel of layout {whole!r} (stacked axes at {tuple(at)}) reached an "
            f"operation with {ns} of its {len(at)} stacked axes left: a scan or vmap sliced "
            f"{-extra} away, and which one cannot be told from its arrays (the result could "
            f"be any of {sorted(candidates)}). Scan or map over its first stacked axis, or "
            "quantize the kernel with its stacked axes next to each other."
        )
    return Layout(whole).unstacked(-extra)


# Axes of one layer of each NF4 array before padding (see QuantizedKernel).
_NF4_LAYER_NDIM = {"values": 2, "scales": 1, "scales_scale": 1, "scales_offset": 0}


def _place(arr: jax.Array, stacked_axes: tuple[int, ...], layer_ndim: int) -> jax.Array:
    """``(*stacked, *layer)`` to the stored form: the layer's axes padded with trailing
    1s to ``layer_ndim``, the stacked axes moved to the kernel's positions."""
    ns = len(stacked_axes)
    arr = arr.reshape(*arr.shape, *([1] * (layer_ndim - (arr.ndim - ns))))
    return jnp.moveaxis(arr, tuple(range(ns)), stacked_axes)


def is_quantized(x) -> TypeGuard[QuantizedKernel]:
    """``True`` for a :class:`QuantizedKernel` (useful as ``is_leaf`` in tree maps).

    Example:
      >>> is_quantized(jnp.ones((2, 2)))
      False
    """
    return isinstance(x, QuantizedKernel)


def _layout_of(w_shape, layout) -> Layout:
    if layout is None:
        return Layout("i" * (len(w_shape) - 1) + "o")
    lay = layout if isinstance(layout, Layout) else Layout(layout)
    lay.check_shape(w_shape)
    return lay


def _nearest(code: np.ndarray, x: jax.Array) -> jax.Array:
    """Index of the nearest value of the sorted ``code`` for each entry of ``x``."""
    # The index is the number of midpoints below x: one fused pass of compares, no sort.
    mids = (code[1:] + code[:-1]) / 2.0
    index = jnp.zeros(x.shape, jnp.int32)
    for m in mids:
        index = index + (x > m)
    return index.astype(jnp.uint8)


def _blocks(x: jax.Array, ns: int, size: int) -> tuple[jax.Array, int]:
    """``x`` flattened per layer and zero-padded to whole blocks: ``(*stacked, n, size)``."""
    stacked = x.shape[:ns]
    flat = x.reshape(*stacked, -1)
    n = -(-flat.shape[-1] // size)
    pad = n * size - flat.shape[-1]
    flat = jnp.pad(flat, [(0, 0)] * ns + [(0, pad)])
    return flat.reshape(*stacked, n, size), n


def quantize(w, scheme: str = "nf4", *, layout=None, block_size: int = 64,
             double_quant: bool = False) -> QuantizedKernel:
    """Quantize one float kernel.

    Args:
      w: a floating-point kernel.
      scheme: ``"int8"`` (per output channel) or ``"nf4"`` (blocks of ``block_size``).
      layout: the kernel's layout (a string or :class:`jlora.Layout`, any axis order),
        e.g. ``"sio"`` for layers stacked under ``nn.scan`` or ``"oi"`` for a kernel
        stored ``(out, in)``: stacked axes are quantized layer by layer, int8 scales are
        per fan-out entry, NF4 blocks run along the fan-in. Default: no stacked axes,
        the last axis is the output.
      block_size: NF4 values per block (an even number; QLoRA uses 64).
      double_quant: NF4: quantize the block scales too (QLoRA's double quantization).

    Returns:
      A :class:`QuantizedKernel` with ``shape == w.shape`` and ``dtype == w.dtype``.

    Example:
      >>> import jax.numpy as jnp
      >>> qk = quantize(jnp.ones((4, 3)), "int8")
      >>> qk.values.dtype, qk.scales.shape
      (dtype('int8'), (1, 3))
    """
    if scheme not in SCHEMES:
        raise ValueError(f"`scheme` must be one of {SCHEMES}, got {scheme!r}.")
    dtype = getattr(w, "dtype", None)
    if dtype is None or not jnp.issubdtype(dtype, jnp.floating) or np.ndim(w) < 2:
        raise TypeError(
            f"`w` must be a floating-point kernel with at least 2 axes, got "
            f"{type(w).__name__} with shape {np.shape(w)} and dtype {dtype}."
        )
    if not isinstance(block_size, int) or block_size < 2 or block_size % 2:
        raise ValueError(
            f"`block_size` must be a positive even int (two 4-bit codes per byte), got "
            f"{block_size!r}."
        )
    if scheme == "int8" and double_quant:
        raise ValueError("`double_quant` applies to scheme 'nf4' only (int8 has one scale "
                         "per output channel).")
    lay = _layout_of(w.shape, layout)
    return _quantize(w, scheme, lay, block_size, double_quant)


@functools.partial(jax.jit, static_argnums=(1, 2, 3, 4))
def _quantize(w, scheme: str, lay: Layout, block_size: int, double_quant: bool):
    ns = lay.num_stacked
    _, fan_in, fan_out = lay.split_shape(w.shape)
    layer = lay.unstacked(ns)
    statics: dict[str, Any] = dict(scheme=scheme, layout=layer.axes,
                   layer_shape=layer.kernel_shape((), fan_in, fan_out), dtype=np.dtype(w.dtype),
                   block_size=block_size, stacked_axes=lay.stacked_axes)
    x = jnp.asarray(w, jnp.float32)
    if scheme == "int8":  # elementwise with keepdims: the arrays keep the kernel's order
        absmax = jnp.max(jnp.abs(x), axis=lay.fan_in_axes, keepdims=True)
        scales = absmax / 127.0
        q = jnp.round(x / jnp.where(scales > 0, scales, 1.0))
        values = jnp.clip(q, -127, 127).astype(jnp.int8)
        return QuantizedKernel(values, scales, **statics)
    # Torch's (fan_out, fan_in) weight per layer, so blocks run along the fan-in.
    rows = jnp.swapaxes(lay.to_matrix(x), -1, -2)
    blocks, _ = _blocks(rows, ns, block_size)
    absmax = jnp.max(jnp.abs(blocks), axis=-1)
    normed = blocks / jnp.where(absmax > 0, absmax, 1.0)[..., None]
    codes = _nearest(NF4_CODE, normed)
    values = (codes[..., 0::2] << 4) | codes[..., 1::2]
    place = functools.partial(_place, stacked_axes=lay.stacked_axes, layer_ndim=layer.ndim)
    if not double_quant:
        return QuantizedKernel(place(values), place(absmax), **statics)
    offset = jnp.mean(absmax, axis=-1)
    groups, _ = _blocks(absmax - offset[..., None], ns, DQ_BLOCK)
    group_max = jnp.max(jnp.abs(groups), axis=-1)
    normed = groups / jnp.where(group_max > 0, group_max, 1.0)[..., None]
    scale_codes = _nearest(DYNAMIC_CODE, normed).reshape(*groups.shape[:-2], -1)
    scale_codes = scale_codes[..., : absmax.shape[-1]]
    return QuantizedKernel(place(values), place(scale_codes), place(group_max), place(offset),
                           **statics)


def _dequantize_arrays(*arrays, fields: tuple[str, ...], statics: tuple) -> jax.Array:
    kernel = QuantizedKernel.from_fields(statics, dict(zip(fields, arrays, strict=True)))
    return kernel.dequantized()


def _dequantize_batched(arrays, dims, *, fields, statics):
    """``vmap`` over quantized kernels: the mapped axis becomes their first stacked axis.

    The mapped axis may be a stacked axis anywhere in the stored kernel (``vmap`` over
    the layers of an ``"iso"`` kernel, ``in_axes=1``): each mapped kernel's own layout
    comes from ``statics`` and its arrays' number of axes, and the batch puts one more
    stacked axis before it, so the statics say where the stacked axes now are.
    """
    size = next(x.shape[d] for x, d in zip(arrays, dims, strict=True) if d is not None)
    moved = [jnp.broadcast_to(x, (size, *x.shape)) if d is None else jnp.moveaxis(x, d, 0)
             for x, d in zip(arrays, dims, strict=True)]
    values_ndim = moved[fields.index("values")].ndim - 1  # one mapped kernel's
    batched = QuantizedKernel.stacked_statics(statics, values_ndim)
    return dequantize_p.bind(*moved, fields=fields, statics=batched), 0


# `dequantize` is a primitive of its own (operands: the kernel's arrays; params: their
# `fields` and the kernel's `statics`), so the factored transform finds it in a traced
# program, keeps the kernel quantized there, and dequantizes it only where it is consumed.
# Everywhere else it is `QuantizedKernel.dequantized`: value, derivative, vmap, lowering.
dequantize_p = jc.define_primitive("jlora_dequantize", _dequantize_arrays,
                                   batch_rule=_dequantize_batched)


def dequantize(x):
    """The float kernel of a :class:`QuantizedKernel`; any other value is returned as is.

    Call it where the model reads a kernel that may be quantized: under
    ``jlora.lora`` it is recognised (it is one primitive, ``dequantize_p``, in the traced
    program), and the kernel is dequantized only where it is multiplied (one layer at a
    time under ``scan``), never as a whole stack.

    Example:
      >>> import jax.numpy as jnp
      >>> w = jnp.array([[127.0, -2.0], [1.0, 127.0]])   # scale 1 per column: exact
      >>> dequantize(quantize(w, "int8")).tolist()
      [[127.0, -2.0], [1.0, 127.0]]
      >>> dequantize(w) is w
      True
    """
    if isinstance(x, QuantizedKernel):
        fields = x.fields()
        return dequantize_p.bind(*(getattr(x, f) for f in fields), fields=fields,
                                 statics=x.statics())
    return x


def _compiled(patterns) -> list:
    return [(paths_lib.compile_pattern(k, field=f"layouts[{k!r}]"), v)
            for k, v in (patterns or {}).items()]


def quantize_params(params, scheme: str = "nf4", *, targets: str = r".*kernel",
                    exclude: str | None = None, layouts: Mapping[str, str | Layout] | None = None,
                    block_size: int = 64, double_quant: bool = False):
    """``params`` with every floating-point kernel ``targets`` matches quantized.

    Args:
      params: a parameter pytree.
      scheme, block_size, double_quant: as for :func:`quantize`.
      targets: regular expression matched in full against each leaf's path.
      exclude: paths matching it stay as they are (e.g. the output head).
      layouts: ``{pattern or path: layout}`` as in ``jlora.LoraConfig.layouts`` (e.g.
        from ``jlora.infer_layouts``): needed for stacked kernels (``"s..."``, or
        ``"isoo"`` where the layers are not the first axis), kernels stored in another
        axis order (``"oi"``) and those whose layout cannot be inferred.

    Returns:
      The same tree with :class:`QuantizedKernel` leaves; leaves with fewer than two
      axes or a non-float dtype are left alone even if they match.

    Example:
      >>> import jax.numpy as jnp
      >>> q = quantize_params({"d": {"kernel": jnp.ones((64, 8)), "bias": jnp.ones(8)}}, "int8")
      >>> type(q["d"]["kernel"]).__name__, q["d"]["bias"].shape
      ('QuantizedKernel', (8,))
    """
    regex = paths_lib.compile_pattern(targets, field="targets")
    skip = paths_lib.compile_pattern(exclude, field="exclude") if exclude else None
    patterns = _compiled(layouts)
    hits = []

    def one(path, leaf):
        if not regex.fullmatch(path) or (skip and skip.fullmatch(path)):
            return leaf
        dtype = getattr(leaf, "dtype", None)
        if is_quantized(leaf) or dtype is None or not jnp.issubdtype(dtype, jnp.floating):
            return leaf
        if np.ndim(leaf) < 2:
            return leaf
        try:
            layout = resolve_layout(path, leaf.shape, patterns)
        except LayoutError as e:
            raise LayoutError(f"quantize_params: {e} (pass it in `layouts`).") from None
        hits.append(path)
        return quantize(leaf, scheme, layout=layout, block_size=block_size,
                        double_quant=double_quant)

    out = paths_lib.tree_map_with_path(one, params)
    if not hits:
        paths_lib.matching_paths(params, targets, field="targets")  # names the nearest paths
        raise ValueError(
            f"`targets` pattern {targets!r} matches no floating-point kernel with 2 or more "
            "axes: nothing was quantized."
        )
    return out


def dequantize_params(params):
    """``params`` with every :class:`QuantizedKernel` replaced by its float kernel.

    Example:
      >>> import jax.numpy as jnp
      >>> p = dequantize_params({"k": quantize(jnp.ones((4, 2)), "int8")})
      >>> p["k"].shape
      (4, 2)
    """
    return jax.tree.map(dequantize, params, is_leaf=is_quantized)


def merge(params, adapters, *, requantize: bool = False):
    """Merge adapters into a (partly) quantized base.

    Each adapted :class:`QuantizedKernel` is dequantized and ``W + s·A·B`` is formed in
    float32 (``jlora.merge`` does the same). With ``requantize=True`` the merged kernel
    is quantized again with its scheme, layout and block size, and a
    :class:`QuantizationWarning` says that the stored weights now differ from
    ``W + s·A·B`` by rounding (PEFT warns the same when merging into a 4-bit layer);
    otherwise the merged kernels are returned as floats, exactly as the adapted model
    computes them.

    Example:
      >>> import jax, jax.numpy as jnp, jlora
      >>> params = {"d": {"kernel": quantize(jnp.ones((8, 4)), "int8")}}
      >>> ads = jlora.init(jax.random.key(0), params, jlora.LoraConfig(rank=2))
      >>> merge(params, ads)["d"]["kernel"].dtype
      dtype('float32')
    """
    # The adapted kernels as floats first: the dense merge then sees plain arrays.
    floats = paths_lib.tree_map_with_path(
        lambda path, leaf: dequantize(leaf) if path in adapters else leaf, params)
    merged = _dense_merge(floats, adapters)
    if not requantize:
        return merged
    base = paths_lib.select(params, ".*", allow_empty=True)
    redone = [p for p in adapters if is_quantized(base.get(p))]
    if redone:
        warnings.warn(
            f"Requantizing {len(redone)} merged kernel(s) (e.g. {redone[0]!r}, "
            f"{base[redone[0]].scheme}): the stored weights differ from W + s·A·B by "
            "quantization rounding, so outputs will differ slightly from the adapted model. "
            "Use requantize=False to keep the merged kernels in float.",
            QuantizationWarning,
            stacklevel=2,
        )

    def requant(path, leaf):
        old = base.get(path)
        if path not in adapters or not is_quantized(old):
            return leaf
        return quantize(leaf, old.scheme, layout=old.kernel_layout, block_size=old.block_size,
                        double_quant=old.double_quant)

    return paths_lib.tree_map_with_path(requant, merged)
