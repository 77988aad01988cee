"""A LoRA train step on a quantized frozen base (QLoRA) next to the same step on a bf16
base, on the unchanged train-step benchmark model.

The model is ``common.Transformer``: linen ``nn.Dense`` and ``nn.LayerNorm`` layers in
pre-LN blocks under ``nn.scan``, as ``bench_train_step.py`` measures it. Its code reads
every kernel as an array and knows nothing of quantization: ``jlora.lora(apply)`` runs it
on params whose kernels are ``QuantizedKernel`` s, dequantizing each where a dot consumes
it (one layer at a time, again in the backward pass). Adapters (float32, rank ``r``) sit
on all six kernels of every block, with ``B`` non-zero.

Rows (the base kernels; biases and norms stay float32):

==============  ==========================================================================
bf16            kernels stored in bf16: the baseline (``jlora.lora``, factored step)
int8            int8 from the bf16 kernels, one scale per output channel
nf4             NF4, blocks of 64, float32 block scales
nf4+dq          NF4 with double quantization of the block scales (QLoRA)
nf4 dequant.    NF4 base, but the step runs ``apply(merge(dequantize_params(q), adapters))``:
                every float kernel is formed in the step, as without ``jlora.lora``
qwix nf4        qwix's QLoRA (``LoraProvider(weight_qtype="nf4", tile_size=64)``) on the
                same model and numbers, when qwix is installed (``pip install jlora[bench]``)
==============  ==========================================================================

Columns: bytes of the base's kernels; XLA's memory analysis of the compiled step
(``value_and_grad`` w.r.t. the adapters plus an Adam update): arguments (base params,
adapters, Adam moments, batch), and temp (everything else the step allocates), each
also as a ratio to the bf16 row; wall-clock per step (median over the timed steps of each
repetition, median [min-max] over repetitions, rows interleaved step by step) and its
ratio to the bf16 row within each repetition; the relative output error of the adapted
model against the same adapters on the float32 kernels, ``|y - y_f32| / |y_f32|``.

Usage::

  python benchmarks/bench_quantized.py            # the documented table (2-3 minutes, 2 cores)
  python benchmarks/bench_quantized.py --small    # tiny shapes: a smoke run
  python benchmarks/bench_quantized.py --rank 16 --repeats 5
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
import warnings
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402

import jlora  # noqa: E402
from jlora import quantization as Q  # noqa: E402

# Wide enough that the frozen kernels dominate the step's arguments, as in real QLoRA
# (rank 8 on width 1024 adds 1.6% trainable parameters; QLoRA's rank 64 on 4096, 3%),
# small enough for about two minutes on two CPU cores.
DEFAULT = common.ModelConfig(d_model=1024, heads=16, mlp=4096, layers=2, seq=32, batch=2,
                             rank=8, alpha=16.0)
ROWS = ("bf16", "int8", "nf4", "nf4+dq", "nf4 dequant.", "qwix nf4")
LABELS = {"nf4 dequant.": "nf4, dequantized in the step",
          "qwix nf4": "qwix's QLoRA (nf4, tiles of 64)"}
SCHEMES = {"int8": ("int8", False), "nf4": ("nf4", False), "nf4+dq": ("nf4", True),
           "nf4 dequant.": ("nf4", False)}
KERNELS = r"layers/.*/kernel"
# The acceptance bounds the table is read against.
ARGS_BOUND, TEMP_BOUND = 0.35, 1.0


class Unavailable(Exception):
    """A row that cannot run here; the message says why and goes into the table."""


@dataclasses.dataclass
class Setup:
    cfg: common.ModelConfig
    x: jax.Array
    params: dict  # float32 linen params (no "params" wrapper)
    bf16: dict  # the same with bf16 kernels
    adapters: dict
    optimizer: optax.GradientTransformation

    def apply(self, params, x):
        return common.Transformer(self.cfg).apply({"params": params}, x)


def make_setup(cfg: common.ModelConfig) -> Setup:
    kx, kp, ka, kb = jax.random.split(jax.random.key(0), 4)
    x = common.inputs(cfg, kx)
    params = jax.jit(common.Transformer(cfg).init)(kp, x)["params"]
    bf16 = jlora.tree_map_with_path(
        lambda path, w: w.astype(jnp.bfloat16) if path.endswith("/kernel") else w, params)
    config = jlora.LoraConfig(rank=cfg.rank, alpha=cfg.alpha, targets=common.TARGETS,
                              layouts=common.LAYOUTS)
    adapters = jlora.init(ka, params, config)
    keys = dict(zip(adapters, jax.random.split(kb, len(adapters)), strict=True))
    adapters = {p: a.replace(b=0.02 * jax.random.normal(keys[p], a.b.shape))
                for p, a in adapters.items()}
    return Setup(cfg, x, params, bf16, adapters, optax.adam(1e-3))


def array_bytes(tree) -> int:
    """Bytes of the arrays in ``tree`` (4-bit integers as half a byte, as XLA stores them)."""

    def bits(dtype) -> int:
        return (jnp.iinfo(dtype).bits if jnp.issubdtype(dtype, jnp.integer)
                else 8 * jnp.dtype(dtype).itemsize)

    return sum(x.size * bits(x.dtype) // 8 for x in jax.tree.leaves(tree))


def kernel_bytes(params) -> int:
    return array_bytes(list(jlora.select(params, KERNELS).values()))


def adam_step(loss: Callable, optimizer):
    """``step(trainable, frozen, opt_state, x)``: ``value_and_grad`` of ``loss(trainable,
    frozen, x)`` w.r.t. ``trainable``, then an Adam update."""

    def step(trainable, frozen, opt_state, x):
        value, grads = jax.value_and_grad(loss)(trainable, frozen, x)
        updates, opt_state = optimizer.update(grads, opt_state, trainable)
        return optax.apply_updates(trainable, updates), opt_state, value

    return step


@dataclasses.dataclass
class Row:
    name: str
    reason: str | None = None
    run: common.Compiled | None = None
    args: tuple = ()
    kernel_bytes: int = 0
    output_error: float = float("nan")
    times: list = dataclasses.field(default_factory=list)  # per repetition: step seconds


def jlora_row(s: Setup, name: str):
    """``(step, args, kernel bytes, forward, its args)`` of a jlora row: the base as
    ``name`` says."""
    if name == "bf16":
        base = s.bf16
    else:
        scheme, double_quant = SCHEMES[name]
        base = Q.quantize_params(s.bf16, scheme, targets=KERNELS, layouts=common.LAYOUTS,
                                 double_quant=double_quant)
    if name == "nf4 dequant.":
        def forward(p, a, x):
            return s.apply(jlora.merge(Q.dequantize_params(p), a), x)
    else:
        forward = jlora.lora(s.apply)
    step = adam_step(lambda a, p, x: common.loss_of(forward(p, a, x), x), s.optimizer)
    args = (s.adapters, base, s.optimizer.init(s.adapters), s.x)
    return step, args, kernel_bytes(base), forward, (base, s.adapters, s.x)


def qwix_row(s: Setup, name: str):
    """qwix's QLoRA: its ``LoraProvider`` intercepts the model's dots, NF4 in tiles of 64
    along the fan-in; the same base (from the bf16 kernels) and adapters."""
    try:
        import qwix
    except Exception as e:  # noqa: BLE001 - any failure means "not installed"
        raise Unavailable(f"qwix not importable ({e}); pip install jlora[bench]") from e
    cfg = s.cfg
    provider = qwix.LoraProvider(module_path=r".*(" + "|".join(common.ADAPTED) + r")",
                                 rank=cfg.rank, alpha=cfg.alpha, weight_qtype="nf4",
                                 tile_size=64)
    model = qwix.apply_lora_to_model(common.Transformer(cfg), provider)
    abstract = jax.eval_shape(model.init, jax.random.key(0), s.x)["params"]["layers"]
    # qwix.quantize_params reads its tiling for one layer, not for nn.scan's stacked
    # params: quantize each layer, mapped over the layer axis.
    one_layer = {n: {"kernel": jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape[1:],
                                                                           a.dtype),
                                            abstract[n]["kernel"])} for n in common.ADAPTED}
    kernels = {n: {"kernel": s.bf16["layers"][n]["kernel"]} for n in common.ADAPTED}
    quantized = jax.vmap(lambda p: qwix.quantize_params(p, one_layer))(kernels)
    lora, frozen = {}, {"layers": {}, "ln_final": s.bf16["ln_final"]}
    for n, sub in s.bf16["layers"].items():
        frozen["layers"][n] = dict(sub)
        if n in quantized:
            ad = s.adapters[f"layers/{n}/kernel"]
            frozen["layers"][n]["kernel"] = quantized[n]["kernel"]
            lora[n] = {"kernel_lora_a": ad.a, "kernel_lora_b": ad.b}

    def params_of(lora, frozen):
        layers = {n: {**sub, **lora.get(n, {})} for n, sub in frozen["layers"].items()}
        return {"layers": layers, "ln_final": frozen["ln_final"]}

    def forward(lora, frozen, x):
        return model.apply({"params": params_of(lora, frozen)}, x)

    step = adam_step(lambda a, p, x: common.loss_of(forward(a, p, x), x), s.optimizer)
    args = (lora, frozen, s.optimizer.init(lora), s.x)
    return step, args, array_bytes(quantized), forward, (lora, frozen, s.x)


def build(name: str, s: Setup, reference) -> Row:
    row = Row(name)
    with warnings.catch_warnings():
        warnings.simplefilter("error", jlora.FactoredFallbackWarning)  # must stay factored
        try:
            step, args, nbytes, forward, forward_args = (
                qwix_row if name.startswith("qwix") else jlora_row)(s, name)
            row.run, row.args, row.kernel_bytes = common.compile_step(step, *args), args, nbytes
            jax.block_until_ready(row.run.fn(*args))  # the first (warm-up) call
            y = jax.jit(forward)(*forward_args)
            row.output_error = float(jnp.linalg.norm(y - reference) / jnp.linalg.norm(reference))
        except Unavailable as e:
            row.reason = str(e)
        except Exception as e:  # noqa: BLE001 - the table says what went wrong
            row.reason = f"failed: {type(e).__name__}: {' '.join(str(e).split())[:160]}"
            row.run = None
    return row


def fmt(x: float, digits: int = 3) -> str:
    return "—" if x != x else f"{x:.{digits}g}" if abs(x) < 10**digits else f"{x:.0f}"


def spread(xs: list[float]) -> str:
    if len(xs) < 2:
        return fmt(xs[0]) if xs else "—"
    return f"{fmt(common.median(xs))} [{fmt(min(xs))}–{fmt(max(xs))}]"


def table(rows: dict[str, Row]) -> str:
    base = rows["bf16"]
    mib = 2.0**20
    header = ["base", "kernels MiB", "args MiB", "args / bf16", "temp MiB", "temp / bf16",
              "wall ms", "wall / bf16", "output rel. error"]
    out = []
    for r in rows.values():
        label = LABELS.get(r.name, r.name)
        if r.run is None:
            out.append([label, *["—"] * 7, r.reason or ""])
            continue
        wall = [1e3 * common.median(t) for t in r.times]
        ratio = [common.median(t) / common.median(b) for t, b in
                 zip(r.times, base.times, strict=True)]
        out.append([
            label, fmt(r.kernel_bytes / mib), fmt(r.run.argument_bytes / mib),
            f"{r.run.argument_bytes / base.run.argument_bytes:.3f}",
            fmt(r.run.temp_bytes / mib), f"{r.run.temp_bytes / base.run.temp_bytes:.2f}",
            spread(wall), spread(ratio), f"{r.output_error:.2e}",
        ])
    return common.markdown_table(header, out)


def criteria(rows: dict[str, Row]) -> list[str]:
    """The bounds read off the table: NF4 arguments and temp against the bf16 step's."""
    base, lines = rows["bf16"], []
    for name in ("nf4", "nf4+dq"):
        r = rows.get(name)
        if r is None or r.run is None or base.run is None:
            continue
        args = r.run.argument_bytes / base.run.argument_bytes
        temp = r.run.temp_bytes / base.run.temp_bytes
        lines.append(
            f"{name}: arguments {args:.3f} of bf16's (bound {ARGS_BOUND}: "
            f"{'ok' if args <= ARGS_BOUND else 'EXCEEDED'}), temp {temp:.2f} of bf16's "
            f"(bound {TEMP_BOUND}: {'ok' if temp <= TEMP_BOUND else 'EXCEEDED'})")
    if base.run is not None:
        rest = base.run.argument_bytes - base.kernel_bytes
        lines.append(f"arguments besides the kernels (adapters, Adam moments, biases, norms, "
                     f"batch): {rest / 2**20:.1f} MiB in every row")
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--small", action="store_true", help="tiny shapes (seconds)")
    parser.add_argument("--rank", type=int, default=None)
    parser.add_argument("--layers", type=int, default=None)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per repetition")
    parser.add_argument("--repeats", type=int, default=3, help="repetitions of the timing")
    parser.add_argument("--only", default=",".join(ROWS),
                        help=f"comma list of rows (bf16 is always run), from {','.join(ROWS)}")
    args = parser.parse_args(argv)
    cfg = common.SMALL if args.small else DEFAULT
    if args.rank:
        cfg = dataclasses.replace(cfg, rank=args.rank, alpha=2.0 * args.rank)
    if args.layers:
        cfg = dataclasses.replace(cfg, layers=args.layers)
    names = ["bf16", *(n for n in args.only.split(",") if n in ROWS and n != "bf16")]

    print(common.device_info(), flush=True)
    print(f"model: {cfg.describe()}", flush=True)
    s = make_setup(cfg)
    reference = jax.jit(jlora.lora(s.apply))(s.params, s.adapters, s.x)  # float32 kernels
    rows = {}
    for name in names:
        start = time.perf_counter()
        rows[name] = r = build(name, s, reference)
        status = r.reason or f"compiled and run in {time.perf_counter() - start:.1f}s"
        print(f"  {name}: {status}", file=sys.stderr, flush=True)
    if rows["bf16"].run is None:
        print(f"the bf16 row failed: {rows['bf16'].reason}")
        return 1
    ready = [r for r in rows.values() if r.run is not None]
    for rep in range(args.repeats):
        for r in ready:
            r.times.append([])
        for _ in range(args.steps):
            for r in ready:
                r.times[-1].extend(common.time_calls(r.run.fn, r.args, 1))
        print(f"  repetition {rep + 1}/{args.repeats} done", file=sys.stderr, flush=True)
    print(f"\none step = value_and_grad w.r.t. the adapters + Adam; wall = median of "
          f"{args.steps} steps per repetition, median [min–max] over {args.repeats}; memory "
          f"from XLA's memory analysis of the compiled step\n")
    print(table(rows))
    print()
    for line in criteria(rows):
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
