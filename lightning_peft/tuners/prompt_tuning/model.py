"""Prompt tuning: learned virtual-token embeddings prepended to the input embeddings."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Optional, cast

import torch
from torch import nn

from ..prompt_learning.encoder import PromptEncoderBase
from ..prompt_learning.injection import PrependEmbeddings
from ..prompt_learning.model import PromptLearningModel
from .config import PromptTuningConfig, PromptTuningInit

if TYPE_CHECKING:
    from ..prompt_learning.config import FilledPromptLearningConfig
    from .config import FilledPromptTuningConfig


def _text_init_ids(config: PromptTuningConfig, total: int) -> list[int]:
    from transformers import AutoTokenizer

    kwargs = dict(config.tokenizer_kwargs or {})
    kwargs.pop("trust_remote_code", None)  # never run code from a tokenizer folder
    kwargs.setdefault("local_files_only", True)
    try:
        tokenizer = AutoTokenizer.from_pretrained(config.tokenizer_name_or_path, **kwargs)
    except (OSError, ValueError) as err:
        raise ValueError(
            f"could not load the tokenizer at tokenizer_name_or_path={config.tokenizer_name_or_path!r} "
            f"from local files ({err}); give a folder holding a saved tokenizer"
        ) from err
    ids = tokenizer(config.prompt_tuning_init_text)["input_ids"]
    if not ids:
        raise ValueError(f"prompt_tuning_init_text={config.prompt_tuning_init_text!r} tokenizes to no tokens")
    return (ids * math.ceil(total / len(ids)))[:total]


class PromptEmbedding(PromptEncoderBase):
    """(batch, total_virtual_tokens) ids -> (batch, total_virtual_tokens, token_dim) embeddings."""

    def __init__(self, config: FilledPromptTuningConfig, word_embeddings: Optional[nn.Module]) -> None:
        super().__init__()
        total = config.num_virtual_tokens * (config.num_transformer_submodules or 1)
        self.embedding = nn.Embedding(total, config.token_dim)
        if config.inference_mode or config.prompt_tuning_init == PromptTuningInit.RANDOM:
            return
        if word_embeddings is None:
            raise ValueError(f"prompt_tuning_init={config.prompt_tuning_init.value} needs the model's word embeddings")
        weight = cast(torch.Tensor, word_embeddings.weight)
        if config.prompt_tuning_init == PromptTuningInit.SAMPLE_VOCAB:
            ids = torch.randint(0, weight.shape[0], (total,), device=weight.device)
        else:
            ids = torch.tensor(_text_init_ids(config, total), dtype=torch.long, device=weight.device)
        with torch.no_grad():
            rows = word_embeddings(ids).detach().clone().float()
        self.embedding.weight = nn.Parameter(rows)


class PromptTuningModel(PromptLearningModel):
    peft_type = PromptTuningConfig.PEFT_TYPE
    injection = PrependEmbeddings()

    def build_encoder(self, config: FilledPromptLearningConfig) -> nn.Module:
        return PromptEmbedding(cast("FilledPromptTuningConfig", config), self.word_embeddings)  # add_adapter checked
