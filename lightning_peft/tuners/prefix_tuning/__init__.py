"""Prefix tuning: learned per-layer keys and values placed in front of every attention layer's own."""

from ..registry import register_tuner
from .config import PrefixTuningConfig
from .model import PrefixEncoder, PrefixTuningModel

register_tuner(PrefixTuningConfig, PrefixTuningModel)

__all__ = ["PrefixTuningConfig", "PrefixEncoder", "PrefixTuningModel"]
