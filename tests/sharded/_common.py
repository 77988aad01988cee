"""Shared by the sharded test scripts: a small transformer LM with logical axis names,
its data, the LoRA config and one train step. Imported only by the scripts in this
folder, which run in subprocesses with several (virtual) devices.

Logical axes: ``embed`` (model width), ``heads``/``kv`` (attention), ``mlp`` (hidden),
``vocab``, ``layers`` (the stacked axis of the scanned model). ``RULES`` shard the
params fully over ``data`` (FSDP: the ``embed`` axis) and tensor-parallel over ``model``
(heads, mlp, vocab), with the stacked layer axis unsharded.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import jlora

VOCAB, EMBED, HEADS, KV, MLP, LAYERS = 32, 16, 4, 4, 32, 2
BATCH, SEQ = 4, 8
RULES = (
    ("batch", "data"),
    ("embed", "data"),
    ("heads", "model"),
    ("kv", None),
    ("mlp", "model"),
    ("vocab", "model"),
    ("layers", None),
)
LR, RATIO, STEPS = 0.05, 4.0, 3

_init = nn.initializers.normal(0.3)
_wlp = nn.with_logical_partitioning


class Block(nn.Module):
    """Causal self-attention (DenseGeneral q/k/v/out) and a ReLU MLP, with residuals."""

    @nn.compact
    def __call__(self, x, _=None):
        def qkv(name):
            return nn.DenseGeneral(
                (HEADS, KV), kernel_init=_wlp(_init, ("embed", "heads", "kv")), use_bias=False,
                name=name,
            )(x)

        q, k, v = qkv("query"), qkv("key"), qkv("value")
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(KV).astype(np.float32)
        causal = jnp.tril(jnp.ones((SEQ, SEQ), bool))
        weights = jax.nn.softmax(jnp.where(causal, logits, -1e9), axis=-1)
        o = jnp.einsum("bhqk,bkhd->bqhd", weights, v)
        x = x + nn.DenseGeneral(
            EMBED, axis=(-2, -1), kernel_init=_wlp(_init, ("heads", "kv", "embed")),
            use_bias=False, name="out",
        )(o)
        h = nn.relu(nn.Dense(
            MLP, kernel_init=_wlp(_init, ("embed", "mlp")),
            bias_init=_wlp(nn.initializers.zeros, ("mlp",)), name="up",
        )(x))
        x = x + nn.Dense(
            EMBED, kernel_init=_wlp(_init, ("mlp", "embed")),
            bias_init=_wlp(nn.initializers.zeros, ("embed",)), name="down",
        )(h)
        return x, None


class LM(nn.Module):
    scanned: bool = False

    @nn.compact
    def __call__(self, tokens):
        x = nn.Embed(VOCAB, EMBED, embedding_init=_wlp(_init, ("vocab", "embed")), name="embed")(
            tokens
        )
        if self.scanned:
            stack = nn.scan(
                Block, variable_axes={"params": 0}, split_rngs={"params": True}, length=LAYERS,
                metadata_params={nn.PARTITION_NAME: "layers"},
            )
            x, _ = stack(name="layers")(x, None)
        else:
            x, _ = Block(name="block")(x)
        return nn.Dense(VOCAB, kernel_init=_wlp(_init, ("embed", "vocab")), use_bias=False,
                        name="head")(x)


def lora_config(scanned: bool) -> jlora.LoraConfig:
    layouts = {r"layers/.*": "s..."} if scanned else {}
    return jlora.LoraConfig(
        rank=2, alpha=4.0,
        targets=r"embed/embedding|head/kernel|.*/(query|key|value|out|up|down)/kernel",
        layouts=layouts,
    )


def tokens() -> np.ndarray:
    return np.random.default_rng(0).integers(0, VOCAB, (BATCH, SEQ)).astype(np.int32)


def boxed_params(model: LM):
    """The abstract params with their logical-partitioning boxes (no arrays made)."""
    return jax.eval_shape(model.init, jax.random.key(0), tokens())["params"]


@functools.cache
def host_params(model: LM) -> dict:
    """Concrete, unboxed params as host numpy arrays (the same in every process)."""
    params = jax.jit(model.init)(jax.random.key(0), tokens())["params"]
    return jax.tree.map(np.asarray, nn.meta.unbox(params))


def optimizer() -> optax.GradientTransformation:
    # Momentum SGD keeps state to shard, and is linear in the gradients: Adam's first steps
    # (about lr * sign(g)) would turn float32 reduction-order noise in near-zero gradient
    # entries into visible differences between the sharded and the one-device run.
    return jlora.lora_plus(optax.sgd(LR, momentum=0.9), ratio=RATIO)


def make_step(model: LM):
    """One LoRA+ momentum-SGD step on the adapters and the adapted modules' biases."""
    opt = optimizer()

    def step(trainable, opt_state, frozen, toks):
        def loss_fn(trainable):
            params = jlora.merge_trainable(trainable, frozen)
            logits = model.apply({"params": params}, toks)
            return optax.softmax_cross_entropy_with_integer_labels(
                logits[:, :-1], toks[:, 1:]
            ).mean()

        loss, grads = jax.value_and_grad(loss_fn)(trainable)
        updates, opt_state = opt.update(grads, opt_state, trainable)
        return loss, optax.apply_updates(trainable, updates), opt_state

    return step


def split(params, adapters):
    return jlora.split_trainable(params, adapters, bias="lora_only")


def run_steps(step, trainable, opt_state, frozen, toks, n=STEPS):
    losses = []
    for _ in range(n):
        loss, trainable, opt_state = step(trainable, opt_state, frozen, toks)
        losses.append(loss)
    return losses, trainable
