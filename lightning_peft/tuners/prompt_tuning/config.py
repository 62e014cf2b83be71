"""Prompt tuning's config: how many virtual tokens, and how they start (random, sampled words, or a text)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Optional, Union

from ...config import PeftType, StrEnum, _coerce_enum, short_repr
from ..prompt_learning.config import PromptLearningConfig


class PromptTuningInit(StrEnum):
    TEXT = "TEXT"
    SAMPLE_VOCAB = "SAMPLE_VOCAB"
    RANDOM = "RANDOM"


@dataclass
class PromptTuningConfig(PromptLearningConfig):
    """`prompt_tuning_init="TEXT"` copies the word embeddings of `prompt_tuning_init_text` (tokenized with the
    local tokenizer at `tokenizer_name_or_path`), repeated or cut to the number of virtual tokens."""

    PEFT_TYPE: ClassVar[PeftType] = PeftType.PROMPT_TUNING

    prompt_tuning_init: Union[PromptTuningInit, str] = PromptTuningInit.RANDOM
    prompt_tuning_init_text: Optional[str] = None
    tokenizer_name_or_path: Optional[str] = None
    tokenizer_kwargs: Optional[dict] = None

    def __post_init__(self) -> None:
        super().__post_init__()
        self.prompt_tuning_init = _coerce_enum(PromptTuningInit, self.prompt_tuning_init, "prompt_tuning_init")
        if self.prompt_tuning_init == PromptTuningInit.TEXT:
            if not self.tokenizer_name_or_path:
                raise ValueError(
                    "prompt_tuning_init='TEXT' needs tokenizer_name_or_path (a local tokenizer folder) to tokenize "
                    f"prompt_tuning_init_text; got tokenizer_name_or_path={short_repr(self.tokenizer_name_or_path)}"
                )
            if not self.prompt_tuning_init_text:
                raise ValueError(
                    "prompt_tuning_init='TEXT' needs prompt_tuning_init_text, the text whose word embeddings "
                    f"start the virtual tokens; got {short_repr(self.prompt_tuning_init_text)}"
                )
        if self.tokenizer_kwargs is not None and not isinstance(self.tokenizer_kwargs, dict):
            raise TypeError(f"tokenizer_kwargs must be a dict or None, got {short_repr(self.tokenizer_kwargs)}")
        if self.tokenizer_kwargs and self.prompt_tuning_init != PromptTuningInit.TEXT:
            raise ValueError("tokenizer_kwargs is only used with prompt_tuning_init='TEXT'")


if TYPE_CHECKING:
    from ..prompt_learning.config import FilledPromptLearningConfig

    class FilledPromptTuningConfig(FilledPromptLearningConfig, PromptTuningConfig):
        """For the type checker: a PromptTuningConfig after `__post_init__` and `fill_config_from_model`."""

        prompt_tuning_init: PromptTuningInit
