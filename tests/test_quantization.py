"""Quantized frozen base (jlora.quantization): formats against numpy references, the
factored transform on a quantized base against a direct float computation, memory, merge."""

import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.stats import norm

import jlora
from jlora import quantization as Q

# bitsandbytes/functional.py, get_4bit_type("nf4") (QLoRA, Appendix E), copied verbatim.
BNB_NF4 = [
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
]
# Two assignments of (scheme, double_quant) to the test model's kernels: across them each
# scheme meets a scanned stack, a stack indexed in a loop and a plain or einsum dot.
MIXES = {
    "mix-a": {"scan": ("int8", False), "loop": ("nf4", False), "query": ("nf4", True),
              "head": ("int8", False)},
    "mix-b": {"scan": ("nf4", True), "loop": ("int8", False), "query": ("int8", False),
              "head": ("nf4", False)},
}


def _normal(seed, shape, scale=1.0):
    return np.asarray(jax.random.normal(jax.random.key(seed), shape), np.float32) * scale


# -- numpy references ------------------------------------------------------------------


def _np_int8(w, fan_in_axes):
    scale = np.abs(w).max(axis=fan_in_axes, keepdims=True) / np.float32(127)
    q = np.clip(np.round(w / np.where(scale > 0, scale, 1)), -127, 127)
    return q, scale


def _np_blocks(x, ns, size):
    flat = x.reshape(*x.shape[:ns], -1)
    n = -(-flat.shape[-1] // size)
    flat = np.pad(flat, [(0, 0)] * ns + [(0, n * size - flat.shape[-1])])
    return flat.reshape(*x.shape[:ns], n, size)


def _np_nearest(code, x):
    return np.abs(x[..., None] - code).argmin(-1)


def _np_nf4(w, ns, size=64):
    blocks = _np_blocks(w, ns, size)
    absmax = np.abs(blocks).max(-1)
    codes = _np_nearest(Q.NF4_CODE, blocks / np.where(absmax > 0, absmax, 1)[..., None])
    deq = Q.NF4_CODE[codes] * absmax[..., None]
    n = int(np.prod(w.shape[ns:]))
    return codes, absmax, deq.reshape(*w.shape[:ns], -1)[..., :n].reshape(w.shape)


def _unpack(values):
    v = np.asarray(values)
    return np.stack([v >> 4, v & 15], -1).reshape(*v.shape[:-1], -1)


def _np_dequant(qk):
    """Dequantization from the stored arrays, in numpy (independent of the library's)."""
    if qk.scheme == "int8":
        return np.asarray(qk.values, np.float32) * np.asarray(qk.scales)
    ns = qk.num_stacked
    absmax = np.asarray(qk.scales, np.float32)
    if qk.double_quant:
        step = np.repeat(np.asarray(qk.scales_scale), 256, -1)[..., : absmax.shape[-1]]
        absmax = Q.DYNAMIC_CODE[np.asarray(qk.scales)] * step + np.asarray(
            qk.scales_offset)[..., None]
    deq = Q.NF4_CODE[_unpack(qk.values)] * absmax[..., None]
    n = int(np.prod(qk.layer_shape))
    return deq.reshape(*qk.shape[:ns], -1)[..., :n].reshape(qk.shape)


# -- formats ---------------------------------------------------------------------------


def test_nf4_code_is_bitsandbytes_and_qloras():
    np.testing.assert_array_equal(Q.NF4_CODE, np.asarray(BNB_NF4, np.float32))
    # QLoRA's construction (bitsandbytes create_normal_map, offset 0.9677083): 8 positive
    # and 7 negative N(0, 1) quantiles, zero, normalised by the largest.
    pos = norm.ppf(np.linspace(0.9677083, 0.5, 9)[:-1])
    neg = -norm.ppf(np.linspace(0.9677083, 0.5, 8)[:-1])
    values = np.sort(np.concatenate([pos, [0.0], neg]))
    np.testing.assert_allclose(Q.NF4_CODE, values / values.max(), rtol=0, atol=1e-6)


def test_dynamic_code_is_bitsandbytes_signed_map():
    code = Q.DYNAMIC_CODE
    assert code.shape == (256,) and len(np.unique(code)) == 256
    assert np.all(np.diff(code) > 0) and code[-1] == 1.0 and 0.0 in code
    inner = code[(code != 0) & (code != 1)]
    np.testing.assert_array_equal(np.sort(-inner), inner)  # symmetric apart from 1.0
    # Decade 10^0 holds 64 midpoints of linspace(0.1, 1, 65) with each sign.
    top = np.linspace(0.1, 1, 65, dtype=np.float32)
    np.testing.assert_allclose(code[-65:-1], (top[:-1] + top[1:]) / 2, rtol=1e-6)


@pytest.mark.parametrize("layout, shape", [("io", (37, 29)), ("ioo", (24, 3, 5)),
                                           ("sio", (3, 40, 7)), ("wwio", (3, 3, 4, 6))])
def test_int8_matches_numpy(layout, shape):
    w = _normal(0, shape)
    qk = Q.quantize(jnp.asarray(w), "int8", layout=layout)
    lay = jlora.Layout(layout)
    q, scale = _np_int8(w, lay.fan_in_axes)
    assert qk.values.dtype == jnp.int8 and qk.shape == shape and qk.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(qk.values), q)
    # XLA divides by the constant 127 as a multiply by its reciprocal: within one ulp.
    np.testing.assert_allclose(np.asarray(qk.scales), scale, rtol=np.finfo(np.float32).eps)
    deq = np.asarray(Q.dequantize(qk))
    np.testing.assert_allclose(deq, q * scale, rtol=1e-6, atol=0)
    assert np.all(np.abs(deq - w) <= scale / 2 * (1 + 1e-5))  # half a step per channel


@pytest.mark.parametrize("shape, layout", [((128, 64), None), ((10, 7), None),
                                           ((2, 33, 9), "sio"), ((3, 3, 5, 8), "wwio")])
def test_nf4_matches_numpy(shape, layout):
    w = _normal(1, shape)
    ns = jlora.Layout(layout).num_stacked if layout else 0
    qk = Q.quantize(jnp.asarray(w), "nf4", layout=layout)
    codes, absmax, deq_ref = _np_nf4(w, ns)
    blocks = codes.shape[-2]
    assert qk.values.shape == (*shape[:ns], blocks, 32) and qk.values.dtype == jnp.uint8
    np.testing.assert_array_equal(_unpack(qk.values), codes)
    np.testing.assert_array_equal(np.asarray(qk.scales), absmax)
    np.testing.assert_allclose(np.asarray(Q.dequantize(qk)), deq_ref, rtol=0, atol=1e-6)
    # Each value is within half the widest gap of the code book of its block scale.
    half_gap = np.diff(Q.NF4_CODE).max() / 2
    err = np.abs(_np_blocks(np.asarray(Q.dequantize(qk)) - w, ns, 64))
    assert np.all(err <= absmax[..., None] * half_gap * (1 + 1e-6))


def test_nf4_double_quantization_matches_numpy():
    w = _normal(2, (2, 300, 128))  # 600 blocks per layer: three groups of 256, one partial
    qk = Q.quantize(jnp.asarray(w), "nf4", layout="sio", double_quant=True)
    plain = Q.quantize(jnp.asarray(w), "nf4", layout="sio")
    absmax = np.asarray(plain.scales)
    # bitsandbytes' compress_statistics: minus the mean, blocks of 256, dynamic 8-bit code.
    np.testing.assert_allclose(np.asarray(qk.scales_offset), absmax.mean(-1), rtol=1e-6)
    offset = np.asarray(qk.scales_offset)[:, None]  # the same sum, in XLA's order
    groups = _np_blocks(absmax - offset, 1, 256)
    gmax = np.abs(groups).max(-1)
    codes = _np_nearest(Q.DYNAMIC_CODE, groups / gmax[..., None]).reshape(2, -1)[:, :600]
    assert qk.scales.dtype == jnp.uint8 and qk.scales_scale.shape == (2, 3)
    np.testing.assert_array_equal(np.asarray(qk.scales), codes)
    # (XLA may recompute the mean inside a fusion, in another order: within one ulp.)
    np.testing.assert_allclose(np.asarray(qk.scales_scale), gmax, rtol=np.finfo(np.float32).eps)
    decoded = np.asarray(qk.block_absmax())
    half_gap = np.diff(Q.DYNAMIC_CODE).max() / 2
    bound = np.repeat(gmax, 256, -1)[:, :600] * half_gap * (1 + 1e-5) + 1e-6
    assert np.all(np.abs(decoded - absmax) <= bound)
    np.testing.assert_allclose(np.asarray(Q.dequantize(qk)), _np_dequant(qk), atol=1e-6)
    assert qk.nbytes < plain.nbytes < w.nbytes / 6  # 4 bits + 8-bit (or 32-bit) scales


def test_quantized_kernel_is_one_leaf_for_paths_plan_and_init():
    params = Q.quantize_params(
        {"stack": {"kernel": jnp.asarray(_normal(3, (2, 16, 8)))},
         "head": {"kernel": jnp.asarray(_normal(4, (16, 8))), "bias": jnp.zeros(8)}},
        "nf4", layouts={"stack/.*": "s..."}, double_quant=True,
    )
    assert jlora.paths.leaf_paths(params) == ["head/bias", "head/kernel", "stack/kernel"]
    config = jlora.LoraConfig(rank=2, layouts={"stack/kernel": "sio"})
    planned = jlora.plan(params, config)
    assert planned["stack/kernel"]["shape"] == (2, 16, 8)
    ads = jlora.init(jax.random.key(0), params, config)
    assert ads["stack/kernel"].a.shape == (2, 16, 2) and ads["head/kernel"].b.shape == (2, 8)
    back = Q.dequantize_params(params)
    assert back["stack"]["kernel"].shape == (2, 16, 8) and back["head"]["bias"].shape == (8,)
    with pytest.raises(jlora.LayoutError, match="stack/kernel"):
        Q.quantize_params({"stack": {"kernel": jnp.ones((2, 16, 8))}}, "int8")
    with pytest.raises(jlora.PatternError, match="matches no leaf path"):
        Q.quantize_params(params, "int8", targets="nothing")


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda: Q.quantize(jnp.ones((4, 4)), "int4"), ValueError, "`scheme` must be one of"),
        (lambda: Q.quantize(jnp.ones((4, 4), jnp.int32)), TypeError, "floating-point kernel"),
        (lambda: Q.quantize(jnp.ones(4)), TypeError, r"shape \(4,\)"),
        (lambda: Q.quantize(jnp.ones((4, 4)), block_size=63), ValueError, "even"),
        (lambda: Q.quantize(jnp.ones((4, 4)), "int8", double_quant=True), ValueError, "nf4"),
        (lambda: Q.quantize(jnp.ones((4, 4)), layout="sio"), ValueError, "'sio'"),
    ],
)
def test_quantize_rejects_bad_input(call, error, match):
    with pytest.raises(error, match=match):
        call()


# -- the factored transform on a quantized base ------------------------------------------

L, D, H = 3, 16, 12  # layers, width, query heads x head size = (3, 4)


def _model(p, x):
    """Every way a kernel reaches a dot: a stacked kernel scanned as quantized arrays, one
    dequantized whole and indexed by fori_loop, a DenseGeneral-style einsum, a plain dot."""
    def body(h, k):
        return jnp.tanh(h @ Q.dequantize(k)), None

    h, _ = jax.lax.scan(body, x, p["scan"]["kernel"])
    ws = Q.dequantize(p["loop"]["kernel"])
    h = jax.lax.fori_loop(0, L, lambda i, h: jnp.tanh(h @ ws[i]), h)
    q = jnp.einsum("bd,dhk->bhk", h, Q.dequantize(p["query"]["kernel"]))
    return jnp.tanh(q.reshape(q.shape[0], -1)) @ Q.dequantize(p["head"]["kernel"])


LAYOUTS = {"scan/kernel": "sio", "loop/kernel": "sio", "query/kernel": "ioo",
           "head/kernel": "io"}


@pytest.fixture(scope="module")
def float_params():
    return {"scan": {"kernel": _normal(5, (L, D, D), 0.3)},
            "loop": {"kernel": _normal(6, (L, D, D), 0.3)},
            "query": {"kernel": _normal(7, (D, 3, 4), 0.3)},
            "head": {"kernel": _normal(8, (12, 5), 0.3)}}


@pytest.fixture(scope="module")
def quantized(float_params):
    """``{mix: params}``: each kernel quantized with its scheme in that mix."""
    out = {}
    for mix, schemes in MIXES.items():
        out[mix] = {
            name: {"kernel": Q.quantize(jnp.asarray(w["kernel"]), schemes[name][0],
                                        layout=LAYOUTS[f"{name}/kernel"],
                                        double_quant=schemes[name][1])}
            for name, w in float_params.items()
        }
    return out


def _adapters(params, dtype="float32", key=0):
    ads = jlora.init(jax.random.key(key), params,
                     jlora.LoraConfig(rank=2, alpha=4.0, layouts=LAYOUTS, dtype=dtype))
    # B starts at zero; make it non-zero so the adapter path counts.
    return {p: a.replace(b=(jax.random.normal(jax.random.key(9), a.b.shape) * 0.3
                            ).astype(a.b.dtype)) for p, a in ads.items()}


def _direct(qparams, ads, x):
    """The model on W + s·A·B, W dequantized in numpy, the update formed with jnp."""
    dense = {}
    for path, leaf in jlora.paths.select(qparams, ".*").items():
        w = jnp.asarray(_np_dequant(leaf))
        ad = ads[path]
        w = w + ad.scale * ad.layout.product(ad.a.astype(jnp.float32), ad.b.astype(jnp.float32))
        dense[path.split("/")[0]] = {"kernel": w}
    return _model(dense, x)


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("mix", MIXES)
def test_factored_on_quantized_base_equals_direct(quantized, mix, jit):
    qparams = quantized[mix]
    ads = _adapters(qparams)
    x = jnp.asarray(_normal(10, (4, D)))
    g = jlora.lora(_model)
    maybe_jit = jax.jit if jit else (lambda f: f)
    with warnings.catch_warnings():
        warnings.simplefilter("error", jlora.FactoredFallbackWarning)
        y = maybe_jit(g)(qparams, ads, x)
        loss = maybe_jit(jax.grad(lambda a, x: (g(qparams, a, x) ** 2).sum(), argnums=(0, 1)))
        ga, gx = loss(ads, x)
    # (qparams closed over: the reference dequantizes them in numpy while tracing.)
    direct = jax.jit(lambda a, x: _direct(qparams, a, x))
    np.testing.assert_allclose(y, direct(ads, x), rtol=1e-5, atol=1e-5)
    # jlora.merge reads the quantized kernels as floats: the one equation holds literally.
    np.testing.assert_allclose(y, _model(jlora.merge(qparams, ads), x), rtol=1e-5, atol=1e-5)
    ra, rx = jax.jit(jax.grad(lambda a, x: (direct(a, x) ** 2).sum(), argnums=(0, 1)))(ads, x)
    for got, want in zip(jax.tree.leaves((ga, gx)), jax.tree.leaves((ra, rx)), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * float(jnp.abs(want).max()))
    assert set(jlora.lora_report(_model, qparams, ads, x).values()) == {"factored"}


def test_bf16_adapters_and_bf16_base(quantized, float_params):
    qparams = quantized["mix-b"]
    x = jnp.asarray(_normal(10, (4, D)))
    # bf16 adapters on a float32 base: factors are cast to the kernel's dtype at the dot.
    ads16 = _adapters(qparams, dtype="bfloat16")
    assert ads16["head/kernel"].a.dtype == jnp.bfloat16
    y = jax.jit(jlora.lora(_model))(qparams, ads16, x)
    np.testing.assert_allclose(y, _direct(qparams, ads16, x), rtol=1e-5, atol=1e-5)
    # A bf16 base dequantizes to bf16 (bf16 compute); float32 math at bf16 resolution.
    w16 = jnp.asarray(float_params["head"]["kernel"], jnp.bfloat16)
    q16 = {"head": {"kernel": Q.quantize(w16, "nf4")}}
    assert q16["head"]["kernel"].dtype == jnp.bfloat16
    ad = {"head/kernel": ads16["head/kernel"]}
    h = jnp.asarray(_normal(11, (4, 12)), jnp.bfloat16)
    y16 = jax.jit(jlora.lora(lambda p, h: h @ Q.dequantize(p["head"]["kernel"])))(q16, ad, h)
    assert y16.dtype == jnp.bfloat16
    w = _np_dequant(q16["head"]["kernel"]) + np.asarray(ad["head/kernel"].delta())
    np.testing.assert_allclose(np.asarray(y16, np.float32), np.asarray(h, np.float32) @ w,
                               rtol=0.02, atol=0.02)


def test_kernels_without_adapters_stay_quantized_and_correct(quantized):
    qparams = quantized["mix-a"]
    ads = {p: a for p, a in _adapters(qparams).items() if p in ("head/kernel", "scan/kernel")}
    x = jnp.asarray(_normal(11, (2, D)))
    y = jax.jit(jlora.lora(_model))(qparams, ads, x)
    np.testing.assert_allclose(y, _model(jlora.merge(qparams, ads), x), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(jlora.lora(_model)(qparams, {}, x),
                               _model(Q.dequantize_params(qparams), x), rtol=1e-5, atol=1e-5)


class _Dense(nn.Module):
    quantized: bool

    @nn.compact
    def __call__(self, x):
        def init(key):
            w = nn.initializers.normal(0.3)(key, (x.shape[-1], D))
            return Q.quantize(w, "nf4") if self.quantized else w

        # A linen module declares a quantized param with an init that returns one.
        return x @ Q.dequantize(self.param("kernel", init))


class _Block(nn.Module):
    quantized: bool

    @nn.compact
    def __call__(self, h, _):
        return jnp.tanh(_Dense(self.quantized, name="up")(h)), None


class _Stack(nn.Module):
    quantized: bool

    @nn.compact
    def __call__(self, x):
        scan = nn.scan(_Block, variable_axes={"params": 0}, split_rngs={"params": True},
                       length=L)
        return scan(self.quantized, name="layers")(x, None)[0]


def test_linen_scan_with_quantized_params():
    x = jnp.asarray(_normal(12, (2, D)))
    qparams = _Stack(True).init(jax.random.key(0), x)["params"]
    assert Q.is_quantized(qparams["layers"]["up"]["kernel"])
    ads = _adapters_for(qparams, {"layers/.*": "s..."})
    y = jlora.lora(lambda p, x: _Stack(True).apply({"params": p}, x))(qparams, ads, x)
    # The float twin of the module on the merged (dequantized) kernels.
    ref = _Stack(False).apply({"params": jlora.merge(qparams, ads)}, x)
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)


def _adapters_for(params, layouts):
    ads = jlora.init(jax.random.key(1), params, jlora.LoraConfig(rank=2, layouts=layouts))
    return {p: a.replace(b=jnp.full(a.b.shape, 0.2, a.b.dtype)) for p, a in ads.items()}


def test_no_whole_stack_float_kernel_in_a_train_step():
    layers, d = 8, 128
    w = jnp.asarray(_normal(13, (layers, d, d), 0.05))
    stack_bytes = w.size * 4  # the whole stack in float32
    x = jnp.asarray(_normal(14, (4, d)))

    def model(p, x):
        def body(h, k):
            return jnp.tanh(h @ Q.dequantize(k)), None

        return jax.lax.scan(body, x, p["kernel"])[0].sum()

    def lazy_model(p, x):  # dequantizes the whole stack in the program; jlora slices it
        ws = Q.dequantize(p["kernel"])
        return jax.lax.scan(lambda h, w: (jnp.tanh(h @ w), None), x, ws)[0].sum()

    for scheme in ("int8", "nf4"):
        params = {"kernel": Q.quantize(w, scheme, layout="sio")}
        ads = _adapters_for(params, {"kernel": "sio"})
        for f in (model, lazy_model):
            step = jax.jit(jax.grad(lambda a, f=f, p=params: jlora.lora(f)(p, a, x)))
            temp = step.lower(ads).compile().memory_analysis().temp_size_in_bytes
            assert temp < stack_bytes / 2, (scheme, f.__name__, temp, stack_bytes)
    # Without the transform (dequantize, merge, differentiate) the stack is formed.
    naive = jax.jit(jax.grad(lambda a: model(jlora.merge(params, a), x)))
    assert naive.lower(ads).compile().memory_analysis().temp_size_in_bytes >= stack_bytes


def test_adapted_quantized_kernel_used_raw_is_an_error(quantized):
    qparams = quantized["mix-a"]
    ads = _adapters(qparams)

    def raw(p, x):
        return x @ p["head"]["kernel"].values.astype(jnp.float32)

    with pytest.raises(ValueError, match=r"'head/kernel' is used as its raw `values` array"):
        jlora.lora(raw)(qparams, {"head/kernel": ads["head/kernel"]}, jnp.ones((2, 12)))
    flat = {"kernel": Q.quantize(jnp.ones((L, D, D)), "nf4")}  # quantized as one 3-D tensor
    with pytest.raises(ValueError, match=r"'kernel' has 0 stacked axes .* 'sio' has 1"):
        jlora.lora(lambda p, x: x @ Q.dequantize(p["kernel"])[0])(
            flat, _adapters_for(flat, {"kernel": "sio"}), jnp.ones((2, D)))


# -- merging into a quantized base --------------------------------------------------------


@pytest.mark.parametrize("mix", MIXES)
def test_merge_into_quantized_base(quantized, mix):
    qparams = quantized[mix]
    ads = _adapters(qparams)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        merged = Q.merge(qparams, ads)
    for path, leaf in jlora.paths.select(qparams, ".*").items():
        want = _np_dequant(leaf) + np.asarray(ads[path].delta())
        np.testing.assert_allclose(jlora.paths.select(merged, ".*")[path], want,
                                   rtol=1e-6, atol=1e-6)
    first = jlora.paths.select(qparams, ".*")[next(iter(ads))].scheme
    with pytest.warns(Q.QuantizationWarning, match=rf"Requantizing 4 merged .*{first}"):
        requant = Q.merge(qparams, ads, requantize=True)
    for path, leaf in jlora.paths.select(requant, ".*").items():
        old = jlora.paths.select(qparams, ".*")[path]
        assert Q.is_quantized(leaf) and leaf.statics() == old.statics()
        assert leaf.double_quant == old.double_quant
        redo = Q.quantize(jlora.paths.select(merged, ".*")[path], old.scheme,
                          layout="s" * old.num_stacked + old.layout,
                          double_quant=old.double_quant)
        np.testing.assert_array_equal(leaf.values, redo.values)


def test_summary_counts_a_quantized_kernel_as_its_float_kernel():
    w = jax.random.normal(jax.random.key(0), (128, 64))
    params = {"d": {"kernel": Q.quantize(w, "nf4")}}
    adapters = jlora.init(jax.random.key(0), params, jlora.LoraConfig(rank=4))
    trainable = 4 * (128 + 64)
    assert jlora.summary(params, adapters).splitlines()[-1].startswith(
        f"trainable params: {trainable:,} || all params: {128 * 64 + trainable:,} ||")
