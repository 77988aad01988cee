"""Scaling policies: the factor ``s`` in ``W + s · A @ B``.

* :func:`standard` is ``alpha / rank``, the original LoRA scale. As the rank grows the
  update shrinks, so high ranks learn no better than low ones.
* :func:`rslora` is ``alpha / sqrt(rank)`` (rank-stabilized LoRA, Kalajdzievski 2023,
  arXiv 2312.03732): activations and gradients through the adapter stay of the same
  size across ranks. Same memory, same compute; only the scale differs.

Any callable ``(rank, alpha) -> float`` is a policy too. A policy is applied once per
kernel, when the adapters are created, and the resulting scale is stored with that
kernel's adapter.

Example:
  >>> from jlora import scaling
  >>> scaling.standard(16, 16.0), scaling.rslora(16, 16.0)
  (1.0, 4.0)
  >>> scaling.get("rslora")(4, 1.0)
  0.5
"""

from __future__ import annotations

import math
from collections.abc import Callable

__all__ = ["POLICIES", "ScalingPolicy", "compute_scale", "get", "policy_name", "rslora", "standard"]

ScalingPolicy = Callable[[int, float], float]


def standard(rank: int, alpha: float) -> float:
    """``alpha / rank``: the scale of the original LoRA paper and PEFT's default.

    Example:
      >>> standard(8, 16.0)
      2.0
    """
    return float(alpha) / rank


def rslora(rank: int, alpha: float) -> float:
    """``alpha / sqrt(rank)``: rank-stabilized LoRA, PEFT's ``use_rslora=True``.

    Example:
      >>> rslora(64, 1.0)
      0.125
    """
    return float(alpha) / math.sqrt(rank)


POLICIES: dict[str, ScalingPolicy] = {"standard": standard, "rslora": rslora}


def get(policy: str | ScalingPolicy) -> ScalingPolicy:
    """Look a policy up by name (``"standard"`` or ``"rslora"``); callables pass through.

    Example:
      >>> get("standard") is standard
      True
    """
    if callable(policy):
        return policy
    try:
        return POLICIES[policy]
    except (KeyError, TypeError):
        raise ValueError(
            f"Unknown scaling policy {policy!r}: expected one of {sorted(POLICIES)} or a "
            "callable (rank, alpha) -> float."
        ) from None


def policy_name(policy: str | ScalingPolicy) -> str:
    """The name stored with each adapter: ``"standard"``, ``"rslora"`` or ``"custom"``.

    Example:
      >>> policy_name(rslora), policy_name(lambda r, a: a)
      ('rslora', 'custom')
    """
    if isinstance(policy, str):
        get(policy)
        return policy
    for name, fn in POLICIES.items():
        if policy is fn:
            return name
    return "custom"


def compute_scale(policy: str | ScalingPolicy, rank: int, alpha: float, *, path: str = "") -> float:
    """Apply ``policy`` and check the result is a positive, finite number.

    Example:
      >>> compute_scale("rslora", 16, 1.0)
      0.25
    """
    fn = get(policy)
    try:
        scale = float(fn(rank, alpha))
    except (TypeError, ValueError) as e:
        raise ValueError(
            f"Scaling policy {policy_name(policy)!r} returned a non-number for rank={rank}, "
            f"alpha={alpha}{f' at path {path!r}' if path else ''}: {e}"
        ) from None
    if not math.isfinite(scale) or scale <= 0:
        raise ValueError(
            f"Scaling policy {policy_name(policy)!r} returned {scale} for rank={rank}, "
            f"alpha={alpha}{f' at path {path!r}' if path else ''}: expected a positive, "
            "finite float."
        )
    return scale
