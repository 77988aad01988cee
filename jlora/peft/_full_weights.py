"""Full weights in a PEFT file: which torch parameter each params leaf is, and the
conversions between the two.

Besides LoRA factors, PEFT saves whole parameters: copies of the ``modules_to_save``
(``<module>.weight``, ``<module>.bias``), the biases that ``bias="all"`` / ``"lora_only"``
trains (``<module>.bias``, or ``<module>.base_layer.bias`` for an adapted module), the
base weights of adapted embedding layers (``save_embedding_layers``:
``<module>.base_layer.weight``) and the rows of ``trainable_token_indices``
(``<module>.token_adapter.trainable_tokens_delta``). A leaf of ``params`` is the torch
parameter ``<module>.<param>``: the module named as its kernel's (see
:mod:`jlora.peft._names`: a bias or norm scale belongs to the kernel beside it), the
parameter ``weight`` for a kernel, an embedding table or a norm's ``scale``, and
``bias`` for a bias. Kernels convert through their layout (torch's ``Linear`` is
``(out, in)``, ``Conv`` ``(out, in, *window)``, ``Embedding`` ``(vocab, features)``);
a leaf beside a stacked kernel is one torch parameter per layer.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping

import jax.numpy as jnp
import numpy as np

from jlora.layouts import Layout
from jlora.peft._format import Names
from jlora.peft._names import _expand, _template, default_module_name
from jlora.peft._tensors import _layer

# flax leaf names -> torch parameter names
_TORCH_PARAM = {"kernel": "weight", "embedding": "weight", "scale": "weight", "bias": "bias"}


@dataclasses.dataclass(frozen=True)
class Slot:
    """Where one torch parameter lives in params.

    ``path``: the leaf; ``index``: the stacked index of its layer; ``layout``: one layer's
    layout for a kernel (None for a vector); ``shape``: one layer's shape in params.
    """

    path: str
    index: tuple
    layout: Layout | None
    shape: tuple


def torch_param(path: str) -> str:
    """The torch parameter name of the leaf at ``path``: ``weight`` for a kernel,
    embedding or norm scale, ``bias`` for a bias, else the leaf's own name."""
    leaf = path.rpartition("/")[2]
    return _TORCH_PARAM.get(leaf, leaf)


def _module_path(path: str) -> str:
    return path.rpartition("/")[0]


def _sibling_kernel(path: str, kernels: Mapping[str, tuple]) -> str | None:
    parent = _module_path(path)
    found = [k for k in kernels if _module_path(k) == parent and k != path]
    preferred = [k for k in found if k.rpartition("/")[2] in ("kernel", "embedding")]
    return (preferred or found or [None])[0]


def _vector_name(path: str, names: Names) -> str | None:
    """The module name of a leaf with no kernel beside it: the user's, else the default
    (the leaf's module path, named like a kernel there)."""
    name = names(path) if callable(names) else (names or {}).get(path)
    if name is not None:
        return name
    parent = _module_path(path)
    return default_module_name(parent + "/kernel") if parent else None


def slot_table(flat: Mapping, kernels: Mapping[str, tuple], names: Names) -> dict[str, Slot]:
    """``{"<module>.<param>": Slot}`` for every floating leaf of params that PEFT can name.

    ``kernels`` is ``{path: (leaf, layout)}`` of the leaves with a known layout.
    Two leaves with the same torch name keep the first (in params order).
    """
    table: dict[str, Slot] = {}
    for path, leaf in flat.items():
        dtype = getattr(leaf, "dtype", None)
        if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
            continue
        shape = tuple(leaf.shape)
        if path in kernels:
            layout = kernels[path][1]
            inner, layer_shape, stacked = _layer(layout, shape)
            template = _template(path, layout.num_stacked, names)
            slots = [(idx, name, Slot(path, idx, inner, layer_shape))
                     for idx, name in _expand(path, template, stacked)]
        else:
            sibling = _sibling_kernel(path, kernels)
            slots = []
            if sibling is not None:
                layout = kernels[sibling][1]
                stacked, _, fan_out = layout.split_shape(kernels[sibling][0].shape)
                if shape == (*stacked, *fan_out):
                    template = _template(sibling, layout.num_stacked, names)
                    slots = [(idx, name, Slot(path, idx, None, tuple(fan_out)))
                             for idx, name in _expand(sibling, template, stacked)]
            if not slots and len(shape) <= 1:
                name = _vector_name(path, names)
                slots = [((), name, Slot(path, (), None, shape))] if name else []
        for _, name, slot in slots:
            table.setdefault(f"{name}.{torch_param(path)}", slot)
    return table


# -- one layer of a leaf <-> the torch tensor ------------------------------------------


def torch_shape(slot: Slot) -> tuple[int, ...]:
    """The torch tensor's shape for one slot."""
    if slot.layout is None:
        return (math.prod(slot.shape),) if slot.shape else ()
    _, fan_in, fan_out = slot.layout.split_shape(slot.shape)
    if slot.layout.kind == "embed":
        return (math.prod(fan_in), math.prod(fan_out))
    if slot.layout.kind == "conv":
        window = tuple(slot.shape[i] for i in slot.layout.window_axes)
        return (math.prod(fan_out), slot.shape[slot.layout.axes.index("i")], *window)
    return (math.prod(fan_out), math.prod(fan_in))


def _conv_order(layout: Layout) -> tuple[int, ...]:
    """The kernel axes in torch's conv order ``(out, in, *window)``."""
    return (layout.axes.index("o"), layout.axes.index("i"), *layout.window_axes)


def to_torch(slot: Slot, x):
    """One layer of a leaf (``x``, in params' layout) as the torch tensor (jnp, traceable)."""
    if slot.layout is None:
        return x.reshape(torch_shape(slot))
    if slot.layout.kind == "conv":
        return jnp.transpose(x, _conv_order(slot.layout))
    matrix = slot.layout.to_matrix(x)
    return matrix if slot.layout.kind == "embed" else matrix.T


def from_torch(slot: Slot, tensor: np.ndarray, what: str) -> np.ndarray:
    """The inverse of :func:`to_torch` (numpy); ``what`` names the tensor in errors."""
    want = torch_shape(slot)
    if tuple(tensor.shape) != want:
        hint = (" (is `layouts=` right for this kernel?)"
                if slot.layout is not None and sorted(tensor.shape) == sorted(want) else "")
        raise ValueError(
            f"{what} has shape {tuple(tensor.shape)} but the leaf at path {slot.path!r}"
            + (f" (stacked index {slot.index})" if slot.index else "")
            + f" with shape {slot.shape} needs {want}{hint}."
        )
    x = np.asarray(tensor)
    if slot.layout is None:
        return x.reshape(slot.shape)
    if slot.layout.kind == "conv":
        return np.transpose(x, np.argsort(_conv_order(slot.layout)))
    matrix = x if slot.layout.kind == "embed" else x.T
    return np.asarray(slot.layout.from_matrix(matrix, slot.shape))


def vocab_axis(layout: Layout) -> int:
    """The axis of a 2-D table that indexes tokens: an embedding's vocabulary, an output
    projection's outputs."""
    return layout.axes.index("v") if layout.kind == "embed" else layout.axes.index("o")
