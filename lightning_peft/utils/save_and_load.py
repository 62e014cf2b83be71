"""HF PEFT's module path `peft.utils.save_and_load`: reading and writing adapter weights (no logic here)."""

from ..base_state_dict import get_base_model_state_dict, set_base_model_state_dict
from ..serialization import get_peft_model_state_dict, load_peft_weights, set_peft_model_state_dict

__all__ = [
    "get_base_model_state_dict",
    "get_peft_model_state_dict",
    "load_peft_weights",
    "set_base_model_state_dict",
    "set_peft_model_state_dict",
]
