"""`TrainableTokensConfig`: HF PEFT 0.21's TrainableTokens settings (train only the rows `token_indices` of an
embedding), read and written as its adapter_config.json."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Optional, Union

from ...config import PeftConfig, PeftType, check_target_modules, short_repr
from ..lora.trainable_tokens import check_indices


@dataclass
class TrainableTokensConfig(PeftConfig):
    """Only the embedding rows `token_indices` train (e.g. the tokens added to a tokenizer); `target_modules`: the
    embedding(s) (None: the model's input embedding); `init_weights=False` starts the rows random instead of as
    they are."""

    PEFT_TYPE: ClassVar[PeftType] = PeftType.TRAINABLE_TOKENS

    token_indices: list[int] = field(default_factory=list)
    target_modules: Optional[Union[list[str], set[str], str]] = None  # a list becomes a set
    init_weights: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        check_target_modules(self)
        if not isinstance(self.init_weights, bool):
            raise TypeError(f"init_weights must be True or False, got {short_repr(self.init_weights)}")
        if self.token_indices != []:  # HF PEFT's default (an empty list) is refused when the adapter is made
            self.token_indices = check_indices("token_indices", self.token_indices)
