from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Optional, Union

from ...config import (
    SAVED_PREFIX,
    PeftConfig,
    PeftType,
    check_finite,
    check_regex,
    check_target_modules,
    files_missing,
    short_repr,
    size_mismatch,
    validate_choice,
)

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


# No layer has use for a rank this large (HF PEFT allows r above min(in, out), but not in the millions): a
# config claiming one is refused before anything is allocated at that size.
MAX_RANK = 2**20


def _check_rank(where: str, value: object, what: str = "a positive integer (the LoRA rank)") -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{where} must be {what}, got {short_repr(value)}")
    if value > MAX_RANK:
        raise ValueError(
            f"{where}={value} is above {MAX_RANK} (2**20); no layer has use for such a rank and building it would "
            "exhaust memory. Use a rank of at most the layer's width"
        )


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
        _check_rank("r", self.r)
        if isinstance(self.lora_alpha, bool) or not isinstance(self.lora_alpha, (int, float)):
            raise TypeError(f"lora_alpha must be a number, got {short_repr(self.lora_alpha)}")
        check_finite("lora_alpha", self.lora_alpha)
        check_finite("lora_dropout", self.lora_dropout)
        if (
            isinstance(self.lora_dropout, bool)
            or not isinstance(self.lora_dropout, (int, float))
            or not 0.0 <= self.lora_dropout < 1.0
        ):
            raise ValueError(f"lora_dropout must be a number in [0, 1), got {short_repr(self.lora_dropout)}")
        validate_choice("bias", self.bias, ("none", "all", "lora_only"))
        validate_choice("init_lora_weights", self.init_lora_weights, (True, False, "gaussian"))
        check_target_modules(self)
        if isinstance(self.target_modules, str) and self.layers_to_transform is not None:
            raise ValueError(
                "layers_to_transform cannot be used when target_modules is a regex string; "
                "give target_modules as a list"
            )
        layers_pattern = self.layers_pattern
        if layers_pattern is not None and not (
            (isinstance(layers_pattern, str) and 0 < len(layers_pattern) <= 200)
            or (
                isinstance(layers_pattern, (list, tuple))
                and all(isinstance(p, str) and 0 < len(p) <= 200 for p in layers_pattern)
            )
        ):
            raise TypeError(
                "layers_pattern must be the name (or a list of names, each up to 200 characters) of the module list "
                f"holding the layers, e.g. 'layers'; got {short_repr(layers_pattern)}"
            )
        if self.layers_pattern and self.layers_to_transform is None:
            raise ValueError("layers_pattern only has an effect together with layers_to_transform; set both")
        if self.layers_to_transform is not None:
            layers = self.layers_to_transform
            if not all(
                isinstance(i, int) and not isinstance(i, bool) and i >= 0
                for i in ([layers] if isinstance(layers, int) else layers)
            ):
                raise TypeError(
                    f"layers_to_transform must be a layer index or a list of them, got {short_repr(layers)}"
                )
            if not isinstance(layers, int):
                self.layers_to_transform = list(layers)
        for name, patterns, positive_int in (
            ("rank_pattern", self.rank_pattern, True),
            ("alpha_pattern", self.alpha_pattern, False),
        ):
            if not isinstance(patterns, dict):
                raise TypeError(f"{name} must be a dict {{module-name pattern: value}}, got {short_repr(patterns)}")
            for key, value in patterns.items():
                if not isinstance(key, str) or not key:
                    raise TypeError(f"{name} keys must be module-name regexes, got {short_repr(key)}")
                check_regex(name, key, is_key=True)
                where = f"{name}[{short_repr(key, 60)}]"
                if positive_int:
                    _check_rank(where, value, "a positive integer rank")
                if not positive_int and (isinstance(value, bool) or not isinstance(value, (int, float))):
                    raise TypeError(f"{where} must be a number, got {short_repr(value)}")
                check_finite(where, value)
            setattr(self, name, dict(patterns))

    def check_fits_weights(self, shapes: dict[str, tuple[int, ...]], weights_file: str) -> None:
        """Every saved `lora_A` has the rank this config gives its module (`r` or a `rank_pattern` entry), and no
        rank the config claims is larger than every saved one: the adapter is built at the config's ranks before
        the file is read, so a huge `r` in a small folder is refused here instead of being allocated; a file without
        any `lora_A` is refused (it cannot be this adapter's, and it backs no rank)."""
        from ..base import pattern_value

        file_ranks = {}
        for key, shape in shapes.items():
            module, sep, tail = key.removeprefix(SAVED_PREFIX + "model.").rpartition(".lora_")
            if sep and tail in ("A.weight", "embedding_A") and shape:
                file_ranks[key] = (module, shape)
        if not file_ranks:  # no tensor backs any rank: the config's ranks would be allocated as it claims
            raise ValueError(files_missing(weights_file, "lora_A tensor (lora_A.weight / lora_embedding_A)", shapes))
        for key, (module, shape) in file_ranks.items():
            pattern = next((p for p in self.rank_pattern if pattern_value({p: True}, module, False)), None)
            field_name, rank = (
                ("r", self.r) if pattern is None else (f"rank_pattern[{pattern!r}]", self.rank_pattern[pattern])
            )
            if shape[0] != rank:
                raise ValueError(size_mismatch(field_name, rank, weights_file, key, shape, f"rank {shape[0]}"))
        largest = max(shape[0] for _, shape in file_ranks.values())
        for field_name, value in (("r", self.r), *((f"rank_pattern[{k!r}]", v) for k, v in self.rank_pattern.items())):
            if value > largest:
                key, (_, shape) = next(iter(file_ranks.items()))
                raise ValueError(
                    size_mismatch(field_name, value, weights_file, key, shape, f"no saved rank is above {largest}")
                )
