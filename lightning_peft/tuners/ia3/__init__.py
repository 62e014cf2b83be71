"""(IA)^3: learned vectors scaling the outputs (or, for feedforward layers, the inputs) of targeted layers."""

from ..registry import register_tuner
from .bnb import Linear4bit, Linear8bitLt
from .config import IA3Config
from .layer import Conv2d, IA3Layer, Linear
from .model import IA3Model

register_tuner(IA3Config, IA3Model, quantized_layers={"int8": Linear8bitLt, "int4": Linear4bit})

__all__ = ["IA3Config", "IA3Model", "IA3Layer", "Linear", "Conv2d", "Linear8bitLt", "Linear4bit"]
