"""`jlora.lora`: adapters applied inside any JAX function without forming ``W + s·A·B``.

``jlora.lora(fn)(params, adapters, *args)`` returns ``fn(jlora.merge(params, adapters),
*args)``, but each adapted kernel ``W`` is never merged: ``fn`` is traced to a jaxpr once
per input shape, and an interpreter re-emits its equations carrying every adapted kernel
as a *factored value* ``(W, A, B)`` (plus DoRA's per-output multiplier, dropout keys and
the role of each axis: stacked, fan-in or fan-out):

* operations that only move or recast a kernel (dtype casts, transposes, reshapes that
  keep fan-in and fan-out groups, slicing and indexing, ``scan`` over stacked layers,
  nested ``jit``, ``checkpoint``, ``cond``, ``while``) move ``A`` and ``B`` alongside ``W``;
* consumers are rewritten: ``dot_general`` contracting a kernel's whole fan-in (or whole
  fan-out, as ``Embed.attend`` does) becomes ``x·W + s·((x·A)·B)``; ``conv_general_dilated``
  becomes the conv with ``W`` plus the conv with ``A`` (``rank`` output channels) followed
  by ``B`` on the channels; an embedding ``gather`` becomes ``W[ids] + s·(A[ids]·B)``;
* anything else gets ``W + s·A·B`` formed at that point (so the result is always right),
  with a :class:`FactoredFallbackWarning` once per kernel path; :func:`lora_report` says
  which paths fell back and why.

So a train step differentiating w.r.t. the adapters never builds an ``(in, out)``-sized
weight or weight gradient. See ``docs/factored.md`` for dropout, DoRA and
:func:`collect_inputs`, and ``docs/architecture.md`` for the modules of the interpreter
(``jlora/_transform/``).

Example:
  >>> import jax, jax.numpy as jnp, jlora
  >>> params = {"dense": {"kernel": jnp.ones((4, 3))}}
  >>> adapters = jlora.init(jax.random.key(0), params, jlora.LoraConfig(rank=2))
  >>> apply = lambda p, x: x @ p["dense"]["kernel"]
  >>> y = jax.jit(jlora.lora(apply))(params, adapters, jnp.ones((2, 4)))
  >>> bool(jnp.allclose(y, apply(jlora.merge(params, adapters), jnp.ones((2, 4)))))
  True
"""

from jlora._transform.api import FactoredFallbackWarning as FactoredFallbackWarning
from jlora._transform.api import collect_inputs as collect_inputs
from jlora._transform.api import lora as lora
from jlora._transform.api import lora_report as lora_report

__all__ = ["FactoredFallbackWarning", "collect_inputs", "lora", "lora_report"]
