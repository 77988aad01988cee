"""`jlora.init`: low-rank factors for every kernel a config targets.

Each kernel's random key is derived from its path (``fold_in(key, crc32(path))``), so
the same key and tree give the same adapters with and without ``jit``, and adding or
removing an unrelated parameter leaves every other adapter unchanged.
"""

from __future__ import annotations

import math
import zlib

import jax
import jax.numpy as jnp
import numpy as np

from jlora import paths as paths_lib
from jlora.adapter import Adapter, Adapters
from jlora.config import LoraConfig
from jlora.layouts import Layout, resolve_layout

__all__ = ["check_kernel_leaf", "init", "kernel_key", "plan"]


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


def _check_patterns_used(config: LoraConfig, targeted: list[str]) -> None:
    """Every rank/alpha/layout pattern must match some targeted path: no silent misses."""
    for field in ("rank_pattern", "alpha_pattern", "layouts"):
        for key in getattr(config, field):
            paths_lib.matching_paths(targeted, key, field=f"{field}[{key!r}]")


def plan(params, config: LoraConfig) -> dict[str, dict]:
    """What :func:`init` will create, without creating it: per path its layout, rank, alpha
    and scale. Raises the same errors as :func:`init`.

    Example:
      >>> import jax.numpy as jnp
      >>> plan({"dense": {"kernel": jnp.ones((4, 8))}}, LoraConfig(rank=2))["dense/kernel"]["rank"]
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
    _check_patterns_used(config, targeted)
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
        out[path] = dict(
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
        fan_in = math.prod(shape[i] for i in layout.fan_in_axes)
        bound = 1.0 / math.sqrt(fan_in)
        a = jax.random.uniform(key, a_shape, dtype, -bound, bound)
    return a, jnp.zeros(b_shape, dtype)


def init(key: jax.Array, params, config: LoraConfig) -> Adapters:
    """Adapters for every kernel of ``params`` that ``config`` targets.

    Args:
      key: a JAX random key.
      params: any pytree of parameters (linen ``variables["params"]``, an NNX ``State``,
        a dict of arrays); only the targeted leaves' shapes and dtypes are read.
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
    for path, p in planned.items():
        k = kernel_key(key, path)
        if config.init in ("default", "gaussian"):
            a, b = _default_factors(
                k, p["shape"], p["layout"], p["rank"], dtype, config.init == "gaussian"
            )
        elif config.init == "orthogonal":
            from jlora.variants import orthogonal_factors

            a, b = orthogonal_factors(k, p["shape"], p["layout"], p["rank"], dtype)
        else:
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
        adapters[path] = Adapter(
            a=a, b=b, layout=p["layout"], rank=p["rank"], alpha=p["alpha"],
            scale=p["scale"], policy=config.policy_name, variant=config.variant,
            dropout=float(config.dropout),
        )
    if config.variant == "dora":
        from jlora import variants  # DoRA's magnitude needs the base weights.

        adapters = variants.init_dora_magnitudes(params, adapters)
    return adapters
