"""Kernel layouts: which axes of a kernel are stacked layers, fan-in and fan-out.

A layout is written as one letter per kernel axis:

=====  =============================================================
``s``  a stacked (scanned) layer axis; always leading
``i``  a fan-in axis (contracted with the input)
``o``  a fan-out axis
``w``  a convolution window axis (part of the fan-in, as PEFT flattens it)
``v``  an embedding table's vocabulary axis (its "fan-in": ids index it)
``f``  an embedding table's feature axis
=====  =============================================================

So ``nn.Dense`` is ``"io"``; attention's query ``(embed, heads, head_dim)`` is ``"ioo"``
and its output ``(heads, head_dim, embed)`` is ``"iio"``; a 2D ``nn.Conv`` is
``"wwio"``; ``nn.Embed`` is ``"vf"``; a ``Dense`` under ``nn.scan`` is ``"sio"``.
A layout may also be ``"s..."`` (one ``s`` per stacked axis, then ``...``): those
stacked axes, with the rest inferred from the trailing axes as below.

Each adapted kernel gets one pair of factors per stacked index:
``A: (*stacked, *fan_in, rank)`` and ``B: (*stacked, rank, *fan_out)``. For a conv,
``A`` is itself a conv kernel ``(*window, in, rank)`` and ``B`` a 1x1 one ``(rank, out)``.

Default inference (the layout of flax's own modules), used when no ``layouts`` pattern
in :class:`jlora.LoraConfig` matches the path:

* ``.../embedding`` with 2 axes: ``"vf"``;
* any 2-axis kernel: ``"io"``;
* a 3-axis kernel of a module named ``query``, ``key`` or ``value``: ``"ioo"``;
  of a module named ``out``: ``"iio"`` (linen and NNX multi-head attention);
* a 3- to 5-axis kernel of a module whose name contains ``conv``: a 1D to 3D conv.

Everything else is ambiguous from the shape alone and raises :class:`LayoutError`
asking for a ``layouts`` entry.

Example:
  >>> from jlora.layouts import Layout
  >>> Layout("sio").factor_shapes((4, 8, 16), rank=2)
  ((4, 8, 2), (4, 2, 16))
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Sequence

import jax
import jax.numpy as jnp

__all__ = ["Layout", "LayoutError", "infer_layout", "resolve_layout"]

_LAYOUT_RE = re.compile(r"s*(w+io|i+o+|vf)")
_PARTIAL_RE = re.compile(r"s+\.\.\.")


class LayoutError(ValueError):
    """A kernel whose layout is invalid or cannot be inferred."""


@dataclasses.dataclass(frozen=True)
class Layout:
    """The role of every axis of one kernel (see the module docstring for the letters).

    Static and hashable: it travels with each adapter as metadata, so ``merge`` and the
    factored transform read the same layout and never guess twice.

    Example:
      >>> lay = Layout("wwio")
      >>> lay.kind, lay.fan_in_axes, lay.fan_out_axes
      ('conv', (0, 1, 2), (3,))
    """

    axes: str

    def __post_init__(self):
        if not isinstance(self.axes, str) or not _LAYOUT_RE.fullmatch(self.axes):
            raise LayoutError(
                f"Invalid layout {self.axes!r}: expected one letter per kernel axis matching "
                "'s*(w+io|i+o+|vf)' (s stacked, w window, i fan-in, o fan-out, v vocab, "
                "f features), e.g. 'io', 'ioo', 'iio', 'wwio', 'vf', 'sio'."
            )

    @property
    def kind(self) -> str:
        """``"dense"``, ``"conv"`` or ``"embed"``."""
        if "w" in self.axes:
            return "conv"
        if "v" in self.axes:
            return "embed"
        return "dense"

    @property
    def ndim(self) -> int:
        return len(self.axes)

    @property
    def num_stacked(self) -> int:
        return self.axes.count("s")

    @property
    def stacked_axes(self) -> tuple[int, ...]:
        return tuple(range(self.num_stacked))

    @property
    def fan_in_axes(self) -> tuple[int, ...]:
        return tuple(i for i, c in enumerate(self.axes) if c in "wiv")

    @property
    def fan_out_axes(self) -> tuple[int, ...]:
        return tuple(i for i, c in enumerate(self.axes) if c in "of")

    @property
    def window_axes(self) -> tuple[int, ...]:
        return tuple(i for i, c in enumerate(self.axes) if c == "w")

    def unstacked(self, n: int = 1) -> Layout:
        """The layout after indexing away ``n`` leading stacked axes (what ``scan`` sees)."""
        if n > self.num_stacked:
            raise LayoutError(f"Layout {self.axes!r} has fewer than {n} stacked axes.")
        return Layout(self.axes[n:])

    def check_shape(self, shape: Sequence[int], path: str = "<kernel>") -> None:
        """Raise :class:`LayoutError` naming ``path`` if ``shape`` does not fit this layout."""
        if len(shape) != self.ndim:
            raise LayoutError(
                f"Kernel at path {path!r} has shape {tuple(shape)} ({len(shape)} axes) but its "
                f"layout {self.axes!r} describes {self.ndim} axes."
            )

    def split_shape(self, shape: Sequence[int]):
        """``(stacked, fan_in, fan_out)`` sizes of a kernel with this layout."""
        shape = tuple(shape)
        stacked = shape[: self.num_stacked]
        fan_in = tuple(shape[i] for i in self.fan_in_axes)
        fan_out = tuple(shape[i] for i in self.fan_out_axes)
        return stacked, fan_in, fan_out

    def max_rank(self, shape: Sequence[int]) -> int:
        """The largest rank a factorisation of this kernel can have: min(fan-in, fan-out)."""
        _, fan_in, fan_out = self.split_shape(shape)
        return min(math.prod(fan_in), math.prod(fan_out))

    def factor_shapes(self, shape: Sequence[int], rank: int):
        """Shapes of ``A`` and ``B`` for a kernel of ``shape`` at ``rank``."""
        stacked, fan_in, fan_out = self.split_shape(shape)
        return (*stacked, *fan_in, rank), (*stacked, rank, *fan_out)

    def product(self, a: jax.Array, b: jax.Array, dtype=jnp.float32) -> jax.Array:
        """``A @ B`` in this kernel's shape, accumulated in ``dtype`` (float32 by default).

        Example:
          >>> import jax.numpy as jnp
          >>> Layout("ioo").product(jnp.ones((3, 2)), jnp.ones((2, 4, 5))).shape
          (3, 4, 5)
        """
        ns = self.num_stacked
        stacked = a.shape[:ns]
        fan_in = a.shape[ns:-1]
        fan_out = b.shape[ns + 1 :]
        rank = a.shape[-1]
        a2 = a.reshape(*stacked, math.prod(fan_in), rank).astype(dtype)
        b2 = b.reshape(*stacked, rank, math.prod(fan_out)).astype(dtype)
        ab = jnp.matmul(a2, b2, precision=jax.lax.Precision.HIGHEST)
        return ab.reshape(*stacked, *fan_in, *fan_out)


def _name_at(path: str, i: int) -> str:
    parts = path.split("/")
    return parts[i] if len(parts) >= -i else ""


def infer_layout(path: str, shape: Sequence[int]) -> Layout:
    """The layout flax's own modules give a kernel at ``path`` with ``shape``.

    Example:
      >>> infer_layout("encoder/query/kernel", (16, 4, 8)).axes
      'ioo'
      >>> infer_layout("Conv_0/kernel", (3, 3, 8, 16)).axes
      'wwio'
    """
    ndim = len(shape)
    leaf, module = _name_at(path, -1), _name_at(path, -2)
    if leaf == "embedding" and ndim == 2:
        return Layout("vf")
    if ndim == 2:
        return Layout("io")
    if ndim == 3 and module in ("query", "key", "value"):
        return Layout("ioo")
    if ndim == 3 and module == "out":
        return Layout("iio")
    if 3 <= ndim <= 5 and "conv" in module.lower():
        return Layout("w" * (ndim - 2) + "io")
    raise LayoutError(
        f"Cannot infer the layout of the kernel at path {path!r} with shape {tuple(shape)}: "
        f"{ndim} axes could be a DenseGeneral/Einsum, a conv or stacked layers. Give it in "
        "`LoraConfig.layouts` as {pattern: layout}, e.g. 'ioo' (in, heads, head_dim), "
        "'iio' (heads, head_dim, out), 'wwio' (2D conv), 'sio' (a Dense under nn.scan) or "
        "'s...' (one stacked axis, the rest inferred)."
    )


def resolve_layout(
    path: str,
    shape: Sequence[int],
    layout_patterns: Sequence[tuple[re.Pattern, str]] = (),
) -> Layout:
    """The layout of the kernel at ``path``: the first matching pattern, else inferred.

    ``layout_patterns`` is a sequence of ``(compiled pattern, layout string)``; the first
    whose pattern fully matches ``path`` wins.

    Example:
      >>> import re
      >>> resolve_layout("layers/mlp/kernel", (4, 8, 16), [(re.compile("layers/.*"), "s...")]).axes
      'sio'
    """
    for regex, spec in layout_patterns:
        if regex.fullmatch(path):
            if _PARTIAL_RE.fullmatch(spec):
                n = spec.count("s")
                if len(shape) <= n:
                    raise LayoutError(
                        f"Layout {spec!r} for path {path!r} (pattern {regex.pattern!r}) has {n} "
                        f"stacked axes but the kernel has shape {tuple(shape)}."
                    )
                inner = infer_layout(path, tuple(shape)[n:])
                layout = Layout("s" * n + inner.axes)
            else:
                layout = Layout(spec)
            layout.check_shape(shape, path)
            return layout
    layout = infer_layout(path, shape)
    layout.check_shape(shape, path)
    return layout
