"""HF PEFT's `peft.utils` names that code written for HF PEFT imports: exception and warning classes, the default
target tables, file names, and the state-dict functions.

Imports only modules that import nothing of the tuners, so the tuners can import from here; `ModulesToSaveWrapper`
(a tuner class), `get_base_model_state_dict` / `set_base_model_state_dict` (which read tuner classes) and the default
target tables (which live in the tuner folders) are looked up on first use.
"""

from typing import Any

from ..config import PeftType, TaskType
from ..serialization import get_peft_model_state_dict, load_peft_weights, set_peft_model_state_dict
from . import constants
from .constants import (
    CONFIG_NAME,
    EMBEDDING_LAYER_NAMES,
    INCLUDE_LINEAR_LAYERS_SHORTHAND,
    SAFETENSORS_WEIGHTS_NAME,
    SEQ_CLS_HEAD_NAMES,
    TRANSFORMERS_MODELS_TO_PREFIX_TUNING_POSTPROCESS_MAPPING,
    WEIGHTS_NAME,
)
from .error import NoMatchingPeftModuleError, PeftError
from .training import cast_mixed_precision_params, prepare_model_for_kbit_training, shift_tokens_right
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
    "get_base_model_state_dict",
    "get_peft_model_state_dict",
    "load_peft_weights",
    "prepare_model_for_kbit_training",
    "set_base_model_state_dict",
    "set_peft_model_state_dict",
    "shift_tokens_right",
]


def __getattr__(name: str) -> Any:
    """HF PEFT's `peft.utils` names that need the tuner classes, imported on first use: the tuners import this
    package."""
    if name == "ModulesToSaveWrapper":
        from ..tuners.base import ModulesToSaveWrapper

        return ModulesToSaveWrapper
    if name in ("get_base_model_state_dict", "set_base_model_state_dict"):
        from .. import base_state_dict

        return getattr(base_state_dict, name)
    if name in constants._TUNER_TABLES:  # the tuners' default-target tables (they live in the tuner folders)
        return getattr(constants, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
