"""Kernel layouts: parsing, inference for flax's own modules, and explicit overrides."""

import re

import pytest

from jlora.layouts import Layout, LayoutError, infer_layout, resolve_layout


@pytest.mark.parametrize(
    "axes, kind, fan_in, fan_out, stacked",
    [
        ("io", "dense", (0,), (1,), 0),
        ("ioo", "dense", (0,), (1, 2), 0),
        ("iio", "dense", (0, 1), (2,), 0),
        ("wio", "conv", (0, 1), (2,), 0),
        ("wwio", "conv", (0, 1, 2), (3,), 0),
        ("wwwio", "conv", (0, 1, 2, 3), (4,), 0),
        ("vf", "embed", (0,), (1,), 0),
        ("ssio", "dense", (2,), (3,), 2),
        ("swwio", "conv", (1, 2, 3), (4,), 1),
    ],
)
def test_layout_roles(axes, kind, fan_in, fan_out, stacked):
    lay = Layout(axes)
    assert (lay.kind, lay.fan_in_axes, lay.fan_out_axes, lay.num_stacked) == (
        kind, fan_in, fan_out, stacked)


@pytest.mark.parametrize("bad", ["", "oi", "is", "iwo", "wwoi", "vff", "x", "sio s"])
def test_invalid_layouts(bad):
    with pytest.raises(LayoutError, match="Invalid layout"):
        Layout(bad)


def test_factor_shapes_and_max_rank():
    lay = Layout("sswwio")
    shape = (2, 3, 5, 5, 4, 8)
    assert lay.factor_shapes(shape, 6) == ((2, 3, 5, 5, 4, 6), (2, 3, 6, 8))
    assert lay.max_rank(shape) == 8
    assert Layout("iio").max_rank((4, 8, 16)) == 16


@pytest.mark.parametrize(
    "path, shape, axes",
    [
        ("dense/kernel", (4, 8), "io"),
        ("embed/embedding", (100, 16), "vf"),
        ("attn/query/kernel", (16, 4, 8), "ioo"),
        ("attn/key/kernel", (16, 4, 8), "ioo"),
        ("attn/value/kernel", (16, 4, 8), "ioo"),
        ("attn/out/kernel", (4, 8, 16), "iio"),
        ("Conv_0/kernel", (3, 8, 16), "wio"),
        ("conv/kernel", (3, 3, 8, 16), "wwio"),
        ("MyConv3D/kernel", (3, 3, 3, 8, 16), "wwwio"),
    ],
)
def test_inference_for_flax_modules(path, shape, axes):
    assert infer_layout(path, shape).axes == axes


def test_ambiguous_kernel_asks_for_a_layout():
    with pytest.raises(LayoutError, match=r"'layers/mlp/kernel' with shape \(4, 8, 16\)"):
        infer_layout("layers/mlp/kernel", (4, 8, 16))


def test_resolve_with_patterns_first_match_wins_and_partial_stacked():
    patterns = [(re.compile(r"layers/attn/.*"), "s..."), (re.compile(r"layers/.*"), "sio")]
    assert resolve_layout("layers/attn/query/kernel", (2, 16, 4, 8), patterns).axes == "sioo"
    assert resolve_layout("layers/mlp/kernel", (2, 8, 16), patterns).axes == "sio"
    assert resolve_layout("head/kernel", (8, 16), patterns).axes == "io"
    with pytest.raises(LayoutError, match=r"'layers/mlp/kernel' has shape \(8, 16\).*'sio'"):
        resolve_layout("layers/mlp/kernel", (8, 16), patterns)
