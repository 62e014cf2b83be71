"""HF PEFT's module path `peft.utils.save_and_load`: reading and writing adapter weights (no logic here)."""

from ..serialization import get_peft_model_state_dict, load_peft_weights, set_peft_model_state_dict

__all__ = ["get_peft_model_state_dict", "load_peft_weights", "set_peft_model_state_dict"]
