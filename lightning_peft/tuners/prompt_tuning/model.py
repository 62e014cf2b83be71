"""Prompt tuning: learned virtual-token embeddings prepended to the input embeddings."""

from __future__ import annotations

import math
import os
from typing import TYPE_CHECKING, Any, Optional, cast

import torch
from torch import nn

from ...config import PICKLE_WEIGHTS_NAME, SAFETENSORS_WEIGHTS_NAME, short_repr
from ..prompt_learning.encoder import PromptEncoderBase
from ..prompt_learning.injection import PrependEmbeddings
from ..prompt_learning.model import PromptLearningModel
from .config import PromptTuningConfig, PromptTuningInit

if TYPE_CHECKING:
    from ..prompt_learning.config import FilledPromptLearningConfig
    from .config import FilledPromptTuningConfig


# tokenizer_kwargs a config *file* may not set: they reach the network, pick what is downloaded, or run code
FILE_REFUSED_TOKENIZER_KWARGS = frozenset({"trust_remote_code", "token", "use_auth_token", "revision", "cache_dir"})


def tokenizer_kwargs(config: PromptTuningConfig) -> dict[str, Any]:
    """The kwargs for `AutoTokenizer.from_pretrained`. Never `trust_remote_code`; local files unless the config was
    built in code with `local_files_only=False` (the user's own choice). From an adapter_config.json (untrusted)
    only harmless kwargs pass: always local files, no token, revision or cache folder."""
    kwargs = dict(config.tokenizer_kwargs or {})
    kwargs.pop("trust_remote_code", None)  # never run code from a tokenizer folder
    if config._source_dir is not None:
        kwargs = {k: v for k, v in kwargs.items() if k not in FILE_REFUSED_TOKENIZER_KWARGS}
        kwargs["local_files_only"] = True
    kwargs.setdefault("local_files_only", True)
    return kwargs


def _text_init_ids(config: PromptTuningConfig, total: int) -> list[int]:
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(config.tokenizer_name_or_path, **tokenizer_kwargs(config))
    except (OSError, ValueError) as err:
        raise ValueError(
            f"could not load the tokenizer at tokenizer_name_or_path={short_repr(config.tokenizer_name_or_path)} "
            f"from local files ({short_repr(str(err), 200)}); give a folder holding a saved tokenizer"
        ) from err
    ids = tokenizer(config.prompt_tuning_init_text)["input_ids"]
    if not ids:
        raise ValueError(f"prompt_tuning_init_text={short_repr(config.prompt_tuning_init_text)} tokenizes to no tokens")
    return (ids * math.ceil(total / len(ids)))[:total]


def loads_saved_weights(config: PromptTuningConfig) -> bool:
    """The config was read from an adapter folder that holds saved weights: loading them replaces any init."""
    source = config._source_dir
    return source is not None and any(
        os.path.isfile(os.path.join(source, name)) for name in (SAFETENSORS_WEIGHTS_NAME, PICKLE_WEIGHTS_NAME)
    )


class PromptEmbedding(PromptEncoderBase):
    """(batch, total_virtual_tokens) ids -> (batch, total_virtual_tokens, token_dim) embeddings."""

    def __init__(self, config: FilledPromptTuningConfig, word_embeddings: Optional[nn.Module]) -> None:
        super().__init__()
        total = config.num_virtual_tokens * (config.num_transformer_submodules or 1)
        self.embedding = nn.Embedding(total, config.token_dim)
        if config.inference_mode or config.prompt_tuning_init == PromptTuningInit.RANDOM:
            return
        if loads_saved_weights(config):  # the saved prompt_embeddings replace the init: load no tokenizer
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
