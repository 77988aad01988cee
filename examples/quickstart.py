"""Quickstart: adapt a small linen MLP to a new task with LoRA and optax, in seconds.

A "base" MLP is first fit to one random linear map, then frozen; LoRA factors (rank 4,
rsLoRA scaling) on its kernels are trained to fit a second map that differs from the
first by a low-rank change. Prints the adapter table and the loss before and after.

  python examples/quickstart.py
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

import jlora


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.gelu(nn.Dense(64, name="hidden")(x))
        return nn.Dense(16, name="out")(x)


def main():
    k_data, k_shift, k_model, k_lora = jax.random.split(jax.random.key(0), 4)
    x = jax.random.normal(k_data, (512, 16))
    base_map = jax.random.normal(k_data, (16, 16)) / 4.0
    # The new task: the old map plus a rank-2 change.
    u, v = jax.random.normal(k_shift, (2, 16, 2)) / 2.0
    new_map = base_map + u @ v.T

    model = MLP()
    params = model.init(k_model, x)["params"]

    def mse(p, target_map):
        return jnp.mean((model.apply({"params": p}, x) - x @ target_map) ** 2)

    # 1. A quick full fit of the base model to the old task.
    opt = optax.adam(1e-2)

    @jax.jit
    def base_step(p, state):
        loss, grads = jax.value_and_grad(mse)(p, base_map)
        updates, state = opt.update(grads, state, p)
        return optax.apply_updates(p, updates), state, loss

    state = opt.init(params)
    for _ in range(300):
        params, state, _ = base_step(params, state)

    # 2. LoRA on both kernels; the base stays frozen, only the factors train.
    config = jlora.LoraConfig(rank=4, alpha=4.0, scaling="rslora", targets=r".*/kernel")
    adapters = jlora.init(k_lora, params, config)
    print(jlora.summary(params, adapters), "\n")

    def lora_loss(ads):
        return mse(jlora.merge(params, ads), new_map)

    opt = optax.adam(1e-2)

    @jax.jit
    def lora_step(ads, state):
        loss, grads = jax.value_and_grad(lora_loss)(ads)
        updates, state = opt.update(grads, state, ads)
        return optax.apply_updates(ads, updates), state, loss

    before = float(lora_loss(adapters))
    state = opt.init(adapters)
    for _ in range(300):
        adapters, state, _ = lora_step(adapters, state)
    after = float(lora_loss(adapters))
    print(f"new-task loss of the frozen base: {before:.4f}")
    print(f"new-task loss with LoRA (rank 4): {after:.4f}  ({before / after:.0f}x lower)")


if __name__ == "__main__":
    main()
