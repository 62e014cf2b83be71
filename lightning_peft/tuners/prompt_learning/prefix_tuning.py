"""Prefix tuning: learned per-layer keys and values placed in front of every attention layer's own."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from ...config import PeftType
from .config import PromptLearningConfig, _check_positive_int
from .encoder import PromptEncoderBase


@dataclass
class PrefixTuningConfig(PromptLearningConfig):
    encoder_hidden_size: Optional[int] = None
    prefix_projection: bool = False

    def __post_init__(self) -> None:
        self.peft_type = PeftType.PREFIX_TUNING
        super().__post_init__()
        if not isinstance(self.prefix_projection, bool):
            raise TypeError(f"prefix_projection must be True or False, got {self.prefix_projection!r}")
        _check_positive_int("encoder_hidden_size", self.encoder_hidden_size, none_means="token_dim")


class PrefixEncoder(PromptEncoderBase):
    """(batch, num_virtual_tokens) ids -> (batch, num_virtual_tokens, num_layers * 2 * token_dim).

    With `prefix_projection` the ids go Embedding(token_dim) -> Linear -> Tanh -> Linear; built for inference the
    encoder is a bare embedding of the full width, holding the saved (projected) output.
    """

    _heads = ("transform",)

    def __init__(self, config: PrefixTuningConfig) -> None:
        super().__init__()
        self.prefix_projection = config.prefix_projection
        width = config.num_layers * 2 * config.token_dim
        if self.prefix_projection and not config.inference_mode:
            hidden = config.encoder_hidden_size or config.token_dim
            self.embedding = nn.Embedding(config.num_virtual_tokens, config.token_dim)
            self.transform = nn.Sequential(nn.Linear(config.token_dim, hidden), nn.Tanh(), nn.Linear(hidden, width))
        else:
            self.embedding = nn.Embedding(config.num_virtual_tokens, width)

    def forward(self, prefix: torch.Tensor) -> torch.Tensor:
        out = self.embedding(prefix)
        if hasattr(self, "transform"):
            out = self.transform(out)
        return out


CONFIG_CLASS = PrefixTuningConfig
MODEL_CLASS = PrefixEncoder
