"""P-tuning: virtual-token embeddings reparameterised by an MLP or a bidirectional LSTM + MLP."""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, cast

from torch import nn

from ..prompt_learning.encoder import PromptEncoderBase, builds_direct
from ..prompt_learning.injection import PrependEmbeddings
from ..prompt_learning.model import PromptLearningModel
from .config import PromptEncoderConfig, PromptEncoderReparameterizationType

if TYPE_CHECKING:
    from ..prompt_learning.config import FilledPromptLearningConfig
    from .config import FilledPromptEncoderConfig


class PromptEncoder(PromptEncoderBase):
    """(batch, total_virtual_tokens) ids -> (batch, total_virtual_tokens, token_dim).

    Built for inference (`inference_mode=True`), or to load a saved adapter, it is the bare embedding, which then
    holds the saved output.
    """

    _heads = ("lstm_head", "mlp_head")

    def __init__(self, config: FilledPromptEncoderConfig) -> None:
        super().__init__()
        self.token_dim = config.token_dim
        self.hidden_size = config.encoder_hidden_size or config.token_dim
        self.total_virtual_tokens = config.num_virtual_tokens * (config.num_transformer_submodules or 1)
        self.encoder_type = config.encoder_reparameterization_type
        self.embedding = nn.Embedding(self.total_virtual_tokens, self.token_dim)
        if builds_direct(config, type(self).__name__):
            return
        hidden = self.hidden_size
        if self.encoder_type == PromptEncoderReparameterizationType.LSTM:
            self.lstm_head = nn.LSTM(
                input_size=self.token_dim,
                hidden_size=hidden,
                num_layers=config.encoder_num_layers,
                dropout=config.encoder_dropout,
                bidirectional=True,
                batch_first=True,
            )
            self.mlp_head = nn.Sequential(
                nn.Linear(2 * hidden, 2 * hidden), nn.ReLU(), nn.Linear(2 * hidden, self.token_dim)
            )
        else:
            if config.encoder_num_layers != 2:
                warnings.warn(
                    "encoder_num_layers is ignored for the MLP reparameterisation, which always has "
                    f"3 Linear layers (got encoder_num_layers={config.encoder_num_layers})"
                )
            self.mlp_head = nn.Sequential(
                nn.Linear(self.token_dim, hidden),
                nn.ReLU(),
                nn.Linear(hidden, hidden),
                nn.ReLU(),
                nn.Linear(hidden, self.token_dim),
            )


class PTuningModel(PromptLearningModel):
    peft_type = PromptEncoderConfig.PEFT_TYPE
    injection = PrependEmbeddings()

    def build_encoder(self, config: FilledPromptLearningConfig) -> nn.Module:
        return PromptEncoder(cast("FilledPromptEncoderConfig", config))  # add_adapter checked the config's type
