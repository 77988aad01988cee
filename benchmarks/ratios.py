"""Side-by-side rows for the grouped benchmarks (``bench_moe.py``, ``bench_multi_adapter.py``).

A row is a step function and its arguments. :func:`measure` compiles every row once
(XLA's FLOPs, bytes accessed and memory, from ``common.compile_step``), calls each once
to warm up and to read its outputs, then times the rows in interleaved rounds (each
round: every row ``steps`` times, the median kept), so a slow patch of a shared machine
hits every row alike. :func:`table` prints each figure with its ratio to a reference
row, wall-clock ratios taken within each round (median [min–max] over rounds), and a
``check`` column: the largest relative difference of a row's outputs from those of the
row it must agree with.

Nothing here asserts a timing: benchmarks print, people read.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable

import common
import jax


@dataclasses.dataclass
class Row:
    """One step to measure: ``step(*args)``; ``canon(outputs) -> {name: array}`` for the
    check column; ``agrees_with``: the row whose canon outputs it must match."""

    label: str
    step: Callable
    args: tuple
    canon: Callable | None = None
    agrees_with: str | None = None
    compiled: common.Compiled | None = None
    outputs: dict | None = None
    rounds: list[float] = dataclasses.field(default_factory=list)
    error: str | None = None


def measure(rows: dict[str, Row], rounds: int, steps: int) -> dict[str, Row]:
    """Compile, warm up and time every row (see the module docstring); a row that fails
    keeps its error for the table."""
    for name, row in rows.items():
        start = time.perf_counter()
        try:
            row.compiled = common.compile_step(row.step, *row.args)
            out = jax.block_until_ready(row.compiled.fn(*row.args))
            row.outputs = row.canon(out) if row.canon else None
        except Exception as e:  # noqa: BLE001 - the table says what went wrong
            row.error = f"{type(e).__name__}: {' '.join(str(e).split())[:160]}"
        print(f"  compiled {name} in {time.perf_counter() - start:.1f}s", flush=True)
    live = [r for r in rows.values() if r.error is None]
    for _ in range(rounds):
        for row in live:
            row.rounds.append(common.median(common.time_calls(row.compiled.fn, row.args, steps)))
    return rows


def _fmt(x: float, digits: int = 3) -> str:
    if x != x:  # nan
        return "—"
    return f"{x:.{digits}g}" if abs(x) < 10 ** digits else f"{x:.0f}"


def _ratio(x: float, ref: float) -> str:
    return _fmt(x / ref) + "×" if ref and ref == ref else "—"


def table(rows: dict[str, Row], reference: str) -> str:
    """The markdown table of every row, ratios to ``rows[reference]``."""
    ref = rows[reference]
    header = ["row", "what", "GFLOP", "×", "GB accessed", "×", "memory MB", "×",
              "wall ms", "× (median [range])", "check"]
    out = []
    for name, row in rows.items():
        if row.error is not None:
            out.append([name, row.label, *(["—"] * 8), row.error])
            continue
        c, rc = row.compiled, ref.compiled
        wall = common.median(row.rounds) if row.rounds else float("nan")
        ratios = [a / b for a, b in zip(row.rounds, ref.rounds, strict=True)]
        spread = (f"{_fmt(common.median(ratios))}× [{_fmt(min(ratios))}–{_fmt(max(ratios))}]"
                  if ratios else "—")
        check = "—"
        other = rows.get(row.agrees_with or "")
        if row.outputs and other is not None and other.outputs:
            shared = {k: v for k, v in other.outputs.items() if k in row.outputs}
            check = f"{common.max_rel_diff(row.outputs, shared):.1e} vs {row.agrees_with}"
        out.append([
            name, row.label,
            _fmt(c.flops / 1e9), _ratio(c.flops, rc.flops),
            _fmt(c.bytes_accessed / 1e9), _ratio(c.bytes_accessed, rc.bytes_accessed),
            _fmt(c.total_bytes / 2**20), _ratio(c.total_bytes, rc.total_bytes),
            _fmt(wall * 1e3), spread, check,
        ])
    return common.markdown_table(header, out)
