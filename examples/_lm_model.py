"""A small decoder-only byte-level transformer in flax linen, its layers under ``nn.scan``.

Scanning stacks each layer's parameters along a leading axis: the query kernel of all
layers is one array ``(n_layers, d_model, d_model)``. jlora is told so with the layout
``"s..."`` (one stacked axis, the rest inferred), and gives every layer its own
low-rank factors ``A: (n_layers, d_in, r)``, ``B: (n_layers, r, d_out)``.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

# The kernels LoRA adapts: attention projections and the MLP, in every (scanned) layer.
LORA_TARGETS = r"layers/(query|key|value|out|mlp_in|mlp_out)/kernel"
LORA_LAYOUTS = {r"layers/.*": "s..."}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    vocab: int = 256
    d_model: int = 128
    n_heads: int = 4
    n_layers: int = 4
    d_ff: int = 512
    seq_len: int = 128


class Block(nn.Module):
    """Pre-norm attention + MLP. ``(x, None) -> (x, None)``, the carry shape ``nn.scan`` wants."""

    config: ModelConfig

    @nn.compact
    def __call__(self, x, _):
        c = self.config
        batch, length, _ = x.shape
        heads = lambda t: t.reshape(batch, length, c.n_heads, c.d_model // c.n_heads)
        h = nn.LayerNorm(name="ln_attn")(x)
        q = heads(nn.Dense(c.d_model, use_bias=False, name="query")(h))
        k = heads(nn.Dense(c.d_model, use_bias=False, name="key")(h))
        v = heads(nn.Dense(c.d_model, use_bias=False, name="value")(h))
        causal = jnp.tril(jnp.ones((length, length), bool))
        attn = jax.nn.dot_product_attention(q, k, v, mask=causal[None, None])
        x = x + nn.Dense(c.d_model, use_bias=False, name="out")(attn.reshape(x.shape))
        h = nn.LayerNorm(name="ln_mlp")(x)
        h = nn.gelu(nn.Dense(c.d_ff, name="mlp_in")(h))
        return x + nn.Dense(c.d_model, name="mlp_out")(h), None


class TransformerLM(nn.Module):
    config: ModelConfig

    @nn.compact
    def __call__(self, tokens):
        c = self.config
        x = nn.Embed(c.vocab, c.d_model, name="embed")(tokens)
        pos = self.param("pos", nn.initializers.normal(0.02), (c.seq_len, c.d_model))
        x = x + pos[: tokens.shape[1]]
        layers = nn.scan(
            Block, variable_axes={"params": 0}, split_rngs={"params": True},
            length=c.n_layers,
        )
        x, _ = layers(c, name="layers")(x, None)
        return nn.Dense(c.vocab, name="head")(nn.LayerNorm(name="ln_final")(x))


def init_params(config: ModelConfig, seed: int = 0):
    model = TransformerLM(config)
    tokens = jnp.zeros((1, config.seq_len), jnp.int32)
    # One compiled call, not one dispatch per parameter initializer.
    return jax.jit(model.init)(jax.random.key(seed), tokens)["params"]


def make_loss(config: ModelConfig):
    """``loss(params, windows)``: mean next-byte cross-entropy (nats) of ``(B, seq_len+1)``."""
    model = TransformerLM(config)

    def loss(params, windows):
        logits = model.apply({"params": params}, windows[:, :-1])
        return optax.softmax_cross_entropy_with_integer_labels(logits, windows[:, 1:]).mean()

    return loss
