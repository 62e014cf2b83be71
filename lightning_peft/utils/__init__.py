"""HF PEFT's `peft.utils` names that code written for HF PEFT imports: exception and warning classes, the default
target tables, file names, and the state-dict functions.

Imports only modules that import nothing of the tuners, so the tuners can import from here; `ModulesToSaveWrapper`
(a tuner class) is looked up on first use.
"""

from typing import Any

from ..config import PeftType, TaskType
from ..serialization import get_peft_model_state_dict, load_peft_weights, set_peft_model_state_dict
from .constants import (
    CONFIG_NAME,
    EMBEDDING_LAYER_NAMES,
    INCLUDE_LINEAR_LAYERS_SHORTHAND,
    SAFETENSORS_WEIGHTS_NAME,
    SEQ_CLS_HEAD_NAMES,
    TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING,
    TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING,
    TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING,
    TRANSFORMERS_MODELS_TO_PREFIX_TUNING_POSTPROCESS_MAPPING,
    WEIGHTS_NAME,
)
from .error import NoMatchingPeftModuleError, PeftError
from .training import cast_mixed_precision_params, shift_tokens_right
from .warning import PeftWarning

__all__ = [
    "CONFIG_NAME",
    "EMBEDDING_LAYER_NAMES",
    "INCLUDE_LINEAR_LAYERS_SHORTHAND",
    "SAFETENSORS_WEIGHTS_NAME",
    "SEQ_CLS_HEAD_NAMES",
    "TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING",
    "TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING",
    "TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING",
    "TRANSFORMERS_MODELS_TO_PREFIX_TUNING_POSTPROCESS_MAPPING",
    "WEIGHTS_NAME",
    "ModulesToSaveWrapper",
    "NoMatchingPeftModuleError",
    "PeftError",
    "PeftType",
    "PeftWarning",
    "TaskType",
    "cast_mixed_precision_params",
    "get_peft_model_state_dict",
    "load_peft_weights",
    "set_peft_model_state_dict",
    "shift_tokens_right",
]


def __getattr__(name: str) -> Any:
    """`ModulesToSaveWrapper` (HF PEFT's `peft.utils` name), imported on first use: the tuners import this package."""
    if name == "ModulesToSaveWrapper":
        from ..tuners.base import ModulesToSaveWrapper

        return ModulesToSaveWrapper
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
