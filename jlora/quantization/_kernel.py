"""The quantized kernel: :class:`QuantizedKernel`, :func:`quantize`, :func:`dequantize`.

``dequantize`` is one primitive (``dequantize_p``) so that the factored transform finds
it in a traced program; everything scheme-specific is behind :mod:`._scheme`.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
from collections.abc import Mapping
from typing import Any, ClassVar, TypeGuard

import jax
import jax.numpy as jnp
import numpy as np

from jlora import _jax_compat as jc
from jlora.layouts import Layout, LayoutError
from jlora.quantization import _int4, _nf4, _per_channel
from jlora.quantization._blocks import place
from jlora.quantization._scheme import get_scheme, scheme_names

__all__ = ["SCHEMES", "QuantizedKernel", "dequantize", "dequantize_p", "is_quantized",
           "quantize"]

# The built-in schemes, registered by their modules.
SCHEMES = tuple(s.name for s in (_per_channel.INT8, _nf4.NF4, _int4.INT4, _per_channel.FP8))


@dataclasses.dataclass(frozen=True)
class QuantizedKernel:
    """A frozen kernel stored quantized; :func:`dequantize` gives it back as floats.

    Every array has as many axes as the kernel, one set of quantized values and scales
    per layer, and the kernel's stacked axes at the kernel's own positions (first for
    ``"sio"``, second for MaxText's ``"isoo"``). So ``scan``, ``nn.scan`` (whatever its
    variable axis) and indexing a layer slice it like the float kernel, moving a stacked
    axis moves it in every array, and one layer's arrays have the same shapes however
    the layers were stacked. One layer's arrays of the blocked schemes (NF4, int4),
    listed below, are padded with trailing axes of size 1 to the layer's number of axes.

    Attributes:
      values: ``"int8"``: int8, the kernel's shape; ``"fp8"``: float8_e4m3fn, the
        kernel's shape. ``"nf4"``, ``"int4"``: uint8 ``(blocks, block_size // 2, 1, ...)``
        per layer, two 4-bit codes per byte.
      scales: ``"int8"``, ``"fp8"``: float32, the kernel's shape with the fan-in axes of
        size 1. ``"nf4"``: each block's absolute maximum ``(blocks, 1, ...)`` per layer,
        float32, or its 8-bit code (uint8) when double quantized. ``"int4"``: each
        group's step, float32 ``(groups, 1, ...)`` per layer.
      scales_scale: NF4 double quantization only: float32 ``(ceil(blocks / 256), 1, ...)``
        per layer, the absolute maximum of each group of 256 centred block scales.
      scales_offset: NF4 double quantization only: float32 ``(1, 1, ...)`` per layer, the
        mean block scale.
      zeros: ``"int4"`` only: each group's zero point, uint8 ``(groups, 1, ...)`` per layer.
      scheme: ``"int8"``, ``"nf4"``, ``"int4"`` or ``"fp8"``.
      layout: the layout of one layer (no ``s``), e.g. ``"io"`` or ``"oi"``; per-channel
        scales are per entry of its fan-out axes, blocks and groups run along its fan-in.
      layer_shape: the shape of one layer of the kernel (its axes in the kernel's order).
      dtype: the dtype :func:`dequantize` returns (the float kernel's dtype).
      block_size: values per NF4 block or int4 group (the per-channel schemes ignore it).
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
    zeros: jax.Array | None = None
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
        return get_scheme(self.scheme).dequantize(self).astype(self.dtype)

    def stacked_first(self, field: str) -> jax.Array:
        """The array ``field`` with its stacked axes first and, for the blocked schemes
        (NF4, int4), without the padding axes: e.g. NF4's ``values`` ``(*stacked, blocks,
        block_size // 2)``, ``scales`` ``(*stacked, blocks)``, ``scales_scale``
        ``(*stacked, groups)``, ``scales_offset`` ``(*stacked,)``. The per-channel
        schemes' arrays keep one layer's axes in the kernel's order.

        Example:
          >>> import jax.numpy as jnp
          >>> qk = quantize(jnp.ones((64, 3, 8)), "nf4", layout="iso")
          >>> qk.scales.shape, qk.stacked_first("scales").shape
          ((8, 3, 1), (3, 8))
        """
        lay = self.kernel_layout
        ns = lay.num_stacked
        arr = jnp.moveaxis(getattr(self, field), lay.stacked_axes, tuple(range(ns)))
        layer_ndim = get_scheme(self.scheme).layer_ndim
        if layer_ndim is None:
            return arr
        return arr.reshape(arr.shape[: ns + layer_ndim[field]])

    def block_absmax(self) -> jax.Array:
        """NF4: each block's scale, float32 ``(*stacked, blocks)`` (decoded if double quantized)."""
        return _nf4.block_absmax(self)

    # Read-only array behaviour, so code that reads a kernel as an array (``jlora.merge``)
    # sees the dequantized kernel.
    def astype(self, dtype) -> jax.Array:
        """The dequantized kernel cast to ``dtype``."""
        return dequantize(self).astype(dtype)

    def reshape(self, *shape) -> jax.Array:
        """The dequantized kernel reshaped."""
        return dequantize(self).reshape(*shape)


_DATA_FIELDS = ("values", "scales", "scales_scale", "scales_offset", "zeros")
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


def quantize(w, scheme: str = "nf4", *, layout=None, block_size: int | None = None,
             double_quant: bool = False) -> QuantizedKernel:
    """Quantize one float kernel.

    Args:
      w: a floating-point kernel.
      scheme: ``"int8"`` (per output channel), ``"nf4"`` (blocks of ``block_size``),
        ``"int4"`` (asymmetric, groups of ``block_size`` along the fan-in) or ``"fp8"``
        (float8 e4m3, per output channel).
      layout: the kernel's layout (a string or :class:`jlora.Layout`, any axis order),
        e.g. ``"sio"`` for layers stacked under ``nn.scan`` or ``"oi"`` for a kernel
        stored ``(out, in)``: stacked axes are quantized layer by layer, per-channel
        scales are per fan-out entry, NF4 blocks and int4 groups run along the fan-in.
        Default: no stacked axes, the last axis is the output.
      block_size: values per NF4 block (an even number; default 64, as QLoRA) or per
        int4 group (default 128; GPTQ and AWQ use 32, 64 or 128). Ignored by the
        per-channel schemes.
      double_quant: NF4: quantize the block scales too (QLoRA's double quantization).

    Returns:
      A :class:`QuantizedKernel` with ``shape == w.shape`` and ``dtype == w.dtype``.

    Example:
      >>> import jax.numpy as jnp
      >>> qk = quantize(jnp.ones((4, 3)), "int8")
      >>> qk.values.dtype, qk.scales.shape
      (dtype('int8'), (1, 3))
      >>> quantize(jnp.ones((256, 8)), "int4", block_size=64).scales.shape
      (32, 1)
    """
    kind = get_scheme(scheme)
    dtype = getattr(w, "dtype", None)
    if dtype is None or not jnp.issubdtype(dtype, jnp.floating) or np.ndim(w) < 2:
        raise TypeError(
            f"`w` must be a floating-point kernel with at least 2 axes, got "
            f"{type(w).__name__} with shape {np.shape(w)} and dtype {dtype}."
        )
    if block_size is None:
        block_size = kind.default_block_size
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 2 \
            or block_size % 2:
        raise ValueError(
            f"`block_size` must be a positive even int (two 4-bit codes per byte), got "
            f"{block_size!r}."
        )
    if double_quant and not kind.double_quant:
        able = [n for n in scheme_names() if get_scheme(n).double_quant]
        raise ValueError(f"`double_quant` applies to scheme(s) {able} only, not {scheme!r} "
                         "(its scales are not quantized).")
    return _quantize(w, scheme, _layout_of(w.shape, layout), block_size, bool(double_quant))


@functools.partial(jax.jit, static_argnums=(1, 2, 3, 4))
def _quantize(w, scheme: str, lay: Layout, block_size: int, double_quant: bool):
    kind = get_scheme(scheme)
    _, fan_in, fan_out = lay.split_shape(w.shape)
    layer = lay.unstacked(lay.num_stacked)
    arrays = kind.quantize(jnp.asarray(w, jnp.float32), lay, block_size, double_quant)
    if kind.blocked:
        arrays = {field: place(arr, lay) for field, arr in arrays.items()}
    return QuantizedKernel(**arrays, scheme=scheme, layout=layer.axes,
                           layer_shape=layer.kernel_shape((), fan_in, fan_out),
                           dtype=np.dtype(w.dtype), block_size=block_size,
                           stacked_axes=lay.stacked_axes)


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
