"""A MaxText-style decoder: ``DenseGeneral`` kernels in a stack scanned with
``param_scan_axis=1``.

MaxText scans its decoder layers with ``nn.scan(..., variable_axes={"params":
cfg.param_scan_axis})`` and ``param_scan_axis`` defaults to 1, so the layer axis sits
*second* in every scanned kernel:

=======================================  ================================  ==========
parameter (under ``decoder/layers``)     shape                             layout
=======================================  ================================  ==========
``self_attention/query/kernel``          ``(embed, layers, heads, head)``  ``isoo``
``self_attention/key/kernel`` (value)    ``(embed, layers, kv, head)``     ``isoo``
``self_attention/out/kernel``            ``(heads, layers, head, embed)``  ``isio``
``mlp/wi_0/kernel`` (``wi_1``)           ``(embed, layers, mlp)``          ``iso``
``mlp/wo/kernel``                        ``(mlp, layers, embed)``          ``iso``
=======================================  ================================  ==========

plus the unscanned ``token_embedder/embedding`` ``(vocab, embed)`` and
``decoder/logits_dense/kernel`` ``(embed, vocab)``. ``DenseGeneral`` contracts the input's
``axis`` with the kernel's leading axes through ``lax.dot_general``, as MaxText's does; the
layer is rematerialised (``nn.remat``) inside the scan; parameters carry logical axis names
(``nn.with_logical_partitioning``), unboxed before use as MaxText does; the query scale
``1/sqrt(head)`` is folded into the query kernel's initialiser.

Example:
  >>> import jax, jax.numpy as jnp
  >>> model = Transformer(MaxTextConfig())
  >>> tokens = jnp.array([[3, 5, 7, 2]])
  >>> boxed = jax.eval_shape(model.init, jax.random.key(0), tokens)
  >>> params = nn.meta.unbox(boxed)["params"]
  >>> params["decoder"]["layers"]["self_attention"]["query"]["kernel"].shape
  (16, 3, 4, 6)
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from .rope import apply_rope

__all__ = ["MaxTextConfig", "Transformer"]

_MASKED = -0.7 * float(jnp.finfo(jnp.float32).max)  # MaxText's DEFAULT_MASK_VALUE


@dataclasses.dataclass(frozen=True)
class MaxTextConfig:
    """Sizes of a tiny Llama-2-style MaxText decoder; every size differs.

    Example:
      >>> MaxTextConfig().param_scan_axis
      1
    """

    vocab_size: int = 40
    emb_dim: int = 16
    num_query_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 6
    mlp_dim: int = 24
    num_decoder_layers: int = 3
    param_scan_axis: int = 1
    mlp_activations: tuple[str, ...] = ("silu", "linear")
    rope_max_timescale: int = 10_000


def _kernel_init(scale: float = 1.0):
    """MaxText's ``nd_dense_init(1.0, "fan_in", "truncated_normal")``: the fan-in is every
    contracted axis, given per call."""

    def init(key, shape, dtype, in_axis, out_axis):
        return scale * nn.initializers.variance_scaling(
            1.0, "fan_in", "truncated_normal", in_axis=in_axis, out_axis=out_axis
        )(key, shape, dtype)

    return init


class DenseGeneral(nn.Module):
    """``features`` outputs from the input axes ``axis``: kernel ``(*in, *features)``."""

    features: int | Sequence[int]
    axis: int | Sequence[int] = -1
    kernel_axes: tuple[str, ...] = ()
    init_scale: float = 1.0

    @nn.compact
    def __call__(self, inputs):
        features = tuple(self.features) if isinstance(self.features, Sequence) else (
            self.features,)
        axis = tuple(self.axis) if isinstance(self.axis, Sequence) else (self.axis,)
        axis = tuple(a % inputs.ndim for a in axis)
        kernel = self.param(
            "kernel",
            nn.with_logical_partitioning(_kernel_init(self.init_scale), self.kernel_axes),
            tuple(inputs.shape[a] for a in axis) + features,
            jnp.float32,
            tuple(range(len(axis))),
            tuple(range(len(axis), len(axis) + len(features))),
        )
        contract = tuple(range(len(axis)))
        return jax.lax.dot_general(inputs, kernel, ((axis, contract), ((), ())))


class RMSNorm(nn.Module):
    """MaxText's RMS norm: gain ``scale`` starting at one."""

    @nn.compact
    def __call__(self, x):
        scale = self.param(
            "scale", nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
            (x.shape[-1],),
        )
        normed = x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + 1e-6)
        return normed * jnp.expand_dims(scale, range(x.ndim - 1))


class Embed(nn.Module):
    num_embeddings: int
    features: int

    @nn.compact
    def __call__(self, tokens):
        embedding = self.param(
            "embedding",
            nn.with_logical_partitioning(nn.initializers.normal(1.0), ("vocab", "embed")),
            (self.num_embeddings, self.features),
        )
        return embedding[tokens]


class Attention(nn.Module):
    config: MaxTextConfig

    @nn.compact
    def __call__(self, x, positions):
        cfg = self.config
        n, k, h = cfg.num_query_heads, cfg.num_kv_heads, cfg.head_dim
        query = DenseGeneral((n, h), kernel_axes=("embed", "heads", "kv"),
                             init_scale=h**-0.5, name="query")(x)
        key = DenseGeneral((k, h), kernel_axes=("embed", "kv_heads", "kv_head_dim"),
                           name="key")(x)
        value = DenseGeneral((k, h), kernel_axes=("embed", "kv_heads", "kv_head_dim"),
                             name="value")(x)
        query = apply_rope(query, positions, cfg.rope_max_timescale)
        key = apply_rope(key, positions, cfg.rope_max_timescale)

        b, t = x.shape[:2]
        grouped = query.reshape((b, t, k, n // k, h))
        logits = jnp.einsum("btkgd,bskd->bkgts", grouped, key)
        causal = jnp.tril(jnp.ones((t, t), bool))[None, None, None]
        weights = jax.nn.softmax(jnp.where(causal, logits, _MASKED), axis=-1)
        out = jnp.einsum("bkgts,bskd->btkgd", weights, value).reshape((b, t, n, h))
        return DenseGeneral(x.shape[-1], axis=(-2, -1), kernel_axes=("heads", "kv", "embed"),
                            name="out")(out)


class MlpBlock(nn.Module):
    config: MaxTextConfig

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        activations = []
        for idx, name in enumerate(cfg.mlp_activations):
            h = DenseGeneral(cfg.mlp_dim, kernel_axes=("embed", "mlp"), name=f"wi_{idx}")(x)
            activations.append(h if name == "linear" else getattr(nn, name)(h))
        hidden = functools.reduce(jnp.multiply, activations)
        return DenseGeneral(x.shape[-1], kernel_axes=("mlp", "embed"), name="wo")(hidden)


class DecoderLayer(nn.Module):
    """Llama 2's layer; returns ``(carry, None)`` as a scanned MaxText layer does."""

    config: MaxTextConfig

    @nn.compact
    def __call__(self, inputs, positions):
        lnx = RMSNorm(name="pre_self_attention_layer_norm")(inputs)
        x = inputs + Attention(self.config, name="self_attention")(lnx, positions)
        hidden = RMSNorm(name="post_self_attention_layer_norm")(x)
        return MlpBlock(self.config, name="mlp")(hidden) + x, None


class Decoder(nn.Module):
    config: MaxTextConfig
    shared_embedding: nn.Module

    @nn.compact
    def __call__(self, tokens, positions):
        cfg = self.config
        y = self.shared_embedding(tokens)
        layer = nn.remat(DecoderLayer, prevent_cse=False)
        stack = nn.scan(
            layer,
            variable_axes={"params": cfg.param_scan_axis},
            split_rngs={"params": True},
            in_axes=(nn.broadcast,),
            length=cfg.num_decoder_layers,
            metadata_params={nn.PARTITION_NAME: "layers"},
        )
        y, _ = stack(cfg, name="layers")(y, positions)
        y = RMSNorm(name="decoder_norm")(y)
        return DenseGeneral(cfg.vocab_size, kernel_axes=("embed", "vocab"),
                            name="logits_dense")(y)


class Transformer(nn.Module):
    """Tokens ``(B, L)`` to logits ``(B, L, vocab)``, causal."""

    config: MaxTextConfig

    def setup(self):
        cfg = self.config
        self.token_embedder = Embed(cfg.vocab_size, cfg.emb_dim)
        self.decoder = Decoder(cfg, shared_embedding=self.token_embedder)

    def __call__(self, tokens):
        positions = jnp.broadcast_to(jnp.arange(tokens.shape[-1]), tokens.shape)
        return self.decoder(tokens, positions)
