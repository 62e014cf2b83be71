from .config import LoraConfig
from .layer import Conv2d, Embedding, Linear, LoraLayer
from .model import LoraModel

CONFIG_CLASS = LoraConfig
MODEL_CLASS = LoraModel

__all__ = ["LoraConfig", "LoraModel", "LoraLayer", "Linear", "Embedding", "Conv2d"]
