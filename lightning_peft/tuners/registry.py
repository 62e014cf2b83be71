"""peft_type -> (config class, model class). Adding a tuner is one folder plus one entry in `_TUNERS`.

The entry names the tuner's module; that module exposes `CONFIG_CLASS` and `MODEL_CLASS`
(for prompt-learning tuners `MODEL_CLASS` is the prompt encoder). Modules are imported lazily so
that an unused tuner costs nothing at import time.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any

from ..config import PeftType

_TUNERS: dict[PeftType, str] = {
    PeftType.LORA: "lightning_peft.tuners.lora",
    PeftType.IA3: "lightning_peft.tuners.ia3",
    PeftType.PROMPT_TUNING: "lightning_peft.tuners.prompt_learning.prompt_tuning",
    PeftType.P_TUNING: "lightning_peft.tuners.prompt_learning.p_tuning",
    PeftType.PREFIX_TUNING: "lightning_peft.tuners.prompt_learning.prefix_tuning",
}


def _tuner_module(peft_type: Any) -> ModuleType:
    try:
        key = PeftType(str(peft_type).upper()) if not isinstance(peft_type, PeftType) else peft_type
    except ValueError:
        key = None
    if key not in _TUNERS:
        known = ", ".join(t.value for t in _TUNERS)
        raise ValueError(f"unknown peft_type {peft_type!r}; lightning_peft knows: {known}")
    return importlib.import_module(_TUNERS[key])


def get_config_class(peft_type: Any) -> type:
    return _tuner_module(peft_type).CONFIG_CLASS


def get_model_class(peft_type: Any) -> type:
    return _tuner_module(peft_type).MODEL_CLASS


def registered_peft_types() -> list[PeftType]:
    return list(_TUNERS)
