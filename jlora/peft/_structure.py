"""Kernels that are not one PEFT module each: what the reader and writer see instead.

``names=`` may map a kernel to a :class:`~jlora.peft.Split` (one kernel, several PEFT
modules), a :class:`~jlora.peft.Part` (one of several kernels that make one PEFT module),
a :class:`~jlora.peft.TargetParameter` (a parameter PEFT adapts with
``target_parameters``) or an ``Adjusted`` module (a weight scaled and reordered, as
MaxText's Llama converter stores queries and keys). The writer and the reader know only
kernels that are one module each (or one per stacked index); this module hands them an
equivalent *view*: the parts of a split kernel as kernels of their own (paths
``<path>[<j>]``), the parts of a fused module as one kernel (path
``<path 0>|<path 1>|...``), each expert of a target parameter as a module of its own, an
adjusted kernel's update as the module's; and turns what they return back into the real
thing. Everything else passes through untouched.
"""

from __future__ import annotations

import collections
import dataclasses
import pathlib
import re
from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp

from jlora import _paths as paths_lib
from jlora._adapter import Adapters
from jlora._config import LoraConfig
from jlora._merging import check_adapters_fit
from jlora.layouts import resolve_layout
from jlora.peft import _adjusted, _fused
from jlora.peft import _target_parameters as targets_lib
from jlora.peft._adjusted import Adjusted
from jlora.peft._format import CONFIG_NAME, Names
from jlora.peft._fused import Part, Split
from jlora.peft._names import _check_names_arg
from jlora.peft._target_parameters import TargetParameter

_SPECS = (Split, Part, TargetParameter, Adjusted)


def _entry(names: Names, path: str):
    if callable(names):
        return names(path)
    return None if names is None else names.get(path)


def _entries(names: Names, paths: list[str], what: str) -> dict | None:
    """``{path: entry}`` of ``names`` for ``paths``, or None when no entry is a
    :class:`Split`, :class:`Part` or :class:`TargetParameter` (or ``names`` is malformed:
    the writer and reader report that)."""
    if names is None or not (callable(names) or isinstance(names, Mapping)):
        return None
    _check_names_arg(names, paths, what)
    entries = {p: _entry(names, p) for p in paths}
    return entries if any(isinstance(e, _SPECS) for e in entries.values()) else None


# -- export -------------------------------------------------------------------------------


@dataclasses.dataclass
class ExportView:
    """The adapters and names the writer gets, and what to do with its output."""

    adapters: Adapters
    names: Names
    kernels: list = dataclasses.field(default_factory=list)  # target-parameter kernels

    def finish(self, config: dict, tensors: dict, metadata: dict):
        """The writer's ``(config, tensors, metadata)`` for the real kernels."""
        return targets_lib.finish_export(self.kernels, config, tensors, metadata)


def export_view(adapters: Adapters, names: Names) -> ExportView:
    """What :func:`jlora.peft.export` writes ``adapters`` as, for ``names``."""
    entries = _entries(names, list(adapters), "a path of `adapters`")
    if entries is None:
        return ExportView(adapters, names)
    out, plain, groups, kernels = {}, {}, collections.defaultdict(list), []
    for path, ad in adapters.items():
        entry = entries[path]
        if isinstance(entry, Split):
            for part, part_ad, name in _fused.split_for_export(path, ad, entry):
                out[part], plain[part] = part_ad, name
            continue
        if isinstance(entry, Part):
            groups[entry.name].append((entry.index, path, ad, entry.keep_rank))
            continue
        if isinstance(entry, TargetParameter):
            kernel = targets_lib.kernel(path, entry, ad.layout, ad.kernel_shape)
            kernels.append(kernel)
            entry = kernel.template
        elif isinstance(entry, Adjusted):
            ad, entry = _adjusted.to_module(ad, entry, path), entry.name
        out[path] = ad
        if entry is not None:
            plain[path] = entry
    for name, members in groups.items():
        path, ad = _fused.fuse_for_export(name, members)
        out[path], plain[path] = ad, name
    return ExportView(out, plain, kernels)


# -- import -------------------------------------------------------------------------------


@dataclasses.dataclass
class ImportView:
    """What the reader gets (the directory's content and the params as kernels), and
    how its adapters become adapters of the real kernels."""

    config: object
    tensors: dict
    metadata: dict
    params: object
    names: Names
    layouts: Mapping | None
    restore: Callable[[Adapters], Adapters]


def _is_kernel(leaf) -> bool:
    shape, dtype = getattr(leaf, "shape", None), getattr(leaf, "dtype", None)
    return shape is not None and dtype is not None and len(shape) >= 2 and \
        jnp.issubdtype(dtype, jnp.floating)


def import_view(config, tensors: dict, metadata: dict, params, names: Names, layouts,
                file: str) -> ImportView:
    """The view :func:`jlora.peft.load` reads a directory through, for ``names``."""
    identity = ImportView(config, tensors, metadata, params, names, layouts, lambda ads: ads)
    flat = paths_lib.select(params, ".*", allow_empty=True)
    kernels = [p for p, leaf in flat.items() if _is_kernel(leaf)]
    entries = _entries(names, kernels, "a kernel of `params`")
    wanted = isinstance(config, dict) and config.get("target_parameters")
    if entries is None and not wanted:
        return identity
    if wanted and not any(isinstance(e, TargetParameter) for e in (entries or {}).values()):
        raise ValueError(
            f"{pathlib.Path(file).with_name(CONFIG_NAME)} sets `target_parameters`="
            f"{config['target_parameters']!r}: the adapter adapts nn.Parameters directly (e.g. "
            "mixture-of-experts weights); map each to its kernel with `names={path: "
            "jlora.peft.TargetParameter(name, expert_axis=...)}`."
        )
    if not isinstance(layouts, Mapping | None):
        return identity  # the reader refuses it
    entries = entries or {}
    patterns = LoraConfig(layouts=dict(layouts or {})).layout_patterns()
    structured = {p: e for p, e in entries.items() if isinstance(e, _SPECS)}
    view_params = {p: leaf for p, leaf in flat.items() if p not in structured}
    view_names = {p: e for p, e in entries.items() if not isinstance(e, _SPECS) and e is not None}
    view_layouts, splits, groups, target_kernels = {}, {}, collections.defaultdict(list), []
    adjusted = {}
    for path, entry in structured.items():
        leaf = flat[path]
        shape = tuple(leaf.shape)
        layout = resolve_layout(path, shape, patterns)
        if isinstance(entry, Split):
            parts = _fused.split_for_import(path, shape, layout, entry)
            for part, part_shape, part_layout, name in parts:
                view_params[part] = jax.ShapeDtypeStruct(part_shape, leaf.dtype)
                view_layouts[re.escape(part)], view_names[part] = part_layout, name
            splits[path] = (shape, layout, entry, [p[0] for p in parts])
        elif isinstance(entry, Part):
            groups[entry.name].append((entry.index, path, shape, layout, entry.keep_rank))
        elif isinstance(entry, Adjusted):
            view_params[path], view_names[path] = leaf, entry.name
            adjusted[path] = entry
        else:
            kernel = targets_lib.kernel(path, entry, layout, shape)
            target_kernels.append(kernel)
            view_params[path] = leaf
            view_layouts[re.escape(path)], view_names[path] = layout, kernel.template
    fused = {}
    for name, members in groups.items():
        members = _fused.check_parts(name, members, "`names`")
        part_path = "|".join(m[1] for m in members)
        shape, layout = _fused.fused_shape(name, members)
        view_params[part_path] = jax.ShapeDtypeStruct(shape, flat[members[0][1]].dtype)
        view_layouts[re.escape(part_path)], view_names[part_path] = layout, name
        fused[part_path] = members
    # The user's layout patterns still apply to the other kernels; those that matched
    # only kernels taken apart here are used up.
    for pattern, spec in zip(dict(layouts or {}), (s for _, s in patterns), strict=True):
        regex = paths_lib.compile_pattern(pattern)
        hits = [p for p in kernels if p == pattern or regex.fullmatch(p)]
        if not hits or any(p in view_params for p in hits):
            view_layouts.setdefault(pattern, spec)
    if target_kernels:
        config, tensors, metadata = targets_lib.rewrite_import(
            target_kernels, config, tensors, metadata, file)

    def restore(adapters: Adapters) -> Adapters:
        out = {}
        for part_path, members in fused.items():
            if part_path in adapters:
                out.update(_fused.split_fused_for_import(adapters[part_path], members))
        for path in kernels:
            if path in splits:
                shape, layout, entry, parts = splits[path]
                pieces = [adapters.get(p) for p in parts]
                if any(p is not None for p in pieces):
                    out[path] = _fused.assemble_split(path, shape, layout, entry, pieces)
            elif path in adapters and path in adjusted:
                out[path] = _adjusted.from_module(adapters[path], adjusted[path])
            elif path in adapters:
                out[path] = adapters[path]
        out = {p: out[p] for p in kernels if p in out}  # params order
        check_adapters_fit(params, out)
        return out

    return ImportView(config, tensors, metadata, view_params, view_names, view_layouts,
                      restore)
