"""A LoRA train step on a quantized frozen base (QLoRA) next to a bf16 base.

The model is the benchmarks' pre-LN transformer (``common.block``) written in plain JAX
over stacked layer params under ``lax.scan``; every dense layer reads its kernel through
``jlora.quantization.dequantize``, so one function runs on float, bf16 and quantized
params. Adapters (rank ``r``, float32) sit on all six kernels of every block, with ``B``
set non-zero so the adapted model differs from the base.

Rows:

============  ======================================================================
float32       the unquantized base: the reference for the output error
bf16          kernels stored in bf16 (the baseline for memory)
int8          int8, one scale per output channel
nf4           NF4, blocks of 64, float32 block scales
nf4+dq        NF4 with double quantization of the block scales (QLoRA)
nf4 naive     NF4 base, but the step differentiates ``f(jlora.merge(params, adapters))``
              instead of ``jlora.lora(f)``: every float kernel is formed in the step
============  ======================================================================

Columns: bytes of the base's kernels; XLA's memory analysis of the compiled train step
(``value_and_grad`` w.r.t. the adapters plus an Adam update; arguments = base params,
adapters, optimizer state and the batch; temp = everything else it allocates), the
argument bytes as a ratio to the bf16 row; the kernels' RMS error relative to the
float32 kernels; and the relative output error of the adapted model against the same
adapters on the float32 base, ``‖y - y_f32‖ / ‖y_f32‖`` over the batch.

Usage::

  python benchmarks/bench_quantized.py --small    # seconds: tiny shapes
  python benchmarks/bench_quantized.py            # the documented table (a minute or two)
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

import jax
import jax.numpy as jnp
import optax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402

import jlora  # noqa: E402
from jlora import quantization as Q  # noqa: E402

MEDIUM = common.ModelConfig(d_model=512, heads=8, mlp=2048, layers=4, seq=128, batch=4,
                            rank=16, alpha=32.0)


def init_params(cfg: common.ModelConfig, key) -> dict:
    """Float32 params of ``cfg.layers`` stacked blocks: ``{name: {kernel, bias}}``."""
    d, f, n = cfg.d_model, cfg.mlp, cfg.layers
    shapes = {"query": (d, d), "key": (d, d), "value": (d, d), "out": (d, d),
              "up": (d, f), "down": (f, d)}
    params = {}
    for i, (name, (fi, fo)) in enumerate(shapes.items()):
        w = jax.random.normal(jax.random.fold_in(key, i), (n, fi, fo)) / jnp.sqrt(fi)
        params[name] = {"kernel": w, "bias": jnp.zeros((n, fo))}
    for name in ("ln_attn", "ln_mlp"):
        params[name] = {"scale": jnp.ones((n, d)), "bias": jnp.zeros((n, d))}
    return {"layers": params}


def apply(cfg: common.ModelConfig, params: dict, x: jax.Array) -> jax.Array:
    """The stack under ``lax.scan``; kernels read through ``dequantize`` (float or not)."""

    def layer(h, p):
        def dense(name, h, _):
            w = Q.dequantize(p[name]["kernel"])
            return (h @ w.astype(h.dtype)) + p[name]["bias"]

        def norm(name, h):
            mean = h.mean(-1, keepdims=True)
            var = jnp.square(h - mean).mean(-1, keepdims=True)
            return (h - mean) * jax.lax.rsqrt(var + 1e-6) * p[name]["scale"] + p[name]["bias"]

        return common.block(cfg, h, dense, norm), None

    return jax.lax.scan(layer, x, params["layers"])[0]


def base_variant(params: dict, kind: str) -> dict:
    """The base params stored as ``kind``: float32, bf16 or a quantization scheme."""
    if kind == "float32":
        return params
    bf16 = jax.tree.map(lambda w: w.astype(jnp.bfloat16), params)
    kernels = r"layers/.*/kernel"
    if kind == "bf16":
        return jlora.tree_map_with_path(
            lambda p, w, b: b if p.endswith("/kernel") else w, params, bf16)
    floats = jlora.tree_map_with_path(
        lambda p, w, b: b if p.endswith("/kernel") else w, params, bf16)
    scheme, dq = {"int8": ("int8", False), "nf4": ("nf4", False), "nf4+dq": ("nf4", True),
                  "nf4 naive": ("nf4", False)}[kind]
    return Q.quantize_params(floats, scheme, targets=kernels, layouts={"layers/.*": "s..."},
                             double_quant=dq)


def kernel_bytes(params: dict) -> int:
    flat = jlora.select(params, r".*/kernel")
    return sum(x.nbytes if Q.is_quantized(x) else x.size * x.dtype.itemsize
               for x in flat.values())


def adapters_for(params: dict, cfg: common.ModelConfig, key) -> dict:
    config = jlora.LoraConfig(rank=cfg.rank, alpha=cfg.alpha, targets=common.TARGETS,
                              layouts=common.LAYOUTS)
    ads = jlora.init(key, params, config)
    # Non-zero B so the adapted model is not the base.
    return {p: a.replace(b=0.02 * jax.random.normal(jax.random.fold_in(key, i), a.b.shape))
            for i, (p, a) in enumerate(sorted(ads.items()))}


def train_step(cfg, optimizer, naive: bool):
    forward = (lambda p, a, x: apply(cfg, jlora.merge(p, a), x)) if naive else (
        jlora.lora(lambda p, x: apply(cfg, p, x)))

    def step(params, adapters, opt_state, x):
        loss, grads = jax.value_and_grad(
            lambda a: common.loss_of(forward(params, a, x), x))(adapters)
        updates, opt_state = optimizer.update(grads, opt_state, adapters)
        return optax.apply_updates(adapters, updates), opt_state, loss

    return step


def kernel_error(base: dict, params: dict) -> float:
    """RMS of (stored - float32 kernel) over RMS of the float32 kernels, all kernels."""
    got = jlora.select(base, r".*/kernel")
    want = jlora.select(params, r".*/kernel")
    num = sum(float(jnp.sum(jnp.square(Q.dequantize(got[p]).astype(jnp.float32) - w)))
              for p, w in want.items())
    den = sum(float(jnp.sum(jnp.square(w))) for w in want.values())
    return (num / den) ** 0.5


def rel_error(y, ref) -> float:
    y, ref = jnp.asarray(y, jnp.float32), jnp.asarray(ref, jnp.float32)
    return float(jnp.linalg.norm(y - ref) / jnp.linalg.norm(ref))


def run(cfg: common.ModelConfig) -> None:
    key = jax.random.key(0)
    params = init_params(cfg, key)
    x = common.inputs(cfg, jax.random.key(1))
    adapters = adapters_for(params, cfg, jax.random.key(2))
    optimizer = optax.adam(1e-3)
    opt_state = optimizer.init(adapters)
    forward = jax.jit(jlora.lora(lambda p, x: apply(cfg, p, x)))
    reference = forward(params, adapters, x)
    rows, figures = [], {}
    for kind in ("float32", "bf16", "int8", "nf4", "nf4+dq", "nf4 naive"):
        base = base_variant(params, kind)
        step = common.compile_step(train_step(cfg, optimizer, kind == "nf4 naive"),
                                   base, adapters, opt_state, x)
        figures[kind] = step
        err = rel_error(forward(base, adapters, x), reference)
        rows.append([kind, kernel_bytes(base), step.argument_bytes, step.temp_bytes,
                     kernel_error(base, params), err])
    bf16_args = figures["bf16"].argument_bytes
    mib = 2**20
    table = [
        [kind, f"{kb / mib:.1f}", f"{args / mib:.1f}", f"{args / bf16_args:.2f}",
         f"{temp / mib:.1f}", f"{kerr:.2e}", f"{err:.2e}"]
        for kind, kb, args, temp, kerr, err in rows
    ]
    print(f"# QLoRA train step: {cfg.describe().replace('nn.scan', 'lax.scan')}")
    print(f"# {common.device_info()}")
    print(common.markdown_table(
        ["base", "kernels MiB", "step args MiB", "args / bf16", "step temp MiB",
         "kernel rel. error", "output rel. error"], table))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--small", action="store_true", help="tiny shapes (seconds)")
    parser.add_argument("--layers", type=int, default=None)
    args = parser.parse_args(argv)
    cfg = common.SMALL if args.small else MEDIUM
    if args.layers:
        cfg = dataclasses.replace(cfg, layers=args.layers)
    run(cfg)


if __name__ == "__main__":
    main()
