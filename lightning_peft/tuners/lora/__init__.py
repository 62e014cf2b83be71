"""LoRA: low-rank updates B·A added to Linear / Conv1D / Embedding / Conv2d (and 8-bit / 4-bit Linear) layers and to
nn.Parameters (`ParamWrapper`)."""

from ..registry import register_tuner
from .bnb import Linear4bit, Linear8bitLt
from .config import LoraConfig, LoraRuntimeConfig
from .init import LoftQConfig
from .layer import Conv2d, Embedding, Linear, LoraLayer
from .model import LoraModel
from .param_wrapper import ParamWrapper

register_tuner(
    LoraConfig, LoraModel, quantized_layers={"int8": Linear8bitLt, "int4": Linear4bit}, merges_into_quantized=True
)

__all__ = [
    "LoraConfig",
    "LoraRuntimeConfig",
    "LoftQConfig",
    "LoraModel",
    "LoraLayer",
    "Linear",
    "Embedding",
    "Conv2d",
    "ParamWrapper",
    "Linear8bitLt",
    "Linear4bit",
]
