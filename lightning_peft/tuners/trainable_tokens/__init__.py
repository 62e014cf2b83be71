"""TrainableTokens: only the listed rows of an embedding train (the layer is LoRA's `trainable_token_indices` one)."""

from ..lora.trainable_tokens import TrainableTokensLayer
from ..registry import register_tuner
from .config import TrainableTokensConfig
from .model import TrainableTokensModel

register_tuner(TrainableTokensConfig, TrainableTokensModel)

__all__ = ["TrainableTokensConfig", "TrainableTokensModel", "TrainableTokensLayer"]
