"""Checkpoint LoRA training with orbax, resume it, and resume it on a sharded mesh.

Adapters are plain pytrees, so orbax's ``CheckpointManager`` saves them and the optax
state unchanged. Their static fields (layout, rank, alpha, scale, ...) are not arrays;
the checkpoint keeps them as the native format's JSON (``jlora.adapter_metadata``)
beside the arrays, and ``jlora.abstract_adapters`` turns that JSON back into the
restore template, so resuming needs neither the ``LoraConfig`` nor the base params.

1. Train 2N steps without stopping (the reference).
2. Train N steps with a checkpoint every few steps, "crash", restore the latest
   checkpoint with a fresh manager and train on to 2N: identical, bit for bit.
3. Restore the same checkpoint onto a 2x4 mesh of (virtual) devices, with each factor
   sharded like the kernel it adapts (``jlora.adapter_shardings``), and train on: the
   same losses up to float32 rounding (a sharded sum adds in another order).

  python examples/checkpointing.py [--steps 20] [--workdir DIR]
"""

import os

# Eight virtual CPU devices for step 3. XLA reads this once, when jax is imported.
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    ).strip()

import argparse  # noqa: E402
import pathlib  # noqa: E402
import tempfile  # noqa: E402

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
import orbax.checkpoint as ocp  # noqa: E402
from jax.sharding import AxisType, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import jlora  # noqa: E402


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.tanh(nn.Dense(32, name="up")(x))
        return nn.Dense(8, name="down")(x)


MODEL = MLP()
CONFIG = jlora.LoraConfig(rank=4, alpha=8.0, scaling="rslora")
OPTIMIZER = optax.adam(1e-2)


def batch(step):
    """The same step always sees the same batch, so runs can be compared."""
    x = jax.random.normal(jax.random.fold_in(jax.random.key(1), step), (16, 16))
    return x, jnp.sin(2.0 * x[:, :8])


@jax.jit
def train_step(params, adapters, opt_state, x, y):
    def loss_fn(adapters):
        out = MODEL.apply({"params": jlora.merge(params, adapters)}, x)
        return jnp.mean((out - y) ** 2)

    loss, grads = jax.value_and_grad(loss_fn)(adapters)
    updates, opt_state = OPTIMIZER.update(grads, opt_state, adapters)
    return optax.apply_updates(adapters, updates), opt_state, loss


def train(params, adapters, opt_state, start, stop, manager=None, every=5, shard_batch=None):
    losses = []
    for step in range(start, stop):
        x, y = batch(step)
        if shard_batch is not None:
            x, y = shard_batch(x), shard_batch(y)
        adapters, opt_state, loss = train_step(params, adapters, opt_state, x, y)
        losses.append(float(loss))
        if manager is not None and (step + 1) % every == 0:
            save(manager, step + 1, adapters, opt_state)
    return adapters, opt_state, losses


def save(manager, step, adapters, opt_state):
    """One checkpoint: the factors, the optimizer state and the adapters' static fields."""
    manager.save(step, args=ocp.args.Composite(
        adapters=ocp.args.StandardSave(adapters),
        opt_state=ocp.args.StandardSave(opt_state),
        jlora=ocp.args.JsonSave(jlora.adapter_metadata(adapters)),
    ))


def restore(manager, step, mesh=None, kernel_specs=None):
    """``(adapters, opt_state)`` of checkpoint ``step``; on ``mesh`` if one is given.

    The template comes from the JSON stored with the checkpoint; on a mesh each factor is
    sharded like its kernel (``kernel_specs``: PartitionSpecs by params path) and Adam's
    moments like their factors (``jlora.sharding.state_shardings``).
    """
    meta = manager.restore(step, args=ocp.args.Composite(jlora=ocp.args.JsonRestore()))["jlora"]
    adapters_like = jlora.abstract_adapters(meta)
    opt_like = jax.eval_shape(OPTIMIZER.init, adapters_like)
    if mesh is not None:
        shardings = jlora.adapter_shardings(adapters_like, kernel_specs, mesh)
        adapters_like = jlora.abstract_adapters(meta, sharding=shardings)
        opt_shardings = jlora.sharding.state_shardings(opt_like, adapters_like, shardings)
        opt_like = jax.tree.map(
            lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), opt_like, opt_shardings
        )
    restored = manager.restore(step, args=ocp.args.Composite(
        adapters=ocp.args.StandardRestore(adapters_like),
        opt_state=ocp.args.StandardRestore(opt_like),
    ))
    return restored["adapters"], restored["opt_state"]


def main(steps=20, workdir=None):
    half = steps // 2
    x0, _ = batch(0)
    params = MODEL.init(jax.random.key(0), x0)["params"]
    adapters = jlora.init(jax.random.key(2), params, CONFIG)
    opt_state = OPTIMIZER.init(adapters)

    # 1. The reference run.
    _, _, reference = train(params, adapters, opt_state, 0, steps)

    # 2. Checkpoint, crash, resume.
    workdir = pathlib.Path(workdir or tempfile.mkdtemp(prefix="jlora-ckpt-"))
    options = ocp.CheckpointManagerOptions(max_to_keep=2)
    with ocp.CheckpointManager(workdir / "ckpt", options=options) as manager:
        _, _, first = train(params, adapters, opt_state, 0, half, manager, every=5)
        manager.wait_until_finished()
    with ocp.CheckpointManager(workdir / "ckpt", options=options) as manager:  # a new process
        step = manager.latest_step()
        resumed, resumed_opt = restore(manager, step)
    _, _, rest = train(params, resumed, resumed_opt, step, steps)
    assert step == half, (step, half)
    print(f"resumed from step {step}: identical to the uninterrupted run: "
          f"{first + rest == reference}")
    assert first + rest == reference

    # 3. The same checkpoint onto a 2x4 mesh: 'data' splits the batch, 'model' splits
    #    the hidden layer (Megatron style), and each factor follows its kernel.
    mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(AxisType.Auto,) * 2)
    kernel_specs = {"up": {"kernel": P(None, "model")}, "down": {"kernel": P("model", None)}}
    params_sh = jax.device_put(params, jax.tree.map(
        lambda _: NamedSharding(mesh, P()), params))
    with ocp.CheckpointManager(workdir / "ckpt", options=options) as manager:
        sharded, sharded_opt = restore(manager, step, mesh, kernel_specs)
    print("restored onto", mesh.devices.size, "devices; 'up' factors:",
          sharded["up/kernel"].a.sharding.spec, sharded["up/kernel"].b.sharding.spec)
    _, _, rest_sharded = train(params_sh, sharded, sharded_opt, step, steps,
                               shard_batch=lambda v: jax.device_put(v, NamedSharding(
                                   mesh, P("data"))))
    gap = np.max(np.abs(np.array(rest_sharded) - np.array(reference[half:])))
    print(f"sharded resume: final loss {rest_sharded[-1]:.6f} (reference "
          f"{reference[-1]:.6f}), largest loss gap {gap:.2e}")
    np.testing.assert_allclose(rest_sharded, reference[half:], rtol=1e-5)
    return reference


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--workdir", default=None, help="where checkpoints go (default: temp)")
    args = parser.parse_args()
    main(args.steps, args.workdir)
