"""Property-based tests over random kernels: dense, conv and embedding kernels with 0-2
stacked axes, their axes in any order, LoRA and DoRA, random ranks, alphas and policies.

The reference is numpy working from the layout model alone: the kernel transposed to
(stacked, fan-in, fan-out), each group in the kernel's own order, is
``W + s·A@B`` with ``A: (*stacked, *fan_in, r)`` and ``B: (*stacked, r, *fan_out)``
(DoRA: ``m·V/‖V‖``, the norm over the fan-in axes), transposed back.

Runtime: every array shape is a new compile, so shapes come from small ranges and each
example compiles one jitted function per check.
"""

import dataclasses
import math
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

import jlora

POLICIES = ["standard", "rslora", lambda r, a: a / (r + 1)]
FAN_IN, FAN_OUT = "iwv", "of"


@dataclasses.dataclass(frozen=True)
class Case:
    """One random kernel and its adapter's static fields."""

    axes: str
    shape: tuple
    rank: int
    alpha: float
    policy: object
    variant: str
    seed: int

    @property
    def kind(self):
        return "conv" if "w" in self.axes else "embed" if "v" in self.axes else "dense"

    @property
    def groups(self):
        """Positions of the stacked, fan-in and fan-out axes, each in the kernel's order."""
        return tuple([k for k, c in enumerate(self.axes) if c in group]
                     for group in ("s", FAN_IN, FAN_OUT))

    @property
    def scale(self):
        """alpha / r, alpha / sqrt(r) (rsLoRA) or the custom policy's value."""
        if self.policy == "standard":
            return self.alpha / self.rank
        if self.policy == "rslora":
            return self.alpha / math.sqrt(self.rank)
        return self.policy(self.rank, self.alpha)


@st.composite
def cases(draw, kinds=("dense", "conv", "embed"), variants=("lora", "dora")):
    """A random kernel: dense (1-2 fan-in, 1-2 fan-out axes), conv (1-2 window axes) or
    embedding, with 0-2 stacked axes, its axes in a random order."""
    kind = draw(st.sampled_from(kinds))
    if kind == "dense":
        core = "i" * draw(st.integers(1, 2)) + "o" * draw(st.integers(1, 2))
    elif kind == "conv":
        core = "w" * draw(st.integers(1, 2)) + "io"
    else:
        core = "vf"
    letters = "s" * draw(st.integers(0, 2)) + core
    order = draw(st.permutations(range(len(letters))))
    axes = "".join(letters[k] for k in order)
    # Small sizes (1 included: unit axes are where squeezes go wrong); windows of 1-3.
    shape = tuple(draw(st.integers(1, 3 if c in "sw" else 4)) for c in axes)
    max_rank = jlora.Layout(axes).max_rank(shape)
    rank = draw(st.integers(1, min(max_rank, 3)))
    alpha = draw(st.floats(0.25, 64.0))
    return Case(axes, shape, rank, alpha, draw(st.sampled_from(POLICIES)),
                draw(st.sampled_from(variants)), draw(st.integers(0, 2**16)))


# Always run, whatever the random draws: a conv in torch's (out, in, kh, kw) order behind a
# stacked axis, an embedding stored (features, layers, vocab), both DoRA, and a dense
# kernel with MaxText's scan axis second.
EXAMPLES = [Case("soiww", (2, 3, 2, 2, 2), 2, 3.0, "rslora", "dora", 1),
            Case("fsv", (3, 2, 5), 2, 2.0, "standard", "dora", 2),
            Case("isoo", (4, 2, 2, 3), 2, 8.0, "standard", "lora", 3)]


def with_examples(test):
    """``test`` with every case of ``EXAMPLES`` run before the random ones."""
    for case in reversed(EXAMPLES):
        test = example(case)(test)
    return test


def factor_shapes(case):
    """``A: (*stacked, *fan_in, r)``, ``B: (*stacked, r, *fan_out)``, magnitude
    ``(*stacked, *fan_out)``, from the layout model (not from jlora)."""
    s, i, o = ([case.shape[k] for k in g] for g in case.groups)
    return (*s, *i, case.rank), (*s, case.rank, *o), (*s, *o)


def random_adapter(case):
    """The kernel and an adapter with random non-zero factors, sized so that ``s·A@B`` is
    about as large as ``W`` (float32 tolerances then hold for any scale); numpy, so no
    compiles."""
    rng = np.random.default_rng(case.seed)
    a_shape, b_shape, m_shape = factor_shapes(case)
    kernel = rng.standard_normal(case.shape).astype(np.float32)
    magnitude = rng.uniform(0.5, 1.5, m_shape) if case.variant == "dora" else None
    fan_in = math.prod(a_shape[len(case.groups[0]):-1])
    ad = jlora.Adapter(
        a=jnp.asarray(rng.standard_normal(a_shape) / math.sqrt(fan_in), jnp.float32),
        b=jnp.asarray(rng.standard_normal(b_shape) / (case.scale * math.sqrt(case.rank)),
                      jnp.float32),
        magnitude=None if magnitude is None else jnp.asarray(magnitude, jnp.float32),
        layout=jlora.Layout(case.axes), rank=case.rank, alpha=case.alpha, scale=case.scale,
        policy=jlora.scaling.policy_name(case.policy), variant=case.variant)
    return {"model": {"kernel": jnp.asarray(kernel)}}, {"model/kernel": ad}


def reference_merge(case, kernel, ad, variant=None):
    """``W + s·A@B`` (DoRA: ``m·V/‖V‖``) in float64, through the canonical order."""
    stacked, fan_in, fan_out = case.groups
    order = stacked + fan_in + fan_out
    w = np.transpose(np.asarray(kernel, np.float64), order)
    ns, r = len(stacked), case.rank
    a = np.asarray(ad.a, np.float64).reshape(*w.shape[:ns], -1, r)
    b = np.asarray(ad.b, np.float64).reshape(*w.shape[:ns], r, -1)
    v = w + case.scale * np.matmul(a, b).reshape(w.shape)
    if (variant or case.variant) == "dora":
        in_axes = tuple(range(ns, ns + len(fan_in)))
        norm = np.sqrt(np.sum(v * v, axis=in_axes, keepdims=True))
        m = np.expand_dims(np.asarray(ad.magnitude, np.float64), in_axes)
        v = m * v / norm
    return np.transpose(v, np.argsort(order))


merge = jax.jit(jlora.merge)
unmerge = jax.jit(jlora.unmerge)
delta = jax.jit(jlora.delta)


@with_examples
@given(cases())
def test_merge_matches_reference_and_unmerge_round_trips(case):
    params, adapters = random_adapter(case)
    ad = adapters["model/kernel"]
    assert (ad.a.shape, ad.b.shape) == ad.layout.factor_shapes(case.shape, case.rank)
    w = params["model"]["kernel"]
    merged = merge(params, adapters)["model"]["kernel"]
    np.testing.assert_allclose(merged, reference_merge(case, w, ad), rtol=1e-5, atol=1e-4)
    want_delta = reference_merge(case, np.zeros(case.shape), ad, variant="lora")
    np.testing.assert_allclose(delta(adapters)["model/kernel"], want_delta, rtol=1e-5,
                               atol=1e-5)
    if case.variant == "dora":  # m·V/‖V‖ does not hold ‖V‖: refused, not guessed
        with pytest.raises(ValueError, match="Cannot unmerge the 'dora' adapter at path "
                                             "'model/kernel'"):
            jlora.unmerge({"model": {"kernel": merged}}, adapters)
    else:
        back = unmerge({"model": {"kernel": merged}}, adapters)["model"]["kernel"]
        np.testing.assert_allclose(back, w, rtol=1e-5, atol=1e-4)


# -- the factored transform: jlora.lora(f) == f(jlora.merge) --------------------------------


def _letters(case):
    """One einsum letter per kernel axis, and the subscripts of its groups."""
    letters = "abcdefgh"[: len(case.axes)]
    return letters, ["".join(letters[k] for k in g) for g in case.groups]


def _conv_spec(core):
    """lax dimension numbers for a filter whose axes (no stacked ones) are ``core``."""
    spatial = iter("HW" if core.count("w") == 2 else "W")
    rhs = "".join("I" if c == "i" else "O" if c == "o" else next(spatial) for c in core)
    lhs = "NHWC" if core.count("w") == 2 else "NWC"
    return lhs, rhs, lhs


def _per_layer(case, use):
    """``f(params, x)`` applying ``use(core, kernel, x)`` to each stacked slice of the
    kernel as a scan over layers does: stacked axes moved first, one scan per axis."""
    stacked = case.groups[0]
    rest = [k for k in range(len(case.axes)) if k not in stacked]
    core = "".join(case.axes[k] for k in rest)

    def scanned(w, x, depth):
        if depth == 0:
            return use(core, w, x)
        return jax.lax.scan(lambda c, wx: (c, scanned(*wx, depth - 1)), 0.0, (w, x))[1]

    def f(params, x):
        return scanned(jnp.transpose(params["model"]["kernel"], stacked + rest), x,
                       len(stacked))

    return f


def _dense(case):
    """Contract ``x`` with the fan-in axes, batched over the stacked ones (a dot_general)."""
    letters, (s, i, o) = _letters(case)
    spec = f"{s}n{i},{letters}->{s}n{o}"
    return lambda params, x: jnp.einsum(spec, x, params["model"]["kernel"])


def _conv(core, w, x):
    """A same-padded convolution with the filter in its own axis order."""
    return jax.lax.conv_general_dilated(x, w, (1,) * core.count("w"), "SAME",
                                        dimension_numbers=_conv_spec(core))


def _embed(core, w, ids):
    """A gather of rows along the vocabulary axis, and the same lookup as a one-hot dot
    (contracting the vocabulary axis)."""
    rows = jnp.take(w, ids, axis=core.index("v"))
    one_hot = jax.nn.one_hot(ids[::-1], w.shape[core.index("v")], dtype=w.dtype)
    dot = one_hot @ w if core == "vf" else w @ one_hot.T
    return rows + dot if core == "vf" else (rows + dot).T


def consumer(case, key):
    """``(f, x)``: a function using the kernel as its kind is used in models, and its input."""
    stacked = [case.shape[k] for k in case.groups[0]]
    if case.kind == "dense":
        fan_in = [case.shape[k] for k in case.groups[1]]
        return _dense(case), jax.random.normal(key, (*stacked, 2, *fan_in))
    if case.kind == "conv":
        nw = case.axes.count("w")
        c_in = case.shape[case.axes.index("i")]
        return _per_layer(case, _conv), jax.random.normal(key, (*stacked, 2, *(4,) * nw, c_in))
    vocab = case.shape[case.axes.index("v")]
    return _per_layer(case, _embed), jax.random.randint(key, (*stacked, 3), 0, vocab)


@with_examples
@given(cases())
def test_factored_transform_equals_merge_for_values_and_grads(case):
    params, adapters = random_adapter(case)
    f, x = consumer(case, jax.random.key(case.seed))

    def probe(y):  # a fixed, varied cotangent
        return jnp.sum(y * jnp.cos(jnp.arange(y.size, dtype=y.dtype).reshape(y.shape)))

    @jax.jit
    def both(ads):
        def factored(a):
            return probe(jlora.lora(f)(params, a, x))

        def merged(a):
            return probe(f(jlora.merge(params, a), x))

        return jax.value_and_grad(factored)(ads), jax.value_and_grad(merged)(ads)

    (value_f, grads_f), (value_m, grads_m) = both(adapters)
    np.testing.assert_allclose(value_f, value_m, rtol=1e-5, atol=1e-5)
    for got, want in zip(jax.tree.leaves(grads_f), jax.tree.leaves(grads_m), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    assert jlora.lora_report(f, params, adapters, x) == {"model/kernel": "factored"}


# -- init, files, trees --------------------------------------------------------------------

init_jit = jax.jit(jlora.init, static_argnums=2)


def canonical(case):
    """The same kernel stored (stacked, fan-in, fan-out), each group in the kernel's order."""
    order = sum(case.groups, [])
    return order, dataclasses.replace(case, axes="".join(case.axes[k] for k in order),
                                      shape=tuple(case.shape[k] for k in order))


@given(cases(), st.integers(0, 2**16))
def test_init_is_deterministic_and_independent_of_axis_order_and_unrelated_params(case,
                                                                                   other_seed):
    """Same key, same factors: with an unrelated leaf added, and for the same kernel stored
    in canonical order (the factors' shapes do not depend on the order); DoRA's magnitude
    is the norm of the kernel either way, and the adapted model starts as the base."""
    order, canon = canonical(case)
    w, _ = random_adapter(case)
    w = w["model"]["kernel"]

    def config(axes):
        return jlora.LoraConfig(rank=case.rank, alpha=case.alpha, scaling=case.policy,
                                targets="model/kernel", variant=case.variant,
                                layouts={"model/kernel": axes})

    base = init_jit(jax.random.key(case.seed), {"model": {"kernel": w}}, config(case.axes))
    extra = jax.random.normal(jax.random.key(other_seed), (3, 2))
    with_extra = init_jit(jax.random.key(case.seed), {"model": {"kernel": w, "extra": extra}},
                          config(case.axes))
    transposed = init_jit(jax.random.key(case.seed),
                          {"model": {"kernel": jnp.transpose(w, order)}}, config(canon.axes))
    ad = base["model/kernel"]
    assert math.isclose(ad.scale, case.scale) and ad.layout.axes == case.axes
    for other in (with_extra, transposed):
        np.testing.assert_array_equal(other["model/kernel"].a, ad.a)
        np.testing.assert_array_equal(other["model/kernel"].b, ad.b)
    np.testing.assert_array_equal(with_extra["model/kernel"].magnitude, ad.magnitude)
    if case.variant == "dora":
        np.testing.assert_allclose(transposed["model/kernel"].magnitude, ad.magnitude,
                                   rtol=1e-6)
    merged = merge({"model": {"kernel": w}}, base)["model"]["kernel"]
    np.testing.assert_allclose(merged, w, rtol=1e-5, atol=1e-5)


@with_examples
@given(cases())
def test_native_and_peft_files_round_trip_exactly(case):
    params, adapters = random_adapter(case)
    ad = adapters["model/kernel"]
    with tempfile.TemporaryDirectory() as tmp:
        native = jlora.load(jlora.save(f"{tmp}/native", adapters), params)
        peft = jlora.peft.load(jlora.peft.save(f"{tmp}/peft", adapters), params,
                               layouts={"model/kernel": case.axes})
    for loaded in (native, peft):
        back = loaded["model/kernel"]
        assert (back.layout, back.rank, back.variant) == (ad.layout, ad.rank, ad.variant)
        assert math.isclose(back.scale, ad.scale, rel_tol=1e-12)
        for field in ("a", "b", "magnitude"):
            np.testing.assert_array_equal(getattr(back, field), getattr(ad, field))


@given(cases(kinds=("dense",), variants=("lora",)))
def test_partition_combine_round_trip(case):
    params = {"model": {"kernel": np.ones(case.shape), "extra": [np.ones(3), np.zeros(2)]}}
    matched, rest = jlora.partition(params, ".*kernel")
    back = jlora.combine(matched, rest)
    assert jax.tree.structure(back) == jax.tree.structure(params)
    for x, y in zip(jax.tree.leaves(back), jax.tree.leaves(params), strict=True):
        assert x is y
