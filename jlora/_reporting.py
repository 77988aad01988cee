"""`jlora.summary`: a readable table of what is adapted and what it costs."""

from __future__ import annotations

import math

from jlora import _paths as paths_lib
from jlora._adapter import Adapters
from jlora._merging import check_adapters_fit

__all__ = ["summary"]


def _count(tree) -> int:
    # Path leaves, not array leaves: a quantized kernel counts as its float kernel's size,
    # not as its packed storage.
    leaves = paths_lib.select(tree, ".*", allow_empty=True).values()
    return sum(math.prod(getattr(x, "shape", ())) for x in leaves)


def summary(params, adapters: Adapters) -> str:
    """A table of adapted kernels and the trainable share of all parameters.

    One row per kernel: path, kernel shape, layout, rank, alpha, policy, scale and
    the adapter's parameter count; then the totals, as PEFT's
    ``print_trainable_parameters`` gives them (all params include the adapters).

    Example:
      >>> import jax, jax.numpy as jnp, jlora
      >>> params = {"dense": {"kernel": jnp.ones((64, 64))}}
      >>> ads = jlora.init(jax.random.key(0), params, jlora.LoraConfig(rank=4))
      >>> print(jlora.summary(params, ads).splitlines()[-1])
      trainable params: 512 || all params: 4,608 || trainable%: 11.1111
    """
    check_adapters_fit(params, adapters)
    header = ("path", "kernel shape", "layout", "rank", "alpha", "policy", "scale", "params")
    rows = []
    for path, ad in adapters.items():
        rows.append((
            path, "x".join(map(str, ad.kernel_shape)), ad.layout.axes, str(ad.rank),
            f"{ad.alpha:g}", ad.policy + ("" if ad.variant == "lora" else f"+{ad.variant}"),
            f"{ad.scale:.4g}", f"{ad.num_params:,}",
        ))
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    numeric = {3, 4, 6, 7}

    def fmt(row):
        return "  ".join(
            cell.rjust(w) if i in numeric else cell.ljust(w)
            for i, (cell, w) in enumerate(zip(row, widths, strict=True))
        ).rstrip()

    trainable = _count(adapters)
    total = _count(params) + trainable
    lines = [fmt(header), "  ".join("-" * w for w in widths), *map(fmt, rows), ""]
    lines.append(
        f"trainable params: {trainable:,} || all params: {total:,} || "
        f"trainable%: {100.0 * trainable / max(total, 1):.4f}"
    )
    return "\n".join(lines)
