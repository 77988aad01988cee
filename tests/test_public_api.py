"""The public surface: ``jlora.__all__``, the deprecated module stubs that forward the old
names for one release, and the deprecated call forms."""

from __future__ import annotations

import importlib
import types
import warnings

import jax
import jax.numpy as jnp
import pytest

import jlora
from jlora._deprecation import MOVED_MODULES


def test_all_names_exist_and_are_unique():
    assert len(jlora.__all__) == len(set(jlora.__all__))
    missing = [n for n in jlora.__all__ if not hasattr(jlora, n)]
    assert not missing


def test_every_public_module_attribute_is_in_all():
    # Anything importable from `jlora` that is not private, a namespace import or
    # `annotations` must be listed: one place says what the API is.
    public = {n for n, v in vars(jlora).items()
              if not n.startswith("_") and not isinstance(v, types.ModuleType)}
    assert public <= set(jlora.__all__), sorted(public - set(jlora.__all__))


@pytest.mark.parametrize("old", sorted(MOVED_MODULES))
def test_old_modules_forward_with_a_warning(old):
    stub = importlib.import_module(f"jlora.{old}")
    mapping = stub.__getattr__.renamed
    assert mapping, f"jlora.{old} forwards nothing"
    for name, new in mapping.items():
        with pytest.warns(DeprecationWarning, match=rf"`jlora\.{old}\.{name}` is deprecated"
                                                    rf".*use `jlora\.{new}`"):
            got = getattr(stub, name)
        assert got is getattr(jlora, new)


def test_old_module_attribute_without_import():
    # `jlora.io.save` worked without `import jlora.io`: it still does, with the warning.
    with pytest.warns(DeprecationWarning, match=r"use `jlora\.save`"):
        assert jlora.io.save is jlora.save


def test_internal_names_warn_that_they_are_internal():
    with pytest.warns(DeprecationWarning, match=r"`jlora\.paths\.nearest_paths` is internal"):
        assert callable(jlora.paths.nearest_paths)
    with pytest.raises(AttributeError, match="'jlora.paths' has no attribute 'nope'"):
        jlora.paths.nope  # noqa: B018


def test_unknown_top_level_attribute():
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        jlora.nope  # noqa: B018


@pytest.fixture(scope="module")
def halves():
    params = {"enc": {"kernel": jnp.ones((4, 4)), "bias": jnp.arange(4.0)}}
    ads = jlora.init(jax.random.key(0), params, jlora.LoraConfig(rank=2))
    ads = jax.tree.map(lambda x: x + 1.0, ads)  # B nonzero: the merge is visible
    return params, ads, jlora.split_trainable(params, ads, bias="all")


def test_merge_trainable_old_order_warns_and_agrees(halves):
    params, ads, (trainable, frozen) = halves
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        new = jlora.merge_trainable(trainable, frozen)
    with pytest.warns(DeprecationWarning, match=r"merge_trainable\(trainable, frozen\)"):
        old = jlora.merge_trainable(frozen, trainable)
    want = jlora.merge(params, ads)
    for got in (new, old):
        assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), got, want))


def test_plan_returns_records_and_dict_access_warns():
    params = {"d": {"kernel": jnp.ones((4, 8))}}
    entry = jlora.plan(params, jlora.LoraConfig(rank=2, alpha=4.0))["d/kernel"]
    assert isinstance(entry, jlora.KernelPlan)
    assert (entry.rank, entry.alpha, entry.scale, entry.shape) == (2, 4.0, 2.0, (4, 8))
    with pytest.warns(DeprecationWarning, match=r"use plan\(\.\.\.\)\[path\]\.rank"):
        assert entry["rank"] == 2


def test_errors_show_their_public_names():
    for error in (jlora.AdapterFormatError, jlora.PatternError, jlora.LayoutError):
        assert error.__module__ == "jlora" and getattr(jlora, error.__name__) is error
