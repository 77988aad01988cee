"""The hand-written backward pass of the factored dot (``jlora/_factored_ops.py``) and the
shared-input fusion, as ``jlora.lora``'s options switch them: values and gradients equal
``f(merge(params, adapters))`` (numpy float32 reference for the values), with and without
``jit``, for every combination of ``custom_vjp`` and ``fuse_shared_inputs``."""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jlora
from jlora import _jax_compat as jc

TOL = dict(rtol=2e-5, atol=2e-5)
OPTIONS = [dict(custom_vjp=c, fuse_shared_inputs=f)
           for c, f in itertools.product([True, False], [True, False])]


def _normal(rng, *shape, scale=1.0):
    return jnp.asarray(scale * rng.standard_normal(shape), jnp.float32)


def _adapters(params, targets, dropout=0.0, rank=2):
    rng = np.random.default_rng(1)
    # 'head' is used as W.T: its layout is given, so the dot contracting its fan-out (the
    # rule under test) is what the user asked for, not a guess the model contradicts.
    layouts = {"head": "io"} if "head" in params else {}
    config = jlora.LoraConfig(rank=rank, alpha=3.0, targets=targets, dropout=dropout,
                              layouts=layouts)
    ads = jlora.init(jax.random.key(0), params, config)
    return {p: a.replace(a=_normal(rng, *a.a.shape, scale=0.5),
                         b=_normal(rng, *a.b.shape, scale=0.5)) for p, a in ads.items()}


def attention_like(p, x):
    """q, k, v read the same input (fused); the rest do not; one kernel used as ``W.T``."""
    q, k, v = x @ p["q"], x @ p["k"], x @ p["v"]
    h = jnp.tanh(q * k + v) @ p["o"]
    up = jax.nn.gelu(h @ p["up"])
    return up @ p["down"] + (x @ p["head"].T)  # head: (out, in), contracted over fan-out


@pytest.fixture(scope="module")
def case():
    rng = np.random.default_rng(0)
    d, f = 5, 7  # rank 2: the fused q|k|v rank is 6, a shape no other array has
    params = {"q": _normal(rng, d, d, scale=0.4), "k": _normal(rng, d, d, scale=0.4),
              "v": _normal(rng, d, d, scale=0.4), "o": _normal(rng, d, d, scale=0.4),
              "up": _normal(rng, d, f, scale=0.4), "down": _normal(rng, f, d, scale=0.3),
              "head": _normal(rng, d, d, scale=0.4)}
    ads = _adapters(params, "q|k|v|o|up|down|head")
    x = _normal(rng, 3, 4, d)
    return params, ads, x


def _numpy_reference(params, ads, x):
    """``attention_like`` on the merged kernels, in numpy float64."""
    m = {k: np.asarray(v, np.float64) for k, v in params.items()}
    for path, a in ads.items():
        m[path] = m[path] + a.scale * np.asarray(a.a, np.float64) @ np.asarray(a.b, np.float64)
    x = np.asarray(x, np.float64)
    h = np.tanh((x @ m["q"]) * (x @ m["k"]) + x @ m["v"]) @ m["o"]
    up = np.asarray(jax.nn.gelu(jnp.asarray(h @ m["up"], jnp.float32)), np.float64)
    return up @ m["down"] + x @ m["head"].T


@pytest.mark.parametrize("jit", [True, False])
@pytest.mark.parametrize("options", OPTIONS, ids=str)
def test_values_and_grads_equal_merge(case, options, jit):
    params, ads, x = case
    g = jlora.lora(attention_like, **options)
    wrap = jax.jit if jit else (lambda f: f)
    y = wrap(g)(params, ads, x)
    np.testing.assert_allclose(y, _numpy_reference(params, ads, x), **TOL)

    def loss(f):
        return lambda p, a, x: jnp.sum(jnp.sin(f(p, a, x)))

    merged = loss(lambda p, a, x: attention_like(jlora.merge(p, a), x))
    want = jax.grad(merged, argnums=(0, 1, 2))(params, ads, x)
    got = wrap(jax.grad(loss(g), argnums=(0, 1, 2)))(params, ads, x)
    # Gradients w.r.t. the adapters, the frozen kernels and the input all match.
    for w_leaf, g_leaf in zip(jax.tree.leaves(want), jax.tree.leaves(got), strict=True):
        np.testing.assert_allclose(g_leaf, w_leaf, **TOL)


@pytest.mark.parametrize("fuse", [True, False])
def test_shared_input_kernels_share_one_thin_matmul(case, fuse):
    params, ads, x = case
    g = jlora.lora(attention_like, fuse_shared_inputs=fuse)
    step = jax.jit(jax.grad(lambda a: jnp.sum(g(params, a, x) ** 2)))
    eqns = list(jc.iter_eqns(jax.make_jaxpr(step)(ads).jaxpr))
    dots = [tuple(e.outvars[0].aval.shape) for e in eqns if e.primitive is jc.dot_general_p]
    # x·[A_q|A_k|A_v] (rank 3·2 = 6 wide) once forward, [u_q|u_k|u_v]ᵀ·x once backward.
    fused = [s for s in dots if s in {(3, 4, 6), (6, 5)}]
    assert len(fused) == (2 if fuse else 0), dots
    # No kernel-sized product: the frozen kernels get no weight gradient. (`head.T`
    # transposes W itself, as the frozen model does, so only dots are checked.)
    assert not {(5, 5), (5, 7), (7, 5)} & set(dots)


def test_dropout_matches_jax_own_backward(case):
    params, ads, x = case
    ads = {p: a.replace(dropout=0.3) for p, a in ads.items()}
    key = jax.random.key(3)

    def run(**options):
        g = jlora.lora(attention_like, **options)
        f = jax.jit(jax.value_and_grad(
            lambda a, x: jnp.sum(jnp.sin(g(params, a, x, lora_rng=key))), argnums=(0, 1)))
        return f(ads, x)

    want, got = run(custom_vjp=False), run()
    for w_leaf, g_leaf in zip(jax.tree.leaves(want), jax.tree.leaves(got), strict=True):
        np.testing.assert_allclose(g_leaf, w_leaf, **TOL)


def test_forward_mode_needs_custom_vjp_off(case):
    params, ads, x = case
    g = jlora.lora(attention_like, custom_vjp=False)
    merged = lambda x: attention_like(jlora.merge(params, ads), x)  # noqa: E731
    t = jnp.ones_like(x)
    _, want = jax.jvp(merged, (x,), (t,))
    _, got = jax.jvp(lambda x: g(params, ads, x), (x,), (t,))
    np.testing.assert_allclose(got, want, **TOL)
