"""jlora: LoRA fine-tuning for JAX and Flax.

Example:
  >>> import jax, jax.numpy as jnp, jlora
  >>> params = {"dense": {"kernel": jnp.ones((8, 4))}}
  >>> config = jlora.LoraConfig(rank=2, alpha=2.0, scaling="rslora")
  >>> adapters = jlora.init(jax.random.key(0), params, config)
  >>> merged = jlora.merge(params, adapters)
"""

import importlib as _importlib

# Public namespaces: each groups names that belong together and are used less often.
from jlora import layouts as layouts
from jlora import multi_adapter as multi_adapter
from jlora import nnx as nnx
from jlora import peft as peft
from jlora import quantization as quantization
from jlora import scaling as scaling
from jlora import sharding as sharding
from jlora import variants as variants
from jlora._adapter import Adapter as Adapter
from jlora._adapter import Adapters as Adapters
from jlora._adapter import is_adapter as is_adapter
from jlora._config import LoraConfig as LoraConfig
from jlora._deprecation import MOVED_MODULES as _MOVED_MODULES
from jlora._files import AdapterFormatError as AdapterFormatError
from jlora._initializers import KernelPlan as KernelPlan
from jlora._initializers import init as init
from jlora._initializers import plan as plan
from jlora._io import abstract_adapters as abstract_adapters
from jlora._io import adapter_metadata as adapter_metadata
from jlora._io import load as load
from jlora._io import save as save
from jlora._layout_inference import LayoutInferenceWarning as LayoutInferenceWarning
from jlora._layout_inference import infer_layouts as infer_layouts
from jlora._merging import delta as delta
from jlora._merging import merge as merge
from jlora._merging import safe_merge as safe_merge
from jlora._merging import unmerge as unmerge
from jlora._optim import lora_plus as lora_plus
from jlora._optim import merge_trainable as merge_trainable
from jlora._optim import split_trainable as split_trainable
from jlora._optim import trainable_labels as trainable_labels
from jlora._optim import trainable_mask as trainable_mask
from jlora._paths import PatternError as PatternError
from jlora._paths import combine as combine
from jlora._paths import leaf_paths as leaf_paths
from jlora._paths import mask as mask
from jlora._paths import partition as partition
from jlora._paths import select as select
from jlora._paths import tree_map_with_path as tree_map_with_path
from jlora._reporting import summary as summary
from jlora._transform.api import FactoredFallbackWarning as FactoredFallbackWarning
from jlora._transform.api import collect_inputs as collect_inputs
from jlora._transform.api import lora as lora
from jlora._transform.api import lora_report as lora_report
from jlora._version import __version__ as __version__
from jlora.layouts import Layout as Layout
from jlora.layouts import LayoutError as LayoutError
from jlora.sharding import adapter_shardings as adapter_shardings
from jlora.sharding import adapter_specs as adapter_specs
from jlora.sharding import state_shardings as state_shardings

__all__ = [
    # configuration and adapters
    "LoraConfig", "KernelPlan", "plan", "init", "Adapter", "Adapters", "is_adapter",
    # dense weights
    "merge", "unmerge", "safe_merge", "delta",
    # the factored transform
    "lora", "lora_report", "collect_inputs", "infer_layouts",
    "FactoredFallbackWarning", "LayoutInferenceWarning",
    # kernel layouts
    "Layout", "LayoutError",
    # training
    "split_trainable", "merge_trainable", "trainable_mask", "trainable_labels", "lora_plus",
    # paths and patterns
    "select", "mask", "partition", "combine", "leaf_paths", "tree_map_with_path",
    "PatternError",
    # sharding
    "adapter_specs", "adapter_shardings", "state_shardings",
    # files
    "save", "load", "abstract_adapters", "adapter_metadata", "AdapterFormatError",
    "summary",
    # namespaces
    "layouts", "multi_adapter", "nnx", "peft", "quantization", "scaling", "sharding", "variants",
    "__version__",
]

# Errors raised from private modules show their public name in tracebacks.
for _error in (AdapterFormatError, PatternError, LayoutError):
    _error.__module__ = "jlora"


def __getattr__(name: str):
    # `jlora.io`, `jlora.paths`, ... without importing them: the deprecated stubs.
    if name in _MOVED_MODULES:
        return _importlib.import_module(f"jlora.{name}")
    raise AttributeError(f"module 'jlora' has no attribute {name!r}")
