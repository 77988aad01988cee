"""`jlora.nnx` on Tunix's Llama 3 (NNX), trained by Tunix's own `PeftTrainer`, unchanged.

Tunix's trainer finds LoRA through `nnx.LoRAParam` (`nnx.Optimizer(model, tx,
wrt=nnx.LoRAParam)`, `nnx.value_and_grad(..., argnums=nnx.DiffState(0, nnx.LoRAParam))`
under `nnx.jit`), so a model adapted by `jlora.nnx` (`apply_lora`, or `put_adapters` of
`init_adapters`' adapters, which is what it does) trains with it as it is: the loss goes
down, only the factors move, and the trained adapters export to PEFT under Hugging Face's
module names. A plain `nnx.Optimizer` loop on the same model checks the logits and
gradients against the merged model's. The adapters' values come from numpy (the
initialisers would compile once per factor shape), B zero for training from the start.

Needs the `models` extra (`pip install -e '.[models]'`); skipped without Tunix.
"""

from __future__ import annotations

import json

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from test_nnx import adapt, assert_same_grads, grads_by_kernel, jit_tiny

import jlora

pytestmark = [
    pytest.mark.real_models,
    # Tunix 0.1.7 still uses the flax NNX API that flax 0.12 deprecates
    pytest.mark.filterwarnings("ignore:'.value' access is now deprecated:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:'sharding' is deprecated:DeprecationWarning"),
    pytest.mark.filterwarnings("error::jlora.FactoredFallbackWarning"),
]

TARGETS = r"layers/\d+/(attn/(q|k|v|o)_proj/w|mlp/(gate|up|down)_proj/kernel)"
B, L, VOCAB = 4, 12, 64
TOKENS = jax.device_put(((np.arange(B)[:, None] * 3 + np.arange(L)[None] * 5) % VOCAB).astype(
    np.int32))
F32_TOL = dict(rtol=2e-5, atol=2e-5)


def hf_name(path: str) -> str:
    """Hugging Face's Llama module name of a Tunix kernel path."""
    module = path.rsplit("/", 1)[0].replace("/attn/", "/self_attn/")
    return "model." + module.replace("/", ".")


@pytest.fixture(scope="module", autouse=True)
def variables_without_a_mesh():
    """Tunix's models carry mesh axis names and are built here without a mesh, which
    needs flax's `always_shard_variable` off. Importing tunix turns it off, but only on
    the first import in a process (another test module may have imported it and turned
    the flag back on), so this module sets it itself and restores it afterwards."""
    with flax.config.temp_flip_flag("always_shard_variable", False):
        yield


@pytest.fixture(scope="module")
def llama():
    """``(base model, inputs)``: a tiny Tunix Llama 3 with random weights (Tunix
    initialises its MLP kernels to zero, which would hide an adapter's effect there)."""
    llama3 = pytest.importorskip("tunix.models.llama3.model")
    sft_utils = pytest.importorskip("tunix.sft.utils")
    config = llama3.ModelConfig(num_layers=1, vocab_size=VOCAB, embed_dim=16, hidden_dim=32,
                                num_heads=2, head_dim=8, num_kv_heads=1, rope_theta=10000,
                                norm_eps=1e-5)
    # Built on shapes only (its initialisers would compile): it holds Params alone.
    with jax.numpy_rank_promotion("allow"):
        model = nnx.eval_shape(lambda: llama3.Llama3(config, rngs=nnx.Rngs(params=0)))
    assert not nnx.state(model, nnx.Not(nnx.Param))
    rng = np.random.default_rng(0)
    nnx.update(model, jax.tree.map(
        lambda x: jax.device_put(np.asarray(0.2 * rng.standard_normal(x.shape), x.dtype)),
        nnx.state(model, nnx.Param)))
    mask = jnp.ones((B, L), bool)
    inputs = dict(input_tokens=TOKENS, input_mask=mask,
                  positions=sft_utils.build_positions_from_mask(mask),
                  attention_mask=sft_utils.make_causal_attn_mask(mask))
    return model, inputs


def config_of(rank: int) -> jlora.LoraConfig:
    return jlora.LoraConfig(rank=rank, alpha=float(rank), scaling="rslora", targets=TARGETS)


def logits_of(model, inputs):
    logits, _ = model(inputs["input_tokens"], inputs["positions"], None,
                      inputs["attention_mask"])
    return logits


def next_token_loss(model, inputs):
    """``(loss, logits)``."""
    logits = logits_of(model, inputs)
    targets = inputs["input_tokens"][:, 1:]
    return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], targets).mean(), logits


def test_peft_trainer_trains_the_adapted_model_and_it_exports_to_peft(llama, tmp_path):
    peft_trainer = pytest.importorskip("tunix.sft.peft_trainer")
    sft_utils = pytest.importorskip("tunix.sft.utils")
    base, inputs = llama
    model = nnx.clone(base)
    with jax.numpy_rank_promotion("allow"):
        adapt(model, config_of(4), scale=0.3, zero_b=True)  # as apply_lora leaves it
    assert sft_utils.is_lora_enabled(model)
    layouts = {p: ad.layout.axes for p, ad in jlora.nnx.get_adapters(model).items()
               if p.startswith("layers/0/")}
    assert layouts == {"layers/0/attn/q_proj/w": "ioo", "layers/0/attn/k_proj/w": "ioo",
                       "layers/0/attn/v_proj/w": "ioo", "layers/0/attn/o_proj/w": "iio",
                       "layers/0/mlp/gate_proj/kernel": "io", "layers/0/mlp/up_proj/kernel": "io",
                       "layers/0/mlp/down_proj/kernel": "io"}
    kernel_before = model.layers[0].attn.q_proj.w.get_value()
    a_before = model.layers[0].attn.q_proj.w_lora_a.get_value()

    steps = 12
    trainer = peft_trainer.PeftTrainer(
        model, optax.adam(3e-2),
        peft_trainer.TrainingConfig(eval_every_n_steps=1000, max_steps=steps),
    ).with_gen_model_input_fn(lambda batch: batch)
    with jax.numpy_rank_promotion("allow"):
        trainer.train([inputs] * steps)
    losses = np.asarray(trainer.metrics_logger.get_metric_history("", "loss", "train"))
    assert len(losses) == steps and np.all(np.diff(losses) < 0), losses
    # Only the factors moved.
    np.testing.assert_array_equal(model.layers[0].attn.q_proj.w.get_value(), kernel_before)
    assert not np.allclose(model.layers[0].attn.q_proj.w_lora_a.get_value(), a_before)

    trained = jlora.nnx.get_adapters(model)
    out = jlora.peft.save(tmp_path / "peft", trained, names=hf_name)
    config = json.loads((out / "adapter_config.json").read_text())
    assert "model.layers.0.self_attn.q_proj" in config["target_modules"]
    assert config["r"] == 4 and config["use_rslora"] is True
    loaded = jlora.peft.load(out, nnx.state(base, nnx.Param), names=hf_name,
                             layouts={p: ad.layout for p, ad in trained.items()})
    for path, ad in trained.items():
        np.testing.assert_allclose(loaded[path].a, ad.a, **F32_TOL)
        np.testing.assert_allclose(loaded[path].b, ad.b, **F32_TOL)


def test_an_nnx_optimizer_loop_and_the_merged_model(llama):
    """The first step's loss, logits and gradients are the merged model's; the loss then
    goes down."""
    base, inputs = llama
    model = nnx.clone(base)
    with jax.numpy_rank_promotion("allow"):
        adapt(model, config_of(2), seed=1, scale=0.3)
    ads = jlora.nnx.get_adapters(model)
    merged = jlora.nnx.merge_lora(nnx.clone(model))
    graphdef, params, rest = nnx.split(base, nnx.Param, ...)

    def merged_loss(ads):
        return next_token_loss(nnx.merge(graphdef, jlora.merge(params, ads), rest), inputs)

    optimizer = nnx.Optimizer(model, optax.adam(3e-2), wrt=nnx.LoRAParam)

    @nnx.jit
    def step(model, optimizer):
        (loss, logits), grads = nnx.value_and_grad(
            next_token_loss, argnums=nnx.DiffState(0, nnx.LoRAParam), has_aux=True)(
            model, inputs)
        optimizer.update(model, grads)
        return loss, logits, grads

    with jax.numpy_rank_promotion("allow"):
        reference = jit_tiny(jax.value_and_grad(merged_loss, has_aux=True))
        (want_loss, want_logits), want = reference(ads)
        np.testing.assert_allclose(nnx.jit(logits_of)(merged, inputs), want_logits, **F32_TOL)
        loss, logits, grads = step(model, optimizer)
        np.testing.assert_allclose(logits, want_logits, **F32_TOL)
        np.testing.assert_allclose(loss, want_loss, **F32_TOL)
        # Each LoRAParam's gradient, by the kernel and factor its metadata names.
        assert len(nnx.to_flat_state(grads)) == 2 * len(want) == 14
        assert_same_grads(grads_by_kernel(grads),
                          {p: {"a": np.asarray(g.a), "b": np.asarray(g.b)}
                           for p, g in want.items()})
        losses = [float(loss)] + [float(step(model, optimizer)[0]) for _ in range(7)]
    assert np.all(np.diff(losses) < 0), losses
