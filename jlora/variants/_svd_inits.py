"""Inits from the kernel itself: PiSSA and OLoRA (which rewrite the base) and orthogonal.

* **PiSSA** (Meng et al. 2024, arXiv 2404.02948): ``A``, ``B`` from the top-r singular
  triplets of ``W``, each factor carrying ``sqrt(S_r / s)``, so ``s·A@B`` is exactly the
  principal part ``U_r S_r V_rᵀ`` whatever alpha and policy are; the residual becomes the
  frozen base.
* **OLoRA** (Büyükakyüz 2024, arXiv 2406.01775): ``A = R_rᵀ``, ``B = Q_rᵀ`` from the QR
  of the ``(out, in)`` weight, unscaled as in PEFT, so ``s·A@B = s·Q_r R_r``; the base
  becomes ``W - s·Q_r R_r``.
* **orthogonal**: ``A`` and ``B`` non-zero with ``A@B = 0``: rows of one random
  orthogonal ``r×r`` matrix, odd rows for ``A``, even rows for ``B``. Needs no base change,
  so it runs inside :func:`jlora.init`.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from jlora.config import LoraConfig
from jlora.layouts import Layout
from jlora.variants._common import (
    base_changing_init,
    check_config,
    matmul,
    randomized_svd,
    swap,
)

__all__ = ["olora_init", "orthogonal_factors", "pissa_init"]


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
        lambda k, path, e, w2: _pissa_factors(k, w2, rank=e["rank"], scale=e["scale"],
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
                              lambda k, p, e, w2: _olora_factors(w2, rank=e["rank"]))


def orthogonal_factors(key: jax.Array, shape, layout: Layout, rank: int, dtype=jnp.float32):
    """PEFT's ``init_lora_weights="orthogonal"``: non-zero ``A``, ``B`` with ``A@B = 0``.

    With ``Q`` a random orthogonal ``r×r`` matrix, ``A = G₁ Q[0::2] / 10`` and
    ``B = Q[1::2]ᵀ G₂ / 10`` (``G`` standard normal), so ``A@B = G₁ Q[0::2] Q[1::2]ᵀ G₂/100
    = 0``: the model starts unchanged while both factors get gradients from the first
    step. The scale does not enter. The rank must be even. Used by :func:`jlora.init`
    for ``LoraConfig(init="orthogonal")``.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from jlora.layouts import Layout
      >>> a, b = orthogonal_factors(jax.random.key(0), (6, 5), Layout("io"), rank=2)
      >>> a.shape, b.shape, bool(jnp.abs(a @ b).max() < 1e-6)
      ((6, 2), (2, 5), True)
    """
    if rank % 2:
        raise ValueError(
            f"`init='orthogonal'` needs an even rank (half the rows of an orthogonal matrix "
            f"go to A, half to B), got rank={rank} for a kernel of shape {tuple(shape)}."
        )
    return _orthogonal(key, tuple(shape), layout, rank, jnp.dtype(dtype))


@functools.partial(jax.jit, static_argnums=(1, 2, 3, 4))
def _orthogonal(key, shape, layout: Layout, rank: int, dtype):
    stacked, fan_in, fan_out = layout.split_shape(shape)
    n_in, n_out = math.prod(fan_in), math.prod(fan_out)
    half = rank // 2
    # One draw sliced three ways: independent normals, and one RNG kernel to compile, not three.
    sizes = (rank * rank, n_in * half, half * n_out)
    z = jax.random.normal(key, (*stacked, sum(sizes)), jnp.float32)
    x, g1, g2 = jnp.split(z, (sizes[0], sizes[0] + sizes[1]), axis=-1)
    q, _ = jnp.linalg.qr(x.reshape(*stacked, rank, rank))
    q_odd, q_even = q[..., 0::2, :], q[..., 1::2, :]
    a2 = matmul(g1.reshape(*stacked, n_in, half), q_odd) / 10.0
    b2 = matmul(swap(q_even), g2.reshape(*stacked, half, n_out)) / 10.0
    return (
        a2.reshape(*stacked, *fan_in, rank).astype(dtype),
        b2.reshape(*stacked, rank, *fan_out).astype(dtype),
    )
