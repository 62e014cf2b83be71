"""The two ways virtual tokens reach a model: prepended input embeddings (prompt tuning, P-tuning) and per-layer
key/value prefixes (prefix tuning). Each is a small strategy object the prompt-learning model delegates to.

The forward, generate and step methods take the tuner (a `PromptLearningModel`) and the active adapter's config;
a task kind is one of CAUSAL, SEQ2SEQ, ENCODER (see `PromptLearningModel.task_kind`).
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Any, Optional

import torch
from torch import nn

from .cache import build_prefix_cache, prefix_cache_passed
from .config import first_int

if TYPE_CHECKING:
    from .config import FilledPromptLearningConfig

CAUSAL, SEQ2SEQ, ENCODER = "causal", "seq2seq", "encoder"

GRADIENT_CHECKPOINTING_ERROR = (
    "prefix tuning does not work with gradient checkpointing: the prefix is passed as a key/value cache, which "
    "checkpointed layers do not accept. Call model.gradient_checkpointing_disable(), or use prompt tuning / P-tuning"
)


def batch_size_of(input_ids: Optional[torch.Tensor], inputs_embeds: Optional[torch.Tensor]) -> int:
    if input_ids is not None:
        return input_ids.shape[0]
    if inputs_embeds is not None:
        return inputs_embeds.shape[0]
    raise ValueError("pass input_ids or inputs_embeds")


def prepend(mask: torch.Tensor, count: int, value: float = 1) -> torch.Tensor:
    return torch.cat((mask.new_full((mask.shape[0], count), value), mask), dim=1)


def gradient_checkpointing_on(model: nn.Module) -> bool:
    return any(getattr(m, "gradient_checkpointing", False) is True for m in model.modules())


def _prepend_mask(inputs: dict, key: str, count: int) -> None:
    """The mask under `key` (if any) covers the virtual tokens too."""
    if inputs.get(key) is not None:
        inputs[key] = prepend(inputs[key], count)


def _drop_token_type_ids(kwargs: dict) -> None:
    if kwargs.get("token_type_ids") is not None:
        warnings.warn("token_type_ids are ignored with prompt learning for this task")
        kwargs["token_type_ids"] = None


class PrependEmbeddings:
    """Prompt tuning / P-tuning: the encoder's rows go in front of the input embeddings (and masks, labels)."""

    def check_config(self, tuner: Any, config: FilledPromptLearningConfig) -> None:
        words = tuner.word_embeddings
        if words is None:
            raise ValueError(
                f"{type(config).__name__} prepends embeddings to the input, but no input embedding layer "
                f"was found in {type(tuner.model).__name__}"
            )
        width = getattr(words, "embedding_dim", None) or getattr(getattr(words, "weight", None), "shape", [0, None])[1]
        if width != config.token_dim:
            raise ValueError(
                f"{type(config).__name__}.token_dim={config.token_dim} but the model's input embeddings "
                f"are {width} wide; the virtual tokens must have the same width (leave token_dim=None)"
            )

    def fit_to_model(self, config: FilledPromptLearningConfig, model_config: Any) -> None:
        """Sizes filled from the model's config fit prepended embeddings as they are."""

    def check_ready(self, tuner: Any) -> None:
        """Checks that can only be made at run time (nothing for prepended embeddings)."""

    def saved_shape(self, config: FilledPromptLearningConfig) -> tuple[int, int]:
        """Shape of `prompt_embeddings` in HF PEFT's file: one row per virtual token of every sub-module."""
        return config.num_virtual_tokens * config.num_transformer_submodules, config.token_dim

    def prompt(
        self, tuner: Any, config: FilledPromptLearningConfig, encoder: nn.Module, tokens: torch.Tensor, batch_size: int
    ) -> torch.Tensor:
        return encoder(tokens.unsqueeze(0)).expand(batch_size, -1, -1)

    def _prompts_and_embeds(
        self,
        tuner: Any,
        input_ids: Optional[torch.Tensor],
        inputs_embeds: Optional[torch.Tensor],
        rows: Optional[int] = None,
    ) -> torch.Tensor:
        if inputs_embeds is None:
            inputs_embeds = tuner.embed(input_ids)
        prompts = tuner.get_prompt(inputs_embeds.shape[0])[:, :rows].to(inputs_embeds.dtype)
        return torch.cat((prompts, inputs_embeds), dim=1)

    @staticmethod
    def _drop_position_ids(kwargs: dict) -> None:
        if kwargs.get("position_ids") is not None:
            warnings.warn(
                "position_ids are ignored with prompt tuning / P-tuning (the model numbers the "
                "virtual tokens and the input together)"
            )
            kwargs["position_ids"] = None

    def _with_prompts(self, tuner: Any, inputs: dict, rows: Optional[int] = None) -> dict:
        """`inputs` with the prompts followed by the input's embeddings in place of `input_ids`."""
        input_ids = inputs.pop("input_ids", None)
        inputs["inputs_embeds"] = self._prompts_and_embeds(tuner, input_ids, inputs.get("inputs_embeds"), rows)
        return inputs

    def causal_forward(self, tuner: Any, config: FilledPromptLearningConfig, inputs: dict) -> Any:
        vt = config.num_virtual_tokens
        _prepend_mask(inputs, "attention_mask", vt)
        self._drop_position_ids(inputs)
        _drop_token_type_ids(inputs)
        if inputs.get("labels") is not None:  # the virtual tokens predict nothing
            inputs["labels"] = prepend(inputs["labels"], vt, -100)
        return tuner.model(**self._with_prompts(tuner, inputs))

    def seq2seq_forward(self, tuner: Any, config: FilledPromptLearningConfig, inputs: dict) -> Any:
        # the first num_virtual_tokens rows go in front of the encoder input; the decoder is untouched
        vt = config.num_virtual_tokens
        self._drop_position_ids(inputs)
        _drop_token_type_ids(inputs)
        _prepend_mask(inputs, "attention_mask", vt)
        return tuner.model(**self._with_prompts(tuner, inputs, rows=vt))

    def encoder_forward(self, tuner: Any, config: FilledPromptLearningConfig, inputs: dict) -> Any:
        vt = config.num_virtual_tokens
        _prepend_mask(inputs, "attention_mask", vt)
        self._drop_position_ids(inputs)
        if inputs.get("token_type_ids") is not None:
            inputs["token_type_ids"] = prepend(inputs["token_type_ids"], vt, 0)
        return tuner.model(**self._with_prompts(tuner, inputs))

    def generate(self, tuner: Any, config: FilledPromptLearningConfig, kind: str, kwargs: dict) -> Any:
        if kind != SEQ2SEQ:
            return tuner.generate_with_step_hook(self.causal_step, kwargs)
        # seq2seq: the prompt goes in front of the encoder input once; decoding is untouched
        kwargs.pop("encoder_outputs", None)
        input_ids = kwargs.pop("input_ids", None)
        if input_ids is None:
            raise ValueError("generate() with prompt learning needs input_ids")
        kwargs["inputs_embeds"] = self._prompts_and_embeds(tuner, input_ids, None, rows=config.num_virtual_tokens)
        if kwargs.get("attention_mask") is not None:
            kwargs["attention_mask"] = prepend(kwargs["attention_mask"], config.num_virtual_tokens)
        return tuner.model.generate(**kwargs)

    def causal_step(
        self, tuner: Any, config: FilledPromptLearningConfig, inputs: dict, cache_name: str, prefill: bool
    ) -> None:
        # the model numbers virtual + real tokens itself from the cache length
        inputs.pop("position_ids", None)
        if prefill:
            inputs["inputs_embeds"] = self._prompts_and_embeds(
                tuner, inputs.get("input_ids"), inputs.get("inputs_embeds")
            )
            inputs["input_ids"] = None


class KeyValuePrefix:
    """Prefix tuning: learned keys and values in front of every attention layer's own, passed as a cache."""

    def fit_to_model(self, config: FilledPromptLearningConfig, model_config: Any) -> None:
        kv_heads = first_int(model_config, ("num_key_value_heads",))
        if kv_heads is not None:
            # grouped-query attention: the cache holds num_key_value_heads heads of head_dim each
            head_dim = first_int(model_config, ("head_dim",)) or config.token_dim // config.num_attention_heads
            config.token_dim = head_dim * kv_heads
            config.num_attention_heads = kv_heads

    def check_config(self, tuner: Any, config: FilledPromptLearningConfig) -> None:
        self.check_ready(tuner)
        if config.token_dim % config.num_attention_heads:
            raise ValueError(
                f"PrefixTuningConfig: token_dim={config.token_dim} is not a multiple of "
                f"num_attention_heads={config.num_attention_heads}; the prefix is split into heads"
            )
        head_dim = getattr(getattr(tuner.model, "config", None), "d_kv", None)
        if isinstance(head_dim, int) and head_dim != config.token_dim // config.num_attention_heads:
            raise ValueError(
                f"the model's attention heads are d_kv={head_dim} wide but token_dim/num_attention_heads"
                f" = {config.token_dim // config.num_attention_heads}; set token_dim="
                f"{head_dim * config.num_attention_heads} in PrefixTuningConfig"
            )

    def check_ready(self, tuner: Any) -> None:
        if gradient_checkpointing_on(tuner.model):
            raise ValueError(GRADIENT_CHECKPOINTING_ERROR)

    def saved_shape(self, config: FilledPromptLearningConfig) -> tuple[int, int]:
        """Shape of `prompt_embeddings` in HF PEFT's file: every layer's keys and values per virtual token."""
        return config.num_virtual_tokens, config.num_layers * 2 * config.token_dim

    def prompt(
        self, tuner: Any, config: FilledPromptLearningConfig, encoder: nn.Module, tokens: torch.Tensor, batch_size: int
    ) -> Any:
        flat = encoder(tokens[: config.num_virtual_tokens].unsqueeze(0)).repeat(batch_size, 1, 1)
        dtype = getattr(tuner.model, "dtype", None)
        if isinstance(dtype, torch.dtype):
            flat = flat.to(dtype)
        return build_prefix_cache(config, flat, tuner.task_kind() == SEQ2SEQ)

    @staticmethod
    def _shift_position_ids(config: FilledPromptLearningConfig, kwargs: dict) -> None:
        if kwargs.get("position_ids") is not None:
            kwargs["position_ids"] = kwargs["position_ids"] + config.num_virtual_tokens

    @staticmethod
    def _prefix_for(tuner: Any, inputs: dict) -> Any:
        """The prefix cache for this batch."""
        return tuner.get_prompt(batch_size_of(inputs.get("input_ids"), inputs.get("inputs_embeds")))

    def causal_forward(self, tuner: Any, config: FilledPromptLearningConfig, inputs: dict) -> Any:
        _prepend_mask(inputs, "attention_mask", config.num_virtual_tokens)
        self._shift_position_ids(config, inputs)
        _drop_token_type_ids(inputs)
        inputs[tuner.cache_kwarg()] = self._prefix_for(tuner, inputs)
        return tuner.model(**inputs)

    def seq2seq_forward(self, tuner: Any, config: FilledPromptLearningConfig, inputs: dict) -> Any:
        # the prefix sits in the decoder's self-attention cache; the encoder is untouched
        self._shift_position_ids(config, inputs)
        _drop_token_type_ids(inputs)
        _prepend_mask(inputs, "decoder_attention_mask", config.num_virtual_tokens)
        inputs[tuner.cache_kwarg()] = self._prefix_for(tuner, inputs)
        return tuner.model(**inputs)

    def encoder_forward(self, tuner: Any, config: FilledPromptLearningConfig, inputs: dict) -> Any:
        _prepend_mask(inputs, "attention_mask", config.num_virtual_tokens)
        self._shift_position_ids(config, inputs)
        with prefix_cache_passed(tuner.model, self._prefix_for(tuner, inputs), tuner.cache_route) as extra:
            return tuner.model(**inputs, **extra)

    def generate(self, tuner: Any, config: FilledPromptLearningConfig, kind: str, kwargs: dict) -> Any:
        self.check_ready(tuner)
        return tuner.generate_with_step_hook(self.seq2seq_step if kind == SEQ2SEQ else self.causal_step, kwargs)

    def causal_step(
        self, tuner: Any, config: FilledPromptLearningConfig, inputs: dict, cache_name: str, prefill: bool
    ) -> None:
        self._shift_position_ids(config, inputs)
        if prefill:
            batch = batch_size_of(inputs.get("input_ids"), inputs.get("inputs_embeds"))
            inputs[cache_name] = tuner.get_prompt(batch)

    def seq2seq_step(
        self, tuner: Any, config: FilledPromptLearningConfig, inputs: dict, cache_name: str, prefill: bool
    ) -> None:
        if inputs.get("decoder_attention_mask") is not None:
            inputs["decoder_attention_mask"] = prepend(inputs["decoder_attention_mask"], config.num_virtual_tokens)
        if prefill:
            inputs[cache_name] = tuner.get_prompt(inputs["decoder_input_ids"].shape[0])
