"""Quickstart, NNX: the adapters live in the model, and NNX's own tools train them.

The NNX version of examples/quickstart.py. A "base" MLP is first fit to one random
linear map, then ``jlora.nnx.apply_lora`` puts rank-4 rsLoRA factors on its kernels as
``nnx.LoRAParam`` variables, and ``nnx.Optimizer(model, tx, wrt=nnx.LoRAParam)`` with
``nnx.value_and_grad(..., argnums=nnx.DiffState(0, nnx.LoRAParam))`` trains only them
on a second map that differs from the first by a low-rank change. Calling the model
computes ``x·W + s·((x·A)·B)`` (``jlora.lora`` underneath); the base stays frozen.
Prints the adapter table, the losses before and after, and checks that
``jlora.nnx.merge_lora`` gives a plain model with the same outputs.

  python examples/nnx_quickstart.py
"""

import argparse

import jax
import jax.numpy as jnp
import optax
from flax import nnx

import jlora


class MLP(nnx.Module):
    def __init__(self, *, rngs: nnx.Rngs):
        self.hidden = nnx.Linear(16, 64, rngs=rngs)
        self.out = nnx.Linear(64, 16, rngs=rngs)

    def __call__(self, x):
        return self.out(nnx.gelu(self.hidden(x)))


def fit(model, wrt, x, target, steps: int) -> float:
    """``steps`` Adam steps on the variables ``wrt`` selects; the last loss."""
    optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=wrt)

    @nnx.jit
    def step(model, optimizer):
        def loss(model):
            return jnp.mean((model(x) - target) ** 2)

        value, grads = nnx.value_and_grad(loss, argnums=nnx.DiffState(0, wrt))(model)
        optimizer.update(model, grads)
        return value

    for _ in range(steps):
        value = step(model, optimizer)
    return float(value)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=300, help="optimizer steps per phase")
    args = parser.parse_args(argv)

    k_data, k_shift = jax.random.split(jax.random.key(0))
    x = jax.random.normal(k_data, (512, 16))
    base_map = jax.random.normal(k_data, (16, 16)) / 4.0
    # The new task: the old map plus a rank-2 change.
    u, v = jax.random.normal(k_shift, (2, 16, 2)) / 2.0
    new_map = base_map + u @ v.T

    # 1. A quick full fit of the base model to the old task.
    model = MLP(rngs=nnx.Rngs(1))
    fit(model, nnx.Param, x, x @ base_map, args.steps)
    base_kernel = model.hidden.kernel[...]

    # 2. LoRA on both kernels, inside the model; only the LoRAParams train.
    config = jlora.LoraConfig(rank=4, alpha=4.0, scaling="rslora", targets=r".*/kernel")
    model = jlora.nnx.apply_lora(model, config, rngs=nnx.Rngs(2))
    print(jlora.nnx.summary(model), "\n")
    before = float(jnp.mean((model(x) - x @ new_map) ** 2))
    after = fit(model, nnx.LoRAParam, x, x @ new_map, args.steps)
    print(f"new-task loss of the frozen base: {before:.4f}")
    print(f"new-task loss with LoRA (rank 4): {after:.4f}  ({before / after:.0f}x lower)")
    assert bool((model.hidden.kernel[...] == base_kernel).all()), "the base must stay frozen"

    # 3. Fold the adapters in: a plain MLP again, with the same outputs.
    merged = jlora.nnx.merge_lora(nnx.clone(model))
    gap = float(jnp.abs(merged(x) - model(x)).max())
    print(f"merged model ({type(merged).__name__}, no LoRAParam left): "
          f"max difference {gap:.1e}")


if __name__ == "__main__":
    main()
