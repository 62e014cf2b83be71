"""Lightning integration: `PEFTCallback` for any LightningModule, `PEFTMixin` for modules that apply the tuner
themselves."""

from .callback import PEFTCallback
from .mixin import PEFTMixin
from .types import TunerConfig

__all__ = ["PEFTCallback", "PEFTMixin", "TunerConfig"]
