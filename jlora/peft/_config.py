"""``adapter_config.json``: which fields jlora uses, accepts or refuses, and PEFT's scale
formula both ways."""

from __future__ import annotations

import collections
import math
import numbers
from typing import Any

from jlora import scaling as scaling_lib

# -- the config file --------------------------------------------------------------------

# Fields that only describe the torch model, the run or the initialisation: they do not
# change what the saved factors mean.
_IGNORED = {
    "auto_mapping", "base_model_name_or_path", "corda_config", "eva_config",
    "inference_mode", "lora_ga_config", "megatron_core", "peft_version",
    "qalora_group_size", "revision", "runtime_config", "task_type", "velora_config",
}
_USED = {
    "alpha_pattern", "exclude_modules", "fan_in_fan_out", "init_lora_weights", "layers_pattern",
    "layers_to_transform", "lora_alpha", "lora_dropout", "peft_type", "r", "rank_pattern",
    "target_modules", "use_dora", "use_rslora", "bias", "lora_bias", "modules_to_save",
    "trainable_token_indices",
}
BIAS_MODES = ("none", "all", "lora_only")  # PEFT's `bias` values for LoRA
# Fields that, when set, mean the directory holds something jlora cannot reproduce.
_REFUSED = {
    "alora_invocation_tokens": "Activated LoRA applies the adapter only after invocation "
                               "tokens, which a merged or factored kernel cannot express",
    "arrow_config": "Arrow routing mixes several adapters per token",
    "ensure_weight_tying": "it ties adapters across modules",
    "kasa_config": "KaSA changes the base weights and adds a diagonal between A and B",
    "layer_replication": "it rebuilds the base model's layer stack",
    "loftq_config": "LoftQ replaces the base weights with quantized ones",
    "megatron_config": "Megatron-parallel layers split the factors across ranks",
    "monteclora_config": "MonteCLoRA samples the factors",
    "target_parameters": "LoRA on raw nn.Parameters (e.g. MoE experts) uses another layout",
    "use_bdlora": "block-diagonal factors use another layout",
    "use_qalora": "QA-LoRA pools the input before lora_A",
}
# init_lora_weights values whose adapters were trained against *modified* base weights.
_MUTATING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")
_PLAIN_INITS = (True, False, "gaussian", "eva", "orthogonal", "mica")


def _is_off(value) -> bool:
    return value is None or value is False or (isinstance(value, list | dict | str) and not value)


def _check_config(config: Any, file: str) -> dict:
    """Validate a parsed adapter_config.json; return it with defaults filled in."""
    if not isinstance(config, dict):
        raise ValueError(f"{file} must hold a JSON object, got {type(config).__name__}.")
    if config.get("peft_type") != "LORA":
        raise ValueError(
            f"{file} has peft_type={config.get('peft_type')!r}: jlora.peft reads only LoRA "
            "adapters (peft_type 'LORA')."
        )
    for field, value in config.items():
        if field in _USED or field in _IGNORED:
            continue
        if field in _REFUSED:
            if not _is_off(value):
                raise ValueError(
                    f"{file} sets `{field}`={value!r}, which jlora cannot load: "
                    f"{_REFUSED[field]}."
                )
            continue
        if not _is_off(value):
            raise ValueError(
                f"{file} sets `{field}`={value!r}, a field jlora.peft does not know; it refuses "
                "rather than ignore it. Remove the field if it does not change the adapter."
            )
    _check_trained_parts(config, file)
    init = config.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(_MUTATING_INITS):
        raise ValueError(
            f"{file} sets `init_lora_weights`={init!r}: those factors belong to base weights "
            "that the initialisation modified, so they do not fit the original model. Convert "
            "the adapter with PEFT's save_pretrained(path_initial_model_for_weight_conversion="
            "...) first."
        )
    if init not in _PLAIN_INITS:
        raise ValueError(
            f"{file} sets `init_lora_weights`={init!r}; jlora can load adapters made with "
            f"{list(_PLAIN_INITS)}."
        )
    out = dict(config)
    out.setdefault("r", 8)  # PEFT's defaults
    out.setdefault("lora_alpha", 8)
    for field in ("rank_pattern", "alpha_pattern"):
        out[field] = out.get(field) or {}
        if not isinstance(out[field], dict):
            raise ValueError(f"{file} has `{field}`={out[field]!r}: expected an object.")
    for field in ("target_modules", "exclude_modules"):
        value = out.get(field)
        if not (value is None or isinstance(value, str)
                or (isinstance(value, list) and all(isinstance(v, str) for v in value))):
            raise ValueError(
                f"{file} has `{field}`={value!r}: expected a list of names, a regex or null."
            )
    ranks = [("r", out["r"]),
             *((f"rank_pattern[{k!r}]", v) for k, v in out["rank_pattern"].items())]
    for field, value in ranks:
        if not (isinstance(value, numbers.Integral) and not isinstance(value, bool)
                and int(value) > 0):
            raise ValueError(f"{file} has `{field}`={value!r}: expected a positive int.")
    alphas = [("lora_alpha", out["lora_alpha"]),
              *((f"alpha_pattern[{k!r}]", v) for k, v in out["alpha_pattern"].items())]
    for field, value in alphas:
        if not (isinstance(value, numbers.Real) and not isinstance(value, bool)
                and math.isfinite(value) and float(value) > 0):
            raise ValueError(f"{file} has `{field}`={value!r}: expected a positive number.")
    for field in ("use_rslora", "use_dora", "fan_in_fan_out"):
        out[field] = out.get(field, False)
        if not isinstance(out[field], bool):
            raise ValueError(f"{file} has `{field}`={out[field]!r}: expected true or false.")
    dropout = out.get("lora_dropout", 0.0)
    if not (isinstance(dropout, numbers.Real) and 0.0 <= float(dropout) < 1.0):
        raise ValueError(f"{file} has `lora_dropout`={dropout!r}: expected a number in [0, 1).")
    return out



def _is_ids(value) -> bool:
    return isinstance(value, list) and all(
        isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in value)


def _check_trained_parts(config: dict, file: str) -> None:
    """The fields that say what the file holds beside the factors."""
    bias = config.get("bias", "none")
    if bias not in BIAS_MODES:
        raise ValueError(f"{file} sets `bias`={bias!r}: expected one of {list(BIAS_MODES)}.")
    lora_bias = config.get("lora_bias", False)
    if not isinstance(lora_bias, bool):
        raise ValueError(f"{file} has `lora_bias`={lora_bias!r}: expected true or false.")
    if lora_bias and config.get("use_dora", False):
        raise ValueError(
            f"{file} sets both `lora_bias` and `use_dora`: DoRA rescales the adapted output "
            "together with the lora_B bias, which jlora's DoRA does not reproduce."
        )
    modules = config.get("modules_to_save")
    if not (modules is None or (isinstance(modules, list)
                                and all(isinstance(m, str) and m for m in modules))):
        raise ValueError(
            f"{file} has `modules_to_save`={modules!r}: expected a list of module names or null."
        )
    tokens = config.get("trainable_token_indices")
    if not (tokens is None or _is_ids(tokens) or (
            isinstance(tokens, dict) and all(isinstance(k, str) and _is_ids(v)
                                             for k, v in tokens.items()))):
        raise ValueError(
            f"{file} has `trainable_token_indices`={tokens!r}: expected a list of token ids, a "
            "dict {module name: token ids} or null."
        )


# -- PEFT's scale formula ---------------------------------------------------------------

def _peft_scale(rank: int, alpha: float, use_rslora: bool) -> float:
    return scaling_lib.rslora(rank, alpha) if use_rslora else scaling_lib.standard(rank, alpha)


def _alpha_for_scale(scale: float, rank: int, use_rslora: bool) -> float:
    """An alpha from which PEFT's formula gives exactly ``scale`` (a neighbour of
    ``scale * r`` when rounding gets in the way)."""
    denominator = math.sqrt(rank) if use_rslora else rank
    guess = scale * denominator
    candidates = [guess]
    up = down = guess
    for _ in range(8):
        up, down = math.nextafter(up, math.inf), math.nextafter(down, -math.inf)
        candidates += [up, down]
    for alpha in candidates:
        if _peft_scale(rank, alpha, use_rslora) == scale:
            return alpha
    return guess


def _json_number(x: float):
    return int(x) if float(x).is_integer() and abs(x) < 2**53 else float(x)


def _most_common(values):
    counts = collections.Counter(values)
    best = max(counts.values())
    return min(v for v, c in counts.items() if c == best)
