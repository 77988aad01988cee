"""``fn`` traced to a jaxpr once per input signature, and its inputs mapped to param paths.

Example:
  >>> import jax.numpy as jnp
  >>> traced, values = trace(lambda p, x: x @ p["w"], None, {"w": jnp.ones((3, 2))},
  ...                        (jnp.ones((4, 3)),), {})
  >>> traced.param_paths, [e.primitive.name for e in traced.closed.jaxpr.eqns]
  (['w', None], ['dot_general'])
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Any

import jax
import numpy as np

from jlora import _jax_compat as jc
from jlora import _paths as paths_lib
from jlora import quantization as quant_lib

CACHE_SIZE = 32  # traced jaxprs kept per transformed function (one per input signature)


def is_array(x) -> bool:
    """An array argument (a JAX or NumPy array, or a tracer) rather than a static value."""
    return isinstance(x, jax.Array | np.ndarray | np.generic) or jc.is_tracer(x)


@dataclasses.dataclass
class Traced:
    """``fn`` traced at one input signature, and how its jaxpr inputs map to params."""

    closed: Any  # ClosedJaxpr of fn over the array leaves of (params, args, kwargs)
    out_tree: Any
    dynamic: list  # for each leaf of (params, args, kwargs): True if a jaxpr input
    param_paths: list  # for each jaxpr input: its path in params, or None (an argument)
    jitted: Any = None  # the interpretation under jax.jit, built on first use by `lora`
    # for each jaxpr input: (field, statics) if it is an array of a quantized kernel
    param_parts: list = dataclasses.field(default_factory=list)
    # guessed layouts already checked against this jaxpr (see api.check_guesses)
    checked: set = dataclasses.field(default_factory=set)


def _param_leaf_info(params) -> list:
    """``(path, part)`` per leaf of ``params``; a quantized kernel's arrays all get the
    kernel's path and ``part = (field, statics)``, the others ``part = None``."""
    out = []
    flat = jax.tree_util.tree_flatten_with_path(params, is_leaf=quant_lib.is_quantized)[0]
    for kp, node in flat:
        path = paths_lib.keypath_to_str(kp)
        if quant_lib.is_quantized(node):
            out += [(path, (field, node.statics())) for field in node.fields()]
        else:
            out.append((path, None))
    return out


def trace(fn, cache: collections.OrderedDict | None, params, args, kwargs):
    """``(traced, jaxpr input values)``; the trace is cached per input signature."""
    leaves, treedef = jax.tree_util.tree_flatten((params, args, kwargs))
    dynamic = [is_array(x) for x in leaves]
    values = [x for x, d in zip(leaves, dynamic, strict=True) if d]
    avals = [jc.aval_of(x) for x in values]
    statics = tuple((i, x) for i, (x, d) in enumerate(zip(leaves, dynamic, strict=True)) if not d)
    key = (treedef, tuple(avals), statics)
    try:
        hash(key)
    except TypeError:  # an unhashable static argument: trace every call
        key = None
    if cache is not None and key is not None and key in cache:
        cache.move_to_end(key)
        return cache[key], values
    out_tree = []

    def flat_fn(*arrays):
        it = iter(arrays)
        full = [next(it) if d else x for x, d in zip(leaves, dynamic, strict=True)]
        p, a, kw = jax.tree_util.tree_unflatten(treedef, full)
        out_leaves, tree = jax.tree_util.tree_flatten(fn(p, *a, **kw))
        out_tree.append(tree)
        return out_leaves

    closed = jc.make_closed_jaxpr(flat_fn, avals)
    info = _param_leaf_info(params)
    param_paths = [info[i][0] if i < len(info) else None for i, d in enumerate(dynamic) if d]
    param_parts = [info[i][1] if i < len(info) else None for i, d in enumerate(dynamic) if d]
    traced = Traced(closed, out_tree[0], dynamic, param_paths, param_parts=param_parts)
    # A jaxpr that closes over a tracer of an enclosing transformation is valid only there.
    if cache is not None and key is not None and not any(map(jc.is_tracer, closed.consts)):
        cache[key] = traced
        while len(cache) > CACHE_SIZE:
            cache.popitem(last=False)
    return traced, values


def abstract_call(body, params, args, kwargs):
    """Run ``body(params, args, kwargs)`` on shapes only, non-array leaves kept static."""
    leaves, treedef = jax.tree_util.tree_flatten((params, args, kwargs))
    dynamic = [is_array(x) for x in leaves]

    def flat(*arrays):
        it = iter(arrays)
        full = [next(it) if d else x for x, d in zip(leaves, dynamic, strict=True)]
        return body(*jax.tree_util.tree_unflatten(treedef, full))

    return jax.eval_shape(flat, *[x for x, d in zip(leaves, dynamic, strict=True) if d])
