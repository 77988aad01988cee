"""jlora: LoRA fine-tuning for JAX and Flax.

Example:
  >>> import jax, jax.numpy as jnp, jlora
  >>> params = {"dense": {"kernel": jnp.ones((8, 4))}}
  >>> config = jlora.LoraConfig(rank=2, alpha=2.0, scaling="rslora")
  >>> adapters = jlora.init(jax.random.key(0), params, config)
  >>> merged = jlora.merge(params, adapters)
"""

from jlora import layouts as layouts
from jlora import paths as paths
from jlora import scaling as scaling
from jlora.adapter import Adapter as Adapter
from jlora.adapter import is_adapter as is_adapter
from jlora.config import LoraConfig as LoraConfig
from jlora.initializers import init as init
from jlora.initializers import plan as plan
from jlora.layouts import Layout as Layout
from jlora.layouts import LayoutError as LayoutError
from jlora.merging import delta as delta
from jlora.merging import merge as merge
from jlora.merging import unmerge as unmerge
from jlora.paths import PatternError as PatternError
from jlora.paths import combine as combine
from jlora.paths import mask as mask
from jlora.paths import partition as partition
from jlora.reporting import summary as summary

__version__ = "0.1.0"
