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
  QLoRA's 4-bit NormalFloat: each layer's kernel is flattened (C order) and cut into
  blocks of ``block_size`` (64) values, each block scaled by its absolute maximum and
  rounded to the nearest of bitsandbytes' 16 NF4 values; two codes per byte (the first
  in the high nibble, as bitsandbytes packs them). With ``double_quant=True`` the block
  scales are quantized too, as bitsandbytes' ``compress_statistics``: minus their mean,
  in blocks of 256, to the nearest value of bitsandbytes' signed 8-bit dynamic code.

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
import math
import warnings
from collections.abc import Mapping
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from jlora import paths as paths_lib
from jlora.layouts import Layout, LayoutError, resolve_layout
from jlora.merging import merge as _dense_merge

__all__ = [
    "DEQUANTIZE_NAME",
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

# The name of the jitted function `dequantize` calls: the factored transform finds it in
# the traced program by this name (a nested `jit` equation keeps its function's name).
DEQUANTIZE_NAME = "_jlora_dequantize"


class QuantizationWarning(UserWarning):
    """Requantizing merged weights: the stored kernel differs from ``W + s·A·B`` by rounding."""


@dataclasses.dataclass(frozen=True)
class QuantizedKernel:
    """A frozen kernel stored quantized; :func:`dequantize` gives it back as floats.

    Every array has the kernel's stacked axes first (one set of quantized values and
    scales per layer), so ``scan``, ``nn.scan`` and indexing a layer slice it like the
    float kernel.

    Attributes:
      values: ``"int8"``: int8, the kernel's shape. ``"nf4"``: uint8
        ``(*stacked, blocks, block_size // 2)``, two 4-bit codes per byte.
      scales: ``"int8"``: float32, the kernel's shape with the fan-in axes of size 1.
        ``"nf4"``: each block's absolute maximum ``(*stacked, blocks)``, float32, or its
        8-bit code (uint8) when double quantized.
      scales_scale: double quantization only: float32 ``(*stacked, ceil(blocks / 256))``,
        the absolute maximum of each group of 256 centred block scales.
      scales_offset: double quantization only: float32 ``(*stacked,)``, the mean block scale.
      scheme: ``"int8"`` or ``"nf4"``.
      layout: the layout of one layer (no ``s``), e.g. ``"io"``; int8 scales are per
        entry of its fan-out axes.
      layer_shape: the shape of one layer of the kernel.
      dtype: the dtype :func:`dequantize` returns (the float kernel's dtype).
      block_size: NF4 values per block.

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

    # jlora.paths treats objects of classes with this flag as single leaves, so the
    # kernel's path stays `.../kernel` rather than `.../kernel/values`.
    __jlora_kernel__: ClassVar[bool] = True

    @property
    def num_stacked(self) -> int:
        """How many leading stacked (layer) axes the kernel has."""
        per_layer = len(self.layer_shape) if self.scheme == "int8" else 2
        return self.values.ndim - per_layer

    @property
    def shape(self) -> tuple[int, ...]:
        """The float kernel's shape: ``(*stacked, *layer_shape)``."""
        return tuple(self.values.shape[: self.num_stacked]) + tuple(self.layer_shape)

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
        return (self.scheme, self.layout, self.layer_shape, self.dtype, self.block_size)

    def fields(self) -> tuple[str, ...]:
        """The array fields present, in the order ``jax.tree.leaves`` returns them."""
        return tuple(f for f in _DATA_FIELDS if getattr(self, f) is not None)

    @classmethod
    def from_fields(cls, statics: tuple, arrays: Mapping[str, Any]) -> QuantizedKernel:
        """Rebuild from :meth:`statics` and ``{field: array}``."""
        scheme, layout, layer_shape, dtype, block_size = statics
        return cls(**arrays, scheme=scheme, layout=layout, layer_shape=layer_shape,
                   dtype=dtype, block_size=block_size)

    def dequantized(self) -> jax.Array:
        """The float kernel, computed here (no marker for the factored transform)."""
        if self.scheme == "int8":
            out = self.values.astype(jnp.float32) * self.scales.astype(jnp.float32)
            return out.astype(self.dtype)
        stacked = self.values.shape[: self.num_stacked]
        blocks = self.values.shape[-2]
        codes = jnp.stack([self.values >> 4, self.values & 0xF], axis=-1)
        codes = codes.reshape(*stacked, blocks, self.block_size)
        absmax = self.block_absmax()
        flat = jnp.asarray(NF4_CODE)[codes.astype(jnp.int32)] * absmax[..., None]
        size = math.prod(self.layer_shape)
        flat = flat.reshape(*stacked, blocks * self.block_size)[..., :size]
        return flat.reshape(*stacked, *self.layer_shape).astype(self.dtype)

    def block_absmax(self) -> jax.Array:
        """NF4: each block's scale, float32 ``(*stacked, blocks)`` (decoded if double quantized)."""
        if not self.double_quant:
            return self.scales.astype(jnp.float32)
        blocks = self.scales.shape[-1]
        step = jnp.repeat(self.scales_scale, DQ_BLOCK, axis=-1)[..., :blocks]
        code = jnp.asarray(DYNAMIC_CODE)[self.scales.astype(jnp.int32)]
        return code * step + self.scales_offset[..., None]

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
    meta_fields=["scheme", "layout", "layer_shape", "dtype", "block_size"],
)


def is_quantized(x) -> bool:
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
      layout: the kernel's layout (a string or :class:`jlora.Layout`), e.g. ``"sio"``
        for layers stacked under ``nn.scan``: stacked axes are quantized layer by layer,
        int8 scales are per fan-out entry. Default: no stacked axes, the last axis is
        the output.
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
    statics = dict(scheme=scheme, layout=lay.axes[ns:], layer_shape=tuple(w.shape[ns:]),
                   dtype=np.dtype(w.dtype), block_size=block_size)
    x = jnp.asarray(w, jnp.float32)
    if scheme == "int8":
        absmax = jnp.max(jnp.abs(x), axis=lay.fan_in_axes, keepdims=True)
        scales = absmax / 127.0
        q = jnp.round(x / jnp.where(scales > 0, scales, 1.0))
        values = jnp.clip(q, -127, 127).astype(jnp.int8)
        return QuantizedKernel(values, scales, **statics)
    blocks, _ = _blocks(x, ns, block_size)
    absmax = jnp.max(jnp.abs(blocks), axis=-1)
    normed = blocks / jnp.where(absmax > 0, absmax, 1.0)[..., None]
    codes = _nearest(NF4_CODE, normed)
    values = (codes[..., 0::2] << 4) | codes[..., 1::2]
    if not double_quant:
        return QuantizedKernel(values, absmax, **statics)
    offset = jnp.mean(absmax, axis=-1)
    groups, _ = _blocks(absmax - offset[..., None], ns, DQ_BLOCK)
    group_max = jnp.max(jnp.abs(groups), axis=-1)
    normed = groups / jnp.where(group_max > 0, group_max, 1.0)[..., None]
    scale_codes = _nearest(DYNAMIC_CODE, normed).reshape(*groups.shape[:-2], -1)
    scale_codes = scale_codes[..., : absmax.shape[-1]]
    return QuantizedKernel(values, scale_codes, group_max, offset, **statics)


@jax.jit
def _jlora_dequantize(qk: QuantizedKernel) -> jax.Array:
    return qk.dequantized()


assert _jlora_dequantize.__name__ == DEQUANTIZE_NAME


def dequantize(x):
    """The float kernel of a :class:`QuantizedKernel`; any other value is returned as is.

    Call it where the model reads a kernel that may be quantized: under
    ``jlora.lora`` it is recognised, and the kernel is dequantized only where it is
    multiplied (one layer at a time under ``scan``), never as a whole stack.

    Example:
      >>> import jax.numpy as jnp
      >>> w = jnp.array([[127.0, -2.0], [1.0, 127.0]])   # scale 1 per column: exact
      >>> dequantize(quantize(w, "int8")).tolist()
      [[127.0, -2.0], [1.0, 127.0]]
      >>> dequantize(w) is w
      True
    """
    if isinstance(x, QuantizedKernel):
        return _jlora_dequantize(x)
    return x


def _compiled(patterns) -> list:
    return [(paths_lib.compile_pattern(k, field=f"layouts[{k!r}]"), v)
            for k, v in (patterns or {}).items()]


def quantize_params(params, scheme: str = "nf4", *, targets: str = r".*kernel",
                    exclude: str | None = None, layouts: Mapping[str, str] | None = None,
                    block_size: int = 64, double_quant: bool = False):
    """``params`` with every floating-point kernel ``targets`` matches quantized.

    Args:
      params: a parameter pytree.
      scheme, block_size, double_quant: as for :func:`quantize`.
      targets: regular expression matched in full against each leaf's path.
      exclude: paths matching it stay as they are (e.g. the output head).
      layouts: ``{pattern: layout}`` as in ``jlora.LoraConfig.layouts``: needed for
        stacked kernels (``"s..."``) and those whose layout cannot be inferred.

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
    # jlora.merge reads a QuantizedKernel as its dequantized kernel (astype/reshape).
    merged = _dense_merge(params, adapters)
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
        layout = "s" * old.num_stacked + old.layout
        return quantize(leaf, old.scheme, layout=layout, block_size=old.block_size,
                        double_quant=old.double_quant)

    return paths_lib.tree_map_with_path(requant, merged)
