"""The factored value: one view of an adapted kernel, ``W + s·A·B``, never formed.

Every array carried next to W indexes some of W's axes. Its axes come in category blocks
(``s`` stacked, ``i`` fan-in, ``o`` fan-out, ``r`` rank), each block in W's current
axis order::

    a (s, i, r)   b (s, r, o)   m (s, o) DoRA multiplier   keys (s) dropout   index (s, i)

so a move of W (transpose, reshape, slice, ...) is the same move on each block, and a
kernel whose stacked axes are not leading needs nothing special here. W itself may be a
float array or, for a quantized base, the :class:`~jlora.quantization.QuantizedKernel`
(a *lazy* W: dequantized only where a consumer reads it, see :func:`bind_with_kernel`).

Example:
  >>> import jax.numpy as jnp
  >>> from jlora._transform.factored import Factored, Meta, merged_view
  >>> fv = Factored(jnp.zeros((3, 2)), jnp.ones((3, 1)), jnp.ones((1, 2)), None, None, None,
  ...               meta=Meta("w", "io", jnp.float32, 0.5))
  >>> merged_view(fv).tolist()
  [[0.5, 0.5], [0.5, 0.5], [0.5, 0.5]]
"""

from __future__ import annotations

import collections
import dataclasses
import string
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from jlora import _jax_compat as jc
from jlora import quantization as quant_lib
from jlora._variant import get_variant

CATEGORY = {"s": "s", "w": "i", "i": "i", "v": "i", "o": "o", "f": "o"}
FIELDS = {"a": "sir", "b": "sro", "m": "so", "keys": "s", "index": "si"}
LETTERS = string.ascii_letters


class Unsupported(Exception):  # noqa: N818 - internal signal, never escapes the transform
    """A rule cannot keep the kernel factored here; the reason goes into the report."""


@dataclasses.dataclass(frozen=True)
class Meta:
    """What a factored value knows statically (the pytree's auxiliary data)."""

    path: str
    roles: str  # one layout letter per axis of the current view of W
    dtype: Any  # the dtype the program sees; W itself stays in its parameter dtype
    scale: float
    variant: str = "lora"  # the adapter's jlora._variant.Variant, which combines outputs


@jax.tree_util.register_pytree_node_class
class Factored:
    """One view of an adapted kernel: ``W + s·A·B`` (times DoRA's ``m``), never formed.

    ``a``/``b`` are None for a kernel entered without adapters (a quantized kernel kept
    lazy, or one whose inputs :func:`jlora.collect_inputs` records through ``index``).
    """

    def __init__(self, w, a, b, m, keys, index, *, meta: Meta):
        self.w, self.a, self.b, self.m, self.keys, self.index = w, a, b, m, keys, index
        self.meta = meta

    def tree_flatten(self):
        return (self.w, self.a, self.b, self.m, self.keys, self.index), self.meta

    @classmethod
    def tree_unflatten(cls, meta, children):
        return cls(*children, meta=meta)

    @property
    def roles(self) -> str:
        return self.meta.roles

    @property
    def adapted(self) -> bool:
        return self.a is not None

    @property
    def lazy(self) -> bool:
        """W is still quantized: read it only through :func:`bind_with_kernel`."""
        return is_lazy(self.w)

    def carried(self) -> dict[str, Any]:
        return {f: getattr(self, f) for f in FIELDS if getattr(self, f) is not None}

    def replace(self, w, roles: str | None = None, dtype=None, **carried) -> Factored:
        fields = {f: getattr(self, f) for f in FIELDS}
        fields.update(carried)
        meta = dataclasses.replace(
            self.meta,
            roles=self.roles if roles is None else roles,
            dtype=self.meta.dtype if dtype is None else dtype,
        )
        return type(self)(w, **fields, meta=meta)

    def materialise(self, run, reason: str):
        """The array the program sees here: ``W + s·A·B`` as ``merge`` forms it; ``run``
        (the interpreter's ``Run``) reports ``reason`` for an adapted kernel."""
        if self.adapted:
            run.mark(self.meta.path, reason)
        return merged_view(self)


def is_lazy(w) -> bool:
    """W is not an array yet but has ``dequantized()``: a quantized kernel, or a move of
    one still to be done (``quantized.View``)."""
    return quant_lib.is_quantized(w) or callable(getattr(type(w), "dequantized", None))


def dense(w):
    """W as a float array (a quantized W is dequantized here)."""
    return w.dequantized() if is_lazy(w) else w


def positions(roles: str, field: str) -> list[int | None]:
    """For each axis of W: its axis in the carried array ``field`` (None if absent)."""
    blocks = FIELDS[field]
    counts = {c: sum(CATEGORY[r] == c for r in roles) for c in "sio"}
    counts["r"] = 1
    offset, start = 0, {}
    for c in blocks:
        start[c] = offset
        offset += counts[c]
    seen = collections.Counter()
    out = []
    for r in roles:
        c = CATEGORY[r]
        out.append(start[c] + seen[c] if c in blocks else None)
        seen[c] += 1
    return out


def rank_position(roles: str, field: str) -> int | None:
    """The rank axis of the carried array ``field`` (None if it has none)."""
    blocks = FIELDS[field]
    if "r" not in blocks:
        return None
    return sum(sum(CATEGORY[r] == c for r in roles) for c in blocks[: blocks.index("r")])


def field_letters(roles: str, field: str, w_letters: Sequence[str], r_letter: str) -> str:
    """Einsum letters of the carried array ``field``, given W's letters and the rank's."""
    pos = positions(roles, field)
    n = sum(p is not None for p in pos) + ("r" in FIELDS[field])
    out = [""] * n
    for k, p in enumerate(pos):
        if p is not None:
            out[p] = w_letters[k]
    rp = rank_position(roles, field)
    if rp is not None:
        out[rp] = r_letter
    return "".join(out)


def align(x, x_letters: str, out_letters: str):
    """``x`` transposed and expanded so that it broadcasts against ``out_letters``."""
    order = sorted(range(len(x_letters)), key=lambda i: out_letters.index(x_letters[i]))
    x = jnp.transpose(x, order)
    shape = [1] * len(out_letters)
    for i in order:
        shape[out_letters.index(x_letters[i])] = x.shape[order.index(i)]
    return jnp.reshape(x, shape)


def merged_view(fv: Factored):
    """``W + s·A·B`` (DoRA: times ``m``) for this view, as ``merge`` computes it."""
    w = dense(fv.w)
    if not fv.adapted:
        return w.astype(fv.meta.dtype)
    letters = LETTERS[: len(fv.roles) + 1]
    w_l, r_l = letters[:-1], letters[-1]
    a_l = field_letters(fv.roles, "a", w_l, r_l)
    b_l = field_letters(fv.roles, "b", w_l, r_l)
    product = jnp.einsum(
        f"{a_l},{b_l}->{w_l}", fv.a.astype(jnp.float32), fv.b.astype(jnp.float32),
        precision=jax.lax.Precision.HIGHEST,
    )
    merged = w.astype(jnp.float32) + fv.meta.scale * product
    if fv.m is not None:
        merged = merged * align(fv.m, field_letters(fv.roles, "m", w_l, r_l), w_l)
    return merged.astype(w.dtype).astype(fv.meta.dtype)


def bind_with_kernel(eqn, fv: Factored, ops: list, k: int) -> list:
    """``eqn`` on ``ops`` with ``fv``'s kernel W (in the program's dtype) as operand ``k``.

    A quantized W is dequantized right here, inside ``jax.checkpoint``: the backward pass
    dequantizes it again instead of keeping the float kernel as a residual, so neither a
    whole float kernel per layer of a stack nor one per layer of the model is kept.
    """
    others = [x for i, x in enumerate(ops) if i != k]

    def product(w, *others):
        w = dense(w).astype(fv.meta.dtype)
        return jc.bind_eqn(eqn, [*others[:k], w, *others[k:]])

    if not fv.lazy:
        return product(fv.w, *others)
    return jax.checkpoint(product)(fv.w, *others)


def combine(fv: Factored, base, branch, factor, dropped):
    """A consumer's output from ``base`` (with W) and ``branch`` (the scaled A·B path), as
    ``fv``'s variant combines them: LoRA ``base + branch``; a variant that rescales its
    output (DoRA) gets ``factor`` (its ``output_factor`` broadcast against the output) and,
    with dropout active, ``dropped`` (the base on the dropped input). See
    :class:`jlora._variant.Variant`."""
    return get_variant(fv.meta.variant).combine(base, branch, factor, dropped)
