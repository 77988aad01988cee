"""Training helpers (`jlora.split_trainable`, ...): what is trained (adapters +
modules_to_save + biases), how it is put back, labels for optax, and LoRA+.

Gradients and updates are checked against direct numpy computations, with and without
jit.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jlora
from jlora._optim import merge_trainable, split_trainable, trainable_labels, trainable_mask

JIT = pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])


def maybe_jit(fn, jit):
    return jax.jit(fn) if jit else fn


def make_params():
    rng = np.random.default_rng(0)
    normal = lambda *shape: jnp.asarray(rng.normal(size=shape), jnp.float32)
    return {
        "enc": {"kernel": normal(5, 4), "bias": normal(4)},
        "mid": {"kernel": normal(4, 4)},  # adapted, no bias
        "head": {"kernel": normal(4, 3), "bias": normal(3)},
        "norm": {"scale": normal(4)},
        "steps": jnp.zeros((), jnp.int32),
    }


CONFIG = jlora.LoraConfig(rank=2, alpha=4.0, targets="(enc|mid)/kernel")


@pytest.fixture(scope="module")
def params():
    return make_params()


@pytest.fixture(scope="module")
def adapters(params):
    ads = jlora.init(jax.random.key(0), params, CONFIG)
    # Nonzero B, so every factor has a gradient.
    rng = np.random.default_rng(1)
    return {p: a.replace(b=jnp.asarray(rng.normal(size=a.b.shape), jnp.float32))
            for p, a in ads.items()}


def forward(params, x):
    h = x @ params["enc"]["kernel"] + params["enc"]["bias"][None, :]
    h = (h @ params["mid"]["kernel"]) * params["norm"]["scale"][None, :]
    return h @ params["head"]["kernel"] + params["head"]["bias"][None, :]


X = np.random.default_rng(2).normal(size=(6, 5)).astype(np.float32)


# -- choosing what is trained ---------------------------------------------------------

def extra_paths(params, adapters, **kw):
    flags = jlora.select(trainable_mask(params, adapters, **kw), ".*")
    return sorted(p for p, keep in flags.items() if keep)


def test_bias_modes(params, adapters):
    assert extra_paths(params, adapters) == []
    assert extra_paths(params, adapters, bias="all") == ["enc/bias", "head/bias"]
    # Only the adapted modules' biases; `mid` is adapted but has none.
    assert extra_paths(params, adapters, bias="lora_only") == ["enc/bias"]


def test_modules_to_save_patterns(params, adapters):
    assert extra_paths(params, adapters, modules_to_save="head/.*") == [
        "head/bias", "head/kernel"]
    got = extra_paths(params, adapters, modules_to_save=["head/kernel", "norm/.*"],
                      bias="lora_only")
    assert got == ["enc/bias", "head/kernel", "norm/scale"]


def test_split_trainable_structure(params, adapters):
    trainable, frozen = split_trainable(params, adapters, modules_to_save="head/.*",
                                        bias="lora_only")
    assert jlora.leaf_paths(trainable) == [
        "adapters/enc/kernel/a", "adapters/enc/kernel/b",
        "adapters/mid/kernel/a", "adapters/mid/kernel/b",
        "params/enc/bias", "params/head/bias", "params/head/kernel",
    ]
    assert jlora.leaf_paths(frozen) == [
        "enc/kernel", "mid/kernel", "norm/scale", "steps"]
    assert trainable["params"]["head"]["kernel"] is params["head"]["kernel"]


@JIT
def test_merge_trainable_round_trip_at_init(params, jit):
    fresh = jlora.init(jax.random.key(0), params, CONFIG)  # B == 0
    trainable, frozen = split_trainable(params, fresh, modules_to_save="head/.*", bias="all")
    back = maybe_jit(merge_trainable, jit)(trainable, frozen)
    assert jax.tree.structure(back) == jax.tree.structure(params)
    for path, leaf in jlora.select(params, ".*").items():
        np.testing.assert_array_equal(jlora.select(back, ".*")[path], leaf, err_msg=path)


@JIT
def test_merge_trainable_puts_trained_leaves_back(params, adapters, jit):
    trainable, frozen = split_trainable(params, adapters, modules_to_save="head/.*",
                                        bias="lora_only")
    # "Train": change every trainable leaf.
    trained = jax.tree.map(lambda x: x * 1.5 + 0.25, trainable)
    merged = maybe_jit(merge_trainable, jit)(trained, frozen)
    p = jax.tree.map(np.asarray, params)
    t = jax.tree.map(np.asarray, trained)
    for name in ("enc", "mid"):
        ad = t["adapters"][f"{name}/kernel"]
        scale = trained["adapters"][f"{name}/kernel"].scale
        np.testing.assert_allclose(merged[name]["kernel"], p[name]["kernel"] + scale * ad.a @ ad.b,
                                   rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(merged["head"]["kernel"], t["params"]["head"]["kernel"])
    np.testing.assert_array_equal(merged["head"]["bias"], t["params"]["head"]["bias"])
    np.testing.assert_array_equal(merged["enc"]["bias"], t["params"]["enc"]["bias"])
    np.testing.assert_array_equal(merged["norm"]["scale"], p["norm"]["scale"])
    np.testing.assert_array_equal(merged["steps"], p["steps"])


def numpy_grads(params, adapters, x):
    """Gradients of 0.5·sum(forward²) w.r.t. the adapters, enc/bias and head/* in numpy."""
    p = jax.tree.map(np.asarray, params)
    ads = {k: (np.asarray(a.a, np.float64), np.asarray(a.b, np.float64), a.scale)
           for k, a in adapters.items()}
    w1 = p["enc"]["kernel"] + ads["enc/kernel"][2] * ads["enc/kernel"][0] @ ads["enc/kernel"][1]
    w2 = p["mid"]["kernel"] + ads["mid/kernel"][2] * ads["mid/kernel"][0] @ ads["mid/kernel"][1]
    h1 = x @ w1 + p["enc"]["bias"]
    h2 = (h1 @ w2) * p["norm"]["scale"]
    y = h2 @ p["head"]["kernel"] + p["head"]["bias"]
    dy = y
    d_head_kernel, d_head_bias = h2.T @ dy, dy.sum(0)
    dh2 = (dy @ p["head"]["kernel"].T) * p["norm"]["scale"]
    dw2 = h1.T @ dh2
    dh1 = dh2 @ w2.T
    dw1 = x.T @ dh1
    out = {"params/enc/bias": dh1.sum(0), "params/head/kernel": d_head_kernel,
           "params/head/bias": d_head_bias}
    for name, dw in (("enc/kernel", dw1), ("mid/kernel", dw2)):
        a, b, s = ads[name]
        out[f"adapters/{name}/a"] = s * dw @ b.T
        out[f"adapters/{name}/b"] = s * a.T @ dw
    return out


@JIT
def test_gradients_of_the_trainable_tree_match_numpy(params, adapters, jit):
    trainable, frozen = split_trainable(params, adapters, modules_to_save="head/.*",
                                        bias="lora_only")

    def loss(trainable):
        return 0.5 * jnp.sum(forward(merge_trainable(trainable, frozen), X) ** 2)

    grads = maybe_jit(jax.grad(loss), jit)(trainable)
    want = numpy_grads(params, adapters, X.astype(np.float64))
    got = jlora.select(grads, ".*")
    assert sorted(got) == sorted(want)
    for path, g in got.items():
        np.testing.assert_allclose(g, want[path], rtol=1e-4, atol=1e-4, err_msg=path)


def test_nnx_state_round_trip():
    model = nnx.Sequential(nnx.Linear(4, 8, rngs=nnx.Rngs(0)), nnx.Linear(8, 2, rngs=nnx.Rngs(1)))
    graphdef, state = nnx.split(model, nnx.Param)
    config = jlora.LoraConfig(rank=2, targets="layers/0/kernel")
    ads = jlora.init(jax.random.key(0), state, config)
    trainable, frozen = split_trainable(state, ads, modules_to_save="layers/1/.*",
                                        bias="lora_only")
    assert jlora.leaf_paths(trainable) == [
        "adapters/layers/0/kernel/a", "adapters/layers/0/kernel/b", "params/layers/0/bias",
        "params/layers/1/bias", "params/layers/1/kernel"]
    x = jnp.ones((3, 4))

    def loss(trainable):
        return jnp.sum(nnx.merge(graphdef, merge_trainable(trainable, frozen))(x) ** 2)

    value, grads = jax.jit(jax.value_and_grad(loss))(trainable)
    np.testing.assert_allclose(value, jnp.sum(model(x) ** 2), rtol=1e-6)
    assert jlora.leaf_paths(grads) == jlora.leaf_paths(trainable)


# -- errors ---------------------------------------------------------------------------

def test_bias_mode_errors(params, adapters):
    with pytest.raises(ValueError, match=r"`bias` must be one of \['none', 'all', 'lora_only'\]"
                                         r" \(as PEFT\), got 'some'"):
        split_trainable(params, adapters, bias="some")
    no_bias = {"mid": params["mid"]}
    ads = {"mid/kernel": adapters["mid/kernel"]}
    with pytest.raises(ValueError, match=r"`bias='all'` found no leaf named 'bias'"):
        split_trainable(no_bias, ads, bias="all")
    with pytest.raises(ValueError, match=r"`bias='lora_only'` found no bias next to any adapted "
                                         r"kernel \(looked for 'mid/bias'\)"):
        split_trainable(params, ads, bias="lora_only")


def test_modules_to_save_errors(params, adapters):
    with pytest.raises(jlora.PatternError, match=r"`modules_to_save` pattern 'haed/.\*' matches "
                                                 r"no leaf path.*\n  head/"):
        split_trainable(params, adapters, modules_to_save="haed/.*")
    with pytest.raises(jlora.PatternError, match=r"`modules_to_save\[1\]` pattern 'nope'"):
        split_trainable(params, adapters, modules_to_save=["head/.*", "nope"])
    with pytest.raises(ValueError, match=r"`modules_to_save` pattern 'enc/.\*' selects the kernel "
                                         r"at path 'enc/kernel', which also has an adapter"):
        split_trainable(params, adapters, modules_to_save="enc/.*")
    with pytest.raises(ValueError, match=r"selects the leaf at path 'steps' of type int32: only "
                                         r"floating-point arrays can be trained"):
        split_trainable(params, adapters, modules_to_save="steps")
    with pytest.raises(TypeError, match=r"`modules_to_save` must be a regular expression string "
                                        r"or a sequence of them, got 3"):
        split_trainable(params, adapters, modules_to_save=3)


def test_merge_trainable_rejects_other_trees(params, adapters):
    with pytest.raises(TypeError, match=r"`trainable` must be the dict \{'adapters': ..., "
                                        r"'params': ...\}.*got \['enc/kernel', 'mid/kernel'\]"):
        merge_trainable(adapters, params)


# -- labels ---------------------------------------------------------------------------

def test_labels_name_every_leaf(params):
    dora = jlora.init(jax.random.key(0), params, jlora.LoraConfig(
        rank=2, targets="(enc|mid)/kernel", variant="dora"))
    trainable, _ = split_trainable(params, dora, bias="lora_only")
    got = jlora.select(trainable_labels(trainable), ".*")
    assert got == {
        "adapters/enc/kernel/a": "lora_a", "adapters/enc/kernel/b": "lora_b",
        "adapters/enc/kernel/magnitude": "lora_magnitude",
        "adapters/mid/kernel/a": "lora_a", "adapters/mid/kernel/b": "lora_b",
        "adapters/mid/kernel/magnitude": "lora_magnitude",
        "params/enc/bias": "extra",
    }
    assert jax.tree.structure(trainable_labels(dora)) == jax.tree.structure(
        jax.tree.map(lambda _: "x", dora))


def test_labels_drive_optax_partition(adapters):
    opt = optax.partition({"lora_a": optax.sgd(1.0), "lora_b": optax.set_to_zero()},
                          trainable_labels)
    grads = jax.tree.map(jnp.ones_like, adapters)
    updates, _ = opt.update(grads, opt.init(adapters), adapters)
    for ad in updates.values():
        np.testing.assert_array_equal(ad.a, -np.ones(ad.a.shape))
        np.testing.assert_array_equal(ad.b, np.zeros(ad.b.shape))


# -- LoRA+ ----------------------------------------------------------------------------

def grads_like(tree, seed=3):
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape), x.dtype), tree)


@JIT
@pytest.mark.parametrize("ratio", [16.0, 3.0])
def test_lora_plus_sgd_b_update_is_ratio_times_a_side(params, adapters, ratio, jit):
    lr = 0.1
    trainable, _ = split_trainable(params, adapters, bias="lora_only")
    grads = grads_like(trainable)
    plus = jlora.lora_plus(optax.sgd(lr), ratio=ratio)
    plain = optax.sgd(lr)
    up_plus, _ = maybe_jit(plus.update, jit)(grads, plus.init(trainable), trainable)
    up_plain, _ = maybe_jit(plain.update, jit)(grads, plain.init(trainable), trainable)
    g = jlora.select(grads, ".*")
    plus_flat, plain_flat = jlora.select(up_plus, ".*"), jlora.select(up_plain, ".*")
    for path, u in plus_flat.items():
        if path.endswith("/b"):
            # ratio x what the same optimizer gives without LoRA+: exactly for a power of two;
            # otherwise XLA may fold lr * ratio into one constant under jit (one rounding).
            want = np.float32(ratio) * np.asarray(plain_flat[path])
            if math.log2(ratio).is_integer():
                np.testing.assert_array_equal(u, want)
            else:
                np.testing.assert_allclose(u, want, rtol=2e-7)
            np.testing.assert_allclose(u, -lr * ratio * np.asarray(g[path]), rtol=1e-6)
        else:  # A and the extra biases: untouched.
            np.testing.assert_array_equal(u, plain_flat[path])
            np.testing.assert_allclose(u, -lr * np.asarray(g[path]), rtol=1e-6)


@JIT
def test_lora_plus_adam_equals_adam_with_lr_times_ratio_on_b(adapters, jit):
    lr, ratio = 1e-2, 16.0
    plus = jlora.lora_plus(optax.adam(lr), ratio=ratio)
    a_only = lambda t: {p: ad.a for p, ad in t.items()}
    b_only = lambda t: {p: ad.b for p, ad in t.items()}
    ref_a, ref_b = optax.adam(lr), optax.adam(lr * ratio)
    state = plus.init(adapters)
    sa, sb = ref_a.init(a_only(adapters)), ref_b.init(b_only(adapters))
    update = maybe_jit(plus.update, jit)
    for step in range(3):
        grads = grads_like(adapters, seed=10 + step)
        up, state = update(grads, state, adapters)
        ua, sa = ref_a.update(a_only(grads), sa)
        ub, sb = ref_b.update(b_only(grads), sb)
        for path in adapters:
            np.testing.assert_allclose(up[path].a, ua[path], rtol=1e-6, atol=1e-9)
            np.testing.assert_allclose(up[path].b, ub[path], rtol=1e-6, atol=1e-9)


def test_lora_plus_peft_grouping_speeds_up_vectors(params):
    dora = jlora.init(jax.random.key(0), params, jlora.LoraConfig(
        rank=2, targets="(enc|mid)/kernel", variant="dora"))
    trainable, _ = split_trainable(params, dora, modules_to_save="head/.*", bias="lora_only")
    grads = jax.tree.map(jnp.ones_like, trainable)
    for peft, boosted in [
        (False, {"b"}),
        (True, {"b", "magnitude", "params/enc/bias", "params/head/bias"}),
    ]:
        opt = jlora.lora_plus(optax.sgd(1.0), ratio=16.0, peft_grouping=peft)
        up, _ = opt.update(grads, opt.init(trainable), trainable)
        for path, u in jlora.select(up, ".*").items():
            field = path.rsplit("/", 1)[1] if path.startswith("adapters/") else path
            want = -16.0 if field in boosted else -1.0
            np.testing.assert_array_equal(u, np.full(u.shape, want, np.float32), err_msg=path)


def test_lora_plus_composes_with_any_chain(adapters):
    """Clipping before LoRA+ (global norm over all factors), weight decay masked by path."""
    lr, ratio, max_norm, wd = 0.1, 16.0, 0.5, 0.01
    opt = optax.chain(
        optax.clip_by_global_norm(max_norm),
        jlora.lora_plus(optax.adamw(lr, weight_decay=wd,
                                    mask=lambda t: jlora.mask(t, r".*/a", allow_empty=True)),
                        ratio=ratio),
    )
    grads = grads_like(adapters)
    up, _ = jax.jit(opt.update)(grads, opt.init(adapters), adapters)
    norm = math.sqrt(sum(float(jnp.sum(g ** 2)) for g in jax.tree.leaves(grads)))
    assert norm > max_norm  # the clip is active
    for path, ad in adapters.items():
        # Adam's first step is lr * g / (|g| + eps) ~ lr * sign(g) (clipping rescales g only).
        g_a, g_b = (np.asarray(x) * max_norm / norm for x in (grads[path].a, grads[path].b))
        adam = lambda g: g / (np.abs(g) + 1e-8)
        want_a = -lr * (adam(g_a) + wd * np.asarray(ad.a))
        want_b = -lr * ratio * adam(g_b)  # no decay on B
        np.testing.assert_allclose(up[path].a, want_a, rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(up[path].b, want_b, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("ratio", [0, -1.0, float("nan"), float("inf"), True, "16"])
def test_lora_plus_ratio_errors(ratio):
    with pytest.raises(ValueError, match=r"`ratio` must be a positive, finite number .*PEFT's "
                                         r"docs use 16\), got"):
        jlora.lora_plus(optax.sgd(0.1), ratio=ratio)


def test_lora_plus_optimizer_error():
    with pytest.raises(TypeError, match=r"`optimizer` must be an optax.GradientTransformation, "
                                        r"got function"):
        jlora.lora_plus(optax.sgd, ratio=16.0)
