"""`jlora.init` and `jlora.merge`/`unmerge` on every kernel layout, with real flax modules.

Merged weights are checked against a direct numpy computation (a loop over stacked
layers with `np.tensordot`), with and without jit.
"""

import math

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from scipy import stats

import jlora


class Conv(nn.Module):
    ndim: int

    @nn.compact
    def __call__(self, x):
        return nn.Conv(4, (3,) * self.ndim, name=f"conv{self.ndim}d")(x)


class Named(nn.Module):
    """Wraps one module under a fixed name so its params have a readable path."""

    make: object
    label: str

    @nn.compact
    def __call__(self, x):
        return self.make(name=self.label)(x)


class ScanBlock(nn.Module):
    @nn.compact
    def __call__(self, x, _):
        return nn.relu(nn.Dense(5, name="mlp")(x)), None


class Scanned(nn.Module):
    @nn.compact
    def __call__(self, x):
        block = nn.scan(ScanBlock, variable_axes={"params": 0}, split_rngs={"params": True},
                        length=3)
        return block(name="layers")(x, None)[0]


def linen_params(module, x):
    return module.init(jax.random.key(1), x)["params"]


# name -> (params factory, LoraConfig kwargs, expected {path: layout})
CASES = {
    "dense": (
        lambda: linen_params(Named(lambda name: nn.Dense(6, name=name), "dense"), jnp.ones((1, 5))),
        dict(rank=2, targets=".*kernel"), {"dense/kernel": "io"}),
    "dense_general_out": (
        lambda: linen_params(Named(lambda name: nn.DenseGeneral((2, 3), name=name), "query"),
                             jnp.ones((1, 5))),
        dict(rank=3, targets=".*kernel"), {"query/kernel": "ioo"}),
    "dense_general_in": (
        lambda: linen_params(
            Named(lambda name: nn.DenseGeneral(4, axis=(-2, -1), name=name), "proj"),
            jnp.ones((1, 2, 3))),
        dict(rank=2, targets=".*kernel", layouts={"proj/kernel": "iio"}), {"proj/kernel": "iio"}),
    "einsum": (
        lambda: linen_params(
            Named(lambda name: nn.Einsum((5, 2, 3), "bi,ihd->bhd", name=name), "heads"),
            jnp.ones((1, 5))),
        dict(rank=2, targets=".*kernel", layouts={".*heads.*": "ioo"}), {"heads/kernel": "ioo"}),
    "conv1d": (lambda: linen_params(Conv(1), jnp.ones((1, 8, 2))),
               dict(rank=2, targets=".*kernel"), {"conv1d/kernel": "wio"}),
    "conv2d": (lambda: linen_params(Conv(2), jnp.ones((1, 6, 6, 2))),
               dict(rank=3, targets=".*kernel"), {"conv2d/kernel": "wwio"}),
    "conv3d": (lambda: linen_params(Conv(3), jnp.ones((1, 4, 4, 4, 2))),
               dict(rank=2, targets=".*kernel"), {"conv3d/kernel": "wwwio"}),
    "embed": (
        lambda: linen_params(Named(lambda name: nn.Embed(10, 4, name=name), "embed"),
                             jnp.ones((1, 3), jnp.int32)),
        dict(rank=2, targets=".*embedding"), {"embed/embedding": "vf"}),
    "scan": (lambda: linen_params(Scanned(), jnp.ones((1, 5))),
             dict(rank=2, targets=".*kernel", layouts={"layers/.*": "s..."}),
             {"layers/mlp/kernel": "sio"}),
    "hand_stacked_2": (
        lambda: {"blocks": {"kernel": jax.random.normal(jax.random.key(2), (2, 3, 4, 5))}},
        dict(rank=2, targets=".*kernel", layouts={"blocks/kernel": "ssio"}),
        {"blocks/kernel": "ssio"}),
    "nnx_linear": (lambda: nnx.split(nnx.Linear(5, 6, rngs=nnx.Rngs(0)))[1],
                   dict(rank=2, targets="kernel"), {"kernel": "io"}),
    "nnx_conv": (lambda: nnx.split(nnx.Conv(2, 4, (3, 3), rngs=nnx.Rngs(0)))[1],
                 dict(rank=2, targets="kernel", layouts={"kernel": "wwio"}), {"kernel": "wwio"}),
    "nnx_embed": (lambda: nnx.split(nnx.Embed(10, 4, rngs=nnx.Rngs(0)))[1],
                  dict(rank=2, targets="embedding"), {"embedding": "vf"}),
    "nnx_mha": (
        lambda: nnx.split(nnx.MultiHeadAttention(num_heads=2, in_features=8, qkv_features=8,
                                                 decode=False, rngs=nnx.Rngs(0)))[1],
        dict(rank=2, targets=".*/kernel"),
        {"query/kernel": "ioo", "key/kernel": "ioo", "value/kernel": "ioo", "out/kernel": "iio"}),
}


def reference_delta(a, b, layout: jlora.Layout, scale):
    """scale * A @ B in the kernel's shape, one stacked index at a time, in float64."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    stacked = a.shape[: layout.num_stacked]
    out = np.zeros(stacked + a.shape[layout.num_stacked:-1] + b.shape[layout.num_stacked + 1:])
    for idx in np.ndindex(*stacked):
        out[idx] = np.tensordot(a[idx], b[idx], axes=1)
    return scale * out


def randomized(adapters, seed=0):
    """Adapters with every factor random, so merges are not trivially the base."""
    keys = iter(jax.random.split(jax.random.key(seed), 2 * len(adapters)))
    return {
        path: ad.replace(a=jax.random.normal(next(keys), ad.a.shape, ad.a.dtype),
                         b=jax.random.normal(next(keys), ad.b.shape, ad.b.dtype))
        for path, ad in adapters.items()
    }


@pytest.mark.parametrize("case", sorted(CASES))
def test_init_layouts_and_shapes(case):
    make, kwargs, expected = CASES[case]
    params = make()
    adapters = jlora.init(jax.random.key(0), params, jlora.LoraConfig(**kwargs))
    assert {p: ad.layout.axes for p, ad in adapters.items()} == expected
    flat = jlora.select(params, ".*")
    for path, ad in adapters.items():
        a_shape, b_shape = ad.layout.factor_shapes(flat[path].shape, ad.rank)
        assert (ad.a.shape, ad.b.shape) == (a_shape, b_shape)
        assert ad.kernel_shape == flat[path].shape
        assert ad.a.dtype == ad.b.dtype == jnp.float32


class MergeTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_merge_matches_numpy_on_every_layout(self):
        merge = self.variant(jlora.merge)
        unmerge = self.variant(jlora.unmerge)
        for case, (make, kwargs, _) in sorted(CASES.items()):
            for policy in ("standard", "rslora"):
                params = make()
                config = jlora.LoraConfig(alpha=3.0, scaling=policy, **kwargs)
                adapters = randomized(jlora.init(jax.random.key(0), params, config))
                merged = merge(params, adapters)
                before, after = jlora.select(params, ".*"), jlora.select(merged, ".*")
                assert sorted(before) == sorted(after), case
                for path, w in before.items():
                    if path not in adapters:
                        np.testing.assert_array_equal(after[path], w)
                        continue
                    ad = adapters[path]
                    expected_scale = 3.0 / (ad.rank if policy == "standard" else math.sqrt(ad.rank))
                    assert ad.scale == pytest.approx(expected_scale)
                    want = np.asarray(w, np.float64) + reference_delta(
                        ad.a, ad.b, ad.layout, expected_scale)
                    np.testing.assert_allclose(after[path], want, rtol=1e-5, atol=1e-5,
                                               err_msg=f"{case} {path}")
                back = jlora.select(unmerge(merged, adapters), ".*")
                for path, w in before.items():
                    np.testing.assert_allclose(back[path], w, rtol=1e-5, atol=1e-5,
                                               err_msg=f"{case} {path}")

    @chex.variants(with_jit=True, without_jit=True)
    def test_merge_under_grad_is_the_delta_derivative(self):
        params = {"dense": {"kernel": jnp.ones((4, 3))}}
        adapters = randomized(jlora.init(jax.random.key(0), params, jlora.LoraConfig(rank=2)))

        @self.variant
        def loss(ads):
            return jnp.sum(jlora.merge(params, ads)["dense"]["kernel"])

        grads = jax.grad(loss)(adapters)["dense/kernel"]
        ad = adapters["dense/kernel"]
        # d/dA sum(s A B) = s * 1 @ B^T ; d/dB = s * A^T @ 1
        np.testing.assert_allclose(grads.a, ad.scale * np.ones((4, 3)) @ np.asarray(ad.b).T,
                                   rtol=1e-5)
        np.testing.assert_allclose(grads.b, ad.scale * np.asarray(ad.a).T @ np.ones((4, 3)),
                                   rtol=1e-5)


def test_merged_linen_dense_output_matches_direct_computation():
    module = Named(lambda name: nn.Dense(6, name=name), "dense")
    x = jax.random.normal(jax.random.key(3), (2, 5))
    params = linen_params(module, x)
    adapters = randomized(jlora.init(jax.random.key(0), params, jlora.LoraConfig(rank=2)))
    y = module.apply({"params": jlora.merge(params, adapters)}, x)
    ad = adapters["dense/kernel"]
    w = np.asarray(params["dense"]["kernel"]) + ad.scale * np.asarray(ad.a) @ np.asarray(ad.b)
    np.testing.assert_allclose(y, np.asarray(x) @ w + np.asarray(params["dense"]["bias"]),
                               rtol=1e-5, atol=1e-5)


def test_nnx_round_trip_through_split_and_merge():
    model = nnx.Linear(5, 6, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    adapters = randomized(jlora.init(jax.random.key(0), state,
                                     jlora.LoraConfig(rank=2, targets="kernel")))
    adapted = nnx.merge(graphdef, jlora.merge(state, adapters))
    x = jnp.ones((1, 5))
    ad = adapters["kernel"]
    w = np.asarray(model.kernel[...]) + ad.scale * np.asarray(ad.a) @ np.asarray(ad.b)
    np.testing.assert_allclose(adapted(x), np.asarray(x) @ w + np.asarray(model.bias[...]),
                               rtol=1e-5, atol=1e-5)


def test_default_init_matches_peft():
    params = {"lin": {"kernel": jnp.ones((400, 300))},
              "conv": {"kernel": jnp.ones((3, 3, 40, 30))},
              "emb": {"embedding": jnp.ones((500, 30))}}
    ads = jlora.init(jax.random.key(0), params, jlora.LoraConfig(rank=8, targets=".*"))
    lin, conv, emb = ads["lin/kernel"], ads["conv/kernel"], ads["emb/embedding"]
    # kaiming_uniform(a=sqrt(5)): U(-1/sqrt(fan_in), 1/sqrt(fan_in)); B zero.
    for ad, fan_in in ((lin, 400), (conv, 3 * 3 * 40)):
        bound = 1 / math.sqrt(fan_in)
        assert float(jnp.abs(ad.a).max()) <= bound
        assert float(jnp.abs(ad.a).max()) > 0.95 * bound
        assert float(jnp.abs(ad.b).max()) == 0.0
    # Embeddings the other way round: A zero, B standard normal.
    assert float(jnp.abs(emb.a).max()) == 0.0
    assert abs(float(jnp.std(emb.b)) - 1.0) < 0.1


def test_gaussian_init_std_is_one_over_rank():
    params = {"lin": {"kernel": jnp.ones((2000, 300))}}
    ad = jlora.init(jax.random.key(0), params, jlora.LoraConfig(rank=8, init="gaussian"))[
        "lin/kernel"]
    assert abs(float(jnp.std(ad.a)) - 1 / 8) < 0.005
    assert float(jnp.abs(ad.b).max()) == 0.0


def test_init_is_deterministic_with_and_without_jit_and_per_path():
    make, kwargs, _ = CASES["nnx_mha"]
    params = make()
    config = jlora.LoraConfig(**kwargs)
    eager = jlora.init(jax.random.key(7), params, config)
    jitted = jax.jit(jlora.init, static_argnums=2)(jax.random.key(7), params, config)
    again = jlora.init(jax.random.key(7), params, config)
    for path in eager:
        np.testing.assert_array_equal(eager[path].a, jitted[path].a)
        np.testing.assert_array_equal(eager[path].a, again[path].a)
    # Kernels get independent keys.
    assert not np.allclose(eager["query/kernel"].a, eager["key/kernel"].a)
    # Adding an unrelated parameter (even an adapted one) changes no existing adapter.
    bigger = {**jlora.select(params, ".*"), "extra/kernel": jnp.ones((8, 8))}
    more = jlora.init(jax.random.key(7), bigger, jlora.LoraConfig(**{**kwargs,
                                                                      "targets": ".*kernel"}))
    for path in eager:
        np.testing.assert_array_equal(eager[path].a, more[path].a)


def test_init_under_eval_shape_allocates_nothing():
    params = {"big": {"kernel": jax.ShapeDtypeStruct((4096, 4096), jnp.bfloat16)}}
    shapes = jax.eval_shape(lambda: jlora.init(jax.random.key(0), params, jlora.LoraConfig()))
    assert shapes["big/kernel"].a.shape == (4096, 8)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_low_precision_kernel_merges_with_float32_accumulation(dtype):
    w = jax.random.normal(jax.random.key(0), (64, 32)).astype(dtype)
    params = {"d": {"kernel": w}}
    adapters = randomized(jlora.init(jax.random.key(1), params, jlora.LoraConfig(rank=4)))
    merged = jlora.merge(params, adapters)["d"]["kernel"]
    assert merged.dtype == dtype
    ad = adapters["d/kernel"]
    exact = np.asarray(w, np.float32) + ad.scale * (np.asarray(ad.a) @ np.asarray(ad.b))
    np.testing.assert_array_equal(merged, jnp.asarray(exact).astype(dtype))


def test_factor_dtype_is_configurable():
    params = {"d": {"kernel": jnp.ones((8, 4))}}
    ad = jlora.init(jax.random.key(0), params, jlora.LoraConfig(rank=2, dtype=jnp.bfloat16))[
        "d/kernel"]
    assert ad.a.dtype == ad.b.dtype == jnp.bfloat16


def test_delta_alone():
    params = {"d": {"kernel": jnp.zeros((8, 4))}}
    adapters = randomized(jlora.init(jax.random.key(0), params, jlora.LoraConfig(rank=2)))
    np.testing.assert_allclose(jlora.delta(adapters)["d/kernel"],
                               jlora.merge(params, adapters)["d"]["kernel"], rtol=1e-6)


# -- errors -------------------------------------------------------------------------

def small_params():
    return {"dense": {"kernel": jnp.ones((8, 4)), "bias": jnp.zeros(4)},
            "norm": {"scale": jnp.ones(4)}, "step": jnp.zeros((2, 2), jnp.int32)}


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(targets="dense/kernal"), r"`targets` pattern 'dense/kernal' matches no leaf path"
                                       r"[\s\S]*dense/kernel"),
        (dict(targets="dense/kernel", exclude="dense/.*"), r"matches only paths that `exclude`"),
        (dict(targets="dense/bias"), r"'dense/bias' with shape \(4,\).*at least 2 axes"),
        (dict(targets="norm/scale"), r"'norm/scale' with shape \(4,\)"),
        (dict(targets="step"), r"'step' with shape \(2, 2\) and dtype int32.*floating-point"),
        (dict(targets="dense/kernel", rank=5), r"Rank 5 .*'dense/kernel' with shape \(8, 4\)"
                                               r".*largest useful rank 4"),
        (dict(targets="dense/kernel", rank_pattern={"head/.*": 2}),
         r"`rank_pattern\['head/\.\*'\]` pattern 'head/\.\*' matches no leaf path"),
        (dict(targets="dense/kernel", alpha_pattern={"x": 2.0}),
         r"`alpha_pattern\['x'\]` pattern 'x' matches no leaf"),
    ],
)
def test_init_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        jlora.init(jax.random.key(0), small_params(), jlora.LoraConfig(**kwargs))


def test_ambiguous_layout_error_names_path_and_fix():
    params = {"blocks": {"kernel": jnp.ones((2, 8, 4))}}
    with pytest.raises(jlora.LayoutError, match=r"'blocks/kernel' with shape \(2, 8, 4\).*"
                                                r"LoraConfig.layouts"):
        jlora.init(jax.random.key(0), params, jlora.LoraConfig())


def test_init_requires_a_config():
    with pytest.raises(TypeError, match="must be a jlora.LoraConfig, got dict"):
        jlora.init(jax.random.key(0), small_params(), {"rank": 2})


def test_adapters_from_another_model_are_refused():
    params = small_params()
    adapters = jlora.init(jax.random.key(0), params,
                          jlora.LoraConfig(rank=2, targets="dense/kernel"))
    with pytest.raises(ValueError, match=r"'dense/kernel' fits a kernel of shape \(8, 4\) but "
                                         r"the kernel there has shape \(8, 5\)"):
        jlora.merge({**params, "dense": {"kernel": jnp.ones((8, 5))}}, adapters)
    with pytest.raises(ValueError, match=r"'dense/kernel' has no kernel in the params tree"
                                         r".*'dense2/kernel'"):
        jlora.merge({"dense2": {"kernel": jnp.ones((8, 4))}}, adapters)
    with pytest.raises(TypeError, match="must be the dict"):
        jlora.merge(params, list(adapters.values()))


def test_summary_table():
    make, kwargs, _ = CASES["nnx_mha"]
    params = make()
    adapters = jlora.init(jax.random.key(0), params,
                          jlora.LoraConfig(scaling="rslora", alpha=4.0, **kwargs))
    text = jlora.summary(params, adapters)
    lines = text.splitlines()
    assert lines[0].split() == ["path", "kernel", "shape", "layout", "rank", "alpha", "policy",
                                "scale", "params"]
    row = next(line for line in lines if line.startswith("query/kernel"))
    assert row.split() == ["query/kernel", "8x2x4", "ioo", "2", "4", "rslora", "2.828", "32"]
    trainable = sum(ad.num_params for ad in adapters.values())
    total = sum(x.size for x in jax.tree.leaves(params)) + trainable
    assert lines[-1] == (f"trainable params: {trainable:,} || all params: {total:,} || "
                         f"trainable%: {100 * trainable / total:.4f}")


# -- PEFT's init distributions, pinned exactly ----------------------------------------------
#
# A fan-in of 4 drawn many times (a kernel stacked 16384 times: 262144 entries per factor)
# puts the sample extremes within 1e-3 of the bound with certainty (the chance that none of
# n uniform draws lands in the top 1e-3/2 of the range is (1 - 5e-4)^n = e^-131), so a
# bound of 1/sqrt(fan_in + 1) = 0.447 instead of 1/sqrt(4) = 0.5 cannot pass; the moments
# and a Kolmogorov-Smirnov distance then pin the distribution's shape.

STACK = 16384
# (layout, kernel shape) with fan-in 4 and fan-out 4, the stacked axis anywhere: dense
# with one and two fan-in axes, a conv (window 2x2, one input channel) in flax's and in
# torch's axis order, and the scan axis second as MaxText stores it.
FAN_IN_4 = [("sio", (STACK, 4, 4)), ("siio", (STACK, 2, 2, 4)),
            ("swwio", (STACK, 2, 2, 1, 4)), ("soiww", (STACK, 4, 1, 2, 2)),
            ("iso", (4, STACK, 4))]
EMBED_4x4 = [("svf", (STACK, 4, 4)), ("fsv", (4, STACK, 4))]


def kaiming_uniform_bound(fan_in):
    """The bound of PEFT's ``kaiming_uniform_(lora_A.weight, a=math.sqrt(5))``, computed as
    torch computes it: the leaky_relu gain, std = gain / sqrt(fan_in), bound = sqrt(3) std."""
    a = math.sqrt(5)
    gain = math.sqrt(2.0 / (1 + a**2))
    return math.sqrt(3.0) * gain / math.sqrt(fan_in)


def init_one(axes, shape, **config):
    params = {"k": jnp.ones(shape)}
    config = jlora.LoraConfig(rank=4, targets="k", layouts={"k": axes}, **config)
    return jlora.init(jax.random.key(0), params, config)["k"]


def assert_distributed_as(x, dist, what):
    """Mean and std within 5 standard errors of ``dist``'s, and a Kolmogorov-Smirnov
    distance below its 1e-6 critical value, 2.69/sqrt(n) (0.005 here; a normal in place of
    a uniform of the same std is at 0.057): false alarms are as unlikely as in the rest."""
    x = np.asarray(x, np.float64).ravel()
    n = x.size
    mean, std = dist.mean(), dist.std()
    kurtosis = dist.stats(moments="k") + 3.0  # mu4 / sigma^4
    assert abs(x.mean() - mean) < 5 * std / math.sqrt(n), (what, x.mean(), mean)
    # The sample std's standard error is sigma * sqrt((kurtosis - 1) / (4n)).
    assert abs(x.std() - std) < 5 * std * math.sqrt((kurtosis - 1) / (4 * n)), (what, x.std(),
                                                                                 std)
    distance = stats.kstest(x, dist.cdf).statistic
    assert distance < 2.69 / math.sqrt(n), (what, distance)


@pytest.mark.parametrize("axes, shape", FAN_IN_4, ids=[a for a, _ in FAN_IN_4])
def test_default_init_is_peft_kaiming_uniform_exactly(axes, shape):
    ad = init_one(axes, shape)
    bound = kaiming_uniform_bound(4)
    assert bound == pytest.approx(0.5, rel=1e-12)  # torch's formula is 1/sqrt(fan_in)
    a = np.asarray(ad.a)
    assert a.shape == ad.layout.factor_shapes(shape, 4)[0] and a.size == STACK * 16
    assert a.max() < bound and a.min() >= -bound, (a.min(), a.max())
    assert a.max() > bound * (1 - 1e-3) and a.min() < -bound * (1 - 1e-3), (a.min(), a.max())
    assert_distributed_as(a, stats.uniform(-bound, 2 * bound), axes)
    assert not np.asarray(ad.b).any()


@pytest.mark.parametrize("axes, shape", EMBED_4x4, ids=[a for a, _ in EMBED_4x4])
def test_embedding_init_is_peft_b_standard_normal_a_zero(axes, shape):
    ad = init_one(axes, shape)
    assert not np.asarray(ad.a).any()
    assert np.asarray(ad.b).size == STACK * 16
    assert_distributed_as(ad.b, stats.norm(0.0, 1.0), axes)


@pytest.mark.parametrize("axes, shape", FAN_IN_4[:3], ids=[a for a, _ in FAN_IN_4[:3]])
def test_gaussian_init_is_peft_normal_with_std_one_over_rank(axes, shape):
    ad = init_one(axes, shape, init="gaussian")
    assert_distributed_as(ad.a, stats.norm(0.0, 1 / 4), axes)
    assert not np.asarray(ad.b).any()
