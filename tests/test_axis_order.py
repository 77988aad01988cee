"""Kernels that store their axes in any order.

Every init, variant and merge of a kernel stored in some axis order must give exactly
the result of the same kernel stored in (stacked, fan-in, fan-out) order, transposed
back: the test transposes the kernel itself (with numpy, not the library's helpers),
runs both, and compares in float32 with tight tolerances.
"""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jlora
from jlora import variants

# (layout, kernel shape): transformers' Conv1D (out, in); the gemma package's q_einsum
# (heads, embed, head_dim); an output projection; stacked layers with the stack first and
# with MaxText's scan axis second; a conv in torch's (out, in, kh, kw) order; an
# embedding table stored (features, vocab).
CASES = [("oi", (6, 8)), ("oio", (2, 8, 3)), ("iio", (2, 3, 8)), ("soio", (3, 4, 8, 2)),
         ("isoo", (8, 3, 2, 4)), ("oiww", (6, 4, 3, 3)), ("fv", (5, 12))]
IDS = [axes for axes, _ in CASES]
# EVA and CorDA need each layer's own inputs: neither stacked kernels nor embeddings.
DATA_CASES = [case for case in CASES if "s" not in case[0] and "v" not in case[0]]
DATA_IDS = [axes for axes, _ in DATA_CASES]
PATH = "m/k"


def canonical_order(axes):
    """Kernel axes reordered stacked, fan-in, fan-out, each group in the kernel's order."""
    group = {"s": 0, "i": 1, "w": 1, "v": 1, "o": 2, "f": 2}
    return sorted(range(len(axes)), key=lambda k: group[axes[k]])


class Pair:
    """One kernel in the order ``axes`` and the same kernel transposed to canonical order."""

    def __init__(self, axes, shape, seed=0):
        self.axes, self.order = axes, canonical_order(axes)
        self.canon = "".join(axes[k] for k in self.order)
        w = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
        self.w, self.wc = jnp.asarray(w), jnp.asarray(np.transpose(w, self.order))

    def params(self, canonical=False):
        return {"m": {"k": self.wc if canonical else self.w}}

    def config(self, canonical=False, **kwargs):
        kwargs = {"rank": 2, "alpha": 3.0, "scaling": "rslora", **kwargs}
        return jlora.LoraConfig(targets=PATH, layouts={PATH: self.canon if canonical else
                                                       self.axes}, **kwargs)

    def transposed(self, x):
        """A kernel-shaped result in kernel order, transposed to canonical order."""
        return np.transpose(np.asarray(x), self.order)

    def assert_kernel(self, got, want_canonical, **tol):
        np.testing.assert_allclose(self.transposed(got), want_canonical,
                                   **{"rtol": 1e-6, "atol": 1e-6, **tol})


def assert_same_adapter(got, want, exact=True):
    assert got.a.shape == want.a.shape and got.b.shape == want.b.shape
    assert (got.rank, got.scale, got.variant) == (want.rank, want.scale, want.variant)
    fields = ("a", "b", "magnitude") if want.magnitude is not None else ("a", "b")
    for field in fields:
        if exact:
            np.testing.assert_array_equal(getattr(got, field), getattr(want, field),
                                          err_msg=field)
        else:
            np.testing.assert_allclose(getattr(got, field), getattr(want, field),
                                       rtol=1e-6, atol=1e-6, err_msg=field)


def randomized(adapter, seed=1):
    """The adapter moved off its init, as in training (magnitude too, for DoRA)."""
    rng = np.random.default_rng(seed)
    changes = {name: jnp.asarray(0.3 * rng.standard_normal(x.shape), jnp.float32)
               for name, x in (("a", adapter.a), ("b", adapter.b))}
    if adapter.magnitude is not None:
        changes["magnitude"] = adapter.magnitude * jnp.asarray(
            1.0 + 0.3 * np.abs(rng.standard_normal(adapter.magnitude.shape)), jnp.float32)
    return adapter.replace(**changes)


# ------------------------------------------------------------------------ init


@pytest.mark.parametrize("init, variant", [("default", "lora"), ("gaussian", "dora"),
                                           ("orthogonal", "dora")])
@pytest.mark.parametrize("axes, shape", CASES, ids=IDS)
def test_init_equals_canonical(axes, shape, init, variant):
    pair = Pair(axes, shape)
    got = jlora.init(jax.random.key(0), pair.params(), pair.config(init=init, variant=variant))
    want = jlora.init(jax.random.key(0), pair.params(True),
                      pair.config(True, init=init, variant=variant))
    assert got[PATH].layout.axes == axes and got[PATH].kernel_shape == shape
    assert_same_adapter(got[PATH], want[PATH], exact=variant == "lora")
    if variant == "dora":  # the model starts unchanged
        pair.assert_kernel(jlora.merge(pair.params(), got)["m"]["k"], pair.wc, atol=1e-5)


# ------------------------------------------------------------------------ merge


@pytest.mark.parametrize("variant", ["lora", "dora"])
@pytest.mark.parametrize("axes, shape", CASES, ids=IDS)
def test_merge_unmerge_delta_equal_canonical(axes, shape, variant):
    pair = Pair(axes, shape)
    ad = randomized(jlora.init(jax.random.key(0), pair.params(),
                               pair.config(variant=variant))[PATH])
    ad_c = ad.replace(layout=jlora.Layout(pair.canon))
    for merge in (jlora.merge, jax.jit(jlora.merge)):
        got = merge(pair.params(), {PATH: ad})["m"]["k"]
        want = merge(pair.params(True), {PATH: ad_c})["m"]["k"]
        pair.assert_kernel(got, want)
        assert not np.allclose(got, pair.w)  # the adapter did change the kernel
    pair.assert_kernel(jlora.delta({PATH: ad})[PATH], jlora.delta({PATH: ad_c})[PATH])
    if variant == "lora":
        back = jlora.unmerge(jlora.merge(pair.params(), {PATH: ad}), {PATH: ad})["m"]["k"]
        np.testing.assert_allclose(back, pair.w, rtol=1e-5, atol=1e-5)
    else:
        norm = variants.dora_norm(pair.w, ad)
        np.testing.assert_allclose(norm, variants.dora_norm(pair.wc, ad_c), rtol=1e-6)
        np.testing.assert_allclose(variants.DoRA().output_factor(pair.w, ad),
                                   ad.magnitude / norm, rtol=1e-6)
        with pytest.raises(ValueError, match=f"Cannot unmerge the 'dora' adapter at path "
                                             f"'{PATH}'.*no longer holds"):
            jlora.unmerge(pair.params(), {PATH: ad})


@pytest.mark.parametrize("axes, shape", [CASES[i] for i in (0, 3, 4, 5)],
                         ids=[IDS[i] for i in (0, 3, 4, 5)])
def test_dora_merge_gradients_equal_canonical(axes, shape):
    pair = Pair(axes, shape)
    ad = randomized(jlora.init(jax.random.key(0), pair.params(),
                               pair.config(variant="dora"))[PATH])
    ad_c = ad.replace(layout=jlora.Layout(pair.canon))
    upstream = np.random.default_rng(5).standard_normal(shape).astype(np.float32)
    upstream_c = np.transpose(upstream, pair.order)

    def loss(adapter, params, up):
        return jnp.sum(up * jlora.merge(params, {PATH: adapter})["m"]["k"])

    grad = jax.jit(jax.value_and_grad(loss))
    value, got = grad(ad, pair.params(), upstream)
    value_c, want = grad(ad_c, pair.params(True), upstream_c)
    np.testing.assert_allclose(value, value_c, rtol=1e-6)
    for field in ("a", "b", "magnitude"):
        np.testing.assert_allclose(getattr(got, field), getattr(want, field), rtol=1e-5,
                                   atol=1e-6, err_msg=field)


@pytest.fixture
def tiny_slices(monkeypatch):
    """A slice budget of 12 float32 values, so every merge goes slice by slice."""
    monkeypatch.setattr(jlora._merging, "MAX_UPDATE_BYTES", 48)
    jax.clear_caches()  # traces of merge made under the default budget must not be reused
    yield
    monkeypatch.undo()
    jax.clear_caches()


@pytest.mark.parametrize("variant", ["lora", "dora"])
@pytest.mark.parametrize("axes, shape", CASES, ids=IDS)
def test_sliced_in_place_merge_equals_whole_merge(axes, shape, variant, tiny_slices):
    pair = Pair(axes, shape)
    ad = randomized(jlora.init(jax.random.key(0), pair.params(),
                               pair.config(variant=variant))[PATH])
    ad_c = ad.replace(layout=jlora.Layout(pair.canon))
    whole = variants.get_variant(variant).merge(pair.w, ad)  # the whole kernel at once
    want = variants.get_variant(variant).merge(pair.wc, ad_c)
    jaxpr = jax.make_jaxpr(jlora.merge)(pair.params(), {PATH: ad})
    assert "dynamic_update_slice" in str(jaxpr)  # sliced: a loop updating the kernel
    donated = {"m": {"k": jnp.array(pair.w, copy=True)}}
    got = jax.jit(jlora.merge, donate_argnums=0)(donated, {PATH: ad})["m"]["k"]
    np.testing.assert_allclose(got, whole, rtol=1e-6, atol=1e-6)
    pair.assert_kernel(got, want)
    if variant == "lora":
        back = jax.jit(jlora.unmerge)({"m": {"k": got}}, {PATH: ad})["m"]["k"]
        np.testing.assert_allclose(back, pair.w, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------ inits that
# rewrite the base, and inits from input statistics


@pytest.mark.parametrize("name, variant", [("pissa", "lora"), ("pissa", "dora"),
                                           ("olora", "lora")])
@pytest.mark.parametrize("axes, shape", CASES, ids=IDS)
def test_pissa_olora_equal_canonical(axes, shape, name, variant):
    pair = Pair(axes, shape)
    init = getattr(variants, f"{name}_init")
    base, got = init(None, pair.params(), pair.config(init=name, variant=variant))
    base_c, want = init(None, pair.params(True), pair.config(True, init=name, variant=variant))
    assert_same_adapter(got[PATH], want[PATH], exact=variant == "lora")
    pair.assert_kernel(base["m"]["k"], base_c["m"]["k"])
    # merge(new base, adapters) is the original kernel.
    np.testing.assert_allclose(jlora.merge(base, got)["m"]["k"], pair.w, rtol=1e-5, atol=1e-5)


def row_inputs(pair, seed=3, n=64):
    """Layer inputs ``(N, fan_in)``: the fan-in axes in the kernel's own order, which the
    canonical order keeps, so both kernels see the same rows."""
    fan_in = int(np.prod([n for n, c in zip(pair.w.shape, pair.axes, strict=True)
                          if c in "iwv"]))
    x = np.random.default_rng(seed).standard_normal((n, fan_in)).astype(np.float32)
    return {PATH: jnp.asarray(x * np.linspace(0.5, 3.0, fan_in, dtype=np.float32))}


@pytest.mark.parametrize("axes, shape", DATA_CASES, ids=DATA_IDS)
def test_eva_equals_canonical(axes, shape):
    pair = Pair(axes, shape)
    inputs = row_inputs(pair)
    config = dict(init="eva", variant="dora")
    got = variants.eva_init(None, pair.params(), pair.config(**config), inputs, rho=1.0)
    want = variants.eva_init(None, pair.params(True), pair.config(True, **config), inputs,
                             rho=1.0)
    assert_same_adapter(got[PATH], want[PATH], exact=False)


@pytest.mark.parametrize("axes, shape", DATA_CASES, ids=DATA_IDS)
def test_corda_equals_canonical(axes, shape):
    pair = Pair(axes, shape)
    inputs = row_inputs(pair)
    got_base, got = variants.corda_init(None, pair.params(), pair.config(init="corda"), inputs)
    want_base, want = variants.corda_init(None, pair.params(True),
                                          pair.config(True, init="corda"), inputs)
    assert_same_adapter(got[PATH], want[PATH], exact=False)
    pair.assert_kernel(got_base["m"]["k"], want_base["m"]["k"])
    np.testing.assert_allclose(jlora.merge(got_base, got)["m"]["k"], pair.w, rtol=1e-5,
                               atol=1e-5)


def test_eva_reads_a_torch_order_conv_from_fn():
    """``collect_inputs`` rows follow the kernel's own fan-in order, so EVA on a conv
    stored ``(out, in, kh, kw)`` equals EVA on it stored ``(in, kh, kw, out)``."""
    pair = Pair("oiww", (6, 4, 3, 3))

    def conv(spec):
        def fn(params, x):
            return jax.lax.conv_general_dilated(x, params["m"]["k"], (1, 1), "SAME",
                                                dimension_numbers=("NHWC", spec, "NHWC"))
        return fn

    batches = [jnp.asarray(np.random.default_rng(s).standard_normal((2, 5, 5, 4)),
                           jnp.float32) for s in (1, 2)]
    np.testing.assert_allclose(conv("OIHW")(pair.params(), batches[0]),
                               conv("IHWO")(pair.params(True), batches[0]), rtol=1e-5,
                               atol=1e-5)
    rows = jlora.collect_inputs(conv("OIHW"), pair.params(), {PATH: "oiww"}, batches[0])
    rows_c = jlora.collect_inputs(conv("IHWO"), pair.params(True), {PATH: "iwwo"}, batches[0])
    np.testing.assert_allclose(rows[PATH], rows_c[PATH], rtol=1e-6)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # two batches: unconverged is expected
        got = variants.eva_init(None, pair.params(), pair.config(init="eva"),
                                fn=conv("OIHW"), batches=batches, rho=1.0)
        want = variants.eva_init(None, pair.params(True), pair.config(True, init="eva"),
                                 fn=conv("IHWO"), batches=batches, rho=1.0)
    assert_same_adapter(got[PATH], want[PATH], exact=False)
