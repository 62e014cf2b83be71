"""Prompt learning tuners: prompt tuning, P-tuning and prefix tuning (configs, encoders, model glue)."""

from .config import PromptLearningConfig
from .p_tuning import PromptEncoder, PromptEncoderConfig, PromptEncoderReparameterizationType
from .prefix_tuning import PrefixEncoder, PrefixTuningConfig
from .prompt_tuning import PromptEmbedding, PromptTuningConfig, PromptTuningInit

__all__ = [
    "PromptLearningConfig", "PromptTuningConfig", "PromptTuningInit", "PromptEmbedding", "PromptEncoderConfig",
    "PromptEncoderReparameterizationType", "PromptEncoder", "PrefixTuningConfig", "PrefixEncoder",
]
