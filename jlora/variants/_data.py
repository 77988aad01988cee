"""Layer inputs for the data-driven inits (EVA, CorDA): given, or collected per batch.

The data arrives in one of two forms:

* ``inputs``: precomputed activations, either one mapping ``{kernel path: array}`` (one
  batch) or an iterable of such mappings (one per batch). Each array is ``(N, fan_in)``,
  the fan-in axes flattened in the kernel's own order (the rows of its matrix view);
  arrays with more axes are flattened to rows over all but the last axis, as PEFT does
  (``(batch, seq, fan_in)`` becomes ``(batch·seq, fan_in)``).
* ``fn`` and ``batches``: ``fn(params, batch)`` is run once per batch and the input of
  every targeted kernel's contraction is read off its trace by
  ``jlora.collect_inputs(fn, params, paths, batch)`` (provided by the factored
  transform, which sees every dot a kernel enters).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping

import jax.numpy as jnp

from jlora import _paths as paths_lib
from jlora._initializers import KernelPlan
from jlora._transform.api import collect_inputs


def fan_in_sizes(planned: Mapping[str, KernelPlan]) -> dict[str, int]:
    """``{path: fan-in size}`` of :func:`jlora.plan` entries (window x in for a conv)."""
    return {p: math.prod(e.layout.split_shape(e.shape)[1]) for p, e in planned.items()}


def input_batches(
    params, planned: Mapping[str, KernelPlan], *, inputs=None, fn=None, batches=None, init_name: str
) -> Iterator[dict]:
    """Yield one ``{path: (N, fan_in) float32}`` per batch for the paths of ``planned``."""
    fan_in = fan_in_sizes(planned)
    if (inputs is None) == (fn is None and batches is None):
        raise ValueError(
            f"`init={init_name!r}` needs layer inputs: pass either `inputs=` (a mapping "
            "{path: (N, fan_in) array} or an iterable of them, one per batch) or both `fn=` "
            "and `batches=` (fn(params, batch) is run once per batch), not both."
        )
    if inputs is None:
        if fn is None or batches is None:
            missing = "`fn`" if fn is None else "`batches`"
            raise ValueError(
                f"`init={init_name!r}`: {missing} is missing; give both `fn` and `batches`."
            )
        if not callable(fn):
            raise TypeError(
                f"`fn` must be callable as fn(params, batch), got {type(fn).__name__}."
            )
        # Plan entries carry each kernel's layout, so configured layouts are respected.
        raw = (collect_inputs(fn, params, dict(planned), batch) for batch in batches)
    elif isinstance(inputs, Mapping):
        raw = iter([inputs])
    elif isinstance(inputs, Iterable) and not isinstance(inputs, str):
        raw = iter(inputs)
    else:
        raise TypeError(
            "`inputs` must be a mapping {path: (N, fan_in) array} or an iterable of such "
            f"mappings, got {type(inputs).__name__}."
        )
    for i, batch in enumerate(raw):
        yield _check_batch(batch, fan_in, i, init_name)


def _check_batch(batch, fan_in: Mapping[str, int], index: int, init_name: str) -> dict:
    if not isinstance(batch, Mapping):
        raise TypeError(
            f"Layer inputs for batch {index} must be a mapping {{path: (N, fan_in) array}}, "
            f"got {type(batch).__name__}."
        )
    out = {}
    for path, size in fan_in.items():
        if path not in batch:
            near = paths_lib.nearest_paths(path, list(batch), n=3)
            raise ValueError(
                f"Layer inputs for batch {index} lack the targeted kernel at path {path!r}"
                + (f" (closest given: {near})" if near else "")
                + "."
            )
        x = jnp.asarray(batch[path])
        if x.ndim < 2 or x.shape[-1] != size or not jnp.issubdtype(x.dtype, jnp.floating):
            raise ValueError(
                f"Layer inputs at path {path!r} (batch {index}) have shape {tuple(x.shape)} "
                f"and dtype {x.dtype}: expected a floating array (..., {size}), the kernel's "
                "fan-in size (window x in for a conv) on the last axis."
            )
        out[path] = x.reshape(math.prod(x.shape[:-1]), size).astype(jnp.float32)
    extra = [p for p in batch if p not in fan_in]
    if extra:
        raise ValueError(
            f"Layer inputs for batch {index} have entries for paths {extra} that "
            f"`init={init_name!r}` does not adapt; expected exactly the targeted paths "
            f"{sorted(fan_in)}."
        )
    return out
