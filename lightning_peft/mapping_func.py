"""HF PEFT's module path `peft.mapping_func` (where HF PEFT 0.21 defines `get_peft_model`; no logic here)."""

from .peft_model import get_peft_model

__all__ = ["get_peft_model"]
