"""One LoRA train step, measured side by side: FLOPs, memory and wall-clock.

A step is ``jax.value_and_grad`` of the loss with respect to the trainable arrays, on a
decoder-only transformer (see ``common.ModelConfig``). Rows:

==========  =========================================================================
bound       lower bound: forward + backward to the activations, no weight gradient
            (grad w.r.t. the input embeddings only, params under stop_gradient)
full        full fine-tuning: grad w.r.t. every param
merged      ``apply(jlora.merge(params, adapters), x)``: W + s·A·B formed in the step
jlora       ``jlora.lora(apply)(params, adapters, x)``: the factored transform (defaults)
jlora_*     the same with one optimisation off: ``jlora_nofuse`` (fuse_shared_inputs=False),
            ``jlora_novjp`` (custom_vjp=False: JAX's own backward pass)
jlora_nnx   ``jlora.lora`` on the same block written in NNX (plain ``nnx.Linear``,
            layers under ``lax.scan``, ``nnx.merge`` per layer)
factored    a hand-written ``x·W + b + s·((x·A)·B)`` linen layer
nnx         flax's ``nnx.LoRALinear`` (the same block in NNX, layers under lax.scan)
qwix        qwix's ``LoraProvider`` intercepting the linen model's dot_generals
lorax       jax-lorax, when it can be imported
==========  =========================================================================

FLOPs and bytes accessed come from XLA's cost analysis of the step compiled with the
layer scan unrolled (XLA counts a loop body once, whatever its trip count); memory
(temp + arguments + outputs) and wall-clock come from the step as it runs, under
``nn.scan``. Every ratio is to the lower bound measured in the same run; wall-clock
ratios are taken within each repetition, then summarised.

Every row is built from the same numbers (B is set non-zero), so the ``check`` column
compares each step's loss and adapter gradients with the merged step's (the full
fine-tuning step's loss with the bound's): a benchmark that measured a different
function would show here.

Usage::

  python benchmarks/bench_train_step.py --small          # seconds: tiny shapes
  python benchmarks/bench_train_step.py --mid            # development shapes (a minute)
  python benchmarks/bench_train_step.py                  # the documented table (minutes)
  python benchmarks/bench_train_step.py --only bound,jlora,merged --repeats 1
  python benchmarks/bench_train_step.py --device-info    # where would it run?
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import re
import sys
import time
import warnings
from collections.abc import Callable

import jax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402

import jlora  # noqa: E402

# jlora rows: the default, then each optimisation switched off (jlora.lora's options).
JLORA_OPTIONS = {
    "jlora": {},
    "jlora_nofuse": {"fuse_shared_inputs": False},
    "jlora_novjp": {"custom_vjp": False},
}
ROWS = ("bound", "full", "merged", *JLORA_OPTIONS, "jlora_nnx", "factored", "nnx", "qwix",
        "lorax")
LABELS = {
    "bound": "lower bound: fwd + bwd to activations, no weight grad",
    "full": "full fine-tuning",
    "merged": "merged: W + s·A·B formed in the step",
    "jlora": "jlora.lora (factored transform, defaults)",
    "jlora_nofuse": "jlora.lora, fuse_shared_inputs=False",
    "jlora_novjp": "jlora.lora, custom_vjp=False (JAX's own backward)",
    "jlora_nnx": "jlora.lora on the NNX model (nnx.Linear, lax.scan)",
    "factored": "hand-written x·W + s·((x·A)·B)",
    "nnx": "flax nnx.LoRALinear",
    "qwix": "qwix LoraProvider",
    "lorax": "jax-lorax",
}
# Which row each row's loss (and adapter gradients) is checked against.
REFERENCE = {"full": "bound", **{k: "merged" for k in ROWS if k not in ("bound", "full")}}


# Mid-size shapes for development: big enough that XLA:CPU's choices show, a few seconds.
MID = dataclasses.replace(common.FULL, d_model=512, mlp=2048, heads=8, layers=2, seq=256)


class Unavailable(Exception):
    """A row that cannot run here; the message says why and goes into the table."""


@dataclasses.dataclass
class Setup:
    cfg: common.ModelConfig
    x: jax.Array
    params: dict  # linen params of the main model (no "params" wrapper)
    adapters: dict  # {path: jlora.Adapter}

    def apply_fn(self, unroll: bool) -> Callable:
        model = common.Transformer(self.cfg, unroll=unroll)
        return lambda params, x: model.apply({"params": params}, x)


def make_setup(cfg: common.ModelConfig) -> Setup:
    kx, kp, ka, kb = jax.random.split(jax.random.key(0), 4)
    x = common.inputs(cfg, kx)
    params = jax.jit(common.Transformer(cfg).init)(kp, x)["params"]
    config = jlora.LoraConfig(
        rank=cfg.rank, alpha=cfg.alpha, targets=common.TARGETS, layouts=common.LAYOUTS
    )
    adapters = jlora.init(ka, params, config)
    # B is zero at init; make it non-zero so every row computes a real update and the
    # gradient checks compare something. (FLOPs, memory and time do not depend on it.)
    keys = dict(zip(adapters, jax.random.split(kb, len(adapters)), strict=True))
    adapters = {
        path: ad.replace(b=0.02 * jax.random.normal(keys[path], ad.b.shape, ad.b.dtype))
        for path, ad in adapters.items()
    }
    return Setup(cfg, x, params, adapters)


def _adapter_grads(loss, grads: dict) -> dict:
    out = {"loss": loss}
    for path, g in grads.items():
        out[f"{path}/a"], out[f"{path}/b"] = g.a, g.b
    return out


# -- the rows: each returns (step, args, canon), canon(step output) -> {name: array} --


def row_bound(s: Setup, unroll: bool):
    apply = s.apply_fn(unroll)

    def step(params, x):
        frozen = jax.lax.stop_gradient(params)
        return jax.value_and_grad(lambda x: common.loss_of(apply(frozen, x), x))(x)

    return step, (s.params, s.x), lambda out: {"loss": out[0]}


def row_full(s: Setup, unroll: bool):
    apply = s.apply_fn(unroll)

    def step(params, x):
        return jax.value_and_grad(lambda p: common.loss_of(apply(p, x), x))(params)

    return step, (s.params, s.x), lambda out: {"loss": out[0]}


def row_merged(s: Setup, unroll: bool):
    apply = s.apply_fn(unroll)

    def step(adapters, params, x):
        return jax.value_and_grad(
            lambda ad: common.loss_of(apply(jlora.merge(params, ad), x), x)
        )(adapters)

    return step, (s.adapters, s.params, s.x), lambda out: _adapter_grads(*out)


def _jlora_lora():
    lora = getattr(jlora, "lora", None)
    if lora is None:
        try:
            from jlora._transform.api import lora
        except Exception as e:  # noqa: BLE001 - any failure means "not there yet"
            raise Unavailable(f"not available yet: jlora.lora not importable ({e})") from e
    return lora


def row_jlora(s: Setup, unroll: bool, options: dict | None = None):
    lora = _jlora_lora()
    factored_apply = lora(s.apply_fn(unroll), **(options or {}))

    def step(adapters, params, x):
        return jax.value_and_grad(
            lambda ad: common.loss_of(factored_apply(params, ad, x), x)
        )(adapters)

    return step, (s.adapters, s.params, s.x), lambda out: _adapter_grads(*out)


def row_jlora_nnx(s: Setup, unroll: bool):
    """jlora.lora on the block written in NNX (plain ``nnx.Linear``), layers under lax.scan."""
    from flax import nnx

    lora = _jlora_lora()
    cfg = s.cfg
    block_cls = common.nnx_block_class(lora=False)
    graphdef, layer_state = nnx.split(nnx.eval_shape(lambda: block_cls(cfg, rngs=nnx.Rngs(0))))
    final_def, final_state = nnx.split(
        nnx.eval_shape(lambda: nnx.LayerNorm(cfg.d_model, rngs=nnx.Rngs(0)))
    )

    def fill(path, leaf):  # NNX paths: "query/kernel", "ln_attn/scale"
        module, name = path.split("/")
        value = s.params["layers"][module][name]
        assert value.shape[1:] == leaf.shape, (path, value.shape, leaf.shape)
        return value

    # The same paths as the linen model's ("layers/query/kernel"), so the same adapters.
    state = {
        "layers": jlora.tree_map_with_path(fill, layer_state),
        "ln_final": jlora.tree_map_with_path(
            lambda p, _: s.params["ln_final"][p], final_state),
    }

    def apply(state, x):
        def body(h, layer):
            return nnx.merge(graphdef, layer)(h), None

        h, _ = jax.lax.scan(body, x, state["layers"], unroll=cfg.layers if unroll else 1)
        return nnx.merge(final_def, state["ln_final"])(h)

    factored_apply = lora(apply)

    def step(adapters, state, x):
        return jax.value_and_grad(
            lambda ad: common.loss_of(factored_apply(state, ad, x), x)
        )(adapters)

    return step, (s.adapters, state, s.x), lambda out: _adapter_grads(*out)


def _lora_params_row(s: Setup, model, factor_pattern: str, kernel_of):
    """A row for a model that holds its own LoRA factors as params (hand-written, qwix).

    Its params are filled from jlora's base weights and adapters, so every row computes
    the same function; ``kernel_of(factor path)`` names the adapted kernel's path.
    """
    shapes = jax.eval_shape(model.init, jax.random.key(0), s.x)["params"]
    base = jlora.select(s.params, ".*")

    def fill(path, leaf):
        if re.fullmatch(factor_pattern, path):
            ad = s.adapters[kernel_of(path)]
            value = ad.a if path.endswith("a") else ad.b
        else:
            value = base[path]
        assert value.shape == leaf.shape, (path, value.shape, leaf.shape)
        return value

    full = jlora.tree_map_with_path(fill, shapes)
    n_lora = len(jlora.select(full, factor_pattern, allow_empty=True))
    if n_lora != 2 * len(s.adapters):
        raise Unavailable(f"the model holds {n_lora} LoRA arrays, expected {2 * len(s.adapters)}")
    lora, frozen = jlora.partition(full, factor_pattern)

    def step(lora, frozen, x):
        def loss(lora):
            params = jlora.combine(lora, frozen)
            return common.loss_of(model.apply({"params": params}, x), x)

        return jax.value_and_grad(loss)(lora)

    def canon(out):
        loss, grads = out
        flat = jlora.select(grads, factor_pattern)
        return {"loss": loss, **{kernel_of(p) + "/" + p[-1]: g for p, g in flat.items()}}

    return step, (lora, frozen, s.x), canon


def row_factored(s: Setup, unroll: bool):
    model = common.Transformer(s.cfg, factored=True, unroll=unroll)
    return _lora_params_row(s, model, r".*/lora_[ab]",
                            lambda path: path.rsplit("/", 1)[0] + "/kernel")


def row_nnx(s: Setup, unroll: bool):
    from flax import nnx

    cfg = s.cfg
    block_cls = common.nnx_block_class()
    abstract = nnx.eval_shape(lambda: block_cls(cfg, rngs=nnx.Rngs(0)))
    graphdef, lora_state, rest_state = nnx.split(abstract, nnx.LoRAParam, ...)
    final_def, final_state = nnx.split(
        nnx.eval_shape(lambda: nnx.LayerNorm(cfg.d_model, rngs=nnx.Rngs(0)))
    )

    def fill(path, leaf):
        # NNX paths: "query/kernel", "query/lora/lora_a", "ln_attn/scale".
        parts = path.split("/")
        if parts[-1] in ("lora_a", "lora_b"):
            ad = s.adapters[f"layers/{parts[0]}/kernel"]
            # nnx.LoRA has no scale: fold it into B (same function, same dA).
            value = ad.a if parts[-1] == "lora_a" else ad.scale * ad.b
        else:
            value = s.params["layers"][parts[0]][parts[1]]
        # One block's abstract state, filled with all layers' values (stacked for scan).
        assert value.shape[1:] == leaf.shape, (path, value.shape, leaf.shape)
        return value

    lora_state = jlora.tree_map_with_path(fill, lora_state)
    rest_state = jlora.tree_map_with_path(fill, rest_state)
    final_state = jlora.tree_map_with_path(
        lambda p, _: s.params["ln_final"][p], final_state
    )

    def step(lora, rest, final, x):
        def loss(lora):
            def body(h, layer):
                return nnx.merge(graphdef, *layer)(h), None

            h, _ = jax.lax.scan(body, x, (lora, rest), unroll=cfg.layers if unroll else 1)
            return common.loss_of(nnx.merge(final_def, final)(h), x)

        return jax.value_and_grad(loss)(lora)

    def canon(out):
        loss, grads = out
        flat = jlora.select(grads, r".*/lora_[ab]")
        res = {"loss": loss}
        for p, g in flat.items():
            name = p.split("/")[0]
            if p.endswith("lora_a"):
                res[f"layers/{name}/kernel/a"] = g
            else:  # d/dB of f(s·A·B) is s times d/d(sB)
                res[f"layers/{name}/kernel/b"] = cfg.scale * g
        return res

    return step, (lora_state, rest_state, final_state, s.x), canon


def row_qwix(s: Setup, unroll: bool):
    try:
        import qwix
    except Exception as e:  # noqa: BLE001
        raise Unavailable(f"qwix not importable ({e}); pip install qwix") from e
    cfg = s.cfg
    provider = qwix.LoraProvider(
        module_path=r".*(" + "|".join(common.ADAPTED) + r")", rank=cfg.rank, alpha=cfg.alpha
    )
    model = qwix.apply_lora_to_model(common.Transformer(cfg, unroll=unroll), provider)
    return _lora_params_row(s, model, r".*_lora_[ab]", lambda path: path[: -len("_lora_a")])


def row_lorax(s: Setup, unroll: bool):
    try:
        import lorax  # noqa: F401
    except Exception as e:  # noqa: BLE001
        raise Unavailable(
            "not installed: jax-lorax 0.3.1 (latest) needs jax 0.4.x through qax 0.4.1 "
            f"(pip resolves jax 0.4.38, optax<0.2), so it cannot sit beside jax {jax.__version__}"
        ) from e
    raise Unavailable("jax-lorax imports here, but this script has no lorax row yet")


BUILDERS = {
    name: (functools.partial(row_jlora, options=JLORA_OPTIONS[name]) if name in JLORA_OPTIONS
           else globals()[f"row_{name}"])
    for name in ROWS
}


# -- measuring ------------------------------------------------------------------------


@dataclasses.dataclass
class Result:
    name: str
    reason: str | None = None
    run: common.Compiled | None = None  # the step as it runs (scan): memory, time
    cost: common.Compiled | None = None  # unrolled: FLOPs, bytes accessed
    args: tuple = ()
    canon: dict | None = None
    times: list[list[float]] = dataclasses.field(default_factory=list)  # per repetition
    cpu: list[list[float]] = dataclasses.field(default_factory=list)  # process CPU seconds
    notes: list[str] = dataclasses.field(default_factory=list)


def build(name: str, setup: Setup) -> Result:
    res = Result(name)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            step, args, canon = BUILDERS[name](setup, unroll=False)
            res.run = common.compile_step(step, *args)
            res.args = args
            cost_step, cost_args, _ = BUILDERS[name](setup, unroll=True)
            res.cost = common.compile_step(cost_step, *cost_args)
            out = jax.block_until_ready(res.run.fn(*args))  # also the first warm-up call
            res.canon = canon(out)
        except Unavailable as e:
            res.reason = str(e)
        except Exception as e:  # noqa: BLE001 - the table says what went wrong
            msg = " ".join(str(e).split())[:160]
            prefix = "not available yet: " if name.startswith("jlora") else "failed: "
            res.reason = f"{prefix}{type(e).__name__}: {msg}"
            res.run = res.cost = None
    seen = set()
    for w in caught:
        text = " ".join(str(w.message).split())[:200]
        if text not in seen and not issubclass(w.category, DeprecationWarning):
            seen.add(text)
            res.notes.append(f"{name}: {w.category.__name__}: {text}")
    return res


def fmt(x: float, digits: int = 3) -> str:
    if x != x:  # nan
        return "—"
    return f"{x:.{digits}g}" if abs(x) < 10 ** digits else f"{x:.0f}"


def spread(xs: list[float], digits: int = 3) -> str:
    if not xs:
        return "—"
    if len(xs) == 1:
        return fmt(xs[0], digits)
    return f"{fmt(common.median(xs), digits)} [{fmt(min(xs), digits)}–{fmt(max(xs), digits)}]"


def table(results: dict[str, Result]) -> str:
    bound = results.get("bound")
    have_bound = bound is not None and bound.run is not None
    mib = 2.0**20
    header = [
        "step", "GFLOP", "FLOP ×LB", "GB accessed", "temp MiB", "args MiB", "out MiB",
        "total MiB", "mem ×LB", "wall ms", "wall ×LB", "CPU ms", "CPU ×LB", "compile s",
        "check",
    ]
    rows = []
    for name, r in results.items():
        if r.run is None:
            rows.append([LABELS[name], *["—"] * 13, r.reason or ""])
            continue
        flops, mem = r.cost.flops, r.run.total_bytes
        medians = [1e3 * common.median(t) for t in r.times]
        cpu_medians = [1e3 * common.median(t) for t in r.cpu]
        if have_bound:
            flop_ratio = fmt(flops / bound.cost.flops)
            mem_ratio = fmt(mem / bound.run.total_bytes)
            wall_ratio, cpu_ratio = (spread([
                common.median(t) / common.median(tb)
                for t, tb in zip(getattr(r, f), getattr(bound, f), strict=False)
            ]) for f in ("times", "cpu"))
        else:
            flop_ratio = mem_ratio = wall_ratio = cpu_ratio = "—"
        ref = results.get(REFERENCE.get(name, ""))
        if name in REFERENCE.values():
            check = "reference"
        elif ref is not None and ref.canon is not None and r.canon is not None:
            check = f"rel. diff {common.max_rel_diff(r.canon, ref.canon):.1e} vs {ref.name}"
        else:
            check = "—"
        rows.append([
            LABELS[name], fmt(flops / 1e9), flop_ratio, fmt(r.cost.bytes_accessed / 1e9),
            fmt(r.run.temp_bytes / mib), fmt(r.run.argument_bytes / mib),
            fmt(r.run.output_bytes / mib), fmt(mem / mib), mem_ratio,
            spread(medians), wall_ratio, spread(cpu_medians), cpu_ratio,
            f"{r.run.compile_s + r.cost.compile_s:.1f}", check,
        ])
    return common.markdown_table(header, rows)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--small", action="store_true", help="tiny shapes (seconds), for debugging")
    parser.add_argument("--mid", action="store_true",
                        help="mid-size shapes (d_model 512, 2 layers, seq 256): development")
    parser.add_argument("--steps", type=int, default=5,
                        help="timed steps per repetition; each repetition reports their median")
    parser.add_argument("--repeats", type=int, default=3,
                        help="repetitions of the timing sweep over all rows (min/median/max)")
    parser.add_argument("--warmup", type=int, default=1,
                        help="untimed calls per row before timing (after the checking call)")
    parser.add_argument("--only", default=",".join(ROWS),
                        help=f"comma list of rows, from {','.join(ROWS)}")
    parser.add_argument("--device-info", action="store_true",
                        help="print the jax version and devices, then exit")
    args = parser.parse_args(argv)

    print(common.device_info(), flush=True)
    if args.device_info:
        return 0
    names = [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = [n for n in names if n not in ROWS]
    if unknown:
        parser.error(f"--only: unknown rows {unknown}; expected names from {list(ROWS)}")
    if args.steps < 1 or args.repeats < 1 or args.warmup < 0:
        parser.error("--steps and --repeats must be >= 1, --warmup >= 0")

    cfg = common.SMALL if args.small else MID if args.mid else common.FULL
    print(f"model: {cfg.describe()}", flush=True)
    setup = make_setup(cfg)

    results = {}
    for name in names:
        start = time.perf_counter()
        results[name] = r = build(name, setup)
        status = r.reason or f"compiled in {time.perf_counter() - start:.1f}s"
        print(f"  {name}: {status}", file=sys.stderr, flush=True)

    ready = [r for r in results.values() if r.run is not None]
    for r in ready:
        common.time_calls(r.run.fn, r.args, args.warmup)
    # Rows interleaved step by step (bound, jlora, ..., bound, jlora, ...), so a change in
    # machine load hits every row alike within seconds. Process CPU time is taken too: on
    # a shared machine it is far less sensitive to other jobs than wall-clock.
    for rep in range(args.repeats):
        for r in ready:
            r.times.append([])
            r.cpu.append([])
        for _ in range(args.steps):
            for r in ready:
                wall, cpu = time.perf_counter(), time.process_time()
                jax.block_until_ready(r.run.fn(*r.args))
                r.cpu[-1].append(time.process_time() - cpu)
                r.times[-1].append(time.perf_counter() - wall)
        print(f"  repetition {rep + 1}/{args.repeats} done", file=sys.stderr, flush=True)

    print(
        f"\none step = value_and_grad w.r.t. the trainable arrays; wall ms = median of "
        f"{args.steps} steps per repetition, over {args.repeats} repetitions "
        f"(median [min–max]); ×LB = ratio to the lower bound in the same repetition; CPU = "
        f"process CPU time (both cores) per step; FLOPs and "
        f"bytes from XLA's cost analysis of the unrolled step, memory from the scanned one.\n"
    )
    print(table(results))
    notes = [n for r in results.values() for n in r.notes]
    if notes:
        print("\nwarnings while building:")
        for n in notes:
            print(f"  {n}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
