"""Prefix tuning: learned per-layer keys and values placed in front of every attention layer's own."""

from __future__ import annotations

from typing import TYPE_CHECKING, cast

from torch import nn

from ..prompt_learning.encoder import PromptEncoderBase, builds_direct
from ..prompt_learning.injection import KeyValuePrefix
from ..prompt_learning.model import PromptLearningModel
from .config import PrefixTuningConfig

if TYPE_CHECKING:
    from ..prompt_learning.config import FilledPromptLearningConfig
    from .config import FilledPrefixTuningConfig


class PrefixEncoder(PromptEncoderBase):
    """(batch, num_virtual_tokens) ids -> (batch, num_virtual_tokens, num_layers * 2 * token_dim).

    With `prefix_projection` the ids go Embedding(token_dim) -> Linear -> Tanh -> Linear; built for inference (or
    to load a saved adapter) the encoder is a bare embedding of the full width, holding the saved (projected) output.
    """

    _heads = ("transform",)

    def __init__(self, config: FilledPrefixTuningConfig) -> None:
        super().__init__()
        self.prefix_projection = config.prefix_projection
        width = config.num_layers * 2 * config.token_dim
        if self.prefix_projection and not builds_direct(config, type(self).__name__):
            hidden = config.encoder_hidden_size or config.token_dim
            self.embedding = nn.Embedding(config.num_virtual_tokens, config.token_dim)
            self.transform = nn.Sequential(nn.Linear(config.token_dim, hidden), nn.Tanh(), nn.Linear(hidden, width))
        else:
            self.embedding = nn.Embedding(config.num_virtual_tokens, width)
        if config.init_weights == "zero":  # the prefix starts as zero keys and values (HF PEFT's option)
            last = cast("nn.Linear", self.transform[-1]) if hasattr(self, "transform") else self.embedding
            nn.init.zeros_(last.weight)
            if isinstance(last, nn.Linear):
                nn.init.zeros_(last.bias)


class PrefixTuningModel(PromptLearningModel):
    peft_type = PrefixTuningConfig.PEFT_TYPE
    injection = KeyValuePrefix()

    def build_encoder(self, config: FilledPromptLearningConfig) -> nn.Module:
        return PrefixEncoder(cast("FilledPrefixTuningConfig", config))  # add_adapter checked the config's type
