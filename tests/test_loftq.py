"""LoftQ (jlora.variants.loftq_init) against PEFT's own loftq_init, and its properties.

tests/fixtures/peft/loftq/ was written by scripts/make_peft_fixtures.py with PEFT 0.19.1's
loftq_utils (plain torch, its NFQuantizer: bitsandbytes' NF4 in blocks of 64 over the
flattened torch weight) and torch 2.13.0: a (32, 96) weight, rank 4, 1 and 5 iterations.
"""

import functools
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy

import jlora
from jlora import quantization as Q

FIXTURE = pathlib.Path(__file__).parent / "fixtures" / "peft" / "loftq"
CASES = json.loads((FIXTURE / "loftq.json").read_text())["cases"]
EPS = np.finfo(np.float32).eps


@pytest.fixture(scope="module")
def peft():
    return safetensors.numpy.load_file(str(FIXTURE / "loftq.safetensors"))


@functools.cache
def _jlora_loftq(case: str, alpha: float):
    """jlora's LoftQ on the fixture's weight as a flax kernel ``(in, out)``."""
    w = safetensors.numpy.load_file(str(FIXTURE / "loftq.safetensors"))["weight"].T
    spec = CASES[case]
    config = jlora.LoraConfig(rank=spec["reduced_rank"], alpha=alpha, targets="k",
                              init="loftq")
    base, ads = jlora.variants.loftq_init(None, {"k": jnp.asarray(w)}, config,
                                          loftq_bits=spec["num_bits"],
                                          loftq_iter=spec["num_iter"])
    return base["k"], ads["k"]


def _blocks(x):
    """NF4 blocks of a torch ``(out, in)`` weight: flattened, 64 values each."""
    return np.asarray(x, np.float32).reshape(-1, 64)


def _nf4_codes(blocks, absmax):
    return np.abs(blocks[..., None] / absmax[:, None, None] - Q.NF4_CODE).argmin(-1)


# alpha 4 = rank 4: scale 1, where PEFT's adapted model Q + s·L R is its intended Q + L R.
@pytest.mark.parametrize("case", CASES)
def test_matches_peft_loftq(peft, case):
    qk, ad = _jlora_loftq(case, 4.0)
    assert qk.scheme == "nf4" and not qk.double_quant and qk.block_size == 64
    base = peft[f"{case}/base"]
    blocks = _blocks(base)
    peft_absmax = np.abs(blocks).max(-1)  # the block's extreme value decodes to ±absmax
    absmax = np.asarray(qk.stacked_first("scales"))
    codes = np.stack([np.asarray(qk.values) >> 4, np.asarray(qk.values) & 15], -1).reshape(
        absmax.shape[0], -1)
    # The same NF4 codes in every block; each block's scale is the same float, except that
    # after the first iteration W - L R is formed by torch's and XLA's float32 matmuls,
    # whose last bits differ: then the scale within 2 ulp, the base within that.
    np.testing.assert_array_equal(codes, _nf4_codes(blocks, peft_absmax))
    deq = np.asarray(Q.dequantize(qk)).T
    if CASES[case]["num_iter"] == 1:
        np.testing.assert_array_equal(absmax, peft_absmax)
        np.testing.assert_array_equal(deq, base)
    else:
        np.testing.assert_allclose(absmax, peft_absmax, rtol=float(2 * EPS), atol=0)
        np.testing.assert_allclose(deq, base, rtol=float(2 * EPS), atol=0)
    # PEFT's L R = lora_B @ lora_A, to float32 SVD accuracy; the factors too, up to each
    # singular vector's sign (PEFT's A is sqrt(S) Vh, ours A·sqrt(s) in (in, r)).
    lr = peft[f"{case}/lora_B"] @ peft[f"{case}/lora_A"]
    np.testing.assert_allclose(np.asarray(ad.delta()).T, lr, rtol=0,
                               atol=1e-5 * np.abs(lr).max())
    for ours, theirs in ((np.asarray(ad.a) * np.sqrt(ad.scale), peft[f"{case}/lora_A"].T),
                         (np.asarray(ad.b).T * np.sqrt(ad.scale), peft[f"{case}/lora_B"])):
        sign = np.sign((ours * theirs).sum(0))
        np.testing.assert_allclose(ours * sign, theirs, rtol=0, atol=1e-5 * np.abs(theirs).max())


def test_scale_does_not_change_the_result(peft):
    """Factors divided by sqrt(s): under any alpha s·A@B is the SVD part (PEFT's factors
    are not, so its adapted model is Q + s·L R)."""
    qk1, ad1 = _jlora_loftq("bits4_iter1", 4.0)
    qk2, ad2 = _jlora_loftq("bits4_iter1", 8.0)
    assert ad2.scale == 2.0 * ad1.scale
    np.testing.assert_array_equal(qk2.values, qk1.values)
    np.testing.assert_allclose(ad2.delta(), ad1.delta(), rtol=0,
                               atol=1e-6 * float(jnp.abs(ad1.delta()).max()))


def test_loftq_starts_closer_to_w_than_qlora(peft):
    """‖W - (Q + s·A@B)‖ below plain NF4 with a zero-B adapter (QLoRA), and lower with more
    iterations, though each iteration's base alone moves away from W."""
    w = peft["weight"].T
    err = lambda v: float(np.linalg.norm(np.asarray(v) - w) / np.linalg.norm(w))
    qlora = err(Q.dequantize(Q.quantize(jnp.asarray(w), "nf4")))
    got = {}
    for case in CASES:
        qk, ad = _jlora_loftq(case, 4.0)
        got[case] = err(Q.dequantize(qk) + ad.delta())
        assert err(Q.dequantize(qk)) >= qlora  # the base alone is no better than NF4's
    assert got["bits4_iter5"] < got["bits4_iter1"] < 0.9 * qlora


def test_stacked_kernel_in_any_order_is_loftq_per_layer():
    """An "isoo" stack (layers second) with int4 groups: each layer's base and factors are
    LoftQ on that layer alone, as an "io" kernel."""
    w = jax.random.normal(jax.random.key(0), (64, 2, 3, 4))
    config = jlora.LoraConfig(rank=2, alpha=3.0, targets="k", init="loftq",
                              layouts={"k": "isoo"})
    base, ads = jlora.variants.loftq_init(None, {"k": w}, config, scheme="int4",
                                          block_size=32)
    qk, ad = base["k"], ads["k"]
    assert qk.scheme == "int4" and qk.kernel_layout == jlora.Layout("isoo")
    assert ad.a.shape == (2, 64, 2) and ad.b.shape == (2, 2, 3, 4)
    layer = jnp.reshape(w[:, 1], (64, 12))
    one = jlora.LoraConfig(rank=2, alpha=3.0, targets="k", init="loftq")
    base1, ads1 = jlora.variants.loftq_init(None, {"k": layer}, one, scheme="int4",
                                            block_size=32)
    np.testing.assert_array_equal(Q.dequantize(qk)[:, 1].reshape(64, 12),
                                  Q.dequantize(base1["k"]))
    np.testing.assert_allclose(ad.delta()[:, 1].reshape(64, 12), ads1["k"].delta(),
                               rtol=1e-5, atol=1e-6)
    plain = Q.dequantize(Q.quantize(w, "int4", layout="isoo", block_size=32))
    assert jnp.linalg.norm(Q.dequantize(qk) + ad.delta() - w) < jnp.linalg.norm(plain - w)


def test_int8_bits_dora_and_the_transform():
    """loftq_bits=8 is int8 per output channel (PEFT: bitsandbytes' Int8Params); DoRA's
    magnitude is ‖Q + s·A@B‖, so the DoRA model starts at Q + s·A@B; jlora.lora runs on
    the new base as on any quantized kernel."""
    w = jax.random.normal(jax.random.key(1), (24, 16))
    config = jlora.LoraConfig(rank=3, targets="k", init="loftq", variant="dora")
    base, ads = jlora.variants.loftq_init(None, {"k": w}, config, loftq_bits=8)
    qk, ad = base["k"], ads["k"]
    assert qk.scheme == "int8" and qk.dtype == w.dtype
    start = Q.dequantize(qk) + ad.delta()
    assert ad.magnitude is not None
    np.testing.assert_allclose(ad.magnitude, jnp.linalg.norm(start, axis=0), rtol=1e-6)
    np.testing.assert_allclose(jlora.merge(base, ads)["k"], start, rtol=1e-5, atol=1e-6)
    x = jax.random.normal(jax.random.key(2), (2, 24))
    y = jlora.lora(lambda p, x: x @ Q.dequantize(p["k"]))(base, ads, x)
    np.testing.assert_allclose(y, x @ start, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(loftq_bits=2), ValueError, r"`loftq_bits` must be one of \[4, 8\]"),
    (dict(loftq_bits=4, scheme="fp8"), ValueError, r"`loftq_bits=4` contradicts `scheme='fp8'`"),
    (dict(loftq_iter=0), ValueError, "`loftq_iter` must be an int >= 1"),
    (dict(scheme="int3"), ValueError, "`scheme` must be one of"),
])
def test_bad_options(kwargs, error, match):
    config = jlora.LoraConfig(rank=2, targets="k", init="loftq")
    with pytest.raises(error, match=match):
        jlora.variants.loftq_init(None, {"k": jnp.ones((8, 4))}, config, **kwargs)


def test_wrong_config_or_params():
    params = {"k": jnp.ones((8, 4))}
    with pytest.raises(ValueError, match=r"`init='loftq'` changes the frozen base .* "
                                         r"jlora.variants.loftq_init\(key, params, config\)"):
        jlora.init(jax.random.key(0), params, jlora.LoraConfig(rank=2, targets="k",
                                                               init="loftq"))
    with pytest.raises(ValueError, match="expected init='loftq'"):
        jlora.variants.loftq_init(None, params, jlora.LoraConfig(rank=2, init="pissa"))
    quantized = {"k": Q.quantize(params["k"], "int8")}
    with pytest.raises(ValueError, match=r"path 'k' is already quantized \(int8\)"):
        jlora.variants.loftq_init(None, quantized, jlora.LoraConfig(rank=2, targets="k"))
