"""PEFT's ``target_parameters``: LoRA on a raw ``nn.Parameter`` (PEFT's ``ParamWrapper``,
PEFT 0.17+), as mixture-of-experts models store their experts.

A 3-D parameter ``(E, out, in)`` (or ``(E, in, out)`` on modules with ``is_transposed``;
the file is the same) gets one adapter with ``lora_A.weight (E·r, in)``, expert-major
(rows ``e·r .. e·r + r - 1`` are expert ``e``'s), and ``lora_B.weight (out, r·E)``,
expert-minor (column ``k·E + e`` is expert ``e``'s rank component ``k``): expert ``e``'s
update is ``scale · B[:, :, e] @ A[e]`` with ``A = lora_A.reshape(E, r, in)`` and
``B = lora_B.reshape(out, r, E)`` (``ParamWrapper.get_delta_weight``). A 2-D parameter is
``(out, in)`` with the tensors of a ``Linear``.

jlora's adapter of an expert kernel has the experts as a stacked axis:
``A (*stacked, in, r)``, ``B (*stacked, r, out)``. Each expert is handled as a module of
its own by the reader and writer (named ``<parameter>.<expert>``), and this module turns
those into PEFT's tensors and back.

The tensors are saved under the name of the module that owns the parameter. When PEFT
adapts several parameters of one module it nests the wrappers, the parameter the module
registers first innermost, so its keys read ``<module>.base_layer.lora_A.weight`` (one
``base_layer`` per wrapper around it): :class:`TargetParameter` ``index`` says where a
parameter comes.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import math
import re

import jax.numpy as jnp
import numpy as np

from jlora.layouts import Layout
from jlora.peft._format import METADATA_KEY, PREFIX
from jlora.peft._names import _pattern_value

__all__ = ["TargetParameter"]

_A, _B = ".lora_A.weight", ".lora_B.weight"
_WRAPPED = ".base_layer"


@dataclasses.dataclass(frozen=True)
class TargetParameter:
    """A kernel that PEFT adapts as an ``nn.Parameter`` (``LoraConfig(target_parameters=
    [...])``), e.g. an MoE layer's expert weights: give it as the kernel's module name in
    ``names=``.

    Args:
      name: the parameter's full torch name, with one ``{}`` per stacked axis of the
        kernel other than the experts', e.g. ``"model.layers.{}.mlp.experts.gate_up_proj"``
        for a scanned ``(layers, experts, in, out)`` kernel.
      expert_axis: the kernel axis of the experts (a stacked axis of its layout); None
        for a 2-D parameter.
      index: where the parameter comes among the adapted parameters of its torch module,
        in the order the module registers them (``named_parameters()``); needed only when
        PEFT adapts several parameters of one module.

    Example:
      >>> TargetParameter("model.layers.{}.mlp.experts.down_proj", expert_axis=1).expert_axis
      1
    """

    name: str
    expert_axis: int | None = None
    index: int | None = None

    def __post_init__(self):
        if not isinstance(self.name, str) or "." not in self.name:
            raise ValueError(
                f"TargetParameter `name` must be a parameter's full torch name "
                f"('<module>.<parameter>'), got {self.name!r}."
            )
        for field in ("expert_axis", "index"):
            value = getattr(self, field)
            if value is not None and not (isinstance(value, int) and not isinstance(value, bool)):
                raise TypeError(f"TargetParameter `{field}` must be an int or None, got {value!r}.")
        if self.index is not None and self.index < 0:
            raise ValueError(f"TargetParameter `index` must be >= 0, got {self.index}.")


@dataclasses.dataclass(frozen=True)
class _Kernel:
    """One kernel adapted as PEFT target parameters."""

    path: str
    spec: TargetParameter
    template: str  # the per-expert module name, one positional field per stacked axis
    stacked: tuple[int, ...]
    expert: int | None  # position of the expert axis among the stacked axes
    fan_in: int
    fan_out: int

    def parameters(self) -> dict[str, list[tuple[tuple, str]]]:
        """``{parameter name: [(stacked index, per-expert module name)]}``."""
        out = collections.defaultdict(list)
        for idx in np.ndindex(*self.stacked):
            outer = tuple(i for k, i in enumerate(idx) if k != self.expert)
            out[self.spec.name.format(*outer)].append((idx, self.template.format(*idx)))
        return out


def kernel(path: str, spec: TargetParameter, layout: Layout, shape) -> _Kernel:
    """The kernel at ``path`` (``layout``, ``shape``) as the target parameter ``spec``."""
    stacked, fan_in, fan_out = (tuple(x) for x in layout.split_shape(shape))
    expert = None
    if spec.expert_axis is not None:
        axis = spec.expert_axis
        if not -layout.ndim <= axis < layout.ndim or layout.axes[axis % layout.ndim] != "s":
            raise ValueError(
                f"TargetParameter expert_axis={axis} for the kernel at path {path!r} must be "
                f"a stacked axis ('s') of its layout {layout.axes!r} (shape {tuple(shape)}); "
                "give the kernel a layout with the experts stacked, e.g. 'sio' or 'soi'."
            )
        expert = layout.stacked_axes.index(axis % layout.ndim)
    if layout.kind != "dense":
        raise ValueError(
            f"The kernel at path {path!r} (layout {layout.axes!r}) is not dense: PEFT's "
            "target_parameters adapt linear (expert) weights only."
        )
    pieces = spec.name.split("{}")
    outer = [k for k in range(len(stacked)) if k != expert]
    if len(pieces) - 1 != len(outer) or any(c in p for p in pieces for c in "{}"):
        raise ValueError(
            f"TargetParameter name {spec.name!r} for path {path!r} must hold one '{{}}' per "
            f"stacked axis other than the experts' ({len(outer)}: layout {layout.axes!r}"
            f"{'' if expert is None else f', experts on axis {spec.expert_axis}'})."
        )
    template = pieces[0] + "".join(f"{{{k}}}{p}" for k, p in zip(outer, pieces[1:], strict=True))
    if expert is not None:
        template += f".{{{expert}}}"
    return _Kernel(path, spec, template, stacked, expert, math.prod(fan_in), math.prod(fan_out))


def _nesting(kernels: list[_Kernel], counts: dict[str, int] | None) -> dict[str, str]:
    """``{parameter name: module name in the file}``: the owner plus one ``.base_layer``
    per wrapper PEFT puts around it. ``counts`` gives how many parameters of each owner
    the file adapts (None on export: as many as ``kernels`` adapt)."""
    by_owner = collections.defaultdict(list)
    for k in kernels:
        for param in k.parameters():
            by_owner[param.rsplit('.', 1)[0]].append((param, k))
    out = {}
    for owner, params in by_owner.items():
        count = len(params) if counts is None else counts.get(owner, 1)
        if count == 1 and len(params) == 1:
            out[params[0][0]] = owner
            continue
        indices = [k.spec.index for _, k in params]
        if None in indices or len(set(indices)) != len(indices) or max(indices) >= count:
            raise ValueError(
                f"PEFT adapts {count} parameters of the torch module {owner!r} and nests their "
                f"wrappers in the order the module registers them; give each "
                f"TargetParameter its place in that order with `index=` (0 .. {count - 1}), "
                f"got {dict((p, i) for (p, _), i in zip(params, indices, strict=True))}."
            )
        for (param, _), index in zip(params, indices, strict=True):
            out[param] = owner + _WRAPPED * (count - 1 - index)
    return out


def _retarget(patterns: dict, old_names: list[str], new_key: str) -> dict:
    """``patterns`` with the key that matches ``old_names`` (as jlora's writer made it,
    matching exactly those it wrote) replaced by ``new_key``."""
    out = {}
    for key, value in patterns.items():
        if any(re.match(rf"(.*\.)?({key})$", name) for name in old_names):
            key = new_key
        out[key] = value
    return out


def finish_export(kernels: list[_Kernel], config: dict, tensors: dict, metadata: dict):
    """The writer's output, with the per-expert modules of ``kernels`` turned into PEFT's
    target-parameter tensors and config."""
    if not kernels:
        return config, tensors, metadata
    if config["use_dora"] or config["lora_dropout"]:
        raise ValueError(
            f"PEFT's target_parameters (paths {[k.path for k in kernels]}) work without DoRA "
            "and dropout only (ParamWrapper refuses both); export those adapters separately "
            "or set dropout=0."
        )
    files = _nesting(kernels, None)
    tensors, virtual, params = dict(tensors), set(), []
    rank_pattern, alpha_pattern = dict(config["rank_pattern"]), dict(config["alpha_pattern"])
    extra = json.loads(metadata[METADATA_KEY])["modules"] if METADATA_KEY in metadata else {}
    for k in kernels:
        names = [m for modules in k.parameters().values() for _, m in modules]
        for param, modules in k.parameters().items():
            a = [tensors.pop(f"{PREFIX}{m}{_A}", None) for _, m in modules]
            b = [tensors.pop(f"{PREFIX}{m}{_B}", None) for _, m in modules]
            present = [j for j, x in enumerate(a) if x is not None]
            if not present:
                continue  # no update at all (the writer leaves out all-zero layers)
            # an expert the writer left out (zero factors): zeros, as PEFT needs them all
            a = [x if x is not None else jnp.zeros_like(a[present[0]]) for x in a]
            b = [x if x is not None else jnp.zeros_like(b[present[0]]) for x in b]
            if k.expert is None:
                a, b = a[0], b[0]
            else:  # lora_A expert-major, lora_B expert-minor
                a = jnp.concatenate(a, axis=0)
                b = jnp.stack(b, axis=-1).reshape(b[0].shape[0], -1)
            tensors[f"{PREFIX}{files[param]}{_A}"] = a
            tensors[f"{PREFIX}{files[param]}{_B}"] = b
            for _, m in modules:
                if m in extra:
                    extra[files[param]] = extra.pop(m)
            params.append(param)
        virtual.update(names)
        key = "^(?:" + "|".join(re.escape(p) for p in k.parameters()) + ")$"
        rank_pattern = _retarget(rank_pattern, names, key)
        alpha_pattern = _retarget(alpha_pattern, names, key)
    config = dict(config, rank_pattern=rank_pattern, alpha_pattern=alpha_pattern,
                  target_modules=[m for m in config["target_modules"] if m not in virtual],
                  target_parameters=sorted(params))
    if extra:
        payload = json.loads(metadata[METADATA_KEY])
        metadata = dict(metadata, **{METADATA_KEY: json.dumps(dict(payload, modules=extra))})
    return config, tensors, metadata


def _is_parameter_module(owner: str, targets) -> bool:
    return any(owner == t.rsplit(".", 1)[0] or owner.endswith("." + t.rsplit(".", 1)[0])
               for t in targets)


def rewrite_import(kernels: list[_Kernel], config: dict, tensors: dict, metadata: dict,
                   file: str):
    """A PEFT directory's content with the target-parameter tensors of ``kernels`` turned
    into one module per expert (and the config saying so), for the reader."""
    targets = config.get("target_parameters") or []
    if isinstance(targets, str):
        targets = [targets]
    owners = collections.Counter()
    for key in tensors:
        if key.endswith(_A):
            module = key[len(PREFIX):-len(_A)]
            while module.endswith(_WRAPPED):
                module = module[:-len(_WRAPPED)]
            if _is_parameter_module(module, targets):
                owners[module] += 1
    files = _nesting(kernels, owners)
    tensors, added, patterns = dict(tensors), [], {}
    rank_pattern, alpha_pattern = dict(config.get("rank_pattern") or {}), {}
    extra = json.loads(metadata[METADATA_KEY])["modules"] if METADATA_KEY in metadata else None
    claimed = set()
    for k in kernels:
        for param, modules in k.parameters().items():
            module = files[param]
            if f"{PREFIX}{module}{_A}" not in tensors:
                continue  # not adapted in the file: the reader reports a partial stack
            if not (param in targets or any(param.endswith("." + t) for t in targets)):
                raise ValueError(
                    f"{file} adapts module {module!r} but its config's target_parameters="
                    f"{targets!r} does not select parameter {param!r} (path {k.path!r}); is "
                    "the TargetParameter name right?"
                )
            claimed.add(module)
            a, b = tensors.pop(f"{PREFIX}{module}{_A}"), tensors.pop(f"{PREFIX}{module}{_B}", None)
            if b is None:
                raise ValueError(f"Module {module!r} in {file} has no lora_B tensor.")
            rank = int(_pattern_value(config, "rank_pattern", "r", param))
            experts = 1 if k.expert is None else k.stacked[k.expert]
            want_a, want_b = (experts * rank, k.fan_in), (k.fan_out, experts * rank)
            if tuple(a.shape) != want_a or tuple(b.shape) != want_b:
                raise ValueError(
                    f"Module {module!r} (parameter {param!r}, path {k.path!r}) in {file} has "
                    f"lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)}, but {experts} "
                    f"expert(s) of fan-in {k.fan_in} and fan-out {k.fan_out} at rank {rank} "
                    f"need lora_A {want_a} and lora_B {want_b}: are the layout, expert_axis "
                    "and index right?"
                )
            a3 = a.reshape(experts, rank, a.shape[1])
            b3 = b.reshape(b.shape[0], rank, experts)
            for e, (_, name) in enumerate(sorted(modules)):
                tensors[f"{PREFIX}{name}{_A}"] = np.ascontiguousarray(a3[e])
                tensors[f"{PREFIX}{name}{_B}"] = np.ascontiguousarray(b3[:, :, e])
                added.append(name)
                if extra is not None and module in extra:
                    extra[name] = extra[module]
            key = "^" + re.escape(param) + (r"\.\d+$" if k.expert is not None else "$")
            patterns[key] = param
    for key in tensors:
        if key.endswith(_A):
            module = key[len(PREFIX):-len(_A)]
            owner = module
            while owner.endswith(_WRAPPED):
                owner = owner[:-len(_WRAPPED)]
            if module not in claimed and _is_parameter_module(owner, targets):
                raise ValueError(
                    f"Module {module!r} in {file} adapts a target parameter (target_parameters"
                    f"={targets!r}) that no kernel is mapped to: give its kernel "
                    "`names={path: jlora.peft.TargetParameter(name, expert_axis=...)}`."
                )
    for key, param in patterns.items():  # PEFT looks ranks and alphas up by parameter name
        rank_pattern = {key: int(_pattern_value(config, "rank_pattern", "r", param)),
                        **rank_pattern}
        alpha_pattern[key] = _pattern_value(config, "alpha_pattern", "lora_alpha", param)
    targets_now = config.get("target_modules")
    if isinstance(targets_now, str):
        targets_now = f"(?:{targets_now})|" + "|".join(re.escape(n) for n in added)
    elif targets_now is not None:
        targets_now = [*targets_now, *added]
    config = dict(config, target_parameters=None, target_modules=targets_now,
                  rank_pattern=rank_pattern,
                  alpha_pattern={**alpha_pattern, **(config.get("alpha_pattern") or {})})
    if extra is not None:
        payload = json.loads(metadata[METADATA_KEY])
        metadata = dict(metadata, **{METADATA_KEY: json.dumps(dict(payload, modules=extra))})
    return config, tensors, metadata
