"""A mixture-of-experts block trained with LoRA on every expert, side by side.

The block: a router picks the top-``k`` of ``E`` experts per token; tokens are sorted
by expert and run through each expert's MLP with ``jax.lax.ragged_dot``
(``up: (E, d_model, mlp)``, GELU, ``down: (E, mlp, d_model)``), weighted by the router
and added back to the residual stream. Adapters of rank ``r`` on every expert's up and
down kernels (``A: (E, in, r)``, ``B: (E, r, out)``, layout ``"sio"``). Every step is a
train step of the block inside a deeper model: the loss's gradient w.r.t. what it
trains *and* the block's input.

==========  =========================================================================
bound       lower bound: the frozen block's forward + backward to its input only
jlora       ``jlora.lora(block)``: ragged products with factored experts (defaults)
jlora_novjp the same, ``custom_vjp=False`` (JAX's own backward pass)
merged      ``block(jlora.merge(params, adapters))``: every expert's W + s·A·B formed
full        full fine-tuning: gradients for every kernel (router and experts)
==========  =========================================================================

FLOPs and bytes come from XLA's cost analysis, memory (temp + arguments + outputs) from
its memory analysis, wall-clock from interleaved rounds (``ratios.py``); every ratio is
to the bound of the same run. The ``check`` column compares each adapter step's loss and
gradients with the merged step's (the full step's loss with the bound's).

XLA:CPU runs ``ragged_dot`` as a dense product per expert with the other rows masked
(``E×`` the FLOPs of the grouped product, in every row alike); GPU and TPU lower it to a
grouped matmul. Ratios are comparable within a run, not across backends.

Usage::

  python benchmarks/bench_moe.py                 # the documented size on an accelerator;
                                                 # on CPU, --size small unless asked
  python benchmarks/bench_moe.py --size small    # seconds
  python benchmarks/bench_moe.py --size full --rounds 3 --steps 3
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402
import ratios  # noqa: E402

import jlora  # noqa: E402


@dataclasses.dataclass(frozen=True)
class MoeConfig:
    experts: int = 8
    top_k: int = 2
    d_model: int = 1024
    mlp: int = 2048
    tokens: int = 2048
    rank: int = 16
    alpha: float = 32.0  # alpha != rank: the scale is not 1


SIZES = {
    "full": MoeConfig(),
    "small": MoeConfig(d_model=256, mlp=512, tokens=512),
}


def moe_block(cfg: MoeConfig, params: dict, x: jax.Array) -> jax.Array:
    """``x + Σ_k router_k · expert_k(x)`` for tokens ``x: (tokens, d_model)``."""
    probs = jax.nn.softmax(x @ params["router"])
    weights, chosen = jax.lax.top_k(probs, cfg.top_k)
    weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    flat = chosen.reshape(-1)
    order = jnp.argsort(flat, stable=True)  # rows sorted by expert
    token = order // cfg.top_k
    group_sizes = jnp.bincount(flat, length=cfg.experts).astype(jnp.int32)
    h = jax.nn.gelu(jax.lax.ragged_dot(x[token], params["up"], group_sizes))
    y = jax.lax.ragged_dot(h, params["down"], group_sizes)
    y = y * weights.reshape(-1)[order][:, None]
    return x + jnp.zeros_like(x).at[token].add(y)


def loss_of(y: jax.Array, x: jax.Array) -> jax.Array:
    return 0.5 * jnp.mean(jnp.square(y - jnp.roll(x, -1, axis=0)))


def setup(cfg: MoeConfig):
    kx, kr, ku, kd, ka, kb = jax.random.split(jax.random.key(0), 6)
    e, d, f = cfg.experts, cfg.d_model, cfg.mlp
    params = {
        "router": jax.random.normal(kr, (d, e)) / d**0.5,
        "up": jax.random.normal(ku, (e, d, f)) / d**0.5,
        "down": jax.random.normal(kd, (e, f, d)) / f**0.5,
    }
    x = jax.random.normal(kx, (cfg.tokens, d))
    config = jlora.LoraConfig(rank=cfg.rank, alpha=cfg.alpha, targets="up|down",
                              layouts={"up": "sio", "down": "sio"})
    adapters = jlora.init(ka, params, config)
    keys = dict(zip(adapters, jax.random.split(kb, len(adapters)), strict=True))
    # Non-zero B: every row computes a real update and the checks compare something.
    adapters = {p: ad.replace(b=0.02 * jax.random.normal(keys[p], ad.b.shape))
                for p, ad in adapters.items()}
    return params, adapters, x


def _grads(out) -> dict:
    loss, (g_trained, g_x) = out
    res = {"loss": loss, "dx": g_x}
    for path, g in g_trained.items():
        if isinstance(g, jlora.Adapter):
            res[f"{path}/a"], res[f"{path}/b"] = g.a, g.b
    return res


def rows(cfg: MoeConfig) -> dict[str, ratios.Row]:
    params, adapters, x = setup(cfg)
    block = lambda p, x: moe_block(cfg, p, x)  # noqa: E731

    def bound(params, x):
        frozen = jax.lax.stop_gradient(params)
        loss, g_x = jax.value_and_grad(lambda x: loss_of(block(frozen, x), x))(x)
        return loss, ({}, g_x)

    def adapter_step(apply):
        def step(adapters, params, x):
            return jax.value_and_grad(lambda a, x: loss_of(apply(params, a, x), x),
                                      argnums=(0, 1))(adapters, x)
        return step

    def full(params, x):
        return jax.value_and_grad(lambda p, x: loss_of(block(p, x), x), argnums=(0, 1))(
            params, x)

    merged = adapter_step(lambda p, a, x: block(jlora.merge(p, a), x))
    return {
        "bound": ratios.Row("frozen block: fwd + bwd to its input", bound, (params, x), _grads),
        "jlora": ratios.Row("jlora.lora: factored experts (ragged)",
                            adapter_step(jlora.lora(block)), (adapters, params, x), _grads,
                            "merged"),
        "jlora_novjp": ratios.Row("jlora.lora, custom_vjp=False",
                                  adapter_step(jlora.lora(block, custom_vjp=False)),
                                  (adapters, params, x), _grads, "merged"),
        "merged": ratios.Row("W + s·A·B per expert in the step", merged,
                             (adapters, params, x), _grads),
        "full": ratios.Row("full fine-tuning", full, (params, x),
                           lambda out: {"loss": out[0]}, "bound"),
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", choices=sorted(SIZES),
                        help="default: full on an accelerator, small on CPU")
    parser.add_argument("--rounds", type=int, default=5,
                        help="interleaved timing rounds (0: XLA's figures only, no timing)")
    parser.add_argument("--steps", type=int, default=5, help="timed calls per row per round")
    args = parser.parse_args(argv)
    size = args.size or ("small" if jax.default_backend() == "cpu" else "full")
    cfg = SIZES[size]
    print(common.device_info())
    print(f"MoE block ({size}): {cfg}")
    measured = ratios.measure(rows(cfg), args.rounds, args.steps)
    print(ratios.table(measured, "bound"))


if __name__ == "__main__":
    main()
