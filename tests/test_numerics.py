"""Numerics: low-precision merges, non-finite refusal, and 7B-shaped trees without memory."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jlora


def random_adapters(params, config, seed=0):
    adapters = jlora.init(jax.random.key(seed), params, config)
    key = jax.random.key(seed + 1)
    return {p: ad.replace(b=0.1 * jax.random.normal(jax.random.fold_in(key, i), ad.b.shape))
            for i, (p, ad) in enumerate(adapters.items())}


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_merge_unmerge_drift_is_at_most_one_rounding_each_way(dtype):
    w = jax.random.normal(jax.random.key(0), (256, 128)).astype(dtype)
    params = {"d": {"kernel": w}}
    adapters = random_adapters(params, jlora.LoraConfig(rank=8, alpha=16.0))
    merged = jlora.merge(params, adapters)
    back = jlora.unmerge(merged, adapters)["d"]["kernel"]
    # merged and back are each rounded once from float32: the error is bounded by half
    # an ulp of the merged value plus half an ulp of the result.
    eps = float(jnp.finfo(dtype).eps)
    mag = np.maximum(np.abs(np.asarray(merged["d"]["kernel"], np.float32)),
                     np.abs(np.asarray(w, np.float32)))
    err = np.abs(np.asarray(back, np.float32) - np.asarray(w, np.float32))
    assert np.all(err <= eps * mag + 1e-30)


def test_safe_merge_names_the_kernel_and_the_cause():
    w = jnp.full((4, 4), 60000.0, jnp.float16)
    params = {"ok": {"kernel": jnp.ones((4, 4))}, "hot": {"kernel": w}}
    adapters = jlora.init(jax.random.key(0), params, jlora.LoraConfig(rank=2))
    overflow = {**adapters, "hot/kernel": adapters["hot/kernel"].replace(
        a=jnp.ones((4, 2)), b=jnp.full((2, 4), 1e4))}
    with pytest.raises(FloatingPointError, match=r"'hot/kernel' gives 16 non-finite.*overflows "
                                                 r"float16"):
        jlora.safe_merge(params, overflow)
    nan_factor = {**adapters, "ok/kernel": adapters["ok/kernel"].replace(
        a=adapters["ok/kernel"].a.at[0, 0].set(jnp.nan), b=jnp.ones((2, 4)))}
    with pytest.raises(FloatingPointError, match=r"'ok/kernel'.*adapter's factors are non-finite"):
        jlora.safe_merge(params, nan_factor)
    bad_base = {**params, "ok": {"kernel": jnp.ones((4, 4)).at[1, 1].set(jnp.inf)}}
    with pytest.raises(FloatingPointError, match=r"'ok/kernel'.*base kernel was already"):
        jlora.safe_merge(bad_base, adapters)
    merged = jlora.safe_merge(params, adapters)  # finite: same as merge
    np.testing.assert_array_equal(merged["hot"]["kernel"], jlora.merge(params, adapters)["hot"][
        "kernel"])


def llama7b_shapes(dtype=jnp.bfloat16):
    """A 7B-shaped parameter tree (LLaMA-7B dimensions, layers stacked as under nn.scan)."""
    L, d, f, v = 32, 4096, 11008, 32000
    s = lambda *shape: jax.ShapeDtypeStruct(shape, dtype)
    return {
        "embed": {"embedding": s(v, d)},
        "layers": {
            "attn": {n: {"kernel": s(L, d, d)} for n in ("q_proj", "k_proj", "v_proj", "o_proj")},
            "mlp": {"gate_proj": {"kernel": s(L, d, f)}, "up_proj": {"kernel": s(L, d, f)},
                    "down_proj": {"kernel": s(L, f, d)}},
            "norm": {"scale": s(L, d)},
        },
        "lm_head": {"kernel": s(d, v)},
    }


def test_7b_tree_init_merge_summary_without_allocation():
    params = llama7b_shapes()
    config = jlora.LoraConfig(rank=16, alpha=32.0, scaling="rslora",
                              targets=r"layers/.*/kernel", layouts={"layers/.*": "s..."})
    adapters = jax.eval_shape(lambda p: jlora.init(jax.random.key(0), p, config), params)
    assert adapters["layers/mlp/down_proj/kernel"].a.shape == (32, 11008, 16)
    assert adapters["layers/attn/q_proj/kernel"].b.shape == (32, 16, 4096)
    merged = jax.eval_shape(jlora.merge, params, adapters)
    assert jax.tree.map(lambda x: (x.shape, x.dtype), merged) == jax.tree.map(
        lambda x: (x.shape, x.dtype), params)
    text = jlora.summary(params, adapters)
    # 32 layers x rank 16 x (4 x (4096 + 4096) + 3 x (4096 + 11008)) adapter parameters.
    trainable = 32 * 16 * (4 * (4096 + 4096) + 3 * (4096 + 11008))
    base = 2 * 32000 * 4096 + 32 * (4 * 4096 * 4096 + 3 * 4096 * 11008 + 4096)
    assert f"trainable params: {trainable:,} || all params: {base + trainable:,} ||" in text


@pytest.mark.parametrize("variant, slices", [("lora", 2), ("dora", 3)])
def test_merge_with_donated_params_keeps_one_copy(variant, slices):
    # Four 32 MiB kernels (one stored (out, in)), a 256 MiB stack and a 128 MiB one with
    # MaxText's scan axis second: each update is formed in slices of at most
    # MAX_UPDATE_BYTES and written in place over the donated kernel, whatever the order
    # of its axes. (float32: XLA:CPU upcasts in-place bf16 updates to float32, which TPU
    # and GPU do not.)
    params = {f"l{i}": {"kernel": jax.ShapeDtypeStruct((2048, 4096), jnp.float32)}
              for i in range(3)}
    params["oi"] = {"kernel": jax.ShapeDtypeStruct((4096, 2048), jnp.float32)}
    params["stack"] = {"kernel": jax.ShapeDtypeStruct((4, 4096, 4096), jnp.float32)}
    params["maxtext"] = {"kernel": jax.ShapeDtypeStruct((2048, 4, 16, 256), jnp.float32)}
    config = jlora.LoraConfig(rank=8, variant=variant, layouts={
        "stack/kernel": "sio", "oi/kernel": "oi", "maxtext/kernel": "isoo"})
    adapters = jax.eval_shape(lambda p: jlora.init(jax.random.key(0), p, config), params)
    param_bytes = 4 * (4 * 2048 * 4096 + 4 * 4096 * 4096 + 2048 * 4 * 16 * 256)
    memory = jax.jit(jlora.merge, donate_argnums=0).lower(params, adapters).compile(
    ).memory_analysis()
    assert memory.alias_size_in_bytes == param_bytes  # every merged kernel overwrites its input
    # A few slices at most (the update and its sum; DoRA also the rescaled update),
    # against 512 MiB of params.
    assert memory.temp_size_in_bytes <= slices * jlora._merging.MAX_UPDATE_BYTES + 2**20


def test_7b_tree_peft_export_without_allocation():
    params = llama7b_shapes()
    config = jlora.LoraConfig(rank=16, alpha=32.0, use_rslora=True,
                              targets=r"layers/attn/(q|v)_proj/kernel",
                              layouts={"layers/.*": "s..."})
    adapters = jax.eval_shape(lambda p: jlora.init(jax.random.key(0), p, config), params)
    exported = {}

    def export(ads):  # the config is plain data; the tensors stay abstract
        exported["config"], tensors, _ = jlora.peft.export(ads)
        return tensors

    tensors = jax.eval_shape(export, adapters)
    config_json = exported["config"]
    assert config_json["r"] == 16 and config_json["use_rslora"] is True
    assert len(config_json["target_modules"]) == 64  # one module per layer and projection
    assert tensors["base_model.model.layers.31.attn.q_proj.lora_A.weight"].shape == (16, 4096)
    assert tensors["base_model.model.layers.0.attn.v_proj.lora_B.weight"].shape == (4096, 16)
    assert len(tensors) == 128
