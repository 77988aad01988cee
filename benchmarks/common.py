"""Shared pieces of jlora's benchmarks: the model, XLA's cost and memory figures, timing
and the printed table.

The model is a decoder-only, pre-LayerNorm transformer written once (``block``) and
wrapped three ways: a linen module whose layers run under ``nn.scan`` (stacked params,
the main model), the same linen module with a hand-written factored dense layer, and an
NNX block built from ``nnx.LoRALinear`` for the flax anchor. All three compute the same
function of the same numbers, so every benchmark row can be checked against the others.

Nothing here asserts a timing: benchmarks print, people read.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

# The kernels that get adapters, by module name inside a block.
ADAPTED = ("query", "key", "value", "out", "up", "down")
# jlora config for the linen model: every adapted kernel is stacked by nn.scan ("sio").
TARGETS = r"layers/(query|key|value|out|up|down)/kernel"
LAYOUTS = {r"layers/.*": "s..."}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Shapes of the benchmark model and its adapters."""

    d_model: int = 1024
    heads: int = 16
    mlp: int = 4096
    layers: int = 4
    seq: int = 512
    batch: int = 4
    rank: int = 16
    # alpha != rank so the scale is not 1 and cannot be dropped by any implementation.
    alpha: float = 32.0

    @property
    def scale(self) -> float:
        return self.alpha / self.rank  # PEFT's standard scaling, as qwix uses

    def describe(self) -> str:
        return (
            f"{self.layers} pre-LN blocks under nn.scan, d_model {self.d_model}, "
            f"{self.heads} heads, MLP {self.mlp}, seq {self.seq}, batch {self.batch}; "
            f"rank {self.rank} (alpha {self.alpha:g}) on {', '.join(ADAPTED)}"
        )


FULL = ModelConfig()
SMALL = ModelConfig(d_model=64, heads=4, mlp=256, layers=2, seq=32, batch=2, rank=4, alpha=8.0)


# -- the model ------------------------------------------------------------------------


def block(cfg: ModelConfig, x: jax.Array, dense: Callable, norm: Callable) -> jax.Array:
    """One pre-LayerNorm block: causal multi-head attention, then a GELU MLP.

    ``dense(name, h, features)`` and ``norm(name, h)`` apply the named layer, so linen
    and NNX share this exact math.
    """
    b, s, d = x.shape
    hd = d // cfg.heads
    h = norm("ln_attn", x)
    q = dense("query", h, d).reshape(b, s, cfg.heads, hd)
    k = dense("key", h, d).reshape(b, s, cfg.heads, hd)
    v = dense("value", h, d).reshape(b, s, cfg.heads, hd)
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(hd)
    causal = jnp.tril(jnp.ones((s, s), dtype=bool))[None, None]
    logits = jnp.where(causal, logits, jnp.finfo(logits.dtype).min)
    weights = jax.nn.softmax(logits, axis=-1)
    attn = jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(b, s, d)
    x = x + dense("out", attn, d)
    h = norm("ln_mlp", x)
    h = jax.nn.gelu(dense("up", h, cfg.mlp))
    return x + dense("down", h, d)


def loss_of(y: jax.Array, x: jax.Array) -> jax.Array:
    """Regression of each position's output onto the next input embedding.

    (Not ``mean(y**2)``: after the final LayerNorm that is constant, with zero gradient.)
    """
    target = jnp.roll(x, -1, axis=1)
    return 0.5 * jnp.mean(jnp.square(y - target))


class FactoredDense(nn.Module):
    """The hand-written factored layer: ``x·W + b + s·((x·A)·B)``, W frozen by the caller."""

    features: int
    rank: int
    scale: float

    @nn.compact
    def __call__(self, x):
        fan_in = x.shape[-1]
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (fan_in, self.features))
        bias = self.param("bias", nn.initializers.zeros, (self.features,))
        a = self.param("lora_a", nn.initializers.he_uniform(), (fan_in, self.rank))
        b = self.param("lora_b", nn.initializers.zeros, (self.rank, self.features))
        return x @ kernel + bias + self.scale * ((x @ a) @ b)


class Block(nn.Module):
    cfg: ModelConfig
    factored: bool = False

    @nn.compact
    def __call__(self, x, _):
        cfg = self.cfg

        def dense(name, h, features):
            if self.factored:
                return FactoredDense(features, cfg.rank, cfg.scale, name=name)(h)
            return nn.Dense(features, name=name)(h)

        return block(cfg, x, dense, lambda name, h: nn.LayerNorm(name=name)(h)), None


class Transformer(nn.Module):
    """The main model: blocks under ``nn.scan`` (params stacked on a leading layer axis).

    ``unroll=True`` unrolls the scan: the same arithmetic, compiled without a loop. XLA's
    cost analysis counts a loop body once whatever its trip count, so FLOPs and bytes are
    read from the unrolled compile.
    """

    cfg: ModelConfig
    factored: bool = False
    unroll: bool = False

    @nn.compact
    def __call__(self, x):
        stack = nn.scan(
            Block,
            variable_axes={"params": 0},
            split_rngs={"params": True},
            length=self.cfg.layers,
            unroll=self.cfg.layers if self.unroll else 1,
        )
        x, _ = stack(self.cfg, self.factored, name="layers")(x, None)
        return nn.LayerNorm(name="ln_final")(x)


def inputs(cfg: ModelConfig, key: jax.Array) -> jax.Array:
    """Input embeddings ``(batch, seq, d_model)``: the model starts after the lookup."""
    return jax.random.normal(key, (cfg.batch, cfg.seq, cfg.d_model), jnp.float32)


def nnx_block_class(lora: bool = True):
    """The same block in NNX with ``nnx.LoRALinear`` layers (imported lazily).

    ``lora=False``: plain ``nnx.Linear`` layers (the frozen model, for ``jlora.lora``).
    """
    from flax import nnx

    class NnxBlock(nnx.Module):
        def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
            d, f, r = cfg.d_model, cfg.mlp, cfg.rank
            if not lora:
                def linear(i, o, **_):
                    return nnx.Linear(i, o, rngs=rngs)
            else:
                linear = nnx.LoRALinear
            self.cfg = cfg
            self.ln_attn = nnx.LayerNorm(d, rngs=rngs)
            self.ln_mlp = nnx.LayerNorm(d, rngs=rngs)
            self.query = linear(d, d, lora_rank=r, rngs=rngs)
            self.key = linear(d, d, lora_rank=r, rngs=rngs)
            self.value = linear(d, d, lora_rank=r, rngs=rngs)
            self.out = linear(d, d, lora_rank=r, rngs=rngs)
            self.up = linear(d, f, lora_rank=r, rngs=rngs)
            self.down = linear(f, d, lora_rank=r, rngs=rngs)

        def __call__(self, x):
            return block(
                self.cfg, x, lambda name, h, _: getattr(self, name)(h),
                lambda name, h: getattr(self, name)(h),
            )

    return NnxBlock


# -- XLA's figures --------------------------------------------------------------------


@dataclasses.dataclass
class Compiled:
    """A compiled step and what XLA says about it."""

    fn: Callable
    compile_s: float
    flops: float
    bytes_accessed: float
    temp_bytes: int
    argument_bytes: int
    output_bytes: int

    @property
    def total_bytes(self) -> int:
        return self.temp_bytes + self.argument_bytes + self.output_bytes


def _cost(compiled) -> dict:
    cost = compiled.cost_analysis()
    # Older jax returned a one-element list of dicts, one per device program.
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else {}
    return dict(cost or {})


def compile_step(fn: Callable, *args) -> Compiled:
    """``jax.jit(fn)`` compiled for ``args``, with its FLOPs, bytes and memory from XLA."""
    start = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    compile_s = time.perf_counter() - start
    cost = _cost(compiled)
    mem = compiled.memory_analysis()
    return Compiled(
        fn=compiled,
        compile_s=compile_s,
        flops=float(cost.get("flops", float("nan"))),
        bytes_accessed=float(cost.get("bytes accessed", float("nan"))),
        temp_bytes=int(mem.temp_size_in_bytes),
        argument_bytes=int(mem.argument_size_in_bytes),
        output_bytes=int(mem.output_size_in_bytes),
    )


# -- timing ---------------------------------------------------------------------------


def time_calls(fn: Callable, args: Sequence[Any], steps: int) -> list[float]:
    """Seconds per call of ``fn(*args)`` (results waited for), ``steps`` times."""
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return times


def median(xs: Sequence[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


# -- checks ---------------------------------------------------------------------------


def max_rel_diff(a: dict, b: dict) -> float:
    """Largest ``|x - y| / max|y|`` over the matching arrays of two flat dicts."""
    worst = 0.0
    for name, y in b.items():
        x = jnp.asarray(a[name], jnp.float32)
        y = jnp.asarray(y, jnp.float32)
        if x.shape != y.shape:
            return float("inf")
        denom = float(jnp.max(jnp.abs(y))) or 1.0
        worst = max(worst, float(jnp.max(jnp.abs(x - y))) / denom)
    return worst


# -- the table ------------------------------------------------------------------------


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A GitHub markdown table (columns padded so it also reads as plain text)."""
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    def line(r):
        return "| " + " | ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)) + " |"

    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(header), sep, *(line(r) for r in rows)])


def device_info() -> str:
    """One line naming jax, the backend and the devices, so tables say where they ran."""
    import flax

    devices = jax.devices()
    return (
        f"jax {jax.__version__}, flax {flax.__version__}, backend {jax.default_backend()}, "
        f"devices {devices}"
    )
