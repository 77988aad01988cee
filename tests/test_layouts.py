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
        # any axis order: GPT-2's FlaxConv1D, gemma's einsums, MaxText's scanned stacks
        ("oi", "dense", (1,), (0,), 0),
        ("oio", "dense", (1,), (0, 2), 0),
        ("soio", "dense", (2,), (1, 3), 1),
        ("isoo", "dense", (0,), (2, 3), 1),
        ("oiww", "conv", (1, 2, 3), (0,), 0),
        ("fv", "embed", (1,), (0,), 0),
    ],
)
def test_layout_roles(axes, kind, fan_in, fan_out, stacked):
    lay = Layout(axes)
    assert (lay.kind, lay.fan_in_axes, lay.fan_out_axes, lay.num_stacked) == (
        kind, fan_in, fan_out, stacked)


@pytest.mark.parametrize(
    "bad, why",
    [
        ("", "non-empty"), ("is", "at least one fan-in"), ("oos", "at least one fan-in"),
        ("ss", "at least one fan-in"), ("wwo", "exactly one 'i'"), ("wiio", "exactly one 'i'"),
        ("vff", "exactly one 'v'"), ("vfi", "exactly one 'v'"), ("x", "unknown letter"),
        ("sio s", "unknown letter"), (None, "non-empty string"),
    ],
)
def test_invalid_layouts(bad, why):
    with pytest.raises(LayoutError, match=f"Invalid layout.*{why}"):
        Layout(bad)


@pytest.mark.parametrize("axes, shape", [
    ("io", (3, 5)), ("oi", (5, 3)), ("oio", (2, 3, 4)), ("isoo", (3, 2, 4, 5)),
    ("soio", (2, 3, 4, 5)), ("oiww", (4, 3, 2, 2)), ("fv", (4, 7)), ("ossi", (2, 3, 1, 5)),
])
def test_matrix_view_round_trip_and_product_in_kernel_order(axes, shape):
    import numpy as np

    lay = Layout(axes)
    kernel = np.arange(np.prod(shape), dtype=np.float32).reshape(shape)
    stacked, fan_in, fan_out = lay.split_shape(shape)
    matrix = np.asarray(lay.to_matrix(kernel))
    assert matrix.shape == (*stacked, int(np.prod(fan_in)), int(np.prod(fan_out)))
    np.testing.assert_array_equal(np.asarray(lay.from_matrix(matrix, shape)), kernel)
    assert lay.kernel_shape(stacked, fan_in, fan_out) == shape
    # A @ B lands on the kernel's own axes: entry (stacked, fan-in, fan-out) of the
    # canonical product is the kernel entry at those axis positions.
    a_shape, b_shape = lay.factor_shapes(shape, 2)
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=a_shape), rng.normal(size=b_shape)
    ns = len(stacked)
    canonical = np.einsum("...ir,...ro->...io", a.reshape(*stacked, -1, 2),
                          b.reshape(*stacked, 2, -1)).reshape(*stacked, *fan_in, *fan_out)
    expected = np.zeros(shape)
    for idx in np.ndindex(*shape):
        expected[idx] = canonical[tuple(idx[k] for k in lay.canonical_order)]
    got = np.asarray(lay.product(a.astype(np.float32), b.astype(np.float32)))
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    assert ns == lay.num_stacked


def test_guessed_layouts_are_marked_but_compare_equal():
    guessed = infer_layout("dense/kernel", (4, 8))
    assert guessed.guessed and guessed == Layout("io") and hash(guessed) == hash(Layout("io"))
    assert not resolve_layout("dense/kernel", (4, 8), [(re.compile(".*"), "oi")]).guessed
    # the keys jlora.infer_layouts returns are paths, matched literally
    assert resolve_layout("h/0/c_proj/kernel", (8, 8), [(re.compile("h/0/c_proj/kernel"), "oi")]
                          ).axes == "oi"


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
