"""Import of a whole PEFT fine-tune: the adapters and every trained weight beside them,
as :func:`jlora.split_trainable`'s ``(trainable, frozen)``."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from jlora._optim import ADAPTERS_KEY, PARAMS_KEY
from jlora.layouts import Layout
from jlora.peft._extras_load import BASE_WEIGHTS, read_parts, trainable_from_parts
from jlora.peft._format import Names
from jlora.peft._load import read_dir


def load_trainable(
    path: str | os.PathLike,
    params,
    *,
    names: Names = None,
    layouts: Mapping[str, str | Layout] | None = None,
    dtype=None,
    base_weights: str = "compare",
) -> tuple[dict, Any]:
    """Read a PEFT adapter directory with everything it trained, ready to train on or run.

    What PEFT saves beside the LoRA factors goes where :func:`jlora.split_trainable` puts
    it, so that the result is the ``(trainable, frozen)`` it would give for the same
    fine-tune, and ``jlora.merge_trainable(trainable, frozen)`` gives the model PEFT's
    ``merge_and_unload`` gives:

    - ``modules_to_save`` copies and the biases ``bias="all"`` / ``"lora_only"`` trained:
      leaves trained in full, in ``trainable["params"]`` (``None`` in ``frozen``);
    - ``lora_bias`` (``lora_B.bias``): a :class:`jlora.peft.LoraBias` on the bias beside
      each adapted kernel;
    - ``trainable_token_indices``: a :class:`jlora.peft.TrainableTokens` on the table;
    - the base weights of adapted modules (``save_embedding_layers``): compared with
      ``params`` (see ``base_weights``).

    Args:
      path, params, names, layouts, dtype: as in :func:`jlora.peft.load` (``dtype`` is the
        factors' and lora_B biases'; full weights take their leaf's dtype).
      base_weights: what to do with a base weight in the file (saved for an adapted
        embedding or output layer) that differs from ``params``': ``"compare"`` refuses
        it, ``"file"`` uses it (in ``frozen``, as PEFT loads it onto the model),
        ``"params"`` keeps ``params``'. One that equals ``params``' is always accepted.

    Returns:
      ``(trainable, frozen)``: ``trainable = {"adapters": adapters, "params": extra}``
      with ``extra`` shaped like ``params`` (``None`` where nothing is trained), and
      ``frozen``, ``params`` with ``None`` at the leaves trained in full.

    Example:
      >>> import tempfile, jax, jax.numpy as jnp, jlora
      >>> params = {"fc": {"kernel": jnp.ones((4, 3)), "bias": jnp.zeros(3)},
      ...           "head": {"kernel": jnp.ones((3, 2)), "bias": jnp.zeros(2)}}
      >>> ads = jlora.init(jax.random.key(0), params, jlora.LoraConfig(rank=2, targets="fc/kernel"))
      >>> trainable, frozen = jlora.split_trainable(params, ads, modules_to_save="head/.*")
      >>> out = jlora.peft.save(tempfile.mkdtemp() + "/peft", trainable)
      >>> back, rest = jlora.peft.load_trainable(out, params)
      >>> jlora.leaf_paths(back["params"]), rest["head"]["kernel"] is None
      (['head/bias', 'head/kernel'], True)
    """
    if base_weights not in BASE_WEIGHTS:
        raise ValueError(f"`base_weights` must be one of {list(BASE_WEIGHTS)}, got "
                         f"{base_weights!r}.")
    read = read_dir(path, params, names=names, layouts=layouts, dtype=dtype)
    extra, frozen = trainable_from_parts(read, read_parts(read, dtype), base_weights)
    return {ADAPTERS_KEY: read.adapters, PARAMS_KEY: extra}, frozen
