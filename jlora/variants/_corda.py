"""CorDA (context-oriented decomposition adaptation, Yang et al. 2024, arXiv 2406.05223).

The SVD is taken of ``W·C``, with ``C`` the covariance of the layer's inputs, so the
singular directions are ordered by how much they matter *for those inputs*:
``W C = U S Vh`` and ``W = U S (Vh C⁻¹)``. The adapter takes ``r`` of these components,
the residual stays as the frozen base:

* ``mode="ipm"`` (instruction-previewed): the top ``r``, with ``C`` from samples of the
  task to learn; the adapter starts on the directions the task uses most. Faster
  convergence, best fine-tuning results.
* ``mode="kpm"`` (knowledge-preserving): the bottom ``r``, with ``C`` from samples of the
  knowledge to keep (e.g. QA data); the base keeps the directions that knowledge uses,
  and the adapter learns in the rest. Less forgetting.

Exactly PEFT's formulas: per batch (one call of the model) the inputs are divided by
``|max(X)|`` and ``XᵀX`` is added, the sum is divided by the number of batches; ``C`` is
damped by ``mean(diag C)·damp`` with ``damp`` doubled from 0.01 until
``‖C Cinv - I‖_F < 0.05``; the chosen singular values are divided by the scale, so
``s·A@B = U_r S_r (Vh C⁻¹)_r`` under any policy.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from jlora._config import LoraConfig
from jlora._initializers import plan
from jlora.variants._common import base_changing_init, check_config, check_layouts, matmul, swap
from jlora.variants._data import fan_in_sizes, input_batches

__all__ = ["corda_covariances", "corda_init"]

MODES = ("ipm", "kpm")


@jax.jit
def _batch_covariance(x: jax.Array) -> jax.Array:
    x = x / jnp.abs(jnp.max(x))  # PEFT: input / torch.max(input).abs()
    return matmul(x.T, x)


def corda_covariances(params, config: LoraConfig, inputs=None, *, fn=None, batches=None) -> dict:
    """The input covariance ``C`` of every kernel ``config`` targets, as PEFT builds it.

    Useful to compute once and reuse across ranks, or to build from one dataset and apply
    with another config: pass the result to :func:`corda_init` as ``covariances=``.

    Args:
      params: the parameter pytree.
      config: which kernels (``targets``/``exclude``).
      inputs: ``{path: (N, fan_in)}`` or an iterable of such mappings, one per model call.
      fn, batches: instead of ``inputs``: ``fn(params, batch)`` per batch, inputs read by
        ``jlora.collect_inputs``.

    Returns:
      ``{path: (fan_in, fan_in) float32}``: the mean over batches of ``XᵀX / max(X)²``.

    Example:
      >>> import jax.numpy as jnp, jlora
      >>> params = {"dense": {"kernel": jnp.ones((3, 2))}}
      >>> cov = corda_covariances(params, jlora.LoraConfig(rank=1),
      ...                         inputs={"dense/kernel": 2.0 * jnp.eye(3)})
      >>> cov["dense/kernel"]
      Array([[1., 0., 0.],
             [0., 1., 0.],
             [0., 0., 1.]], dtype=float32)
    """
    planned = plan(params, config)
    check_layouts(planned, "corda", stacked_ok=False, embed_ok=False)
    sums, count = {}, 0
    for batch in input_batches(params, planned, inputs=inputs, fn=fn, batches=batches,
                               init_name="corda"):
        count += 1
        for path, x in batch.items():
            cov = _batch_covariance(x)
            sums[path] = cov if path not in sums else sums[path] + cov
    if count == 0:
        raise ValueError("`init='corda'` got no batches of layer inputs.")
    out = {}
    for path, total in sums.items():
        cov = total / count
        if not bool(jnp.isfinite(cov).all()):
            raise ValueError(
                f"The input covariance of the kernel at path {path!r} is not finite: its "
                "inputs hold NaN or Inf, or a batch's inputs all have max(X) = 0 (PEFT "
                "divides each batch by |max(X)|)."
            )
        out[path] = cov
    return out


def _damped_inverse(cov):
    eye = jnp.eye(cov.shape[-1], dtype=cov.dtype)
    bump = eye * jnp.mean(jnp.diag(cov))

    def fix(damp):
        c = cov + bump * damp
        c_inv = jnp.linalg.inv(c)
        err = jnp.linalg.norm(matmul(c, c_inv) - eye)
        return c, c_inv, err

    def cond(state):
        _, _, _, err, i = state
        return (err >= 0.05) & (i < 64)  # 64 doublings: a cap so NaNs cannot spin forever

    def body(state):
        damp, _, _, _, i = state
        damp = damp * 2.0
        return (damp, *fix(damp), i + 1)

    damp0 = jnp.float32(0.01)
    _, c, c_inv, _, _ = jax.lax.while_loop(cond, body, (damp0, *fix(damp0), 0))
    return c, c_inv


def _corda_one(w2, cov, *, rank: int, scale: float, mode: str):
    w_t = swap(w2)  # PEFT's (out, in)
    c, c_inv = _damped_inverse(cov)
    u, s, vh = jnp.linalg.svd(matmul(w_t, c), full_matrices=False)
    v = swap(matmul(vh, c_inv))  # (in, min_dim)
    pick = slice(None, rank) if mode == "ipm" else slice(-rank, None)
    u, s, v = u[:, pick], s[pick], v[:, pick]
    root = jnp.sqrt(s / scale)
    return v * root[None, :], root[:, None] * u.T  # our A = lora_Aᵀ, B = lora_Bᵀ


_corda_one_jit = jax.jit(_corda_one, static_argnames=("rank", "scale", "mode"))


def corda_init(
    key: jax.Array,
    params,
    config: LoraConfig,
    inputs=None,
    *,
    fn=None,
    batches=None,
    covariances: Mapping | None = None,
    mode: str = "ipm",
):
    """CorDA: adapters from the SVD of ``W·C``; the residual becomes the frozen base.

    Give the data one way: ``covariances`` (from :func:`corda_covariances`, or your own
    ``{path: (fan_in, fan_in)}``), or ``inputs``, or ``fn`` and ``batches``. With
    ``covariances`` the function is pure and jittable.

    Args:
      key: unused (CorDA is deterministic; None is fine); kept so every init has the
        same signature.
      params: the parameter pytree; not modified.
      config: a :class:`jlora.LoraConfig` (``init`` ``"corda"`` or ``"default"``); dense
        and conv kernels, not embeddings or stacked kernels.
      inputs, fn, batches: layer inputs, as for :func:`corda_covariances`.
      covariances: ``{path: (fan_in, fan_in)}`` for exactly the targeted kernels.
      mode: ``"ipm"`` (top ``r`` components) or ``"kpm"`` (bottom ``r``).

    Returns:
      ``(new_params, adapters)``; ``jlora.merge(new_params, adapters)`` equals ``params``.

    Example:
      >>> import jax, jax.numpy as jnp, jlora
      >>> params = {"dense": {"kernel": jax.random.normal(jax.random.key(1), (6, 4))}}
      >>> x = jax.random.normal(jax.random.key(2), (32, 6))
      >>> base, ads = jlora.variants.corda_init(
      ...     jax.random.key(0), params, jlora.LoraConfig(rank=2, init="corda"),
      ...     inputs={"dense/kernel": x}, mode="kpm")
      >>> bool(jnp.allclose(jlora.merge(base, ads)["dense"]["kernel"],
      ...                   params["dense"]["kernel"], atol=1e-5))
      True
    """
    check_config(config, "corda")
    if mode not in MODES:
        raise ValueError(
            f"`mode` must be 'ipm' (instruction-previewed: top r) or 'kpm' "
            f"(knowledge-preserving: bottom r), got {mode!r}."
        )
    planned = plan(params, config)
    check_layouts(planned, "corda", stacked_ok=False, embed_ok=False)
    if covariances is None:
        covariances = corda_covariances(params, config, inputs, fn=fn, batches=batches)
    elif inputs is not None or fn is not None or batches is not None:
        raise ValueError(
            "`corda_init` takes the data one way: `covariances=`, or `inputs=`, or `fn=` "
            "with `batches=`; got `covariances` and another."
        )
    _check_covariances(covariances, planned)
    return base_changing_init(
        key, params, config,
        lambda k, path, e, w2: _corda_one_jit(w2, jnp.asarray(covariances[path], jnp.float32),
                                   rank=e.rank, scale=e.scale, mode=mode),
    )


def _check_covariances(covariances, planned: dict) -> None:
    if not isinstance(covariances, Mapping):
        raise TypeError(
            f"`covariances` must be a mapping {{path: (fan_in, fan_in) array}}, got "
            f"{type(covariances).__name__}."
        )
    extra = sorted(set(covariances) - set(planned))
    missing = sorted(set(planned) - set(covariances))
    if extra or missing:
        raise ValueError(
            f"`covariances` must have exactly the targeted paths {sorted(planned)}; "
            f"missing {missing}, not targeted {extra}."
        )
    for path, entry in planned.items():
        d = fan_in_sizes({path: entry})[path]
        cov = covariances[path]
        shape = tuple(np.shape(cov))
        if shape != (d, d):
            raise ValueError(
                f"`covariances[{path!r}]` has shape {shape}: expected ({d}, {d}), the "
                f"kernel's fan-in size squared (kernel shape {entry.shape})."
            )
        try:
            host = np.asarray(cov)
        except jax.errors.TracerArrayConversionError:
            continue  # under jit: values unknown here
        if not np.isfinite(host).all():
            raise ValueError(f"`covariances[{path!r}]` holds NaN or Inf.")
