"""A Gemma 3 decoder with the ``gemma`` package's parameter tree and einsum strings.

The ``gemma`` package (``gm.nn.Gemma3_*``) stores every projection as an einsum weight in
its own axis order, which is what makes it a test of layouts that are not ``(in, out)``:

=================================  =====================  ==============================
parameter (per ``layer_{i}``)      shape                  used as
=================================  =====================  ==============================
``attn/q_einsum/w``                ``(N, D, H)``          ``BTD,NDH->BTNH``
``attn/kv_einsum/w``               ``(2, K, D, H)``       ``BSD,CKDH->CBSKH``, unpacked
``attn/qkv_einsum/w`` (N == K)     ``(3, N, D, H)``       ``BTD,SNDH->SBTNH``, unpacked
``attn/attn_vec_einsum/w``         ``(N, H, D)``          ``BTNH,NHD->BTD``
``mlp/gating_einsum``              ``(2, F, D)``          ``...F,NHF->...NH``, split
``mlp/linear``                     ``(F, D)``             ``...H,HF->...F``
``embedder/input_embedding``       ``(V, D)``             ``table[ids]`` and ``x @ table.T``
=================================  =====================  ==============================

(``N`` query heads, ``K`` key/value heads, ``D`` model width, ``H`` head width, ``F`` MLP
width, ``V`` vocabulary). The rest follows Gemma 3 too: RMS norms with a ``1 + scale``
gain before and after attention and MLP, RMS-normed queries and keys, RoPE with a
different base on local (sliding window) and global layers, grouped-query attention,
GELU-gated MLP and logits tied to the embedding table. With the same parameters it gives
the logits of the package's own ``gm.nn.Gemma3_1B`` module (gemma 3.3.0) configured to
these sizes, to float32 precision; the package is no test dependency, as its dependencies
(kauldron) do not install with jax 0.10.

Example:
  >>> import jax, jax.numpy as jnp
  >>> model = Transformer(GemmaConfig())
  >>> tokens = jnp.array([[3, 5, 7, 2]])
  >>> params = jax.eval_shape(model.init, jax.random.key(0), tokens)["params"]
  >>> params["layer_0"]["attn"]["kv_einsum"]["w"].shape, params["layer_0"]["mlp"]["linear"].shape
  ((2, 2, 16, 6), (24, 16))
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from .rope import apply_rope

__all__ = ["GemmaConfig", "Transformer"]

_MASKED = -2.3819763e38  # the logit gemma gives masked positions
_LOCAL_ROPE_BASE = 10_000
_GLOBAL_ROPE_BASE = 1_000_000


@dataclasses.dataclass(frozen=True)
class GemmaConfig:
    """Sizes of a tiny Gemma 3. Every size differs, so a swapped axis shows as a bad shape.

    Layers alternate local (sliding window) and global attention; Gemma 3 has five local
    layers per global one, which changes nothing about the kernels.

    Example:
      >>> GemmaConfig(num_kv_heads=4).uses_qkv_einsum
      True
    """

    vocab_size: int = 40
    embed_dim: int = 16
    hidden_dim: int = 24
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 6
    num_layers: int = 2
    sliding_window: int = 3

    @property
    def uses_qkv_einsum(self) -> bool:
        """gemma fuses q, k and v into one ``(3, N, D, H)`` weight when ``N == K``."""
        return self.num_heads == self.num_kv_heads


class RMSNorm(nn.Module):
    """gemma's RMS norm: the gain is ``1 + scale`` (``scale`` starts at zero)."""

    @nn.compact
    def __call__(self, x):
        scale = self.param("scale", nn.initializers.zeros_init(), (x.shape[-1],))
        normed = x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + 1e-6)
        return normed * (1 + jnp.expand_dims(scale, range(x.ndim - 1)))


def _einsum_weight(module: nn.Module, name: str, shape) -> jax.Array:
    return module.param(name, nn.initializers.normal(), shape)


class Embedder(nn.Module):
    """The token table, scaled by ``sqrt(D)`` on the way in and tied to the logits."""

    vocab_size: int
    embed_dim: int

    def setup(self):
        self.input_embedding_table = self.param(
            "input_embedding", nn.initializers.normal(), (self.vocab_size, self.embed_dim)
        )

    def encode(self, tokens):
        x = self.input_embedding_table[(tokens,)]
        return x * jnp.sqrt(self.embed_dim).astype(x.dtype)

    def decode(self, x):
        return jnp.dot(x, self.input_embedding_table.T)


class Einsum(nn.Module):
    """A weight named ``w`` of a fixed shape, applied with the einsum string of each call."""

    shape: tuple[int, ...]

    @nn.compact
    def __call__(self, eqn: str, x):
        return jnp.einsum(eqn, x, _einsum_weight(self, "w", self.shape))


class Attention(nn.Module):
    num_heads: int
    num_kv_heads: int
    features: int
    head_dim: int
    rope_base: int

    def setup(self):
        n, k, d, h = self.num_heads, self.num_kv_heads, self.features, self.head_dim
        self.attn_vec_einsum = Einsum((n, h, d))
        if n == k:
            self.qkv_einsum = Einsum((3, n, d, h))
        else:
            self.q_einsum = Einsum((n, d, h))
            self.kv_einsum = Einsum((2, k, d, h))
        self._query_norm = RMSNorm()
        self._key_norm = RMSNorm()

    def __call__(self, x, positions, mask):
        if self.num_heads == self.num_kv_heads:
            query, key, value = self.qkv_einsum("BTD,SNDH->SBTNH", x)
        else:
            query = self.q_einsum("BTD,NDH->BTNH", x)
            key, value = self.kv_einsum("BSD,CKDH->CBSKH", x)
        query = apply_rope(self._query_norm(query), positions, self.rope_base)
        key = apply_rope(self._key_norm(key), positions, self.rope_base)
        query = query * self.head_dim**-0.5

        b, t, n, h = query.shape
        groups = n // self.num_kv_heads
        grouped = query.reshape((b, t, self.num_kv_heads, groups, h))
        logits = jnp.einsum("BTKGH,BSKH->BTKGS", grouped, key).reshape((b, t, n, -1))
        logits = jnp.where(jnp.expand_dims(mask, -2), logits, _MASKED)
        probs = jax.nn.softmax(logits, axis=-1).reshape((b, t, self.num_kv_heads, groups, -1))
        encoded = jnp.einsum("BTKGS,BSKH->BTKGH", probs, value).reshape((b, t, n, h))
        return self.attn_vec_einsum("BTNH,NHD->BTD", encoded)


class FeedForward(nn.Module):
    """Gemma 3's gated MLP: one ``(2, F, D)`` weight for gate and up, one ``(F, D)`` down."""

    features: int
    hidden_dim: int

    @nn.compact
    def __call__(self, x):
        gating = _einsum_weight(self, "gating_einsum", (2, self.hidden_dim, self.features))
        gate = jnp.einsum("...F,NHF->...NH", x, gating)
        activations = nn.gelu(gate[..., 0, :]) * gate[..., 1, :]
        linear = _einsum_weight(self, "linear", (self.hidden_dim, self.features))
        return jnp.einsum("...H,HF->...F", activations, linear)


class Block(nn.Module):
    config: GemmaConfig
    local: bool

    def setup(self):
        cfg = self.config
        self.pre_attention_norm = RMSNorm()
        self.attn = Attention(
            num_heads=cfg.num_heads, num_kv_heads=cfg.num_kv_heads, features=cfg.embed_dim,
            head_dim=cfg.head_dim,
            rope_base=_LOCAL_ROPE_BASE if self.local else _GLOBAL_ROPE_BASE,
        )
        self.post_attention_norm = RMSNorm()
        self.pre_ffw_norm = RMSNorm()
        self.mlp = FeedForward(features=cfg.embed_dim, hidden_dim=cfg.hidden_dim)
        self.post_ffw_norm = RMSNorm()

    def __call__(self, x, positions, mask):
        if self.local:
            near = jnp.abs(positions[:, :, None] - positions[:, None, :])
            mask = mask & (near < self.config.sliding_window)
        attended = self.post_attention_norm(
            self.attn(self.pre_attention_norm(x), positions, mask)
        ) + x
        return self.post_ffw_norm(self.mlp(self.pre_ffw_norm(attended))) + attended


class Transformer(nn.Module):
    """Tokens ``(B, L)`` to next-token logits ``(B, L, V)`` with a causal mask."""

    config: GemmaConfig

    def setup(self):
        cfg = self.config
        self.embedder = Embedder(vocab_size=cfg.vocab_size, embed_dim=cfg.embed_dim)
        self.blocks = [
            Block(cfg, local=i % 2 == 0, name=f"layer_{i}") for i in range(cfg.num_layers)
        ]
        self.final_norm = RMSNorm()

    def __call__(self, tokens):
        length = tokens.shape[-1]
        positions = jnp.broadcast_to(jnp.arange(length), tokens.shape)
        mask = jnp.broadcast_to(
            jnp.tril(jnp.ones((length, length), bool)), (tokens.shape[0], length, length)
        )
        x = self.embedder.encode(tokens)
        for block in self.blocks:
            x = block(x, positions, mask)
        return self.embedder.decode(self.final_norm(x))
