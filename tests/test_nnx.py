"""`jlora.nnx`: adapters in an NNX model as `nnx.LoRAParam`, applied by `jlora.lora`.

The one equation, for an adapted model: ``model(x)`` and the gradients of a loss with
respect to its ``LoRAParam`` s equal those of the merged model (``jlora.merge`` of the
base with the same adapters), with and without ``nnx.jit``, in float32; and every state
update a call makes (batch statistics, RNG counts, KV caches) reaches the model as it
does without adapters. Then NNX's transforms over layers (``nnx.scan``, ``nnx.vmap``,
``nnx.remat``), sharding metadata, training with ``nnx.Optimizer``, taking the adapters
out and putting them back, named sets, and the errors.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jlora

pytestmark = pytest.mark.filterwarnings("error::jlora.FactoredFallbackWarning")

F32_TOL = dict(rtol=2e-5, atol=2e-5)
D = 8
IDS = jnp.array([[1, 2, 3, 4, 5], [6, 7, 8, 9, 10]])
BASE_PARAMS = nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam))
LORA = nnx.DiffState(0, nnx.LoRAParam)


class Net(nnx.Module):
    """Every kind of kernel NNX has, and state that changes during a call."""

    def __init__(self, rngs: nnx.Rngs):
        self.embed = nnx.Embed(12, D, rngs=rngs)
        self.conv = nnx.Conv(D, D, (3,), rngs=rngs)
        self.query = nnx.Linear(D, D, rngs=rngs)
        self.key = nnx.Linear(D, D, rngs=rngs)
        self.value = nnx.Linear(D, D, rngs=rngs)
        self.out = nnx.LinearGeneral((2, D // 2), D, axis=(-2, -1), rngs=rngs)
        self.up = nnx.Einsum("btd,df->btf", (D, 2 * D), rngs=rngs)
        self.norm = nnx.BatchNorm(2 * D, rngs=rngs)
        self.drop = nnx.Dropout(0.3, rngs=rngs)

    def __call__(self, ids):
        x = self.embed(ids)
        x = x + self.conv(x)
        q, k = self.query(x), self.key(x)
        v = self.value(x).reshape(*x.shape[:2], 2, D // 2)
        weights = jax.nn.softmax(jnp.einsum("btd,bsd->bts", q, k) / np.sqrt(D), axis=-1)
        x = x + self.out(jnp.einsum("bts,bshk->bthk", weights, v))
        h = nnx.gelu(self.up(x))
        return self.drop(self.norm(h.reshape(-1, 2 * D)))


# Tiny models: compiling dominates and running costs nothing, so XLA's backend
# optimisations are off for the references (about half the compile time; the same values).
jit_tiny = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})


def normal(shape, seed: int = 0, scale: float = 1.0):
    """Random test data from numpy: ``jax.random`` would compile once per shape."""
    return jax.device_put(np.asarray(scale * np.random.default_rng(seed).standard_normal(shape),
                                      np.float32))


def random_like(tree, seed: int = 0, scale: float = 0.5):
    """Random values of the shapes and dtypes of ``tree``'s leaves, from numpy."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(
        lambda x: jax.device_put(np.asarray(scale * rng.standard_normal(x.shape), x.dtype)), tree)


def randomise_b(model, seed: int = 0):
    """B is zero at init; give every adapter a real update, so the tests compare
    something."""
    ads = jlora.nnx.get_adapters(model)
    b = random_like({p: ad.b for p, ad in ads.items()}, seed)
    return jlora.nnx.put_adapters(model, {p: ad.replace(b=b[p]) for p, ad in ads.items()})


def adapt(model, config, seed: int = 0, scale: float = 0.5, zero_b: bool = False):
    """``jlora.nnx.apply_lora`` with random A and B (B zero, as at init, if ``zero_b``):
    ``put_adapters`` of the adapters ``init_adapters`` makes, their shapes and metadata
    taken on shapes only (its initialisers would compile once per factor shape) and their
    values from numpy."""
    like = jax.eval_shape(lambda key: jlora.nnx.init_adapters(model, config, rngs=key),
                          jax.random.key(1))
    ads = random_like(like, seed, scale)
    if zero_b:
        ads = {p: ad.replace(b=jax.device_put(np.zeros(ad.b.shape, ad.b.dtype)))
               for p, ad in ads.items()}
    return jlora.nnx.put_adapters(model, ads)


def loss_and_output(model, *args):
    out = model(*args)
    return jnp.mean(out**2), out


def grads_by_kernel(grads: nnx.State) -> dict:
    """``{kernel path: {factor: gradient}}`` from the metadata of each ``LoRAParam``."""
    out = {}
    for path, var in nnx.to_flat_state(grads):
        kernel = "/".join(map(str, (*path[:-1], var.get_metadata("lora_kernel"))))
        out.setdefault(kernel, {})[var.get_metadata("lora_factor")] = np.asarray(
            var.get_value())
    return out


def merged_reference(base, adapters, *args):
    """The reference: ``((loss, output), the base's updated state, gradients)`` of
    :func:`loss_and_output` of the base merged with ``adapters`` (``jlora.merge``),
    w.r.t. the adapters."""
    graphdef, params, rest = nnx.split(base, nnx.Param, ...)

    def f(ads, rest):
        rest = jax.tree.map(lambda x: x, rest)  # variables of this trace: the call updates them
        model = nnx.merge(graphdef, jlora.merge(params, ads), rest)
        loss, out = loss_and_output(model, *args)
        return loss, (out, nnx.state(model, nnx.Not(nnx.Param)))

    (loss, (out, state)), grads = jit_tiny(jax.value_and_grad(f, has_aux=True))(adapters, rest)
    return (loss, out), state, {p: {"a": np.asarray(g.a), "b": np.asarray(g.b)}
                                for p, g in grads.items()}


def assert_same_grads(got: dict, want: dict):
    assert sorted(got) == sorted(want)
    for path in want:
        for factor in ("a", "b"):
            # float32 rounding relative to the largest entry (the stacked model's grow large)
            scale = max(1.0, float(np.abs(want[path][factor]).max()))
            np.testing.assert_allclose(got[path][factor], want[path][factor], rtol=2e-5,
                                       atol=2e-5 * scale, err_msg=f"{path} {factor}")


def build(cls, rngs: nnx.Rngs, seed: int = 0):
    """``cls(rngs)`` with random parameters from numpy (scaled like LeCun's): NNX's
    initialisers would compile once per shape. The other variables (batch statistics,
    RNG streams) are NNX's own, from one small compile that keeps only them."""
    graphdef, params, _ = nnx.split(nnx.eval_shape(cls, rngs), nnx.Param, ...)
    rest = nnx.jit(lambda rngs: nnx.state(cls(rngs), nnx.Not(nnx.Param)))(rngs)
    rng = np.random.default_rng(seed)

    def draw(x):
        scale = 1 / np.sqrt(np.prod(x.shape[:-1])) if x.ndim >= 2 else 0.1
        return jax.device_put(np.asarray(scale * rng.standard_normal(x.shape), x.dtype))

    return nnx.merge(graphdef, jax.tree.map(draw, params), rest)


@pytest.fixture(scope="module")
def net():
    """``(base, adapted)``: the adapted model is a copy of the base with random factors."""
    base = build(Net, nnx.Rngs(0, dropout=1))
    config = jlora.LoraConfig(rank=2, alpha=4.0, scaling="rslora",
                              targets=r".*/(kernel|embedding)")
    return base, adapt(nnx.clone(base), config)


def test_adapters_are_lora_params_beside_their_kernels(net):
    base = nnx.clone(net[0])
    kernel = base.query.kernel.get_value()
    model = jlora.nnx.apply_lora(base, jlora.LoraConfig(rank=2, alpha=4.0), rngs=nnx.Rngs(2))
    assert model is base and isinstance(model, Net) and type(model) is not Net
    a = model.query.kernel_lora_a
    assert isinstance(a, nnx.LoRAParam) and a.shape == (D, 2)
    assert (a.scale, a.layout, a.variant, a.lora_factor) == (2.0, jlora.Layout("io"), "lora", "a")
    # No copy of the base: the same array, untouched.
    assert model.query.kernel.get_value() is kernel
    # Each kernel gets its layout from its module, no forward pass needed.
    ads = jlora.nnx.get_adapters(model)
    assert {p: ad.layout.axes for p, ad in ads.items()} == {
        "conv/kernel": "wio", "key/kernel": "io", "out/kernel": "iio", "query/kernel": "io",
        "up/kernel": "io", "value/kernel": "io"}
    assert ads["up/kernel"].layout.guessed  # read from einsum_str: checked on the first call
    assert model.out.kernel_lora_b.shape == (2, D)
    # B = 0 at init: no update, the model computes what the base did.
    assert all(not jnp.any(d) for d in jlora.delta(ads).values())


@pytest.fixture(scope="module")
def net_reference(net):
    base, adapted = net
    reference = nnx.clone(base)
    reference.train()
    return merged_reference(reference, jlora.nnx.get_adapters(adapted), IDS)


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_call_and_gradients_equal_the_merged_model(net, net_reference, jit):
    _, adapted = net
    (loss, out), state, want = net_reference
    model = nnx.clone(adapted)
    model.train()
    step = nnx.value_and_grad(loss_and_output, argnums=LORA, has_aux=True)
    (got_loss, got_out), grads = (nnx.jit(step) if jit else step)(model, IDS)
    np.testing.assert_allclose(got_out, out, **F32_TOL)
    np.testing.assert_allclose(got_loss, loss, **F32_TOL)
    # The call's state updates reach the model as without adapters.
    np.testing.assert_allclose(model.norm.mean[...], state["norm"]["mean"][...], **F32_TOL)
    assert int(model.drop.rngs.count[...]) == int(state["drop"]["rngs"]["count"][...]) == 1
    # Gradients w.r.t. the LoRAParams, against the merged model's w.r.t. the adapters.
    assert_same_grads(grads_by_kernel(grads), want)


def test_merged_model_and_a_layer_called_alone(net):
    base, adapted = net
    merged = jlora.nnx.merge_lora(nnx.clone(adapted))
    assert type(merged) is Net and type(merged.up) is nnx.Einsum
    assert not nnx.state(merged, nnx.LoRAParam)
    # merge_lora is jlora.merge, which the reference above computes with.
    want = jlora.merge(nnx.state(base, nnx.Param), jlora.nnx.get_adapters(adapted))
    for (path, got), w in zip(jlora.select(nnx.state(merged, nnx.Param), ".*").items(),
                              jlora.select(want, ".*").values(), strict=True):
        np.testing.assert_array_equal(got, w, err_msg=path)
    # A layer called on its own applies its own adapters.
    x = normal((2, 5, D))
    np.testing.assert_allclose(adapted.up(x), merged.up(x), **F32_TOL)
    assert not np.allclose(adapted.up(x), base.up(x))


class Layer(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.up = nnx.Linear(D, 2 * D, rngs=rngs)
        self.down = nnx.Linear(2 * D, D, rngs=rngs)
        self.calls = nnx.BatchStat(jnp.zeros(()))

    def __call__(self, x):
        self.calls[...] += 1
        return x + self.down(nnx.relu(self.up(x)))


class Stack(nnx.Module):
    """Layers stacked by ``nnx.vmap``, run by ``nnx.scan`` with ``nnx.remat``."""

    def __init__(self, rngs: nnx.Rngs, layers: int = 2):
        @nnx.split_rngs(splits=layers)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def make(rngs):
            return Layer(rngs)

        self.layers = make(rngs)

    def __call__(self, x):
        @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=(nnx.Carry, 0))
        @nnx.remat
        def run(x, layer):
            return layer(x), None

        return run(x, self.layers)[0]


@pytest.fixture(scope="module")
def stack():
    base = build(Stack, nnx.Rngs(0))
    return base, adapt(nnx.clone(base), jlora.LoraConfig(rank=2))


def test_scan_remat_and_vmap_over_stacked_layers(stack):
    base, adapted = stack
    ads = jlora.nnx.get_adapters(adapted)
    assert {p: (ad.layout.axes, ad.a.shape) for p, ad in ads.items()} == {
        "layers/up/kernel": ("sio", (2, D, 2)), "layers/down/kernel": ("sio", (2, 2 * D, 2))}
    x = normal((4, D))
    (loss, y), _, want = merged_reference(nnx.clone(base), ads, x)
    model = nnx.clone(adapted)
    step = nnx.jit(nnx.value_and_grad(loss_and_output, argnums=LORA, has_aux=True))
    (got_loss, got_y), grads = step(model, x)
    np.testing.assert_allclose(got_y, y, **F32_TOL)
    np.testing.assert_allclose(got_loss, loss, **F32_TOL)
    assert_same_grads(grads_by_kernel(grads), want)
    np.testing.assert_array_equal(model.layers.calls[...], [1, 1])

    # The stack's layers, scanned and mapped from outside: each layer call runs the
    # transform over that layer, whose factors have lost their stacked axis.
    @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
    def run(x, layer):
        return layer(x)

    np.testing.assert_allclose(run(x, model.layers), y, **F32_TOL)
    each = nnx.vmap(lambda layer, x: layer(x), in_axes=(0, None))
    merged = jlora.nnx.merge_lora(nnx.clone(adapted))
    np.testing.assert_allclose(each(model.layers, x), each(merged.layers, x), **F32_TOL)
    np.testing.assert_array_equal(model.layers.calls[...], [3, 3])


class Decoder(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.attn = nnx.MultiHeadAttention(num_heads=2, in_features=D, decode=True,
                                           rngs=rngs)
        self.drop = nnx.Dropout(0.5)

    def __call__(self, x, *, rngs: nnx.Rngs):
        return self.drop(self.attn(x), rngs=rngs)


def test_kv_cache_decoding_with_rngs_passed_in():
    base = build(Decoder, nnx.Rngs(0))
    base.attn.init_cache((2, 3, D))
    config = jlora.LoraConfig(rank=2, targets=r"attn/(query|value|out)/kernel")
    model = adapt(base, config)
    merged = jlora.nnx.merge_lora(nnx.clone(model))
    step = nnx.jit(lambda model, x, rngs: model(x, rngs=rngs))
    rngs, merged_rngs = nnx.Rngs(dropout=3), nnx.Rngs(dropout=3)
    xs = normal((2, 3, D))
    for t in range(3):
        y = step(model, xs[:, t:t + 1], rngs)
        np.testing.assert_allclose(y, step(merged, xs[:, t:t + 1], merged_rngs), **F32_TOL)
    assert int(model.attn.cache_index[...]) == int(merged.attn.cache_index[...]) == 3
    np.testing.assert_allclose(model.attn.cached_value[...], merged.attn.cached_value[...],
                               **F32_TOL)
    assert int(rngs.dropout.count[...]) == int(merged_rngs.dropout.count[...]) == 3


class MLP(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.up = nnx.Linear(D, 4 * D, rngs=rngs)
        self.down = nnx.Linear(4 * D, D, rngs=rngs)

    def __call__(self, x):
        return self.down(nnx.gelu(self.up(x)))


X = normal((32, D), seed=7)


@pytest.fixture(scope="module")
def mlp():
    """A base ``MLP``, for the tests to clone."""
    return build(MLP, nnx.Rngs(0))


def train(model, target, steps: int = 8) -> list[float]:
    optimizer = nnx.Optimizer(model, optax.adam(3e-2), wrt=nnx.LoRAParam)

    @nnx.jit
    def step(model, optimizer):
        loss, grads = nnx.value_and_grad(lambda m: jnp.mean((m(X) - target) ** 2),
                                         argnums=LORA)(model)
        optimizer.update(model, grads)
        return loss

    return [float(step(model, optimizer)) for _ in range(steps)]


def test_optimizer_trains_only_the_lora_params_dora_too(mlp):
    config = jlora.LoraConfig(rank=4, alpha=4.0, variant="dora")
    model = jlora.nnx.apply_lora(nnx.clone(mlp), config, rngs=nnx.Rngs(1))
    magnitude = model.up.kernel_lora_magnitude
    assert isinstance(magnitude, nnx.LoRAParam) and magnitude.shape == (4 * D,)
    before = jax.tree.map(lambda v: v, nnx.state(model, BASE_PARAMS))
    magnitude_before = magnitude.get_value()
    losses = train(model, jnp.sin(X))
    assert losses[-1] < 0.8 * losses[0]
    after = nnx.state(model, BASE_PARAMS)
    assert all(bool((x == y).all()) for x, y in zip(jax.tree.leaves(before),
                                                    jax.tree.leaves(after), strict=True))
    assert float(jnp.abs(model.up.kernel_lora_b[...]).max()) > 0
    assert not np.allclose(model.up.kernel_lora_magnitude.get_value(), magnitude_before)


def test_named_sets_switch_save_and_load(mlp, tmp_path):
    model = nnx.clone(mlp)
    jlora.nnx.apply_lora(model, jlora.LoraConfig(rank=4), rngs=nnx.Rngs(1), name="sin")
    jlora.nnx.apply_lora(model, jlora.LoraConfig(rank=2, targets="up/kernel"),
                         rngs=nnx.Rngs(2), name="cos")
    assert jlora.nnx.adapter_names(model) == ("sin", "cos")
    assert jlora.nnx.active_adapter(model) == "sin"
    stored = nnx.state(model, jlora.nnx.InactiveLoRA)
    assert jlora.leaf_paths(stored) == ["inactive_lora/cos/up/kernel/a",
                                        "inactive_lora/cos/up/kernel/b"]
    y_sin = randomise_b(model, seed=1)(X)
    jlora.nnx.switch_adapter(model, "cos")
    assert jlora.nnx.adapter_names(model) == ("cos", "sin")
    assert not hasattr(model.down, "kernel_lora_a")  # "cos" adapts only `up`
    y_cos = randomise_b(model, seed=2)(X)
    assert not np.allclose(y_sin, y_cos)

    # Out as jlora's and PEFT's files, back onto a fresh model.
    jlora.save(tmp_path / "sin", jlora.nnx.get_adapters(model, "sin"))
    jlora.peft.save(tmp_path / "cos", jlora.nnx.get_adapters(model))
    fresh = nnx.clone(mlp)
    base = nnx.state(fresh, nnx.Param)
    jlora.nnx.put_adapters(fresh, jlora.peft.load(tmp_path / "cos", base), name="cos")
    jlora.nnx.put_adapters(fresh, jlora.load(tmp_path / "sin", base), name="sin")
    np.testing.assert_allclose(fresh(X), y_cos, **F32_TOL)
    np.testing.assert_allclose(jlora.nnx.switch_adapter(fresh, "sin")(X), y_sin, **F32_TOL)

    merged = jlora.nnx.merge_lora(fresh)
    assert type(merged) is MLP and type(merged.up) is nnx.Linear
    assert not nnx.state(merged, nnx.LoRAParam) and not hasattr(merged, "inactive_lora")
    np.testing.assert_allclose(merged(X), y_sin, **F32_TOL)


def test_factors_inherit_the_kernels_sharding():
    mesh = jax.make_mesh((1, 1), ("data", "model"),
                         axis_types=(jax.sharding.AxisType.Auto,) * 2)
    # jnp.asarray (not jax.device_put): under the mesh the kernel gets its NamedSharding.
    init = nnx.with_partitioning(
        lambda key, shape, dtype: jnp.asarray(0.3 * np.random.default_rng(0).standard_normal(
            shape), dtype), ("data", "model"))
    with jax.set_mesh(mesh):
        model = nnx.Linear(D, 2 * D, kernel_init=init, rngs=nnx.Rngs(0))
        model = jlora.nnx.apply_lora(model, jlora.LoraConfig(rank=2), rngs=nnx.Rngs(1))
        specs = nnx.get_partition_spec(nnx.state(model, nnx.LoRAParam))
        assert specs["kernel_lora_a"].get_value() == jax.P("data", None)
        assert specs["kernel_lora_b"].get_value() == jax.P(None, "model")
        assert model.kernel_lora_b.out_sharding == (None, "model")
        assert model(X).shape == (32, 2 * D)


class Custom(nnx.Module):
    """A kernel that no NNX rule describes, and an einsum_str that does not say how the
    kernel is used."""

    def __init__(self, lying: bool = False):
        self.w = nnx.Param(normal((D, 2, 4)))
        self.einsum_str = "btd,dnh->btnh" if lying else None

    def __call__(self, x):
        return jnp.einsum("btn,dnh->btdh", x, self.w[...])


def test_layouts_are_never_guessed_silently():
    x = jnp.ones((1, 3, 2))
    with pytest.raises(jlora.LayoutError, match=r"'w' with shape \(8, 2, 4\).*"
                                                r"jlora\.nnx\.infer_layouts"):
        jlora.nnx.apply_lora(Custom(), jlora.LoraConfig(rank=1, targets="w"),
                             rngs=nnx.Rngs(1))
    layouts = jlora.nnx.infer_layouts(Custom(), x)
    assert layouts == {"w": "oio"}
    config = jlora.LoraConfig(rank=1, targets="w", layouts=layouts)
    model = adapt(Custom(), config)
    np.testing.assert_allclose(model(x), jlora.nnx.merge_lora(nnx.clone(model))(x), **F32_TOL)
    # A guess from an einsum_str that the call contradicts fails on the first call.
    lying = adapt(Custom(lying=True), jlora.LoraConfig(rank=1, targets="w"))
    with pytest.raises(jlora.LayoutError, match=r"'w' .* has the layout 'ioo' .* uses it as 'oio'"):
        lying(x)


def test_errors_name_the_problem(mlp):
    model = jlora.nnx.apply_lora(nnx.clone(mlp), jlora.LoraConfig(rank=4), rngs=nnx.Rngs(1))
    with pytest.raises(ValueError, match="already has an adapter set named 'default'"):
        jlora.nnx.apply_lora(model, jlora.LoraConfig(rank=4), rngs=nnx.Rngs(1))
    ads = jlora.nnx.get_adapters(model)
    bad = {"up/kernel": ads["down/kernel"]}
    with pytest.raises(ValueError, match=r"'up/kernel' fits a kernel of shape \(32, 8\)"):
        jlora.nnx.put_adapters(model, bad)
    dropped = {p: ad.replace(dropout=0.1) for p, ad in ads.items()}
    with pytest.raises(ValueError, match="dropout > 0"):
        jlora.nnx.put_adapters(model, dropped, name="dropped")
    with pytest.raises(KeyError, match="no adapter set named 'fr'"):
        jlora.nnx.switch_adapter(model, "fr")
    with pytest.raises(ValueError, match="has no adapters"):
        jlora.nnx.get_adapters(nnx.clone(mlp))
    with pytest.raises(ValueError, match="without '/'"):
        jlora.nnx.put_adapters(model, ads, name="a/b")
    with pytest.raises(TypeError, match="jlora.LoraConfig"):
        jlora.nnx.apply_lora(nnx.clone(mlp), {"rank": 2}, rngs=nnx.Rngs(0))
    listed = nnx.List([nnx.Param(jnp.ones((4, 4)))])
    with pytest.raises(ValueError, match="'0' is an element of a container"):
        jlora.nnx.apply_lora(listed, jlora.LoraConfig(rank=1, targets="0"), rngs=nnx.Rngs(0))
