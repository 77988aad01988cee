"""Shared plumbing of the SVD-based inits: kernels as matrices, adapters from factors.

Every init works on a kernel's matrix view ``(*stacked, fan_in, fan_out)``
(:meth:`jlora.layouts.Layout.to_matrix`, whatever the order of the kernel's axes) and
mirrors PEFT, which works on the transposed torch weight ``(out, in)``: so ``lora_A`` of
PEFT is our ``Aᵀ`` and ``lora_B`` our ``Bᵀ``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from jlora import _paths as paths_lib
from jlora._adapter import Adapter, Adapters
from jlora._config import LoraConfig
from jlora._initializers import KernelPlan, init_variant_arrays, kernel_key, plan
from jlora.layouts import Layout

__all__ = ["randomized_svd"]

HI = jax.lax.Precision.HIGHEST


def check_config(config, init_name: str) -> None:
    """``config`` must be a LoraConfig whose ``init`` is ``"default"`` or ``init_name``."""
    if not isinstance(config, LoraConfig):
        raise TypeError(f"`config` must be a jlora.LoraConfig, got {type(config).__name__}.")
    if config.init not in ("default", init_name):
        raise ValueError(
            f"jlora.variants.{init_name}_init got a config with `init={config.init!r}`: "
            f"expected init='{init_name}' (or 'default'). Use one init per config."
        )


def swap(x: jax.Array) -> jax.Array:
    """Transpose the last two axes (our ``(in, out)`` <-> PEFT's ``(out, in)``)."""
    return jnp.swapaxes(x, -1, -2)


def matmul(a: jax.Array, b: jax.Array) -> jax.Array:
    return jnp.matmul(a, b, precision=HI)


def kernel_matrix(kernel: jax.Array, layout: Layout) -> jax.Array:
    """The kernel's matrix view as float32 ``(*stacked, fan_in, fan_out)``."""
    return layout.to_matrix(kernel).astype(jnp.float32)


def factors_from_matrices(a2, b2, layout: Layout, shape, dtype):
    """``A (*stacked, *fan_in, r)`` and ``B (*stacked, r, *fan_out)`` from their matrices."""
    a, b = layout.factors_from_matrices(a2, b2, shape)
    return a.astype(dtype), b.astype(dtype)


def make_adapter(a, b, entry: KernelPlan, config: LoraConfig, **overrides) -> Adapter:
    fields: dict[str, Any] = dict(
        layout=entry.layout, rank=entry.rank, alpha=entry.alpha, scale=entry.scale,
        policy=config.policy_name, variant=config.variant, dropout=float(config.dropout),
    )
    fields.update(overrides)
    return Adapter(a=a, b=b, **fields)


def replace_leaves(params, new_leaves: dict):
    """``params`` with the leaves at the paths of ``new_leaves`` replaced; nothing mutated."""
    return paths_lib.tree_map_with_path(lambda p, x: new_leaves.get(p, x), params)


def check_layouts(planned: dict[str, KernelPlan], init_name: str, *, stacked_ok: bool,
                  embed_ok: bool) -> None:
    for path, entry in planned.items():
        layout = entry.layout
        if (layout.kind == "embed" and not embed_ok) or (layout.num_stacked and not stacked_ok):
            what = "an embedding" if layout.kind == "embed" else "a stacked kernel"
            raise ValueError(
                f"`init={init_name!r}` does not support the kernel at path {path!r} (layout "
                f"{layout.axes!r}, {what}): it needs each layer's own input activations. "
                "Leave it out with `exclude`, or give it its own config with another init."
            )


@functools.partial(jax.jit, static_argnames=("scale", "dtype", "layout", "shape", "out_dtype"))
def _residual(w2, a2, b2, *, scale, dtype, layout, shape, out_dtype):
    stored = matmul(a2.astype(dtype).astype(jnp.float32), b2.astype(dtype).astype(jnp.float32))
    return layout.from_matrix(w2 - scale * stored, shape).astype(out_dtype)


def base_changing_init(
    key, params, config: LoraConfig, factor_fn: Callable
) -> tuple[object, Adapters]:
    """Run ``factor_fn(key, path, entry, w2) -> (a2, b2)`` for each targeted kernel.

    ``key`` may be None for deterministic inits; else each kernel gets its own key.

    ``w2`` is the float32 matrix view of the kernel. The new base is ``W - s·A@B`` computed from
    the factors *as stored* (after the cast to ``config.dtype``), so ``new_base + s·A@B``
    reproduces ``W`` as closely as the stored dtypes allow.
    """
    planned = plan(params, config)
    flat = paths_lib.select(params, ".*", allow_empty=True)
    dtype = jnp.dtype(config.dtype)
    new_kernels, adapters = {}, {}
    for path, entry in planned.items():
        kernel, layout = flat[path], entry.layout
        w2 = kernel_matrix(kernel, layout)
        a2, b2 = factor_fn(None if key is None else kernel_key(key, path), path, entry, w2)
        a, b = factors_from_matrices(a2, b2, layout, kernel.shape, dtype)
        new_kernels[path] = _residual(w2, a2, b2, scale=entry.scale, dtype=dtype,
                                      layout=layout, shape=tuple(kernel.shape),
                                      out_dtype=kernel.dtype)
        adapters[path] = make_adapter(a, b, entry, config)
    new_params = replace_leaves(params, new_kernels)
    return new_params, init_variant_arrays(new_params, adapters)


def randomized_svd(
    key: jax.Array, matrix: jax.Array, rank: int, niter: int, oversample: int = 0
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Top-``rank`` SVD by randomized subspace iteration (Halko et al. 2011, Alg. 4.4).

    What ``torch.svd_lowrank`` does and PEFT's ``pissa_niter_K`` uses: project onto
    ``rank + oversample`` random directions, refine with ``niter`` power iterations
    (re-orthonormalized by QR each half-step), then take an exact SVD of the small
    projected matrix. PEFT's PiSSA uses ``oversample=0``; more oversampling or iterations
    trade time for accuracy. Batched over leading axes.

    Args:
      key: a JAX random key.
      matrix: ``(*batch, m, n)``.
      rank: how many singular triplets to return.
      niter: power iterations (``>= 0``).
      oversample: extra random directions (``>= 0``).

    Returns:
      ``(u (*batch, m, rank), s (*batch, rank), vh (*batch, rank, n))``, singular values
      descending, like ``jnp.linalg.svd(..., full_matrices=False)`` truncated.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> m = jnp.outer(jnp.arange(1.0, 7.0), jnp.arange(1.0, 5.0))   # rank one
      >>> u, s, vh = randomized_svd(jax.random.key(0), m, rank=1, niter=2)
      >>> bool(jnp.allclose((u * s[None, :]) @ vh, m, rtol=1e-5))
      True
    """
    m, n = matrix.shape[-2:]
    if not (isinstance(rank, int) and 0 < rank <= min(m, n)):
        raise ValueError(
            f"`rank` must be an int in [1, {min(m, n)}] for a matrix of shape "
            f"{tuple(matrix.shape)}, got {rank!r}."
        )
    if not (isinstance(niter, int) and niter >= 0):
        raise ValueError(f"`niter` must be an int >= 0, got {niter!r}.")
    if not (isinstance(oversample, int) and oversample >= 0):
        raise ValueError(f"`oversample` must be an int >= 0, got {oversample!r}.")
    q = min(rank + oversample, m, n)
    x = matrix.astype(jnp.float32)
    omega = jax.random.normal(key, (*x.shape[:-2], n, q), jnp.float32)
    basis, _ = jnp.linalg.qr(matmul(x, omega))
    for _ in range(niter):
        back, _ = jnp.linalg.qr(matmul(swap(x), basis))
        basis, _ = jnp.linalg.qr(matmul(x, back))
    small_u, s, vh = jnp.linalg.svd(matmul(swap(basis), x), full_matrices=False)
    u = matmul(basis, small_u)
    return u[..., :rank], s[..., :rank], vh[..., :rank, :]
