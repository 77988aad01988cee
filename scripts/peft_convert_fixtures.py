"""The PEFT fixtures of tests/test_peft_convert.py and tests/test_peft_moe.py, made by
scripts/make_peft_fixtures.py (which imports this module; run that script, not this one).

Each case directory under tests/fixtures/peft/ holds ``convert.json`` (not ``case.json``:
these cases need ``names=`` or a conversion, so tests/test_peft.py's generic cases skip
them), PEFT's adapter directories, and safetensors files of the base and PEFT's merged
weights, in torch layout and in the layout of the JAX tree the test loads them into:

* ``gemma_kv``, ``gemma_qkv``: transformers' ``GemmaForCausalLM`` (``k_proj``/``v_proj``,
  ``gate_proj``/``up_proj``) <-> the ``gemma`` package's tree (``kv_einsum``,
  ``qkv_einsum``, ``gating_einsum``: one kernel, several modules), through
  ``jlora.peft.templates.gemma``; ``gemma_qkv`` gives ``v_proj`` another rank.
* ``llama``: ``LlamaForCausalLM`` <-> Tunix's and MaxText's trees (``tunix.safetensors``,
  ``maxtext.safetensors``; ``maxtext_llama.safetensors`` as MaxText's Llama converter
  writes it, query scaled and RoPE interleaved), through ``templates.tunix`` and
  ``templates.maxtext``.
* ``pissa``, ``olora``, ``corda``: an MLP adapted with those inits: ``trained/`` (saved
  with the init), ``initial/`` (saved right after it) and ``converted/``, PEFT's own
  ``save_pretrained(path_initial_model_for_weight_conversion=...)``; merged = PEFT's
  trained model merged (on its residual base), which equals the original base plus the
  converted adapter.
* ``granitemoe``: transformers' ``GraniteMoeForCausalLM``, whose experts are 3-D
  ``nn.Parameter`` s ``(E, out, in)`` (the transformers 4.46 model that stores experts
  so), adapted with ``target_parameters`` beside a ``q_proj`` module.
* ``moe_nested``: a small torch module with two expert parameters on one module
  (``(E, in, out)``, ``is_transposed``), which PEFT nests (``experts.base_layer.*``).

``--check-export`` adds: jlora's adapters on each JAX tree, saved with the template or
``Split``/``Part``/``TargetParameter`` names (and ``gpt2_parts``: separate q, k, v
kernels as GPT-2's fused ``c_attn``), loaded by ``PeftModel.from_pretrained``, whose
merged weights must equal jlora's; and jlora's ``convert_to_original_base`` output
loaded by PEFT onto the original MLP.
"""

from __future__ import annotations

import json
import pathlib
import re
import shutil

import numpy as np
import safetensors.numpy

TOL = 1e-5
META = "convert.json"

GEMMA = dict(vocab_size=16, hidden_size=8, intermediate_size=10, num_hidden_layers=2,
             num_attention_heads=4, head_dim=6, max_position_embeddings=16)
LLAMA = dict(vocab_size=16, hidden_size=8, intermediate_size=10, num_hidden_layers=2,
             num_attention_heads=2, num_key_value_heads=1, head_dim=4,
             max_position_embeddings=16, tie_word_embeddings=False)
GRANITE = dict(vocab_size=16, hidden_size=8, intermediate_size=6, num_hidden_layers=2,
               num_attention_heads=2, num_key_value_heads=1, num_local_experts=3,
               num_experts_per_tok=2, max_position_embeddings=16)
LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

CASES = {
    "gemma_kv": dict(model="gemma", hf=dict(GEMMA, num_key_value_heads=2), peft=dict(
        r=2, lora_alpha=4, target_modules=[*LINEAR, "embed_tokens"],
        rank_pattern={"q_proj": 3, "down_proj": 1}, alpha_pattern={"o_proj": 3})),
    "gemma_qkv": dict(model="gemma", hf=dict(GEMMA, num_attention_heads=2,
                                              num_key_value_heads=2),
                      peft=dict(r=2, lora_alpha=4, target_modules=LINEAR,
                                rank_pattern={"v_proj": 3})),
    "llama": dict(model="llama", hf=LLAMA, peft=dict(
        r=2, lora_alpha=4, use_rslora=True, target_modules=[*LINEAR, "embed_tokens", "lm_head"],
        rank_pattern={"k_proj": 1})),
    "pissa": dict(model="mlp", init="pissa", peft=dict(
        r=2, lora_alpha=4, target_modules=["fc1", "fc2"], rank_pattern={"fc2": 1},
        alpha_pattern={"fc1": 3})),
    "olora": dict(model="mlp", init="olora", peft=dict(
        r=2, lora_alpha=3, use_rslora=True, target_modules=["fc1", "fc2"])),
    "corda": dict(model="mlp", init="corda", peft=dict(
        r=2, lora_alpha=4, target_modules=["fc1", "fc2"])),
    "granitemoe": dict(model="granitemoe", hf=GRANITE, peft=dict(
        r=2, lora_alpha=4, target_modules=["q_proj"],
        target_parameters=["input_linear.weight", "output_linear.weight"],
        rank_pattern={"output_linear.weight": 1}, alpha_pattern={"q_proj": 3})),
    "moe_nested": dict(model="moe_nested", peft=dict(
        r=2, lora_alpha=4, target_modules=[],
        target_parameters=["experts.gate_up_proj", "experts.down_proj"])),
}


# -- torch side ---------------------------------------------------------------------------


def _torch():
    import torch
    import torch.distributed.tensor  # noqa: F401  (torch 2.13: PEFT's from_pretrained needs it)

    return torch


def _moe_nested_class():
    torch = _torch()
    nn = torch.nn

    class Experts(nn.Module):
        # registered in this order: PEFT wraps gate_up_proj first (innermost)
        def __init__(self, experts=3, dim=5, hidden=4):
            super().__init__()
            self.gate_up_proj = nn.Parameter(torch.randn(experts, dim, 2 * hidden) * 0.3)
            self.down_proj = nn.Parameter(torch.randn(experts, hidden, dim) * 0.3)
            self.is_transposed = True  # (E, in, out), as PEFT's ParamWrapper reads it

        def forward(self, x):
            h = torch.einsum("ti,eio->eto", x, self.gate_up_proj)
            gate, up = h.chunk(2, dim=-1)
            return torch.einsum("eth,eho->to", torch.nn.functional.silu(gate) * up,
                                self.down_proj)

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.experts = Experts()

        def forward(self, x):
            return {"y": self.experts(x)}

    return Model


def build(spec: dict):
    torch = _torch()
    torch.manual_seed(0)
    model = spec["model"]
    if model == "mlp":
        nn = torch.nn

        class MLP(nn.Module):
            def __init__(self):
                super().__init__()
                self.fc1, self.fc2 = nn.Linear(8, 6), nn.Linear(6, 4)

            def forward(self, x):
                return {"y": self.fc2(torch.tanh(self.fc1(x)))}

        return MLP()
    if model == "moe_nested":
        return _moe_nested_class()()
    import transformers

    cls, config = {"gemma": ("GemmaForCausalLM", "GemmaConfig"),
                   "llama": ("LlamaForCausalLM", "LlamaConfig"),
                   "granitemoe": ("GraniteMoeForCausalLM", "GraniteMoeConfig")}[model]
    return getattr(transformers, cls)(getattr(transformers, config)(**spec["hf"]))


def inputs(spec: dict) -> dict:
    torch = _torch()
    g = torch.Generator().manual_seed(1)
    if spec["model"] == "mlp":
        return {"x": torch.randn(5, 8, generator=g)}
    if spec["model"] == "moe_nested":
        return {"x": torch.randn(4, 5, generator=g)}
    return {"input_ids": torch.randint(0, spec["hf"]["vocab_size"], (2, 5), generator=g)}


def _numpy(tensors) -> dict:
    return {k: np.array(v.detach().cpu().numpy(), copy=True) for k, v in tensors.items()}


def _outputs(model, x: dict) -> dict:
    torch = _torch()
    with torch.no_grad():
        out = model(**x)
    return {"y": out.logits if hasattr(out, "logits") else out["y"]}


def _perturb(peft_model, seed: int = 2) -> None:
    """Set every LoRA factor to non-zero values (a trained adapter)."""
    torch = _torch()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.add_(0.3 * torch.randn(p.shape, generator=g))


# -- layouts: torch state dicts -> the JAX trees (numpy; also used by --check-export) --------


def gemma_tree(state: dict, hf: dict) -> dict:
    """The ``gemma`` package's parameter tree (linen, under ``params``) of a transformers
    Gemma state dict, as the package's checkpoints store it (Gemma 3: gating (2, F, D))."""
    n, k, h = hf["num_attention_heads"], hf["num_key_value_heads"], hf["head_dim"]
    out = {"params/embedder/input_embedding": state["model.embed_tokens.weight"]}

    def heads(w, count):  # (count * H, D) -> (count, D, H)
        return w.reshape(count, h, -1).transpose(0, 2, 1)

    for i in range(hf["num_hidden_layers"]):
        s, p = f"model.layers.{i}.", f"params/layer_{i}/"
        q, kk, v = (state[s + f"self_attn.{m}.weight"] for m in ("q_proj", "k_proj", "v_proj"))
        if n == k:
            out[p + "attn/qkv_einsum/w"] = np.stack([heads(q, n), heads(kk, k), heads(v, k)])
        else:
            out[p + "attn/q_einsum/w"] = heads(q, n)
            out[p + "attn/kv_einsum/w"] = np.stack([heads(kk, k), heads(v, k)])
        out[p + "attn/attn_vec_einsum/w"] = state[s + "self_attn.o_proj.weight"].T.reshape(n, h, -1)
        out[p + "mlp/gating_einsum"] = np.stack([state[s + "mlp.gate_proj.weight"],
                                                 state[s + "mlp.up_proj.weight"]])
        out[p + "mlp/linear"] = state[s + "mlp.down_proj.weight"].T
    return {key: np.ascontiguousarray(v) for key, v in out.items()}


def tunix_tree(state: dict, hf: dict) -> dict:
    """Tunix's Llama 3 NNX state (``tunix/models/llama3/params.py``)."""
    n, k, h = hf["num_attention_heads"], hf["num_key_value_heads"], hf["head_dim"]
    d = hf["hidden_size"]
    out = {"embedder/input_embedding": state["model.embed_tokens.weight"],
           "lm_head/w": state["lm_head.weight"].T}
    for i in range(hf["num_hidden_layers"]):
        s, p = f"model.layers.{i}.", f"layers/{i}/"
        for m, count in (("q", n), ("k", k), ("v", k)):
            out[p + f"attn/{m}_proj/w"] = state[s + f"self_attn.{m}_proj.weight"].T.reshape(
                d, count, h)
        out[p + "attn/o_proj/w"] = state[s + "self_attn.o_proj.weight"].T.reshape(n, h, d)
        for m in ("gate", "up", "down"):
            out[p + f"mlp/{m}_proj/kernel"] = state[s + f"mlp.{m}_proj.weight"].T
    return {key: np.ascontiguousarray(v) for key, v in out.items()}


def maxtext_tree(state: dict, hf: dict) -> dict:
    """A MaxText tree scanned on axis 1, its kernels transformers' weights reshaped (as
    MaxText's param_mapping.py converts Qwen 3 and Gemma 3)."""
    n, k, h = hf["num_attention_heads"], hf["num_key_value_heads"], hf["head_dim"]
    d, layers = hf["hidden_size"], range(hf["num_hidden_layers"])
    root = "params/decoder/layers/"

    def stacked(name, fn):
        return np.stack([fn(state[f"model.layers.{i}.{name}.weight"]) for i in layers], axis=1)

    out = {"params/token_embedder/embedding": state["model.embed_tokens.weight"],
           "params/decoder/logits_dense/kernel": state["lm_head.weight"].T}
    for mt, hf_name, count in (("query", "q_proj", n), ("key", "k_proj", k),
                               ("value", "v_proj", k)):
        out[root + f"self_attention/{mt}/kernel"] = stacked(
            f"self_attn.{hf_name}", lambda w, c=count: w.T.reshape(d, c, h))
    out[root + "self_attention/out/kernel"] = stacked(
        "self_attn.o_proj", lambda w: w.T.reshape(n, h, d))
    for mt, hf_name in (("wi_0", "gate_proj"), ("wi_1", "up_proj"), ("wo", "down_proj")):
        out[root + f"mlp/{mt}/kernel"] = stacked(f"mlp.{hf_name}", lambda w: w.T)
    return {key: np.ascontiguousarray(v) for key, v in out.items()}


def maxtext_llama_tree(state: dict, hf: dict) -> dict:
    """:func:`maxtext_tree` as MaxText's Llama converter writes it: the query kernel times
    ``1/sqrt(head_dim)``, query and key features interleaved for its RoPE (feature ``2j``
    is transformers' ``j``, ``2j + 1`` is ``j + head_dim / 2``)."""
    out = maxtext_tree(state, hf)
    half = hf["head_dim"] // 2
    order = np.stack([np.arange(half), np.arange(half) + half], axis=-1).reshape(-1)
    root = "params/decoder/layers/self_attention/"
    out[root + "query/kernel"] = np.ascontiguousarray(
        out[root + "query/kernel"][..., order] * np.float32(hf["head_dim"] ** -0.5))
    out[root + "key/kernel"] = np.ascontiguousarray(out[root + "key/kernel"][..., order])
    return out


def mlp_tree(state: dict, hf=None) -> dict:
    return {f"params/{m}/{leaf}": (w.T if leaf == "kernel" else w)
            for m in ("fc1", "fc2") for leaf, w in (("kernel", state[f"{m}.weight"]),
                                                    ("bias", state[f"{m}.bias"]))}


def granite_tree(state: dict, hf: dict) -> dict:
    """Expert weights as torch stores them, ``(E, out, in)`` (layout ``"soi"``), and
    ``q_proj`` as a flax kernel ``(in, out)``."""
    out = {}
    for i in range(hf["num_hidden_layers"]):
        s, p = f"model.layers.{i}.", f"params/model/layers/{i}/"
        out[p + "self_attn/q_proj/kernel"] = state[s + "self_attn.q_proj.weight"].T
        for m in ("input_linear", "output_linear"):
            out[p + f"block_sparse_moe/{m}/weight"] = state[s + f"block_sparse_moe.{m}.weight"]
    return {key: np.ascontiguousarray(v) for key, v in out.items()}


def moe_nested_tree(state: dict, hf=None) -> dict:
    return {f"params/experts/{m}": np.ascontiguousarray(state[f"experts.{m}"])
            for m in ("gate_up_proj", "down_proj")}


TREES = {"gemma": {"flax": gemma_tree},
         "llama": {"tunix": tunix_tree, "maxtext": maxtext_tree,
                   "maxtext_llama": maxtext_llama_tree},
         "mlp": {"flax": mlp_tree}, "granitemoe": {"flax": granite_tree},
         "moe_nested": {"flax": moe_nested_tree}}


def _save_st(path: pathlib.Path, arrays: dict) -> None:
    safetensors.numpy.save_file({k: np.ascontiguousarray(v) for k, v in arrays.items()}, path)


def _reference(spec: dict, base: dict, adapter_dir: pathlib.Path, x: dict):
    """What a directory means to PEFT: loaded onto a fresh base model, its output, its
    modules' scales and its merged weights."""
    torch = _torch()
    from peft import PeftModel

    model = build(spec)
    model.load_state_dict({k: torch.from_numpy(v) for k, v in base.items()})
    loaded = PeftModel.from_pretrained(model.eval(), adapter_dir).eval()
    scales = {n: float(m.scaling["default"]) for n, m in loaded.base_model.model.named_modules()
              if isinstance(getattr(m, "scaling", None), dict) and "default" in m.scaling}
    y = _outputs(loaded, x)
    merged = loaded.merge_and_unload()
    return y, scales, _numpy(merged.state_dict())


def _peft_config(spec: dict):
    from peft import LoraConfig
    from peft.tuners.lora.config import CordaConfig

    extra = {}
    if spec.get("init") == "corda":
        extra["corda_config"] = CordaConfig(corda_method="kpm")
    return LoraConfig(init_lora_weights=spec.get("init", False), **spec["peft"], **extra)


def make_case(name: str, spec: dict, out_root: pathlib.Path) -> None:
    torch = _torch()
    from peft import get_peft_model

    case_dir = out_root / name
    if case_dir.exists():
        shutil.rmtree(case_dir)
    case_dir.mkdir(parents=True)
    model = build(spec).eval()
    base = _numpy(model.state_dict())
    x = inputs(spec)
    config = _peft_config(spec)
    if spec.get("init") == "corda":
        from peft.tuners.lora.corda import preprocess_corda

        g = torch.Generator().manual_seed(3)
        samples = torch.randn(64, 8, generator=g)
        preprocess_corda(model, config, run_model=lambda: model(samples))
    peft_model = get_peft_model(model, config).eval()
    save_embeddings = {"save_embedding_layers": False}
    if "init" in spec:
        peft_model.save_pretrained(case_dir / "initial")
    _perturb(peft_model)
    adapter = "trained" if "init" in spec else "adapter"
    peft_model.save_pretrained(case_dir / adapter, **save_embeddings)
    if "init" in spec:
        peft_model.save_pretrained(case_dir / "converted",
                                   path_initial_model_for_weight_conversion=str(
                                       case_dir / "initial"))
        y = _outputs(peft_model, x)
        merged = _numpy(peft_model.merge_and_unload().state_dict())
        # PEFT's converted adapter on the original base must give the same model.
        y_conv, scales, merged_conv = _reference(spec, base, case_dir / "converted", x)
        gap = max(float(np.abs(merged_conv[k] - merged[k]).max()) for k in merged)
        print(f"  {name}: PEFT's converted adapter vs its trained model: merged {gap:.1e}")
    else:
        y, scales, merged = _reference(spec, base, case_dir / adapter, x)
    for d in case_dir.iterdir():
        if d.is_dir():
            (d / "README.md").unlink(missing_ok=True)  # boilerplate, not data
    changed = sorted(k for k in base if not np.array_equal(base[k], merged[k]))
    trees = TREES[spec["model"]]
    for tree, fn in trees.items():
        _save_st(case_dir / f"{tree}.safetensors", {
            **{f"base/{k}": v for k, v in fn(base, spec.get("hf")).items()},
            **{f"merged/{k}": v for k, v in fn(merged, spec.get("hf")).items()},
        })
    _save_st(case_dir / "torch.safetensors", {
        **{f"base/{k}": v for k, v in base.items() if k in changed or spec["model"] == "mlp"},
        **{f"merged/{k}": v for k, v in merged.items() if k in changed},
        **{f"x/{k}": v for k, v in _numpy(x).items()},
        **{f"y/{k}": v for k, v in _numpy(y).items()},
    })
    (case_dir / META).write_text(json.dumps({
        "model": spec["model"], "hf": spec.get("hf"), "init": spec.get("init"),
        "peft_config": spec["peft"], "peft_scales": scales, "changed": changed,
    }, indent=2) + "\n")
    print(f"{name:12s} {len(changed)} weights changed; PEFT scales "
          f"{sorted({round(s, 4) for s in scales.values()})}")


def make_all(out_root: pathlib.Path) -> None:
    for name, spec in CASES.items():
        make_case(name, spec, out_root)


# -- --check-export -----------------------------------------------------------------------
#
# jlora side (jlora's python): adapters for a case's JAX tree, saved with the names the
# test uses; the torch side loads each with PEFT and compares merged weights in that tree.

EXPORTS = {
    "gemma_kv": dict(case="gemma_kv", tree="flax", template="gemma"),
    "gemma_qkv_fused": dict(case="gemma_qkv", tree="flax", template="gemma",
                            layouts={r".*/qkv_einsum/w": "ooio"}),
    "llama_tunix": dict(case="llama", tree="tunix", template="tunix"),
    "llama_maxtext": dict(case="llama", tree="maxtext", template="maxtext"),
    "llama_maxtext_rope": dict(case="llama", tree="maxtext_llama", template="maxtext",
                               template_args=dict(query_scale=LLAMA["head_dim"] ** -0.5,
                                                  interleaved_rope=True)),
    "gpt2_parts": dict(case="gpt2", tree="gpt2_parts"),
    "granitemoe": dict(case="granitemoe", tree="flax", names="granitemoe"),
    "moe_nested": dict(case="moe_nested", tree="flax", names="moe_nested"),
    "pissa": dict(case="pissa", convert=True),
    "olora": dict(case="olora", convert=True),
    "corda": dict(case="corda", convert=True),
}


def gpt2_parts(flat: dict, layers: int = 2) -> dict:
    """The gpt2 fixture's Flax tree with each ``c_attn`` kernel ``(3·d, in)`` (layout
    ``"oi"``) cut into query, key and value kernels ``(d, in)``."""
    out = {}
    for key, value in flat.items():
        if key.endswith("attn/c_attn/kernel"):
            for part, w in zip(("q", "k", "v"), np.split(value, 3, axis=0), strict=True):
                out[key.replace("c_attn/kernel", f"{part}/kernel")] = w
        elif key.endswith("attn/c_attn/bias"):
            continue
        else:
            out[key] = value
    return out


def export_names(spec: dict, flat: dict):
    """``(names, layouts)`` of an export (jlora side)."""
    import jlora

    if "template" in spec:
        t = getattr(jlora.peft.templates, spec["template"])(**spec.get("template_args", {}))
        return t, {**spec.get("layouts", {}), **t.layouts(flat)}
    if spec["tree"] == "gpt2_parts":
        names = {k: jlora.peft.Part(f"transformer.h.{k.split('/')[3]}.attn.c_attn", "qkv".index(
            k.split("/")[-2])) for k in flat if k.endswith(("/q/kernel", "/k/kernel", "/v/kernel"))}
        return names, {k: "oi" for k in names}
    if spec["names"] == "granitemoe":
        names, layouts = {}, {}
        for k in flat:
            i = k.split("/")[3]
            if k.endswith("/q_proj/kernel"):
                names[k] = f"model.layers.{i}.self_attn.q_proj"
            elif k.endswith("/weight"):
                m = k.split("/")[-2]
                names[k] = jlora.peft.TargetParameter(
                    f"model.layers.{i}.block_sparse_moe.{m}.weight", expert_axis=0)
                layouts[k] = "soi"
        return names, layouts
    return ({"params/experts/gate_up_proj": jlora.peft.TargetParameter(
        "experts.gate_up_proj", expert_axis=0, index=0),
        "params/experts/down_proj": jlora.peft.TargetParameter(
        "experts.down_proj", expert_axis=0, index=1)},
        {"params/experts/.*": "sio"})


def export_one(out: pathlib.Path, spec: dict, fixtures: pathlib.Path) -> dict:
    import jax
    import jax.numpy as jnp

    import jlora

    root = fixtures / spec["case"]
    if spec.get("convert"):
        jlora.peft.convert_to_original_base(root / "trained", root / "initial", out / "adapter")
        return {"note": "jlora.peft.convert_to_original_base"}
    tree = "flax" if spec["tree"] == "gpt2_parts" else spec["tree"]
    stored = safetensors.numpy.load_file(root / f"{tree}.safetensors")
    flat = {k[5:]: v for k, v in stored.items() if k.startswith("base/")}
    if spec["tree"] == "gpt2_parts":
        flat = gpt2_parts(flat)
    names, layouts = export_names(spec, flat)
    params = {k: jnp.asarray(v) for k, v in flat.items()}
    targets = [k for k in params if names(k) is not None] if callable(names) else list(names)
    config = jlora.LoraConfig(
        rank=2, alpha=3.0, targets="|".join(re.escape(t) for t in targets),
        layouts={p: v for p, v in layouts.items()
                 if any(p == t or re.fullmatch(p, t) for t in targets)})
    adapters = jlora.init(jax.random.key(0), params, config)
    for j, (path, ad) in enumerate(sorted(adapters.items())):
        ka, kb = jax.random.split(jax.random.fold_in(jax.random.key(7), j))
        adapters[path] = ad.replace(a=0.3 * jax.random.normal(ka, ad.a.shape),
                                    b=0.3 * jax.random.normal(kb, ad.b.shape))
    jlora.peft.save(out / "adapter", adapters, names=names)
    merged = jlora.merge(params, adapters)
    _save_st(out / "merged.safetensors", {k: np.asarray(v) for k, v in merged.items()
                                          if k in adapters})
    back = jlora.peft.load(out / "adapter", params, names=names, layouts=layouts)
    gap = max(float(jnp.abs(back[p].delta() - adapters[p].delta()).max()) for p in adapters)
    return {"round_trip_delta_gap": gap, "same_paths": sorted(back) == sorted(adapters)}


def jlora_side(out_root: pathlib.Path, fixtures: pathlib.Path) -> dict:
    import traceback

    report = {}
    for name, spec in EXPORTS.items():
        out = out_root / f"convert_{name}"
        out.mkdir(parents=True, exist_ok=True)
        try:
            report[name] = export_one(out, spec, fixtures)
        except Exception as e:  # reported per export: one failure must not hide the others
            traceback.print_exc()
            report[name] = {"error": f"{type(e).__name__}: {e}"}
    return report


def check_exports(tmp: pathlib.Path, fixtures: pathlib.Path, report: dict, cases: dict,
                  build_case_model) -> bool:
    """Load each jlora export with PEFT; its merged weights (in the export's JAX tree)
    must equal jlora's. ``cases`` and ``build_case_model`` are the main script's, for the
    ``gpt2`` model."""
    torch = _torch()
    from peft import PeftModel

    ok = True
    for name, spec in EXPORTS.items():
        entry = report.get(name, {"error": "missing from the jlora side's report"})
        if "error" in entry:
            ok = False
            print(f"{name:15s} FAIL jlora: {entry['error']}")
            continue
        root = fixtures / spec["case"]
        stored = safetensors.numpy.load_file(root / "torch.safetensors")
        if spec["case"] == "gpt2":
            case_spec, case_meta = cases["gpt2"], None
            model = build_case_model("gpt2")
            base = {k[5:]: v for k, v in stored.items() if k.startswith("base/")}
        else:
            case_spec = CASES[spec["case"]]
            model = build(case_spec)
            base = _numpy(model.state_dict())  # the same seed: the fixture's base
            case_meta = json.loads((root / META).read_text())
            fixture_base = {k[5:]: v for k, v in stored.items() if k.startswith("base/")}
            if any(not np.array_equal(base[k], v) for k, v in fixture_base.items()):
                ok = False
                print(f"{name:15s} FAIL the rebuilt torch model differs from the fixture's base")
                continue
        model.load_state_dict({k: torch.from_numpy(v) for k, v in base.items()})
        peft_model = PeftModel.from_pretrained(model.eval(), tmp / f"convert_{name}" / "adapter")
        merged = _numpy(peft_model.merge_and_unload().state_dict())
        if spec.get("convert"):
            # PEFT's own conversion, loaded the same way, is the reference.
            reference = build(case_spec)
            reference.load_state_dict({k: torch.from_numpy(v) for k, v in base.items()})
            theirs = _numpy(PeftModel.from_pretrained(reference.eval(), root / "converted")
                            .merge_and_unload().state_dict())
            gap = max(float(np.abs(merged[k] - theirs[k]).max()) for k in theirs)
        else:
            if spec["tree"] == "gpt2_parts":
                flax_merged = gpt2_parts(_gpt2_flax(merged))
            else:
                flax_merged = TREES[case_meta["model"]][spec["tree"]](merged, case_spec.get("hf"))
            ours = safetensors.numpy.load_file(tmp / f"convert_{name}" / "merged.safetensors")
            gap = max(float(np.abs(flax_merged[k] - v).max()) for k, v in ours.items())
        good = gap <= TOL and entry.get("round_trip_delta_gap", 0.0) <= TOL and \
            entry.get("same_paths", True)
        ok &= good
        print(f"{name:15s} {'OK  ' if good else 'FAIL'} merged-weight max|diff|={gap:.2e} "
              f"{json.dumps(entry)}")
    return ok


def _gpt2_flax(state: dict) -> dict:
    """The gpt2 fixture's adapted kernels in its Flax layout (``FlaxConv1D``: ``weight.T``,
    ``(out, in)``) keyed by Flax path, from a torch state dict."""
    out = {}
    for key, value in state.items():
        if key.endswith("attn.c_attn.weight"):
            i = key.split(".")[2]
            out[f"params/transformer/h/{i}/attn/c_attn/kernel"] = value.T
    return out
