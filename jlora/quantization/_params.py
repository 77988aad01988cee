"""Whole parameter trees: quantize, dequantize, and merge adapters into a quantized base."""

from __future__ import annotations

import warnings
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from jlora import _deprecation as deprecation
from jlora import _paths as paths_lib
from jlora._merging import merge as _dense_merge
from jlora.layouts import Layout, LayoutError, resolve_layout
from jlora.quantization._kernel import dequantize, is_quantized, quantize

__all__ = ["QuantizationWarning", "dequantize_params", "merge", "merge_quantized",
           "quantize_params"]


class QuantizationWarning(UserWarning):
    """Requantizing merged weights: the stored kernel differs from ``W + s·A·B`` by rounding."""


def _compiled(patterns) -> list:
    return [(paths_lib.compile_pattern(k, field=f"layouts[{k!r}]"), v)
            for k, v in (patterns or {}).items()]


def quantize_params(params, scheme: str = "nf4", *, targets: str = r".*kernel",
                    exclude: str | None = None, layouts: Mapping[str, str | Layout] | None = None,
                    block_size: int | None = None, double_quant: bool = False):
    """``params`` with every floating-point kernel ``targets`` matches quantized.

    Args:
      params: a parameter pytree.
      scheme, block_size, double_quant: as for :func:`~jlora.quantization.quantize`.
      targets: regular expression matched in full against each leaf's path.
      exclude: paths matching it stay as they are (e.g. the output head).
      layouts: ``{pattern or path: layout}`` as in ``jlora.LoraConfig.layouts`` (e.g.
        from ``jlora.infer_layouts``): needed for stacked kernels (``"s..."``, or
        ``"isoo"`` where the layers are not the first axis), kernels stored in another
        axis order (``"oi"``) and those whose layout cannot be inferred.

    Returns:
      The same tree with :class:`~jlora.quantization.QuantizedKernel` leaves; leaves with
      fewer than two axes or a non-float dtype are left alone even if they match.

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
    """``params`` with every quantized kernel replaced by its float kernel.

    Example:
      >>> import jax.numpy as jnp
      >>> p = dequantize_params({"k": quantize(jnp.ones((4, 2)), "int8")})
      >>> p["k"].shape
      (4, 2)
    """
    return jax.tree.map(dequantize, params, is_leaf=is_quantized)


def merge_quantized(params, adapters, *, requantize: bool = False):
    """Merge adapters into a (partly) quantized base, optionally quantizing the result again.

    Each adapted quantized kernel is dequantized and ``W + s·A·B`` is formed in float32
    (``jlora.merge`` does the same). With ``requantize=True`` the merged kernel is
    quantized again with its scheme, layout, block size and double quantization, and a
    :class:`QuantizationWarning` says that the stored weights now differ from
    ``W + s·A·B`` by rounding (PEFT warns the same when merging into a 4-bit layer);
    otherwise the merged kernels are returned as floats, exactly as the adapted model
    computes them. Kernels without adapters stay as they are (quantized or not).

    Example:
      >>> import jax, jax.numpy as jnp, jlora
      >>> params = {"d": {"kernel": quantize(jnp.ones((8, 4)), "int8")}}
      >>> ads = jlora.init(jax.random.key(0), params, jlora.LoraConfig(rank=2))
      >>> merge_quantized(params, ads)["d"]["kernel"].dtype
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


def merge(params, adapters, *, requantize: bool = False):
    """Deprecated name of :func:`merge_quantized` (``jlora.merge`` is the dense merge).

    Example:
      >>> import warnings
      >>> with warnings.catch_warnings(record=True) as caught:
      ...     warnings.simplefilter("always")
      ...     _ = merge({}, {})
      >>> caught[0].category.__name__
      'DeprecationWarning'
    """
    deprecation.warn("`jlora.quantization.merge` is deprecated and will be removed in the "
                     "next release: use `jlora.quantization.merge_quantized` (the same "
                     "function; `jlora.merge` is the dense merge).")
    return merge_quantized(params, adapters, requantize=requantize)
