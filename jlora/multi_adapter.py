"""Several adapters on one base: named sets, switching without recompiling, one adapter
per example in a batch (padded, or grouped at each adapter's own rank), and PEFT's
``add_weighted_adapter``.

An :class:`AdapterBank` stacks named adapter sets along a new leading axis (ranks padded
with zeros to the largest, scales folded into ``B`` where they differ, so every set has
the same shapes and static fields). Because adapters are *arguments* of a jitted
function, not constants:

* ``bank.select("name")`` (or an index, even a traced one) gives an ordinary adapters
  dict, and switching the active set reuses the compiled function;
* :func:`per_example` runs ``jlora.lora(fn)`` with each example's own adapter, the
  factors gathered per example (``bank.gather(ids)``), as multi-tenant serving needs:
  the frozen base is shared, ``x·W`` is one matmul for the whole batch, and only the
  rank-``r`` products are batched per example.

A :class:`GroupedBank` (:func:`grouped_bank`) keeps each set in a slot at its own rank;
:func:`grouped` runs a batch sorted by slot with each adapter's products over its own
examples only (ragged products; see ``docs/multi_adapter.md`` for when it beats
:func:`per_example`), differentiable for every slot at once.

:func:`add_weighted_adapter` combines adapters as PEFT's method of the same name does:
``"linear"`` (same ranks), ``"cat"`` (ranks add) and ``"svd"`` (back to a chosen rank).

Example:
  >>> import jax, jax.numpy as jnp, jlora
  >>> params = {"d": {"kernel": jnp.ones((4, 3))}}
  >>> sets = {n: jlora.init(jax.random.key(i), params, jlora.LoraConfig(rank=r))
  ...         for i, (n, r) in enumerate([("fr", 1), ("de", 2)])}
  >>> bank = jlora.multi_adapter.stack_adapters(sets)
  >>> bank.names, bank.select("fr")["d/kernel"].rank
  (('fr', 'de'), 2)
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jlora._adapter import Adapter, Adapters
from jlora._grouped_adapters import GroupedBank as GroupedBank
from jlora._grouped_adapters import Grouping as Grouping
from jlora._grouped_adapters import grouped as grouped
from jlora._grouped_adapters import grouped_bank as grouped_bank
from jlora._grouped_adapters import pad_rank
from jlora._transform.api import lora
from jlora._variant import get_variant

__all__ = ["AdapterBank", "GroupedBank", "Grouping", "add_weighted_adapter", "grouped",
           "grouped_bank", "per_example", "stack_adapters"]

COMBINATIONS = ("linear", "cat", "svd")


@dataclasses.dataclass(frozen=True)
class AdapterBank:
    """Named adapter sets stacked along a leading axis: ``{path: Adapter}`` whose arrays
    have one more axis (the set) in front. Build it with :func:`stack_adapters`.

    Attributes:
      adapters: ``{path: Adapter}``; ``a`` is ``(sets, *stacked, *fan_in, rank)`` etc.
      names: the name of each set, in stacking order (static).

    Example:
      >>> import jax, jax.numpy as jnp, jlora
      >>> params = {"d": {"kernel": jnp.ones((8, 4))}}
      >>> sets = {n: jlora.init(jax.random.key(i), params, jlora.LoraConfig(rank=2))
      ...         for i, n in enumerate(["fr", "de"])}
      >>> bank = jlora.multi_adapter.stack_adapters(sets)
      >>> bank.names, bank.select("de")["d/kernel"].a.shape
      (('fr', 'de'), (8, 2))
    """

    adapters: dict
    names: tuple[str, ...] = dataclasses.field(default=(), metadata={"static": True})

    def __len__(self) -> int:
        return len(self.names)

    def index(self, name: str) -> int:
        """The position of the set called ``name``."""
        if name not in self.names:
            raise KeyError(f"No adapter set named {name!r}; the bank holds {list(self.names)}.")
        return self.names.index(name)

    def ids(self, names: Sequence[str]) -> jax.Array:
        """int32 positions of ``names``: the ``ids`` argument of :func:`per_example`."""
        return jnp.asarray([self.index(n) for n in names], jnp.int32)

    def select(self, which) -> Adapters:
        """The adapters of one set: ``which`` is a name, an int or a traced int32 scalar.

        Selecting inside ``jax.jit`` with a traced index switches sets without retracing.
        """
        if isinstance(which, str):
            which = self.index(which)
        elif isinstance(which, int | np.integer) and not -len(self) <= which < len(self):
            raise IndexError(f"Adapter set index {which} is out of range for {len(self)} sets.")
        return jax.tree.map(lambda t: t[which], self.adapters)

    def gather(self, ids) -> Adapters:
        """Per-example adapters: every array gets a leading axis of ``len(ids)``."""
        ids = jnp.asarray(ids)
        return jax.tree.map(lambda t: jnp.take(t, ids, axis=0), self.adapters)


jax.tree_util.register_dataclass(AdapterBank, data_fields=["adapters"], meta_fields=["names"])


def stack_adapters(named: Mapping[str, Adapters]) -> AdapterBank:
    """Stack named adapter sets of one model into an :class:`AdapterBank`.

    Sets may adapt different kernels and use different ranks and scales: a kernel that
    a set does not adapt gets zero factors (no update), ranks are padded with zeros to
    the largest, and where the scales differ each is folded into its ``B`` (the update
    ``s·A·B`` is unchanged). Layouts, kernel shapes, variant and dropout must agree per
    kernel.

    Example:
      >>> import jax, jax.numpy as jnp, jlora
      >>> p = {"w": jnp.ones((4, 3))}
      >>> a1 = jlora.init(jax.random.key(0), p, jlora.LoraConfig(rank=1, targets="w"))
      >>> bank = stack_adapters({"x": a1, "y": a1})
      >>> bank.adapters["w"].a.shape
      (2, 4, 1)
    """
    if not isinstance(named, Mapping) or not named:
        raise TypeError("`named` must be a non-empty mapping {name: adapters}, got "
                        f"{type(named).__name__}.")
    names = tuple(named)
    if not all(isinstance(n, str) for n in names):
        raise TypeError(f"Adapter set names must be strings, got {list(names)}.")
    paths = list(dict.fromkeys(p for ads in named.values() for p in ads))
    stacked = {}
    for path in paths:
        present = {n: ads[path] for n, ads in named.items() if path in ads}
        ref_name, ref = next(iter(present.items()))
        for n, ad in present.items():
            if not isinstance(ad, Adapter):
                raise TypeError(f"`named[{n!r}][{path!r}]` must be a jlora Adapter, got "
                                f"{type(ad).__name__}.")
            for field in ("layout", "kernel_shape", "variant", "dropout"):
                if getattr(ad, field) != getattr(ref, field):
                    raise ValueError(
                        f"Adapter sets {ref_name!r} and {n!r} disagree on the {field} of the "
                        f"kernel at path {path!r}: {getattr(ref, field)!r} vs "
                        f"{getattr(ad, field)!r}. Stacked sets must adapt it the same way."
                    )
        extra = get_variant(ref.variant).extra_shapes(ref.layout, ref.kernel_shape)
        if len(present) < len(named) and extra:
            missing = [n for n in names if n not in present]
            raise ValueError(
                f"Adapter sets {missing} have no {ref.variant} adapter for the kernel at path "
                f"{path!r}: its {sorted(extra)} cannot be made up (zero factors are not a "
                "no-op for it), so every set must adapt it."
            )
        rank = max(ad.rank for ad in present.values())
        # One static (scale, alpha, policy) per stacked kernel: fold where the sets differ
        # (equal scales from different alphas, rank 8 alpha 16 and rank 16 alpha 32, too).
        fold = len({(ad.scale, ad.alpha, ad.policy) for ad in present.values()}) > 1
        dtype = jnp.result_type(*[ad.a.dtype for ad in present.values()])
        padded = []
        for n in names:
            ad = present.get(n)
            if ad is None:  # no update: zero factors
                ad = ref.replace(a=jnp.zeros_like(ref.a), b=jnp.zeros_like(ref.b))
            padded.append(pad_rank(ad, rank, fold))
        stacked[path] = jax.tree.map(
            lambda *xs, dtype=dtype: jnp.stack([x.astype(dtype) for x in xs]), *padded
        )
    return AdapterBank(stacked, names)


def per_example(fn: Callable, *, deterministic: bool | None = None) -> Callable:
    """``jlora.lora(fn)`` with one adapter set per example of the batch.

    Returns ``h(params, bank, ids, *args, **kwargs)``: example ``k`` (index ``k`` of the
    leading axis of every array in ``args``) is computed with ``bank.select(ids[k])``,
    as ``fn`` would on a batch of that one example; outputs are stacked back along the
    leading axis (``fn``'s outputs must keep the batch axis). ``kwargs`` go unbatched to
    every example. The frozen base is shared: ``x·W`` stays one matmul for the batch
    and only the rank-``r`` products use the gathered factors.

    Example:
      >>> import jax, jax.numpy as jnp, jlora
      >>> p = {"w": jnp.ones((4, 3))}
      >>> a = jlora.init(jax.random.key(0), p, jlora.LoraConfig(rank=1, targets="w"))
      >>> bank = stack_adapters({"x": a, "y": a})
      >>> h = per_example(lambda p, x: x @ p["w"])
      >>> h(p, bank, jnp.array([0, 1, 1]), jnp.ones((3, 4))).shape
      (3, 3)
    """
    g = lora(fn, deterministic=deterministic)

    def h(params, bank: AdapterBank, ids, *args, **kwargs):
        if not isinstance(bank, AdapterBank):
            raise TypeError("`bank` must be a jlora.multi_adapter.AdapterBank "
                            f"(stack_adapters(...)), got {type(bank).__name__}.")
        ids = jnp.asarray(ids)
        if ids.ndim != 1 or not jnp.issubdtype(ids.dtype, jnp.integer):
            raise ValueError(f"`ids` must be a 1-D integer array (one set per example), got "
                             f"shape {ids.shape} and dtype {ids.dtype}.")
        for kp, leaf in jax.tree_util.tree_flatten_with_path(args)[0]:
            if np.ndim(leaf) == 0 or np.shape(leaf)[0] != ids.shape[0]:
                raise ValueError(
                    f"Every array in `args` needs the batch axis first, of size len(ids) = "
                    f"{ids.shape[0]}; args{jax.tree_util.keystr(kp)} has shape "
                    f"{np.shape(leaf)}. Pass unbatched inputs as keyword arguments."
                )

        def one(adapters, *xs):
            xs = jax.tree.map(lambda t: t[None], xs)
            return jax.tree.map(lambda t: t[0], g(params, adapters, *xs, **kwargs))

        return jax.vmap(one)(bank.gather(ids), *args)

    return h


def _weighted_linear(present, weights, path):
    ranks = {ad.rank for ad in present}
    if len(ranks) != 1:
        raise ValueError(
            f"combination_type='linear' needs adapters of the same rank, but the kernel at "
            f"path {path!r} has ranks {sorted(ranks)}. Use 'cat' or 'svd'."
        )
    a = jnp.zeros(present[0].a.shape, jnp.float32)
    b = jnp.zeros(present[0].b.shape, jnp.float32)
    for ad, w in zip(present, weights, strict=True):
        ws = w * ad.scale
        # PEFT: sqrt(|w·s|) on both factors, the sign on A only.
        a = a + math.copysign(math.sqrt(abs(ws)), ws) * ad.a.astype(jnp.float32)
        b = b + math.sqrt(abs(ws)) * ad.b.astype(jnp.float32)
    return a, b


def _weighted_cat(present, weights):
    ns = present[0].layout.num_stacked  # B's rank axis follows its (leading) stacked axes
    a = jnp.concatenate([w * ad.scale * ad.a.astype(jnp.float32)
                         for ad, w in zip(present, weights, strict=True)], axis=-1)
    b = jnp.concatenate([ad.b.astype(jnp.float32) for ad in present], axis=ns)
    return a, b


def _weighted_svd(present, weights, path, rank, clamp):
    ref = present[0]
    lay, shape = ref.layout, ref.kernel_shape
    stacked, fan_in, fan_out = lay.split_shape(shape)
    rank = rank or max(ad.rank for ad in present)
    if not isinstance(rank, int) or rank < 1 or rank > min(math.prod(fan_in), math.prod(fan_out)):
        raise ValueError(
            f"`rank` {rank!r} for the kernel at path {path!r} with shape {shape}: expected an "
            f"int in [1, {min(math.prod(fan_in), math.prod(fan_out))}] (min(fan-in, fan-out))."
        )
    delta = sum(w * ad.delta() for ad, w in zip(present, weights, strict=True))
    m = lay.to_matrix(delta)  # (*stacked, fan-in, fan-out), whatever the kernel's axis order
    u, s, vh = jnp.linalg.svd(m, full_matrices=False)
    # As PEFT: the singular values go with B (PEFT's lora_B = U·S in torch's (out, in)).
    a = u[..., :rank]
    b = s[..., :rank, None] * vh[..., :rank, :]
    if clamp is not None:
        hi = jnp.quantile(jnp.concatenate([b.ravel(), a.ravel()]), clamp)
        a, b = jnp.clip(a, -hi, hi), jnp.clip(b, -hi, hi)
    return lay.factors_from_matrices(a, b, shape)


def add_weighted_adapter(adapters, weights: Sequence[float], combination_type: str = "svd",
                         *, rank: int | None = None, clamp: float | None = None) -> Adapters:
    """One adapter set combining several, as PEFT's ``add_weighted_adapter``.

    Per kernel, over the sets that adapt it (with ``s_i`` each adapter's scale):

    * ``"linear"``: ``A = Σ sign(w_i)·sqrt(|w_i s_i|)·A_i``, ``B = Σ sqrt(|w_i s_i|)·B_i``
      (PEFT's formula: factors are combined, so cross terms ``A_i·B_j`` appear); all
      ranks must be equal.
    * ``"cat"``: ``A = [w_1 s_1 A_1, w_2 s_2 A_2, ...]``, ``B = [B_1; B_2; ...]``: exactly
      ``Σ w_i s_i A_i·B_i``, of rank ``Σ r_i``.
    * ``"svd"``: the rank-``rank`` truncated SVD of ``Σ w_i s_i A_i·B_i`` (default rank:
      the largest input rank), per stacked layer, with ``A`` orthonormal and the
      singular values in ``B``; ``clamp`` clips both factors at that quantile of their
      entries (PEFT's ``svd_clamp``).

    The new adapters have ``scale = 1`` (``alpha = rank``, standard policy): the input
    scales are inside the factors. (PEFT copies ``use_rslora`` to the new adapter, which
    then scales it by ``sqrt(rank)``; jlora does not.) DoRA adapters cannot be combined.

    Args:
      adapters: a sequence of adapter sets, or a mapping ``{name: adapter set}``.
      weights: one float per set.
      combination_type: ``"linear"``, ``"cat"`` or ``"svd"``.
      rank: ``"svd"`` only: the rank of the result.
      clamp: ``"svd"`` only: quantile in (0, 1] to clip the factors at.

    Returns:
      ``{path: Adapter}`` for every kernel any set adapts, factors in the first set's dtype.

    Example:
      >>> import jax, jax.numpy as jnp, jlora
      >>> p = {"w": jnp.ones((6, 5))}
      >>> a1 = jlora.init(jax.random.key(0), p, jlora.LoraConfig(rank=2, targets="w"))
      >>> a2 = jlora.init(jax.random.key(1), p, jlora.LoraConfig(rank=3, targets="w"))
      >>> add_weighted_adapter([a1, a2], [1.0, 0.5], "cat")["w"].rank
      5
    """
    sets = list(adapters.values()) if isinstance(adapters, Mapping) else list(adapters)
    weights = [float(w) for w in weights]
    if not sets:
        raise ValueError("`adapters` is empty: expected at least one adapter set.")
    if len(weights) != len(sets):
        raise ValueError(f"`weights` has {len(weights)} entries for {len(sets)} adapter sets: "
                         "expected one weight per set.")
    if combination_type not in COMBINATIONS:
        raise ValueError(f"`combination_type` must be one of {COMBINATIONS}, got "
                         f"{combination_type!r}.")
    if combination_type != "svd" and (rank is not None or clamp is not None):
        raise ValueError("`rank` and `clamp` apply to combination_type='svd' only; "
                         f"got combination_type={combination_type!r}.")
    if clamp is not None and not 0.0 < clamp <= 1.0:
        raise ValueError(f"`clamp` must be a quantile in (0, 1], got {clamp!r}.")
    out = {}
    for path in dict.fromkeys(p for ads in sets for p in ads):
        pairs = [(ads[path], w) for ads, w in zip(sets, weights, strict=True) if path in ads]
        present, ws = [ad for ad, _ in pairs], [w for _, w in pairs]
        ref = present[0]
        for ad in present:
            if ad.variant != "lora":
                raise ValueError(f"The adapter at path {path!r} is a {ad.variant!r} adapter: "
                                 "only plain LoRA factors can be combined.")
            if (ad.layout, ad.kernel_shape) != (ref.layout, ref.kernel_shape):
                raise ValueError(
                    f"The adapters at path {path!r} do not fit the same kernel: layout "
                    f"{ref.layout.axes!r} shape {ref.kernel_shape} vs layout "
                    f"{ad.layout.axes!r} shape {ad.kernel_shape}."
                )
        if combination_type == "linear":
            a, b = _weighted_linear(present, ws, path)
        elif combination_type == "cat":
            a, b = _weighted_cat(present, ws)
        else:
            a, b = _weighted_svd(present, ws, path, rank, clamp)
        new_rank = a.shape[-1]
        out[path] = Adapter(
            a=a.astype(ref.a.dtype), b=b.astype(ref.b.dtype), layout=ref.layout,
            rank=new_rank, alpha=float(new_rank), scale=1.0, policy="standard",
            variant="lora", dropout=ref.dropout,
        )
    return out
