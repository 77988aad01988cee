"""LoRA variants (DoRA, PiSSA, OLoRA, orthogonal, EVA, CorDA) against direct numpy.

Every numeric check compares with a float64 numpy computation (numpy's SVD/QR), under
both the standard and the rsLoRA policy (alpha chosen so the scale is not 1), with and
without jit where the function is jittable.
"""

import math
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jlora
from jlora import variants
from jlora.layouts import Layout

POLICIES = ["standard", "rslora"]
JIT = ["jit", "nojit"]
ALPHA = 3.0  # rank 2 or 4: standard scale 1.5 / 0.75, rsLoRA 2.12 / 1.5


def maybe_jit(fn, mode):
    return jax.jit(fn) if mode == "jit" else fn


def as_matrix(w, layout):
    """float64 ``(*stacked, fan_in, fan_out)`` view of a kernel."""
    stacked, fan_in, fan_out = Layout(layout).split_shape(w.shape)
    return np.asarray(w, np.float64).reshape(*stacked, math.prod(fan_in), math.prod(fan_out))


def top_part(m, r, bottom=False):
    """The rank-r part of ``m`` (batched) from numpy's SVD: top or bottom triplets."""
    u, s, vh = np.linalg.svd(m, full_matrices=False)
    sl = slice(-r, None) if bottom else slice(None, r)
    return np.matmul(u[..., :, sl] * s[..., None, sl], vh[..., sl, :])


def rand_np(seed, shape, scale=1.0):
    # numpy, not jax.random: eager jax.random compiles once per shape, which adds up.
    return (scale * np.random.default_rng(seed).standard_normal(shape)).astype(np.float32)


def rand(seed, shape, scale=1.0):
    return jnp.asarray(rand_np(seed, shape, scale))


def random_adapter(layout, shape, rank, policy, variant="lora", seed=0):
    lay = Layout(layout)
    a_shape, b_shape = lay.factor_shapes(shape, rank)
    scale = jlora.scaling.compute_scale(policy, rank, ALPHA)
    _, _, fan_out = lay.split_shape(shape)
    magnitude = None
    if variant == "dora":
        magnitude = jnp.asarray(1.0 + np.abs(rand_np(seed + 3, (*shape[: lay.num_stacked],
                                                                 *fan_out))))
    return jlora.Adapter(
        a=rand(seed + 1, a_shape, 0.3), b=rand(seed + 2, b_shape, 0.3), magnitude=magnitude,
        layout=lay, rank=rank, alpha=ALPHA, scale=scale, policy=policy, variant=variant,
    )


# (layout, kernel shape, path): dense, DenseGeneral both ways, conv, embedding, stacked.
LAYOUTS = [
    ("io", (12, 10), "dense/kernel"),
    ("ioo", (12, 2, 5), "attn/query/kernel"),
    ("iio", (2, 5, 12), "attn/out/kernel"),
    ("wwio", (3, 3, 4, 6), "conv/kernel"),
    ("vf", (20, 8), "embed/embedding"),
    ("sio", (3, 12, 10), "layers/mlp/kernel"),
]


# --------------------------------------------------------------------------- DoRA


@pytest.mark.parametrize("layout, shape, path", LAYOUTS)
def test_dora_norm_factored_equals_direct_norm(layout, shape, path):
    index = LAYOUTS.index((layout, shape, path))  # every policy and jit mode, in turn
    policy, mode = POLICIES[index % 2], JIT[(index // 2) % 2]
    w = rand(7, shape)
    ad = random_adapter(layout, shape, 4, policy, "dora")
    got = maybe_jit(variants.dora_norm, mode)(w, ad)
    w2 = as_matrix(w, layout)
    a2 = np.asarray(ad.a, np.float64).reshape(*w2.shape[:-1], 4)
    b2 = np.asarray(ad.b, np.float64).reshape(*w2.shape[:-2], 4, w2.shape[-1])
    want = np.linalg.norm(w2 + ad.scale * np.matmul(a2, b2), axis=-2)
    stacked, _, fan_out = Layout(layout).split_shape(shape)
    assert got.shape == (*stacked, *fan_out) and got.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got).reshape(want.shape), want, rtol=1e-5)
    # The merged path's direct norm agrees with the factored one.
    direct = jnp.sqrt(jnp.sum(jnp.square(w + ad.delta()), axis=Layout(layout).fan_in_axes))
    np.testing.assert_allclose(got, direct, rtol=1e-5)


def test_dora_norm_bf16_kernel_is_float32():
    w = rand(7, (12, 10)).astype(jnp.bfloat16)
    ad = random_adapter("io", (12, 10), 2, "rslora", "dora")
    got = variants.dora_norm(w, ad)
    want = np.linalg.norm(np.asarray(w, np.float64) + np.asarray(ad.delta(), np.float64), axis=0)
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(got, want, rtol=1e-5)


@pytest.mark.parametrize("layout, shape, path, policy, mode", [
    (*LAYOUTS[0], "standard", "jit"), (*LAYOUTS[0], "rslora", "nojit"),
    (*LAYOUTS[3], "rslora", "jit"), (*LAYOUTS[4], "standard", "nojit"),
    (*LAYOUTS[5], "rslora", "jit")])
def test_dora_merged_kernel_and_grad_match_numpy(layout, shape, path, policy, mode):
    """Value, and gradients with the norm held constant (PEFT's detach), vs numpy."""
    w = rand(7, shape)
    ad = random_adapter(layout, shape, 2, policy, "dora")
    upstream = rand(9, shape)
    params = {"k": w}

    def loss(adapter):
        merged = jlora.merge(params, {"k": adapter})["k"]
        return jnp.sum(upstream * merged), merged

    (_, merged), grads = maybe_jit(jax.value_and_grad(loss, has_aux=True), mode)(ad)
    lay = Layout(layout)
    w2, d2 = as_matrix(w, layout), as_matrix(upstream, layout)
    a2 = np.asarray(ad.a, np.float64).reshape(*w2.shape[:-1], 2)
    b2 = np.asarray(ad.b, np.float64).reshape(*w2.shape[:-2], 2, w2.shape[-1])
    m2 = np.asarray(ad.magnitude, np.float64).reshape(*w2.shape[:-2], 1, w2.shape[-1])
    v = w2 + ad.scale * np.matmul(a2, b2)
    norm = np.linalg.norm(v, axis=-2, keepdims=True)
    np.testing.assert_allclose(as_matrix(merged, layout), m2 / norm * v, rtol=1e-5, atol=1e-6)
    e = d2 * m2 / norm  # dL/dV with the norm constant
    want_m = np.sum(d2 * v, axis=-2, keepdims=True) / norm
    want_a = ad.scale * np.matmul(e, np.swapaxes(b2, -1, -2))
    want_b = ad.scale * np.matmul(np.swapaxes(a2, -1, -2), e)
    np.testing.assert_allclose(np.asarray(grads.magnitude).reshape(want_m.shape), want_m,
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(grads.a).reshape(want_a.shape), want_a,
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(grads.b).reshape(want_b.shape), want_b,
                               rtol=1e-5, atol=1e-6)
    assert lay.kind in ("dense", "conv", "embed")


@pytest.mark.parametrize("layout, shape, path", [LAYOUTS[i] for i in (1, 3, 4, 5)])
def test_dora_magnitude_shape_and_value_at_init(layout, shape, path):
    w = rand(7, shape)
    params = {"model": {"x": w}}
    config = jlora.LoraConfig(rank=2, alpha=ALPHA, targets="model/x", variant="dora",
                              layouts={"model/x": layout})
    ad = jlora.init(jax.random.key(0), params, config)["model/x"]
    stacked, _, fan_out = Layout(layout).split_shape(shape)
    assert ad.magnitude.shape == (*stacked, *fan_out)
    want = np.linalg.norm(as_matrix(w, layout), axis=-2)
    np.testing.assert_allclose(np.asarray(ad.magnitude).reshape(want.shape), want, rtol=1e-5)
    merged = jlora.merge(params, {"model/x": ad})["model"]["x"]
    np.testing.assert_allclose(merged, w, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- PiSSA


# Every layout; each policy and each jit mode several times over.
PISSA_CASES = [(*LAYOUTS[0], "standard", "jit"), (*LAYOUTS[0], "rslora", "nojit"),
               (*LAYOUTS[1], "rslora", "jit"), (*LAYOUTS[2], "standard", "nojit"),
               (*LAYOUTS[3], "standard", "jit"), (*LAYOUTS[4], "rslora", "nojit"),
               (*LAYOUTS[5], "rslora", "jit"), (*LAYOUTS[5], "standard", "nojit")]


@pytest.mark.parametrize("layout, shape, path, policy, mode", PISSA_CASES)
def test_pissa_is_the_principal_part_under_any_policy(layout, shape, path, policy, mode):
    w = rand(11, shape)
    params = {"model": {"x": w, "bias": jnp.ones(3)}}
    config = jlora.LoraConfig(rank=2, alpha=ALPHA, scaling=policy, targets="model/x",
                              init="pissa", layouts={"model/x": layout})
    fn = maybe_jit(lambda p: variants.pissa_init(jax.random.key(0), p, config), mode)
    new_params, ads = fn(params)
    ad = ads["model/x"]
    assert ad.scale == pytest.approx(jlora.scaling.compute_scale(policy, 2, ALPHA))
    w2 = as_matrix(w, layout)
    part = as_matrix(ad.delta(), layout)
    np.testing.assert_allclose(part, top_part(w2, 2), atol=2e-5)
    np.testing.assert_allclose(as_matrix(new_params["model"]["x"], layout) + part, w2, atol=1e-5)
    assert new_params["model"]["bias"] is params["model"]["bias"] or mode == "jit"
    # Each factor carries sqrt(S_r / s): AᵀA and BBᵀ are diag(S_r / s).
    s = np.linalg.svd(w2, compute_uv=False)[..., :2] / ad.scale
    a2 = np.asarray(ad.a, np.float64).reshape(*w2.shape[:-1], 2)
    b2 = np.asarray(ad.b, np.float64).reshape(*w2.shape[:-2], 2, w2.shape[-1])
    eye = np.eye(2)
    np.testing.assert_allclose(np.matmul(np.swapaxes(a2, -1, -2), a2), s[..., None] * eye,
                               rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.matmul(b2, np.swapaxes(b2, -1, -2)), s[..., None] * eye,
                               rtol=1e-4, atol=1e-5)
    # The caller's params are untouched.
    np.testing.assert_array_equal(params["model"]["x"], w)


def low_rank_plus_noise(m, n, r, noise, seed=0):
    rng = np.random.default_rng(seed)
    low = rng.normal(size=(m, r)) @ rng.normal(size=(r, n))
    return (low + noise * rng.normal(size=(m, n))).astype(np.float32)


@pytest.mark.parametrize("mode", JIT)
def test_randomized_svd_close_to_exact(mode):
    mat = low_rank_plus_noise(64, 48, 4, 1e-3)
    fn = maybe_jit(lambda k, x: variants.randomized_svd(k, x, 4, 2), mode)
    u, s, vh = fn(jax.random.key(0), jnp.asarray(mat))
    exact = np.linalg.svd(mat.astype(np.float64), compute_uv=False)[:4]
    np.testing.assert_allclose(s, exact, rtol=1e-5)
    approx = np.asarray((u * s[None, :]) @ vh, np.float64)
    want = top_part(mat.astype(np.float64), 4)
    assert np.linalg.norm(approx - want) <= 1e-5 * np.linalg.norm(want)
    # Without power iterations the noise leaks in: the iterations are what buys accuracy.
    u0, s0, vh0 = variants.randomized_svd(jax.random.key(0), jnp.asarray(mat), 4, 0)
    rough = np.asarray((u0 * s0[None, :]) @ vh0, np.float64)
    assert np.linalg.norm(rough - want) > 10 * np.linalg.norm(approx - want)


@pytest.mark.parametrize("policy", POLICIES)
def test_pissa_randomized_niter(policy):
    mat = low_rank_plus_noise(32, 24, 2, 1e-3, seed=1)
    params = {"d": {"kernel": jnp.asarray(mat)}}
    config = jlora.LoraConfig(rank=2, alpha=ALPHA, scaling=policy, init="pissa")
    new_params, ads = variants.pissa_init(jax.random.key(3), params, config, niter=4)
    part = np.asarray(ads["d/kernel"].delta(), np.float64)
    want = top_part(mat.astype(np.float64), 2)
    assert np.linalg.norm(part - want) <= 1e-5 * np.linalg.norm(want)
    np.testing.assert_allclose(new_params["d"]["kernel"] + part, mat, atol=1e-5)


def test_pissa_with_dora_and_bf16_base():
    w = rand(5, (12, 10)).astype(jnp.bfloat16)
    config = jlora.LoraConfig(rank=2, alpha=ALPHA, init="pissa", variant="dora")
    new_params, ads = variants.pissa_init(jax.random.key(0), {"d": {"kernel": w}}, config)
    assert new_params["d"]["kernel"].dtype == jnp.bfloat16
    # PEFT computes the magnitude from the residual base plus the adapter: ‖W‖.
    want = np.linalg.norm(np.asarray(new_params["d"]["kernel"], np.float64)
                          + np.asarray(ads["d/kernel"].delta(), np.float64), axis=0)
    np.testing.assert_allclose(ads["d/kernel"].magnitude, want, rtol=1e-5)
    np.testing.assert_allclose(ads["d/kernel"].magnitude,
                               np.linalg.norm(np.asarray(w, np.float64), axis=0), rtol=1e-2)


# --------------------------------------------------------------------------- OLoRA


@pytest.mark.parametrize("layout, shape, path, policy, mode", [
    (*LAYOUTS[0], "standard", "jit"), (*LAYOUTS[0], "rslora", "nojit"),
    (*LAYOUTS[2], "rslora", "jit"), (*LAYOUTS[5], "standard", "nojit")])
def test_olora_matches_numpy_qr(layout, shape, path, policy, mode):
    w = rand(13, shape)
    params = {"m": {"x": w}}
    config = jlora.LoraConfig(rank=2, alpha=ALPHA, scaling=policy, targets="m/x",
                              init="olora", layouts={"m/x": layout})
    new_params, ads = maybe_jit(lambda p: variants.olora_init(None, p, config), mode)(params)
    ad = ads["m/x"]
    w2 = as_matrix(w, layout)
    q, r = np.linalg.qr(np.swapaxes(w2, -1, -2))  # PEFT's (out, in) weight
    q_r, r_r = q[..., :, :2], r[..., :2, :]
    a2 = np.asarray(ad.a, np.float64).reshape(*w2.shape[:-1], 2)
    b2 = np.asarray(ad.b, np.float64).reshape(*w2.shape[:-2], 2, w2.shape[-1])
    # Unscaled, as PEFT: A = R_rᵀ, B = Q_rᵀ (up to the sign of each QR column).
    np.testing.assert_allclose(np.abs(a2), np.abs(np.swapaxes(r_r, -1, -2)), atol=1e-5)
    np.testing.assert_allclose(np.abs(b2), np.abs(np.swapaxes(q_r, -1, -2)), atol=1e-5)
    qr_part = np.swapaxes(np.matmul(q_r, r_r), -1, -2)
    np.testing.assert_allclose(np.matmul(a2, b2), qr_part, atol=1e-5)
    np.testing.assert_allclose(as_matrix(new_params["m"]["x"], layout),
                               w2 - ad.scale * qr_part, atol=1e-5)


# --------------------------------------------------------------------------- orthogonal


@pytest.mark.parametrize("layout, shape, path, mode", [
    (*LAYOUTS[0], "jit"), (*LAYOUTS[3], "nojit"), (*LAYOUTS[4], "jit"), (*LAYOUTS[5], "nojit")])
def test_orthogonal_init_zero_product_nonzero_factors(layout, shape, path, mode):
    params = {"m": {"x": rand(3, shape)}}
    config = jlora.LoraConfig(rank=4, alpha=ALPHA, targets="m/x", init="orthogonal",
                              layouts={"m/x": layout})
    ads = maybe_jit(lambda p: jlora.init(jax.random.key(0), p, config), mode)(params)
    ad = ads["m/x"]
    w2 = as_matrix(params["m"]["x"], layout)
    a2 = np.asarray(ad.a, np.float64).reshape(*w2.shape[:-1], 4)
    b2 = np.asarray(ad.b, np.float64).reshape(*w2.shape[:-2], 4, w2.shape[-1])
    prod = np.matmul(a2, b2)
    scale = np.linalg.norm(a2) * np.linalg.norm(b2)
    assert np.abs(prod).max() < 1e-6 * scale
    # Each factor has rank r/2: half the rows of one orthogonal matrix each.
    assert (np.linalg.matrix_rank(a2, tol=1e-5) == 2).all()
    assert (np.linalg.matrix_rank(b2, tol=1e-5) == 2).all()
    assert np.abs(a2).min(axis=-2).max() > 0 and np.abs(b2).max() > 1e-3
    np.testing.assert_allclose(jlora.merge(params, ads)["m"]["x"], params["m"]["x"], atol=1e-6)


def test_orthogonal_same_with_and_without_jit_and_odd_rank_error():
    params = {"d": {"kernel": rand(3, (8, 6))}}
    config = jlora.LoraConfig(rank=2, init="orthogonal")
    eager = jlora.init(jax.random.key(0), params, config)["d/kernel"]
    jitted = jax.jit(lambda p: jlora.init(jax.random.key(0), p, config))(params)["d/kernel"]
    np.testing.assert_allclose(eager.a, jitted.a, rtol=1e-6)
    with pytest.raises(ValueError, match="even rank.*rank=3.*shape \\(8, 6\\)"):
        jlora.init(jax.random.key(0), params, jlora.LoraConfig(rank=3, init="orthogonal"))


# --------------------------------------------------------------------------- EVA


def np_pca(x, k):
    """Top-k right singular vectors of centered x with svd_flip signs, and their EVR."""
    x = np.asarray(x, np.float64)
    xc = x - x.mean(axis=0)
    _, s, vh = np.linalg.svd(xc, full_matrices=False)
    signs = np.sign(vh[np.arange(len(vh)), np.abs(vh).argmax(axis=1)])
    vh = vh * signs[:, None]
    evr = s**2 / np.sum(x.var(axis=0) * len(x))
    return vh[:k], s[:k], evr[:k]


@pytest.mark.parametrize("policy, whiten", [("standard", False), ("rslora", True)])
def test_eva_single_batch_is_pca_of_inputs(policy, whiten):
    params = {"d": {"kernel": rand(1, (8, 5))}}
    x = jnp.asarray(rand_np(2, (64, 8)) * np.arange(1.0, 9.0) + 3.0)
    config = jlora.LoraConfig(rank=2, alpha=ALPHA, scaling=policy, init="eva")
    ads = variants.eva_init(jax.random.key(0), params, config, {"d/kernel": x}, rho=1.0,
                            whiten=whiten)
    ad = ads["d/kernel"]
    vh, s, _ = np_pca(x, 2)
    want = vh / np.sqrt(s)[:, None] if whiten else vh
    np.testing.assert_allclose(np.asarray(ad.a).T, want, rtol=1e-4, atol=1e-5)
    assert not np.asarray(ad.b).any() and ad.b.shape == (2, 5)
    assert (ad.rank, ad.alpha) == (2, ALPHA)
    assert ad.scale == pytest.approx(jlora.scaling.compute_scale(policy, 2, ALPHA))


@pytest.mark.parametrize("mode", JIT)
def test_incremental_pca_equals_pca_of_all_rows(mode):
    """With every component kept, IPCA after each batch equals the PCA of all rows seen."""
    x = rand_np(4, (90, 6)) * np.arange(1.0, 7.0, dtype=np.float32) + 1.0
    state = None
    for i in range(3):
        ctx = jax.disable_jit() if mode == "nojit" else warnings.catch_warnings()
        with ctx:
            state = variants.ipca_step(state, jnp.asarray(x[30 * i: 30 * (i + 1)]),
                                       jax.random.key(0), k=6)
        vh, s, evr = np_pca(x[: 30 * (i + 1)], 6)
        np.testing.assert_allclose(state.components, vh, atol=1e-4)
        np.testing.assert_allclose(state.singular_values, s, rtol=1e-4)
        np.testing.assert_allclose(state.explained_variance_ratio, evr, rtol=1e-4)
        np.testing.assert_allclose(state.mean, x[: 30 * (i + 1)].mean(0), rtol=1e-5, atol=1e-5)


def test_eva_redistributes_ranks_by_explained_variance():
    params = {"a": {"kernel": rand(1, (8, 4))}, "b": {"kernel": rand(2, (8, 4))},
              "c": {"kernel": rand(3, (6, 4))}}
    # "a": variance in 3 strong directions; "b": spread evenly; "c": one strong direction.
    xa = rand_np(4, (200, 8)) * np.array([9.0, 8.0, 7.0, 0.1, 0.1, 0.1, 0.1, 0.1], np.float32)
    xb = rand_np(5, (200, 8))
    xc = rand_np(6, (200, 6)) * np.array([10.0, 0.1, 0.1, 0.1, 0.1, 0.1], np.float32)
    inputs = {"a/kernel": xa, "b/kernel": xb, "c/kernel": xc}
    config = jlora.LoraConfig(rank=2, alpha=ALPHA, init="eva")
    ads = variants.eva_init(jax.random.key(0), params, config, inputs, rho=2.0)
    # numpy: the budget 3·2 = 6 goes to the largest EVRs among each layer's top 4.
    pooled = sorted(((np_pca(x, 4)[2][j], p) for p, x in inputs.items() for j in range(4)),
                    reverse=True)[:6]
    want = {p: sum(1 for _, q in pooled if q == p) for p in inputs}
    assert {p: ad.rank for p, ad in ads.items()} == {p: r for p, r in want.items() if r}
    for path, ad in ads.items():
        alpha = ALPHA * want[path] / 2  # PEFT's adjust_scaling_factors
        assert ad.alpha == pytest.approx(alpha)
        assert ad.scale == pytest.approx(alpha / want[path])
        np.testing.assert_allclose(np.asarray(ad.a).T, np_pca(inputs[path], want[path])[0],
                                   rtol=1e-4, atol=1e-4)
    # rsLoRA, without the alpha adjustment: the scale is alpha / sqrt(new rank).
    rs = jlora.LoraConfig(rank=2, alpha=ALPHA, scaling="rslora", init="eva")
    no_adjust = variants.eva_init(jax.random.key(0), params, rs, inputs,
                                  adjust_scaling_factors=False)
    assert {p: ad.rank for p, ad in no_adjust.items()} == {p: r for p, r in want.items() if r}
    for path, ad in no_adjust.items():
        assert ad.alpha == ALPHA and ad.scale == pytest.approx(ALPHA / math.sqrt(want[path]))


def test_eva_equal_inputs_share_one_pca_and_dora():
    params = {"q": {"kernel": rand(1, (6, 4))}, "k": {"kernel": rand(2, (6, 4))}}
    x = rand(3, (40, 6))
    config = jlora.LoraConfig(rank=2, alpha=ALPHA, init="eva", variant="dora")
    ads = variants.eva_init(jax.random.key(0), params, config,
                            {"q/kernel": x, "k/kernel": x}, rho=1.0)
    np.testing.assert_array_equal(ads["q/kernel"].a, ads["k/kernel"].a)
    np.testing.assert_allclose(ads["k/kernel"].magnitude,
                               np.linalg.norm(np.asarray(params["k"]["kernel"]), axis=0),
                               rtol=1e-5)


def test_eva_stops_when_converged_and_warns_when_batches_run_out():
    params = {"d": {"kernel": rand(1, (6, 4))}}
    key_scale = np.array([8.0, 4.0, 1.0, 1.0, 1.0, 1.0], np.float32)
    used = []

    def stream(n):
        for i in range(n):
            used.append(i)
            yield {"d/kernel": rand_np(100 + i, (200, 6)) * key_scale}

    config = jlora.LoraConfig(rank=2, init="eva")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        variants.eva_init(jax.random.key(0), params, config, stream(20), rho=1.0, tau=0.9)
    assert 2 <= len(used) < 20  # converged early: the rest of the stream was not read
    with pytest.warns(UserWarning, match=r"ran out of batches after 2.*\['d/kernel'\]"):
        variants.eva_init(jax.random.key(0), params, config, stream(2), rho=1.0, tau=1.0)


def test_eva_errors():
    params = {"d": {"kernel": rand(1, (6, 4))}, "e": {"embedding": rand(2, (10, 4))}}
    config = jlora.LoraConfig(rank=2, init="eva", targets="d/kernel")
    x = rand(3, (20, 6))
    with pytest.raises(ValueError, match="either `inputs=`.*or both `fn=`"):
        variants.eva_init(jax.random.key(0), params, config)
    with pytest.raises(ValueError, match=r"'d/kernel'.*shape \(20, 5\).*\(\.\.\., 6\)"):
        variants.eva_init(jax.random.key(0), params, config, {"d/kernel": x[:, :5]})
    with pytest.raises(ValueError, match=r"lack the targeted kernel at path 'd/kernel'"):
        variants.eva_init(jax.random.key(0), params, config, {"d/kernal": x})
    with pytest.raises(ValueError, match=r"entries for paths \['x'\]"):
        variants.eva_init(jax.random.key(0), params, config, {"d/kernel": x, "x": x})
    with pytest.raises(ValueError, match="`rho` must be a number >= 1.0, got 0.5"):
        variants.eva_init(jax.random.key(0), params, config, {"d/kernel": x}, rho=0.5)
    with pytest.raises(ValueError, match="no batch had at least 4 rows.*'d/kernel'"):
        variants.eva_init(jax.random.key(0), params, config, {"d/kernel": x[:3]})
    embed = jlora.LoraConfig(rank=2, init="eva", targets="e/embedding")
    with pytest.raises(ValueError, match="'e/embedding'.*'vf', an embedding"):
        variants.eva_init(jax.random.key(0), params, embed, {"e/embedding": x})
    with pytest.raises(ValueError, match="init='gaussian'.*expected init='eva'"):
        variants.eva_init(jax.random.key(0), params,
                          jlora.LoraConfig(rank=2, init="gaussian"), {"d/kernel": x})


# --------------------------------------------------------------------------- CorDA


def np_covariance(batches):
    covs = []
    for x in batches:
        x = np.asarray(x, np.float64)
        x = x / np.abs(x.max())
        covs.append(x.T @ x)
    return sum(covs) / len(covs)


def np_corda_part(w, cov, r, mode):
    """PEFT's collect_eigens + crop + init, in float64: the adapter's s·A@B, (in, out)."""
    w_t = np.asarray(w, np.float64).T
    d = cov.shape[0]
    damp = 0.01
    while True:
        c = cov + np.eye(d) * np.mean(np.diag(cov)) * damp
        c_inv = np.linalg.inv(c)
        if np.linalg.norm(c @ c_inv - np.eye(d)) < 0.05:
            break
        damp *= 2
    u, s, vh = np.linalg.svd(w_t @ c, full_matrices=False)
    v = (vh @ c_inv).T
    sl = slice(None, r) if mode == "ipm" else slice(-r, None)
    return ((u[:, sl] * s[sl]) @ v[:, sl].T).T


@pytest.fixture(scope="module")
def corda_case():
    params = {"a": {"kernel": rand(1, (8, 6))}, "b": {"kernel": rand(2, (6, 5))}}
    batches = [{"a/kernel": rand_np(10 + i, (40, 8)) * np.arange(1.0, 9.0, dtype=np.float32),
                "b/kernel": rand_np(20 + i, (40, 6)) + 0.5} for i in range(2)]
    return params, batches


def test_corda_covariances_match_numpy(corda_case):
    params, batches = corda_case
    covs = variants.corda_covariances(params, jlora.LoraConfig(rank=2), batches)
    for path in ("a/kernel", "b/kernel"):
        np.testing.assert_allclose(covs[path], np_covariance([b[path] for b in batches]),
                                   rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("corda_mode, policy, mode", [
    ("ipm", "standard", "jit"), ("ipm", "rslora", "nojit"),
    ("kpm", "standard", "nojit"), ("kpm", "rslora", "jit")])
def test_corda_matches_numpy(corda_case, corda_mode, policy, mode):
    params, batches = corda_case
    config = jlora.LoraConfig(rank=2, alpha=ALPHA, scaling=policy, init="corda")
    covs = variants.corda_covariances(params, config, batches)
    fn = maybe_jit(lambda p, c: variants.corda_init(None, p, config, covariances=c,
                                                    mode=corda_mode), mode)
    new_params, ads = fn(params, covs)
    for path, leaf in (("a/kernel", "a"), ("b/kernel", "b")):
        w = params[leaf]["kernel"]
        want = np_corda_part(w, np_covariance([b[path] for b in batches]), 2, corda_mode)
        got = np.asarray(ads[path].delta(), np.float64)
        np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-4 * np.abs(want).max())
        np.testing.assert_allclose(new_params[leaf]["kernel"] + got, w, atol=1e-5)
        assert ads[path].scale == pytest.approx(jlora.scaling.compute_scale(policy, 2, ALPHA))


def test_corda_from_inputs_equals_from_covariances(corda_case):
    params, batches = corda_case
    config = jlora.LoraConfig(rank=2, init="corda")
    _, from_inputs = variants.corda_init(None, params, config, batches, mode="kpm")
    covs = variants.corda_covariances(params, config, batches)
    _, from_covs = variants.corda_init(None, params, config, covariances=covs, mode="kpm")
    np.testing.assert_allclose(from_inputs["a/kernel"].a, from_covs["a/kernel"].a, rtol=1e-6)


@pytest.mark.parametrize("policy", POLICIES)
def test_corda_ipm_with_white_inputs_is_pissa(policy):
    """C = I makes W·C = (1.01)·W: CorDA-IPM's adapter is then PiSSA's principal part."""
    params = {"d": {"kernel": rand(1, (8, 6))}}
    config = jlora.LoraConfig(rank=2, alpha=ALPHA, scaling=policy)
    _, corda = variants.corda_init(None, params, config, covariances={"d/kernel": jnp.eye(8)})
    _, pissa = variants.pissa_init(None, params, config)
    np.testing.assert_allclose(corda["d/kernel"].delta(), pissa["d/kernel"].delta(), atol=1e-5)


def test_corda_errors(corda_case):
    params, batches = corda_case
    config = jlora.LoraConfig(rank=2, init="corda")
    covs = variants.corda_covariances(params, config, batches)
    with pytest.raises(ValueError, match="`mode` must be 'ipm'.*got 'kmp'"):
        variants.corda_init(None, params, config, covariances=covs, mode="kmp")
    with pytest.raises(ValueError, match=r"\['b/kernel'\]` has shape \(5, 5\).*\(6, 6\)"):
        variants.corda_init(None, params, config,
                            covariances={**covs, "b/kernel": jnp.eye(5)})
    with pytest.raises(ValueError, match=r"missing \['b/kernel'\]"):
        variants.corda_init(None, params, config, covariances={"a/kernel": covs["a/kernel"]})
    bad = np.array(covs["b/kernel"])
    bad[0, 0] = np.nan
    with pytest.raises(ValueError, match=r"covariances\['b/kernel'\]` holds NaN"):
        variants.corda_init(None, params, config, covariances={**covs, "b/kernel": bad})
    with pytest.raises(ValueError, match="takes the data one way"):
        variants.corda_init(None, params, config, batches, covariances=covs)
    zeros = [{"a/kernel": jnp.zeros((4, 8)), "b/kernel": jnp.ones((4, 6))}]
    with pytest.raises(ValueError, match="'a/kernel' is not finite.*max\\(X\\) = 0"):
        variants.corda_covariances(params, config, zeros)


# --------------------------------------------------------------------------- jlora.init


@pytest.mark.parametrize("name, fix", [("pissa", "pissa_init"), ("olora", "olora_init"),
                                       ("corda", "corda_init"), ("eva", "eva_init")])
def test_init_points_to_the_variant_function(name, fix):
    params = {"d": {"kernel": jnp.ones((4, 3))}}
    with pytest.raises(ValueError, match=f"init='{name}'.*jlora.variants.{fix}"):
        jlora.init(jax.random.key(0), params, jlora.LoraConfig(rank=1, init=name))


# --------------------------------------------------------------------------- models


def mlp(params, x):
    h = jnp.tanh(x @ params["l1"]["kernel"] + params["l1"]["bias"][None, :])
    h = jnp.tanh(h @ params["l2"]["kernel"])
    return h @ params["head"]["kernel"]


@pytest.fixture(scope="module")
def mlp_case():
    params = {"l1": {"kernel": rand(1, (8, 12), 0.5), "bias": rand(2, (12,))},
              "l2": {"kernel": rand(3, (12, 12), 0.5)},
              "head": {"kernel": rand(4, (12, 3), 0.5)}}
    x = rand(5, (48, 8))
    hidden = jnp.tanh(x @ params["l1"]["kernel"] + params["l1"]["bias"][None, :])
    inputs = {"l1/kernel": x, "l2/kernel": hidden}
    return params, x, inputs


def build(name, params, config, inputs):
    key = jax.random.key(0)
    if name == "pissa":
        return variants.pissa_init(key, params, config)
    if name == "olora":
        return variants.olora_init(key, params, config)
    if name == "corda":
        return variants.corda_init(key, params, config, inputs, mode="ipm")
    if name == "eva":
        return params, variants.eva_init(key, params, config, inputs, rho=1.0)
    return params, jlora.init(key, params, config)


INIT_NAMES = ["pissa", "olora", "corda", "eva", "orthogonal"]


# Every init with plain LoRA; DoRA with one base-changing and one data-driven init.
MODEL_CASES = [(name, "lora") for name in INIT_NAMES] + [("pissa", "dora"), ("eva", "dora")]


@pytest.mark.parametrize("name, variant", MODEL_CASES)
def test_model_unchanged_at_init_merged_and_factored(mlp_case, name, variant):
    index = MODEL_CASES.index((name, variant))
    policy, mode = POLICIES[index % 2], JIT[(index // 2) % 2]
    params, x, inputs = mlp_case
    config = jlora.LoraConfig(rank=2, alpha=ALPHA, scaling=policy, init=name, variant=variant,
                              targets="l[12]/kernel")
    base, ads = build(name, params, config, inputs)
    assert sorted(ads) == ["l1/kernel", "l2/kernel"]
    want = mlp(params, x)
    np.testing.assert_allclose(mlp(jlora.merge(base, ads), x), want, rtol=1e-4, atol=1e-5)
    factored = maybe_jit(jlora.lora(mlp), mode)(base, ads, x)
    np.testing.assert_allclose(factored, want, rtol=1e-4, atol=1e-5)
    if name in ("pissa", "olora", "corda"):
        assert not np.allclose(base["l1"]["kernel"], params["l1"]["kernel"])


def perturbed(adapters, seed):
    """Adapters moved off their init (B non-zero, magnitude off the norm), as in training."""
    out = {}
    for i, (path, ad) in enumerate(sorted(adapters.items())):
        changes = dict(a=ad.a + rand(seed + 10 * i, ad.a.shape, 0.2),
                       b=ad.b + rand(seed + 10 * i + 1, ad.b.shape, 0.2))
        if ad.magnitude is not None:
            changes["magnitude"] = ad.magnitude * jnp.asarray(
                1.0 + 0.3 * np.abs(rand_np(seed + 10 * i + 2, ad.magnitude.shape)))
        out[path] = ad.replace(**changes)
    return out


def conv_embed_model(params, ids):
    h = params["embed"]["embedding"][ids]  # (batch, 6, 6, 4) via a gather
    h = jax.lax.conv_general_dilated(h, params["conv"]["kernel"], (1, 1), "SAME",
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return jnp.tanh(h) @ params["out"]["kernel"]


@pytest.fixture(scope="module")
def conv_embed_case():
    params = {"embed": {"embedding": rand(1, (10, 4))},
              "conv": {"kernel": rand(2, (3, 3, 4, 6), 0.3)},
              "out": {"kernel": rand(3, (6, 2), 0.5)}}
    ids = jnp.asarray(np.random.default_rng(4).integers(0, 10, (2, 6, 6)))
    return params, ids


@pytest.mark.parametrize("model, policy, mode", [("mlp", "standard", "jit"),
                                                 ("conv_embed", "rslora", "nojit")])
def test_dora_factored_equals_merged_with_grads(mlp_case, conv_embed_case, model, policy, mode):
    """jlora.lora with DoRA (norm from dora_norm, never merged) == f(merge), value and grad."""
    if model == "mlp":
        fn, (params, arg), targets = mlp, mlp_case[:2], "l[12]/kernel|head/kernel"
    else:
        fn, (params, arg), targets = conv_embed_model, conv_embed_case, "embed/.*|conv/.*"
    config = jlora.LoraConfig(rank=2, alpha=ALPHA, scaling=policy, variant="dora",
                              targets=targets)
    ads = perturbed(jlora.init(jax.random.key(0), params, config), seed=50)

    def loss_merged(a):
        return jnp.sum(jnp.sin(fn(jlora.merge(params, a), arg)))

    def loss_factored(a):
        return jnp.sum(jnp.sin(jlora.lora(fn)(params, a, arg)))

    want, want_g = jax.jit(jax.value_and_grad(loss_merged))(ads)
    got, got_g = maybe_jit(jax.value_and_grad(loss_factored), mode)(ads)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    for path in ads:
        for field in ("a", "b", "magnitude"):
            np.testing.assert_allclose(getattr(got_g[path], field), getattr(want_g[path], field),
                                       rtol=1e-4, atol=1e-5, err_msg=f"{path}.{field}")


def test_dora_on_a_quantized_base_factored_equals_merged():
    """DoRA's factor follows the kernel through the model's own ``dequantize``."""
    params = {"d": {"kernel": jlora.quantization.quantize(rand(1, (12, 10)), "int8")}}
    config = jlora.LoraConfig(rank=2, alpha=ALPHA, targets="d/kernel", variant="dora")
    ads = perturbed(jlora.init(jax.random.key(0), params, config), seed=90)
    x = rand(2, (5, 12))

    def fn(p, x):
        return jnp.tanh(x @ jlora.quantization.dequantize(p["d"]["kernel"]))

    want = jnp.tanh(x @ jlora.merge(params, ads)["d"]["kernel"])
    np.testing.assert_allclose(jlora.lora(fn)(params, ads, x), want, rtol=1e-5, atol=1e-5)


def test_eva_and_corda_collect_inputs_from_fn(mlp_case):
    """fn + batches (inputs read off the trace by jlora.collect_inputs) == given inputs."""
    params, x, _ = mlp_case
    batches = [x[:24], x[24:]]

    def hidden(xb):
        return jnp.tanh(xb @ params["l1"]["kernel"] + params["l1"]["bias"][None, :])

    by_hand = [{"l1/kernel": xb, "l2/kernel": hidden(xb)} for xb in batches]
    config = jlora.LoraConfig(rank=2, alpha=ALPHA, targets="l[12]/kernel")
    covs = variants.corda_covariances(params, config, fn=mlp, batches=batches)
    want = variants.corda_covariances(params, config, by_hand)
    for path in want:
        np.testing.assert_allclose(covs[path], want[path], rtol=1e-5, atol=1e-6)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # two batches: unconverged is expected
        got = variants.eva_init(jax.random.key(0), params, config, fn=mlp, batches=batches)
        ref = variants.eva_init(None, params, config, by_hand)
    for path in ref:
        assert got[path].rank == ref[path].rank
        np.testing.assert_allclose(got[path].a, ref[path].a, rtol=1e-4, atol=1e-5)


def test_corda_on_a_conv_from_fn(conv_embed_case):
    """A conv's inputs are its patches (window x in wide): CorDA works on it from fn."""
    params, ids = conv_embed_case
    config = jlora.LoraConfig(rank=2, alpha=ALPHA, scaling="rslora", targets="conv/kernel")
    base, ads = variants.corda_init(None, params, config, fn=conv_embed_model,
                                    batches=[ids[:1], ids[1:]], mode="ipm")
    assert ads["conv/kernel"].a.shape == (3, 3, 4, 2)
    want = conv_embed_model(params, ids)
    np.testing.assert_allclose(conv_embed_model(jlora.merge(base, ads), ids), want,
                               rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(jlora.lora(conv_embed_model)(base, ads, ids), want,
                               rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------- the interface


class Gain(variants.Variant):
    """A variant made up for the test: ``W' = (1 + g)·(W + s·A@B)`` with a trainable gain
    ``g`` per output feature (kept in the adapter's ``magnitude``), zero at init."""

    name, title, rescales_output = "test-gain", "gain", True

    def extra_shapes(self, layout, kernel_shape):
        stacked, _, fan_out = layout.split_shape(kernel_shape)
        return {"magnitude": (*stacked, *fan_out)}

    def init(self, kernel, adapter):
        shape = self.extra_shapes(adapter.layout, kernel.shape)["magnitude"]
        return adapter.replace(magnitude=jnp.zeros(shape, adapter.a.dtype))

    def _scaled(self, kernel, adapter, power):
        lay = adapter.layout
        gain = (1.0 + adapter.magnitude.astype(jnp.float32)) ** power
        stacked = gain.shape[: lay.num_stacked]
        matrix = lay.to_matrix(kernel.astype(jnp.float32))
        return lay.from_matrix(matrix * gain.reshape(*stacked, 1, -1), kernel.shape)

    def merge(self, kernel, adapter):
        return self._scaled(super().merge(kernel, adapter), adapter, 1).astype(kernel.dtype)

    def unmerge(self, kernel, adapter):
        return super().unmerge(self._scaled(kernel, adapter, -1), adapter)

    def output_factor(self, kernel, adapter):
        return 1.0 + adapter.magnitude.astype(jnp.float32)

    def combine(self, base, branch, factor, dropped):
        return (factor.astype(base.dtype) * (base + branch.astype(base.dtype))).astype(base.dtype)


@pytest.fixture
def gain_variant(monkeypatch):
    """``Gain`` registered for one test only."""
    monkeypatch.setattr(jlora._variant, "_REGISTRY", dict(jlora._variant._REGISTRY))
    return variants.register_variant(Gain())


def test_a_registered_variant_works_everywhere(gain_variant, mlp_case):
    """init, merge, unmerge and the factored transform all go through the variant."""
    params, x, _ = mlp_case
    assert "test-gain" in variants.variant_names()
    config = jlora.LoraConfig(rank=2, alpha=ALPHA, targets="l[12]/kernel|head/kernel",
                              variant="test-gain")
    ads = jlora.init(jax.random.key(0), params, config)
    assert ads["l1/kernel"].magnitude.shape == (12,) and not ads["l1/kernel"].magnitude.any()
    np.testing.assert_allclose(mlp(jlora.merge(params, ads), x), mlp(params, x), rtol=1e-6)
    ads = {path: ad.replace(magnitude=rand(80 + i, ad.magnitude.shape, 0.5))
           for i, (path, ad) in enumerate(perturbed(ads, seed=70).items())}
    merged = jlora.merge(params, ads)
    for path, ad in ads.items():
        w = np.asarray(params[path.split("/")[0]]["kernel"], np.float64)
        want = (1 + np.asarray(ad.magnitude)) * (w + np.asarray(ad.delta(), np.float64))
        np.testing.assert_allclose(merged[path.split("/")[0]]["kernel"], want, rtol=1e-5,
                                   atol=1e-6)
    back = jlora.unmerge(merged, ads)
    for leaf in ("l1", "l2", "head"):
        np.testing.assert_allclose(back[leaf]["kernel"], params[leaf]["kernel"], rtol=1e-5,
                                   atol=1e-5)
    np.testing.assert_allclose(jlora.lora(mlp)(params, ads, x), mlp(merged, x), rtol=1e-5,
                               atol=1e-5)
    with pytest.raises(ValueError, match=r"gain adapter at path 'l1/kernel' has no magnitude"):
        jlora.merge(params, {"l1/kernel": ads["l1/kernel"].replace(magnitude=None)})


def test_unknown_variant_is_refused_with_the_registered_names():
    ad = random_adapter("io", (12, 10), 2, "standard").replace(variant="vera")
    with pytest.raises(ValueError, match=r"Unknown adapter variant 'vera': expected one of "
                                         r"\['lora', 'dora'.*register_variant"):
        jlora.merge({"k": rand(1, (12, 10))}, {"k": ad})
    with pytest.raises(ValueError, match=r"`variant` must be one of \['lora', 'dora'"):
        jlora.LoraConfig(variant="vera")
