"""Quantized frozen base (jlora.quantization): formats against numpy references, the
factored transform on a quantized base against a direct float computation, memory, merge."""

import functools
import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from scipy.stats import norm

import jlora
from jlora import _jax_compat as jc
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
    "mix-c": {"scan": ("int4", False), "loop": ("fp8", False), "query": ("fp8", False),
              "head": ("int4", False)},
}


def _normal(seed, shape, scale=1.0):
    return np.asarray(jax.random.normal(jax.random.key(seed), shape), np.float32) * scale


# -- numpy references ------------------------------------------------------------------


def _np_int8(w, fan_in_axes):
    scale = np.abs(w).max(axis=fan_in_axes, keepdims=True) / np.float32(127)
    q = np.clip(np.round(w / np.where(scale > 0, scale, 1)), -127, 127)
    return q, scale


def _np_rows(w, lay):
    """Each layer as torch's (fan_out, fan_in) weight: ``(*stacked, fan_out, fan_in)``,
    the axes of each group in the kernel's order."""
    stacked, fan_in, fan_out = lay.split_shape(w.shape)
    x = np.transpose(w, lay.stacked_axes + lay.fan_out_axes + lay.fan_in_axes)
    return x.reshape(*stacked, int(np.prod(fan_out)), int(np.prod(fan_in)))


def _np_unrows(rows, lay, shape):
    """The inverse of ``_np_rows``: a kernel of ``shape`` in the layout's axis order."""
    stacked, fan_in, fan_out = lay.split_shape(shape)
    order = lay.stacked_axes + lay.fan_out_axes + lay.fan_in_axes
    return np.transpose(rows.reshape(*stacked, *fan_out, *fan_in), np.argsort(order))


def _np_blocks(x, ns, size):
    flat = x.reshape(*x.shape[:ns], -1)
    n = -(-flat.shape[-1] // size)
    flat = np.pad(flat, [(0, 0)] * ns + [(0, n * size - flat.shape[-1])])
    return flat.reshape(*x.shape[:ns], n, size)


def _np_nearest(code, x):
    return np.abs(x[..., None] - code).argmin(-1)


def _np_nf4(w, lay, size=64):
    """NF4 as bitsandbytes quantizes a torch weight: blocks along each layer's fan-in."""
    ns = lay.num_stacked
    rows = _np_rows(w, lay)
    blocks = _np_blocks(rows, ns, size)
    absmax = np.abs(blocks).max(-1)
    codes = _np_nearest(Q.NF4_CODE, blocks / np.where(absmax > 0, absmax, 1)[..., None])
    deq = Q.NF4_CODE[codes] * absmax[..., None]
    n = rows[(0,) * ns].size
    deq = deq.reshape(*rows.shape[:ns], -1)[..., :n].reshape(rows.shape)
    return codes, absmax, _np_unrows(deq, lay, w.shape)


def _stored_shape(layer, lay, shape):
    """One layer's array shape ``layer`` with the stacked axes of a kernel of ``shape``
    where the kernel has them."""
    stacked, layer = iter(lay.split_shape(shape)[0]), iter(layer)
    return tuple(next(stacked) if c == "s" else next(layer) for c in lay.axes)


def _np_stacked_first(qk, field, layer_ndim):
    """One of the stored arrays with its stacked axes first, without NF4's padding axes."""
    lay, ns = qk.kernel_layout, qk.num_stacked
    x = np.moveaxis(np.asarray(getattr(qk, field)), lay.stacked_axes, range(ns))
    assert x.shape[ns + layer_ndim:] == (1,) * (x.ndim - ns - layer_ndim), (field, x.shape)
    return x.reshape(x.shape[:ns + layer_ndim])


def _unpack(values):
    v = np.asarray(values)
    return np.stack([v >> 4, v & 15], -1).reshape(*v.shape[:-1], -1)


def _np_groups(w, lay, size):
    """int4's groups: each row of ``_np_rows`` zero-padded to whole groups of ``size``,
    ``(*stacked, fan_out * groups_per_row, size)``."""
    rows = _np_rows(w, lay)
    n = -(-rows.shape[-1] // size)
    rows = np.pad(rows, [(0, 0)] * (rows.ndim - 1) + [(0, n * size - rows.shape[-1])])
    return rows.reshape(*rows.shape[:-2], rows.shape[-2] * n, size)


def _np_dequant(qk):
    """Dequantization from the stored arrays, in numpy (independent of the library's)."""
    if qk.scheme in ("int8", "fp8"):
        return np.asarray(qk.values).astype(np.float32) * np.asarray(qk.scales)
    lay = qk.kernel_layout
    stacked, fan_in, fan_out = lay.split_shape(qk.shape)
    if qk.scheme == "int4":
        q = _unpack(_np_stacked_first(qk, "values", 2)).astype(np.float32)
        zeros = _np_stacked_first(qk, "zeros", 1).astype(np.float32)
        groups = (q - zeros[..., None]) * _np_stacked_first(qk, "scales", 1)[..., None]
        rows = groups.reshape(*stacked, np.prod(fan_out), -1)[..., :np.prod(fan_in)]
        return _np_unrows(rows, lay, qk.shape)
    scales = _np_stacked_first(qk, "scales", 1)
    absmax = scales.astype(np.float32)
    if qk.double_quant:
        step = np.repeat(_np_stacked_first(qk, "scales_scale", 1), 256, -1)[..., :absmax.shape[-1]]
        absmax = Q.DYNAMIC_CODE[scales] * step + _np_stacked_first(qk, "scales_offset", 0)[
            ..., None]
    deq = Q.NF4_CODE[_unpack(_np_stacked_first(qk, "values", 2))] * absmax[..., None]
    n = int(np.prod(qk.layer_shape))
    rows = deq.reshape(*stacked, -1)[..., :n].reshape(*stacked, np.prod(fan_out), np.prod(fan_in))
    return _np_unrows(rows, lay, qk.shape)


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
                                           ("sio", (3, 40, 7)), ("wwio", (3, 3, 4, 6)),
                                           ("oi", (29, 37)), ("oio", (3, 24, 5)),
                                           ("soio", (2, 3, 24, 5)), ("isoo", (24, 2, 3, 5)),
                                           ("fv", (4, 30)), ("oiww", (6, 4, 3, 3))])
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
                                           ((2, 33, 9), "sio"), ((3, 3, 5, 8), "wwio"),
                                           ((9, 70), "oi"), ((33, 2, 3, 3), "isoo"),
                                           ((8, 5, 3, 3), "oiww"), ((4, 300), "fv")])
def test_nf4_matches_numpy(shape, layout):
    w = _normal(1, shape)
    lay = jlora.Layout(layout or "io")
    ns = lay.num_stacked
    qk = Q.quantize(jnp.asarray(w), "nf4", layout=layout)
    codes, absmax, deq_ref = _np_nf4(w, lay)
    blocks = codes.shape[-2]
    assert qk.shape == shape and qk.kernel_layout == lay
    # Stored with the kernel's axes: the layer axes where the kernel has them, then one
    # layer's (blocks, 32) padded with 1s to the layer's number of axes.
    layer = len(shape) - ns
    assert qk.values.shape == _stored_shape((blocks, 32) + (1,) * (layer - 2), lay, shape)
    assert qk.scales.shape == _stored_shape((blocks,) + (1,) * (layer - 1), lay, shape)
    assert qk.values.dtype == jnp.uint8
    np.testing.assert_array_equal(_unpack(_np_stacked_first(qk, "values", 2)), codes)
    np.testing.assert_array_equal(_np_stacked_first(qk, "scales", 1), absmax)
    np.testing.assert_array_equal(np.asarray(qk.stacked_first("scales")), absmax)
    np.testing.assert_allclose(np.asarray(Q.dequantize(qk)), deq_ref, rtol=0, atol=1e-6)
    # Each value is within half the widest gap of the code book of its block scale.
    half_gap = np.diff(Q.NF4_CODE).max() / 2
    err = np.abs(_np_blocks(_np_rows(np.asarray(Q.dequantize(qk)) - w, lay), ns, 64))
    assert np.all(err <= absmax[..., None] * half_gap * (1 + 1e-6))


@pytest.mark.parametrize("layout, shape", [("sio", (2, 300, 128)), ("iso", (300, 2, 128))])
def test_nf4_double_quantization_matches_numpy(layout, shape):
    w = _normal(2, shape)  # 600 blocks per layer: three groups of 256, one partial
    qk = Q.quantize(jnp.asarray(w), "nf4", layout=layout, double_quant=True)
    plain = Q.quantize(jnp.asarray(w), "nf4", layout=layout)
    absmax = _np_stacked_first(plain, "scales", 1)
    # bitsandbytes' compress_statistics: minus the mean, blocks of 256, dynamic 8-bit code.
    offset = _np_stacked_first(qk, "scales_offset", 0)
    np.testing.assert_allclose(offset, absmax.mean(-1), rtol=1e-6)
    groups = _np_blocks(absmax - offset[:, None], 1, 256)  # the same sum, in XLA's order
    gmax = np.abs(groups).max(-1)
    codes = _np_nearest(Q.DYNAMIC_CODE, groups / gmax[..., None]).reshape(2, -1)[:, :600]
    lay = jlora.Layout(layout)
    assert qk.scales.dtype == jnp.uint8
    assert qk.scales_scale.shape == _stored_shape((3, 1), lay, shape)
    assert qk.scales_offset.shape == _stored_shape((1, 1), lay, shape)
    np.testing.assert_array_equal(_np_stacked_first(qk, "scales", 1), codes)
    # (XLA may recompute the mean inside a fusion, in another order: within one ulp.)
    np.testing.assert_allclose(_np_stacked_first(qk, "scales_scale", 1), gmax,
                               rtol=np.finfo(np.float32).eps)
    decoded = np.asarray(qk.block_absmax())
    half_gap = np.diff(Q.DYNAMIC_CODE).max() / 2
    bound = np.repeat(gmax, 256, -1)[:, :600] * half_gap * (1 + 1e-5) + 1e-6
    assert np.all(np.abs(decoded - absmax) <= bound)
    np.testing.assert_allclose(np.asarray(Q.dequantize(qk)), _np_dequant(qk), atol=1e-6)
    assert qk.nbytes < plain.nbytes < w.nbytes / 6  # 4 bits + 8-bit (or 32-bit) scales


@pytest.mark.parametrize("layout, shape, size", [
    ("oi", (9, 100), 64), ("sio", (2, 130, 5), 128), ("isoo", (64, 2, 3, 2), 32),
])
def test_int4_matches_gptq_numpy(layout, shape, size):
    """GPTQ's Quantizer (sym=False, 4 bits) per group of ``size`` along each output
    channel's fan-in, round to nearest: the scale to one ulp (XLA divides by 15 as a
    multiply), zero points and codes exactly from the stored scale."""
    lay = jlora.Layout(layout)
    ns = lay.num_stacked
    rows = _np_rows(_normal(22, shape), lay)
    rows[(0,) * ns + (0, slice(0, size))] = np.abs(rows[(0,) * ns + (0, slice(0, size))]) + 1
    rows[..., 1, :size] = 0  # an all-positive group and an all-zero one
    w = _np_unrows(rows, lay, shape)
    qk = Q.quantize(jnp.asarray(w), "int4", layout=layout, block_size=size)
    groups = _np_groups(w, lay, size)
    lo, hi = np.minimum(groups.min(-1), 0), np.maximum(groups.max(-1), 0)
    empty = (lo == 0) & (hi == 0)
    lo, hi = np.where(empty, -1, lo), np.where(empty, 1, hi)
    layer = len(shape) - ns
    assert qk.values.shape == _stored_shape((groups.shape[-2], size // 2) + (1,) * (layer - 2),
                                            lay, shape)
    for field, dtype in (("values", jnp.uint8), ("scales", jnp.float32), ("zeros", jnp.uint8)):
        assert getattr(qk, field).dtype == dtype
    scale = _np_stacked_first(qk, "scales", 1)
    np.testing.assert_allclose(scale, (hi - lo) / np.float32(15), rtol=np.finfo(np.float32).eps)
    zero = np.round(-lo / scale)
    np.testing.assert_array_equal(_np_stacked_first(qk, "zeros", 1), zero)
    codes = np.clip(np.round(groups / scale[..., None]) + zero[..., None], 0, 15)
    np.testing.assert_array_equal(_unpack(_np_stacked_first(qk, "values", 2)), codes)
    deq = np.asarray(Q.dequantize(qk))
    np.testing.assert_allclose(deq, _np_dequant(qk), rtol=0, atol=1e-6)
    # Every value (the all-positive group's too: the zero point never clips) lies within
    # half a step of its group's grid.
    err = np.abs(_np_groups(deq - w, lay, size))
    assert np.all(err <= scale[..., None] / 2 * (1 + 1e-5))
    # 4 bits per value, a float32 scale and a uint8 zero point per group.
    assert qk.nbytes == groups[..., 0].size * (size // 2 + 4 + 1)
    per_row = groups.shape[-2] // rows.shape[-2]
    assert np.all(_np_groups(deq, lay, size)[..., per_row, :] == 0)  # row 1's first group


@pytest.mark.parametrize("layout, shape", [("oi", (29, 37)), ("isoo", (24, 2, 3, 5))])
def test_fp8_matches_numpy(layout, shape):
    """float8 e4m3 per output channel: scale absmax / 448 (to one ulp), values the
    stored scale's quotient rounded to nearest even e4m3 (ml_dtypes), bit for bit."""
    lay = jlora.Layout(layout)
    w = _normal(23, shape, 3.0)
    w[tuple(0 if k in lay.fan_out_axes else slice(None) for k in range(w.ndim))] = 0
    w[tuple(1 if k in lay.fan_out_axes else 0 for k in range(w.ndim))] = 1e-4  # subnormal
    qk = Q.quantize(jnp.asarray(w), "fp8", layout=layout)
    assert qk.values.dtype == jnp.float8_e4m3fn and qk.values.shape == shape
    absmax = np.abs(w).max(axis=lay.fan_in_axes, keepdims=True)
    scale = np.asarray(qk.scales)
    np.testing.assert_allclose(scale, absmax / np.float32(448), rtol=np.finfo(np.float32).eps)
    want = np.clip(w / np.where(scale > 0, scale, 1), -448, 448).astype(ml_dtypes.float8_e4m3fn)
    np.testing.assert_array_equal(np.asarray(qk.values).view(np.uint8), want.view(np.uint8))
    assert qk.nbytes == w.size + 4 * absmax.size
    deq = np.asarray(Q.dequantize(qk))
    np.testing.assert_array_equal(deq, want.astype(np.float32) * scale)
    # 3 mantissa bits: within 2^-4 relative, or half the subnormal step 2^-9 of the scale.
    assert np.all(np.abs(deq - w) <= np.maximum(np.abs(w) * 2.0**-4, scale * 2.0**-10) * 1.0001)


def test_quantized_kernel_is_one_leaf_for_paths_plan_and_init():
    params = Q.quantize_params(
        {"stack": {"kernel": jnp.asarray(_normal(3, (2, 16, 8)))},
         "head": {"kernel": jnp.asarray(_normal(4, (16, 8))), "bias": jnp.zeros(8)}},
        "nf4", layouts={"stack/.*": "s..."}, double_quant=True,
    )
    assert jlora.leaf_paths(params) == ["head/bias", "head/kernel", "stack/kernel"]
    config = jlora.LoraConfig(rank=2, layouts={"stack/kernel": "sio"})
    planned = jlora.plan(params, config)
    assert planned["stack/kernel"].shape == (2, 16, 8)
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
        (lambda: Q.quantize(jnp.ones((4, 4)), "int3"), ValueError, "`scheme` must be one of"),
        (lambda: Q.quantize(jnp.ones((4, 4), jnp.int32)), TypeError, "floating-point kernel"),
        (lambda: Q.quantize(jnp.ones(4)), TypeError, r"shape \(4,\)"),
        (lambda: Q.quantize(jnp.ones((4, 4)), block_size=63), ValueError, "even"),
        (lambda: Q.quantize(jnp.ones((4, 4)), "int8", double_quant=True), ValueError, "nf4"),
        (lambda: Q.quantize(jnp.ones((4, 4)), "int4", double_quant=True), ValueError,
         r"\['nf4'\] only, not 'int4'"),
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
    for path, leaf in jlora.select(qparams, ".*").items():
        w = jnp.asarray(_np_dequant(leaf))
        ad = ads[path]
        w = w + ad.scale * ad.layout.product(ad.a.astype(jnp.float32), ad.b.astype(jnp.float32))
        dense[path.split("/")[0]] = {"kernel": w}
    return _model(dense, x)


# Eager (the same interpretation, op by op) for the first mixes only: it is slow.
@pytest.mark.parametrize("mix, jit", [(m, j) for m in MIXES for j in (False, True)
                                      if j or m != "mix-c"],
                         ids=lambda v: {True: "jit", False: "eager"}.get(v, v))
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
    scheme: str = "nf4"
    double_quant: bool = False

    @nn.compact
    def __call__(self, x):
        def init(key):
            w = nn.initializers.normal(0.3)(key, (x.shape[-1], D))
            if not self.quantized:
                return w
            return Q.quantize(w, self.scheme, double_quant=self.double_quant)

        # A linen module declares a quantized param with an init that returns one.
        return x @ Q.dequantize(self.param("kernel", init))


class _Block(nn.Module):
    quantized: bool
    scheme: str = "nf4"
    double_quant: bool = False

    @nn.compact
    def __call__(self, h, _):
        dense = _Dense(self.quantized, self.scheme, self.double_quant, name="up")
        return jnp.tanh(dense(h)), None


class _Stack(nn.Module):
    quantized: bool
    scheme: str = "nf4"
    double_quant: bool = False
    axis: int = 0  # the params' layer axis (MaxText scans over axis 1)

    @nn.compact
    def __call__(self, x):
        scan = nn.scan(_Block, variable_axes={"params": self.axis}, split_rngs={"params": True},
                       length=L)
        return scan(self.quantized, self.scheme, self.double_quant, name="layers")(x, None)[0]


def test_linen_scan_with_quantized_params():
    x = jnp.asarray(_normal(12, (2, D)))
    qparams = _Stack(True).init(jax.random.key(0), x)["params"]
    assert Q.is_quantized(qparams["layers"]["up"]["kernel"])
    ads = _adapters_for(qparams, {"layers/.*": "s..."})
    y = jlora.lora(lambda p, x: _Stack(True).apply({"params": p}, x))(qparams, ads, x)
    # The float twin of the module on the merged (dequantized) kernels.
    ref = _Stack(False).apply({"params": jlora.merge(qparams, ads)}, x)
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("scheme, double_quant", [("int8", False), ("nf4", True)])
def test_linen_scan_over_a_layer_axis_that_is_not_first(scheme, double_quant):
    """As MaxText, nn.scan over the params' axis 1 (kernels 'iso'): every quantized array
    keeps the layer axis where the kernel has it, so nn.scan slices each layer's arrays,
    which have the shapes the module's own (per-layer) initializer gives."""
    x = jnp.asarray(_normal(15, (2, D)))
    float_params = _Stack(False, axis=1).init(jax.random.key(0), x)["params"]
    assert float_params["layers"]["up"]["kernel"].shape == (D, L, D)
    qparams = Q.quantize_params(float_params, scheme, layouts={"layers/.*": "iso"},
                                double_quant=double_quant)
    qk = qparams["layers"]["up"]["kernel"]
    assert qk.shape == (D, L, D) and qk.kernel_layout == jlora.Layout("iso")
    assert all(a.ndim == 3 and a.shape[1] == L for a in jax.tree.leaves(qk))
    model = _Stack(True, scheme, double_quant, axis=1)
    y = model.apply({"params": qparams}, x)
    ref = _Stack(False, axis=1).apply({"params": Q.dequantize_params(qparams)}, x)
    np.testing.assert_allclose(y, ref, rtol=1e-6, atol=1e-6)
    # Each layer was quantized on its own: layer 1 of the stack is layer 1 quantized alone.
    alone = Q.quantize(float_params["layers"]["up"]["kernel"][:, 1], scheme,
                       double_quant=double_quant)
    for got, want in zip(jax.tree.leaves(jax.tree.map(lambda a: a[:, 1], qk)),
                         jax.tree.leaves(alone), strict=True):
        np.testing.assert_array_equal(got, want)


ORDERS = [("oi", (70, 9)), ("oio", (24, 3, 5)), ("soio", (2, 24, 3, 5)),
          ("isoo", (2, 24, 3, 5)), ("fv", (30, 4)), ("oiww", (4, 3, 3, 6))]


# Every order with the first schemes; the blocked and per-channel code they share with
# int4 and fp8 is then checked for those on one order each.
@pytest.mark.parametrize("layout, canonical_shape, scheme, double_quant", [
    *((*order, *scheme) for scheme in (("int8", False), ("nf4", False), ("nf4", True))
      for order in ORDERS),
    (*ORDERS[3], "int4", False), (*ORDERS[1], "fp8", False),
])
def test_any_axis_order_quantizes_as_the_canonical_kernel(layout, canonical_shape, scheme,
                                                          double_quant):
    """A kernel stored in another axis order is quantized exactly as the same kernel
    stored (*stacked, *fan_in, *fan_out): int8 arrays are their transposes, NF4 blocks and
    scales the same numbers, and the dequantized kernel the transpose."""
    lay = jlora.Layout(layout)
    canonical = jlora.Layout("".join(layout[k] for k in lay.canonical_order))
    w_canonical = _normal(16, canonical_shape)
    to_kernel = np.argsort(lay.canonical_order)  # numpy's own transpose of the same numbers
    w = np.transpose(w_canonical, to_kernel)
    qc = Q.quantize(jnp.asarray(w_canonical), scheme, layout=canonical, double_quant=double_quant)
    qk = Q.quantize_params({"k": jnp.asarray(w)}, scheme, targets="k", layouts={"k": layout},
                           double_quant=double_quant)["k"]
    assert qk.shape == w.shape and qk.kernel_layout == lay
    if scheme in ("int8", "fp8"):
        for field in ("values", "scales"):
            np.testing.assert_array_equal(getattr(qk, field),
                                          np.transpose(getattr(qc, field), to_kernel))
    else:
        for field in qc.fields():
            np.testing.assert_array_equal(qk.stacked_first(field), qc.stacked_first(field))
    np.testing.assert_array_equal(Q.dequantize(qk), np.transpose(Q.dequantize(qc), to_kernel))
    np.testing.assert_allclose(Q.dequantize(qk), _np_dequant(qk), rtol=0, atol=1e-6)


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


# -- stacked axes that are not the first (MaxText: nn.scan over the params' axis 1) --------

HEADS, HEAD_DIM = 4, 4  # the query's (heads, head_dim) output is the next layer's input
STACK_LAYOUTS = {"iso": {"layers/up/kernel": "iso", "layers/query/kernel": "isoo"},
                 "sio": {"layers/up/kernel": "sio", "layers/query/kernel": "sioo"}}
# (scheme, double_quant) of the two kernels, and which kernel has an adapter: each scheme
# meets an "iso" and an "isoo" kernel, adapted and not.
STACK_CASES = {
    "up-int8-adapted": ({"up": ("int8", False), "query": ("nf4", True)}, ("layers/up/kernel",)),
    "up-nf4-adapted": ({"up": ("nf4", True), "query": ("int8", False)}, ("layers/up/kernel",)),
    "query-int8-adapted": ({"up": ("nf4", True), "query": ("int8", False)},
                           ("layers/query/kernel",)),
    "query-nf4-adapted": ({"up": ("int8", False), "query": ("nf4", True)},
                          ("layers/query/kernel",)),
}


def _kernel(module, name, shape):
    """The module's kernel as given, float or quantized, through ``dequantize``. (Given
    params are read as they are: ``self.param`` would compare a quantized kernel's arrays
    with the float initializer's shape.)"""
    if module.has_variable("params", name):
        return Q.dequantize(module.get_variable("params", name))
    return module.param(name, nn.initializers.normal(0.3), shape)


class _Query(nn.Module):
    """A DenseGeneral-style ``(embed, heads, head_dim)`` kernel ("ioo")."""

    @nn.compact
    def __call__(self, x):
        w = _kernel(self, "kernel", (x.shape[-1], HEADS, HEAD_DIM))
        q = jnp.einsum("bd,dhk->bhk", x, w)
        return q.reshape(x.shape[0], HEADS * HEAD_DIM)


class _UpQuery(nn.Module):
    @nn.compact
    def __call__(self, h, _):
        h = jnp.tanh(h @ _kernel(self, "up", (D, D)))
        return jnp.tanh(_Query(name="query")(h)), None


class _LayerStack(nn.Module):
    axis: int  # the params' layer axis: 1 as MaxText ("iso", "isoo"), 0 canonical

    @nn.compact
    def __call__(self, x):
        scan = nn.scan(_UpQuery, variable_axes={"params": self.axis},
                       split_rngs={"params": True}, length=L)
        return scan(name="layers")(x, None)[0]


def _stack_params(axis: int):
    """Float params of the stack with the layers at ``axis``, paths ``layers/up/kernel``."""
    p = _LayerStack(axis).init(jax.random.key(3), jnp.zeros((1, D)))["params"]["layers"]
    return {"layers": {"up": {"kernel": p["up"]}, "query": p["query"]}}


def _stack_apply(axis):
    def model(p, x):
        tree = {"layers": {"up": p["layers"]["up"]["kernel"], "query": p["layers"]["query"]}}
        return _LayerStack(axis).apply({"params": tree}, x)

    return model


def _loop_model(p, x):
    """The same layers in a python loop, each layer read as ``W[:, i]`` of the whole
    dequantized stack (stored "iso" / "isoo")."""
    up = Q.dequantize(p["layers"]["up"]["kernel"])
    query = Q.dequantize(p["layers"]["query"]["kernel"])
    h = x
    for i in range(L):
        h = jnp.tanh(h @ up[:, i])
        q = jnp.einsum("bd,dhk->bhk", h, query[:, i])
        h = jnp.tanh(q.reshape(h.shape[0], HEADS * HEAD_DIM))
    return h


def _moveaxis_scan_model(p, x):
    """The whole stacks dequantized, their layer axis moved first, then a ``lax.scan``."""
    ups = jnp.moveaxis(Q.dequantize(p["layers"]["up"]["kernel"]), 1, 0)
    queries = jnp.moveaxis(Q.dequantize(p["layers"]["query"]["kernel"]), 1, 0)

    def layer(h, ws):
        h = jnp.tanh(h @ ws[0])
        q = jnp.einsum("bd,dhk->bhk", h, ws[1])
        return jnp.tanh(q.reshape(h.shape[0], HEADS * HEAD_DIM)), None

    return jax.lax.scan(layer, x, (ups, queries))[0]


STACK_MODELS = {"nn.scan-axis-1": _stack_apply(axis=1), "loop": _loop_model,
                "moveaxis-scan": _moveaxis_scan_model}


def _quantized_stacks(params, schemes, layouts):
    return {"layers": {
        name: {"kernel": Q.quantize(params["layers"][name]["kernel"], scheme,
                                    layout=layouts[f"layers/{name}/kernel"], double_quant=dq)}
        for name, (scheme, dq) in schemes.items()}}


def _whole_stack_floats(fn, *args) -> list:
    """Float arrays in the traced program of ``fn`` with a whole stack's shape (any order)."""
    shapes = {tuple(sorted(s)) for s in ((D, L, D), (D, L, HEADS, HEAD_DIM))}
    closed = jax.make_jaxpr(fn)(*args)
    return [(e.primitive.name, v.aval.shape) for e in jc.iter_eqns(closed.jaxpr)
            for v in e.outvars if jnp.issubdtype(v.aval.dtype, jnp.floating)
            and tuple(sorted(v.aval.shape)) in shapes]


@pytest.fixture(scope="module")
def stack_case():
    """``get(case, model)``: the quantized "iso"/"isoo" params, adapters, input and the
    references (computed once, under jit): the model on the merged dequantized kernels,
    and the canonical model ("sio"/"sioo", nn.scan over axis 0) under ``jlora.lora``."""
    iso = _stack_params(axis=1)
    assert iso["layers"]["up"]["kernel"].shape == (D, L, D)
    assert iso["layers"]["query"]["kernel"].shape == (D, L, HEADS, HEAD_DIM)
    canonical = jax.tree.map(lambda w: jnp.moveaxis(w, 1, 0), iso)
    x = jnp.asarray(_normal(17, (2, D)))

    def outputs(f, params, ads):  # the model's value, and the gradient of a loss
        def loss(a):
            return (f(params, a, x) ** 2).sum()

        return jax.jit(f)(params, ads, x), jax.jit(jax.grad(loss))(ads)

    @functools.cache
    def case_data(case):
        schemes, adapted = STACK_CASES[case]
        qparams = _quantized_stacks(iso, schemes, STACK_LAYOUTS["iso"])
        ads = {p: a for p, a in _adapters_for(qparams, STACK_LAYOUTS["iso"]).items()
               if p in adapted}
        # The same factors on the canonical kernels: A and B have one shape in any order.
        ads_canonical = {p: a.replace(layout=jlora.Layout(STACK_LAYOUTS["sio"][p]))
                         for p, a in ads.items()}
        qcanonical = _quantized_stacks(canonical, schemes, STACK_LAYOUTS["sio"])
        want = outputs(jlora.lora(_stack_apply(axis=0)), qcanonical, ads_canonical)
        return qparams, ads, want

    @functools.cache
    def get(case, model):
        qparams, ads, want_canonical = case_data(case)
        f = STACK_MODELS[model]
        floats = Q.dequantize_params(qparams)
        want_merged = outputs(lambda p, a, x: f(jlora.merge(p, a), x), floats, ads)
        return qparams, ads, x, (want_merged, want_canonical)

    return get


# Every model under jit; eager (the same interpretation, run op by op) for the first.
@pytest.mark.parametrize("model, jit", [
    *((m, True) for m in STACK_MODELS), (next(iter(STACK_MODELS)), False)],
    ids=lambda v: {True: "jit", False: "eager"}.get(v, v) if isinstance(v, bool) else str(v))
@pytest.mark.parametrize("case", STACK_CASES)
def test_quantized_stack_with_layers_not_first_stays_factored(stack_case, case, model, jit):
    """Quantized "iso"/"isoo" stacks under nn.scan(variable_axes={'params': 1}) (a
    transpose of every quantized array, then a scan), indexed ``W[:, i]`` (a slice and
    squeeze of the layer axis) and dequantized whole, moved layers-first and scanned:
    adapted kernels factored, only one layer dequantized at a time, values and adapter
    gradients those of the merged float model and of the same model with its kernels
    stored (and quantized) canonically, "sio"/"sioo"."""
    qparams, ads, x, wants = stack_case(case, model)
    f = STACK_MODELS[model]
    maybe_jit = jax.jit if jit else (lambda fn: fn)
    g = jlora.lora(f)

    def loss(a, x):
        return (g(qparams, a, x) ** 2).sum()

    with warnings.catch_warnings():
        warnings.simplefilter("error", jlora.FactoredFallbackWarning)
        y = maybe_jit(g)(qparams, ads, x)
        grads = maybe_jit(jax.grad(loss))(ads, x)
    if jit:  # the program is the same in both variants: inspect it once
        assert jlora.lora_report(f, qparams, ads, x) == dict.fromkeys(ads, "factored")
        assert _whole_stack_floats(g, qparams, ads, x) == []
    for want_y, want_grads in wants:
        np.testing.assert_allclose(y, want_y, rtol=1e-5, atol=1e-5)
        for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads), strict=True):
            np.testing.assert_allclose(got, want, rtol=1e-4,
                                       atol=1e-4 * float(jnp.abs(want).max()))


@pytest.mark.parametrize("layout, shape, scheme, double_quant", [
    ("iso", (16, L, 8), "int8", False), ("iso", (16, L, 8), "nf4", False),
    ("isoo", (70, L, 2, 4), "nf4", True), ("isoo", (70, L, 2, 4), "int8", False),
    ("isoo", (70, L, 2, 4), "int4", False),
])
def test_vmap_over_a_stacked_axis_that_is_not_first(layout, shape, scheme, double_quant):
    """``vmap`` of ``dequantize`` over the layer axis where the kernel has it (axis 1):
    one layer per mapped index, and the batch re-stacked anywhere by ``out_axes``."""
    qk = Q.quantize(jnp.asarray(_normal(18, shape)), scheme, layout=layout,
                    double_quant=double_quant)
    whole = _np_dequant(qk)
    layers = jax.vmap(Q.dequantize, in_axes=1)(qk)
    np.testing.assert_allclose(layers, np.moveaxis(whole, 1, 0), rtol=0, atol=1e-6)
    again = jax.jit(jax.vmap(Q.dequantize, in_axes=1, out_axes=1))(qk)
    np.testing.assert_allclose(again, whole, rtol=0, atol=1e-6)
    # Layer 1 mapped alone is layer 1 of the whole kernel.
    np.testing.assert_allclose(Q.dequantize(jax.tree.map(lambda a: a[:, 1], qk)), whole[:, 1],
                               rtol=0, atol=1e-6)


def test_nested_vmap_over_two_stacked_axes():
    """vmap over the first stacked axis of "sisoo", then over the next (axis 1 of each):
    the statics follow each mapped kernel, and the result is the kernel, layers first."""
    qk = Q.quantize(jnp.asarray(_normal(19, (2, 70, L, 2, 4))), "nf4", layout="sisoo",
                    double_quant=True)
    got = jax.jit(jax.vmap(jax.vmap(Q.dequantize, in_axes=1)))(qk)
    np.testing.assert_allclose(got, np.moveaxis(_np_dequant(qk), 2, 1), rtol=0, atol=1e-6)


@pytest.mark.parametrize("scheme", ["int8", "nf4"])
def test_vmap_over_layers_inside_lora(scheme):
    """A model that vmaps over the layer axis of an "iso" kernel (one input per layer, as
    experts): dequantize is batched over a stacked axis that is not first, under lora."""
    w = jnp.asarray(_normal(20, (D, L, D), 0.3))
    qparams = {"experts": {"kernel": Q.quantize(w, scheme, layout="iso")}}
    ads = _adapters_for(qparams, {"experts/kernel": "iso"})

    def model(p, xs):
        return jax.vmap(lambda k, x: x @ Q.dequantize(k), in_axes=(1, 0))(
            p["experts"]["kernel"], xs)

    xs = jnp.asarray(_normal(21, (L, 2, D)))
    y = jax.jit(jlora.lora(model))(qparams, ads, xs)
    floats = Q.dequantize_params(qparams)
    np.testing.assert_allclose(y, model(jlora.merge(floats, ads), xs), rtol=1e-5, atol=1e-5)
    assert jlora.lora_report(model, qparams, ads, xs) == {"experts/kernel": "factored"}


def test_adapted_quantized_kernel_used_raw_is_an_error(quantized):
    qparams = quantized["mix-a"]
    ads = _adapters(qparams)

    def raw(p, x):
        return x @ p["head"]["kernel"].values.astype(jnp.float32)

    with pytest.raises(ValueError, match=r"'head/kernel' is used as its raw `values` array"):
        jlora.lora(raw)(qparams, {"head/kernel": ads["head/kernel"]}, jnp.ones((2, 12)))


@pytest.mark.parametrize("stored, adapter", [("iio", "sio"), ("sio", "iso"), ("iso", "sio")])
def test_stacked_axes_of_a_quantized_kernel_must_be_its_adapters(stored, adapter):
    """A kernel quantized as one tensor, or with its layers at another axis, than its
    adapter's layout says (the shape (D, D, D) fits both): an error naming both layouts."""
    qparams = {"kernel": Q.quantize(jnp.ones((D, D, D)), "nf4", layout=stored)}
    ads = _adapters_for(qparams, {"kernel": adapter})
    with pytest.raises(ValueError, match=rf"'kernel' was quantized with layout '{stored}' "
                                         rf".* here is '{adapter}' .* layout='{adapter}'"):
        jlora.lora(lambda p, x: x @ Q.dequantize(p["kernel"])[0])(qparams, ads, jnp.ones((2, D)))


# -- merging into a quantized base --------------------------------------------------------


@pytest.mark.parametrize("mix", MIXES)
def test_merge_into_quantized_base(quantized, mix):
    qparams = quantized[mix]
    ads = _adapters(qparams)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        merged = Q.merge_quantized(qparams, ads)
    for path, leaf in jlora.select(qparams, ".*").items():
        want = _np_dequant(leaf) + np.asarray(ads[path].delta())
        np.testing.assert_allclose(jlora.select(merged, ".*")[path], want,
                                   rtol=1e-6, atol=1e-6)
    first = jlora.select(qparams, ".*")[next(iter(ads))].scheme
    with pytest.warns(Q.QuantizationWarning, match=rf"Requantizing 4 merged .*{first}"):
        requant = Q.merge_quantized(qparams, ads, requantize=True)
    for path, leaf in jlora.select(requant, ".*").items():
        old = jlora.select(qparams, ".*")[path]
        assert Q.is_quantized(leaf) and leaf.statics() == old.statics()
        assert leaf.double_quant == old.double_quant
        redo = Q.quantize(jlora.select(merged, ".*")[path], old.scheme,
                          layout=old.kernel_layout, double_quant=old.double_quant)
        np.testing.assert_array_equal(leaf.values, redo.values)



def test_merge_is_a_deprecated_alias_of_merge_quantized(quantized):
    qparams = quantized["mix-c"]
    ads = _adapters(qparams)
    with pytest.warns(DeprecationWarning, match=r"use `jlora.quantization.merge_quantized`"):
        old = Q.merge(qparams, ads)
    for got, want in zip(jax.tree.leaves(old), jax.tree.leaves(Q.merge_quantized(qparams, ads)),
                         strict=True):
        np.testing.assert_array_equal(got, want)

def test_summary_counts_a_quantized_kernel_as_its_float_kernel():
    w = jax.random.normal(jax.random.key(0), (128, 64))
    params = {"d": {"kernel": Q.quantize(w, "nf4")}}
    adapters = jlora.init(jax.random.key(0), params, jlora.LoraConfig(rank=4))
    trainable = 4 * (128 + 64)
    assert jlora.summary(params, adapters).splitlines()[-1].startswith(
        f"trainable params: {trainable:,} || all params: {128 * 64 + trainable:,} ||")


def test_dora_on_a_quantized_stack_equals_merge_with_grads(quantized):
    # The dequantize rule rebuilds the kernel's factored value from its parts: DoRA's
    # per-output factor and its way of combining outputs must survive it, through scans,
    # loops and einsums, for values and gradients (tests/test_variants.py has the eager
    # single-kernel case).
    qparams = quantized["mix-a"]
    ads = jlora.init(jax.random.key(3), qparams,
                     jlora.LoraConfig(rank=2, alpha=4.0, layouts=LAYOUTS, variant="dora"))
    ads = {p: a.replace(b=jax.random.normal(jax.random.key(9), a.b.shape) * 0.3,
                        magnitude=a.magnitude * 1.5) for p, a in ads.items()}
    x = jnp.asarray(_normal(11, (4, D)))
    g = jlora.lora(_model)
    loss = lambda f: (lambda a: (f(a) ** 2).sum())
    y, ga = jax.jit(jax.value_and_grad(loss(lambda a: g(qparams, a, x))))(ads)
    ry, ra = jax.jit(jax.value_and_grad(loss(lambda a: _model(jlora.merge(qparams, a), x))))(ads)
    np.testing.assert_allclose(y, ry, rtol=1e-5)
    for got, want in zip(jax.tree.leaves(ga), jax.tree.leaves(ra), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * float(jnp.abs(want).max()))
    # The magnitude matters: a plain-LoRA combine would give another value.
    lora_only = {p: a.replace(variant="lora", magnitude=None) for p, a in ads.items()}
    assert abs(float(loss(lambda a: g(qparams, a, x))(lora_only)) - float(y)) > 1e-2 * abs(float(y))
