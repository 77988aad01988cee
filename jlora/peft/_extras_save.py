"""Export of what jlora trains beside the adapters (the ``params`` half of
:func:`jlora.split_trainable`'s ``trainable``) as PEFT's tensors and config fields:
``modules_to_save`` copies, trained biases (``bias``), ``lora_bias`` and
``trainable_token_indices``; and the base weights ``save_embedding_layers`` asks for."""

from __future__ import annotations

import collections
from collections.abc import Mapping

import jax
import jax.numpy as jnp

from jlora import _paths as paths_lib
from jlora._adapter import Adapters
from jlora._config import LoraConfig
from jlora._leaf_updates import LoraBias, TrainableTokens, bias_beside, is_leaf_update
from jlora.layouts import LayoutError, resolve_layout
from jlora.peft._extras_load import BASE_INFIX, TOKENS_SUFFIX
from jlora.peft._format import PREFIX, Names
from jlora.peft._full_weights import Slot, slot_table, to_torch, torch_param
from jlora.peft._tensors import _layer


def flat_parts(extra) -> dict:
    """``{path: array or partial update}`` of the ``params`` half of ``trainable``."""
    if extra is None:
        return {}
    leaves, _ = jax.tree_util.tree_flatten_with_path(
        extra, is_leaf=lambda x: is_leaf_update(x) or paths_lib._is_kernel_leaf(x))
    return {paths_lib.keypath_to_str(kp): x for kp, x in leaves}


def lora_bias_paths(adapters: Adapters, parts: Mapping) -> dict[str, LoraBias]:
    """``{kernel path: its LoraBias}`` for every LoraBias in ``parts``, checked."""
    out = {}
    for path, part in parts.items():
        if not isinstance(part, LoraBias):
            continue
        kernel = [k for k in adapters if bias_beside(k) == path]
        if len(kernel) != 1:
            raise ValueError(
                f"The LoraBias at path {path!r} needs exactly one adapted kernel beside it, "
                f"found {kernel}: PEFT's lora_bias belongs to one lora_B."
            )
        ad = adapters[kernel[0]]
        if ad.variant != "lora" or ad.layout.kind == "embed" or part.scale != ad.scale:
            why = (f"its scale {part.scale} is not the adapter's {ad.scale}"
                   if ad.variant == "lora" and ad.layout.kind != "embed" else
                   "PEFT's lora_bias exists for plain LoRA on Linear and Conv modules only")
            raise ValueError(f"Cannot export the LoraBias at path {path!r} for the kernel at "
                             f"path {kernel[0]!r}: {why}.")
        out[kernel[0]] = part
    return out


def _shape_tree(adapters: Adapters, parts: Mapping, base) -> tuple[dict, dict]:
    """``(flat leaves, {path: (leaf, layout)})`` of what the slots are computed on: the
    base if given, and the shapes of the adapted kernels and trained leaves."""
    flat = dict(paths_lib.select(base, ".*", allow_empty=True)) if base is not None else {}
    for path, part in parts.items():
        if isinstance(part, LoraBias):
            like = part.delta if part.bias is None else part.bias
            flat[path] = jax.ShapeDtypeStruct(like.shape, like.dtype)
        elif not isinstance(part, TrainableTokens):
            flat[path] = jax.ShapeDtypeStruct(part.shape, part.dtype)
    kernels = {path: (jax.ShapeDtypeStruct(ad.kernel_shape, ad.a.dtype), ad.layout)
               for path, ad in adapters.items()}
    for path, part in parts.items():
        if isinstance(part, TrainableTokens) and path not in flat:
            flat[path] = jax.ShapeDtypeStruct((1, part.values.shape[1]), part.values.dtype)
    return flat, kernels


def _layouts(flat: Mapping, kernels: dict, layouts) -> dict:
    """Layouts for the ≥2-D leaves that are not adapted (full weights): given or guessed."""
    patterns = LoraConfig(layouts=dict(layouts or {})).layout_patterns()
    out = dict(kernels)
    for path, leaf in flat.items():
        if path in out or len(leaf.shape) < 2 or not jnp.issubdtype(leaf.dtype, jnp.floating):
            continue
        try:
            out[path] = (leaf, resolve_layout(path, tuple(leaf.shape), patterns))
        except LayoutError:
            continue  # refused below if it is a trained leaf
    return out


def export_parts(adapters: Adapters, extra, modules: Mapping[str, list], *, base=None,
                 names: Names = None, layouts=None,
                 save_embedding_layers: bool | str = False):
    """``(tensors, config fields)`` for what ``extra`` trains beside ``adapters`` and the
    base weights ``save_embedding_layers`` selects. ``modules`` is ``{kernel path:
    [(index, module name)]}`` of the exported LoRA modules."""
    parts = flat_parts(extra)
    flat, kernels = _shape_tree(adapters, parts, base)
    kernels = _layouts(flat, kernels, layouts)
    slots = slot_table(flat, kernels, names)
    by_path: dict[str, list[tuple[str, Slot]]] = collections.defaultdict(list)
    for key, slot in slots.items():
        by_path[slot.path].append((key, slot))
    adapted = {name for entries in modules.values() for _, name in entries}
    tensors, fields = {}, {"modules_to_save": set(), "bias": set(), "lora_bias": False,
                           "trainable_token_indices": {}}

    def slots_of(path: str, what: str):
        found = by_path.get(path)
        if not found:
            raise ValueError(
                f"Cannot export {what} at path {path!r}: no PEFT module name for it (a leaf "
                "with more than one axis needs a layout: give `layouts=`, or pass `base=` so "
                "that its kernel is known)."
            )
        return found

    trained_by_module = collections.defaultdict(set)
    for path, part in parts.items():
        if not is_leaf_update(part):
            for key, _ in slots_of(path, "the trained leaf"):
                module, _, param = key.rpartition(".")
                trained_by_module[module].add(param)
    for path, part in parts.items():
        if isinstance(part, TrainableTokens):
            _export_tokens(path, part, adapters, slots_of, tensors, fields)
            continue
        if isinstance(part, LoraBias):
            if part.bias is None:
                continue  # its lora_B bias is written with the adapter's modules below
            part = part.bias
        for key, slot in slots_of(path, "the trained leaf"):
            module, _, param = key.rpartition(".")
            value = to_torch(slot, part[slot.index])
            if module in adapted:
                if param != "bias":
                    raise ValueError(
                        f"The leaf at path {path!r} (PEFT {key!r}) is trained in full but "
                        "its module is adapted; PEFT trains only a module's bias beside LoRA."
                    )
                tensors[f"{PREFIX}{module}{BASE_INFIX}bias"] = value
                fields["bias"].add("lora_only")
            elif trained_by_module[module] == {"bias"}:
                tensors[f"{PREFIX}{key}"] = value
                fields["bias"].add("all")
            else:
                tensors[f"{PREFIX}{key}"] = value
                fields["modules_to_save"].add(module)
    for kpath, bias in lora_bias_paths(adapters, parts).items():
        for idx, name in modules[kpath]:
            tensors[f"{PREFIX}{name}.lora_B.bias"] = bias.delta[idx].reshape(-1)
        fields["lora_bias"] = True
    tensors.update(_embedding_layers(adapters, modules, base, save_embedding_layers))
    bias_mode = "all" if "all" in fields["bias"] else ("lora_only" if fields["bias"] else "none")
    return tensors, {
        "modules_to_save": sorted(fields["modules_to_save"]) or None,
        "bias": bias_mode,
        "lora_bias": fields["lora_bias"],
        "trainable_token_indices": fields["trainable_token_indices"] or None,
    }


def _export_tokens(path, part: TrainableTokens, adapters, slots_of, tensors, fields):
    if path in adapters:
        raise ValueError(
            f"The TrainableTokens at path {path!r} sit on an adapted kernel: PEFT's trainable "
            "tokens replace a table's entries and cannot be combined with LoRA on it."
        )
    found = [(k, s) for k, s in slots_of(path, "the TrainableTokens") if not s.index]
    if len(found) != 1:
        raise ValueError(f"The TrainableTokens at path {path!r} must sit on an unstacked "
                         "2-D table.")
    module = found[0][0].rpartition(".")[0]
    tensors[f"{PREFIX}{module}{TOKENS_SUFFIX}"] = part.values
    fields["trainable_token_indices"][module] = [int(i) for i in part.indices]


def _embedding_layers(adapters: Adapters, modules: Mapping[str, list], base,
                      save_embedding_layers) -> dict:
    """PEFT's ``save_embedding_layers``: ``<module>.base_layer.weight`` of the adapted
    kernels it selects (``True``: every embedding table; a pattern: the paths it matches
    in full), from ``base``."""
    if save_embedding_layers is False or save_embedding_layers is None:
        return {}
    if save_embedding_layers is True:
        chosen = [p for p, ad in adapters.items() if ad.layout.kind == "embed"]
    elif isinstance(save_embedding_layers, str):
        pattern = paths_lib.compile_pattern(save_embedding_layers, field="save_embedding_layers")
        chosen = paths_lib.matching_paths(list(adapters), pattern, field="save_embedding_layers")
    else:
        raise TypeError(f"`save_embedding_layers` must be a bool or a pattern, got "
                        f"{save_embedding_layers!r}.")
    if chosen and base is None:
        raise ValueError(
            f"`save_embedding_layers` selects {chosen} but no `base` was given: pass the base "
            "params (base=params) whose weights go into the file."
        )
    flat = paths_lib.select(base, ".*", allow_empty=True) if chosen else {}
    out = {}
    for path in chosen:
        ad = adapters[path]
        if path not in flat or tuple(flat[path].shape) != ad.kernel_shape:
            raise ValueError(f"`base` has no kernel of shape {ad.kernel_shape} at path {path!r}.")
        inner, layer_shape, _ = _layer(ad.layout, ad.kernel_shape)
        for idx, name in modules[path]:
            slot = Slot(path, idx, inner, layer_shape)
            out[f"{PREFIX}{name}{BASE_INFIX}{torch_param(path)}"] = to_torch(
                slot, flat[path][idx])
    return out

