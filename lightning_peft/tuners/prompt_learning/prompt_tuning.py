"""Prompt tuning: learned virtual-token embeddings prepended to the input embeddings."""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass
from typing import Optional, Union

import torch
from torch import nn

from ...config import PeftType, _coerce_enum
from .config import PromptLearningConfig
from .encoder import PromptEncoderBase


class PromptTuningInit(str, enum.Enum):
    TEXT = "TEXT"
    SAMPLE_VOCAB = "SAMPLE_VOCAB"
    RANDOM = "RANDOM"

    def __str__(self) -> str:
        return self.value


@dataclass
class PromptTuningConfig(PromptLearningConfig):
    """`prompt_tuning_init="TEXT"` copies the word embeddings of `prompt_tuning_init_text` (tokenized with the
    local tokenizer at `tokenizer_name_or_path`), repeated or cut to the number of virtual tokens."""

    prompt_tuning_init: Union[PromptTuningInit, str] = PromptTuningInit.RANDOM
    prompt_tuning_init_text: Optional[str] = None
    tokenizer_name_or_path: Optional[str] = None
    tokenizer_kwargs: Optional[dict] = None

    def __post_init__(self) -> None:
        self.peft_type = PeftType.PROMPT_TUNING
        super().__post_init__()
        self.prompt_tuning_init = _coerce_enum(PromptTuningInit, self.prompt_tuning_init, "prompt_tuning_init")
        if self.prompt_tuning_init == PromptTuningInit.TEXT:
            if not self.tokenizer_name_or_path:
                raise ValueError("prompt_tuning_init='TEXT' needs tokenizer_name_or_path (a local tokenizer folder) to "
                                 f"tokenize prompt_tuning_init_text; got tokenizer_name_or_path={self.tokenizer_name_or_path!r}")
            if not self.prompt_tuning_init_text:
                raise ValueError("prompt_tuning_init='TEXT' needs prompt_tuning_init_text, the text whose word embeddings "
                                 f"start the virtual tokens; got {self.prompt_tuning_init_text!r}")
        if self.tokenizer_kwargs and self.prompt_tuning_init != PromptTuningInit.TEXT:
            raise ValueError("tokenizer_kwargs is only used with prompt_tuning_init='TEXT'")


def _text_init_ids(config: PromptTuningConfig, total: int) -> list[int]:
    from transformers import AutoTokenizer

    kwargs = dict(config.tokenizer_kwargs or {})
    kwargs.pop("trust_remote_code", None)  # never run code from a tokenizer folder
    kwargs.setdefault("local_files_only", True)
    try:
        tokenizer = AutoTokenizer.from_pretrained(config.tokenizer_name_or_path, **kwargs)
    except (OSError, ValueError) as err:
        raise ValueError(f"could not load the tokenizer at tokenizer_name_or_path={config.tokenizer_name_or_path!r} "
                         f"from local files ({err}); give a folder holding a saved tokenizer") from err
    ids = tokenizer(config.prompt_tuning_init_text)["input_ids"]
    if not ids:
        raise ValueError(f"prompt_tuning_init_text={config.prompt_tuning_init_text!r} tokenizes to no tokens")
    return (ids * math.ceil(total / len(ids)))[:total]


class PromptEmbedding(PromptEncoderBase):
    """(batch, total_virtual_tokens) ids -> (batch, total_virtual_tokens, token_dim) embeddings."""

    def __init__(self, config: PromptTuningConfig, word_embeddings: Optional[nn.Module]) -> None:
        super().__init__()
        total = config.num_virtual_tokens * (config.num_transformer_submodules or 1)
        self.embedding = nn.Embedding(total, config.token_dim)
        if config.inference_mode or config.prompt_tuning_init == PromptTuningInit.RANDOM:
            return
        if word_embeddings is None:
            raise ValueError(f"prompt_tuning_init={config.prompt_tuning_init.value} needs the model's word embeddings")
        weight = word_embeddings.weight
        if config.prompt_tuning_init == PromptTuningInit.SAMPLE_VOCAB:
            ids = torch.randint(0, weight.shape[0], (total,), device=weight.device)
        else:
            ids = torch.tensor(_text_init_ids(config, total), dtype=torch.long, device=weight.device)
        with torch.no_grad():
            rows = word_embeddings(ids).detach().clone().float()
        self.embedding.weight = nn.Parameter(rows)


CONFIG_CLASS = PromptTuningConfig
MODEL_CLASS = PromptEmbedding
