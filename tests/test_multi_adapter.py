"""Several adapters on one base (jlora.multi_adapter): banks, switching without
recompiling, per-example adapters, weighted combinations, against direct computations."""

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jlora
from jlora import multi_adapter as M
from jlora import quantization as Q

L, D, H = 2, 8, 6
LAYOUTS = {"stack/kernel": "sio", "query/kernel": "ioo"}


def _normal(seed, shape, scale=1.0):
    return np.asarray(jax.random.normal(jax.random.key(seed), shape), np.float32) * scale


def _model(p, x):
    h = jnp.tanh(x @ p["up"]["kernel"])
    h, _ = jax.lax.scan(lambda h, w: (jnp.tanh(h @ w), None), h, p["stack"]["kernel"])
    return jnp.einsum("...h,hqk->...qk", h, p["query"]["kernel"]).reshape(*h.shape[:-1], -1)


@pytest.fixture(scope="module")
def params():
    return {"up": {"kernel": jnp.asarray(_normal(0, (D, H), 0.4))},
            "stack": {"kernel": jnp.asarray(_normal(1, (L, H, H), 0.4))},
            "query": {"kernel": jnp.asarray(_normal(2, (H, 2, 3), 0.4))}}


def _set(params, seed, rank, alpha, scaling="standard", targets=".*kernel"):
    layouts = {k: v for k, v in LAYOUTS.items() if re.fullmatch(targets, k)}
    ads = jlora.init(jax.random.key(seed), params, jlora.LoraConfig(
        rank=rank, alpha=alpha, scaling=scaling, targets=targets, layouts=layouts))
    return {p: a.replace(b=jnp.asarray(_normal(seed + 10, a.b.shape, 0.5)))
            for p, a in ads.items()}


@pytest.fixture(scope="module")
def sets(params):
    # Different ranks, scales (standard vs rsLoRA) and targets ("it" leaves out the stack).
    return {"fr": _set(params, 1, 2, 4.0),
            "de": _set(params, 2, 3, 6.0, "rslora"),
            "it": _set(params, 3, 1, 1.0, targets="(up|query)/kernel")}


@pytest.fixture(scope="module")
def bank(sets):
    return M.stack_adapters(sets)


def _merged_np(params, ads):
    """W + s·A·B per adapted kernel, in numpy."""
    out = jax.tree.map(np.asarray, params)
    for path, ad in ads.items():
        a, b = np.asarray(ad.a, np.float32), np.asarray(ad.b, np.float32)
        ns = ad.layout.num_stacked
        a2 = a.reshape(*a.shape[:ns], -1, ad.rank)
        b2 = b.reshape(*b.shape[: ns + 1], -1)
        mod = path.split("/")[0]
        out[mod]["kernel"] = out[mod]["kernel"] + ad.scale * (a2 @ b2).reshape(
            out[mod]["kernel"].shape)
    return out


def test_bank_pads_ranks_and_folds_scales(bank, sets):
    assert bank.names == ("fr", "de", "it") and len(bank) == 3
    up = bank.adapters["up/kernel"]
    assert up.rank == 3 and up.a.shape == (3, D, 3) and up.scale == 1.0  # scales differed
    stack = bank.select("it")["stack/kernel"]  # "it" does not adapt the stack: zeros
    assert not np.any(np.asarray(stack.a)) and not np.any(np.asarray(stack.b))
    for name, ads in sets.items():
        for path, ad in ads.items():
            got = bank.select(name)[path]
            np.testing.assert_allclose(got.delta(), ad.delta(), rtol=1e-6, atol=1e-6)
    assert bank.ids(["de", "de", "fr"]).tolist() == [1, 1, 0]


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_selected_set_equals_direct(params, sets, bank, jit):
    g = jlora.lora(_model)
    g = jax.jit(g) if jit else g
    x = jnp.asarray(_normal(4, (3, D)))
    for k, name in enumerate(bank.names):
        want = _model(_merged_np(params, sets[name]), x)
        np.testing.assert_allclose(g(params, bank.select(name), x), want, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(g(params, bank.select(k), x), want, rtol=1e-5, atol=1e-5)


def test_switching_sets_does_not_recompile(params, sets, bank):
    g = jlora.lora(_model)
    x = jnp.asarray(_normal(5, (3, D)))
    traces = []

    @jax.jit
    def serve(params, adapters, x):
        traces.append("serve")
        return g(params, adapters, x)

    @jax.jit
    def serve_index(params, bank, k, x):
        traces.append("serve_index")
        return g(params, bank.select(k), x)

    for k, name in enumerate(bank.names):
        by_name = serve(params, bank.select(name), x)
        by_index = serve_index(params, bank, jnp.int32(k), x)
        np.testing.assert_allclose(by_index, by_name, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(by_name, _model(_merged_np(params, sets[name]), x),
                                   rtol=1e-5, atol=1e-5)
    assert traces == ["serve", "serve_index"]  # one trace each for three sets
    # The raw sets have different ranks: switching between them does retrace.
    for ads in sets.values():
        serve(params, ads, x)
    assert traces.count("serve") > 1


def _per_example_direct(params, bank, ids, x):
    """Each example alone, through the model on its own merged kernels (jnp, for grads)."""
    outs = []
    for k, i in enumerate(ids):
        ads = bank.select(int(i))
        p = jax.tree.map(lambda t: t, params)
        for path, ad in ads.items():
            mod = path.split("/")[0]
            p[mod] = {"kernel": p[mod]["kernel"] + ad.delta()}
        outs.append(_model(p, x[k : k + 1])[0])
    return jnp.stack(outs)


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_per_example_adapters_equal_each_example_alone(params, bank, jit):
    h = M.per_example(_model)
    h = jax.jit(h) if jit else h
    ids = np.array([2, 0, 1, 0, 2])
    x = jnp.asarray(_normal(6, (5, 4, D)))  # batch 5, sequence 4
    y = h(params, bank, ids, x)
    assert y.shape == (5, 4, 6)
    for k, i in enumerate(ids):
        want = _model(_merged_np(params, bank.select(int(i))), np.asarray(x[k : k + 1]))[0]
        np.testing.assert_allclose(y[k], want, rtol=1e-5, atol=1e-5)
    # Multi-tenant training: gradients w.r.t. the whole bank.
    got = jax.grad(lambda b: (h(params, b, ids, x) ** 2).sum())(bank)
    want = jax.grad(lambda b: (_per_example_direct(params, b, ids, x) ** 2).sum())(bank)
    for g_, w_ in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(g_, w_, rtol=1e-4, atol=1e-5)


def test_per_example_on_a_quantized_base(params, bank):
    qparams = Q.quantize_params(params, "int8", layouts=LAYOUTS)

    def qmodel(p, x):
        return _model(jax.tree.map(Q.dequantize, p, is_leaf=Q.is_quantized), x)

    ids = np.array([1, 2, 0])
    x = jnp.asarray(_normal(7, (3, D)))
    y = jax.jit(M.per_example(qmodel))(qparams, bank, ids, x)
    base = Q.dequantize_params(qparams)
    for k, i in enumerate(ids):
        want = _model(_merged_np(base, bank.select(int(i))), np.asarray(x[k : k + 1]))[0]
        np.testing.assert_allclose(y[k], want, rtol=1e-5, atol=1e-5)


# -- weighted combinations (PEFT's add_weighted_adapter) ---------------------------------


def _np(ad):
    return np.asarray(ad.a, np.float64), np.asarray(ad.b, np.float64)


def _delta_np(ad):
    a, b = _np(ad)
    ns = ad.layout.num_stacked
    prod = a.reshape(*a.shape[:ns], -1, a.shape[-1]) @ b.reshape(*b.shape[: ns + 1], -1)
    return ad.scale * prod.reshape(ad.kernel_shape)


def test_linear_combination_is_peft_formula(params):
    s1, s2 = _set(params, 4, 2, 4.0), _set(params, 5, 2, 2.0, "rslora")
    w = [0.7, -0.4]
    out = M.add_weighted_adapter({"x": s1, "y": s2}, w, "linear")
    for path in s1:
        a1, b1 = _np(s1[path])
        a2, b2 = _np(s2[path])
        ws = [w[0] * s1[path].scale, w[1] * s2[path].scale]
        a = np.sign(ws[0]) * np.sqrt(abs(ws[0])) * a1 + np.sign(ws[1]) * np.sqrt(abs(ws[1])) * a2
        b = np.sqrt(abs(ws[0])) * b1 + np.sqrt(abs(ws[1])) * b2
        got = out[path]
        assert (got.rank, got.scale, got.alpha) == (2, 1.0, 2.0)
        np.testing.assert_allclose(got.a, a, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(got.b, b, rtol=1e-5, atol=1e-6)


def test_cat_combination_is_the_weighted_sum_of_updates(sets):
    w = [1.0, 0.5, -2.0]
    out = M.add_weighted_adapter(sets, w, "cat")
    for path, ad in out.items():
        present = [(s[path], wi) for s, wi in zip(sets.values(), w, strict=True) if path in s]
        assert ad.rank == sum(a.rank for a, _ in present)  # 6 for up/query, 5 for the stack
        want = sum(wi * _delta_np(a) for a, wi in present)
        np.testing.assert_allclose(ad.delta(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rank", [None, 2])
def test_svd_combination_is_the_truncated_svd(sets, rank):
    w = [0.5, 1.0, 0.25]
    out = M.add_weighted_adapter(sets, w, "svd", rank=rank)
    for path, ad in out.items():
        present = [(s[path], wi) for s, wi in zip(sets.values(), w, strict=True) if path in s]
        r = rank or max(a.rank for a, _ in present)
        assert ad.rank == r and ad.scale == 1.0
        total = sum(wi * _delta_np(a) for a, wi in present)
        ns = ad.layout.num_stacked
        m = total.reshape(*total.shape[:ns], int(np.prod(ad.a.shape[ns:-1])), -1)
        u, s, vt = np.linalg.svd(m, full_matrices=False)
        best = (u[..., :r] * s[..., None, :r]) @ vt[..., :r, :]
        np.testing.assert_allclose(ad.delta().reshape(best.shape), best, rtol=1e-4, atol=1e-5)
        a = np.asarray(ad.a).reshape(*m.shape[:-1], r)  # orthonormal columns; S sits in B
        np.testing.assert_allclose(np.swapaxes(a, -1, -2) @ a, np.broadcast_to(
            np.eye(r), (*m.shape[:ns], r, r)), atol=1e-5)


def test_svd_clamp_clips_factors(sets):
    out = M.add_weighted_adapter(sets, [1.0, 1.0, 1.0], "svd", clamp=0.9)
    ref = M.add_weighted_adapter(sets, [1.0, 1.0, 1.0], "svd")
    ad, r = out["up/kernel"], ref["up/kernel"]
    hi = np.quantile(np.concatenate([np.ravel(r.b), np.ravel(r.a)]), 0.9)
    np.testing.assert_allclose(ad.a, np.clip(r.a, -hi, hi), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ad.b, np.clip(r.b, -hi, hi), rtol=1e-5, atol=1e-6)


# transformers' Conv1D (out, in); the gemma package's q_einsum (heads, embed, head_dim);
# stacked with the stack first and with MaxText's scan axis second; an embedding table
# stored (features, vocab); a conv in torch's (out, in, kh, kw) order.
ORDERS = [("oi", (6, 8)), ("oio", (2, 8, 3)), ("soio", (3, 2, 8, 4)), ("isoo", (8, 3, 2, 4)),
          ("fv", (4, 10)), ("oiww", (4, 2, 3, 3))]
_GROUP = {"s": 0, "i": 1, "w": 1, "v": 1, "o": 2, "f": 2}


@pytest.mark.parametrize("axes, shape", ORDERS, ids=[a for a, _ in ORDERS])
def test_sets_of_any_axis_order_combine_as_the_canonical_kernel(axes, shape):
    """Adapter sets of a kernel stored in any order stack and combine ("linear", "cat",
    "svd") into exactly the factors of the same kernel stored (stacked, fan-in, fan-out),
    so every update is the canonical one transposed back."""
    order = sorted(range(len(axes)), key=lambda k: _GROUP[axes[k]])
    back = np.argsort(order)
    lay, canonical = jlora.Layout(axes), jlora.Layout("".join(axes[k] for k in order))

    def sets(layout, ranks):
        out = []
        for i, rank in enumerate(ranks):
            a_shape, b_shape = lay.factor_shapes(shape, rank)
            out.append({"k": jlora.Adapter(
                a=jnp.asarray(_normal(20 + i, a_shape)), b=jnp.asarray(_normal(30 + i, b_shape)),
                layout=layout, rank=rank, alpha=2.0 * (i + 1), scale=2.0 * (i + 1) / rank)})
        return out

    for kind, ranks in (("linear", (2, 2)), ("cat", (2, 3)), ("svd", (2, 3))):
        ours = M.add_weighted_adapter(sets(lay, ranks), [0.7, -1.3], kind)["k"]
        theirs = M.add_weighted_adapter(sets(canonical, ranks), [0.7, -1.3], kind)["k"]
        assert ours.layout == lay and ours.kernel_shape == tuple(shape), kind
        np.testing.assert_array_equal(ours.a, theirs.a, err_msg=kind)
        np.testing.assert_array_equal(ours.b, theirs.b, err_msg=kind)
        np.testing.assert_array_equal(ours.delta(), np.transpose(theirs.delta(), back),
                                      err_msg=kind)
    # SVD's rank-3 result of two updates of ranks 2 and 3 keeps their sum's top 3 singular
    # values: read from the kernel-order updates through numpy's own matrix view.
    ours = M.add_weighted_adapter(sets(lay, (2, 3)), [0.7, -1.3], "svd")["k"]
    total = sum(w * np.asarray(ad["k"].delta(), np.float64)
                for ad, w in zip(sets(lay, (2, 3)), [0.7, -1.3], strict=True))
    stacked = lay.split_shape(shape)[0]
    matrix = np.transpose(total, order).reshape(*stacked, math.prod(
        shape[k] for k in lay.fan_in_axes), -1)
    u, sv, vt = np.linalg.svd(matrix, full_matrices=False)
    best = np.transpose(((u[..., :3] * sv[..., None, :3]) @ vt[..., :3, :]).reshape(
        [shape[k] for k in order]), back)
    np.testing.assert_allclose(ours.delta(), best, rtol=1e-4, atol=1e-4)

    bank = M.stack_adapters(dict(zip("xy", sets(lay, (2, 3)), strict=True)))
    canonical_bank = M.stack_adapters(dict(zip("xy", sets(canonical, (2, 3)), strict=True)))
    for name in "xy":
        np.testing.assert_array_equal(
            bank.select(name)["k"].delta(),
            np.transpose(canonical_bank.select(name)["k"].delta(), back))


def test_bad_input_is_named(params, sets, bank):
    two = [sets["fr"], sets["de"]]
    with pytest.raises(ValueError, match=r"same rank.*'query/kernel' has ranks \[2, 3\]"):
        M.add_weighted_adapter(two, [1.0, 1.0], "linear")
    with pytest.raises(ValueError, match="`combination_type` must be one of"):
        M.add_weighted_adapter(two, [1.0, 1.0], "ties")
    with pytest.raises(ValueError, match="`weights` has 1 entries for 2 adapter sets"):
        M.add_weighted_adapter(two, [1.0], "cat")
    with pytest.raises(ValueError, match=r"`rank` 9 .*'query/kernel'.*\[1, 6\]"):
        M.add_weighted_adapter(two, [1.0, 1.0], "svd", rank=9)
    dora = jlora.init(jax.random.key(0), params, jlora.LoraConfig(
        rank=1, variant="dora", targets="up/kernel"))
    with pytest.raises(ValueError, match="'up/kernel' is a 'dora' adapter"):
        M.add_weighted_adapter([dora], [1.0], "cat")
    other = {"up/kernel": sets["fr"]["up/kernel"].replace(dropout=0.1)}
    with pytest.raises(ValueError, match=r"'fr' and 'x' disagree on the dropout .*'up/kernel'"):
        M.stack_adapters({"fr": sets["fr"], "x": other})
    h = M.per_example(_model)
    with pytest.raises(ValueError, match=r"`ids` must be a 1-D integer array"):
        h(params, bank, jnp.zeros((2, 2), jnp.int32), jnp.ones((2, D)))
    with pytest.raises(ValueError, match=r"size len\(ids\) = 3; args\[0\] has shape \(2, 8\)"):
        h(params, bank, jnp.array([0, 1, 2]), jnp.ones((2, D)))
    with pytest.raises(KeyError, match="No adapter set named 'es'"):
        bank.select("es")
