"""HF PEFT's module path `peft.utils.peft_types`: the tuner and task enums (no logic here)."""

from ..config import PeftType, TaskType

__all__ = ["PeftType", "TaskType"]
