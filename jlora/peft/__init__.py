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
silently drop the others); the layers of a stacked kernel that the file leaves out get
zero factors, and :func:`save` leaves such layers out. Config fields that change what
the factors mean in ways jlora cannot reproduce (LoftQ, PiSSA/OLoRA/CorDA/LoRA-GA inits,
QA-LoRA, aLoRA, ...) are refused with an error naming the field; an unknown field is
accepted only while it is off (``None``, ``False`` or empty).

**Trained weights beside the factors** (``modules_to_save``, ``bias``, ``lora_bias``,
``trainable_token_indices``, ``save_embedding_layers``): :func:`load_trainable` reads
them as :func:`jlora.split_trainable`'s ``(trainable, frozen)``, with
:class:`LoraBias` and :class:`TrainableTokens` for the two that train part of a frozen
leaf; :func:`save` writes such a ``trainable``. :func:`load` accepts them only where
they repeat the base.

**Other codebases.** A ``names=`` entry may also be a :class:`Split` (one kernel that
holds several PEFT modules, e.g. the ``gemma`` package's ``kv_einsum``), a :class:`Part`
(one of several kernels that make one PEFT module, e.g. GPT-2's ``c_attn``) or a
:class:`TargetParameter` (expert weights PEFT adapts with ``target_parameters``);
:mod:`jlora.peft.templates` gives transformers' names for the ``gemma`` package's,
Tunix's and MaxText's trees. :func:`convert_to_original_base` and
:func:`to_original_base` turn PiSSA, OLoRA and CorDA adapters into plain ones.

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

from jlora._leaf_updates import LoraBias as LoraBias
from jlora._leaf_updates import TrainableTokens as TrainableTokens
from jlora.peft import templates as templates
from jlora.peft._conversion import convert_to_original_base as convert_to_original_base
from jlora.peft._conversion import to_original_base as to_original_base
from jlora.peft._format import CONFIG_NAME as CONFIG_NAME
from jlora.peft._format import PREFIX as PREFIX
from jlora.peft._format import WEIGHTS_NAME as WEIGHTS_NAME
from jlora.peft._fused import Part as Part
from jlora.peft._fused import Split as Split
from jlora.peft._load import load as load
from jlora.peft._names import default_module_name as default_module_name
from jlora.peft._names import get_pattern_key as get_pattern_key
from jlora.peft._save import export as export
from jlora.peft._save import save as save
from jlora.peft._target_parameters import TargetParameter as TargetParameter
from jlora.peft._trainable import load_trainable as load_trainable

__all__ = [
    "CONFIG_NAME",
    "LoraBias",
    "PREFIX",
    "Part",
    "Split",
    "TargetParameter",
    "TrainableTokens",
    "WEIGHTS_NAME",
    "convert_to_original_base",
    "default_module_name",
    "export",
    "get_pattern_key",
    "load",
    "load_trainable",
    "save",
    "templates",
    "to_original_base",
]
