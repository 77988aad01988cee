"""The ``jlora`` command: inspect, convert and merge adapters from the shell.

::

  jlora inspect DIR [--params BASE.safetensors] [--layout PATTERN=LAYOUT ...]
  jlora convert SRC DST --to {native,peft} [--params BASE.safetensors] [--layout ...]
  jlora merge BASE.safetensors ADAPTER_DIR OUT.safetensors [--layout ...]

An adapter directory is auto-detected: native (``jlora_adapter.json``) or PEFT
(``adapter_config.json``). ``BASE.safetensors`` holds the base weights keyed by their
jlora path (``params/dense/kernel``). A PEFT adapter read without ``--params`` is matched
to stand-in kernels built from its own factor shapes, named ``<module>/kernel`` (or
``<module>/embedding``).

Exit status: 0 on success, 1 on a failure (the message goes to stderr), 2 on a usage
error.

Example:
  >>> import tempfile, jax, jax.numpy as jnp, jlora
  >>> from jlora.cli import main
  >>> ads = jlora.init(jax.random.key(0), {"fc": {"kernel": jnp.ones((4, 3))}},
  ...                  jlora.LoraConfig(rank=2))
  >>> path = jlora.save(tempfile.mkdtemp() + "/ad", ads)
  >>> main(["inspect", str(path)])  # doctest: +ELLIPSIS
  native jlora adapter at ... (format_version 1, written by jlora ...)
  path       kernel shape  layout  rank  alpha  policy    scale  params
  ...
  fc/kernel  4x3           io         2      8  standard      4      14
  <BLANKLINE>
  adapter params: 14 in 1 kernel
  0
"""

from __future__ import annotations

import argparse
import json
import pathlib
import re
import sys

import jax
import jax.numpy as jnp
import numpy as np

from jlora import _files as files
from jlora import _io as io
from jlora import _merging as merging
from jlora import peft
from jlora._reporting import summary

__all__ = ["build_parser", "main"]


class CommandError(Exception):
    """A failure to report on stderr with exit status 1 (no traceback)."""


# -- argument types -----------------------------------------------------------------------


def _layout_arg(text: str) -> tuple[str, str]:
    pattern, sep, layout = text.rpartition("=")
    if not sep or not pattern or not layout:
        raise argparse.ArgumentTypeError(
            f"expected PATTERN=LAYOUT (e.g. 'layers/.*/kernel=s...'), got {text!r}"
        )
    try:
        re.compile(pattern)
    except re.error as e:
        raise argparse.ArgumentTypeError(f"pattern {pattern!r} is not a regex: {e}") from None
    return pattern, layout


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``jlora`` command (one subparser per subcommand).

    Example:
      >>> build_parser().parse_args(["convert", "a", "b", "--to", "peft"]).to
      'peft'
    """
    parser = argparse.ArgumentParser(
        prog="jlora",
        description="Inspect, convert and merge LoRA adapters (jlora native or PEFT).",
        epilog="Exit status: 0 success, 1 failure, 2 usage error.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def add_params(p, what):
        p.add_argument(
            "--params", metavar="BASE.safetensors",
            help=f"base weights keyed by jlora path; {what}",
        )

    def add_layouts(p):
        p.add_argument(
            "--layout", metavar="PATTERN=LAYOUT", action="append", default=[],
            type=_layout_arg,
            help="layout of the base kernels whose path fully matches PATTERN (PEFT import), "
                 "in the kernel's own axis order, e.g. 'layers/mlp/kernel=sio' or "
                 "'.*/c_attn/kernel=oi' (stored (out, in)); repeatable",
        )

    inspect = sub.add_parser(
        "inspect", help="table of the adapted kernels of an adapter directory",
        description="Print one row per adapted kernel: path, kernel shape, layout, rank, "
                    "alpha, policy, scale, parameter count.",
    )
    inspect.add_argument("dir", metavar="DIR", help="a native or PEFT adapter directory")
    add_params(inspect, "verifies the adapter against them and adds the totals")
    add_layouts(inspect)

    convert = sub.add_parser(
        "convert", help="convert an adapter between the native and PEFT formats",
        description="Read SRC (native or PEFT, auto-detected) and write DST in the format "
                    "given by --to, atomically.",
    )
    convert.add_argument("src", metavar="SRC", help="the adapter directory to read")
    convert.add_argument("dst", metavar="DST", help="the adapter directory to write")
    convert.add_argument("--to", required=True, choices=("native", "peft"),
                         help="the format of DST")
    add_params(convert, "a PEFT SRC is matched to their paths (default: stand-in names)")
    add_layouts(convert)
    convert.add_argument("--base-model", metavar="NAME", default=None,
                         help="base_model_name_or_path for a PEFT DST")

    merge = sub.add_parser(
        "merge", help="merge an adapter into base weights: W + s·A@B",
        description="Write OUT.safetensors: the tensors of BASE with every adapted kernel "
                    "merged (computed in float32, cast back to the kernel's dtype), atomically.",
    )
    merge.add_argument("base", metavar="BASE.safetensors", help="base weights keyed by path")
    merge.add_argument("adapter", metavar="ADAPTER_DIR", help="a native or PEFT adapter")
    merge.add_argument("out", metavar="OUT.safetensors", help="the merged weights to write")
    add_layouts(merge)
    return parser


# -- shared steps ---------------------------------------------------------------------------


def _detect(directory: str) -> str:
    path = pathlib.Path(directory)
    if io.is_native_dir(path):
        return "native"
    if (path / peft.CONFIG_NAME).is_file():
        return "peft"
    if not path.exists():
        raise CommandError(f"No such adapter directory: {directory!r}.")
    raise CommandError(
        f"{directory!r} is not an adapter directory: expected {io.JSON_NAME} (jlora native) "
        f"or {peft.CONFIG_NAME} (PEFT) in it."
    )


def _read_params(path: str | None):
    if path is None:
        return None
    return files.read_safetensors(path)[0]


def _peft_standins(directory: str) -> tuple[dict, dict]:
    """Kernel stand-ins ``{"<module>/kernel": ShapeDtypeStruct}`` from a PEFT adapter's factors.

    PEFT stores ``lora_A (r, in, *window)`` and ``lora_B (out, r, ...)``, embeddings
    ``lora_embedding_A (r, vocab)`` and ``lora_embedding_B (dim, r)``: enough to give each
    module a kernel of the right flax shape, so ``jlora.peft.load`` needs no model. Each
    stand-in's layout is known (it was built in that layout), so it goes into the returned
    layouts and nothing is guessed.
    """
    tensors, _ = files.read_safetensors(pathlib.Path(directory) / peft.WEIGHTS_NAME)
    params, layouts = {}, {}
    for key, a in tensors.items():
        name = key.removeprefix(peft.PREFIX)
        if name.endswith(".lora_embedding_A"):
            module = name.removesuffix(".lora_embedding_A")
            b = tensors.get(f"{peft.PREFIX}{module}.lora_embedding_B")
            if b is not None:
                params[module] = {"embedding": jax.ShapeDtypeStruct((a.shape[1], b.shape[0]),
                                                                    a.dtype)}
                layouts[re.escape(f"{module}/embedding")] = "vf"
        elif name.endswith(".lora_A.weight"):
            module = name.removesuffix(".lora_A.weight")
            b = tensors.get(f"{peft.PREFIX}{module}.lora_B.weight")
            if b is None:
                continue  # jlora.peft.load names the missing factor
            window = tuple(a.shape[2:])
            shape = (*window, a.shape[1], b.shape[0])
            params[module] = {"kernel": jax.ShapeDtypeStruct(shape, a.dtype)}
            layouts[re.escape(f"{module}/kernel")] = "w" * len(window) + "io"
    return params, layouts


def _load_any(directory: str, params, layouts: list[tuple[str, str]], *, note=True):
    """``(kind, adapters)`` of a native or PEFT adapter directory."""
    kind = _detect(directory)
    if kind == "native":
        return kind, io.load(directory, params)
    user_layouts = dict(layouts)
    if params is None:
        params, standin_layouts = _peft_standins(directory)
        user_layouts = standin_layouts | user_layouts
        if note:
            print("note: no --params given: kernel paths are the PEFT module names plus "
                  "'/kernel' (or '/embedding').", file=sys.stderr)
    return kind, peft.load(directory, params, layouts=user_layouts or None)


# -- subcommands -----------------------------------------------------------------------------


def _describe(directory: str, kind: str) -> str:
    path = pathlib.Path(directory)
    if kind == "native":
        meta = json.loads((path / io.JSON_NAME).read_text())
        return (f"native jlora adapter at {directory} (format_version "
                f"{meta['format_version']}, written by jlora {meta['jlora_version']})")
    config = json.loads((path / peft.CONFIG_NAME).read_text())
    fields = ", ".join(f"{k} {config.get(k)!r}" for k in
                       ("peft_type", "r", "lora_alpha", "use_rslora", "use_dora"))
    return f"PEFT adapter at {directory} ({fields})"


def _inspect(args) -> None:
    params = _read_params(args.params)
    kind, adapters = _load_any(args.dir, params, args.layout, note=False)
    print(_describe(args.dir, kind))
    if params is not None:
        print(summary(params, adapters))
        return
    # Without the base weights, stand-in kernels of the right shapes give summary's table;
    # its totals would be about the stand-ins, so print the adapters' own count instead.
    standins = {p: jax.ShapeDtypeStruct(ad.kernel_shape, jnp.float32) for p, ad in adapters.items()}
    table = summary(standins, adapters).split("\n\n")[0]
    total = sum(ad.num_params for ad in adapters.values())
    plural = "" if len(adapters) == 1 else "s"
    print(f"{table}\n\nadapter params: {total:,} in {len(adapters)} kernel{plural}")


def _convert(args) -> None:
    params = _read_params(args.params)
    kind, adapters = _load_any(args.src, params, args.layout)
    if args.to == "native":
        out = io.save(args.dst, adapters)
    else:
        out = peft.save(args.dst, adapters, base_model_name_or_path=args.base_model)
    print(f"wrote {args.to} adapter ({len(adapters)} kernels, from {kind}) to {out}")


def _merge(args) -> None:
    base, metadata = files.read_safetensors(args.base)
    _, adapters = _load_any(args.adapter, base, args.layout)
    merged = merging.merge(base, adapters)
    out = files.write_safetensors(args.out, {k: np.asarray(v) for k, v in merged.items()}, metadata)
    print(f"merged {len(adapters)} adapted kernels into {out} ({len(merged)} tensors)")


COMMANDS = {"inspect": _inspect, "convert": _convert, "merge": _merge}


def main(argv: list[str] | None = None) -> int:
    """Run the ``jlora`` command with ``argv`` (default ``sys.argv[1:]``); return the exit status.

    Example:
      >>> main(["convert", "--help"])  # doctest: +ELLIPSIS
      usage: jlora convert ...
      0
    """
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help (0) and usage errors (2): argparse has printed them
        return int(e.code or 0)
    try:
        COMMANDS[args.command](args)
    except (CommandError, ValueError, TypeError, OSError) as e:
        # ValueErrors (AdapterFormatError, LayoutError, PatternError...) carry messages
        # written for users; a traceback would only hide them.
        print(f"jlora {args.command}: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
