"""Prefix tuning's config: the virtual tokens and the optional projection that produces their keys and values."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Optional

from ...config import PeftType, short_repr
from ..prompt_learning.config import PromptLearningConfig, _check_positive_int


@dataclass
class PrefixTuningConfig(PromptLearningConfig):
    PEFT_TYPE: ClassVar[PeftType] = PeftType.PREFIX_TUNING
    SAVED_LAYOUT: ClassVar[str] = "prefix"

    encoder_hidden_size: Optional[int] = None
    prefix_projection: bool = False
    # None: the prefix starts random; "zero": it starts at zero (with prefix_projection, the projection's last layer)
    init_weights: Optional[str] = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.init_weights not in (None, "zero"):
            raise ValueError(f"init_weights must be None (random) or 'zero', got {short_repr(self.init_weights)}")
        if not isinstance(self.prefix_projection, bool):
            raise TypeError(f"prefix_projection must be True or False, got {short_repr(self.prefix_projection)}")
        _check_positive_int("encoder_hidden_size", self.encoder_hidden_size, none_means="token_dim")


if TYPE_CHECKING:
    from ..prompt_learning.config import FilledPromptLearningConfig

    class FilledPrefixTuningConfig(FilledPromptLearningConfig, PrefixTuningConfig):
        """For the type checker: a PrefixTuningConfig after `fill_config_from_model` (every size set)."""
