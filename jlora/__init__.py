"""jlora: LoRA fine-tuning for JAX and Flax.

Example:
  >>> import jax, jax.numpy as jnp, jlora
  >>> params = {"dense": {"kernel": jnp.ones((8, 4))}}
  >>> config = jlora.LoraConfig(rank=2, alpha=2.0, scaling="rslora")
  >>> adapters = jlora.init(jax.random.key(0), params, config)
  >>> merged = jlora.merge(params, adapters)
"""

from jlora import io as io
from jlora import layouts as layouts
from jlora import multi_adapter as multi_adapter
from jlora import optim as optim
from jlora import paths as paths
from jlora import peft as peft
from jlora import quantization as quantization
from jlora import scaling as scaling
from jlora import sharding as sharding
from jlora import variants as variants
from jlora._layout_inference import LayoutInferenceWarning as LayoutInferenceWarning
from jlora._layout_inference import infer_layouts as infer_layouts
from jlora._version import __version__ as __version__
from jlora.adapter import Adapter as Adapter
from jlora.adapter import is_adapter as is_adapter
from jlora.config import LoraConfig as LoraConfig
from jlora.initializers import init as init
from jlora.initializers import plan as plan
from jlora.io import load as load
from jlora.io import save as save
from jlora.layouts import Layout as Layout
from jlora.layouts import LayoutError as LayoutError
from jlora.merging import delta as delta
from jlora.merging import merge as merge
from jlora.merging import safe_merge as safe_merge
from jlora.merging import unmerge as unmerge
from jlora.optim import lora_plus as lora_plus
from jlora.optim import merge_trainable as merge_trainable
from jlora.optim import split_trainable as split_trainable
from jlora.paths import PatternError as PatternError
from jlora.paths import combine as combine
from jlora.paths import mask as mask
from jlora.paths import partition as partition
from jlora.reporting import summary as summary
from jlora.sharding import adapter_shardings as adapter_shardings
from jlora.sharding import adapter_specs as adapter_specs
from jlora.sharding import state_shardings as state_shardings
from jlora.transform import FactoredFallbackWarning as FactoredFallbackWarning
from jlora.transform import collect_inputs as collect_inputs
from jlora.transform import lora as lora
from jlora.transform import lora_report as lora_report

