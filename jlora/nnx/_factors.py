"""A kernel's adapter as NNX variables beside the kernel, and back.

The adapter of the kernel ``w`` of a module lives on that module as ``w_lora_a`` and
``w_lora_b`` (and ``w_lora_magnitude`` for DoRA), the names qwix and Tunix's weight
mappings use. The active set is ``nnx.LoRAParam`` (what ``nnx.Optimizer(...,
wrt=nnx.LoRAParam)`` and ``nnx.DiffState(0, nnx.LoRAParam)`` select); a stored, inactive
set is :class:`InactiveLoRA`, which no ``Param`` filter selects. Every factor variable
carries the adapter's static fields as metadata (``layout``, ``rank``, ``alpha``,
``scale``, ``policy``, ``variant``, ``dropout``), plus ``lora_kernel`` (the kernel's
attribute name), ``lora_factor`` (``"a"``, ``"b"`` or ``"magnitude"``) and
``lora_adapter`` (the set's name); sharding metadata follows the kernel's.

Example:
  >>> import jax, jax.numpy as jnp
  >>> from flax import nnx
  >>> from jlora._adapter import Adapter
  >>> from jlora.layouts import Layout
  >>> ad = Adapter(a=jnp.ones((4, 2)), b=jnp.zeros((2, 3)), layout=Layout("io"), rank=2,
  ...              alpha=4.0, scale=2.0)
  >>> kernel = nnx.Param(jnp.ones((4, 3)))
  >>> made = factor_variables(ad, kernel, "kernel", "default", nnx.LoRAParam)
  >>> sorted(made), made["kernel_lora_a"].scale
  (['kernel_lora_a', 'kernel_lora_b'], 2.0)
"""

from __future__ import annotations

from typing import Any

import jax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from jlora import _jax_compat as jc
from jlora._adapter import Adapter
from jlora.layouts import Layout, LayoutError
from jlora.sharding import factor_specs

__all__ = [
    "FACTORS",
    "InactiveLoRA",
    "adapter_of",
    "factor_attr",
    "factor_variables",
    "is_factor",
    "join_path",
]

FACTORS = ("a", "b", "magnitude")  # the array fields of an Adapter, in order
# Adapter fields kept as each factor variable's metadata (static, never trained).
STATIC_FIELDS = ("layout", "rank", "alpha", "scale", "policy", "variant", "dropout")
# Sharding metadata copied from the kernel, when it has any.
SHARDING_FIELDS = ("sharding_rules", "mesh")


class InactiveLoRA(nnx.Variable):
    """A factor of a stored, inactive adapter set: kept in the model, never trained
    (no ``nnx.Param`` filter selects it) and not applied."""


def join_path(path: tuple) -> str:
    """An NNX state path as jlora's ``/``-joined path string.

    Example:
      >>> join_path(("layers", 0, "kernel"))
      'layers/0/kernel'
    """
    return "/".join(str(k) for k in path)


def factor_attr(kernel_attr: str, factor: str) -> str:
    """The attribute name of a factor of the kernel ``kernel_attr``.

    Example:
      >>> factor_attr("kernel", "a")
      'kernel_lora_a'
    """
    return f"{kernel_attr}_lora_{factor}"


def is_factor(variable: Any) -> bool:
    """Whether ``variable`` holds a jlora factor (active or stored).

    Example:
      >>> import jax.numpy as jnp
      >>> is_factor(nnx.LoRAParam(jnp.ones(2)))   # flax's own LoRA: not jlora's
      False
    """
    return isinstance(variable, nnx.Variable) and "lora_factor" in variable.get_metadata()


def _factor_shardings(adapter: Adapter, kernel: nnx.Variable) -> tuple[dict, dict, bool]:
    """``({factor: metadata}, {factor: NamedSharding}, eager)`` inherited from the kernel.

    ``eager``: NNX shards the factors as it sharded the kernel (it was created with
    eager sharding, and a mesh is at hand); else an array kernel laid out on a mesh
    lends its factors its ``NamedSharding`` axis by axis.
    """
    meta, placed = {}, {}
    kernel_meta = kernel.get_metadata()
    names = kernel_meta.get("out_sharding")
    if names:
        specs = factor_specs(adapter.layout, PartitionSpec(*names))
        extra = {k: kernel_meta[k] for k in SHARDING_FIELDS if k in kernel_meta}
        meta = {f: {"out_sharding": tuple(s), **extra} for f, s in zip(FACTORS, specs, strict=True)}
    has_mesh = kernel_meta.get("mesh") is not None or not jax.sharding.get_abstract_mesh().empty
    eager = bool(names) and bool(kernel_meta.get("eager_sharding")) and has_mesh
    sharding = getattr(kernel.get_value(), "sharding", None)
    if not eager and isinstance(sharding, NamedSharding) and not sharding.is_fully_replicated:
        specs = factor_specs(adapter.layout, sharding.spec)
        placed = {f: NamedSharding(sharding.mesh, s) for f, s in zip(FACTORS, specs, strict=True)}
    return meta, placed, eager


def factor_variables(adapter: Adapter, kernel: nnx.Variable, kernel_attr: str, name: str,
                     kind: type[nnx.Variable]) -> dict[str, nnx.Variable]:
    """``{attribute name: variable}`` holding ``adapter``'s arrays for the kernel variable
    ``kernel`` (named ``kernel_attr`` on its module), as variables of type ``kind``."""
    static = {field: getattr(adapter, field) for field in STATIC_FIELDS}
    shard_meta, placed, eager = _factor_shardings(adapter, kernel)
    out = {}
    for factor in FACTORS:
        value = getattr(adapter, factor)
        if value is None:
            continue
        if factor in placed and isinstance(value, jax.Array) and not jc.is_tracer(value):
            value = jax.device_put(value, placed[factor])
        out[factor_attr(kernel_attr, factor)] = kind(
            value, eager_sharding=eager, lora_kernel=kernel_attr, lora_factor=factor,
            lora_adapter=name, **static, **shard_meta.get(factor, {}),
        )
    return out


def _fit_layout(layout: Layout, kernel_ndim: int, path: str) -> Layout:
    """The layout of a kernel that ``nnx.vmap`` / ``nnx.scan`` sliced or stacked since its
    adapter was made: leading stacked axes removed (a layer inside a scan over a stack)
    or added (adapters made per layer inside ``nnx.vmap``)."""
    extra = kernel_ndim - layout.ndim
    if extra >= 0:
        return layout if not extra else Layout("s" * extra + layout.axes,
                                               guessed=layout.guessed)
    if layout.axes[:-extra] == "s" * -extra:
        return layout.unstacked(-extra)
    raise LayoutError(
        f"The kernel at path {path!r} has {kernel_ndim} axes but its adapter was made for "
        f"layout {layout.axes!r}: only leading stacked axes ('s') can be sliced away, as "
        "nnx.scan / nnx.vmap over axis 0 do. Map the stacked axis of this kernel, or give "
        "its layout with the stacked axes first."
    )


def adapter_of(factors: dict[str, nnx.Variable], kernel: Any, path: str) -> Adapter:
    """The :class:`~jlora.Adapter` held by one kernel's factor variables
    (``{"a": var, "b": var[, "magnitude": var]}``), fitted to the kernel's current axes.

    Raises ``ValueError`` naming ``path`` when a factor is missing.
    """
    missing = [f for f in ("a", "b") if f not in factors]
    if missing:
        raise ValueError(
            f"The adapter of the kernel at path {path!r} has no factor {missing[0]!r} "
            f"(found {sorted(factors)}): the model's LoRA variables were edited by hand. "
            "Put the adapter back with jlora.nnx.put_adapters."
        )
    meta = factors["a"].get_metadata()
    static = {field: meta[field] for field in STATIC_FIELDS}
    static["layout"] = _fit_layout(static["layout"], len(getattr(kernel, "shape", ())), path)
    values = {f: factors[f].get_value() for f in FACTORS if f in factors}
    return Adapter(**values, **static)
