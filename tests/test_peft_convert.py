"""Moving adapters between codebases and PEFT: fused and split projections
(`jlora.peft.Split`, `jlora.peft.Part`), name templates (`jlora.peft.templates`) and
PiSSA / OLoRA / CorDA adapters converted to plain LoRA (`jlora.peft.convert_to_original_base`,
`jlora.peft.to_original_base`).

The fixtures under tests/fixtures/peft/<case>/ (those with a convert.json) were written by
PEFT 0.21.2 with torch 2.13.0 and transformers 4.46.3 (scripts/make_peft_fixtures.py):
PEFT's adapter directories, and the base and PEFT's merged weights in the layout of each
JAX tree (the ``gemma`` package's, Tunix's, MaxText's). jlora loads each directory into
that tree and must give PEFT's merged weights to 1e-5; where the conversion only moves
factors, saving them back must give PEFT's tensors bit for bit.
"""

import json
import math
import pathlib
import re

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


def _tree(case: str, tree: str = "flax"):
    """``(base, merged)`` flat ``{path: array}`` of a fixture's JAX tree."""
    stored = safetensors.numpy.load_file(FIXTURES / case / f"{tree}.safetensors")
    base = {k[5:]: jax.device_put(v) for k, v in stored.items() if k.startswith("base/")}
    merged = {k[7:]: v for k, v in stored.items() if k.startswith("merged/")}
    return base, merged


def _file(path):
    return safetensors.numpy.load_file(pathlib.Path(path) / "adapter_model.safetensors")


def _config(path):
    return json.loads((pathlib.Path(path) / "adapter_config.json").read_text())


def _assert_merges_like_peft(params, adapters, merged):
    ours = merge(params, adapters)
    for path in adapters:
        np.testing.assert_allclose(ours[path], merged[path], **TOL, err_msg=path)
    untouched = [p for p in params if p not in adapters]
    for path in untouched:  # what PEFT does not adapt stays as it is
        np.testing.assert_array_equal(ours[path], params[path], err_msg=path)


def _module_deltas(tensors: dict, config: dict) -> dict:
    """``{module: scale * lora_B @ lora_A}`` of a PEFT file, PEFT's own way."""
    out = {}
    for key, a in tensors.items():
        if not key.endswith(".lora_A.weight"):
            continue
        name = key[len(peft.PREFIX):-len(".lora_A.weight")]
        b = tensors[key.replace("lora_A", "lora_B")]
        alpha = config["alpha_pattern"].get(
            peft.get_pattern_key(list(config["alpha_pattern"]), name), config["lora_alpha"])
        rank = a.shape[0]
        scale = alpha / (math.sqrt(rank) if config["use_rslora"] else rank)
        out[name] = scale * (b.astype(np.float64) @ a.astype(np.float64))
    return out


# -- the gemma package <-> transformers' Gemma ---------------------------------------------


@pytest.fixture(scope="module")
def gemma_kv():
    base, merged = _tree("gemma_kv")
    t = peft.templates.gemma()
    adapters = peft.load(FIXTURES / "gemma_kv" / "adapter", base, names=t, layouts=t.layouts(base))
    return base, merged, t, adapters


def test_gemma_template_gives_peft_merged_weights(gemma_kv):
    base, merged, _, adapters = gemma_kv
    assert sorted(adapters) == sorted(base)  # every kernel of the tree, embedding included
    kv = adapters["params/layer_1/attn/kv_einsum/w"]
    assert (kv.layout.axes, kv.rank, kv.a.shape) == ("soio", 2, (2, 8, 2))
    gating = adapters["params/layer_0/mlp/gating_einsum"]
    assert (gating.layout.axes, gating.b.shape) == ("soi", (2, 2, 10))
    assert adapters["params/layer_0/attn/q_einsum/w"].rank == 3  # rank_pattern q_proj
    assert adapters["params/layer_0/attn/attn_vec_einsum/w"].scale == 1.5  # alpha_pattern
    _assert_merges_like_peft(base, adapters, merged)


def test_gemma_template_saves_peft_tensors_bit_for_bit(gemma_kv, tmp_path):
    _, _, t, adapters = gemma_kv
    out = peft.save(tmp_path / "back", adapters, names=t)
    theirs, ours = _file(FIXTURES / "gemma_kv" / "adapter"), _file(out)
    assert sorted(ours) == sorted(theirs)
    for key, value in theirs.items():
        np.testing.assert_array_equal(ours[key], value, err_msg=key)
    deltas = _module_deltas(theirs, _config(FIXTURES / "gemma_kv" / "adapter"))
    mine = _module_deltas(ours, _config(out))
    for name, delta in deltas.items():  # the same scales, read the way PEFT reads them
        np.testing.assert_allclose(mine[name], delta, rtol=1e-12, err_msg=name)


def _gemma1_mlp(params, x):
    """Gemma 1's MLP: ``gating_einsum`` stored ``(2, D, F)``, read as such."""
    gate, up = jnp.einsum("td,cdf->ctf", x, params["params/layer_0/mlp/gating_einsum"])
    return jnp.einsum("tf,fd->td", jax.nn.gelu(gate) * up, params["params/layer_0/mlp/linear"])


@pytest.mark.parametrize("transpose", [True, False])
def test_template_layouts_are_checked_against_the_model(transpose):
    # A square gating_einsum (D == F) fits both of the template's orientations, so no
    # shape check can tell them apart: the model's own einsum must.
    rng = np.random.default_rng(0)
    params, x = jax.device_put((
        {"params/layer_0/mlp/gating_einsum": rng.standard_normal((2, 6, 6)).astype(np.float32),
         "params/layer_0/mlp/linear": rng.standard_normal((6, 6)).astype(np.float32)},
        rng.standard_normal((5, 6)).astype(np.float32)))
    t = peft.templates.gemma(transpose_gating_einsum=transpose)
    layouts = t.layouts(params)
    assert all(layout.guessed for layout in layouts.values())
    config = jlora.LoraConfig(rank=2, alpha=2.0, targets=".*", layouts=layouts)
    adapters = random_adapters(params, config)
    if transpose:  # Gemma 3's order, (2, F, D): the wrong one for this model
        with pytest.raises(jlora.LayoutError,
                           match=r"(?s)layer_0/mlp/gating_einsum.*'soi'.*'sio'"):
            jlora.lora(_gemma1_mlp)(params, adapters, x)
    else:
        np.testing.assert_allclose(jlora.lora(_gemma1_mlp)(params, adapters, x),
                                   _gemma1_mlp(jlora.merge(params, adapters), x), **TOL)


def test_stacked_parts_of_different_ranks_are_refused_with_the_fix():
    base, _ = _tree("gemma_qkv")
    t = peft.templates.gemma()
    with pytest.raises(ValueError, match=r"(?s)qkv_einsum/w' have different ranks.*'ooio'"):
        peft.load(FIXTURES / "gemma_qkv" / "adapter", base, names=t, layouts=t.layouts(base))


@pytest.fixture(scope="module")
def gemma_qkv_fused():
    base, merged = _tree("gemma_qkv")
    t = peft.templates.gemma()
    layouts = {r".*/qkv_einsum/w": "ooio", **t.layouts(base)}
    adapters = peft.load(FIXTURES / "gemma_qkv" / "adapter", base, names=t, layouts=layouts)
    return base, merged, t, layouts, adapters


def test_separate_modules_fuse_into_a_block_adapter(gemma_qkv_fused):
    base, merged, _, _, adapters = gemma_qkv_fused
    qkv = adapters["params/layer_0/attn/qkv_einsum/w"]
    # q and k rank 2, v rank 3: A concatenated, B block diagonal
    assert (qkv.layout.axes, qkv.rank, qkv.a.shape, qkv.b.shape) == (
        "ooio", 7, (8, 7), (7, 3, 2, 6))
    assert not np.any(qkv.b[:2, 1:]) and not np.any(qkv.b[2:4, [0, 2]])
    assert not np.any(qkv.b[4:, :2])
    _assert_merges_like_peft(base, adapters, merged)


def test_a_block_adapter_splits_back_into_the_modules(gemma_qkv_fused, tmp_path):
    _, _, t, _, adapters = gemma_qkv_fused
    out = peft.save(tmp_path / "back", adapters, names=t)
    theirs = _file(FIXTURES / "gemma_qkv" / "adapter")
    ours = _file(out)
    assert sorted(ours) == sorted(theirs)
    for key in theirs:  # each module gets its own block back: PEFT's ranks
        assert ours[key].shape == theirs[key].shape, key
    mine = _module_deltas(ours, _config(out))
    for name, delta in _module_deltas(theirs, _config(FIXTURES / "gemma_qkv" / "adapter")).items():
        np.testing.assert_allclose(mine[name], delta, rtol=1e-6, atol=1e-7, err_msg=name)


def test_keep_rank_refuses_a_block_adapter():
    base, _ = _tree("gemma_qkv")
    t = peft.templates.gemma()
    split = t("params/layer_0/attn/qkv_einsum/w")

    def names(path):
        entry = t(path)
        if isinstance(entry, peft.Split) and "qkv" in path:
            return peft.Split(entry.names, axis=0, keep_rank=True)
        return entry

    with pytest.raises(ValueError, match=r"ranks \[2, 2, 3\].*rank 7.*keep_rank"):
        peft.load(FIXTURES / "gemma_qkv" / "adapter", base, names=names,
                  layouts={r".*/qkv_einsum/w": "ooio", **t.layouts(base)})
    assert split.names[2] == "model.layers.0.self_attn.v_proj"


# -- Tunix and MaxText <-> transformers' Llama ---------------------------------------------


@pytest.mark.parametrize("tree", ["tunix", "maxtext"])
def test_tunix_and_maxtext_templates_round_trip_peft_llama(tree, tmp_path):
    base, merged = _tree("llama", tree)
    t = getattr(peft.templates, tree)()
    adapters = peft.load(FIXTURES / "llama" / "adapter", base, names=t, layouts=t.layouts(base))
    assert sorted(adapters) == sorted(merged)
    _assert_merges_like_peft(base, adapters, merged)
    theirs = _file(FIXTURES / "llama" / "adapter")
    ours = _file(peft.save(tmp_path / "back", adapters, names=t))
    assert sorted(ours) == sorted(theirs)
    for key, value in theirs.items():
        np.testing.assert_array_equal(ours[key], value, err_msg=key)


def test_maxtext_llama_queries_scaled_and_interleaved(tmp_path):
    """MaxText's Llama converter: query = q_proj / sqrt(head_dim), query and key features
    interleaved for its RoPE (param_mapping.py's LLAMA31 hooks)."""
    head_dim = 4
    query, key = (f"params/decoder/layers/self_attention/{m}/kernel" for m in ("query", "key"))
    base, merged = _tree("llama", "maxtext_llama")
    t = peft.templates.maxtext(query_scale=head_dim ** -0.5, interleaved_rope=True)
    adapters = peft.load(FIXTURES / "llama" / "adapter", base, names=t, layouts=t.layouts(base))
    assert adapters[query].policy == "custom" and adapters[key].policy == "rslora"
    _assert_merges_like_peft(base, adapters, merged)
    theirs = _file(FIXTURES / "llama" / "adapter")
    out = peft.save(tmp_path / "back", adapters, names=t)
    ours = _file(out)
    for k, value in theirs.items():
        np.testing.assert_array_equal(ours[k], value, err_msg=k)
    mine = _module_deltas(ours, _config(out))
    for name, delta in _module_deltas(theirs, _config(FIXTURES / "llama" / "adapter")).items():
        np.testing.assert_allclose(mine[name], delta, rtol=1e-12, err_msg=name)


def test_templates_name_every_kernel_they_give_a_layout():
    t = peft.templates.maxtext(scan_axis=None)
    assert t("decoder/layers_3/self_attention/out/kernel") == "model.layers.3.self_attn.o_proj"
    assert t.layout_patterns[r"(params/)?decoder/layers_\d+/self_attention/out/kernel"] == "iio"
    assert peft.templates.tunix()("layers/1/attn/qkv_einsum/w").names == (
        "model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.k_proj",
        "model.layers.1.self_attn.v_proj")
    assert peft.templates.gemma(transpose_gating_einsum=False).layout_patterns[
        r"(params/)?layer_\d+/mlp/gating_einsum"] == "sio"
    assert peft.templates.gemma()("params/final_norm/scale") is None  # default name


# -- GPT-2's fused c_attn <-> separate query, key and value kernels --------------------------


def _gpt2_parts():
    """The gpt2 fixture's Flax tree with c_attn (3·d, in) cut into q, k, v (d, in)."""
    stored = safetensors.numpy.load_file(FIXTURES / "gpt2" / "flax.safetensors")
    out = {}
    for prefix in ("base", "merged"):
        flat = {k[len(prefix) + 1:]: v for k, v in stored.items() if k.startswith(prefix + "/")}
        tree = {}
        for key, value in flat.items():
            if key.endswith("c_attn/kernel"):
                for part, w in zip("qkv", np.split(value, 3), strict=True):
                    tree[key.replace("c_attn", part)] = jax.device_put(w)
            elif "c_attn" not in key and key.endswith("kernel"):
                tree[key] = jax.device_put(value)
        out[prefix] = tree
    names = {p: peft.Part(f"transformer.h.{p.split('/')[3]}.attn.c_attn", "qkv".index(
        p.split("/")[-2])) for p in out["base"] if "/attn/" in p and p.endswith(
            ("q/kernel", "k/kernel", "v/kernel"))}
    layouts = {p: "oi" for p in out["base"]}
    return out["base"], out["merged"], names, layouts


def test_a_fused_peft_module_loads_into_separate_kernels():
    base, merged, names, layouts = _gpt2_parts()
    adapters = peft.load(FIXTURES / "gpt2" / "adapter", base, names=names, layouts=layouts)
    q = adapters["params/transformer/h/0/attn/q/kernel"]
    k = adapters["params/transformer/h/0/attn/k/kernel"]
    assert q.rank == k.rank == 2 and bool((q.a == k.a).all())  # the fused A, shared
    _assert_merges_like_peft(base, adapters, merged)


def _separate_adapters(base, names, scale_v: bool):
    parts = sorted(names)
    config = jlora.LoraConfig(rank=2, alpha=4.0, targets="|".join(map(re.escape, parts)),
                              rank_pattern={r".*/k/kernel": 1},
                              # k: rank 1, scale 2 like q; v: scale 1 if scale_v
                              alpha_pattern={r".*/k/kernel": 2.0,
                                             **({r".*/v/kernel": 2.0} if scale_v else {})},
                              layouts={p: "oi" for p in parts})
    return random_adapters(base, config)


def test_separate_kernels_save_as_one_block_module_and_come_back(tmp_path):
    base, _, names, layouts = _gpt2_parts()
    adapters = _separate_adapters(base, names, scale_v=False)
    out = peft.save(tmp_path / "fused", adapters, names=names)
    tensors = _file(out)
    a = tensors["base_model.model.transformer.h.0.attn.c_attn.lora_A.weight"]
    b = tensors["base_model.model.transformer.h.0.attn.c_attn.lora_B.weight"]
    assert a.shape == (5, 8) and b.shape == (24, 5)  # ranks 2 + 1 + 2
    assert not b[:8, 2:].any() and not b[8:16, [0, 1, 3, 4]].any() and not b[16:, :3].any()
    back = peft.load(out, base, names=names, layouts=layouts)
    for path, ad in adapters.items():  # block diagonal: each part's own factors, exactly
        assert back[path].rank == ad.rank, path
        np.testing.assert_array_equal(back[path].a, ad.a, err_msg=path)
        np.testing.assert_array_equal(back[path].b, ad.b, err_msg=path)
        assert back[path].scale == ad.scale


def test_parts_with_other_scales_fold_them_into_b(tmp_path):
    base, _, names, layouts = _gpt2_parts()
    adapters = _separate_adapters(base, names, scale_v=True)
    back = peft.load(peft.save(tmp_path / "fused", adapters, names=names), base, names=names,
                     layouts=layouts)
    for path, ad in adapters.items():
        np.testing.assert_allclose(back[path].delta(), ad.delta(), rtol=1e-6, atol=1e-6)
    keep = {p: peft.Part(n.name, n.index, keep_rank=True) for p, n in names.items()}
    with pytest.raises(ValueError, match=r"different lora_A factors.*rank 5"):
        peft.save(tmp_path / "refused", adapters, names=keep)


def test_a_fused_kernel_saves_as_separate_modules_sharing_a(tmp_path):
    params = {"attn/qkv/kernel": jnp.zeros((6, 9))}
    ad = random_adapters(params, jlora.LoraConfig(rank=2, targets=".*"))
    names = {"attn/qkv/kernel": peft.Split(["q", "k", "v"], axis=1, sizes=(3, 4, 2))}
    out = peft.save(tmp_path / "split", ad, names=names)
    tensors = _file(out)
    np.testing.assert_array_equal(tensors["base_model.model.q.lora_A.weight"],
                                  tensors["base_model.model.v.lora_A.weight"])
    assert tensors["base_model.model.k.lora_B.weight"].shape == (4, 2)
    back = peft.load(out, params, names=names)["attn/qkv/kernel"]
    assert back.rank == 2  # equal A and scale: the fused adapter's own rank
    np.testing.assert_array_equal(back.a, ad["attn/qkv/kernel"].a)
    np.testing.assert_array_equal(back.b, ad["attn/qkv/kernel"].b)


def test_a_part_without_a_module_in_the_file_stays_as_it_is(tmp_path):
    params = {"kv/w": jnp.zeros((2, 3, 4))}
    full = random_adapters(params, jlora.LoraConfig(rank=2, targets=".*",
                                                   layouts={".*": "sio"}))["kv/w"]
    full = full.replace(b=jnp.ones_like(full.b))
    only_k = {"k/w": full.replace(a=full.a[0], b=full.b[0], layout=jlora.layouts.Layout("io"))}
    out = peft.save(tmp_path / "k_only", only_k, names={"k/w": "m.k"})
    back = peft.load(out, params, names={"kv/w": peft.Split(["m.k", "m.v"])},
                     layouts={".*": "sio"})["kv/w"]
    np.testing.assert_array_equal(back.delta()[0], only_k["k/w"].delta())
    assert not back.delta()[1].any()


@pytest.mark.parametrize("names, layouts, match", [
    ({"w": peft.Split(["a", "b"], axis=1)}, {"w": "io"},
     r"size 5 along split axis 1, which does not divide into 2 equal parts"),
    ({"w": peft.Split(["a", "b"], axis=0)}, {"w": "io"}, r"axis 0 .* role 'i'.*stacked axis"),
    ({"w": peft.Split(["a", "b"], axis=3)}, {"w": "io"}, r"axis 3 is out of range"),
    ({"w": peft.Split(["a", "b", "c"], axis=0)}, {"w": "sio"},
     r"Stacked axis 0 .* size 4 but the Split names 3 modules"),
    ({"w": peft.Part("m", 1)}, {"w": "io"}, r"Part indices of module 'm' must be 0 \.\. n-1"),
])
def test_bad_splits_are_refused(tmp_path, names, layouts, match):
    shape = (4, 3, 5) if layouts["w"] == "sio" else (3, 5)
    params = {"w": jnp.ones(shape)}
    ads = random_adapters(params, jlora.LoraConfig(rank=1, targets="w", layouts=layouts))
    with pytest.raises(ValueError, match=match):
        peft.save(tmp_path / "x", ads, names=names)


def test_split_and_part_arguments_are_checked():
    with pytest.raises(ValueError, match="two or more module names"):
        peft.Split("q_proj")
    with pytest.raises(ValueError, match="one positive int per name"):
        peft.Split(["a", "b"], axis=1, sizes=(3,))
    with pytest.raises(ValueError, match="index` must be an int >= 0"):
        peft.Part("c_attn", -1)


# -- PiSSA, OLoRA and CorDA -> plain LoRA on the original base -----------------------------


@pytest.mark.parametrize("case", ["pissa", "olora", "corda"])
def test_conversion_matches_peft_and_loads_on_the_original_base(case, tmp_path):
    root = FIXTURES / case
    out = peft.convert_to_original_base(root / "trained", root / "initial", tmp_path / "plain")
    theirs, ours = _file(root / "converted"), _file(out)
    assert sorted(ours) == sorted(theirs)
    for key, value in theirs.items():  # [A ; A0] and [B | -B0], bit for bit
        np.testing.assert_array_equal(ours[key], value, err_msg=key)
    mine, peft_config = _config(out), _config(root / "converted")
    for field in ("r", "lora_alpha", "rank_pattern", "alpha_pattern", "use_rslora",
                  "init_lora_weights", "target_modules"):
        assert mine[field] == peft_config[field], field
    base, merged = _tree(case)
    adapters = peft.load(out, base)
    _assert_merges_like_peft(base, adapters, merged)
    stored = safetensors.numpy.load_file(root / "torch.safetensors")
    p = merge(base, adapters)
    y = jnp.tanh(stored["x/x"] @ p["params/fc1/kernel"] + p["params/fc1/bias"][None])
    y = y @ p["params/fc2/kernel"] + p["params/fc2/bias"][None]
    np.testing.assert_allclose(y, stored["y/y"], **TOL)


def test_conversion_refuses_what_it_cannot_convert(tmp_path):
    root = FIXTURES / "pissa"
    with pytest.raises(ValueError, match=r"init_lora_weights=True: only adapters whose init"):
        peft.convert_to_original_base(root / "converted", root / "initial", tmp_path / "a")
    with pytest.raises(ValueError, match=r"`r` is 2 in .* but 4 in the initial"):
        peft.convert_to_original_base(root / "trained", root / "converted", tmp_path / "b")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def _write_adapter(path, tensors, **config):
    path.mkdir()
    safetensors.numpy.save_file(tensors, path / "adapter_model.safetensors")
    (path / "adapter_config.json").write_text(json.dumps(dict(peft_type="LORA", **config)))


def test_conversion_keeps_every_scale_where_peft_refuses(tmp_path):
    """rsLoRA with alpha patterns (PEFT refuses to convert), an embedding (PEFT's
    conversion drops it) and a full weight (copied)."""
    rng = np.random.default_rng(0)
    prefix = "base_model.model."

    def factors():
        return {prefix + "fc.lora_A.weight": rng.normal(size=(1, 4)).astype(np.float32),
                prefix + "fc.lora_B.weight": rng.normal(size=(3, 1)).astype(np.float32),
                prefix + "emb.lora_embedding_A": rng.normal(size=(2, 6)).astype(np.float32),
                prefix + "emb.lora_embedding_B": rng.normal(size=(4, 2)).astype(np.float32)}

    config = dict(r=2, lora_alpha=3, use_rslora=True, rank_pattern={"fc": 1},
                  alpha_pattern={"emb": 5}, target_modules=["fc", "emb"])
    trained, initial = factors(), factors()
    head = {prefix + "head.weight": np.ones((2, 2), np.float32)}
    _write_adapter(tmp_path / "trained", {**trained, **head}, init_lora_weights="olora", **config)
    _write_adapter(tmp_path / "initial", initial, init_lora_weights="olora", **config)
    out = peft.convert_to_original_base(tmp_path / "trained", tmp_path / "initial",
                                        tmp_path / "plain")
    new, tensors = _config(out), _file(out)
    assert (new["r"], new["rank_pattern"], new["init_lora_weights"]) == (4, {"fc": 2}, True)
    for name, rank in (("fc", 1), ("emb", 2)):  # rsLoRA: alpha / sqrt(r), unchanged
        old_alpha = config["alpha_pattern"].get(name, config["lora_alpha"])
        new_alpha = new["alpha_pattern"].get(name, new["lora_alpha"])
        assert math.isclose(new_alpha / math.sqrt(2 * rank), old_alpha / math.sqrt(rank),
                            rel_tol=1e-15)
    a, b = prefix + "emb.lora_embedding_A", prefix + "emb.lora_embedding_B"
    np.testing.assert_allclose(tensors[b] @ tensors[a], trained[b] @ trained[a]
                               - initial[b] @ initial[a], rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(tensors[prefix + "head.weight"], head[prefix + "head.weight"])


def test_to_original_base_equals_the_trained_model_on_its_new_base():
    rng = np.random.default_rng(1)
    params = jax.device_put({"d": {"kernel": rng.standard_normal((6, 4)).astype(np.float32)},
                             "s": {"kernel": rng.standard_normal((3, 5, 4)).astype(np.float32)}})
    config = jlora.LoraConfig(rank=2, alpha=1.5, scaling="rslora", init="pissa",
                              layouts={"s/kernel": "sio"})
    new_base, initial = jlora.variants.pissa_init(jax.random.key(0), params, config)
    trained = {p: a.replace(a=a.a + 0.1, b=a.b * 1.3) for p, a in initial.items()}
    plain = peft.to_original_base(trained, initial)
    assert {p: a.rank for p, a in plain.items()} == {"d/kernel": 4, "s/kernel": 4}
    assert all(plain[p].scale == trained[p].scale for p in plain)
    ours, theirs = merge(params, plain), merge(new_base, trained)
    for name in ("d", "s"):
        np.testing.assert_allclose(ours[name]["kernel"], theirs[name]["kernel"], **TOL)
    with pytest.raises(ValueError, match=r"only in `adapters`: \['d/kernel'\]"):
        peft.to_original_base(trained, {"s/kernel": initial["s/kernel"]})
    dora = {p: a.replace(variant="dora", magnitude=jnp.ones(a.b.shape[:-2] + a.b.shape[-1:]))
            for p, a in trained.items()}
    with pytest.raises(ValueError, match="is 'dora': its magnitude rescales"):
        peft.to_original_base(dora, {p: a.replace(variant="dora") for p, a in initial.items()})
