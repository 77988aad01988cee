"""PEFT module names for jlora kernel paths, and PEFT's own rules for matching them
(``target_modules``, ``rank_pattern`` keys, ``layers_to_transform``)."""

from __future__ import annotations

import re
import string
from collections.abc import Mapping

import numpy as np

from jlora import _paths as paths_lib
from jlora.peft._format import Names

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
    """PEFT's ``check_target_module_exists``."""
    exclude = config.get("exclude_modules")
    if exclude:
        if isinstance(exclude, str):
            if re.fullmatch(exclude, name):
                return False
        elif name in exclude or any(name.endswith(f".{k}") for k in exclude):
            return False
    # A module of modules_to_save (or inside one) never gets LoRA.
    if any(re.match(rf"(^|.*\.){m}($|\..*)", name) for m in config.get("modules_to_save") or ()):
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
