"""`Adapter`: one kernel's low-rank factors, with their scale and layout as static data.

The adapters of a model are a plain ``dict`` ``{kernel path: Adapter}``. Each
``Adapter`` is a pytree whose leaves are exactly its trainable arrays (``a``, ``b``
and, for DoRA, ``magnitude``); rank, alpha, scale, policy, layout and variant are
static metadata. So ``jax.grad``, optax and checkpointing see only the factors, and
``merge``, the factored transform, save and export read the scale from the adapter
itself: nothing can apply the wrong one.

Example:
  >>> import jax.numpy as jnp, jax
  >>> from jlora._adapter import Adapter
  >>> from jlora.layouts import Layout
  >>> ad = Adapter(a=jnp.ones((4, 2)), b=jnp.ones((2, 3)), layout=Layout("io"),
  ...              rank=2, alpha=2.0, scale=1.0, policy="standard")
  >>> [x.shape for x in jax.tree.leaves(ad)]
  [(4, 2), (2, 3)]
  >>> ad.delta().shape
  (4, 3)
"""

from __future__ import annotations

import dataclasses
import math
from typing import TypeAlias

import jax
import jax.numpy as jnp

from jlora.layouts import Layout

__all__ = ["Adapter", "Adapters", "check_adapters", "is_adapter"]


@dataclasses.dataclass(frozen=True)
class Adapter:
    """Low-rank factors of one kernel: ``delta = scale * A @ B`` in the kernel's layout.

    Attributes:
      a: ``(*stacked, *fan_in, rank)``.
      b: ``(*stacked, rank, *fan_out)``.
      magnitude: DoRA's per-output-feature magnitude ``(*stacked, *fan_out)``, else None.
      layout: the kernel's :class:`~jlora.layouts.Layout`.
      rank, alpha: the values this kernel was created with.
      scale: the policy applied to ``(rank, alpha)``; static, never trained.
      policy: ``"standard"``, ``"rslora"`` or ``"custom"`` (a callable; its value is kept
        here per kernel).
      variant: the name of its :class:`jlora.variants.Variant`: ``"lora"``, ``"dora"`` or
        one registered with ``jlora.variants.register_variant``.
      dropout: PEFT's ``lora_dropout`` rate on the adapter branch's input (factored path).

    Example:
      >>> import jax, jax.numpy as jnp, jlora
      >>> ad = jlora.init(jax.random.key(0), {"k": jnp.ones((8, 4))},
      ...                 jlora.LoraConfig(rank=2, targets="k"))["k"]
      >>> ad.kernel_shape, ad.scale, ad.num_params
      ((8, 4), 4.0, 24)
    """

    a: jax.Array
    b: jax.Array
    magnitude: jax.Array | None = None
    layout: Layout = dataclasses.field(default=Layout("io"), metadata={"static": True})
    rank: int = dataclasses.field(default=1, metadata={"static": True})
    alpha: float = dataclasses.field(default=1.0, metadata={"static": True})
    scale: float = dataclasses.field(default=1.0, metadata={"static": True})
    policy: str = dataclasses.field(default="standard", metadata={"static": True})
    variant: str = dataclasses.field(default="lora", metadata={"static": True})
    dropout: float = dataclasses.field(default=0.0, metadata={"static": True})

    @property
    def kernel_shape(self) -> tuple[int, ...]:
        """The shape of the kernel these factors adapt (in the kernel's own axis order)."""
        ns = self.layout.num_stacked
        return self.layout.kernel_shape(self.a.shape[:ns], self.a.shape[ns:-1],
                                        self.b.shape[ns + 1:])

    @property
    def num_params(self) -> int:
        """Trainable parameter count of this adapter."""
        return sum(math.prod(x.shape) for x in jax.tree.leaves(self))

    def validate(self, path: str = "<adapter>") -> None:
        """Check the factors agree with each other, the rank and the layout.

        Raises ``ValueError`` naming ``path`` and the shapes (e.g. stacked axes of ``a``
        and ``b`` that disagree, as when factors from two models are mixed). The arrays a
        variant adds (DoRA's magnitude) are its variant's to check
        (:meth:`jlora.variants.Variant.check`).
        """
        lay, ns = self.layout, self.layout.num_stacked
        n_in, n_out = len(lay.fan_in_axes), len(lay.fan_out_axes)
        a_shape, b_shape = tuple(self.a.shape), tuple(self.b.shape)
        problem = None
        if len(a_shape) != ns + n_in + 1 or len(b_shape) != ns + 1 + n_out:
            problem = (f"layout {lay.axes!r} needs `a` with {ns + n_in + 1} axes and `b` with "
                       f"{ns + 1 + n_out}")
        elif a_shape[:ns] != b_shape[:ns]:
            problem = f"the stacked axes of `a` {a_shape[:ns]} and `b` {b_shape[:ns]} disagree"
        elif not a_shape[-1] == b_shape[ns] == self.rank:
            problem = (f"the rank axes of `a` ({a_shape[-1]}) and `b` ({b_shape[ns]}) must both "
                       f"equal rank {self.rank}")
        if problem:
            raise ValueError(
                f"The adapter at path {path!r} is inconsistent: {problem} (a: {a_shape}, "
                f"b: {b_shape})."
            )

    def product(self, dtype=jnp.float32) -> jax.Array:
        """``A @ B`` in the kernel's shape, unscaled, accumulated in float32."""
        return self.layout.product(self.a, self.b, dtype)

    def delta(self, dtype=jnp.float32) -> jax.Array:
        """``scale * A @ B`` in the kernel's shape: the low-rank update every variant
        shares (DoRA's norm not applied)."""
        return self.scale * self.product(dtype)

    def replace(self, **changes) -> Adapter:
        """A copy with some fields changed (``dataclasses.replace``)."""
        return dataclasses.replace(self, **changes)


jax.tree_util.register_dataclass(
    Adapter,
    data_fields=["a", "b", "magnitude"],
    meta_fields=["layout", "rank", "alpha", "scale", "policy", "variant", "dropout"],
)

Adapters: TypeAlias = dict[str, Adapter]  # {kernel path: Adapter}, as jlora.init returns


def is_adapter(x) -> bool:
    """``True`` for an :class:`Adapter` (useful as ``is_leaf`` in tree maps).

    Example:
      >>> is_adapter(1.0)
      False
    """
    return isinstance(x, Adapter)


def check_adapters(adapters) -> None:
    """Refuse anything but the ``{path string: Adapter}`` dict that :func:`jlora.init` returns.

    Abstract adapters (from ``jax.eval_shape``) pass too: only the container is checked.

    Example:
      >>> check_adapters([])
      Traceback (most recent call last):
      ...
      TypeError: `adapters` must be the dict {path: Adapter} that jlora.init returns, got list.
    """
    if not isinstance(adapters, dict):
        raise TypeError(
            f"`adapters` must be the dict {{path: Adapter}} that jlora.init returns, got "
            f"{type(adapters).__name__}."
        )
    for path, adapter in adapters.items():
        if not isinstance(path, str):
            raise TypeError(f"Adapter keys must be path strings, got {path!r}.")
        if not isinstance(adapter, Adapter):
            raise TypeError(
                f"`adapters[{path!r}]` must be a jlora Adapter, got {type(adapter).__name__}."
            )
