"""One process of a two-process run of the sharded LoRA+ train step, on loopback.

Run by tests/test_sharding.py: ``python multiprocess.py PROCESS_ID NUM_PROCESSES PORT
RESULT.json`` in each process, with ``XLA_FLAGS=--xla_force_host_platform_device_count=4``
so the two processes form one 8-device mesh (data=2, model=4). CPU collectives go
through gloo (``jax_cpu_collectives_implementation``). Each process also computes the
one-device reference locally and compares its own shards against it; the pytest side
compares the losses with the one-process run.
"""

from __future__ import annotations

import json
import sys
import traceback

import jax


def run(process_id: int, num_processes: int, port: int) -> dict:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.config.update("jax_numpy_rank_promotion", "raise")
    jax.config.update("jax_default_matmul_precision", "highest")
    try:
        jax.distributed.initialize(
            coordinator_address=f"127.0.0.1:{port}",
            num_processes=num_processes,
            process_id=process_id,
            initialization_timeout=60,
        )
    except Exception:
        return {"status": "unsupported", "error": traceback.format_exc()}

    import flax.linen as nn
    import numpy as np
    from _common import (
        LM,
        RULES,
        boxed_params,
        host_params,
        lora_config,
        make_step,
        optimizer,
        run_steps,
        split,
        tokens,
    )
    from jax.sharding import AxisType, NamedSharding
    from jax.sharding import PartitionSpec as P

    import jlora

    try:
        assert jax.process_count() == num_processes and jax.device_count() == 8, (
            jax.process_count(), jax.devices())
        mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(AxisType.Auto,) * 2)
        model = LM(scanned=False)
        boxed = boxed_params(model)
        config = lora_config(False)
        host = host_params(model)  # computed locally, identical in both processes
        adapters = jax.jit(jlora.init, static_argnums=2)(jax.random.key(1), host, config)
        trainable, frozen = split(jax.tree.map(np.asarray, host),
                                  jax.tree.map(np.asarray, adapters))
        toks = tokens()
        step = make_step(model)
        opt = optimizer()

        # The one-device reference, on this process's first local device.
        ref_losses, ref = run_steps(jax.jit(step), trainable, opt.init(trainable), frozen, toks)

        param_sh = nn.logical_to_mesh_sharding(nn.get_partition_spec(boxed), mesh, RULES)
        mask = jlora.trainable_mask(host, adapters, bias="lora_only")
        trainable_sh = {
            "adapters": jlora.adapter_shardings(adapters, param_sh),
            "params": jax.tree.map(lambda keep, s: s if keep else None, mask, param_sh),
        }
        frozen_sh = jax.tree.map(lambda keep, s: None if keep else s, mask, param_sh)
        state_sh = jlora.state_shardings(jax.eval_shape(opt.init, trainable), trainable,
                                         trainable_sh)
        batch_sh = NamedSharding(mesh, P("data", None))
        replicated = NamedSharding(mesh, P())

        def to_global(tree, shardings):
            # Each process supplies only the shards that live on its own devices.
            return jax.tree.map(
                lambda x, s: jax.make_array_from_callback(x.shape, s, lambda i: np.asarray(x)[i]),
                tree, shardings)

        sharded_step = jax.jit(
            step,
            in_shardings=(trainable_sh, state_sh, frozen_sh, batch_sh),
            out_shardings=(replicated, trainable_sh, state_sh),
        )
        trainable_g = to_global(trainable, trainable_sh)
        state_g = jax.jit(opt.init, out_shardings=state_sh)(trainable_g)
        losses, out = run_steps(sharded_step, trainable_g, state_g,
                                to_global(frozen, frozen_sh), to_global(toks, batch_sh))
        losses = [float(x) for x in losses]

        # This process's shards of the updated trainable tree against the reference.
        flat_ref = jlora.select(ref, ".*")
        checked = 0
        for path, x in jlora.select(out, ".*").items():
            want = np.asarray(flat_ref[path])
            for shard in x.addressable_shards:
                np.testing.assert_allclose(np.asarray(shard.data), want[shard.index],
                                           rtol=1e-5, atol=1e-6, err_msg=path)
                checked += 1
        return {
            "status": "pass",
            "losses": losses,
            "ref_losses": [float(x) for x in ref_losses],
            "process_index": jax.process_index(),
            "local_devices": len(jax.local_devices()),
            "shards_checked": checked,
        }
    except Exception:
        return {"status": "fail", "error": traceback.format_exc()}
    finally:
        jax.distributed.shutdown()


def main() -> None:
    process_id, num_processes, port, out_path = sys.argv[1:5]
    result = run(int(process_id), int(num_processes), int(port))
    with open(out_path, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
