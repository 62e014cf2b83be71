"""P-tuning: virtual-token embeddings reparameterised by an MLP or a bidirectional LSTM + MLP."""

from __future__ import annotations

import enum
import warnings
from dataclasses import dataclass
from typing import Optional, Union

import torch
from torch import nn

from ...config import PeftType, _coerce_enum
from .config import PromptLearningConfig, _check_positive_int
from .encoder import PromptEncoderBase


class PromptEncoderReparameterizationType(str, enum.Enum):
    MLP = "MLP"
    LSTM = "LSTM"

    def __str__(self) -> str:
        return self.value


@dataclass
class PromptEncoderConfig(PromptLearningConfig):
    encoder_reparameterization_type: Union[str, PromptEncoderReparameterizationType] = \
        PromptEncoderReparameterizationType.MLP
    encoder_hidden_size: Optional[int] = None
    encoder_num_layers: int = 2
    encoder_dropout: float = 0.0

    def __post_init__(self) -> None:
        self.peft_type = PeftType.P_TUNING
        super().__post_init__()
        self.encoder_reparameterization_type = _coerce_enum(
            PromptEncoderReparameterizationType, self.encoder_reparameterization_type, "encoder_reparameterization_type")
        if self.encoder_reparameterization_type is None:
            raise ValueError("encoder_reparameterization_type must be one of: MLP, LSTM")
        _check_positive_int("encoder_hidden_size", self.encoder_hidden_size, none_means="token_dim")
        if isinstance(self.encoder_num_layers, bool) or not isinstance(self.encoder_num_layers, int) \
                or self.encoder_num_layers <= 0:
            raise ValueError(f"encoder_num_layers must be a positive integer, got {self.encoder_num_layers!r}")
        if isinstance(self.encoder_dropout, bool) or not isinstance(self.encoder_dropout, (int, float)) \
                or not 0.0 <= self.encoder_dropout < 1.0:
            raise ValueError(f"encoder_dropout must be a number in [0, 1), got {self.encoder_dropout!r}")


class PromptEncoder(PromptEncoderBase):
    """(batch, total_virtual_tokens) ids -> (batch, total_virtual_tokens, token_dim).

    Built for inference (`inference_mode=True`) it is the bare embedding, which then holds the saved output.
    """

    _heads = ("mlp_head", "lstm_head")

    def __init__(self, config: PromptEncoderConfig) -> None:
        super().__init__()
        self.token_dim = config.token_dim
        self.hidden_size = config.encoder_hidden_size or config.token_dim
        self.total_virtual_tokens = config.num_virtual_tokens * (config.num_transformer_submodules or 1)
        self.encoder_type = config.encoder_reparameterization_type
        self.embedding = nn.Embedding(self.total_virtual_tokens, self.token_dim)
        if config.inference_mode:
            return
        hidden = self.hidden_size
        if self.encoder_type == PromptEncoderReparameterizationType.LSTM:
            self.lstm_head = nn.LSTM(input_size=self.token_dim, hidden_size=hidden, num_layers=config.encoder_num_layers,
                                     dropout=config.encoder_dropout, bidirectional=True, batch_first=True)
            self.mlp_head = nn.Sequential(nn.Linear(2 * hidden, 2 * hidden), nn.ReLU(),
                                          nn.Linear(2 * hidden, self.token_dim))
        else:
            if config.encoder_num_layers != 2:
                warnings.warn("encoder_num_layers is ignored for the MLP reparameterisation, which always has "
                              f"3 Linear layers (got encoder_num_layers={config.encoder_num_layers})")
            self.mlp_head = nn.Sequential(nn.Linear(self.token_dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden),
                                          nn.ReLU(), nn.Linear(hidden, self.token_dim))

    def forward(self, indices: torch.Tensor) -> torch.Tensor:
        embeds = self.embedding(indices)
        if hasattr(self, "lstm_head"):
            embeds = self.lstm_head(embeds)[0]
        if hasattr(self, "mlp_head"):
            embeds = self.mlp_head(embeds)
        return embeds


CONFIG_CLASS = PromptEncoderConfig
MODEL_CLASS = PromptEncoder
