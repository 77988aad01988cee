"""The `jlora` command, in-process through `main(argv)` and once through the console script.

Exit status 0 on success, 1 on a failure (message on stderr), 2 on a usage error; the
merged weights are checked against numpy computing ``W + s·A@B`` from the adapter files.
"""

import pathlib
import shutil
import subprocess
import sys

import jax
import ml_dtypes
import numpy as np
import pytest

import jlora
from jlora import _io as io
from jlora.cli import main

BASE = {
    "dense/kernel": np.linspace(-1, 1, 8 * 6, dtype=np.float32).reshape(8, 6),
    "dense/bias": np.arange(6, dtype=np.float32),
    "head/kernel": np.linspace(0, 2, 6 * 4).reshape(6, 4).astype(ml_dtypes.bfloat16),
    "conv1/kernel": np.full((3, 3, 2, 4), 0.1, np.float32),
    "embed/embedding": np.full((10, 4), 0.2, np.float32),
    "step": np.array([7], np.int32),
}
TARGETS = r".*/(kernel|embedding)"


def _randomise(adapters):
    """Non-zero factors (init leaves B at zero); numpy, so nothing compiles."""
    rng = np.random.default_rng(9)
    return {
        path: ad.replace(a=jax.numpy.asarray(rng.standard_normal(ad.a.shape, np.float32)),
                         b=jax.numpy.asarray(rng.standard_normal(ad.b.shape, np.float32)))
        for path, ad in adapters.items()
    }


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    config = jlora.LoraConfig(rank=2, alpha=3.0, targets=TARGETS, scaling="rslora",
                              rank_pattern={"head/kernel": 3})
    adapters = _randomise(jlora.init(jax.random.key(0), BASE, config))
    base = io.write_safetensors(root / "base.safetensors", BASE, {"model": "tiny"})
    native = jlora.save(root / "native", adapters)
    peft = jlora.peft.save(root / "peft", adapters)
    return {"root": root, "adapters": adapters, "base": base, "native": native, "peft": peft}


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


# -- usage ------------------------------------------------------------------------------------


@pytest.mark.parametrize("command, words", [
    ([], ["inspect", "convert", "merge", "Exit status"]),
    (["inspect"], ["DIR", "--params", "--layout"]),
    (["convert"], ["SRC", "DST", "--to", "{native,peft}", "--base-model"]),
    (["merge"], ["BASE.safetensors", "ADAPTER_DIR", "OUT.safetensors"]),
])
def test_help_on_every_subcommand(capsys, command, words):
    code, out, err = run(capsys, *command, "--help")
    assert code == 0 and err == ""
    assert out.startswith("usage: jlora")
    for word in words:
        assert word in out


@pytest.mark.parametrize("argv, message", [
    ([], "the following arguments are required: COMMAND"),
    (["frobnicate"], "invalid choice: 'frobnicate'"),
    (["inspect"], "the following arguments are required: DIR"),
    (["convert", "a", "b"], "the following arguments are required: --to"),
    (["convert", "a", "b", "--to", "onnx"], "argument --to: invalid choice: 'onnx'"),
    (["merge", "a", "b"], "the following arguments are required: OUT.safetensors"),
    (["merge", "a", "b", "c", "--layout", "sio"], "expected PATTERN=LAYOUT"),
    (["inspect", "d", "--layout", "(=io"], "pattern '(' is not a regex"),
])
def test_usage_errors_exit_2(capsys, argv, message):
    code, out, err = run(capsys, *argv)
    assert code == 2 and out == ""
    assert "usage: jlora" in err and message in err


# -- inspect ----------------------------------------------------------------------------------


def _rows(out):
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("path"))
    end = lines.index("", start)
    return {line.split()[0]: line.split() for line in lines[start + 2 : end]}


def test_inspect_native(capsys, files):
    code, out, err = run(capsys, "inspect", files["native"])
    assert code == 0 and err == ""
    assert out.startswith(f"native jlora adapter at {files['native']} (format_version 1")
    rows = _rows(out)
    adapters = files["adapters"]
    assert sorted(rows) == sorted(adapters)
    for path, ad in adapters.items():
        assert rows[path] == [
            path, "x".join(map(str, ad.kernel_shape)), ad.layout.axes, str(ad.rank),
            f"{ad.alpha:g}", "rslora", f"{ad.scale:.4g}", f"{ad.num_params:,}",
        ]
    total = sum(ad.num_params for ad in adapters.values())
    assert out.rstrip().endswith(f"adapter params: {total:,} in {len(adapters)} kernels")


@pytest.mark.parametrize("source", ["native", "peft"])
def test_inspect_with_params_adds_totals(capsys, files, source):
    code, out, err = run(capsys, "inspect", files[source], "--params", files["base"])
    assert code == 0 and err == ""
    assert sorted(_rows(out)) == sorted(files["adapters"])  # the model's own paths
    trainable = sum(ad.num_params for ad in files["adapters"].values())
    everything = sum(x.size for x in BASE.values()) + trainable
    assert out.rstrip().endswith(f"trainable params: {trainable:,} || all params: {everything:,}"
                                 f" || trainable%: {100 * trainable / everything:.4f}")


def test_inspect_peft_matches_native(capsys, files):
    """Without params, PEFT modules become '<module>/kernel': here the original paths."""
    _, native_out, _ = run(capsys, "inspect", files["native"])
    code, out, err = run(capsys, "inspect", files["peft"])
    assert code == 0 and err == ""
    assert out.startswith(f"PEFT adapter at {files['peft']} (peft_type 'LORA'")
    assert "use_rslora True" in out.splitlines()[0]
    assert _rows(out) == _rows(native_out)


def test_inspect_failures_exit_1(capsys, files, tmp_path):
    code, out, err = run(capsys, "inspect", tmp_path / "missing")
    assert (code, out) == (1, "")
    assert err.startswith("jlora inspect: error: No such adapter directory")
    code, _, err = run(capsys, "inspect", files["root"])
    assert code == 1 and "is not an adapter directory" in err
    broken = tmp_path / "broken"
    shutil.copytree(files["native"], broken)
    weights = broken / io.WEIGHTS_NAME
    weights.write_bytes(weights.read_bytes()[:-10])
    code, _, err = run(capsys, "inspect", broken)
    assert code == 1 and "jlora_adapter.safetensors" in err and "truncated" in err


# -- convert ----------------------------------------------------------------------------------


def _assert_same(got, want):
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        assert g.dtype == w.dtype and np.asarray(g).tobytes() == np.asarray(w).tobytes()


@pytest.mark.parametrize("with_params", [True, False], ids=["params", "standins"])
def test_convert_native_peft_native_round_trip(capsys, files, tmp_path, with_params):
    extra = ["--params", files["base"]] if with_params else []
    code, out, _ = run(capsys, "convert", files["native"], tmp_path / "p", "--to", "peft")
    n = len(files["adapters"])
    assert code == 0 and f"wrote peft adapter ({n} kernels, from native)" in out
    code, out, err = run(capsys, "convert", tmp_path / "p", tmp_path / "n", "--to", "native",
                         *extra)
    assert code == 0 and f"wrote native adapter ({n} kernels, from peft)" in out
    assert ("no --params given" in err) == (not with_params)
    _assert_same(jlora.load(tmp_path / "n", BASE), files["adapters"])


def test_convert_refuses_to_overwrite_other_files(capsys, files, tmp_path):
    (tmp_path / "keep.txt").write_text("mine")
    code, _, err = run(capsys, "convert", files["native"], tmp_path, "--to", "native")
    assert code == 1 and "not part of a jlora adapter: ['keep.txt']" in err
    assert (tmp_path / "keep.txt").read_text() == "mine"


# -- merge ------------------------------------------------------------------------------------


def _numpy_merge(adapter_dir):
    """W + s·A@B from the native files alone, float32, cast to each kernel's dtype."""
    import json

    meta = json.loads((adapter_dir / io.JSON_NAME).read_text())
    tensors, _ = io.read_safetensors(adapter_dir / io.WEIGHTS_NAME)
    out = {}
    for path, entry in meta["adapters"].items():
        rank = entry["rank"]
        a = tensors[f"{path}/a"].astype(np.float32).reshape(-1, rank)
        b = tensors[f"{path}/b"].astype(np.float32).reshape(rank, -1)
        delta = (a @ b).reshape(entry["kernel_shape"])
        kernel = BASE[path]
        out[path] = (kernel.astype(np.float32) + np.float32(entry["scale"]) * delta)
    return out


@pytest.mark.parametrize("source", ["native", "peft"])
def test_merge_matches_numpy(capsys, files, tmp_path, source):
    out_file = tmp_path / "merged.safetensors"
    code, out, err = run(capsys, "merge", files["base"], files[source], out_file)
    assert code == 0, err
    assert out.strip() == (f"merged {len(files['adapters'])} adapted kernels into {out_file} "
                           f"({len(BASE)} tensors)")
    merged, metadata = io.read_safetensors(out_file)
    assert metadata == {"model": "tiny"}
    assert sorted(merged) == sorted(BASE)
    want = _numpy_merge(files["native"])
    for name, base in BASE.items():
        assert merged[name].dtype == base.dtype and merged[name].shape == base.shape
        if name not in want:
            assert merged[name].tobytes() == base.tobytes()  # untouched, bit for bit
        elif base.dtype == np.float32:
            np.testing.assert_allclose(merged[name], want[name], rtol=1e-6, atol=1e-6)
        else:  # bfloat16: the float32 sum rounded once; allow that one rounding step
            np.testing.assert_allclose(merged[name].astype(np.float32),
                                       want[name].astype(base.dtype).astype(np.float32),
                                       rtol=2.0**-8, atol=0)
    assert [p.name for p in tmp_path.iterdir()] == ["merged.safetensors"]  # no temp files


def test_merge_into_the_wrong_base_exits_1(capsys, files, tmp_path):
    other = dict(BASE, **{"dense/kernel": np.ones((8, 7), np.float32)})
    base = io.write_safetensors(tmp_path / "other.safetensors", other)
    code, out, err = run(capsys, "merge", base, files["native"], tmp_path / "out.safetensors")
    assert (code, out) == (1, "")
    assert "'dense/kernel' fits a kernel of shape (8, 6)" in err and "(8, 7)" in err
    assert not (tmp_path / "out.safetensors").exists()
    code, _, err = run(capsys, "merge", tmp_path / "none.safetensors", files["native"],
                       tmp_path / "out.safetensors")
    assert code == 1 and "No such safetensors file" in err


def test_gpt2_peft_adapter_takes_its_layouts_on_the_command_line(capsys, tmp_path):
    """PEFT's GPT-2 adapter onto transformers' Flax GPT-2 weights (kernels stored (out, in)):
    refused while the layouts are guesses, PEFT's merged weights with `--layout ...=oi`;
    without the weights, the stand-in kernels have known layouts and nothing is guessed."""
    root = pathlib.Path(__file__).parent / "fixtures" / "peft" / "gpt2"
    stored, _ = io.read_safetensors(root / "flax.safetensors")
    base = {k.removeprefix("base/"): v for k, v in stored.items() if k.startswith("base/")}
    base_file = io.write_safetensors(tmp_path / "base.safetensors", base)
    out_file = tmp_path / "merged.safetensors"
    code, out, err = run(capsys, "merge", base_file, root / "adapter", out_file)
    assert (code, out) == (1, "")
    assert "'params/transformer/h/0/attn/c_attn/kernel' with shape (24, 8), guessed layout" in err
    assert "--layout PATTERN=LAYOUT" in err and not out_file.exists()
    code, out, err = run(capsys, "merge", base_file, root / "adapter", out_file,
                         "--layout", ".*/(c_attn|c_proj|c_fc)/kernel=oi")
    assert code == 0, err
    merged, _ = io.read_safetensors(out_file)
    for name, want in stored.items():
        if name.startswith("merged/"):
            np.testing.assert_allclose(merged[name.removeprefix("merged/")], want, rtol=1e-6,
                                       atol=1e-6, err_msg=name)
    code, out, err = run(capsys, "inspect", root / "adapter")
    assert code == 0, err
    assert "transformer.h.0.attn.c_proj/kernel  8x8" in out and "8 kernels" in out


# -- the console script -----------------------------------------------------------------------


def test_console_script(files):
    script = pathlib.Path(sys.executable).with_name("jlora")
    if not script.exists():
        script = shutil.which("jlora")
    assert script, "the `jlora` console script is not installed (pip install -e .)"
    proc = subprocess.run([str(script), "inspect", str(files["peft"]), "--layout", "x=y=io"],
                          capture_output=True, text=True, timeout=120)
    # '--layout x=y=io' matches no kernel of the stand-ins: a failure with exit status 1.
    assert proc.returncode == 1, proc.stderr
    assert proc.stdout == ""
    assert proc.stderr.startswith("jlora inspect: error:") and "x=y" in proc.stderr
