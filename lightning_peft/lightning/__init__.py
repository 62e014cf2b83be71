"""Lightning integration: `PEFTCallback` for any LightningModule, `PEFTMixin` for modules that apply the tuner
themselves."""

from .callback import PEFTCallback
from .mixin import PEFTMixin

__all__ = ["PEFTCallback", "PEFTMixin"]
