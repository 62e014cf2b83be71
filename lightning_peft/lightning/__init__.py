"""Lightning integration: `PEFTCallback` for any LightningModule, `PEFTMixin` for modules that apply the tuner
themselves, `ExactResume` for a resumed fit equal to an uninterrupted one (with or without PEFT)."""

from ._state import checkpoint_adapter_configs
from .callback import PEFTCallback
from .exact_resume import ExactResume
from .loraplus import loraplus_optimizer
from .mixin import PEFTMixin
from .types import TunerConfig

__all__ = [
    "ExactResume",
    "PEFTCallback",
    "PEFTMixin",
    "TunerConfig",
    "checkpoint_adapter_configs",
    "loraplus_optimizer",
]
