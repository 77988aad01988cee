"""LoRA on an NNX model, measured side by side: ``jlora.nnx`` against the functional
``jlora.lora``, flax's ``nnx.LoRALinear`` and qwix; and how long each takes to put
adapters on a model.

The model is the train-step benchmark's (``common.block``: pre-LayerNorm blocks, rank-r
adapters on query, key, value, out, up and down) written in NNX: blocks made with
``nnx.vmap`` (kernels stacked on a leading layer axis) and run with ``nnx.scan``. Rows
of one train step (``value_and_grad`` w.r.t. the trainable arrays):

==============  ==========================================================================
bound           lower bound: forward + backward to the activations, no weight gradient
merged          ``W + s·A·B`` formed in the step (``jlora.merge`` on the NNX state)
jlora.lora      the functional transform written by hand: ``jlora.lora(fn)(state,
                adapters, x)`` with ``fn`` merging the NNX state into the model
jlora.nnx       ``jlora.nnx.apply_lora(model, ...)``, then ``nnx.value_and_grad`` with
                ``nnx.DiffState(0, nnx.LoRAParam)``, as NNX trainers write it
nnx.LoRALinear  flax's ``nnx.LoRALinear`` layers (``lax.scan`` over the layers; the scale
                folded into B)
*_loop          the model with its layers in an ``nnx.List`` run by a Python loop (as
                Tunix's models are), for qwix, which cannot create its LoRA variables
                inside ``nnx.scan``: its own bound, ``jlora.nnx`` and
                ``qwix.apply_lora_to_model``
==============  ==========================================================================

Every row is filled with the same numbers (B non-zero), and the ``check`` column compares
its loss and adapter gradients with the merged step's. FLOPs and bytes come from XLA's
cost analysis of the step compiled with the layer scan unrolled, memory (temp +
arguments + outputs) and wall-clock from the scanned step; every ratio is to the bound in
the same run, wall-clock ratios within each repetition.

Then the time to put adapters on a fresh model (the model built beforehand, untimed):
``jlora.nnx.apply_lora`` (no forward pass) against ``qwix.apply_lora_to_model`` (one
eager forward pass on a sample input), a first call (compiling what it runs eagerly) and
again on another fresh model, and whether the adapted model still holds the base's own
arrays.

Usage::

  python benchmarks/bench_nnx.py                 # d_model 256, seq 128: about a minute on 2 cores
  python benchmarks/bench_nnx.py --tiny          # seconds of compute (timings meaningless)
  python benchmarks/bench_nnx.py --mid           # d_model 512, seq 256
  python benchmarks/bench_nnx.py --full          # the documented train-step shapes
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
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bench_train_step as bts  # noqa: E402
import common  # noqa: E402

import jlora  # noqa: E402

ROWS = ("bound", "merged", "jlora", "jlora_nnx", "nnx", "bound_loop", "jlora_nnx_loop", "qwix")
# The rows on the model whose layers run in a Python loop are compared with its own bound.
BOUND_OF = {"bound_loop": "bound_loop", "jlora_nnx_loop": "bound_loop", "qwix": "bound_loop"}
LABELS = {
    "bound": "lower bound: fwd + bwd to activations, no weight grad",
    "bound_loop": "lower bound, the model's layers in a Python loop",
    "merged": "merged: W + s·A·B formed in the step",
    "jlora": "jlora.lora(fn)(state, adapters, x), by hand",
    "jlora_nnx": "jlora.nnx.apply_lora + nnx.value_and_grad(DiffState)",
    "jlora_nnx_loop": "jlora.nnx, the model's layers in a Python loop",
    "nnx": "flax nnx.LoRALinear",
    "qwix": "qwix.apply_lora_to_model (layers in a Python loop)",
}
LORA = nnx.DiffState(0, nnx.LoRAParam)
# The default: a step of tens of milliseconds on 2 CPU cores, so the timings are not
# dispatch overhead, and the whole run about a minute on a quiet machine.
DEFAULT = dataclasses.replace(common.FULL, d_model=256, heads=4, mlp=1024, layers=2, seq=128,
                              batch=2, rank=8, alpha=16.0)


# -- the model --------------------------------------------------------------------------


class Transformer(nnx.Module):
    """``common.Transformer`` in NNX: ``nnx.vmap``-made blocks under ``nnx.scan``, or
    (``scan=False``) an ``nnx.List`` of blocks run by a Python loop, as Tunix's models
    are (qwix cannot create its LoRA variables inside ``nnx.scan``)."""

    def __init__(self, cfg: common.ModelConfig, *, rngs: nnx.Rngs, unroll: bool = False,
                 scan: bool = True):
        block_cls = common.nnx_block_class(lora=False)
        if scan:
            @nnx.split_rngs(splits=cfg.layers)
            @nnx.vmap(in_axes=(0,), out_axes=0)
            def make(rngs):
                return block_cls(cfg, rngs=rngs)

            self.layers = make(rngs)
        else:
            self.layers = nnx.List([block_cls(cfg, rngs=rngs) for _ in range(cfg.layers)])
        self.ln_final = nnx.LayerNorm(cfg.d_model, rngs=rngs)
        self.unroll = cfg.layers if unroll else 1
        self.scan = scan

    def __call__(self, x):
        if not self.scan:
            for layer in self.layers:
                x = layer(x)
            return self.ln_final(x)

        @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry, unroll=self.unroll)
        def run(h, layer):
            return layer(h)

        return self.ln_final(run(x, self.layers))


def _stacked_path(path: str) -> tuple[str, int | None]:
    """``layers/1/query/kernel`` (a looped model's) -> ``("layers/query/kernel", 1)``."""
    parts = path.split("/")
    if len(parts) > 1 and parts[0] == "layers" and parts[1].isdigit():
        return "/".join([parts[0], *parts[2:]]), int(parts[1])
    return path, None


def base_model(s: bts.Setup, unroll: bool, scan: bool = True) -> Transformer:
    """The NNX model holding the train-step benchmark's weights (the scanned model has the
    same paths: ``layers/query/kernel`` is the stacked query kernel in both)."""
    model = nnx.eval_shape(lambda: Transformer(s.cfg, rngs=nnx.Rngs(0), unroll=unroll,
                                               scan=scan))
    flat = jlora.select(s.params, ".*")

    def value(path, leaf):
        stacked, layer = _stacked_path(path)
        out = flat[stacked] if layer is None else flat[stacked][layer]
        assert out.shape == leaf.shape, (path, out.shape, leaf.shape)
        return out

    nnx.update(model, jlora.tree_map_with_path(value, nnx.state(model, nnx.Param)))
    return model


def per_layer(adapters: dict, layers: int) -> dict:
    """The stacked adapters of the scanned model as one adapter per layer and kernel."""
    return {path.replace("layers/", f"layers/{i}/", 1): ad.replace(
                a=ad.a[i], b=ad.b[i], layout=ad.layout.unstacked())
            for path, ad in adapters.items() for i in range(layers)}


def _stacked_grads(loss, flat: dict) -> dict:
    """``{kernel path/a|b: gradient}`` with a looped model's per-layer gradients stacked
    on a leading axis, as the scanned models' are."""
    groups: dict[str, dict[int, jax.Array]] = {}
    for path, g in flat.items():
        module, attr = path.rsplit("/", 1)
        kernel, factor = attr.rsplit("_lora_", 1)
        stacked, layer = _stacked_path(f"{module}/{kernel}/{factor}")
        groups.setdefault(stacked, {})[0 if layer is None else layer] = g
    out = {"loss": loss}
    for name, by_layer in groups.items():
        out[name] = by_layer[0] if len(by_layer) == 1 and 0 in by_layer else jnp.stack(
            [by_layer[i] for i in sorted(by_layer)])
    return out


def _canon(loss, grads: dict) -> dict:
    return bts._adapter_grads(loss, grads)


# -- the rows: each returns (step, args, canon) as in bench_train_step --------------------


def row_bound(s: bts.Setup, unroll: bool, scan: bool = True):
    graphdef, state = nnx.split(base_model(s, unroll, scan=scan))

    def step(state, x):
        def loss(x):
            # Variables of this trace (the gradient's), the weights' values frozen.
            frozen = jax.tree.map(jax.lax.stop_gradient, state)
            return common.loss_of(nnx.merge(graphdef, frozen)(x), x)

        return jax.value_and_grad(loss)(x)

    return step, (state, s.x), lambda out: {"loss": out[0]}


def row_bound_loop(s: bts.Setup, unroll: bool):
    return row_bound(s, unroll, scan=False)


def _functional(s: bts.Setup, unroll: bool):
    graphdef, state = nnx.split(base_model(s, unroll))
    return state, (lambda state, x: nnx.merge(graphdef, state)(x))


def row_merged(s: bts.Setup, unroll: bool):
    state, apply = _functional(s, unroll)

    def step(adapters, state, x):
        return jax.value_and_grad(
            lambda ad: common.loss_of(apply(jlora.merge(state, ad), x), x))(adapters)

    return step, (s.adapters, state, s.x), lambda out: _canon(*out)


def row_jlora(s: bts.Setup, unroll: bool):
    state, apply = _functional(s, unroll)
    factored = jlora.lora(apply)

    def step(adapters, state, x):
        return jax.value_and_grad(
            lambda ad: common.loss_of(factored(state, ad, x), x))(adapters)

    return step, (s.adapters, state, s.x), lambda out: _canon(*out)


def _lora_param_step(model):
    """The train step NNX trainers write, on a model holding its LoRA as LoRAParams:
    what ``nnx.jit`` does around it made explicit (split, merge, differentiate)."""
    graphdef, lora_state, rest = nnx.split(model, nnx.LoRAParam, ...)

    def step(lora_state, rest, x):
        model = nnx.merge(graphdef, lora_state, rest)
        return nnx.value_and_grad(lambda m: common.loss_of(m(x), x), argnums=LORA)(model)

    def canon(out):
        return _stacked_grads(out[0], jlora.select(out[1], ".*"))

    return step, lora_state, rest, canon


def row_jlora_nnx(s: bts.Setup, unroll: bool):
    model = jlora.nnx.put_adapters(base_model(s, unroll), s.adapters)
    step, lora_state, rest, canon = _lora_param_step(model)
    return step, (lora_state, rest, s.x), canon


def row_jlora_nnx_loop(s: bts.Setup, unroll: bool):
    model = base_model(s, unroll, scan=False)
    model = jlora.nnx.put_adapters(model, per_layer(s.adapters, s.cfg.layers))
    step, lora_state, rest, canon = _lora_param_step(model)
    return step, (lora_state, rest, s.x), canon


def row_nnx(s: bts.Setup, unroll: bool):
    return bts.row_nnx(s, unroll)


def _qwix():
    try:
        import qwix
    except Exception as e:  # noqa: BLE001 - the table says why
        raise bts.Unavailable(f"qwix not importable ({e}); pip install qwix") from e
    return qwix


def qwix_adapted(s: bts.Setup, model: Transformer):
    qwix = _qwix()
    provider = qwix.LoraProvider(module_path=r".*(" + "|".join(common.ADAPTED) + r")",
                                 rank=s.cfg.rank, alpha=s.cfg.alpha)
    return qwix.apply_lora_to_model(model, provider, s.x, rngs=nnx.Rngs(0))


def row_qwix(s: bts.Setup, unroll: bool):
    model = qwix_adapted(s, base_model(s, unroll, scan=False))
    step, lora_state, rest, canon = _lora_param_step(model)
    adapters = per_layer(s.adapters, s.cfg.layers)

    def fill(path, leaf):  # layers/0/query/kernel_lora_a: jlora's factors, same shapes
        kernel, factor = path.rsplit("_lora_", 1)
        value = getattr(adapters[kernel], factor)
        if tuple(value.shape) != tuple(leaf.shape):
            raise bts.Unavailable(f"qwix's {path} has shape {leaf.shape}, expected "
                                  f"{value.shape}")
        return value

    lora_state = jlora.tree_map_with_path(fill, lora_state)
    if len(jlora.leaf_paths(lora_state)) != 2 * len(adapters):
        raise bts.Unavailable(f"qwix made LoRA params {jlora.leaf_paths(lora_state)}")
    return step, (lora_state, rest, s.x), canon


BUILDERS = {name: globals()[f"row_{name}"] for name in ROWS}


# -- measuring --------------------------------------------------------------------------


def build(name: str, s: bts.Setup) -> bts.Result:
    """Compile one row (scanned and unrolled) and check it, as bench_train_step does."""
    saved = bts.BUILDERS.get(name)
    bts.BUILDERS[name] = BUILDERS[name]
    try:
        return bts.build(name, s)
    finally:
        if saved is None:
            del bts.BUILDERS[name]
        else:
            bts.BUILDERS[name] = saved


def time_rows(results: dict, steps: int, repeats: int, warmup: int) -> None:
    """Wall-clock and process CPU time per step, rows interleaved step by step."""
    ready = [r for r in results.values() if r.run is not None]
    for r in ready:
        common.time_calls(r.run.fn, r.args, warmup)
    for rep in range(repeats):
        for r in ready:
            r.times.append([])
            r.cpu.append([])
        for _ in range(steps):
            for r in ready:
                wall, cpu = time.perf_counter(), time.process_time()
                jax.block_until_ready(r.run.fn(*r.args))
                r.cpu[-1].append(time.process_time() - cpu)
                r.times[-1].append(time.perf_counter() - wall)
        print(f"  repetition {rep + 1}/{repeats} done", file=sys.stderr, flush=True)


def step_table(results: dict) -> str:
    mib = 2.0**20
    header = ["step", "GFLOP", "FLOP ×LB", "total MiB", "mem ×LB", "wall ms", "wall ×LB",
              "CPU ×LB", "×jlora.lora (wall)", "check"]
    jl = results.get("jlora")
    rows = []
    for name, r in results.items():
        if r.run is None:
            rows.append([LABELS[name], *["—"] * 8, r.reason or ""])
            continue
        bound = results[BOUND_OF.get(name, "bound")]

        def ratio(field, other, r=r):
            return bts.spread([common.median(a) / common.median(b) for a, b in
                               zip(getattr(r, field), getattr(other, field), strict=False)])

        ok = bound.run is not None
        check = "reference" if name in ("merged", "bound", "bound_loop") else "—"
        if check == "—" and r.canon and results["merged"].canon:
            diff = common.max_rel_diff(r.canon, results["merged"].canon)
            check = f"rel. diff {diff:.1e} vs merged"
        rows.append([
            LABELS[name], bts.fmt(r.cost.flops / 1e9),
            bts.fmt(r.cost.flops / bound.cost.flops) if ok else "—",
            bts.fmt(r.run.total_bytes / mib),
            bts.fmt(r.run.total_bytes / bound.run.total_bytes) if ok else "—",
            bts.spread([1e3 * common.median(t) for t in r.times]),
            ratio("times", bound) if ok else "—", ratio("cpu", bound) if ok else "—",
            ratio("times", jl) if jl is not None and jl.run is not None else "—", check,
        ])
    return common.markdown_table(header, rows)


# -- putting adapters on a model ----------------------------------------------------------


@dataclasses.dataclass
class ApplyResult:
    name: str
    first_s: float = float("nan")
    again_s: float = float("nan")
    shares_base: bool | None = None
    reason: str | None = None


def _shares_base(before: dict, model) -> bool:
    after = jlora.select(nnx.state(model, nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam))), ".*")
    return all(after[p] is x for p, x in before.items())


def measure_apply(name: str, s: bts.Setup, apply: Callable, scan: bool) -> ApplyResult:
    res = ApplyResult(name)
    try:
        for attempt in ("first_s", "again_s"):
            model = base_model(s, unroll=False, scan=scan)
            before = jlora.select(nnx.state(model, nnx.Param), ".*")
            jax.block_until_ready(before)
            start = time.perf_counter()
            adapted = apply(model)
            jax.block_until_ready(nnx.state(adapted, nnx.LoRAParam))
            setattr(res, attempt, time.perf_counter() - start)
        res.shares_base = _shares_base(before, adapted)
    except bts.Unavailable as e:
        res.reason = str(e)
    except Exception as e:  # noqa: BLE001 - the table says what went wrong
        res.reason = f"failed: {type(e).__name__}: {' '.join(str(e).split())[:160]}"
    return res


def apply_rows(s: bts.Setup) -> list[ApplyResult]:
    per_layer_targets = r"layers/\d+/(" + "|".join(common.ADAPTED) + ")/kernel"
    config = jlora.LoraConfig(rank=s.cfg.rank, alpha=s.cfg.alpha, targets=per_layer_targets)
    stacked = jlora.LoraConfig(rank=s.cfg.rank, alpha=s.cfg.alpha, targets=common.TARGETS)
    return [
        measure_apply("jlora.nnx.apply_lora (no forward pass)", s,
                      lambda m: jlora.nnx.apply_lora(m, config, rngs=nnx.Rngs(1)), scan=False),
        measure_apply("qwix.apply_lora_to_model (one eager forward pass)", s,
                      lambda m: qwix_adapted(s, m), scan=False),
        measure_apply("jlora.nnx.apply_lora, scanned model (qwix: not supported)", s,
                      lambda m: jlora.nnx.apply_lora(m, stacked, rngs=nnx.Rngs(1)), scan=True),
    ]


def apply_table(results: list[ApplyResult]) -> str:
    header = ["put adapters on a built model (Python-loop layers)", "first call s", "again s",
              "×jlora (again)", "base arrays kept"]
    ref = results[0].again_s
    rows = []
    for r in results:
        if r.reason:
            rows.append([r.name, "—", "—", "—", r.reason])
            continue
        rows.append([r.name, f"{r.first_s:.3f}", f"{r.again_s:.3f}",
                     bts.fmt(r.again_s / ref), "yes" if r.shares_base else "no (copied)"])
    return common.markdown_table(header, rows)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--tiny", action="store_true", help="tiny shapes (debugging; the "
                      "timings are dispatch overhead)")
    size.add_argument("--mid", action="store_true", help="d_model 512, seq 256 (minutes)")
    size.add_argument("--full", action="store_true",
                      help="the documented train-step shapes (d_model 1024, seq 512)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per repetition")
    parser.add_argument("--repeats", type=int, default=3, help="repetitions of the sweep")
    parser.add_argument("--warmup", type=int, default=1, help="untimed calls per row")
    parser.add_argument("--only", default=",".join(ROWS),
                        help=f"comma list of rows, from {','.join(ROWS)} (the bounds and "
                        "merged always run)")
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = [n for n in names if n not in ROWS]
    if unknown:
        parser.error(f"--only: unknown rows {unknown}; expected names from {list(ROWS)}")
    names = [n for n in ROWS if n in {"bound", "merged", "bound_loop", *names}]

    print(common.device_info(), flush=True)
    cfg = (common.FULL if args.full else bts.MID if args.mid else common.SMALL if args.tiny
           else DEFAULT)
    print(f"model: {cfg.describe()} (NNX: nnx.vmap blocks under nnx.scan)", flush=True)
    setup = bts.make_setup(cfg)

    # Putting adapters on first: "first call" then really is the first in this process.
    applied = apply_rows(setup)
    results = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        for name in names:
            start = time.perf_counter()
            results[name] = r = build(name, setup)
            status = r.reason or f"compiled in {time.perf_counter() - start:.1f}s"
            print(f"  {name}: {status}", file=sys.stderr, flush=True)
    time_rows(results, args.steps, args.repeats, args.warmup)

    print(f"\none step = value_and_grad w.r.t. the trainable arrays; wall ms = median of "
          f"{args.steps} steps per repetition over {args.repeats} repetitions "
          "(median [min–max]); ×LB = ratio to the lower bound in the same repetition; "
          "CPU = process CPU time; FLOPs from XLA's cost analysis of the unrolled step, "
          "memory from the scanned one.\n")
    print(step_table(results))
    print()
    print(apply_table(applied))
    notes = [n for r in results.values() for n in r.notes]
    if notes:
        print("\nwarnings while building:")
        for n in notes:
            print(f"  {n}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
