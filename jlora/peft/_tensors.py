"""jlora factors <-> PEFT tensors, through the kernel's layout; and reading a PEFT
directory."""

from __future__ import annotations

import math
import pathlib

import jax.numpy as jnp
import numpy as np

from jlora._files import (
    interrupted_copy,
    read_json,
    read_safetensors,
    remove_stale_temporaries,
)
from jlora.layouts import Layout
from jlora.peft._format import CONFIG_NAME, WEIGHTS_NAME

# -- tensors: jlora factors <-> PEFT tensors --------------------------------------------


def _layer(layout: Layout, shape) -> tuple[Layout, tuple[int, ...], tuple[int, ...]]:
    """``(layout, shape, stacked sizes)`` of one layer of a kernel (its stacked axes, wherever
    they are, indexed away): PEFT has one module per layer."""
    stacked, fan_in, fan_out = layout.split_shape(shape)
    inner = layout.unstacked(layout.num_stacked)
    return inner, inner.kernel_shape((), fan_in, fan_out), stacked


def _peft_shapes(layout: Layout, kernel_shape: tuple[int, ...], rank: int) -> dict:
    """PEFT's tensor shapes for one unstacked kernel: ``{"A", "B", "M"}`` and the keys."""
    _, fan_in, fan_out = layout.split_shape(kernel_shape)
    if layout.kind == "embed":
        (vocab,), (dim,) = fan_in, fan_out
        return dict(A=(rank, vocab), B=(dim, rank), M=(dim,),
                    a_key="lora_embedding_A", b_key="lora_embedding_B")
    if layout.kind == "conv":
        window = tuple(kernel_shape[i] for i in layout.window_axes)
        cin, (cout,) = kernel_shape[layout.axes.index("i")], fan_out
        ones = (1,) * len(window)
        return dict(A=(rank, cin, *window), B=(cout, rank, *ones), M=(1, cout, *ones),
                    a_key="lora_A.weight", b_key="lora_B.weight")
    return dict(A=(rank, math.prod(fan_in)), B=(math.prod(fan_out), rank),
                M=(math.prod(fan_out),), a_key="lora_A.weight", b_key="lora_B.weight")


def _conv_a_axes(layout: Layout) -> tuple[int, ...]:
    """For each axis of a conv's ``A`` (its fan-in axes in the kernel's order, then the
    rank), the matching axis of PEFT's ``lora_A (r, in, *window)``."""
    out, window = [], 2
    for k in layout.fan_in_axes:
        if layout.axes[k] == "i":
            out.append(1)
        else:
            out.append(window)
            window += 1
    return (*out, 0)


def _to_peft(layout: Layout, a, b, m) -> tuple:
    """One unstacked kernel's ``(A, B, magnitude)`` in PEFT's layout (jnp: traceable)."""
    rank = a.shape[-1]
    if layout.kind == "conv":
        nw = len(layout.window_axes)
        big_a = jnp.transpose(a, tuple(np.argsort(_conv_a_axes(layout))))
        big_b = b.T.reshape(b.shape[1], rank, *([1] * nw))
        mag = None if m is None else m.reshape(1, -1, *([1] * nw))
    else:  # dense and embedding: flatten the fan axes, then transpose
        big_a = a.reshape(-1, rank).T
        big_b = b.reshape(rank, -1).T
        mag = None if m is None else m.reshape(-1)
    return big_a, big_b, mag


def _from_peft(layout: Layout, kernel_shape, big_a, big_b, mag) -> tuple:
    """The inverse of :func:`_to_peft` for one unstacked kernel of ``kernel_shape``."""
    _, fan_in, fan_out = layout.split_shape(kernel_shape)
    rank = big_a.shape[0]
    if layout.kind == "conv":
        a = np.transpose(big_a, _conv_a_axes(layout))
        b = big_b.reshape(big_b.shape[0], rank).T
    else:
        a = big_a.T.reshape(*fan_in, rank)
        b = big_b.T.reshape(rank, *fan_out)
    m = None if mag is None else mag.reshape(fan_out)
    return np.ascontiguousarray(a), np.ascontiguousarray(b), m


# -- files ------------------------------------------------------------------------------


def _read_dir(path) -> tuple[dict, dict[str, np.ndarray], dict[str, str], str]:
    directory = pathlib.Path(path)
    remove_stale_temporaries(directory)  # what saves killed part-way left beside it
    config_file = directory / CONFIG_NAME
    weights_file = directory / WEIGHTS_NAME
    if not config_file.is_file():
        leftover = interrupted_copy(directory)
        raise FileNotFoundError(
            f"No PEFT adapter at {str(directory)!r}: no {CONFIG_NAME} there."
            + (f" A save there was interrupted; the previous complete adapter is at "
               f"{str(leftover)!r}." if leftover is not None else "")
        )
    if not weights_file.is_file():
        legacy = (directory / "adapter_model.bin").is_file()
        raise FileNotFoundError(
            f"No {WEIGHTS_NAME} in {str(directory)!r}"
            + (" (only the pickled adapter_model.bin, which jlora does not unpickle: re-save it "
               "with PEFT's save_pretrained(safe_serialization=True))" if legacy else "") + "."
        )
    config = read_json(config_file)
    tensors, metadata = read_safetensors(weights_file)  # bfloat16 and float8 too
    return config, tensors, metadata, str(weights_file)
