"""jlora on model code as people wrote it: layouts read with ``jlora.infer_layouts``.

Each codebase stores its kernels its own way: the ``gemma`` package's einsum weights
(``tests/models/gemma_like.py``, the same parameter tree and einsum strings), a
MaxText-style stack scanned with the layer axis second (``tests/models/maxtext_like.py``),
Tunix's NNX Llama 3 and transformers' Flax GPT-2 (``FlaxConv1D``, ``(out, in)``) and
Llama. For each, at a tiny size:

* ``infer_layouts`` gives every targeted kernel the layout its shape and use imply;
* ``lora(f)(params, adapters, x) == f(merge(params, adapters), x)`` for the logits and
  for the adapters' gradients, under ``jit`` (and outside it on MaxText), and no kernel
  falls back to a merged weight (``lora_report``);
* a few optax steps on the adapters lower the loss, and the adapters round-trip through
  jlora's own files;
* GPT-2: a PEFT adapter made by PyTorch, loaded with the inferred layouts, gives PEFT's
  logits.

The transformers and Tunix cases need ``pip install -e '.[models]'`` and are skipped
without it.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import warnings
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import safetensors.numpy
from flax import nnx, traverse_util
from models import gemma_like, maxtext_like

import jlora
from jlora._layout_inference import LayoutInferenceWarning

pytestmark = [
    pytest.mark.real_models,
    # Tunix 0.1.7 still uses the flax NNX API that flax 0.12 deprecates
    pytest.mark.filterwarnings("ignore:'.value' access is now deprecated:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:'sharding' is deprecated:DeprecationWarning"),
]

F32_TOL = dict(rtol=2e-5, atol=2e-5)
RANK = 2
TOKENS = np.array([[3, 5, 7, 2, 9, 11], [1, 4, 4, 8, 39, 6]], np.int32)
GPT2_FIXTURE = Path(__file__).parent / "fixtures" / "peft" / "gpt2"


@dataclasses.dataclass
class Case:
    """One model: ``fn(params, tokens) -> logits``, its parameters and what to adapt.

    ``layouts`` is the exact layout of every kernel ``targets`` matches; the tests
    check that ``infer_layouts`` reads exactly these.
    """

    fn: Callable
    params: Any
    targets: str
    layouts: dict[str, str]
    tokens: np.ndarray = dataclasses.field(default_factory=lambda: TOKENS)
    # Outside jit, jlora.lora runs the same rules as inside it (it jits its interpreter
    # itself), only entered with concrete arrays: checked, values and gradients, on one
    # model whose kernels go through every kind of move on the way to their dots
    # (MaxText: gathers, einsums with unpacked outputs, scan, remat). Each costs compiles.
    eager: bool = False


def _per_layer(num_layers: int, template: dict[str, str]) -> dict[str, str]:
    return {path.format(i): layout for i in range(num_layers) for path, layout in
            template.items()}


_RNG = np.random.default_rng(0)


def _normal(shape, scale=1.0, mean=0.0):
    """Random test data from numpy: no XLA compile per shape."""
    return jax.device_put(np.asarray(mean + scale * _RNG.standard_normal(shape), np.float32))


def _random_like(abstract) -> Any:
    """Random values for a tree of shapes, from numpy (nothing to compile): kernels
    ``N(0, 0.25^2)``, 1-D leaves (norm gains, biases) ``1 + N(0, 0.1^2)``."""

    def draw(leaf):
        if leaf.ndim >= 2:
            return _normal(leaf.shape, 0.25)
        return _normal(leaf.shape, 0.1, mean=1.0)

    return jax.tree.map(draw, abstract)


def _linen_params(module: nn.Module, tokens) -> Any:
    """Random parameters in the module's own tree (unboxed, as MaxText does with its
    logical axis names)."""
    return _random_like(nn.meta.unbox(jax.eval_shape(module.init, jax.random.key(0), tokens)))


def _allow_rank_promotion(fn):
    """``fn`` run with rank promotion allowed: model code from other libraries relies on it
    (``W * x`` with ``W (D,)``), while this suite forbids it for jlora's own code."""

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        with jax.numpy_rank_promotion("allow"):
            return fn(*args, **kwargs)

    return wrapped


def _gemma(num_kv_heads: int, num_layers: int) -> Case:
    config = gemma_like.GemmaConfig(num_kv_heads=num_kv_heads, num_layers=num_layers)
    model = gemma_like.Transformer(config)
    qkv = ({"params/layer_{}/attn/qkv_einsum/w": "soio"} if config.uses_qkv_einsum else
           {"params/layer_{}/attn/q_einsum/w": "oio", "params/layer_{}/attn/kv_einsum/w": "soio"})
    return Case(
        fn=model.apply,
        params=_linen_params(model, TOKENS),
        targets=r"params/(layer_\d+/(attn/\w+_einsum/w|mlp/(gating_einsum|linear))"
                r"|embedder/input_embedding)",
        layouts={
            "params/embedder/input_embedding": "vf",
            **_per_layer(config.num_layers, {
                **qkv,
                "params/layer_{}/attn/attn_vec_einsum/w": "iio",
                "params/layer_{}/mlp/gating_einsum": "soi",
                "params/layer_{}/mlp/linear": "io",
            }),
        },
    )


def _maxtext() -> Case:
    model = maxtext_like.Transformer(maxtext_like.MaxTextConfig())
    layers = "params/decoder/layers/"
    return Case(
        fn=model.apply,
        params=_linen_params(model, TOKENS),
        targets=r"params/.*/(kernel|embedding)",
        layouts={
            layers + "self_attention/query/kernel": "isoo",
            layers + "self_attention/key/kernel": "isoo",
            layers + "self_attention/value/kernel": "isoo",
            layers + "self_attention/out/kernel": "isio",
            layers + "mlp/wi_0/kernel": "iso",
            layers + "mlp/wi_1/kernel": "iso",
            layers + "mlp/wo/kernel": "iso",
            "params/decoder/logits_dense/kernel": "io",
            "params/token_embedder/embedding": "vf",
        },
        eager=True,
    )


def _tunix_llama3() -> Case:
    # Importing tunix turns flax's `always_shard_variable` off for the whole process, as
    # its models carry mesh axis names and are built without a mesh here: restore it for
    # the tests that follow, and turn it off only while a Tunix model is built or merged.
    always_shard = flax.config.flax_always_shard_variable
    llama3 = pytest.importorskip("tunix.models.llama3.model")
    flax.config.update("flax_always_shard_variable", always_shard)
    unsharded = functools.partial(flax.config.temp_flip_flag, "always_shard_variable", False)

    config = llama3.ModelConfig(
        num_layers=1, vocab_size=40, embed_dim=16, hidden_dim=24, num_heads=4, head_dim=6,
        num_kv_heads=2, rope_theta=10_000, norm_eps=1e-6, weight_tying=True,
    )
    with unsharded():
        graphdef, state = nnx.split(nnx.eval_shape(lambda: llama3.Llama3(config,
                                                                          rngs=nnx.Rngs(0))))
    state = _random_like(state)

    @_allow_rank_promotion
    def apply(state, tokens):
        length = tokens.shape[-1]
        positions = jnp.broadcast_to(jnp.arange(length), tokens.shape)
        mask = jnp.broadcast_to(jnp.tril(jnp.ones((length, length), bool)),
                                (tokens.shape[0], length, length))
        with unsharded():
            logits, _ = nnx.merge(graphdef, state)(tokens, positions, None, mask)
        return logits

    return Case(
        fn=apply,
        params=state,
        targets=r".*/(\w+_proj/(w|kernel)|input_embedding)",
        layouts={
            "embedder/input_embedding": "vf",
            **_per_layer(config.num_layers, {
                "layers/{}/attn/q_proj/w": "ioo",
                "layers/{}/attn/k_proj/w": "ioo",
                "layers/{}/attn/v_proj/w": "ioo",
                "layers/{}/attn/o_proj/w": "iio",
                "layers/{}/mlp/gate_proj/kernel": "io",
                "layers/{}/mlp/up_proj/kernel": "io",
                "layers/{}/mlp/down_proj/kernel": "io",
            }),
        },
    )


def _hf_call(method):
    """A transformers Flax module's ``init`` or ``apply`` as ``f(first, tokens)``, with
    the mask and positions it expects."""

    @_allow_rank_promotion
    def call(first, tokens):
        positions = jnp.broadcast_to(jnp.arange(tokens.shape[-1]), tokens.shape)
        return method(first, tokens, jnp.ones_like(tokens), positions)

    return call


def _hf_apply(module: nn.Module):
    """``fn(variables, tokens) -> logits``."""
    call = _hf_call(functools.partial(module.apply, deterministic=True))
    return lambda variables, tokens: call(variables, tokens).logits


def _hf_model(model_cls, config):
    """``(module, random variables)``."""
    # the constructor traces the model's init for its shapes
    module = _allow_rank_promotion(model_cls)(config, _do_init=False).module
    abstract = jax.eval_shape(_hf_call(module.init), jax.random.key(0), TOKENS)
    return module, _random_like(abstract)


def _gpt2_layouts(num_layers: int) -> dict[str, str]:
    return _per_layer(num_layers, {
        f"params/transformer/h/{{}}/{name}/kernel": "oi"
        for name in ("attn/c_attn", "attn/c_proj", "mlp/c_fc", "mlp/c_proj")
    })


def _hf_gpt2() -> Case:
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(vocab_size=40, n_positions=8, n_embd=16, n_layer=1,
                                     n_head=4, use_cache=False)
    module, variables = _hf_model(transformers.FlaxGPT2LMHeadModel, config)
    return Case(
        fn=_hf_apply(module),
        params=variables,
        targets=r"params/transformer/(h/\d+/\w+/c_\w+/kernel|wte/embedding)",
        layouts={"params/transformer/wte/embedding": "vf", **_gpt2_layouts(1)},
    )


def _hf_llama() -> Case:
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        vocab_size=40, hidden_size=16, intermediate_size=24, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=16,
    )
    module, variables = _hf_model(transformers.FlaxLlamaForCausalLM, config)
    return Case(
        fn=_hf_apply(module),
        params=variables,
        targets=r"params/(model/(layers/\d+/\w+/\w+_proj/kernel|embed_tokens/embedding)"
                r"|lm_head/kernel)",
        layouts={
            "params/model/embed_tokens/embedding": "vf",
            "params/lm_head/kernel": "io",
            **_per_layer(1, {
                f"params/model/layers/{{}}/{name}/kernel": "io"
                for name in ("self_attn/q_proj", "self_attn/k_proj", "self_attn/v_proj",
                             "self_attn/o_proj", "mlp/gate_proj", "mlp/up_proj",
                             "mlp/down_proj")
            }),
        },
    )


def _seeded(name: str, build: Callable[[], Case]) -> Callable[[], Case]:
    """``build`` with the random data seeded by the case's name: a case gets the same
    params and adapters whichever tests (here or in other modules) drew numbers first."""

    def seeded() -> Case:
        global _RNG
        _RNG = np.random.default_rng(zlib.crc32(name.encode()))
        return build()

    return seeded


CASES = {name: _seeded(name, build) for name, build in {
    # Two layers: every layer's kernels are read, not only the first one's. The other
    # Python-loop models get one layer, which keeps compile times short.
    "gemma": lambda: _gemma(num_kv_heads=2, num_layers=2),
    "gemma_qkv": lambda: _gemma(num_kv_heads=4, num_layers=1),
    "maxtext": _maxtext,
    "tunix_llama3": _tunix_llama3,
    "hf_gpt2": _hf_gpt2,
    "hf_llama": _hf_llama,
}.items()}


def _next_token_loss(logits, tokens):
    return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], tokens[:, 1:]).mean()


def _loss_and_grads(fn, through_lora: bool):
    """``(adapters, params, tokens) -> ((loss, logits), adapter grads)`` of the next-token
    loss, with the adapters applied by ``jlora.lora`` or by ``jlora.merge``."""

    def loss(adapters, params, tokens):
        if through_lora:
            logits = jlora.lora(fn)(params, adapters, tokens)
        else:
            logits = fn(jlora.merge(params, adapters), tokens)
        return _next_token_loss(logits, tokens), logits

    return jax.value_and_grad(loss, has_aux=True)


# The models are tiny: compiling dominates and running costs nothing, so XLA's backend
# optimisations are off (about half the compile time; the values are the same).
_jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})
OPTIMIZER = optax.adam(3e-2)


def _train_step(fn):
    """``(adapters, opt_state, params, tokens) -> (((loss, logits), grads), adapters,
    opt_state)``: one optax step on the adapters through ``jlora.lora``."""
    loss_and_grads = _loss_and_grads(fn, through_lora=True)

    def step(adapters, opt_state, params, tokens):
        out = loss_and_grads(adapters, params, tokens)
        updates, opt_state = OPTIMIZER.update(out[1], opt_state, adapters)
        return out, optax.apply_updates(adapters, updates), opt_state

    return step


def _eager_loss_and_grads(fn, adapters, params, tokens):
    """What ``_loss_and_grads(fn, through_lora=True)`` gives, with ``jlora.lora(fn)`` run
    and differentiated outside jit (``jax.vjp``) and the loss in one small jitted step
    (eagerly its every op would compile on its own)."""
    logits, backward = jax.vjp(lambda a: jlora.lora(fn)(params, a, tokens), adapters)
    loss, dlogits = _jit(jax.value_and_grad(_next_token_loss))(logits, tokens)
    (grads,) = backward(dlogits)
    return (loss, logits), grads


@dataclasses.dataclass
class Setup:
    """A case with its inferred layouts and adapters, its jitted train step and the merged
    reference values, shared by the case's tests so that each compiles once."""

    case: Case
    inferred: dict
    warnings: list[str]  # what infer_layouts warned about
    adapters: Any
    opt_state: Any  # OPTIMIZER.init(adapters), jitted (eagerly, one compile per shape)
    step: Callable  # _jit(_train_step(fn))
    reference: Any  # ((loss, logits), grads) through jlora.merge


@pytest.fixture(scope="module", params=list(CASES))
def setup(request) -> Setup:
    case = CASES[request.param]()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", LayoutInferenceWarning)
        inferred = jlora.infer_layouts(case.fn, case.params, case.tokens)
    config = jlora.LoraConfig(rank=RANK, alpha=4.0, targets=case.targets, layouts=inferred)
    # jlora.init's shapes and static data; random A and B (B starts at zero otherwise) make
    # the low-rank branch contribute to values and gradients.
    adapters = _random_like(jax.eval_shape(lambda p: jlora.init(jax.random.key(1), p, config),
                                           case.params))
    reference = _jit(_loss_and_grads(case.fn, through_lora=False))(
        adapters, case.params, case.tokens)
    read_warnings = [str(w.message) for w in caught
                     if issubclass(w.category, LayoutInferenceWarning)]
    return Setup(case, inferred, read_warnings, adapters, _jit(OPTIMIZER.init)(adapters),
                 _jit(_train_step(case.fn)), reference)


def test_infer_layouts_reads_every_targeted_kernel(setup):
    targeted = jlora.select(setup.case.params, setup.case.targets)
    assert sorted(targeted) == sorted(setup.case.layouts)
    got = {path: setup.inferred.get(path) for path in targeted}
    assert got == setup.case.layouts
    # every floating leaf with two or more axes is a kernel read, or a scale or table
    # that is only combined with activations: none is left unexplained
    assert setup.inferred.unconsumed == [] and setup.warnings == []


def _assert_trees_close(got, want, what: str):
    got_leaves = jax.tree_util.tree_leaves_with_path(got)
    want_leaves = jax.tree_util.tree_leaves(want)
    assert len(got_leaves) == len(want_leaves), what
    for (path, g), w in zip(got_leaves, want_leaves, strict=True):
        np.testing.assert_allclose(g, w, **F32_TOL,
                                   err_msg=f"{what} at {jax.tree_util.keystr(path)}")


def test_factored_logits_and_adapter_gradients_equal_merged(setup):
    params, tokens, adapters = setup.case.params, setup.case.tokens, setup.adapters
    (want_loss, want_logits), want_grads = setup.reference
    runs = {"jit": lambda: setup.step(adapters, setup.opt_state, params, tokens)[0]}
    if setup.case.eager:
        runs["eager"] = lambda: _eager_loss_and_grads(setup.case.fn, adapters, params, tokens)
    for how, run in runs.items():
        (loss, logits), grads = run()
        np.testing.assert_allclose(logits, want_logits, **F32_TOL, err_msg=f"{how} logits")
        np.testing.assert_allclose(loss, want_loss, **F32_TOL, err_msg=f"{how} loss")
        assert sorted(grads) == sorted(adapters)
        _assert_trees_close(grads, want_grads, f"{how} adapter gradient")
        # the comparison means something only if every adapter's gradient is non-zero
        assert all(np.abs(g.a).max() > 0 for g in grads.values())


def test_lora_report_keeps_every_kernel_factored(setup):
    report = jlora.lora_report(setup.case.fn, setup.case.params, setup.adapters,
                               setup.case.tokens)
    assert report == {path: "factored" for path in setup.adapters}


def test_a_few_optax_steps_lower_the_loss(setup):
    adapters, params, tokens = setup.adapters, setup.case.params, setup.case.tokens
    opt_state = setup.opt_state
    losses = []
    for _ in range(4):
        ((loss, _), _), adapters, opt_state = setup.step(adapters, opt_state, params, tokens)
        losses.append(float(loss))
    assert losses[-1] < losses[0], losses


def test_native_save_and_load_round_trip(setup, tmp_path):
    path = jlora.save(tmp_path / "adapter", setup.adapters)
    loaded = jlora.load(path, setup.case.params)
    assert sorted(loaded) == sorted(setup.adapters)
    for name, want in setup.adapters.items():
        got = loaded[name]
        assert (got.layout.axes, got.rank, got.scale, got.variant) == (
            want.layout.axes, want.rank, want.scale, want.variant), name
        np.testing.assert_array_equal(got.a, want.a, err_msg=name)
        np.testing.assert_array_equal(got.b, want.b, err_msg=name)


# ---------------------------------------------------------------------------------------
# A PEFT adapter trained in PyTorch on GPT-2, run by transformers' Flax GPT-2
# ---------------------------------------------------------------------------------------


def test_gpt2_peft_adapter_gives_pefts_logits():
    transformers = pytest.importorskip("transformers")
    meta = json.loads((GPT2_FIXTURE / "case.json").read_text())
    stored = traverse_util.unflatten_dict(
        safetensors.numpy.load_file(GPT2_FIXTURE / "flax.safetensors"), sep="/"
    )
    params, tokens = stored["base"], stored["x"]["input_ids"].astype(np.int32)
    module, _ = _hf_model(transformers.FlaxGPT2LMHeadModel,
                          transformers.GPT2Config(**meta["hf_config"]))
    apply = _hf_apply(module)
    layouts = jlora.infer_layouts(apply, params, tokens)
    assert {path: layouts.get(path) for path in meta["layouts"]} == meta["layouts"]

    adapters = jlora.peft.load(GPT2_FIXTURE / "adapter", params, layouts=layouts)
    assert sorted(adapters) == sorted(meta["layouts"])

    @_jit
    def both(params, adapters, tokens):
        return jlora.lora(apply)(params, adapters, tokens), apply(jlora.merge(params, adapters),
                                                                   tokens)

    factored, merged = both(params, adapters, tokens)
    want = stored["y"]["logits"]
    np.testing.assert_allclose(factored, want, **F32_TOL, err_msg="factored logits")
    np.testing.assert_allclose(merged, want, **F32_TOL, err_msg="merged logits")

