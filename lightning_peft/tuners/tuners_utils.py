"""HF PEFT's module path `peft.tuners.tuners_utils`: the base classes of tuners and tuner layers (no logic here)."""

from .base import BaseTuner, BaseTunerLayer

__all__ = ["BaseTuner", "BaseTunerLayer"]
