"""Sharded adapters on 8 virtual CPU devices, mesh (data=2, model=4).

Run by tests/test_sharding.py in a subprocess with
``XLA_FLAGS=--xla_force_host_platform_device_count=8`` (it must be set before jax is
imported). Usage: ``python train_step.py RESULT.json``. Each check runs on its own and
records ``"pass"``, ``"skip: why"`` or the failure's traceback, so the pytest side
reports them one by one.
"""

from __future__ import annotations

import functools
import json
import sys
import time
import traceback

import flax.linen as nn
import jax
import jax.numpy as jnp
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

jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_default_matmul_precision", "highest")

RTOL, ATOL = 1e-5, 1e-6  # float32, reductions reordered across shards


def make_mesh():
    return jax.make_mesh((2, 4), ("data", "model"), axis_types=(AxisType.Auto,) * 2)


def specs_of(shardings) -> dict:
    """{factor path: spec} of an adapters/trainable tree of NamedShardings."""
    return jlora.tree_map_with_path(lambda p, s: s.spec, shardings)


@functools.cache
def setup(scanned: bool):
    """Model, boxed abstract params, config, abstract adapters, kernel shardings."""
    mesh = make_mesh()
    model = LM(scanned=scanned)
    boxed = boxed_params(model)
    config = lora_config(scanned)
    abstract = jax.eval_shape(lambda p: jlora.init(jax.random.key(1), p, config), boxed)
    param_sh = nn.logical_to_mesh_sharding(nn.get_partition_spec(boxed), mesh, RULES)
    return mesh, model, boxed, config, abstract, param_sh


_init_unsharded = jax.jit(jlora.init, static_argnums=2)
_sharded_adapters = {}  # scanned -> adapters made by the sharded init (reused by the step)


# Hand-written expectations: A = (stacked, fan-in specs, None), B = (stacked, None, fan-out).
EXPECTED = {
    False: {
        "embed/embedding": (P("model", None), P(None, "data")),        # (vocab, embed)
        "block/query/kernel": (P("data", None), P(None, "model", None)),  # (embed, heads, kv)
        "block/out/kernel": (P("model", None, None), P(None, "data")),    # (heads, kv, embed)
        "block/up/kernel": (P("data", None), P(None, "model")),          # (embed, mlp)
        "block/down/kernel": (P("model", None), P(None, "data")),        # (mlp, embed)
        "head/kernel": (P("data", None), P(None, "model")),              # (embed, vocab)
    },
    True: {
        "layers/query/kernel": (P(None, "data", None), P(None, None, "model", None)),
        "layers/out/kernel": (P(None, "model", None, None), P(None, None, "data")),
        "layers/up/kernel": (P(None, "data", None), P(None, None, "model")),
        "layers/down/kernel": (P(None, "model", None), P(None, None, "data")),
    },
}


def check_expected_specs(scanned: bool):
    mesh, _, _, _, abstract, param_sh = setup(scanned)
    shardings = jlora.adapter_shardings(abstract, param_sh)
    for path, (a, b) in EXPECTED[scanned].items():
        got = shardings[path]
        assert (got.a.spec, got.b.spec) == (a, b), (path, got.a.spec, got.b.spec, a, b)
        assert got.a.mesh == mesh and got.b.mesh == mesh


def check_sources_agree(scanned: bool):
    """NamedShardings, boxed metadata + rules, logical specs + rules, rules from context."""
    mesh, _, boxed, _, abstract, param_sh = setup(scanned)
    reference = specs_of(jlora.adapter_shardings(abstract, param_sh))
    logical = nn.get_partition_spec(boxed)
    others = {
        "boxed+rules": jlora.adapter_shardings(abstract, boxed, mesh, rules=RULES),
        "logical specs+rules": jlora.adapter_shardings(abstract, logical, mesh, rules=RULES),
        "mesh specs": jlora.adapter_shardings(abstract, nn.logical_to_mesh(logical, RULES), mesh),
    }
    with nn.logical_axis_rules(RULES):
        others["boxed+context rules"] = jlora.adapter_shardings(abstract, boxed, mesh)
    for name, shardings in others.items():
        assert specs_of(shardings) == reference, (name, specs_of(shardings), reference)


def check_init_sharded(scanned: bool):
    """jit(jlora.init) with out_shardings: sharded factors, same values, no full copies."""
    _, model, _, config, abstract, param_sh = setup(scanned)
    params = jax.device_put(host_params(model), param_sh)
    out_sh = jlora.adapter_shardings(abstract, param_sh)
    init = jax.jit(jlora.init, static_argnums=2, out_shardings=out_sh)
    compiled = init.lower(jax.random.key(1), params, config).compile()
    # The per-device program never holds a factor at full size when its spec shards it.
    hlo = compiled.as_text()
    for path, ad in abstract.items():
        for field in ("a", "b"):
            x, spec = getattr(ad, field), getattr(out_sh[path], field)
            full = "f32[" + ",".join(map(str, x.shape)) + "]"
            if spec.shard_shape(x.shape) != x.shape:
                assert full not in hlo, (path, field, full)
    adapters = compiled(jax.random.key(1), params)
    reference = _init_unsharded(jax.random.key(1), host_params(model), config)
    for path, ad in adapters.items():
        for field in ("a", "b"):
            x, want = getattr(ad, field), getattr(out_sh[path], field)
            assert x.sharding.is_equivalent_to(want, x.ndim), (path, field, x.sharding, want)
            want_values = np.asarray(getattr(reference[path], field))
            np.testing.assert_array_equal(np.asarray(x), want_values)
            shard = want.shard_shape(x.shape)
            assert all(s.data.shape == shard for s in x.addressable_shards), (path, field)
    _sharded_adapters[scanned] = adapters


def check_explicit_mesh_merge():
    """With Explicit mesh axes (sharding in the types, jax.make_mesh's default), merging the
    sharded factors gives every kernel exactly its own sharding: the rule needs no reshard."""
    mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(AxisType.Explicit,) * 2)
    for scanned in (False, True):
        _, model, boxed, config, abstract, _ = setup(scanned)
        param_sh = nn.logical_to_mesh_sharding(nn.get_partition_spec(boxed), mesh, RULES)
        params = jax.device_put(host_params(model), param_sh)
        out_sh = jlora.adapter_shardings(abstract, param_sh)
        adapters = jax.jit(jlora.init, static_argnums=2, out_shardings=out_sh)(
            jax.random.key(1), params, config)
        merged = jlora.select(jax.jit(jlora.merge)(params, adapters), ".*")
        kernels = jlora.select(params, ".*")
        for path in adapters:
            assert merged[path].sharding.spec == kernels[path].sharding.spec, (
                path, merged[path].sharding.spec, kernels[path].sharding.spec)


def check_train_step(scanned: bool):
    """A jitted LoRA+ step with in/out shardings equals the single-device run."""
    mesh, model, _, config, abstract, param_sh = setup(scanned)
    host = host_params(model)
    adapters = _init_unsharded(jax.random.key(1), host, config)
    trainable, frozen = split(host, adapters)
    toks = tokens()
    step = make_step(model)
    opt = optimizer()

    # Single device: plain jit, everything on device 0.
    ref_losses, ref_trainable = run_steps(jax.jit(step), trainable, opt.init(trainable), frozen,
                                          toks)

    # Sharded: adapters like their kernels, extras (the adapted modules' biases) like
    # themselves, the batch over `data`, the optimizer state like what it mirrors.
    mask = jlora.trainable_mask(host, adapters, bias="lora_only")
    extra_sh = jax.tree.map(lambda keep, s: s if keep else None, mask, param_sh)
    frozen_sh = jax.tree.map(lambda keep, s: None if keep else s, mask, param_sh)
    trainable_sh = {
        "adapters": jlora.adapter_shardings(abstract, param_sh),
        "params": extra_sh,
    }
    state_sh = jlora.state_shardings(jax.eval_shape(opt.init, trainable), trainable,
                                     trainable_sh)
    batch_sh = NamedSharding(mesh, P("data", None))
    replicated = NamedSharding(mesh, P())
    sharded_step = jax.jit(
        step,
        in_shardings=(trainable_sh, state_sh, frozen_sh, batch_sh),
        out_shardings=(replicated, trainable_sh, state_sh),
    )
    # Start from the adapters the sharded init made (check_init_sharded), when it ran.
    start = _sharded_adapters.get(scanned, adapters)
    trainable_d = jax.device_put({"adapters": start, "params": trainable["params"]}, trainable_sh)
    frozen_d = jax.device_put(frozen, frozen_sh)
    state_d = jax.jit(opt.init, out_shardings=state_sh)(trainable_d)
    losses, out = run_steps(sharded_step, trainable_d, state_d, frozen_d,
                            jax.device_put(toks, batch_sh))

    np.testing.assert_allclose(np.array(losses), np.array(ref_losses), rtol=RTOL, atol=ATOL)
    assert len(set(np.round(np.array(ref_losses), 4))) == len(ref_losses), "loss did not move"
    flat_out = jlora.select(out, ".*")
    flat_ref = jlora.select(ref_trainable, ".*")
    flat_sh = jlora.select(trainable_sh, ".*")
    assert flat_out.keys() == flat_ref.keys()
    for path, x in flat_out.items():
        np.testing.assert_allclose(np.asarray(x), np.asarray(flat_ref[path]), rtol=RTOL, atol=ATOL,
                                   err_msg=path)
        assert x.sharding.is_equivalent_to(flat_sh[path], x.ndim), (path, x.sharding)
    # The step really trained both factors and the biases.
    for path, x in flat_ref.items():
        before = np.asarray(jlora.select(trainable, ".*")[path])
        assert not np.array_equal(np.asarray(x), before), f"{path} did not change"
    return [float(x) for x in losses]


def check_factored_step():
    """The same sharded step computed through jlora.lora (if the factored transform exists)."""
    if not hasattr(jlora, "lora"):
        return "skip: jlora.lora (jlora/transform.py) is not available in this checkout"
    mesh, model, _, config, abstract, param_sh = setup(False)
    host = host_params(model)
    adapters = _init_unsharded(jax.random.key(1), host, config)
    adapters = jax.tree.map(lambda x: x + 0.05, adapters)  # B != 0, so A gets a gradient
    toks = tokens()

    def loss_merged(ads, params, t):
        logits = model.apply({"params": jlora.merge(params, ads)}, t)
        return jnp.mean(jax.nn.log_softmax(logits)[..., 0])

    def loss_factored(ads, params, t):
        apply = jlora.lora(lambda p, tt: model.apply({"params": p}, tt))
        return jnp.mean(jax.nn.log_softmax(apply(params, ads, t))[..., 0])

    ad_sh = jlora.adapter_shardings(abstract, param_sh)
    in_sh = (ad_sh, param_sh, NamedSharding(mesh, P("data", None)))
    args = (jax.device_put(adapters, ad_sh), jax.device_put(host, param_sh),
            jax.device_put(toks, in_sh[2]))
    out_sh = (NamedSharding(mesh, P()), ad_sh)
    ref = jax.jit(jax.value_and_grad(loss_merged))(adapters, host, toks)
    got = jax.jit(jax.value_and_grad(loss_factored), in_shardings=in_sh, out_shardings=out_sh)(
        *args)
    np.testing.assert_allclose(float(got[0]), float(ref[0]), rtol=RTOL, atol=ATOL)
    for (path, g), r in zip(jlora.select(got[1], ".*").items(),
                            jlora.select(ref[1], ".*").values(), strict=True):
        np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=RTOL, atol=ATOL,
                                   err_msg=path)


def check_factored_step_explicit():
    """jlora.lora's value and gradients on a mesh with Explicit axes (sharding in types,
    jax.make_mesh's default), in an MLP written for it (its down projection names its
    output sharding): the factored backward says how its weight gradients are sharded, as
    JAX's own dot transpose does, where the sharded batch is contracted."""
    mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(AxisType.Explicit,) * 2)
    key_up, key_down, key_x = jax.random.split(jax.random.key(3), 3)
    params = {"up": {"kernel": jax.random.normal(key_up, (16, 32)) * 0.3},
              "down": {"kernel": jax.random.normal(key_down, (32, 16)) * 0.3}}
    x = jax.random.normal(key_x, (8, 16))
    adapters = jax.tree.map(lambda a: a + 0.05, jlora.init(jax.random.key(1), params,
                                                           jlora.LoraConfig(rank=2)))

    def mlp(p, x):
        h = jax.nn.relu(x @ p["up"]["kernel"])
        out = None if jax.sharding.get_abstract_mesh().empty else P("data", None)
        return jnp.matmul(h, p["down"]["kernel"], out_sharding=out)

    def loss(ads, p, x, apply):
        return jnp.mean(apply(p, ads, x) ** 2)

    merged = lambda p, a, x: mlp(jlora.merge(p, a), x)  # noqa: E731
    ref = jax.jit(jax.value_and_grad(loss), static_argnums=3)(adapters, params, x, merged)
    param_sh = {"up": {"kernel": NamedSharding(mesh, P(None, "model"))},
                "down": {"kernel": NamedSharding(mesh, P("model", None))}}
    abstract = jax.eval_shape(lambda: adapters)
    ad_sh = jlora.adapter_shardings(abstract, param_sh)
    with jax.set_mesh(mesh):
        args = (jax.device_put(adapters, ad_sh), jax.device_put(params, param_sh),
                jax.device_put(x, NamedSharding(mesh, P("data", None))))
        got = jax.jit(jax.value_and_grad(loss), static_argnums=3)(*args, jlora.lora(mlp))
    np.testing.assert_allclose(float(got[0]), float(ref[0]), rtol=RTOL, atol=ATOL)
    for (path, g), r in zip(jlora.select(got[1], ".*").items(),
                            jlora.select(ref[1], ".*").values(), strict=True):
        np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=RTOL, atol=ATOL,
                                   err_msg=path)
        assert g.sharding.spec == jlora.select(ad_sh, ".*")[path].spec, (path, g.sharding)


def check_nnx():
    """NNX sharding metadata (out_sharding + logical rules) gives the same rule, and
    jit(jlora.init) on an NNX state creates the factors sharded."""
    from flax import nnx

    mesh = make_mesh()

    class MLP(nnx.Module):
        def __init__(self, rngs):
            init = nnx.initializers.normal(0.3)
            self.up = nnx.Linear(16, 32, rngs=rngs,
                                 kernel_init=nnx.with_partitioning(init, ("embed", "mlp")))
            self.down = nnx.Linear(32, 16, rngs=rngs,
                                   kernel_init=nnx.with_partitioning(init, ("mlp", "embed")))

    with nnx.use_eager_sharding(False):  # the metadata is what is tested, not flax's placement
        abstract_model = nnx.eval_shape(lambda: MLP(nnx.Rngs(0)))
    _, abstract_state = nnx.split(abstract_model, nnx.Param)
    config = jlora.LoraConfig(rank=2)
    abstract = jax.eval_shape(lambda s: jlora.init(jax.random.key(0), s, config), abstract_state)
    expected = {"up/kernel": (P("data", None), P(None, "model")),
                "down/kernel": (P("model", None), P(None, "data"))}
    with nn.logical_axis_rules(RULES):
        from_context = jlora.adapter_shardings(abstract, abstract_state, mesh)
        named = nnx.get_named_sharding(abstract_state, mesh)
    sources = {
        "variables+rules": jlora.adapter_shardings(abstract, abstract_state, mesh, rules=RULES),
        "variables+context rules": from_context,
        "nnx.get_named_sharding": jlora.adapter_shardings(abstract, named),
    }
    for name, shardings in sources.items():
        for path, (a, b) in expected.items():
            got = (shardings[path].a.spec, shardings[path].b.spec)
            assert got == (a, b), (name, path, got)

    with nnx.use_eager_sharding(False):
        _, state = nnx.split(MLP(nnx.Rngs(0)), nnx.Param)
    out_sh = sources["variables+rules"]
    adapters = jax.jit(jlora.init, static_argnums=2, out_shardings=out_sh)(
        jax.random.key(0), state, config)
    for path, (a, b) in expected.items():
        assert adapters[path].a.sharding.spec == a and adapters[path].b.sharding.spec == b
        np.testing.assert_array_equal(
            np.asarray(adapters[path].a),
            np.asarray(jlora.init(jax.random.key(0), state, config)[path].a))


CHECKS = {
    "expected_specs_plain": lambda: check_expected_specs(False),
    "expected_specs_scanned": lambda: check_expected_specs(True),
    "sources_agree_plain": lambda: check_sources_agree(False),
    "sources_agree_scanned": lambda: check_sources_agree(True),
    "init_sharded_plain": lambda: check_init_sharded(False),
    "init_sharded_scanned": lambda: check_init_sharded(True),
    "train_step_plain": lambda: check_train_step(False),
    "train_step_scanned": lambda: check_train_step(True),
    "explicit_mesh_merge": check_explicit_mesh_merge,
    "factored_step": check_factored_step,
    "factored_step_explicit": check_factored_step_explicit,
    "nnx": check_nnx,
}


def main(out_path: str) -> None:
    assert len(jax.devices()) == 8, (
        f"expected 8 devices (XLA_FLAGS=--xla_force_host_platform_device_count=8), "
        f"got {jax.devices()}"
    )
    results = {}
    for name, check in CHECKS.items():
        start, cpu = time.perf_counter(), time.process_time()
        try:
            value = check()
            if isinstance(value, str) and value.startswith("skip:"):
                results[name] = {"status": value}
            else:
                results[name] = {"status": "pass", "value": value}
        except Exception:  # recorded and reported per check by the pytest side
            results[name] = {"status": "fail", "error": traceback.format_exc()}
        results[name]["seconds"] = round(time.perf_counter() - start, 2)
        results[name]["cpu_seconds"] = round(time.process_time() - cpu, 2)
    with open(out_path, "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1])
