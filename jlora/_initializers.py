"""`jlora.init`: low-rank factors for every kernel a config targets.

Each kernel's random key is derived from its path (``fold_in(key, crc32(path))``), so
the same key and tree give the same adapters with and without ``jit``, and adding or
removing an unrelated parameter leaves every other adapter unchanged.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import zlib

import jax
import jax.numpy as jnp
import numpy as np

from jlora import _deprecation as deprecation
from jlora import _paths as paths_lib
from jlora._adapter import Adapter, Adapters
from jlora._config import LoraConfig
from jlora._variant import get_variant
from jlora.layouts import Layout, resolve_layout

__all__ = [
    "check_kernel_leaf",
    "init",
    "KernelPlan",
    "init_variant_arrays",
    "kernel_key",
    "orthogonal_factors",
    "plan",
]


def kernel_key(key: jax.Array, path: str) -> jax.Array:
    """The random key of the kernel at ``path``: independent of every other leaf.

    Example:
      >>> import jax
      >>> k = kernel_key(jax.random.key(0), "dense/kernel")
    """
    return jax.random.fold_in(key, zlib.crc32(path.encode()) & 0x7FFFFFFF)


def check_kernel_leaf(path: str, leaf, field: str = "targets") -> None:
    """Refuse a targeted leaf that is not a floating-point kernel with two or more axes.

    Example:
      >>> import jax.numpy as jnp
      >>> check_kernel_leaf("dense/bias", jnp.zeros(4))
      Traceback (most recent call last):
      ...
      ValueError: `targets` matched the leaf at path 'dense/bias' with shape (4,) ...
    """
    shape = getattr(leaf, "shape", None)
    dtype = getattr(leaf, "dtype", None)
    if shape is None or dtype is None:
        raise ValueError(
            f"`{field}` matched the leaf at path {path!r}, which is a {type(leaf).__name__}, "
            "not an array: expected a floating-point kernel. Narrow the pattern or use `exclude`."
        )
    if not jnp.issubdtype(dtype, jnp.floating) or len(shape) < 2:
        raise ValueError(
            f"`{field}` matched the leaf at path {path!r} with shape {tuple(shape)} and dtype "
            f"{np.dtype(dtype).name}: expected a floating-point kernel with at least 2 axes "
            "(biases, norm scales and integer or boolean leaves cannot be adapted). Narrow the "
            "pattern or use `exclude`."
        )


def _check_patterns_used(config: LoraConfig, targeted: list[str], paths: list[str]) -> None:
    """Every rank/alpha pattern must match some targeted path, and every layout key some
    leaf path: no silent misses. (Layouts describe kernels whether targeted or not, so the
    whole ``{path: layout}`` of :func:`jlora.infer_layouts` can be passed as it is.)"""
    for field in ("rank_pattern", "alpha_pattern", "layouts"):
        candidates = paths if field == "layouts" else targeted
        for key in getattr(config, field):
            if field == "layouts" and key in candidates:
                continue  # a path, as infer_layouts writes them: no regex needed
            paths_lib.matching_paths(candidates, key, field=f"{field}[{key!r}]")


@dataclasses.dataclass(frozen=True)
class KernelPlan:
    """What :func:`init` will create for one kernel: its layout, rank, alpha, scale and the
    kernel's shape.

    Indexing it like the dict that ``plan`` used to return (``entry["rank"]``) still works
    for one release, with a ``DeprecationWarning``.

    Example:
      >>> import jax.numpy as jnp
      >>> entry = plan({"d": {"kernel": jnp.ones((4, 8))}}, LoraConfig(rank=2))["d/kernel"]
      >>> entry.layout.axes, entry.rank, entry.shape
      ('io', 2, (4, 8))
    """

    layout: Layout
    rank: int
    alpha: float
    scale: float
    shape: tuple[int, ...]

    def __getitem__(self, field: str):
        deprecation.warn(f"plan(...)[path][{field!r}] is deprecated: jlora.plan returns "
                         f"KernelPlan records now; use plan(...)[path].{field}.")
        return getattr(self, field)


def plan(params, config: LoraConfig) -> dict[str, KernelPlan]:
    """What :func:`init` will create, without creating it: per path a :class:`KernelPlan`
    (layout, rank, alpha, scale, shape). Raises the same errors as :func:`init`.

    Example:
      >>> import jax.numpy as jnp
      >>> plan({"dense": {"kernel": jnp.ones((4, 8))}}, LoraConfig(rank=2))["dense/kernel"].rank
      2
    """
    flat = paths_lib.select(params, ".*", allow_empty=True)
    targeted = [p for p in flat if config.is_target(p)]
    if not targeted:
        if config.exclude is not None and paths_lib.matching_paths(
            list(flat), config.targets, allow_empty=True
        ):
            raise paths_lib.PatternError(
                f"`targets` pattern {config.targets!r} matches only paths that `exclude` "
                f"pattern {config.exclude!r} removes: nothing is left to adapt."
            )
        paths_lib.matching_paths(list(flat), config.targets, field="targets")
    _check_patterns_used(config, targeted, list(flat))
    out = {}
    for path in targeted:
        leaf = flat[path]
        check_kernel_leaf(path, leaf)
        layout = resolve_layout(path, leaf.shape, config.layout_patterns())
        rank = config.rank_for(path)
        max_rank = layout.max_rank(leaf.shape)
        if rank > max_rank:
            raise ValueError(
                f"Rank {rank} for the kernel at path {path!r} with shape {tuple(leaf.shape)} "
                f"(layout {layout.axes!r}) exceeds the largest useful rank {max_rank} = "
                "min(fan-in, fan-out): lower `rank` or add a `rank_pattern` entry."
            )
        out[path] = KernelPlan(
            layout=layout,
            rank=rank,
            alpha=config.alpha_for(path),
            scale=config.scale_for(path),
            shape=tuple(leaf.shape),
        )
    return out


def _default_factors(key, shape, layout: Layout, rank: int, dtype, gaussian: bool):
    a_shape, b_shape = layout.factor_shapes(shape, rank)
    if layout.kind == "embed":
        # PEFT initialises embeddings the other way round: A zero, B standard normal.
        return jnp.zeros(a_shape, dtype), jax.random.normal(key, b_shape, dtype)
    if gaussian:
        # PEFT: nn.init.normal_(lora_A, std=1 / r).
        a = jax.random.normal(key, a_shape, dtype) / rank
    else:
        # PEFT: kaiming_uniform_(lora_A, a=sqrt(5)) has bound 1/sqrt(fan_in).
        fan_in = math.prod(layout.split_shape(shape)[1])
        bound = 1.0 / math.sqrt(fan_in)
        a = jax.random.uniform(key, a_shape, dtype, -bound, bound)
    return a, jnp.zeros(b_shape, dtype)


def orthogonal_factors(key: jax.Array, shape, layout: Layout, rank: int, dtype=jnp.float32):
    """PEFT's ``init_lora_weights="orthogonal"``: non-zero ``A``, ``B`` with ``A@B = 0``.

    With ``Q`` a random orthogonal ``r×r`` matrix, ``A = G₁ Q[0::2] / 10`` and
    ``B = Q[1::2]ᵀ G₂ / 10`` (``G`` standard normal), so ``A@B = G₁ Q[0::2] Q[1::2]ᵀ G₂/100
    = 0``: the model starts unchanged while both factors get gradients from the first
    step. The scale does not enter. The rank must be even. Used by :func:`init` for
    ``LoraConfig(init="orthogonal")``.

    Example:
      >>> import jax, jax.numpy as jnp
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
    hi = jax.lax.Precision.HIGHEST
    a2 = jnp.matmul(g1.reshape(*stacked, n_in, half), q[..., 0::2, :], precision=hi) / 10.0
    b2 = jnp.matmul(jnp.swapaxes(q[..., 1::2, :], -1, -2), g2.reshape(*stacked, half, n_out),
                    precision=hi) / 10.0
    a, b = layout.factors_from_matrices(a2, b2, shape)
    return a.astype(dtype), b.astype(dtype)


def _factors(config: LoraConfig, key, entry: KernelPlan, dtype):
    """The factors :func:`init` creates for one planned kernel (inits that need no data)."""
    args = (key, entry.shape, entry.layout, entry.rank, dtype)
    if config.init in ("default", "gaussian"):
        return _default_factors(*args, gaussian=config.init == "gaussian")
    if config.init == "orthogonal":
        return orthogonal_factors(*args)
    what = (
        "needs layer inputs, so it cannot run in jlora.init: use "
        "jlora.variants.eva_init(key, params, config, inputs), which returns the adapters"
        if config.init == "eva" else
        "changes the frozen base weights, so it cannot run in jlora.init: use "
        f"jlora.variants.{config.init}_init(key, params, config"
        + (", inputs)" if config.init == "corda" else ")")
        + ", which returns (new_params, adapters)"
    )
    raise ValueError(f"`init={config.init!r}` {what}.")


def init_variant_arrays(params, adapters: Adapters) -> Adapters:
    """Each adapter with its variant's extra trainable arrays set from its kernel in
    ``params`` (DoRA's magnitude ``‖W + s·A@B‖``), so the adapted model equals ``params``.

    :func:`init` calls it; inits that rewrite the base (PiSSA, OLoRA, CorDA) call it with
    the *new* base, so DoRA's magnitude is the norm of the original kernel, as in PEFT.

    Example:
      >>> import jax, jax.numpy as jnp, jlora
      >>> p = {"k": jnp.ones((4, 3))}
      >>> ads = jlora.init(jax.random.key(0), p,
      ...                  jlora.LoraConfig(rank=1, targets="k", variant="dora"))
      >>> init_variant_arrays(p, ads)["k"].magnitude
      Array([2., 2., 2.], dtype=float32)
    """
    flat = paths_lib.select(params, ".*", allow_empty=True)
    return {path: get_variant(ad.variant).init(flat[path], ad) for path, ad in adapters.items()}


def init(key: jax.Array, params, config: LoraConfig) -> Adapters:
    """Adapters for every kernel of ``params`` that ``config`` targets.

    Args:
      key: a JAX random key.
      params: any pytree of parameters (linen ``variables["params"]``, an NNX ``State``,
        a dict of arrays); only the targeted leaves' shapes and dtypes are read (and, for
        a variant with extra arrays such as DoRA's magnitude, their values).
      config: a :class:`jlora.LoraConfig`.

    Returns:
      ``{kernel path: Adapter}``: a pytree whose leaves are exactly the trainable factors.
      With the default init ``B`` is zero, so the adapted model starts equal to the base.

    Example:
      >>> import jax, jax.numpy as jnp, jlora
      >>> params = {"dense": {"kernel": jnp.ones((8, 4)), "bias": jnp.zeros(4)}}
      >>> adapters = jlora.init(jax.random.key(0), params, jlora.LoraConfig(rank=2))
      >>> adapters["dense/kernel"].a.shape, adapters["dense/kernel"].b.shape
      ((8, 2), (2, 4))
    """
    if not isinstance(config, LoraConfig):
        raise TypeError(f"`config` must be a jlora.LoraConfig, got {type(config).__name__}.")
    planned = plan(params, config)
    dtype = jnp.dtype(config.dtype)
    adapters = {}
    for path, entry in planned.items():
        a, b = _factors(config, kernel_key(key, path), entry, dtype)
        adapters[path] = Adapter(
            a=a, b=b, layout=entry.layout, rank=entry.rank, alpha=entry.alpha,
            scale=entry.scale, policy=config.policy_name, variant=config.variant,
            dropout=float(config.dropout),
        )
    return init_variant_arrays(params, adapters)
