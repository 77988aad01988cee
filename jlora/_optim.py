"""Training with optax: what is trained, how it goes back, and LoRA+.

LoRA trains the adapters and freezes the base model. Some fine-tunes also train a few
base parameters in full: a new classification head (PEFT's ``modules_to_save``) or the
biases (PEFT's ``bias="all"`` / ``"lora_only"``); or part of a frozen leaf: a bias on
``lora_B`` (PEFT's ``lora_bias``, a :class:`jlora.peft.LoraBias`) or a few tokens'
embeddings (PEFT's ``trainable_token_indices``, a :class:`jlora.peft.TrainableTokens`).
:func:`split_trainable` cuts ``params`` into the trainable part and the frozen rest,
:func:`merge_trainable` puts them back (with the adapters merged), so ``jax.grad`` and
the optimizer only ever see the trained arrays and any optax chain works unchanged::

  trainable, frozen = jlora.split_trainable(params, adapters, bias="lora_only")
  opt = jlora.lora_plus(optax.adamw(1e-4), ratio=16.0)
  opt_state = opt.init(trainable)

  def loss_fn(trainable, batch):
      return loss(model.apply({"params": jlora.merge_trainable(trainable, frozen)},
                              batch))

:func:`trainable_labels` names every trainable leaf (``"lora_a"``, ``"lora_b"``,
``"lora_magnitude"``, ``"extra"``) for ``optax.partition`` (alias
``optax.multi_transform``); ``jlora.mask(trainable, pattern)`` gives masks for
``optax.masked`` or ``optax.adamw(mask=...)`` from paths such as
``adapters/layer/query/kernel/a`` or ``params/head/bias``.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jlora import _deprecation as deprecation
from jlora import _merging as merging
from jlora import _paths as paths_lib
from jlora._adapter import Adapters, is_adapter
from jlora._leaf_updates import LoraBias, TrainableTokens, apply_leaf_updates, bias_beside

__all__ = [
    "BIAS_MODES",
    "trainable_labels",
    "lora_plus",
    "merge_trainable",
    "split_trainable",
    "trainable_mask",
]

BIAS_MODES = ("none", "all", "lora_only")

# Keys of the trainable dict: a plain dict, so checkpointers and optax see ordinary trees.
ADAPTERS_KEY = "adapters"
PARAMS_KEY = "params"


def _patterns(modules_to_save: str | Sequence[str] | None) -> list[str]:
    if modules_to_save is None:
        return []
    if isinstance(modules_to_save, str):
        return [modules_to_save]
    if isinstance(modules_to_save, Sequence) and all(isinstance(p, str) for p in modules_to_save):
        return list(modules_to_save)
    raise TypeError(
        "`modules_to_save` must be a regular expression string or a sequence of them, got "
        f"{modules_to_save!r}."
    )


def _bias_paths(flat: dict[str, Any], adapters: Adapters, bias: str) -> list[str]:
    if bias not in BIAS_MODES:
        raise ValueError(f"`bias` must be one of {list(BIAS_MODES)} (as PEFT), got {bias!r}.")
    if bias == "none":
        return []
    if bias == "all":
        found = [p for p in flat if p.rpartition("/")[2] == "bias"]
        if not found:
            raise ValueError(
                "`bias='all'` found no leaf named 'bias' in params: the model has no biases. "
                "Use bias='none'."
            )
        return found
    # "lora_only": the bias that sits next to each adapted kernel, in the same module.
    wanted = [bias_beside(p) for p in adapters]
    found = [p for p in dict.fromkeys(wanted) if p in flat]
    if not found:
        listing = ", ".join(repr(p) for p in wanted[:5])
        raise ValueError(
            "`bias='lora_only'` found no bias next to any adapted kernel (looked for "
            f"{listing}): the adapted modules have no biases. Use bias='none'."
        )
    return found


def trainable_mask(
    params,
    adapters: Adapters,
    *,
    modules_to_save: str | Sequence[str] | None = None,
    bias: str = "none",
):
    """Booleans with the structure of ``params``: ``True`` where a leaf is trained in full.

    The adapters themselves are not marked (they are separate arrays); this selects the
    base parameters trained alongside them.

    Args:
      params: the base model's parameters (the tree passed to :func:`jlora.init`).
      adapters: ``{path: Adapter}`` from :func:`jlora.init`.
      modules_to_save: a pattern or patterns (matched in full against leaf paths, each must
        match something) of leaves to train in full, e.g. ``r"head/.*"``; PEFT's
        ``modules_to_save`` names modules, here a pattern names their leaves.
      bias: ``"none"``, ``"all"`` (every leaf named ``bias``) or ``"lora_only"`` (the bias
        of each adapted module), as PEFT.

    Example:
      >>> import jax, jax.numpy as jnp, jlora
      >>> params = {"enc": {"kernel": jnp.ones((4, 4)), "bias": jnp.zeros(4)},
      ...           "head": {"kernel": jnp.ones((4, 2)), "bias": jnp.zeros(2)}}
      >>> config = jlora.LoraConfig(rank=2, targets="enc/kernel")
      >>> ads = jlora.init(jax.random.key(0), params, config)
      >>> trainable_mask(params, ads, bias="lora_only")["enc"]["bias"]
      True
      >>> trainable_mask(params, ads, modules_to_save="head/.*")["head"]
      {'bias': True, 'kernel': True}
    """
    flat = merging.check_adapters_fit(params, adapters)
    chosen: dict[str, str] = {}
    for i, pattern in enumerate(_patterns(modules_to_save)):
        field = "modules_to_save" if isinstance(modules_to_save, str) else f"modules_to_save[{i}]"
        for path in paths_lib.matching_paths(list(flat), pattern, field=field):
            chosen.setdefault(path, f"`{field}` pattern {pattern!r}")
    for path in _bias_paths(flat, adapters, bias):
        chosen.setdefault(path, f"`bias={bias!r}`")
    for path, why in chosen.items():
        if path in adapters:
            raise ValueError(
                f"{why} selects the kernel at path {path!r}, which also has an adapter: a kernel "
                "is either adapted or trained in full. Narrow the pattern, or leave the path out "
                "of the LoraConfig's `targets` (e.g. with `exclude`)."
            )
        dtype = getattr(flat[path], "dtype", None)
        if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
            kind = np.dtype(dtype).name if dtype is not None else type(flat[path]).__name__
            raise ValueError(
                f"{why} selects the leaf at path {path!r} of type {kind}: only floating-point "
                "arrays can be trained. Narrow the pattern."
            )
    return paths_lib.tree_map_with_path(lambda path, _: path in chosen, params)


def split_trainable(
    params,
    adapters: Adapters,
    *,
    modules_to_save: str | Sequence[str] | None = None,
    bias: str = "none",
    lora_bias: bool = False,
    trainable_tokens: Mapping[str, Sequence[int]] | None = None,
) -> tuple[dict, Any]:
    """Split into ``(trainable, frozen)``: what the optimizer updates, and the rest.

    Args:
      params, adapters, modules_to_save, bias: as in :func:`trainable_mask`.
      lora_bias: PEFT's ``lora_bias``: train a bias on each adapter's ``B``, added to the
        bias next to the adapted kernel with the adapter's scale (a
        :class:`~jlora.peft.LoraBias`, starting at zero). Every adapted kernel needs such
        a bias, and DoRA and embedding adapters have none (as in PEFT).
      trainable_tokens: PEFT's ``trainable_token_indices``: ``{path: token ids}`` of
        2-D tables that are not adapted; only those tokens' vectors are trained (a
        :class:`~jlora.peft.TrainableTokens`): the rows of a leaf named ``embedding``,
        else the columns of a kernel stored ``(features, vocab)``.

    Returns:
      ``trainable = {"adapters": adapters, "params": extra}`` where ``extra`` has the
      structure of ``params`` with the leaves trained in full, the partial updates
      (:class:`~jlora.peft.LoraBias`, :class:`~jlora.peft.TrainableTokens`) and ``None``
      elsewhere; and ``frozen``, ``params`` with ``None`` at the leaves trained in full.
      Differentiate and optimize ``trainable``; :func:`merge_trainable` rebuilds the
      model's params.

    Example:
      >>> import jax, jax.numpy as jnp, jlora
      >>> params = {"enc": {"kernel": jnp.ones((4, 4)), "bias": jnp.zeros(4)},
      ...           "emb": {"embedding": jnp.ones((10, 4))}}
      >>> config = jlora.LoraConfig(rank=2, targets="enc/kernel")
      >>> ads = jlora.init(jax.random.key(0), params, config)
      >>> trainable, frozen = split_trainable(params, ads, bias="all")
      >>> jlora.leaf_paths(trainable)
      ['adapters/enc/kernel/a', 'adapters/enc/kernel/b', 'params/enc/bias']
      >>> frozen["enc"]["bias"] is None
      True
      >>> trainable, _ = split_trainable(params, ads, lora_bias=True,
      ...                                trainable_tokens={"emb/embedding": [3, 7]})
      >>> jlora.leaf_paths(trainable["params"])
      ['emb/embedding/values', 'enc/bias/delta']
    """
    flags = trainable_mask(params, adapters, modules_to_save=modules_to_save, bias=bias)
    flat = paths_lib.select(params, ".*", allow_empty=True)
    trained = {p for p, keep in paths_lib.select(flags, ".*", allow_empty=True).items() if keep}
    updates = _lora_biases(flat, adapters, trained) if lora_bias else {}
    updates.update(_token_rows(flat, adapters, trained, trainable_tokens))
    extra = paths_lib.tree_map_with_path(
        lambda p, keep, x: updates.get(p, x if keep else None), flags, params)
    frozen = jax.tree.map(lambda keep, x: None if keep else x, flags, params)
    return {ADAPTERS_KEY: adapters, PARAMS_KEY: extra}, frozen


def _lora_biases(flat: dict, adapters: Adapters, trained: set[str]) -> dict[str, LoraBias]:
    """A zero :class:`LoraBias` on the bias next to every adapted kernel."""
    out = {}
    for path, ad in adapters.items():
        if ad.variant != "lora" or ad.layout.kind == "embed":
            what = "an embedding" if ad.layout.kind == "embed" else f"a {ad.variant} adapter"
            raise ValueError(
                f"`lora_bias=True`, but the kernel at path {path!r} has {what}: PEFT's lora_bias "
                "exists for plain LoRA on Linear and Conv modules only. Leave lora_bias off, or "
                "train the bias in full with bias='lora_only'."
            )
        bias_path = bias_beside(path)
        leaf = flat.get(bias_path)
        stacked, _, fan_out = ad.layout.split_shape(ad.kernel_shape)
        if leaf is None or tuple(getattr(leaf, "shape", ())) != (*stacked, *fan_out):
            found = "nothing" if leaf is None else f"shape {tuple(getattr(leaf, 'shape', ()))}"
            raise ValueError(
                f"`lora_bias=True` needs a bias of shape {(*stacked, *fan_out)} at path "
                f"{bias_path!r}, next to the adapted kernel at path {path!r}, but found "
                f"{found}. Leave lora_bias off, or leave that kernel out of the adapters."
            )
        out[bias_path] = LoraBias(
            delta=jnp.zeros(leaf.shape, ad.b.dtype), scale=ad.scale,
            bias=leaf if bias_path in trained else None)
    return out


def _token_rows(flat: dict, adapters: Adapters, trained: set[str],
                trainable_tokens: Mapping[str, Sequence[int]] | None) -> dict:
    """A :class:`TrainableTokens` holding the current vectors for every entry of
    ``trainable_tokens``."""
    if trainable_tokens is None:
        return {}
    if not isinstance(trainable_tokens, Mapping):
        raise TypeError(
            f"`trainable_tokens` must be a dict {{path: token ids}}, got {trainable_tokens!r}."
        )
    out = {}
    for path, ids in trainable_tokens.items():
        if path not in flat:
            near = ", ".join(repr(p) for p in paths_lib.nearest_paths(str(path), flat, n=3))
            raise ValueError(
                f"`trainable_tokens` names path {path!r}, which is not a leaf of params. "
                f"Closest: {near}."
            )
        leaf = flat[path]
        shape, dtype = tuple(getattr(leaf, "shape", ())), getattr(leaf, "dtype", None)
        why = None
        if len(shape) != 2 or dtype is None or not jnp.issubdtype(dtype, jnp.floating):
            why = f"it has shape {shape} and dtype {dtype}; expected a 2-D floating table"
        elif path in adapters:
            why = ("it also has an adapter, and PEFT's trainable tokens replace the table's "
                   "entries under the adapter")
        elif path in trained:
            why = "it is also trained in full (modules_to_save or bias)"
        axis = 0 if path.rpartition("/")[2] == "embedding" else 1
        ids = list(ids) if isinstance(ids, Sequence) and not isinstance(ids, str) else ids
        if why is None and not (
                isinstance(ids, list) and ids
                and all(isinstance(i, numbers.Integral) and not isinstance(i, bool) for i in ids)
                and len(set(ids)) == len(ids) and all(0 <= int(i) < shape[axis] for i in ids)):
            why = (f"its token ids {ids!r} must be distinct ints in [0, {shape[axis]}) (the "
                   f"size of axis {axis})")
        if why:
            raise ValueError(f"`trainable_tokens` cannot train tokens of the leaf at path "
                             f"{path!r}: {why}.")
        indices = tuple(int(i) for i in ids)
        values = jnp.moveaxis(jnp.asarray(leaf), axis, 0)[jnp.asarray(indices, jnp.int32)]
        out[path] = TrainableTokens(values=values, indices=indices, axis=axis)
    return out


def _is_trainable_half(x) -> bool:
    return isinstance(x, dict) and set(x) == {ADAPTERS_KEY, PARAMS_KEY}


def merge_trainable(trainable: dict, frozen, *, merge_adapters: bool = True):
    """The model's params from :func:`split_trainable`'s halves, in the order it returns
    them: extras put back (partial updates applied to their frozen leaves), adapters
    merged (``W + s·A@B``). Pure and jittable; use it inside the loss.

    With ``merge_adapters=False`` the adapters are left out: the params to pass to
    ``jlora.lora(fn)(params, trainable["adapters"], ...)``.

    The old order ``merge_trainable(frozen, trainable)`` still works for one release, with
    a ``DeprecationWarning`` (the two halves are told apart by their structure).

    Example:
      >>> import jax, jax.numpy as jnp, jlora
      >>> params = {"enc": {"kernel": jnp.ones((4, 4)), "bias": jnp.zeros(4)}}
      >>> ads = jlora.init(jax.random.key(0), params, jlora.LoraConfig(rank=2))
      >>> trainable, frozen = split_trainable(params, ads, bias="all")
      >>> merge_trainable(trainable, frozen)["enc"]["bias"].shape
      (4,)
    """
    if not _is_trainable_half(trainable) and _is_trainable_half(frozen):
        deprecation.warn(
            "merge_trainable(frozen, trainable) is deprecated: pass the halves in the order "
            "split_trainable returns them, merge_trainable(trainable, frozen).")
        trainable, frozen = frozen, trainable
    if not _is_trainable_half(trainable):
        got = sorted(trainable) if isinstance(trainable, dict) else type(trainable).__name__
        raise TypeError(
            "`trainable` must be the dict {'adapters': ..., 'params': ...} that "
            f"split_trainable returns, got {got}."
        )
    params = apply_leaf_updates(trainable[PARAMS_KEY], frozen)
    return merging.merge(params, trainable[ADAPTERS_KEY]) if merge_adapters else params


def trainable_labels(tree):
    """A label for every trainable leaf: ``"lora_a"``, ``"lora_b"``, ``"lora_magnitude"``
    (DoRA) or ``"extra"`` (anything that is not an adapter factor).

    Works on the adapters dict or on :func:`split_trainable`'s ``trainable``; made for
    ``optax.partition`` (``optax.multi_transform``).

    Example:
      >>> import jax, jax.numpy as jnp, jlora, optax
      >>> params = {"enc": {"kernel": jnp.ones((4, 4)), "bias": jnp.zeros(4)}}
      >>> ads = jlora.init(jax.random.key(0), params, jlora.LoraConfig(rank=2))
      >>> trainable, _ = split_trainable(params, ads, bias="all")
      >>> jax.tree.leaves(trainable_labels(trainable))
      ['lora_a', 'lora_b', 'extra']
      >>> opt = optax.partition({"lora_a": optax.sgd(0.1), "lora_b": optax.sgd(0.1),
      ...                        "extra": optax.set_to_zero()}, trainable_labels)
      >>> state = opt.init(trainable)
    """

    def label(x):
        if is_adapter(x):
            return x.replace(
                a="lora_a",
                b="lora_b",
                magnitude=None if x.magnitude is None else "lora_magnitude",
            )
        return "extra"

    return jax.tree.map(label, tree, is_leaf=is_adapter)


def _check_ratio(ratio: Any) -> float:
    if (
        isinstance(ratio, bool)
        or not isinstance(ratio, numbers.Real)
        or not math.isfinite(ratio)
        or ratio <= 0
    ):
        raise ValueError(
            f"`ratio` must be a positive, finite number (LoRA+'s lr_B / lr_A; PEFT's docs use "
            f"16), got {ratio!r}."
        )
    return float(ratio)


def lora_plus(
    optimizer: optax.GradientTransformation, ratio: float, *, peft_grouping: bool = False
) -> optax.GradientTransformationExtraArgs:
    """LoRA+ (Hayou et al., 2024): the ``B`` factors learn ``ratio`` times faster than ``A``.

    Built on ``optax.partition`` (``optax.multi_transform``): ``B`` gets its own copy of
    ``optimizer``'s state and its updates are scaled by ``ratio``. For every optimizer whose
    update is proportional to its learning rate (those that end by scaling with it: ``sgd``,
    ``adam``, ``adamw`` with its weight decay, ``lion``, with or without a
    schedule) this is exactly ``optimizer`` with ``lr · ratio`` on ``B``, so pass your
    chain unchanged. Learning-rate-free optimizers (e.g. ``optax.contrib.prodigy``) have no
    such learning rate to multiply.

    Args:
      optimizer: any ``optax.GradientTransformation``, applied to everything trainable.
      ratio: ``lr_B / lr_A``; required (as in PEFT's ``loraplus_lr_ratio``), PEFT's docs use
        ``16``.
      peft_grouping: ``False`` (the paper): only ``B`` is sped up. ``True`` follows PEFT's
        ``create_loraplus_optimizer``, which also speeds up DoRA magnitudes and every 1-D
        trainable leaf (biases). PEFT's separate fixed learning rate for embedding adapters
        is not reproduced: embedding factors are treated like the others.

    Returns:
      An optax transformation for the adapters dict or :func:`split_trainable`'s
      ``trainable``.

    Example:
      >>> import jax, jax.numpy as jnp, jlora, optax
      >>> ads = jlora.init(jax.random.key(0), {"k": jnp.ones((4, 4))},
      ...                  jlora.LoraConfig(rank=2, targets="k"))
      >>> opt = lora_plus(optax.sgd(0.1), ratio=16.0)
      >>> grads = jax.tree.map(jnp.ones_like, ads)
      >>> updates, _ = opt.update(grads, opt.init(ads), ads)
      >>> float(updates["k"].a[0, 0]), float(updates["k"].b[0, 0])
      (-0.10000000149011612, -1.600000023841858)
    """
    if not isinstance(optimizer, optax.GradientTransformation):
        raise TypeError(
            f"`optimizer` must be an optax.GradientTransformation, got {type(optimizer).__name__}."
        )
    ratio = _check_ratio(ratio)

    def group(x):
        if is_adapter(x):
            magnitude = None
            if x.magnitude is not None:
                magnitude = "lora_plus_b" if peft_grouping else "lora_plus_a"
            return x.replace(a="lora_plus_a", b="lora_plus_b", magnitude=magnitude)
        if peft_grouping and getattr(x, "ndim", None) == 1:
            return "lora_plus_b"
        return "lora_plus_a"

    return optax.partition(
        {
            "lora_plus_a": optimizer,
            "lora_plus_b": optax.chain(optimizer, optax.scale(ratio)),
        },
        lambda tree: jax.tree.map(group, tree, is_leaf=is_adapter),
    )

