"""Smoke tests of the example scripts: each runs end to end with tiny flags in a subprocess.

Beyond "it finishes and writes its files", they check properties the scripts' numbers
must have: the held-out loss at step 0 equals the base model's (B = 0), a second run
reuses the cached base, the mesh run reproduces the single-device numbers, and the rank
sweep's step-0 gradients differ between scalings by exactly the ratio of their scales.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import jlora

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
TINY_LM = [
    "--d-model", "32", "--layers", "2", "--heads", "2", "--seq-len", "32",
    "--pretrain-steps", "6", "--pretrain-bytes", "200000", "--steps", "4", "--batch", "4",
    "--eval-windows", "8", "--eval-every", "2", "--rank", "2", "--alpha", "2",
    "--no-progress",
]


def start_script(name: str, *args: str, devices: int = 1) -> subprocess.Popen:
    env = dict(os.environ, JAX_PLATFORMS="cpu", MPLBACKEND="Agg")
    if devices > 1:  # virtual CPU devices: must be set before jax starts
        env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    return subprocess.Popen(
        [sys.executable, str(EXAMPLES / name), *args],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def finish(proc: subprocess.Popen) -> str:
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, f"{proc.args} failed:\n{stdout[-3000:]}\n{stderr[-3000:]}"
    return stdout


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


@pytest.fixture(scope="module")
def other_runs(tmp_path_factory):
    """The examples that need nothing from another run, all started at once: each is mostly
    single-threaded compiling, so they overlap well. ``{name: (process, output dir)}``;
    the real-model examples only where their codebase is installed."""
    out = tmp_path_factory.mktemp("to_peft")
    started = {"nnx": (start_script("nnx_quickstart.py", "--steps", "40"), None)}
    if _installed("transformers"):
        started["to_peft"] = (start_script(
            "to_peft.py", "--steps", "3", "--batch", "2", "--seq-len", "16",
            "--data-bytes", "20000", "--no-progress", "--out", str(out)), out)
    if _installed("tunix"):
        started["tunix"] = (start_script("tunix_llama3.py"), None)
    yield started
    for proc, _ in started.values():  # only if a test failed before waiting on it
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=30)


def other_run(other_runs, name: str, module: str) -> tuple[str, Path | None]:
    if name not in other_runs:
        pytest.skip(f"could not import {module!r}")
    proc, out = other_runs[name]
    return finish(proc), out


@pytest.fixture(scope="module")
def runs(tmp_path_factory, other_runs):
    """The fine-tuning and rank-sweep runs; independent ones overlap (compiling is
    single-threaded), and the other examples are already running."""
    cache = tmp_path_factory.mktemp("cache")
    single, mesh, sweep = (tmp_path_factory.mktemp(n) for n in ("single", "mesh", "sweep"))
    sweep_proc = start_script(
        "rank_sweep.py", "--dim", "16", "--ranks", "1,4,32", "--seeds", "2", "--steps", "5",
        "--lr-grid", "1,4", "--out", str(sweep),
    )
    single_log = finish(start_script(
        "finetune_lm.py", *TINY_LM, "--cache-dir", str(cache), "--out", str(single)
    ))
    # Started after the first run has cached the base model, which it must reuse.
    mesh_log = finish(start_script(
        "finetune_lm.py", *TINY_LM, "--cache-dir", str(cache), "--out", str(mesh),
        "--mesh", "data=2,model=4", devices=8,
    ))
    return {"single": (single, single_log), "mesh": (mesh, mesh_log),
            "sweep": (sweep, finish(sweep_proc))}


def test_finetune_writes_outputs(runs):
    out, log = runs["single"]
    results = json.loads((out / "results.json").read_text())
    assert (out / "loss_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "pretrained the base model" in log and str(out / "results.json") in log
    assert not results["pretrain_cached"]
    for scaling, scale in (("standard", 2 / 2), ("rslora", 2 / math.sqrt(2))):
        adapters = jlora.load(out / f"adapter_{scaling}")
        assert {a.rank for a in adapters.values()} == {2}
        assert {a.policy for a in adapters.values()} == {scaling}
        np.testing.assert_allclose([a.scale for a in adapters.values()], scale, rtol=1e-6)
        run = results["runs"][scaling]
        assert len(run["train_losses"]) == 4 and all(map(math.isfinite, run["train_losses"]))
        steps = [s for s, _ in run["heldout_curve"]]
        assert steps == [0, 2, 4]
        # B = 0 at init: the adapted model starts exactly as the base model.
        np.testing.assert_allclose(run["heldout_curve"][0][1], results["base_heldout"], rtol=1e-6)
        assert run["heldout"] == run["heldout_curve"][-1][1]


def test_finetune_mesh_reuses_cache_and_matches_single_device(runs):
    (out1, _), (out2, log2) = runs["single"], runs["mesh"]
    single = json.loads((out1 / "results.json").read_text())
    mesh = json.loads((out2 / "results.json").read_text())
    assert "loaded the cached base model" in log2 and mesh["pretrain_cached"]
    assert mesh["mesh"] == {"data": 2, "model": 4}
    np.testing.assert_allclose(mesh["base_heldout"], single["base_heldout"], rtol=1e-5)
    for scaling in ("standard", "rslora"):
        np.testing.assert_allclose(
            mesh["runs"][scaling]["train_losses"], single["runs"][scaling]["train_losses"],
            rtol=1e-4,
        )
        np.testing.assert_allclose(
            mesh["runs"][scaling]["heldout"], single["runs"][scaling]["heldout"], rtol=1e-4
        )


def test_rank_sweep(runs):
    tmp_path, log = runs["sweep"]
    ranks = [1, 4]
    assert "dropped ranks [32]" in log and "slope" in log
    assert (tmp_path / "step0_linear.png").read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "training_linear.png").read_bytes()[:4] == b"\x89PNG"
    results = json.loads((tmp_path / "results_linear.json").read_text())
    assert results["ranks"] == ranks
    std, rs = results["step0"]["standard"], results["step0"]["rslora"]
    # B = 0: no gradient reaches A at step 0.
    assert np.max(std["grad_a"]) == 0 and np.max(rs["grad_a"]) == 0
    # Same seed, same A: dL/dB = s·Aᵀ·G differs between scalings only by the scale ratio
    # (alpha/r) / (alpha/sqrt(r)) = 1/sqrt(r); the SGD update by its square.
    ratio = np.broadcast_to(1 / np.sqrt(ranks)[:, None], (len(ranks), 2))  # (ranks, seeds)
    np.testing.assert_allclose(np.asarray(std["grad_b"]) / rs["grad_b"], ratio, rtol=1e-5)
    np.testing.assert_allclose(
        np.asarray(std["sgd_update"]) / rs["sgd_update"], ratio**2, rtol=1e-5
    )
    final = {s: np.asarray(results["training"]["final"][s]) for s in ("standard", "rslora")}
    assert final["standard"].shape == (len(ranks), 2, 2)  # (ranks, lrs, seeds)
    assert np.isfinite(final["standard"]).all() and np.isfinite(final["rslora"]).all()
    # At rank 1 the two scalings are the same scale: identical runs.
    np.testing.assert_allclose(final["standard"][0], final["rslora"][0], rtol=1e-6)
    # The capacity floor is the Eckart-Young tail, decreasing in rank.
    assert np.all(np.diff(results["training"]["floor"]) < 0)


@pytest.mark.real_models
def test_tunix_llama3_example(other_runs):
    out, _ = other_run(other_runs, "tunix", "tunix")
    assert "layers/0/attn/q_proj/w" in out and "ioo" in out
    assert "14 kernels adapted, all factored" in out
    first, last = map(float, out.split("loss ")[1].split(" after")[0].split(" -> "))
    assert last < first
    gap = float(out.split("max difference ")[1].split()[0])
    assert gap < 1e-4


@pytest.mark.real_models
def test_to_peft_example(other_runs):
    out, tmp_path = other_run(other_runs, "to_peft", "transformers")
    assert tmp_path is not None
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert len(config["target_modules"]) == 14 and config["use_rslora"]
    assert "model.layers.1.self_attn.q_proj" in config["target_modules"]  # torch's own names
    assert "trained 3 steps" in out and "14 kernels" in out
    if "torch check skipped" not in out:  # torch and peft installed: PEFT's logits are jlora's
        gap = float(out.split("largest logit difference ")[1].split()[0])
        assert gap < 1e-4


def test_nnx_quickstart(other_runs):
    out, _ = other_run(other_runs, "nnx", "flax.nnx")
    assert "hidden/kernel" in out and "rslora" in out
    before = float(out.split("frozen base: ")[1].split()[0])
    after = float(out.split("with LoRA (rank 4): ")[1].split()[0])
    assert after < before / 5
    assert float(out.split("max difference ")[1].split()[0]) < 1e-4
