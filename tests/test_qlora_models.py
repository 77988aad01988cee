"""QLoRA on unchanged model code: ``jlora.lora(fn)(qparams, adapters, *args)`` where
``fn`` reads every kernel as an array (linen ``Dense``, ``DenseGeneral`` and ``Embed``
under ``nn.scan``, a ``FlaxConv1D``-style transposed kernel, tied logits; with the models
extra, transformers' Flax Llama and GPT-2, Tunix's NNX Llama 3 and the gemma- and
MaxText-like models of ``tests/models``), checked against
``fn(jlora.merge(Q.dequantize_params(qparams), adapters), *args)`` for values and for
gradients w.r.t. the adapters and the inputs."""

import functools
import re
import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_real_models import CASES, _jit, _next_token_loss

import jlora
from jlora import _jax_compat as jc
from jlora import quantization as Q

# Distinct sizes, so that a shape tells which array it is.
B, D, F, V, L, HEADS, HEAD_DIM = 4, 24, 20, 40, 3, 4, 6
SCHEMES = {"int8": ("int8", False), "nf4-dq": ("nf4", True)}
# nn.scan's params axis: 0 stacks the layers first ("sio"), 1 second as MaxText ("isoo").
STACKED = {0: {"layers/up/kernel": "sio", "layers/query/kernel": "sioo"},
           1: {"layers/up/kernel": "iso", "layers/query/kernel": "isoo"}}
ADAPTED = r"layers/up/kernel|proj|embed/embedding"  # the rest of the base stays frozen


class Block(nn.Module):
    @nn.compact
    def __call__(self, h, _):
        u = jnp.tanh(nn.Dense(F, name="up")(h))
        q = nn.DenseGeneral((HEADS, HEAD_DIM), name="query")(u)
        return h + jnp.tanh(q.reshape(h.shape)), None


class Model(nn.Module):
    """Embedding, a scanned stack, a kernel stored ``(out, in)`` and read transposed (as
    transformers' ``FlaxConv1D``), logits tied to the embedding (``Embed.attend``)."""

    axis: int = 0

    @nn.compact
    def __call__(self, x, ids):
        embed = nn.Embed(V, D, name="embed")
        stack = nn.scan(Block, variable_axes={"params": self.axis},
                        split_rngs={"params": True}, length=L)
        h, _ = stack(name="layers")(x + embed(ids), None)
        proj = self.param("proj", nn.initializers.normal(0.2), (D, D))
        return embed.attend(jnp.tanh(h @ proj.T))


def _layouts(axis: int) -> dict[str, str]:
    return {**STACKED[axis], "proj": "oi", "embed/embedding": "vf"}


def _inputs():
    x = jax.random.normal(jax.random.key(1), (B, D))
    return x, jnp.array([3, 0, 39, 7])


@functools.cache
def _float_params(axis: int):
    return _jit(Model(axis).init)(jax.random.key(0), *_inputs())["params"]


@functools.cache
def _quantized(axis: int, scheme: str):
    """The whole base quantized (every kernel and the embedding), and adapters on a few."""
    name, double_quant = SCHEMES[scheme]
    qparams = Q.quantize_params(_float_params(axis), name, targets=r".*(kernel|proj|embedding)",
                                layouts=_layouts(axis), double_quant=double_quant)
    config = jlora.LoraConfig(rank=2, alpha=4.0, targets=ADAPTED, layouts=_layouts(axis))
    ads = jlora.init(jax.random.key(2), qparams, config)
    # B starts at zero; a non-zero B makes the adapter branch count.
    ads = {p: a.replace(b=0.3 * jax.random.normal(jax.random.key(3), a.b.shape))
           for p, a in ads.items()}
    return qparams, ads


def _apply(axis: int):
    return lambda p, x, ids: Model(axis).apply({"params": p}, x, ids)


def _outputs(f):
    """``(p, a, x, ids) -> ((loss, y), grads w.r.t. a and x)`` of ``y = f(p, a, x, ids)``."""

    def loss(p, a, x, ids):
        y = f(p, a, x, ids)
        return (y**2).sum(), y

    return jax.value_and_grad(loss, argnums=(1, 2), has_aux=True)


@functools.cache
def _reference(axis: int):
    """:func:`_outputs` of the model on the merged float kernels, compiled once."""
    apply = _apply(axis)
    return _jit(_outputs(lambda p, a, x, ids: apply(jlora.merge(p, a), x, ids)))


def _whole_stack_floats(fn, *args) -> list:
    """Float arrays of a whole stack's shape (any axis order) in ``fn``'s program: a
    stacked kernel must be dequantized one layer at a time."""
    shapes = {(L, D, F), (L, F, HEADS, HEAD_DIM)}
    closed = jax.make_jaxpr(fn)(*args)
    return [(e.primitive.name, v.aval.shape) for e in jc.iter_eqns(closed.jaxpr)
            for v in e.outvars if jnp.issubdtype(v.aval.dtype, jnp.floating)
            and tuple(sorted(v.aval.shape)) in {tuple(sorted(s)) for s in shapes}]


def _assert_close(got, want, what):
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-4 * float(jnp.abs(w).max()),
                                   err_msg=what)


# NF4 meets both stacked layouts, int8 MaxText's; with and without jit (eager: the same
# interpretation, run op by op).
@pytest.mark.parametrize("axis, scheme, jit", [
    (0, "nf4-dq", True), (1, "int8", True), (1, "nf4-dq", False),
], ids=lambda v: {True: "jit", False: "eager"}.get(v, v) if isinstance(v, bool) else str(v))
def test_unchanged_linen_model_on_a_quantized_base_equals_merged(axis, scheme, jit):
    qparams, ads = _quantized(axis, scheme)
    x, ids = _inputs()
    g = jlora.lora(_apply(axis))
    maybe_jit = _jit if jit else (lambda f: f)
    with warnings.catch_warnings():
        warnings.simplefilter("error", jlora.FactoredFallbackWarning)
        (_, y), grads = maybe_jit(_outputs(g))(qparams, ads, x, ids)
    (_, want_y), want_grads = _reference(axis)(Q.dequantize_params(qparams), ads, x, ids)
    np.testing.assert_allclose(y, want_y, rtol=1e-5, atol=1e-5)
    _assert_close(grads, want_grads, "gradients w.r.t. the adapters and x")
    assert all(float(jnp.abs(gr.a).max()) > 0 for gr in grads[0].values())
    if jit:  # the program is the same in both variants: inspect it once
        assert jlora.lora_report(_apply(axis), qparams, ads, x, ids) == dict.fromkeys(
            ads, "factored")
        assert _whole_stack_floats(_outputs(g), qparams, ads, x, ids) == []


def test_plain_call_runs_the_quantized_model():
    """``jlora.lora(fn)(qparams, {}, ...)``: how a quantized model runs."""
    qparams, _ = _quantized(1, "nf4-dq")
    x, ids = _inputs()
    with warnings.catch_warnings():
        warnings.simplefilter("error", jlora.FactoredFallbackWarning)
        y = _jit(jlora.lora(_apply(1)))(qparams, {}, x, ids)
    want = _jit(_apply(1))(Q.dequantize_params(qparams), x, ids)
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)


def _norm_read(p, x):  # the kernel read as an array by a reduction, not by a consumer
    return jnp.tanh(x @ p["w"]) * jnp.linalg.norm(p["w"])


def _moved_then_scanned(p, x):  # a move of the layer's own axes before a scan
    return jax.lax.scan(lambda h, w: (jnp.tanh(h @ w.T), None), x, jnp.swapaxes(p["w"], 1, 2))[0]


@pytest.mark.parametrize("fn, adapted, status", [
    (_norm_read, True, r"materialised: the kernel reaches `\w+`"),
    (_norm_read, False, r"materialised: the kernel reaches `\w+`"),
    (_moved_then_scanned, False, r"materialised: the kernel reaches `scan`"),
], ids=["norm-adapted", "norm", "moved-then-scanned"])
def test_a_kernel_read_as_an_array_is_dequantized_there_and_reported(fn, adapted, status):
    qparams = {"w": Q.quantize(jax.random.normal(jax.random.key(4), (L, D, D)) * 0.2, "nf4",
                               layout="sio")}
    ads = {}
    if adapted:
        ads = jlora.init(jax.random.key(5), qparams,
                         jlora.LoraConfig(rank=2, targets="w", layouts={"w": "sio"}))
        ads = {p: a.replace(b=jnp.full(a.b.shape, 0.1)) for p, a in ads.items()}
    x = jax.random.normal(jax.random.key(6), (B, D))
    kind = "adapted" if adapted else "quantized"
    with pytest.warns(jlora.FactoredFallbackWarning,
                      match=rf"the {kind} kernel at path 'w' is {status}"):
        y = _jit(jlora.lora(fn))(qparams, ads, x)
    np.testing.assert_allclose(y, fn(jlora.merge(Q.dequantize_params(qparams), ads), x),
                               rtol=1e-5, atol=1e-5)
    if adapted:
        assert re.match(status, jlora.lora_report(fn, qparams, ads, x)["w"])


def test_collect_inputs_on_a_quantized_base():
    """The rows reaching each kernel are those of the model on the dequantized kernels;
    a quantized kernel's layout is the one it was quantized with."""
    qparams, _ = _quantized(1, "nf4-dq")
    x, ids = _inputs()
    paths = ["layers/up/kernel", "layers/query/kernel", "proj"]
    got = jlora.collect_inputs(_apply(1), qparams, paths, x, ids)
    want = jlora.collect_inputs(_apply(1), Q.dequantize_params(qparams),
                                {p: _layouts(1)[p] for p in paths}, x, ids)
    assert got["layers/query/kernel"].shape == (L, B, F)
    for path in paths:
        np.testing.assert_allclose(got[path], want[path], rtol=1e-5, atol=1e-5, err_msg=path)


def test_several_adapters_per_example_on_a_quantized_base():
    qparams, ads = _quantized(1, "int8")
    other = {p: a.replace(a=-a.a) for p, a in ads.items()}
    bank = jlora.multi_adapter.stack_adapters({"one": ads, "two": other})
    x, ids = _inputs()
    sets = jnp.array([1, 0, 0, 1])
    y = _jit(jlora.multi_adapter.per_example(_apply(1)))(qparams, bank, sets, x, ids)
    floats = Q.dequantize_params(qparams)
    apply = _jit(_apply(1))
    for k, s in enumerate(sets.tolist()):
        want = apply(jlora.merge(floats, bank.select(s)), x[k:k + 1], ids[k:k + 1])
        np.testing.assert_allclose(y[k:k + 1], want, rtol=1e-5, atol=1e-5, err_msg=str(k))


def test_a_model_error_is_the_float_models_with_a_note():
    qparams = {"w": Q.quantize(jnp.ones((D, F)), "nf4")}
    with pytest.raises(TypeError, match="contracting dimensions") as info:
        jlora.lora(lambda p, x: x @ p["w"])(qparams, {}, jnp.ones((B, F)))
    assert "again on the QuantizedKernel objects themselves" in "".join(info.value.__notes__)


# -- real model code (the models extra: pip install -e '.[models]') ----------------------

# The scheme of each model's base, so that int8 and NF4 with and without double
# quantization each meet real model code.
REAL_MODELS = {"hf_llama": ("nf4", True), "hf_gpt2": ("int8", False), "gemma": ("int8", False),
               "maxtext": ("nf4", False), "tunix_llama3": ("nf4", True)}


@pytest.mark.real_models
# Tunix 0.1.7 still uses APIs that flax 0.12 and jax 0.8 deprecate
@pytest.mark.filterwarnings("ignore:'.value' access is now deprecated:DeprecationWarning")
@pytest.mark.filterwarnings("ignore:'sharding' is deprecated:DeprecationWarning")
@pytest.mark.filterwarnings("ignore:jax.interpreters.pxla.thread_resources:DeprecationWarning")
@pytest.mark.parametrize("name", REAL_MODELS)
def test_real_model_code_on_a_quantized_base(name):
    """Every kernel and embedding quantized (layouts read by ``jlora.infer_layouts``),
    adapters on three of them; the jitted next-token loss, its adapter gradients and the
    plain call without adapters equal the model's on the dequantized kernels."""
    pytest.importorskip("transformers")  # with the models extra, as the real-model suite
    case = CASES[name]()
    layouts = dict(jlora.infer_layouts(case.fn, case.params, case.tokens))
    scheme, double_quant = REAL_MODELS[name]
    every = "|".join(map(re.escape, layouts))
    qparams = Q.quantize_params(case.params, scheme, targets=every, layouts=layouts,
                                double_quant=double_quant)
    quantized = jlora.select(qparams, every)
    assert all(map(Q.is_quantized, quantized.values()))
    assert set(jlora.select(case.params, case.targets)) <= set(quantized)
    adapted = sorted(jlora.select(case.params, case.targets))[:3]
    config = jlora.LoraConfig(rank=2, alpha=4.0, targets="|".join(map(re.escape, adapted)),
                              layouts=layouts)
    ads = jlora.init(jax.random.key(1), qparams, config)
    # A random B (a constant one gets no gradient through a softmax's logits).
    ads = {p: a.replace(b=0.1 * jax.random.normal(jax.random.key(2), a.b.shape))
           for p, a in ads.items()}

    def loss(f):
        return jax.value_and_grad(lambda a, p, t: _next_token_loss(f(p, a, t), t))

    merged = lambda p, a, t: case.fn(jlora.merge(p, a), t)  # noqa: E731
    floats = Q.dequantize_params(qparams)
    with warnings.catch_warnings():
        warnings.simplefilter("error", jlora.FactoredFallbackWarning)
        got = _jit(loss(jlora.lora(case.fn)))(ads, qparams, case.tokens)
        plain = _jit(jlora.lora(case.fn))(qparams, {}, case.tokens)
    want = _jit(loss(merged))(ads, floats, case.tokens)
    _assert_close(got, want, "loss and adapter gradients")
    np.testing.assert_allclose(plain, _jit(case.fn)(floats, case.tokens), rtol=2e-5,
                               atol=2e-5)
    assert jlora.lora_report(case.fn, qparams, ads, case.tokens) == dict.fromkeys(
        ads, "factored")
