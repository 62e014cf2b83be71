"""What prompt tuning, P-tuning and prefix tuning share: the config base, the encoder base, the model class with
the adapter API, and the two ways virtual tokens reach a model. It registers no tuner itself."""

from .config import PromptLearningConfig
from .model import PromptLearningModel

__all__ = ["PromptLearningConfig", "PromptLearningModel"]
