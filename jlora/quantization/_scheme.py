"""The scheme interface: how one quantization format stores a kernel and restores it.

A :class:`Scheme` quantizes a whole float kernel (stacked axes included, any axis order,
as its :class:`~jlora.layouts.Layout` says) into named arrays, and dequantizes a
:class:`~jlora.quantization.QuantizedKernel` back to the float32 kernel. Two storage
forms exist, and ``layer_ndim`` says which one a scheme uses:

* ``layer_ndim = None`` (per-channel schemes): every array keeps the kernel's own axes
  in its order (values the kernel's shape, scales with the fan-in axes of size 1), so
  the arrays are elementwise with the kernel;
* ``layer_ndim = {field: n}`` (blocked schemes): :meth:`Scheme.quantize` returns each
  array as ``(*stacked, *one_layer)`` with ``n`` axes per layer, and the kernel pads one
  layer's axes with trailing 1s to the layer's number of axes and puts the stacked axes
  where the kernel has them (``QuantizedKernel.stacked_first`` undoes it).

Schemes are registered by name (:func:`register_scheme`); ``QuantizedKernel`` and
``quantize`` ask :func:`get_scheme` and know no scheme themselves.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import jax

from jlora.layouts import Layout

__all__ = ["Scheme", "get_scheme", "register_scheme", "scheme_names"]


class Scheme:
    """One quantization format. Subclass it, set the class fields, and register an instance.

    Attributes:
      name: the ``scheme`` string users pass to ``quantize``.
      bits: bits per stored weight value (scales and zero points not counted).
      default_block_size: the ``block_size`` used when none is given (values per block or
        group; per-channel schemes ignore it).
      layer_ndim: ``None`` for arrays in the kernel's own axis order, else the number of
        axes of one layer of each array it may produce (see the module docstring).
      double_quant: whether the scheme can quantize its scales (``double_quant=True``).
    """

    name: ClassVar[str] = ""
    bits: ClassVar[int] = 0
    default_block_size: ClassVar[int] = 64
    layer_ndim: ClassVar[Mapping[str, int] | None] = None
    double_quant: ClassVar[bool] = False

    @property
    def blocked(self) -> bool:
        return self.layer_ndim is not None

    def quantize(self, x: jax.Array, lay: Layout, block_size: int,
                 double_quant: bool) -> dict[str, jax.Array]:
        """``{field: array}`` for the float32 kernel ``x`` of layout ``lay``."""
        raise NotImplementedError

    def dequantize(self, qk: Any) -> jax.Array:
        """The float32 kernel (its own shape and axis order) of the QuantizedKernel ``qk``."""
        raise NotImplementedError


_SCHEMES: dict[str, Scheme] = {}


def register_scheme(scheme: Scheme) -> Scheme:
    """Make ``scheme`` available by its name; returns it.

    Example:
      >>> class Half(Scheme):
      ...     name, bits = "half-test", 16
      >>> register_scheme(Half()).name in scheme_names()
      True
      >>> _ = _SCHEMES.pop("half-test")
    """
    if not scheme.name or scheme.name in _SCHEMES:
        raise ValueError(f"A scheme needs a new, non-empty name, got {scheme.name!r} "
                         f"(registered: {scheme_names()}).")
    _SCHEMES[scheme.name] = scheme
    return scheme


def get_scheme(name: str) -> Scheme:
    """The registered scheme called ``name``.

    Example:
      >>> get_scheme("nonesuch")
      Traceback (most recent call last):
      ...
      ValueError: `scheme` must be one of ...
    """
    try:
        return _SCHEMES[name]
    except (KeyError, TypeError):
        raise ValueError(f"`scheme` must be one of {scheme_names()}, got {name!r}.") from None


def scheme_names() -> tuple[str, ...]:
    """The registered schemes' names, sorted."""
    return tuple(sorted(_SCHEMES))
