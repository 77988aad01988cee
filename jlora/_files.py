"""Files on disk, shared by the native format (:mod:`jlora.io`) and PEFT's (:mod:`jlora.peft`).

Two concerns, each written once:

- **Atomic writes.** :func:`write_bytes_atomic` writes a temporary file beside the target
  and renames it over the target; :func:`write_dir_atomic` does the same for a directory
  of files, moving an existing one aside first (directories cannot be swapped in one
  step) and refusing to replace a directory that holds anything else. A writer killed
  part-way leaves its temporary behind; the next write (and, for directories, the next
  load) of the same target removes it (:func:`remove_stale_temporaries`).
- **safetensors with every float dtype.** ``safetensors.numpy.load`` has no bfloat16 or
  float8 (``KeyError: 'BF16'``), and ``safe_open(..., framework="numpy")`` reads
  bfloat16 only once ``ml_dtypes`` is imported and float8 not at all; so
  :func:`parse_safetensors` maps the dtype codes to numpy and ``ml_dtypes`` itself.
  Writing needs no help: ``safetensors.numpy.save`` writes every dtype.

Failures to read are :class:`AdapterFormatError` (a ``ValueError``) naming the file.

Example:
  >>> import tempfile, numpy as np, ml_dtypes
  >>> x = np.arange(3, dtype=np.float32).astype(ml_dtypes.bfloat16)
  >>> path = write_safetensors(tempfile.mkdtemp() + "/x.safetensors", {"x": x})
  >>> read_safetensors(path)[0]["x"].dtype.name
  'bfloat16'
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pathlib
import re
import shutil
import socket
import struct
import tempfile
import time
from collections.abc import Mapping
from typing import Any

import ml_dtypes
import numpy as np
import safetensors
import safetensors.numpy

__all__ = [
    "AdapterFormatError",
    "interrupted_copy",
    "parse_safetensors",
    "read_json",
    "read_safetensors",
    "remove_stale_temporaries",
    "safetensors_bytes",
    "write_bytes_atomic",
    "write_dir_atomic",
    "write_safetensors",
]

# safetensors' dtype codes -> numpy dtypes, the ml_dtypes ones (BF16, F8) included.
_ST_DTYPES = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U64": np.dtype(np.uint64),
    "U32": np.dtype(np.uint32),
    "U16": np.dtype(np.uint16),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
    "C64": np.dtype(np.complex64),
}


class AdapterFormatError(ValueError):
    """A file that is missing, truncated, corrupted or does not describe valid adapters."""


# -- temporaries ------------------------------------------------------------------------
#
# Every temporary beside a target is named ``.NAME.TAG.tmp`` (``.old`` for a directory
# moved aside), where TAG is ``MACHINE-PID-RANDOM``: MACHINE hashes the host name and the
# pid namespace, PID is the writing process. A temporary is *stale*, and is removed by the
# next write or load of NAME, when
#
# - its writer is dead: same MACHINE and no process PID (checked with signal 0; a live
#   process, or one of another user, is never taken for dead), or
# - nothing in it changed for ``STALE_AFTER_S`` (a writer on another host or in another
#   pid namespace, whose PID means nothing here, a pid reused since, or a name written by
#   an older jlora without a TAG). jlora writes the data right after creating the
#   temporary, so a writer that is still alive has touched it within seconds, not a day.
#
# A lock would tell live from dead without the age rule, but file locks are unreliable
# over NFS, where shared checkpoints often live; names need nothing from the filesystem.
# TAG never holds a dot, so ``.ad.v2.TAG.tmp`` (a temporary of ``ad.v2``) is never taken
# for one of ``ad``.

STALE_AFTER_S = 24 * 3600
_TAG = re.compile(r"(?P<machine>[0-9a-f]{8})-(?P<pid>[0-9]+)-[a-z0-9_]+")


def _machine() -> str:
    ident = socket.gethostname()
    with contextlib.suppress(OSError):  # pid namespaces are Linux's; elsewhere the host
        ident += f":{os.stat('/proc/self/ns/pid').st_ino}"
    return hashlib.sha256(ident.encode()).hexdigest()[:8]


def _tag_prefix() -> str:
    """The start of a new temporary's TAG; ``tempfile`` appends the RANDOM part."""
    return f"{_machine()}-{os.getpid()}-"


def _writer_alive(tag: str) -> bool | None:
    """Whether the process that named a temporary ``tag`` runs; ``None``: cannot tell."""
    m = _TAG.fullmatch(tag)
    # os.kill(pid, 0) terminates the process on Windows: only ask on POSIX.
    if m is None or m["machine"] != _machine() or os.name != "posix":
        return None
    try:
        os.kill(int(m["pid"]), 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    except (OSError, OverflowError):
        return None
    return True


def _last_change(path: pathlib.Path) -> float:
    """The newest mtime of ``path`` and, for a directory, of what it holds."""
    newest = os.lstat(path).st_mtime
    if path.is_dir() and not path.is_symlink():
        for entry in os.scandir(path):
            with contextlib.suppress(OSError):
                newest = max(newest, entry.stat(follow_symlinks=False).st_mtime)
    return newest


def _temporaries(target: pathlib.Path, suffixes) -> list[tuple[pathlib.Path, str]]:
    """``(path, TAG)`` of every temporary of ``target`` (and of no other target)."""
    prefix = f".{target.name}."
    try:
        names = os.listdir(target.parent)
    except OSError:
        return []
    found = []
    for name in names:
        suffix = next((s for s in suffixes if name.endswith(s)), None)
        if suffix is None or not name.startswith(prefix):
            continue
        tag = name[len(prefix): -len(suffix)]
        if tag and "." not in tag:
            found.append((target.parent / name, tag))
    return sorted(found)


def _is_stale(path: pathlib.Path, tag: str) -> bool:
    alive = _writer_alive(tag)
    if alive is False:
        return True
    try:
        return time.time() - _last_change(path) > STALE_AFTER_S
    except OSError:  # gone already (its writer finished, or another cleaner was faster)
        return False


def _remove(path: pathlib.Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            os.unlink(path)


def _remove_stale(target: pathlib.Path, suffixes) -> list[pathlib.Path]:
    removed = []
    for path, tag in _temporaries(target, suffixes):
        if _is_stale(path, tag):
            _remove(path)
            removed.append(path)
    return removed


def remove_stale_temporaries(path: str | os.PathLike) -> list[pathlib.Path]:
    """Remove the ``.NAME.*.tmp`` temporaries that writers killed part-way left beside
    ``path``; return them.

    Only ``path``'s own temporaries are considered, and only stale ones are removed:
    their writer is known to be dead, or nothing in them changed for a day (see the
    comment above). A temporary that a live process may be writing is kept. Best effort:
    what cannot be removed (a read-only directory) is left alone, silently. The copy an
    interrupted directory swap left (``.NAME.*.old``, see :func:`interrupted_copy`) is
    kept: it may be the only complete adapter. :func:`write_dir_atomic` and
    :func:`write_bytes_atomic` call this before writing; the loaders call it too.

    Example:
      >>> import tempfile, pathlib, os, time
      >>> root = pathlib.Path(tempfile.mkdtemp())
      >>> (root / ".ad.0123abcd.tmp").mkdir()  # no writer in the name: only its age tells
      >>> remove_stale_temporaries(root / "ad")  # changed just now: kept
      []
      >>> then = time.time() - 2 * STALE_AFTER_S
      >>> os.utime(root / ".ad.0123abcd.tmp", (then, then))
      >>> [p.name for p in remove_stale_temporaries(root / "ad")]
      ['.ad.0123abcd.tmp']
    """
    return _remove_stale(pathlib.Path(path), (".tmp",))


# -- atomic writes ----------------------------------------------------------------------


def _fsync_dir(path: pathlib.Path) -> None:
    # Make a rename durable; not every platform can open a directory, hence the guard.
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _write_file(path: pathlib.Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> pathlib.Path:
    """Write ``data`` to ``path`` via a temporary file in the same directory and a rename.

    Readers see the old file or the new one, never a partial one. Stale temporaries of
    ``path`` (from a writer killed part-way) are removed first.

    Example:
      >>> import tempfile, pathlib
      >>> p = write_bytes_atomic(tempfile.mkdtemp() + "/x.bin", b"abc")
      >>> p.read_bytes()
      b'abc'
    """
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale(path, (".tmp",))
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{_tag_prefix()}", suffix=".tmp",
                               dir=path.parent)
    os.close(fd)
    try:
        _write_file(pathlib.Path(tmp), data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)
    return path


def _check_replaceable(target: pathlib.Path, names, what: str) -> None:
    if not target.exists() and not target.is_symlink():
        return
    if not target.is_dir() or target.is_symlink():
        raise FileExistsError(
            f"Cannot save {what} to {str(target)!r}: it exists and is not a directory."
        )
    foreign = sorted(p.name for p in target.iterdir() if p.name not in names)
    if foreign:
        raise FileExistsError(
            f"Refusing to replace the directory {str(target)!r}: it holds files that are not "
            f"part of {what}: {foreign}. Save to a new or empty directory."
        )


def write_dir_atomic(
    path: str | os.PathLike, files: Mapping[str, bytes], *, what: str = "the directory"
) -> pathlib.Path:
    """Make ``path`` a directory holding exactly ``files`` (``{name: bytes}``), atomically.

    The files are written and fsynced in a fresh directory beside ``path``
    (``.NAME.xxxx.tmp``), which is then renamed into place. An existing ``path`` is first
    renamed aside (``.NAME.xxxx.old``) and deleted once the new one is in place; if the
    new one cannot be moved in, the old one is put back. A crash between the two renames
    leaves the old directory complete beside ``path`` (see :func:`interrupted_copy`).
    Stale temporaries of ``path`` (see :func:`remove_stale_temporaries`) are removed
    before writing, and stale ``.old`` copies once the new directory is in place (it
    supersedes them).

    Args:
      path: the directory to create or replace.
      files: the file names and contents, written in this order.
      what: what the directory holds, for error messages (e.g. ``"a PEFT adapter"``).

    Returns:
      ``path`` as a ``pathlib.Path``.

    Raises:
      FileExistsError: ``path`` is a file, a link, or a directory holding any file whose
        name is not in ``files`` (which is never replaced).

    Example:
      >>> import tempfile
      >>> out = write_dir_atomic(tempfile.mkdtemp() + "/d", {"a.txt": b"1", "b.txt": b"2"})
      >>> out = write_dir_atomic(out, {"a.txt": b"new", "b.txt": b"2"})  # replaces it
      >>> sorted(p.name for p in out.iterdir()), (out / "a.txt").read_bytes()
      (['a.txt', 'b.txt'], b'new')
    """
    target = pathlib.Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    _check_replaceable(target, set(files), what)
    _remove_stale(target, (".tmp",))
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{target.name}.{_tag_prefix()}",
                                        suffix=".tmp", dir=target.parent))
    old = None
    try:
        os.chmod(tmp, 0o755)  # mkdtemp makes it 0700; the directory is meant to be shared
        for name, data in files.items():
            _write_file(tmp / name, data)
        _fsync_dir(tmp)
        if target.exists():
            old = tmp.with_suffix(".old")  # the same unique TAG
            os.rename(target, old)
        os.rename(tmp, target)
        _fsync_dir(target.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and not target.exists():
            os.rename(old, target)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    _remove_stale(target, (".old",))
    return target


def interrupted_copy(path: str | os.PathLike) -> pathlib.Path | None:
    """The previous directory an interrupted :func:`write_dir_atomic` left beside ``path``.

    ``None`` when there is none; the most recently changed when there are several.

    Example:
      >>> import tempfile, pathlib
      >>> root = pathlib.Path(tempfile.mkdtemp())
      >>> (root / ".ad.0123abcd.old").mkdir()
      >>> interrupted_copy(root / "ad").name, interrupted_copy(root / "other")
      ('.ad.0123abcd.old', None)
    """
    leftovers = []
    for copy, _ in _temporaries(pathlib.Path(path), (".old",)):
        with contextlib.suppress(OSError):  # removed meanwhile
            leftovers.append((_last_change(copy), copy.name, copy))
    return max(leftovers)[2] if leftovers else None


# -- reading ------------------------------------------------------------------------------


def read_json(path: str | os.PathLike) -> Any:
    """The parsed JSON file at ``path``; :class:`AdapterFormatError` naming it if it is not
    UTF-8 or not valid JSON.

    Example:
      >>> import tempfile
      >>> read_json(write_bytes_atomic(tempfile.mkdtemp() + "/c.json", b'{"r": 8}'))
      {'r': 8}
    """
    file = str(path)
    try:
        text = pathlib.Path(path).read_text()
    except UnicodeDecodeError as e:
        raise AdapterFormatError(f"{file!r} is not UTF-8 text (corrupted?): {e}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise AdapterFormatError(
            f"{file!r} is not valid JSON (truncated or corrupted?): {e}"
        ) from None


# -- safetensors --------------------------------------------------------------------------


def safetensors_bytes(
    tensors: Mapping[str, Any], metadata: Mapping[str, str] | None = None
) -> bytes:
    """The safetensors file holding ``{name: array}`` (any dtype) and header ``metadata``.

    Example:
      >>> import numpy as np
      >>> data = safetensors_bytes({"k": np.ones(2, np.float16)}, {"by": "me"})
      >>> parse_safetensors(data)[0]["k"].dtype.name
      'float16'
    """
    arrays = {k: np.ascontiguousarray(np.asarray(v)) for k, v in tensors.items()}
    return safetensors.numpy.save(arrays, metadata=dict(metadata) if metadata else None)


def write_safetensors(
    path: str | os.PathLike,
    tensors: Mapping[str, Any],
    metadata: Mapping[str, str] | None = None,
) -> pathlib.Path:
    """Write ``{name: array}`` (any dtype, bfloat16 included) to a safetensors file, atomically.

    Example:
      >>> import tempfile, numpy as np
      >>> p = write_safetensors(tempfile.mkdtemp() + "/w.safetensors", {"k": np.ones(2)})
      >>> read_safetensors(p)[0]["k"].tolist()
      [1.0, 1.0]
    """
    return write_bytes_atomic(path, safetensors_bytes(tensors, metadata))


def parse_safetensors(
    data: bytes, source: str = "the safetensors data"
) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """``({name: numpy array}, header metadata)`` of the bytes of a safetensors file.

    For bytes already read (e.g. to check their sha256 first); names come in sorted
    order. ``source`` names the bytes in errors, e.g. the quoted file path.

    Example:
      >>> import numpy as np, ml_dtypes
      >>> data = safetensors_bytes({"x": np.zeros(2, ml_dtypes.float8_e4m3fn)})
      >>> parse_safetensors(data)[0]["x"].dtype.name
      'float8_e4m3fn'
      >>> parse_safetensors(data[:20], "'w.safetensors'")  # doctest: +ELLIPSIS
      Traceback (most recent call last):
      jlora.AdapterFormatError: 'w.safetensors' is not a readable safetensors file ...
    """
    try:
        entries = safetensors.deserialize(data)
    except Exception as e:  # safetensors raises its own SafetensorError (an Exception).
        raise AdapterFormatError(
            f"{source} is not a readable safetensors file ({len(data)} bytes; truncated or "
            f"corrupted?): {e}"
        ) from None
    tensors = {}
    # Name order, as safe_open lists them; the file's own order depends on the dtypes.
    for key, info in sorted(entries, key=lambda entry: entry[0]):
        dtype = _ST_DTYPES.get(info["dtype"])
        if dtype is None:
            raise AdapterFormatError(
                f"Tensor {key!r} in {source} has dtype {info['dtype']!r}, which jlora cannot "
                f"read; expected one of {sorted(_ST_DTYPES)}."
            )
        tensors[key] = np.frombuffer(info["data"], dtype=dtype).reshape(info["shape"])
    # deserialize() drops the header's metadata; the header parsed, so read it directly.
    (n,) = struct.unpack("<Q", data[:8])
    metadata = json.loads(data[8 : 8 + n]).get("__metadata__") or {}
    return tensors, metadata


def read_safetensors(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """``({name: numpy array}, header metadata)`` of a safetensors file, bfloat16 included.

    Raises :class:`AdapterFormatError` naming the file if it is missing, truncated or
    corrupted.

    Example:
      >>> import tempfile, numpy as np, ml_dtypes
      >>> x = np.ones((2, 2), ml_dtypes.bfloat16)
      >>> p = write_safetensors(tempfile.mkdtemp() + "/w.safetensors", {"x": x}, {"by": "me"})
      >>> tensors, meta = read_safetensors(p)
      >>> tensors["x"].dtype.name, meta
      ('bfloat16', {'by': 'me'})
    """
    path = pathlib.Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise AdapterFormatError(f"No such safetensors file: {str(path)!r}.") from None
    return parse_safetensors(data, repr(str(path)))
