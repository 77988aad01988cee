"""Native save/load (`jlora.save`, `jlora.load`).

Round trips are checked bit for bit on every layout (dense, DenseGeneral, stacked, conv,
embedding), DoRA, bfloat16 and a custom policy; the merged weights of the loaded
adapters are checked against numpy computing ``W + s·A@B`` from the files alone, with
and without jit. Then the failure modes: atomic replacement, interrupted saves,
truncated and corrupted files, missing JSON fields, params that do not fit.
"""

import functools
import hashlib
import json
import os
import pathlib
import select
import shutil
import subprocess
import sys
import textwrap
import time

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import jlora
from jlora import _files as files
from jlora import _io as io

PARAMS = {
    "dense": {"kernel": jnp.linspace(-1.0, 1.0, 8 * 6).reshape(8, 6), "bias": jnp.zeros(6)},
    "attn": {"query": {"kernel": jnp.full((8, 2, 3), 0.5)}},
    "layers": {"mlp": {"kernel": jnp.full((3, 6, 4), 0.25)}},
    "conv": {"kernel": jnp.full((3, 3, 2, 4), 0.1)},
    "embed": {"embedding": jnp.full((10, 4), 0.2)},
    "steps": jnp.zeros((), jnp.int32),
}
TARGETS = r".*/(kernel|embedding)"
LAYOUTS = {"layers/mlp/kernel": "sio"}


def _randomise(adapters, seed=1):
    """Non-zero factors (init leaves B, or A for embeddings, at zero); numpy, so no compiles."""
    rng = np.random.default_rng(seed)
    return {
        path: ad.replace(
            a=jnp.asarray(rng.standard_normal(ad.a.shape).astype(ad.a.dtype)),
            b=jnp.asarray(rng.standard_normal(ad.b.shape).astype(ad.b.dtype)),
        )
        for path, ad in adapters.items()
    }


CONFIGS = {
    "standard": {},
    "rslora": {"scaling": "rslora", "rank_pattern": {"dense/kernel": 4}},
    "dora": {"variant": "dora", "targets": r"dense/kernel|layers/mlp/kernel|conv/kernel"},
    "bfloat16": {"dtype": jnp.bfloat16, "dropout": 0.1},
    "custom": {"scaling": lambda rank, alpha: 0.3 * alpha / rank,
               "alpha_pattern": {"conv/kernel": 5.0}},
}


@functools.cache
def _make(name="standard"):
    """The adapters of ``CONFIGS[name]`` (made once: eager init compiles per shape)."""
    config = dict(rank=2, alpha=3.0, targets=TARGETS, layouts=LAYOUTS) | CONFIGS[name]
    return _randomise(jlora.init(jax.random.key(0), PARAMS, jlora.LoraConfig(**config)))


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def saved(request, tmp_path_factory):
    adapters = _make(request.param)
    path = jlora.save(tmp_path_factory.mktemp(request.param) / "adapter", adapters)
    return request.param, adapters, path


def _assert_same(loaded, adapters):
    assert list(loaded) == list(adapters)
    for path, ad in adapters.items():
        got = loaded[path]
        for field in ("layout", "rank", "alpha", "scale", "policy", "variant", "dropout"):
            assert getattr(got, field) == getattr(ad, field), (path, field)
        for field in io.FIELDS:
            want = getattr(ad, field)
            if want is None:
                assert getattr(got, field) is None
                continue
            value = getattr(got, field)
            assert value.dtype == want.dtype and value.shape == want.shape, (path, field)
            # Bit for bit: compare the raw bytes, so bf16 and NaN payloads count too.
            assert np.asarray(value).tobytes() == np.asarray(want).tobytes(), (path, field)


def test_round_trip_is_exact(saved):
    _, adapters, path = saved
    _assert_same(jlora.load(path), adapters)
    _assert_same(jlora.load(path, PARAMS), adapters)
    assert jax.tree.structure(jlora.load(path)) == jax.tree.structure(adapters)


def test_json_describes_every_kernel(saved):
    name, adapters, path = saved
    meta = json.loads((path / io.JSON_NAME).read_text())
    assert meta["format"] == "jlora-adapter" and meta["format_version"] == io.FORMAT_VERSION
    assert meta["jlora_version"] == jlora.__version__
    weights = (path / io.WEIGHTS_NAME).read_bytes()
    assert meta["weights"]["sha256"] == hashlib.sha256(weights).hexdigest()
    for kpath, ad in adapters.items():
        entry = meta["adapters"][kpath]
        assert entry["layout"] == ad.layout.axes and entry["rank"] == ad.rank
        assert entry["alpha"] == ad.alpha and entry["scale"] == ad.scale
        assert entry["kernel_shape"] == list(ad.kernel_shape)
        assert entry["tensors"]["a"] == {"shape": list(ad.a.shape), "dtype": ad.a.dtype.name}
        assert ("magnitude" in entry["tensors"]) == (ad.variant == "dora")
        assert entry["policy"] == ("custom" if name == "custom" else ad.policy)
        assert ("note" in entry) == (name == "custom")


def test_custom_policy_saved_by_value():
    adapters = _make("custom")
    assert adapters["conv/kernel"].scale == pytest.approx(0.3 * 5.0 / 2)
    meta = io.adapter_metadata(adapters)
    assert meta["adapters"]["conv/kernel"]["scale"] == adapters["conv/kernel"].scale
    assert "callable itself is not saved" in meta["adapters"]["conv/kernel"]["note"]


@pytest.mark.parametrize("use_jit", [False, True], ids=["nojit", "jit"])
def test_loaded_adapters_merge_like_numpy_on_the_files(saved, use_jit):
    """The files alone reproduce W + s·A@B: numpy reads them, jlora merges the loaded ones."""
    _, _, path = saved
    loaded = jlora.load(path, PARAMS)
    merge = jax.jit(jlora.merge) if use_jit else jlora.merge
    merged = jlora.select(merge(PARAMS, loaded), ".*")
    meta = json.loads((path / io.JSON_NAME).read_text())
    tensors, _ = io.read_safetensors(path / io.WEIGHTS_NAME)
    flat = jlora.select(PARAMS, ".*")
    for kpath, entry in meta["adapters"].items():
        layout = jlora.Layout(entry["layout"])
        a = tensors[f"{kpath}/a"].astype(np.float32)
        b = tensors[f"{kpath}/b"].astype(np.float32)
        ns, rank = layout.num_stacked, entry["rank"]
        # A is (*stacked, *fan_in, r), B (*stacked, r, *fan_out); the kernel keeps its axis order,
        # which for every layout here is stacked, then fan-in, then fan-out.
        a2 = a.reshape(*a.shape[:ns], -1, rank)
        b2 = b.reshape(*b.shape[:ns], rank, -1)
        delta = np.matmul(a2, b2).reshape(entry["kernel_shape"])
        want = np.asarray(flat[kpath], np.float32) + np.float32(entry["scale"]) * delta
        if entry["variant"] == "dora":  # m · V / ‖V‖, the norm over the fan-in axes
            norm = np.sqrt(np.sum(want**2, axis=layout.fan_in_axes, keepdims=True))
            magnitude = np.expand_dims(tensors[f"{kpath}/magnitude"].astype(np.float32),
                                       layout.fan_in_axes)
            want = magnitude * want / norm
        got = np.asarray(merged[kpath], np.float32)
        np.testing.assert_allclose(got, want.astype(flat[kpath].dtype), rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(merged["dense/bias"], PARAMS["dense"]["bias"])


@pytest.mark.parametrize("dtype", [ml_dtypes.bfloat16, np.float16, ml_dtypes.float8_e4m3fn,
                                   ml_dtypes.float8_e5m2])
def test_safetensors_helpers_round_trip_every_float_dtype(tmp_path, dtype):
    x = (np.arange(12, dtype=np.float32) / 7).astype(dtype).reshape(3, 4)
    ints = np.arange(5, dtype=np.int8)
    path = files.write_safetensors(tmp_path / "w.safetensors", {"x": x, "i": ints}, {"k": "v"})
    tensors, meta = files.read_safetensors(path)
    assert tensors["x"].dtype == x.dtype and tensors["x"].tobytes() == x.tobytes()
    np.testing.assert_array_equal(tensors["i"], ints)
    assert meta == {"k": "v"}
    assert [p.name for p in tmp_path.iterdir()] == ["w.safetensors"]
    with pytest.raises(jlora.AdapterFormatError, match=r"No such safetensors file: '.*nowhere'"):
        files.read_safetensors(tmp_path / "nowhere")


# -- layouts: any axis order, guessed or given -------------------------------------------------

# transformers' Conv1D (out, in); the gemma package's q_einsum (heads, embed, head_dim);
# stacked with the stack first and with MaxText's scan axis second; an embedding table
# stored (features, vocab); a conv in torch's (out, in, kh, kw) order.
ORDERS = [("oi", (6, 8)), ("oio", (2, 8, 3)), ("soio", (3, 2, 8, 4)), ("isoo", (8, 3, 2, 4)),
          ("fv", (4, 10)), ("oiww", (4, 2, 3, 3))]
_GROUP = {"s": 0, "i": 1, "w": 1, "v": 1, "o": 2, "f": 2}


@pytest.mark.parametrize("variant", ["lora", "dora"])
@pytest.mark.parametrize("axes, shape", ORDERS, ids=[a for a, _ in ORDERS])
def test_any_axis_order_round_trips_as_the_canonical_kernel(tmp_path, axes, shape, variant):
    """The layout string is stored as given; the factors are those of the same kernel
    stored (stacked, fan-in, fan-out), and numpy reading the files gives the update of
    the canonical kernel transposed back to the kernel's order."""
    order = sorted(range(len(axes)), key=lambda k: _GROUP[axes[k]])  # to canonical order
    lay = jlora.Layout(axes)
    canonical = jlora.Layout("".join(axes[k] for k in order))
    rng = np.random.default_rng(5)
    a_shape, b_shape = lay.factor_shapes(shape, 3)
    stacked, _, fan_out = lay.split_shape(shape)
    ad = jlora.Adapter(
        a=jnp.asarray(rng.standard_normal(a_shape), jnp.float32),
        b=jnp.asarray(rng.standard_normal(b_shape), jnp.float32),
        magnitude=(jnp.asarray(rng.uniform(0.5, 1.5, (*stacked, *fan_out)), jnp.float32)
                   if variant == "dora" else None),
        layout=lay, rank=3, alpha=3.0, scale=1.0, policy="standard", variant=variant)
    params = {"m": {"kernel": jnp.zeros(shape)}}
    path = jlora.save(tmp_path / "ad", {"m/kernel": ad})
    entry = json.loads((path / io.JSON_NAME).read_text())["adapters"]["m/kernel"]
    assert entry["layout"] == axes and entry["kernel_shape"] == list(shape)
    assert entry["layout_guessed"] is False
    back = jlora.load(path, params)["m/kernel"]
    _assert_same({"m/kernel": back}, {"m/kernel": ad})
    assert back.layout.axes == axes and not back.layout.guessed

    tensors, _ = io.read_safetensors(path / io.WEIGHTS_NAME)
    a, b = tensors["m/kernel/a"].astype(np.float64), tensors["m/kernel/b"].astype(np.float64)
    ns = len(stacked)
    canonical_shape = tuple(shape[k] for k in order)
    delta = np.matmul(a.reshape(*stacked, -1, 3), b.reshape(*stacked, 3, -1))
    want = np.transpose(delta.reshape(canonical_shape), np.argsort(order))
    np.testing.assert_allclose(back.delta(), want, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(
        back.delta(), np.transpose(back.replace(layout=canonical).delta(), np.argsort(order)))
    assert ns == canonical.num_stacked


def test_guessed_layouts_stay_guessed_and_old_files_load(tmp_path):
    """A layout guessed from the kernel's shape is saved as guessed and loads as guessed;
    a file written before layouts could be guessed (no `layout_guessed`) loads as given."""
    adapters = _make()
    guessed = {p for p, ad in adapters.items() if ad.layout.guessed}
    assert "dense/kernel" in guessed and "layers/mlp/kernel" not in guessed  # given: 'sio'
    path = jlora.save(tmp_path / "ad", adapters)
    back = jlora.load(path)
    assert {p for p, ad in back.items() if ad.layout.guessed} == guessed
    template = io.abstract_adapters(io.adapter_metadata(adapters))
    assert {p for p, ad in template.items() if ad.layout.guessed} == guessed

    meta = json.loads((path / io.JSON_NAME).read_text())
    for entry in meta["adapters"].values():
        del entry["layout_guessed"]
    (path / io.JSON_NAME).write_text(json.dumps(meta))
    old = jlora.load(path, PARAMS)
    assert not any(ad.layout.guessed for ad in old.values())
    _assert_same(old, adapters)


# -- abstract templates ---------------------------------------------------------------------


def test_abstract_adapters_rebuild_the_tree_structure():
    adapters = _make("dora")
    template = io.abstract_adapters(io.adapter_metadata(adapters))
    assert jax.tree.structure(template) == jax.tree.structure(adapters)
    for t, x in zip(jax.tree.leaves(template), jax.tree.leaves(adapters), strict=True):
        assert isinstance(t, jax.ShapeDtypeStruct)
        assert (t.shape, t.dtype) == (x.shape, x.dtype)
    # Metadata of an abstract tree is the metadata of the concrete one.
    assert io.adapter_metadata(template) == io.adapter_metadata(adapters)


def test_abstract_adapters_shardings():
    adapters = _make()
    meta = io.adapter_metadata(adapters)
    single = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    seen = []

    def by_path(path, field, shape):
        seen.append((path, field, shape))
        return single

    for spec in (single, by_path, jax.tree.map(lambda x: single, adapters)):
        template = io.abstract_adapters(meta, sharding=spec)
        assert all(leaf.sharding == single for leaf in jax.tree.leaves(template))
    assert ("dense/kernel", "a", (8, 2)) in seen
    with pytest.raises(TypeError, match="`sharding` must be None"):
        io.abstract_adapters(meta, sharding="replicated")
    with pytest.raises(ValueError, match="no entry for the adapter path 'attn/query/kernel'"):
        io.abstract_adapters(meta, sharding={"dense/kernel": adapters["dense/kernel"]})


# -- atomic writes --------------------------------------------------------------------------


def _no_temporaries(directory: pathlib.Path):
    return [p.name for p in directory.iterdir() if p.name.startswith(".")]


def test_save_replaces_an_existing_adapter(tmp_path):
    first, second = _make(), _make("rslora")
    target = tmp_path / "ad"
    jlora.save(target, first)
    jlora.save(target, second)
    _assert_same(jlora.load(target), second)
    assert _no_temporaries(tmp_path) == []


def test_crash_while_writing_keeps_the_old_adapter(tmp_path, monkeypatch):
    old = _make()
    target = tmp_path / "ad"
    jlora.save(target, old)
    calls = []

    def failing_write(path, data):
        calls.append(path)
        raise OSError("disk full")

    monkeypatch.setattr(files, "_write_file", failing_write)
    with pytest.raises(OSError, match="disk full"):
        jlora.save(target, _make("rslora"))
    assert calls, "the write was attempted"
    _assert_same(jlora.load(target), old)
    assert _no_temporaries(tmp_path) == []


def test_crash_between_renames_restores_the_old_adapter(tmp_path, monkeypatch):
    old = _make()
    target = tmp_path / "ad"
    jlora.save(target, old)
    real_rename = os.rename

    def rename(src, dst):
        if str(src).endswith(".tmp"):  # moving the new adapter in
            raise OSError("power cut")
        return real_rename(src, dst)

    monkeypatch.setattr(files.os, "rename", rename)
    with pytest.raises(OSError, match="power cut"):
        jlora.save(target, _make("rslora"))
    monkeypatch.undo()
    _assert_same(jlora.load(target), old)
    assert _no_temporaries(tmp_path) == []


def test_load_points_at_the_copy_an_interrupted_save_left(tmp_path):
    target = tmp_path / "ad"
    jlora.save(target, _make())
    os.rename(target, tmp_path / ".ad.1234abcd.old")  # as if the process died mid-swap
    with pytest.raises(io.AdapterFormatError, match=r"interrupted.*\.ad\.1234abcd\.old"):
        jlora.load(target)


# A save of many tensors that stops half-way through the weights file, as a save does
# when the process is killed while writing; the parent sends the real SIGKILL.
KILLED_SAVE = textwrap.dedent("""
    import sys, time
    import numpy as np
    import jlora
    from jlora import _files as files

    def write_half_then_wait(path, data):
        with open(path, "wb") as f:
            f.write(data[: len(data) // 2])
            f.flush()
        print("WRITING", path, len(data), flush=True)
        time.sleep(300)

    files._write_file = write_half_then_wait
    rng = np.random.default_rng(0)
    adapters = {
        f"layers/{i}/kernel": jlora.Adapter(
            a=rng.standard_normal((64, 4), np.float32), b=rng.standard_normal((4, 32), np.float32),
            rank=4, alpha=4.0, scale=1.0)
        for i in range(256)
    }
    jlora.save(sys.argv[1], adapters)
    print("FINISHED", flush=True)
""")


def _temporaries(directory: pathlib.Path):
    return sorted(p.name for p in directory.iterdir() if p.name.endswith((".tmp", ".old")))


@pytest.fixture(scope="module")
def killed_save(tmp_path_factory):
    """A directory with the adapter ``_make()`` saved as ``ad`` and the temporary of a
    second save of ``ad`` that was SIGKILLed half-way through writing its weights."""
    root = tmp_path_factory.mktemp("killed")
    target = jlora.save(root / "ad", _make())
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.Popen([sys.executable, "-c", KILLED_SAVE, str(target)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        ready, _, _ = select.select([proc.stdout], [], [], 120)
        line = proc.stdout.readline() if ready else ""
        if not line.startswith("WRITING"):
            proc.kill()
            pytest.fail(f"the save never started writing: {line!r} {proc.communicate()[1]}")
        _, weights, size = line.split()
        (tmp,) = _temporaries(root)
        assert tmp.startswith(f".ad.{files._machine()}-{proc.pid}-"), tmp
        assert pathlib.Path(weights) == root / tmp / io.WEIGHTS_NAME
        # While the writer lives, a save and a load of the same target leave its temporary.
        jlora.save(target, _make())
        _assert_same(jlora.load(target), _make())
        assert _temporaries(root) == [tmp]
        proc.kill()  # SIGKILL: no handler, no cleanup
        assert proc.wait(timeout=60) == -9
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert "FINISHED" not in proc.stdout.read()
    assert sorted(p.name for p in (root / tmp).iterdir()) == [io.WEIGHTS_NAME]  # no JSON yet
    assert 0 < (root / tmp / io.WEIGHTS_NAME).stat().st_size < int(size)
    return root, tmp


@pytest.fixture
def after_kill(killed_save, tmp_path):
    """A fresh copy of the directory the killed save left."""
    root, tmp = killed_save
    shutil.copytree(root, tmp_path / "root", symlinks=True)
    return tmp_path / "root", tmp


def test_save_killed_mid_write_keeps_the_old_adapter_and_load_removes_its_temporary(after_kill):
    root, tmp = after_kill
    assert _temporaries(root) == [tmp]
    _assert_same(jlora.load(root / "ad"), _make())
    assert _temporaries(root) == []
    assert sorted(p.name for p in root.iterdir()) == ["ad"]


def test_next_save_removes_the_temporary_of_a_killed_save(after_kill):
    root, tmp = after_kill
    jlora.save(root / "ad", _make("rslora"))
    assert _temporaries(root) == []
    _assert_same(jlora.load(root / "ad"), _make("rslora"))


def _dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _make_temporaries(root: pathlib.Path, names, *, age_s: float = 0.0):
    """Half-written temporaries: a directory, or a file for names containing "file"."""
    then = time.time() - age_s
    for name in names:
        path = root / name
        if "file" in name:
            path.write_bytes(b"half")
        else:
            path.mkdir()
            (path / io.WEIGHTS_NAME).write_bytes(b"half")
            os.utime(path / io.WEIGHTS_NAME, (then, then))
        os.utime(path, (then, then))


def test_only_stale_temporaries_of_the_same_target_are_removed(tmp_path):
    target = jlora.save(tmp_path / "ad", _make())
    here, dead = files._machine(), _dead_pid()
    elsewhere = format(int(here, 16) ^ 0xFFFFFFFF, "08x")  # another host's MACHINE
    stale = [f".ad.{here}-{dead}-x1.tmp",          # its writer is dead
             f".ad.{here}-{dead}-file1.tmp"]       # (write_bytes_atomic's are files)
    untouched = [f".ad.{elsewhere}-{dead}-x2.tmp",  # unchanged for over a day
                 ".ad.0123abcd.tmp"]
    kept = [f".ad.{here}-{os.getpid()}-x3.tmp",     # this process: live
            f".ad.{here}-1-x4.tmp",                 # pid 1 always runs (maybe another user's)
            f".ad.{elsewhere}-{dead}-x5.tmp",       # another host's: its pid means nothing here
            ".ad.4567abcd.tmp",                     # no writer in the name, changed just now
            f".ad.v2.{here}-{dead}-x6.tmp",         # temporaries of the targets "ad.v2",
            f".adapter.{here}-{dead}-x7.tmp",       # "adapter" and "a"
            f".a.{here}-{dead}-x8.tmp",
            f".ad.v2.{here}-{dead}-y1.old"]
    copy = f".ad.{here}-{dead}-y2.old"              # may be the only complete adapter
    _make_temporaries(tmp_path, stale + kept + [copy])
    _make_temporaries(tmp_path, untouched, age_s=files.STALE_AFTER_S + 60)

    _assert_same(jlora.load(target), _make())
    assert _temporaries(tmp_path) == sorted(kept + [copy])
    assert files.interrupted_copy(target).name == copy
    assert files.interrupted_copy(tmp_path / "ad.v2").name == kept[-1]
    # A successful save supersedes the copy an interrupted swap left; nothing else changes.
    jlora.save(target, _make("rslora"))
    assert _temporaries(tmp_path) == sorted(kept)


def test_file_writes_and_peft_saves_and_loads_remove_stale_temporaries(tmp_path):
    here, dead = files._machine(), _dead_pid()
    file_tmp, peft_tmp = f".w.safetensors.{here}-{dead}-file1.tmp", f".peft.{here}-{dead}-x1.tmp"
    _make_temporaries(tmp_path, [file_tmp, peft_tmp])
    files.write_safetensors(tmp_path / "w.safetensors", {"x": np.ones(2, np.float32)})
    assert _temporaries(tmp_path) == [peft_tmp]
    params = {"d": {"kernel": jnp.ones((8, 4))}}
    ads = jlora.init(jax.random.key(0), params, jlora.LoraConfig(rank=2, targets="d/kernel"))
    jlora.peft.save(tmp_path / "peft", ads)
    assert _temporaries(tmp_path) == []
    _make_temporaries(tmp_path, [peft_tmp])
    assert jlora.peft.load(tmp_path / "peft", params)["d/kernel"].rank == 2
    assert _temporaries(tmp_path) == []


def test_save_refuses_to_replace_foreign_directories_and_files(tmp_path):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match=r"not part of a jlora adapter: \['todo.txt'\]"):
        jlora.save(tmp_path / "notes", _make())
    assert (tmp_path / "notes" / "todo.txt").read_text() == "keep me"
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileExistsError, match="exists and is not a directory"):
        jlora.save(tmp_path / "file", _make())
    (tmp_path / "empty").mkdir()
    jlora.save(tmp_path / "empty", _make())  # an empty directory is fine


def test_save_rejects_bad_adapters(tmp_path):
    with pytest.raises(TypeError, match="must be the dict"):
        jlora.save(tmp_path / "x", [1, 2])
    with pytest.raises(TypeError, match=r"`adapters\['k'\]` must be a jlora Adapter"):
        jlora.save(tmp_path / "x", {"k": np.ones(3)})
    ad = _make()["dense/kernel"].replace(scale=0.5)  # rank 2, alpha 3: standard gives 1.5
    with pytest.raises(ValueError, match=r"'dense/kernel' has scale 0.5 but policy 'standard' "
                                         r"gives 1.5.*policy 'custom'"):
        jlora.save(tmp_path / "x", {"dense/kernel": ad})
    assert not (tmp_path / "x").exists()


# -- verification against params ------------------------------------------------------------


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    adapters = _make()
    return adapters, jlora.save(tmp_path_factory.mktemp("plain") / "adapter", adapters)


def test_load_against_params_names_missing_paths(plain):
    _, path = plain
    params = dict(PARAMS)
    del params["conv"]
    with pytest.raises(ValueError, match="adapter for path 'conv/kernel' has no kernel"):
        jlora.load(path, params)


def test_load_against_params_names_both_shapes(plain):
    _, path = plain
    params = dict(PARAMS, dense={"kernel": jnp.ones((8, 7))})
    with pytest.raises(ValueError, match=r"'dense/kernel' fits a kernel of shape \(8, 6\) but "
                                         r"the kernel there has shape \(8, 7\)"):
        jlora.load(path, params)


def test_load_against_params_rejects_non_float_kernels(plain):
    _, path = plain
    params = dict(PARAMS, dense={"kernel": jnp.ones((8, 6), jnp.int32)})
    with pytest.raises(ValueError, match=r"path 'dense/kernel' with shape \(8, 6\) and dtype "
                                         "int32: expected a floating-point kernel"):
        jlora.load(path, params)


# -- damaged files ----------------------------------------------------------------------------


@pytest.fixture
def copy(plain, tmp_path):
    """A fresh copy of the saved adapter that a test may damage."""
    _, path = plain
    target = tmp_path / "adapter"
    target.mkdir()
    for f in path.iterdir():
        (target / f.name).write_bytes(f.read_bytes())
    return target


def _edit_json(path, edit):
    meta = json.loads((path / io.JSON_NAME).read_text())
    edit(meta)
    (path / io.JSON_NAME).write_text(json.dumps(meta))


def test_truncated_weights_are_rejected(copy):
    w = copy / io.WEIGHTS_NAME
    data = w.read_bytes()
    w.write_bytes(data[: len(data) // 2])
    with pytest.raises(io.AdapterFormatError, match=r"jlora_adapter.safetensors' has \d+ bytes "
                                                    r"but .* records \d+: the file is truncated"):
        jlora.load(copy)


def test_corrupted_weights_are_rejected(copy):
    w = copy / io.WEIGHTS_NAME
    data = bytearray(w.read_bytes())
    data[-3] ^= 0xFF  # one flipped byte in a factor: only the checksum can tell
    w.write_bytes(bytes(data))
    with pytest.raises(io.AdapterFormatError, match=r"safetensors' is corrupted: its sha256"):
        jlora.load(copy)


def test_unreadable_safetensors_with_matching_checksum_is_rejected(copy):
    garbage = b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all"

    def point_at_garbage(meta):
        meta["weights"].update(bytes=len(garbage), sha256=hashlib.sha256(garbage).hexdigest())

    (copy / io.WEIGHTS_NAME).write_bytes(garbage)
    _edit_json(copy, point_at_garbage)
    with pytest.raises(io.AdapterFormatError, match="is not a readable safetensors file"):
        jlora.load(copy)


def test_missing_and_extra_tensors_are_named(copy, plain):
    adapters, _ = plain
    tensors, meta = io.read_safetensors(copy / io.WEIGHTS_NAME)
    del tensors["conv/kernel/b"]
    tensors["stray/a"] = np.ones(2, np.float32)
    data = files.safetensors_bytes(tensors, meta)
    (copy / io.WEIGHTS_NAME).write_bytes(data)
    _edit_json(copy, lambda m: m["weights"].update(
        bytes=len(data), sha256=hashlib.sha256(data).hexdigest()))
    with pytest.raises(io.AdapterFormatError, match=r"missing tensors \['conv/kernel/b'\], "
                                                    r"extra tensors \['stray/a'\]"):
        jlora.load(copy)


def test_tensor_disagreeing_with_json_is_named(copy):
    tensors, meta = io.read_safetensors(copy / io.WEIGHTS_NAME)
    tensors = dict(tensors, **{"dense/kernel/a": tensors["dense/kernel/a"].astype(np.float16)})
    data = files.safetensors_bytes(tensors, meta)
    (copy / io.WEIGHTS_NAME).write_bytes(data)
    _edit_json(copy, lambda m: m["weights"].update(
        bytes=len(data), sha256=hashlib.sha256(data).hexdigest()))
    with pytest.raises(io.AdapterFormatError, match=r"Tensor 'dense/kernel/a' .* dtype float16 "
                                                    r"but .* expects shape \(8, 2\) and dtype "
                                                    "float32"):
        jlora.load(copy)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda m: m["adapters"]["dense/kernel"].pop("rank"),
         r"adapter 'dense/kernel', is missing the field 'rank'"),
        (lambda m: m.pop("weights"), r"is missing the field 'weights'"),
        (lambda m: m.pop("format_version"), r"is missing the field 'format_version'"),
        (lambda m: m["adapters"]["conv/kernel"]["tensors"].pop("b"),
         r"adapter 'conv/kernel', is missing the tensor entry 'b'"),
        (lambda m: m["adapters"]["dense/kernel"].update(alpha="3"),
         r"field 'alpha' = '3' \(str\); expected a positive number"),
        (lambda m: m["adapters"]["dense/kernel"].update(layout="ix"),
         r"adapter 'dense/kernel', has an invalid layout"),
        (lambda m: m["adapters"]["dense/kernel"].update(scale=9.0),
         r"has scale 9.0 but policy 'standard' gives 1.5"),
        (lambda m: m["adapters"]["dense/kernel"]["tensors"]["a"].update(shape=[8, 3]),
         r"tensor 'a' has shape \(8, 3\) but layout 'io', rank 2 and kernel shape \(8, 6\) "
         r"give \(8, 2\)"),
        (lambda m: m.update(format_version=99), r"format_version 99; .* Upgrade jlora"),
        (lambda m: m.update(format="peft"), r"has format 'peft'; expected 'jlora-adapter'"),
    ],
    ids=["rank", "weights", "format_version", "tensor", "alpha-type", "layout", "scale",
         "shape", "newer", "format"],
)
def test_bad_json_fields_are_named(copy, edit, message):
    _edit_json(copy, edit)
    with pytest.raises(io.AdapterFormatError, match="jlora_adapter.json.*" + message):
        jlora.load(copy)


def test_truncated_json_is_rejected(copy):
    j = copy / io.JSON_NAME
    j.write_text(j.read_text()[:100])
    with pytest.raises(io.AdapterFormatError, match=r"jlora_adapter.json' is not valid JSON "
                                                    r"\(truncated or corrupted\?\)"):
        jlora.load(copy)


def test_missing_files_are_named(copy, tmp_path):
    (copy / io.WEIGHTS_NAME).unlink()
    with pytest.raises(io.AdapterFormatError, match="weights file 'jlora_adapter.safetensors', "
                                                    "which is missing"):
        jlora.load(copy)
    with pytest.raises(io.AdapterFormatError, match=r"No jlora adapter at .*nowhere"):
        jlora.load(tmp_path / "nowhere")
    peft_dir = tmp_path / "peft"
    peft_dir.mkdir()
    (peft_dir / "adapter_config.json").write_text("{}")
    with pytest.raises(io.AdapterFormatError, match="holds a PEFT adapter.*jlora.peft.load"):
        jlora.load(peft_dir)
