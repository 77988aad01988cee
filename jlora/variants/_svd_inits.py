"""Inits from the kernel itself, which rewrite the base: PiSSA and OLoRA.

* **PiSSA** (Meng et al. 2024, arXiv 2404.02948): ``A``, ``B`` from the top-r singular
  triplets of ``W``, each factor carrying ``sqrt(S_r / s)``, so ``s·A@B`` is exactly the
  principal part ``U_r S_r V_rᵀ`` whatever alpha and policy are; the residual becomes the
  frozen base.
* **OLoRA** (Büyükakyüz 2024, arXiv 2406.01775): ``A = R_rᵀ``, ``B = Q_rᵀ`` from the QR
  of the ``(out, in)`` weight, unscaled as in PEFT, so ``s·A@B = s·Q_r R_r``; the base
  becomes ``W - s·Q_r R_r``.

Both work on the kernel's matrix view, so the kernel's axes may come in any order.
(The orthogonal init needs no base change: it runs inside :func:`jlora.init`, see
:func:`jlora._initializers.orthogonal_factors`.)
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jlora._config import LoraConfig
from jlora.variants._common import (
    base_changing_init,
    check_config,
    randomized_svd,
    swap,
)

__all__ = ["olora_init", "pissa_init"]


@functools.partial(jax.jit, static_argnames=("rank", "scale", "niter"))
def _pissa_factors(key, w2, rank: int, scale: float, niter: int | None):
    m = swap(w2)  # PEFT's (out, in) orientation, so singular vector signs match its SVD's.
    if niter is None:
        v, s, uh = jnp.linalg.svd(m, full_matrices=False)
        v, s, uh = v[..., :rank], s[..., :rank], uh[..., :rank, :]
    else:
        v, s, uh = randomized_svd(key, m, rank, niter)
    root = jnp.sqrt(s / scale)
    a2 = swap(root[..., :, None] * uh)  # PEFT: lora_A = diag(sqrt(S/s)) @ Uh_r
    b2 = swap(v * root[..., None, :])  # PEFT: lora_B = V_r @ diag(sqrt(S/s))
    return a2, b2


def pissa_init(key: jax.Array, params, config: LoraConfig, *, niter: int | None = None):
    """PiSSA: adapters from the principal singular triplets; the residual becomes the base.

    Args:
      key: a JAX random key, used by the randomized SVD only (None is fine otherwise).
      params: the parameter pytree; not modified.
      config: a :class:`jlora.LoraConfig` (``init`` ``"pissa"`` or ``"default"``). Any
        scaling policy: the factors are divided by the scale so that ``s·A@B`` is the
        principal part.
      niter: ``None`` for an exact SVD; an int ``K`` for PEFT's ``pissa_niter_K``: a
        randomized SVD with ``K`` power iterations (much faster on large kernels).

    Returns:
      ``(new_params, adapters)``: ``new_params`` holds ``W - s·A@B`` at each adapted
      kernel, so ``jlora.merge(new_params, adapters)`` equals ``params`` at init. With
      ``variant="dora"`` the magnitudes are ``‖W‖`` of the original kernels.

    Example:
      >>> import jax, jax.numpy as jnp, jlora
      >>> params = {"dense": {"kernel": jax.random.normal(jax.random.key(1), (8, 6))}}
      >>> config = jlora.LoraConfig(rank=2, alpha=4.0, scaling="rslora", init="pissa")
      >>> base, ads = jlora.variants.pissa_init(jax.random.key(0), params, config)
      >>> w = jlora.merge(base, ads)["dense"]["kernel"]
      >>> bool(jnp.allclose(w, params["dense"]["kernel"], atol=1e-5))
      True
    """
    check_config(config, "pissa")
    if niter is not None and not (isinstance(niter, int) and niter >= 0):
        raise ValueError(f"`niter` must be None (exact SVD) or an int >= 0, got {niter!r}.")
    if niter is not None and key is None:
        raise ValueError("`niter` (a randomized SVD) needs a random `key`, got key=None.")
    return base_changing_init(
        key, params, config,
        lambda k, path, e, w2: _pissa_factors(k, w2, rank=e.rank, scale=e.scale,
                                              niter=niter),
    )


@functools.partial(jax.jit, static_argnames=("rank",))
def _olora_factors(w2, rank: int):
    q, r = jnp.linalg.qr(swap(w2))  # reduced QR of PEFT's (out, in) weight
    return swap(r[..., :rank, :]), swap(q[..., :, :rank])


def olora_init(key: jax.Array, params, config: LoraConfig):
    """OLoRA: ``A``, ``B`` from the QR of each kernel; the base becomes ``W - s·Q_r R_r``.

    As in PEFT, the factors are not divided by the scale: ``A@B = Q_r R_r`` (the first
    ``r`` columns of the QR of the ``(out, in)`` weight) and ``s·A@B`` is subtracted from
    the base, so the model is unchanged at init under any policy.

    Args:
      key: unused (OLoRA is deterministic; None is fine); kept so every init has the
        same signature.
      params: the parameter pytree; not modified.
      config: a :class:`jlora.LoraConfig` (``init`` ``"olora"`` or ``"default"``).

    Returns:
      ``(new_params, adapters)``.

    Example:
      >>> import jax, jax.numpy as jnp, jlora
      >>> params = {"dense": {"kernel": jax.random.normal(jax.random.key(1), (8, 6))}}
      >>> base, ads = jlora.variants.olora_init(
      ...     jax.random.key(0), params, jlora.LoraConfig(rank=2, init="olora"))
      >>> bool(jnp.allclose(jlora.merge(base, ads)["dense"]["kernel"],
      ...                   params["dense"]["kernel"], atol=1e-5))
      True
    """
    check_config(config, "olora")
    return base_changing_init(key, params, config,
                              lambda k, p, e, w2: _olora_factors(w2, rank=e.rank))
