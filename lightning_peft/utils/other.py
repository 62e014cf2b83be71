"""HF PEFT's module path `peft.utils.other`: `ModulesToSaveWrapper` and the small training helpers (no logic here)."""

from ..tuners.base import ModulesToSaveWrapper
from .training import cast_mixed_precision_params, prepare_model_for_kbit_training, shift_tokens_right

__all__ = [
    "ModulesToSaveWrapper",
    "cast_mixed_precision_params",
    "prepare_model_for_kbit_training",
    "shift_tokens_right",
]
