"""Export: jlora adapters -> a PEFT directory."""

from __future__ import annotations

import collections
import json
import os
import pathlib
import re
from collections.abc import Mapping
from typing import cast

import jax
import numpy as np

from jlora import _paths as paths_lib
from jlora._adapter import Adapter, Adapters, check_adapters
from jlora._files import (
    safetensors_bytes,
    write_dir_atomic,
)
from jlora._jax_compat import is_tracer
from jlora._optim import ADAPTERS_KEY, PARAMS_KEY
from jlora._version import __version__
from jlora.layouts import Layout
from jlora.peft._config import _alpha_for_scale, _json_number, _most_common, _peft_scale
from jlora.peft._extras_save import export_parts, flat_parts, lora_bias_paths
from jlora.peft._format import CONFIG_NAME, METADATA_KEY, PREFIX, WEIGHTS_NAME, Names
from jlora.peft._names import _check_names_arg, _name_table, _template
from jlora.peft._structure import export_view
from jlora.peft._tensors import _layer, _peft_shapes, _to_peft


def _pattern_key(modules: list[tuple[tuple, str]], template: str, stacked) -> str:
    """A rank/alpha_pattern key that PEFT matches against exactly these modules."""
    if not stacked:
        return "^" + re.escape(template)
    # Fill the placeholders ("{}" or "{0}") with markers, then put an alternation of the
    # indices of that axis where each marker is.
    pieces = re.split("\0(\\d+)\0", template.format(*(f"\0{i}\0" for i in range(len(stacked)))))
    out = "^" + re.escape(pieces[0])
    for axis, piece in zip(pieces[1::2], pieces[2::2], strict=True):
        values = sorted({idx[int(axis)] for idx, _ in modules})
        out += "(?:" + "|".join(str(v) for v in values) + ")" + re.escape(piece)
    return out


def _is_zero(x) -> bool:
    """Whether ``x`` is a concrete array of zeros (False for abstract or traced values)."""
    if x is None:
        return True
    if is_tracer(x) or not isinstance(x, np.ndarray | jax.Array):
        return False
    return not np.any(np.asarray(x))


def _unadapted_layers(adapters: Adapters, table: dict, lora_biases: Mapping,
                      experts: set[str]) -> list[str]:
    """The module names of the layers of stacked kernels whose factors (and lora_B bias)
    are all zero: no update, as the layers PEFT's ``layers_to_transform`` leaves out. A
    kernel keeps all its layers if none has an update. Expert kernels (``experts``) keep
    every index: their stacked axes are not all layers, and zeros written are exact."""
    out = []
    by_path = collections.defaultdict(list)
    for name, (p, idx) in table.items():
        if idx and p not in experts:
            by_path[p].append((idx, name))
    for p, layers in by_path.items():
        ad, bias = adapters[p], lora_biases.get(p)
        empty = [name for idx, name in layers
                 if _is_zero(ad.a[idx]) and _is_zero(ad.b[idx])
                 and (bias is None or _is_zero(bias.delta[idx]))]
        if len(empty) < len(layers):
            if empty and ad.variant != "lora":
                raise ValueError(
                    f"The stacked kernel at path {p!r} has layers without an update (zero "
                    f"factors: {empty[:3]}) but a {ad.variant} adapter, which changes every "
                    "layer: PEFT's layers_to_transform cannot say that. Give those layers "
                    "factors, or unstack the kernel."
                )
            out += empty
    return out


def _layer_subset(adapters: Adapters, modules: Mapping[str, list], templates: Mapping,
                  experts: set[str]):
    """``(layers_to_transform, layers_pattern)`` for the config: the layer indices (first
    stacked axis) of the stacked kernels when some layers are left out, and the name
    component before the index when all stacked kernels share it, else ``None``s. The
    config's ``target_modules`` names every module in full, so PEFT selects exactly the
    written modules; these fields say the same for readers of the config."""
    kept, total, patterns = set(), set(), set()
    for p, entries in modules.items():
        ad: Adapter = adapters[p]
        if not ad.layout.num_stacked or p in experts:
            continue
        kept |= {idx[0] for idx, _ in entries}
        total |= set(range(ad.a.shape[0]))
        before = templates[p].split("{", 1)[0].rstrip(".").rpartition(".")[2]
        patterns.add(before or None)
    if kept == total:
        return None, None
    return sorted(kept), (patterns.pop() if len(patterns) == 1 else None)


def save(
    path: str | os.PathLike,
    adapters: Adapters | dict,
    *,
    names: Names = None,
    base_model_name_or_path: str | None = None,
    base=None,
    layouts: Mapping[str, str | Layout] | None = None,
    save_embedding_layers: bool | str = False,
) -> pathlib.Path:
    """Write ``adapters`` as a PEFT LoRA adapter directory (loadable by
    ``PeftModel.from_pretrained``), atomically.

    The files are written into a temporary directory beside ``path`` and renamed into
    place; an existing directory holding only a PEFT adapter is replaced, one holding
    anything else is refused.

    Args:
      path: the adapter directory to create or replace.
      adapters: ``{kernel path: Adapter}`` (all ``"lora"`` or all ``"dora"``, with one
        dropout rate: PEFT has one ``use_dora`` and one ``lora_dropout``); or
        :func:`jlora.split_trainable`'s ``trainable``, whose ``params`` half is written
        too: leaves trained in full as ``modules_to_save`` copies or trained biases
        (``bias="lora_only"`` / ``"all"``), :class:`~jlora.peft.LoraBias` as
        ``lora_bias``, :class:`~jlora.peft.TrainableTokens` as
        ``trainable_token_indices``. The layers of a stacked kernel whose two factors are
        both zero (and whose lora_B bias is zero) are left out, as PEFT's
        ``layers_to_transform`` leaves them out.
      names: module names for paths the default naming does not fit (see the module
        docstring): a callable ``path -> name or None`` or a dict ``{path: name}``.
      base_model_name_or_path: written into the config for ``PeftModel.from_pretrained``.
      base: the base params, for ``save_embedding_layers``, and to name and orient the
        leaves beside full weights that are not adapted (only their shapes are read).
      layouts: ``{pattern or path: layout}`` for the kernels trained in full (the
        adapted ones carry theirs), as in :class:`jlora.LoraConfig`; a 2-D kernel
        without one is taken as flax's ``(in, out)``.
      save_embedding_layers: PEFT's option of that name: also write the base weights of
        the adapted embedding tables (``True``) or of the adapted kernels whose path a
        pattern matches in full (e.g. ``".*/(embed_tokens|lm_head)/.*"``), from ``base``.

    Returns:
      ``path`` as a ``pathlib.Path``.

    Example:
      >>> import tempfile, json, jax, jax.numpy as jnp, jlora
      >>> params = {"layers": {"mlp": {"kernel": jnp.ones((3, 8, 4))}}}
      >>> cfg = jlora.LoraConfig(rank=2, alpha=4.0, layouts={"layers/mlp/kernel": "sio"})
      >>> ads = jlora.init(jax.random.key(0), params, cfg)
      >>> out = jlora.peft.save(tempfile.mkdtemp() + "/peft", ads)
      >>> config = json.loads((out / "adapter_config.json").read_text())
      >>> config["target_modules"], config["r"], config["lora_alpha"]
      (['layers.0.mlp', 'layers.1.mlp', 'layers.2.mlp'], 2, 4)
    """
    config, tensors, metadata = export(
        adapters, names=names, base_model_name_or_path=base_model_name_or_path, base=base,
        layouts=layouts, save_embedding_layers=save_embedding_layers,
    )
    host = {k: np.ascontiguousarray(jax.device_get(v)) for k, v in tensors.items()}
    files = {
        WEIGHTS_NAME: safetensors_bytes(host, metadata),
        CONFIG_NAME: (json.dumps(config, indent=2, allow_nan=False) + "\n").encode(),
    }
    return write_dir_atomic(path, files, what="a PEFT adapter")


def export(
    adapters: Adapters | dict,
    *,
    names: Names = None,
    base_model_name_or_path: str | None = None,
    base=None,
    layouts: Mapping[str, str | Layout] | None = None,
    save_embedding_layers: bool | str = False,
) -> tuple[dict, dict, dict]:
    """What :func:`save` writes, in memory: ``(adapter_config, tensors, file metadata)``.

    The tensors are computed with ``jax.numpy`` from the factors, so ``export`` also runs
    on abstract adapters under ``jax.eval_shape`` (PEFT key names and shapes of a 7B model
    without allocating it) and inside ``jit`` (where every layer of a stacked kernel is
    written: whether its factors are zero is only known for concrete arrays).

    Example:
      >>> import jax, jax.numpy as jnp, jlora
      >>> params = {"proj": {"kernel": jnp.ones((8, 4))}}
      >>> ads = jlora.init(jax.random.key(0), params, jlora.LoraConfig(rank=2))
      >>> config, tensors, _ = jlora.peft.export(ads)
      >>> {k: v.shape for k, v in tensors.items()}
      {'base_model.model.proj.lora_A.weight': (2, 8), 'base_model.model.proj.lora_B.weight': (4, 2)}
    """
    trained = None
    if isinstance(adapters, dict) and set(adapters) == {ADAPTERS_KEY, PARAMS_KEY}:
        # split_trainable's `trainable`: the adapters plus the params trained beside them
        adapters, trained = cast(Adapters, adapters[ADAPTERS_KEY]), adapters[PARAMS_KEY]
    check_adapters(adapters)
    if not adapters:
        raise ValueError("`adapters` is empty: there is nothing to export.")
    # Split, Part and TargetParameter kernels are written through a view of one module each.
    view = export_view(adapters, names)
    adapters, names = view.adapters, view.names
    variants = {ad.variant for ad in adapters.values()}
    if len(variants) > 1:
        dora = sorted(p for p, ad in adapters.items() if ad.variant == "dora")
        raise ValueError(
            f"PEFT has one `use_dora` per adapter, but these adapters mix variants "
            f"{sorted(variants)} (DoRA at {dora}). Export the two groups as separate adapters."
        )
    dropouts = {ad.dropout for ad in adapters.values()}
    if len(dropouts) > 1:
        raise ValueError(
            f"PEFT has one `lora_dropout` per adapter, but these adapters use {sorted(dropouts)}. "
            "Give them one rate with adapter.replace(dropout=...)."
        )
    named = [*adapters, *flat_parts(trained),
             *(paths_lib.leaf_paths(base) if base is not None else ())]
    _check_names_arg(names, named, "a path of `adapters`, of the trained params or of `base`")

    kernels = []
    for p, ad in adapters.items():
        ns = ad.layout.num_stacked  # the factors lead with the stacked axes, in layout order
        kernels.append((p, _template(p, ns, names), tuple(ad.a.shape[:ns])))
    table = _name_table(kernels)
    lora_biases = lora_bias_paths(adapters, flat_parts(trained))
    experts = {k.path for k in view.kernels}  # target parameters: stacked axes hold experts
    for name in _unadapted_layers(adapters, table, lora_biases, experts):
        del table[name]
    modules = collections.defaultdict(list)
    for name, (p, idx) in table.items():
        modules[p].append((idx, name))

    policies = [ad.policy for ad in adapters.values() if ad.policy in ("standard", "rslora")]
    use_rslora = policies.count("rslora") > policies.count("standard")
    global_policy = "rslora" if use_rslora else "standard"
    written_alpha, extra = {}, {}
    for p, ad in adapters.items():
        if ad.variant == "dora" and ad.magnitude is None:
            raise ValueError(f"The DoRA adapter at path {p!r} has no magnitude.")
        alpha = float(ad.alpha)
        if _peft_scale(ad.rank, alpha, use_rslora) != ad.scale:
            alpha = _alpha_for_scale(ad.scale, ad.rank, use_rslora)
        if ad.policy != global_policy or alpha != ad.alpha:
            # PEFT's config cannot say this; jlora's metadata beside the tensors can.
            for _, name in modules[p]:
                extra[name] = {"policy": ad.policy, "alpha": ad.alpha, "scale": ad.scale}
        written_alpha[p] = alpha
    r = _most_common([ad.rank for ad in adapters.values()])
    lora_alpha = _most_common(list(written_alpha.values()))
    rank_pattern, alpha_pattern = {}, {}
    for p, template, stacked in kernels:
        key = _pattern_key(modules[p], template, stacked)
        if adapters[p].rank != r:
            rank_pattern[key] = adapters[p].rank
        if written_alpha[p] != lora_alpha:
            alpha_pattern[key] = _json_number(written_alpha[p])

    tensors = {}
    for p, ad in adapters.items():
        inner, layer_shape, _ = _layer(ad.layout, ad.kernel_shape)
        keys = _peft_shapes(inner, layer_shape, ad.rank)
        for idx, name in modules[p]:
            m = None if ad.magnitude is None else ad.magnitude[idx]
            big_a, big_b, mag = _to_peft(inner, ad.a[idx], ad.b[idx], m)
            tensors[f"{PREFIX}{name}.{keys['a_key']}"] = big_a
            tensors[f"{PREFIX}{name}.{keys['b_key']}"] = big_b
            if ad.variant == "dora":
                tensors[f"{PREFIX}{name}.lora_magnitude_vector"] = mag

    more, fields = export_parts(adapters, trained, modules, base=base, names=names,
                                layouts=layouts, save_embedding_layers=save_embedding_layers)
    tensors.update(more)
    layers_to_transform, layers_pattern = _layer_subset(
        adapters, modules, {p: template for p, template, _ in kernels}, experts)
    config = {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": base_model_name_or_path,
        "revision": None,
        "r": int(r),
        "lora_alpha": _json_number(lora_alpha),
        "lora_dropout": float(dropouts.pop()),
        "use_rslora": use_rslora,
        "use_dora": variants.pop() == "dora",
        "target_modules": sorted(table),
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "bias": fields["bias"],
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": fields["modules_to_save"],
        "layers_to_transform": layers_to_transform,
        "layers_pattern": layers_pattern,
        "lora_bias": fields["lora_bias"],
        "trainable_token_indices": fields["trainable_token_indices"],
    }
    metadata = {"format": "pt"}  # what PEFT writes; PEFT ignores other entries
    if extra:
        metadata[METADATA_KEY] = json.dumps({"version": __version__, "modules": extra})
    return view.finish(config, tensors, metadata)
