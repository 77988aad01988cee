"""`LoraConfig`: what to adapt, at which rank, with which scale.

Example:
  >>> import jlora
  >>> config = jlora.LoraConfig(rank=16, alpha=16.0, scaling="rslora",
  ...                           targets=r".*/(query|value)/kernel",
  ...                           rank_pattern={r".*/value/kernel": 4})
  >>> config.rank_for("layer/value/kernel"), config.scale_for("layer/query/kernel")
  (4, 4.0)
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import re
from collections.abc import Callable, Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np

from jlora import scaling as scaling_lib
from jlora._paths import compile_pattern
from jlora._variant import variant_names
from jlora.layouts import Layout, is_layout_spec

__all__ = ["INITS", "VARIANTS", "LoraConfig"]

# PEFT's names where they exist. Inits other than the first two are provided by
# jlora.variants (they need the base weights or input statistics).
INITS = ("default", "gaussian", "pissa", "olora", "orthogonal", "eva", "corda", "loftq")
VARIANTS = ("lora", "dora")


def _is_positive_int(x: Any) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool) and int(x) > 0


def _is_positive_finite(x: Any) -> bool:
    return (
        isinstance(x, numbers.Real) and not isinstance(x, bool) and math.isfinite(x)
        and float(x) > 0
    )


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """A frozen, validated description of the adapters to create.

    Args:
      rank: the LoRA rank ``r``, a positive int (PEFT's ``r``).
      alpha: ``lora_alpha``, a positive finite number.
      scaling: ``"standard"`` (``alpha / rank``), ``"rslora"`` (``alpha / sqrt(rank)``) or a
        callable ``(rank, alpha) -> float``. Defaults to ``"standard"``, or ``"rslora"``
        when ``use_rslora=True``.
      use_rslora: PEFT-style alias for ``scaling="rslora"``; contradicting ``scaling`` is an
        error.
      targets: a regular expression matched in full against each leaf's ``/``-joined
        path; matching leaves get adapters. Default: every leaf named ``kernel``.
      exclude: an optional pattern; matching paths are left alone even if targeted.
      rank_pattern: ``{pattern: rank}`` overriding ``rank`` per path.
      alpha_pattern: ``{pattern: alpha}`` overriding ``alpha`` per path. In both, when
        several patterns match a path the *first* one in the mapping's order wins (as in
        PEFT), so put the most specific pattern first.
      layouts: ``{pattern or path: layout}`` for kernels whose layout cannot be inferred
        from flax's conventions (see :mod:`jlora.layouts`); the first matching pattern
        wins. ``jlora.infer_layouts(fn, params, *args)`` reads them from the model and
        its result goes here as it is.
      init: ``"default"`` (PEFT: A kaiming-uniform, B zero; embeddings the other way round)
        or ``"gaussian"`` (A ~ N(0, (1/rank)^2), as PEFT); the variants module adds
        ``"pissa"``, ``"olora"``, ``"orthogonal"``, ``"eva"``, ``"corda"`` and ``"loftq"``.
      variant: ``"lora"``, ``"dora"`` or any variant registered with
        ``jlora.variants.register_variant``.
      dropout: PEFT's ``lora_dropout`` on the adapter branch's input, in ``[0, 1)``.
      dtype: the dtype of the factors, float32 by default.

    Example:
      >>> LoraConfig(rank=8, alpha=16.0).scale_for("dense/kernel")
      2.0
      >>> LoraConfig(rank=4, alpha=1.0, use_rslora=True).scaling
      'rslora'
    """

    rank: int = 8
    alpha: float = 8.0
    scaling: str | Callable[[int, float], float] | None = None
    use_rslora: bool | None = None
    targets: str = r"(.*/)?kernel"
    exclude: str | None = None
    rank_pattern: Mapping[str, int] = dataclasses.field(default_factory=dict)
    alpha_pattern: Mapping[str, float] = dataclasses.field(default_factory=dict)
    layouts: Mapping[str, str | Layout] = dataclasses.field(default_factory=dict)
    init: str = "default"
    variant: str = "lora"
    dropout: float = 0.0
    dtype: Any = np.float32

    def __post_init__(self):
        if not _is_positive_int(self.rank):
            raise ValueError(f"`rank` must be a positive int, got {self.rank!r}.")
        if not _is_positive_finite(self.alpha):
            raise ValueError(f"`alpha` must be a positive, finite number, got {self.alpha!r}.")
        self._resolve_scaling()
        compile_pattern(self.targets, field="targets")
        if self.exclude is not None:
            compile_pattern(self.exclude, field="exclude")
        for field, values, valid, allowed in (
            ("rank_pattern", self.rank_pattern, _is_positive_int, "a positive int"),
            ("alpha_pattern", self.alpha_pattern, _is_positive_finite, "a positive, finite number"),
        ):
            self._check_mapping(field, values)
            for key, value in values.items():
                compile_pattern(key, field=f"{field}[{key!r}]")
                if not valid(value):
                    raise ValueError(
                        f"`{field}[{key!r}]` must be {allowed}, got {value!r}."
                    )
        self._check_mapping("layouts", self.layouts)
        for key, spec in self.layouts.items():
            compile_pattern(key, field=f"layouts[{key!r}]")
            if isinstance(spec, Layout):
                spec = spec.axes
            if not is_layout_spec(spec):
                raise ValueError(
                    f"`layouts[{key!r}]` must be a layout string like 'io', 'oi', 'ioo', "
                    f"'oio', 'wwio', 'vf', 'sio', 'isoo' or 's...', got {spec!r}. See "
                    "jlora.layouts."
                )
        if self.init not in INITS:
            raise ValueError(f"`init` must be one of {list(INITS)}, got {self.init!r}.")
        if self.variant not in variant_names():
            raise ValueError(f"`variant` must be one of {variant_names()}, got {self.variant!r}.")
        if not (
            isinstance(self.dropout, numbers.Real)
            and not isinstance(self.dropout, bool)
            and 0.0 <= self.dropout < 1.0
        ):
            raise ValueError(f"`dropout` must be a float in [0, 1), got {self.dropout!r}.")
        try:
            dtype = np.dtype(self.dtype)
        except TypeError:
            dtype = None
        # jnp.issubdtype knows bfloat16 and the other ml_dtypes floats; numpy does not.
        if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
            raise ValueError(
                f"`dtype` must be a floating dtype such as float32 or bfloat16, got {self.dtype!r}."
            )
        # Freeze the mappings' contents: later edits to the caller's dict must not leak in.
        for field in ("rank_pattern", "alpha_pattern", "layouts"):
            object.__setattr__(self, field, dict(getattr(self, field)))

    def _resolve_scaling(self):
        scaling, use_rslora = self.scaling, self.use_rslora
        if use_rslora is not None and not isinstance(use_rslora, bool):
            raise ValueError(f"`use_rslora` must be True, False or None, got {use_rslora!r}.")
        if scaling is None:
            scaling = "rslora" if use_rslora else "standard"
        elif isinstance(scaling, str):
            if scaling not in scaling_lib.POLICIES:
                raise ValueError(
                    f"`scaling` must be one of {sorted(scaling_lib.POLICIES)} or a callable "
                    f"(rank, alpha) -> float, got {scaling!r}."
                )
        elif not callable(scaling):
            raise ValueError(
                f"`scaling` must be one of {sorted(scaling_lib.POLICIES)} or a callable "
                f"(rank, alpha) -> float, got {scaling!r}."
            )
        if use_rslora is True and scaling_lib.policy_name(scaling) != "rslora":
            raise ValueError(
                f"`use_rslora=True` contradicts `scaling={self.scaling!r}`: use_rslora is an "
                "alias of scaling='rslora'; give one or the other."
            )
        if use_rslora is False and scaling_lib.policy_name(scaling) == "rslora":
            raise ValueError(
                "`use_rslora=False` contradicts `scaling='rslora'`; give one or the other."
            )
        object.__setattr__(self, "scaling", scaling)
        object.__setattr__(self, "use_rslora", scaling_lib.policy_name(scaling) == "rslora")

    @staticmethod
    def _check_mapping(field: str, values: Any):
        if not isinstance(values, Mapping):
            raise ValueError(f"`{field}` must be a mapping {{pattern: value}}, got {values!r}.")

    def __hash__(self):
        items = lambda m: tuple(m.items())
        return hash((
            self.rank, self.alpha, self.scaling, self.targets, self.exclude,
            items(self.rank_pattern), items(self.alpha_pattern), items(self.layouts),
            self.init, self.variant, self.dropout, np.dtype(self.dtype).name,
        ))

    # -- per-path resolution ---------------------------------------------------------

    @property
    def _policy(self) -> str | scaling_lib.ScalingPolicy:
        # `scaling` is None only until __post_init__ resolves it (from `use_rslora`).
        assert self.scaling is not None
        return self.scaling

    @property
    def policy_name(self) -> str:
        """``"standard"``, ``"rslora"`` or ``"custom"``."""
        return scaling_lib.policy_name(self._policy)

    def is_target(self, path: str) -> bool:
        """Whether the leaf at ``path`` is targeted (matches ``targets``, not ``exclude``)."""
        if not re.fullmatch(self.targets, path):
            return False
        return self.exclude is None or not re.fullmatch(self.exclude, path)

    @staticmethod
    def _first_match(pattern_map: Mapping[str, Any], path: str, default: Any) -> Any:
        for key, value in pattern_map.items():
            if re.fullmatch(key, path):
                return value
        return default

    def rank_for(self, path: str) -> int:
        """The rank of the kernel at ``path``: the first matching ``rank_pattern`` or ``rank``."""
        return int(self._first_match(self.rank_pattern, path, self.rank))

    def alpha_for(self, path: str) -> float:
        """The alpha of ``path``: the first matching ``alpha_pattern`` or ``alpha``."""
        return float(self._first_match(self.alpha_pattern, path, self.alpha))

    def scale_for(self, path: str) -> float:
        """The scale of ``path``: the policy applied to its rank and alpha."""
        return scaling_lib.compute_scale(
            self._policy, self.rank_for(path), self.alpha_for(path), path=path
        )

    def layout_patterns(self) -> list[tuple[re.Pattern, str | Layout]]:
        """``layouts`` as compiled ``(pattern, layout)`` pairs, in order."""
        return [(re.compile(k), v) for k, v in self.layouts.items()]

