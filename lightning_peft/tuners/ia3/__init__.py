from .config import IA3Config
from .layer import Conv2d, IA3Layer, Linear, Linear8bitLt
from .model import IA3Model

CONFIG_CLASS = IA3Config
MODEL_CLASS = IA3Model

__all__ = ["IA3Config", "IA3Model", "IA3Layer", "Linear", "Conv2d", "Linear8bitLt"]
