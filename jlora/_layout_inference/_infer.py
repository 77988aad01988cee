"""``infer_layouts``: trace ``fn`` on shapes and read every kernel's layout."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping, Sequence

import jax.numpy as jnp

from jlora import _tracing as tracing
from jlora._layout_inference._check import _read
from jlora._layout_inference._uses import LayoutInferenceWarning


class InferredLayouts(dict):
    """``{path: layout string}``, as :func:`infer_layouts` read them.

    Attributes:
      unconsumed: paths of floating leaves with two or more axes whose layout the
        function does not show (see the warning for why, per path).
      uses: ``{path: [where and how the function consumes the kernel]}``.
    """

    def __init__(self, layouts=(), *, unconsumed: Sequence[str] = (),
                 uses: Mapping[str, list[str]] | None = None):
        super().__init__(layouts)
        self.unconsumed = list(unconsumed)
        self.uses = dict(uses or {})


def _is_candidate(path: str, aval) -> bool:
    return len(aval.shape) >= 2 and jnp.issubdtype(aval.dtype, jnp.floating)


def infer_layouts(fn: Callable, params, *args, **kwargs) -> InferredLayouts:
    """Read the layout of every kernel in ``params`` from how ``fn`` uses it.

    Traces ``fn(params, *args, **kwargs)`` once to a jaxpr, without computing anything:
    ``params`` and the arguments may be ``jax.ShapeDtypeStruct`` trees (a 7B model's
    shapes are read in about a second), arrays or tracers (it works under ``jax.jit`` and
    ``jax.eval_shape``). Leaves that are not arrays stay static, as in a plain call. A
    quantized kernel (:mod:`jlora.quantization`) stands for its float kernel, as in
    :func:`jlora.lora`, so unchanged model code reads it. See the module docstring for
    what gives each role and when a call is needed.

    Args:
      fn: the model, called as ``fn(params, *args, **kwargs)``.
      params: the parameter pytree (linen variables, an NNX state, any dict).
      *args: the model's inputs, or their shapes as ``jax.ShapeDtypeStruct``.
      **kwargs: keyword inputs.

    Returns:
      An :class:`InferredLayouts`: ``{path: layout string}`` for every floating leaf with
      two or more axes that ``fn`` consumes as a kernel, ready for
      ``LoraConfig(layouts=...)``. ``.uses`` says where each layout was read;
      ``.unconsumed`` lists leaves whose layout ``fn`` does not show, also reported in one
      :class:`LayoutInferenceWarning`.

    Raises:
      LayoutError: a kernel used in two incompatible ways, naming both uses.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> params = {"q_einsum": {"w": jax.ShapeDtypeStruct((4, 16, 8), jnp.bfloat16)}}
      >>> fn = lambda p, x: jnp.einsum("BTD,NDH->BTNH", x, p["q_einsum"]["w"])
      >>> infer_layouts(fn, params, jax.ShapeDtypeStruct((2, 5, 16), jnp.bfloat16))
      {'q_einsum/w': 'oio'}
    """
    traced, _ = tracing.trace(fn, None, params, args, kwargs)
    # A quantized kernel traced as its arrays carries its own layout: nothing to read.
    input_paths = [None if part else path
                   for path, part in zip(traced.param_paths, traced.param_parts, strict=True)]
    kernels = _read(traced.closed.jaxpr, input_paths, _is_candidate)
    layouts, uses, unread = {}, {}, {}
    for kernel in kernels:
        if kernel.uses:
            uses[kernel.path] = [str(u) for u in kernel.uses]
        axes, why = kernel.layout()
        if axes:
            layouts[kernel.path] = axes
        elif kernel.uses or kernel.hidden_by or not kernel.combined:
            unread[kernel.path] = why
    if unread:
        listed = "; ".join(f"{path!r}: {why}" for path, why in unread.items())
        warnings.warn(
            f"infer_layouts read no layout for {len(unread)} floating leaf(s) with two or "
            f"more axes, which get no entry: {listed}. To adapt one of them, call fn on "
            "arguments that use it, or give its layout in `LoraConfig(layouts=...)`.",
            LayoutInferenceWarning,
            stacklevel=2,
        )
    return InferredLayouts(layouts, unconsumed=list(unread), uses=uses)
