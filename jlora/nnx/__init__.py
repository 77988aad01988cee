"""LoRA adapters that live in an NNX model, as ``nnx.LoRAParam`` variables.

``apply_lora`` puts the factors of every targeted kernel beside it (``<kernel>_lora_a``,
``<kernel>_lora_b``), with their scale, layout and variant as static metadata, and makes
calling the model run :func:`jlora.lora` underneath: the kernels stay factored and
frozen, and the trainable arrays are exactly the ``LoRAParam`` s that NNX optimizers,
``nnx.DiffState`` filters and trainers built on them (Tunix's ``PeftTrainer``) select.

Example:
  >>> import jax, jax.numpy as jnp, optax
  >>> from flax import nnx
  >>> import jlora
  >>> model = nnx.Sequential(nnx.Linear(8, 16, rngs=nnx.Rngs(0)), nnx.gelu,
  ...                        nnx.Linear(16, 8, rngs=nnx.Rngs(1)))
  >>> model = jlora.nnx.apply_lora(model, jlora.LoraConfig(rank=4, alpha=4.0, scaling="rslora"),
  ...                              rngs=nnx.Rngs(2))
  >>> optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.LoRAParam)
  >>> @nnx.jit
  ... def step(model, optimizer, x, y):
  ...     loss = lambda model: jnp.mean((model(x) - y) ** 2)
  ...     value, grads = nnx.value_and_grad(loss, argnums=nnx.DiffState(0, nnx.LoRAParam))(model)
  ...     optimizer.update(model, grads)
  ...     return value
  >>> x = jax.random.normal(jax.random.key(3), (32, 8))
  >>> first = step(model, optimizer, x, jnp.sin(x))
  >>> for _ in range(20):
  ...     last = step(model, optimizer, x, jnp.sin(x))
  >>> bool(last < first)
  True
  >>> merged = jlora.nnx.merge_lora(nnx.clone(model))     # plain nnx.Linear layers again
  >>> bool(jnp.allclose(merged(x), model(x), atol=1e-5))
  True

See ``docs/nnx.md`` for how it works, what works with which NNX transform, and the
limitations.
"""

from jlora.nnx._api import active_adapter as active_adapter
from jlora.nnx._api import adapter_names as adapter_names
from jlora.nnx._api import apply_lora as apply_lora
from jlora.nnx._api import get_adapters as get_adapters
from jlora.nnx._api import init_adapters as init_adapters
from jlora.nnx._api import merge_lora as merge_lora
from jlora.nnx._api import put_adapters as put_adapters
from jlora.nnx._api import summary as summary
from jlora.nnx._api import switch_adapter as switch_adapter
from jlora.nnx._factors import InactiveLoRA as InactiveLoRA
from jlora.nnx._layouts import infer_layouts as infer_layouts

__all__ = [
    "apply_lora",
    "merge_lora",
    "init_adapters",
    "put_adapters",
    "get_adapters",
    "switch_adapter",
    "active_adapter",
    "adapter_names",
    "summary",
    "infer_layouts",
    "InactiveLoRA",
]
