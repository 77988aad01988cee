"""PiSSA, OLoRA, CorDA and LoRA-GA adapters as plain LoRA adapters on the *original* base.

These inits move part of each kernel into the adapter: the base becomes
``W_res = W - s·A0·B0`` and training starts from ``(A0, B0)``. After training, the model
is ``W_res + s·A·B = W + s·(A·B - A0·B0)``, so on the original ``W`` the update is the
LoRA of rank ``2r``

    ``ΔW = s · [A | A0] · [B ; -B0]``

(``A`` and ``A0`` side by side along the rank, ``B`` over ``-B0``), with the same scale:
what PEFT's ``save_pretrained(path_initial_model_for_weight_conversion=...)`` writes
(``LoraModel.subtract_mutated_init``), and what stock PEFT, serving engines and
:func:`jlora.peft.load` read with the unmodified base model.
"""

from __future__ import annotations

import json
import os
import pathlib

import jax.numpy as jnp
import numpy as np

from jlora._adapter import Adapters, check_adapters
from jlora._files import safetensors_bytes, write_dir_atomic
from jlora.peft._config import _alpha_for_scale, _json_number
from jlora.peft._format import CONFIG_NAME, WEIGHTS_NAME
from jlora.peft._tensors import _read_dir

__all__ = ["convert_to_original_base", "to_original_base"]

_MUTATING = ("pissa", "olora", "corda", "lora_ga")
# (suffix of A, suffix of B) of each kind of module
_FACTORS = ((".lora_A.weight", ".lora_B.weight"), (".lora_embedding_A", ".lora_embedding_B"))


def to_original_base(adapters: Adapters, initial: Adapters) -> Adapters:
    """Adapters trained from a base-changing init (``jlora.variants.pissa_init``,
    ``olora_init``, ``corda_init``) as plain LoRA adapters on the original params.

    Args:
      adapters: the trained adapters (used with the init's new base).
      initial: the adapters the init returned, before training.

    Returns:
      ``{path: Adapter}`` of rank ``2r``: ``A' = [A | A0]``, ``B' = [B ; -B0]``, the same
      scale, so ``merge(original params, result) == merge(new base, adapters)``; ready
      for :func:`jlora.peft.save` with PEFT's unmodified base model.

    Example:
      >>> import jax, jax.numpy as jnp, jlora
      >>> params = {"d": {"kernel": jax.random.normal(jax.random.key(1), (6, 4))}}
      >>> config = jlora.LoraConfig(rank=2, init="pissa")
      >>> base, init = jlora.variants.pissa_init(jax.random.key(0), params, config)
      >>> trained = {p: a.replace(b=a.b * 1.5) for p, a in init.items()}
      >>> plain = jlora.peft.to_original_base(trained, init)
      >>> plain["d/kernel"].rank
      4
      >>> bool(jnp.allclose(jlora.merge(params, plain)["d"]["kernel"],
      ...                   jlora.merge(base, trained)["d"]["kernel"], atol=1e-5))
      True
    """
    check_adapters(adapters)
    check_adapters(initial)
    if set(adapters) != set(initial):
        raise ValueError(
            f"`adapters` and `initial` must adapt the same paths; only in `adapters`: "
            f"{sorted(set(adapters) - set(initial))}, only in `initial`: "
            f"{sorted(set(initial) - set(adapters))}."
        )
    out = {}
    for path, ad in adapters.items():
        ad0 = initial[path]
        for field in ("layout", "rank", "scale", "policy", "variant"):
            if getattr(ad, field) != getattr(ad0, field):
                raise ValueError(
                    f"The adapter at path {path!r} has {field} {getattr(ad, field)!r} but its "
                    f"initial adapter has {getattr(ad0, field)!r}: `initial` must be what the "
                    "init returned for these adapters."
                )
        if ad.variant != "lora":
            raise ValueError(
                f"The adapter at path {path!r} is {ad.variant!r}: its magnitude rescales "
                "W_res + s·A·B, which no LoRA on the original base reproduces. Merge it into "
                "the new base instead (jlora.merge)."
            )
        ns, rank = ad.layout.num_stacked, 2 * ad.rank
        alpha = ad.alpha
        if ad.policy in ("standard", "rslora"):
            alpha = _alpha_for_scale(ad.scale, rank, ad.policy == "rslora")
        out[path] = ad.replace(
            a=jnp.concatenate([ad.a, ad0.a.astype(ad.a.dtype)], axis=-1),
            b=jnp.concatenate([ad.b, -ad0.b.astype(ad.b.dtype)], axis=ns),
            rank=rank, alpha=alpha)
    return out


def _doubled_alpha(alpha, use_rslora: bool):
    # PEFT keeps each module's scale: alpha / r with r doubled, alpha / sqrt(r) with rsLoRA
    return _json_number(alpha * 2 ** 0.5 if use_rslora else alpha * 2)


def convert_to_original_base(
    path: str | os.PathLike,
    initial: str | os.PathLike,
    out: str | os.PathLike,
) -> pathlib.Path:
    """A saved PiSSA, OLoRA, CorDA or LoRA-GA adapter as a plain LoRA adapter on the
    original base model, as PEFT's ``save_pretrained(out,
    path_initial_model_for_weight_conversion=initial)`` writes it.

    Args:
      path: the trained adapter, saved with its ``init_lora_weights`` (``"pissa"``, ...).
      initial: the adapter saved right after the init, before training.
      out: the directory to write (atomically, as :func:`jlora.peft.save` does).

    Returns:
      ``out`` as a ``pathlib.Path``: ``lora_A`` = ``[A ; A0]`` and ``lora_B`` =
      ``[B | -B0]`` of each module, ``r`` and every ``rank_pattern`` doubled, alphas
      doubled (times ``sqrt(2)`` with ``use_rslora``) so every scale stays the same,
      ``init_lora_weights: true``; other tensors copied. It loads with
      :func:`jlora.peft.load` (and PEFT) on the unmodified base.

    Example:
      >>> import json, tempfile, numpy as np, safetensors.numpy
      >>> d = tempfile.mkdtemp()
      >>> def write(name, a, init):
      ...     pathlib.Path(d, name).mkdir()
      ...     safetensors.numpy.save_file(
      ...         {"base_model.model.fc.lora_A.weight": a,
      ...          "base_model.model.fc.lora_B.weight": np.ones((3, 1), np.float32)},
      ...         f"{d}/{name}/adapter_model.safetensors")
      ...     pathlib.Path(d, name, "adapter_config.json").write_text(json.dumps(dict(
      ...         peft_type="LORA", r=1, lora_alpha=1, target_modules=["fc"],
      ...         init_lora_weights=init)))
      >>> write("trained", np.full((1, 2), 2.0, np.float32), "pissa")
      >>> write("initial", np.ones((1, 2), np.float32), "pissa")
      >>> out = convert_to_original_base(f"{d}/trained", f"{d}/initial", f"{d}/plain")
      >>> json.loads((out / "adapter_config.json").read_text())["r"]
      2
    """
    config, tensors, metadata, file = _read_dir(path)
    init_config, init_tensors, _, init_file = _read_dir(initial)
    config_file = str(pathlib.Path(path) / CONFIG_NAME)
    init = str(config.get("init_lora_weights", True)).lower()
    if not init.startswith(_MUTATING):
        raise ValueError(
            f"{config_file} has init_lora_weights={config.get('init_lora_weights')!r}: only "
            f"adapters whose init changed the base ({', '.join(_MUTATING)}) need converting; "
            "load this one as it is."
        )
    if config.get("use_dora"):
        raise ValueError(
            f"{config_file} sets use_dora=true: a DoRA magnitude rescales W_res + s·A·B, "
            "which no LoRA on the original base reproduces."
        )
    for field in ("r", "lora_alpha", "use_rslora", "rank_pattern", "alpha_pattern"):
        if config.get(field) != init_config.get(field):
            raise ValueError(
                f"`{field}` is {config.get(field)!r} in {config_file} but "
                f"{init_config.get(field)!r} in the initial adapter's config: `initial` must "
                "be this adapter as saved right after its init."
            )
    converted = {}
    for key, value in tensors.items():
        for suffixes in _FACTORS:
            if key.endswith(suffixes):
                if key not in init_tensors or init_tensors[key].shape != value.shape:
                    found = init_tensors[key].shape if key in init_tensors else "nothing"
                    raise ValueError(
                        f"Tensor {key!r} {tuple(value.shape)} in {file} needs the same tensor in "
                        f"{init_file}, which holds {found}."
                    )
                start = np.asarray(init_tensors[key]).astype(value.dtype)
                is_a = key.endswith(suffixes[0])
                # lora_A (r, ...) stacks along its first axis, lora_B (out, r, ...) its second
                converted[key] = np.concatenate([value, start if is_a else -start],
                                                axis=0 if is_a else 1)
                break
        else:
            converted[key] = value
    rslora = bool(config.get("use_rslora"))
    new = dict(config, init_lora_weights=True, r=2 * config.get("r", 8),
               lora_alpha=_doubled_alpha(config.get("lora_alpha", 8), rslora),
               rank_pattern={k: 2 * v for k, v in (config.get("rank_pattern") or {}).items()},
               alpha_pattern={k: _doubled_alpha(v, rslora)
                              for k, v in (config.get("alpha_pattern") or {}).items()})
    files = {
        WEIGHTS_NAME: safetensors_bytes(converted, metadata),
        CONFIG_NAME: (json.dumps(new, indent=2, sort_keys=True, allow_nan=False) + "\n").encode(),
    }
    return write_dir_atomic(out, files, what="a PEFT adapter")
