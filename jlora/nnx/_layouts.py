"""Kernel layouts of NNX modules, read from the modules themselves.

``apply_lora`` runs no forward pass, so it reads each targeted kernel's layout from the
module that owns it:

=========================  ===================================================  =========
module                     kernel                                               layout
=========================  ===================================================  =========
``nnx.Linear``             ``(in, out)``                                        ``io``
``nnx.LinearGeneral``      ``(*batch_axis, *in_features, *out_features)``       ``s..i..o..``
``nnx.Conv``               ``(*kernel_size, in, out)``                          ``w..io``
``nnx.ConvTranspose``      ``(*kernel_size, in, out)`` (checked, see below)     ``w..io``
``nnx.Embed``              ``embedding (vocab, features)``                      ``vf``
``nnx.Einsum``             from its ``einsum_str`` (checked, see below)         e.g. ``ioo``
=========================  ===================================================  =========

A module of another class that stores an ``einsum_str`` (as Tunix's ``Einsum`` does)
gets the layout its string implies for ``einsum(einsum_str, x, kernel)``; a kernel with
more leading axes than its module implies (layers stacked with ``nnx.vmap``) gets them as
stacked axes. Both are guesses, and like jlora's other guesses (from shapes and names,
:func:`jlora.layouts.infer_layout`) they are checked against the model's own use of the
kernel on the first call: a contradiction is a :class:`~jlora.LayoutError`, never a
silently transposed update. ``LoraConfig(layouts=...)`` overrides all of them, and
:func:`infer_layouts` reads every layout from a model and sample inputs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from flax import nnx

from jlora._layout_inference import infer_layouts as _infer_layouts
from jlora.layouts import Layout
from jlora.nnx._call import own_calls

# The variables that can be adapted: parameters, but no LoRA factors (jlora's or flax's).
KERNELS = nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam))

__all__ = ["KERNELS", "einsum_layout", "infer_layouts", "module_layouts"]


def einsum_layout(einsum_str: str) -> str | None:
    """The layout of the second operand of ``einsum(einsum_str, x, kernel)``, or None
    when the string does not describe one (no explicit output, an ellipsis, a kernel axis
    summed away on its own).

    Example:
      >>> einsum_layout("BTD,DNH->BTNH"), einsum_layout("BTNH,NHD->BTD")
      ('ioo', 'iio')
      >>> einsum_layout("...D,DF->...F") is None
      True
    """
    spec = einsum_str.replace(" ", "")
    if "->" not in spec or "." in spec:
        return None
    inputs, out = spec.split("->")
    operands = inputs.split(",")
    if len(operands) != 2:
        return None
    x, kernel = operands
    axes = []
    for letter in kernel:
        if letter in x and letter in out:
            axes.append("s")
        elif letter in x:
            axes.append("i")
        elif letter in out:
            axes.append("o")
        else:
            return None
    layout = "".join(axes)
    return layout if "i" in layout and "o" in layout else None


def _own_layout(module: Any, attr: str) -> tuple[str, tuple | None, bool] | None:
    """``(layout, expected shape or None, guessed)`` that ``module``'s class gives its
    kernel ``attr``, or None when it says nothing."""
    if isinstance(module, nnx.Embed) and attr == "embedding":
        return "vf", (module.num_embeddings, module.features), False
    if isinstance(module, nnx.Linear) and attr == "kernel":
        return "io", (module.in_features, module.out_features), False
    if isinstance(module, nnx.LinearGeneral) and attr == "kernel":
        batch, fan_in, fan_out = (tuple(module.batch_axis.values()), module.in_features,
                                  module.out_features)
        layout = "s" * len(batch) + "i" * len(fan_in) + "o" * len(fan_out)
        return layout, (*batch, *fan_in, *fan_out), False
    if isinstance(module, nnx.ConvTranspose) and attr == "kernel":
        # lax.conv_transpose: checked against the model's use like any guess.
        window = "w" * len(module.kernel_size)
        return window + ("oi" if module.transpose_kernel else "io"), None, True
    if isinstance(module, nnx.Conv) and attr == "kernel":
        return "w" * len(module.kernel_size) + "io", tuple(module.kernel_shape), False
    einsum_str = getattr(module, "einsum_str", None)
    if isinstance(einsum_str, str):
        # nnx.Einsum takes a per-call einsum_str too, and other classes only look like
        # it: always a guess.
        layout = einsum_layout(einsum_str)
        if layout is not None:
            return layout, None, True
    return None


def module_layouts(kernels: Mapping[str, tuple[Any, str, Sequence[int]]]) -> dict[str, Layout]:
    """``{path: Layout}`` for the kernels whose owning module says how they are laid out.

    ``kernels`` maps each path to ``(owning module, attribute name, kernel shape)``.
    Kernels the module says nothing about, or whose shape contradicts it, are left out
    (jlora's own inference, or an error asking for ``LoraConfig.layouts``, takes over).

    Example:
      >>> from flax import nnx
      >>> lin = nnx.Linear(4, 3, rngs=nnx.Rngs(0))
      >>> module_layouts({"lin/kernel": (lin, "kernel", (2, 4, 3))})
      {'lin/kernel': Layout('sio', guessed=True)}
    """
    out = {}
    for path, (module, attr, shape) in kernels.items():
        own = _own_layout(module, attr)
        if own is None:
            continue
        axes, expected, guessed = own
        extra = len(shape) - len(axes)
        if extra < 0 or (expected is not None and tuple(shape[extra:]) != tuple(expected)):
            continue
        # Leading axes the module does not make: layers stacked by nnx.vmap (a guess).
        out[path] = Layout("s" * extra + axes, guessed=guessed or extra > 0)
    return out


def infer_layouts(model, *args, **kwargs) -> dict[str, str]:
    """Every kernel's layout, read from how ``model(*args, **kwargs)`` uses it.

    :func:`jlora.infer_layouts` on the model's own call: one abstract trace (shapes only,
    no FLOPs; ``args`` may be ``jax.ShapeDtypeStruct`` s). The result, keyed by the
    paths of ``nnx.state(model)``, goes into ``LoraConfig(layouts=...)`` as it is, for
    kernels no rule above describes (einsum weights of other classes, embedding tables
    not named ``embedding``).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from flax import nnx
      >>> import jlora
      >>> model = nnx.Einsum("btd,dnh->btnh", (8, 2, 4), rngs=nnx.Rngs(0))
      >>> jlora.nnx.infer_layouts(model, jax.ShapeDtypeStruct((1, 3, 8), jnp.float32))
      {'kernel': 'ioo'}
    """
    graphdef, params, rest = nnx.split(model, KERNELS, ...)

    def call(params, *args, **kwargs):
        with own_calls():  # the model as it is, without its adapters
            return nnx.merge(graphdef, params, rest)(*args, **kwargs)

    return _infer_layouts(call, params, *args, **kwargs)
