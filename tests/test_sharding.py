"""`jlora.sharding`: adapters sharded like their kernels.

Two halves:
* in this process (one CPU device): the spec rule for every layout, every way of giving
  the kernels' shardings (specs, NamedShardings, linen boxes, NNX metadata, arrays), the
  optimizer-state helper, and the error messages;
* in subprocesses, because ``XLA_FLAGS=--xla_force_host_platform_device_count=N`` must be
  set before jax is imported: ``tests/sharded/train_step.py`` on 8 virtual devices (mesh
  data=2 x model=4: sharded init, FSDP + tensor-parallel train step equal to the
  one-device run, a scanned model, Explicit mesh axes, the factored transform, NNX) and
  ``tests/sharded/multiprocess.py`` twice, as two processes of 4 devices each joined by
  ``jax.distributed`` over loopback (gloo).
  The subprocesses start together when the first test needs them; every wait is bounded.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jlora
from jlora.layouts import Layout
from jlora.sharding import factor_specs, kernel_specs

SHARDED_DIR = Path(__file__).parent / "sharded"
SUBPROCESS_TIMEOUT_S = 300  # a bound for hangs (e.g. a collective waiting for a dead peer)


# -- the rule -------------------------------------------------------------------------

@pytest.mark.parametrize(
    "layout, kernel_spec, want_a, want_b, want_m",
    [
        ("io", P("x", "y"), P("x", None), P(None, "y"), P("y")),
        ("ioo", P("x", "y", "z"), P("x", None), P(None, "y", "z"), P("y", "z")),
        ("iio", P("x", "y", "z"), P("x", "y", None), P(None, "z"), P("z")),
        ("wwio", P(None, None, "x", "y"), P(None, None, "x", None), P(None, "y"), P("y")),
        ("vf", P("y", "x"), P("y", None), P(None, "x"), P("x")),
        ("sio", P("s", "x", "y"), P("s", "x", None), P("s", None, "y"), P("s", "y")),
        ("sioo", P(None, ("x", "y")), P(None, ("x", "y"), None), P(None, None, None, None),
         P(None, None, None)),
        ("io", P(), P(None, None), P(None, None), P(None)),
        # Kernels in other axis orders: each factor axis takes the spec of its role.
        ("oi", P("x", "y"), P("y", None), P(None, "x"), P("x")),
        ("oio", P("h", "e", "d"), P("e", None), P(None, "h", "d"), P("h", "d")),
        ("isoo", P("embed", "layers", "heads"), P("layers", "embed", None),
         P("layers", None, "heads", None), P("layers", "heads", None)),
        ("soio", P("s", "h", "e"), P("s", "e", None), P("s", None, "h", None), P("s", "h", None)),
        ("fv", P("x", "y"), P("y", None), P(None, "x"), P("x")),
        ("oiww", P("y", "x"), P("x", None, None, None), P(None, "y"), P("y")),
    ],
)
def test_factor_specs_follow_the_kernel_axes(layout, kernel_spec, want_a, want_b, want_m):
    a, b, m = factor_specs(Layout(layout), kernel_spec)
    assert (a, b, m) == (want_a, want_b, want_m)


ORDERS = [("oi", (6, 8)), ("oio", (2, 8, 3)), ("soio", (3, 2, 8, 4)), ("isoo", (8, 3, 2, 4)),
          ("fv", (4, 10)), ("oiww", (4, 2, 3, 3))]
_GROUP = {"s": 0, "i": 1, "w": 1, "v": 1, "o": 2, "f": 2}


@pytest.mark.parametrize("axes, shape", ORDERS, ids=[a for a, _ in ORDERS])
def test_adapters_of_any_axis_order_are_sharded_as_the_canonical_kernel(axes, shape):
    """A kernel stored in any order, sharded with one mesh axis name per kernel axis,
    gives its factors the specs of the same kernel stored (stacked, fan-in, fan-out) with
    its spec permuted alike."""
    order = sorted(range(len(axes)), key=lambda k: _GROUP[axes[k]])
    canonical = "".join(axes[k] for k in order)
    names = [f"axis{k}" for k in range(len(axes))]
    lay = Layout(axes)
    a_shape, b_shape = lay.factor_shapes(shape, 2)
    ad = jlora.Adapter(a=jnp.zeros(a_shape), b=jnp.zeros(b_shape), layout=lay, rank=2)
    specs = jlora.adapter_specs({"k": ad}, {"k": P(*names)})["k"]
    want = factor_specs(Layout(canonical), P(*[names[k] for k in order]))
    assert (specs.a, specs.b) == want[:2]
    assert factor_specs(lay, P(*names))[2] == want[2]
    # Every mesh axis of the kernel lands on exactly one of A and B (the rank axis is None).
    used = [n for spec in (specs.a, specs.b) for n in spec if n is not None]
    assert sorted(used) == sorted(names + [names[k] for k in lay.stacked_axes])


def test_factor_specs_rejects_a_spec_longer_than_the_kernel():
    with pytest.raises(ValueError, match=r"3 entries but the kernel's layout 'io' has 2 axes"):
        factor_specs(Layout("io"), P("x", "y", "z"))


# -- sources of the kernels' shardings ------------------------------------------------

PARAMS = {
    "attn": {"query": {"kernel": jnp.ones((8, 2, 4))}, "out": {"kernel": jnp.ones((2, 4, 8))}},
    "mlp": {"kernel": jnp.ones((8, 16)), "bias": jnp.zeros(16)},
}
CONFIG = jlora.LoraConfig(rank=2)
SPECS = {
    "attn": {"query": {"kernel": P("data", "model")}, "out": {"kernel": P("model", None, "data")}},
    "mlp": {"kernel": P("data", "model"), "bias": P("model")},
}
EXPECTED = {
    "attn/query/kernel": (P("data", None), P(None, "model", None)),
    "attn/out/kernel": (P("model", None, None), P(None, "data")),
    "mlp/kernel": (P("data", None), P(None, "model")),
}


@pytest.fixture(scope="module")
def adapters():
    return jlora.init(jax.random.key(0), PARAMS, CONFIG)


@pytest.fixture(scope="module")
def mesh():
    return jax.make_mesh((1, 1), ("data", "model"))


def factor_pairs(tree, attr=None):
    get = (lambda s: getattr(s, attr)) if attr else (lambda s: s)
    return {path: (get(ad.a), get(ad.b)) for path, ad in tree.items()}


def test_adapter_specs_from_partition_specs(adapters):
    specs = jlora.adapter_specs(adapters, SPECS)
    assert factor_pairs(specs) == EXPECTED
    # Same pytree structure and metadata as the adapters: usable as jit shardings.
    assert jax.tree.structure(specs) == jax.tree.structure(adapters)


def test_adapter_specs_accept_abstract_adapters():
    abstract = jax.eval_shape(lambda p: jlora.init(jax.random.key(0), p, CONFIG), PARAMS)
    assert factor_pairs(jlora.adapter_specs(abstract, SPECS)) == EXPECTED


def test_adapter_shardings_from_named_shardings_keep_mesh_and_memory_kind(adapters, mesh):
    named = jax.tree.map(lambda s: NamedSharding(mesh, s), SPECS)
    out = jlora.adapter_shardings(adapters, named)
    assert factor_pairs(out, "spec") == EXPECTED
    for ad in out.values():
        assert ad.a.mesh == mesh and ad.b.mesh == mesh
        assert ad.a.memory_kind == named["mlp"]["kernel"].memory_kind


def test_adapter_shardings_from_specs_need_a_mesh(adapters, mesh):
    assert factor_pairs(jlora.adapter_shardings(adapters, SPECS, mesh), "spec") == EXPECTED
    with pytest.raises(ValueError, match=r"'attn/out/kernel' is given as the PartitionSpec .* "
                                         r"without a mesh: pass `mesh=`"):
        jlora.adapter_shardings(adapters, SPECS)


def test_logical_specs_are_mapped_per_kernel_with_rules(adapters):
    logical = {
        "attn": {"query": {"kernel": P("embed", "heads", "kv")},
                 "out": {"kernel": P("heads", "kv", "embed")}},
        "mlp": {"kernel": P("embed", "mlp"), "bias": P("mlp")},
    }
    rules = [("embed", "data"), ("heads", "model"), ("mlp", "model"), ("kv", None)]
    assert factor_pairs(jlora.adapter_specs(adapters, logical, rules=rules)) == EXPECTED
    # Flax resolves conflicts per array: with both axes on `model`, the kernel keeps only
    # the first, and the factors follow the kernel (not their own, different resolution).
    clash = [("embed", "model"), ("mlp", "model")]
    specs = jlora.adapter_specs(adapters, logical, rules=clash)
    assert factor_pairs(specs)["mlp/kernel"] == (P("model", None), P(None, None))


class Boxed(nn.Module):
    logical: bool

    @nn.compact
    def __call__(self, x):
        wrap = nn.with_logical_partitioning if self.logical else nn.with_partitioning
        names = ("embed", "mlp") if self.logical else ("data", "model")
        init = wrap(nn.initializers.lecun_normal(), names)
        return nn.Dense(16, kernel_init=init, name="mlp")(x)


@pytest.mark.parametrize("logical", [False, True])
def test_linen_boxes(logical, mesh):
    boxed = jax.eval_shape(Boxed(logical).init, jax.random.key(0), jnp.ones((1, 8)))["params"]
    params = nn.meta.unbox(boxed)
    abstract = jax.eval_shape(lambda p: jlora.init(jax.random.key(0), p, CONFIG), params)
    rules = [("embed", "data"), ("mlp", "model")] if logical else None
    want = {"mlp/kernel": (P("data", None), P(None, "model"))}
    assert factor_pairs(jlora.adapter_specs(abstract, boxed, rules=rules)) == want
    with nn.logical_axis_rules(rules or ()):
        assert factor_pairs(jlora.adapter_specs(abstract, boxed)) == want
    # nn.get_partition_spec / nn.logical_to_mesh_sharding outputs are accepted too.
    specs = nn.get_partition_spec(boxed)
    assert factor_pairs(jlora.adapter_specs(abstract, specs, rules=rules)) == want
    if logical:
        named = nn.logical_to_mesh_sharding(specs, mesh, rules)
        assert factor_pairs(jlora.adapter_shardings(abstract, named), "spec") == want


def test_logical_names_without_rules_are_caught_against_the_mesh(adapters, mesh):
    logical = {**SPECS, "mlp": {"kernel": P("embed", "mlp")}}
    with pytest.raises(ValueError, match=r"'mlp/kernel' is sharded as P\('embed', 'mlp'\), but "
                                         r"the mesh has no axes \['embed', 'mlp'\] \(its axes: "
                                         r"\['data', 'model'\]\)\. Logical axis names\? Pass "
                                         r"`rules="):
        jlora.adapter_shardings(adapters, logical, mesh)


def test_logically_partitioned_without_rules_is_an_error():
    boxed = jax.eval_shape(Boxed(True).init, jax.random.key(0), jnp.ones((1, 8)))["params"]
    abstract = jax.eval_shape(
        lambda p: jlora.init(jax.random.key(0), p, CONFIG), nn.meta.unbox(boxed))
    with pytest.raises(ValueError, match=r"'mlp/kernel' has logical axis names \('embed', 'mlp'\)"
                                         r" but no logical-axis rules"):
        jlora.adapter_specs(abstract, boxed)


class NnxMLP(nnx.Module):
    def __init__(self, rngs, names=("embed", "mlp")):
        init = nnx.with_partitioning(nnx.initializers.lecun_normal(), names)
        self.up = nnx.Linear(8, 16, kernel_init=init, rngs=rngs)


def test_nnx_variables_metadata(mesh):
    with nnx.use_eager_sharding(False):
        _, state = nnx.split(nnx.eval_shape(lambda: NnxMLP(nnx.Rngs(0))), nnx.Param)
    abstract = jax.eval_shape(lambda s: jlora.init(jax.random.key(0), s, CONFIG), state)
    rules = [("embed", "data"), ("mlp", "model")]
    want = {"up/kernel": (P("data", None), P(None, "model"))}
    assert factor_pairs(jlora.adapter_specs(abstract, state, rules=rules)) == want
    with nn.logical_axis_rules(rules):
        assert factor_pairs(jlora.adapter_specs(abstract, state)) == want
        from_nnx = nnx.get_partition_spec(state)  # Variables holding PartitionSpecs
        named = nnx.get_named_sharding(state, mesh)
    assert factor_pairs(jlora.adapter_specs(abstract, from_nnx)) == want
    assert factor_pairs(jlora.adapter_shardings(abstract, named), "spec") == want


def test_arrays_lend_their_sharding_and_unsharded_ones_are_replicated(adapters, mesh):
    sharded = jax.device_put(PARAMS, jax.tree.map(lambda s: NamedSharding(mesh, s), SPECS))
    assert factor_pairs(jlora.adapter_shardings(adapters, sharded), "spec") == EXPECTED
    replicated = jlora.adapter_specs(adapters, PARAMS)
    assert replicated["mlp/kernel"].a == P(None, None)


def test_kernel_specs_flattens_any_source():
    assert kernel_specs(SPECS)["attn/out/kernel"] == P("model", None, "data")
    assert kernel_specs(PARAMS)["mlp/bias"] == P()


def test_dora_magnitude_follows_fan_out(mesh):
    config = jlora.LoraConfig(rank=2, variant="dora", targets="mlp/kernel")
    ads = jlora.init(jax.random.key(0), PARAMS, config)
    specs = jlora.adapter_specs(ads, SPECS)
    assert specs["mlp/kernel"].magnitude == P("model")
    shardings = jlora.adapter_shardings(ads, SPECS, mesh)
    out = jax.jit(jlora.init, static_argnums=2, out_shardings=shardings)(
        jax.random.key(0), PARAMS, config)
    assert out["mlp/kernel"].magnitude.sharding.spec == P("model")
    np.testing.assert_array_equal(out["mlp/kernel"].magnitude, ads["mlp/kernel"].magnitude)


# -- errors ---------------------------------------------------------------------------

def test_missing_path_names_the_nearest(adapters):
    wrapped = {"params": SPECS}  # linen variables instead of variables["params"]
    with pytest.raises(ValueError, match=r"no entry for the adapted kernel at path "
                                         r"'attn/out/kernel'.*\n  params/attn/out/kernel"):
        jlora.adapter_specs(adapters, wrapped)


def test_shape_mismatch_names_both_shapes(adapters):
    other = {**PARAMS, "mlp": {"kernel": jnp.ones((8, 32)), "bias": jnp.zeros(32)}}
    with pytest.raises(ValueError, match=r"'mlp/kernel' has shape \(8, 32\) but the adapter "
                                         r"there fits a kernel of shape \(8, 16\)"):
        jlora.adapter_specs(adapters, other)


def test_spec_longer_than_kernel_names_the_path(adapters):
    bad = {**SPECS, "mlp": {"kernel": P("data", "model", None)}}
    with pytest.raises(ValueError, match=r"'mlp/kernel' \(layout 'io', shape \(8, 16\)\) is "
                                         r"given the PartitionSpec .* with 3 entries: expected "
                                         r"at most 2"):
        jlora.adapter_specs(adapters, bad)


def test_bad_inputs_are_type_errors(adapters):
    with pytest.raises(TypeError, match=r"`adapters` must be the dict \{path: Adapter\}"):
        jlora.adapter_specs([adapters], SPECS)
    with pytest.raises(TypeError, match=r"a str at path 'attn/out/kernel': expected a "
                                        r"PartitionSpec"):
        jlora.adapter_specs(adapters, {**SPECS, "attn": {**SPECS["attn"], "out": {"kernel": "x"}}})


# -- optimizer state ------------------------------------------------------------------

def test_state_shardings_mirror_params_and_replicate_the_rest(adapters, mesh):
    shardings = jlora.adapter_shardings(adapters, SPECS, mesh)
    opt = jlora.lora_plus(optax.adam(1e-3), ratio=16.0)
    state = jax.eval_shape(opt.init, adapters)
    out = jlora.state_shardings(state, adapters, shardings)
    flat = jlora.select(out, ".*")
    mirrored = {p: s.spec for p, s in flat.items() if p.endswith(("/a", "/b"))}
    # Adam's mu and nu, for A in LoRA+'s base group and for B in its sped-up group.
    assert len(mirrored) == 2 * 2 * len(adapters)
    for path, spec in mirrored.items():
        kernel = next(k for k in EXPECTED if f"/{k}/" in path)
        want = dict(zip("ab", EXPECTED[kernel], strict=True))
        assert spec == want[path[-1]], path
    counts = [s.spec for p, s in flat.items() if p.endswith("count")]
    assert counts and all(spec == P() for spec in counts)
    # Usable as is: the state moves onto those shardings.
    placed = jax.jit(opt.init, out_shardings=out)(adapters)
    assert jax.tree.structure(placed) == jax.tree.structure(state)


def test_state_shardings_errors(adapters, mesh):
    state = jax.eval_shape(optax.sgd(0.1, momentum=0.9).init, adapters)
    with pytest.raises(ValueError, match=r"no entry for the params leaves at paths "
                                         r"\['attn/out/kernel/a'"):
        jlora.state_shardings(state, adapters, {})
    with pytest.raises(TypeError, match=r"must hold NamedShardings"):
        jlora.state_shardings(state, adapters, jlora.adapter_specs(adapters, SPECS))


# -- several devices, several processes (subprocesses) --------------------------------

SHARDED_CHECKS = [
    "expected_specs_plain",
    "expected_specs_scanned",
    "sources_agree_plain",
    "sources_agree_scanned",
    "init_sharded_plain",
    "init_sharded_scanned",
    "train_step_plain",
    "train_step_scanned",
    "explicit_mesh_merge",
    "factored_step",
    "factored_step_explicit",
    "nnx",
]


def _env(devices: int) -> dict:
    env = dict(os.environ)
    flag = f"--xla_force_host_platform_device_count={devices}"
    env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} {flag}".strip()
    env["JAX_PLATFORMS"] = "cpu"
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Run:
    """A started subprocess writing a JSON result; `result()` waits (bounded)."""

    def __init__(self, args, devices, out_path):
        self.out_path = out_path
        self.proc = subprocess.Popen(
            [sys.executable, *map(str, args), str(out_path)], cwd=SHARDED_DIR,
            env=_env(devices), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        self._done = None

    def result(self) -> dict:
        if self._done is None:
            try:
                log, _ = self.proc.communicate(timeout=SUBPROCESS_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                log, _ = self.proc.communicate(timeout=30)
                pytest.fail(f"{self.proc.args} timed out after {SUBPROCESS_TIMEOUT_S}s:\n"
                            f"{log[-3000:]}")
            if self.proc.returncode != 0 or not Path(self.out_path).exists():
                pytest.fail(f"{self.proc.args} exited with {self.proc.returncode}:\n"
                            f"{log[-3000:]}")
            self._done = json.loads(Path(self.out_path).read_text())
        return self._done


@pytest.fixture(scope="module")
def subprocess_runs(tmp_path_factory):
    """Start the 8-device run and both processes of the 2-process run at once."""
    tmp = tmp_path_factory.mktemp("sharded")
    port = _free_port()
    runs = {
        "single": _Run(["train_step.py"], 8, tmp / "single.json"),
        "mp0": _Run(["multiprocess.py", 0, 2, port], 4, tmp / "mp0.json"),
        "mp1": _Run(["multiprocess.py", 1, 2, port], 4, tmp / "mp1.json"),
    }
    yield runs
    for run in runs.values():  # only if a test failed before waiting on it
        if run.proc.poll() is None:
            run.proc.kill()
            run.proc.communicate(timeout=30)


def test_sharded_script_runs_every_check(subprocess_runs):
    assert sorted(subprocess_runs["single"].result()) == sorted(SHARDED_CHECKS)


@pytest.mark.parametrize("check", SHARDED_CHECKS)
def test_on_8_devices(subprocess_runs, check):
    outcome = subprocess_runs["single"].result()[check]
    if outcome["status"].startswith("skip:"):
        pytest.skip(outcome["status"][5:].strip())
    assert outcome["status"] == "pass", outcome.get("error")


def test_two_processes_get_the_one_process_loss(subprocess_runs):
    results = [subprocess_runs["mp0"].result(), subprocess_runs["mp1"].result()]
    if any(r["status"] == "unsupported" for r in results):
        pytest.skip("jax.distributed on CPU is unavailable here: " + results[0].get("error", ""))
    for r in results:
        assert r["status"] == "pass", r.get("error")
    assert sorted(r["process_index"] for r in results) == [0, 1]
    assert all(r["local_devices"] == 4 and r["shards_checked"] > 0 for r in results)
    # Both processes see the same (replicated) loss, equal to the one-device reference
    # each computed locally and to the single-process 8-device run.
    assert results[0]["losses"] == results[1]["losses"]
    np.testing.assert_allclose(results[0]["losses"], results[0]["ref_losses"], rtol=1e-6)
    single = subprocess_runs["single"].result()["train_step_plain"]
    assert single["status"] == "pass", single.get("error")
    np.testing.assert_allclose(results[0]["losses"], single["value"], rtol=1e-6)
