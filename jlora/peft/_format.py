"""The PEFT directory's fixed names."""

from __future__ import annotations

from collections.abc import Callable, Mapping

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."
METADATA_KEY = "jlora"  # safetensors header entry with what PEFT's config cannot hold

Names = Mapping[str, str] | Callable[[str], str | None] | None
