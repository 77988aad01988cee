"""The factored transform: ``lora(f)(params, adapters, *args) == f(merge(params, adapters), *args)``
(values and adapter gradients).

Every model case is checked for values and for gradients w.r.t. the adapters, with and
without ``jit``, against ``f`` applied to ``jlora.merge`` (the dense reference). Adapters
get random, non-zero ``A`` and ``B`` so the low-rank branch actually contributes.
"""

from __future__ import annotations

import functools
import warnings
import zlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

import jlora
from jlora import _jax_compat as jc

F32_TOL = dict(rtol=2e-5, atol=2e-5)


_RNG = [np.random.default_rng(0)]


def _normal(*shape, scale=1.0):
    """Test data from numpy: no XLA compile per shape, unlike jax.random outside jit."""
    return jnp.asarray(scale * _RNG[0].standard_normal(shape), jnp.float32)


def _numpy_params(abstract):
    """Random values for a tree of shapes; kernels scaled by 1/sqrt(their second-last axis)."""
    def draw(s):
        scale = 1 / np.sqrt(s.shape[-2]) if len(s.shape) >= 2 else 0.1
        return _normal(*s.shape, scale=scale).astype(s.dtype)

    return jax.tree.map(draw, abstract)


def _adapters(params, **config):
    """Adapters as jlora.plan lays them out, with random non-zero A and B (init's B = 0
    would hide a wrong low-rank branch)."""
    config.setdefault("rank", 2)
    config.setdefault("alpha", 3.0)
    config = jlora.LoraConfig(**config)
    out = {}
    for path, p in jlora.plan(params, config).items():
        a_shape, b_shape = p.layout.factor_shapes(p.shape, p.rank)
        out[path] = jlora.Adapter(
            a=_normal(*a_shape, scale=0.5), b=_normal(*b_shape, scale=0.5),
            layout=p.layout, rank=p.rank, alpha=p.alpha, scale=p.scale,
            policy=config.policy_name, variant=config.variant, dropout=config.dropout,
        )
    return out


# ---------------------------------------------------------------------------------------
# Model cases: each returns (fn, params, adapters, args)
# ---------------------------------------------------------------------------------------


def _linen(module, *inputs, **config):
    params = _numpy_params(jax.eval_shape(module.init, jax.random.key(1), *inputs))
    return module.apply, params, _adapters(params, **config), inputs


def case_dense():
    class M(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(3)(jax.nn.gelu(nn.Dense(6)(x)))

    return _linen(M(), _normal(4, 5))


def case_dense_general():
    class M(nn.Module):
        @nn.compact
        def __call__(self, x):  # x: (batch, 5, 2): fan-in (5, 2), fan-out (3, 4)
            h = nn.DenseGeneral(features=(3, 4), axis=(-2, -1))(x)
            return nn.DenseGeneral(features=2, axis=(-2, -1), name="back")(jnp.tanh(h))

    x = _normal(3, 5, 2)
    return _linen(M(), x, layouts={r".*/DenseGeneral_0/kernel": "iioo", r".*/back/kernel": "iio"})


def case_einsum():
    class M(nn.Module):
        @nn.compact
        def __call__(self, x):
            h = nn.Einsum((6, 2, 3), "bse,ehd->bshd", use_bias=False, name="proj")(x)
            return nn.Einsum((2, 3, 6), "bshd,hde->bse", use_bias=False, name="back")(h)

    x = _normal(2, 4, 6)
    return _linen(M(), x, layouts={r".*/proj/kernel": "ioo", r".*/back/kernel": "iio"})


def case_conv():
    class M(nn.Module):
        @nn.compact
        def __call__(self, x1, x2):
            a = nn.Conv(4, (3,), strides=2, padding="SAME", kernel_dilation=2, name="conv1")(x1)
            b = nn.Conv(5, (3, 2), strides=(1, 2), padding=((1, 0), (2, 1)),
                        kernel_dilation=(2, 1), name="conv2")(x2)
            return a.sum(axis=1), b.mean(axis=(1, 2))

    x1 = _normal(2, 9, 3)
    x2 = _normal(2, 7, 8, 3)
    return _linen(M(), x1, x2)


def case_embed():
    class M(nn.Module):
        @nn.compact
        def __call__(self, ids):
            emb = nn.Embed(12, 6, name="embed")
            h = jnp.tanh(nn.Dense(6)(emb(ids)))               # lookup: a gather
            one_hot = jax.nn.one_hot(ids, 12) @ emb.embedding  # a dot over the vocab axis
            return emb.attend(h), one_hot  # attend contracts the feature (fan-out) axis

    return _linen(M(), jnp.array([[0, 3, 11], [5, 5, 1]]))


class _Block(nn.Module):
    @nn.compact
    def __call__(self, x, _):
        h = nn.LayerNorm()(x)
        h = nn.MultiHeadDotProductAttention(num_heads=2, qkv_features=8, name="attn")(h)
        x = x + checkpoint_name(h, "attn_out")
        h = nn.Dense(16, name="up")(nn.LayerNorm()(x))
        return x + nn.Dense(8, name="down")(jax.nn.gelu(h)), None


_SCAN_POLICY = jax.checkpoint_policies.save_only_these_names("attn_out")


def case_scan_transformer():
    class M(nn.Module):
        @nn.compact
        def __call__(self, x):
            block = nn.remat(_Block, policy=_SCAN_POLICY, prevent_cse=False)
            x, _ = nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True},
                           length=2)(name="layers")(x, None)
            return x

    x = _normal(2, 3, 8)
    return _linen(M(), x, layouts={r"params/layers/.*": "s..."})


def case_remat_bf16():
    class M(nn.Module):
        @nn.compact
        def __call__(self, x):
            dense = nn.remat(nn.Dense, policy=jax.checkpoint_policies.dots_saveable)
            h = dense(8, dtype=jnp.bfloat16, param_dtype=jnp.float32)(x)
            return nn.Dense(3, dtype=jnp.bfloat16, param_dtype=jnp.float32)(jax.nn.relu(h))

    return _linen(M(), _normal(4, 6))


class _NnxNet(nnx.Module):
    def __init__(self, rngs):
        self.embed = nnx.Embed(10, 8, rngs=rngs)
        self.conv = nnx.Conv(8, 8, kernel_size=(3,), padding="SAME", rngs=rngs)
        self.attn = nnx.MultiHeadAttention(num_heads=2, in_features=8, qkv_features=8,
                                           decode=False, rngs=rngs)
        self.linear = nnx.Linear(8, 3, rngs=rngs)

    def __call__(self, ids):
        h = self.conv(self.embed(ids))
        h = self.attn(h)
        return self.linear(jax.nn.relu(h))


def case_nnx():
    graphdef, state = nnx.split(nnx.eval_shape(lambda: _NnxNet(nnx.Rngs(0))))
    state = _numpy_params(state)

    def fn(state, ids):
        return nnx.merge(graphdef, state)(ids)

    return fn, state, _adapters(state), (jnp.array([[1, 2, 9, 0], [3, 3, 4, 7]]),)


def case_mlp():
    @jax.jit
    def layer(w, b, x):  # a nested jit around the kernel's use
        return jnp.tanh(x @ w + b[None])

    def fn(p, x):
        h = layer(p["l1"]["w"], p["l1"]["b"], x)
        h = jax.checkpoint(lambda h: layer(p["l2"]["w"], p["l2"]["b"], h),
                           policy=jax.checkpoint_policies.nothing_saveable)(h)
        return h @ p["head"].T  # the head is stored (out, in): used transposed

    params = {
        "l1": {"w": _normal(5, 7), "b": jnp.zeros(7)},
        "l2": {"w": _normal(7, 7), "b": jnp.zeros(7)},
        "head": _normal(3, 7),
    }
    # The head's layout is given: guessed from its shape it would be 'io', which the
    # model's transposed use contradicts (see test_guessed_layout_contradicted_by_the_model).
    ads = _adapters(params, targets=r"l1/w|l2/w|head", layouts={"head": "oi"})
    return fn, params, ads, (_normal(4, 5),)


def case_control_flow():
    def fn(p, x):
        w = p["w"]
        h = jax.lax.cond(x.sum() > 0, lambda h: jnp.tanh(h @ w), lambda h: h @ w * 0.5, x)
        # A loop with a static trip count is a scan closing over the kernel (a scan const).
        return jax.lax.fori_loop(0, 2, lambda i, h: jnp.sin(h @ w), h)

    params = {"w": _normal(4, 4) * 0.5}
    x = _normal(3, 4)
    return fn, params, _adapters(params, targets="w"), (x,)


def case_einsum_heads_first():
    # The gemma package's attention: q_einsum (N, D, H) 'oio'; kv_einsum (2, K, D, H) with
    # k and v unpacked from the einsum's output 'soio'; attn_vec_einsum (N, H, D) 'iio'.
    def fn(p, x):
        q = jnp.einsum("BTD,NDH->BTNH", x, p["q_einsum"])
        k, v = jnp.einsum("BSD,CKDH->CBSKH", x, p["kv_einsum"])
        logits = jnp.einsum("BTNH,BSKH->BTNS", q, k)
        h = jnp.einsum("BTNS,BSKH->BTNH", jax.nn.softmax(logits), v)
        return jnp.einsum("BTNH,NHD->BTD", h, p["attn_vec_einsum"])

    params = {"q_einsum": _normal(2, 6, 3), "kv_einsum": _normal(2, 1, 6, 3),
              "attn_vec_einsum": _normal(2, 3, 6)}
    x = _normal(2, 4, 6)
    layouts = jlora.infer_layouts(fn, params, x)
    assert dict(layouts) == {"q_einsum": "oio", "kv_einsum": "soio", "attn_vec_einsum": "iio"}
    return fn, params, _adapters(params, targets=".*", layouts=layouts), (x,)


def case_scan_axis_1():
    # MaxText with scan_layers: parameters scanned over axis 1, so the query kernel is
    # (embed, layers, heads, head_dim) 'isoo' and the MLP kernels (in, layers, out) 'iso'.
    class Layer(nn.Module):
        @nn.compact
        def __call__(self, x, _):
            q = nn.DenseGeneral((2, 3), name="query")(x)
            x = x + nn.DenseGeneral(6, axis=(-2, -1), name="out")(jnp.tanh(q))
            return x + nn.Dense(6, name="wo")(jax.nn.gelu(nn.Dense(8, name="wi")(x))), None

    class M(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.scan(Layer, variable_axes={"params": 1}, split_rngs={"params": True},
                           length=3)(name="layers")(x, None)[0]

    x = _normal(2, 4, 6)
    # Kernels scaled to their real fan-in (_numpy_params reads it from axis -2, here a
    # layer or head axis), so three residual layers keep activations and gradients O(1).
    params = jax.tree.map(lambda w: w / np.sqrt(6) if w.ndim > 2 else w,
                          _numpy_params(jax.eval_shape(M().init, jax.random.key(1), x)))
    layouts = jlora.infer_layouts(M().apply, params, x)
    assert layouts["params/layers/query/kernel"] == "isoo"
    assert layouts["params/layers/out/kernel"] == "isio"
    assert layouts["params/layers/wi/kernel"] == "iso"
    return M().apply, params, _adapters(params, layouts=layouts), (x,)


def case_conv_torch_order():
    # A conv filter stored as torch stores it, (out, in, kh, kw): 'oiww'.
    def fn(p, x):
        y = jax.lax.conv_general_dilated(x, p["conv"], (1, 1), "SAME",
                                         dimension_numbers=("NCHW", "OIHW", "NCHW"))
        return jnp.tanh(y).mean(axis=(2, 3))

    params, x = {"conv": _normal(4, 3, 3, 2)}, _normal(2, 3, 5, 6)
    return fn, params, _adapters(params, targets="conv", layouts={"conv": "oiww"}), (x,)


CASES = {
    "dense": case_dense,
    "dense_general": case_dense_general,
    "einsum": case_einsum,
    "conv": case_conv,
    "embed": case_embed,
    "scan_transformer": case_scan_transformer,
    "remat_bf16": case_remat_bf16,
    "nnx": case_nnx,
    "mlp": case_mlp,
    "control_flow": case_control_flow,
    "einsum_heads_first": case_einsum_heads_first,
    "scan_axis_1": case_scan_axis_1,
    "conv_torch_order": case_conv_torch_order,
}


@functools.cache
def _case(name):
    _RNG[0] = np.random.default_rng(zlib.crc32(name.encode()))  # same data however tests run
    return CASES[name]()


def _assert_close(got, want, name):
    """Float32 cases: elementwise to float32 rounding. bf16 compute: both paths round to
    bf16 (8 significant bits, eps 2^-8) at different points, so compare the relative
    error in norm against a few bf16 ulps (2^-6)."""
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        g, w = np.asarray(g, np.float32), np.asarray(w, np.float32)
        if "bf16" in name:
            assert np.linalg.norm(g - w) <= 2**-6 * np.linalg.norm(w), (name, g, w)
        else:
            np.testing.assert_allclose(g, w, **F32_TOL)


# The ways jlora.lora can compute a factored dot: a plain einsum with JAX's derivative,
# the hand-written backward pass, and that pass with shared-input fusion.
MODES = {
    "einsum": dict(custom_vjp=False),
    "custom_vjp": dict(custom_vjp=True, fuse_shared_inputs=False),
    "fused": dict(custom_vjp=True, fuse_shared_inputs=True),
}


def _is_float(x) -> bool:
    return jnp.issubdtype(jnp.asarray(x).dtype, jnp.floating)


def _loss_fns(name, mode):
    """(factored, reference): ``(params, adapters, float inputs) -> (weighted sum of
    outputs, outputs)``; integer inputs (token ids) are closed over."""
    fn, params, _, args = _case(name)
    out_shapes = jax.eval_shape(lambda: fn(params, *args))
    _RNG[0] = np.random.default_rng(zlib.crc32(f"{name}/weights".encode()))
    weights = [_normal(*s.shape) for s in jax.tree.leaves(out_shapes)]

    def reduce(out):
        return sum(jnp.sum(o.astype(jnp.float32) * w) for o, w in
                   zip(jax.tree.leaves(out), weights, strict=True)), out

    def with_inputs(floats):
        it = iter(floats)
        return [next(it) if _is_float(a) else a for a in args]

    factored = jlora.lora(fn, **MODES[mode])
    return (
        lambda p, ads, floats: reduce(factored(p, ads, *with_inputs(floats))),
        lambda p, ads, floats: reduce(fn(jlora.merge(p, ads), *with_inputs(floats))),
    )


@functools.cache
def _reference(name):
    """The dense reference for a case: jitted value-and-grad of f(merge(params, adapters))
    w.r.t. the params, the adapters and the floating inputs."""
    _, reference = _loss_fns(name, "einsum")
    return jax.jit(jax.value_and_grad(reference, argnums=(0, 1, 2), has_aux=True))


# Every mode under jit; eager (the same interpretation, run op by op) for the default mode.
@pytest.mark.parametrize("mode, jit", [*((m, True) for m in MODES), ("fused", False)],
                         ids=["einsum-jit", "custom_vjp-jit", "fused-jit", "fused-eager"])
@pytest.mark.parametrize("name", list(CASES))
def test_matches_merge_values_and_grads(name, mode, jit):
    """The core equation, ``lora(f)(params, adapters, x) == f(merge(params, adapters), x)``,
    for values and for gradients w.r.t. params, adapters and inputs."""
    _, params, ads, args = _case(name)
    floats = [a for a in args if _is_float(a)]
    factored, _ = _loss_fns(name, mode)
    vg_f = jax.value_and_grad(factored, argnums=(0, 1, 2), has_aux=True)
    if jit:
        vg_f = jax.jit(vg_f)
    with warnings.catch_warnings():
        warnings.simplefilter("error", jlora.FactoredFallbackWarning)  # all factored
        (_, out_f), grads_f = vg_f(params, ads, floats)
    (_, out_r), grads_r = _reference(name)(params, ads, floats)
    _assert_close(out_f, out_r, name)
    _assert_close(grads_f, grads_r, name)
    # The cases are built so the adapters matter: a wrong branch cannot hide.
    zero_b = {p: a.replace(b=jnp.zeros_like(a.b)) for p, a in ads.items()}
    (_, out_base), _ = _reference(name)(params, zero_b, floats)
    changed = max(float(jnp.abs(jnp.asarray(o, jnp.float32) - jnp.asarray(b, jnp.float32)).max())
                  for o, b in zip(jax.tree.leaves(out_r), jax.tree.leaves(out_base), strict=True))
    assert changed > 1e-2


@pytest.mark.parametrize("name", list(CASES))
def test_every_kernel_is_factored(name):
    fn, params, ads, args = _case(name)
    report = jlora.lora_report(fn, params, ads, *args)
    assert report == dict.fromkeys(ads, "factored")


def _on_merged(fn, params, adapters, *args):
    """The reference ``fn(merge(params, adapters), *args)``, jitted (it is not under test)."""
    return jax.jit(lambda p, a, *args: fn(jlora.merge(p, a), *args))(params, adapters, *args)


def test_remat_policy_is_kept():
    fn, params, ads, args = _case("scan_transformer")
    jaxpr = jax.make_jaxpr(lambda a: jlora.lora(fn)(params, a, *args))(ads).jaxpr
    policies = [e.params["policy"] for e in jc.iter_eqns(jaxpr) if e.primitive is jc.remat_p]
    assert _SCAN_POLICY in policies


# ---------------------------------------------------------------------------------------
# Small hand-written functions for the remaining behaviours
# ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dense():
    _RNG[0] = np.random.default_rng(1)
    params = {"w": _normal(5, 4, scale=0.5), "v": _normal(4, 3, scale=0.5)}
    return params, _adapters(params, targets="w|v"), _normal(6, 5)


def test_compositions_vmap_input_grad_checkpoint_nested_jit(dense):
    params, ads, x = dense

    def fn(p, x):
        return jnp.tanh(jax.jit(lambda h: h @ p["w"])(x)) @ p["v"]

    g = jlora.lora(fn)
    merged = jax.jit(jlora.merge)(params, ads)
    xs = jnp.stack([x, 2 * x])
    np.testing.assert_allclose(jax.vmap(lambda x: g(params, ads, x))(xs),
                               jax.jit(jax.vmap(lambda x: fn(merged, x)))(xs), **F32_TOL)
    np.testing.assert_allclose(jax.grad(lambda x: g(params, ads, x).sum())(x),
                               jax.jit(jax.grad(lambda x: fn(merged, x).sum()))(x), **F32_TOL)
    remat = jax.jit(jax.grad(jax.checkpoint(lambda a: g(params, a, x).sum())))
    expected = jax.jit(jax.grad(lambda a: fn(jlora.merge(params, a), x).sum()))(ads)
    for path in ads:
        np.testing.assert_allclose(remat(ads)[path].a, expected[path].a, **F32_TOL)
        np.testing.assert_allclose(remat(ads)[path].b, expected[path].b, **F32_TOL)
    nested = jax.jit(lambda a, x: jax.jit(g)(params, a, x) * 2)
    np.testing.assert_allclose(nested(ads, x), 2 * jax.jit(fn)(merged, x), **F32_TOL)


def _moves(p, x):
    """Kernel views the transform must carry A and B through (one output per move)."""
    w, s = p["w"], p["s"]  # (5, 4) "io" and (3, 5, 4) "sio"
    return dict(
        broadcast=jnp.einsum("bi,bio->bo", x, jnp.broadcast_to(w, (6, 5, 4))),
        rev=x[:, ::-1] @ w[::-1],
        split_fan_in=jnp.einsum("bj,jo->bo", x[:, :4], w[:4].reshape(2, 2, 4).reshape(4, 4)),
        split_fan_out=jnp.einsum("bi,ijk->bjk", x, w.reshape(5, 2, 2)),
        expand_squeeze=x @ jnp.squeeze(jnp.expand_dims(w, 0), 0),
        slices=x[:, 1:4] @ w[1:4, 1:3],
        gather_rows=jnp.take(w, jnp.array([0, 4, 2]), axis=0) @ w.T,
        static_layer=x @ s[1],
        dynamic_layer=x @ jax.lax.dynamic_index_in_dim(s, jnp.argmax(x[0, :3]), keepdims=False),
        batched_layers=jnp.einsum("bi,sio->sbo", x, s),
        transposed_layers=jnp.einsum("sbi,ois->sbo", jnp.stack([x] * 3), s.transpose(2, 1, 0)),
        vmap_over_layers=jax.vmap(lambda ws: x @ ws)(s),
    )


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_moves_keep_the_kernel_factored(jit):
    _RNG[0] = np.random.default_rng(6)
    params = {"w": _normal(5, 4, scale=0.5), "s": _normal(3, 5, 4, scale=0.5)}
    # w is gathered from and used as w.T below, on purpose: its layout is given, not guessed.
    ads = _adapters(params, targets="w|s", layouts={"s": "sio", "w": "io"})
    x = _normal(6, 5)
    assert jlora.lora_report(_moves, params, ads, x) == {"w": "factored", "s": "factored"}
    weights = jax.tree.map(lambda o: _normal(*o.shape), jax.eval_shape(_moves, params, x))
    loss = lambda out: (sum(jnp.sum(o * weights[k]) for k, o in out.items()), out)
    vg_f = jax.value_and_grad(lambda a: loss(jlora.lora(_moves)(params, a, x)), has_aux=True)
    vg_f = jax.jit(vg_f) if jit else vg_f
    vg_r = jax.jit(jax.value_and_grad(lambda a: loss(_moves(jlora.merge(params, a), x)),
                                      has_aux=True))
    _assert_close(vg_f(ads), vg_r(ads), "moves")


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_while_loop_over_a_kernel_forward(dense, jit):
    params, ads, x = dense

    def fn(p, x):  # a while loop whose body closes over the kernel (forward only: JAX
        def body(c):  # cannot reverse-differentiate while loops)
            return jnp.tanh(c[0] @ p["v"] @ p["v"].T), c[1] + 1

        return jax.lax.while_loop(lambda c: c[1] < 3, body, (x @ p["w"], 0))[0]

    # v is used as v and as v.T on purpose: its layout is given, not guessed.
    ads = {**ads, "v": ads["v"].replace(layout=jlora.Layout("io"))}
    g = jax.jit(jlora.lora(fn)) if jit else jlora.lora(fn)
    np.testing.assert_allclose(g(params, ads, x), _on_merged(fn, params, ads, x), **F32_TOL)
    assert jlora.lora_report(fn, params, ads, x) == {"w": "factored", "v": "factored"}


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_fallback_is_exact_warns_once_and_is_reported(dense, jit):
    params, ads, x = dense
    mask = jnp.asarray(np.arange(20).reshape(5, 4) % 3 > 0, jnp.float32)

    def fn(p, x):  # an elementwise op on the kernel: the rewrite cannot keep it factored
        return jnp.tanh(x @ (p["w"] * mask)) @ p["v"]

    report = jlora.lora_report(fn, params, ads, x)
    assert report["v"] == "factored"
    assert report["w"].startswith("materialised: the kernel reaches `mul`")
    assert "test_transform.py" in report["w"]  # it names the user's source line
    g = jlora.lora(fn)
    loss = lambda a: g(params, a, x).sum()
    if jit:
        loss = jax.jit(loss)
    with pytest.warns(jlora.FactoredFallbackWarning, match=r"path 'w' is materialised"):
        grads = jax.grad(loss)(ads)
    with warnings.catch_warnings():
        warnings.simplefilter("error", jlora.FactoredFallbackWarning)  # once per path only
        g(params, ads, x + 1.0)
        g(params, ads, jnp.ones((2, 5)))  # a new shape is traced again, still no warning
    expected = jax.grad(lambda a: fn(jlora.merge(params, a), x).sum())(ads)
    for path in ads:
        np.testing.assert_allclose(grads[path].b, expected[path].b, **F32_TOL)
    np.testing.assert_allclose(g(params, ads, x), _on_merged(fn, params, ads, x), **F32_TOL)


def test_custom_vjp_consumer_falls_back_with_its_reason(dense):
    params, ads, x = dense

    @jax.custom_vjp
    def matmul(x, w):
        return x @ w

    matmul.defvjp(lambda x, w: (x @ w, (x, w)), lambda r, g: (g @ r[1].T, r[0].T @ g))
    report = jlora.lora_report(lambda p, x: matmul(x, p["w"]) @ p["v"], params, ads, x)
    assert report["w"].startswith("materialised: the kernel reaches `custom_vjp_call`")
    assert "takes the kernel as an array" in report["w"]
    assert report["v"] == "factored"


def test_report_unused_kernel(dense):
    params, ads, x = dense
    assert jlora.lora_report(lambda p, x: x @ p["w"], params, ads, x) == {
        "w": "factored", "v": "unused"}


def test_traced_once_per_input_signature(dense):
    params, ads, x = dense
    traces = []

    def fn(p, x):
        traces.append(x.shape)  # a Python side effect: runs only when fn is traced
        return jnp.tanh(x @ p["w"]) @ p["v"]

    g = jlora.lora(fn)
    step = jax.jit(jax.value_and_grad(lambda a, x: g(params, a, x).sum()))
    for i in range(3):
        step(ads, x + i)
    assert traces == [(6, 5)]
    for i in range(3):  # outside jit too: the cache is keyed on shapes and dtypes
        g(params, ads, x + i)
    assert traces == [(6, 5)]
    g(params, ads, jnp.ones((2, 5)))
    assert traces == [(6, 5), (2, 5)]


def _shapes_produced(jaxpr):
    return {tuple(v.aval.shape) for e in jc.iter_eqns(jaxpr) for v in e.outvars}


def test_no_kernel_sized_temporaries_in_the_train_step():
    class M(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(40)(jnp.tanh(nn.Dense(24)(x)))

    x = _normal(8, 24)
    fn, params, ads, _ = _linen(M(), x)
    loss_f = lambda a: jnp.sum(jlora.lora(fn)(params, a, x) ** 2)
    loss_m = lambda a: jnp.sum(fn(jlora.merge(params, a), x) ** 2)
    factored = _shapes_produced(jax.make_jaxpr(jax.jit(jax.grad(loss_f)))(ads).jaxpr)
    merged = _shapes_produced(jax.make_jaxpr(jax.jit(jax.grad(loss_m)))(ads).jaxpr)
    kernel_shapes = {(24, 24), (24, 40), (40, 24)}
    assert kernel_shapes <= merged  # the check can see them when they are there
    assert not kernel_shapes & factored


# ---------------------------------------------------------------------------------------
# Dropout
# ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def with_dropout():
    _RNG[0] = np.random.default_rng(2)
    params = {"w": _normal(5, 4, scale=0.5)}
    return params, _adapters(params, targets="w", dropout=0.25), _normal(6, 5)


def _dense_fn(p, x):
    return x @ p["w"]


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_dropout_is_identity_without_rng(with_dropout, jit):
    params, ads, x = with_dropout
    g = jlora.lora(_dense_fn)
    g = jax.jit(g, static_argnames="lora_deterministic") if jit else g
    want = _on_merged(_dense_fn, params, ads, x)
    np.testing.assert_allclose(g(params, ads, x), want, **F32_TOL)
    np.testing.assert_allclose(
        g(params, ads, x, lora_rng=jax.random.key(3), lora_deterministic=True), want, **F32_TOL)


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_dropout_with_rng_drops_the_adapter_input_only(with_dropout, jit):
    params, ads, x = with_dropout
    ad, rate, rng = ads["w"], 0.25, jax.random.key(7)
    # The documented mask: key fold_in(rng, crc32(path)), then fold_in(use number = 0).
    @jax.jit
    def mask(rng):
        path_key = jax.random.fold_in(rng, zlib.crc32(b"w") & 0x7FFFFFFF)
        return jax.random.bernoulli(jax.random.fold_in(path_key, 0), 1 - rate, x.shape)

    keep = mask(rng)

    @jax.jit
    def direct(a):
        x_drop = jnp.where(keep, x / (1 - rate), 0.0)
        return x @ params["w"] + a.scale * ((x_drop @ a.a) @ a.b)

    g = jlora.lora(_dense_fn)
    vg = jax.value_and_grad(lambda a: g(params, a, x, lora_rng=rng).sum())
    vg = jax.jit(vg) if jit else vg
    value, grads = vg(ads)
    want_value, want_grad = jax.jit(jax.value_and_grad(lambda a: direct(a).sum()))(ad)
    np.testing.assert_allclose(value, want_value, **F32_TOL)
    np.testing.assert_allclose(grads["w"].a, want_grad.a, **F32_TOL)
    np.testing.assert_allclose(grads["w"].b, want_grad.b, **F32_TOL)
    assert 0 < int(keep.sum()) < keep.size  # the mask does drop something here
    other = g(params, ads, x, lora_rng=jax.random.key(8))
    assert not np.allclose(other, direct(ad))  # a new key, a new mask


def test_dropout_masks_differ_per_stacked_layer():
    _RNG[0] = np.random.default_rng(5)
    params = {"layers": _normal(2, 4, 4, scale=0.5)}
    ads = _adapters(params, targets="layers", layouts={"layers": "sio"}, dropout=0.5)
    x, rng, ad = _normal(3, 4), jax.random.key(11), ads["layers"]

    def fn(p, x):
        return jax.lax.scan(lambda c, w: (c @ w, None), x, p["layers"])[0]

    got = jax.jit(jlora.lora(fn))(params, ads, x, lora_rng=rng)
    # Documented: a stacked kernel's key is split over its stacked axes; scan slices it.
    layer_keys = jax.random.split(
        jax.random.fold_in(rng, zlib.crc32(b"layers") & 0x7FFFFFFF), (2,))
    h = x
    for i in range(2):
        keep = jax.random.bernoulli(jax.random.fold_in(layer_keys[i], 0), 0.5, h.shape)
        h_drop = jnp.where(keep, h / 0.5, 0.0)
        h = h @ params["layers"][i] + ad.scale * ((h_drop @ ad.a[i]) @ ad.b[i])
    np.testing.assert_allclose(got, h, **F32_TOL)


def test_dora_with_dropout_drops_the_whole_adapter_delta_input_like_peft():
    _RNG[0] = np.random.default_rng(7)
    params = {"w": _normal(5, 4, scale=0.5)}
    ad = _adapters(params, targets="w", dropout=0.25, variant="dora")["w"]
    w, a, b = (np.asarray(v, np.float64) for v in (params["w"], ad.a, ad.b))
    norm = np.linalg.norm(w + ad.scale * a @ b, axis=0)
    magnitude = norm * (1 + np.asarray(_normal(4, scale=0.2)))
    ads = {"w": ad.replace(magnitude=jnp.asarray(magnitude, jnp.float32))}
    x, rng = _normal(6, 5), jax.random.key(9)
    got = jax.jit(jlora.lora(_dense_fn))(params, ads, x, lora_rng=rng)
    path_key = jax.random.fold_in(rng, zlib.crc32(b"w") & 0x7FFFFFFF)
    keep = np.asarray(jax.random.bernoulli(jax.random.fold_in(path_key, 0), 0.75, x.shape))
    xd, f = np.where(keep, np.asarray(x) / 0.75, 0.0), magnitude / norm
    # PEFT: base(x) + (m/‖V‖ - 1)·(x_d·W) + m/‖V‖·s·(x_d·A·B)
    want = np.asarray(x) @ w + (f - 1) * (xd @ w) + f * ad.scale * (xd @ a @ b)
    np.testing.assert_allclose(got, want, **F32_TOL)


def test_training_mode_without_rng_is_an_error(with_dropout):
    params, ads, x = with_dropout
    with pytest.raises(ValueError, match=r"lora_deterministic=False.*lora_rng=jax.random.key"):
        jlora.lora(_dense_fn)(params, ads, x, lora_deterministic=False)
    with pytest.raises(ValueError, match=r"no `lora_rng` was given.*'w'"):
        jlora.lora(_dense_fn, deterministic=False)(params, ads, x)
    # The training default still evaluates when asked to.
    out = jlora.lora(_dense_fn, deterministic=False)(params, ads, x, lora_deterministic=True)
    np.testing.assert_allclose(out, _on_merged(_dense_fn, params, ads, x), **F32_TOL)


def test_bad_rng_and_fn_are_type_errors(with_dropout):
    params, ads, x = with_dropout
    with pytest.raises(TypeError, match=r"under jax.jit pass it as a static argument"):
        jax.jit(jlora.lora(_dense_fn))(params, ads, x, lora_deterministic=True)
    with pytest.raises(TypeError, match=r"`lora_rng` must be a JAX random key.*shape \(3,\)"):
        jlora.lora(_dense_fn)(params, ads, x, lora_rng=jnp.ones(3))
    with pytest.raises(TypeError, match=r"`fn` must be a callable"):
        jlora.lora("apply")


# ---------------------------------------------------------------------------------------
# DoRA
# ---------------------------------------------------------------------------------------


def _dora_fn(p, ids, x):
    h = jnp.take(p["embed"], ids, axis=0) + x                       # gather, layout vf
    h = jnp.tanh(h @ p["dense"])                                      # dot, io
    h, _ = jax.lax.scan(lambda c, w: (jnp.tanh(c @ w), None), h, p["layers"])  # sio
    return jax.lax.conv_general_dilated(h, p["conv"], (1,), "SAME",   # conv, wio
                                        dimension_numbers=("NWC", "WIO", "NWC"))


def _dora_reference_merge(params, ads):
    """W' = m · V / stop_gradient(‖V‖), V = W + s·A·B, the norm over the fan-in axes."""
    out = dict(params)
    for path, ad in ads.items():
        v = params[path] + ad.delta()
        norm = jnp.sqrt(jnp.sum(v * v, axis=ad.layout.fan_in_axes, keepdims=True))
        out[path] = jnp.expand_dims(ad.magnitude, ad.layout.fan_in_axes) * v / (
            jax.lax.stop_gradient(norm))
    return out


@pytest.fixture(scope="module")
def dora():
    """DoRA adapters on an embedding, a dense, a stacked (scanned) and a conv kernel, with
    the merged reference (values) and the stop-gradient reference (gradients), jitted."""
    _RNG[0] = np.random.default_rng(3)
    params = {"embed": _normal(7, 6), "dense": _normal(6, 5, scale=0.4),
              "layers": _normal(2, 5, 5, scale=0.4), "conv": _normal(3, 5, 4, scale=0.3)}
    layouts = {"embed": "vf", "dense": "io", "layers": "sio", "conv": "wio"}
    ads = _adapters(params, targets=".*", layouts=layouts, variant="dora")
    for path, ad in ads.items():  # a magnitude that is not just the initial norm
        ns, r = ad.layout.num_stacked, ad.rank
        a = np.asarray(ad.a).reshape(*ad.a.shape[:ns], -1, r)
        b = np.asarray(ad.b).reshape(*ad.b.shape[:ns], r, -1)
        v = np.asarray(params[path]) + ad.scale * (a @ b).reshape(params[path].shape)
        norm = np.sqrt(np.sum(v * v, axis=ad.layout.fan_in_axes))
        ads[path] = ad.replace(magnitude=jnp.asarray(norm) * (1 + _normal(*norm.shape, scale=0.2)))
    ids, x = jnp.array([[1, 6, 0], [2, 2, 5]]), _normal(2, 3, 6)
    value = jax.jit(lambda a: _dora_fn(jlora.merge(params, a), ids, x))(ads)
    grads = jax.jit(jax.grad(lambda a: jnp.sum(jnp.sin(
        _dora_fn(_dora_reference_merge(params, a), ids, x)))))(ads)
    return params, ads, ids, x, value, grads


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_dora_matches_merge(dora, jit):
    params, ads, ids, x, want_value, want_grads = dora
    g = jlora.lora(_dora_fn)
    vg = jax.value_and_grad(lambda a: jnp.sum(jnp.sin(g(params, a, ids, x))))
    vg = jax.jit(vg) if jit else vg
    np.testing.assert_allclose(g(params, ads, ids, x), want_value, **F32_TOL)
    _, grads = vg(ads)
    for path in ads:
        for field in ("a", "b", "magnitude"):
            np.testing.assert_allclose(getattr(grads[path], field),
                                       getattr(want_grads[path], field),
                                       **F32_TOL, err_msg=f"{path}.{field}")
    assert jlora.lora_report(_dora_fn, params, ads, ids, x) == dict.fromkeys(ads, "factored")


def test_dora_without_magnitude_is_an_error(dense):
    params, ads, x = dense
    bad = {"w": ads["w"].replace(variant="dora")}
    with pytest.raises(ValueError, match=r"DoRA adapter at path 'w' has no magnitude"):
        jlora.lora(lambda p, x: x @ p["w"])(params, bad, x)


# ---------------------------------------------------------------------------------------
# collect_inputs
# ---------------------------------------------------------------------------------------


def test_collect_inputs_dense_general_and_stacked():
    _RNG[0] = np.random.default_rng(4)
    params = {"first": _normal(3, 2, 4), "layers": _normal(2, 4, 4), "unused": _normal(4, 4)}
    x = _normal(5, 2, 3)  # (batch, j, i): the kernel's fan-in order is (i, j)

    def fn(p, x):
        h = jnp.einsum("bji,ijo->bo", x, p["first"])
        h2, _ = jax.lax.scan(lambda c, w: (jnp.tanh(c @ w), c), h, p["layers"])
        return h2

    got = jlora.collect_inputs(fn, params, {"first": "iio", "layers": "sio"}, x)
    np.testing.assert_allclose(got["first"], np.transpose(x, (0, 2, 1)).reshape(5, 6))
    h = np.asarray(jnp.einsum("bji,ijo->bo", x, params["first"]))
    h1 = np.tanh(h @ np.asarray(params["layers"][0]))
    assert got["layers"].shape == (2, 5, 4)  # (*stacked, N, fan_in): one set per layer
    np.testing.assert_allclose(got["layers"][0], h, **F32_TOL)
    np.testing.assert_allclose(got["layers"][1], h1, **F32_TOL)
    # The collected rows reproduce what the model computed with the kernel.
    np.testing.assert_allclose(got["first"] @ np.asarray(params["first"]).reshape(6, 4), h,
                               **F32_TOL)
    # A conv filter's inputs are its patches, in the filter's (window, in) fan-in order.
    params["conv"], x2 = _normal(3, 2, 4), _normal(2, 9, 2)
    conv = lambda p, x: jax.lax.conv_general_dilated(
        x, p["conv"], (2,), ((2, 1),), rhs_dilation=(2,), dimension_numbers=("NWC", "WIO", "NWC"))
    rows = jlora.collect_inputs(conv, params, {"conv": "wio"}, x2)["conv"]
    np.testing.assert_allclose(rows @ np.asarray(params["conv"]).reshape(6, 4),
                               np.asarray(conv(params, x2)).reshape(-1, 4), **F32_TOL)
    with pytest.raises(ValueError, match=r"no input reached the kernel\(s\) at \['unused'\]"):
        jlora.collect_inputs(fn, params, {"first": "iio", "unused": "io"}, x)
    with pytest.raises(jlora.LayoutError, match=r"pass `paths` as a mapping.*'first': 'iio'"):
        jlora.collect_inputs(fn, params, ["first"], x)
    with pytest.raises(ValueError, match=r"path 'firts' is not a leaf of `params`.*'first'"):
        jlora.collect_inputs(fn, params, ["firts"], x)


def test_guessed_layout_contradicted_by_the_model_is_an_error_everywhere():
    # A square kernel stored (out, in) and used as x @ W.T: the guess 'io' would apply the
    # adapter transposed relative to PEFT's meaning. lora, lora_report and collect_inputs
    # refuse it, naming the path, the guess, the use and the fix; the given layout works.
    def fn(p, x):
        return jnp.tanh(x @ p["proj"].T)

    params, x = {"proj": _normal(4, 4)}, _normal(3, 4)
    guessed = _adapters(params, targets="proj")
    assert guessed["proj"].layout.guessed
    match = (r"path 'proj'.*layout 'io' \(guessed.*dot_general at .*test_transform.py.*"
             r"uses it as 'oi'.*infer_layouts")
    with pytest.raises(jlora.LayoutError, match=match):
        jlora.lora(fn)(params, guessed, x)
    with pytest.raises(jlora.LayoutError, match=match):
        jlora.lora_report(fn, params, guessed, x)
    with pytest.raises(jlora.LayoutError, match=match):
        jlora.collect_inputs(fn, params, ["proj"], x)
    given = _adapters(params, targets="proj", layouts=jlora.infer_layouts(fn, params, x))
    assert given["proj"].layout.axes == "oi" and not given["proj"].layout.guessed
    np.testing.assert_allclose(jlora.lora(fn)(params, given, x),
                               fn(jlora.merge(params, given), x), **F32_TOL)
    assert jlora.collect_inputs(fn, params, {"proj": "oi"}, x)["proj"].shape == (3, 4)


def test_guesses_the_model_confirms_are_checked_once_per_signature(dense, monkeypatch):
    from jlora import _layout_inference

    params, ads, x = dense
    assert all(a.layout.guessed for a in ads.values())
    calls = []
    check = _layout_inference.check_guessed_layouts
    monkeypatch.setattr(_layout_inference, "check_guessed_layouts",
                        lambda *a: calls.append(a) or check(*a))
    g = jlora.lora(lambda p, x: jnp.tanh(x @ p["w"]) @ p["v"])
    g(params, ads, x)
    g(params, ads, x)  # same signature and guesses: not read again
    assert len(calls) == 1 and set(calls[0][2]) == {"w", "v"}
