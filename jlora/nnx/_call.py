"""Calling an adapted NNX module: the factored transform under ``module(...)``.

``jlora.nnx`` changes the class of each adapted module, and of every module above one,
to a subclass (cached per class) whose ``__call__`` does, once per call::

    graphdef, state = nnx.split((module, *graph nodes among the arguments))
    out, changed = jlora.lora(fn)(state, adapters, *args, **kwargs)
    nnx.update((module, *nodes), changed)

where ``adapters`` are read from the ``nnx.LoRAParam`` factors in ``state`` and ``fn``
merges ``state`` back into a module, calls the class's own ``__call__`` and returns the
output with every variable the call changed (KV caches, batch statistics, RNG counts,
new variables). So the kernels stay factored (custom backward, shared-input fusion,
no ``W + s·A·B``), gradients reach the ``LoRAParam`` s through the adapters, and state
updates reach the model as they would without adapters.

The outermost adapted module that is called runs the transform over its whole subtree;
modules called inside it (its layers, under ``nnx.scan`` too) run their own ``__call__``,
so ``jlora.lora`` sees the whole model and fuses what it can. Calling an adapted layer
directly runs the transform over that layer alone.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import threading
import types
from collections.abc import Callable
from typing import Any

import jax
from flax import nnx

from jlora._adapter import Adapter
from jlora._transform.api import lora
from jlora.nnx._factors import adapter_of, is_factor, join_path

__all__ = ["adapted_class", "base_class", "factored_call", "flat_adapters", "own_calls"]

_LOCAL = threading.local()
_TRANSFORMED: collections.OrderedDict = collections.OrderedDict()
_CACHE_SIZE = 64  # transformed calls kept (one per graph structure and class)
_CLASSES: dict[type, type] = {}


class _NodeSlot:
    """Where a graph node (an ``nnx.Rngs``, another module) sat among the arguments."""

    def __repr__(self) -> str:
        return "<graph node>"


_NODE = _NodeSlot()


@contextlib.contextmanager
def own_calls():
    """Inside this context adapted modules run their own ``__call__``, adapters unused
    (entered by the factored call itself, around the model's call)."""
    _LOCAL.depth = getattr(_LOCAL, "depth", 0) + 1
    try:
        yield
    finally:
        _LOCAL.depth -= 1


def _is_inside() -> bool:
    return getattr(_LOCAL, "depth", 0) > 0


def base_class(cls: type) -> type:
    """The class an adapted class was made from (``cls`` itself if not adapted)."""
    return cls.__dict__.get("__jlora_base__", cls)


def adapted_class(cls: type) -> type:
    """The subclass of ``cls`` whose ``__call__`` runs the factored transform (one per class).

    Example:
      >>> from flax import nnx
      >>> adapted_class(nnx.Linear).__name__, base_class(adapted_class(nnx.Linear)) is nnx.Linear
      ('LinearWithLoRA', True)
    """
    cls = base_class(cls)
    if cls not in _CLASSES:
        own_call = cls.__call__

        @functools.wraps(own_call)
        def __call__(self, *args, **kwargs):
            return factored_call(self, own_call, args, kwargs)

        def body(ns):
            ns.update(__call__=__call__, __module__=cls.__module__, __jlora_base__=cls,
                      __doc__=cls.__doc__)

        _CLASSES[cls] = types.new_class(f"{cls.__name__}WithLoRA", (cls,), exec_body=body)
    return _CLASSES[cls]


def _factor_groups(flat) -> dict[tuple, dict[str, nnx.Variable]]:
    """``{kernel path: {factor: variable}}`` of the active (``LoRAParam``) factors."""
    groups: dict[tuple, dict[str, nnx.Variable]] = {}
    for path, var in flat:
        if isinstance(var, nnx.LoRAParam) and is_factor(var):
            kernel_path = (*path[:-1], var.get_metadata("lora_kernel"))
            groups.setdefault(kernel_path, {})[var.get_metadata("lora_factor")] = var
    return groups


def flat_adapters(state: nnx.State) -> dict[tuple, Adapter]:
    """``{kernel path tuple: Adapter}`` of the active factors in ``state``.

    Raises ``ValueError`` naming the path when factors have no kernel beside them.
    """
    flat = nnx.to_flat_state(state)
    variables = dict(flat)
    out = {}
    for kernel_path, factors in _factor_groups(flat).items():
        if kernel_path not in variables:
            raise ValueError(
                f"The LoRA factors at path {join_path(kernel_path[:-1])!r} adapt a kernel "
                f"{kernel_path[-1]!r} that the module does not have: the model was changed "
                "after the adapters were put on it. Put them back with jlora.nnx.put_adapters."
            )
        kernel = variables[kernel_path].get_value()
        out[kernel_path] = adapter_of(factors, kernel, join_path(kernel_path))
    return out


def _snapshot(state: nnx.State) -> dict[tuple, Any]:
    # merge reuses the state's variables, so their values are read before the call.
    return {path: var.get_raw_value() for path, var in nnx.to_flat_state(state)}


def _changes(old: dict[tuple, Any], after: nnx.State, frozen: set) -> nnx.State:
    """The variables of ``after`` that the call created or set (not the same value as in
    the snapshot ``old``): what the call would have changed on the model without adapters.

    Adapted kernels and LoRA factors (``frozen``) are left out: they are frozen inputs of
    the transform, and ``nnx.scan`` / ``nnx.vmap`` write every variable of the modules
    they map back, unchanged, which for an adapted kernel would form ``W + s·A·B``.
    """
    new = nnx.to_flat_state(after)
    gone = set(old) - {path for path, _ in new}
    if gone:
        raise ValueError(
            f"The call removed the variable(s) {sorted(map(join_path, gone))} from the model; "
            "jlora.nnx carries a call's new and changed variables back to the model, not "
            "removals. Remove them outside the call."
        )
    return nnx.from_flat_state([
        (path, var) for path, var in new
        if path not in frozen and (path not in old or var.get_raw_value() is not old[path])
    ])


def _transformed(graphdef, own_call: Callable, with_nodes: bool) -> Callable:
    """``jlora.lora`` of the function that merges ``graphdef`` and calls ``own_call``; one
    per graph structure, so its traces are reused from call to call. ``with_nodes``: the
    graph holds ``(module, *graph nodes among the arguments)``, not the module alone."""
    key = (graphdef, own_call, with_nodes)
    if key in _TRANSFORMED:
        _TRANSFORMED.move_to_end(key)
        return _TRANSFORMED[key]

    def fn(state, *args, **kwargs):
        merged = nnx.merge(graphdef, state)
        module, nodes = (merged[0], merged[1:]) if with_nodes else (merged, ())
        old = _snapshot(state)
        if nodes:
            it = iter(nodes)
            args, kwargs = jax.tree.map(lambda x: next(it) if x is _NODE else x, (args, kwargs))
        with own_calls():
            out = own_call(module, *args, **kwargs)
        flat = nnx.to_flat_state(state)
        frozen = {path for path, var in flat if is_factor(var)}
        frozen |= set(_factor_groups(flat))
        return out, _changes(old, nnx.state(merged), frozen)

    _TRANSFORMED[key] = transformed = lora(fn)
    while len(_TRANSFORMED) > _CACHE_SIZE:
        _TRANSFORMED.popitem(last=False)
    return transformed


def factored_call(module, own_call: Callable, args: tuple, kwargs: dict) -> Any:
    """``own_call(module, *args, **kwargs)`` with the adapters in ``module``'s subtree
    applied by the factored transform (see the module docstring)."""
    if _is_inside():
        return own_call(module, *args, **kwargs)
    is_node = nnx.graphlib.is_graph_node
    leaves, treedef = jax.tree.flatten((args, kwargs), is_leaf=is_node)
    nodes = tuple(x for x in leaves if is_node(x))
    # Graph nodes among the arguments (an nnx.Rngs, another module) travel with the
    # module, so their updates come back too; without any, paths are the module's own.
    target = (module, *nodes) if nodes else module
    graphdef, state = nnx.split(target)
    adapters = {join_path(path): ad for path, ad in flat_adapters(state).items()}
    if not adapters:
        return own_call(module, *args, **kwargs)
    if nodes:
        args, kwargs = jax.tree.unflatten(treedef, [_NODE if is_node(x) else x for x in leaves])
    transformed = _transformed(graphdef, own_call, bool(nodes))
    out, changed = transformed(state, adapters, *args, **kwargs)
    if nnx.to_flat_state(changed):
        nnx.update(target, changed)
    return out
