"""Pytree paths, selection, partition/combine and masks, on every container users meet."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from flax.core import FrozenDict

import jlora
from jlora import _paths as paths


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Block:
    kernel: jax.Array
    scale: jax.Array


def mixed_tree():
    return {
        "layers": [
            {"kernel": jnp.ones((2, 3)), "bias": jnp.zeros(3)},
            {"kernel": jnp.ones((3, 2)), "bias": jnp.zeros(2)},
        ],
        "pair": (jnp.ones(1), jnp.ones(2)),
        "frozen": FrozenDict({"embedding": jnp.ones((5, 2))}),
        "block": Block(kernel=jnp.ones((2, 2)), scale=jnp.ones(2)),
    }


def test_leaf_paths_of_mixed_containers():
    assert paths.leaf_paths(mixed_tree()) == [
        "block/kernel", "block/scale", "frozen/embedding",
        "layers/0/bias", "layers/0/kernel", "layers/1/bias", "layers/1/kernel",
        "pair/0", "pair/1",
    ]


def test_nnx_state_paths_drop_value_suffix():
    model = nnx.Linear(3, 4, rngs=nnx.Rngs(0))
    _, state = nnx.split(model)
    assert paths.leaf_paths(state) == ["bias", "kernel"]
    mha = nnx.MultiHeadAttention(num_heads=2, in_features=8, qkv_features=8, decode=False,
                                 rngs=nnx.Rngs(0))
    _, state = nnx.split(mha)
    assert "query/kernel" in paths.leaf_paths(state)


def test_linen_variables_paths():
    import flax.linen as nn

    variables = nn.Dense(4).init(jax.random.key(0), jnp.ones((1, 3)))
    assert paths.leaf_paths(variables) == ["params/bias", "params/kernel"]


def test_select_partition_combine_round_trip():
    tree = mixed_tree()
    selected = paths.select(tree, r".*kernel")
    assert sorted(selected) == ["block/kernel", "layers/0/kernel", "layers/1/kernel"]
    matched, rest = paths.partition(tree, r".*kernel")
    assert sorted(paths.leaf_paths(matched)) == sorted(selected)
    assert set(paths.leaf_paths(rest)).isdisjoint(selected)
    back = paths.combine(matched, rest)
    assert jax.tree.structure(back) == jax.tree.structure(tree)
    for x, y in zip(jax.tree.leaves(back), jax.tree.leaves(tree), strict=True):
        assert x is y  # exactly the same objects, not copies


def test_partition_halves_work_with_grad():
    tree = {"w": jnp.array([1.0, 2.0]), "b": jnp.array(3.0)}
    trainable, frozen = paths.partition(tree, "w")

    def loss(t):
        full = paths.combine(t, frozen)
        return jnp.sum(full["w"] ** 2) * full["b"]

    grads = jax.grad(loss)(trainable)
    np.testing.assert_allclose(grads["w"], [6.0, 12.0])
    assert grads["b"] is None


def test_mask_for_optax_masked():
    params = {"dense": {"kernel": jnp.ones((2, 2)), "bias": jnp.ones(2)}}
    mask = jlora.mask(params, r".*/kernel")
    assert mask == {"dense": {"bias": False, "kernel": True}}
    opt = optax.masked(optax.sgd(1.0), mask)
    grads = jax.tree.map(jnp.ones_like, params)
    updates, _ = opt.update(grads, opt.init(params), params)
    np.testing.assert_array_equal(updates["dense"]["kernel"], -jnp.ones((2, 2)))
    np.testing.assert_array_equal(updates["dense"]["bias"], jnp.ones(2))  # masked out: unchanged


def test_pattern_matching_nothing_lists_nearest_paths():
    tree = mixed_tree()
    with pytest.raises(jlora.PatternError, match=r"'layers/0/kernal' matches no leaf path") as e:
        paths.select(tree, "layers/0/kernal")
    assert "layers/0/kernel" in str(e.value)
    assert "in full" in str(e.value)
    with pytest.raises(jlora.PatternError, match="matches no leaf"):
        paths.partition(tree, "nothing")
    assert paths.select(tree, "nothing", allow_empty=True) == {}


def test_invalid_pattern_is_named():
    with pytest.raises(jlora.PatternError, match=r"'\(' is not a valid regular expression"):
        paths.mask({"a": 1}, "(")


def test_combine_refuses_overlap():
    with pytest.raises(ValueError, match="more than one non-None leaf"):
        paths.combine({"a": 1}, {"a": 2})
