"""Name templates: transformers' module names (what PEFT directories on the Hub use) for
the parameter trees of JAX codebases, with the layouts of their kernels.

A :class:`Template` is a ``names=`` callable for :func:`jlora.peft.load` and
:func:`jlora.peft.save` and carries the layouts its kernels need, so an adapter moves
between a tree and a PEFT directory in one call::

  t = jlora.peft.templates.gemma()
  adapters = jlora.peft.load(path, params, names=t, layouts=t.layouts(params))
  jlora.peft.save(out, adapters, names=t)

Each template was read off the codebase's own checkpoint converter, which maps
transformers' weights onto its tree by transposes and reshapes only (so a LoRA update
maps the same way): the ``gemma`` package's and Tunix's ``params*.py`` and MaxText's
``param_mapping.py``. Kernels the template does not name keep jlora's default names.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping

from jlora import _paths as paths_lib
from jlora.layouts import Layout
from jlora.peft._adjusted import Adjusted
from jlora.peft._fused import Split

__all__ = ["Template", "gemma", "maxtext", "tunix"]

Rule = tuple[re.Pattern, Callable[[re.Match], object]]


@dataclasses.dataclass(frozen=True)
class Template:
    """Module names (a ``names=`` callable) and kernel layouts of one codebase's tree.

    Attributes:
      rules: ``(pattern, entry)`` pairs: the first pattern that matches a path in full
        gives its module name (a str, or a :class:`~jlora.peft.Split`) from the match.
      layout_patterns: ``{pattern: layout}`` of every kernel the template knows;
        :meth:`layouts` picks those of a given tree.

    Example:
      >>> t = gemma()
      >>> t("params/layer_3/attn/q_einsum/w")
      'model.layers.3.self_attn.q_proj'
      >>> t("params/layer_3/mlp/gating_einsum").names
      ('model.layers.3.mlp.gate_proj', 'model.layers.3.mlp.up_proj')
    """

    rules: tuple[Rule, ...]
    layout_patterns: Mapping[str, str]

    def __call__(self, path: str):
        for regex, entry in self.rules:
            match = regex.fullmatch(path)
            if match:
                return entry(match)
        return None

    def layouts(self, params) -> dict[str, Layout]:
        """``{pattern: layout}`` for the kernels of ``params`` (for ``layouts=`` and
        :class:`jlora.LoraConfig`): the template's patterns that match a leaf of
        ``params`` (jlora refuses a pattern that matches nothing).

        The layouts are *guessed* (``Layout.guessed``): a template knows its codebase's
        usual axis order, not the model in hand (Gemma 1 and 3 store ``gating_einsum``
        transposed to each other; a fork may too), and a square kernel in the wrong
        orientation fits every shape check. So :func:`jlora.lora` checks each one
        against the model's own use of the kernel, as it does layouts guessed from
        shapes, and a contradiction is a :class:`jlora.LayoutError` naming the kernel.

        Example:
          >>> import jax.numpy as jnp
          >>> tree = {"params": {"layer_0": {"mlp": {"linear": jnp.ones((4, 2))}}}}
          >>> list(gemma().layouts(tree).values())
          [Layout('io', guessed=True)]
        """
        paths = paths_lib.leaf_paths(params)
        return {k: Layout(v, guessed=True) for k, v in self.layout_patterns.items()
                if any(re.fullmatch(k, p) for p in paths)}


def _rule(pattern: str, fn: Callable[[re.Match], object]) -> Rule:
    return re.compile(pattern), fn


def _split(*names: str) -> Callable[[re.Match], Split]:
    return lambda m: Split(tuple(n.format(**m.groupdict()) for n in names), axis=0)


def _name(name: str) -> Callable[[re.Match], str]:
    return lambda m: name.format(**m.groupdict())


def _einsum_attention(layer: str, hf: str) -> list[Rule]:
    """The ``gemma`` package's attention einsums (also Tunix's Gemma models)."""
    attn = f"{hf}.layers.{{i}}.self_attn."
    return [
        _rule(layer + "attn/q_einsum/w", _name(attn + "q_proj")),
        _rule(layer + "attn/kv_einsum/w", _split(attn + "k_proj", attn + "v_proj")),
        _rule(layer + "attn/qkv_einsum/w",
              _split(attn + "q_proj", attn + "k_proj", attn + "v_proj")),
        _rule(layer + "attn/attn_vec_einsum/w", _name(attn + "o_proj")),
    ]


_EINSUM_LAYOUTS = {"attn/q_einsum/w": "oio", "attn/(kv|qkv)_einsum/w": "soio",
                   "attn/attn_vec_einsum/w": "iio"}


def gemma(*, prefix: str = "model", transpose_gating_einsum: bool = True) -> Template:
    """transformers' Gemma names for the ``gemma`` package's tree (``gm.nn.Gemma*``,
    linen: ``params/layer_{i}/attn/q_einsum/w``, ...).

    ================================  ===========  ========================================
    gemma package                     layout       transformers
    ================================  ===========  ========================================
    ``attn/q_einsum/w`` (N, D, H)     ``oio``      ``self_attn.q_proj``
    ``attn/kv_einsum/w`` (2, K, D, H) ``soio``     ``Split``: ``k_proj``, ``v_proj``
    ``attn/qkv_einsum/w`` (3, N, D, H)``soio``     ``Split``: ``q_proj``, ``k_proj``, ``v_proj``
    ``attn/attn_vec_einsum/w``        ``iio``      ``self_attn.o_proj``
    ``mlp/gating_einsum`` (2, F, D)   ``soi``      ``Split``: ``mlp.gate_proj``, ``mlp.up_proj``
    ``mlp/linear`` (F, D)             ``io``       ``mlp.down_proj``
    ``embedder/input_embedding``      ``vf``       ``embed_tokens``
    ================================  ===========  ========================================

    The stacked ``s`` axes make k and v (and gate and up) separate adapters, which need
    one rank; for one adapter over both (of their summed rank when they differ), give
    ``kv_einsum`` the layout ``"ooio"`` before the template's:
    ``layouts={r".*/kv_einsum/w": "ooio", **t.layouts(params)}``.

    Args:
      prefix: the module path of the decoder in transformers: ``"model"`` for
        ``Gemma*ForCausalLM``, ``"model.language_model"`` for Gemma 3's multimodal
        ``Gemma3ForConditionalGeneration``.
      transpose_gating_einsum: Gemma 3 stores ``gating_einsum`` as ``(2, F, D)``; Gemma 1
        and 2 as ``(2, D, F)`` (pass False).

    Example:
      >>> gemma(prefix="model.language_model")("layer_0/attn/kv_einsum/w").names[1]
      'model.language_model.layers.0.self_attn.v_proj'
    """
    layer = r"(?:params/)?layer_(?P<i>\d+)/"
    mlp = f"{prefix}.layers.{{i}}.mlp."
    rules = [
        *_einsum_attention(layer, prefix),
        _rule(layer + "mlp/gating_einsum", _split(mlp + "gate_proj", mlp + "up_proj")),
        _rule(layer + "mlp/linear", _name(mlp + "down_proj")),
        _rule(r"(?:params/)?embedder/input_embedding", _name(f"{prefix}.embed_tokens")),
    ]
    layouts = {
        **{layer.replace("(?P<i>\\d+)", r"\d+") + k: v for k, v in _EINSUM_LAYOUTS.items()},
        r"(params/)?layer_\d+/mlp/gating_einsum": "soi" if transpose_gating_einsum else "sio",
        r"(params/)?layer_\d+/mlp/linear": "io",
        r"(params/)?embedder/input_embedding": "vf",
    }
    return Template(tuple(rules), layouts)


def tunix(*, prefix: str = "model") -> Template:
    """transformers' names for Tunix's NNX models (``tunix.models.llama3``, ``qwen2``,
    ``qwen3`` including its MoE, ``gemma``, ``gemma3``), state paths such as
    ``layers/0/attn/q_proj/w``.

    ====================================  ======  ===========================================
    Tunix                                 layout  transformers
    ====================================  ======  ===========================================
    ``attn/{q,k,v}_proj/w`` (D, N, H)     ``ioo`` ``self_attn.{q,k,v}_proj``
    ``attn/o_proj/w`` (N, H, D)           ``iio`` ``self_attn.o_proj``
    Gemma's ``attn/*_einsum/w``           as in :func:`gemma`
    ``mlp/{gate,up,down}_proj/kernel``    ``io``  ``mlp.{gate,up,down}_proj``
    ``mlp/{gate,up,down}_proj`` (E, ...)  ``sio`` ``mlp.experts.{e}.{gate,up,down}_proj``
    ``mlp/router/kernel`` (MoE)           ``io``  ``mlp.gate``
    ``embedder/input_embedding``          ``vf``  ``embed_tokens``
    ``lm_head/w``                         ``io``  ``lm_head``
    ====================================  ======  ===========================================

    Args:
      prefix: the module path of the decoder in transformers (``"model"``).

    Example:
      >>> t = tunix()
      >>> t("layers/2/attn/k_proj/w"), t("layers/0/mlp/up_proj")
      ('model.layers.2.self_attn.k_proj', 'model.layers.0.mlp.experts.{}.up_proj')
    """
    layer = r"layers/(?P<i>\d+)/"
    attn, mlp = f"{prefix}.layers.{{i}}.self_attn.", f"{prefix}.layers.{{i}}.mlp."
    rules = [
        _rule(layer + r"attn/(?P<p>[qkvo])_proj/w", _name(attn + "{p}_proj")),
        *_einsum_attention(layer, prefix),
        _rule(layer + r"mlp/(?P<p>gate|up|down)_proj/kernel", _name(mlp + "{p}_proj")),
        _rule(layer + r"mlp/(?P<p>gate|up|down)_proj", _name(mlp + "experts.{{}}.{p}_proj")),
        _rule(layer + r"mlp/router/kernel", _name(mlp + "gate")),
        _rule(r"embedder/input_embedding", _name(f"{prefix}.embed_tokens")),
        _rule(r"lm_head/w", _name("lm_head")),
    ]
    layouts = {
        r"layers/\d+/attn/[qkv]_proj/w": "ioo",
        r"layers/\d+/attn/o_proj/w": "iio",
        **{r"layers/\d+/" + k: v for k, v in _EINSUM_LAYOUTS.items()},
        r"layers/\d+/mlp/(gate|up|down)_proj/kernel": "io",
        r"layers/\d+/mlp/(gate|up|down)_proj": "sio",
        r"layers/\d+/mlp/router/kernel": "io",
        r"embedder/input_embedding": "vf",
        r"lm_head/w": "io",
    }
    return Template(tuple(rules), layouts)


def maxtext(*, scan_axis: int | None = 1, prefix: str = "model", query_scale: float = 1.0,
            interleaved_rope: bool = False) -> Template:
    """transformers' names for a MaxText decoder's tree (``params/decoder/layers/...``).

    ===================================  =========================  ====================
    MaxText                              layout (scanned, axis 1)   transformers
    ===================================  =========================  ====================
    ``self_attention/{query,key,value}`` ``isoo``                   ``self_attn.{q,k,v}_proj``
    ``self_attention/out``               ``isio``                   ``self_attn.o_proj``
    ``mlp/wi_0``, ``mlp/wi_1``           ``iso``                    ``mlp.gate_proj``, ``up_proj``
    ``mlp/wo``                           ``iso``                    ``mlp.down_proj``
    ``token_embedder/embedding``         ``vf``                     ``embed_tokens``
    ``decoder/logits_dense``             ``io``                     ``lm_head``
    ===================================  =========================  ====================

    (each under ``/kernel``). MaxText converts Qwen 3 and Gemma 3 by reshapes alone (the
    defaults). Its Llama converter also multiplies the query kernel by
    ``1/sqrt(head_dim)`` and interleaves query and key features for its RoPE: give
    ``query_scale=head_dim ** -0.5, interleaved_rope=True`` and the updates move the same
    way (``B`` reordered, the scale multiplied; exact up to the rounding of the scale).

    Args:
      scan_axis: the axis of the layers in scanned kernels (MaxText's
        ``param_scan_axis``, 1 by default); None for unscanned trees
        (``decoder/layers_{i}/...``).
      prefix: the module path of the decoder in transformers (``"model"``).
      query_scale: the factor the query kernel holds transformers' ``q_proj`` times.
      interleaved_rope: whether query and key features are interleaved (feature ``2j``
        is transformers' ``j``, ``2j + 1`` is ``j + head_dim / 2``).

    Example:
      >>> maxtext()("params/decoder/layers/mlp/wi_1/kernel")
      'model.layers.{}.mlp.up_proj'
      >>> maxtext().layout_patterns[r"(params/)?decoder/layers/self_attention/out/kernel"]
      'isio'
    """
    if scan_axis is None:
        layer, index, lay = r"(?:params/)?decoder/layers_(?P<i>\d+)/", "{i}", r"layers_\d+"
    else:
        layer, index, lay = r"(?:params/)?decoder/layers/", "{{}}", "layers"
    attn, mlp = f"{prefix}.layers.{index}.self_attn.", f"{prefix}.layers.{index}.mlp."
    projections = {"query": "q", "key": "k", "value": "v", "out": "o"}
    adjusted = {"query": (query_scale, interleaved_rope), "key": (1.0, interleaved_rope)}

    def module(mt: str, hf: str):
        scale, interleaved = adjusted.get(mt, (1.0, False))
        name = _name(attn + f"{hf}_proj")
        if scale == 1.0 and not interleaved:
            return name
        return lambda m: Adjusted(name(m), scale=scale, interleaved=interleaved)

    rules = [
        *(_rule(layer + f"self_attention/{mt}/kernel", module(mt, hf))
          for mt, hf in projections.items()),
        *(_rule(layer + f"mlp/{mt}/kernel", _name(mlp + f"{hf}_proj"))
          for mt, hf in (("wi_0", "gate"), ("wi_1", "up"), ("wo", "down"))),
        _rule(r"(?:params/)?token_embedder/embedding", _name(f"{prefix}.embed_tokens")),
        _rule(r"(?:params/)?decoder/logits_dense/kernel", _name("lm_head")),
    ]

    def scanned(axes: str) -> str:
        return axes if scan_axis is None else axes[:scan_axis] + "s" + axes[scan_axis:]

    root = rf"(params/)?decoder/{lay}/"
    layouts = {
        root + "self_attention/(query|key|value)/kernel": scanned("ioo"),
        root + "self_attention/out/kernel": scanned("iio"),
        root + "mlp/(wi_0|wi_1|wo)/kernel": scanned("io"),
        r"(params/)?token_embedder/embedding": "vf",
        r"(params/)?decoder/logits_dense/kernel": "io",
    }
    return Template(tuple(rules), layouts)
