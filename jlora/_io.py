"""Native save/load: adapters on disk, rebuilt without the config that made them.

An adapter directory holds two files::

  my_adapter/
    jlora_adapter.safetensors   the factors, keyed "<kernel path>/a", ".../b", ".../magnitude"
    jlora_adapter.json          per kernel: layout (in the kernel's own axis order, e.g.
                                "oi"), whether it was guessed, rank, alpha, policy, scale,
                                variant, dropout, kernel shape and each tensor's shape and
                                dtype; the jlora version, the format version and the
                                weights' sha256

The JSON holds every static field of each :class:`~jlora.Adapter`, so :func:`load` needs
neither the ``LoraConfig`` nor the params. A custom (callable) scaling policy cannot be
written down; its *value* for each kernel is, with ``"policy": "custom"`` and a note
saying so. Factors keep their dtype (bfloat16 round-trips bit for bit). A layout that
was guessed from the kernel's shape rather than given or read from the model is saved
with ``"layout_guessed": true`` and loads as guessed, so the checks that apply to a
guessed layout still apply after a round trip (files without the field hold given
layouts).

:func:`save` writes into a fresh temporary directory beside the target and renames it
into place, so a crash never leaves a half-written adapter; the next save or load there
removes the temporary a killed save left. :func:`load` checks the weights' checksum,
every tensor's shape and dtype against the JSON, and, given ``params``, every path,
shape and dtype against the model.

The same JSON (:func:`adapter_metadata`) is what a training checkpoint stores beside the
arrays, and :func:`abstract_adapters` turns it back into a restore template (see
``docs/io.md``).

Example:
  >>> import tempfile, jax, jax.numpy as jnp, jlora
  >>> params = {"dense": {"kernel": jnp.ones((8, 4))}}
  >>> adapters = jlora.init(jax.random.key(0), params, jlora.LoraConfig(rank=2))
  >>> path = jlora.save(tempfile.mkdtemp() + "/adapter", adapters)
  >>> back = jlora.load(path, params)
  >>> back["dense/kernel"].rank, bool((back["dense/kernel"].a == adapters["dense/kernel"].a).all())
  (2, True)
"""

from __future__ import annotations

import hashlib
import json
import math
import numbers
import os
import pathlib
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jlora import scaling as scaling_lib
from jlora._adapter import Adapter, Adapters, check_adapters
from jlora._files import AdapterFormatError as AdapterFormatError
from jlora._files import (
    interrupted_copy,
    parse_safetensors,
    read_json,
    remove_stale_temporaries,
    safetensors_bytes,
    write_dir_atomic,
)
from jlora._files import read_safetensors as read_safetensors
from jlora._files import write_bytes_atomic as write_bytes_atomic
from jlora._files import write_safetensors as write_safetensors
from jlora._initializers import check_kernel_leaf
from jlora._merging import check_adapters_fit
from jlora._variant import get_variant, variant_names
from jlora._version import __version__
from jlora.layouts import Layout, LayoutError

# AdapterFormatError and the file helpers live in jlora.files; jlora.io re-exports them
# (their first home, where users and examples call them).
__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "JSON_NAME",
    "WEIGHTS_NAME",
    "AdapterFormatError",
    "abstract_adapters",
    "adapter_metadata",
    "is_native_dir",
    "load",
    "read_safetensors",
    "save",
    "write_bytes_atomic",
    "write_safetensors",
]

FORMAT = "jlora-adapter"
FORMAT_VERSION = 1
JSON_NAME = "jlora_adapter.json"
WEIGHTS_NAME = "jlora_adapter.safetensors"

FIELDS = ("a", "b", "magnitude")
POLICIES = ("standard", "rslora", "custom")
FACTOR_DTYPES = ("float16", "bfloat16", "float32", "float64")
CUSTOM_NOTE = (
    "custom scaling policy: the callable itself is not saved; `scale` is its value for "
    "this kernel's rank and alpha and is used as is."
)

# -- metadata ---------------------------------------------------------------------------


def _version() -> str:
    return __version__


def _tensor_entry(x) -> dict:
    return {"shape": [int(n) for n in x.shape], "dtype": np.dtype(x.dtype).name}


def adapter_metadata(adapters: Adapters) -> dict:
    """Everything but the arrays, as a JSON-ready dict: what ``jlora_adapter.json`` holds.

    Works on concrete adapters and on abstract ones (``jax.ShapeDtypeStruct`` leaves).
    Store it beside a checkpoint's arrays (orbax ``JsonSave``) and
    :func:`abstract_adapters` rebuilds the restore template from it.

    Example:
      >>> import jax, jax.numpy as jnp, jlora
      >>> ads = jlora.init(jax.random.key(0), {"k": jnp.ones((4, 3))},
      ...                  jlora.LoraConfig(rank=2, targets="k", scaling="rslora"))
      >>> meta = adapter_metadata(ads)
      >>> meta["adapters"]["k"]["policy"], meta["adapters"]["k"]["tensors"]["a"]
      ('rslora', {'shape': [4, 2], 'dtype': 'float32'})
    """
    check_adapters(adapters)
    kernels = {}
    for path, ad in adapters.items():
        _check_scale(ad.policy, ad.rank, ad.alpha, ad.scale, f"the adapter at path {path!r}")
        entry = {
            "layout": ad.layout.axes,
            "layout_guessed": bool(ad.layout.guessed),
            "rank": int(ad.rank),
            "alpha": float(ad.alpha),
            "policy": ad.policy,
            "scale": float(ad.scale),
            "variant": ad.variant,
            "dropout": float(ad.dropout),
            "kernel_shape": [int(n) for n in ad.kernel_shape],
            "tensors": {
                f: _tensor_entry(getattr(ad, f)) for f in FIELDS if getattr(ad, f) is not None
            },
        }
        if ad.policy == "custom":
            entry["note"] = CUSTOM_NOTE
        kernels[path] = entry
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "jlora_version": _version(),
        "adapters": kernels,
    }


def _check_scale(policy, rank, alpha, scale, where: str) -> None:
    if policy not in POLICIES:
        raise AdapterFormatError(f"{where} has policy {policy!r}; expected one of {POLICIES}.")
    if policy == "custom":
        return
    expected = scaling_lib.compute_scale(policy, rank, alpha)
    if not math.isclose(scale, expected, rel_tol=1e-9):
        raise AdapterFormatError(
            f"{where} has scale {scale!r} but policy {policy!r} gives {expected!r} for "
            f"rank={rank}, alpha={alpha}; a scale from any other rule must be saved with "
            "policy 'custom'."
        )


def _require(obj: Mapping, key: str, kind, where: str, what: str):
    if key not in obj:
        raise AdapterFormatError(f"{where} is missing the field {key!r} ({what}).")
    value = obj[key]
    ok = isinstance(value, kind) and not (kind is not bool and isinstance(value, bool))
    if not ok:
        raise AdapterFormatError(
            f"{where} has field {key!r} = {value!r} ({type(value).__name__}); expected {what}."
        )
    return value


def _shape(value, where: str, key: str) -> tuple[int, ...]:
    if not isinstance(value, list) or not all(
        isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in value
    ):
        raise AdapterFormatError(
            f"{where} has field {key!r} = {value!r}; expected a list of non-negative ints."
        )
    return tuple(value)


def _parse_kernel(path: str, entry: Any, where: str) -> dict:
    """Validate one kernel's JSON entry; return its static fields and expected tensors."""
    where = f"{where}, adapter {path!r},"
    if not isinstance(entry, Mapping):
        raise AdapterFormatError(f"{where} is {entry!r}; expected an object.")
    axes = _require(entry, "layout", str, where, "a layout string such as 'io' or 'oi'")
    guessed = False  # written since layouts could be guessed; older files hold given ones
    if "layout_guessed" in entry:
        guessed = _require(entry, "layout_guessed", bool, where, "true or false")
    try:
        layout = Layout(axes, guessed=guessed)
    except LayoutError as e:
        raise AdapterFormatError(f"{where} has an invalid layout: {e}") from None
    rank = _require(entry, "rank", int, where, "a positive int")
    alpha = _require(entry, "alpha", numbers.Real, where, "a positive number")
    policy = _require(entry, "policy", str, where, f"one of {POLICIES}")
    scale = _require(entry, "scale", numbers.Real, where, "a positive number")
    variant = _require(entry, "variant", str, where, f"one of {variant_names()}")
    dropout = _require(entry, "dropout", numbers.Real, where, "a number in [0, 1)")
    kernel_shape = _shape(
        _require(entry, "kernel_shape", list, where, "the kernel's shape"), where, "kernel_shape"
    )
    tensors = _require(entry, "tensors", Mapping, where, "{name: {shape, dtype}}")
    if rank <= 0 or not (math.isfinite(alpha) and float(alpha) > 0):
        raise AdapterFormatError(f"{where} has rank={rank}, alpha={alpha}; both must be > 0.")
    if not (math.isfinite(scale) and float(scale) > 0):
        raise AdapterFormatError(f"{where} has scale={scale}; expected a positive number.")
    if not 0.0 <= float(dropout) < 1.0:
        raise AdapterFormatError(f"{where} has dropout={dropout}; expected a number in [0, 1).")
    if variant not in variant_names():
        raise AdapterFormatError(
            f"{where} has variant {variant!r}; expected one of {variant_names()} (a variant "
            "registered with jlora.variants.register_variant before loading)."
        )
    _check_scale(policy, rank, float(alpha), float(scale), where)
    if len(kernel_shape) != layout.ndim:
        raise AdapterFormatError(
            f"{where} has kernel_shape {kernel_shape} with {len(kernel_shape)} axes but layout "
            f"{axes!r} describes {layout.ndim}."
        )
    a_shape, b_shape = layout.factor_shapes(kernel_shape, rank)
    expected = {"a": a_shape, "b": b_shape}
    expected.update(get_variant(variant).extra_shapes(layout, kernel_shape))
    unknown = sorted(set(tensors) - set(FIELDS))
    if unknown:
        raise AdapterFormatError(f"{where} lists unknown tensors {unknown}; expected {FIELDS}.")
    specs = {}
    for name, shape in expected.items():
        if name not in tensors:
            raise AdapterFormatError(
                f"{where} is missing the tensor entry {name!r} (variant {variant!r} needs "
                f"{sorted(expected)})."
            )
        spec = tensors[name]
        twhere = f"{where} tensor {name!r}"
        if not isinstance(spec, Mapping):
            raise AdapterFormatError(f"{twhere} is {spec!r}; expected {{shape, dtype}}.")
        got = _shape(_require(spec, "shape", list, twhere, "a list of ints"), twhere, "shape")
        dtype = _require(spec, "dtype", str, twhere, f"one of {FACTOR_DTYPES}")
        if dtype not in FACTOR_DTYPES:
            raise AdapterFormatError(
                f"{twhere} has dtype {dtype!r}; expected one of {FACTOR_DTYPES}."
            )
        if got != tuple(shape):
            raise AdapterFormatError(
                f"{twhere} has shape {got} but layout {axes!r}, rank {rank} and kernel shape "
                f"{kernel_shape} give {tuple(shape)}."
            )
        specs[name] = (tuple(shape), np.dtype(dtype))
    if variant == "lora" and "magnitude" in tensors:
        raise AdapterFormatError(f"{where} has a 'magnitude' tensor but variant 'lora'.")
    static = dict(
        layout=layout, rank=int(rank), alpha=float(alpha), scale=float(scale), policy=policy,
        variant=variant, dropout=float(dropout),
    )
    return {"static": static, "tensors": specs}


def _parse_metadata(meta: Any, where: str) -> dict[str, dict]:
    if not isinstance(meta, Mapping):
        raise AdapterFormatError(f"{where} holds {type(meta).__name__}; expected an object.")
    fmt = _require(meta, "format", str, where, f"the string {FORMAT!r}")
    if fmt != FORMAT:
        raise AdapterFormatError(f"{where} has format {fmt!r}; expected {FORMAT!r}.")
    version = _require(meta, "format_version", int, where, "an int")
    if version > FORMAT_VERSION or version < 1:
        raise AdapterFormatError(
            f"{where} has format_version {version}; this jlora ({_version()}) reads "
            f"format_version 1 to {FORMAT_VERSION}. Upgrade jlora to read it."
        )
    _require(meta, "jlora_version", str, where, "the jlora version that wrote it")
    kernels = _require(meta, "adapters", Mapping, where, "{kernel path: entry}")
    return {path: _parse_kernel(path, entry, where) for path, entry in kernels.items()}


# -- abstract template ------------------------------------------------------------------

ShardingSpec = Any  # a Sharding, a callable (path, field, shape) -> Sharding, or a tree.


def abstract_adapters(metadata: Mapping, sharding: ShardingSpec = None) -> Adapters:
    """Adapters with ``jax.ShapeDtypeStruct`` leaves, rebuilt from :func:`adapter_metadata`.

    The restore template for orbax (``ocp.args.StandardRestore(template)``): the static
    fields come from the metadata, so the restored tree is a dict of real ``Adapter``\\ s.

    Args:
      metadata: the dict :func:`adapter_metadata` returned (or ``jlora_adapter.json``).
      sharding: where the restored arrays go: ``None`` (default device), one
        ``jax.sharding.Sharding`` for every factor, a callable ``(path, field, shape) ->
        Sharding`` (``field`` is ``"a"``, ``"b"`` or ``"magnitude"``), or a dict
        ``{path: Adapter}`` whose leaves are shardings (e.g. ``jax.tree.map(lambda x:
        x.sharding, adapters)``).

    Example:
      >>> import jax, jax.numpy as jnp, jlora
      >>> ads = jlora.init(jax.random.key(0), {"k": jnp.ones((4, 3))},
      ...                  jlora.LoraConfig(rank=2, targets="k"))
      >>> template = abstract_adapters(adapter_metadata(ads))
      >>> template["k"].a.shape, template["k"].scale == ads["k"].scale
      ((4, 2), True)
    """
    parsed = _parse_metadata(metadata, "The adapter metadata")
    out = {}
    for path, kernel in parsed.items():
        fields = {}
        for name, (shape, dtype) in kernel["tensors"].items():
            if sharding is None:
                s = None
            elif isinstance(sharding, jax.sharding.Sharding):
                s = sharding
            elif isinstance(sharding, Mapping):
                if path not in sharding:
                    raise ValueError(f"`sharding` has no entry for the adapter path {path!r}.")
                s = getattr(sharding[path], name)
            elif callable(sharding):
                s = sharding(path, name, shape)
            else:
                raise TypeError(
                    "`sharding` must be None, a jax.sharding.Sharding, a callable (path, field, "
                    f"shape) -> Sharding or a dict of Adapters of shardings, got "
                    f"{type(sharding).__name__}."
                )
            fields[name] = jax.ShapeDtypeStruct(shape, dtype, sharding=s)
        out[path] = Adapter(**fields, **kernel["static"])
    return out


# -- save / load --------------------------------------------------------------------------


def is_native_dir(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a directory holding a jlora adapter (its JSON file).

    Example:
      >>> is_native_dir("/nonexistent")
      False
    """
    return (pathlib.Path(path) / JSON_NAME).is_file()


def save(path: str | os.PathLike, adapters: Adapters) -> pathlib.Path:
    """Write ``adapters`` to the directory ``path`` in jlora's native format, atomically.

    The files are written into a temporary directory beside ``path`` and renamed into
    place; an existing adapter at ``path`` is moved aside first and deleted only after
    the new one is in place. A directory holding anything else is never replaced.

    Args:
      path: the adapter directory to create or replace.
      adapters: ``{kernel path: Adapter}`` as :func:`jlora.init` returns (concrete arrays).

    Returns:
      ``path`` as a ``pathlib.Path``.

    Example:
      >>> import tempfile, jax, jax.numpy as jnp, jlora
      >>> ads = jlora.init(jax.random.key(0), {"k": jnp.ones((4, 3))},
      ...                  jlora.LoraConfig(rank=1, targets="k"))
      >>> sorted(p.name for p in jlora.save(tempfile.mkdtemp() + "/ad", ads).iterdir())
      ['jlora_adapter.json', 'jlora_adapter.safetensors']
    """
    meta = adapter_metadata(adapters)  # validates the adapters first
    tensors = {}
    for p, ad in adapters.items():
        for name in FIELDS:
            value = getattr(ad, name)
            if value is not None:
                tensors[f"{p}/{name}"] = np.asarray(jax.device_get(value))
    weights = safetensors_bytes(
        tensors, {"format": FORMAT, "format_version": str(FORMAT_VERSION)}
    )
    meta["weights"] = {
        "file": WEIGHTS_NAME,
        "bytes": len(weights),
        "sha256": hashlib.sha256(weights).hexdigest(),
    }
    document = (json.dumps(meta, indent=2, allow_nan=False) + "\n").encode()
    return write_dir_atomic(
        path, {WEIGHTS_NAME: weights, JSON_NAME: document}, what="a jlora adapter"
    )


def _missing_dir_error(target: pathlib.Path) -> AdapterFormatError:
    hint = ""
    leftover = interrupted_copy(target)
    if leftover is not None:
        hint = (
            f" A save there was interrupted; the previous complete adapter is at "
            f"{str(leftover)!r}."
        )
    if target.is_dir() and (target / "adapter_config.json").is_file():
        hint += " It holds a PEFT adapter (adapter_config.json): use jlora.peft.load."
    what = "directory holds no" if target.is_dir() else "path is not a directory with a"
    return AdapterFormatError(
        f"No jlora adapter at {str(target)!r}: the {what} {JSON_NAME}.{hint}"
    )


def _check_weights_entry(meta: Mapping, where: str) -> dict:
    entry = _require(meta, "weights", Mapping, where, "{file, bytes, sha256}")
    wwhere = f"{where}, field 'weights',"
    file = _require(entry, "file", str, wwhere, "the weights file name")
    size = _require(entry, "bytes", int, wwhere, "the weights file size")
    digest = _require(entry, "sha256", str, wwhere, "the weights file's sha256")
    if pathlib.PurePath(file).name != file:
        raise AdapterFormatError(f"{wwhere} names {file!r}; expected a file name, not a path.")
    return {"file": file, "bytes": size, "sha256": digest}


def _check_params(params, adapters: Adapters) -> None:
    flat = check_adapters_fit(params, adapters)  # missing paths and shape mismatches
    for path in adapters:
        check_kernel_leaf(path, flat[path], field="the saved adapter")


def load(path: str | os.PathLike, params=None) -> Adapters:
    """Read the adapters that :func:`save` wrote to the directory ``path``.

    Args:
      path: the adapter directory.
      params: optional params tree; when given, every adapter must have a floating-point
        kernel of the right shape at its path (else a ``ValueError`` naming the path and
        both shapes).

    Returns:
      ``{kernel path: Adapter}`` with the saved dtypes and static fields.

    Raises:
      AdapterFormatError: (a ``ValueError``) naming the file and what is wrong with it:
        missing, truncated or corrupted (checksum), a missing JSON field, a tensor whose
        shape or dtype disagrees with the JSON.

    Example:
      >>> import tempfile, jax, jax.numpy as jnp, jlora
      >>> ads = jlora.init(jax.random.key(0), {"k": jnp.ones((4, 3))},
      ...                  jlora.LoraConfig(rank=1, targets="k"))
      >>> jlora.load(jlora.save(tempfile.mkdtemp() + "/ad", ads))["k"].layout  # still a guess
      Layout('io', guessed=True)
    """
    target = pathlib.Path(path)
    remove_stale_temporaries(target)  # what saves killed part-way left beside it
    json_file = target / JSON_NAME
    if not json_file.is_file():
        raise _missing_dir_error(target)
    meta = read_json(json_file)
    where = repr(str(json_file))
    kernels = _parse_metadata(meta, where)
    weights_entry = _check_weights_entry(meta, where)
    weights_file = target / weights_entry["file"]
    try:
        data = weights_file.read_bytes()
    except FileNotFoundError:
        raise AdapterFormatError(
            f"{where} names the weights file {weights_entry['file']!r}, which is missing "
            f"from {str(target)!r}."
        ) from None
    wname = repr(str(weights_file))
    if len(data) != weights_entry["bytes"]:
        raise AdapterFormatError(
            f"{wname} has {len(data)} bytes but {JSON_NAME} records {weights_entry['bytes']}: "
            "the file is truncated or was replaced."
        )
    digest = hashlib.sha256(data).hexdigest()
    if digest != weights_entry["sha256"]:
        raise AdapterFormatError(
            f"{wname} is corrupted: its sha256 is {digest} but {JSON_NAME} records "
            f"{weights_entry['sha256']}."
        )
    tensors, _ = parse_safetensors(data, wname)

    expected_keys = {f"{p}/{n}" for p, k in kernels.items() for n in k["tensors"]}
    missing = sorted(expected_keys - set(tensors))
    extra = sorted(set(tensors) - expected_keys)
    if missing or extra:
        raise AdapterFormatError(
            f"{wname} does not match {JSON_NAME}: missing tensors {missing}, extra tensors "
            f"{extra}."
        )
    adapters = {}
    for p, kernel in kernels.items():
        fields = {}
        for name, (shape, dtype) in kernel["tensors"].items():
            arr = tensors[f"{p}/{name}"]
            if arr.shape != shape or arr.dtype != dtype:
                raise AdapterFormatError(
                    f"Tensor {p + '/' + name!r} in {wname} has shape {arr.shape} and dtype "
                    f"{arr.dtype.name} but {JSON_NAME} expects shape {shape} and dtype "
                    f"{dtype.name}."
                )
            fields[name] = jnp.asarray(arr)
        adapters[p] = Adapter(**fields, **kernel["static"])
    if params is not None:
        _check_params(params, adapters)
    return adapters

