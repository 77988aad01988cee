"""The rsLoRA result, measured: how the adapter's learning depends on rank under each scaling.

rsLoRA (Kalajdzievski 2023, arXiv 2312.03732) argues that LoRA's standard scale
``alpha / r`` makes learning collapse as the rank grows, and that ``alpha / sqrt(r)``
keeps it stable. For ranks 1, 2, 4, ..., 256, both scalings, the same alpha and several
seeds, this script measures:

(a) at step 0, the gradient norm with respect to B and the size of the first update to
    the effective weight ``s·A·B`` (one SGD step and one Adam step), with their log-log
    slopes against rank. With B = 0 at init the gradient with respect to A is exactly
    zero (dL/dA = s·G·Bᵀ), so the B gradient is the one that carries the signal:
    dL/dB = s·Aᵀ·G with G = dL/dW. ‖Aᵀ·G‖² is a sum of r independent terms (one per
    column of A), so ‖dL/dB‖ ~ s·sqrt(r): slope -1/2 for alpha/r, 0 for alpha/sqrt(r),
    the rsLoRA paper's prediction. The first-order loss decrease of an SGD step,
    lr·‖dL/dB‖², follows as s²·r (slopes -1 and 0). The *norm* of the weight change is
    another matter: see :func:`predicted_slopes` for its finite-width prediction.
(b) the loss after N Adam steps at each rank, (i) at one fixed learning rate and (ii) at
    the best learning rate of a small grid for each rank. If rsLoRA's advantage at high
    rank survives (ii), it is capacity; if per-rank tuning of the learning rate closes it,
    it was the larger effective step.

Tasks:

* ``--task linear`` (default, a few minutes on 2 CPU cores): adapt a 256x256 linear
  layer W0 to a target W0 + ΔW whose singular values decay as k^-1/2 (full rank), from
  minibatches of Gaussian inputs (loss E‖(W - W*)ᵀx‖², which starts at 1). The best
  rank-r fit leaves Σ_{k>r} σ_k² (Eckart-Young): the capacity floor is known exactly.
* ``--task lm``: the byte-level transformer of ``finetune_lm.py`` (its cached base, or
  pretrained now), fine-tuned on the Python C headers; held-out loss on unseen headers.
  Its kernels are d_model wide, so ranks stop at d_model.

See docs/rank_sweep.md for measured results and what they do and do not show.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import math
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import matplotlib
import numpy as np
import optax
from tqdm.auto import tqdm

import jlora

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the _lm_* helpers
from _lm_data import write_atomic  # noqa: E402

SCALINGS = ("standard", "rslora")
METRICS = {
    "grad_b": "‖dL/dB‖ at step 0",
    "sgd_update": "‖ΔW‖ after one SGD step (lr=1)",
    "adam_update": "‖ΔW‖ after one Adam step (lr=1)",
}


def predicted_slopes(ranks, fan_in: int) -> dict:
    """Log-log slopes the argument of the module docstring predicts over these ranks.

    ‖dL/dB‖ ~ s·sqrt(r). After one SGD step ‖ΔW‖ ~ s²·sqrt(r·(r + fan_in)): A·Aᵀ has
    mean r·σ²·I and fluctuations of size sqrt(r·fan_in)·σ², so the slope of ‖A·Aᵀ·G‖
    runs from 1/2 at r << fan_in to 1. After one Adam step (B moves by about lr·sign(g))
    ‖ΔW‖ ~ s·sqrt(r·(fan_in + 2(r-1)/π)): the r·fan_in diagonal terms of ‖A·sign(Aᵀg)‖²
    plus the r² cross terms the signs correlate, each 2σ²/π.
    """
    r = np.asarray(ranks, float)
    scale = {"standard": 1 / r, "rslora": 1 / np.sqrt(r)}
    curves = {
        "grad_b": lambda s: s * np.sqrt(r),
        "sgd_update": lambda s: s**2 * np.sqrt(r * (r + fan_in)),
        "adam_update": lambda s: s * np.sqrt(r * (fan_in + 2 * (r - 1) / np.pi)),
    }
    return {m: {k: loglog_slope(r, f(v)) for k, v in scale.items()} for m, f in curves.items()}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--task", choices=("linear", "lm"), default="linear")
    p.add_argument("--ranks", default="1,2,4,8,16,32,64,128,256",
                   help="comma-separated; ranks above the task's largest are dropped")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--alpha", type=float, default=8.0, help="the same alpha for every run")
    p.add_argument("--steps", type=int, default=200, help="Adam steps in part (b)")
    p.add_argument("--lr", type=float, default=None,
                   help="the fixed learning rate of (b); default 1e-3 (linear), 2e-3 (lm)")
    p.add_argument("--lr-grid", default="0.25,0.5,1,2,4,8,16",
                   help="multipliers of --lr tried at every rank in (b)")
    p.add_argument("--batch", type=int, default=None, help="default 64 (linear), 16 (lm)")
    p.add_argument("--dim", type=int, default=256, help="linear task: width of the layer")
    p.add_argument("--decay", type=float, default=0.5,
                   help="linear task: target singular values decay as k^-decay")
    p.add_argument("--skip-training", action="store_true", help="only part (a)")
    p.add_argument("--out", default=os.path.join("runs", "rank_sweep"))
    p.add_argument("--cache-dir", default=os.path.join("~", ".cache", "jlora"),
                   help="lm task: where finetune_lm.py caches its base model")
    args = p.parse_args(argv)
    args.ranks = sorted({int(r) for r in args.ranks.split(",")})
    args.lr_grid = [float(m) for m in args.lr_grid.split(",")]
    if args.lr is None:
        args.lr = 1e-3 if args.task == "linear" else 2e-3
    if args.batch is None:
        args.batch = 32 if args.task == "linear" else 16
    return args


@dataclasses.dataclass
class Task:
    """What the sweep needs from a task; every function is jax-traceable."""
    description: str
    params: Any
    targets: str
    layouts: dict
    loss: Callable  # (params, batch) -> scalar training loss
    sample: Callable  # (key) -> batch
    evaluate: Callable  # (params) -> scalar evaluation loss
    max_rank: int
    fan_in: int  # of the adapted kernels (the finite-width term of the SGD prediction)
    floor: Callable[[int], float] | None = None  # best loss reachable at a rank


def linear_task(args) -> Task:

    d = args.dim
    rng = np.random.default_rng(1234)  # the task is fixed; --seeds vary init and batches
    w0 = rng.normal(size=(d, d)) / math.sqrt(d)
    u, _ = np.linalg.qr(rng.normal(size=(d, d)))
    v, _ = np.linalg.qr(rng.normal(size=(d, d)))
    sigma = np.arange(1, d + 1, dtype=float) ** -args.decay
    sigma /= np.linalg.norm(sigma)  # ‖ΔW‖_F = 1: the loss starts at 1
    w_star = jnp.asarray(w0 + (u * sigma) @ v.T, jnp.float32)
    tail = np.concatenate([np.cumsum((sigma**2)[::-1])[::-1], [0.0]])

    def loss(params, x):
        # x @ W - x @ W*, not x @ (W - W*): the factored transform rewrites x @ W only.
        err = x @ params["dense"]["kernel"] - x @ w_star
        return jnp.mean(jnp.sum(err**2, axis=-1))

    return Task(
        description=(f"linear {d}x{d} layer, target update with singular values ~ "
                     f"k^-{args.decay:g} (full rank), Gaussian inputs, batch {args.batch}; "
                     "evaluation = exact expected loss ‖W - W*‖_F² (1.0 at init)"),
        params={"dense": {"kernel": jnp.asarray(w0, jnp.float32)}},
        targets="dense/kernel", layouts={}, loss=loss,
        sample=lambda key: jax.random.normal(key, (args.batch, d)),
        evaluate=lambda params: jnp.sum((params["dense"]["kernel"] - w_star) ** 2),
        max_rank=d, fan_in=d, floor=lambda r: float(tail[r]),
    )


def lm_task(args) -> Task:
    import _lm_data as data_lib
    import finetune_lm
    from _lm_model import LORA_LAYOUTS, LORA_TARGETS, ModelConfig, make_loss

    # finetune_lm's default model and pretraining: the same cache entry as its default run.
    ft = finetune_lm.parse_args(["--cache-dir", args.cache_dir])
    config = ModelConfig(d_model=ft.d_model, n_heads=ft.heads, n_layers=ft.layers,
                         d_ff=ft.d_ff, seq_len=ft.seq_len)
    text, _ = data_lib.stdlib_sources(ft.pretrain_bytes, ft.pretrain_dir)
    devices = finetune_lm.Devices({"data": 1, "model": 1})
    base, _, cache, cached = finetune_lm.pretrain_base(config, ft, devices, text)
    print(("loaded the cached base model " if cached else "pretrained the base model, cached at ")
          + str(cache))
    train_text, heldout_text, _, heldout_files = data_lib.header_split(ft.finetune_dir)
    heldout = jnp.asarray(data_lib.fixed_windows(heldout_text, config.seq_len + 1, 64))
    train_text = jnp.asarray(train_text, jnp.int32)
    loss_fn = make_loss(config)
    length = config.seq_len + 1

    def sample(key):
        starts = jax.random.randint(key, (args.batch,), 0, train_text.shape[0] - length)
        return train_text[starts[:, None] + jnp.arange(length)]

    return Task(
        description=(f"byte-level transformer of finetune_lm.py (d_model {config.d_model}, "
                     f"{config.n_layers} layers), LoRA on attention+MLP kernels, C headers, "
                     f"batch {args.batch}; evaluation = loss on 64 windows of "
                     f"{len(heldout_files)} held-out headers (nats/byte)"),
        params=jax.tree.map(jnp.asarray, base), targets=LORA_TARGETS, layouts=LORA_LAYOUTS,
        loss=loss_fn, sample=sample, evaluate=lambda params: loss_fn(params, heldout),
        max_rank=config.d_model, fan_in=config.d_model,
    )


def lora_config(task: Task, rank: int, scaling: str, alpha: float):

    return jlora.LoraConfig(rank=rank, alpha=alpha, scaling=scaling, targets=task.targets,
                            layouts=task.layouts)


def global_norm(tree) -> Any:

    return jnp.sqrt(sum(jnp.sum(x.astype(jnp.float32) ** 2) for x in jax.tree.leaves(tree)))


def step0(task: Task, rank: int, scaling: str, alpha: float, seeds: np.ndarray) -> dict:
    """Part (a) for one rank and scaling, vmapped over seeds."""
    config = lora_config(task, rank, scaling, alpha)
    loss = jlora.lora(task.loss)

    def one(seed):
        key = jax.random.key(seed)
        adapters = jlora.init(key, task.params, config)
        grads = jax.grad(lambda ad: loss(task.params, ad, task.sample(jax.random.fold_in(key, 1)))
                         )(adapters)
        adam, _ = optax.scale_by_adam().update(grads, optax.scale_by_adam().init(adapters))
        # B = 0, so after one step with B-update U the effective weight moved by s·A·U.
        moved = lambda upd: global_norm(jlora.delta({
            p: ad.replace(b=upd[p].b) for p, ad in adapters.items()}))
        return dict(
            grad_a=global_norm({p: g.a for p, g in grads.items()}),
            grad_b=global_norm({p: g.b for p, g in grads.items()}),
            sgd_update=moved(grads), adam_update=moved(adam),
        )

    return {k: np.asarray(v) for k, v in jax.jit(jax.vmap(one))(seeds).items()}


def train_runs(task: Task, rank: int, scaling: str, args, lrs: np.ndarray, seeds: np.ndarray):
    """Part (b) for one rank and scaling: N Adam steps for every (lr, seed), in one jit.

    Returns evaluation losses ``(len(lrs), len(seeds))`` and the training-loss curves
    ``(len(lrs), len(seeds), steps)``. For a given seed every learning rate sees the same
    initial factors and the same batches.
    """
    config = lora_config(task, rank, scaling, args.alpha)
    loss = jlora.lora(task.loss)
    adam = optax.scale_by_adam()

    def one(lr, seed):
        key = jax.random.key(seed)
        adapters = jlora.init(key, task.params, config)

        def body(carry, k):
            ad, state = carry
            value, grads = jax.value_and_grad(lambda a: loss(task.params, a, task.sample(k)))(ad)
            updates, state = adam.update(grads, state)
            return (jax.tree.map(lambda p, u: p - lr * u, ad, updates), state), value

        keys = jax.random.split(jax.random.fold_in(key, 1), args.steps)
        (adapters, _), curve = jax.lax.scan(body, (adapters, adam.init(adapters)), keys)
        final = task.evaluate(jlora.merge(task.params, adapters))
        return final, curve

    run = jax.jit(jax.vmap(jax.vmap(one, (None, 0)), (0, None)))
    final, curves = run(lrs, seeds)
    return np.asarray(final), np.asarray(curves)


def loglog_slope(ranks, values) -> float:
    return float(np.polyfit(np.log(ranks), np.log(values), 1)[0])


def plot_step0(path: Path, ranks, results, slopes, task_name):
    fig, axes = plt.subplots(1, 3, figsize=(14, 4), constrained_layout=True)
    for ax, (metric, title) in zip(axes, METRICS.items(), strict=True):
        for scaling, color in zip(SCALINGS, ("tab:blue", "tab:orange"), strict=True):
            vals = results[scaling][metric]  # (ranks, seeds)
            fit = slopes[metric][scaling]
            ax.errorbar(ranks, vals.mean(1), yerr=vals.std(1), fmt="o-", color=color,
                        capsize=3, label=f"{scaling}: slope {fit['mean_curve']:+.3f} "
                                         f"(predicted {fit['predicted']:+.3f})")
        ax.set(xscale="log", yscale="log", xlabel="rank", title=title)
        ax.legend(fontsize=8)
    fig.suptitle(f"(a) step 0 versus rank, {task_name} task")
    _save(fig, path)


def plot_training(path: Path, ranks, fixed, best, floor, args, task_name):
    fig, ax = plt.subplots(figsize=(7, 4.5), constrained_layout=True)
    for scaling, color in zip(SCALINGS, ("tab:blue", "tab:orange"), strict=True):
        m, s = fixed[scaling]
        ax.errorbar(ranks, m, yerr=s, fmt="o--", color=color, capsize=3,
                    label=f"{scaling}, fixed lr {args.lr:g}")
        m, s, _ = best[scaling]
        ax.errorbar(ranks, m, yerr=s, fmt="s-", color=color, capsize=3,
                    label=f"{scaling}, best lr of the grid per rank")
    if floor is not None:  # zero at full rank: off a log axis
        keep = [i for i, f in enumerate(floor) if f > 0]
        ax.plot([ranks[i] for i in keep], [floor[i] for i in keep], "k:",
                label="best possible at this rank (Eckart-Young)")
    ax.set(xscale="log", yscale="log" if floor else "linear", xlabel="rank",
           ylabel=f"evaluation loss (mean ± std of {args.seeds} seeds)",
           title=f"(b) loss after {args.steps} Adam steps, alpha {args.alpha:g}, {task_name} task")
    ax.legend(fontsize=8)
    _save(fig, path)


def _save(fig, path: Path):

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    write_atomic(path, buf.getvalue())


def main(argv=None) -> dict:
    args = parse_args(argv)
    t_start = time.perf_counter()

    task = linear_task(args) if args.task == "linear" else lm_task(args)
    ranks = [r for r in args.ranks if r <= task.max_rank]
    if dropped := [r for r in args.ranks if r > task.max_rank]:
        print(f"dropped ranks {dropped}: above min(fan-in, fan-out) = {task.max_rank}")
    seeds = np.arange(args.seeds)
    lrs = args.lr * np.asarray(args.lr_grid)
    print(f"task: {task.description}")
    print(f"ranks {ranks}, alpha {args.alpha:g}, {args.seeds} seeds")

    # (a) step 0 -----------------------------------------------------------------------
    step0_results = {s: {} for s in SCALINGS}
    for scaling in SCALINGS:
        per_rank = [step0(task, r, scaling, args.alpha, seeds) for r in ranks]
        for metric in per_rank[0]:
            step0_results[scaling][metric] = np.stack([x[metric] for x in per_rank])
    predicted = predicted_slopes(ranks, task.fan_in)
    slopes = {
        metric: {
            s: {
                "mean_curve": loglog_slope(ranks, step0_results[s][metric].mean(1)),
                "per_seed": [loglog_slope(ranks, v) for v in step0_results[s][metric].T],
                "predicted": predicted[metric][s],
            } for s in SCALINGS
        } for metric in METRICS
    }
    print("\n(a) step 0: log-log slope against rank, measured on the mean over seeds "
          "[per-seed min..max] (predicted)")
    print(f"  {'quantity':32} {'standard alpha/r':>32} {'rsLoRA alpha/sqrt(r)':>32}")
    for metric, label in METRICS.items():
        cells = []
        for s in SCALINGS:
            d = slopes[metric][s]
            cells.append(f"{d['mean_curve']:+.3f} [{min(d['per_seed']):+.3f}.."
                         f"{max(d['per_seed']):+.3f}] ({d['predicted']:+.3f})")
        print(f"  {label:32} {cells[0]:>32} {cells[1]:>32}")
    max_grad_a = max(float(step0_results[s]["grad_a"].max()) for s in SCALINGS)
    print(f"  ‖dL/dA‖ at step 0, largest over all runs: {max_grad_a:.3g} (B = 0 makes it 0)")

    out = Path(args.out)
    files = {"step0_plot": out / f"step0_{args.task}.png"}
    plot_step0(files["step0_plot"], ranks, step0_results, slopes, args.task)
    results = dict(
        command=" ".join(["python", "examples/rank_sweep.py", *(argv or sys.argv[1:])]),
        task=task.description, ranks=ranks, alpha=args.alpha, seeds=args.seeds,
        step0={s: {m: v.tolist() for m, v in step0_results[s].items()} for s in SCALINGS},
        step0_slopes=slopes,
    )

    # (b) N Adam steps -----------------------------------------------------------------
    if not args.skip_training:

        final = {s: [] for s in SCALINGS}
        jobs = [(s, r) for s in SCALINGS for r in ranks]
        for scaling, rank in tqdm(jobs, desc=f"(b) {args.steps} Adam steps x "
                                             f"{len(lrs)} lrs x {len(seeds)} seeds"):
            f, _ = train_runs(task, rank, scaling, args, lrs, seeds)
            final[scaling].append(f)  # (lrs, seeds)
        fixed_i = int(np.argmin(np.abs(lrs - args.lr)))
        fixed, best = {}, {}
        for s in SCALINGS:
            f = np.stack(final[s])  # (ranks, lrs, seeds)
            fixed[s] = (f[:, fixed_i].mean(1), f[:, fixed_i].std(1))
            bi = np.argmin(np.nan_to_num(f.mean(2), nan=np.inf), axis=1)
            best[s] = (f[np.arange(len(ranks)), bi].mean(1), f[np.arange(len(ranks)), bi].std(1),
                       lrs[bi])
        floor = [task.floor(r) for r in ranks] if task.floor else None
        print(f"\n(b) evaluation loss after {args.steps} Adam steps (mean over {args.seeds} "
              "seeds); lr grid " + ", ".join(f"{x:g}" for x in lrs))
        head = f"  {'rank':>5} {'std @fixed':>11} {'rs @fixed':>11} {'std @best':>11} " \
               f"{'(lr)':>8} {'rs @best':>11} {'(lr)':>8}"
        print(head + (f" {'floor':>8}" if floor else ""))
        # '*': the best learning rate is at the edge of the grid, so the true best may lie
        # outside it (widen --lr-grid before concluding anything from that rank).
        edge = lambda lr: "*" if lr in (lrs.min(), lrs.max()) else " "
        for i, r in enumerate(ranks):
            row = (f"  {r:>5} {fixed['standard'][0][i]:>11.4g} {fixed['rslora'][0][i]:>11.4g} "
                   f"{best['standard'][0][i]:>11.4g} {best['standard'][2][i]:>7.2g}"
                   f"{edge(best['standard'][2][i])} {best['rslora'][0][i]:>11.4g} "
                   f"{best['rslora'][2][i]:>7.2g}{edge(best['rslora'][2][i])}")
            print(row + (f" {floor[i]:>8.4g}" if floor else ""))
        print("  (* best learning rate at the edge of the grid)")
        files["training_plot"] = out / f"training_{args.task}.png"
        plot_training(files["training_plot"], ranks, fixed, best, floor, args, args.task)
        results["training"] = dict(
            steps=args.steps, batch=args.batch, fixed_lr=args.lr, lrs=lrs.tolist(),
            final={s: np.stack(final[s]).tolist() for s in SCALINGS},
            fixed={s: {"mean": fixed[s][0].tolist(), "std": fixed[s][1].tolist()}
                   for s in SCALINGS},
            best={s: {"mean": best[s][0].tolist(), "std": best[s][1].tolist(),
                      "lr": best[s][2].tolist()} for s in SCALINGS},
            floor=floor,
        )

    results["seconds"] = round(time.perf_counter() - t_start, 1)
    files["results"] = out / f"results_{args.task}.json"
    write_atomic(files["results"], json.dumps(results, indent=1).encode())
    print(f"\ntime: {results['seconds']:.0f} s")
    for name, path in files.items():
        print(f"wrote {name:14} {path}")
    return results


if __name__ == "__main__":
    main()
