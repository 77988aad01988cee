"""Grouped low-rank products: expert kernels through ``ragged_dot`` (and einsums or scans
over experts), and grouped batches of many adapters (``jlora.multi_adapter.grouped``).

Experts: ``lora(f)(params, adapters, x) == f(merge(params, adapters), x)`` for values and
for gradients w.r.t. the adapters and the input (and the kernels), eager and under jit,
with empty groups and group sizes that do not cover every row, for kernels in several
axis orders, batched, used transposed, with DoRA and with dropout; on Tunix's MoE layers
(``real_models``). Grouped batches: each example against a direct computation with its
own adapter merged, gradients for every slot at once, slots swapped without recompiling,
and one optimizer per slot through ``optax.partition``.
"""

from __future__ import annotations

import collections
import re
import zlib

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jlora
from jlora import _grouped_ops as gops
from jlora import _jax_compat as jc
from jlora import multi_adapter as M
from jlora._transform import factored, ragged

F32_TOL = dict(rtol=2e-5, atol=2e-5)
E, D, F, ROWS = 4, 6, 8, 10
GROUPS = np.array([3, 0, 4, 1], np.int32)  # an empty group; 8 of the 10 rows grouped


def _normal(seed, *shape, scale=1.0):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape) * scale, jnp.float32)


def _adapters(params, seed=0, **config):
    """Adapters as jlora.plan lays them out, with random non-zero A and B (init's B = 0
    would hide a wrong branch); numpy draws, so no compile per shape."""
    config.setdefault("rank", 2)
    config.setdefault("alpha", 3.0)
    config = jlora.LoraConfig(**config)
    out = {}
    for k, (path, p) in enumerate(jlora.plan(params, config).items()):
        a_shape, b_shape = p.layout.factor_shapes(p.shape, p.rank)
        out[path] = jlora.Adapter(
            a=_normal(seed + 2 * k, *a_shape, scale=0.5),
            b=_normal(seed + 2 * k + 1, *b_shape, scale=0.5), layout=p.layout, rank=p.rank,
            alpha=p.alpha, scale=p.scale, policy=config.policy_name, variant=config.variant,
            dropout=config.dropout)
    return out


def _shapes_produced(jaxpr):
    return {tuple(v.aval.shape) for e in jc.iter_eqns(jaxpr) for v in e.outvars}


def _check_equation(fn, params, ads, args, jit=True, wrt_params=False, **lora_kw):
    """Values and gradients (adapters, first argument, optionally params) of lora vs merge,
    each side in one compiled function (``jit=False``: the lora side runs eagerly)."""
    g = jlora.lora(fn, **lora_kw)
    argnums = (0, 1, 2) if wrt_params else (1, 2)

    def both(apply):
        def run(p, a, *args):
            def loss(p, a, x, *rest):
                return sum(jnp.sum(jnp.sin(y)) for y in jax.tree.leaves(apply(p, a, x, *rest)))

            return apply(p, a, *args), jax.value_and_grad(loss, argnums)(p, a, *args)
        return run

    got = both(g)
    got = jax.jit(got)(params, ads, *args) if jit else got(params, ads, *args)
    want = jax.jit(both(lambda p, a, *args: fn(jlora.merge(p, a), *args)))(params, ads, *args)
    for x, y in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-4)
    for x, y in zip(jax.tree.leaves(got[0]), jax.tree.leaves(want[0]), strict=True):
        np.testing.assert_allclose(x, y, **F32_TOL)
    assert jlora.lora_report(fn, params, ads, *args) == {p: "factored" for p in ads}


# ---------------------------------------------------------------------------------------
# Expert kernels through ragged_dot
# ---------------------------------------------------------------------------------------


def _moe_mlp(p, x, gs):
    return jax.lax.ragged_dot(jax.nn.gelu(jax.lax.ragged_dot(x, p["up"], gs)), p["down"], gs)


@pytest.fixture(scope="module")
def moe():
    params = {"up": _normal(1, E, D, F, scale=0.4), "down": _normal(2, E, F, D, scale=0.4)}
    ads = _adapters(params, targets="up|down", layouts={"up": "sio", "down": "sio"})
    return params, ads, _normal(3, ROWS, D), jnp.asarray(GROUPS)


def _one_expert_layer(p, x, gs):
    return jax.lax.ragged_dot(x, p["up"], gs)


def test_ragged_dot_experts_match_merge(moe):
    params, ads, x, gs = moe
    assert ads["up"].a.shape == (E, D, 2) and ads["up"].b.shape == (E, 2, F)
    _check_equation(_moe_mlp, params, ads, (x, gs), wrt_params=True)


def test_ragged_dot_eager_and_all_rows_grouped(moe):
    params, ads, x, _ = moe
    _check_equation(_one_expert_layer, {"up": params["up"]}, {"up": ads["up"]},
                    (x, jnp.array([2, 3, 0, 5], jnp.int32)), jit=False)


def test_no_expert_sized_temporaries_in_the_train_step(moe):
    params, ads, x, gs = moe
    loss_f = lambda a: jnp.sum(jlora.lora(_moe_mlp)(params, a, x, gs) ** 2)  # noqa: E731
    loss_m = lambda a: jnp.sum(_moe_mlp(jlora.merge(params, a), x, gs) ** 2)  # noqa: E731
    factored = _shapes_produced(jax.make_jaxpr(jax.grad(loss_f))(ads).jaxpr)
    merged = _shapes_produced(jax.make_jaxpr(jax.grad(loss_m))(ads).jaxpr)
    # The frozen block's own backward pass may copy a kernel transposed (jax 0.8.2's
    # ragged_dot transpose does): only more than that would be the adapters'.
    frozen = _shapes_produced(jax.make_jaxpr(jax.grad(
        lambda x: jnp.sum(_moe_mlp(params, x, gs) ** 2)))(x).jaxpr)
    kernel_shapes = {(E, D, F), (E, F, D)}
    assert kernel_shapes <= merged  # the check can see them when they are there
    assert not (kernel_shapes & factored) - frozen
    ops = collections.Counter(
        str(e.primitive) for e in jc.iter_eqns(jax.make_jaxpr(jax.grad(loss_f))(ads).jaxpr))
    # Frozen products: 2 forward and the second's dx, no dW. Thin ones (each a ragged
    # product for TPU, a matmul elsewhere): per kernel x·A, t·B, u, dA, dB; the second's dx.
    thin = ops["platform_index"]
    assert thin == 2 * 5 + 1 and ops["ragged_dot_general"] - thin == 3
    assert ops["dot_general"] == thin


def _stored_iso(p, x, gs):  # kernel stored (in, E, out), moved to (E, in, out) at the use
    return jax.lax.ragged_dot(x, jnp.transpose(p["w"], (1, 0, 2)), gs)


def _ragged(x, w, gs, lhs_contract, rhs_contract, lhs_batch=(), rhs_batch=(), ragged=0,
            group=0):
    dims = jc.RaggedDims(lhs_contract, rhs_contract, lhs_batch, rhs_batch, (ragged,), (group,))
    return jc.ragged_dot(x, w, gs, dims)


def _torch_order(p, x, gs):  # (E, out, in), as torch stores expert weights
    return _ragged(x, p["w"], gs, (1,), (2,))


def _transposed_use(p, x, gs):  # x (rows, out) · W_eᵀ: contracts the fan-out
    return _ragged(x, p["w"], gs, (1,), (2,))


def _batched(p, x, gs):  # (layers, E, in, out): the layer axis a batch axis of both operands
    return _ragged(x, p["w"], gs, (2,), (2,), (0,), (0,), ragged=1, group=1)


CASES = {  # name: (function, kernel shape, input shape, layout)
    "stored": (_stored_iso, (D, E, F), (ROWS, D), "iso"),
    "torch": (_torch_order, (E, F, D), (ROWS, D), "soi"),
    "transposed": (_transposed_use, (E, D, F), (ROWS, F), "sio"),
    "batched": (_batched, (3, E, D, F), (3, ROWS, D), "ssio"),
}


def test_ragged_dot_kernels_in_any_order_batched_or_transposed():
    params = {n: _normal(k, *c[1], scale=0.4) for k, (n, c) in enumerate(CASES.items())}
    xs = {n: _normal(10 + k, *c[2]) for k, (n, c) in enumerate(CASES.items())}
    ads = _adapters(params, targets="|".join(CASES), layouts={n: c[3] for n, c in CASES.items()})

    def fn(p, xs, gs):  # every case at once: one compile
        return {n: c[0]({"w": p[n]}, xs[n], gs) for n, c in CASES.items()}

    _check_equation(fn, params, ads, (xs, jnp.asarray(GROUPS)))


def test_plain_matmul_forms_of_the_thin_products_equal_ragged_dot():
    """Off TPU the thin products are plain matmuls (jlora/_grouped_ops.py); they must be
    the ragged products, for every case's dimension numbers and rows past the groups."""
    for k, (fn, w_shape, x_shape, layout) in enumerate(CASES.values()):
        params = {"w": _normal(30 + k, *w_shape)}
        ads = _adapters(params, targets="w", layouts={"w": layout})
        x, gs = _normal(40 + k, *x_shape), jnp.asarray(GROUPS)
        closed = jax.make_jaxpr(fn)(params, x, gs)
        (eqn,) = [e for e in closed.jaxpr.eqns if str(e.primitive) == "ragged_dot_general"]
        roles = "sio" if layout == "iso" else layout  # the view the ragged product reads
        fv = factored.Factored(params["w"], ads["w"].a, ads["w"].b, None, None, None,
                               meta=factored.Meta("w", roles, jnp.float32, 1.0))
        spec = ragged.plan_ragged(eqn, fv, x).spec
        g, h = (ads["w"].a, ads["w"].b) if "transposed" not in fn.__name__ else (
            ads["w"].b, ads["w"].a)
        t = jc.ragged_dot(x, g, gs, spec.first)
        np.testing.assert_allclose(gops._select(spec.first, x, g, gs), t, **F32_TOL)
        np.testing.assert_allclose(gops._spread(spec.second, t, h, gs),
                                   jc.ragged_dot(t, h, gs, spec.second), **F32_TOL)


def test_dora_experts_match_merge(moe):
    params, _, x, gs = moe
    params = {"up": params["up"]}
    ads = jlora.init(jax.random.key(0), params, jlora.LoraConfig(
        rank=2, alpha=3.0, targets="up", layouts={"up": "sio"}, variant="dora"))
    ads = {p: a.replace(b=_normal(6, *a.b.shape, scale=0.5),
                        magnitude=a.magnitude * (1 + _normal(7, *a.magnitude.shape, scale=0.2)))
           for p, a in ads.items()}
    _check_equation(_one_expert_layer, params, ads, (x, gs))


def test_dropout_masks_the_experts_input_of_the_adapter_branch_only(moe):
    params, _, x, gs = moe
    ads = _adapters({"up": params["up"]}, targets="up", layouts={"up": "sio"}, dropout=0.3)
    ad, rng, fn = ads["up"], jax.random.key(7), _one_expert_layer
    # Documented: fold_in(rng, crc32(path)) split over the stacked axis; the first
    # expert's key, folded with the use number, masks the branch input.
    keys = jax.random.split(jax.random.fold_in(rng, zlib.crc32(b"up") & 0x7FFFFFFF), (E,))
    keep = jax.random.bernoulli(jax.random.fold_in(keys[0], 0), 0.7, x.shape)
    x_drop = jnp.where(keep, x / 0.7, 0.0)

    def direct(a):
        return (jax.lax.ragged_dot(x, params["up"], gs)
                + ad.scale * jax.lax.ragged_dot(jax.lax.ragged_dot(x_drop, a.a, gs), a.b, gs))

    g = jlora.lora(fn)
    value, grads = jax.jit(jax.value_and_grad(
        lambda a: jnp.sum(jnp.sin(g(params, a, x, gs, lora_rng=rng)))))(ads)
    want, want_grad = jax.jit(jax.value_and_grad(lambda a: jnp.sum(jnp.sin(direct(a)))))(ad)
    np.testing.assert_allclose(value, want, **F32_TOL)
    np.testing.assert_allclose(grads["up"].a, want_grad.a, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(grads["up"].b, want_grad.b, rtol=1e-4, atol=1e-4)
    assert 0 < int(keep.sum()) < keep.size
    np.testing.assert_allclose(g(params, ads, x, gs), fn(jlora.merge(params, ads), x, gs),
                               **F32_TOL)  # no key: evaluation


def test_kernel_as_the_ragged_operand_is_formed_and_reported(moe):
    params, ads, x, gs = moe
    params = {**params, "rows": _normal(8, ROWS, D)}
    ads = _adapters({"rows": params["rows"]}, targets="rows", layouts={"rows": "oi"})
    fn = lambda p, x, gs: jax.lax.ragged_dot(p["rows"], p["up"], gs) + x[:, :1]  # noqa: E731
    report = jlora.lora_report(fn, params, ads, x, gs)
    assert re.fullmatch(r"materialised: the kernel reaches `ragged_dot_general` at .*"
                        r"\(the kernel is not the grouped operand\)", report["rows"])
    with pytest.warns(jlora.FactoredFallbackWarning, match="'rows'"):
        got = jlora.lora(fn)(params, ads, x, gs)
    np.testing.assert_allclose(got, fn(jlora.merge(params, ads), x, gs), **F32_TOL)


# -- experts as einsums and scans --------------------------------------------------------


def _einsum_experts(p, x):  # capacity buckets: x (E, capacity, in)
    return jnp.einsum("ecd,edf->ecf", jax.nn.gelu(jnp.einsum("ecd,edf->ecf", x, p["up"])),
                      p["down"])


def _scan_experts(p, x):
    return jax.lax.scan(lambda c, wx: (c, jnp.tanh(wx[1] @ wx[0]) @ wx[2]), 0.0,
                        (p["up"], x, p["down"]))[1]


def test_experts_as_einsum_or_scan_match_merge(moe):
    params, ads, _, _ = moe
    x = _normal(9, E, 3, D)

    def fn(p, x):  # both at once: one compile
        return _einsum_experts(p, x), _scan_experts(p, x)

    _check_equation(fn, params, ads, (x,))
    loss = lambda a: jnp.sum(jlora.lora(_einsum_experts)(params, a, x) ** 2)  # noqa: E731
    assert not {(E, D, F), (E, F, D)} & _shapes_produced(jax.make_jaxpr(jax.grad(loss))(ads).jaxpr)


# -- real MoE layers (Tunix) -------------------------------------------------------------


def _tunix_layer(build):
    """A Tunix layer as ``apply(state, x)`` with its state randomised."""
    nnx = pytest.importorskip("flax.nnx")
    # Tunix's layers carry mesh axis names and are built here without a mesh, which
    # needs flax's always_shard_variable off: importing tunix turns it off only on the
    # first import in a process, and another test module may have turned it back on.
    with flax.config.temp_flip_flag("always_shard_variable", False):
        layer = build(nnx.Rngs(params=0))
    graphdef, state = nnx.split(layer)
    leaves, treedef = jax.tree.flatten(state)
    state = jax.tree.unflatten(treedef, [_normal(i, *v.shape, scale=0.3)
                                         for i, v in enumerate(leaves)])
    return (lambda st, x: nnx.merge(graphdef, st)(x)), state


def _check_tunix_layer(apply, state, targets, x):
    with jax.numpy_rank_promotion("allow"):
        layouts = jlora.infer_layouts(apply, state, x)
        chosen = {p: lay for p, lay in layouts.items() if re.fullmatch(targets, p)}
        assert set(chosen.values()) <= {"sio", "sooi"} and len(chosen) >= 2
        ads = _adapters(state, targets=targets, layouts=chosen)
        _check_equation(apply, state, ads, (x,))


def tunix(test):
    """A real-model test (``-m real_models``). Tunix 0.1.7 still uses flax NNX and JAX
    APIs that flax 0.12 and jax 0.10 deprecate."""
    for mark in (pytest.mark.real_models,
                 pytest.mark.filterwarnings("ignore:'.value' access is now deprecated"),
                 pytest.mark.filterwarnings("ignore:'sharding' is deprecated"),
                 pytest.mark.filterwarnings("ignore:jax.interpreters.pxla.thread_resources")):
        test = mark(test)
    return test


@tunix
def test_tunix_gemma4_moe_through_ragged_dot():
    moe_lib = pytest.importorskip("tunix.models.gemma4.moe")
    model_lib = pytest.importorskip("tunix.models.gemma4.model")
    cfg = model_lib.ModelConfig(
        num_layers=1, num_embed=32, embed_dim=16, hidden_dim=32, num_heads=2, head_dim=8,
        num_kv_heads=1, enable_moe=True, num_experts=4, num_experts_per_tok=2, expert_dim=12)
    apply, state = _tunix_layer(lambda rngs: moe_lib.MoERagged(cfg, rngs=rngs))
    x = _normal(11, 2, 5, 16)
    with jax.numpy_rank_promotion("allow"):
        ops = {str(e.primitive) for e in jc.iter_eqns(jax.make_jaxpr(apply)(state, x).jaxpr)}
    assert "ragged_dot_general" in ops
    # gating_einsum (E, 2, hidden, d_model): "sooi", transposed and reshaped at its use.
    _check_tunix_layer(apply, state, "gating_einsum|linear", x)


@tunix
def test_tunix_qwen3_moe_loop_over_experts():
    model_lib = pytest.importorskip("tunix.models.qwen3.model")
    cfg = model_lib.ModelConfig(
        num_layers=1, vocab_size=64, embed_dim=16, hidden_dim=12, num_heads=2, head_dim=8,
        num_kv_heads=1, rope_theta=10000, norm_eps=1e-6, num_experts=4, num_experts_per_tok=2)
    apply, state = _tunix_layer(lambda rngs: model_lib.MoELayer(cfg, rngs=rngs))
    _check_tunix_layer(apply, state, "(gate|up|down)_proj", _normal(12, 2, 5, 16))


# ---------------------------------------------------------------------------------------
# Grouped batches: many adapters, one pass
# ---------------------------------------------------------------------------------------

L, H = 2, 6
LAYOUTS = {"stack/kernel": "sio", "query/kernel": "ioo"}


def _model(p, x):
    h = jnp.tanh(x @ p["up"]["kernel"])
    h, _ = jax.lax.scan(lambda h, w: (jnp.tanh(h @ w), None), h, p["stack"]["kernel"])
    return jnp.einsum("...h,hqk->...qk", h, p["query"]["kernel"]).reshape(*h.shape[:-1], -1)


def _set(params, seed, rank, alpha, scaling="standard", targets=".*kernel"):
    layouts = {k: v for k, v in LAYOUTS.items() if re.fullmatch(targets, k)}
    return _adapters(params, seed, rank=rank, alpha=alpha, scaling=scaling, targets=targets,
                     layouts=layouts)


@pytest.fixture(scope="module")
def tenants():
    params = {"up": {"kernel": _normal(20, D, H, scale=0.4)},
              "stack": {"kernel": _normal(21, L, H, H, scale=0.4)},
              "query": {"kernel": _normal(22, H, 2, 3, scale=0.4)}}
    # Ranks given out of order; scales differ (rsLoRA); "it" does not adapt the stack.
    sets = {"fr": _set(params, 1, 2, 4.0), "it": _set(params, 3, 1, 1.0, targets="(up|query)/.*"),
            "de": _set(params, 2, 3, 6.0, "rslora"), "nl": _set(params, 4, 2, 2.0)}
    bank = M.grouped_bank(sets)
    slots = ["fr", None, "de", "it", "fr", "de", None, "it", "de"]  # "nl": an empty group
    x = _normal(23, len(slots), 3, D)
    return params, sets, bank, slots, x, jax.jit(M.grouped(_model))


def _direct(params, sets, slots, x):
    """Each example through the model with its own adapters merged (none: the base)."""
    outs = {s: _model(params if s is None else jlora.merge(params, sets[s]), x)
            for s in set(slots)}
    return jnp.stack([outs[s][k] for k, s in enumerate(slots)])


def test_bank_orders_slots_by_rank(tenants):
    _, sets, bank, slots, _, _ = tenants
    assert bank.names == ("de", "fr", "nl", "it") and bank.ranks["de"] == 3
    for path, ad in sets["it"].items():
        np.testing.assert_array_equal(bank.select("it")[path].b, ad.b)
    grouping = bank.group(slots)
    assert grouping.group_sizes.tolist() == [3, 2, 0, 2]
    assert [slots[k] for k in grouping.order.tolist()] == [
        "de", "de", "de", "fr", "fr", "it", "it", None, None]


@pytest.fixture(scope="module")
def computed(tenants):
    """Outputs and gradients (bank or sets, input) of the grouped batch and of each example
    on its own, each side compiled once."""
    params, sets, bank, slots, x, h = tenants
    grouping = bank.group(slots)

    def grouped_loss(bank, x):
        y = grouping.unsort(h(params, bank, grouping.group_sizes, grouping.sort(x)))
        return jnp.sum(jnp.sin(y)), y

    def direct_loss(sets, x):
        y = _direct(params, sets, slots, x)
        return jnp.sum(jnp.sin(y)), y

    return [jax.jit(jax.value_and_grad(f, (0, 1), has_aux=True))(ads, x)
            for f, ads in ((grouped_loss, bank), (direct_loss, sets))]


def test_grouped_batch_matches_each_example_on_its_own(tenants, computed):
    params, _, bank, slots, x, _ = tenants
    ((_, got), _), ((_, want), _) = computed
    np.testing.assert_allclose(got, want, **F32_TOL)
    grouping = bank.group(slots)  # eager: no jit around the grouped call
    eager = M.grouped(_model)(params, bank, grouping.group_sizes, grouping.sort(x))
    np.testing.assert_allclose(grouping.unsort(eager), want, **F32_TOL)


def test_grouped_gradients_train_every_slot_at_once(tenants, computed):
    _, _, bank, _, _, _ = tenants
    ((v, _), (g_bank, g_x)), ((want, _), (g_sets, want_x)) = computed
    np.testing.assert_allclose(v, want, **F32_TOL)
    np.testing.assert_allclose(g_x, want_x, rtol=1e-4, atol=1e-4)
    for name in bank.names:
        for path, ad in g_sets[name].items():
            np.testing.assert_allclose(g_bank.slots[name][path].a, ad.a, rtol=1e-4, atol=1e-4)
            np.testing.assert_allclose(g_bank.slots[name][path].b, ad.b, rtol=1e-4, atol=1e-4)
    assert not np.any(np.asarray(g_bank.slots["nl"]["up/kernel"].a))  # no rows: no gradient


def test_bank_branch_forms_agree_with_each_example_alone():
    """The three batched forms (ragged levels, their plain-matmul forms, gathered
    factors) against the one-example rule, with an empty group and rows past the groups."""
    ranks, (b, f, c, o) = (3, 0, 2, 2, 1), (7, 2, 5, 4)
    spec = gops.BankSpec("xc", "cr", "xr", "ro", "xo", "r", ranks)
    g, h, xs = _normal(50, c, sum(ranks)), _normal(51, sum(ranks), o), _normal(52, b, f, c)
    gs = jnp.array([2, 1, 0, 2, 1], jnp.int32)  # 6 of 7 examples; the third slot empty

    @jax.jit  # one compile for every form
    def forms(xs, gs, g, h):
        ids = jnp.searchsorted(jnp.cumsum(gs), jnp.arange(b), side="right")
        alone = jax.vmap(lambda x, i: gops._one_example(spec, x, i, g, h))(xs, ids)
        levels = [gops._levels(spec, xs.reshape(-1, c), gs * f, g, h, ragged=r)
                  for r in (True, False)]
        return alone, [*levels, gops._gathered(spec, xs, gs, g, h)]

    want, got = forms(xs, gs, g, h)
    for y in got:
        np.testing.assert_allclose(y.reshape(b, f, o), want, **F32_TOL)
    assert gops._gather_is_cheaper(gops.BankSpec(*"abcdef", (64, 32, 16, 8) * 4), 32)
    assert not gops._gather_is_cheaper(gops.BankSpec(*"abcdef", (64, 32, 16, 8) * 4), 1)


def test_grouped_pass_is_ragged_with_no_per_example_factors(tenants):
    params, _, bank, slots, x, _ = tenants
    gs = bank.group(slots).group_sizes
    jaxpr = jax.make_jaxpr(lambda b, x: M.grouped(_model)(params, b, gs, x))(bank, x).jaxpr
    ops = collections.Counter(str(e.primitive) for e in jc.iter_eqns(jaxpr))
    # Per kernel use: two ragged products per rank level (ranks 3, 2, 2, 1: three levels;
    # the stack, without "it", two), inside the scan for the stack.
    assert ops["ragged_dot_general"] == 2 * (3 + 2 + 3)  # for TPU; a matmul each elsewhere
    assert ops["dot_general"] - ops["ragged_dot_general"] == 3  # x·W once per kernel
    batch = x.shape[0]
    assert not any(s[:1] == (batch,) and len(s) == 3 and s[-1] in (1, 2, 3)
                   for s in _shapes_produced(jaxpr) if s[1:2] in ((D,), (H,)))


def test_slots_are_swapped_and_emptied_without_recompiling(tenants):
    params, sets, bank, slots, x, _ = tenants
    traces = collections.Counter()

    def model(p, x):
        traces["fn"] += 1
        return _model(p, x)

    h = M.grouped(model)

    @jax.jit
    def step(bank, gs, x):
        traces["step"] += 1
        return h(params, bank, gs, x)

    grouping = bank.group(slots)
    step(bank, grouping.group_sizes, grouping.sort(x))
    # A rank-1 set with another scale into "de" (rank 3); "fr" emptied.
    newcomer = _set(params, 9, 1, 5.0, "rslora")
    swapped = bank.put("de", newcomer).clear("fr")
    got = grouping.unsort(step(swapped, grouping.group_sizes, grouping.sort(x)))
    assert traces == {"fn": 1, "step": 1}
    want_sets = {"de": newcomer, "it": sets["it"]}
    want = jax.jit(_direct, static_argnums=2)(
        params, want_sets, tuple(None if s == "fr" else s for s in slots), x)
    np.testing.assert_allclose(got, want, **F32_TOL)


def test_one_optimizer_per_slot_through_optax_partition(tenants, computed):
    _, sets, bank, _, _, _ = tenants
    grads = computed[0][1][0]
    rates = {"de": 0.05, "fr": 0.2, "nl": 0.1}
    opt = optax.partition({"de": optax.adam(rates["de"]), "fr": optax.sgd(rates["fr"]),
                           "nl": optax.sgd(rates["nl"]), "it": optax.set_to_zero()},
                          bank.labels())
    new = jax.jit(lambda g, b: optax.apply_updates(b, opt.update(g, opt.init(b), b)[0]))(
        grads, bank)
    for path, ad in sets["it"].items():  # frozen slot
        np.testing.assert_array_equal(new.slots["it"][path].a, ad.a)
    for path, ad in sets["fr"].items():
        g_fr, g_de = grads.slots["fr"][path].b, grads.slots["de"][path].a
        np.testing.assert_allclose(new.slots["fr"][path].b, ad.b - rates["fr"] * g_fr,
                                   **F32_TOL)
        # Adam's first step: -lr·g/(|g| + eps).
        want_de = sets["de"][path].a - rates["de"] * g_de / (np.abs(g_de) + 1e-8)
        np.testing.assert_allclose(new.slots["de"][path].a, want_de, **F32_TOL)


def test_grouped_errors_name_what_is_wrong(tenants):
    params, sets, bank, slots, x, _ = tenants
    h = M.grouped(_model)
    with pytest.raises(ValueError, match=r"one entry per slot \(4: \['de', 'fr', 'nl', 'it'\]\)"):
        h(params, bank, jnp.array([1, 2], jnp.int32), x)
    with pytest.raises(ValueError, match=r"add up to 12 examples, more than the batch holds \(9\)"):
        h(params, bank, jnp.array([3, 3, 3, 3], jnp.int32), x)
    gs = bank.group(slots).group_sizes
    with pytest.raises(ValueError, match=r"output has shape \(\) for a batch of one example"):
        M.grouped(lambda p, x: jnp.sum(_model(p, x)))(params, bank, gs, x)
    conv = M.grouped(lambda p, x: jax.lax.conv_general_dilated(
        x, p["stack"]["kernel"][:1], (1,), "SAME", dimension_numbers=("NWC", "WIO", "NWC")))
    with pytest.raises(ValueError, match=r"kernel at path 'stack/kernel' reaches "
                                         r"`conv_general_dilated`.*per_example"):
        conv(params, bank, gs, _normal(24, len(slots), 3, H))
    with pytest.raises(ValueError, match=r"rank 3, more than slot 'it' holds \(1\).*capacity"):
        bank.put("it", sets["de"])
    with pytest.raises(ValueError, match=r"Slot 'it' has no room for the kernel at path "
                                         r"'stack/kernel'"):
        bank.put("it", {"stack/kernel": sets["fr"]["stack/kernel"]})
    dora = jlora.init(jax.random.key(0), params, jlora.LoraConfig(
        rank=1, targets="up/kernel", variant="dora"))
    with pytest.raises(ValueError, match=r"'dora' adapter: grouped batches take plain LoRA"):
        M.grouped_bank({"d": dora})
    roomy = M.grouped_bank({"it": sets["it"]}, capacity={"it": 3})
    assert roomy.put("it", {"up/kernel": sets["de"]["up/kernel"]}).ranks == {"it": 3}


def test_stack_adapters_of_equal_scales_from_different_alphas(tenants):
    """Rank 1 alpha 2 and rank 2 alpha 4 share scale 2; stacked they must still stack (the
    benchmark's mix of ranks with alpha = 2·rank)."""
    params = tenants[0]
    sets = {"one": _set(params, 7, 1, 2.0, targets="up/kernel"),
            "two": _set(params, 8, 2, 4.0, targets="up/kernel")}
    stacked = M.stack_adapters(sets)
    for name, ads in sets.items():
        np.testing.assert_allclose(stacked.select(name)["up/kernel"].delta(),
                                   ads["up/kernel"].delta(), **F32_TOL)
