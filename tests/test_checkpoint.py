"""Adapters and optax state through orbax's CheckpointManager, in a training loop.

Train 2N steps without stopping; train N, checkpoint, restore with a fresh manager from
a template rebuilt out of the JSON stored beside the arrays, train N more: the losses,
factors and optimizer state must be identical bit for bit. The
sharded case runs on 8 virtual CPU devices in a subprocess (XLA reads the device count
once, when jax is imported), and so does examples/checkpointing.py.
"""

import json
import os
import pathlib
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

import jlora

REPO = pathlib.Path(__file__).resolve().parents[1]
OPTIMIZER = optax.adam(0.05)


def normal(seed, shape, scale=1.0):
    """Random test data from numpy: ``jax.random`` would compile once per shape."""
    return jax.device_put(np.asarray(scale * np.random.default_rng(seed).standard_normal(shape),
                                      np.float32))


PARAMS = {
    "up": {"kernel": normal(0, (6, 8), 1 / 3), "bias": jnp.zeros(8)},
    "down": {"kernel": normal(1, (8, 3), 1 / 3)},
}


def make_adapters():
    """A LoRA adapter with a custom scale and a DoRA one (a magnitude leaf)."""
    lora = jlora.init(jax.random.key(2), PARAMS, jlora.LoraConfig(
        rank=2, alpha=4.0, targets="up/kernel", scaling=lambda r, a: 0.7 * a / r))
    dora = jlora.init(jax.random.key(3), PARAMS, jlora.LoraConfig(
        rank=2, alpha=2.0, targets="down/kernel", variant="dora", scaling="rslora"))
    return lora | dora


def batch(step):
    x = normal(100 + step, (5, 6))
    return x, jnp.cos(x[:, :3])


def loss_fn(adapters, x, y):
    p = jlora.merge(PARAMS, adapters)
    h = jnp.tanh(x @ p["up"]["kernel"] + p["up"]["bias"][None, :])
    return jnp.mean((h @ p["down"]["kernel"] - y) ** 2)


def step_fn(adapters, opt_state, x, y):
    loss, grads = jax.value_and_grad(loss_fn)(adapters, x, y)
    updates, opt_state = OPTIMIZER.update(grads, opt_state, adapters)
    return optax.apply_updates(adapters, updates), opt_state, loss


# Jitted, as in any real loop. (Resuming does not depend on jit, and an eager step costs
# ~7x more here: every primitive of the DoRA gradient compiles on its own.)
train_step = jax.jit(step_fn)


def run(step, adapters, opt_state, start, stop):
    losses = []
    for i in range(start, stop):
        adapters, opt_state, loss = step(adapters, opt_state, *batch(i))
        losses.append(np.asarray(loss))
    return adapters, opt_state, losses


def save(manager, step, adapters, opt_state):
    manager.save(step, args=ocp.args.Composite(
        adapters=ocp.args.StandardSave(adapters),
        opt_state=ocp.args.StandardSave(opt_state),
        jlora=ocp.args.JsonSave(jlora.adapter_metadata(adapters)),
    ))
    manager.wait_until_finished()


def restore(manager, step):
    meta = manager.restore(step, args=ocp.args.Composite(jlora=ocp.args.JsonRestore()))["jlora"]
    adapters_like = jlora.abstract_adapters(meta)
    restored = manager.restore(step, args=ocp.args.Composite(
        adapters=ocp.args.StandardRestore(adapters_like),
        opt_state=ocp.args.StandardRestore(jax.eval_shape(OPTIMIZER.init, adapters_like)),
    ))
    return restored["adapters"], restored["opt_state"]


def assert_trees_identical(got, want):
    assert jax.tree.structure(got) == jax.tree.structure(want)  # static metadata included
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        assert g.dtype == w.dtype and g.shape == w.shape
        assert np.asarray(g).tobytes() == np.asarray(w).tobytes()


@pytest.fixture(scope="module")
def start():
    adapters = make_adapters()
    return adapters, OPTIMIZER.init(adapters)


def test_resume_is_identical_to_uninterrupted(start, tmp_path):
    step, (adapters, opt_state), n = train_step, start, 3
    ref_adapters, ref_opt, ref_losses = run(step, adapters, opt_state, 0, 2 * n)

    options = ocp.CheckpointManagerOptions(max_to_keep=1)
    with ocp.CheckpointManager(tmp_path / "ckpt", options=options) as manager:
        mid_adapters, mid_opt, first = run(step, adapters, opt_state, 0, n)
        save(manager, n, mid_adapters, mid_opt)
    with ocp.CheckpointManager(tmp_path / "ckpt", options=options) as manager:
        assert manager.latest_step() == n
        restored, restored_opt = restore(manager, n)
    assert_trees_identical(restored, mid_adapters)
    assert_trees_identical(restored_opt, mid_opt)
    assert restored["up/kernel"].policy == "custom"
    assert restored["up/kernel"].scale == pytest.approx(0.7 * 4.0 / 2)

    final, final_opt, rest = run(step, restored, restored_opt, n, 2 * n)
    assert [x.tobytes() for x in first + rest] == [x.tobytes() for x in ref_losses]
    assert_trees_identical(final, ref_adapters)
    assert_trees_identical(final_opt, ref_opt)
    assert not np.allclose(ref_losses[0], ref_losses[-1])  # it did train


def test_template_from_init_restores_too(start, tmp_path):
    """Without the JSON, ``jax.eval_shape`` of the original ``jlora.init`` is the template."""
    adapters, opt_state = start
    with ocp.CheckpointManager(tmp_path / "ckpt") as manager:
        save(manager, 1, adapters, opt_state)
        restored = manager.restore(1, args=ocp.args.Composite(
            adapters=ocp.args.StandardRestore(jax.eval_shape(make_adapters))))["adapters"]
    assert_trees_identical(restored, adapters)


SHARDED_SCRIPT = textwrap.dedent("""
    import json, sys
    import jax, jax.numpy as jnp, numpy as np, optax
    import orbax.checkpoint as ocp
    from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
    import jlora

    assert len(jax.devices()) == 8, jax.devices()
    mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(AxisType.Auto,) * 2)
    kernel_specs = {"up": {"kernel": P(None, "model")}, "down": {"kernel": P("model", None)}}

    def normal(seed, shape):  # numpy: jax.random would compile once per shape
        return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)

    params = jax.device_put({"up": {"kernel": normal(0, (8, 16)) / 3},
                             "down": {"kernel": normal(1, (16, 4)) / 3}},
                            NamedSharding(mesh, P()))
    config = jlora.LoraConfig(rank=4, alpha=8.0, scaling="rslora")
    abstract = jax.eval_shape(lambda p: jlora.init(jax.random.key(2), p, config), params)
    shardings = jlora.adapter_shardings(abstract, kernel_specs, mesh)
    adapters = jax.jit(jlora.init, static_argnums=2, out_shardings=shardings)(
        jax.random.key(2), params, config)
    opt = optax.adam(0.05)
    opt_like = jax.eval_shape(opt.init, abstract)
    opt_shardings = jlora.sharding.state_shardings(opt_like, abstract, shardings)
    opt_state = jax.jit(opt.init, out_shardings=opt_shardings)(adapters)

    def batch(i):
        x = normal(100 + i, (8, 8))
        return [jax.device_put(v, NamedSharding(mesh, P("data"))) for v in (x, np.sin(x[:, :4]))]

    @jax.jit
    def step(adapters, opt_state, x, y):
        def loss_fn(a):
            p = jlora.merge(params, a)
            return jnp.mean((jnp.tanh(x @ p["up"]["kernel"]) @ p["down"]["kernel"] - y) ** 2)
        loss, grads = jax.value_and_grad(loss_fn)(adapters)
        updates, opt_state = opt.update(grads, opt_state, adapters)
        return optax.apply_updates(adapters, updates), opt_state, loss

    def run(a, o, start, stop):
        losses = []
        for i in range(start, stop):
            a, o, loss = step(a, o, *batch(i))
            losses.append(float(loss))
        return a, o, losses

    def same(x, y):
        return all(np.asarray(u).tobytes() == np.asarray(v).tobytes()
                   for u, v in zip(jax.tree.leaves(x), jax.tree.leaves(y), strict=True))

    n = 3
    ref, ref_opt, ref_losses = run(adapters, opt_state, 0, 2 * n)
    mid, mid_opt, first = run(adapters, opt_state, 0, n)
    with ocp.CheckpointManager(sys.argv[1]) as manager:
        manager.save(n, args=ocp.args.Composite(
            adapters=ocp.args.StandardSave(mid), opt_state=ocp.args.StandardSave(mid_opt),
            jlora=ocp.args.JsonSave(jlora.adapter_metadata(mid))))
    with ocp.CheckpointManager(sys.argv[1]) as manager:  # a fresh manager, no live arrays used
        meta = manager.restore(n, args=ocp.args.Composite(jlora=ocp.args.JsonRestore()))["jlora"]
        like = jlora.abstract_adapters(meta)
        sh = jlora.adapter_shardings(like, kernel_specs, mesh)
        like = jlora.abstract_adapters(meta, sharding=sh)
        o_like = jax.eval_shape(opt.init, like)
        o_sh = jlora.sharding.state_shardings(o_like, like, sh)
        o_like = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                              o_like, o_sh)
        got = manager.restore(n, args=ocp.args.Composite(
            adapters=ocp.args.StandardRestore(like), opt_state=ocp.args.StandardRestore(o_like)))
        # The same checkpoint onto one device: resharding on restore.
        one = jax.sharding.SingleDeviceSharding(jax.devices()[3])
        single = manager.restore(n, args=ocp.args.Composite(adapters=ocp.args.StandardRestore(
            jlora.abstract_adapters(meta, sharding=one))))["adapters"]
    restored, restored_opt = got["adapters"], got["opt_state"]
    final, final_opt, rest = run(restored, restored_opt, n, 2 * n)
    def spec(x):  # the PartitionSpec padded to the array's rank, as a JSON list
        entries = list(x.sharding.spec)
        return entries + [None] * (x.ndim - len(entries))

    specs = {p: [spec(ad.a), spec(ad.b)] for p, ad in restored.items()}
    print("RESULT", json.dumps({
        "devices": len(jax.devices()),
        "specs": specs,
        "opt_mu_specs": {p: [spec(ad.a), spec(ad.b)] for p, ad in restored_opt[0].mu.items()},
        "count_spec": spec(restored_opt[0].count),
        "restored_equal": same(restored, mid) and same(restored_opt, mid_opt),
        "single_equal": same(single, mid),
        "single_devices": sorted(d.id for x in jax.tree.leaves(single) for d in x.devices()),
        "losses_equal": first + rest == ref_losses,
        "final_equal": same(final, ref) and same(final_opt, ref_opt),
        "trained": ref_losses[0] != ref_losses[-1],
    }), flush=True)

    # The example, in the same process (one jax start-up for both).
    import runpy
    sys.argv = ["examples/checkpointing.py", "--steps", "10", "--workdir", sys.argv[2]]
    runpy.run_path("examples/checkpointing.py", run_name="__main__")
""")


@pytest.fixture(scope="module")
def eight_devices(tmp_path_factory):
    """Stdout of SHARDED_SCRIPT, then of examples/checkpointing.py, on 8 CPU devices."""
    tmp = tmp_path_factory.mktemp("eight")
    env = dict(os.environ)
    # Tiny models: compiling dominates, so XLA's backend optimisations are off (about a
    # third of the run; every comparison is between values computed under these flags).
    env["XLA_FLAGS"] = (
        env.get("XLA_FLAGS", "")
        + " --xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0"
    ).strip()
    env["JAX_PLATFORMS"] = "cpu"
    proc = subprocess.run(
        [sys.executable, "-c", SHARDED_SCRIPT, str(tmp / "ckpt"), str(tmp / "example")],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stdout


def test_restore_onto_a_sharded_mesh_of_8_devices(eight_devices):
    line = next(x for x in eight_devices.splitlines() if x.startswith("RESULT "))
    result = json.loads(line.removeprefix("RESULT "))
    assert result["devices"] == 8
    # Each factor is sharded like its kernel: up (in, out/model), down (in/model, out).
    assert result["specs"] == {
        "up/kernel": [[None, None], [None, "model"]],
        "down/kernel": [["model", None], [None, None]],
    }
    assert result["opt_mu_specs"] == result["specs"]  # Adam's moments follow their factors
    assert result["count_spec"] == []
    assert result["restored_equal"] and result["single_equal"]
    assert result["single_devices"] == [3] * 4  # a and b of both kernels, all on device 3
    assert result["losses_equal"] and result["final_equal"] and result["trained"]


def test_checkpointing_example_runs(eight_devices):
    assert "identical to the uninterrupted run: True" in eight_devices
    assert "restored onto 8 devices" in eight_devices
    assert "sharded resume: final loss" in eight_devices
