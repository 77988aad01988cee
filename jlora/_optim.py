"""Training with optax: what is trained, how it goes back, and LoRA+.

LoRA trains the adapters and freezes the base model. Some fine-tunes also train a few
base parameters in full: a new classification head (PEFT's ``modules_to_save``) or the
biases (PEFT's ``bias="all"`` / ``"lora_only"``). :func:`split_trainable` cuts ``params``
into the trainable part and the frozen rest, :func:`merge_trainable` puts them back
(with the adapters merged), so ``jax.grad`` and the optimizer only ever see the trained
arrays and any optax chain works unchanged::

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
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jlora import _deprecation as deprecation
from jlora import _merging as merging
from jlora import _paths as paths_lib
from jlora._adapter import Adapters, is_adapter

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
    wanted = [f"{p.rpartition('/')[0]}/bias" if "/" in p else "bias" for p in adapters]
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
) -> tuple[dict, Any]:
    """Split into ``(trainable, frozen)``: what the optimizer updates, and the rest.

    Args:
      params, adapters, modules_to_save, bias: as in :func:`trainable_mask`.

    Returns:
      ``trainable = {"adapters": adapters, "params": extra}`` where ``extra`` has the
      structure of ``params`` with the leaves trained in full and ``None`` elsewhere; and
      ``frozen``, ``params`` with ``None`` at those leaves. Differentiate and optimize
      ``trainable``; :func:`merge_trainable` rebuilds the model's params.

    Example:
      >>> import jax, jax.numpy as jnp, jlora
      >>> params = {"enc": {"kernel": jnp.ones((4, 4)), "bias": jnp.zeros(4)}}
      >>> ads = jlora.init(jax.random.key(0), params, jlora.LoraConfig(rank=2))
      >>> trainable, frozen = split_trainable(params, ads, bias="all")
      >>> jlora.leaf_paths(trainable)
      ['adapters/enc/kernel/a', 'adapters/enc/kernel/b', 'params/enc/bias']
      >>> frozen["enc"]["bias"] is None
      True
    """
    flags = trainable_mask(params, adapters, modules_to_save=modules_to_save, bias=bias)
    extra = jax.tree.map(lambda keep, x: x if keep else None, flags, params)
    frozen = jax.tree.map(lambda keep, x: None if keep else x, flags, params)
    return {ADAPTERS_KEY: adapters, PARAMS_KEY: extra}, frozen


def _is_trainable_half(x) -> bool:
    return isinstance(x, dict) and set(x) == {ADAPTERS_KEY, PARAMS_KEY}


def merge_trainable(trainable: dict, frozen):
    """The model's params from :func:`split_trainable`'s halves, in the order it returns
    them: extras put back, adapters merged (``W + s·A@B``). Pure and jittable; use it
    inside the loss.

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
    params = paths_lib.combine(trainable[PARAMS_KEY], frozen)
    return merging.merge(params, trainable[ADAPTERS_KEY])


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

