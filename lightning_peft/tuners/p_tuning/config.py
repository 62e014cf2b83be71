"""P-tuning's config: the virtual tokens and the encoder that reparameterises them (MLP or LSTM + MLP)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Optional, Union

from ...config import PeftType, StrEnum, _coerce_enum, short_repr
from ..prompt_learning.config import MAX_ENCODER_LAYERS, PromptLearningConfig, _check_positive_int


class PromptEncoderReparameterizationType(StrEnum):
    MLP = "MLP"
    LSTM = "LSTM"


@dataclass
class PromptEncoderConfig(PromptLearningConfig):
    PEFT_TYPE: ClassVar[PeftType] = PeftType.P_TUNING

    encoder_reparameterization_type: Union[str, PromptEncoderReparameterizationType] = (
        PromptEncoderReparameterizationType.MLP
    )
    encoder_hidden_size: Optional[int] = None
    encoder_num_layers: int = 2
    encoder_dropout: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        self.encoder_reparameterization_type = _coerce_enum(
            PromptEncoderReparameterizationType, self.encoder_reparameterization_type, "encoder_reparameterization_type"
        )
        if self.encoder_reparameterization_type is None:
            raise ValueError("encoder_reparameterization_type must be one of: MLP, LSTM")
        _check_positive_int("encoder_hidden_size", self.encoder_hidden_size, none_means="token_dim")
        if (
            isinstance(self.encoder_num_layers, bool)
            or not isinstance(self.encoder_num_layers, int)
            or not 0 < self.encoder_num_layers <= MAX_ENCODER_LAYERS
        ):
            raise ValueError(
                f"encoder_num_layers must be a positive integer of at most {MAX_ENCODER_LAYERS}, got "
                f"{short_repr(self.encoder_num_layers)}"
            )
        if (
            isinstance(self.encoder_dropout, bool)
            or not isinstance(self.encoder_dropout, (int, float))
            or not 0.0 <= self.encoder_dropout < 1.0
        ):
            raise ValueError(f"encoder_dropout must be a number in [0, 1), got {short_repr(self.encoder_dropout)}")


if TYPE_CHECKING:
    from ..prompt_learning.config import FilledPromptLearningConfig

    class FilledPromptEncoderConfig(FilledPromptLearningConfig, PromptEncoderConfig):
        """For the type checker: a PromptEncoderConfig after `fill_config_from_model` (every size set)."""
