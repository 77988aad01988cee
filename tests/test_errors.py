"""The catalogue of bad inputs: each raises a clear error naming the culprit and what was
expected, and nothing is written on failure."""

import json
import os
import pathlib

import jax
import jax.numpy as jnp
import pytest

import jlora
from jlora._io import AdapterFormatError


def params():
    return {
        "enc": {"dense": {"kernel": jnp.ones((8, 4)), "bias": jnp.zeros(4)},
                "norm": {"scale": jnp.ones(4)}},
        "layers": {"mlp": {"kernel": jnp.ones((2, 4, 6))}},
        "steps": jnp.zeros((3, 3), jnp.int32),
        "flags": jnp.zeros((3, 3), bool),
    }


def adapters(rank=2, **kw):
    config = jlora.LoraConfig(rank=rank, targets=r"enc/dense/kernel", **kw)
    return jlora.init(jax.random.key(0), params(), config)


def init(**kw):
    return jlora.init(jax.random.key(0), params(), jlora.LoraConfig(**kw))


def peft_dir(tmp_path, **config_changes):
    """A valid PEFT adapter directory for `params()`, with its config edited."""
    path = tmp_path / "peft"
    jlora.peft.save(path, adapters())
    config_file = path / "adapter_config.json"
    config = json.loads(config_file.read_text())
    config.update(config_changes)
    config_file.write_text(json.dumps(config))
    return path


def lora_bias_peft_dir(tmp_path):
    """A PEFT adapter with a trained lora_B bias (PEFT's lora_bias=True)."""
    path = tmp_path / "lora_bias"
    trainable, _ = jlora.split_trainable(params(), adapters(), lora_bias=True)
    bias = trainable["params"]["enc"]["dense"]["bias"]
    trainable["params"]["enc"]["dense"]["bias"] = bias.replace(delta=bias.delta + 0.5)
    jlora.peft.save(path, trainable)
    return path


def square_conv1d_peft_dir(tmp_path):
    """A PEFT adapter of a square kernel, trained (as its config says) on PEFT's Conv1D."""
    path = tmp_path / "square"
    jlora.peft.save(path, jlora.init(jax.random.key(0), square_params(), jlora.LoraConfig(rank=2)))
    config_file = path / "adapter_config.json"
    config_file.write_text(json.dumps(json.loads(config_file.read_text())
                                      | {"fan_in_fan_out": True}))
    return path


def square_params():
    return {"attn": {"c_proj": {"kernel": jnp.ones((4, 4))}}}


def transposed_dense():
    """`params()` with the adapted kernel stored (out, in), as transformers' FlaxConv1D."""
    return {**params(), "enc": {"dense": {"kernel": jnp.ones((4, 8))}}}


def native_dir(tmp_path):
    path = tmp_path / "native"
    jlora.save(path, adapters())
    return path


def edit_json(path, edit):
    file = path / "jlora_adapter.json"
    meta = json.loads(file.read_text())
    edit(meta)
    file.write_text(json.dumps(meta))
    return path


def drop_kernel_field(field):
    def edit(meta):
        del meta["adapters"]["enc/dense/kernel"][field]
    return edit


def truncate(file: pathlib.Path):
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])


def failing_policy(value):
    return lambda rank, alpha: value


# (id, callable(tmp_path), exception type, regex the message must match)
CASES = [
    # -- config -------------------------------------------------------------------
    ("rank-zero", lambda t: jlora.LoraConfig(rank=0), ValueError, r"`rank`.*positive int.*got 0"),
    ("rank-float", lambda t: jlora.LoraConfig(rank=1.5), ValueError, r"`rank`.*got 1.5"),
    ("alpha-negative", lambda t: jlora.LoraConfig(alpha=-2), ValueError,
     r"`alpha`.*positive, finite.*got -2"),
    ("alpha-nan", lambda t: jlora.LoraConfig(alpha=float("nan")), ValueError, r"`alpha`.*nan"),
    ("policy-unknown", lambda t: jlora.LoraConfig(scaling="sqrt"), ValueError,
     r"`scaling` must be one of \['rslora', 'standard'\].*'sqrt'"),
    ("policy-contradiction", lambda t: jlora.LoraConfig(scaling="standard", use_rslora=True),
     ValueError, r"`use_rslora=True` contradicts `scaling='standard'`"),
    ("policy-returns-inf", lambda t: init(targets="enc/dense/kernel", rank=2,
                                          scaling=failing_policy(float("inf"))),
     ValueError, r"returned inf for rank=2.*'enc/dense/kernel'.*positive, finite"),
    ("policy-returns-negative", lambda t: init(targets="enc/dense/kernel", rank=2,
                                               scaling=failing_policy(-1.0)),
     ValueError, r"returned -1.0 .*expected a positive, finite float"),
    ("policy-returns-string", lambda t: init(targets="enc/dense/kernel", rank=2,
                                             scaling=failing_policy("big")),
     ValueError, r"returned a non-number .*'enc/dense/kernel'"),
    ("pattern-does-not-compile", lambda t: jlora.LoraConfig(targets="enc/(dense"), ValueError,
     r"`targets` pattern 'enc/\(dense' is not a valid regular expression"),
    ("rank-pattern-does-not-compile", lambda t: jlora.LoraConfig(rank_pattern={"*": 2}),
     ValueError, r"`rank_pattern\['\*'\]` pattern '\*' is not a valid"),
    ("rank-pattern-bad-value", lambda t: jlora.LoraConfig(rank_pattern={"a": -1}), ValueError,
     r"`rank_pattern\['a'\]` must be a positive int, got -1"),
    ("dropout-out-of-range", lambda t: jlora.LoraConfig(dropout=1.5), ValueError,
     r"`dropout` must be a float in \[0, 1\), got 1.5"),
    ("dtype-integer", lambda t: jlora.LoraConfig(dtype=jnp.int8), ValueError,
     r"`dtype` must be a floating dtype"),
    # -- patterns against the tree ----------------------------------------------------
    ("targets-match-nothing", lambda t: init(targets=r"enc/dense/kernal"), ValueError,
     r"`targets` pattern 'enc/dense/kernal' matches no leaf path[\s\S]*enc/dense/kernel"),
    ("rank-pattern-matches-nothing", lambda t: init(targets="enc/dense/kernel", rank=2,
                                                    rank_pattern={"dec/.*": 4}),
     ValueError, r"`rank_pattern\['dec/\.\*'\]` pattern 'dec/\.\*' matches no leaf path"),
    ("targets-a-bias", lambda t: init(targets=r"enc/dense/(kernel|bias)", rank=2), ValueError,
     r"'enc/dense/bias' with shape \(4,\).*at least 2 axes"),
    ("targets-a-norm", lambda t: init(targets=r"enc/norm/scale"), ValueError,
     r"'enc/norm/scale' with shape \(4,\)"),
    ("targets-an-int-leaf", lambda t: init(targets="steps", rank=2), ValueError,
     r"'steps' with shape \(3, 3\) and dtype int32.*floating-point kernel"),
    ("targets-a-bool-leaf", lambda t: init(targets="flags", rank=2), ValueError,
     r"'flags' .*dtype bool"),
    ("rank-too-large", lambda t: init(targets="enc/dense/kernel", rank=6), ValueError,
     r"Rank 6 for the kernel at path 'enc/dense/kernel' with shape \(8, 4\).*largest useful "
     r"rank 4"),
    ("layout-ambiguous", lambda t: init(targets="layers/mlp/kernel", rank=2), ValueError,
     r"'layers/mlp/kernel' with shape \(2, 4, 6\).*LoraConfig.layouts"),
    ("layout-wrong-ndim", lambda t: init(targets="layers/mlp/kernel", rank=2,
                                         layouts={"layers/.*": "io"}),
     ValueError, r"'layers/mlp/kernel' has shape \(2, 4, 6\) \(3 axes\) but its layout 'io'"),
    # -- adapters that do not fit ------------------------------------------------------
    ("adapters-other-model-path", lambda t: jlora.merge({"dec": params()["enc"]}, adapters()),
     ValueError, r"'enc/dense/kernel' has no kernel in the params tree.*'dec/dense/kernel'"),
    ("adapters-other-model-shape",
     lambda t: jlora.merge({**params(), "enc": {"dense": {"kernel": jnp.ones((8, 5))}}},
                           adapters()),
     ValueError, r"fits a kernel of shape \(8, 4\) but the kernel there has shape \(8, 5\)"),
    ("stacked-axes-disagree",
     lambda t: jlora.merge(params(), {"layers/mlp/kernel": init(
         targets="layers/mlp/kernel", rank=2, layouts={"layers/.*": "sio"})[
             "layers/mlp/kernel"].replace(b=jnp.zeros((3, 2, 6)))}),
     ValueError, r"'layers/mlp/kernel' is inconsistent: the stacked axes of `a` \(2,\) and `b` "
                 r"\(3,\) disagree"),
    ("adapters-not-a-dict", lambda t: jlora.merge(params(), [adapters()]), TypeError,
     r"`adapters` must be the dict \{path: Adapter\}.*got list"),
    ("safe-merge-overflow",
     lambda t: jlora.safe_merge({"k": jnp.full((2, 2), 6e4, jnp.float16)},
                                {"k": adapters()["enc/dense/kernel"].replace(
                                    a=jnp.ones((2, 2)), b=jnp.full((2, 2), 1e5))}),
     FloatingPointError, r"'k' gives 4 non-finite.*overflows float16"),
    # -- native files ---------------------------------------------------------------
    ("native-truncated",
     lambda t: jlora.load(truncate(native_dir(t) / "jlora_adapter.safetensors") or t / "native"),
     AdapterFormatError, r"jlora_adapter.safetensors.*(size|truncated)"),
    ("native-json-missing-rank",
     lambda t: jlora.load(edit_json(native_dir(t), drop_kernel_field("rank"))),
     AdapterFormatError, r"'enc/dense/kernel'.*missing the field 'rank'"),
    ("native-json-missing-scale",
     lambda t: jlora.load(edit_json(native_dir(t), drop_kernel_field("scale"))),
     AdapterFormatError, r"missing the field 'scale'"),
    ("native-json-corrupt",
     lambda t: (native_dir(t) / "jlora_adapter.json").write_text("{not json")
     and jlora.load(t / "native"),
     AdapterFormatError, r"jlora_adapter.json"),
    ("native-layout-guessed-not-a-bool",
     lambda t: jlora.load(edit_json(native_dir(t), lambda m: m["adapters"]["enc/dense/kernel"]
                                    .update(layout_guessed="yes"))),
     AdapterFormatError, r"'enc/dense/kernel', has field 'layout_guessed' = 'yes' \(str\); "
                         r"expected true or false"),
    ("native-wrong-params",
     lambda t: jlora.load(native_dir(t), {"enc": {"dense": {"kernel": jnp.ones((8, 3))}}}),
     ValueError, r"'enc/dense/kernel'.*\(8, 4\).*\(8, 3\)|\(8, 3\).*\(8, 4\)"),
    # -- PEFT --------------------------------------------------------------------------
    ("peft-lora-bias", lambda t: jlora.peft.load(lora_bias_peft_dir(t), params()),
     ValueError, r"adapter_model.safetensors holds trained weights beside the LoRA factors.*"
                 r"enc.dense.lora_B.bias.*jlora.peft.load_trainable"),
    ("peft-loftq", lambda t: jlora.peft.load(peft_dir(t, init_lora_weights="loftq"), params()),
     ValueError, r"`init_lora_weights`='loftq'"),
    ("peft-unknown-field", lambda t: jlora.peft.load(peft_dir(t, use_magic=True), params()),
     ValueError, r"`use_magic`=True, a field jlora.peft does not know"),
    ("peft-not-lora", lambda t: jlora.peft.load(peft_dir(t, peft_type="IA3"), params()),
     ValueError, r"peft_type='IA3'.*only LoRA"),
    ("peft-guessed-layout-contradicted",
     lambda t: jlora.peft.load(peft_dir(t), transposed_dense()), jlora.LayoutError,
     r"'enc/dense/kernel' with shape \(4, 8\), guessed layout 'io': module 'enc.dense' has "
     r"lora_A \(2, 8\) and lora_B \(4, 2\), which fit this kernel only as \['oi'\]"
     r"[\s\S]*layouts=jlora.infer_layouts\(fn, params, \*args\)[\s\S]*"
     r"\{'enc/dense/kernel': 'oi'\}"),
    ("peft-guessed-square-of-conv1d-adapter",
     lambda t: jlora.peft.load(square_conv1d_peft_dir(t), square_params()), jlora.LayoutError,
     r"'attn/c_proj/kernel' with shape \(4, 4\), guessed layout 'io': module 'attn.c_proj' "
     r"comes from an adapter with fan_in_fan_out=true.*square.*give 'oi' if the kernel is "
     r"stored \(out, in\).*'io' if \(in, out\)[\s\S]*layouts=jlora.infer_layouts"),
    ("peft-given-layout-does-not-fit",
     lambda t: jlora.peft.load(peft_dir(t), params(), layouts={"enc/dense/kernel": "oi"}),
     ValueError, r"'enc.dense': lora_A .* \(2, 8\) but the kernel at path 'enc/dense/kernel' "
                 r"with shape \(8, 4\) \(layout 'oi'\) needs \(2, 4\) \(the file's shapes "
                 r"fit the layout\(s\) \['io'\]"),
    ("lora-guessed-layout-contradicted-by-the-model",
     lambda t: jlora.lora(lambda p, x: x @ p["enc"]["dense"]["kernel"].T)(
         params(), adapters(), jnp.ones((2, 4))), jlora.LayoutError,
     r"'enc/dense/kernel' \(shape \(8, 4\)\) has the layout 'io' \(guessed: from its shape "
     r"and name, or a template\), but dot_general at .*test_errors.py.* uses it as 'oi'.*"
     r"layouts=jlora.infer_layouts\(fn, params, \*args\).*\{'enc/dense/kernel': 'oi'\}"),
    ("infer-layouts-two-incompatible-uses",
     lambda t: jlora.infer_layouts(
         lambda p, x: x @ p["w"] + (x @ p["w"].T), {"w": jnp.ones((4, 4))}, jnp.ones((2, 4))),
     jlora.LayoutError, r"path 'w'.*test_errors.py:\d+.*test_errors.py:\d+"),
    ("quantized-stack-sliced-ambiguously",
     lambda t: jax.tree.map(lambda a: a[:, :, 0], jlora.quantization.quantize(
         jnp.ones((2, 64, 3, 2, 4)), "nf4", layout="sisoo")).dequantized(),
     jlora.LayoutError, r"layout 'sisoo' \(stacked axes at \(0, 2\)\).*1 of its 2 stacked "
     r"axes left.*\['isoo', 'sioo'\]"),
    ("peft-name-collision",
     lambda t: jlora.peft.save(t / "out", jlora.init(
         jax.random.key(0), {"a": {"kernel": jnp.ones((4, 4))}, "b": {"kernel": jnp.ones((4, 4))}},
         jlora.LoraConfig(rank=2)), names={"a/kernel": "same", "b/kernel": "same"}),
     ValueError, r"'same'.*'a/kernel'.*'b/kernel'"),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input(case, tmp_path):
    _, make, exc, match = case
    before = set(os.listdir(tmp_path))
    with pytest.raises(exc, match=match):
        make(tmp_path)
    # Nothing new is written by a failing call, apart from what the case set up itself.
    if "out" not in before:
        assert not (tmp_path / "out").exists()


def test_failed_saves_leave_nothing_behind(tmp_path):
    bad = {"enc/dense/kernel": "not an adapter"}
    for save in (jlora.save, jlora.peft.save):
        with pytest.raises(TypeError, match=r"`adapters\['enc/dense/kernel'\]` must be a jlora "
                                            r"Adapter"):
            save(tmp_path / "x", bad)
        assert os.listdir(tmp_path) == []
