"""PEFT's on-disk LoRA format, both ways: :func:`save` exports, :func:`load` imports.

A PEFT adapter is a directory with two files::

  adapter_model.safetensors   base_model.model.<module>.lora_A.weight         (r, in)
                              base_model.model.<module>.lora_B.weight         (out, r)
                              conv:  lora_A.weight (r, in, *window), lora_B.weight (out, r, 1, ...)
                              embed: <module>.lora_embedding_A (r, vocab), lora_embedding_B (dim, r)
                              DoRA:  <module>.lora_magnitude_vector  (out,), conv (1, out, 1, ...)
  adapter_config.json         r, lora_alpha, use_rslora, rank_pattern, alpha_pattern,
                              target_modules, use_dora, peft_type, ...

jlora reads every kernel through its layout (:mod:`jlora.layouts`), so the axis order a
model stores it in does not matter: ``lora_A`` is always ``A``'s matrix view transposed,
``(r, fan_in)``, and ``lora_B`` is ``B``'s, ``(fan_out, r)``. A Dense kernel ``(in, out)``
(layout ``"io"``) is torch's ``weight.T`` and a kernel stored ``(out, in)`` (``"oi"``, as
transformers' Flax GPT-2 stores its Conv1D kernels) is ``weight`` itself; both get the
same factors. A DenseGeneral kernel is a ``Linear`` whose fan-in and fan-out axes are
each flattened in the kernel's own order (C order: ``(heads, head_dim)`` heads-major). A
conv kernel (window axes ``w``, e.g. flax's ``(*window, in, out)``, ``"wwio"``, or torch's
``(out, in, *window)``, ``"oiww"``) is a ``Conv`` with ``lora_A (r, in, *window)``; an
``Embed`` table (``"vf"`` or ``"fv"``) is an ``Embedding``.

**Guessed layouts are checked against the file.** Without ``layouts=``, a 2-D kernel's
layout is *guessed* as ``"io"`` (flax's convention). :func:`load` refuses, with a
:class:`~jlora.layouts.LayoutError`, a guess that the factor shapes contradict (a
non-square kernel fits only one orientation) and a guessed square 2-D kernel when the
adapter has ``fan_in_fan_out=true`` (PEFT's Conv1D weights, GPT-2: the Flax port's
orientation cannot be told from a square shape), rather than apply an update transposed.
Layouts given in ``layouts=`` (by hand or from ``jlora.infer_layouts``) are trusted.

**Module names.** PEFT names modules by their torch path, ``layers.0.self_attn.q_proj``.
By default a kernel's module name is its jlora path without a leading ``params``
collection (so ``variables`` and ``variables["params"]`` give the same names) and without
a final ``kernel`` or ``embedding`` key, joined with dots: ``params/layers/0/q/kernel``
becomes ``layers.0.q`` (:func:`default_module_name`). A stacked (scanned) kernel becomes
one module per layer index, the index inserted after the first component (where
``nn.scan(..., name="layers")`` puts its container): ``params/layers/q/kernel`` with
layout ``"sio"`` becomes ``layers.0.q``, ``layers.1.q``, ... Anything else is given with
``names=``: a callable ``path -> name`` (``None`` for the default) or a dict
``{path: name}``; a stacked kernel's name holds one ``{}`` per stacked axis, e.g.
``"model.layers.{}.self_attn.q_proj"``. Two kernels with the same name are refused.

**Scales.** PEFT computes each module's scale from its rank and alpha,
``alpha / r`` or, with ``use_rslora``, ``alpha / sqrt(r)``. :func:`save` picks the
``use_rslora`` most kernels use and writes each kernel's rank and alpha (the most common
as ``r`` / ``lora_alpha``, the rest in ``rank_pattern`` / ``alpha_pattern`` under keys
that match exactly that kernel's modules). A kernel whose scale PEFT's formula cannot
give from its own alpha (a custom scaling policy, or the minority policy when standard
and rsLoRA kernels are mixed) is written with the *effective* alpha ``scale * r`` (or
``scale * sqrt(r)``), chosen so that PEFT computes the very same float; its real policy
and alpha go into the safetensors metadata (which PEFT ignores) so that :func:`load`
gives back the same adapters.

**Import** follows PEFT's own rules: a module's rank and alpha are the value of the
first ``rank_pattern`` / ``alpha_pattern`` key that matches the module name as PEFT
matches it (the key as a regular expression, anchored at the end and at the start or
after a dot), else ``r`` / ``lora_alpha``; every module in the file must be one that
``target_modules`` / ``exclude_modules`` / ``layers_to_transform`` select (PEFT would
silently drop the others). Config fields that change what the factors mean
(``lora_bias``, ``bias``, ``modules_to_save``, LoftQ, PiSSA/OLoRA/CorDA/LoRA-GA inits,
QA-LoRA, aLoRA, ...) are refused with an error naming the field; an unknown field is
accepted only while it is off (``None``, ``False`` or empty).

Example:
  >>> import tempfile, jax, jax.numpy as jnp, jlora
  >>> params = {"params": {"fc": {"kernel": jnp.ones((6, 4))}}}
  >>> ads = jlora.init(jax.random.key(0), params, jlora.LoraConfig(rank=2))
  >>> path = jlora.peft.save(tempfile.mkdtemp() + "/adapter", ads)
  >>> sorted(p.name for p in path.iterdir())
  ['adapter_config.json', 'adapter_model.safetensors']
  >>> back = jlora.peft.load(path, params)["params/fc/kernel"]
  >>> back.a.shape, bool((back.a == ads["params/fc/kernel"].a).all())
  ((6, 2), True)
"""

from __future__ import annotations

import collections
import itertools
import json
import math
import numbers
import os
import pathlib
import re
import string
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jlora import paths as paths_lib
from jlora import scaling as scaling_lib
from jlora._version import __version__
from jlora.adapter import Adapter, Adapters, check_adapters
from jlora.config import LoraConfig
from jlora.files import (
    interrupted_copy,
    read_json,
    read_safetensors,
    remove_stale_temporaries,
    safetensors_bytes,
    write_dir_atomic,
)
from jlora.layouts import Layout, LayoutError, resolve_layout
from jlora.merging import check_adapters_fit

__all__ = [
    "CONFIG_NAME",
    "PREFIX",
    "WEIGHTS_NAME",
    "default_module_name",
    "get_pattern_key",
    "load",
    "save",
]

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."
_METADATA_KEY = "jlora"  # safetensors header entry with what PEFT's config cannot hold

Names = Mapping[str, str] | Callable[[str], str | None] | None


# -- module names -----------------------------------------------------------------------


def default_module_name(path: str, num_stacked: int = 0) -> str:
    """The PEFT module name jlora gives the kernel at ``path`` unless told otherwise.

    Drops a leading ``params`` collection and a final ``kernel`` or ``embedding`` key and
    joins the rest with dots. With ``num_stacked`` stacked axes, that many ``{}``
    placeholders (one per stacked index) follow the first component.

    Example:
      >>> default_module_name("params/layers/0/attn/q_proj/kernel")
      'layers.0.attn.q_proj'
      >>> default_module_name("params/layers/mlp/kernel", num_stacked=1)
      'layers.{}.mlp'
    """
    parts = path.split("/")
    if len(parts) > 1 and parts[0] == "params":
        parts = parts[1:]
    if len(parts) > 1 and parts[-1] in ("kernel", "embedding"):
        parts = parts[:-1]
    if num_stacked:
        parts = [parts[0], *(["{}"] * num_stacked), *parts[1:]]
    return ".".join(parts)


def _num_fields(template: str) -> int:
    try:
        return sum(1 for _, field, _, _ in string.Formatter().parse(template) if field is not None)
    except ValueError:
        return -1


def _check_names_arg(names: Names, paths: list[str], what: str) -> None:
    if names is None or callable(names):
        return
    if not isinstance(names, Mapping):
        raise TypeError(
            f"`names` must be a callable path -> module name, a dict {{path: module name}} or "
            f"None, got {type(names).__name__}."
        )
    for key in names:
        if key not in paths:
            near = ", ".join(repr(p) for p in paths_lib.nearest_paths(str(key), paths, n=3))
            raise ValueError(
                f"`names` has an entry for path {key!r}, which is not {what}. Closest: {near}."
            )


def _template(path: str, num_stacked: int, names: Names) -> str:
    """The (unformatted) module name of ``path``: the user's, else the default."""
    name = None
    if callable(names):
        name = names(path)
    elif names is not None:
        name = names.get(path)
    if name is None:
        return default_module_name(path, num_stacked)
    if not isinstance(name, str):
        raise TypeError(f"`names` gave {name!r} for path {path!r}: expected a str (or None).")
    fields = _num_fields(name)
    if fields != num_stacked:
        if num_stacked:
            need = (f"one '{{}}' per stacked axis ({num_stacked}), where the layer index "
                    "goes, e.g. 'model.layers.{}.mlp'")
        else:
            need = ("no '{}' (the kernel at this path has no stacked axes; give `layouts` if "
                    "it is a scanned kernel)")
        raise ValueError(
            f"`names` gave the module name {name!r} for path {path!r}: it must contain {need}."
        )
    return name


_NAME_RE = re.compile(r"[^.\s{}]+(\.[^.\s{}]+)*")


def _expand(path: str, template: str, stacked: tuple[int, ...]) -> list[tuple[tuple, str]]:
    """``[(stacked index, module name)]`` of one kernel."""
    out = []
    for idx in np.ndindex(*stacked):
        try:
            name = template.format(*idx) if stacked else template
        except (IndexError, KeyError, ValueError):
            name = template  # e.g. "{name}": reported as invalid just below
        if not _NAME_RE.fullmatch(name):
            raise ValueError(
                f"Invalid PEFT module name {name!r} for path {path!r}: expected dot-separated, "
                "non-empty components without spaces or braces (pass `names=` to choose one)."
            )
        out.append((tuple(int(i) for i in idx), name))
    return out


def _where(path: str, idx: tuple) -> str:
    return f"path {path!r}" + (f" (stacked index {idx})" if idx else "")


def _name_table(entries: list[tuple[str, str, tuple[int, ...]]]) -> dict[str, tuple[str, tuple]]:
    """``{module name: (path, index)}`` from ``(path, template, stacked shape)``; refuses
    two kernels that get the same name."""
    table: dict[str, tuple[str, tuple]] = {}
    for path, template, stacked in entries:
        for idx, name in _expand(path, template, stacked):
            if name in table:
                other, other_idx = table[name]
                raise ValueError(
                    f"Two kernels get the PEFT module name {name!r}: {_where(other, other_idx)} "
                    f"and {_where(path, idx)}. Pass `names=` to tell them apart."
                )
            table[name] = (path, idx)
    return table


# -- PEFT's matching rules (peft.utils.other / peft.tuners.tuners_utils, PEFT 0.21) -----


def get_pattern_key(pattern_keys, name: str) -> str:
    """The first of ``pattern_keys`` that matches module ``name`` the way PEFT matches
    ``rank_pattern`` / ``alpha_pattern`` keys, else ``name`` itself (as PEFT does).

    A key is a regular expression that must match the end of the name, starting at the
    beginning or right after a dot: ``re.match(rf"(.*\\.)?({key})$", name)``. Order
    matters: the first matching key wins, not the most specific one.

    Example:
      >>> get_pattern_key(["q_proj", "layers.1.q_proj"], "model.layers.1.q_proj")
      'q_proj'
      >>> get_pattern_key(["^layers\\\\.1\\\\.q"], "layers.1.q"), get_pattern_key(["k"], "q")
      ('^layers\\\\.1\\\\.q', 'q')
    """
    for key in pattern_keys:
        try:
            if re.match(rf"(.*\.)?({key})$", name):
                return key
        except re.error as e:
            raise ValueError(
                f"The rank_pattern/alpha_pattern key {key!r} is not a valid regular "
                f"expression: {e}."
            ) from None
    return name


def _pattern_value(config: Mapping, field: str, default_field: str, name: str):
    pattern = config.get(field) or {}
    return pattern.get(get_pattern_key(list(pattern), name), config[default_field])


def _is_targeted(config: Mapping, name: str) -> bool:
    """PEFT's ``check_target_module_exists`` (``modules_to_save`` is refused elsewhere)."""
    exclude = config.get("exclude_modules")
    if exclude:
        if isinstance(exclude, str):
            if re.fullmatch(exclude, name):
                return False
        elif name in exclude or any(name.endswith(f".{k}") for k in exclude):
            return False
    targets = config.get("target_modules")
    if targets is None:
        return True  # nothing to check against: every module in the file counts
    if isinstance(targets, str):
        # PEFT expands "all-linear" when it creates the adapter; a saved config should
        # not hold it, but if it does, the file's modules are the targets.
        return targets.lower() == "all-linear" or re.fullmatch(targets, name) is not None
    if name in targets:
        return True
    found = any(name.endswith(f".{t}") for t in targets)
    indexes = config.get("layers_to_transform")
    layers_pattern = config.get("layers_pattern")
    using = indexes is not None and (len(indexes) != 0 if isinstance(indexes, list) else True)
    if using and found:
        match = None
        if not layers_pattern:
            match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", name)
        else:
            for pattern in [layers_pattern] if isinstance(layers_pattern, str) else layers_pattern:
                match = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", name)
                if match is not None:
                    break
        if match is None:
            return False
        index = int(match.group("idx"))
        return index == indexes if isinstance(indexes, int) else index in (indexes or ())
    return found


# -- the config file --------------------------------------------------------------------

# Fields that only describe the torch model, the run or the initialisation: they do not
# change what the saved factors mean.
_IGNORED = {
    "auto_mapping", "base_model_name_or_path", "corda_config", "eva_config",
    "inference_mode", "lora_ga_config", "megatron_core", "peft_version",
    "qalora_group_size", "revision", "runtime_config", "task_type", "velora_config",
}
_USED = {
    "alpha_pattern", "exclude_modules", "fan_in_fan_out", "init_lora_weights", "layers_pattern",
    "layers_to_transform", "lora_alpha", "lora_dropout", "peft_type", "r", "rank_pattern",
    "target_modules", "use_dora", "use_rslora", "bias",
}
# Fields that, when set, mean the directory holds something jlora cannot reproduce.
_REFUSED = {
    "alora_invocation_tokens": "Activated LoRA applies the adapter only after invocation "
                               "tokens, which a merged or factored kernel cannot express",
    "arrow_config": "Arrow routing mixes several adapters per token",
    "ensure_weight_tying": "it ties adapters across modules",
    "kasa_config": "KaSA changes the base weights and adds a diagonal between A and B",
    "layer_replication": "it rebuilds the base model's layer stack",
    "loftq_config": "LoftQ replaces the base weights with quantized ones",
    "lora_bias": "the adapter trains a bias on lora_B, which jlora's adapters do not have",
    "megatron_config": "Megatron-parallel layers split the factors across ranks",
    "modules_to_save": "the file holds fully trained copies of those modules, not LoRA factors",
    "monteclora_config": "MonteCLoRA samples the factors",
    "target_parameters": "LoRA on raw nn.Parameters (e.g. MoE experts) uses another layout",
    "trainable_token_indices": "the file holds trained embedding rows, not LoRA factors",
    "use_bdlora": "block-diagonal factors use another layout",
    "use_qalora": "QA-LoRA pools the input before lora_A",
}
# init_lora_weights values whose adapters were trained against *modified* base weights.
_MUTATING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")
_PLAIN_INITS = (True, False, "gaussian", "eva", "orthogonal", "mica")


def _is_off(value) -> bool:
    return value is None or value is False or (isinstance(value, list | dict | str) and not value)


def _check_config(config: Any, file: str) -> dict:
    """Validate a parsed adapter_config.json; return it with defaults filled in."""
    if not isinstance(config, dict):
        raise ValueError(f"{file} must hold a JSON object, got {type(config).__name__}.")
    if config.get("peft_type") != "LORA":
        raise ValueError(
            f"{file} has peft_type={config.get('peft_type')!r}: jlora.peft reads only LoRA "
            "adapters (peft_type 'LORA')."
        )
    for field, value in config.items():
        if field in _USED or field in _IGNORED:
            continue
        if field in _REFUSED:
            if not _is_off(value):
                raise ValueError(
                    f"{file} sets `{field}`={value!r}, which jlora cannot load: "
                    f"{_REFUSED[field]}."
                )
            continue
        if not _is_off(value):
            raise ValueError(
                f"{file} sets `{field}`={value!r}, a field jlora.peft does not know; it refuses "
                "rather than ignore it. Remove the field if it does not change the adapter."
            )
    if config.get("bias", "none") != "none":
        raise ValueError(
            f"{file} sets `bias`={config['bias']!r}: the adapter trained base-model biases, "
            "which jlora's adapters do not hold; only bias='none' can be loaded."
        )
    init = config.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(_MUTATING_INITS):
        raise ValueError(
            f"{file} sets `init_lora_weights`={init!r}: those factors belong to base weights "
            "that the initialisation modified, so they do not fit the original model. Convert "
            "the adapter with PEFT's save_pretrained(path_initial_model_for_weight_conversion="
            "...) first."
        )
    if init not in _PLAIN_INITS:
        raise ValueError(
            f"{file} sets `init_lora_weights`={init!r}; jlora can load adapters made with "
            f"{list(_PLAIN_INITS)}."
        )
    out = dict(config)
    out.setdefault("r", 8)  # PEFT's defaults
    out.setdefault("lora_alpha", 8)
    for field in ("rank_pattern", "alpha_pattern"):
        out[field] = out.get(field) or {}
        if not isinstance(out[field], dict):
            raise ValueError(f"{file} has `{field}`={out[field]!r}: expected an object.")
    for field in ("target_modules", "exclude_modules"):
        value = out.get(field)
        if not (value is None or isinstance(value, str)
                or (isinstance(value, list) and all(isinstance(v, str) for v in value))):
            raise ValueError(
                f"{file} has `{field}`={value!r}: expected a list of names, a regex or null."
            )
    ranks = [("r", out["r"]),
             *((f"rank_pattern[{k!r}]", v) for k, v in out["rank_pattern"].items())]
    for field, value in ranks:
        if not (isinstance(value, numbers.Integral) and not isinstance(value, bool)
                and int(value) > 0):
            raise ValueError(f"{file} has `{field}`={value!r}: expected a positive int.")
    alphas = [("lora_alpha", out["lora_alpha"]),
              *((f"alpha_pattern[{k!r}]", v) for k, v in out["alpha_pattern"].items())]
    for field, value in alphas:
        if not (isinstance(value, numbers.Real) and not isinstance(value, bool)
                and math.isfinite(value) and float(value) > 0):
            raise ValueError(f"{file} has `{field}`={value!r}: expected a positive number.")
    for field in ("use_rslora", "use_dora", "fan_in_fan_out"):
        out[field] = out.get(field, False)
        if not isinstance(out[field], bool):
            raise ValueError(f"{file} has `{field}`={out[field]!r}: expected true or false.")
    dropout = out.get("lora_dropout", 0.0)
    if not (isinstance(dropout, numbers.Real) and 0.0 <= float(dropout) < 1.0):
        raise ValueError(f"{file} has `lora_dropout`={dropout!r}: expected a number in [0, 1).")
    return out


# -- tensors: jlora factors <-> PEFT tensors --------------------------------------------


def _layer(layout: Layout, shape) -> tuple[Layout, tuple[int, ...], tuple[int, ...]]:
    """``(layout, shape, stacked sizes)`` of one layer of a kernel (its stacked axes, wherever
    they are, indexed away): PEFT has one module per layer."""
    stacked, fan_in, fan_out = layout.split_shape(shape)
    inner = layout.unstacked(layout.num_stacked)
    return inner, inner.kernel_shape((), fan_in, fan_out), stacked


def _peft_shapes(layout: Layout, kernel_shape: tuple[int, ...], rank: int) -> dict:
    """PEFT's tensor shapes for one unstacked kernel: ``{"A", "B", "M"}`` and the keys."""
    _, fan_in, fan_out = layout.split_shape(kernel_shape)
    if layout.kind == "embed":
        (vocab,), (dim,) = fan_in, fan_out
        return dict(A=(rank, vocab), B=(dim, rank), M=(dim,),
                    a_key="lora_embedding_A", b_key="lora_embedding_B")
    if layout.kind == "conv":
        window = tuple(kernel_shape[i] for i in layout.window_axes)
        cin, (cout,) = kernel_shape[layout.axes.index("i")], fan_out
        ones = (1,) * len(window)
        return dict(A=(rank, cin, *window), B=(cout, rank, *ones), M=(1, cout, *ones),
                    a_key="lora_A.weight", b_key="lora_B.weight")
    return dict(A=(rank, math.prod(fan_in)), B=(math.prod(fan_out), rank),
                M=(math.prod(fan_out),), a_key="lora_A.weight", b_key="lora_B.weight")


def _conv_a_axes(layout: Layout) -> tuple[int, ...]:
    """For each axis of a conv's ``A`` (its fan-in axes in the kernel's order, then the
    rank), the matching axis of PEFT's ``lora_A (r, in, *window)``."""
    out, window = [], 2
    for k in layout.fan_in_axes:
        if layout.axes[k] == "i":
            out.append(1)
        else:
            out.append(window)
            window += 1
    return (*out, 0)


def _to_peft(layout: Layout, a, b, m) -> tuple:
    """One unstacked kernel's ``(A, B, magnitude)`` in PEFT's layout (jnp: traceable)."""
    rank = a.shape[-1]
    if layout.kind == "conv":
        nw = len(layout.window_axes)
        big_a = jnp.transpose(a, tuple(np.argsort(_conv_a_axes(layout))))
        big_b = b.T.reshape(b.shape[1], rank, *([1] * nw))
        mag = None if m is None else m.reshape(1, -1, *([1] * nw))
    else:  # dense and embedding: flatten the fan axes, then transpose
        big_a = a.reshape(-1, rank).T
        big_b = b.reshape(rank, -1).T
        mag = None if m is None else m.reshape(-1)
    return big_a, big_b, mag


def _from_peft(layout: Layout, kernel_shape, big_a, big_b, mag) -> tuple:
    """The inverse of :func:`_to_peft` for one unstacked kernel of ``kernel_shape``."""
    _, fan_in, fan_out = layout.split_shape(kernel_shape)
    rank = big_a.shape[0]
    if layout.kind == "conv":
        a = np.transpose(big_a, _conv_a_axes(layout))
        b = big_b.reshape(big_b.shape[0], rank).T
    else:
        a = big_a.T.reshape(*fan_in, rank)
        b = big_b.T.reshape(rank, *fan_out)
    m = None if mag is None else mag.reshape(fan_out)
    return np.ascontiguousarray(a), np.ascontiguousarray(b), m


# -- files ------------------------------------------------------------------------------


def _read_dir(path) -> tuple[dict, dict[str, np.ndarray], dict[str, str], str]:
    directory = pathlib.Path(path)
    remove_stale_temporaries(directory)  # what saves killed part-way left beside it
    config_file = directory / CONFIG_NAME
    weights_file = directory / WEIGHTS_NAME
    if not config_file.is_file():
        leftover = interrupted_copy(directory)
        raise FileNotFoundError(
            f"No PEFT adapter at {str(directory)!r}: no {CONFIG_NAME} there."
            + (f" A save there was interrupted; the previous complete adapter is at "
               f"{str(leftover)!r}." if leftover is not None else "")
        )
    if not weights_file.is_file():
        legacy = (directory / "adapter_model.bin").is_file()
        raise FileNotFoundError(
            f"No {WEIGHTS_NAME} in {str(directory)!r}"
            + (" (only the pickled adapter_model.bin, which jlora does not unpickle: re-save it "
               "with PEFT's save_pretrained(safe_serialization=True))" if legacy else "") + "."
        )
    config = read_json(config_file)
    tensors, metadata = read_safetensors(weights_file)  # bfloat16 and float8 too
    return config, tensors, metadata, str(weights_file)


# -- export -----------------------------------------------------------------------------


def _peft_scale(rank: int, alpha: float, use_rslora: bool) -> float:
    return scaling_lib.rslora(rank, alpha) if use_rslora else scaling_lib.standard(rank, alpha)


def _alpha_for_scale(scale: float, rank: int, use_rslora: bool) -> float:
    """An alpha from which PEFT's formula gives exactly ``scale`` (a neighbour of
    ``scale * r`` when rounding gets in the way)."""
    denominator = math.sqrt(rank) if use_rslora else rank
    guess = scale * denominator
    candidates = [guess]
    up = down = guess
    for _ in range(8):
        up, down = math.nextafter(up, math.inf), math.nextafter(down, -math.inf)
        candidates += [up, down]
    for alpha in candidates:
        if _peft_scale(rank, alpha, use_rslora) == scale:
            return alpha
    return guess


def _json_number(x: float):
    return int(x) if float(x).is_integer() and abs(x) < 2**53 else float(x)


def _most_common(values):
    counts = collections.Counter(values)
    best = max(counts.values())
    return min(v for v, c in counts.items() if c == best)


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


def save(
    path: str | os.PathLike,
    adapters: Adapters,
    *,
    names: Names = None,
    base_model_name_or_path: str | None = None,
) -> pathlib.Path:
    """Write ``adapters`` as a PEFT LoRA adapter directory (loadable by
    ``PeftModel.from_pretrained``), atomically.

    The files are written into a temporary directory beside ``path`` and renamed into
    place; an existing directory holding only a PEFT adapter is replaced, one holding
    anything else is refused.

    Args:
      path: the adapter directory to create or replace.
      adapters: ``{kernel path: Adapter}`` (all ``"lora"`` or all ``"dora"``, with one
        dropout rate: PEFT has one ``use_dora`` and one ``lora_dropout``).
      names: module names for paths the default naming does not fit (see the module
        docstring): a callable ``path -> name or None`` or a dict ``{path: name}``.
      base_model_name_or_path: written into the config for ``PeftModel.from_pretrained``.

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
        adapters, names=names, base_model_name_or_path=base_model_name_or_path
    )
    host = {k: np.ascontiguousarray(jax.device_get(v)) for k, v in tensors.items()}
    files = {
        WEIGHTS_NAME: safetensors_bytes(host, metadata),
        CONFIG_NAME: (json.dumps(config, indent=2, allow_nan=False) + "\n").encode(),
    }
    return write_dir_atomic(path, files, what="a PEFT adapter")


def export(
    adapters: Adapters,
    *,
    names: Names = None,
    base_model_name_or_path: str | None = None,
) -> tuple[dict, dict, dict]:
    """What :func:`save` writes, in memory: ``(adapter_config, tensors, file metadata)``.

    The tensors are computed with ``jax.numpy`` from the factors, so ``export`` also runs
    on abstract adapters under ``jax.eval_shape`` (PEFT key names and shapes of a 7B model
    without allocating it) and inside ``jit``.

    Example:
      >>> import jax, jax.numpy as jnp, jlora
      >>> params = {"proj": {"kernel": jnp.ones((8, 4))}}
      >>> ads = jlora.init(jax.random.key(0), params, jlora.LoraConfig(rank=2))
      >>> config, tensors, _ = jlora.peft.export(ads)
      >>> {k: v.shape for k, v in tensors.items()}
      {'base_model.model.proj.lora_A.weight': (2, 8), 'base_model.model.proj.lora_B.weight': (4, 2)}
    """
    check_adapters(adapters)
    if not adapters:
        raise ValueError("`adapters` is empty: there is nothing to export.")
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
    _check_names_arg(names, list(adapters), "a path of `adapters`")

    kernels = []
    for p, ad in adapters.items():
        ns = ad.layout.num_stacked  # the factors lead with the stacked axes, in layout order
        kernels.append((p, _template(p, ns, names), tuple(ad.a.shape[:ns])))
    table = _name_table(kernels)
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
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
    }
    metadata = {"format": "pt"}  # what PEFT writes; PEFT ignores other entries
    if extra:
        metadata[_METADATA_KEY] = json.dumps({"version": __version__, "modules": extra})
    return config, tensors, metadata


# -- import -----------------------------------------------------------------------------

_SUFFIXES = {
    ".lora_A.weight": "A", ".lora_B.weight": "B",
    ".lora_embedding_A": "A", ".lora_embedding_B": "B",
    ".lora_magnitude_vector": "M", ".lora_magnitude_vector.weight": "M",
}


def _group_tensors(tensors: Mapping[str, np.ndarray], file: str) -> dict[str, dict]:
    """``{module name: {"A", "B", "M", "embed"}}`` from PEFT's flat keys."""
    modules: dict[str, dict] = {}
    for key, value in tensors.items():
        if not key.startswith(PREFIX):
            raise ValueError(
                f"Tensor {key!r} in {file} does not start with {PREFIX!r}, as every tensor of "
                "a PEFT LoRA adapter does."
            )
        if not jnp.issubdtype(value.dtype, jnp.floating):
            raise ValueError(
                f"Tensor {key!r} in {file} has dtype {value.dtype}: expected floating point."
            )
        rest = key[len(PREFIX):]
        for suffix, role in _SUFFIXES.items():
            if rest.endswith(suffix) and len(rest) > len(suffix):
                name = rest[: -len(suffix)]
                entry = modules.setdefault(name, {"embed": set()})
                if role in entry:
                    raise ValueError(f"Module {name!r} has two {role} tensors in {file}.")
                entry[role] = value
                if role != "M":
                    entry["embed"].add("embedding" in suffix)
                break
        else:
            hint = ("lora_bias is not supported" if rest.endswith(".lora_B.bias") else
                    "a full weight, as saved for modules_to_save or save_embedding_layers")
            raise ValueError(
                f"Tensor {key!r} in {file} is not a LoRA factor ({hint}); jlora.peft.load reads "
                "lora_A/lora_B, lora_embedding_A/B and lora_magnitude_vector only."
            )
    for name, entry in modules.items():
        for role, what in (("A", "lora_A"), ("B", "lora_B")):
            if role not in entry:
                raise ValueError(f"Module {name!r} in {file} has no {what} tensor.")
        if len(entry["embed"]) > 1:
            raise ValueError(
                f"Module {name!r} in {file} mixes lora_embedding_* and lora_A/lora_B tensors."
            )
        entry["embed"] = entry["embed"].pop()
    return modules


def _candidates(params, layouts: Mapping[str, str | Layout], names: Names):
    """``({module name: (path, index)}, {path: (leaf, layout)}, {path: layout error})``."""
    flat = paths_lib.select(params, ".*", allow_empty=True)
    # LoraConfig validates `layouts` (patterns compile, layout strings are valid).
    patterns = LoraConfig(layouts=layouts).layout_patterns()
    kernels, unresolved, entries = {}, {}, []
    for path, leaf in flat.items():
        shape, dtype = getattr(leaf, "shape", None), getattr(leaf, "dtype", None)
        if shape is None or dtype is None or len(shape) < 2:
            continue
        if not jnp.issubdtype(dtype, jnp.floating):
            continue
        try:
            layout = resolve_layout(path, tuple(shape), patterns)
        except LayoutError as e:
            unresolved[path] = str(e)
            continue
        kernels[path] = (leaf, layout)
        stacked = layout.split_shape(shape)[0]
        entries.append((path, _template(path, layout.num_stacked, names), stacked))
    _check_names_arg(names, list(kernels) + list(unresolved), "a kernel of `params`")
    for pattern, _ in patterns:
        paths_lib.matching_paths(list(kernels) + list(unresolved), pattern,
                                 field=f"layouts[{pattern.pattern!r}]")
    return _name_table(entries), kernels, unresolved


def load(
    path: str | os.PathLike,
    params,
    *,
    names: Names = None,
    layouts: Mapping[str, str | Layout] | None = None,
    dtype=None,
) -> Adapters:
    """Read a PEFT LoRA adapter directory into adapters for ``params``.

    Args:
      path: a directory with ``adapter_config.json`` and ``adapter_model.safetensors``.
      params: the flax parameters the adapter belongs to (linen ``variables`` or
        ``variables["params"]``, an NNX state, any pytree); only shapes are read.
      names: module names where the default naming does not fit (see the module
        docstring): a callable ``path -> name or None`` or a dict ``{path: name}``.
      layouts: ``{pattern or path: layout}`` as in :class:`jlora.LoraConfig`, e.g. the
        result of ``jlora.infer_layouts(fn, params, *args)``, or by hand: ``"oi"`` for a
        kernel stored ``(out, in)``, ``"s..."`` for stacked (scanned) kernels. These are
        trusted; a kernel without one gets a guessed layout, checked against the file.
      dtype: the factors' dtype; by default the file's.

    Returns:
      ``{kernel path: Adapter}``, one entry per adapted kernel (the modules of a stacked
      kernel become one adapter), with PEFT's rank, alpha and scale for each.

    Raises:
      FileNotFoundError: ``path`` lacks one of the two files.
      LayoutError: (a ``ValueError``) a guessed layout that the file contradicts (factor
        shapes that fit only another orientation of the kernel) or cannot confirm (a
        square 2-D kernel of an adapter with ``fan_in_fan_out=true``), naming each path,
        the evidence and the ``layouts=`` to pass.
      ValueError: naming the file, module or path and what is wrong; a file that is not
        valid JSON or safetensors (truncated, corrupted) is a
        :class:`jlora.files.AdapterFormatError`.

    Example:
      >>> import tempfile, jax, jax.numpy as jnp, jlora
      >>> params = {"conv": {"kernel": jnp.ones((3, 3, 2, 4))}}
      >>> ads = jlora.init(jax.random.key(0), params, jlora.LoraConfig(rank=2, alpha=1.0,
      ...                                                              scaling="rslora"))
      >>> out = jlora.peft.save(tempfile.mkdtemp() + "/peft", ads)
      >>> back = jlora.peft.load(out, params)["conv/kernel"]
      >>> back.layout.axes, back.policy, back.scale == ads["conv/kernel"].scale
      ('wwio', 'rslora', True)
    """
    raw_config, tensors, metadata, weights_file = _read_dir(path)
    config_file = str(pathlib.Path(path) / CONFIG_NAME)
    config = _check_config(raw_config, config_file)
    if layouts is not None and not isinstance(layouts, Mapping):
        raise TypeError(f"`layouts` must be a dict {{pattern: layout}}, got {layouts!r}.")
    if dtype is not None and not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(f"`dtype` must be a floating dtype such as float32, got {dtype!r}.")
    modules = _group_tensors(tensors, weights_file)
    table, kernels, unresolved = _candidates(params, dict(layouts or {}), names)
    extra = _jlora_metadata(metadata, weights_file)
    use_dora = config.get("use_dora", False)
    use_rslora = config.get("use_rslora", False)

    per_path: dict[str, dict[tuple, dict]] = collections.defaultdict(dict)
    doubts: dict[str, tuple] = {}  # {path: (guess, shape, why it cannot be used, fix)}
    for name, entry in modules.items():
        if not _is_targeted(config, name):
            raise ValueError(
                f"Module {name!r} is in {weights_file} but {config_file}'s target_modules="
                f"{config.get('target_modules')!r} (exclude_modules="
                f"{config.get('exclude_modules')!r}) does not select it, so PEFT would not load "
                "it. The directory is inconsistent."
            )
        if ("M" in entry) != use_dora:
            raise ValueError(
                f"Module {name!r} in {weights_file} "
                + ("has a lora_magnitude_vector but the config has use_dora=false."
                   if "M" in entry else "has no lora_magnitude_vector but the config has "
                   "use_dora=true.")
            )
        if name not in table:
            raise _unknown_module_error(name, table, unresolved, weights_file)
        kpath, idx = table[name]
        leaf, layout = kernels[kpath]
        inner, kshape, _ = _layer(layout, leaf.shape)
        rank = int(entry["A"].shape[0]) if entry["A"].ndim >= 1 else 0
        want_rank = int(_pattern_value(config, "rank_pattern", "r", name))
        if rank != want_rank:
            raise ValueError(
                f"Module {name!r}: lora_A in {weights_file} has shape {entry['A'].shape} (rank "
                f"{rank}) but {config_file} gives it rank {want_rank} (r / rank_pattern)."
            )
        _check_kind(name, entry, inner, kpath)
        fits = _fits(inner, kshape, rank, entry)
        if layout.guessed:
            doubt = _doubt(name, entry, layout, leaf.shape, fits, config["fan_in_fan_out"])
            if doubt:
                doubts.setdefault(kpath, (layout.axes, tuple(leaf.shape), *doubt))
                continue
        if inner.axes not in fits:
            expected = _peft_shapes(inner, kshape, rank)
            hint = (f" (the file's shapes fit the layout(s) {_restacked(layout, fits)} of this "
                    "kernel: is `layouts=` right?)" if fits else "")
            for role, what in (("A", "lora_A"), ("B", "lora_B"), ("M", "lora_magnitude_vector")):
                if role in entry and tuple(entry[role].shape) != expected[role]:
                    raise ValueError(
                        f"Module {name!r}: {what} in {weights_file} has shape "
                        f"{tuple(entry[role].shape)} but the kernel at {_where(kpath, idx)} with "
                        f"shape {kshape} (layout {inner.axes!r}) needs {expected[role]}{hint}."
                    )
        alpha = float(_pattern_value(config, "alpha_pattern", "lora_alpha", name))
        scale, policy = _peft_scale(rank, alpha, use_rslora), "rslora" if use_rslora else "standard"
        if name in extra:
            policy, alpha, scale = _restore(extra[name], scale, name, weights_file)
        a, b, m = _from_peft(inner, kshape, entry["A"], entry["B"], entry.get("M"))
        per_path[kpath][idx] = dict(a=a, b=b, m=m, rank=rank, alpha=alpha, scale=scale,
                                    policy=policy, name=name)
    if doubts:
        raise _guessed_layouts_error(doubts, weights_file)

    dropout = float(config.get("lora_dropout", 0.0))
    variant = "dora" if use_dora else "lora"
    out = {}
    for kpath in kernels:  # params order
        if kpath not in per_path:
            continue
        leaf, layout = kernels[kpath]
        stacked = layout.split_shape(leaf.shape)[0]
        found = per_path[kpath]
        out[kpath] = _assemble(kpath, found, stacked, layout, variant, dropout, dtype, table)
    check_adapters_fit(params, out)  # a last guard: every adapter fits its kernel
    return out


def _fits(layout: Layout, kernel_shape, rank: int, entry: dict) -> set[str]:
    """The layouts, among the orders of ``layout``'s letters, that give one layer of the
    kernel (``kernel_shape``) the file's factor shapes: the evidence for its orientation."""
    out = set()
    for order in set(itertools.permutations(layout.axes)):
        candidate = Layout("".join(order))
        shapes = _peft_shapes(candidate, kernel_shape, rank)
        if all(tuple(entry[r].shape) == shapes[r] for r in ("A", "B", "M") if r in entry):
            out.add(candidate.axes)
    return out


def _doubt(name, entry, layout: Layout, shape, fits: set[str], fan_in_fan_out: bool):
    """``(why, layout to suggest)`` if the guessed ``layout`` of a kernel of ``shape`` cannot
    be trusted for module ``name``, else None: the factors fit only other orientations of
    the kernel, or both orientations of a square kernel whose adapter was trained on
    PEFT's Conv1D (``fan_in_fan_out``)."""
    inner, kshape, _ = _layer(layout, shape)
    a_key, b_key = ("lora_embedding_A", "lora_embedding_B") if entry["embed"] else (
        "lora_A", "lora_B")
    if fits and inner.axes not in fits:
        others = _restacked(layout, fits)
        return (f"module {name!r} has {a_key} {tuple(entry['A'].shape)} and {b_key} "
                f"{tuple(entry['B'].shape)}, which fit this kernel only as {others}"), others[0]
    if fan_in_fan_out and inner.kind == "dense" and inner.ndim == 2 and kshape[0] == kshape[1]:
        return (f"module {name!r} comes from an adapter with fan_in_fan_out=true (PEFT's "
                "Conv1D, weights stored (in, out)) and the kernel is square, so its factors "
                "fit both orientations: give 'oi' if the kernel is stored (out, in), as "
                "transformers' Flax GPT-2 stores it, or 'io' if (in, out)"), _restacked(
                    layout, ["oi"])[0]
    return None


def _restacked(layout: Layout, inner_layouts) -> list[str]:
    """Full layouts of a kernel of ``layout``: its stacked axes where they are, one of
    ``inner_layouts`` (one layer's layouts) in the other places."""
    out = []
    for inner in sorted(inner_layouts):
        letters = iter(inner)
        out.append("".join(c if c == "s" else next(letters) for c in layout.axes))
    return out


def _guessed_layouts_error(doubts: dict[str, tuple], file: str) -> LayoutError:
    """One error for every kernel whose guessed layout the file contradicts or leaves open.

    ``doubts`` is ``{path: (guessed layout, kernel shape, why, layout to suggest)}``.
    """
    lines = [f"  - path {p!r} with shape {shape}, guessed layout {axes!r}: {why}"
             for p, (axes, shape, why, _) in list(doubts.items())[:6]]
    if len(doubts) > 6:
        lines.append(f"  ... and {len(doubts) - 6} more: {list(doubts)[6:16]}")
    example = {p: d[3] for p, d in list(doubts.items())[:2]}
    return LayoutError(
        f"Cannot load {file}: the layouts of {len(doubts)} kernel(s) were guessed from their "
        "shapes (no `layouts=` entry), and the adapter contradicts the guess or cannot "
        "confirm it, so its update could be applied transposed:\n" + "\n".join(lines)
        + "\nGive the layouts: `layouts=jlora.infer_layouts(fn, params, *args)` reads every "
        f"kernel's layout from the model, or give them by hand, e.g. `layouts={example}` "
        "(a pattern may cover several paths; `--layout PATTERN=LAYOUT` on the command line)."
    )


def _check_kind(name: str, entry: dict, layout: Layout, path: str) -> None:
    kind = "embed" if entry.get("embed") else ("conv" if entry["A"].ndim > 2 else "dense")
    if kind != layout.kind:
        what = {"embed": "an Embedding", "conv": "a Conv", "dense": "a Linear"}
        raise ValueError(
            f"Module {name!r} holds {what[kind]} adapter but the kernel at path {path!r} has "
            f"layout {layout.axes!r} ({layout.kind}); pass `names=` or `layouts=` to match them."
        )


def _unknown_module_error(name, table, unresolved, file) -> ValueError:
    near = ", ".join(repr(n) for n in paths_lib.nearest_paths(name, list(table), n=5))
    msg = (f"Module {name!r} in {file} has no kernel in `params`: no kernel's PEFT module name "
           f"is {name!r}. Closest module names: {near or '(none)'}. Pass `names=` (a callable "
           "or {path: name}) to map paths to PEFT module names")
    if unresolved:
        first = sorted(unresolved)[0]
        msg += (f"; these leaves were skipped because their layout is unknown (give "
                f"`layouts=`): {sorted(unresolved)[:5]}, e.g. {unresolved[first].rstrip('.')}")
    return ValueError(msg + ".")


def _jlora_metadata(metadata: Mapping[str, str], file: str) -> dict:
    if _METADATA_KEY not in metadata:
        return {}
    try:
        modules = json.loads(metadata[_METADATA_KEY])["modules"]
        for entry in modules.values():
            if entry["policy"] not in ("standard", "rslora", "custom"):
                raise ValueError(f"unknown policy {entry['policy']!r}")
            _ = (float(entry["alpha"]), float(entry["scale"]))
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"The {_METADATA_KEY!r} metadata of {file} is malformed: {e!r}.") from None
    return modules


def _restore(entry: Mapping, scale: float, name: str, file: str):
    """The policy and alpha jlora wrote beside a module whose PEFT alpha is effective."""
    if not math.isclose(float(entry["scale"]), scale, rel_tol=1e-12):
        raise ValueError(
            f"Module {name!r}: the config gives scale {scale} but the jlora metadata in {file} "
            f"records scale {entry['scale']} (policy {entry['policy']!r}); was the config edited "
            "after jlora wrote it?"
        )
    return str(entry["policy"]), float(entry["alpha"]), float(entry["scale"])


def _assemble(kpath, found, stacked, layout, variant, dropout, dtype, table) -> Adapter:
    missing = [idx for idx in np.ndindex(*stacked) if tuple(idx) not in found]
    if missing:
        names = [n for n, (p, i) in table.items() if p == kpath and i in missing]
        raise ValueError(
            f"The stacked kernel at path {kpath!r} has {len(missing)} of its "
            f"{math.prod(stacked)} layers without an adapter in the file (modules {names[:5]}); "
            "jlora adapts a stacked kernel at every index or not at all."
        )
    first = found[next(iter(found))]
    for e in found.values():
        for field in ("rank", "alpha", "scale", "policy"):
            if e[field] != first[field]:
                raise ValueError(
                    f"The modules of the stacked kernel at path {kpath!r} disagree on {field}: "
                    f"{first['name']!r} has {first[field]!r}, {e['name']!r} has {e[field]!r}; one "
                    "adapter per stacked kernel needs one value."
                )
    order = list(np.ndindex(*stacked))

    def stack(key):
        if first[key] is None:
            return None
        x = np.stack([found[tuple(i)][key] for i in order]).reshape(
            *stacked, *first[key].shape) if stacked else first[key]
        return jnp.asarray(x if dtype is None else x.astype(dtype))

    a, b = stack("a"), stack("b")
    assert a is not None and b is not None  # _group_tensors: every module has lora_A and lora_B
    return Adapter(
        a=a, b=b, magnitude=stack("m") if variant == "dora" else None,
        layout=layout, rank=first["rank"], alpha=first["alpha"], scale=first["scale"],
        policy=first["policy"], variant=variant, dropout=dropout,
    )
