"""Kernel layouts: which axes of a kernel are stacked layers, fan-in and fan-out.

A layout is written as one letter per kernel axis, in the kernel's own axis order:

=====  =============================================================
``s``  a stacked axis: scanned layers, experts, a k/v pair kept as separate adapters
``i``  a fan-in axis (contracted with the input)
``o``  a fan-out axis
``w``  a convolution window axis (part of the fan-in, as PEFT flattens it)
``v``  an embedding table's vocabulary axis (its "fan-in": ids index it)
``f``  an embedding table's feature axis
=====  =============================================================

Letters come in any order: ``nn.Dense`` is ``"io"`` and transformers' ``FlaxConv1D``
(GPT-2, stored ``(out, in)``) is ``"oi"``; attention's query ``(embed, heads, head_dim)``
is ``"ioo"`` and the ``gemma`` package's ``q_einsum`` ``(heads, embed, head_dim)`` is
``"oio"``; a ``Dense`` under ``nn.scan`` is ``"sio"`` and MaxText's scanned query
``(embed, layers, heads, head_dim)`` is ``"isoo"``; a 2D ``nn.Conv`` is ``"wwio"``;
``nn.Embed`` is ``"vf"``. A dense layout needs at least one ``i`` and one ``o``; a conv
layout window axes and exactly one ``i`` and one ``o``; an embedding exactly one ``v``
and one ``f``; ``s`` may appear anywhere, any number of times. A layout may also be
``"s..."`` (one ``s`` per stacked axis, then ``...``): those leading stacked axes, with
the rest inferred from the trailing axes as below.

Each adapted kernel gets one pair of factors per stacked index, whatever its axis order:
``A: (*stacked, *fan_in, rank)`` and ``B: (*stacked, rank, *fan_out)``, each group in
the kernel's own order. For a conv, ``A`` is itself a conv kernel ``(*window, in, rank)``
and ``B`` a 1x1 one ``(rank, out)``. :meth:`Layout.to_matrix` is the one place that turns
a kernel into its ``(*stacked, fan_in, fan_out)`` matrix view and back.

Default inference (the layout of flax's own modules), used when no ``layouts`` pattern
in :class:`jlora.LoraConfig` matches the path; such a layout is *guessed*
(``Layout.guessed``), and the factored transform checks it against the model's own use
of the kernel (see :func:`jlora.infer_layouts`):

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
  >>> Layout("isoo").factor_shapes((8, 4, 2, 3), rank=2)
  ((4, 8, 2), (4, 2, 2, 3))
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Sequence

import jax
import jax.numpy as jnp

__all__ = ["Layout", "LayoutError", "infer_layout", "is_layout_spec", "resolve_layout"]

_PARTIAL_RE = re.compile(r"s+\.\.\.")
_FAN_IN, _FAN_OUT = "wiv", "of"


class LayoutError(ValueError):
    """A kernel whose layout is invalid, cannot be inferred, or contradicts the model."""


def _layout_problem(axes) -> str | None:
    """Why ``axes`` is not a valid layout string, or None."""
    if not isinstance(axes, str) or not axes:
        return "a layout is a non-empty string"
    bad = sorted(set(axes) - set("siowvf"))
    if bad:
        return f"unknown letter(s) {bad}"
    count = {c: axes.count(c) for c in "iowvf"}
    if count["v"] or count["f"]:
        if count["v"] != 1 or count["f"] != 1 or count["i"] or count["o"] or count["w"]:
            return "an embedding layout has exactly one 'v' and one 'f' (and any 's')"
    elif count["w"]:
        if count["i"] != 1 or count["o"] != 1:
            return "a conv layout has window axes 'w' and exactly one 'i' and one 'o'"
    elif not (count["i"] and count["o"]):
        return "a layout needs at least one fan-in ('i') and one fan-out ('o') axis"
    return None


def is_layout_spec(spec) -> bool:
    """Whether ``spec`` is a valid layout string or a partial ``"s..."`` one.

    Example:
      >>> is_layout_spec("oi"), is_layout_spec("s..."), is_layout_spec("ii")
      (True, True, False)
    """
    return isinstance(spec, str) and (_PARTIAL_RE.fullmatch(spec) is not None
                                      or _layout_problem(spec) is None)


@dataclasses.dataclass(frozen=True)
class Layout:
    """The role of every axis of one kernel (see the module docstring for the letters).

    Static and hashable: it travels with each adapter as metadata, so ``merge`` and the
    factored transform read the same layout and never guess twice. ``guessed`` marks a
    layout inferred from a shape or a module name rather than given or read from the
    model; it is not part of equality.

    Example:
      >>> lay = Layout("wwio")
      >>> lay.kind, lay.fan_in_axes, lay.fan_out_axes
      ('conv', (0, 1, 2), (3,))
      >>> Layout("oi").canonical_order
      (1, 0)
    """

    axes: str
    guessed: bool = dataclasses.field(default=False, compare=False)

    def __post_init__(self):
        problem = _layout_problem(self.axes)
        if problem:
            raise LayoutError(
                f"Invalid layout {self.axes!r}: {problem}. A layout has one letter per kernel "
                "axis, in any order (s stacked, i fan-in, o fan-out, w conv window, v vocab, "
                "f features), e.g. 'io', 'oi', 'ioo', 'oio', 'iio', 'wwio', 'vf', 'sio', 'isoo'."
            )

    def __repr__(self) -> str:
        return f"Layout({self.axes!r}" + (", guessed=True)" if self.guessed else ")")

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
        return tuple(i for i, c in enumerate(self.axes) if c == "s")

    @property
    def fan_in_axes(self) -> tuple[int, ...]:
        return tuple(i for i, c in enumerate(self.axes) if c in _FAN_IN)

    @property
    def fan_out_axes(self) -> tuple[int, ...]:
        return tuple(i for i, c in enumerate(self.axes) if c in _FAN_OUT)

    @property
    def window_axes(self) -> tuple[int, ...]:
        return tuple(i for i, c in enumerate(self.axes) if c == "w")

    @property
    def canonical_order(self) -> tuple[int, ...]:
        """Kernel axes in the factors' order: stacked, then fan-in, then fan-out."""
        return self.stacked_axes + self.fan_in_axes + self.fan_out_axes

    @property
    def is_canonical(self) -> bool:
        """Whether the kernel's axes already come stacked, fan-in, fan-out."""
        return self.canonical_order == tuple(range(self.ndim))

    def unstacked(self, n: int = 1) -> Layout:
        """The layout after indexing away the first ``n`` stacked axes."""
        if n > self.num_stacked:
            raise LayoutError(f"Layout {self.axes!r} has fewer than {n} stacked axes.")
        return Layout(self.axes.replace("s", "", n), guessed=self.guessed)

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
        return tuple(tuple(shape[i] for i in group) for group in
                     (self.stacked_axes, self.fan_in_axes, self.fan_out_axes))

    def kernel_shape(self, stacked: Sequence[int], fan_in: Sequence[int],
                     fan_out: Sequence[int]) -> tuple[int, ...]:
        """The kernel's shape from its three groups of sizes (the inverse of ``split_shape``)."""
        canonical = (*stacked, *fan_in, *fan_out)
        shape = [0] * self.ndim
        for size, axis in zip(canonical, self.canonical_order, strict=True):
            shape[axis] = size
        return tuple(shape)

    def max_rank(self, shape: Sequence[int]) -> int:
        """The largest rank a factorisation of this kernel can have: min(fan-in, fan-out)."""
        _, fan_in, fan_out = self.split_shape(shape)
        return min(math.prod(fan_in), math.prod(fan_out))

    def factor_shapes(self, shape: Sequence[int], rank: int):
        """Shapes of ``A`` and ``B`` for a kernel of ``shape`` at ``rank``."""
        stacked, fan_in, fan_out = self.split_shape(shape)
        return (*stacked, *fan_in, rank), (*stacked, rank, *fan_out)

    def to_canonical(self, kernel):
        """The kernel transposed to ``(*stacked, *fan_in, *fan_out)`` (a no-op when it is)."""
        return kernel if self.is_canonical else jnp.transpose(kernel, self.canonical_order)

    def from_canonical(self, x):
        """Inverse of :meth:`to_canonical`: ``(*stacked, *fan_in, *fan_out)`` to kernel order."""
        if self.is_canonical:
            return x
        inverse = sorted(range(self.ndim), key=self.canonical_order.__getitem__)
        return jnp.transpose(x, tuple(inverse))

    def to_matrix(self, kernel):
        """The kernel's matrix view ``(*stacked, prod(fan_in), prod(fan_out))``.

        Example:
          >>> import jax.numpy as jnp
          >>> Layout("oio").to_matrix(jnp.zeros((2, 8, 3))).shape
          (8, 6)
        """
        stacked, fan_in, fan_out = self.split_shape(kernel.shape)
        return self.to_canonical(kernel).reshape(*stacked, math.prod(fan_in), math.prod(fan_out))

    def from_matrix(self, matrix, kernel_shape: Sequence[int]):
        """Inverse of :meth:`to_matrix`: the matrix view back to a kernel of ``kernel_shape``."""
        stacked, fan_in, fan_out = self.split_shape(kernel_shape)
        return self.from_canonical(matrix.reshape(*stacked, *fan_in, *fan_out))

    def factor_matrices(self, a: jax.Array, b: jax.Array):
        """The factors' matrix views: ``A (*stacked, prod(fan_in), r)``, ``B (*stacked, r,
        prod(fan_out))``, the two sides of :meth:`to_matrix`.

        Example:
          >>> import jax.numpy as jnp
          >>> a2, b2 = Layout("oiww").factor_matrices(jnp.zeros((4, 3, 3, 2)), jnp.zeros((2, 8)))
          >>> a2.shape, b2.shape
          ((36, 2), (2, 8))
        """
        ns = self.num_stacked
        stacked = a.shape[:ns]
        return (a.reshape(*stacked, math.prod(a.shape[ns:-1]), a.shape[-1]),
                b.reshape(*stacked, b.shape[ns], math.prod(b.shape[ns + 1:])))

    def factors_from_matrices(self, a2: jax.Array, b2: jax.Array, kernel_shape: Sequence[int]):
        """Inverse of :meth:`factor_matrices` for a kernel of ``kernel_shape``: the factors
        ``A (*stacked, *fan_in, r)`` and ``B (*stacked, r, *fan_out)``.

        Example:
          >>> import jax.numpy as jnp
          >>> a, b = Layout("isoo").factors_from_matrices(
          ...     jnp.zeros((4, 8, 2)), jnp.zeros((4, 2, 6)), (8, 4, 2, 3))
          >>> a.shape, b.shape
          ((4, 8, 2), (4, 2, 2, 3))
        """
        stacked, fan_in, fan_out = self.split_shape(kernel_shape)
        return (a2.reshape(*stacked, *fan_in, a2.shape[-1]),
                b2.reshape(*stacked, b2.shape[-2], *fan_out))

    def product(self, a: jax.Array, b: jax.Array, dtype=jnp.float32) -> jax.Array:
        """``A @ B`` in this kernel's shape and axis order, accumulated in ``dtype``.

        Example:
          >>> import jax.numpy as jnp
          >>> Layout("ioo").product(jnp.ones((3, 2)), jnp.ones((2, 4, 5))).shape
          (3, 4, 5)
          >>> Layout("oi").product(jnp.ones((3, 2)), jnp.ones((2, 4))).shape
          (4, 3)
        """
        ns = self.num_stacked
        a2, b2 = self.factor_matrices(a, b)
        ab = jnp.matmul(a2.astype(dtype), b2.astype(dtype), precision=jax.lax.Precision.HIGHEST)
        return self.from_matrix(ab, self.kernel_shape(a.shape[:ns], a.shape[ns:-1],
                                                      b.shape[ns + 1:]))


def _name_at(path: str, i: int) -> str:
    parts = path.split("/")
    return parts[i] if len(parts) >= -i else ""


def infer_layout(path: str, shape: Sequence[int]) -> Layout:
    """The layout flax's own modules give a kernel at ``path`` with ``shape`` (a guess).

    The result has ``guessed=True``: it comes from the shape and the module's name, not
    from the model, and the factored transform checks it against the model's own use.

    Example:
      >>> infer_layout("encoder/query/kernel", (16, 4, 8)).axes
      'ioo'
      >>> infer_layout("Conv_0/kernel", (3, 3, 8, 16)).axes
      'wwio'
    """
    ndim = len(shape)
    leaf, module = _name_at(path, -1), _name_at(path, -2)
    axes = None
    if leaf == "embedding" and ndim == 2:
        axes = "vf"
    elif ndim == 2:
        axes = "io"
    elif ndim == 3 and module in ("query", "key", "value"):
        axes = "ioo"
    elif ndim == 3 and module == "out":
        axes = "iio"
    elif 3 <= ndim <= 5 and "conv" in module.lower():
        axes = "w" * (ndim - 2) + "io"
    if axes is not None:
        return Layout(axes, guessed=True)
    raise LayoutError(
        f"Cannot infer the layout of the kernel at path {path!r} with shape {tuple(shape)}: "
        f"{ndim} axes could be a DenseGeneral/Einsum, a conv or stacked layers. Give it in "
        "`LoraConfig.layouts` as {pattern: layout}, e.g. 'ioo' (in, heads, head_dim), "
        "'iio' (heads, head_dim, out), 'wwio' (2D conv), 'sio' (a Dense under nn.scan) or "
        "'s...' (one stacked axis, the rest inferred); jlora.infer_layouts(fn, params, "
        "*args) reads every kernel's layout from the model."
    )


def resolve_layout(
    path: str,
    shape: Sequence[int],
    layout_patterns: Sequence[tuple[re.Pattern, str | Layout]] = (),
) -> Layout:
    """The layout of the kernel at ``path``: the first matching pattern, else inferred.

    ``layout_patterns`` is a sequence of ``(compiled pattern, layout string)``; the first
    whose pattern fully matches ``path`` (or equals it: the keys of
    :func:`jlora.infer_layouts` are paths) wins.

    Example:
      >>> import re
      >>> resolve_layout("layers/mlp/kernel", (4, 8, 16), [(re.compile("layers/.*"), "s...")]).axes
      'sio'
    """
    for regex, spec in layout_patterns:
        if regex.pattern == path or regex.fullmatch(path):
            if isinstance(spec, str) and _PARTIAL_RE.fullmatch(spec):
                n = spec.count("s")
                if len(shape) <= n:
                    raise LayoutError(
                        f"Layout {spec!r} for path {path!r} (pattern {regex.pattern!r}) has {n} "
                        f"stacked axes but the kernel has shape {tuple(shape)}."
                    )
                inner = infer_layout(path, tuple(shape)[n:])
                layout = Layout("s" * n + inner.axes, guessed=True)
            else:
                layout = spec if isinstance(spec, Layout) else Layout(spec)
            layout.check_shape(shape, path)
            return layout
    layout = infer_layout(path, shape)
    layout.check_shape(shape, path)
    return layout
