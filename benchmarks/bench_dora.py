"""The DoRA train step against plain LoRA: FLOPs and memory from XLA, wall-clock medians.

PEFT users report DoRA steps about 2× slower than LoRA: PEFT forms the ``(out, in)``
product ``B·A`` every step to take the column norms of ``W + s·B·A``. jlora's factored
transform never forms it: each output feature's norm is expanded as
``‖w_j‖² + 2s·(Wᵀ A B)_jj + s²·‖(A B)_j‖²`` (:func:`jlora.variants.dora_norm`), a
``Aᵀ W`` product of ``in·out·r`` FLOPs on the frozen kernel and no ``(in, out)``
temporary besides ``W``; the norm is a constant in the backward pass, as in PEFT.

A step is ``jax.value_and_grad`` of a regression loss with respect to the adapters, on
a stack of dense layers (``tanh`` between them). Rows:

============  ============================================================
lora          ``jlora.lora(f)``, plain LoRA (the reference for every ratio)
dora          ``jlora.lora(f)`` with ``variant="dora"``
dora merged   ``f(jlora.merge(params, adapters))`` with DoRA: the merged path,
              what a PEFT-style step computes (``W + s·A·B`` formed)
lora merged   ``f(jlora.merge(params, adapters))``, plain LoRA
============  ============================================================

The ``check`` column compares each row's loss and adapter gradients with its merged
counterpart (the factored DoRA step must equal the merged DoRA step).

Usage::

  python benchmarks/bench_dora.py --small      # seconds: tiny shapes
  python benchmarks/bench_dora.py              # 4 layers, d=1024, 512 tokens, rank 16
"""

from __future__ import annotations

import argparse
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402

import jlora  # noqa: E402

ROWS = ("lora", "dora", "dora merged", "lora merged")
REFERENCE = {"lora": "lora merged", "dora": "dora merged"}


def model(params, x):
    """A stack of dense layers with tanh between them."""
    n = len(params)
    for i in range(n):
        x = x @ params[f"layer{i}"]["kernel"]
        if i < n - 1:
            x = jnp.tanh(x)
    return x


def make_setup(layers: int, d: int, tokens: int, rank: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    params = {
        f"layer{i}": {"kernel": jnp.asarray(rng.standard_normal((d, d)) / np.sqrt(d), jnp.float32)}
        for i in range(layers)
    }
    x = jnp.asarray(rng.standard_normal((tokens, d)), jnp.float32)
    y = jnp.asarray(rng.standard_normal((tokens, d)), jnp.float32)
    adapters = {}
    for variant in ("lora", "dora"):
        config = jlora.LoraConfig(rank=rank, alpha=float(rank), scaling="rslora", variant=variant)
        ads = jlora.init(jax.random.key(1), params, config)
        # B non-zero (as after some training) so the adapter branch and the norm matter.
        adapters[variant] = {
            p: ad.replace(b=jnp.asarray(0.01 * rng.standard_normal(ad.b.shape), jnp.float32))
            for p, ad in ads.items()
        }
    return params, x, y, adapters


def step_fns():
    # Params and data are arguments, not closed-over constants, so XLA's memory analysis
    # counts them the same way in every row.
    def loss_factored(adapters, params, x, y):
        return jnp.mean(jnp.square(jlora.lora(model)(params, adapters, x) - y))

    def loss_merged(adapters, params, x, y):
        return jnp.mean(jnp.square(model(jlora.merge(params, adapters), x) - y))

    return {
        "lora": (jax.value_and_grad(loss_factored), "lora"),
        "dora": (jax.value_and_grad(loss_factored), "dora"),
        "dora merged": (jax.value_and_grad(loss_merged), "dora"),
        "lora merged": (jax.value_and_grad(loss_merged), "lora"),
    }


def flat_grads(out) -> dict:
    loss, grads = out
    flat = {"loss": loss}
    for path, ad in grads.items():
        for field in ("a", "b", "magnitude"):
            value = getattr(ad, field)
            if value is not None:
                flat[f"{path}.{field}"] = value
    return flat


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--d", type=int, default=1024, help="width of every dense layer")
    parser.add_argument("--tokens", type=int, default=512, help="rows of the input batch")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=15, help="timed steps per row")
    parser.add_argument("--small", action="store_true", help="tiny shapes, a few repeats")
    args = parser.parse_args(argv)
    if args.small:
        args.layers, args.d, args.tokens, args.rank, args.repeats = 2, 128, 64, 4, 5

    print(common.device_info())
    print(f"{args.layers} dense layers {args.d}x{args.d}, {args.tokens} tokens, rank "
          f"{args.rank}, float32; step = value_and_grad w.r.t. the adapters\n")
    params, x, y, adapters = make_setup(args.layers, args.d, args.tokens, args.rank)
    fns = step_fns()

    compiled, call_args, outputs = {}, {}, {}
    for row in ROWS:
        fn, variant = fns[row]
        call_args[row] = [adapters[variant], params, x, y]
        compiled[row] = common.compile_step(fn, *call_args[row])
        outputs[row] = flat_grads(compiled[row].fn(*call_args[row]))  # also warms up
    # Rows interleaved within each repetition, so load drift on a shared machine hits all
    # rows alike; wall ratios are taken per repetition, then their median.
    times = {row: [] for row in ROWS}
    for _ in range(args.repeats):
        for row in ROWS:
            times[row] += common.time_calls(compiled[row].fn, call_args[row], 1)
    stats = {row: (compiled[row], times[row]) for row in ROWS}

    # "total" = temp + arguments (params, data, adapters) + outputs; "temp" is what the
    # step itself allocates.
    base_c, base_t = stats["lora"]
    header = ["step", "GFLOP", "× lora", "temp MiB", "× lora", "total MiB", "wall ms",
              "× lora", "check"]
    rows = []
    for row in ROWS:
        c, t = stats[row]
        ref = REFERENCE.get(row)
        check = f"{common.max_rel_diff(outputs[row], outputs[ref]):.1e}" if ref else "-"
        wall_ratio = common.median([a / b for a, b in zip(t, base_t, strict=True)])
        rows.append([
            row, f"{c.flops / 1e9:.3f}", f"{c.flops / base_c.flops:.3f}",
            f"{c.temp_bytes / 2**20:.1f}", f"{c.temp_bytes / base_c.temp_bytes:.2f}",
            f"{c.total_bytes / 2**20:.1f}",
            f"{1e3 * common.median(t):.2f}", f"{wall_ratio:.2f}", check,
        ])
    print(common.markdown_table(header, rows))
    flops_extra = stats["dora"][0].flops - base_c.flops
    analytic = args.layers * (2 * args.d * args.d * args.rank + 2 * args.d * args.d)
    print(f"\nDoRA's extra FLOPs over LoRA: {flops_extra / 1e9:.4f} GFLOP "
          f"(the norm's Aᵀ·W and ‖w_j‖² alone: {analytic / 1e9:.4f} GFLOP).")


if __name__ == "__main__":
    main()
