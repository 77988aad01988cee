"""Grouped batches: many adapters, each at its own rank, in one batch (re-exported by
``jlora.multi_adapter``).

A :class:`GroupedBank` holds named adapter sets in *slots*. Each slot keeps its own
arrays, rank and scale (no padding to the largest rank), so a slot is an ordinary
``{path: Adapter}`` dict: a train step differentiates the whole bank and an optimizer can
treat each slot separately (``optax.partition`` with :meth:`GroupedBank.labels`). The
slots are fixed: :meth:`GroupedBank.put` swaps another adapter set into a slot (a
smaller rank zero-padded, another scale folded into ``B``) and :meth:`GroupedBank.clear`
empties one, both without changing any shape, so a compiled step is reused.

:func:`grouped` runs a model with every example on its slot's adapters: examples sorted
by slot (:meth:`GroupedBank.group` sorts them), ``group_sizes[k]`` examples for slot
``k`` in bank order, then examples without an adapter. Each adapted ``x·W`` stays one
matmul for the batch, and the adapters' products are ragged products over the examples
of each slot (:mod:`jlora._grouped_ops`), where each row meets only its own adapter's
rank and rows without an adapter meet none.

Example:
  >>> import jax, jax.numpy as jnp, jlora
  >>> params = {"w": jnp.ones((8, 6))}
  >>> sets = {n: jlora.init(jax.random.key(i), params, jlora.LoraConfig(rank=r, targets="w"))
  ...         for i, (n, r) in enumerate([("small", 1), ("big", 4)])}
  >>> bank = grouped_bank(sets)
  >>> bank.names, bank.ranks
  (('big', 'small'), {'big': 4, 'small': 1})
"""

from __future__ import annotations

import collections
import dataclasses
import functools
from collections.abc import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jlora import _jax_compat as jc
from jlora._adapter import Adapter, Adapters
from jlora._merging import check_adapters_fit
from jlora._tracing import CACHE_SIZE, trace
from jlora._transform.api import check_guesses, evaluate
from jlora._transform.grouped import GroupedEntry, GroupedRun

__all__ = ["GroupedBank", "Grouping", "grouped", "grouped_bank", "pad_rank"]


def pad_rank(adapter: Adapter, rank: int, fold_scale: bool) -> Adapter:
    """The same update at ``rank`` (zero columns of A, zero rows of B), scale folded
    into B when asked (then ``scale = 1``).

    Example:
      >>> import jax, jax.numpy as jnp, jlora
      >>> ad = jlora.init(jax.random.key(0), {"w": jnp.ones((4, 3))},
      ...                 jlora.LoraConfig(rank=1, targets="w"))["w"]
      >>> pad_rank(ad, 3, fold_scale=False).a.shape
      (4, 3)
    """
    ns = adapter.layout.num_stacked  # factors lead with the stacked axes, whatever the kernel
    extra = rank - adapter.rank
    a = jnp.pad(adapter.a, [(0, 0)] * (adapter.a.ndim - 1) + [(0, extra)])
    b = adapter.b
    if fold_scale:
        b = (b.astype(jnp.float32) * adapter.scale).astype(b.dtype)
    b = jnp.pad(b, [(0, 0)] * ns + [(0, extra)] + [(0, 0)] * (b.ndim - ns - 1))
    if not fold_scale:
        return adapter.replace(a=a, b=b, rank=rank)
    return adapter.replace(a=a, b=b, rank=rank, alpha=float(rank), scale=1.0,
                           policy="standard")


@dataclasses.dataclass(frozen=True)
class Grouping:
    """How to put a batch in bank order and back: ``order`` (example indices, sorted by
    slot, examples without an adapter last) and ``group_sizes`` (examples per slot).

    Example:
      >>> g = Grouping(jnp.array([2, 0, 1]), jnp.array([1, 1]))
      >>> g.sort(jnp.array([10, 20, 30])).tolist(), g.unsort(jnp.array([1, 2, 3])).tolist()
      ([30, 10, 20], [2, 3, 1])
    """

    order: jax.Array
    group_sizes: jax.Array

    def sort(self, tree):
        """Every array of ``tree`` (batch axis first) in grouped order."""
        return jax.tree.map(lambda t: jnp.take(t, self.order, axis=0), tree)

    def unsort(self, tree):
        """Back to the original order (the inverse of :meth:`sort`)."""
        inverse = jnp.argsort(self.order)
        return jax.tree.map(lambda t: jnp.take(t, inverse, axis=0), tree)


jax.tree_util.register_dataclass(Grouping, data_fields=["order", "group_sizes"],
                                 meta_fields=[])


def _slot_rank(slot: Adapters) -> int:
    return max((ad.rank for ad in slot.values()), default=0)


@dataclasses.dataclass(frozen=True)
class GroupedBank:
    """Named adapter sets in fixed slots, for :func:`grouped`. Build it with
    :func:`grouped_bank`.

    Attributes:
      slots: ``{name: {path: Adapter}}``, each slot at its own rank and scale.
      names: the slots in bank order (static): decreasing rank, the order in which
        :func:`grouped` expects examples.

    Example:
      >>> import jax, jax.numpy as jnp, jlora
      >>> p = {"w": jnp.ones((4, 3))}
      >>> bank = grouped_bank({"a": jlora.init(jax.random.key(0), p,
      ...                                      jlora.LoraConfig(rank=2, targets="w"))})
      >>> bank.group(["a", None, "a"]).group_sizes.tolist()
      [2]
    """

    slots: dict
    names: tuple[str, ...] = dataclasses.field(default=(), metadata={"static": True})

    def __len__(self) -> int:
        return len(self.names)

    @property
    def ranks(self) -> dict[str, int]:
        """Each slot's rank (its largest, where its kernels differ)."""
        return {n: _slot_rank(self.slots[n]) for n in self.names}

    def index(self, name: str) -> int:
        """The position of the slot called ``name``."""
        if name not in self.names:
            raise KeyError(f"No slot named {name!r}; the bank holds {list(self.names)}.")
        return self.names.index(name)

    def ids(self, names: Sequence[str | None]) -> jax.Array:
        """int32 slot positions of ``names``; None (no adapter) is -1."""
        return jnp.asarray([-1 if n is None else self.index(n) for n in names], jnp.int32)

    def select(self, name: str) -> Adapters:
        """The adapters in slot ``name``: an ordinary ``{path: Adapter}`` dict."""
        return self.slots[self.names[self.index(name)]]

    def group(self, slots) -> Grouping:
        """The :class:`Grouping` of a batch whose example ``k`` uses ``slots[k]``: a name or
        None (no adapter), or an int array of positions (-1: none; jittable)."""
        if isinstance(slots, Sequence) and not isinstance(slots, str) and (
                not slots or all(s is None or isinstance(s, str) for s in slots)):
            slots = self.ids(slots)
        ids = jnp.asarray(slots)
        if ids.ndim != 1 or not jnp.issubdtype(ids.dtype, jnp.integer):
            raise ValueError(f"`slots` must be names or a 1-D int array of slot positions, got "
                             f"shape {ids.shape} and dtype {ids.dtype}.")
        key = jnp.where(ids < 0, len(self), ids)
        sizes = jnp.bincount(key, length=len(self) + 1)[: len(self)].astype(jnp.int32)
        return Grouping(jnp.argsort(key, stable=True), sizes)

    def labels(self) -> GroupedBank:
        """The bank with every array replaced by its slot's name: the labels of
        ``optax.partition({name: optimizer, ...}, bank.labels())``."""
        return GroupedBank({n: jax.tree.map(lambda _, n=n: n, s) for n, s in self.slots.items()},
                           self.names)

    def put(self, name: str, adapters: Adapters) -> GroupedBank:
        """The bank with ``adapters`` in slot ``name``, in the slot's shapes: a smaller rank
        is padded with zeros, another scale folded into ``B``, a kernel the set does not
        adapt gets zeros. A compiled :func:`grouped` step takes the new bank as it is."""
        slot = self.select(name)
        for path, ad in adapters.items():
            if path not in slot:
                raise ValueError(
                    f"Slot {name!r} has no room for the kernel at path {path!r} (it holds "
                    f"{sorted(slot)}): build the bank with that kernel in this slot.")
            _check_same_kernel(slot[path], ad, path, f"slot {name!r}", "the new adapter")
            if ad.rank > slot[path].rank:
                raise ValueError(
                    f"The adapter for path {path!r} has rank {ad.rank}, more than slot "
                    f"{name!r} holds ({slot[path].rank}). Reserve room with "
                    f"grouped_bank(..., capacity={{{name!r}: {ad.rank}}}).")
        new = {}
        for path, held in slot.items():
            ad = adapters.get(path)
            if ad is None:
                new[path] = held.replace(a=jnp.zeros_like(held.a), b=jnp.zeros_like(held.b))
                continue
            ad = pad_rank(ad, held.rank, fold_scale=False)
            b = ad.b.astype(jnp.float32) * (ad.scale / held.scale)
            new[path] = held.replace(a=ad.a.astype(held.a.dtype), b=b.astype(held.b.dtype))
        return dataclasses.replace(self, slots={**self.slots, name: new})

    def clear(self, name: str) -> GroupedBank:
        """The bank with slot ``name`` empty (zero factors: no update)."""
        return self.put(name, {})


jax.tree_util.register_dataclass(GroupedBank, data_fields=["slots"], meta_fields=["names"])


def _check_same_kernel(ref: Adapter, ad: Adapter, path: str, ref_name: str, name: str):
    if not isinstance(ad, Adapter):
        raise TypeError(f"{name} for path {path!r} must be a jlora Adapter, got "
                        f"{type(ad).__name__}.")
    if ad.variant != "lora":
        raise ValueError(
            f"{name} for path {path!r} is a {ad.variant!r} adapter: grouped batches take "
            "plain LoRA adapters only (a DoRA magnitude rescales the whole kernel per "
            "example). Use jlora.multi_adapter.per_example for DoRA.")
    for field in ("layout", "kernel_shape"):
        if getattr(ad, field) != getattr(ref, field):
            raise ValueError(
                f"{ref_name} and {name} disagree on the {field} of the kernel at path "
                f"{path!r}: {getattr(ref, field)!r} vs {getattr(ad, field)!r}.")


def grouped_bank(named: Mapping[str, Adapters], *,
                 capacity: Mapping[str, int] | None = None) -> GroupedBank:
    """A :class:`GroupedBank` of named adapter sets, each in a slot of its own rank.

    Args:
      named: ``{name: adapters}``. Sets may adapt different kernels at different ranks
        and scales; per kernel, layouts and kernel shapes must agree. Plain LoRA only.
      capacity: ``{name: rank}`` to reserve: that slot's factors are zero-padded to
        ``rank`` so :meth:`GroupedBank.put` can later swap in a set of a larger rank.

    Returns:
      The bank, its slots in order of decreasing rank (ties in the order given): the
      order in which :func:`grouped` reads the examples' groups.

    Example:
      >>> import jax, jax.numpy as jnp, jlora
      >>> p = {"w": jnp.ones((4, 3))}
      >>> a = jlora.init(jax.random.key(0), p, jlora.LoraConfig(rank=1, targets="w"))
      >>> grouped_bank({"x": a, "y": a}, capacity={"y": 3}).ranks
      {'y': 3, 'x': 1}
    """
    if not isinstance(named, Mapping) or not named:
        raise TypeError("`named` must be a non-empty mapping {name: adapters}, got "
                        f"{type(named).__name__}.")
    if not all(isinstance(n, str) for n in named):
        raise TypeError(f"Slot names must be strings, got {list(named)}.")
    capacity = dict(capacity or {})
    unknown = sorted(set(capacity) - set(named))
    if unknown:
        raise ValueError(f"`capacity` names slots {unknown} that are not in `named` "
                         f"({list(named)}).")
    refs: dict[str, tuple[str, Adapter]] = {}
    slots = {}
    for name, ads in named.items():
        if not isinstance(ads, Mapping):
            raise TypeError(f"`named[{name!r}]` must be a {{path: Adapter}} dict, got "
                            f"{type(ads).__name__}.")
        for path, ad in ads.items():
            ref_name, ref = refs.setdefault(path, (name, ad))
            _check_same_kernel(ref, ad, path, f"slot {ref_name!r}", f"slot {name!r}")
        rank = capacity.get(name, 0)
        if rank and rank < _slot_rank(ads):
            raise ValueError(f"`capacity[{name!r}]` = {rank} is below the slot's rank "
                             f"{_slot_rank(ads)}.")
        slots[name] = {p: pad_rank(ad, max(rank, ad.rank), fold_scale=False)
                       for p, ad in ads.items()}
    names = tuple(sorted(named, key=lambda n: -_slot_rank(slots[n])))
    return GroupedBank(slots, names)


def _entries(bank: GroupedBank) -> dict[str, GroupedEntry]:
    """Per kernel: every slot's ``A`` concatenated along the rank axis, ``s·B`` likewise."""
    out = {}
    for path in dict.fromkeys(p for n in bank.names for p in bank.slots[n]):
        present = [bank.slots[n][path] for n in bank.names if path in bank.slots[n]]
        ns = present[0].layout.num_stacked
        dtype = jnp.result_type(*[ad.a.dtype for ad in present])
        a = jnp.concatenate([ad.a.astype(dtype) for ad in present], axis=-1)
        b = jnp.concatenate([(ad.b.astype(jnp.float32) * ad.scale).astype(dtype)
                             for ad in present], axis=ns)
        ranks = tuple(bank.slots[n][path].rank if path in bank.slots[n] else 0
                      for n in bank.names)
        out[path] = GroupedEntry(present[0].layout, a, b, ranks)
    return out


def _interpret(traced, in_axes, values, consts, bank, group_sizes):
    entries = _entries(bank)
    batch = next(v.shape[0] for v, ax in zip(values, in_axes, strict=True) if ax == 0)
    # Example k's slot: rows past the groups get len(bank), which no adapter has.
    slot = jnp.searchsorted(jnp.cumsum(group_sizes), jnp.arange(batch), side="right")

    def one(gid, *vals):
        run = GroupedRun(groups=(gid, group_sizes))
        return evaluate(traced, list(vals), consts, entries, run)[0]

    return jax.vmap(one, in_axes=(0, *in_axes))(slot, *values)


def _check_call(params, bank, group_sizes, args):
    if not isinstance(bank, GroupedBank):
        raise TypeError("`bank` must be a jlora.multi_adapter.GroupedBank (grouped_bank(...)), "
                        f"got {type(bank).__name__}.")
    for name in bank.names:
        check_adapters_fit(params, bank.slots[name])
    gs = jnp.asarray(group_sizes)
    if gs.shape != (len(bank),) or not jnp.issubdtype(gs.dtype, jnp.integer):
        raise ValueError(f"`group_sizes` must be a 1-D int array with one entry per slot "
                         f"({len(bank)}: {list(bank.names)}), got shape {gs.shape} and "
                         f"dtype {gs.dtype}.")
    leaves = jax.tree_util.tree_flatten_with_path(args)[0]
    if not leaves:
        raise ValueError("grouped: `args` has no arrays; the batch is read from their "
                         "leading axis.")
    batch = int(np.shape(leaves[0][1])[0]) if np.ndim(leaves[0][1]) else -1
    for kp, leaf in leaves:
        if np.ndim(leaf) == 0 or np.shape(leaf)[0] != batch:
            raise ValueError(
                f"Every array in `args` needs the batch axis first, of one size ({batch}); "
                f"args{jax.tree_util.keystr(kp)} has shape {np.shape(leaf)}. Pass unbatched "
                "inputs as keyword arguments.")
    if not jc.is_tracer(group_sizes):
        sizes = np.asarray(group_sizes)
        if int(sizes.sum()) > batch:
            raise ValueError(f"`group_sizes` {sizes.tolist()} add up to {int(sizes.sum())} "
                             f"examples, more than the batch holds ({batch}).")
    return gs.astype(jnp.int32)


def _check_kernels(traced, bank: GroupedBank) -> None:
    """Guessed layouts checked against the model; quantized kernels refused."""
    layouts = {p: ad.layout for n in bank.names for p, ad in bank.slots[n].items()}
    check_guesses(traced, layouts)
    quantized = sorted({p for p, part in zip(traced.param_paths, traced.param_parts,
                                             strict=True) if part and p in layouts})
    if quantized:
        raise ValueError(
            f"grouped: the kernels at paths {quantized} are quantized; grouped batches take "
            "float kernels only. Use jlora.multi_adapter.per_example for a quantized base.")


def _check_outputs(traced) -> None:
    """Every output of one example keeps the batch axis first (size 1): checked on the
    traced shapes, before anything runs."""
    outs = jax.tree_util.tree_unflatten(traced.out_tree, traced.closed.out_avals)
    for kp, aval in jax.tree_util.tree_flatten_with_path(outs)[0]:
        if len(aval.shape) < 1 or aval.shape[0] != 1:
            raise ValueError(
                f"grouped: `fn`'s output{jax.tree_util.keystr(kp)} has shape {aval.shape} "
                "for a batch of one example: outputs must keep the batch axis first, as "
                "fn's inputs do.")


def grouped(fn: Callable) -> Callable:
    """``jlora.lora(fn)`` with every example of the batch on its own slot of a bank.

    Returns ``h(params, bank, group_sizes, *args, **kwargs)``. The examples (the leading
    axis of every array in ``args``) are sorted by slot: the first ``group_sizes[0]`` use
    slot ``bank.names[0]``, the next ``group_sizes[1]`` the second slot, ..., and any
    after the last group use no adapter (they cost only the frozen model). Example ``k``
    is computed as ``fn`` computes a batch of that one example with its slot's adapters
    (``fn(jlora.merge(params, bank.select(name)), x[k:k+1])``); outputs are stacked back
    along the leading axis (so ``fn``'s outputs keep the batch axis). ``kwargs`` go to
    every example unbatched. :meth:`GroupedBank.group` puts a batch in this order.

    Each adapted ``x·W`` stays one matmul for the batch; the adapters' products are
    ragged products over the slots' examples, each at its slot's rank. ``h`` is
    differentiable w.r.t. the bank (every slot trained in one step) and the inputs, and
    takes no dropout (adapters are applied as in evaluation). Wrap it in ``jax.jit``;
    a bank whose slots change contents (:meth:`GroupedBank.put`) reuses the compiled step.

    Example:
      >>> import jax, jax.numpy as jnp, jlora
      >>> p = {"w": jnp.ones((4, 3))}
      >>> sets = {n: jlora.init(jax.random.key(i), p, jlora.LoraConfig(rank=i + 1, targets="w"))
      ...         for i, n in enumerate(["fr", "de"])}
      >>> bank = grouped_bank(sets)
      >>> g = bank.group(["fr", "de", None, "fr"])
      >>> h = grouped(lambda p, x: x @ p["w"])
      >>> y = g.unsort(jax.jit(h)(p, bank, g.group_sizes, g.sort(jnp.ones((4, 4)))))
      >>> y.shape
      (4, 3)
    """
    if not callable(fn):
        raise TypeError(f"`fn` must be a callable fn(params, *args), got {type(fn).__name__}.")
    cache: collections.OrderedDict = collections.OrderedDict()
    compiled: collections.OrderedDict = collections.OrderedDict()

    def h(params, bank: GroupedBank, group_sizes, *args, **kwargs):
        gs = _check_call(params, bank, group_sizes, args)
        one = jax.tree.map(lambda t: t[:1], args)
        traced, _ = trace(fn, cache, params, one, kwargs)
        _check_kernels(traced, bank)
        _check_outputs(traced)
        expanded = jax.tree.map(lambda t: t[:, None], args)
        leaves = [jax.tree.leaves(t) for t in (params, expanded, kwargs)]
        flat = [x for part in leaves for x in part]
        first, last = len(leaves[0]), len(leaves[0]) + len(leaves[1])
        values, in_axes = [], []
        for i, (x, dyn) in enumerate(zip(flat, traced.dynamic, strict=True)):
            if dyn:
                values.append(x)
                in_axes.append(0 if first <= i < last else None)
        key = (id(traced), tuple(in_axes))
        if key not in compiled:
            compiled[key] = (traced, jax.jit(functools.partial(_interpret, traced,
                                                               tuple(in_axes))))
            while len(compiled) > CACHE_SIZE:
                compiled.popitem(last=False)
        out = compiled[key][1](values, list(traced.closed.consts), bank, gs)
        return jax.tree.map(lambda t: t.reshape(t.shape[0], *t.shape[2:]), out)

    return h

