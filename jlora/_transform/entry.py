"""How a kernel enters the interpreter: its factored value, from its adapter and layout.

Example:
  >>> import jax, jax.numpy as jnp, jlora
  >>> from jlora._transform.interpreter import Run
  >>> params = {"w": jnp.ones((2, 4, 3))}
  >>> ad = jlora.init(jax.random.key(0), params,
  ...                 jlora.LoraConfig(rank=2, targets="w", layouts={"w": "sio"}))["w"]
  >>> fv = enter_kernel("w", params["w"], ad, ad.layout, Run())
  >>> fv.roles, fv.a.shape, fv.b.shape
  ('sio', (2, 4, 2), (2, 2, 3))
"""

from __future__ import annotations

import math

import jax.numpy as jnp

from jlora._adapter import Adapter
from jlora._transform.factored import Factored, Meta, dense
from jlora._variant import get_variant
from jlora.layouts import Layout


def enter_kernel(path: str, w, adapter: Adapter | None, layout: Layout, run) -> Factored:
    """The factored value a kernel ``w`` (an array or a quantized kernel) enters as.

    Without an adapter (:func:`jlora.collect_inputs`) it carries no factors, only
    ``index``, where each fan-in entry went. An ``adapter`` with an
    ``enter_factored(path, w, run)`` method makes its own value (``grouped.py``).
    """
    stacked = layout.split_shape(w.shape)[0]  # wherever the stacked axes are in W
    if adapter is None:
        fan_in = [w.shape[k] for k in layout.fan_in_axes]
        index = jnp.arange(math.prod(fan_in), dtype=jnp.int32).reshape(fan_in)
        index = jnp.broadcast_to(index, stacked + tuple(fan_in))
        meta = Meta(path, layout.axes, w.dtype, 1.0)
        return Factored(w, None, None, None, None, index, meta=meta)
    enter = getattr(adapter, "enter_factored", None)
    if enter is not None:  # an extension's adapter (a bank's factors for grouped batches)
        return enter(path, w, run)
    variant = get_variant(adapter.variant)
    variant.check(adapter, path)  # e.g. a DoRA adapter without its magnitude
    # The per-output factor of a variant that rescales its output (DoRA's m / ||W'||),
    # carried as `m` through the moves like the factors.
    m = variant.output_factor(dense(w), adapter) if variant.rescales_output else None
    # PEFT's Embedding LoRA has no dropout: its inputs are ids, not activations.
    rate = float(adapter.dropout) if layout.kind != "embed" else 0.0
    keys = run.dropout.enter(path, rate, stacked)
    meta = Meta(path, layout.axes, w.dtype, float(adapter.scale), adapter.variant)
    return Factored(w, adapter.a, adapter.b, m, keys, None, meta=meta)
