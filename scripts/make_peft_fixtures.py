"""Make the PEFT fixtures tests/test_peft.py compares against, and check jlora's export
with PEFT itself.

Run by hand, never in CI: it needs torch==2.13.0 and peft, which are not jlora's
requirements, and transformers==4.46.3 with jax and flax for the ``gpt2`` case. From the
repository root::

  python3 -m venv /work/envs/peftenv
  /work/envs/peftenv/bin/pip install torch==2.13.0 peft transformers==4.46.3 \\
      "jax>=0.10,<0.11" "flax>=0.12,<0.13" safetensors numpy
  /work/envs/peftenv/bin/python scripts/make_peft_fixtures.py            # writes the fixtures
  /work/envs/peftenv/bin/python scripts/make_peft_fixtures.py --check-export \\
      --jlora-python .venv/bin/python                                     # jlora -> PEFT

For the ``gpt2`` export to be checked on the Flax model's logits too, ``--jlora-python``
must also import transformers (``pip install -e '.[dev,models]'``); without it the check
says so and compares the torch model's logits only.

Default mode: for every case below, build a small torch model, add a PEFT LoRA adapter
with non-zero factors (and DoRA magnitudes), and write ``tests/fixtures/peft/<case>/``:

  adapter/           what PEFT's save_pretrained wrote (adapter_config.json,
                     adapter_model.safetensors)
  torch.safetensors  torch layout: base/<param>, merged/<param> (PEFT's merge_and_unload),
                     x/<input>, y/<output> (PEFT's unmerged forward, eval mode)
  flax.safetensors   the same in flax layout, keyed by flax path: base/params/fc1/kernel,
                     merged/..., x/... (images NHWC), y/...
  case.json          the layouts and torch -> flax module mapping the tests need

The ``gpt2`` case is transformers' own ``GPT2LMHeadModel`` (tiny config, ``Conv1D``
weights stored ``(in, out)``, so PEFT runs with ``fan_in_fan_out=True``). Its
flax.safetensors holds every parameter as transformers itself converts the torch model
(``FlaxGPT2LMHeadModel.from_pretrained(dir, from_pt=True)``), whose ``FlaxConv1D``
kernels are ``(out, in)``: layout ``"oi"``. Its case.json adds ``hf_config`` and
``flax_model`` to rebuild that Flax model; the script checks that the Flax model on the
base and on PEFT's merged weights gives the torch model's and PEFT's logits.

``--check-export`` runs jlora (``--jlora-python``, in a subprocess, with this script's
``--jlora-side`` mode) to make adapters for each case's flax params and export them with
``jlora.peft.save``; then loads each directory with ``PeftModel.from_pretrained`` onto
the torch base model and compares, against jlora's own numbers: PEFT's per-module
scale, PEFT's forward output (against the torch model carrying jlora's merged weights)
and PEFT's merged weights. For ``gpt2`` the jlora side reads the layouts with
``jlora.infer_layouts`` on the Flax model (the case's ``"oi"`` layouts where that or
transformers is missing) and also computes the Flax model's logits, factored
(``jlora.lora``) and merged, which must equal PEFT's. It exits non-zero if any differs
by more than 1e-5.

Both modes also run the cases of scripts/peft_convert_fixtures.py (tests/test_peft_convert.py
and tests/test_peft_moe.py: fused and split projections, name templates, PiSSA / OLoRA /
CorDA conversion, ``target_parameters``); see that module.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile
import traceback

import numpy as np
import peft_convert_fixtures as convert_fixtures  # the cases of test_peft_convert/_moe
import peft_loftq_fixture as loftq_fixture  # the fixture of test_loftq
import safetensors.numpy

ROOT = pathlib.Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures" / "peft"
TOL = 1e-5

# -- the cases: torch module <-> flax path, the PEFT config, the inputs -------------------
#
# kind: "linear" (flax kernel = weight.T, optionally reshaped to a DenseGeneral shape),
# "conv" (kernel = weight.permute(2, 3, 1, 0)), "embedding" (embedding = weight),
# "conv1d" (transformers' Conv1D: weight (in, out); FlaxConv1D kernel = weight.T, (out, in)).
# "stack": n means torch modules name.format(0..n-1) stack into one flax kernel.

MLP = [
    {"torch": "fc1", "flax": "params/fc1", "kind": "linear"},
    {"torch": "fc2", "flax": "params/fc2", "kind": "linear"},
]
BLOCKS = [
    {"torch": f"blocks.{i}.{m}", "flax": f"params/blocks/{i}/{m}", "kind": "linear"}
    for i in range(2) for m in ("q", "v")
]
CONV = [
    {"torch": "conv1", "flax": "params/conv1", "kind": "conv"},
    {"torch": "conv2", "flax": "params/conv2", "kind": "conv"},
]
EMBED = [
    {"torch": "emb", "flax": "params/emb", "kind": "embedding"},
    {"torch": "fc", "flax": "params/fc", "kind": "linear"},
]
DORA = EMBED + [{"torch": "conv", "flax": "params/conv", "kind": "conv"}]
STACKED = [{"torch": "layers.{}.proj", "flax": "params/layers/proj", "kind": "linear", "stack": 3}]
# A language model with a classifier head: embedding, one layer, output projection.
LM = [
    {"torch": "embed_tokens", "flax": "params/embed_tokens", "kind": "embedding"},
    {"torch": "fc", "flax": "params/fc", "kind": "linear"},
    {"torch": "lm_head", "flax": "params/lm_head", "kind": "linear"},
    {"torch": "score", "flax": "params/score", "kind": "linear"},
]
# Tiny, so that base and merged weights in both layouts stay a few tens of KiB; every
# adapted kernel has fan-in != fan-out but attn.c_proj, so a transposed update shows.
GPT2_CONFIG = dict(vocab_size=32, n_positions=8, n_embd=8, n_layer=2, n_head=2,
                   initializer_range=0.2, use_cache=False)
GPT2 = [
    {"torch": f"transformer.h.{i}.{m}", "flax": f"params/transformer/h/{i}/{m.replace('.', '/')}",
     "kind": "conv1d"}
    for i in range(GPT2_CONFIG["n_layer"])
    for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
]

CASES = {
    "linear": dict(
        model="mlp", modules=MLP,
        peft=dict(r=2, lora_alpha=4, target_modules=["fc1", "fc2"]),
    ),
    "rslora": dict(
        model="mlp", modules=MLP,
        peft=dict(r=4, lora_alpha=3, use_rslora=True, target_modules=["fc1", "fc2"],
                  rank_pattern={"fc2": 2}, alpha_pattern={"fc1": 5}),
    ),
    # The first matching key wins (in the file's order, which PEFT sorts), keys match a
    # suffix after a dot, keys are regexes: blocks.1.q -> r 1 (not 2), blocks.0.q -> r 2,
    # v -> r 4 by regex; blocks.0.v -> alpha 2.5 (the general "[a-z]+\.0\.v" sorts before
    # the specific "blocks.0.v" and wins), blocks.1.q -> alpha 1.5, blocks.1.v -> alpha 6.
    "patterns": dict(
        model="blocks", modules=BLOCKS,
        peft=dict(r=3, lora_alpha=6, target_modules=["q", "v"],
                  rank_pattern={"blocks.1.q": 1, "q": 2, r"blocks\.\d\.v": 4},
                  alpha_pattern={r"[a-z]+\.0\.v": 2.5, "blocks.0.v": 9,
                                 r"blocks\.1\.q": 1.5}),
    ),
    "conv": dict(
        model="conv", modules=CONV,
        peft=dict(r=2, lora_alpha=3, target_modules=["conv1", "conv2"]),
    ),
    "embedding": dict(
        model="embed", modules=EMBED,
        peft=dict(r=2, lora_alpha=2, target_modules=["emb", "fc"]),
    ),
    "dora": dict(
        model="dora", modules=DORA,
        peft=dict(r=2, lora_alpha=4, use_dora=True, target_modules=["emb", "fc", "conv"]),
    ),
    "stacked": dict(
        model="stacked", modules=STACKED, layouts={"params/layers/proj/kernel": "s..."},
        peft=dict(r=2, lora_alpha=3, target_modules=["proj"]),
    ),
    # What PEFT saves beside the factors. "untouched": torch modules whose weights must be
    # exactly the base's after PEFT's merge. save_embedding_layers (PEFT's default when
    # embed_tokens / lm_head are targeted) writes their base weights, equal to the base.
    "full_weights": dict(
        model="lm", modules=LM,
        peft=dict(r=2, lora_alpha=4, target_modules=["embed_tokens", "fc", "lm_head"],
                  modules_to_save=["score"]),
    ),
    "bias_all": dict(
        model="mlp", modules=MLP,
        peft=dict(r=2, lora_alpha=4, target_modules=["fc1"], bias="all"),
    ),
    "lora_bias": dict(
        model="mlp", modules=MLP,
        peft=dict(r=2, lora_alpha=3, target_modules=["fc1", "fc2"], lora_bias=True,
                  bias="lora_only"),
    ),
    "tokens": dict(
        model="lm", modules=LM, untouched=["score"],
        peft=dict(r=2, lora_alpha=2, target_modules=["fc"],
                  trainable_token_indices={"embed_tokens": [1, 4, 7], "lm_head": [2, 5]}),
    ),
    "layers": dict(
        model="stacked", modules=STACKED, layouts={"params/layers/proj/kernel": "s..."},
        untouched=["layers.1.proj"],
        peft=dict(r=2, lora_alpha=3, target_modules=["proj"], layers_to_transform=[0, 2],
                  layers_pattern="layers"),
    ),
    # flax_params="transformers": flax.safetensors is transformers' own conversion of the
    # whole model, not torch_to_flax of `modules`.
    "gpt2": dict(
        model="gpt2", modules=GPT2, flax_params="transformers",
        hf_config=GPT2_CONFIG, flax_model="FlaxGPT2LMHeadModel",
        layouts={f"{m['flax']}/kernel": "oi" for m in GPT2},
        peft=dict(r=2, lora_alpha=4, fan_in_fan_out=True,
                  target_modules=["c_attn", "c_proj", "c_fc"]),
    ),
}

# jlora -> PEFT: which fixture's base model, how its flax params are laid out, and the
# LoraConfig(s) jlora makes adapters with ("scaling": "custom" is a callable below).
EXPORTS = {
    "linear": dict(base="linear", configs=[dict(rank=2, alpha=4.0)]),
    "rslora": dict(base="rslora", configs=[dict(
        rank=4, alpha=3.0, use_rslora=True, rank_pattern={"params/fc2/kernel": 2},
        alpha_pattern={"params/fc1/kernel": 5.0})]),
    "custom_scaling": dict(base="linear", configs=[dict(
        rank=2, alpha=3.0, scaling="custom", alpha_pattern={"params/fc2/kernel": 7.0})]),
    "mixed_policies": dict(base="linear", configs=[
        dict(rank=2, alpha=4.0, targets="params/fc1/kernel"),
        dict(rank=3, alpha=2.0, use_rslora=True, targets="params/fc2/kernel")]),
    "dense_general": dict(
        base="linear", reshape={"params/fc1/kernel": (8, 2, 3), "params/fc2/kernel": (2, 3, 4)},
        configs=[dict(rank=2, alpha=4.0, layouts={"params/fc1/kernel": "ioo",
                                                  "params/fc2/kernel": "iio"})]),
    "patterns": dict(base="patterns", configs=[dict(
        rank=3, alpha=6.0, targets=".*/(q|v)/kernel",
        rank_pattern={"params/blocks/1/q/kernel": 1, ".*/q/kernel": 2, ".*/v/kernel": 4},
        alpha_pattern={".*/v/kernel": 2.5})]),
    "conv": dict(base="conv", configs=[dict(rank=2, alpha=3.0)]),
    "embedding": dict(base="embedding", configs=[dict(
        rank=2, alpha=2.0, targets="params/(emb/embedding|fc/kernel)")]),
    "dora": dict(base="dora", configs=[dict(
        rank=2, alpha=4.0, variant="dora",
        targets="params/(emb/embedding|fc/kernel|conv/kernel)")]),
    "dora_rslora": dict(base="dora", configs=[dict(
        rank=2, alpha=1.5, use_rslora=True, variant="dora", targets=".*/(fc|conv)/kernel")]),
    "stacked": dict(base="stacked", configs=[dict(
        rank=2, alpha=3.0, targets="params/layers/proj/kernel",
        layouts={"params/layers/proj/kernel": "s..."})]),
    # infer_layouts: the layouts come from jlora.infer_layouts on the case's Flax model.
    "gpt2": dict(base="gpt2", infer_layouts=True, configs=[dict(
        rank=2, alpha=4.0, targets=".*/(c_attn|c_proj|c_fc)/kernel")]),
    # "trainable": split_trainable's arguments (the trained params are randomised too);
    # "save": jlora.peft.save's; "layers": the layers of a stacked kernel that keep their
    # factors (the others are zeroed).
    "full_weights": dict(base="full_weights", configs=[dict(
        rank=2, alpha=4.0, targets="params/(embed_tokens/embedding|fc/kernel|lm_head/kernel)")],
        trainable=dict(modules_to_save="params/score/.*"),
        save=dict(save_embedding_layers=".*/(embed_tokens|lm_head)/.*")),
    "bias_all": dict(base="bias_all", trainable=dict(bias="all"),
                     configs=[dict(rank=2, alpha=4.0, targets="params/fc1/kernel")]),
    "lora_bias": dict(base="lora_bias", configs=[dict(rank=2, alpha=3.0, targets=".*/kernel")],
                      trainable=dict(lora_bias=True, bias="lora_only")),
    "tokens": dict(base="tokens", configs=[dict(rank=2, alpha=2.0, targets="params/fc/kernel")],
                   trainable=dict(trainable_tokens={"params/embed_tokens/embedding": [1, 4, 7],
                                                    "params/lm_head/kernel": [2, 5]})),
    "layers": dict(base="layers", configs=[dict(
        rank=2, alpha=3.0, targets="params/layers/proj/kernel",
        layouts={"params/layers/proj/kernel": "s..."})],
        layers={"params/layers/proj/kernel": [0, 2]}),
    "gpt2_rslora": dict(base="gpt2", infer_layouts=True, configs=[dict(
        rank=3, alpha=2.0, use_rslora=True, targets=".*/(c_attn|c_fc)/kernel",
        rank_pattern={".*/c_fc/kernel": 2})]),
}


# -- torch side ---------------------------------------------------------------------------


def _torch():
    import torch
    import torch.distributed.tensor  # noqa: F401  (torch 2.13: PEFT's from_pretrained needs it)

    return torch


def build_model(kind: str):
    torch = _torch()
    nn = torch.nn
    torch.manual_seed(0)

    class MLP(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(8, 6), nn.Linear(6, 4)

        def forward(self, x):
            return {"y": self.fc2(torch.tanh(self.fc1(x)))}

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.q, self.v = nn.Linear(6, 6), nn.Linear(6, 6)

    class Blocks(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList([Block(), Block()])

        def forward(self, x):
            for blk in self.blocks:
                x = x + blk.v(torch.tanh(blk.q(x)))
            return {"y": x}

    class Conv(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1, self.conv2 = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 5, 1)

        def forward(self, image):
            return {"y": self.conv2(torch.tanh(self.conv1(image)))}

    class Embed(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.fc = nn.Embedding(10, 6), nn.Linear(6, 3)

        def forward(self, ids):
            return {"y": self.fc(self.emb(ids))}

    class Dora(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.fc = nn.Embedding(10, 6), nn.Linear(6, 4)
            self.conv = nn.Conv2d(3, 4, 3, padding=1)

        def forward(self, ids, image):
            return {"tokens": self.fc(self.emb(ids)), "image": self.conv(image)}

    class Layer(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(5, 5)

    class Stacked(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList([Layer() for _ in range(3)])

        def forward(self, x):
            for layer in self.layers:
                x = torch.tanh(layer.proj(x))
            return {"y": x}

    if kind == "gpt2":
        from transformers import GPT2Config, GPT2LMHeadModel

        return GPT2LMHeadModel(GPT2Config(**GPT2_CONFIG))
    class LM(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed_tokens, self.fc = nn.Embedding(12, 6), nn.Linear(6, 6)
            self.lm_head, self.score = nn.Linear(6, 12, bias=False), nn.Linear(6, 3)

        # What PEFT asks a transformers model for (save_embedding_layers, trainable tokens).
        def get_input_embeddings(self):
            return self.embed_tokens

        def get_output_embeddings(self):
            return self.lm_head

        def forward(self, ids):
            h = torch.tanh(self.fc(self.embed_tokens(ids)))
            return {"logits": self.lm_head(h), "score": self.score(h)}

    return {"mlp": MLP, "blocks": Blocks, "conv": Conv, "embed": Embed, "dora": Dora,
            "stacked": Stacked, "lm": LM}[kind]()


def make_inputs(kind: str) -> dict:
    torch = _torch()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 10, (2, 4), generator=g)
    image = torch.randn(2, 3, 5, 5, generator=g)
    return {
        "mlp": {"x": torch.randn(5, 8, generator=g)},
        "blocks": {"x": torch.randn(4, 6, generator=g)},
        "conv": {"image": image},
        "embed": {"ids": ids},
        "dora": {"ids": ids, "image": image},
        "stacked": {"x": torch.randn(4, 5, generator=g)},
        # Last: every entry draws from `g`, so a new one before the others changes them.
        "gpt2": {"input_ids": torch.randint(0, GPT2_CONFIG["vocab_size"], (2, 5), generator=g)},
        "lm": {"ids": torch.randint(0, 12, (2, 4), generator=g)},
    }[kind]


def to_numpy(tensors) -> dict:
    # Copy: .numpy() shares memory, and merge_and_unload later changes the weights in place.
    return {k: np.array(v.detach().cpu().numpy(), copy=True) for k, v in tensors.items()}


# -- layout conversion (numpy; used by both sides) ----------------------------------------


def _expand_modules(modules):
    """(torch module, flax module path, kind, stack index or None) for every torch module."""
    for m in modules:
        if "stack" in m:
            for i in range(m["stack"]):
                yield m["torch"].format(i), m["flax"], m["kind"], i
        else:
            yield m["torch"], m["flax"], m["kind"], None


def torch_to_flax(state: dict, modules, reshape=None) -> dict:
    """``{flax path: array}`` from a torch state dict (``{module.weight: array}``)."""
    out: dict[str, list | np.ndarray] = {}
    for tname, fpath, kind, index in _expand_modules(modules):
        w = state[f"{tname}.weight"]
        leaf = "embedding" if kind == "embedding" else "kernel"
        value = {"linear": lambda w: w.T, "conv": lambda w: w.transpose(2, 3, 1, 0),
                 "embedding": lambda w: w, "conv1d": lambda w: w.T}[kind](w)
        items = [(f"{fpath}/{leaf}", value)]
        if f"{tname}.bias" in state:
            items.append((f"{fpath}/bias", state[f"{tname}.bias"]))
        for key, v in items:
            if index is None:
                out[key] = np.ascontiguousarray(v)
            else:
                out.setdefault(key, []).append(v)
    out = {k: np.stack(v) if isinstance(v, list) else v for k, v in out.items()}
    for key, shape in (reshape or {}).items():
        out[key] = out[key].reshape(shape)
    return out


def flax_to_torch(flat: dict, modules, torch_shapes: dict) -> dict:
    """The inverse of :func:`torch_to_flax`; a DenseGeneral kernel is flattened back to
    the torch weight's shape (C order, as jlora.peft exports it)."""
    out = {}
    for tname, fpath, kind, index in _expand_modules(modules):
        leaf = "embedding" if kind == "embedding" else "kernel"
        k = flat[f"{fpath}/{leaf}"]
        k = k if index is None else k[index]
        if kind == "linear":
            n_out, n_in = torch_shapes[f"{tname}.weight"]
            k = k.reshape(n_in, n_out).T
        elif kind == "conv":
            k = k.transpose(3, 2, 0, 1)
        elif kind == "conv1d":
            k = k.T
        out[f"{tname}.weight"] = np.ascontiguousarray(k)
        if f"{fpath}/bias" in flat:
            b = flat[f"{fpath}/bias"]
            out[f"{tname}.bias"] = np.ascontiguousarray(b if index is None else b[index])
    return out


def flatten(tree: dict, prefix: str = "") -> dict:
    """``{"a/b/c": array}`` from a nested dict of arrays (the inverse of :func:`nest`)."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}/"))
        else:
            out[f"{prefix}{key}"] = np.asarray(value)
    return out


def nest(flat: dict) -> dict:
    """A nested dict from ``{"a/b/c": array}``."""
    tree: dict = {}
    for path, value in flat.items():
        node = tree
        *parents, leaf = path.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return tree


def inputs_to_flax(inputs: dict) -> dict:
    return {k: v.transpose(0, 2, 3, 1) if v.ndim == 4 else v for k, v in inputs.items()}


def save_st(path: pathlib.Path, arrays: dict) -> None:
    safetensors.numpy.save_file({k: np.ascontiguousarray(v) for k, v in arrays.items()}, path)


# -- transformers' Flax ports (imported only by the cases that name one) -------------------


def hf_flax_apply(case: dict):
    """``(variables, input_ids) -> logits`` of the case's transformers Flax model, built
    from its ``flax_model`` and ``hf_config`` without weights; None without transformers."""
    try:
        import transformers
    except ImportError:
        return None
    flax_class = getattr(transformers, case["flax_model"])
    model = flax_class(flax_class.config_class(**case["hf_config"]), _do_init=False)
    return lambda variables, input_ids: model(input_ids, params=variables["params"]).logits


def hf_flax_params(torch_model) -> dict:
    """``{flax path: array}`` of a transformers torch model, as transformers converts it
    (``Flax<Class>.from_pretrained(dir, from_pt=True)``), under a ``params`` collection."""
    import transformers

    flax_class = getattr(transformers, "Flax" + type(torch_model).__name__)
    with tempfile.TemporaryDirectory() as tmp:
        torch_model.save_pretrained(tmp)
        return flatten({"params": flax_class.from_pretrained(tmp, from_pt=True).params})


# -- default mode: PEFT -> fixtures --------------------------------------------------------


def _scales_and_ranks(peft_model) -> tuple[dict, dict]:
    modules = [(n, m) for n, m in peft_model.base_model.model.named_modules()
               if hasattr(m, "scaling") and "default" in m.scaling]
    return ({n: float(m.scaling["default"]) for n, m in modules},
            {n: int(m.r["default"]) for n, m in modules})


def transformers_flax(spec: dict, base: dict, merged_model, inputs: dict, outputs: dict):
    """``(base, merged)`` flax params of a transformers model, as transformers converts
    them, checked two ways: ``spec["modules"]`` maps the adapted weights as
    :func:`torch_to_flax` does, and the Flax model gives the torch base model's logits on
    the base params and PEFT's (``outputs``) on the merged ones. Returns the max gaps too."""
    torch = _torch()
    base_model = build_model(spec["model"]).eval()
    base_model.load_state_dict({k: torch.from_numpy(v) for k, v in base.items()})
    with torch.no_grad():
        base_outputs = to_numpy(base_model(**inputs))
    apply = hf_flax_apply(spec)
    x = inputs_to_flax(to_numpy(inputs))
    params, gaps = [], []
    for model, expected in ((base_model, base_outputs), (merged_model, outputs)):
        flat = hf_flax_params(model)
        for key, value in torch_to_flax(to_numpy(model.state_dict()), spec["modules"]).items():
            if not np.array_equal(flat[key], value):
                raise RuntimeError(f"transformers converts {key} (shape {flat[key].shape}) "
                                   f"otherwise than torch_to_flax (shape {value.shape}): fix "
                                   "the module kinds of the case")
        got = {"logits": np.asarray(apply(nest(flat), **x))}
        gaps.append(max(float(np.abs(got[k] - expected[k]).max()) for k in expected))
        params.append(flat)
    if max(gaps) > TOL:
        raise RuntimeError(f"{spec['flax_model']} differs from the torch model by {gaps} "
                           "(base, merged): the fixture's flax layout would be wrong")
    return params[0], params[1], gaps


def make_case(name: str, spec: dict, out_root: pathlib.Path) -> None:
    torch = _torch()
    from peft import LoraConfig, PeftModel, get_peft_model

    model = build_model(spec["model"]).eval()
    base = to_numpy(model.state_dict())
    inputs = make_inputs(spec["model"])
    config = LoraConfig(init_lora_weights=False, **spec["peft"])
    peft_model = get_peft_model(model, config).eval()
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for pname, p in peft_model.named_parameters():
            if "lora_magnitude_vector" in pname:
                p.mul_(0.5 + torch.rand(p.shape, generator=g))  # |W + sBA| -> anything
            elif "lora_" in pname:
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
            elif p.requires_grad:  # modules_to_save copies, biases, trainable tokens
                p.add_(0.3 * torch.randn(p.shape, generator=g))
        trained_outputs = to_numpy(peft_model(**inputs))

    case_dir = out_root / name
    if case_dir.exists():
        shutil.rmtree(case_dir)
    (case_dir / "adapter").mkdir(parents=True)
    peft_model.save_pretrained(case_dir / "adapter")
    (case_dir / "adapter" / "README.md").unlink(missing_ok=True)  # boilerplate, not data

    # The reference is what the *directory* means to PEFT: load it onto a fresh base model.
    # (It can differ from the model that saved it: PEFT writes adapter_config.json with
    # sorted keys, so overlapping rank/alpha_pattern keys change precedence on reload.)
    fresh = build_model(spec["model"])
    fresh.load_state_dict({k: torch.from_numpy(v) for k, v in base.items()})
    loaded = PeftModel.from_pretrained(fresh.eval(), case_dir / "adapter").eval()
    scales, ranks = _scales_and_ranks(loaded)
    with torch.no_grad():
        outputs = to_numpy(loaded(**inputs))
    reload_gap = max(float(np.abs(trained_outputs[k] - outputs[k]).max()) for k in outputs)
    if reload_gap > TOL:
        print(f"WARNING {name}: PEFT's reloaded adapter differs from the one it saved by "
              f"{reload_gap:.2e}; the fixture records the reloaded one.")
    merged_model = loaded.merge_and_unload().eval()
    merged = to_numpy(merged_model.state_dict())
    with torch.no_grad():
        merged_outputs = to_numpy(merged_model(**inputs))
    gap = max(float(np.abs(merged_outputs[k] - outputs[k]).max()) for k in outputs)
    # Every adapted or trained module must have moved, or the fixture tests nothing; the
    # "untouched" ones must be exactly the base.
    for tname, *_ in _expand_modules(spec["modules"]):
        keys = [k for k in (f"{tname}.weight", f"{tname}.bias") if k in base]
        moved = [k for k in keys if np.abs(merged[k] - base[k]).max() >= 1e-3]
        if tname in spec.get("untouched", ()):
            if any(not np.array_equal(merged[k], base[k]) for k in keys):
                raise RuntimeError(f"{name}: merging changed {tname}, which should be untouched")
        elif not moved:
            raise RuntimeError(f"{name}: merging left {tname} unchanged")

    x = to_numpy(inputs)
    if spec.get("flax_params") == "transformers":
        flax_base, flax_merged, flax_gaps = transformers_flax(
            spec, base, merged_model, inputs, outputs)
        print(f"{name:10s} {spec['flax_model']} vs torch: base {flax_gaps[0]:.1e}, "
              f"merged vs PEFT {flax_gaps[1]:.1e}")
    else:
        flax_base, flax_merged = (torch_to_flax(w, spec["modules"]) for w in (base, merged))
    save_st(case_dir / "torch.safetensors", {
        **{f"base/{k}": v for k, v in base.items()},
        **{f"merged/{k}": v for k, v in merged.items()},
        **{f"x/{k}": v for k, v in x.items()},
        **{f"y/{k}": v for k, v in outputs.items()},
    })
    save_st(case_dir / "flax.safetensors", {
        **{f"base/{k}": v for k, v in flax_base.items()},
        **{f"merged/{k}": v for k, v in flax_merged.items()},
        **{f"x/{k}": v for k, v in inputs_to_flax(x).items()},
        **{f"y/{k}": v for k, v in inputs_to_flax(outputs).items()},
    })
    (case_dir / "case.json").write_text(json.dumps({
        "model": spec["model"],
        "modules": spec["modules"],
        "layouts": spec.get("layouts", {}),
        **{k: spec[k] for k in ("flax_params", "hf_config", "flax_model") if k in spec},
        "peft_config": spec["peft"],
        "peft_scales": scales,
        "peft_ranks": ranks,
    }, indent=2) + "\n")
    print(f"{name:10s} ranks={ranks} scales={ {k: round(v, 4) for k, v in scales.items()} } "
          f"merged-vs-unmerged {gap:.1e}, saved-vs-reloaded {reload_gap:.1e}")


def make_fixtures(out_root: pathlib.Path, only=None) -> None:
    import peft
    torch = _torch()
    print(f"torch {torch.__version__}, peft {peft.__version__}; writing {out_root}")
    out_root.mkdir(parents=True, exist_ok=True)
    for name, spec in CASES.items():
        if not only or name in only:
            make_case(name, spec, out_root)
    convert_fixtures.make_all(out_root)
    if not only or "loftq" in only:
        loftq_fixture.make(out_root)  # PEFT's LoftQ (see that module)
    total = sum(f.stat().st_size for f in out_root.rglob("*") if f.is_file())
    print(f"total fixture size: {total / 1024:.1f} KiB")


# -- --jlora-side: runs under jlora's python -----------------------------------------------


def export_layouts(spec: dict, case: dict, apply, params, inputs: dict) -> tuple[dict, str]:
    """``(layouts, where they come from)`` for an export: ``jlora.infer_layouts`` on the
    case's model where the export asks for it (and jlora and transformers are there to do
    it), else the case's own layouts; for other exports, those their first config gives."""
    import jlora

    if not spec.get("infer_layouts"):
        return spec["configs"][0].get("layouts"), "config"
    if apply is None or not hasattr(jlora, "infer_layouts"):
        missing = "transformers" if apply is None else "jlora.infer_layouts"
        return dict(case["layouts"]), f"case.json (no {missing})"
    return dict(jlora.infer_layouts(apply, params, **inputs)), "jlora.infer_layouts"


def jlora_side(out_root: pathlib.Path, fixtures: pathlib.Path) -> None:
    report = {}
    for name, spec in EXPORTS.items():
        try:
            report[name] = export_one(out_root / name, spec, fixtures)
        except Exception as e:  # reported per export: one failure must not hide the others
            traceback.print_exc()
            report[name] = {"error": f"{type(e).__name__}: {e}"}
    (out_root / "report.json").write_text(json.dumps(report, indent=2))
    converted = convert_fixtures.jlora_side(out_root, fixtures)
    (out_root / "convert_report.json").write_text(json.dumps(converted, indent=2))


def export_one(case_dir: pathlib.Path, spec: dict, fixtures: pathlib.Path) -> dict:
    """Make adapters for one export with jlora, write them to ``case_dir`` (adapter/,
    merged.safetensors and, where the case has a Flax model, logits.safetensors) and
    return its report entry."""
    import jax
    import jax.numpy as jnp

    import jlora

    stored = safetensors.numpy.load_file(fixtures / spec["base"] / "flax.safetensors")
    case = json.loads((fixtures / spec["base"] / "case.json").read_text())
    flat = {k[len("base/"):]: v for k, v in stored.items() if k.startswith("base/")}
    for key, shape in spec.get("reshape", {}).items():
        flat[key] = flat[key].reshape(shape)
    params = jax.tree.map(jnp.asarray, nest(flat))
    inputs = {k[len("x/"):]: jnp.asarray(v) for k, v in stored.items() if k.startswith("x/")}
    apply = hf_flax_apply(case) if "flax_model" in case else None
    layouts, layouts_from = export_layouts(spec, case, apply, params, inputs)
    adapters = {}
    given = {} if spec.get("infer_layouts") else layouts  # what the reader is told below
    for i, cfg in enumerate(spec["configs"]):
        cfg = dict(cfg)
        if spec.get("infer_layouts"):
            # LoraConfig refuses a layout for a kernel it does not target.
            cfg["layouts"] = {p: v for p, v in layouts.items() if re.fullmatch(cfg["targets"], p)}
            given.update(cfg["layouts"])
        if cfg.get("scaling") == "custom":
            cfg["scaling"] = lambda rank, alpha: 0.37 * alpha + 0.01 * rank
        made = jlora.init(jax.random.key(i), params, jlora.LoraConfig(**cfg))
        adapters.update(made)
    for j, (path, ad) in enumerate(sorted(adapters.items())):
        ka, kb, km = jax.random.split(jax.random.fold_in(jax.random.key(7), j), 3)
        changes = dict(a=0.3 * jax.random.normal(ka, ad.a.shape),
                       b=0.3 * jax.random.normal(kb, ad.b.shape))
        if ad.magnitude is not None:
            changes["magnitude"] = ad.magnitude * jax.random.uniform(
                km, ad.magnitude.shape, minval=0.5, maxval=1.5)
        adapters[path] = ad.replace(**changes)
    for path, keep in spec.get("layers", {}).items():  # the other layers: zero factors
        off = np.array([i not in keep for i in range(adapters[path].a.shape[0])])
        adapters[path] = adapters[path].replace(
            **{f: jnp.where(off.reshape(-1, *[1] * (x.ndim - 1)), 0.0, x)
               for f, x in (("a", adapters[path].a), ("b", adapters[path].b))})
    trainable, frozen = jlora.split_trainable(params, adapters, **spec.get("trainable", {}))
    keys = iter(jax.random.split(jax.random.key(11), 64))
    trainable["params"] = jax.tree.map(
        lambda x: x + 0.3 * jax.random.normal(next(keys), x.shape, x.dtype), trainable["params"])
    jlora.peft.save(case_dir / "adapter", trainable, base=params, **spec.get("save", {}))
    merged = jlora.merge_trainable(trainable, frozen)
    params = jlora.merge_trainable(trainable, frozen, merge_adapters=False)
    save_st(case_dir / "merged.safetensors",
            {k: np.asarray(v) for k, v in jlora.select(merged, ".*").items()})
    if apply is not None:
        save_st(case_dir / "logits.safetensors", {
            "lora": np.asarray(jlora.lora(apply)(params, adapters, **inputs)),
            "merged": np.asarray(apply(merged, **inputs)),
        })
    # Round trip through the directory, as a sanity check of the reader: the same
    # trainable half (adapters, trained leaves, partial updates), bit for bit.
    base = jax.tree.map(jnp.asarray, nest(flat))
    back, _ = jlora.peft.load_trainable(case_dir / "adapter", base, layouts=given)
    same = jax.tree.structure(back) == jax.tree.structure(trainable) and jax.tree.all(
        jax.tree.map(lambda x, y: bool(x.dtype == y.dtype and (x == y).all()), back, trainable))
    module_scales = {}
    for p, ad in adapters.items():
        ns = ad.layout.num_stacked
        for idx in np.ndindex(*ad.a.shape[:ns]):
            if idx and idx[0] not in spec.get("layers", {}).get(p, [idx[0]]):
                continue  # a layer without factors is not written
            module_scales[jlora.peft.default_module_name(p, ns).format(*idx)] = ad.scale
    return {
        "module_scales": module_scales,
        "policies": {p: ad.policy for p, ad in adapters.items()},
        "round_trip_exact": bool(same),
        "layouts_from": layouts_from,
        "layouts": {p: (layouts or {}).get(p) for p in case["layouts"]},
    }


# -- --check-export: jlora -> PEFT ---------------------------------------------------------


def check_flax_logits(case: dict, report: dict, out: pathlib.Path, y_peft: dict):
    """``(good, note)`` for an export of a case with a transformers Flax model: its layouts
    are the case's, and the Flax model's logits on jlora's adapters, factored
    (``jlora.lora``) and merged, are PEFT's. ``(True, "")`` for other cases."""
    if "flax_model" not in case:
        return True, ""
    layouts_ok = report["layouts"] == case["layouts"]
    note = f"\n{'':20s}layouts from {report['layouts_from']}: " + (
        "the case's" if layouts_ok else f"{report['layouts']}, expected {case['layouts']}")
    if not (out / "logits.safetensors").exists():
        return layouts_ok, note + f"; {case['flax_model']} logits not computed (no " \
            "transformers in --jlora-python)"
    logits = safetensors.numpy.load_file(out / "logits.safetensors")
    gaps = {k: float(np.abs(v - y_peft["logits"]).max()) for k, v in logits.items()}
    note += f"; {case['flax_model']} logits vs PEFT max|diff|: " + ", ".join(
        f"{k} {v:.2e}" for k, v in gaps.items())
    return layouts_ok and max(gaps.values()) <= TOL, note


def check_export(jlora_python: str, fixtures: pathlib.Path) -> bool:
    torch = _torch()
    from peft import PeftModel

    ok = True
    with tempfile.TemporaryDirectory() as tmp:
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        cmd = [jlora_python, str(pathlib.Path(__file__).resolve()), "--jlora-side", tmp,
               "--fixtures", str(fixtures), *(a for n in EXPORTS for a in ("--case", n))]
        subprocess.run(cmd, check=True, cwd=ROOT, env=env)
        report = json.loads((pathlib.Path(tmp) / "report.json").read_text())
        for name, spec in EXPORTS.items():
            base_spec = CASES[spec["base"]]
            if "error" in report[name]:
                ok = False
                print(f"{name:15s} FAIL jlora: {report[name]['error']}")
                continue
            stored = safetensors.numpy.load_file(fixtures / spec["base"] / "torch.safetensors")
            base = {k[5:]: v for k, v in stored.items() if k.startswith("base/")}
            inputs = {k[2:]: torch.from_numpy(v) for k, v in stored.items() if k.startswith("x/")}
            shapes = {k: v.shape for k, v in base.items()}

            model = build_model(base_spec["model"])
            model.load_state_dict({k: torch.from_numpy(v) for k, v in base.items()})
            peft_model = PeftModel.from_pretrained(model.eval(), os.path.join(tmp, name, "adapter"))
            peft_model.eval()
            # The base with jlora's merged weights on the modules it adapts (all of them,
            # but in gpt2, whose layer norms and embeddings stay as they are).
            jlora_merged = {**base, **flax_to_torch(
                safetensors.numpy.load_file(pathlib.Path(tmp) / name / "merged.safetensors"),
                base_spec["modules"], shapes)}
            reference = build_model(base_spec["model"]).eval()
            reference.load_state_dict({k: torch.from_numpy(v) for k, v in jlora_merged.items()})
            with torch.no_grad():
                y_peft = to_numpy(peft_model(**inputs))
                y_jlora = to_numpy(reference(**inputs))
                peft_scales = {
                    m: float(mod.scaling["default"])
                    for m, mod in peft_model.base_model.model.named_modules()
                    if hasattr(mod, "scaling") and "default" in mod.scaling
                }
                merged = to_numpy(peft_model.merge_and_unload().state_dict())
            out_gap = max(float(np.abs(y_peft[k] - y_jlora[k]).max()) for k in y_peft)
            w_gap = max(float(np.abs(merged[k] - jlora_merged[k]).max()) for k in merged)
            # The same modules, each with bit-for-bit the scale jlora's adapter carries.
            scales_match = peft_scales == report[name]["module_scales"]
            good = out_gap <= TOL and w_gap <= TOL and scales_match and \
                report[name]["round_trip_exact"]
            flax_good, flax_note = check_flax_logits(
                base_spec, report[name], pathlib.Path(tmp) / name, y_peft)
            good &= flax_good
            ok &= good
            print(f"{name:15s} {'OK  ' if good else 'FAIL'} output max|diff|={out_gap:.2e} "
                  f"merged-weight max|diff|={w_gap:.2e} PEFT scales="
                  f"{sorted(set(round(s, 6) for s in peft_scales.values()))} "
                  f"scales exact={scales_match} jlora round trip exact="
                  f"{report[name]['round_trip_exact']}{flax_note}")
        converted = json.loads((pathlib.Path(tmp) / "convert_report.json").read_text())
        ok &= convert_fixtures.check_exports(pathlib.Path(tmp), fixtures, converted, CASES,
                                             build_model)
    print("export check:", "PASSED" if ok else "FAILED")
    return ok


def main(argv=None) -> int:
    if os.environ.get("PYTHONHASHSEED") != "0":
        # PEFT keeps target_modules in a set: fix string hashing so that the JSON it writes
        # (and so the committed fixtures) come out byte for byte the same on every run.
        os.execve(sys.executable, [sys.executable, *sys.argv],
                  dict(os.environ, PYTHONHASHSEED="0"))
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=pathlib.Path, default=FIXTURES,
                        help="fixture directory (default: tests/fixtures/peft)")
    parser.add_argument("--check-export", action="store_true",
                        help="export adapters with jlora and load them with PEFT")
    parser.add_argument("--jlora-python", default=str(ROOT / ".venv" / "bin" / "python"),
                        help="python with jlora and jax (default: .venv/bin/python)")
    parser.add_argument("--fixtures", type=pathlib.Path, default=FIXTURES,
                        help="fixtures to read the base weights from (default: %(default)s)")
    parser.add_argument("--case", action="append", dest="cases", metavar="NAME",
                        help="make or check only this case (repeatable; default: all)")
    parser.add_argument("--jlora-side", type=pathlib.Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.cases:
        for name in [n for n in EXPORTS if n not in args.cases]:
            del EXPORTS[name]
    if args.jlora_side:
        jlora_side(args.jlora_side, args.fixtures)
        return 0
    if args.check_export:
        return 0 if check_export(args.jlora_python, args.fixtures) else 1
    make_fixtures(args.out, args.cases)
    return 0


if __name__ == "__main__":
    sys.exit(main())
