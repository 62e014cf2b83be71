"""LoRA: low-rank updates B·A added to Linear / Conv1D / Embedding / Conv2d (and 8-bit Linear) layers."""

from ..registry import register_tuner
from .bnb import Linear4bit, Linear8bitLt
from .config import LoraConfig, LoraRuntimeConfig
from .layer import Conv2d, Embedding, Linear, LoraLayer
from .model import LoraModel

register_tuner(
    LoraConfig, LoraModel, quantized_layers={"int8": Linear8bitLt, "int4": Linear4bit}, merges_into_quantized=True
)

__all__ = [
    "LoraConfig",
    "LoraRuntimeConfig",
    "LoraModel",
    "LoraLayer",
    "Linear",
    "Embedding",
    "Conv2d",
    "Linear8bitLt",
    "Linear4bit",
]
