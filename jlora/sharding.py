"""Shard adapters like the kernels they adapt.

A kernel's layout says which of its axes are stacked, fan-in and fan-out, in whatever
order the model stores them (see :mod:`jlora.layouts`). Its factors inherit the
kernel's sharding axis by axis, by role, and the rank axis, which is small, stays
unsharded:

* ``A: (*stacked, *fan_in, rank)`` takes the specs of the stacked and fan-in axes;
* ``B: (*stacked, rank, *fan_out)`` takes the specs of the stacked and fan-out axes;
* DoRA's ``magnitude: (*stacked, *fan_out)`` takes those of the stacked and fan-out axes.

So ``A @ B`` comes out sharded exactly like the kernel (merging moves no data), ``x @ A``
contracts over the same mesh axes as ``x @ W``, and an FSDP or tensor-parallel layout of
the base model carries over to the adapters with no extra rules.

The kernels' shardings may be given as any pytree with the paths of the params tree
(the same tree passed to :func:`jlora.init`), whose leaves are:

* ``jax.sharding.PartitionSpec`` (mesh axis names; logical names when ``rules`` is given),
  e.g. from ``nn.get_partition_spec`` or ``nn.logical_to_mesh``;
* ``jax.sharding.NamedSharding``, e.g. from ``nn.logical_to_mesh_sharding`` or
  ``nnx.get_named_sharding``;
* linen's boxed params, ``nn.Partitioned`` (mesh axis names) or ``nn.LogicallyPartitioned``
  (logical names, mapped with ``rules``, the box's own rules or the
  ``nn.logical_axis_rules`` context), e.g. ``jax.eval_shape(model.init, ...)["params"]``;
* NNX variables with sharding metadata (``out_sharding``, formerly ``sharding_names``),
  resolved as ``nnx.get_partition_spec`` does, e.g. an abstract ``nnx.State``;
* arrays or ``jax.ShapeDtypeStruct`` s: their ``NamedSharding`` if they have one, else
  replicated (as flax treats unboxed arrays).

Example:
  >>> import jax, jax.numpy as jnp, jlora
  >>> from jax.sharding import PartitionSpec as P
  >>> params = {"mlp": {"kernel": jnp.ones((8, 16))}}
  >>> adapters = jlora.init(jax.random.key(0), params, jlora.LoraConfig(rank=2))
  >>> specs = jlora.adapter_specs(adapters, {"mlp": {"kernel": P("data", "model")}})
  >>> specs["mlp/kernel"].a == P("data", None), specs["mlp/kernel"].b == P(None, "model")
  (True, True)
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

import jax
from jax.sharding import NamedSharding, PartitionSpec

from jlora import _paths as paths_lib
from jlora._adapter import Adapter, Adapters, check_adapters
from jlora.layouts import Layout

__all__ = [
    "adapter_shardings",
    "adapter_specs",
    "factor_specs",
    "kernel_specs",
    "state_shardings",
]

LogicalRules = Sequence[tuple[str, Any]]


def factor_specs(
    layout: Layout, kernel_spec: PartitionSpec
) -> tuple[PartitionSpec, PartitionSpec, PartitionSpec]:
    """The specs of ``(A, B, magnitude)`` for a kernel of ``layout`` sharded as ``kernel_spec``.

    A spec shorter than the kernel's rank leaves the trailing axes unsharded, as JAX does.

    Example:
      >>> from jax.sharding import PartitionSpec as P
      >>> a, b, magnitude = factor_specs(Layout("sioo"), P(None, "data", "model"))
      >>> a == P(None, "data", None), b == P(None, None, "model", None)
      (True, True)
      >>> a_spec = factor_specs(Layout("isoo"), P("data", "stage", "model"))[0]  # MaxText's query
      >>> a_spec == P("stage", "data", None)
      True
    """
    entries = tuple(kernel_spec)
    if len(entries) > layout.ndim:
        raise ValueError(
            f"PartitionSpec {kernel_spec} has {len(entries)} entries but the kernel's layout "
            f"{layout.axes!r} has {layout.ndim} axes."
        )
    entries += (None,) * (layout.ndim - len(entries))
    stacked = tuple(entries[i] for i in layout.stacked_axes)
    fan_in = tuple(entries[i] for i in layout.fan_in_axes)
    fan_out = tuple(entries[i] for i in layout.fan_out_axes)
    # The rank axis is tiny (r << fan-in, fan-out): sharding it would only add collectives.
    return (
        PartitionSpec(*stacked, *fan_in, None),
        PartitionSpec(*stacked, None, *fan_out),
        PartitionSpec(*stacked, *fan_out),
    )


# -- reading the kernels' shardings -----------------------------------------------------


def _flax_types() -> tuple[tuple[type, ...], tuple[type, ...]]:
    """(linen AxisMetadata types, NNX Variable types), empty when flax is not imported.

    A tree cannot hold flax objects unless flax was imported, so jlora never imports it
    for users who do not use it.
    """
    boxes: tuple[type, ...] = ()
    variables: tuple[type, ...] = ()
    if "flax.core.meta" in sys.modules:
        boxes = (sys.modules["flax.core.meta"].AxisMetadata,)
    if "flax.nnx.variablelib" in sys.modules:
        variables = (sys.modules["flax.nnx.variablelib"].Variable,)
    return boxes, variables


def _is_spec_leaf(x: Any) -> bool:
    boxes, variables = _flax_types()
    return isinstance(x, (PartitionSpec, NamedSharding, *boxes, *variables))


def _logical_to_mesh(
    names: Sequence[Any], rules: LogicalRules | None, path: str
) -> PartitionSpec:
    from flax import linen as nn
    from flax.linen import spmd

    if rules is None:
        rules = nn.get_logical_axis_rules()
    if not rules and any(n is not None for n in names):
        raise ValueError(
            f"The kernel at path {path!r} has logical axis names {tuple(names)} but no "
            "logical-axis rules were given: pass `rules=((logical, mesh_axis), ...)` or call "
            "inside `nn.logical_axis_rules(rules)`."
        )
    spec = spmd.logical_to_mesh_axes(tuple(names), rules)
    assert spec is not None  # flax returns None only when given no names
    return spec


def _leaf_sharding(leaf: Any, path: str, rules: LogicalRules | None):
    """A ``PartitionSpec`` or ``NamedSharding`` (mesh axes) for one leaf of the spec tree.

    Also returns the kernel shape when the leaf knows it, to catch a mismatched tree.
    """
    boxes, variables = _flax_types()
    shape = getattr(leaf, "shape", None)
    if isinstance(leaf, NamedSharding):
        return leaf, None
    if isinstance(leaf, PartitionSpec):
        return (leaf if rules is None else _logical_to_mesh(tuple(leaf), rules, path)), None
    if boxes and isinstance(leaf, boxes):
        from flax import linen as nn

        shape = getattr(leaf.unbox(apply_constraint=False), "shape", None)
        if isinstance(leaf, nn.LogicallyPartitioned):
            box_rules = rules if rules is not None else leaf.rules
            spec = _logical_to_mesh(leaf.names, box_rules, path)
        elif isinstance(leaf, nn.Partitioned):
            spec = leaf.get_partition_spec()
        else:
            raise TypeError(
                f"The sharding tree has a {type(leaf).__name__} at path {path!r}: expected "
                "nn.Partitioned or nn.LogicallyPartitioned among flax's boxed params."
            )
        return (spec if leaf.mesh is None else NamedSharding(leaf.mesh, spec)), shape
    if variables and isinstance(leaf, variables):
        value = leaf.get_value()
        if isinstance(value, PartitionSpec | NamedSharding):  # nnx.get_partition_spec output
            return _leaf_sharding(value, path, rules)
        if leaf.get_metadata().get("out_sharding"):
            from flax import nnx
            from flax.core import spmd as core_spmd

            if rules is None:
                spec = nnx.get_partition_spec(leaf).get_value()
            else:
                with core_spmd.logical_axis_rules(rules):
                    spec = nnx.get_partition_spec(leaf).get_value()
            mesh = leaf.get_metadata().get("mesh")
            spec = spec if mesh is None else NamedSharding(mesh, spec)
            return spec, getattr(value, "shape", None)
        leaf = value  # a plain variable: fall through to the array's own sharding
        shape = getattr(leaf, "shape", None)
    if shape is not None:
        sharding = getattr(leaf, "sharding", None)
        if isinstance(sharding, NamedSharding):
            return sharding, tuple(shape)
        return PartitionSpec(), tuple(shape)
    raise TypeError(
        f"The sharding tree has a {type(leaf).__name__} at path {path!r}: expected a "
        "PartitionSpec, a NamedSharding, a flax nn.Partitioned / nn.LogicallyPartitioned box, "
        "an NNX Variable or an array."
    )


def kernel_specs(shardings: Any, *, rules: LogicalRules | None = None) -> dict[str, Any]:
    """A flat ``{path: PartitionSpec | NamedSharding}`` of every leaf of a sharding tree.

    Accepts every kind of leaf listed in the module docstring. With ``rules``, specs and
    linen/NNX metadata are read as logical axis names and mapped to mesh axes per kernel
    (so flax's rule that a mesh axis is used once per array is applied to the kernel).

    Example:
      >>> from jax.sharding import PartitionSpec as P
      >>> specs = kernel_specs({"mlp": {"kernel": P("embed", "mlp")}},
      ...                      rules=[("embed", "data"), ("mlp", "model")])
      >>> specs == {"mlp/kernel": P("data", "model")}
      True
    """
    flat, _ = jax.tree_util.tree_flatten_with_path(shardings, is_leaf=_is_spec_leaf)
    out = {}
    for keypath, leaf in flat:
        path = paths_lib.keypath_to_str(keypath)
        out[path] = _leaf_sharding(leaf, path, rules)[0]
    return out


def _kernel_sharding(flat: dict[str, Any], path: str, adapter: Adapter, rules):
    if path not in flat:
        listing = "\n  ".join(paths_lib.nearest_paths(path, list(flat)) or ["(no leaves)"])
        raise ValueError(
            f"The sharding tree has no entry for the adapted kernel at path {path!r}. Pass the "
            "shardings of the same tree you passed to jlora.init (for linen, the 'params' "
            f"collection, e.g. specs['params']). The closest paths it has are:\n  {listing}"
        )
    sharding, shape = _leaf_sharding(flat[path], path, rules)
    if shape is not None and tuple(shape) != adapter.kernel_shape:
        raise ValueError(
            f"The sharding tree's leaf at path {path!r} has shape {tuple(shape)} but the adapter "
            f"there fits a kernel of shape {adapter.kernel_shape}."
        )
    spec = sharding.spec if isinstance(sharding, NamedSharding) else sharding
    if len(spec) > adapter.layout.ndim:
        raise ValueError(
            f"The kernel at path {path!r} (layout {adapter.layout.axes!r}, shape "
            f"{adapter.kernel_shape}) is given the PartitionSpec {spec} with {len(spec)} "
            f"entries: expected at most {adapter.layout.ndim}."
        )
    return sharding


def _axis_names(spec: PartitionSpec) -> set[str]:
    names = set()
    for entry in spec:
        for name in entry if isinstance(entry, tuple) else (entry,):
            if isinstance(name, str):
                names.add(name)
    return names


def _map_adapters(adapters: Adapters, shardings: Any, rules, to_leaf) -> dict:
    check_adapters(adapters)
    flat, _ = jax.tree_util.tree_flatten_with_path(shardings, is_leaf=_is_spec_leaf)
    by_path = {paths_lib.keypath_to_str(kp): leaf for kp, leaf in flat}
    out = {}
    for path, adapter in adapters.items():
        sharding = _kernel_sharding(by_path, path, adapter, rules)
        spec = sharding.spec if isinstance(sharding, NamedSharding) else sharding
        a, b, m = factor_specs(adapter.layout, spec)
        out[path] = adapter.replace(
            a=to_leaf(path, sharding, a),
            b=to_leaf(path, sharding, b),
            magnitude=None if adapter.magnitude is None else to_leaf(path, sharding, m),
        )
    return out


def adapter_specs(
    adapters: Adapters, shardings: Any, *, rules: LogicalRules | None = None
) -> dict[str, Adapter]:
    """``PartitionSpec`` s for every factor, derived from the adapted kernels' shardings.

    Args:
      adapters: the ``{path: Adapter}`` dict from :func:`jlora.init`, or its abstract
        version from ``jax.eval_shape`` (only shapes and layouts are read).
      shardings: the kernels' shardings as a tree with the params' paths; any leaf kind
        listed in the module docstring.
      rules: optional logical-axis rules ``((logical_name, mesh_axis), ...)``; when given,
        specs and flax metadata are read as logical names and mapped per kernel.

    Returns:
      A dict with the structure of ``adapters`` (the same ``Adapter`` metadata) whose
      ``a``, ``b`` and ``magnitude`` are ``PartitionSpec`` s in mesh axis names.

    Example:
      >>> import jax, jax.numpy as jnp, jlora
      >>> from jax.sharding import PartitionSpec as P
      >>> params = {"attn": {"query": {"kernel": jnp.ones((8, 2, 4))}}}
      >>> ads = jlora.init(jax.random.key(0), params, jlora.LoraConfig(rank=2))
      >>> specs = adapter_specs(ads, {"attn": {"query": {"kernel": P("data", "model")}}})
      >>> specs["attn/query/kernel"].b == P(None, "model", None)
      True
    """

    def to_spec(path, sharding, spec):
        return spec

    return _map_adapters(adapters, shardings, rules, to_spec)


def adapter_shardings(
    adapters: Adapters,
    shardings: Any,
    mesh: jax.sharding.Mesh | jax.sharding.AbstractMesh | None = None,
    *,
    rules: LogicalRules | None = None,
) -> dict[str, Adapter]:
    """``NamedSharding`` s for every factor: use them as ``jit`` in/out shardings.

    A kernel given as a ``NamedSharding`` lends its factors its own mesh and memory kind;
    a kernel given as a spec (or flax metadata) needs ``mesh``.

    Args:
      adapters: as in :func:`adapter_specs`.
      shardings: as in :func:`adapter_specs`.
      mesh: the mesh for kernels given without one.
      rules: as in :func:`adapter_specs`.

    Returns:
      A dict with the structure of ``adapters`` whose leaves are ``NamedSharding`` s, e.g.
      for ``jax.jit(jlora.init, static_argnums=2, out_shardings=...)``.

    Example:
      >>> import jax, jax.numpy as jnp, jlora
      >>> from jax.sharding import PartitionSpec as P
      >>> mesh = jax.make_mesh((1, 1), ("data", "model"))
      >>> params = {"mlp": {"kernel": jnp.ones((8, 16))}}
      >>> config = jlora.LoraConfig(rank=2)
      >>> abstract = jax.eval_shape(lambda p: jlora.init(jax.random.key(0), p, config), params)
      >>> out = adapter_shardings(abstract, {"mlp": {"kernel": P("data", "model")}}, mesh)
      >>> adapters = jax.jit(jlora.init, static_argnums=2, out_shardings=out)(
      ...     jax.random.key(0), params, config)
      >>> adapters["mlp/kernel"].b.sharding.spec == P(None, "model")
      True
    """

    def to_named(path, sharding, spec):
        if isinstance(sharding, NamedSharding):
            return NamedSharding(sharding.mesh, spec, memory_kind=sharding.memory_kind)
        if mesh is None:
            raise ValueError(
                f"The kernel at path {path!r} is given as the PartitionSpec {sharding} without a "
                "mesh: pass `mesh=` to adapter_shardings, or give NamedShardings."
            )
        unknown = sorted(_axis_names(sharding) - set(mesh.axis_names))
        if unknown:
            raise ValueError(
                f"The kernel at path {path!r} is sharded as {sharding}, but the mesh has no axes "
                f"{unknown} (its axes: {list(mesh.axis_names)}). Logical axis names? Pass "
                "`rules=((logical, mesh_axis), ...)`."
            )
        return NamedSharding(mesh, spec)

    return _map_adapters(adapters, shardings, rules, to_named)


def state_shardings(state: Any, params: Any, shardings: Any) -> Any:
    """``NamedSharding`` s for an optimizer state (or any tree holding copies of ``params``).

    Each array of ``state`` whose path ends with the path of a leaf of ``params`` and has
    that leaf's shape (Adam's ``mu`` and ``nu``, momentum...) is sharded like the leaf; every
    other array (step counts, factored statistics of another shape) is replicated. This
    works for any optax chain, including ``optax.partition`` and :func:`jlora.lora_plus`,
    where ``optax.tree_map_params`` cannot see through the labels.

    Args:
      state: the optimizer state, usually abstract: ``jax.eval_shape(opt.init, params)``.
      params: the tree the optimizer was initialised with (abstract is fine).
      shardings: ``NamedSharding`` s with the structure of ``params``, e.g. from
        :func:`adapter_shardings`; the mesh of the first one is used for replicated leaves.

    Example:
      >>> import jax, jax.numpy as jnp, jlora, optax
      >>> from jax.sharding import NamedSharding, PartitionSpec as P
      >>> mesh = jax.make_mesh((1,), ("model",))
      >>> params = {"w": jnp.ones((4, 8))}
      >>> opt = optax.adam(1e-3)
      >>> state = jax.eval_shape(opt.init, params)
      >>> out = state_shardings(state, params, {"w": NamedSharding(mesh, P(None, "model"))})
      >>> out[0].mu["w"].spec == P(None, "model"), out[0].count.spec == P()
      (True, True)
    """
    param_flat = paths_lib.select(params, ".*", allow_empty=True)
    sharding_flat = paths_lib.select(shardings, ".*", allow_empty=True)
    missing = sorted(set(param_flat) - set(sharding_flat))
    if missing:
        raise ValueError(
            f"`shardings` has no entry for the params leaves at paths {missing[:5]}: expected "
            "NamedShardings with the structure of `params`."
        )
    if not all(isinstance(s, NamedSharding) for s in sharding_flat.values()):
        raise TypeError("`shardings` must hold NamedShardings (e.g. from adapter_shardings).")
    if not sharding_flat:
        raise ValueError("`shardings` has no leaves: cannot tell which mesh to use.")
    mesh = next(iter(sharding_flat.values())).mesh
    replicated = NamedSharding(mesh, PartitionSpec())
    # Longest paths first, so 'x/kernel/a' is tried before a shorter path that ends it.
    candidates = sorted(param_flat, key=len, reverse=True)

    def pick(path: str, leaf):
        shape = tuple(getattr(leaf, "shape", ()))
        for p in candidates:
            if (path == p or path.endswith("/" + p)) and shape == tuple(param_flat[p].shape):
                return sharding_flat[p]
        return replicated

    return paths_lib.tree_map_with_path(pick, state)
