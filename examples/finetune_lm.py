"""LoRA fine-tuning of a small language model, end to end, on text every Python install has.

1. Pretrain a byte-level decoder-only transformer (layers under ``nn.scan``) on the
   standard library's ``.py`` sources, and cache it on disk.
2. LoRA fine-tune it on a different domain: the C headers of the Python installation,
   with a held-out set of whole header files.
3. Compare held-out loss of the base model, LoRA with standard scaling (alpha/r) and
   rsLoRA (alpha/sqrt(r)): same rank, alpha, learning rate, steps and batches.
4. Write both adapters (jlora's native format), a PNG of the loss curves and a JSON of
   the numbers.

Run it with no flags (about a minute or two on 2 CPU cores, pretraining included)::

  python examples/finetune_lm.py

Data- and model-parallel on whatever ``jax.devices()`` offers, and across hosts::

  python examples/finetune_lm.py --mesh data=2,model=4
  python examples/finetune_lm.py --mesh data=16,model=4 --distributed   # on every host

See docs/finetune.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import io
import json
import math
import os
import re
import sys
import time
from pathlib import Path

import flax.serialization
import jax
import matplotlib
import numpy as np
import optax
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from tqdm.auto import tqdm

import jlora

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the _lm_* helpers

import _lm_data as data_lib  # noqa: E402
from _lm_model import LORA_LAYOUTS, LORA_TARGETS, ModelConfig, init_params, make_loss  # noqa: E402

# Bumped whenever the model or pretraining recipe changes, so stale caches are not reused.
_CACHE_VERSION = 1


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    g = p.add_argument_group("model")
    g.add_argument("--d-model", type=int, default=96)
    g.add_argument("--layers", type=int, default=3)
    g.add_argument("--heads", type=int, default=4)
    g.add_argument("--d-ff", type=int, default=None, help="default: 4 * d-model")
    g.add_argument("--seq-len", type=int, default=96)
    g = p.add_argument_group("pretraining (cached)")
    g.add_argument("--pretrain-steps", type=int, default=300)
    g.add_argument("--pretrain-lr", type=float, default=3e-3)
    g.add_argument("--pretrain-bytes", type=int, default=4_000_000,
                   help="bytes of stdlib source to sample windows from")
    g.add_argument("--pretrain-dir", default=None, help="default: sysconfig stdlib")
    g.add_argument("--cache-dir", default=os.path.join("~", ".cache", "jlora"))
    g.add_argument("--no-cache", action="store_true", help="always pretrain; write no cache")
    g = p.add_argument_group("LoRA fine-tuning")
    g.add_argument("--finetune-dir", default=None, help="default: sysconfig include (C headers)")
    g.add_argument("--steps", type=int, default=120)
    g.add_argument("--rank", type=int, default=16)
    g.add_argument("--alpha", type=float, default=16.0)
    g.add_argument("--lr", type=float, default=2e-3)
    g.add_argument("--batch", type=int, default=16, help="global batch (windows per step)")
    g.add_argument("--eval-windows", type=int, default=96)
    g.add_argument("--eval-every", type=int, default=20)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--out", default=os.path.join("runs", "finetune_lm"))
    g.add_argument("--no-progress", action="store_true", help="no progress bars")
    g = p.add_argument_group("devices")
    g.add_argument("--mesh", default="data=1,model=1",
                   help="mesh axis sizes, e.g. data=2,model=4; their product must not exceed "
                        "jax.device_count() (must equal it with --distributed)")
    g.add_argument("--distributed", action="store_true",
                   help="call jax.distributed.initialize() first (one process per host)")
    g.add_argument("--coordinator-address", default=None, help="passed to initialize()")
    g.add_argument("--num-processes", type=int, default=None, help="passed to initialize()")
    g.add_argument("--process-id", type=int, default=None, help="passed to initialize()")
    args = p.parse_args(argv)
    args.d_ff = args.d_ff or 4 * args.d_model
    return args


def parse_mesh(spec: str) -> dict[str, int]:
    """``"data=2,model=4"`` -> ``{"data": 2, "model": 4}``."""
    sizes = {}
    for part in spec.split(","):
        name, _, size = part.partition("=")
        if name.strip() not in ("data", "model") or not size.strip().isdigit():
            raise SystemExit(f"--mesh: expected 'data=N,model=M', got {spec!r}.")
        sizes[name.strip()] = int(size)
    return {"data": sizes.get("data", 1), "model": sizes.get("model", 1)}


# --- devices and shardings -----------------------------------------------------------


class Devices:
    """The mesh, how each tree is sharded over it, and host <-> device transfers.

    Tensor parallel over ``model`` (Megatron style: query/key/value/mlp_in split their
    output features, out/mlp_out their input features), data parallel over ``data``.
    The scanned layer axis stays unsharded. Adapters inherit their kernel's sharding
    through ``jlora.adapter_shardings``.
    """

    def __init__(self, sizes: dict[str, int]):

        n = sizes["data"] * sizes["model"]
        available = jax.device_count()
        if n > available or (jax.process_count() > 1 and n != available):
            raise SystemExit(
                f"--mesh data={sizes['data']},model={sizes['model']} needs {n} devices; "
                f"jax.devices() has {available} ({jax.process_count()} process(es))."
            )
        devices = np.asarray(jax.devices()[:n]).reshape(sizes["data"], sizes["model"])
        self.mesh = Mesh(devices, ("data", "model"))
        self.sizes = sizes
        self.named = lambda *spec: NamedSharding(self.mesh, PartitionSpec(*spec))
        self.replicated = self.named()

    def param_shardings(self, params):

        def spec(path, leaf):
            if re.fullmatch(r"layers/(query|key|value|mlp_in)/kernel", path):
                return self.named(None, None, "model")
            if re.fullmatch(r"layers/(out|mlp_out)/kernel", path):
                return self.named(None, "model", None)
            if path == "layers/mlp_in/bias":
                return self.named(None, "model")
            return self.replicated

        return jlora.tree_map_with_path(spec, params)

    def put(self, tree, shardings):
        """Host arrays (identical on every process) onto the mesh."""

        def one(x, sharding):
            x = np.asarray(x)
            return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])

        return jax.tree.map(one, tree, shardings)

    def batch(self, windows: np.ndarray):
        """The global batch (the same on every process) -> one array sharded over ``data``.

        Each process hands over only its own rows, so any split into processes gives the
        same global batch, and the same numbers, as a single process.
        """
        rows = len(windows) // jax.process_count()
        local = windows[jax.process_index() * rows : (jax.process_index() + 1) * rows]
        return jax.make_array_from_process_local_data(self.named("data"), local)

    def fetch(self, tree):
        """Device arrays -> full numpy arrays on every process (gathers across hosts)."""
        if jax.process_count() > 1:
            return multihost_utils.process_allgather(tree, tiled=True)
        return jax.tree.map(np.asarray, tree)


# --- training ------------------------------------------------------------------------


def jit_step(loss, tx, state_shardings, devices):
    """One jitted update of ``trainable`` (params, or adapters) by ``tx``.

    ``loss(trainable, frozen, batch)``. Returns ``step(trainable, opt_state, frozen, batch)
    -> (trainable, opt_state, loss)`` with the state's shardings pinned, so the mesh
    layout never drifts between steps. The old state's buffers are donated.
    """

    def step(trainable, opt_state, frozen, batch):
        value, grads = jax.value_and_grad(loss)(trainable, frozen, batch)
        updates, opt_state = tx.update(grads, opt_state, trainable)
        return optax.apply_updates(trainable, updates), opt_state, value

    return jax.jit(
        step, donate_argnums=(0, 1), out_shardings=(*state_shardings, devices.replicated)
    )


def init_opt_state(tx, trainable, trainable_shardings, devices):
    """``tx.init`` with each moment sharded like the parameter it belongs to."""
    shardings = jlora.state_shardings(
        jax.eval_shape(tx.init, trainable), trainable, trainable_shardings
    )
    return jax.jit(tx.init, out_shardings=shardings)(trainable), shardings


def train(name, loss, tx, trainable, shardings, frozen, sample, steps, devices, args,
          on_eval=None, eval_every=0):
    """Run ``steps`` updates; returns the trained state and the per-step training losses."""
    opt_state, opt_shardings = init_opt_state(tx, trainable, shardings, devices)
    step = jit_step(loss, tx, (shardings, opt_shardings), devices)
    losses = []
    quiet = args.no_progress or jax.process_index() != 0
    bar = tqdm(range(steps), desc=name, disable=quiet, dynamic_ncols=True, leave=True)
    for i in bar:
        trainable, opt_state, value = step(trainable, opt_state, frozen, devices.batch(sample()))
        losses.append(value)
        if on_eval is not None and eval_every and ((i + 1) % eval_every == 0 or i + 1 == steps):
            on_eval(i + 1, trainable)
        if (i + 1) % 10 == 0 or i + 1 == steps:
            bar.set_postfix(loss=f"{float(value):.3f}")
    return trainable, [float(v) for v in losses]


def pretrain_base(config, args, devices, text):
    """Pretrained base params (numpy) and the pretraining loss curve, from cache if present."""
    key_data = dict(
        version=_CACHE_VERSION, model=dataclasses.asdict(config), steps=args.pretrain_steps,
        lr=args.pretrain_lr, batch=args.batch, seed=args.seed, bytes=int(len(text)),
        text_crc=hashlib.sha256(text[:: max(1, len(text) // 65536)].tobytes()).hexdigest(),
    )
    digest = hashlib.sha256(json.dumps(key_data, sort_keys=True).encode()).hexdigest()[:16]
    cache = Path(os.path.expanduser(args.cache_dir)) / f"finetune_lm_base_{digest}.msgpack"
    if not args.no_cache and cache.exists():
        blob = flax.serialization.msgpack_restore(cache.read_bytes())
        template = jax.eval_shape(lambda: init_params(config, args.seed))  # structure only
        params = flax.serialization.from_state_dict(template, blob["params"])
        return params, [float(x) for x in blob["losses"]], cache, True
    template = init_params(config, args.seed)

    loss_fn = make_loss(config)
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, args.pretrain_lr, min(50, args.pretrain_steps // 10 + 1), args.pretrain_steps,
        end_value=args.pretrain_lr / 10,
    )
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=0.01))
    shardings = devices.param_shardings(template)
    rng = np.random.default_rng([args.seed, 1])
    params, losses = train(
        "pretrain on stdlib .py", lambda p, _, b: loss_fn(p, b), tx,
        devices.put(template, shardings), shardings, None,
        lambda: data_lib.random_windows(rng, text, args.batch, config.seq_len + 1),
        args.pretrain_steps, devices, args,
    )
    params = devices.fetch(params)
    if not args.no_cache and jax.process_index() == 0:
        blob = {"params": flax.serialization.to_state_dict(params),
                "losses": np.asarray(losses, np.float32)}
        data_lib.write_atomic(cache, flax.serialization.msgpack_serialize(blob))
    return params, losses, cache, False


def lora_finetune(scaling, base, base_shardings, config, args, devices, train_text, heldout):
    """Fine-tune rank-``args.rank`` adapters with the given scaling; returns them and curves."""
    loss_fn = make_loss(config)
    lora_config = jlora.LoraConfig(
        rank=args.rank, alpha=args.alpha, scaling=scaling,
        targets=LORA_TARGETS, layouts=LORA_LAYOUTS,
    )
    key = jax.random.key(args.seed)
    abstract = jax.eval_shape(lambda p: jlora.init(key, p, lora_config), base)
    shardings = jlora.adapter_shardings(abstract, base_shardings)
    # Created directly in their shardings: no full copy of any factor on one device.
    adapters = jax.jit(jlora.init, static_argnums=2, out_shardings=shardings)(
        key, base, lora_config
    )

    # The factored transform: loss_fn(merge(params, adapters), batch), computed as
    # x·W + s·(x·A)·B, so no merged weight or weight-sized gradient is ever formed.
    factored_loss = jlora.lora(loss_fn)

    def loss(adapters, params, batch):
        return factored_loss(params, adapters, batch)

    evaluate = jax.jit(lambda ad, p, w: factored_loss(p, ad, w))
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, args.lr, min(10, args.steps // 10 + 1), args.steps, end_value=args.lr / 10
    )
    evals = [(0, float(evaluate(adapters, base, heldout)))]
    # Same seed for both scalings: both runs see exactly the same batches.
    rng = np.random.default_rng([args.seed, 2])
    adapters, losses = train(
        f"LoRA {scaling:>8}", loss, optax.adam(schedule), adapters, shardings, base,
        lambda: data_lib.random_windows(rng, train_text, args.batch, config.seq_len + 1),
        args.steps, devices, args, eval_every=args.eval_every,
        on_eval=lambda i, ad: evals.append((i, float(evaluate(ad, base, heldout)))),
    )
    return adapters, losses, evals


def smooth(values, width=10):
    values = np.asarray(values, float)
    if len(values) < width:
        return values
    kernel = np.ones(width) / width
    head = np.cumsum(values[: width - 1]) / np.arange(1, width)
    return np.concatenate([head, np.convolve(values, kernel, mode="valid")])


def plot(path: Path, pretrain_losses, runs, base_heldout, args):
    fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(11, 4), constrained_layout=True)
    ax0.plot(smooth(pretrain_losses), color="0.3")
    ax0.set(title="pretraining on stdlib .py", xlabel="step", ylabel="train loss (nats/byte)")
    colors = {"standard": "tab:blue", "rslora": "tab:orange"}
    for scaling, run in runs.items():
        label = "rsLoRA  alpha/sqrt(r)" if scaling == "rslora" else "standard  alpha/r"
        ax1.plot(smooth(run["train_losses"]), color=colors[scaling], alpha=0.5,
                 label=f"{label}: train")
        steps, values = zip(*run["heldout_curve"], strict=True)
        ax1.plot(steps, values, "o-", color=colors[scaling], label=f"{label}: held-out")
    ax1.axhline(base_heldout, color="0.3", ls="--", label="base model: held-out")
    ax1.set(title=f"LoRA on C headers (rank {args.rank}, alpha {args.alpha:g}, lr {args.lr:g})",
            xlabel="step", ylabel="loss (nats/byte)")
    ax1.legend(fontsize=8)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)

    data_lib.write_atomic(path, buf.getvalue())


def main(argv=None) -> dict:
    args = parse_args(argv)
    sizes = parse_mesh(args.mesh)
    t_start = time.perf_counter()

    if args.distributed:
        # Before any other jax call. With no arguments it reads the cluster environment
        # (Cloud TPU, SLURM, Open MPI, ...); the flags cover a hand-started cluster.
        jax.distributed.initialize(
            coordinator_address=args.coordinator_address,
            num_processes=args.num_processes, process_id=args.process_id,
        )

    main_process = jax.process_index() == 0
    say = print if main_process else (lambda *a, **k: None)
    per = math.lcm(sizes["data"], jax.process_count())
    if args.batch % per:
        raise SystemExit(f"--batch {args.batch} must divide evenly over data={sizes['data']} "
                         f"and {jax.process_count()} process(es).")
    if args.d_model % sizes["model"] or args.d_ff % sizes["model"]:
        raise SystemExit(f"--d-model {args.d_model} and --d-ff {args.d_ff} must divide by "
                         f"model={sizes['model']} (the tensor-parallel split).")
    devices = Devices(sizes)
    config = ModelConfig(d_model=args.d_model, n_heads=args.heads, n_layers=args.layers,
                         d_ff=args.d_ff, seq_len=args.seq_len)

    text, n_files = data_lib.stdlib_sources(args.pretrain_bytes, args.pretrain_dir)
    train_text, heldout_text, train_files, heldout_files = data_lib.header_split(
        args.finetune_dir
    )
    say(f"devices: {jax.device_count()} x {jax.devices()[0].platform}, mesh {sizes}, "
        f"{jax.process_count()} process(es)")
    say(f"pretraining text: {len(text):,} bytes from {n_files} stdlib .py files")
    say(f"fine-tuning text: {len(train_text):,} bytes from {len(train_files)} C headers; "
        f"held out: {len(heldout_text):,} bytes from {len(heldout_files)} other headers")

    t0 = time.perf_counter()
    host_base, pretrain_losses, cache, cached = pretrain_base(config, args, devices, text)
    t_pretrain = time.perf_counter() - t0
    if cached:
        say(f"loaded the cached base model from {cache}")
    else:
        say(f"pretrained the base model in {t_pretrain:.0f} s"
            + ("" if args.no_cache else f" and cached it at {cache}"))

    base_shardings = devices.param_shardings(host_base)
    base = devices.put(host_base, base_shardings)
    # Evaluation windows split evenly over data shards and processes.
    windows = data_lib.fixed_windows(heldout_text, config.seq_len + 1, args.eval_windows)
    windows = windows[: len(windows) // per * per]
    heldout = devices.batch(windows)
    loss_fn = make_loss(config)
    base_heldout = float(jax.jit(loss_fn)(base, heldout))

    runs, adapters_out, t_finetune = {}, {}, {}
    for scaling in ("standard", "rslora"):
        t0 = time.perf_counter()
        adapters, losses, evals = lora_finetune(
            scaling, base, base_shardings, config, args, devices, train_text, heldout
        )
        t_finetune[scaling] = time.perf_counter() - t0
        adapters_out[scaling] = adapters
        ad = next(iter(adapters.values()))
        runs[scaling] = dict(
            scale=ad.scale, heldout=evals[-1][1], heldout_curve=evals, train_losses=losses,
            seconds=round(t_finetune[scaling], 1),
        )

    out = Path(args.out)
    results = dict(
        command=" ".join(["python", "examples/finetune_lm.py", *(argv or sys.argv[1:])]),
        model=dataclasses.asdict(config), rank=args.rank, alpha=args.alpha, lr=args.lr,
        steps=args.steps, batch=args.batch, mesh=sizes, process_count=jax.process_count(),
        heldout_files=heldout_files, heldout_windows=len(windows),
        base_heldout=base_heldout, pretrain_cached=cached, pretrain_seconds=round(t_pretrain, 1),
        runs=runs,
    )
    files = {}
    host_adapters = {k: devices.fetch(v) for k, v in adapters_out.items()}
    if main_process:
        for scaling, ads in host_adapters.items():
            files[f"adapter_{scaling}"] = jlora.save(out / f"adapter_{scaling}", ads)
        files["plot"] = out / "loss_curves.png"
        plot(files["plot"], pretrain_losses, runs, base_heldout, args)
        results["seconds"] = round(time.perf_counter() - t_start, 1)
        files["results"] = out / "results.json"
        data_lib.write_atomic(files["results"], json.dumps(results, indent=1).encode())

    trainable = sum(a.num_params for a in adapters_out["rslora"].values())
    total = sum(math.prod(x.shape) for x in jax.tree.leaves(host_base))
    say("")
    say(f"held-out loss on {len(heldout_files)} unseen header files, {len(windows)} windows "
        f"(nats/byte, lower is better):")
    say(f"  base model (pretrained on stdlib .py)          {base_heldout:.4f}")
    for scaling, run in runs.items():
        name = "rsLoRA,   scale alpha/sqrt(r)" if scaling == "rslora" else \
            "standard, scale alpha/r      "
        say(f"  LoRA {name} = {run['scale']:<5.3g} {run['heldout']:.4f}   "
            f"({run['heldout'] - base_heldout:+.4f} vs base)")
    say(f"  rank {args.rank}, alpha {args.alpha:g}, lr {args.lr:g}, {args.steps} steps of "
        f"{args.batch} x {config.seq_len} bytes; {trainable:,} trainable of {total:,} params")
    say(f"time: {time.perf_counter() - t_start:.0f} s total, "
        f"pretraining {'(cached) ' if cached else ''}{t_pretrain:.0f} s, fine-tuning "
        + ", ".join(f"{k} {v:.0f} s" for k, v in t_finetune.items()))
    for name, path in files.items():
        say(f"wrote {name:17} {path}")
    return results


if __name__ == "__main__":
    main()
