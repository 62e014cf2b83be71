"""Prompt tuning: learned virtual-token embeddings prepended to the input embeddings."""

from ..registry import register_tuner
from .config import PromptTuningConfig, PromptTuningInit
from .model import PromptEmbedding, PromptTuningModel

register_tuner(PromptTuningConfig, PromptTuningModel)

__all__ = ["PromptTuningConfig", "PromptTuningInit", "PromptEmbedding", "PromptTuningModel"]
