"""Property-based tests over random kernel layouts, ranks, alphas and policies."""

import math
import tempfile

import jax
import jax.numpy as jnp
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


def dense_apply(axes):
    """f(params, x): contract x with the kernel's fan-in axes, batched over stacked axes."""
    stacked = "".join("abc"[k] for k in range(axes.count("s")))
    fan_in = "".join("ijk"[k] for k in range(axes.count("i")))
    fan_out = "".join("opq"[k] for k in range(axes.count("o")))
    spec = f"{stacked}n{fan_in},{stacked}{fan_in}{fan_out}->{stacked}n{fan_out}"

    def f(params, x):
        return jnp.sin(jnp.einsum(spec, x, params["model"]["kernel"]))

    return f


@given(layouts())
def test_factored_transform_equals_merge_for_values_and_grads(case):
    axes, shape, *_ = case
    params, adapters, k_a, k_b = build(*case)
    ad = adapters["model/kernel"]
    adapters = {"model/kernel": ad.replace(b=jax.random.normal(k_b, ad.b.shape))}
    lay = ad.layout
    stacked = shape[: lay.num_stacked]
    fan_in = tuple(shape[i] for i in lay.fan_in_axes)
    x = jax.random.normal(k_a, (*stacked, 3, *fan_in))
    f = dense_apply(axes)

    def loss_factored(ads, x):
        return jnp.sum(jlora.lora(f)(params, ads, x) ** 2)

    def loss_merged(ads, x):
        return jnp.sum(f(jlora.merge(params, ads), x) ** 2)

    value_f, grads_f = jax.value_and_grad(loss_factored, argnums=(0, 1))(adapters, x)
    value_m, grads_m = jax.value_and_grad(loss_merged, argnums=(0, 1))(adapters, x)
    np.testing.assert_allclose(value_f, value_m, rtol=1e-5, atol=1e-5)
    for got, want in zip(jax.tree.leaves(grads_f), jax.tree.leaves(grads_m), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    assert jlora.lora_report(f, params, adapters, x) == {"model/kernel": "factored"}


@given(layouts())
def test_native_and_peft_files_round_trip_exactly(case):
    axes, *_ = case
    params, adapters, k_a, k_b = build(*case)
    ad = adapters["model/kernel"]
    adapters = {"model/kernel": ad.replace(a=jax.random.normal(k_a, ad.a.shape),
                                           b=jax.random.normal(k_b, ad.b.shape))}
    with tempfile.TemporaryDirectory() as tmp:
        native = jlora.load(jlora.save(f"{tmp}/native", adapters), params)
        peft = jlora.peft.load(jlora.peft.save(f"{tmp}/peft", adapters), params,
                               layouts={".*kernel": axes})
    for loaded in (native, peft):
        back = loaded["model/kernel"]
        assert (back.layout, back.rank, back.scale) == (ad.layout, ad.rank,
                                                         adapters["model/kernel"].scale)
        np.testing.assert_array_equal(back.a, adapters["model/kernel"].a)
        np.testing.assert_array_equal(back.b, adapters["model/kernel"].b)
