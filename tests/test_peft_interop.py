"""What PEFT saves beside the LoRA factors, both ways: full weights (``modules_to_save``,
``bias``, ``save_embedding_layers``), ``lora_bias``, ``trainable_token_indices`` and
``layers_to_transform`` subsets of a stacked kernel.

The fixtures under tests/fixtures/peft/<case>/ were written by PEFT 0.21.2 with torch
2.13.0 (scripts/make_peft_fixtures.py, which also checks, with ``--check-export``, that
PEFT loads jlora's export of each with the same numbers). Here jlora reads each
directory with ``jlora.peft.load_trainable``; ``jlora.merge_trainable`` must give PEFT's
merged weights and the model PEFT's output (float32, 1e-5), saving must give back PEFT's
file bit for bit, and the trained parts must train (and only they).
"""

import json
import re
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import safetensors.numpy
from test_peft import FIXTURES, FORWARD, TOL, _dense, _nest, _section

import jlora
from jlora import peft


def _lm(P, x):
    h = jnp.tanh(_dense(P["fc"], P["embed_tokens"]["embedding"][x["ids"]]))
    return {"logits": h @ P["lm_head"]["kernel"], "score": _dense(P["score"], h)}


MODELS = {**FORWARD, "lm": _lm}
# Each fixture's PEFT config in split_trainable's terms, and the save options that give
# back PEFT's file.
SPLIT = {
    "full_weights": dict(modules_to_save="params/score/.*"),
    "bias_all": dict(bias="all"),
    "lora_bias": dict(lora_bias=True, bias="lora_only"),
    "tokens": dict(trainable_tokens={"params/embed_tokens/embedding": [1, 4, 7],
                                     "params/lm_head/kernel": [2, 5]}),
    "layers": {},
}
SAVE = {"full_weights": dict(save_embedding_layers=".*/(embed_tokens|lm_head)/.*")}
CONFIG_FIELDS = ("bias", "lora_bias", "modules_to_save", "trainable_token_indices",
                 "layers_to_transform", "layers_pattern")


def _read(name):
    root = FIXTURES / name
    meta = json.loads((root / "case.json").read_text())
    stored = safetensors.numpy.load_file(root / "flax.safetensors")
    x = {k: (v.astype(np.int32) if v.dtype.kind == "i" else v)
         for k, v in _section(stored, "x").items()}
    return dict(name=name, root=root, meta=meta, params=_nest(_section(stored, "base")), x=x,
                y=_section(stored, "y"), merged=_section(stored, "merged"))


@pytest.fixture(scope="module", params=sorted(SPLIT))
def case(request):
    c = _read(request.param)
    c["trainable"], c["frozen"] = peft.load_trainable(
        c["root"] / "adapter", c["params"], layouts=c["meta"]["layouts"])
    return c


def _forward(case):
    model = MODELS[case["meta"]["model"]]
    return lambda params, x: model(params["params"], x)


# -- PEFT -> jlora -----------------------------------------------------------------------


def test_load_trainable_gives_peft_merge_and_output_and_lora_agrees(case):
    """merge_trainable is PEFT's merge_and_unload; the model's output on it is PEFT's; and
    jlora.lora on the params with the trained parts applied gives the same output."""
    forward = _forward(case)

    @jax.jit
    def run(trainable, frozen, x):
        merged = jlora.merge_trainable(trainable, frozen)
        params = jlora.merge_trainable(trainable, frozen, merge_adapters=False)
        return merged, forward(merged, x), jlora.lora(forward)(params, trainable["adapters"], x)

    for module, scale in case["meta"]["peft_scales"].items():  # PEFT's modules only
        layer = module.split(".")[1] if module.startswith("layers.") else None
        path = next(m["flax"] for m in case["meta"]["modules"]
                    if module in (m["torch"], m["torch"].format(layer)))
        ad = case["trainable"]["adapters"][path + ("/embedding" if "embed" in path else "/kernel")]
        assert ad.scale == pytest.approx(scale, rel=1e-12), module
    merged, y, y_lora = run(case["trainable"], case["frozen"], case["x"])
    flat = jlora.select(merged, ".*")
    assert sorted(flat) == sorted(case["merged"])
    for path, want in case["merged"].items():
        np.testing.assert_allclose(flat[path], want, **TOL, err_msg=path)
    for name, want in case["y"].items():
        np.testing.assert_allclose(y[name], want, **TOL, err_msg=name)
        np.testing.assert_allclose(y_lora[name], y[name], **TOL, err_msg=name)


def test_load_trainable_has_split_trainables_structure(case):
    """What load_trainable returns is what split_trainable gives for the same fine-tune."""
    want_t, want_f = jlora.split_trainable(case["params"], case["trainable"]["adapters"],
                                           **SPLIT[case["name"]])
    assert jax.tree.structure(case["trainable"]) == jax.tree.structure(want_t)
    assert jax.tree.structure(case["frozen"]) == jax.tree.structure(want_f)


def test_load_refuses_what_adapters_cannot_carry(case):
    if case["name"] == "layers":
        adapters = peft.load(case["root"] / "adapter", case["params"],
                             layouts=case["meta"]["layouts"])
        assert adapters.keys() == case["trainable"]["adapters"].keys()
        return
    with pytest.raises(ValueError, match=r"holds trained weights beside the LoRA factors.*"
                                         r"base_model\.model\..*load_trainable"):
        peft.load(case["root"] / "adapter", case["params"], layouts=case["meta"]["layouts"])


def test_save_gives_back_peft_files(case, tmp_path):
    out = peft.save(tmp_path / "again", case["trainable"], base=case["params"],
                    **SAVE.get(case["name"], {}))
    theirs = safetensors.numpy.load_file(case["root"] / "adapter" / peft.WEIGHTS_NAME)
    ours = safetensors.numpy.load_file(out / peft.WEIGHTS_NAME)
    assert sorted(ours) == sorted(theirs)
    for key, value in theirs.items():
        assert ours[key].dtype == value.dtype and np.array_equal(ours[key], value), key
    their_cfg = json.loads((case["root"] / "adapter" / peft.CONFIG_NAME).read_text())
    our_cfg = json.loads((out / peft.CONFIG_NAME).read_text())
    for field in CONFIG_FIELDS:
        assert our_cfg[field] == their_cfg[field], field
    back, _ = peft.load_trainable(out, case["params"], layouts=case["meta"]["layouts"])
    same = jax.tree.map(lambda x, y: bool(np.array_equal(x, y)), back, case["trainable"])
    assert jax.tree.all(same)


# -- training: only the trained parts move -------------------------------------------------


def _train(case, steps=2):
    forward = _forward(case)
    frozen = case["frozen"]

    def loss(trainable):  # (the factored path has the same gradients: see below)
        out = forward(jlora.merge_trainable(trainable, frozen), case["x"])
        return sum(jnp.sum(jnp.sin(v)) for v in jax.tree.leaves(out))

    opt = optax.adamw(0.05, weight_decay=0.1)
    trainable, state = case["trainable"], opt.init(case["trainable"])

    @jax.jit
    def step(trainable, state):
        updates, state = opt.update(jax.grad(loss)(trainable), state, trainable)
        return optax.apply_updates(trainable, updates), state

    for _ in range(steps):
        trainable, state = step(trainable, state)
    return trainable


@pytest.mark.parametrize("name", ["layers", "tokens"])
def test_training_moves_the_trained_parts_only(name):
    """Under adamw with weight decay: the layers PEFT's layers_to_transform leaves out keep
    zero factors and their kernels stay the base's bit for bit; only the trainable tokens'
    entries of a table change. (LoraBias gradients: the lora equation test below.)"""
    c = _read(name)
    c["trainable"], c["frozen"] = peft.load_trainable(c["root"] / "adapter", c["params"],
                                                      layouts=c["meta"]["layouts"])
    trained = _train(c)
    moved = jax.tree.map(lambda a, b: bool((a != b).any()), trained, c["trainable"])
    assert all(jax.tree.leaves(moved)), moved
    merged = jlora.select(jax.jit(jlora.merge_trainable)(trained, c["frozen"]), ".*")
    base = jlora.select(c["params"], ".*")
    if name == "layers":
        ad = trained["adapters"]["params/layers/proj/kernel"]
        assert not np.asarray(ad.a[1]).any() and not np.asarray(ad.b[1]).any()
        kernel = "params/layers/proj/kernel"
        assert np.array_equal(merged[kernel][1], base[kernel][1])
        assert not np.array_equal(merged[kernel][0], base[kernel][0])
    if name == "tokens":
        for path, ids, axis in (("params/embed_tokens/embedding", [1, 4, 7], 0),
                                ("params/lm_head/kernel", [2, 5], 1)):
            rest = [i for i in range(base[path].shape[axis]) if i not in ids]
            np.testing.assert_array_equal(np.take(merged[path], rest, axis),
                                          np.take(base[path], rest, axis))
            assert (np.take(merged[path], ids, axis) != np.take(base[path], ids, axis)).all()


def test_export_of_trained_layers_subset(tmp_path):
    """A stacked kernel trained on some layers is written as those layers' modules, with
    PEFT's layers_to_transform; jit-traced export writes every layer."""
    c = _read("layers")
    ads = peft.load(c["root"] / "adapter", c["params"], layouts=c["meta"]["layouts"])
    out = peft.save(tmp_path / "out", ads)
    keys = safetensors.numpy.load_file(out / peft.WEIGHTS_NAME)
    assert sorted({k.split(".")[3] for k in keys}) == ["0", "2"]
    cfg = json.loads((out / peft.CONFIG_NAME).read_text())
    assert cfg["layers_to_transform"] == [0, 2] and cfg["layers_pattern"] == "layers"
    assert cfg["target_modules"] == ["layers.0.proj", "layers.2.proj"]
    traced = jax.eval_shape(lambda a: peft.export(a)[1], ads)
    assert len(traced) == 6


# -- full weights that repeat the base -----------------------------------------------------


@pytest.fixture
def full_weights(tmp_path):
    c = _read("full_weights")
    shutil.copytree(c["root"] / "adapter", tmp_path / "adapter")
    c["dir"] = tmp_path / "adapter"
    return c


def _rewrite(directory, drop=(), change=None, **config):
    tensors = safetensors.numpy.load_file(directory / peft.WEIGHTS_NAME)
    tensors = {k: v for k, v in tensors.items() if not any(d in k for d in drop)}
    for key, fn in (change or {}).items():
        tensors[key] = fn(tensors[key])
    safetensors.numpy.save_file(tensors, directory / peft.WEIGHTS_NAME)
    cfg = json.loads((directory / peft.CONFIG_NAME).read_text()) | config
    (directory / peft.CONFIG_NAME).write_text(json.dumps(cfg))


def test_base_weights_that_repeat_the_base_are_recognised(full_weights):
    """save_embedding_layers' copies of the base load with plain `load`; a copy that
    differs is refused, or used (`base_weights="file"`), or ignored ("params")."""
    c, d = full_weights, full_weights["dir"]
    _rewrite(d, drop=["score."], modules_to_save=None)
    ads = peft.load(d, c["params"])
    assert sorted(ads) == ["params/embed_tokens/embedding", "params/fc/kernel",
                           "params/lm_head/kernel"]
    key = peft.PREFIX + "embed_tokens.base_layer.weight"
    _rewrite(d, change={key: lambda w: w + (np.arange(w.shape[0])[:, None] == 3)})
    with pytest.raises(ValueError, match=r"embed_tokens\.base_layer\.weight.*differs.*max \|diff\|"
                                         r" 1.*load_trainable"):
        peft.load(d, c["params"])
    with pytest.raises(ValueError, match=r"embed_tokens\.base_layer\.weight.*save_embedding_layers"
                                         r".*differs.*base_weights='file'"):
        peft.load_trainable(d, c["params"])
    _, frozen = peft.load_trainable(d, c["params"], base_weights="file")
    table = np.asarray(c["params"]["params"]["embed_tokens"]["embedding"])
    np.testing.assert_array_equal(frozen["params"]["embed_tokens"]["embedding"],
                                  table + (np.arange(12)[:, None] == 3))
    _, frozen = peft.load_trainable(d, c["params"], base_weights="params")
    assert frozen["params"]["embed_tokens"]["embedding"] is c["params"]["params"][
        "embed_tokens"]["embedding"]
    with pytest.raises(ValueError, match=r"`base_weights` must be one of \['compare', 'file', "
                                         r"'params'\], got 'yes'"):
        peft.load_trainable(d, c["params"], base_weights="yes")


def test_inconsistent_files_are_refused(full_weights):
    c, d = full_weights, full_weights["dir"]
    _rewrite(d, modules_to_save=None)
    with pytest.raises(ValueError, match=r"'base_model\.model\.score\.bias'.*neither a LoRA "
                                         r"factor.*modules_to_save=None"):
        peft.load_trainable(d, c["params"])
    _rewrite(d, modules_to_save=["score"], target_modules=["fc", "lm_head"])
    with pytest.raises(ValueError, match=r"'embed_tokens' is in .*does not select it"):
        peft.load_trainable(d, c["params"])
    _rewrite(d, drop=["embed_tokens.lora"], target_modules=["fc", "lm_head"])
    with pytest.raises(ValueError, match=r"base weight of module 'embed_tokens', which has no "
                                         r"LoRA factors"):
        peft.load_trainable(d, c["params"])
    _rewrite(d, drop=["embed_tokens."])
    renamed = {"params": {**c["params"]["params"], "cls": c["params"]["params"]["score"]}}
    del renamed["params"]["score"]
    with pytest.raises(ValueError, match=r"torch parameter 'score\.(weight|bias)', which no leaf"
                                         r".*Closest: .*'cls\.(weight|bias)'"):
        peft.load_trainable(d, renamed)


def test_tokens_need_their_indices(tmp_path):
    c = _read("tokens")
    shutil.copytree(c["root"] / "adapter", tmp_path / "a")
    _rewrite(tmp_path / "a", trainable_token_indices=None)
    with pytest.raises(ValueError, match=r"holds trainable tokens but .* no "
                                         r"`trainable_token_indices`"):
        peft.load_trainable(tmp_path / "a", c["params"])
    _rewrite(tmp_path / "a", trainable_token_indices={"embed_tokens": [1, 4], "lm_head": [2, 5]})
    with pytest.raises(ValueError, match=r"holds 3 token vectors but `trainable_token_indices` "
                                         r"lists 2 tokens for module 'embed_tokens'"):
        peft.load_trainable(tmp_path / "a", c["params"])
    _rewrite(tmp_path / "a", trainable_token_indices=[1, 4, 7])
    with pytest.raises(ValueError, match=r"trainable tokens for 2 modules.*is a list"):
        peft.load_trainable(tmp_path / "a", c["params"])


# -- jlora -> PEFT -> jlora, and split_trainable's parts ----------------------------------

PARAMS = {
    "emb": {"embedding": jnp.linspace(-1.0, 1.0, 60).reshape(10, 6)},
    "layers": {"mlp": {"kernel": jnp.linspace(-0.5, 0.5, 108).reshape(3, 6, 6),
                       "bias": jnp.linspace(0.0, 0.3, 18).reshape(3, 6)}},
    "conv": {"kernel": jnp.linspace(-0.2, 0.2, 72).reshape(3, 3, 2, 4), "bias": jnp.ones(4)},
    "norm": {"scale": jnp.ones(6), "bias": jnp.zeros(6)},
    "head": {"kernel": jnp.linspace(0.1, 0.9, 18).reshape(6, 3), "bias": jnp.zeros(3)},
}
LAYOUTS = {"layers/mlp/kernel": "sio"}


def _adapters(targets, variant="lora", seed=0):
    """Adapters with random non-zero factors (numpy: no compilation) for ``PARAMS``."""
    cfg = jlora.LoraConfig(rank=2, alpha=3.0, targets=targets, variant=variant,
                           layouts={k: v for k, v in LAYOUTS.items() if re.fullmatch(targets, k)})
    rng = np.random.default_rng(seed)
    out = {}
    for path, p in jlora.plan(PARAMS, cfg).items():
        a_shape, b_shape = p.layout.factor_shapes(p.shape, p.rank)
        stacked, _, fan_out = p.layout.split_shape(p.shape)
        out[path] = jlora.Adapter(
            a=jax.device_put(rng.standard_normal(a_shape).astype(np.float32)),
            b=jax.device_put(rng.standard_normal(b_shape).astype(np.float32)),
            magnitude=jnp.ones((*stacked, *fan_out)) if variant == "dora" else None,
            layout=p.layout, rank=p.rank, alpha=p.alpha, scale=p.scale, policy="standard",
            variant=variant)
    return out


def _native():
    """Adapters on a stacked kernel (layer 1 not adapted) and a conv; trained: lora_bias
    on both, the norm in full, the head in full, tokens of the embedding; all random."""
    ads = _adapters("(layers/mlp|conv)/kernel")
    mlp = ads["layers/mlp/kernel"]
    ads["layers/mlp/kernel"] = mlp.replace(a=mlp.a.at[1].set(0.0), b=mlp.b.at[1].set(0.0))
    trainable, frozen = jlora.split_trainable(
        PARAMS, ads, modules_to_save="(norm|head)/.*", lora_bias=True,
        trainable_tokens={"emb/embedding": [0, 9]})
    rng = np.random.default_rng(1)
    trainable["params"] = jax.tree.map(
        lambda x: jax.device_put((np.asarray(x) + rng.standard_normal(x.shape)).astype(x.dtype)),
        trainable["params"])
    mlp_bias = trainable["params"]["layers"]["mlp"]["bias"]
    trainable["params"]["layers"]["mlp"]["bias"] = mlp_bias.replace(
        delta=mlp_bias.delta.at[1].set(0.0))
    return trainable, frozen


def test_native_round_trip_is_exact(tmp_path):
    trainable, frozen = _native()
    out = peft.save(tmp_path / "a", trainable, base=PARAMS)
    cfg = json.loads((out / peft.CONFIG_NAME).read_text())
    assert cfg["modules_to_save"] == ["head", "norm"] and cfg["lora_bias"] is True
    assert cfg["trainable_token_indices"] == {"emb": [0, 9]} and cfg["bias"] == "none"
    assert cfg["layers_to_transform"] == [0, 2]
    keys = sorted(safetensors.numpy.load_file(out / peft.WEIGHTS_NAME))
    assert f"{peft.PREFIX}layers.2.mlp.lora_B.bias" in keys
    assert not any(k.startswith(f"{peft.PREFIX}layers.1.") for k in keys)
    assert f"{peft.PREFIX}norm.weight" in keys and f"{peft.PREFIX}head.weight" in keys
    back, back_frozen = peft.load_trainable(out, PARAMS, layouts=LAYOUTS)
    assert jax.tree.structure(back) == jax.tree.structure(trainable)
    same = jax.tree.map(lambda x, y: x.dtype == y.dtype and bool(np.array_equal(x, y)),
                        back, trainable)
    assert jax.tree.all(same), same
    np.testing.assert_array_equal(
        jlora.select(jlora.merge_trainable(back, back_frozen), "head/kernel")["head/kernel"],
        trainable["params"]["head"]["kernel"])


def test_leaf_updates_obey_the_lora_equation_under_grad():
    """jlora.lora(f)(params, adapters) == f(jlora.merge(params, adapters)) with the trained
    parts applied to params, in value and in gradient w.r.t. every trained array."""
    trainable, frozen = _native()

    def f(params, ids):
        def layer(h, p):
            return jnp.tanh(h @ p["kernel"] + p["bias"][None]), None

        h = jax.lax.scan(layer, params["emb"]["embedding"][ids], params["layers"]["mlp"])[0]
        norm = params["norm"]
        return (h * norm["scale"][None] + norm["bias"][None]) @ params["head"]["kernel"]

    ids = jnp.array([0, 3, 9])

    def factored(t):
        params = jlora.merge_trainable(t, frozen, merge_adapters=False)
        return jnp.sum(jnp.sin(jlora.lora(f)(params, t["adapters"], ids)))

    def merged(t):
        return jnp.sum(jnp.sin(f(jlora.merge_trainable(t, frozen), ids)))

    (v1, g1), (v2, g2) = jax.jit(jax.value_and_grad(factored))(trainable), \
        jax.jit(jax.value_and_grad(merged))(trainable)
    np.testing.assert_allclose(v1, v2, **TOL)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, **TOL), g1, g2)
    assert np.abs(np.asarray(g1["params"]["emb"]["embedding"].values)).sum() > 0
    assert np.abs(np.asarray(g1["params"]["layers"]["mlp"]["bias"].delta)[2]).sum() > 0
    assert not np.asarray(g1["adapters"]["layers/mlp/kernel"].a[1]).any()  # zero factors


@pytest.mark.parametrize("kwargs, match", [
    (dict(trainable_tokens={"conv/kernel": [0]}), r"'conv/kernel'.*shape \(3, 3, 2, 4\).*2-D"),
    (dict(trainable_tokens={"head/kernel": [0]}), r"'head/kernel'.*also has an adapter"),
    (dict(trainable_tokens={"emb/embedding": [3, 3]}), r"ids \[3, 3\] must be distinct ints in"
                                                         r" \[0, 10\)"),
    (dict(trainable_tokens={"emb/embedding": [10]}), r"\[0, 10\) \(the size of axis 0\)"),
    (dict(trainable_tokens={"emb/embedding": [0]}, modules_to_save="emb/.*"),
     r"'emb/embedding'.*also trained in full"),
    (dict(trainable_tokens={"emb/embeding": [0]}), r"'emb/embeding', which is not a leaf.*"
                                                     r"'emb/embedding'"),
    (dict(trainable_tokens=[0]), r"`trainable_tokens` must be a dict"),
])
def test_split_trainable_refuses_bad_tokens(kwargs, match):
    ads = _adapters("(conv|head)/kernel")
    with pytest.raises((ValueError, TypeError), match=match):
        jlora.split_trainable(PARAMS, ads, **kwargs)


def test_split_trainable_refuses_lora_bias_it_cannot_place():
    for targets, variant, match in [
        ("head/kernel", "dora", r"'head/kernel' has a dora adapter.*bias='lora_only'"),
        ("emb/embedding", "lora", r"'emb/embedding' has an embedding"),
    ]:
        ads = _adapters(targets, variant)
        with pytest.raises(ValueError, match=match):
            jlora.split_trainable(PARAMS, ads, lora_bias=True)
    no_bias = {"d": {"kernel": jnp.ones((4, 3))}}
    ads = {"d/kernel": jlora.Adapter(a=jnp.ones((4, 2)), b=jnp.ones((2, 3)), rank=2)}
    with pytest.raises(ValueError, match=r"needs a bias of shape \(3,\) at path 'd/bias'.*found "
                                         r"nothing"):
        jlora.split_trainable(no_bias, ads, lora_bias=True)
    # Tokens and an adapter on one table, put together by hand: PEFT cannot hold both.
    tokens, _ = jlora.split_trainable(PARAMS, {}, trainable_tokens={"emb/embedding": [1]})
    tokens["adapters"] = _adapters("emb/embedding")
    with pytest.raises(ValueError, match=r"TrainableTokens at path 'emb/embedding' sit on an "
                                         r"adapted kernel"):
        peft.export(tokens)


def test_export_refuses_what_peft_cannot_hold():
    trainable, _ = _native()
    bias = trainable["params"]["conv"]["bias"]
    trainable["params"]["conv"]["bias"] = bias.replace(scale=bias.scale * 2)
    with pytest.raises(ValueError, match=r"LoraBias at path 'conv/bias'.*scale 3.0 is not the "
                                         r"adapter's 1.5"):
        peft.export(trainable)
    ads = _adapters("emb/embedding")
    with pytest.raises(ValueError, match=r"`save_embedding_layers` selects \['emb/embedding'\] "
                                         r"but no `base`"):
        peft.export(ads, save_embedding_layers=True)
    dora = _adapters("layers/mlp/kernel", "dora")
    ad = dora["layers/mlp/kernel"]
    dora["layers/mlp/kernel"] = ad.replace(a=ad.a.at[1].set(0.0), b=ad.b.at[1].set(0.0))
    with pytest.raises(ValueError, match=r"'layers/mlp/kernel' has layers without an update.*"
                                         r"dora adapter"):
        peft.export(dora)


# -- docs/peft.md's table of every LoraConfig field -----------------------------------------

# dataclasses.fields(peft.LoraConfig), PEFT 0.21.2
PEFT_FIELDS = [
    "task_type", "peft_type", "auto_mapping", "peft_version", "base_model_name_or_path",
    "revision", "inference_mode", "r", "target_modules", "exclude_modules", "lora_alpha",
    "lora_dropout", "fan_in_fan_out", "bias", "use_rslora", "modules_to_save",
    "init_lora_weights", "layers_to_transform", "layers_pattern", "rank_pattern",
    "alpha_pattern", "megatron_config", "megatron_core", "trainable_token_indices",
    "loftq_config", "eva_config", "corda_config", "lora_ga_config", "use_dora",
    "velora_config", "alora_invocation_tokens", "use_qalora", "qalora_group_size",
    "monteclora_config", "layer_replication", "runtime_config", "lora_bias",
    "target_parameters", "use_bdlora", "arrow_config", "kasa_config", "ensure_weight_tying",
]


def test_docs_table_lists_every_field_as_the_loader_treats_it():
    docs = (FIXTURES.parents[2] / "docs" / "peft.md").read_text()
    section = docs.split("## Every `LoraConfig` field")[1].split("\n## ")[0]
    rows = re.findall(r"^\| `(\w+)` \| (used|accepted|refused) \|", section, re.MULTILINE)
    table = dict(rows)
    assert len(table) == len(rows), "a field is listed twice"
    assert sorted(table) == sorted(PEFT_FIELDS)
    config = peft._config
    want = {**{f: "used" for f in config._USED}, **{f: "accepted" for f in config._IGNORED},
            **{f: "refused" for f in config._REFUSED}}
    assert table == want
