"""Input collection for :func:`jlora.collect_inputs`: the rows each listed kernel meets.

A listed kernel enters without adapters but with ``index``, the position of each of its
fan-in entries (a carried array, so moves keep track of where every entry went). The dot
and conv rules hand their input to :class:`Collector`, this interpreter's record, which
puts each row in the kernel's own fan-in order. Rows recorded inside a ``scan`` or
``checkpoint`` body leave it as extra outputs (``flush``/``absorb``).

Example:
  >>> import jax.numpy as jnp
  >>> c = Collector()
  >>> c.rows["w"].append(jnp.ones((4, 3)))
  >>> c.flush()["w"].shape, dict(c.rows)
  ((4, 3), {})
"""

from __future__ import annotations

import collections
import dataclasses
import math
from collections.abc import Mapping

import jax
import jax.numpy as jnp

from jlora import _paths as paths_lib
from jlora import quantization as quant_lib
from jlora._adapter import Adapter
from jlora._initializers import KernelPlan
from jlora._transform.factored import CATEGORY, Factored
from jlora.layouts import Layout, LayoutError, resolve_layout


@dataclasses.dataclass
class Collector:
    """Per interpreter: ``{path: [rows, ...]}`` recorded so far."""

    rows: dict = dataclasses.field(default_factory=lambda: collections.defaultdict(list))

    def record_dot(self, plan) -> None:
        """The input of a dot over the kernel's fan-in: ``(*batched stacked, N, fan_in)``."""
        fv, x, x_l, w_l = plan.fv, plan.x, plan.x_l, plan.w_l
        stacked_batch = [w_l[k] for k in plan.k_bat]
        fan_in = [w_l[k] for k, r in enumerate(fv.roles) if CATEGORY[r] == "i"]
        rest = [v for v in x_l if v not in stacked_batch and v not in fan_in]
        order = [x_l.index(v) for v in stacked_batch + rest + fan_in]
        xt = jnp.transpose(x, order)
        nb = len(stacked_batch)
        n = math.prod(xt.shape[nb : nb + len(rest)])
        f = math.prod(xt.shape[nb + len(rest) :])
        flat = xt.reshape(*xt.shape[:nb], n, f)
        index = fv.index.reshape(-1, f)[0]  # the same for every stacked slice
        self.rows[fv.meta.path].append(flat[..., jnp.argsort(index)])

    def record_patches(self, eqn, fv: Factored, x) -> None:
        """A conv filter's input patches, as ``(N, window x in)`` rows."""
        p = eqn.params
        dn = p["dimension_numbers"]
        _, rhs_spec, out_spec = dn
        patches = jax.lax.conv_general_dilated_patches(
            x, tuple(fv.w.shape[d] for d in rhs_spec[2:]), p["window_strides"], p["padding"],
            lhs_dilation=p["lhs_dilation"], rhs_dilation=p["rhs_dilation"],
            dimension_numbers=dn, precision=jax.lax.Precision.HIGHEST,  # exact copies
        )
        patches = jnp.moveaxis(patches, out_spec[1], -1)
        # Patch features come as (in, *window in rhs_spec order); put them in W's axis order.
        feature_axes = [rhs_spec[1], *rhs_spec[2:]]
        sizes = [fv.w.shape[d] for d in feature_axes]
        rows = patches.reshape(-1, *sizes)
        order = sorted(range(len(feature_axes)), key=lambda i: feature_axes[i])
        rows = jnp.transpose(rows, [0, *(1 + i for i in order)]).reshape(rows.shape[0], -1)
        self.rows[fv.meta.path].append(rows[:, jnp.argsort(fv.index.reshape(-1))])

    def flush(self) -> dict:
        """One array per path (rows concatenated), then forgotten."""
        out = {k: jnp.concatenate(v, axis=-2) for k, v in self.rows.items()}
        self.rows.clear()
        return out

    def absorb(self, flushed: dict) -> None:
        for k, v in flushed.items():
            self.rows[k].append(v)


def layouts_for(params, paths) -> dict[str, Layout]:
    """``{path: layout}`` of the kernels ``collect_inputs`` was asked for (checked)."""
    flat = paths_lib.select(params, ".*", allow_empty=True)
    if isinstance(paths, str):
        paths = [paths]
    items = paths.items() if isinstance(paths, Mapping) else ((p, None) for p in paths)
    out = {}
    for path, spec in items:
        if path not in flat:
            near = ", ".join(repr(p) for p in paths_lib.nearest_paths(path, flat, n=3))
            raise ValueError(
                f"collect_inputs: path {path!r} is not a leaf of `params`. Closest: {near}."
            )
        shape = tuple(flat[path].shape)
        if isinstance(spec, (Adapter, KernelPlan)):
            spec = spec.layout
        if spec is None and quant_lib.is_quantized(flat[path]):
            layout = flat[path].kernel_layout  # the layout it was quantized with
        elif spec is None:
            try:
                layout = resolve_layout(path, shape)
            except LayoutError as e:
                raise LayoutError(
                    f"collect_inputs: {e} For collect_inputs, pass `paths` as a mapping "
                    f"{{path: layout}}, e.g. {{{path!r}: 'iio'}}."
                ) from None
        else:
            layout = spec if isinstance(spec, Layout) else Layout(spec)
            layout.check_shape(shape, path)
        if layout.kind == "embed":
            raise ValueError(
                f"collect_inputs: the kernel at path {path!r} has layout {layout.axes!r}, an "
                "embedding table: its inputs are ids, not activations. List dense kernels."
            )
        out[path] = layout
    return out
