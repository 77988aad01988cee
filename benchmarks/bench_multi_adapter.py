"""One batch, many adapters: grouped batches against the alternatives, side by side.

The model is ``common.Transformer`` (pre-LN blocks under ``nn.scan``); adapters on every
block's query, key, value, out, up and down kernels. The batch holds ``batch`` sequences
of ``seq`` tokens; ``adapters`` adapters of ranks cycling through ``ranks`` each serve a
share of the sequences, and the last ``base_rows`` sequences use none.

===========  ==========================================================================
single       the same batch with one rank-16 adapter for every sequence (the reference)
grouped      ``jlora.multi_adapter.grouped``: sequences sorted by adapter, each adapter
             at its own rank through ragged products (``grouped_bank``)
per_example  ``jlora.multi_adapter.per_example``: every sequence gathers its adapter's
             factors, padded to the largest rank (``stack_adapters``)
loop         one ``jlora.lora`` call per adapter on its slice of the batch, plus the
             frozen model on the rows without one
base         the frozen model alone
===========  ==========================================================================

``--train`` measures a train step instead of serving: the loss's gradient w.r.t. every
adapter at once (the bank's slots, the stacked bank, or each set). FLOPs and bytes come
from XLA's cost analysis, memory from its memory analysis, wall-clock from interleaved
rounds (``ratios.py``); ratios are to ``single``. ``check`` compares outputs (or loss and
gradients) with the loop's.

XLA:CPU runs ``ragged_dot`` as a dense product per group, so on CPU the grouped and
factored-expert thin products are matmuls as wide as all adapters' ranks together
(``jlora/_grouped_ops.py``); GPU and TPU lower them to grouped matmuls.

Usage::

  python benchmarks/bench_multi_adapter.py               # documented size on an accelerator;
                                                         # on CPU, --size small unless asked
  python benchmarks/bench_multi_adapter.py --size small --train
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402
import ratios  # noqa: E402

import jlora  # noqa: E402
from jlora import multi_adapter  # noqa: E402


@dataclasses.dataclass(frozen=True)
class BatchConfig:
    model: common.ModelConfig
    adapters: int = 16
    ranks: tuple[int, ...] = (8, 16, 32, 64)
    base_rows: int = 8  # sequences without an adapter, at the end of the batch


SIZES = {
    # 64 sequences of 32 tokens: 2048 tokens.
    "full": BatchConfig(dataclasses.replace(common.FULL, layers=2, seq=32, batch=64)),
    "small": BatchConfig(dataclasses.replace(common.SMALL, d_model=256, mlp=1024, seq=16,
                                             batch=32), base_rows=4),
}


def _adapters(params, key, rank: int):
    config = jlora.LoraConfig(rank=rank, alpha=2.0 * rank, targets=common.TARGETS,
                              layouts=common.LAYOUTS)
    ka, kb = jax.random.split(key)
    ads = jlora.init(ka, params, config)
    keys = dict(zip(ads, jax.random.split(kb, len(ads)), strict=True))
    return {p: ad.replace(b=0.02 * jax.random.normal(keys[p], ad.b.shape)) for p, ad in ads.items()}


def setup(cfg: BatchConfig):
    m = cfg.model
    kx, kp, *ks = jax.random.split(jax.random.key(0), 3 + cfg.adapters)
    x = common.inputs(m, kx)
    model = common.Transformer(m)
    params = jax.jit(model.init)(kp, x)["params"]
    sets = {f"a{k:02d}": _adapters(params, ks[k], cfg.ranks[k % len(cfg.ranks)])
            for k in range(cfg.adapters)}
    single = _adapters(params, ks[-1], 16)
    served = m.batch - cfg.base_rows
    sizes = [served // cfg.adapters + (k < served % cfg.adapters) for k in range(cfg.adapters)]
    return model, params, sets, single, x, sizes


def rows(cfg: BatchConfig, train: bool) -> dict[str, ratios.Row]:
    model, params, sets, single, x, sizes = setup(cfg)
    apply = lambda p, x: model.apply({"params": p}, x)  # noqa: E731
    bank = multi_adapter.grouped_bank(sets)
    stacked = multi_adapter.stack_adapters(sets)
    # The batch in bank order (sequences of one adapter together, base rows last).
    by_name = dict(zip(sets, sizes, strict=True))
    group_sizes = jnp.asarray([by_name[n] for n in bank.names], jnp.int32)
    bounds = np.cumsum([0, *group_sizes.tolist()])
    ids = jnp.asarray(np.repeat(np.arange(len(bank)), group_sizes.tolist()))
    stacked_ids = jnp.asarray([stacked.names.index(bank.names[k]) for k in ids.tolist()],
                              jnp.int32)
    served = int(bounds[-1])
    lora_apply = jlora.lora(apply)
    grouped_apply = multi_adapter.grouped(apply)
    per_example_apply = multi_adapter.per_example(apply)

    def grouped_fwd(bank, params, x):
        return grouped_apply(params, bank, group_sizes, x)

    def per_example_fwd(stacked, params, x):
        y = per_example_apply(params, stacked, stacked_ids, x[:served])
        return jnp.concatenate([y, apply(params, x[served:])])

    def loop_fwd(sets, params, x):
        ys = [lora_apply(params, sets[n], x[bounds[k]:bounds[k + 1]])
              for k, n in enumerate(bank.names)]
        return jnp.concatenate([*ys, apply(params, x[served:])])

    def single_fwd(ads, params, x):
        return lora_apply(params, ads, x)

    def base_fwd(params, x):
        return apply(params, x)

    def as_step(fwd):
        if not train:
            return fwd
        return lambda trained, *rest: jax.value_and_grad(
            lambda t: common.loss_of(fwd(t, *rest), rest[-1]))(trained)

    def canon(out):
        if not train:
            return {"y": out}
        loss, grads = out
        flat = {}
        if isinstance(grads, multi_adapter.AdapterBank):
            return {"loss": loss}  # padded and scale-folded: compared by loss only
        if isinstance(grads, multi_adapter.GroupedBank):
            grads = grads.slots
        for name, ads in grads.items() if isinstance(grads, dict) else ():
            for path, g in ads.items() if isinstance(ads, dict) else ():
                flat[f"{name}/{path}/a"], flat[f"{name}/{path}/b"] = g.a, g.b
        return {"loss": loss, **flat}

    rank_note = f"ranks {sorted(set(cfg.ranks))}"
    base_step = base_fwd if not train else (
        lambda params, x: jax.value_and_grad(lambda x: common.loss_of(apply(params, x), x))(x))
    return {
        "single": ratios.Row("one rank-16 adapter for the whole batch", as_step(single_fwd),
                             (single, params, x), lambda out: {}),
        "grouped": ratios.Row(f"grouped: {cfg.adapters} adapters, {rank_note}",
                              as_step(grouped_fwd), (bank, params, x), canon, "loop"),
        "per_example": ratios.Row("per_example (padded to the largest rank)",
                                  as_step(per_example_fwd), (stacked, params, x), canon,
                                  "loop"),
        "loop": ratios.Row("one jlora.lora call per adapter", as_step(loop_fwd),
                           (sets, params, x), canon),
        "base": ratios.Row("frozen model, no adapter" + (" (grad to input)" if train else ""),
                           base_step, (params, x)),
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", choices=sorted(SIZES),
                        help="default: full on an accelerator, small on CPU")
    parser.add_argument("--train", action="store_true", help="a train step, not serving")
    parser.add_argument("--rounds", type=int, default=5,
                        help="interleaved timing rounds (0: XLA's figures only, no timing)")
    parser.add_argument("--steps", type=int, default=5, help="timed calls per row per round")
    args = parser.parse_args(argv)
    size = args.size or ("small" if jax.default_backend() == "cpu" else "full")
    cfg = SIZES[size]
    print(common.device_info())
    m = cfg.model
    print(f"{'train step' if args.train else 'serving'} ({size}): {m.layers} pre-LN blocks, "
          f"d_model {m.d_model}, {m.heads} heads, MLP {m.mlp}, {m.batch} sequences of "
          f"{m.seq} tokens; {cfg.adapters} adapters of ranks {cfg.ranks} (cycled) on query, "
          f"key, value, out, up, down; {cfg.base_rows} sequences without one")
    measured = ratios.measure(rows(cfg, args.train), args.rounds, args.steps)
    print(ratios.table(measured, "single"))


if __name__ == "__main__":
    main()
