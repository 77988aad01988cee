"""Import of what a PEFT file holds beside the LoRA factors: full weights
(``modules_to_save``, trained biases, ``save_embedding_layers``), ``lora_B`` biases and
trainable tokens, as the ``params`` half of :func:`jlora.split_trainable`'s ``trainable``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np

from jlora import _paths as paths_lib
from jlora._leaf_updates import LoraBias, TrainableTokens, bias_beside
from jlora.peft._format import PREFIX
from jlora.peft._full_weights import Slot, from_torch, slot_table, vocab_axis

TOKENS_SUFFIX = ".token_adapter.trainable_tokens_delta"
BASE_INFIX = ".base_layer."
BASE_WEIGHTS = ("compare", "file", "params")


@dataclasses.dataclass
class Parts:
    """The file's non-factor content, placed on params' leaves.

    ``full``: ``{path: {index: value}}`` trained in full (modules_to_save, biases);
    ``base``: ``{path: {index: value}}`` base weights of adapted modules
    (``save_embedding_layers``); ``lora_bias``: ``{bias path: LoraBias}``;
    ``tokens``: ``{path: TrainableTokens}``; ``keys``: ``{path: a file key}`` for errors.
    """

    full: dict[str, dict[tuple, np.ndarray]]
    base: dict[str, dict[tuple, np.ndarray]]
    lora_bias: dict[str, LoraBias]
    tokens: dict[str, TrainableTokens]
    keys: dict[str, str]


def _matches_module(keys, module: str) -> bool:
    """PEFT's match of ``modules_to_save`` / ``trainable_token_indices`` keys: the module
    name ends with the key (``_set_trainable``)."""
    return any(module.endswith(k) for k in keys or ())


def _classify(key: str, config: Mapping, adapted: set[str], file: str, config_file: str):
    """``(kind, module, torch param)`` of a non-factor tensor, ``kind`` one of ``"tokens"``,
    ``"base"`` (a base weight of an adapted module), ``"bias"`` (a bias PEFT's ``bias``
    trains) or ``"module"`` (a ``modules_to_save`` copy)."""
    bias_mode = config.get("bias", "none")
    if key.endswith(TOKENS_SUFFIX):
        if config.get("trainable_token_indices") is None:
            raise ValueError(
                f"Tensor {PREFIX + key!r} in {file} holds trainable tokens but {config_file} has "
                "no `trainable_token_indices`, which says which tokens they are."
            )
        return "tokens", key[: -len(TOKENS_SUFFIX)], "weight"
    if BASE_INFIX in key:
        module, _, param = key.rpartition(BASE_INFIX)
        if module not in adapted:
            raise ValueError(
                f"Tensor {PREFIX + key!r} in {file} is the base weight of module {module!r}, "
                "which has no LoRA factors in the file: the directory is inconsistent."
            )
        if param == "bias" and bias_mode != "none":
            return "bias", module, param
        if param == "weight":
            return "base", module, param
        raise ValueError(
            f"Tensor {PREFIX + key!r} in {file} is a base-layer {param!r} of an adapted module, "
            f"which {config_file} (bias={bias_mode!r}) does not account for."
        )
    module, _, param = key.rpartition(".")
    if module and _matches_module(config.get("modules_to_save"), module):
        return "module", module, param
    if module and param == "bias" and bias_mode == "all":
        return "bias", module, param
    raise ValueError(
        f"Tensor {PREFIX + key!r} in {file} is neither a LoRA factor nor a weight that "
        f"{config_file} accounts for (modules_to_save={config.get('modules_to_save')!r}, "
        f"bias={bias_mode!r}); PEFT would not load it."
    )


def _token_indices(config: Mapping, module: str, rows: int, key: str, file: str) -> list[int]:
    value = config["trainable_token_indices"]
    if isinstance(value, Mapping):
        found = [k for k in value if module.endswith(k)]
        if len(found) != 1:
            raise ValueError(
                f"Tensor {key!r} in {file}: `trainable_token_indices` has "
                f"{'no key' if not found else f'several keys {found}'} matching module "
                f"{module!r} (PEFT matches a key against the end of the module name)."
            )
        value = value[found[0]]
    if len(value) != rows:
        raise ValueError(
            f"Tensor {key!r} in {file} holds {rows} token vectors but `trainable_token_indices` "
            f"lists {len(value)} tokens for module {module!r}: {value}."
        )
    return [int(i) for i in value]


def _slot(slots: dict[str, Slot], module: str, param: str, key: str, read) -> Slot:
    slot = slots.get(f"{module}.{param}")
    if slot is None:
        near = ", ".join(repr(n) for n in paths_lib.nearest_paths(f"{module}.{param}", slots, 5))
        unresolved = (f" Leaves skipped because their layout is unknown (give `layouts=`): "
                      f"{sorted(read.unresolved)[:5]}." if read.unresolved else "")
        raise ValueError(
            f"Tensor {PREFIX + key!r} in {read.weights_file} is the torch parameter "
            f"{module + '.' + param!r}, which no leaf of `params` is (torch names: "
            f"<module>.weight for a kernel, embedding or norm scale, <module>.bias for a bias). "
            f"Closest: {near or '(none)'}. Pass `names=` to map paths to module names."
            + unresolved
        )
    return slot


def read_parts(read, dtype=None) -> Parts:
    """Place every non-factor tensor of the file on its leaf of the params it was read
    against."""
    flat = paths_lib.select(read.params, ".*", allow_empty=True)
    slots = slot_table(flat, read.kernels, read.names)
    adapted = set(read.modules)
    parts = Parts(full={}, base={}, lora_bias={}, tokens={}, keys={})
    tokens_list = isinstance(read.config.get("trainable_token_indices"), list)
    token_modules = [k for k in read.others if k.endswith(TOKENS_SUFFIX)]
    if tokens_list and len(token_modules) > 1:
        raise ValueError(
            f"{read.weights_file} holds trainable tokens for {len(token_modules)} modules "
            f"{token_modules} but `trainable_token_indices` is a list, which PEFT applies to "
            "the input embedding only."
        )
    for key, value in read.others.items():
        if not jnp.issubdtype(value.dtype, jnp.floating):
            raise ValueError(
                f"Tensor {PREFIX + key!r} in {read.weights_file} has dtype {value.dtype}: "
                "expected floating point."
            )
        kind, module, param = _classify(key, read.config, adapted, read.weights_file,
                                        read.config_file)
        slot = _slot(slots, module, param, key, read)
        what = f"Tensor {PREFIX + key!r} in {read.weights_file}"
        leaf = flat[slot.path]
        parts.keys.setdefault(slot.path, PREFIX + key)
        if kind == "tokens":
            parts.tokens[slot.path] = _tokens(read, slot, module, value, leaf, what, key)
            continue
        if kind != "base" and slot.path in read.adapters and slot.layout is not None:
            raise ValueError(f"{what} trains the kernel at path {slot.path!r} in full, but it "
                             "also has LoRA factors in the file.")
        converted = from_torch(slot, value, what).astype(leaf.dtype)
        (parts.base if kind == "base" else parts.full).setdefault(slot.path, {})[
            slot.index] = converted
    for kpath, deltas in read.lora_bias.items():
        bias_path = bias_beside(kpath)
        parts.lora_bias[bias_path] = _lora_bias(read, kpath, bias_path, deltas, flat, dtype)
        parts.keys.setdefault(bias_path, f"{PREFIX}{_first_module(read, kpath)}.lora_B.bias")
    return parts


def _first_module(read, kpath: str) -> str:
    return next(n for n, (p, _) in read.modules.items() if p == kpath)


def _tokens(read, slot: Slot, module, value, leaf, what, key) -> TrainableTokens:
    if slot.layout is None or slot.index or len(slot.shape) != 2 or \
            slot.layout.kind == "conv":
        raise ValueError(f"{what} holds trainable tokens for the leaf at path {slot.path!r} "
                         f"with shape {slot.shape}, which is not a 2-D table.")
    if slot.path in read.adapters:
        raise ValueError(f"{what} holds trainable tokens for the leaf at path {slot.path!r}, "
                         "which also has LoRA factors: PEFT cannot combine the two.")
    axis = vocab_axis(slot.layout)
    indices = _token_indices(read.config, module, value.shape[0] if value.ndim else 0,
                             PREFIX + key, read.weights_file)
    dim = slot.shape[1 - axis]
    if tuple(value.shape) != (len(indices), dim) or len(set(indices)) != len(indices) or \
            not all(0 <= i < slot.shape[axis] for i in indices):
        raise ValueError(
            f"{what} has shape {tuple(value.shape)} for tokens {indices} of the leaf at path "
            f"{slot.path!r} with shape {slot.shape}: expected ({len(indices)}, {dim}) and "
            f"distinct ids below {slot.shape[axis]}."
        )
    return TrainableTokens(values=jnp.asarray(value.astype(leaf.dtype)),
                           indices=tuple(indices), axis=axis)


def _lora_bias(read, kpath: str, bias_path: str, deltas: dict, flat, dtype) -> LoraBias:
    ad = read.adapters[kpath]
    stacked, _, fan_out = ad.layout.split_shape(ad.kernel_shape)
    leaf = flat.get(bias_path)
    if leaf is None or tuple(getattr(leaf, "shape", ())) != (*stacked, *fan_out):
        found = "nothing" if leaf is None else f"shape {tuple(leaf.shape)}"
        raise ValueError(
            f"{read.weights_file} has lora_B.bias for the kernel at path {kpath!r} (module "
            f"{_first_module(read, kpath)!r}): it is added to the bias at path {bias_path!r}, "
            f"which needs shape {(*stacked, *fan_out)}, but params has {found} there."
        )
    first = next(iter(deltas.values()))
    zero = np.zeros_like(first)  # a layer without the adapter has no lora_B bias either
    delta = np.stack([deltas.get(tuple(i), zero) for i in np.ndindex(*stacked)]).reshape(
        *stacked, *fan_out) if stacked else first
    return LoraBias(delta=jnp.asarray(delta if dtype is None else delta.astype(dtype)),
                    scale=ad.scale)


def _assembled(path: str, layers: dict[tuple, np.ndarray], leaf, what: str):
    """A whole leaf from per-layer values; every layer must be there."""
    if list(layers) == [()]:
        return layers[()]
    stacked = tuple(max(i[k] for i in layers) + 1 for k in range(len(next(iter(layers)))))
    full = tuple(leaf.shape[:len(stacked)])
    missing = [i for i in np.ndindex(*full) if i not in layers]
    if missing:
        raise ValueError(
            f"{what} covers {len(layers)} of the {int(np.prod(full))} layers of the stacked "
            f"leaf at path {path!r} (missing {missing[:5]}): jlora trains a leaf in full or "
            "not at all."
        )
    return np.stack([layers[i] for i in np.ndindex(*full)]).reshape(leaf.shape)


def _max_diff(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)),
                        initial=0.0))


def _differs(parts: Parts, flat) -> dict[str, str]:
    """``{path: why}`` for each part whose values are not the base's."""
    out = {}
    for group in (parts.full, parts.base):
        for path, layers in group.items():
            leaf = np.asarray(flat[path])
            for index, value in layers.items():
                if not np.array_equal(value, leaf[index]):
                    gap = _max_diff(value, leaf[index])
                    out[path] = f"differs from params (max |diff| {gap:.3g})"
    for path, bias in parts.lora_bias.items():
        if np.any(np.asarray(bias.delta) != 0):
            out[path] = "a non-zero lora_B bias"
    for path, tokens in parts.tokens.items():
        base = np.moveaxis(np.asarray(flat[path]), tokens.axis, 0)[list(tokens.indices)]
        if not np.array_equal(np.asarray(tokens.values), base):
            out[path] = f"trained vectors for tokens {list(tokens.indices)}"
    return out


def refuse_trained_parts(read) -> None:
    """:func:`jlora.peft.load`'s check: the file holds nothing beside the factors but
    weights that repeat the base (PEFT saves those for ``save_embedding_layers`` and
    untrained ``modules_to_save``)."""
    if not read.others and not read.lora_bias:
        return
    parts = read_parts(read)
    differ = _differs(parts, paths_lib.select(read.params, ".*", allow_empty=True))
    if differ:
        listing = "; ".join(f"{parts.keys[p]} (path {p!r}): {why}"
                            for p, why in list(differ.items())[:4])
        raise ValueError(
            f"{read.weights_file} holds trained weights beside the LoRA factors, which adapters "
            f"alone cannot carry: {listing}. Use jlora.peft.load_trainable(path, params) to get "
            "them with the adapters, as jlora.split_trainable's (trainable, frozen)."
        )


def trainable_from_parts(read, parts: Parts, base_weights: str) -> tuple[dict, Any]:
    """``(trainable params half, frozen)`` from the file's parts."""
    params = read.params
    flat = paths_lib.select(params, ".*", allow_empty=True)
    extra: dict[str, Any] = {}
    for path, layers in parts.full.items():
        extra[path] = jnp.asarray(_assembled(path, layers, flat[path], parts.keys[path]))
    for path, bias in parts.lora_bias.items():
        extra[path] = dataclasses.replace(bias, bias=extra.get(path))
    extra.update(parts.tokens)
    replaced = {}
    for path, layers in parts.base.items():
        leaf = np.asarray(flat[path])
        changed = {i: v for i, v in layers.items() if not np.array_equal(v, leaf[i])}
        if not changed or base_weights == "params":
            continue
        if base_weights == "compare":
            index, value = next(iter(changed.items()))
            raise ValueError(
                f"{parts.keys[path]} in {read.weights_file} (saved with save_embedding_layers) "
                f"differs from the kernel at path {path!r} in params (max |diff| "
                f"{_max_diff(value, leaf[index]):.3g}): the adapter was trained on other base "
                "weights (e.g. a resized or retrained embedding). Pass base_weights='file' to use "
                "the file's (they go into `frozen`, as PEFT loads them), or 'params' to keep "
                "yours."
            )
        new = leaf.copy()
        for i, v in changed.items():
            new[i] = v
        replaced[path] = jnp.asarray(new)
    trainable = paths_lib.tree_map_with_path(lambda p, x: extra.get(p), params)
    frozen = paths_lib.tree_map_with_path(
        lambda p, x: None if (p in parts.full) else replaced.get(p, x), params)
    return trainable, frozen
