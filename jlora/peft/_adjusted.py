"""Kernels that hold a PEFT module's weight scaled, and with a head's features reordered
for another RoPE: MaxText's Llama converter (``param_mapping.py``) multiplies the query
kernel by ``1/sqrt(head_dim)`` and stores query and key features interleaved (feature
``2j`` is transformers' ``j``, ``2j + 1`` is ``j + head_dim / 2``), for its
``LLaMARotaryEmbedding``.

The update moves the same way as the weight: with ``W_jax = c · P(W_module)`` (``P``
reordering the last fan-out axis), ``B`` is reordered along that axis and the scale
multiplied by ``c``; ``A`` and the rank stay. A DoRA magnitude (a norm of the same
columns) is reordered and scaled too.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

from jlora._adapter import Adapter

__all__ = ["Adjusted"]


@dataclasses.dataclass(frozen=True)
class Adjusted:
    """A kernel equal to ``scale`` times the weight of the PEFT module ``name``, with its
    last fan-out axis (a head's features) in interleaved RoPE order when ``interleaved``.

    Example:
      >>> Adjusted("model.layers.{}.self_attn.q_proj", scale=0.125, interleaved=True).scale
      0.125
    """

    name: str
    scale: float = 1.0
    interleaved: bool = False


def _interleaved(n: int) -> np.ndarray:
    """Index of the module's feature at each kernel position: ``[0, n/2, 1, n/2 + 1, ...]``."""
    half = n // 2
    return np.stack([np.arange(half), np.arange(half) + half], axis=-1).reshape(-1)


def _reorder(x, index):
    return None if x is None else jnp.take(x, jnp.asarray(index), axis=-1)


def to_module(ad: Adapter, spec: Adjusted, path: str) -> Adapter:
    """The adapter of the PEFT module, from the kernel's (for writing)."""
    b, m = ad.b, ad.magnitude
    if spec.interleaved:
        n = b.shape[-1]
        if n % 2:
            raise ValueError(
                f"The kernel at path {path!r} has an odd last fan-out axis ({n}): no RoPE "
                "interleaving to undo."
            )
        inverse = np.argsort(_interleaved(n))
        b, m = _reorder(b, inverse), _reorder(m, inverse)
    if m is not None:
        m = m / spec.scale
    return ad.replace(b=b, magnitude=m, scale=ad.scale / spec.scale)


def from_module(ad: Adapter, spec: Adjusted) -> Adapter:
    """The kernel's adapter, from the PEFT module's (for reading)."""
    b, m = ad.b, ad.magnitude
    if spec.interleaved:
        index = _interleaved(b.shape[-1])
        b, m = _reorder(b, index), _reorder(m, index)
    if m is not None:
        m = m * spec.scale
    policy = ad.policy if spec.scale == 1.0 else "custom"
    return ad.replace(b=b, magnitude=m, scale=ad.scale * spec.scale, policy=policy)
