from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar, Optional, Union

from ...config import PeftConfig, PeftType, validate_choice

if TYPE_CHECKING:
    from ..ia3.config import IA3Config

# Used when target_modules is None, keyed by the transformers `model_type` (HF PEFT's defaults).
DEFAULT_TARGET_MODULES = {
    "gpt2": ["c_attn"],
    "llama": ["q_proj", "v_proj"],
    "mistral": ["q_proj", "v_proj"],
    "qwen2": ["q_proj", "v_proj"],
    "gemma": ["q_proj", "v_proj"],
    "phi": ["q_proj", "v_proj"],
    "opt": ["q_proj", "v_proj"],
    "bart": ["q_proj", "v_proj"],
    "gpt_neo": ["q_proj", "v_proj"],
    "gptj": ["q_proj", "v_proj"],
    "gpt_neox": ["query_key_value"],
    "bloom": ["query_key_value"],
    "falcon": ["query_key_value"],
    "t5": ["q", "v"],
    "mt5": ["q", "v"],
    "bert": ["query", "value"],
    "roberta": ["query", "value"],
    "xlm-roberta": ["query", "value"],
    "electra": ["query", "value"],
    "distilbert": ["q_lin", "v_lin"],
    "deberta-v2": ["query_proj", "value_proj"],
}


def check_target_modules(config: LoraConfig | IA3Config) -> None:
    """Shared by LoRA and IA3: list entries are names, a string is a regex over the full name."""
    targets = config.target_modules
    if targets is None:
        return
    if isinstance(targets, str):
        if not targets:
            raise ValueError("target_modules is an empty string; give module names or a regex")
        try:
            re.compile(targets)
        except re.error as err:
            raise ValueError(f"target_modules={targets!r} is not a valid regex ({err})") from None
        return
    if not isinstance(targets, Iterable) or not all(isinstance(t, str) and t for t in targets):
        raise TypeError(f"target_modules must be a list of module names or a regex string, got {targets!r}")
    if len(targets) == 0:
        raise ValueError("target_modules is empty; name at least one module (e.g. ['q_proj', 'v_proj'])")
    config.target_modules = set(targets)


@dataclass
class LoraConfig(PeftConfig):
    """Low-rank adaptation: output = base(x) + B(A(dropout(x))) * lora_alpha / r."""

    PEFT_TYPE: ClassVar[PeftType] = PeftType.LORA

    r: int = 8
    target_modules: Optional[Union[list[str], set[str], str]] = None  # a list becomes a set
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    fan_in_fan_out: bool = False
    bias: str = "none"
    modules_to_save: Optional[list[str]] = None
    init_lora_weights: Union[bool, str] = True
    layers_to_transform: Optional[Union[list[int], int]] = None
    layers_pattern: Optional[Union[list[str], str]] = None
    rank_pattern: dict = field(default_factory=dict)
    alpha_pattern: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r <= 0:
            raise ValueError(f"r must be a positive integer (the LoRA rank), got {self.r!r}")
        if isinstance(self.lora_alpha, bool) or not isinstance(self.lora_alpha, (int, float)):
            raise TypeError(f"lora_alpha must be a number, got {self.lora_alpha!r}")
        if (
            isinstance(self.lora_dropout, bool)
            or not isinstance(self.lora_dropout, (int, float))
            or not 0.0 <= self.lora_dropout < 1.0
        ):
            raise ValueError(f"lora_dropout must be a number in [0, 1), got {self.lora_dropout!r}")
        validate_choice("bias", self.bias, ("none", "all", "lora_only"))
        validate_choice("init_lora_weights", self.init_lora_weights, (True, False, "gaussian"))
        check_target_modules(self)
        if isinstance(self.target_modules, str) and self.layers_to_transform is not None:
            raise ValueError(
                "layers_to_transform cannot be used when target_modules is a regex string; "
                "give target_modules as a list"
            )
        if self.layers_pattern and self.layers_to_transform is None:
            raise ValueError("layers_pattern only has an effect together with layers_to_transform; set both")
        if self.layers_to_transform is not None:
            layers = self.layers_to_transform
            if not all(
                isinstance(i, int) and not isinstance(i, bool) and i >= 0
                for i in ([layers] if isinstance(layers, int) else layers)
            ):
                raise TypeError(f"layers_to_transform must be a layer index or a list of them, got {layers!r}")
            if not isinstance(layers, int):
                self.layers_to_transform = list(layers)
        for name, patterns, positive_int in (
            ("rank_pattern", self.rank_pattern, True),
            ("alpha_pattern", self.alpha_pattern, False),
        ):
            if not isinstance(patterns, dict):
                raise TypeError(f"{name} must be a dict {{module-name pattern: value}}, got {patterns!r}")
            for key, value in patterns.items():
                try:
                    re.compile(key)
                except re.error as err:
                    raise ValueError(f"{name} key {key!r} is not a valid regex ({err})") from None
                if positive_int and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
                    raise ValueError(f"{name}[{key!r}] must be a positive integer rank, got {value!r}")
            setattr(self, name, dict(patterns))
