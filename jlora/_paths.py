"""Leaf paths of any pytree, and selecting, partitioning and masking by pattern.

A leaf's path is its keys joined with ``/``: ``params/layers/0/attn/query/kernel``.
Dict keys, sequence indices, dataclass fields and flax ``FrozenDict`` / NNX ``State``
entries all become path components. The ``.value`` attribute that NNX variables add
at the end of each path is dropped, so an NNX state and the equivalent linen params
give the same paths.

Patterns are regular expressions matched in *full* against the path string
(``re.fullmatch``), so ``.*/kernel`` matches every kernel and ``kernel`` matches only a
top-level leaf named ``kernel``. A pattern that matches no leaf is an error listing
the closest real paths, never silently ignored.

These functions are useful on their own, outside LoRA::

  >>> import jax.numpy as jnp, jlora
  >>> tree = {"enc": {"kernel": jnp.ones((2, 3)), "bias": jnp.zeros(3)}}
  >>> jlora.leaf_paths(tree)
  ['enc/bias', 'enc/kernel']
  >>> kernels, rest = jlora.partition(tree, r".*/kernel")
  >>> jlora.combine(kernels, rest)["enc"]["bias"].shape
  (3,)
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import jax

PyTree = Any

__all__ = [
    "PatternError",
    "combine",
    "compile_pattern",
    "key_to_str",
    "keypath_to_str",
    "leaf_paths",
    "mask",
    "matching_paths",
    "nearest_paths",
    "partition",
    "select",
    "tree_map_with_path",
]


class PatternError(ValueError):
    """A pattern that does not compile, or that matches no leaf path."""


def key_to_str(key: Any) -> str:
    """One path component as a string.

    Example:
      >>> import jax
      >>> key_to_str(jax.tree_util.DictKey("kernel"))
      'kernel'
    """
    if isinstance(key, jax.tree_util.DictKey):
        return str(key.key)
    if isinstance(key, jax.tree_util.SequenceKey):
        return str(key.idx)
    if isinstance(key, jax.tree_util.GetAttrKey):
        return str(key.name)
    if isinstance(key, jax.tree_util.FlattenedIndexKey):
        return str(key.key)
    return str(key)


def keypath_to_str(keypath: Sequence[Any]) -> str:
    """A JAX key path as a ``/``-joined string, without NNX's trailing ``.value``.

    Example:
      >>> import jax
      >>> keypath_to_str((jax.tree_util.DictKey("dense"), jax.tree_util.DictKey("kernel")))
      'dense/kernel'
    """
    parts = [key_to_str(k) for k in keypath]
    # NNX variables flatten to their `.value`; users think of the variable itself.
    if (
        len(parts) > 1
        and isinstance(keypath[-1], jax.tree_util.GetAttrKey)
        and parts[-1] == "value"
    ):
        parts = parts[:-1]
    return "/".join(parts)


def _is_kernel_leaf(x: Any) -> bool:
    # A pytree that stands for one kernel (jlora.quantization.QuantizedKernel) is one leaf
    # here, so its path is the kernel's path, not the paths of the arrays it holds.
    return getattr(type(x), "__jlora_kernel__", False) is True


def _flatten(tree: PyTree, is_leaf: Callable[[Any], bool] | None = None):
    is_leaf = is_leaf or _is_kernel_leaf
    leaves, treedef = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)
    return [(keypath_to_str(kp), leaf) for kp, leaf in leaves], treedef


def leaf_paths(tree: PyTree) -> list[str]:
    """The path string of every leaf, in JAX's flattening order.

    Example:
      >>> leaf_paths({"b": [1, 2], "a": {"x": 3}})
      ['a/x', 'b/0', 'b/1']
    """
    return [path for path, _ in _flatten(tree)[0]]


def tree_map_with_path(fn: Callable[..., Any], tree: PyTree, *rest: PyTree) -> PyTree:
    """Like ``jax.tree_util.tree_map_with_path`` but ``fn`` receives the path string.

    Example:
      >>> tree_map_with_path(lambda p, x: p, {"a": 1, "b": {"c": 2}})
      {'a': 'a', 'b': {'c': 'b/c'}}
    """
    return jax.tree_util.tree_map_with_path(
        lambda kp, x, *r: fn(keypath_to_str(kp), x, *r), tree, *rest, is_leaf=_is_kernel_leaf
    )


def compile_pattern(pattern: str | re.Pattern, *, field: str = "pattern") -> re.Pattern:
    """Compile a pattern, raising :class:`PatternError` that names ``field`` if it is invalid.

    Example:
      >>> compile_pattern(r".*/kernel").fullmatch("dense/kernel") is not None
      True
    """
    if isinstance(pattern, re.Pattern):
        return pattern
    if not isinstance(pattern, str):
        raise PatternError(
            f"`{field}` must be a regular expression string, got {pattern!r} "
            f"of type {type(pattern).__name__}."
        )
    try:
        return re.compile(pattern)
    except re.error as e:
        raise PatternError(
            f"`{field}` pattern {pattern!r} is not a valid regular expression: {e}."
        ) from None


def nearest_paths(wanted: str, paths: Iterable[str], n: int = 5) -> list[str]:
    """The real paths closest to ``wanted`` (for error messages).

    Example:
      >>> nearest_paths("dense/kernal", ["dense/kernel", "dense/bias", "head/kernel"], n=1)
      ['dense/kernel']
    """
    paths = list(dict.fromkeys(paths))
    close = difflib.get_close_matches(wanted, paths, n=n, cutoff=0.0)
    return close or paths[:n]


def _no_match_error(pattern: str, paths: Sequence[str], field: str) -> PatternError:
    near = nearest_paths(pattern, paths)
    listing = "\n  ".join(near) if near else "(the tree has no leaves)"
    return PatternError(
        f"`{field}` pattern {pattern!r} matches no leaf path (patterns are matched in "
        f"full against '/'-joined paths). The closest real paths are:\n  {listing}"
    )


def matching_paths(
    tree_or_paths: PyTree | Sequence[str],
    pattern: str | re.Pattern,
    *,
    field: str = "pattern",
    allow_empty: bool = False,
) -> list[str]:
    """Paths that fully match ``pattern``; an error listing the nearest paths if none do.

    Accepts a pytree or an already computed list of path strings.

    Example:
      >>> matching_paths(["a/kernel", "a/bias"], r".*kernel")
      ['a/kernel']
    """
    if isinstance(tree_or_paths, list | tuple) and all(isinstance(p, str) for p in tree_or_paths):
        paths = list(tree_or_paths)
    else:
        paths = leaf_paths(tree_or_paths)
    regex = compile_pattern(pattern, field=field)
    hits = [p for p in paths if regex.fullmatch(p)]
    if not hits and not allow_empty:
        raise _no_match_error(regex.pattern, paths, field)
    return hits


def mask(tree: PyTree, pattern: str | re.Pattern, *, allow_empty: bool = False) -> PyTree:
    """A tree of booleans, ``True`` where the leaf's path fully matches ``pattern``.

    Made for ``optax.masked`` and ``optax.multi_transform``.

    Example:
      >>> import optax
      >>> params = {"w": 1.0, "b": 2.0}
      >>> mask(params, "w")
      {'b': False, 'w': True}
      >>> opt = optax.masked(optax.sgd(0.1), mask(params, "w"))
    """
    regex = compile_pattern(pattern)
    flat, treedef = _flatten(tree)
    flags = [bool(regex.fullmatch(path)) for path, _ in flat]
    if not any(flags) and not allow_empty:
        raise _no_match_error(regex.pattern, [p for p, _ in flat], "pattern")
    return jax.tree_util.tree_unflatten(treedef, flags)


def select(tree: PyTree, pattern: str | re.Pattern, *, allow_empty: bool = False) -> dict:
    """A flat ``{path: leaf}`` dict of the leaves whose path fully matches ``pattern``.

    Example:
      >>> select({"a": {"kernel": 1, "bias": 2}}, r".*/kernel")
      {'a/kernel': 1}
    """
    regex = compile_pattern(pattern)
    flat, _ = _flatten(tree)
    out = {path: leaf for path, leaf in flat if regex.fullmatch(path)}
    if not out and not allow_empty:
        raise _no_match_error(regex.pattern, [p for p, _ in flat], "pattern")
    return out


def partition(
    tree: PyTree, pattern: str | re.Pattern, *, allow_empty: bool = False
) -> tuple[PyTree, PyTree]:
    """Split ``tree`` into ``(matched, rest)``, each with ``None`` where the other has a leaf.

    Both halves keep the structure of ``tree``, so ``jax.grad`` and optax can work on
    ``matched`` while ``rest`` stays frozen; :func:`combine` puts them back exactly.

    Example:
      >>> matched, rest = partition({"w": 1, "b": 2}, "w")
      >>> matched, rest
      ({'b': None, 'w': 1}, {'b': 2, 'w': None})
      >>> combine(matched, rest)
      {'b': 2, 'w': 1}
    """
    flags = mask(tree, pattern, allow_empty=allow_empty)
    matched = jax.tree.map(lambda keep, x: x if keep else None, flags, tree)
    rest = jax.tree.map(lambda keep, x: None if keep else x, flags, tree)
    return matched, rest


def combine(*trees: PyTree) -> PyTree:
    """Merge trees of the same structure, taking at each position the one non-``None`` leaf.

    The inverse of :func:`partition`.

    Example:
      >>> combine({"w": 1, "b": None}, {"w": None, "b": 2})
      {'b': 2, 'w': 1}
    """
    def pick(*leaves):
        present = [x for x in leaves if x is not None]
        if len(present) > 1:
            raise ValueError(
                "`combine` got more than one non-None leaf at the same position; "
                "expected trees from `partition`, each holding a disjoint part."
            )
        return present[0] if present else None

    return jax.tree.map(pick, *trees, is_leaf=lambda x: x is None)
