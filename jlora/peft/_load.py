"""Import: a PEFT directory -> jlora adapters, with guessed layouts checked against the
file."""

from __future__ import annotations

import collections
import dataclasses
import itertools
import json
import math
import os
import pathlib
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np

from jlora import _paths as paths_lib
from jlora._adapter import Adapter, Adapters
from jlora._config import LoraConfig
from jlora._merging import check_adapters_fit
from jlora.layouts import Layout, LayoutError, resolve_layout
from jlora.peft._config import _check_config, _peft_scale
from jlora.peft._extras_load import refuse_trained_parts
from jlora.peft._format import CONFIG_NAME, METADATA_KEY, PREFIX, Names
from jlora.peft._names import (
    _check_names_arg,
    _is_targeted,
    _name_table,
    _pattern_value,
    _template,
    _where,
)
from jlora.peft._structure import import_view
from jlora.peft._tensors import _from_peft, _layer, _peft_shapes, _read_dir

# -- import -----------------------------------------------------------------------------

_SUFFIXES = {
    ".lora_A.weight": "A", ".lora_B.weight": "B",
    ".lora_embedding_A": "A", ".lora_embedding_B": "B",
    ".lora_magnitude_vector": "M", ".lora_magnitude_vector.weight": "M",
    ".lora_B.bias": "bias",
}


def _group_tensors(tensors: Mapping[str, np.ndarray], file: str) -> tuple[dict, dict]:
    """``({module name: {"A", "B", "M", "bias", "embed"}}, {key: tensor})`` from PEFT's
    flat keys: the LoRA modules, and every other tensor (full weights, trainable tokens)
    under its key without the ``base_model.model.`` prefix."""
    modules: dict[str, dict] = {}
    others: dict[str, np.ndarray] = {}
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
                if role not in ("M", "bias"):
                    entry["embed"].add("embedding" in suffix)
                break
        else:
            others[rest] = value
    for name, entry in modules.items():
        for role, what in (("A", "lora_A"), ("B", "lora_B")):
            if role not in entry:
                raise ValueError(f"Module {name!r} in {file} has no {what} tensor.")
        if len(entry["embed"]) > 1:
            raise ValueError(
                f"Module {name!r} in {file} mixes lora_embedding_* and lora_A/lora_B tensors."
            )
        entry["embed"] = entry["embed"].pop()
    return modules, others


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
        ``variables["params"]``, an NNX state, any pytree); only shapes are read, and the
        values of the leaves that the file also holds in full (which must equal them).
      names: module names where the default naming does not fit (see the module
        docstring): a callable ``path -> name or None`` or a dict ``{path: name}``.
      layouts: ``{pattern or path: layout}`` as in :class:`jlora.LoraConfig`, e.g. the
        result of ``jlora.infer_layouts(fn, params, *args)``, or by hand: ``"oi"`` for a
        kernel stored ``(out, in)``, ``"s..."`` for stacked (scanned) kernels. These are
        trusted; a kernel without one gets a guessed layout, checked against the file.
      dtype: the factors' dtype; by default the file's.

    Returns:
      ``{kernel path: Adapter}``, one entry per adapted kernel (the modules of a stacked
      kernel become one adapter), with PEFT's rank, alpha and scale for each. The layers
      of a stacked kernel that the file leaves out (PEFT's ``layers_to_transform``) get
      zero factors: no update, and zero gradients, so an optimizer leaves them at zero.

    Raises:
      FileNotFoundError: ``path`` lacks one of the two files.
      LayoutError: (a ``ValueError``) a guessed layout that the file contradicts (factor
        shapes that fit only another orientation of the kernel) or cannot confirm (a
        square 2-D kernel of an adapter with ``fan_in_fan_out=true``), naming each path,
        the evidence and the ``layouts=`` to pass.
      ValueError: naming the file, module or path and what is wrong; a file that is not
        valid JSON or safetensors (truncated, corrupted) is a
        :class:`jlora.AdapterFormatError`. A file that holds trained weights beside the
        factors (``modules_to_save``, biases, ``lora_bias``, trainable tokens, base
        weights other than ``params``'), which adapters cannot carry, is refused with a
        pointer to :func:`jlora.peft.load_trainable`.

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
    read = read_dir(path, params, names=names, layouts=layouts, dtype=dtype)
    refuse_trained_parts(read)
    return read.adapters


@dataclasses.dataclass
class Read:
    """A PEFT directory read against ``params``: the adapters, and what else the file holds."""

    adapters: Adapters
    config: dict
    config_file: str
    weights_file: str
    others: dict[str, np.ndarray]  # tensors that are not LoRA factors, keys without PREFIX
    lora_bias: dict[str, dict[tuple, np.ndarray]]  # {kernel path: {index: lora_B.bias}}
    modules: dict[str, tuple[str, tuple]]  # {LoRA module in the file: (kernel path, index)}
    kernels: dict[str, tuple]  # {path: (leaf, layout)} of every kernel of params
    unresolved: dict[str, str]  # {path: why its layout is unknown}
    names: Names
    params: Any  # the params the file was read against


def read_dir(path, params, *, names: Names = None, layouts=None, dtype=None) -> Read:
    """Everything :func:`load` reads, before it checks that the file holds nothing but
    LoRA factors (and weights that repeat the base)."""
    raw_config, tensors, metadata, weights_file = _read_dir(path)
    # Split, Part and TargetParameter kernels are read through a view of one module each.
    view = import_view(raw_config, tensors, metadata, params, names, layouts, weights_file)
    raw_config, tensors, metadata = view.config, view.tensors, view.metadata
    params, names, layouts = view.params, view.names, view.layouts
    config_file = str(pathlib.Path(path) / CONFIG_NAME)
    config = _check_config(raw_config, config_file)
    if layouts is not None and not isinstance(layouts, Mapping):
        raise TypeError(f"`layouts` must be a dict {{pattern: layout}}, got {layouts!r}.")
    if dtype is not None and not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(f"`dtype` must be a floating dtype such as float32, got {dtype!r}.")
    modules, others = _group_tensors(tensors, weights_file)
    table, kernels, unresolved = _candidates(params, dict(layouts or {}), names)
    extra = _jlora_metadata(metadata, weights_file)
    use_dora = config.get("use_dora", False)
    use_rslora = config.get("use_rslora", False)

    per_path: dict[str, dict[tuple, dict]] = collections.defaultdict(dict)
    lora_bias: dict[str, dict[tuple, np.ndarray]] = collections.defaultdict(dict)
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
        if "bias" in entry:
            lora_bias[kpath][idx] = _lora_b_bias(name, entry["bias"], inner, kshape, weights_file)
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
    out = view.restore(out)
    return Read(adapters=out, config=config, config_file=config_file, weights_file=weights_file,
                others=others, lora_bias=dict(lora_bias), modules=_file_modules(modules, table),
                kernels=kernels, unresolved=unresolved, names=names, params=params)


def _file_modules(modules: dict, table: dict) -> dict[str, tuple[str, tuple]]:
    return {name: table[name] for name in modules}


def _lora_b_bias(name, bias, layout: Layout, kernel_shape, file) -> np.ndarray:
    """A ``lora_B.bias`` in the kernel's fan-out shape."""
    _, _, fan_out = layout.split_shape(kernel_shape)
    if tuple(bias.shape) != (math.prod(fan_out),):
        raise ValueError(
            f"Module {name!r}: lora_B.bias in {file} has shape {tuple(bias.shape)} but the "
            f"kernel's fan-out needs ({math.prod(fan_out)},)."
        )
    return np.asarray(bias).reshape(fan_out)




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
    if METADATA_KEY not in metadata:
        return {}
    try:
        modules = json.loads(metadata[METADATA_KEY])["modules"]
        for entry in modules.values():
            if entry["policy"] not in ("standard", "rslora", "custom"):
                raise ValueError(f"unknown policy {entry['policy']!r}")
            _ = (float(entry["alpha"]), float(entry["scale"]))
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"The {METADATA_KEY!r} metadata of {file} is malformed: {e!r}.") from None
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
    if missing and variant != "lora":
        names = [n for n, (p, i) in table.items() if p == kpath and i in missing]
        raise ValueError(
            f"The stacked kernel at path {kpath!r} has {len(missing)} of its "
            f"{math.prod(stacked)} layers without an adapter in the file (modules {names[:5]}, "
            "e.g. PEFT's layers_to_transform), and its adapter is DoRA: DoRA rescales every "
            "layer of a stacked kernel, so the layers without one cannot stay exactly as "
            "they are. Unstack the kernel (one path per layer) to load it."
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
        # A layer the file leaves out (layers_to_transform) gets zero factors: no update,
        # and zero gradients for both factors, so training leaves it at zero.
        if first[key] is None:
            return None
        zero = np.zeros_like(first[key])
        x = np.stack([found.get(tuple(i), {key: zero})[key] for i in order]).reshape(
            *stacked, *first[key].shape) if stacked else first[key]
        return jnp.asarray(x if dtype is None else x.astype(dtype))

    a, b = stack("a"), stack("b")
    assert a is not None and b is not None  # _group_tensors: every module has lora_A and lora_B
    return Adapter(
        a=a, b=b, magnitude=stack("m") if variant == "dora" else None,
        layout=layout, rank=first["rank"], alpha=first["alpha"], scale=first["scale"],
        policy=first["policy"], variant=variant, dropout=dropout,
    )
