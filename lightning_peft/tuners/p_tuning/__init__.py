"""P-tuning: virtual-token embeddings reparameterised by an MLP or a bidirectional LSTM + MLP, prepended to the
input embeddings."""

from ..registry import register_tuner
from .config import PromptEncoderConfig, PromptEncoderReparameterizationType
from .model import PromptEncoder, PTuningModel

register_tuner(PromptEncoderConfig, PTuningModel)

__all__ = ["PromptEncoderConfig", "PromptEncoderReparameterizationType", "PromptEncoder", "PTuningModel"]
