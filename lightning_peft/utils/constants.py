"""Names and default targets as HF PEFT 0.21 has them in `peft.utils.constants` / `peft.utils` (tested equal to
HF PEFT's tables in tests/test_hf_public_names.py). Each is defined once elsewhere and only named here the HF way.

The `*_TARGET_MODULES_MAPPING` tables give, by transformers `config.model_type`, the modules a tuner adapts when its
config leaves `target_modules` (and, for IA3, `feedforward_modules`) unset. They live with their tuner
(`tuners/lora/targets.py`, `tuners/ia3/targets.py`) and are read here on first use, so this module imports no tuner
(the tuners import `utils`).
"""

from __future__ import annotations

from typing import Any

from ..config import CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME
from ..config import PICKLE_WEIGHTS_NAME as WEIGHTS_NAME  # HF PEFT's name for the pickled file (read on request only)

__all__ = [
    "CONFIG_NAME",
    "EMBEDDING_LAYER_NAMES",
    "INCLUDE_LINEAR_LAYERS_SHORTHAND",
    "SAFETENSORS_WEIGHTS_NAME",
    "SEQ_CLS_HEAD_NAMES",
    "TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING",  # noqa: F822 (module __getattr__)
    "TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING",  # noqa: F822 (module __getattr__)
    "TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING",  # noqa: F822 (module __getattr__)
    "TRANSFORMERS_MODELS_TO_PREFIX_TUNING_POSTPROCESS_MAPPING",
    "WEIGHTS_NAME",
    "model_type_of",
]

INCLUDE_LINEAR_LAYERS_SHORTHAND = "all-linear"  # target_modules value for every linear layer but the output head
EMBEDDING_LAYER_NAMES = ["embed_tokens", "lm_head"]  # saved with the adapter when it changes them
SEQ_CLS_HEAD_NAMES = ["score", "classifier"]  # a classifier's head, left out of "all-linear" for SEQ_CLS

# HF PEFT 0.21's table of past-key-value post-processing for prefix tuning is empty (transformers' caches need none);
# kept, empty, for code that imports it
TRANSFORMERS_MODELS_TO_PREFIX_TUNING_POSTPROCESS_MAPPING: dict[str, object] = {}

# HF's table name -> (module under lightning_peft.tuners, its name there)
_TUNER_TABLES = {
    "TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING": ("lora.targets", "DEFAULT_TARGET_MODULES"),
    "TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING": ("ia3.targets", "DEFAULT_TARGET_MODULES"),
    "TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING": ("ia3.targets", "DEFAULT_FEEDFORWARD_MODULES"),
}


def __getattr__(name: str) -> Any:
    """HF's names of the tuners' default-target tables, imported on first use (the tuners import `utils`)."""
    if name in _TUNER_TABLES:
        import importlib

        module, attribute = _TUNER_TABLES[name]
        return getattr(importlib.import_module(f"lightning_peft.tuners.{module}"), attribute)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def model_type_of(model: object) -> str | None:
    """transformers' `config.model_type` of `model` (None for a model without a transformers config)."""
    config = getattr(model, "config", None)
    model_type = config.get("model_type") if isinstance(config, dict) else getattr(config, "model_type", None)
    return model_type if isinstance(model_type, str) else None
