"""Byte-level text that every Python install has: stdlib ``.py`` sources and C headers.

Shared by ``finetune_lm.py`` and ``rank_sweep.py``. Tokens are raw bytes (vocabulary
256), so there is no tokenizer to download and no decoding that can fail.
"""

from __future__ import annotations

import os
import sysconfig
import zlib
from pathlib import Path

import numpy as np

# Test suites are large, repetitive and unlike ordinary code; site-packages is not stdlib.
_SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idlelib", "__pycache__"}


def _stable_order(root: Path, files: list[Path]) -> list[Path]:
    # Order by a hash of the relative path: a deterministic sample across the whole tree
    # (not just the alphabetically first packages) that does not depend on the filesystem.
    return sorted(files, key=lambda f: (zlib.crc32(str(f.relative_to(root)).encode()), f))


def stdlib_sources(max_bytes: int, root: str | None = None) -> tuple[np.ndarray, int]:
    """Up to ``max_bytes`` of the standard library's ``.py`` files as uint8, and the file count."""
    root_path = Path(root or sysconfig.get_paths()["stdlib"])
    files = [
        f for f in root_path.rglob("*.py")
        if not _SKIP_DIRS.intersection(f.relative_to(root_path).parts[:-1])
    ]
    if not files:
        raise FileNotFoundError(
            f"No .py files found under {str(root_path)!r} for pretraining: pass "
            "--pretrain-dir with a directory of Python sources."
        )
    chunks, total = [], 0
    for f in _stable_order(root_path, files):
        data = f.read_bytes() + b"\n"
        chunks.append(data)
        total += len(data)
        if total >= max_bytes:
            break
    return np.frombuffer(b"".join(chunks)[:max_bytes], np.uint8), len(chunks)


def header_split(
    root: str | None = None, heldout_every: int = 5
) -> tuple[np.ndarray, np.ndarray, list[str], list[str]]:
    """The C headers under ``root`` split *by file* into (train, held-out) byte streams.

    A file is held out when the crc32 of its relative path is divisible by
    ``heldout_every`` (about one file in ``heldout_every``): the split is the same on
    every machine with the same headers, and no held-out file leaks into training.
    Returns ``(train, heldout, train_files, heldout_files)``.
    """
    root_path = Path(root or sysconfig.get_paths()["include"])
    files = sorted(root_path.rglob("*.h"))
    if len(files) < 2:
        raise FileNotFoundError(
            f"Found {len(files)} C header(s) under {str(root_path)!r}; need at least 2 to hold "
            "some out. Install the Python development headers (e.g. python3-dev) or pass "
            "--finetune-dir with another directory of .h files."
        )
    rel = [str(f.relative_to(root_path)) for f in files]
    held = [zlib.crc32(r.encode()) % heldout_every == 0 for r in rel]
    if not any(held) or all(held):  # a tiny directory: hold out the last file
        held = [i == len(files) - 1 for i in range(len(files))]

    def join(keep):
        data = b"".join(f.read_bytes() + b"\n" for f, h in zip(files, held, strict=True)
                        if h == keep)
        return np.frombuffer(data, np.uint8)

    pairs = list(zip(rel, held, strict=True))
    return (
        join(False), join(True), [r for r, h in pairs if not h], [r for r, h in pairs if h],
    )


def random_windows(rng: np.random.Generator, data: np.ndarray, batch: int, length: int):
    """``batch`` random windows of ``length`` bytes as int32 ``(batch, length)``."""
    if len(data) <= length:
        raise ValueError(f"Need more than {length} bytes of text, got {len(data)}.")
    starts = rng.integers(0, len(data) - length, size=batch)
    return data[starts[:, None] + np.arange(length)].astype(np.int32)


def fixed_windows(data: np.ndarray, length: int, count: int) -> np.ndarray:
    """Up to ``count`` evenly spaced windows of ``length`` bytes: a fixed evaluation set."""
    if len(data) <= length:
        raise ValueError(f"Need more than {length} bytes of held-out text, got {len(data)}.")
    starts = np.linspace(0, len(data) - length, num=count).astype(np.int64)
    return data[np.unique(starts)[:, None] + np.arange(length)].astype(np.int32)


def write_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file, so an interrupted run never
    leaves a half-written plot, result or cache behind. Missing folders are made
    (``--out`` and ``--cache-dir`` may name new ones)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
