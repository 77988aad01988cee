"""Putting adapters on an NNX model, taking them off, switching between named sets.

Every function here changes the model in place (as NNX code does) and returns it.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax
import jax
import jax.numpy as jnp
from flax import nnx

from jlora._adapter import Adapter, Adapters, check_adapters
from jlora._config import LoraConfig
from jlora._initializers import init
from jlora._merging import check_adapters_fit, merge
from jlora._reporting import summary as _summary
from jlora.layouts import LayoutError
from jlora.nnx._call import adapted_class, base_class, flat_adapters
from jlora.nnx._factors import (
    FACTORS,
    STATIC_FIELDS,
    InactiveLoRA,
    factor_attr,
    factor_variables,
    is_factor,
    join_path,
)
from jlora.nnx._layouts import KERNELS, module_layouts

# jlora.nnx is built on flax 0.12's NNX API (nnx.Dict, Variable.get_value / set_value /
# get_metadata); the rest of jlora also runs on flax 0.11.
_HAS_NNX_API = hasattr(nnx, "Dict") and hasattr(nnx.Variable, "get_value")


def _require_nnx_api() -> None:
    if not _HAS_NNX_API:
        raise ImportError(
            f"jlora.nnx needs flax 0.12 or newer (nnx.Dict, nnx.Variable.get_value); this is "
            f"flax {flax.__version__}. Upgrade flax, or run jlora.lora on nnx.split's state."
        )

__all__ = [
    "STORE",
    "active_adapter",
    "adapter_names",
    "apply_lora",
    "get_adapters",
    "init_adapters",
    "merge_lora",
    "put_adapters",
    "summary",
    "switch_adapter",
]

STORE = "inactive_lora"  # the model attribute holding stored (inactive) adapter sets


def _graph(model) -> dict[tuple, Any]:
    """``{path: module or variable}`` of every node under ``model``."""
    return {path: node for path, node in nnx.iter_graph(model)
            if isinstance(node, nnx.Module | nnx.Variable)}


def _kernel_index(model) -> dict[str, tuple]:
    """``{path string: path}`` of every variable that can be adapted."""
    return {join_path(path): path for path, _ in nnx.to_flat_state(nnx.state(model, KERNELS))}


# flax 0.12's module containers (older releases hold plain lists, indexed by int)
_CONTAINERS = tuple(t for t in (getattr(nnx, "List", None), getattr(nnx, "Dict", None)) if t)


def _owner(graph: dict, path: tuple):
    owner = graph.get(path[:-1])
    if not isinstance(path[-1], str) or not isinstance(owner, nnx.Module) or isinstance(
            owner, _CONTAINERS):
        raise ValueError(
            f"The kernel at path {join_path(path)!r} is an element of a container, not an "
            "attribute of a module: jlora.nnx keeps each adapter beside its kernel, as "
            "`<kernel>_lora_a` / `<kernel>_lora_b` attributes of the kernel's module. Hold "
            "the kernel in a module attribute, or use jlora.lora on nnx.split's state."
        )
    return owner


def _key(rngs) -> jax.Array:
    if isinstance(rngs, nnx.Rngs):
        return rngs.params()
    if isinstance(rngs, jax.Array) and jnp.issubdtype(rngs.dtype, jax.dtypes.prng_key):
        return rngs
    raise TypeError(f"`rngs` must be an nnx.Rngs or a JAX key, got {type(rngs).__name__}.")


def _check_name(name) -> None:
    if not isinstance(name, str) or not name or "/" in name:
        raise ValueError(f"An adapter set's `name` must be a non-empty string without '/', "
                         f"got {name!r}.")


def _active_factors(model) -> list[tuple[tuple, nnx.Variable]]:
    return [(p, v) for p, v in nnx.to_flat_state(nnx.state(model, nnx.LoRAParam))
            if is_factor(v)]


def active_adapter(model) -> str | None:
    """The name of the adapter set ``model`` applies, or None without adapters.

    Example:
      >>> from flax import nnx
      >>> import jlora
      >>> model = nnx.Linear(8, 4, rngs=nnx.Rngs(0))
      >>> jlora.nnx.active_adapter(model) is None
      True
      >>> model = jlora.nnx.apply_lora(model, jlora.LoraConfig(rank=2), rngs=nnx.Rngs(1))
      >>> jlora.nnx.active_adapter(model)
      'default'
    """
    _require_nnx_api()
    names = sorted({v.get_metadata("lora_adapter") for _, v in _active_factors(model)})
    if len(names) > 1:
        raise ValueError(
            f"The model's active LoRA factors belong to several adapter sets {names}: they "
            "were edited by hand. Put one set back with jlora.nnx.put_adapters."
        )
    return names[0] if names else None


def _stored(model) -> nnx.Dict | None:
    return getattr(model, STORE, None)


def adapter_names(model) -> tuple[str, ...]:
    """The names of ``model``'s adapter sets: the active one first, then the stored ones.

    Example:
      >>> from flax import nnx
      >>> import jlora
      >>> model = nnx.Linear(8, 4, rngs=nnx.Rngs(0))
      >>> for name in ("fr", "de"):
      ...     model = jlora.nnx.apply_lora(model, jlora.LoraConfig(rank=2), rngs=nnx.Rngs(1),
      ...                                  name=name)
      >>> jlora.nnx.adapter_names(model)
      ('fr', 'de')
    """
    _require_nnx_api()
    active = active_adapter(model)
    stored = tuple(_stored(model) or ())
    return ((active,) if active else ()) + stored


def _install_classes(model) -> None:
    """Adapted classes on the model and every module above an active factor, the own
    classes everywhere else."""
    graph = _graph(model)
    needed = set()
    for path, _ in _active_factors(model):
        needed |= {path[:k] for k in range(len(path))}
    for path, node in graph.items():
        if not isinstance(node, nnx.Module):
            continue
        cls = base_class(type(node))
        has_call = any("__call__" in vars(k) for k in cls.__mro__)
        want = adapted_class(cls) if path in needed and has_call else cls
        if type(node) is not want:
            # NNX modules guard their attributes; the class is not an NNX attribute.
            object.__setattr__(node, "__class__", want)


def _place(model, adapters: Adapters, name: str, kind: type, graph: dict, index: dict):
    for path, adapter in adapters.items():
        kernel_path = index[path]
        owner = _owner(graph, kernel_path)
        for attr, var in factor_variables(adapter, graph[kernel_path], kernel_path[-1], name,
                                          kind).items():
            if attr in vars(owner) and not is_factor(getattr(owner, attr)):
                raise ValueError(
                    f"Cannot put the adapter of the kernel at path {path!r}: its module "
                    f"already has an attribute {attr!r} that is not a jlora factor."
                )
            setattr(owner, attr, var)


def _remove_active(model) -> None:
    graph = _graph(model)
    for path, _ in _active_factors(model):
        delattr(graph[path[:-1]], path[-1])


def _store(model, name: str, adapters: Adapters, graph: dict, index: dict) -> None:
    entries = nnx.Dict()
    for path, adapter in adapters.items():
        kernel_path = index[path]
        made = factor_variables(adapter, graph[kernel_path], kernel_path[-1], name,
                                InactiveLoRA)
        entries[path] = nnx.Dict({f: made[factor_attr(kernel_path[-1], f)]
                                  for f in FACTORS if factor_attr(kernel_path[-1], f) in made})
    stored = _stored(model)
    if stored is None:
        stored = nnx.Dict()
        setattr(model, STORE, stored)
    stored[name] = entries


def _store_holding(model, name: str) -> nnx.Dict:
    """The model's store of inactive sets, which must hold ``name``."""
    stored = _stored(model)
    if stored is None or name not in stored:
        raise KeyError(f"The model has no adapter set named {name!r}; it has "
                       f"{list(adapter_names(model))}.")
    return stored


def _stored_adapters(model, name: str) -> Adapters:
    stored = _store_holding(model, name)
    out = {}
    for path, factors in stored[name].items():
        meta = factors["a"].get_metadata()
        out[path] = Adapter(**{f: factors[f].get_value() for f in FACTORS if f in factors},
                            **{field: meta[field] for field in STATIC_FIELDS})
    return out


def _check_putable(adapters: Adapters) -> None:
    check_adapters(adapters)
    if not adapters:
        raise ValueError("`adapters` is empty: there is nothing to put on the model.")
    dropped = sorted(path for path, ad in adapters.items() if ad.dropout > 0)
    if dropped:
        raise ValueError(
            f"The adapters at {dropped} have dropout > 0, which jlora.nnx does not apply "
            "(a model call takes no dropout key). Use dropout=0.0, or train with "
            "jlora.lora(fn)(state, adapters, x, lora_rng=key) on nnx.split's state."
        )


def put_adapters(model, adapters: Adapters, *, name: str | None = None):
    """Put ``adapters`` (``{kernel path: Adapter}``, e.g. from :func:`jlora.load` or
    :func:`jlora.peft.load`) on ``model`` as the adapter set ``name``; returns ``model``.

    The first set put on a model is its active set: its factors become ``nnx.LoRAParam``
    variables beside their kernels and every call of the model applies them. A set put
    under another name is stored (:class:`~jlora.nnx.InactiveLoRA`, never trained) until
    :func:`switch_adapter` activates it; putting a set under an existing name replaces
    it. Without ``name``: the active set's name (``"default"`` on a model without one),
    so the active set is replaced. Paths are those of ``nnx.state(model)``; an adapter
    that fits no kernel there is a ``ValueError`` naming the path and the shapes.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from flax import nnx
      >>> import jlora
      >>> model = nnx.Linear(8, 4, rngs=nnx.Rngs(0))
      >>> ads = jlora.init(jax.random.key(1), nnx.state(model, nnx.Param),
      ...                  jlora.LoraConfig(rank=2))
      >>> model = jlora.nnx.put_adapters(model, ads)
      >>> model.kernel_lora_a.shape, model.kernel_lora_b.shape
      ((8, 2), (2, 4))
    """
    _require_nnx_api()
    active = active_adapter(model)
    name = name if name is not None else active or "default"
    _check_name(name)
    _check_putable(adapters)
    check_adapters_fit(nnx.state(model, KERNELS), adapters)
    graph, index = _graph(model), _kernel_index(model)
    if active is None or active == name:
        _remove_active(model)
        _place(model, adapters, name, nnx.LoRAParam, graph, index)
        stored = _stored(model)
        if stored is not None and name in stored:
            del stored[name]
    else:
        _store(model, name, adapters, graph, index)
    _install_classes(model)
    return model


def init_adapters(model, config: LoraConfig, *, rngs) -> Adapters:
    """New adapters for the kernels of ``model`` that ``config`` targets, without changing
    the model: :func:`jlora.init` on ``nnx.state(model, nnx.Param)`` with the layouts the
    model's modules define (see ``jlora.nnx`` and ``docs/nnx.md``).

    Example:
      >>> from flax import nnx
      >>> import jlora
      >>> model = nnx.Einsum("btd,dnh->btnh", (8, 2, 4), rngs=nnx.Rngs(0))
      >>> ads = jlora.nnx.init_adapters(model, jlora.LoraConfig(rank=2), rngs=nnx.Rngs(1))
      >>> ads["kernel"].layout, ads["kernel"].b.shape
      (Layout('ioo', guessed=True), (2, 2, 4))
    """
    _require_nnx_api()
    if not isinstance(config, LoraConfig):
        raise TypeError(f"`config` must be a jlora.LoraConfig, got {type(config).__name__}.")
    params = nnx.state(model, KERNELS)
    graph = _graph(model)
    kernels = {}
    for path, var in nnx.to_flat_state(params):
        if config.is_target(join_path(path)) and isinstance(graph.get(path[:-1]), nnx.Module):
            kernels[join_path(path)] = (graph[path[:-1]], path[-1], tuple(var.shape))
    layouts = dict(config.layouts)  # the user's patterns first: they win
    for path, layout in module_layouts(kernels).items():
        layouts.setdefault(path, layout)
    try:
        return init(_key(rngs), params, dataclasses.replace(config, layouts=layouts))
    except LayoutError as e:
        raise LayoutError(
            f"{e} For an NNX model, jlora.nnx.infer_layouts(model, *sample_args) reads them."
        ) from None


def apply_lora(model, config: LoraConfig, *, rngs, name: str = "default"):
    """Put new adapters on the kernels of ``model`` that ``config`` targets; returns
    ``model`` (changed in place).

    Each targeted kernel gets its factors as ``nnx.LoRAParam`` variables beside it
    (``<kernel>_lora_a``, ``<kernel>_lora_b``), with the scale, layout and variant as
    static metadata, and calling the model applies them through :func:`jlora.lora`: the
    kernels stay factored (custom backward, shared-input fusion, no ``W + s·A·B``) and
    the base weights are neither changed nor copied. No forward pass is run: layouts
    come from the modules (``docs/nnx.md``), ``config.layouts`` or an error asking for
    them. With the default init ``B`` is zero, so the model's outputs do not change.

    Train with what NNX code already uses: ``nnx.Optimizer(model, tx,
    wrt=nnx.LoRAParam)`` and ``nnx.value_and_grad(loss, argnums=nnx.DiffState(0,
    nnx.LoRAParam))``. If the model already has adapters, the new set is stored under
    ``name`` (see :func:`put_adapters` and :func:`switch_adapter`).

    Args:
      model: an NNX module.
      config: a :class:`jlora.LoraConfig`; paths are those of ``nnx.state(model)``.
      rngs: an ``nnx.Rngs`` (its ``params`` stream is used) or a JAX key.
      name: the name of this adapter set.

    Example:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> import jlora
      >>> model = nnx.Sequential(nnx.Linear(8, 16, rngs=nnx.Rngs(0)), nnx.relu,
      ...                        nnx.Linear(16, 4, rngs=nnx.Rngs(1)))
      >>> config = jlora.LoraConfig(rank=2, alpha=4.0, scaling="rslora")
      >>> model = jlora.nnx.apply_lora(model, config, rngs=nnx.Rngs(2))
      >>> model(jnp.ones((3, 8))).shape
      (3, 4)
      >>> sorted(jlora.nnx.get_adapters(model))
      ['layers/0/kernel', 'layers/2/kernel']
    """
    _require_nnx_api()
    _check_name(name)
    if name in adapter_names(model):
        raise ValueError(
            f"The model already has an adapter set named {name!r}. Give the new set another "
            "`name`, or replace it with jlora.nnx.put_adapters(model, adapters, name=...)."
        )
    return put_adapters(model, init_adapters(model, config, rngs=rngs), name=name)


def get_adapters(model, name: str | None = None) -> Adapters:
    """The adapter set ``name`` of ``model`` (the active one by default) as
    ``{kernel path: Adapter}``, ready for :func:`jlora.save`, :func:`jlora.peft.save`,
    :func:`jlora.merge` or :func:`jlora.lora` on ``nnx.state(model)``.

    Example:
      >>> from flax import nnx
      >>> import jlora
      >>> model = jlora.nnx.apply_lora(nnx.Linear(8, 4, rngs=nnx.Rngs(0)),
      ...                              jlora.LoraConfig(rank=2), rngs=nnx.Rngs(1))
      >>> ads = jlora.nnx.get_adapters(model)
      >>> ads["kernel"].a.shape, ads["kernel"].scale
      ((8, 2), 4.0)
    """
    _require_nnx_api()
    active = active_adapter(model)
    if name is not None and name != active:
        return _stored_adapters(model, name)
    if active is None:
        raise ValueError("The model has no adapters: put some on it with "
                         "jlora.nnx.apply_lora or jlora.nnx.put_adapters.")
    return {join_path(path): ad for path, ad in flat_adapters(nnx.state(model)).items()}


def summary(model) -> str:
    """:func:`jlora.summary` of ``model``: its active adapters against its base parameters.

    Example:
      >>> from flax import nnx
      >>> import jlora
      >>> model = jlora.nnx.apply_lora(nnx.Linear(64, 64, rngs=nnx.Rngs(0)),
      ...                              jlora.LoraConfig(rank=4), rngs=nnx.Rngs(1))
      >>> print(jlora.nnx.summary(model).splitlines()[-1])
      trainable params: 512 || all params: 4,672 || trainable%: 10.9589
    """
    _require_nnx_api()
    return _summary(nnx.state(model, KERNELS), get_adapters(model))


def switch_adapter(model, name: str):
    """Make the stored adapter set ``name`` the active one (the active set is stored in
    its place); returns ``model``.

    A jitted step is traced once per set (the set's name and static fields are part of
    the model's graph), then reused on every switch back. An ``nnx.Optimizer`` holds the
    state of the set it was made for: make one per set.

    Example:
      >>> from flax import nnx
      >>> import jlora
      >>> model = nnx.Linear(8, 4, rngs=nnx.Rngs(0))
      >>> for name in ("fr", "de"):
      ...     model = jlora.nnx.apply_lora(model, jlora.LoraConfig(rank=2), rngs=nnx.Rngs(1),
      ...                                  name=name)
      >>> jlora.nnx.active_adapter(jlora.nnx.switch_adapter(model, "de"))
      'de'
    """
    _require_nnx_api()
    active = active_adapter(model)
    if name == active:
        return model
    incoming = _stored_adapters(model, name)
    outgoing = get_adapters(model) if active is not None else {}
    graph, index = _graph(model), _kernel_index(model)
    stored = _store_holding(model, name)
    del stored[name]
    _remove_active(model)
    _place(model, incoming, name, nnx.LoRAParam, graph, index)
    if active is not None:
        _store(model, active, outgoing, graph, index)
    if not len(stored):
        delattr(model, STORE)
    _install_classes(model)
    return model


def merge_lora(model):
    """Fold the active adapters into their kernels (``W + s·A@B``, as :func:`jlora.merge`)
    and remove every LoRA variable (stored sets too); returns ``model``, a plain model with
    the same outputs and its own classes. To keep the adapted model, merge a copy:
    ``jlora.nnx.merge_lora(nnx.clone(model))``.

    Example:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> import jlora
      >>> model = jlora.nnx.apply_lora(nnx.Linear(8, 4, rngs=nnx.Rngs(0)),
      ...                              jlora.LoraConfig(rank=2), rngs=nnx.Rngs(1))
      >>> merged = jlora.nnx.merge_lora(model)
      >>> type(merged).__name__, len(nnx.state(merged, nnx.LoRAParam))
      ('Linear', 0)
    """
    _require_nnx_api()
    graph, index = _graph(model), _kernel_index(model)
    if active_adapter(model) is not None:
        adapters = get_adapters(model)
        kernels = {path: graph[index[path]].get_value() for path in adapters}
        for path, value in merge(kernels, adapters).items():
            graph[index[path]].set_value(value)
    _remove_active(model)
    if _stored(model) is not None:
        delattr(model, STORE)
    _install_classes(model)
    return model
