"""PEFT's ``lora_dropout`` inside the factored transform: the A·B branch's input only.

Each adapted kernel with ``dropout > 0`` enters with a key (:meth:`Dropout.enter`):
``fold_in(lora_rng, crc32(path))``, split over its stacked axes so every layer of a
stack draws its own mask (``scan`` slices the keys with ``A`` and ``B``). Each consumer
of the kernel folds in its use number, so two uses of one kernel draw different masks.

Example:
  >>> import jax, jax.numpy as jnp
  >>> drop = Dropout(rng=jax.random.key(0))
  >>> drop.enter("w", 0.5, ()).shape, drop.rates
  ((), {'w': 0.5})
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from jlora._initializers import kernel_key
from jlora._tracing import is_array


@dataclasses.dataclass
class Dropout:
    """Dropout state of one call: the key, each kernel's rate and its uses so far."""

    rng: Any = None  # the call's `lora_rng` when dropout is active, else None
    rates: dict = dataclasses.field(default_factory=dict)  # {path: dropout rate}
    uses: collections.Counter = dataclasses.field(default_factory=collections.Counter)

    def enter(self, path: str, rate: float, stacked: tuple[int, ...]):
        """The keys a kernel enters with (shape ``stacked``), or None without dropout."""
        if self.rng is None or rate <= 0:
            return None
        self.rates[path] = rate
        keys = kernel_key(self.rng, path)
        if stacked:
            keys = jax.random.split(keys, stacked)
        return keys

    def branch_input(self, fv, x):
        """``x`` with the dropout mask of this use of ``fv`` applied (``x`` if none)."""
        if fv.keys is None:
            return x
        rate = self.rates[fv.meta.path]
        key = fv.keys if fv.keys.ndim == 0 else fv.keys.reshape(-1)[0]
        key = jax.random.fold_in(key, self.uses[fv.meta.path])
        keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
        return jnp.where(keep, x / (1.0 - rate), jnp.zeros((), x.dtype)).astype(x.dtype)

    def used(self, path: str) -> None:
        self.uses[path] += 1


def check_rng(rng):
    """``lora_rng`` as a new-style key (a legacy ``PRNGKey`` is wrapped), or None."""
    if rng is None:
        return None
    if not is_array(rng):
        raise TypeError(f"`lora_rng` must be a JAX random key, got {type(rng).__name__}.")
    if jnp.issubdtype(rng.dtype, jax.dtypes.prng_key):
        if rng.shape != ():
            raise ValueError(f"`lora_rng` must be a single key (shape ()), got shape {rng.shape}.")
        return rng
    if rng.shape == (2,) and rng.dtype == jnp.uint32:  # a legacy jax.random.PRNGKey
        return jax.random.wrap_key_data(rng)
    raise TypeError(
        f"`lora_rng` must be a JAX random key (jax.random.key(...)), got an array of shape "
        f"{tuple(rng.shape)} and dtype {rng.dtype}."
    )


def dropout_rng(adapters, rng, deterministic, default):
    """The key to drop adapter inputs with, or None (evaluation)."""
    if deterministic is None:
        deterministic = default
    if not (deterministic is None or isinstance(deterministic, bool)):
        raise TypeError(
            f"`lora_deterministic` must be True, False or None, got {deterministic!r}. It "
            "decides what is traced, so under jax.jit pass it as a static argument "
            "(jax.jit(g, static_argnames='lora_deterministic'))."
        )
    rng = check_rng(rng)
    if deterministic is True:
        return None
    with_dropout = sorted(p for p, a in adapters.items() if a.dropout > 0)
    if deterministic is False and rng is None and with_dropout:
        raise ValueError(
            f"Training mode (`lora_deterministic=False`) needs a dropout key, but no "
            f"`lora_rng` was given and {len(with_dropout)} adapter(s) have dropout > 0 (e.g. "
            f"{with_dropout[0]!r}). Pass `lora_rng=jax.random.key(step)` (a fresh key each "
            "step), or `lora_deterministic=True` to evaluate without dropout."
        )
    return rng if with_dropout else None
