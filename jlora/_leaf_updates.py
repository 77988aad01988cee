"""Trained parts of a frozen leaf: a few rows of an embedding table, a bias on top of a
frozen bias.

:func:`jlora.split_trainable` puts the leaves trained in full into the ``params`` half of
``trainable``. Two PEFT features train *part* of a leaf instead, and keep the leaf itself
frozen: ``trainable_token_indices`` (new rows for a few tokens of an embedding, PEFT's
``TrainableTokensLayer``) and ``lora_bias`` (a bias on ``lora_B``, added to the module's
bias with the adapter's scale). In the ``params`` half such a leaf holds a
:class:`TrainableTokens` or a :class:`LoraBias` (pytrees whose only leaves are the small
trained arrays); ``frozen`` keeps the whole leaf, and :func:`apply_leaf_updates` (used by
:func:`jlora.merge_trainable`) puts the two together. The model always sees a plain
array, so ``jlora.lora(f)(params, adapters) == f(jlora.merge(params, adapters))`` holds
as for any other params.

Example:
  >>> import jax.numpy as jnp
  >>> rows = TrainableTokens(values=jnp.full((1, 2), 7.0), indices=(1,))
  >>> rows.apply(jnp.zeros((3, 2)))
  Array([[0., 0.],
         [7., 7.],
         [0., 0.]], dtype=float32)
  >>> LoraBias(delta=jnp.ones(2), scale=0.5).apply(jnp.ones(2))
  Array([1.5, 1.5], dtype=float32)
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

__all__ = ["LoraBias", "TrainableTokens", "apply_leaf_updates", "bias_beside", "is_leaf_update"]


@dataclasses.dataclass(frozen=True)
class TrainableTokens:
    """New values for a few tokens of an embedding table (PEFT's ``trainable_token_indices``).

    The tokens are the entries ``indices`` of the leaf's axis ``axis``: the rows of a flax
    ``nn.Embed`` table ``(vocab, features)`` (axis 0), or the columns of an output
    projection stored ``(features, vocab)`` (axis 1). They *replace* those entries, as
    PEFT's ``trainable_tokens_delta`` does (despite its name, it holds values, not
    differences).

    Attributes:
      values: ``(len(indices), features)``: the tokens' vectors; the only trained array.
      indices: the token ids, static.
      axis: the axis of the leaf that the ids index, static.

    Example:
      >>> import jax.numpy as jnp
      >>> head = jnp.zeros((2, 4))          # (features, vocab)
      >>> TrainableTokens(values=jnp.ones((1, 2)), indices=(3,), axis=1).apply(head)[:, 3]
      Array([1., 1.], dtype=float32)
    """

    values: jax.Array
    indices: tuple[int, ...] = dataclasses.field(default=(), metadata={"static": True})
    axis: int = dataclasses.field(default=0, metadata={"static": True})

    def apply(self, leaf: jax.Array) -> jax.Array:
        """``leaf`` with the tokens' entries replaced by ``values`` (cast to its dtype)."""
        moved = jnp.moveaxis(leaf, self.axis, 0)
        moved = moved.at[jnp.asarray(self.indices, jnp.int32)].set(
            self.values.astype(leaf.dtype))
        return jnp.moveaxis(moved, 0, self.axis)

    def replace(self, **changes) -> TrainableTokens:
        """A copy with some fields changed (``dataclasses.replace``)."""
        return dataclasses.replace(self, **changes)


@dataclasses.dataclass(frozen=True)
class LoraBias:
    """PEFT's ``lora_bias``: a bias on ``lora_B``, added to the module's bias scaled like
    the low-rank update: ``bias' = bias + scale * delta``.

    Attributes:
      delta: the ``lora_B`` bias, in the shape of the module's bias; trained.
      scale: the adapter's scale, static.
      bias: the module's bias when it is trained in full as well (PEFT's ``bias="all"`` or
        ``"lora_only"`` beside ``lora_bias``), else None: the frozen bias is used.

    Example:
      >>> import jax.numpy as jnp
      >>> LoraBias(delta=jnp.ones(2), scale=2.0, bias=jnp.zeros(2)).apply(jnp.ones(2))
      Array([2., 2.], dtype=float32)
    """

    delta: jax.Array
    scale: float = dataclasses.field(default=1.0, metadata={"static": True})
    bias: jax.Array | None = None

    def apply(self, leaf: jax.Array | None) -> jax.Array:
        """The module's bias (``self.bias`` if trained, else the frozen ``leaf``) with the
        scaled ``delta`` added, in float32 (PEFT's merge order: ``bias + delta * scale``),
        cast back to the bias's dtype."""
        base = leaf if self.bias is None else self.bias
        if base is None:
            raise ValueError("LoraBias.apply needs the frozen bias when it holds none itself.")
        added = base.astype(jnp.float32) + self.delta.astype(jnp.float32) * self.scale
        return added.astype(base.dtype)

    def replace(self, **changes) -> LoraBias:
        """A copy with some fields changed (``dataclasses.replace``)."""
        return dataclasses.replace(self, **changes)


jax.tree_util.register_dataclass(TrainableTokens, data_fields=["values"],
                                 meta_fields=["indices", "axis"])
jax.tree_util.register_dataclass(LoraBias, data_fields=["delta", "bias"], meta_fields=["scale"])


def bias_beside(kernel_path: str) -> str:
    """The path of the bias in the module of the kernel at ``kernel_path``, where a
    :class:`LoraBias` for its adapter goes.

    Example:
      >>> bias_beside("params/fc/kernel")
      'params/fc/bias'
    """
    return f"{kernel_path.rpartition('/')[0]}/bias" if "/" in kernel_path else "bias"


def is_leaf_update(x) -> bool:
    """``True`` for a :class:`TrainableTokens` or :class:`LoraBias` (an ``is_leaf`` for tree
    maps over split_trainable's ``params`` half).

    Example:
      >>> is_leaf_update(1.0)
      False
    """
    return isinstance(x, TrainableTokens | LoraBias)


def apply_leaf_updates(extra, frozen):
    """The model's params from the ``params`` half of ``trainable`` and ``frozen``: at each
    position the leaf trained in full, or the frozen leaf with its update applied, or the
    frozen leaf.

    Example:
      >>> import jax.numpy as jnp
      >>> extra = {"b": LoraBias(delta=jnp.ones(2), scale=0.5), "w": None}
      >>> apply_leaf_updates(extra, {"b": jnp.zeros(2), "w": 3.0})
      {'b': Array([0.5, 0.5], dtype=float32), 'w': 3.0}
    """
    def pick(mine, theirs):
        if is_leaf_update(mine):
            if theirs is None and getattr(mine, "bias", None) is None:
                raise ValueError(
                    f"A {type(mine).__name__} in `trainable` has no frozen leaf to apply to: "
                    "`frozen` must be the second half that split_trainable returned."
                )
            return mine.apply(theirs)
        if mine is not None and theirs is not None:
            raise ValueError(
                "`trainable` and `frozen` both hold a leaf at the same position: pass the two "
                "halves that split_trainable returned."
            )
        return theirs if mine is None else mine

    return jax.tree.map(pick, extra, frozen, is_leaf=lambda x: x is None or is_leaf_update(x))
