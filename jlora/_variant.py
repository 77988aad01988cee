"""The variant interface: how one kind of adapter initialises, merges and is applied.

An adapter's ``variant`` (``"lora"``, ``"dora"``, ...) names a :class:`Variant`, a
stateless object registered here by :func:`register_variant`. Every variant shares the
low-rank update ``s·A@B`` (:meth:`jlora.Adapter.delta`); ``jlora.init``, ``merge``,
``unmerge`` and the factored transform ask the adapter's variant for everything else, so
a new variant is one module: a subclass of :class:`Variant` overriding what differs from
plain LoRA, registered by name (PEFT's ``LoraVariant`` plays this part).

The factored transform computes each consumer of an adapted kernel (``x·W``, a conv, an
embedding lookup) as ``base = x·W`` plus ``branch = s·((x·A)·B)``. A variant whose merged
kernel is plain LoRA's rescaled per output feature (DoRA's ``m / ‖W + s·A·B‖``) says so
with ``rescales_output``; the transform then asks :meth:`Variant.output_factor` once per
kernel, broadcasts the factor against each output, and :meth:`Variant.combine` puts base,
branch and factor together.

The plain LoRA variant is registered here; the others register themselves in
:mod:`jlora.variants`.

Example:
  >>> import jax.numpy as jnp
  >>> from jlora._adapter import Adapter
  >>> lora = get_variant("lora")
  >>> ad = Adapter(a=jnp.ones((2, 1)), b=jnp.ones((1, 3)))
  >>> lora.merge(jnp.zeros((2, 3)), ad)
  Array([[1., 1., 1.],
         [1., 1., 1.]], dtype=float32)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import jax
import jax.numpy as jnp

from jlora._adapter import Adapter
from jlora.layouts import Layout

__all__ = ["Variant", "get_variant", "register_variant", "variant_names"]


class Variant:
    """Plain LoRA, and the base class of every variant: ``W' = W + s·A@B``.

    Class attributes:
      name: the ``variant`` string of the adapters it serves.
      title: how error messages and reports name it (``"DoRA"``).
      merge_needs_whole_fan_in: whether merging a block of fan-in rows of a kernel needs
        every row (DoRA's norm spans the fan-in); else merges may go block by block.
      rescales_output: whether :meth:`output_factor` returns a factor (else it is not
        called and :meth:`combine` gets ``factor=None``).
      unmerge_refusal: why merged weights cannot be unmerged, or None when they can.

    Every method receives a kernel in its own axis order and shape, and the adapter that
    fits it (``adapter.layout`` says which axes are stacked, fan-in and fan-out).

    The low-rank update itself is always ``adapter.delta() = s·A@B`` (the factored
    transform computes it as ``s·((x·A)·B)``); a variant decides what the kernel becomes
    with it.

    Example:
      >>> class Doubled(Variant):     # W' = 2·(W + s·A@B)
      ...     name, title, rescales_output = "doubled", "doubled LoRA", True
      ...     def merge(self, kernel, adapter):
      ...         return 2 * super().merge(kernel, adapter)
      ...     def output_factor(self, kernel, adapter):   # (*stacked, *fan_out)
      ...         stacked, _, fan_out = adapter.layout.split_shape(kernel.shape)
      ...         return jnp.full((*stacked, *fan_out), 2.0)
      ...     def combine(self, base, branch, factor, dropped):
      ...         return factor * super().combine(base, branch, None, None)
      >>> Doubled().rescales_output, Doubled().merge_needs_whole_fan_in
      (True, False)
    """

    name: ClassVar[str] = "lora"
    title: ClassVar[str] = "LoRA"
    merge_needs_whole_fan_in: ClassVar[bool] = False
    rescales_output: ClassVar[bool] = False
    unmerge_refusal: ClassVar[str | None] = None

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"

    def extra_shapes(self, layout: Layout, kernel_shape: Sequence[int]) -> dict:
        """``{field: shape}`` of the trainable arrays this variant adds to ``a`` and ``b``
        (fields of :class:`~jlora.Adapter`), for a kernel of ``kernel_shape``."""
        del layout, kernel_shape
        return {}

    def check(self, adapter: Adapter, path: str) -> None:
        """Raise ``ValueError`` naming ``path`` if ``adapter`` lacks one of this variant's
        arrays or has one of the wrong shape."""
        for field, shape in self.extra_shapes(adapter.layout, adapter.kernel_shape).items():
            x = getattr(adapter, field)
            if x is None:
                raise ValueError(
                    f"The {self.title} adapter at path {path!r} has no {field}: create it with "
                    f"jlora.init(..., LoraConfig(variant={self.name!r})) so that it is "
                    "initialised."
                )
            if tuple(x.shape) != tuple(shape):
                raise ValueError(
                    f"The {self.title} adapter at path {path!r} has a {field} of shape "
                    f"{tuple(x.shape)}, expected {tuple(shape)} for its kernel of shape "
                    f"{adapter.kernel_shape} (layout {adapter.layout.axes!r})."
                )

    def init(self, kernel: jax.Array, adapter: Adapter) -> Adapter:
        """``adapter`` with this variant's extra trainable arrays set from ``kernel``.

        Called once the factors exist (after any init that rewrites the base, with the
        new base), so the adapted model starts equal to the base.
        """
        del kernel
        return adapter

    def merge(self, kernel: jax.Array, adapter: Adapter) -> jax.Array:
        """The merged kernel, in ``kernel``'s dtype, computed in float32."""
        return (kernel.astype(jnp.float32) + adapter.delta()).astype(kernel.dtype)

    def unmerge(self, kernel: jax.Array, adapter: Adapter) -> jax.Array:
        """The inverse of :meth:`merge` (only called when ``unmerge_refusal`` is None)."""
        return (kernel.astype(jnp.float32) - adapter.delta()).astype(kernel.dtype)

    def output_factor(self, kernel: jax.Array, adapter: Adapter) -> jax.Array:
        """Per output feature, what the factored output is multiplied by:
        ``(*stacked, *fan_out)`` float32. Only called when ``rescales_output``."""
        raise NotImplementedError(f"Variant {self.name!r} does not rescale its output.")

    def combine(self, base: jax.Array, branch: jax.Array, factor: jax.Array | None,
                dropped: jax.Array | None) -> jax.Array:
        """A consumer's output from ``base = x·W`` and ``branch = s·((x_d·A)·B)``.

        ``factor`` is :meth:`output_factor` broadcast against the output (None unless
        ``rescales_output``); ``dropped`` is ``x_d·W``, the base on the adapter branch's
        input after dropout, given only when there is a factor and dropout is active.
        """
        del factor, dropped
        return base + branch.astype(base.dtype)


_REGISTRY: dict[str, Variant] = {}


def register_variant(variant: Variant) -> Variant:
    """Make ``variant`` the one that serves adapters whose ``variant`` is ``variant.name``.

    Registering under a name already taken replaces that variant. A new variant's
    module calls this once, at import.

    Example:
      >>> register_variant(get_variant("lora"))   # as the plain variant registers itself
      Variant('lora')
    """
    if not isinstance(variant, Variant):
        raise TypeError(
            f"register_variant takes a jlora Variant instance, got {type(variant).__name__}."
        )
    _REGISTRY[variant.name] = variant
    return variant


def get_variant(name: str) -> Variant:
    """The registered variant called ``name``.

    Example:
      >>> get_variant("lora").rescales_output
      False
    """
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise ValueError(
            f"Unknown adapter variant {name!r}: expected one of {variant_names()}. A new "
            "variant is a jlora.variants.Variant subclass passed to register_variant."
        ) from None


def variant_names() -> list[str]:
    """The names of every registered variant, in the order they were registered.

    Example:
      >>> "lora" in variant_names()
      True
    """
    return list(_REGISTRY)


register_variant(Variant())
