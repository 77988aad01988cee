"""Reading each kernel's layout from how a model uses it: :func:`infer_layouts`.

A layout (see :mod:`jlora.layouts`) says what the model does with each kernel axis. A
shape alone cannot tell ``(in, out)`` from ``(out, in)``, a head axis from a layer axis,
or a table from a projection; the model's program can. :func:`infer_layouts` traces
``fn(params, *args, **kwargs)`` once, on shapes only (a jaxpr, no FLOPs), and follows each
floating leaf with two or more axes through the program to the operations that consume
it:

* ``dot_general`` (``@``, ``einsum``, ``nn.Dense``): on the kernel's side, contracted axes
  are fan-in ``i``, batch axes stacked ``s``, the others fan-out ``o``;
  ``ragged_dot`` (mixture-of-experts) the same, its group axis stacked;
* ``conv_general_dilated``: the filter's spatial axes ``w``, its input-feature axis ``i``,
  its output-feature axis ``o``;
* a ``gather`` of whole rows of a 2-D table (``table[ids]``): the indexed axis ``v``, the
  other ``f``. The same table also used as ``x @ table.T`` (tied embeddings) stays ``vf``;
* an axis that a ``scan`` slices, or that is indexed away before the kernel reaches its
  consumer (``W[i]``, ``k_w, v_w = W[0], W[1]``), is stacked ``s``; so is a fan-out axis
  along which the model unpacks the dot's output (``k, v = jnp.einsum("BSD,CKDH->CBSKH",
  x, w)``, as the ``gemma`` package does), as long as another fan-out axis remains. A
  piece of a split axis (a fused QKV kernel reshaped to ``(..., 3, heads, head_dim)``)
  indexed away stays fan-out: the fused kernel gets one adapter, as in PEFT.

On the way it follows casts, copies, sharding constraints, ``checkpoint_name``,
transposes, reshapes (a merged axis gives its role to every kernel axis in it, a split
gives the role to every piece), squeezes, broadcasts, slices, ``rev``, ``split``,
``concatenate``, elementwise ops with a scalar or broadcast operand (``W * 2``) and the
bodies of ``jit``, ``checkpoint``, ``custom_jvp``/``custom_vjp`` functions, ``cond``
(every branch), ``while`` and ``scan``.

When shape inference is enough, and when to call :func:`infer_layouts`:

* Flax's own modules (``nn.Dense``, ``nn.DenseGeneral`` with default axes, attention,
  ``nn.Conv``, ``nn.Embed`` and their NNX versions) store kernels as
  :func:`jlora.layouts.infer_layout` guesses, and ``jlora.lora`` checks each guess against
  the model's use on its first call (:func:`check_guessed_layouts`): nothing to do.
* Everything else: einsum kernels (``gemma``, Tunix), kernels stored ``(out, in)``
  (transformers' ``FlaxConv1D``), scanned stacks (whatever the scan axis), embeddings not
  named ``embedding``. Call ``jlora.infer_layouts(fn, params, *args)`` once and pass its
  result as ``LoraConfig(layouts=...)``; its layouts are read, not guessed.

A kernel used in two incompatible ways is a :class:`jlora.LayoutError` naming both uses
and their source lines. Leaves whose layout the program does not show (never used, or
reaching only operations such as a reduction) get no entry and are listed in one
:class:`LayoutInferenceWarning` per call. Leaves only ever added to, multiplied with
or concatenated to activations (biases, norm scales, positional tables, a class token)
are not kernels and are left out silently, as are 1-D leaves.

Example:
  >>> import jax, jax.numpy as jnp
  >>> params = {"proj": {"kernel": jax.ShapeDtypeStruct((16, 8), jnp.float32)}}
  >>> infer_layouts(lambda p, x: x @ p["proj"]["kernel"].T, params, jnp.ones((2, 8)))
  {'proj/kernel': 'oi'}
"""

from jlora._layout_inference._check import check_guessed_layouts as check_guessed_layouts
from jlora._layout_inference._check import check_layout as check_layout
from jlora._layout_inference._check import read_kernel_uses as read_kernel_uses
from jlora._layout_inference._infer import InferredLayouts as InferredLayouts
from jlora._layout_inference._infer import infer_layouts as infer_layouts
from jlora._layout_inference._reader import reshape_groups as reshape_groups
from jlora._layout_inference._uses import KernelUses as KernelUses
from jlora._layout_inference._uses import LayoutInferenceWarning as LayoutInferenceWarning
from jlora._layout_inference._uses import Use as Use

__all__ = [
    "InferredLayouts",
    "KernelUses",
    "LayoutInferenceWarning",
    "Use",
    "check_guessed_layouts",
    "check_layout",
    "infer_layouts",
    "read_kernel_uses",
    "reshape_groups",
]
