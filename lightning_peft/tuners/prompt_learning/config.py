"""Fields shared by prompt tuning, P-tuning and prefix tuning, and filling them from the model's config."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Optional, cast

from ...config import (
    CONFIG_NAME,
    SAFETENSORS_WEIGHTS_NAME,
    PeftConfig,
    TaskType,
    files_missing,
    short_repr,
    size_mismatch,
    weights_header_shapes,
)

PROMPT_KEY = "prompt_embeddings"  # HF PEFT's name for the saved encoder output
SIZE_FIELDS = ("num_virtual_tokens", "token_dim", "num_transformer_submodules", "num_attention_heads", "num_layers")
# Bounds no real adapter comes near, checked before anything is allocated at a size a config claims
MAX_VIRTUAL_TOKENS = 2**20
MAX_ENCODER_LAYERS = 64  # P-tuning's LSTM layers


def _check_positive_int(name: str, value: Any, none_means: str = "filled from the model") -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
        raise ValueError(f"{name} must be a positive integer or None ({none_means}), got {short_repr(value)}")


@dataclass
class PromptLearningConfig(PeftConfig):
    """Sizes left `None` are read from the model's config when the adapter is created."""

    num_virtual_tokens: Optional[int] = None
    token_dim: Optional[int] = None
    num_transformer_submodules: Optional[int] = None
    num_attention_heads: Optional[int] = None
    num_layers: Optional[int] = None
    modules_to_save: Optional[list[str]] = None

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in SIZE_FIELDS:
            _check_positive_int(name, getattr(self, name))
        if self.num_virtual_tokens is not None and self.num_virtual_tokens > MAX_VIRTUAL_TOKENS:
            raise ValueError(
                f"num_virtual_tokens={self.num_virtual_tokens} is above {MAX_VIRTUAL_TOKENS} (2**20); prompts are a "
                "few to a few hundred virtual tokens, and building this many would exhaust memory"
            )
        if self.num_transformer_submodules not in (None, 1, 2):
            raise ValueError(
                "num_transformer_submodules must be 1 (decoder-only / encoder-only), 2 (encoder-decoder) "
                f"or None, got {self.num_transformer_submodules!r}"
            )

    # how the saved `prompt_embeddings` are laid out: one row per virtual token of every transformer sub-module,
    # `token_dim` wide ("rows"); prefix tuning: one row per virtual token, every layer's keys and values ("prefix")
    SAVED_LAYOUT: ClassVar[str] = "rows"

    @property
    def is_prompt_learning(self) -> bool:
        return True

    def check_fits_weights(self, shapes: dict[str, tuple[int, ...]], weights_file: str) -> None:
        """The sizes this config claims fit the saved `prompt_embeddings`: the encoder is built at the config's
        sizes before the file is read, so a huge `num_virtual_tokens` in a small folder is refused here."""
        shape = shapes.get(PROMPT_KEY)
        if shape is None or len(shape) != 2:  # nothing backs the sizes: they would be allocated as claimed
            found = f" (its {PROMPT_KEY} has shape {shape})" if shape is not None else ""
            raise ValueError(files_missing(weights_file, f"2-D {PROMPT_KEY} tensor{found}", shapes))
        rows, width = shape
        nvt = self.num_virtual_tokens
        if nvt is not None:
            if self.SAVED_LAYOUT == "prefix":
                allowed, want = {nvt}, f"{rows} virtual tokens"
            else:
                subs = (self.num_transformer_submodules,) if self.num_transformer_submodules else (1, 2)
                allowed = {nvt * k for k in subs}
                want = f"{rows} rows: virtual tokens x transformer sub-modules"
            if rows not in allowed:
                field_name = "num_virtual_tokens" if rows not in {nvt, 2 * nvt} else "num_transformer_submodules"
                value = nvt if field_name == "num_virtual_tokens" else self.num_transformer_submodules
                raise ValueError(size_mismatch(field_name, value, weights_file, PROMPT_KEY, shape, want))
        if self.SAVED_LAYOUT == "rows":
            if self.token_dim is not None and self.token_dim != width:
                want = f"rows of width {width}"
                raise ValueError(size_mismatch("token_dim", self.token_dim, weights_file, PROMPT_KEY, shape, want))
            return
        # prefix: width = num_layers * 2 * (key/value width), so no size can be above half the width
        for field_name in ("num_layers", "token_dim", "num_attention_heads"):
            value = getattr(self, field_name)
            if value is not None and 2 * value > width:
                want = f"width {width} = num_layers x 2 x the key/value width"
                raise ValueError(size_mismatch(field_name, value, weights_file, PROMPT_KEY, shape, want))


if TYPE_CHECKING:

    class FilledPromptLearningConfig(PromptLearningConfig):
        """For the type checker: a config after `fill_config_from_model`, every size set."""

        num_virtual_tokens: int
        token_dim: int
        num_transformer_submodules: int
        num_attention_heads: int
        num_layers: int


def _text_config(model: Any) -> Any:
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "get_text_config"):
        config = config.get_text_config()
    return config


def first_int(config: Any, names: tuple[str, ...]) -> Optional[int]:
    for name in names:
        value = getattr(config, name, None)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None


def fill_config_from_model(config: PromptLearningConfig, model: Any, injection: Any) -> FilledPromptLearningConfig:
    """Fill the `None` sizes from the model's config (HF PEFT's rules), or say which field to set; the injection
    (`injection.py`) then fits them to how its virtual tokens enter the model."""

    kind = type(config).__name__
    if config.num_virtual_tokens is None:
        raise ValueError(f"{kind}.num_virtual_tokens is None; set how many virtual tokens to learn (e.g. 20)")
    model_config = _text_config(model)
    where = (
        f"the model's config ({type(model_config).__name__})"
        if model_config is not None
        else "the model (it has no .config)"
    )
    if config.num_transformer_submodules is None:
        config.num_transformer_submodules = 2 if config.task_type == TaskType.SEQ_2_SEQ_LM else 1
    lookups = {
        "num_layers": ("num_hidden_layers", "num_layers", "n_layer"),
        "token_dim": ("hidden_size", "n_embd", "d_model"),
        "num_attention_heads": ("num_attention_heads", "n_head", "num_heads", "encoder_attention_heads"),
    }
    for field_name, names in lookups.items():
        if getattr(config, field_name) is None:
            value = first_int(model_config, names) if model_config is not None else None
            if value is None:
                raise ValueError(
                    f"{kind}.{field_name} is None and cannot be filled from {where}: it has none of "
                    f"{', '.join(names)}. Set {field_name} in the config"
                )
            setattr(config, field_name, value)
    if model_config is not None:
        injection.fit_to_model(config, model_config)
    if hasattr(config, "encoder_hidden_size") and config.encoder_hidden_size is None:
        config.encoder_hidden_size = config.token_dim
    return cast("FilledPromptLearningConfig", config)  # every size is set (or a ValueError was raised)


def check_sizes_before_building(config: FilledPromptLearningConfig, model: Any, injection: Any) -> None:
    """Last check before the encoder is allocated, on the sizes as filled and fitted to the model: prefix tuning's
    `num_layers` must be the model's layer count (when its config says it), and a config read from a folder must
    give exactly the shape of the saved `prompt_embeddings` (the header only is read)."""
    kind = type(config).__name__
    model_config = _text_config(model)
    if config.SAVED_LAYOUT == "prefix" and model_config is not None:
        layers = first_int(model_config, ("num_hidden_layers", "num_layers", "n_layer"))
        if layers is not None and config.num_layers != layers:
            raise ValueError(
                f"{kind}.num_layers={short_repr(config.num_layers)} but the model has {layers} layers; the prefix "
                "gives every layer its keys and values. Set num_layers to the model's (or leave it None)"
            )
    source = config._source_dir
    if source is None:
        return
    weights = os.path.join(source, SAFETENSORS_WEIGHTS_NAME)
    shapes = weights_header_shapes(weights) if os.path.isfile(weights) else None
    saved = shapes.get(PROMPT_KEY) if shapes else None
    want = tuple(injection.saved_shape(config))
    if saved is not None and tuple(saved) != want:
        sizes = ", ".join(f"{name}={getattr(config, name)}" for name in SIZE_FIELDS)
        raise ValueError(
            f"the sizes in {CONFIG_NAME} ({sizes}, fitted to the model) give {PROMPT_KEY} of shape {want}, but "
            f"{weights} holds shape {tuple(saved)}. The config and weights file do not belong together; export "
            "the adapter again"
        )
