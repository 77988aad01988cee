"""``fn`` traced to a jaxpr once per input signature, and its inputs mapped to param paths.

A quantized kernel in ``params`` is traced as the float kernel it stores (its shape and
dtype), so ``fn`` is the model's ordinary code, reading ``params[...]["kernel"]`` as an
array; the interpreter then gets the :class:`~jlora.quantization.QuantizedKernel` itself
for that input (``quantized.py``). Only a model that fails on float kernels (one that
needs the ``QuantizedKernel`` object: a linen module declaring a quantized param, code
reading its arrays) is traced on the kernel's arrays instead, one input per array.

Example:
  >>> import jax.numpy as jnp
  >>> from jlora import quantization as Q
  >>> params = {"w": Q.quantize(jnp.ones((3, 2)), "int8")}
  >>> traced, values = trace(lambda p, x: x @ p["w"], None, params, (jnp.ones((4, 3)),), {})
  >>> traced.param_paths, [e.primitive.name for e in traced.closed.jaxpr.eqns]
  (['w', None], ['dot_general'])
  >>> traced.closed.in_avals[0], Q.is_quantized(values[0])
  (ShapedArray(float32[3,2]), True)
"""

from __future__ import annotations

import collections
import dataclasses
import functools
from typing import Any

import jax
import numpy as np

from jlora import _jax_compat as jc
from jlora import _paths as paths_lib
from jlora import quantization as quant_lib

CACHE_SIZE = 32  # traced jaxprs kept per transformed function (one per input signature)


def is_array(x) -> bool:
    """An array argument (a JAX or NumPy array, a tracer, or a ``jax.ShapeDtypeStruct``
    standing for one) rather than a static value."""
    return isinstance(x, jax.Array | np.ndarray | np.generic | jax.ShapeDtypeStruct) or (
        jc.is_tracer(x))


@dataclasses.dataclass
class Traced:
    """``fn`` traced at one input signature, and how its jaxpr inputs map to params."""

    closed: Any  # ClosedJaxpr of fn over the array leaves of (params, args, kwargs)
    out_tree: Any
    dynamic: list  # for each leaf of (params, args, kwargs): True if a jaxpr input
    param_paths: list  # for each jaxpr input: its path in params, or None (an argument)
    jitted: Any = None  # the interpretation under jax.jit, built on first use by `lora`
    # for each jaxpr input: (field, statics) if it is one array of a quantized kernel
    # (traced as its arrays), else None
    param_parts: list = dataclasses.field(default_factory=list)
    # guessed layouts already checked against this jaxpr (see api.check_guesses)
    checked: set = dataclasses.field(default_factory=set)
    whole: bool = True  # quantized kernels traced as float kernels (not as their arrays)


@dataclasses.dataclass(frozen=True)
class _Inputs:
    """``(params, args, kwargs)`` as leaves; ``whole``: a quantized kernel in ``params``
    is one leaf (a jaxpr input of its float kernel's shape), else one leaf per array."""

    leaves: list
    treedefs: tuple  # of params, and of (args, kwargs)
    n_params: int  # the first n_params leaves are params'
    whole: bool

    @classmethod
    def of(cls, params, args, kwargs, whole: bool) -> _Inputs:
        is_leaf = quant_lib.is_quantized if whole else None
        p_leaves, p_def = jax.tree_util.tree_flatten(params, is_leaf=is_leaf)
        rest, rest_def = jax.tree_util.tree_flatten((args, kwargs))
        return cls(p_leaves + rest, (p_def, rest_def), len(p_leaves), whole)

    @functools.cached_property
    def dynamic(self) -> list[bool]:
        return [is_array(x) or quant_lib.is_quantized(x) for x in self.leaves]

    @functools.cached_property
    def values(self) -> list:
        return [x for x, d in zip(self.leaves, self.dynamic, strict=True) if d]

    def rebuild(self, arrays) -> tuple:
        """``(params, args, kwargs)`` with ``arrays`` for the dynamic leaves."""
        it = iter(arrays)
        full = [next(it) if d else x for x, d in zip(self.leaves, self.dynamic, strict=True)]
        p_def, rest_def = self.treedefs
        args, kwargs = rest_def.unflatten(full[self.n_params:])
        return p_def.unflatten(full[: self.n_params]), args, kwargs

    def avals(self) -> list:
        """The jaxpr's inputs: a quantized kernel's is its float kernel's shape and dtype."""
        return [jc.aval_of(jax.ShapeDtypeStruct(x.shape, x.dtype))
                if quant_lib.is_quantized(x) else jc.aval_of(x) for x in self.values]

    def key(self):
        """The input signature (hashable, or None), whatever way kernels will be traced."""
        sig = tuple(("quantized", x.statics(), tuple(map(jc.aval_of, jax.tree.leaves(x))))
                    if quant_lib.is_quantized(x) else jc.aval_of(x) for x in self.values)
        statics = tuple((i, x) for i, (x, d) in enumerate(zip(self.leaves, self.dynamic,
                                                               strict=True)) if not d)
        key = (self.treedefs, sig, statics)
        try:
            hash(key)
        except TypeError:  # an unhashable static argument: trace every call
            return None
        return key

    def param_info(self, params) -> list:
        """``(path, part)`` per jaxpr input; the arrays of a quantized kernel traced as
        arrays all get the kernel's path and ``part = (field, statics)``."""
        info = []
        flat = jax.tree_util.tree_flatten_with_path(params, is_leaf=quant_lib.is_quantized)[0]
        for kp, node in flat:
            path = paths_lib.keypath_to_str(kp)
            if quant_lib.is_quantized(node) and not self.whole:
                info += [(path, (field, node.statics())) for field in node.fields()]
            else:
                info.append((path, None))
        info += [(None, None)] * (len(self.leaves) - len(info))
        return [i for i, d in zip(info, self.dynamic, strict=True) if d]


def _trace_inputs(fn, inputs: _Inputs, params) -> Traced:
    out_tree = []

    def flat_fn(*arrays):
        p, a, kw = inputs.rebuild(arrays)
        out_leaves, tree = jax.tree_util.tree_flatten(fn(p, *a, **kw))
        out_tree.append(tree)
        return out_leaves

    closed = jc.make_closed_jaxpr(flat_fn, inputs.avals())
    info = inputs.param_info(params)
    return Traced(closed, out_tree[0], inputs.dynamic, [path for path, _ in info],
                  param_parts=[part for _, part in info], whole=inputs.whole)


def _trace_either_way(fn, whole: _Inputs, params, args, kwargs) -> Traced:
    """Quantized kernels traced as float kernels; if ``fn`` fails on those, as arrays."""
    try:
        return _trace_inputs(fn, whole, params)
    except Exception as error:
        if not any(map(quant_lib.is_quantized, whole.leaves[: whole.n_params])):
            raise
        try:
            return _trace_inputs(fn, _Inputs.of(params, args, kwargs, whole=False), params)
        except Exception as again:
            error.add_note(
                "jlora: `fn` failed on the float kernels of the quantized kernels in `params` "
                "(above), and again on the QuantizedKernel objects themselves: "
                f"{type(again).__name__}: {again}"
            )
            raise error from None


def trace(fn, cache: collections.OrderedDict | None, params, args, kwargs):
    """``(traced, jaxpr input values)``; the trace is cached per input signature."""
    whole = _Inputs.of(params, args, kwargs, whole=True)
    key = None if cache is None else whole.key()
    if cache is not None and key is not None and key in cache:
        cache.move_to_end(key)
        traced = cache[key]
    else:
        traced = _trace_either_way(fn, whole, params, args, kwargs)
        # A jaxpr that closes over a tracer of an enclosing transformation is valid only
        # there.
        if (cache is not None and key is not None
                and not any(map(jc.is_tracer, traced.closed.consts))):
            cache[key] = traced
            while len(cache) > CACHE_SIZE:
                cache.popitem(last=False)
    inputs = whole if traced.whole else _Inputs.of(params, args, kwargs, whole=False)
    return traced, inputs.values


def abstract_call(body, params, args, kwargs):
    """Run ``body(params, args, kwargs)`` on shapes only, non-array leaves kept static."""
    leaves, treedef = jax.tree_util.tree_flatten((params, args, kwargs))
    dynamic = [is_array(x) for x in leaves]

    def flat(*arrays):
        it = iter(arrays)
        full = [next(it) if d else x for x, d in zip(leaves, dynamic, strict=True)]
        return body(*jax.tree_util.tree_unflatten(treedef, full))

    return jax.eval_shape(flat, *[x for x, d in zip(leaves, dynamic, strict=True) if d])
