"""jlora.infer_layouts: each kernel's layout read from how the model uses it."""

import dataclasses
import re
import time
import warnings
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

import jlora
from jlora import _layout_inference as li
from jlora import _tracing as tracing
from jlora.layouts import Layout, LayoutError

S = jax.ShapeDtypeStruct
F32 = jnp.float32


def _line_of(marker: str) -> str:
    """``test_infer_layouts.py:LINE`` of the line of this file ending with ``marker``."""
    lines = Path(__file__).read_text().splitlines()
    (n,) = [i + 1 for i, line in enumerate(lines) if line.rstrip().endswith(marker)]
    return f"test_infer_layouts.py:{n}"


def _infer_quietly(fn, params, *args, **kwargs):
    """infer_layouts, failing the test if it warns about any leaf."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", li.LayoutInferenceWarning)
        return jlora.infer_layouts(fn, params, *args, **kwargs)


def _linen(module, *inputs):
    params = jax.eval_shape(module.init, jax.random.key(0), *inputs)
    return _infer_quietly(module.apply, params, *inputs)


# ---------------------------------------------------------------------------------------
# Dense, einsum and conv kernels in any axis order
# ---------------------------------------------------------------------------------------


def test_linen_dense_is_io_and_its_bias_has_no_entry():
    got = _linen(nn.Dense(5), jnp.ones((2, 3)))
    assert dict(got) == {"params/kernel": "io"}
    assert got.unconsumed == []


def test_kernel_stored_out_in_and_used_transposed_is_oi():
    params = {"c_proj": {"kernel": S((16, 8), F32), "bias": S((16,), F32)}}

    def apply(p, x):  # transformers' FlaxConv1D: x @ W.T with W (out, in)
        return x @ p["c_proj"]["kernel"].T + p["c_proj"]["bias"][None, :]

    assert _infer_quietly(apply, params, S((2, 8), F32)) == {"c_proj/kernel": "oi"}


def test_quantized_kernels_are_read_through_unchanged_model_code():
    # A quantized kernel stands in for its float kernel, as in jlora.lora: the model's
    # own use gives its layout, whatever the scheme stores.
    weights = {"params": {"head": {"kernel": jax.random.normal(jax.random.key(0), (6, 6))},
                          "up": {"kernel": jnp.ones((4, 2, 6))}}}
    qparams = jlora.quantization.quantize_params(weights, "int8", layouts={
        "params/head/kernel": "oi", "params/up/kernel": "ioo"})

    def apply(p, x):  # the square head used transposed: only the model can tell
        h = jnp.einsum("bd,dnh->bnh", x, p["params"]["up"]["kernel"]).reshape(2, 12)
        return h[:, :6] @ p["params"]["head"]["kernel"].T

    got = _infer_quietly(apply, qparams, S((2, 4), F32))
    assert dict(got) == {"params/head/kernel": "oi", "params/up/kernel": "ioo"}


def test_einsum_query_stored_heads_first_is_oio_and_attention_out_iio():
    params = {"q_einsum": {"w": S((4, 16, 8), F32)}, "attn_vec_einsum": {"w": S((4, 8, 16), F32)}}

    def attend(p, x):
        q = jnp.einsum("BTD,NDH->BTNH", x, p["q_einsum"]["w"])
        return jnp.einsum("BTNH,NHD->BTD", q, p["attn_vec_einsum"]["w"])

    got = _infer_quietly(attend, params, S((2, 5, 16), F32))
    assert got == {"q_einsum/w": "oio", "attn_vec_einsum/w": "iio"}


@pytest.mark.parametrize("split", ["index", "take", "unstack", "split"])
def test_kv_pair_sliced_before_the_einsum_is_soio(split):
    params = {"kv_einsum": {"w": S((2, 3, 16, 8), F32)}}

    def kv(p, x):
        w = p["kv_einsum"]["w"]
        if split == "index":
            k_w, v_w = w[0], w[1]
        elif split == "take":
            k_w, v_w = jnp.take(w, 0, axis=0), jnp.take(w, 1, axis=0)
        elif split == "unstack":
            k_w, v_w = list(w)
        else:
            k_w, v_w = (jnp.squeeze(a, 0) for a in jnp.split(w, 2, axis=0))
        k = jnp.einsum("BTD,KDH->BTKH", x, k_w)
        v = jnp.einsum("BTD,KDH->BTKH", x, v_w)
        return k * v

    got = _infer_quietly(kv, params, S((2, 5, 16), F32))
    assert got == {"kv_einsum/w": "soio"}
    assert Layout(got["kv_einsum/w"]).factor_shapes((2, 3, 16, 8), 4) == ((2, 16, 4), (2, 4, 3, 8))


def test_pairs_unpacked_from_the_einsum_output_are_stacked():
    # The gemma package and Tunix: k and v (gate and up) come out of one einsum and are
    # unpacked from its output, so the pair axis holds separate outputs: stacked.
    params = {"kv_einsum": {"w": S((2, 3, 16, 8), F32)}, "qkv_einsum": {"w": S((3, 4, 16, 8), F32)},
              "gating_einsum": {"w": S((2, 32, 16), F32)}, "linear": {"w": S((32, 16), F32)}}

    def block(p, x):
        k, v = jnp.einsum("BSD,CKDH->CBSKH", x, p["kv_einsum"]["w"])
        q, k2, v2 = jnp.einsum("BTD,SNDH->SBTNH", x, p["qkv_einsum"]["w"])
        gate = jnp.einsum("...F,NHF->...NH", x, p["gating_einsum"]["w"])
        hidden = jax.nn.gelu(gate[..., 0, :]) * gate[..., 1, :]
        out = jnp.einsum("...H,HF->...F", hidden, p["linear"]["w"])
        return out, (k * v).sum() + (q * k2 * v2).sum()

    got = _infer_quietly(block, params, S((2, 5, 16), F32))
    assert got == {"kv_einsum/w": "soio", "qkv_einsum/w": "soio", "gating_einsum/w": "soi",
                   "linear/w": "io"}
    assert re.search(r"dot_general at .* \(stacked by squeeze at .*\)",
                     got.uses["gating_einsum/w"][0])



def test_pairs_unpacked_on_one_source_line_are_stacked_for_every_kernel():
    # Every layer's kv_einsum is consumed on the same line: the uses compare equal, and
    # each kernel's own use must still become stacked (not only the first layer's).
    params = {f"layer_{i}": {"w": S((2, 3, 16, 8), F32)} for i in range(3)}

    def stack(p, x):
        out = 0
        for name in sorted(p):
            k, v = jnp.einsum("BSD,CKDH->CBSKH", x, p[name]["w"])
            out = out + (k * v).sum()
        return out

    got = _infer_quietly(stack, params, S((2, 5, 16), F32))
    assert got == {f"layer_{i}/w": "soio" for i in range(3)}

def test_pieces_of_a_fused_output_and_single_outputs_stay_fan_out():
    params = {"c_attn": S((16, 3 * 4 * 8), F32), "value_head": S((16, 2), F32)}

    def apply(p, x):
        qkv = (x @ p["c_attn"]).reshape(2, 5, 3, 4, 8)  # a fused kernel: one adapter
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        w = p["c_attn"].reshape(16, 3, 4, 8)[:, 0]  # a piece of the kernel, indexed
        mean_std = x @ p["value_head"]
        head = mean_std[..., 0] * mean_std[..., 1]
        return (q * k * v).sum() + head + (x @ w.reshape(16, 32)).sum()

    assert _infer_quietly(apply, params, S((2, 5, 16), F32)) == {"c_attn": "io", "value_head": "io"}


def test_reshapes_give_merged_and_split_axes_their_roles():
    params = {"fused": S((16, 24), F32), "out": S((4, 6, 16), F32)}

    def apply(p, x):
        w = p["fused"].reshape(16, 4, 6)  # a split: each piece keeps the role (fan-out)
        h = jnp.einsum("bd,dnh->bnh", x, w)
        return h.reshape(2, 24) @ p["out"].reshape(24, 16)  # a merge: both axes fan-in

    assert _infer_quietly(apply, params, S((2, 16), F32)) == {"fused": "io", "out": "iio"}


def test_moves_casts_names_and_scaled_kernels_are_followed():
    params = {"a": S((8, 6), F32), "b": S((6, 4), F32), "c": S((4, 3), F32), "d": S((3, 2), F32)}

    def apply(p, x):
        a = checkpoint_name(p["a"].astype(jnp.bfloat16), "a")
        h = x.astype(jnp.bfloat16) @ a
        h = h.astype(F32) @ (p["b"] * 2.0)
        h = h @ (p["c"] * jnp.arange(3.0)[None, :])  # a broadcast non-kernel operand
        return h @ jnp.flip(p["d"], 0)[::1]

    got = _infer_quietly(apply, params, S((5, 8), F32))
    assert got == {"a": "io", "b": "io", "c": "io", "d": "io"}


def test_conv_kernels_linen_and_nnx():
    assert dict(_linen(nn.Conv(8, (3, 3)), jnp.ones((1, 6, 6, 2)))) == {"params/kernel": "wwio"}
    assert dict(_linen(nn.Conv(8, (3,)), jnp.ones((1, 6, 2)))) == {"params/kernel": "wio"}
    conv = nnx.eval_shape(lambda: nnx.Conv(2, 4, (3, 3), rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(conv)
    got = _infer_quietly(lambda s, x: nnx.merge(graphdef, s)(x), state, jnp.ones((1, 5, 5, 2)))
    assert got == {"kernel": "wwio"}


def test_ragged_dot_experts_are_stacked():
    params = {"experts": S((4, 8, 16), F32)}
    apply = lambda p, x, sizes: jax.lax.ragged_dot(x, p["experts"], sizes)  # noqa: E731
    got = _infer_quietly(apply, params, S((12, 8), F32), S((4,), jnp.int32))
    assert got == {"experts": "sio"}


# ---------------------------------------------------------------------------------------
# Stacked layers
# ---------------------------------------------------------------------------------------


class _Block(nn.Module):
    @nn.compact
    def __call__(self, x, _):
        q = nn.DenseGeneral((2, 4), name="query")(x)
        return x + nn.Dense(8, name="mlp")(q.reshape(x.shape)), None


class _Scanned(nn.Module):
    axis: int

    @nn.compact
    def __call__(self, x):
        stack = nn.scan(
            _Block, variable_axes={"params": self.axis}, split_rngs={"params": True},
            length=3, in_axes=nn.broadcast,
        )
        return stack(name="layers")(x, None)[0]


@pytest.mark.parametrize(("axis", "query", "mlp"), [(0, "sioo", "sio"), (1, "isoo", "iso")])
def test_nn_scan_stacks_at_any_axis(axis, query, mlp):
    # MaxText scans with variable_axes={'params': 1}: (embed, layers, heads, head_dim).
    got = _linen(_Scanned(axis), jnp.ones((2, 8)))
    assert dict(got) == {"params/layers/query/kernel": query, "params/layers/mlp/kernel": mlp}
    assert got.unconsumed == []  # the stacked biases are not kernels


def test_layers_indexed_in_a_loop_are_stacked():
    params = {"w": S((3, 8, 8), F32), "u": S((3, 8, 8), F32)}

    def apply(p, x, n):
        x = jax.lax.fori_loop(0, n, lambda i, h: h @ p["w"][i], x)  # a while loop
        return jax.lax.fori_loop(0, 3, lambda i, h: h @ p["u"][i], x)  # a scan

    got = _infer_quietly(apply, params, S((2, 8), F32), S((), jnp.int32))
    assert got == {"w": "sio", "u": "sio"}


def test_batched_dot_over_stacked_experts_is_stacked():
    params = {"experts": S((4, 8, 16), F32)}
    apply = lambda p, x: jnp.einsum("ebd,edf->ebf", x, p["experts"])  # noqa: E731
    assert _infer_quietly(apply, params, S((4, 2, 8), F32)) == {"experts": "sio"}


# ---------------------------------------------------------------------------------------
# Embeddings
# ---------------------------------------------------------------------------------------


class _TiedLM(nn.Module):
    @nn.compact
    def __call__(self, ids):
        embed = nn.Embed(50, 8, name="embed")
        return embed.attend(nn.Dense(8, name="mlp")(embed(ids)))


def test_tied_embedding_linen_is_vf():
    got = _linen(_TiedLM(), jnp.ones((2, 5), jnp.int32))
    assert dict(got) == {"params/embed/embedding": "vf", "params/mlp/kernel": "io"}
    assert [u.split(" at ")[0] for u in got.uses["params/embed/embedding"]] == [
        "gather", "dot_general"
    ]


def test_tied_embedding_tunix_style_is_vf_and_a_one_hot_use_too():
    params = {"embedder": {"input_embedding": S((50, 8), F32)}}

    def lm(p, ids):  # Tunix's Embedder: table[(ids,)] to encode, x @ table.T to decode
        table = p["embedder"]["input_embedding"]
        x = table[(ids,)] * jnp.sqrt(8.0)
        x = x + jax.nn.one_hot(ids, 50) @ table
        return jnp.dot(x, table.T)

    assert _infer_quietly(lm, params, S((2, 5), jnp.int32)) == {"embedder/input_embedding": "vf"}


def test_nnx_linear_and_tied_embed():
    class Model(nnx.Module):
        def __init__(self, rngs):
            self.embed = nnx.Embed(20, 8, rngs=rngs)
            self.linear = nnx.Linear(8, 8, rngs=rngs)

        def __call__(self, ids):
            return self.embed.attend(self.linear(self.embed(ids)))

    graphdef, state = nnx.split(nnx.eval_shape(lambda: Model(nnx.Rngs(0))))
    apply = lambda s, ids: nnx.merge(graphdef, s)(ids)  # noqa: E731
    got = _infer_quietly(apply, state, jnp.ones((2, 3), jnp.int32))
    assert dict(got) == {"embed/embedding": "vf", "linear/kernel": "io"}


# ---------------------------------------------------------------------------------------
# Unused leaves and conflicts
# ---------------------------------------------------------------------------------------


def test_unused_and_hidden_kernels_are_reported_once():
    params = {"body": S((8, 8), F32), "head": S((8, 3), F32), "gram": S((8, 8), F32),
              "pos": S((6, 8), F32), "cls": S((1, 1, 8), F32), "scale": S((8,), F32)}

    def apply(p, x):
        x = jnp.concatenate([jnp.broadcast_to(p["cls"], (2, 1, 8)), x], axis=1)
        h = (x + p["pos"][None]) @ p["body"] * p["scale"][None, None, :]
        return h.sum() + jnp.sum(p["gram"])  # "head" is never used

    with pytest.warns(li.LayoutInferenceWarning) as record:
        got = jlora.infer_layouts(apply, params, S((2, 5, 8), F32))
    assert dict(got) == {"body": "io"}
    # pos, cls and scale only meet activations: they are not kernels, and not reported.
    assert got.unconsumed == ["gram", "head"]
    (message,) = [str(w.message) for w in record]
    assert "'head': fn never passes it whole to a dot_general" in message
    assert re.search(r"'gram': it reaches only reduce_sum at \S*test_infer_layouts.py:\d+", message)


def test_kernel_used_two_incompatible_ways_names_both_lines():
    def apply(p, x):
        y = x @ p["w"]  # first use
        return y + x @ p["w"].T  # second use

    with pytest.raises(LayoutError) as err:
        jlora.infer_layouts(apply, {"w": S((8, 8), F32)}, S((2, 8), F32))
    msg = str(err.value)
    assert "path 'w'" in msg
    assert _line_of("# first use") in msg and _line_of("# second use") in msg
    assert "'io'" in msg and "'oi'" in msg


def test_reshape_mixing_roles_is_reported_not_guessed():
    apply = lambda p, x: x @ p["w"].reshape(6, 4)  # noqa: E731
    with pytest.warns(li.LayoutInferenceWarning, match=r"'w': it reaches only dot_general at "
                      r".*, through a reshape that merges its axis 0 with axes of another role"):
        got = jlora.infer_layouts(apply, {"w": S((4, 6), F32)}, S((2, 6), F32))
    assert dict(got) == {} and got.unconsumed == ["w"]


def test_one_dimensional_and_integer_leaves_are_never_kernels():
    params = {"w": S((8, 4), F32), "b": S((4,), F32), "ids": S((4, 4), jnp.int32)}
    apply = lambda p, x: x @ p["w"] + p["b"][None] + p["ids"][:1].astype(F32)  # noqa: E731
    assert _infer_quietly(apply, params, S((4, 8), F32)) == {"w": "io"}


# ---------------------------------------------------------------------------------------
# Tracing: transforms, static leaves, scale
# ---------------------------------------------------------------------------------------


def _controlled(p, x, n, *, act="tanh"):
    act_fn = getattr(jnp, act)  # a static keyword: a plain call would break if traced
    h = jax.jit(jax.checkpoint(lambda x: act_fn(x @ p["a"].T)))(x)
    h = jax.lax.cond(n > 0, lambda h: h @ p["b"], lambda h: -(h @ p["b"]), h)

    @jax.custom_vjp
    def proj(h, w):
        return h @ w

    proj.defvjp(lambda h, w: (h @ w, (h, w)), lambda r, g: (g @ r[1].T, r[0].T @ g))
    h = proj(h, p["c"])
    return jax.lax.while_loop(lambda c: c[0] < n, lambda c: (c[0] + 1, c[1] @ p["d"]), (0, h))


_CONTROLLED = {"a": "oi", "b": "io", "c": "io", "d": "io"}


def _controlled_params(make):
    return {"a": make((6, 4)), "b": make((6, 6)), "c": make((6, 5)), "d": make((5, 5))}


def test_jit_remat_cond_custom_vjp_and_while_bodies_are_followed():
    params = _controlled_params(lambda s: S(s, F32))
    got = _infer_quietly(_controlled, params, S((2, 4), F32), S((), jnp.int32), act="sin")
    assert got == _CONTROLLED


def test_works_on_concrete_arrays_under_jit_and_eval_shape():
    seen = []

    def record(p, x, n):
        seen.append(_infer_quietly(_controlled, p, x, n))
        return x

    params = _controlled_params(jnp.ones)
    jax.jit(record)(params, jnp.ones((2, 4)), 3)
    jax.eval_shape(record, params, jnp.ones((2, 4)), jnp.int32(3))  # another signature
    assert seen == [_CONTROLLED, _CONTROLLED]
    assert _infer_quietly(_controlled, params, np.ones((2, 4), np.float32), 3) == _CONTROLLED


def test_seven_billion_parameter_tree_of_shapes_is_read_quickly():
    layers, d, ff, heads, vocab = 32, 4096, 11008, 32, 32000
    bf16 = jnp.bfloat16

    def layer():
        return {
            "attn": {"q": S((d, heads, 128), bf16), "k": S((d, heads, 128), bf16),
                     "v": S((d, heads, 128), bf16), "o": S((heads, 128, d), bf16)},
            "mlp": {"gate": S((ff, d), bf16), "up": S((ff, d), bf16), "down": S((d, ff), bf16)},
            "norm": S((d,), bf16),
        }

    params = {"embed": S((vocab, d), bf16), "layers": [layer() for _ in range(layers)],
              "lm_head": S((d, vocab), bf16)}

    def llama(p, ids):
        x = p["embed"][ids]
        for lp in p["layers"]:
            h = x * lp["norm"][None, None, :]
            q, k, v = (jnp.einsum("btd,dnh->btnh", h, lp["attn"][n]) for n in "qkv")
            a = jax.nn.softmax(jnp.einsum("btnh,bsnh->bnts", q, k), axis=-1)
            x = x + jnp.einsum("bnts,bsnh,nhd->btd", a, v, lp["attn"]["o"])
            mlp = lp["mlp"]  # stored (out, in) as in PyTorch checkpoints
            g = jax.nn.silu(h @ mlp["gate"].T) * (h @ mlp["up"].T)
            x = x + g @ mlp["down"].T
        return x @ p["lm_head"]

    start = time.perf_counter()
    got = _infer_quietly(llama, params, S((1, 2048), jnp.int32))
    elapsed = time.perf_counter() - start
    assert elapsed < 5.0, f"reading a 7B-shaped tree took {elapsed:.1f}s"
    assert len(got) == 2 + 7 * layers
    assert got["layers/31/attn/q"] == "ioo" and got["layers/0/attn/o"] == "iio"
    assert got["layers/7/mlp/gate"] == "oi" and got["layers/7/mlp/down"] == "oi"
    assert got["embed"] == "vf" and got["lm_head"] == "io"


def test_result_goes_into_lora_config_and_adapts_the_right_axes():
    params = {"proj": jnp.arange(24.0).reshape(6, 4) / 24}  # stored (out, in)
    apply = lambda p, x: x @ p["proj"].T  # noqa: E731
    x = jnp.linspace(-1.0, 1.0, 8).reshape(2, 4)
    layouts = _infer_quietly(apply, params, x)
    config = jlora.LoraConfig(rank=2, alpha=2.0, targets="proj", layouts=layouts)
    adapter = jlora.init(jax.random.key(0), params, config)["proj"]
    adapter = dataclasses.replace(adapter, b=jnp.linspace(0.5, 1.5, 12).reshape(2, 6))
    assert adapter.a.shape == (4, 2) and adapter.b.shape == (2, 6)  # A on fan-in, B fan-out
    merged = jlora.merge(params, {"proj": adapter})
    want = x @ params["proj"].T + adapter.scale * (x @ adapter.a) @ adapter.b
    np.testing.assert_allclose(apply(merged, x), want, rtol=1e-5)


# ---------------------------------------------------------------------------------------
# Checking a guessed layout against the model (used by the factored transform)
# ---------------------------------------------------------------------------------------


def _traced(fn, params, *args):
    """``(closed jaxpr, param path or None per input)``, as the factored transform traces."""
    traced, _ = tracing.trace(fn, None, params, args, {})
    return traced.closed, traced.param_paths


def _guess_check(fn, params, *args):
    closed, input_paths = _traced(fn, params, *args)
    guessed = {path: jlora.layouts.infer_layout(path, params[path].shape) for path in params}
    return li.check_guessed_layouts(closed, input_paths, guessed)


def test_guess_contradicted_by_a_transposed_use_names_path_guess_use_and_fix():
    with pytest.raises(LayoutError) as err:
        _guess_check(lambda p, x: x @ p["c_proj"].T, {"c_proj": S((16, 8), F32)},  # transposed
                     S((2, 8), F32))
    msg = str(err.value)
    assert "path 'c_proj'" in msg
    assert "'io' (guessed: from its shape and name, or a template)" in msg
    assert re.search(rf"dot_general at \S*{_line_of('# transposed')}:\d+ ", msg)
    assert "jlora.infer_layouts(fn, params, *args)" in msg and "{'c_proj': 'oi'}" in msg


def test_guessed_dense_but_gathered_is_an_embedding():
    params = {"table": S((50, 8), F32)}
    with pytest.raises(LayoutError, match=r"'table'.*'io'.*gather at .*\{'table': 'vf'\}"):
        _guess_check(lambda p, ids: p["table"][ids], params, S((2, 3), jnp.int32))


def test_guessed_ioo_but_scanned_over_axis_0_is_sio():
    params = {"blocks/query/kernel": S((3, 8, 8), F32)}

    def apply(p, x):
        return jax.lax.scan(lambda h, w: (h @ w, None), x, p["blocks/query/kernel"])[0]

    with pytest.raises(LayoutError, match=r"'ioo'.*axis 0 is stacked.*'sio'"):
        _guess_check(apply, params, S((2, 8), F32))


def test_guesses_that_agree_with_the_model_pass():
    params = {"embedding": S((50, 8), F32), "query/kernel": S((8, 2, 4), F32)}

    def apply(p, ids):
        x = p["embedding"][ids]  # the guess 'vf', also attended below
        q = jnp.einsum("btd,dnh->btnh", x, p["query/kernel"]).reshape(2, 3, 8)
        return q @ p["embedding"].T

    found = _guess_check(apply, params, S((2, 3), jnp.int32))
    assert set(found) == {"embedding", "query/kernel"}
    assert found["embedding"].layout() == ("vf", "")


def test_only_guessed_layouts_are_checked():
    closed, input_paths = _traced(lambda p, x: x @ p["w"].T, {"w": S((6, 4), F32)},
                                  S((2, 4), F32))
    assert li.check_guessed_layouts(closed, input_paths, {"w": Layout("io")}) == {}
    found = li.read_kernel_uses(closed, input_paths, ["w"])
    with pytest.raises(LayoutError, match=r"path 'w' \(shape \(6, 4\)\) has the layout 'io', but"):
        li.check_layout(found["w"], Layout("io"))
