"""PEFT interop (`jlora.peft.save`, `jlora.peft.load`), checked against PEFT itself.

The fixtures under tests/fixtures/peft/<case>/ were written by PEFT 0.21.2 with torch
2.13.0 (scripts/make_peft_fixtures.py): PEFT's adapter directory, the base weights,
an input, PEFT's output and PEFT's merged weights. Here jlora loads each directory onto
the flax-layout base weights, and its merged weights and the model's output (computed in
jax under jit) must match PEFT's to 1e-5; exporting the loaded adapters must reproduce
PEFT's own tensors bit for bit. Then jlora -> PEFT directory -> jlora round trips on
every layout, checked exactly and against numpy reading the files (merged outside jit);
then names, PEFT's matching rules, refused config fields and every other error.
"""

import json
import math
import pathlib
import re

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy

import jlora
from jlora import _files as files
from jlora import peft

FIXTURES = pathlib.Path(__file__).parent / "fixtures" / "peft"


def _factors_only(root):
    """Whether a fixture's file holds LoRA factors for whole kernels only (the others,
    with trained weights or layer subsets, are tests/test_peft_interop.py's)."""
    cfg = json.loads((root / "case.json").read_text())["peft_config"]
    return cfg.get("bias", "none") == "none" and not any(cfg.get(k) for k in (
        "modules_to_save", "lora_bias", "trainable_token_indices", "layers_to_transform"))


CASES = sorted(p.name for p in FIXTURES.iterdir()
               if (p / "case.json").is_file() and _factors_only(p))
TOL = dict(rtol=1e-5, atol=1e-5)


def _nest(flat):
    tree = {}
    for path, value in flat.items():
        node = tree
        *parents, leaf = path.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = jax.device_put(value)
    return tree


def _section(stored, prefix):
    return {k[len(prefix) + 1:]: v for k, v in stored.items() if k.startswith(prefix + "/")}


def _bias(y, b):
    return y + b.reshape((1,) * (y.ndim - 1) + b.shape)


def _dense(p, x):
    return _bias(x @ p["kernel"], p["bias"])


def _conv(p, x, padding):
    y = jax.lax.conv_general_dilated(x, p["kernel"], (1, 1), padding,
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return _bias(y, p["bias"])


def _blocks(P, x):
    h = x["x"]
    for i in ("0", "1"):
        blk = P["blocks"][i]
        h = h + _dense(blk["v"], jnp.tanh(_dense(blk["q"], h)))
    return {"y": h}


def _stacked(P, x):
    def layer(h, p):
        return jnp.tanh(_dense(p, h)), None

    return {"y": jax.lax.scan(layer, x["x"], P["layers"]["proj"])[0]}


# The torch models of scripts/make_peft_fixtures.py, written in jax on flax layouts.
FORWARD = {
    "mlp": lambda P, x: {"y": _dense(P["fc2"], jnp.tanh(_dense(P["fc1"], x["x"])))},
    "blocks": _blocks,
    "conv": lambda P, x: {"y": _conv(
        P["conv2"], jnp.tanh(_conv(P["conv1"], x["image"], ((1, 1), (1, 1)))), "VALID")},
    "embed": lambda P, x: {"y": _dense(P["fc"], P["emb"]["embedding"][x["ids"]])},
    "dora": lambda P, x: {"tokens": _dense(P["fc"], P["emb"]["embedding"][x["ids"]]),
                          "image": _conv(P["conv"], x["image"], ((1, 1), (1, 1)))},
    "stacked": _stacked,
}


@pytest.fixture(scope="module", params=CASES)
def case(request):
    root = FIXTURES / request.param
    meta = json.loads((root / "case.json").read_text())
    stored = safetensors.numpy.load_file(root / "flax.safetensors")
    x = {k: (v.astype(np.int32) if v.dtype.kind == "i" else v)
         for k, v in _section(stored, "x").items()}
    params = _nest(_section(stored, "base"))
    return dict(
        name=request.param, root=root, meta=meta, params=params,
        x=x, y=_section(stored, "y"), merged=_section(stored, "merged"),
        adapters=peft.load(root / "adapter", params, layouts=meta["layouts"]),
    )


def _kernel_path(module):
    return module["flax"] + ("/embedding" if module["kind"] == "embedding" else "/kernel")


# -- PEFT -> jlora, against PEFT's numbers -------------------------------------------------


def test_load_matches_peft_merge_and_output(case):
    """The merged weights and the model's output on them, under jit, are PEFT's (outside
    jit every op of the merge and of this file's forward pass would compile on its own;
    ``jlora.merge`` outside jit: test_loaded_adapters_merge_like_numpy_reading_the_files,
    on every kind of kernel)."""
    adapters = case["adapters"]
    assert sorted(adapters) == sorted(_kernel_path(m) for m in case["meta"]["modules"])
    # A real model (GPT-2) has no jax twin here: its merged weights are compared, and its
    # logits where the model itself runs.
    forward = FORWARD.get(case["meta"]["model"])

    @jax.jit
    def run(params, adapters, x):
        merged = jlora.merge(params, adapters)
        return merged, (forward(merged["params"], x) if forward else None)

    merged, y = run(case["params"], adapters, case["x"])
    flat = jlora.select(merged, ".*")
    assert sorted(flat) == sorted(case["merged"])
    for path, want in case["merged"].items():
        np.testing.assert_allclose(flat[path], want, **TOL, err_msg=path)
    if forward is None:
        return
    assert sorted(y) == sorted(case["y"])
    for name, want in case["y"].items():
        np.testing.assert_allclose(y[name], want, **TOL, err_msg=name)


def test_load_gives_peft_ranks_and_scales(case):
    """Rank and scale of every module as PEFT computed them (rank/alpha patterns,
    first-match-wins order, rsLoRA), read back from the adapters."""
    adapters = case["adapters"]
    for module in case["meta"]["modules"]:
        ad = adapters[_kernel_path(module)]
        torch_names = ([module["torch"].format(i) for i in range(module["stack"])]
                       if "stack" in module else [module["torch"]])
        for name in torch_names:
            assert ad.rank == case["meta"]["peft_ranks"][name], name
            assert ad.scale == pytest.approx(case["meta"]["peft_scales"][name], rel=1e-12), name
        assert ad.variant == ("dora" if case["meta"]["peft_config"].get("use_dora") else "lora")
        assert ad.policy == ("rslora" if case["meta"]["peft_config"].get("use_rslora")
                             else "standard")


def _effective(config, name):
    """A module's (rank, alpha) under PEFT's rules."""
    def lookup(pattern, default):
        pattern = config.get(pattern) or {}
        return pattern.get(peft.get_pattern_key(list(pattern), name), config[default])

    return lookup("rank_pattern", "r"), float(lookup("alpha_pattern", "lora_alpha"))


def test_export_reproduces_peft_files(case, tmp_path):
    """PEFT dir -> jlora -> PEFT dir: the same tensors bit for bit under the same keys,
    and every module gets the same rank, alpha and scaling rule."""
    out = peft.save(tmp_path / "again", case["adapters"])
    theirs = safetensors.numpy.load_file(case["root"] / "adapter" / peft.WEIGHTS_NAME)
    ours = safetensors.numpy.load_file(out / peft.WEIGHTS_NAME)
    assert sorted(ours) == sorted(theirs)
    for key, value in theirs.items():
        assert ours[key].dtype == value.dtype and ours[key].shape == value.shape, key
        assert np.array_equal(ours[key], value), key
    their_cfg = json.loads((case["root"] / "adapter" / peft.CONFIG_NAME).read_text())
    our_cfg = json.loads((out / peft.CONFIG_NAME).read_text())
    modules = sorted({k[len(peft.PREFIX):].rsplit(".lora_", 1)[0] for k in theirs})
    assert sorted(our_cfg["target_modules"]) == modules
    for name in modules:
        assert _effective(our_cfg, name) == _effective(their_cfg, name), name
    for field in ("use_rslora", "use_dora", "peft_type", "lora_dropout"):
        assert our_cfg[field] == their_cfg[field], field


# -- jlora -> PEFT dir -> jlora ------------------------------------------------------------

PARAMS = {"params": {
    "dense": {"kernel": jnp.linspace(-1.0, 1.0, 48).reshape(8, 6), "bias": jnp.zeros(6)},
    "attn": {"query": {"kernel": jnp.linspace(0.5, -0.5, 48).reshape(8, 2, 3)},
             "out": {"kernel": jnp.linspace(-0.3, 0.2, 48).reshape(2, 3, 8)}},
    "layers": {"mlp": {"kernel": jnp.linspace(-0.4, 0.6, 72).reshape(3, 6, 4)}},
    "blocks": {"mlp": {"kernel": jnp.linspace(-0.2, 0.1, 96).reshape(2, 2, 6, 4)}},
    "conv": {"kernel": jnp.linspace(-0.5, 0.5, 72).reshape(3, 3, 2, 4)},
    "conv1d": {"kernel": jnp.linspace(0.1, 0.9, 24).reshape(3, 2, 4)},
    "embed": {"embedding": jnp.linspace(-1.0, 0.5, 40).reshape(10, 4)},
    "step": jnp.zeros((), jnp.int32),
}}
LAYOUTS = {"params/layers/mlp/kernel": "s...", "params/blocks/mlp/kernel": "ss..."}
TARGETS = r".*/(kernel|embedding)"


def _make(seed=0, **config):
    """Adapters with random non-zero factors (and DoRA magnitudes) for ``PARAMS``: the
    layouts, ranks, alphas and scales `jlora.plan` gives, the arrays from numpy."""
    targets = config.get("targets", TARGETS)
    layouts = {k: v for k, v in LAYOUTS.items() if re.fullmatch(targets, k)}  # only used ones
    cfg = jlora.LoraConfig(**(dict(rank=2, alpha=3.0, targets=TARGETS, layouts=layouts) | config))
    rng = np.random.default_rng(seed)
    dtype = np.dtype(cfg.dtype)
    out = {}
    for path, p in jlora.plan(PARAMS, cfg).items():
        a_shape, b_shape = p.layout.factor_shapes(p.shape, p.rank)
        stacked, _, fan_out = p.layout.split_shape(p.shape)
        magnitude = None
        if cfg.variant == "dora":
            magnitude = jax.device_put(rng.uniform(0.5, 1.5, (*stacked, *fan_out)).astype(dtype))
        out[path] = jlora.Adapter(
            a=jax.device_put(rng.standard_normal(a_shape).astype(dtype)),
            b=jax.device_put(rng.standard_normal(b_shape).astype(dtype)),
            magnitude=magnitude, layout=p.layout, rank=p.rank, alpha=p.alpha,
            scale=p.scale, policy=cfg.policy_name, variant=cfg.variant,
            dropout=float(cfg.dropout),
        )
    return out


# jlora.merge, jitted: outside jit its every op compiles on its own, once per kernel shape
# (outside jit it is checked on the round trips here, on every kind of kernel).
merge = jax.jit(jlora.merge)


def random_adapters(params, config, seed=0):
    """``jlora.init(key, params, config)`` with A and B random from numpy: ``init`` runs
    on shapes only (its initialisers would compile once per factor shape)."""
    like = jax.eval_shape(lambda p: jlora.init(jax.random.key(0), p, config), params)
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda x: jax.device_put(rng.standard_normal(x.shape).astype(x.dtype)),
                        like)


def _mixed():
    standard = _make(targets=r".*/(dense|conv)/kernel", alpha=4.0)
    rslora = _make(targets=r".*/(query|mlp)/kernel", scaling="rslora", rank=3, alpha=2.0)
    return standard | rslora


ROUND_TRIPS = {
    "standard": lambda: _make(),
    "rslora_patterns": lambda: _make(scaling="rslora", rank_pattern={r".*/dense/kernel": 4},
                                     alpha_pattern={r".*conv.*": 5.0}),
    "dora": lambda: _make(variant="dora"),
    "bfloat16_dropout": lambda: _make(dtype=jnp.bfloat16, dropout=0.1),
    "custom_policy": lambda: _make(scaling=lambda r, a: 0.3 * a / r + 0.01,
                                   alpha_pattern={r".*/embed/embedding": 7.0}),
    "mixed_policies": _mixed,
}


@pytest.fixture(scope="module", params=sorted(ROUND_TRIPS))
def round_trip(request, tmp_path_factory):
    adapters = ROUND_TRIPS[request.param]()
    path = peft.save(tmp_path_factory.mktemp(request.param) / "adapter", adapters)
    return adapters, path, peft.load(path, PARAMS, layouts=LAYOUTS)


def test_round_trip_is_exact(round_trip):
    adapters, _, back = round_trip
    assert back.keys() == adapters.keys()
    for path, ad in adapters.items():
        got = back[path]
        for field in ("layout", "rank", "alpha", "scale", "policy", "variant", "dropout"):
            assert getattr(got, field) == getattr(ad, field), (path, field)
        for field in ("a", "b", "magnitude"):
            want, have = getattr(ad, field), getattr(got, field)
            if want is None:
                assert have is None
                continue
            assert have.dtype == want.dtype and have.shape == want.shape, (path, field)
            assert np.array_equal(np.asarray(have), np.asarray(want)), (path, field)


def _numpy_merged_from_files(path, adapters):
    """``{kernel path: merged kernel}`` computed with numpy from the PEFT files alone,
    following PEFT's definitions (delta = scale * B @ A in torch layout)."""
    config = json.loads((path / peft.CONFIG_NAME).read_text())
    tensors = {k: np.asarray(v, np.float32)
               for k, v in safetensors.numpy.load_file(path / peft.WEIGHTS_NAME).items()}
    flat = jlora.select(PARAMS, ".*")
    out = {}
    for kpath, ad in adapters.items():
        ns = ad.layout.num_stacked
        kernel = np.asarray(flat[kpath], np.float32)
        merged = np.empty_like(kernel)
        for idx in np.ndindex(*kernel.shape[:ns]):
            name = peft.default_module_name(kpath, ns).format(*idx)
            rank, alpha = _effective(config, name)
            scale = alpha / (math.sqrt(rank) if config["use_rslora"] else rank)
            key = peft.PREFIX + name
            w = kernel[idx]
            if ad.layout.kind == "embed":
                delta = (tensors[key + ".lora_embedding_B"] @ tensors[key + ".lora_embedding_A"]).T
            elif ad.layout.kind == "conv":
                big_a, big_b = tensors[key + ".lora_A.weight"], tensors[key + ".lora_B.weight"]
                torch_delta = np.einsum("or,ri...->oi...", big_b[:, :, *([0] * (big_a.ndim - 2))],
                                        big_a)
                delta = np.moveaxis(torch_delta, (0, 1), (-1, -2))  # (out, in, *w) -> (*w, in, out)
            else:
                delta = (tensors[key + ".lora_B.weight"] @ tensors[key + ".lora_A.weight"]).T
                delta = delta.reshape(w.shape)
            v = w + scale * delta
            if ad.variant == "dora":
                fan_in = tuple(a - ns for a in ad.layout.fan_in_axes)
                norm = np.sqrt((v**2).sum(axis=fan_in, keepdims=True))
                mag = tensors[key + ".lora_magnitude_vector"].reshape(norm.shape)
                v = v * (mag / norm)
            merged[idx] = v
        out[kpath] = merged
    return out


# jlora.merge under jit is checked against PEFT's merged weights on every fixture (linear,
# conv, embedding, DoRA, stacked, patterns, rsLoRA) by test_load_matches_peft_merge_and_output;
# here under jit only where the round trip's merge differs from all of them: bfloat16.
JIT_ROUND_TRIPS = {"bfloat16_dropout"}


def test_loaded_adapters_merge_like_numpy_reading_the_files(round_trip, request):
    _, path, back = round_trip
    merges = {"eager": jlora.merge}
    if request.node.callspec.params["round_trip"] in JIT_ROUND_TRIPS:
        merges["jit"] = merge
    want = _numpy_merged_from_files(path, back)
    for how, merge_fn in merges.items():
        flat = jlora.select(merge_fn(PARAMS, back), ".*")
        for kpath, value in want.items():
            np.testing.assert_allclose(flat[kpath], value, **TOL, err_msg=f"{how} {kpath}")


def test_export_layout_and_config(tmp_path):
    ads = _make(scaling="rslora", rank_pattern={r".*/dense/kernel": 4}, variant="dora")
    out = peft.save(tmp_path / "a", ads, base_model_name_or_path="org/model")
    t = safetensors.numpy.load_file(out / peft.WEIGHTS_NAME)
    p = peft.PREFIX
    assert t[p + "dense.lora_A.weight"].shape == (4, 8)
    assert t[p + "dense.lora_B.weight"].shape == (6, 4)
    assert t[p + "dense.lora_magnitude_vector"].shape == (6,)
    assert t[p + "attn.query.lora_A.weight"].shape == (2, 8)      # DenseGeneral: flattened
    assert t[p + "attn.query.lora_B.weight"].shape == (6, 2)
    assert t[p + "attn.out.lora_A.weight"].shape == (2, 6)
    assert t[p + "conv.lora_A.weight"].shape == (2, 2, 3, 3)      # (r, in, *window)
    assert t[p + "conv.lora_B.weight"].shape == (4, 2, 1, 1)      # (out, r, 1, 1)
    assert t[p + "conv.lora_magnitude_vector"].shape == (1, 4, 1, 1)
    assert t[p + "conv1d.lora_A.weight"].shape == (2, 2, 3)
    assert t[p + "embed.lora_embedding_A"].shape == (2, 10)       # (r, vocab)
    assert t[p + "embed.lora_embedding_B"].shape == (4, 2)        # (dim, r)
    assert t[p + "embed.lora_magnitude_vector"].shape == (4,)
    for i in range(3):                                            # stacked: one per layer
        assert t[f"{p}layers.{i}.mlp.lora_A.weight"].shape == (2, 6)
    assert t[p + "blocks.1.0.mlp.lora_B.weight"].shape == (4, 2)
    np.testing.assert_array_equal(t[p + "layers.2.mlp.lora_A.weight"],
                                  np.asarray(ads["params/layers/mlp/kernel"].a[2]).T)
    cfg = json.loads((out / peft.CONFIG_NAME).read_text())
    assert cfg["peft_type"] == "LORA" and cfg["use_rslora"] and cfg["use_dora"]
    assert cfg["r"] == 2 and cfg["lora_alpha"] == 3
    assert cfg["base_model_name_or_path"] == "org/model"
    assert cfg["rank_pattern"] == {r"^dense": 4} and cfg["alpha_pattern"] == {}
    assert "layers.0.mlp" in cfg["target_modules"] and "blocks.1.1.mlp" in cfg["target_modules"]


def test_custom_scale_is_exact_in_peft_terms(tmp_path):
    """A custom policy is written as an effective alpha from which PEFT's own formula gives
    the very same float, per kernel."""
    ads = _make(scaling=lambda r, a: 0.1 * a + 1 / 3, rank_pattern={r".*/conv/kernel": 3})
    out = peft.save(tmp_path / "a", ads)
    cfg = json.loads((out / peft.CONFIG_NAME).read_text())
    for kpath, ad in ads.items():
        name = peft.default_module_name(kpath, ad.layout.num_stacked).format(
            *([0] * ad.layout.num_stacked))
        rank, alpha = _effective(cfg, name)
        assert rank == ad.rank and alpha / rank == ad.scale, kpath


# -- kernels in any axis order, guessed layouts checked against the file -------------------

# transformers' Conv1D (out, in); the gemma package's q_einsum (heads, embed, head_dim);
# stacked with the stack first and with MaxText's scan axis second; an embedding table
# stored (features, vocab); a conv in torch's (out, in, kh, kw) order.
ORDERS = [("oi", (6, 8)), ("oio", (2, 8, 3)), ("soio", (3, 2, 8, 4)), ("isoo", (8, 3, 2, 4)),
          ("fv", (4, 10)), ("oiww", (4, 2, 3, 3))]
_GROUP = {"s": 0, "i": 1, "w": 1, "v": 1, "o": 2, "f": 2}


def _canonical_order(axes):
    """Kernel axes reordered stacked, fan-in, fan-out (each group in the kernel's order)."""
    return sorted(range(len(axes)), key=lambda k: _GROUP[axes[k]])


def _peft_delta_in_kernel_order(tensors, name, axes, shape):
    """One layer's update as PEFT defines it from its tensors (unscaled), in numpy, put in
    the order of the kernel's axes ``axes`` (no stacked axes) of ``shape``."""
    key = peft.PREFIX + name
    if "w" in axes:  # Conv: (out, in, *window) = lora_B[..., 0, 0] @ lora_A
        big_a, big_b = tensors[key + ".lora_A.weight"], tensors[key + ".lora_B.weight"]
        torch = np.einsum("or,ri...->oi...", big_b.reshape(big_b.shape[:2]), big_a)
        source, window = [], 2
        for c in axes:
            source.append({"o": 0, "i": 1}.get(c, window))
            window += c == "w"
        return np.transpose(torch, source)
    if "v" in axes:  # Embedding: weight (vocab, dim) += (B @ A).T, so (B @ A) is (out, in)
        torch = tensors[key + ".lora_embedding_B"] @ tensors[key + ".lora_embedding_A"]
    else:  # Linear: weight (out, in) += B @ A, fan axes flattened in the kernel's order
        torch = tensors[key + ".lora_B.weight"] @ tensors[key + ".lora_A.weight"]
    out_axes = [k for k, c in enumerate(axes) if c in "of"]
    in_axes = [k for k, c in enumerate(axes) if c in "iv"]
    grid = torch.reshape([shape[k] for k in out_axes] + [shape[k] for k in in_axes])
    return np.transpose(grid, np.argsort(out_axes + in_axes))


@pytest.mark.parametrize("variant", ["lora", "dora"])
@pytest.mark.parametrize("axes, shape", ORDERS, ids=[a for a, _ in ORDERS])
def test_any_axis_order_exports_and_imports_as_the_canonical_kernel(tmp_path, axes, shape,
                                                                    variant):
    """A kernel stored in any axis order gives the PEFT files of the same kernel stored
    (stacked, fan-in, fan-out), bit for bit; PEFT's own reading of those files is the
    update in the kernel's order, and loading them back gives the same adapter."""
    lay = jlora.Layout(axes)
    order = _canonical_order(axes)
    canonical = jlora.Layout("".join(axes[k] for k in order))
    kernel_shape = tuple(shape)
    assert lay.factor_shapes(kernel_shape, 2) == canonical.factor_shapes(
        tuple(kernel_shape[k] for k in order), 2)
    rng = np.random.default_rng(3)
    a_shape, b_shape = lay.factor_shapes(kernel_shape, 2)
    stacked, _, fan_out = lay.split_shape(kernel_shape)
    ad = jlora.Adapter(
        a=jax.device_put(rng.standard_normal(a_shape).astype(np.float32)),
        b=jax.device_put(rng.standard_normal(b_shape).astype(np.float32)),
        magnitude=(jax.device_put(rng.uniform(0.5, 1.5, (*stacked, *fan_out)).astype(np.float32))
                   if variant == "dora" else None),
        layout=lay, rank=2, alpha=3.0, scale=1.5, policy="standard", variant=variant)
    path = "m/embedding" if lay.kind == "embed" else "m/kernel"
    ours = peft.save(tmp_path / "ours", {path: ad})
    theirs = peft.save(tmp_path / "canonical", {path: ad.replace(layout=canonical)})
    for file in (peft.WEIGHTS_NAME, peft.CONFIG_NAME):
        assert (ours / file).read_bytes() == (theirs / file).read_bytes(), file

    tensors = {k: np.asarray(v, np.float64)
               for k, v in safetensors.numpy.load_file(ours / peft.WEIGHTS_NAME).items()}
    layer_axes = axes.replace("s", "")
    want = np.empty(kernel_shape)
    for idx in np.ndindex(*stacked):
        name = peft.default_module_name(path, lay.num_stacked).format(*idx)
        at = iter(idx)
        where = tuple(next(at) if c == "s" else slice(None) for c in axes)
        want[where] = 1.5 * _peft_delta_in_kernel_order(tensors, name, layer_axes,
                                                        want[where].shape)
    np.testing.assert_allclose(ad.delta(), want, rtol=1e-6, atol=1e-6)

    params = {"m": {path.split("/")[1]: jnp.zeros(kernel_shape)}}
    back = peft.load(ours, params, layouts={path: axes})[path]
    assert back.layout == lay and not back.layout.guessed
    for field in ("a", "b", "magnitude"):
        want_field, have = getattr(ad, field), getattr(back, field)
        assert (want_field is None) == (have is None), field
        if want_field is not None:
            assert np.asarray(have).tobytes() == np.asarray(want_field).tobytes(), field
    to_kernel = np.argsort(order)
    np.testing.assert_array_equal(
        back.delta(), np.transpose(ad.replace(layout=canonical).delta(), to_kernel))


@pytest.mark.parametrize("path, kernel_shape, want", [
    ("m/kernel", (6, 8), "oi"), ("m/embedding", (4, 10), "fv")])
def test_guessed_layout_contradicted_by_the_factors_is_refused(tmp_path, path, kernel_shape,
                                                                want):
    """Factors of the transposed kernel: without `layouts` the guess ('io' or 'vf') is
    refused, naming the path, the shapes and the fix; with the layout they load."""
    lay = jlora.Layout(want)
    a_shape, b_shape = lay.factor_shapes(kernel_shape, 2)
    ad = jlora.Adapter(a=jnp.ones(a_shape), b=jnp.ones(b_shape), layout=lay, rank=2,
                       alpha=2.0, scale=1.0)
    out = peft.save(tmp_path / "a", {path: ad})
    params = {"m": {path.split("/")[1]: jnp.zeros(kernel_shape)}}
    guess = "vf" if lay.kind == "embed" else "io"
    with pytest.raises(jlora.LayoutError, match=(
            rf"'{path}' with shape {re.escape(str(kernel_shape))}, guessed layout '{guess}': "
            rf"module 'm' has lora_(embedding_)?A \(2, {kernel_shape[1]}\) and lora_(embedding_)?B "
            rf"\({kernel_shape[0]}, 2\), which fit this kernel only as \['{want}'\][\s\S]*"
            rf"jlora.infer_layouts[\s\S]*\{{'{path}': '{want}'\}}")):
        peft.load(out, params)
    back = peft.load(out, params, layouts={path: want})[path]
    np.testing.assert_array_equal(back.a, ad.a)


def test_square_kernel_of_a_fan_in_fan_out_adapter_needs_its_layout(tmp_path):
    """PEFT's Conv1D adapters (fan_in_fan_out=true) on a square kernel: the shapes cannot
    tell (out, in) from (in, out), so a guessed layout is refused; a given one is trusted."""
    params = {"attn": {"c_proj": {"kernel": jnp.zeros((8, 8))}}}
    ads = random_adapters(params, jlora.LoraConfig(rank=2))
    out = peft.save(tmp_path / "a", ads)
    assert peft.load(out, params)["attn/c_proj/kernel"].layout.guessed  # flax's convention
    _write_config(out, fan_in_fan_out=True)
    with pytest.raises(jlora.LayoutError, match=r"'attn/c_proj/kernel' with shape \(8, 8\), "
                                                r"guessed layout 'io': .*fan_in_fan_out=true.*"
                                                r"square.*give 'oi'"):
        peft.load(out, params)
    for axes in ("oi", "io"):
        back = peft.load(out, params, layouts={".*": axes})["attn/c_proj/kernel"]
        assert back.layout == jlora.Layout(axes) and not back.layout.guessed
    _write_config(out, fan_in_fan_out="yes")
    with pytest.raises(ValueError, match=r"`fan_in_fan_out`='yes': expected true or false"):
        peft.load(out, params, layouts={".*": "oi"})


def test_gpt2_needs_its_layouts_and_then_gives_peft_merged_weights():
    """transformers' Flax GPT-2 stores its Conv1D kernels (out, in). PEFT's adapter for the
    torch model loaded without layouts is refused (c_attn's factors fit only 'oi', the
    square attn.c_proj cannot be told); with 'oi' it gives PEFT's merged weights."""
    root = FIXTURES / "gpt2"
    stored = safetensors.numpy.load_file(root / "flax.safetensors")
    params = _nest(_section(stored, "base"))
    with pytest.raises(jlora.LayoutError) as refused:
        peft.load(root / "adapter", params)
    message = str(refused.value)
    assert "the layouts of 8 kernel(s) were guessed" in message
    assert ("'params/transformer/h/0/attn/c_attn/kernel' with shape (24, 8), guessed layout "
            "'io': module 'transformer.h.0.attn.c_attn' has lora_A (2, 8) and lora_B (24, 2), "
            "which fit this kernel only as ['oi']") in message
    assert ("'params/transformer/h/1/attn/c_proj/kernel' with shape (8, 8), guessed layout "
            "'io': module 'transformer.h.1.attn.c_proj' comes from an adapter with "
            "fan_in_fan_out=true") in message
    assert "layouts=jlora.infer_layouts(fn, params, *args)" in message

    adapters = peft.load(root / "adapter", params,
                         layouts={r".*/(c_attn|c_proj|c_fc)/kernel": "oi"})
    assert len(adapters) == 8 and {ad.layout.axes for ad in adapters.values()} == {"oi"}
    merged = jlora.select(jlora.merge(params, adapters), ".*")
    want = _section(stored, "merged")
    assert sorted(merged) == sorted(want)
    for path, value in want.items():
        np.testing.assert_allclose(merged[path], value, rtol=1e-6, atol=1e-6, err_msg=path)
    # The update really is transposed against the guess: 'io' would be off by far more.
    c_proj = "params/transformer/h/0/attn/c_proj/kernel"
    wrong = np.asarray(stored["base/" + c_proj]) + np.asarray(adapters[c_proj].delta()).T
    assert np.abs(wrong - want[c_proj]).max() > 1e-2


# -- module names ----------------------------------------------------------------------


def test_default_module_names():
    assert peft.default_module_name("params/fc/kernel") == "fc"
    assert peft.default_module_name("fc/kernel") == "fc"
    assert peft.default_module_name("model/layers/3/q_proj/kernel") == "model.layers.3.q_proj"
    assert peft.default_module_name("params/embed/embedding") == "embed"
    assert peft.default_module_name("params/w") == "w"
    assert peft.default_module_name("params/w", num_stacked=2) == "w.{}.{}"


def test_params_collection_is_optional(tmp_path):
    ads = _make(targets=r"params/dense/kernel")
    out = peft.save(tmp_path / "a", ads)
    back = peft.load(out, PARAMS["params"])     # variables["params"] instead of variables
    assert list(back) == ["dense/kernel"]
    assert np.array_equal(back["dense/kernel"].b, ads["params/dense/kernel"].b)


@pytest.mark.parametrize("kind", ["dict", "callable"])
def test_user_module_names(tmp_path, kind):
    table = {"params/layers/mlp/kernel": "model.layers.{}.mlp.down_proj",
             "params/dense/kernel": "model.lm_head"}
    names = table if kind == "dict" else table.get
    ads = _make(targets=r"params/(layers/mlp|dense)/kernel")
    out = peft.save(tmp_path / "a", ads, names=names)
    keys = safetensors.numpy.load_file(out / peft.WEIGHTS_NAME)
    assert f"{peft.PREFIX}model.layers.2.mlp.down_proj.lora_B.weight" in keys
    assert f"{peft.PREFIX}model.lm_head.lora_A.weight" in keys
    back = peft.load(out, PARAMS, names=names, layouts=LAYOUTS)
    assert back.keys() == ads.keys()
    assert np.array_equal(back["params/layers/mlp/kernel"].a, ads["params/layers/mlp/kernel"].a)
    with pytest.raises(ValueError, match=r"'model\.layers\.0\.mlp\.down_proj'.*no kernel in"):
        peft.load(out, PARAMS, layouts=LAYOUTS)


def test_name_collisions_are_refused(tmp_path):
    ads = _make(targets=r"params/(dense|conv)/kernel")
    names = {"params/dense/kernel": "x", "params/conv/kernel": "x"}
    with pytest.raises(ValueError, match=r"'x': path 'params/conv/kernel' and path 'params/dense"):
        peft.save(tmp_path / "a", ads, names=names)
    out = peft.save(tmp_path / "b", ads)
    with pytest.raises(ValueError, match=r"'x'.*'params/(dense|conv)/kernel'.*and path"):
        peft.load(out, PARAMS, names=names, layouts=LAYOUTS)
    # Default names can collide too: `params/dense/kernel` and `dense/kernel` are both 'dense'.
    kernel = {"kernel": jnp.ones((8, 6))}
    both = {"params": {"dense": kernel}, "dense": kernel}
    with pytest.raises(ValueError, match=r"'dense': path 'dense/kernel' and path 'params/dense/"):
        peft.load(out, both)


def test_bad_names_are_refused(tmp_path):
    ads = _make(targets=r"params/(layers/mlp|dense)/kernel")
    with pytest.raises(ValueError, match=r"'params/layers/mlp/kernel': .*one '\{\}' per stacked"):
        peft.save(tmp_path / "a", ads, names={"params/layers/mlp/kernel": "mlp"})
    with pytest.raises(ValueError, match=r"no '\{\}'.*give `layouts`"):
        peft.save(tmp_path / "a", ads, names={"params/dense/kernel": "d.{}"})
    with pytest.raises(ValueError, match=r"entry for path 'params/dens/kernel'.*params/dense/ker"):
        peft.save(tmp_path / "a", ads, names={"params/dens/kernel": "d"})
    with pytest.raises(ValueError, match=r"Invalid PEFT module name 'a\.\.b'"):
        peft.save(tmp_path / "a", ads, names={"params/dense/kernel": "a..b"})
    with pytest.raises(TypeError, match="`names` must be"):
        peft.save(tmp_path / "a", ads, names=["x"])
    assert not (tmp_path / "a").exists()


# -- PEFT's matching rules -------------------------------------------------------------


def test_pattern_keys_match_like_peft():
    keys = ["blocks.1.q", "q", r"blocks\.\d\.v"]
    assert peft.get_pattern_key(keys, "blocks.1.q") == "blocks.1.q"   # first match wins
    assert peft.get_pattern_key(keys, "model.blocks.0.q") == "q"       # suffix after a dot
    assert peft.get_pattern_key(keys, "blocks.0.xq") == "blocks.0.xq"  # not mid-component
    assert peft.get_pattern_key(keys, "blocks.7.v") == r"blocks\.\d\.v"
    assert peft.get_pattern_key(["^layers"], "model.layers") == "model.layers"  # ^ anchors
    with pytest.raises(ValueError, match=r"key '\('.*not a valid regular expression"):
        peft.get_pattern_key(["("], "q")


def test_target_modules_match_like_peft():
    targeted = peft._names._is_targeted
    assert targeted({"target_modules": ["q"]}, "model.layers.0.q")
    assert not targeted({"target_modules": ["q"]}, "model.layers.0.xq")
    assert targeted({"target_modules": ["layers.0.q"]}, "layers.0.q")
    assert targeted({"target_modules": r".*\.0\.q"}, "layers.0.q")
    assert not targeted({"target_modules": r"0\.q"}, "layers.0.q")          # str: fullmatch
    assert not targeted({"target_modules": ["q"], "exclude_modules": ["0.q"]}, "layers.0.q")
    layers = {"target_modules": ["q"], "layers_to_transform": [1], "layers_pattern": "layers"}
    assert targeted(layers, "model.layers.1.q") and not targeted(layers, "model.layers.0.q")


def _write_config(path, **changes):
    cfg = json.loads((path / peft.CONFIG_NAME).read_text())
    for k, v in changes.items():
        if v is _DELETE:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    (path / peft.CONFIG_NAME).write_text(json.dumps(cfg))


_DELETE = object()


@pytest.fixture
def saved(tmp_path):
    ads = _make(targets=r"params/(dense|conv)/kernel")
    return peft.save(tmp_path / "adapter", ads)


@pytest.mark.parametrize("field, value, match", [
    ("lora_bias", "yes", r"`lora_bias`='yes': expected true or false"),
    ("use_qalora", True, r"`use_qalora`=True.*QA-LoRA"),
    ("modules_to_save", "head", r"`modules_to_save`='head': expected a list"),
    ("trainable_token_indices", [-1], r"`trainable_token_indices`=\[-1\]: expected a list"),
    ("loftq_config", {"loftq_bits": 4}, r"`loftq_config`.*LoftQ"),
    ("init_lora_weights", "pissa_niter_4", r"`init_lora_weights`='pissa_niter_4'.*modified"),
    ("init_lora_weights", "olora", r"`init_lora_weights`='olora'"),
    ("init_lora_weights", "something_new", r"`init_lora_weights`='something_new'"),
    ("bias", "some", r"`bias`='some': expected one of \['none', 'all', 'lora_only'\]"),
    ("target_parameters", ["experts.w"], r"`target_parameters`"),
    ("layer_replication", [[0, 2]], r"`layer_replication`"),
    ("use_fancy_new_thing", True, r"`use_fancy_new_thing`=True, a field jlora.peft does not know"),
    ("peft_type", "IA3", r"peft_type='IA3'.*LoRA"),
    ("r", 0, r"`r`=0: expected a positive int"),
    ("use_rslora", "yes", r"`use_rslora`='yes'"),
])
def test_unsupported_config_fields_are_refused(saved, field, value, match):
    _write_config(saved, **{field: value})
    with pytest.raises(ValueError, match=match):
        peft.load(saved, PARAMS)


def test_fields_that_are_off_or_describe_the_run_are_accepted(saved):
    _write_config(saved, use_fancy_new_thing=None, lora_bias=False, loftq_config={},
                  init_lora_weights="gaussian", task_type="CAUSAL_LM", fan_in_fan_out=True,
                  eva_config=None, peft_version="0.21.2", auto_mapping={"x": 1})
    assert sorted(peft.load(saved, PARAMS)) == ["params/conv/kernel", "params/dense/kernel"]


def test_config_and_files_must_agree(saved):
    _write_config(saved, rank_pattern={"conv": 3})
    with pytest.raises(ValueError, match=r"'conv'.*\(2, 2, 3, 3\) \(rank 2\).*gives it rank 3"):
        peft.load(saved, PARAMS)
    _write_config(saved, rank_pattern={}, target_modules=["dense"])
    with pytest.raises(ValueError, match=r"'conv'.*target_modules=\['dense'\].*does not select"):
        peft.load(saved, PARAMS)
    _write_config(saved, target_modules=["dense", "conv"], use_dora=True)
    with pytest.raises(ValueError, match=r"no lora_magnitude_vector.*use_dora=true"):
        peft.load(saved, PARAMS)


def test_custom_scale_metadata_must_agree_with_config(tmp_path):
    out = peft.save(tmp_path / "a", _make(scaling=lambda r, a: 0.77, targets="params/dense/kernel"))
    assert peft.load(out, PARAMS)["params/dense/kernel"].scale == 0.77
    _write_config(out, lora_alpha=5)
    with pytest.raises(ValueError, match=r"'dense'.*scale 2.5.*records scale 0.77"):
        peft.load(out, PARAMS)


def test_params_must_fit_the_file(saved):
    small = {"params": {"dense": {"kernel": jnp.ones((7, 6))}, "conv": PARAMS["params"]["conv"]}}
    with pytest.raises(ValueError, match=r"'dense': lora_A.*\(2, 8\).*'params/dense/kernel' with "
                                         r"shape \(7, 6\).*needs \(2, 7\)"):
        peft.load(saved, small)
    with pytest.raises(ValueError, match=r"Module 'dense'.*no kernel.*Closest module names"):
        peft.load(saved, {"params": {"conv": PARAMS["params"]["conv"]}})
    as_embed = {"params": {"dense": {"embedding": jnp.ones((8, 6))},
                           "conv": PARAMS["params"]["conv"]}}
    with pytest.raises(ValueError, match=r"'dense' holds a Linear adapter.*layout 'vf'"):
        peft.load(saved, as_embed)


def test_stacked_kernel_layers_missing_from_the_file_get_zero_factors(tmp_path):
    ads = _make(targets="params/dense/kernel")
    out = peft.save(tmp_path / "a", ads, names={"params/dense/kernel": "layers.1.mlp"})
    stacked = {"params": {"layers": {"mlp": {"kernel": jnp.ones((3, 8, 6))}}}}
    back = peft.load(out, stacked, layouts={".*": "s..."})["params/layers/mlp/kernel"]
    want = ads["params/dense/kernel"]
    for factor in ("a", "b"):
        got = np.asarray(getattr(back, factor))
        np.testing.assert_array_equal(got[1], getattr(want, factor))
        assert not got[[0, 2]].any(), factor
    dora = peft.save(tmp_path / "d", _make(targets="params/dense/kernel", variant="dora"),
                     names={"params/dense/kernel": "layers.1.mlp"})
    with pytest.raises(ValueError, match=r"'params/layers/mlp/kernel' has 2 of its 3 layers.*"
                                         r"layers\.0\.mlp.*DoRA rescales every layer"):
        peft.load(dora, stacked, layouts={".*": "s..."})
    with pytest.raises(ValueError, match=r"no kernel in `params`.*layout is unknown.*\['params/"
                                         r"layers/mlp/kernel'\]"):
        peft.load(out, stacked)   # without `layouts` the 3-axis kernel is skipped, and said so
    with pytest.raises(ValueError, match=r"`layouts\['\.\*'\]` must be a layout string.*'xyz'"):
        peft.load(out, stacked, layouts={".*": "xyz"})
    with pytest.raises(ValueError, match=r"`layouts\['conv/.\*'\]` pattern.*matches no leaf path"):
        peft.load(out, stacked, layouts={"conv/.*": "s..."})


def test_files_that_are_not_lora_factors_are_refused(saved):
    tensors = safetensors.numpy.load_file(saved / peft.WEIGHTS_NAME)
    tensors[peft.PREFIX + "head.weight"] = np.ones((2, 2), np.float32)
    safetensors.numpy.save_file(tensors, saved / peft.WEIGHTS_NAME)
    with pytest.raises(ValueError, match=r"'base_model.model.head.weight'.*neither a LoRA factor "
                                         r"nor a weight.*modules_to_save=None, bias='none'"):
        peft.load(saved, PARAMS)


def test_missing_truncated_and_legacy_files(saved, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no adapter_config.json"):
        peft.load(tmp_path / "nowhere", PARAMS)
    config = (saved / peft.CONFIG_NAME).read_text()
    (saved / peft.CONFIG_NAME).write_text("{not json")
    with pytest.raises(ValueError, match=r"adapter_config.json.*not valid JSON"):
        peft.load(saved, PARAMS)
    (saved / peft.CONFIG_NAME).write_text(config)
    data = (saved / peft.WEIGHTS_NAME).read_bytes()
    (saved / peft.WEIGHTS_NAME).write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"adapter_model.safetensors.*truncated or corrupted"):
        peft.load(saved, PARAMS)
    (saved / peft.WEIGHTS_NAME).unlink()
    (saved / "adapter_model.bin").write_bytes(b"pickle")
    with pytest.raises(FileNotFoundError, match=r"only the pickled adapter_model.bin"):
        peft.load(saved, PARAMS)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_half_precision_adapters_round_trip_bit_for_bit(tmp_path, dtype):
    """Exported with `peft.save`, loaded with `peft.load`: the same bits in the same dtype.
    (safetensors.numpy.load has no BF16: a reader built on it calls such files corrupted.)"""
    ads = _make(targets=r"params/(dense|conv|embed)/(kernel|embedding)", variant="dora",
                dtype=dtype)
    out = peft.save(tmp_path / "a", ads)
    stored, _ = files.read_safetensors(out / peft.WEIGHTS_NAME)
    assert {v.dtype for v in stored.values()} == {np.dtype(dtype)}
    back = peft.load(out, PARAMS)
    assert back.keys() == ads.keys()
    for path, ad in ads.items():
        for field in ("a", "b", "magnitude"):
            want, have = np.asarray(getattr(ad, field)), np.asarray(getattr(back[path], field))
            assert have.dtype == want.dtype and have.shape == want.shape, (path, field)
            assert have.tobytes() == want.tobytes(), (path, field)
        assert (back[path].rank, back[path].scale) == (ad.rank, ad.scale)
    wide = peft.load(out, PARAMS, dtype=jnp.float32)["params/dense/kernel"]
    assert wide.b.dtype == jnp.float32
    np.testing.assert_array_equal(wide.b, np.asarray(ads["params/dense/kernel"].b, np.float32))


def test_float8_files_load(tmp_path):
    """A PEFT file whose factors are float8 (safe_open cannot read those) loads exactly."""
    ads = _make(targets=r"params/(dense|conv)/kernel")
    out = peft.save(tmp_path / "a", ads)
    stored, metadata = files.read_safetensors(out / peft.WEIGHTS_NAME)
    f8 = ml_dtypes.float8_e4m3fn
    files.write_safetensors(out / peft.WEIGHTS_NAME,
                            {k: v.astype(f8) for k, v in stored.items()}, metadata)
    for dtype in (None, jnp.float32):
        back = peft.load(out, PARAMS, dtype=dtype)
        for path, ad in ads.items():
            for field in ("a", "b"):
                have = np.asarray(getattr(back[path], field))
                want = np.asarray(getattr(ad, field)).astype(f8)
                assert have.dtype == (want.dtype if dtype is None else np.float32)
                np.testing.assert_array_equal(have.astype(np.float32), want.astype(np.float32))


# -- save: refusals and atomic writes --------------------------------------------------


def test_save_refuses_what_peft_cannot_hold(tmp_path):
    ads = _make(targets="params/dense/kernel") | _make(targets="params/conv/kernel",
                                                       variant="dora")
    with pytest.raises(ValueError, match=r"mix variants \['dora', 'lora'\].*params/conv/kernel"):
        peft.save(tmp_path / "a", ads)
    ads = _make(targets="params/dense/kernel") | _make(targets="params/conv/kernel", dropout=0.2)
    with pytest.raises(ValueError, match=r"one `lora_dropout`.*\[0.0, 0.2\]"):
        peft.save(tmp_path / "a", ads)
    with pytest.raises(TypeError, match=r"`adapters` must be the dict"):
        peft.save(tmp_path / "a", list(ads.values()))
    with pytest.raises(ValueError, match="empty"):
        peft.save(tmp_path / "a", {})
    assert not (tmp_path / "a").exists()


def test_save_replaces_an_adapter_but_nothing_else(tmp_path):
    first, second = _make(targets="params/dense/kernel"), _make(targets="params/conv/kernel")
    out = peft.save(tmp_path / "a", first)
    peft.save(out, second)
    assert list(peft.load(out, PARAMS)) == ["params/conv/kernel"]
    (out / "README.md").write_text("mine")
    with pytest.raises(FileExistsError, match=r"not part of a PEFT adapter: \['README.md'\]"):
        peft.save(out, first)
    assert list(peft.load(out, PARAMS)) == ["params/conv/kernel"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]


def test_interrupted_save_leaves_nothing_behind(tmp_path, monkeypatch):
    ads = _make(targets="params/dense/kernel")
    old = peft.save(tmp_path / "a", _make(targets="params/conv/kernel"))

    def failing_write(path, data):  # the weights get written, then the config fails
        if path.name == peft.CONFIG_NAME:
            raise OSError("disk full")
        path.write_bytes(data)

    monkeypatch.setattr(files, "_write_file", failing_write)
    with pytest.raises(OSError, match="disk full"):
        peft.save(tmp_path / "new", ads)
    with pytest.raises(OSError, match="disk full"):
        peft.save(old, ads)
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]   # no temp dirs, no "new"
    assert list(peft.load(old, PARAMS)) == ["params/conv/kernel"]  # old adapter intact


def test_load_points_at_the_copy_an_interrupted_save_left(tmp_path):
    out = peft.save(tmp_path / "a", _make(targets="params/dense/kernel"))
    out.rename(tmp_path / ".a.1234abcd.old")  # as if the process died mid-swap
    with pytest.raises(FileNotFoundError, match=r"no adapter_config.json.*interrupted.*"
                                                r"\.a\.1234abcd\.old"):
        peft.load(out, PARAMS)
