"""Mixture-of-experts weights and PEFT's ``target_parameters`` (``jlora.peft.TargetParameter``).

PEFT adapts a 3-D expert parameter with one ``lora_A.weight (E·r, in)``, expert-major, and
one ``lora_B.weight (out, r·E)``, expert-minor; jlora's adapter of an expert kernel has
the experts as a stacked axis, ``A (E, in, r)`` and ``B (E, r, out)``. The fixtures were
written by PEFT 0.21.2 (scripts/make_peft_fixtures.py): ``granitemoe`` is transformers'
``GraniteMoeForCausalLM`` (experts ``(E, out, in)``, one parameter per module, beside a
``q_proj`` Linear), ``moe_nested`` a module with two expert parameters ``(E, in, out)``,
which PEFT nests. jlora must give PEFT's merged weights, in any axis order of the kernel
and with the layers stacked or not, and write PEFT's own tensors back.
"""

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
from test_peft import merge, random_adapters

import jlora
from jlora import peft

FIXTURES = pathlib.Path(__file__).parent / "fixtures" / "peft"
TOL = dict(rtol=1e-5, atol=1e-5)
GRANITE = FIXTURES / "granitemoe"
NESTED = FIXTURES / "moe_nested"


def _tree(root):
    stored = safetensors.numpy.load_file(root / "flax.safetensors")
    base = {k[5:]: jax.device_put(v) for k, v in stored.items() if k.startswith("base/")}
    merged = {k[7:]: v for k, v in stored.items() if k.startswith("merged/")}
    return base, merged


def _file(path):
    return safetensors.numpy.load_file(pathlib.Path(path) / "adapter_model.safetensors")


def _granite_names(base):
    names, layouts = {}, {}
    for path in base:
        i, module = path.split("/")[3], path.split("/")[-2]
        if module == "q_proj":
            names[path] = f"model.layers.{i}.self_attn.q_proj"
        else:
            names[path] = peft.TargetParameter(
                f"model.layers.{i}.block_sparse_moe.{module}.weight", expert_axis=0)
            layouts[path] = "soi"  # torch's (E, out, in)
    return names, layouts


@pytest.fixture(scope="module")
def granite():
    base, merged = _tree(GRANITE)
    names, layouts = _granite_names(base)
    adapters = peft.load(GRANITE / "adapter", base, names=names, layouts=layouts)
    return base, merged, names, adapters


def test_expert_parameters_load_with_peft_merged_weights(granite):
    base, merged, _, adapters = granite
    assert sorted(adapters) == sorted(base)
    up = adapters["params/model/layers/1/block_sparse_moe/input_linear/weight"]
    down = adapters["params/model/layers/1/block_sparse_moe/output_linear/weight"]
    assert (up.a.shape, up.b.shape, up.rank, up.scale) == ((3, 8, 2), (3, 2, 12), 2, 2.0)
    assert (down.rank, down.scale) == (1, 4.0)  # rank_pattern["output_linear.weight"]
    assert adapters["params/model/layers/0/self_attn/q_proj/kernel"].scale == 1.5
    ours = merge(base, adapters)
    for path in base:
        np.testing.assert_allclose(ours[path], merged[path], **TOL, err_msg=path)


def test_expert_order_follows_peft(granite):
    """Expert e's update is scale · B[:, :, e] @ A[e] with A = lora_A.reshape(E, r, in),
    B = lora_B.reshape(out, r, E): ParamWrapper.get_delta_weight, written out in numpy."""
    base, _, _, adapters = granite
    tensors = _file(GRANITE / "adapter")
    key = "base_model.model.model.layers.0.block_sparse_moe.input_linear"
    a, b = tensors[key + ".lora_A.weight"], tensors[key + ".lora_B.weight"]
    experts, rank = 3, 2
    a3, b3 = a.reshape(experts, rank, -1), b.reshape(b.shape[0], rank, experts)
    delta = 2.0 * np.einsum("ore,eri->eoi", b3, a3)
    ad = adapters["params/model/layers/0/block_sparse_moe/input_linear/weight"]
    np.testing.assert_allclose(ad.delta(), delta, rtol=1e-6, atol=1e-6)


def test_expert_parameters_save_as_peft_wrote_them(granite, tmp_path):
    _, _, names, adapters = granite
    out = peft.save(tmp_path / "back", adapters, names=names)
    theirs, ours = _file(GRANITE / "adapter"), _file(out)
    assert sorted(ours) == sorted(theirs)
    for key, value in theirs.items():
        np.testing.assert_array_equal(ours[key], value, err_msg=key)
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["target_modules"] == ["model.layers.0.self_attn.q_proj",
                                        "model.layers.1.self_attn.q_proj"]
    assert config["target_parameters"] == [
        f"model.layers.{i}.block_sparse_moe.{m}.weight"
        for i in (0, 1) for m in ("input_linear", "output_linear")]
    # PEFT looks ranks up by parameter name
    key = peft.get_pattern_key(list(config["rank_pattern"]),
                               "model.layers.1.block_sparse_moe.output_linear.weight")
    assert config["rank_pattern"][key] == 1


@pytest.mark.parametrize("order", ["stacked_layers", "in_out"])
def test_any_kernel_order_gives_the_same_update(granite, order, tmp_path):
    base, _, _, adapters = granite
    experts = [f"params/model/layers/{i}/block_sparse_moe/input_linear/weight" for i in (0, 1)]
    if order == "stacked_layers":  # (layers, E, out, in), the experts on axis 1
        params = {"moe/wi": jnp.stack([base[p] for p in experts])}
        names = {"moe/wi": peft.TargetParameter(
            "model.layers.{}.block_sparse_moe.input_linear.weight", expert_axis=1)}
        layouts = {"moe/wi": "ssoi"}
        want = jnp.stack([adapters[p].delta() for p in experts])
    else:  # (E, in, out), as a JAX MoE layer stores it
        params = {"moe/wi": base[experts[0]].transpose(0, 2, 1)}
        names = {"moe/wi": peft.TargetParameter(
            "model.layers.0.block_sparse_moe.input_linear.weight", expert_axis=0)}
        layouts = {"moe/wi": "sio"}
        want = adapters[experts[0]].delta().transpose(0, 2, 1)
    # Only the expert kernels are mapped: the file's other modules go to a copy
    tensors, config = _file(GRANITE / "adapter"), json.loads(
        (GRANITE / "adapter" / "adapter_config.json").read_text())
    keep = {k: v for k, v in tensors.items() if "input_linear" in k
            and (order == "stacked_layers" or ".layers.0." in k)}
    subset = tmp_path / "subset"
    subset.mkdir()
    safetensors.numpy.save_file(keep, subset / "adapter_model.safetensors")
    (subset / "adapter_config.json").write_text(json.dumps(dict(
        config, target_modules=[], target_parameters=["input_linear.weight"])))
    got = peft.load(subset, params, names=names, layouts=layouts)["moe/wi"]
    np.testing.assert_allclose(got.delta(), want, rtol=1e-6, atol=1e-6)
    back = _file(peft.save(tmp_path / "back", {"moe/wi": got}, names=names))
    for key, value in keep.items():
        np.testing.assert_array_equal(back[key], value, err_msg=key)


def test_an_expert_without_an_update_is_written_as_zeros(tmp_path):
    params = {"wi": jnp.ones((3, 4, 5))}
    names = {"wi": peft.TargetParameter("experts.wi", expert_axis=0)}
    ad = random_adapters(params, jlora.LoraConfig(rank=2, targets="wi",
                                                  layouts={"wi": "sio"}))["wi"]
    ad = ad.replace(a=ad.a.at[1].set(0.0), b=jnp.ones_like(ad.b).at[1].set(0.0))
    tensors = _file(peft.save(tmp_path / "a", {"wi": ad}, names=names))
    a = tensors["base_model.model.experts.lora_A.weight"]
    assert a.shape == (6, 4) and not a[2:4].any() and a[:2].any()
    # Expert indices are not layers: no layers_to_transform that PEFT would apply to layers.
    config = json.loads((tmp_path / "a" / peft.CONFIG_NAME).read_text())
    assert config["layers_to_transform"] is None and config["layers_pattern"] is None
    back = peft.load(tmp_path / "a", params, names=names, layouts={"wi": "sio"})["wi"]
    np.testing.assert_array_equal(back.delta(), ad.delta())


def _nested(index_gate_up=0, index_down=1):
    return {"params/experts/gate_up_proj": peft.TargetParameter(
        "experts.gate_up_proj", expert_axis=0, index=index_gate_up),
        "params/experts/down_proj": peft.TargetParameter(
            "experts.down_proj", expert_axis=0, index=index_down)}


def test_nested_parameter_wrappers_follow_registration_order(tmp_path):
    base, merged = _tree(NESTED)
    layouts = {"params/experts/.*": "sio"}
    adapters = peft.load(NESTED / "adapter", base, names=_nested(), layouts=layouts)
    ours = merge(base, adapters)
    for path in base:
        np.testing.assert_allclose(ours[path], merged[path], **TOL, err_msg=path)
    theirs = _file(NESTED / "adapter")
    assert "base_model.model.experts.base_layer.lora_A.weight" in theirs  # gate_up_proj
    back = _file(peft.save(tmp_path / "back", adapters, names=_nested()))
    assert sorted(back) == sorted(theirs)
    for key, value in theirs.items():
        np.testing.assert_array_equal(back[key], value, err_msg=key)
    with pytest.raises(ValueError, match=r"module 'experts' .* give each TargetParameter its "
                                         r"place in that order with `index=` \(0 \.\. 1\)"):
        peft.load(NESTED / "adapter", base, names=_nested(None, None), layouts=layouts)
    with pytest.raises(ValueError, match=r"'experts.base_layer' \(parameter 'experts.down_proj'"
                                         r".*lora_A \(6, 5\) and lora_B \(8, 6\), but 3 "
                                         r"expert\(s\) of fan-in 4"):
        peft.load(NESTED / "adapter", base, names=_nested(1, 0), layouts=layouts)


def test_target_parameters_need_their_kernels_named():
    base, _ = _tree(NESTED)
    with pytest.raises(ValueError, match=r"sets `target_parameters`=\['experts.gate_up_proj', "
                                         r"'experts.down_proj'\].*TargetParameter"):
        peft.load(NESTED / "adapter", base, layouts={"params/experts/.*": "sio"})
    names = {"params/experts/gate_up_proj": _nested()["params/experts/gate_up_proj"]}
    with pytest.raises(ValueError, match=r"Module 'experts' in .* adapts a target parameter"):
        peft.load(NESTED / "adapter", base, names=names, layouts={"params/experts/.*": "sio"})


def test_what_peft_cannot_hold_is_refused(tmp_path):
    params = {"wi": jnp.ones((3, 4, 5))}
    names = {"wi": peft.TargetParameter("experts.wi", expert_axis=0)}
    made = random_adapters(params, jlora.LoraConfig(rank=1, targets="wi",
                                                    layouts={"wi": "sio"}, dropout=0.1))
    with pytest.raises(ValueError, match=r"without DoRA and dropout only"):
        peft.save(tmp_path / "a", made, names=names)
    made = {p: a.replace(dropout=0.0) for p, a in made.items()}
    with pytest.raises(ValueError, match=r"expert_axis=1 .* must be a stacked axis"):
        peft.save(tmp_path / "b", made, names={"wi": peft.TargetParameter("e.wi", expert_axis=1)})
    with pytest.raises(ValueError, match=r"must hold one '\{\}' per stacked axis other than"):
        peft.save(tmp_path / "c", made, names={
            "wi": peft.TargetParameter("layers.{}.wi", expert_axis=0)})
    with pytest.raises(ValueError, match=r"full torch name"):
        peft.TargetParameter("gate_up_proj")
