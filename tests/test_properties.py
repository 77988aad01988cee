"""Property-based tests over random kernel layouts, ranks, alphas and policies."""

import math

import jax
import numpy as np
from hypothesis import given
from hypothesis import strategies as st

import jlora

POLICIES = ["standard", "rslora", lambda r, a: a / (r + 1)]


@st.composite
def layouts(draw):
    """A random (layout, shape, rank, alpha, policy) with 0-2 stacked, 1-2 fan-in/out axes."""
    n_stacked = draw(st.integers(0, 2))
    n_in = draw(st.integers(1, 2))
    n_out = draw(st.integers(1, 2))
    axes = "s" * n_stacked + "i" * n_in + "o" * n_out
    shape = tuple(draw(st.integers(1, 4)) for _ in axes)
    layout = jlora.Layout(axes)
    rank = draw(st.integers(1, min(layout.max_rank(shape), 4)))
    alpha = draw(st.floats(0.25, 64.0))
    policy = draw(st.sampled_from(POLICIES))
    seed = draw(st.integers(0, 2**16))
    return axes, shape, rank, alpha, policy, seed


def build(axes, shape, rank, alpha, policy, seed, extra=None):
    k_w, k_init, k_a, k_b = jax.random.split(jax.random.key(seed), 4)
    params = {"model": {"kernel": jax.random.normal(k_w, shape)}}
    if extra is not None:
        params["model"]["extra"] = extra
    config = jlora.LoraConfig(rank=rank, alpha=alpha, scaling=policy, targets=".*kernel",
                              layouts={".*kernel": axes})
    adapters = jlora.init(k_init, params, config)
    return params, adapters, k_a, k_b


def reference_delta(a, b, num_stacked, scale):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    stacked = a.shape[:num_stacked]
    out = np.zeros(stacked + a.shape[num_stacked:-1] + b.shape[num_stacked + 1:])
    for idx in np.ndindex(*stacked):
        out[idx] = np.tensordot(a[idx], b[idx], axes=1)
    return scale * out


@given(layouts())
def test_merge_matches_reference_and_unmerge_round_trips(case):
    axes, shape, rank, alpha, policy, seed = case
    params, adapters, k_a, k_b = build(*case)
    ad = adapters["model/kernel"]
    ad = ad.replace(a=jax.random.normal(k_a, ad.a.shape), b=jax.random.normal(k_b, ad.b.shape))
    adapters = {"model/kernel": ad}
    expected_scale = jlora.scaling.get(policy)(rank, alpha)
    assert math.isclose(ad.scale, expected_scale)
    merged = jlora.merge(params, adapters)
    w = np.asarray(params["model"]["kernel"], np.float64)
    want = w + reference_delta(ad.a, ad.b, ad.layout.num_stacked, expected_scale)
    np.testing.assert_allclose(merged["model"]["kernel"], want, rtol=1e-5, atol=1e-4)
    back = jlora.unmerge(merged, adapters)
    np.testing.assert_allclose(back["model"]["kernel"], w, rtol=1e-5, atol=1e-4)


@given(layouts(), st.integers(0, 2**16))
def test_init_deterministic_and_independent_of_unrelated_params(case, other_seed):
    params, adapters, _, _ = build(*case)
    again = build(*case)[1]
    unrelated = jax.random.normal(jax.random.key(other_seed), (3, 2))
    with_extra = build(*case, extra=unrelated)[1]
    for other in (again, with_extra):
        for field in ("a", "b"):
            np.testing.assert_array_equal(getattr(adapters["model/kernel"], field),
                                          getattr(other["model/kernel"], field))


@given(layouts())
def test_partition_combine_round_trip(case):
    _, shape, *_ = case
    params = {"model": {"kernel": np.ones(shape), "extra": [np.ones(3), np.zeros(2)]}}
    matched, rest = jlora.partition(params, ".*kernel")
    back = jlora.combine(matched, rest)
    assert jax.tree.structure(back) == jax.tree.structure(params)
    for x, y in zip(jax.tree.leaves(back), jax.tree.leaves(params), strict=True):
        assert x is y
