"""Prompt learning inside `PeftModel`: adapters, the forward / generate glue per task, saving and loading.

`PeftModel` inherits `PromptLearningMixin`; its prompt hooks (`_init_prompt_learning`, `_add_prompt_adapter`,
`_prompt_forward`, ...) live here. The model keeps HF PEFT's attribute names (`prompt_encoder`, `prompt_tokens`,
`word_embeddings`, `get_prompt`) so code written for it works.
"""

from __future__ import annotations

import copy
import functools
import warnings
from contextlib import contextmanager
from typing import Any, Iterator, Optional

import torch
from torch import nn

from ...config import PeftType
from ..base import ModulesToSaveWrapper, check_modules_to_save, get_submodule_parent, wrap_modules_to_save
from .cache import build_prefix_cache, cache_route, prefix_cache_passed
from .config import PromptLearningConfig, fill_config_from_model
from .p_tuning import PromptEncoder, PromptEncoderConfig
from .prefix_tuning import PrefixEncoder, PrefixTuningConfig
from .prompt_tuning import PromptEmbedding, PromptTuningConfig

CAUSAL, SEQ2SEQ, ENCODER = "causal", "seq2seq", "encoder"


def find_word_embeddings(model: nn.Module) -> Optional[nn.Module]:
    getter = getattr(model, "get_input_embeddings", None)
    if callable(getter):
        try:
            found = getter()
        except (NotImplementedError, AttributeError):
            found = None
        if isinstance(found, nn.Module):
            return found
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    for module in model.modules():
        if isinstance(module, nn.Embedding) and module.num_embeddings == vocab:
            return module
    return None


def gradient_checkpointing_on(model: nn.Module) -> bool:
    return any(getattr(m, "gradient_checkpointing", False) is True for m in model.modules())


def _batch_size(input_ids: Optional[torch.Tensor], inputs_embeds: Optional[torch.Tensor]) -> int:
    if input_ids is not None:
        return input_ids.shape[0]
    if inputs_embeds is not None:
        return inputs_embeds.shape[0]
    raise ValueError("pass input_ids or inputs_embeds")


def _prepend(mask: torch.Tensor, count: int, value: float = 1) -> torch.Tensor:
    return torch.cat((mask.new_full((mask.shape[0], count), value), mask), dim=1)


class PromptLearningMixin:
    """Mixed into `PeftModel`; active only when its adapters are prompt-learning ones."""

    base_model: nn.Module
    _prompt_configs: Optional[dict[str, PromptLearningConfig]]
    active_adapter: str

    # ---- set-up -----------------------------------------------------------------------------
    def _init_prompt_learning(self) -> None:
        self.prompt_encoder = nn.ModuleDict()
        self.prompt_tokens: dict[str, torch.Tensor] = {}
        self._prompt_disabled = False
        self.base_model.requires_grad_(False)
        # kept out of the module tree so the embedding is not registered (and saved) twice
        self._word_embeddings_ref = [find_word_embeddings(self.base_model)]
        # where a prefix cache goes, read from the forward signatures once (base_model never changes)
        self._prompt_cache_route = cache_route(self.base_model)

    def _cache_kwarg(self) -> str:
        """The keyword base_model.forward takes a key/value cache by (`past_key_values` when it takes none)."""
        route = self._prompt_cache_route
        return route[1] if route is not None and not route[0] else "past_key_values"

    @property
    def word_embeddings(self) -> Optional[nn.Module]:
        return self._word_embeddings_ref[0]

    def _prompt_task_kind(self) -> str:
        from ...peft_model import PeftModelForCausalLM, PeftModelForSeq2SeqLM

        if isinstance(self, PeftModelForSeq2SeqLM):
            return SEQ2SEQ
        if isinstance(self, PeftModelForCausalLM):
            return CAUSAL
        model_config = getattr(self.base_model, "config", None)
        if getattr(model_config, "is_encoder_decoder", False):
            return SEQ2SEQ
        if type(self).__name__ == "PeftModel" and callable(getattr(self.base_model, "can_generate", None)) \
                and self.base_model.can_generate():
            return CAUSAL
        return ENCODER

    def _add_prompt_adapter(self, adapter_name: str, peft_config: PromptLearningConfig) -> None:
        if adapter_name in self._prompt_configs:
            raise ValueError(f"an adapter named {adapter_name!r} already exists; pick another name or delete_adapter it")
        if not isinstance(peft_config, PromptLearningConfig):
            raise TypeError(f"expected a prompt-learning config, got {type(peft_config).__name__}")
        config = fill_config_from_model(copy.deepcopy(peft_config), self.base_model)
        encoder = self._build_prompt_encoder(config)
        weight = next(iter(self.base_model.parameters()), None)
        if weight is not None:
            encoder.to(weight.device)
        encoder.requires_grad_(not config.inference_mode)
        check_modules_to_save(self.base_model, config.modules_to_save)
        self.prompt_encoder[adapter_name] = encoder
        self.prompt_tokens[adapter_name] = torch.arange(config.num_virtual_tokens * config.num_transformer_submodules)
        self._prompt_configs[adapter_name] = config
        self._wrap_modules_to_save(config, adapter_name)
        self._sync_prompt_trainability()

    def _build_prompt_encoder(self, config: PromptLearningConfig) -> nn.Module:
        words = self.word_embeddings
        if isinstance(config, PrefixTuningConfig):
            if gradient_checkpointing_on(self.base_model):
                raise ValueError(_GRADIENT_CHECKPOINTING_ERROR)
            if config.token_dim % config.num_attention_heads:
                raise ValueError(f"PrefixTuningConfig: token_dim={config.token_dim} is not a multiple of "
                                 f"num_attention_heads={config.num_attention_heads}; the prefix is split into heads")
            head_dim = getattr(getattr(self.base_model, "config", None), "d_kv", None)
            if isinstance(head_dim, int) and head_dim != config.token_dim // config.num_attention_heads:
                raise ValueError(f"the model's attention heads are d_kv={head_dim} wide but token_dim/num_attention_heads"
                                 f" = {config.token_dim // config.num_attention_heads}; set token_dim="
                                 f"{head_dim * config.num_attention_heads} in PrefixTuningConfig")
            return PrefixEncoder(config)
        width = getattr(words, "embedding_dim", None) or getattr(getattr(words, "weight", None), "shape", [0, None])[1]
        if words is None:
            raise ValueError(f"{type(config).__name__} prepends embeddings to the input, but no input embedding layer "
                             f"was found in {type(self.base_model).__name__}")
        if width != config.token_dim:
            raise ValueError(f"{type(config).__name__}.token_dim={config.token_dim} but the model's input embeddings "
                             f"are {width} wide; the virtual tokens must have the same width (leave token_dim=None)")
        if isinstance(config, PromptTuningConfig):
            return PromptEmbedding(config, words)
        if isinstance(config, PromptEncoderConfig):
            return PromptEncoder(config)
        raise TypeError(f"unsupported prompt-learning config {type(config).__name__}")

    # ---- modules_to_save (e.g. the classifier head) -----------------------------------------
    def _wrap_modules_to_save(self, config: PromptLearningConfig, adapter_name: str) -> None:
        for wrapper in wrap_modules_to_save(self.base_model, config.modules_to_save, adapter_name):
            if config.inference_mode:
                wrapper.modules_to_save[adapter_name].requires_grad_(False)

    def _prompt_wrappers(self) -> list[tuple[str, ModulesToSaveWrapper]]:
        return [(n, m) for n, m in self.base_model.named_modules() if isinstance(m, ModulesToSaveWrapper)]

    def _sync_prompt_trainability(self) -> None:
        """Only the active adapter trains (unless loaded for inference): its prompt encoder and its copies of
        the modules_to_save require grad; every other adapter's are frozen. Every wrapper holding the active adapter
        is pointed at it here, so every path that changes the active adapter (set_adapter, add, delete) must call
        this; forward and generate do not re-check."""
        for name, encoder in self.prompt_encoder.items():
            encoder.requires_grad_(name == self.active_adapter and not self._prompt_configs[name].inference_mode)
        for _, wrapper in self._prompt_wrappers():
            if self.active_adapter in wrapper.modules_to_save:
                wrapper.set_adapter(self.active_adapter)
            for name, module in wrapper.modules_to_save.items():
                module.requires_grad_(name == self.active_adapter and not self._prompt_configs[name].inference_mode)

    def _unwrap_prompt_modules_to_save(self) -> None:
        """Put every wrapped module (e.g. the classifier head) back as the original, e.g. after a failed load."""
        for key, wrapper in self._prompt_wrappers():
            parent, _, child = get_submodule_parent(self.base_model, key)
            setattr(parent, child, wrapper.original_module)

    def _delete_prompt_adapter(self, adapter_name: str, force: bool = False) -> None:
        if adapter_name not in self._prompt_configs:
            raise ValueError(f"no adapter named {adapter_name!r}; this model has: "
                             f"{', '.join(self._prompt_configs) or 'none'}")
        others = [n for n in self._prompt_configs if n != adapter_name]
        if adapter_name == self.active_adapter and others and not force:
            raise ValueError(f"{adapter_name!r} is the active adapter; set_adapter() another one "
                             f"({', '.join(others)}) before deleting it")
        del self.prompt_encoder[adapter_name]
        self.prompt_tokens.pop(adapter_name, None)
        del self._prompt_configs[adapter_name]
        for key, wrapper in self._prompt_wrappers():
            wrapper.delete_adapter(adapter_name)
            if not wrapper.modules_to_save:  # no adapter uses it any more: put the original back
                parent, _, child = get_submodule_parent(self.base_model, key)
                setattr(parent, child, wrapper.original_module)
        if adapter_name == self.active_adapter:
            self.active_adapter = others[0] if others else ""
            self._sync_prompt_trainability()

    @contextmanager
    def _prompt_learning_disabled(self) -> Iterator[None]:
        was = self._prompt_disabled
        wrappers = [w for _, w in self._prompt_wrappers()]
        self._prompt_disabled = True
        for wrapper in wrappers:
            wrapper.enable_adapters(False)
        try:
            yield
        finally:
            self._prompt_disabled = was
            for wrapper in wrappers:
                wrapper.enable_adapters(not was)

    # ---- the virtual tokens -----------------------------------------------------------------
    def get_prompt(self, batch_size: int, task_ids: Optional[torch.Tensor] = None) -> Any:
        """Prompt tuning / P-tuning: (batch, tokens, token_dim) embeddings. Prefix tuning: a cache object."""
        config = self.active_peft_config
        encoder = self.prompt_encoder[self.active_adapter]
        device = encoder.embedding.weight.device
        tokens = self.prompt_tokens[self.active_adapter]
        if tokens.device != device:  # moved once (and again only if the encoder moves), not on every call
            tokens = self.prompt_tokens[self.active_adapter] = tokens.to(device)
        if config.peft_type == PeftType.PREFIX_TUNING:
            flat = encoder(tokens[: config.num_virtual_tokens].unsqueeze(0)).repeat(batch_size, 1, 1)
            dtype = getattr(self.base_model, "dtype", None)
            if isinstance(dtype, torch.dtype):
                flat = flat.to(dtype)
            return build_prefix_cache(config, flat, self._prompt_task_kind() == SEQ2SEQ)
        return encoder(tokens.unsqueeze(0)).expand(batch_size, -1, -1)

    def _check_prefix_ready(self, config: PromptLearningConfig) -> None:
        if config.peft_type == PeftType.PREFIX_TUNING and gradient_checkpointing_on(self.base_model):
            raise ValueError(_GRADIENT_CHECKPOINTING_ERROR)

    def _embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.word_embeddings is None:
            raise ValueError("no input embedding layer found; pass inputs_embeds instead of input_ids")
        return self.word_embeddings(input_ids)

    @staticmethod
    def _adjust_kwargs(config: PromptLearningConfig, kwargs: dict, drop_token_type_ids: bool) -> None:
        """HF PEFT's rules: position ids shift past a prefix and are dropped for prepended embeddings."""
        if kwargs.get("position_ids") is not None:
            if config.peft_type == PeftType.PREFIX_TUNING:
                kwargs["position_ids"] = kwargs["position_ids"] + config.num_virtual_tokens
            else:
                warnings.warn("position_ids are ignored with prompt tuning / P-tuning (the model numbers the "
                              "virtual tokens and the input together)")
                kwargs["position_ids"] = None
        if drop_token_type_ids and kwargs.get("token_type_ids") is not None:
            warnings.warn("token_type_ids are ignored with prompt learning for this task")
            kwargs["token_type_ids"] = None

    # ---- forward ----------------------------------------------------------------------------
    def _prompt_forward(self, *args: Any, **kwargs: Any) -> Any:
        if args:
            if len(args) > 1 or "input_ids" in kwargs:
                raise TypeError("pass the model inputs as keyword arguments (input_ids=..., attention_mask=...)")
            kwargs["input_ids"] = args[0]
        if self._prompt_disabled or not self._prompt_configs:
            return self.base_model(**kwargs)
        config = self.active_peft_config
        self._check_prefix_ready(config)
        kind = self._prompt_task_kind()
        if kind == CAUSAL:
            return self._causal_forward(config, **kwargs)
        if kind == SEQ2SEQ:
            return self._seq2seq_forward(config, **kwargs)
        return self._encoder_forward(config, **kwargs)

    def _causal_forward(self, config: PromptLearningConfig, input_ids: Optional[torch.Tensor] = None,
                        attention_mask: Optional[torch.Tensor] = None, inputs_embeds: Optional[torch.Tensor] = None,
                        labels: Optional[torch.Tensor] = None, **kwargs: Any) -> Any:
        batch, vt = _batch_size(input_ids, inputs_embeds), config.num_virtual_tokens
        if attention_mask is not None:
            attention_mask = _prepend(attention_mask, vt)
        self._adjust_kwargs(config, kwargs, drop_token_type_ids=True)
        if config.peft_type == PeftType.PREFIX_TUNING:
            kwargs[self._cache_kwarg()] = self.get_prompt(batch)
            return self.base_model(input_ids=input_ids, inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                                   labels=labels, **kwargs)
        if inputs_embeds is None:
            inputs_embeds = self._embed(input_ids)
        if labels is not None:  # the virtual tokens predict nothing
            labels = _prepend(labels, vt, -100)
        prompts = self.get_prompt(batch).to(inputs_embeds.dtype)
        return self.base_model(inputs_embeds=torch.cat((prompts, inputs_embeds), dim=1),
                               attention_mask=attention_mask, labels=labels, **kwargs)

    def _seq2seq_forward(self, config: PromptLearningConfig, input_ids: Optional[torch.Tensor] = None,
                         attention_mask: Optional[torch.Tensor] = None, inputs_embeds: Optional[torch.Tensor] = None,
                         decoder_attention_mask: Optional[torch.Tensor] = None, **kwargs: Any) -> Any:
        batch, vt = _batch_size(input_ids, inputs_embeds), config.num_virtual_tokens
        self._adjust_kwargs(config, kwargs, drop_token_type_ids=True)
        if config.peft_type == PeftType.PREFIX_TUNING:
            # the prefix sits in the decoder's self-attention cache; the encoder is untouched
            if decoder_attention_mask is not None:
                decoder_attention_mask = _prepend(decoder_attention_mask, vt)
            kwargs[self._cache_kwarg()] = self.get_prompt(batch)
            return self.base_model(input_ids=input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds,
                                   decoder_attention_mask=decoder_attention_mask, **kwargs)
        # prompt tuning / P-tuning: the first num_virtual_tokens rows go in front of the encoder input
        if inputs_embeds is None:
            inputs_embeds = self._embed(input_ids)
        if attention_mask is not None:
            attention_mask = _prepend(attention_mask, vt)
        prompts = self.get_prompt(batch)[:, :vt].to(inputs_embeds.dtype)
        return self.base_model(inputs_embeds=torch.cat((prompts, inputs_embeds), dim=1), attention_mask=attention_mask,
                               decoder_attention_mask=decoder_attention_mask, **kwargs)

    def _encoder_forward(self, config: PromptLearningConfig, input_ids: Optional[torch.Tensor] = None,
                         attention_mask: Optional[torch.Tensor] = None, inputs_embeds: Optional[torch.Tensor] = None,
                         **kwargs: Any) -> Any:
        batch, vt = _batch_size(input_ids, inputs_embeds), config.num_virtual_tokens
        if attention_mask is not None:
            attention_mask = _prepend(attention_mask, vt)
        self._adjust_kwargs(config, kwargs, drop_token_type_ids=False)
        if config.peft_type == PeftType.PREFIX_TUNING:
            with prefix_cache_passed(self.base_model, self.get_prompt(batch), self._prompt_cache_route) as extra:
                return self.base_model(input_ids=input_ids, attention_mask=attention_mask,
                                       inputs_embeds=inputs_embeds, **extra, **kwargs)
        if kwargs.get("token_type_ids") is not None:
            kwargs["token_type_ids"] = _prepend(kwargs["token_type_ids"], vt, 0)
        if inputs_embeds is None:
            inputs_embeds = self._embed(input_ids)
        prompts = self.get_prompt(batch).to(inputs_embeds.dtype)
        return self.base_model(inputs_embeds=torch.cat((prompts, inputs_embeds), dim=1), attention_mask=attention_mask,
                               **kwargs)

    # ---- generate ---------------------------------------------------------------------------
    def _prompt_generate(self, *args: Any, **kwargs: Any) -> Any:
        if args:
            if len(args) > 1 or "input_ids" in kwargs:
                raise TypeError("pass generate() inputs as keyword arguments (input_ids=..., attention_mask=...)")
            kwargs["input_ids"] = args[0]
        base = self.base_model
        if self._prompt_disabled or not self._prompt_configs:
            return base.generate(**kwargs)
        config = self.active_peft_config
        kind = self._prompt_task_kind()
        if kind == ENCODER:
            raise ValueError(f"generate() needs a causal or seq2seq language model; {type(base).__name__} with "
                             f"task_type={config.task_type} does not generate")
        if kind == SEQ2SEQ and config.peft_type != PeftType.PREFIX_TUNING:
            # the prompt goes in front of the encoder input once; decoding is untouched
            kwargs.pop("encoder_outputs", None)
            input_ids = kwargs.pop("input_ids", None)
            if input_ids is None:
                raise ValueError("generate() with prompt learning needs input_ids")
            embeds = self._embed(input_ids)
            prompts = self.get_prompt(embeds.shape[0])[:, : config.num_virtual_tokens].to(embeds.dtype)
            kwargs["inputs_embeds"] = torch.cat((prompts, embeds), dim=1)
            if kwargs.get("attention_mask") is not None:
                kwargs["attention_mask"] = _prepend(kwargs["attention_mask"], config.num_virtual_tokens)
            return base.generate(**kwargs)
        self._check_prefix_ready(config)
        had_own = "prepare_inputs_for_generation" in base.__dict__
        original = base.prepare_inputs_for_generation
        prepare = self._prepare_causal_step if kind == CAUSAL else self._prepare_seq2seq_step
        base.prepare_inputs_for_generation = functools.partial(prepare, original)
        try:
            return base.generate(**kwargs)
        finally:
            if had_own:
                base.prepare_inputs_for_generation = original
            else:
                del base.prepare_inputs_for_generation

    @staticmethod
    def _cache_in(inputs: dict) -> tuple[str, Any]:
        for name in ("cache", "past_key_values"):
            if name in inputs:
                return name, inputs[name]
        return "", None

    @staticmethod
    def _is_prefill(kwargs: dict, inputs: dict, cache: Any) -> bool:
        """Whether this step must bring its own prompt/prefix: the first step, every step without caching (the
        model may hand back a cache generate() then passes on, but the whole sequence is fed again), or an empty
        cache."""
        if kwargs.get("is_first_iteration") or inputs.get("use_cache", kwargs.get("use_cache")) is False:
            return True
        return cache is None or cache.get_seq_length() == 0

    def _prepare_causal_step(self, original: Any, input_ids: torch.Tensor, **kwargs: Any) -> dict:
        config = self.active_peft_config
        vt = config.num_virtual_tokens
        inputs = original(input_ids, **kwargs)
        mask = inputs.get("attention_mask")
        if mask is not None:
            if not isinstance(mask, torch.Tensor) or mask.dim() != 2:
                raise ValueError("generate() with prompt learning supports the default dynamic cache (2D attention "
                                 "masks) only; do not use a static or compiled cache")
            inputs["attention_mask"] = _prepend(mask, vt)
        name, cache = self._cache_in(inputs)
        prefill = self._is_prefill(kwargs, inputs, cache)
        if config.peft_type == PeftType.PREFIX_TUNING:
            if inputs.get("position_ids") is not None:
                inputs["position_ids"] = inputs["position_ids"] + vt
            if prefill:
                batch = _batch_size(inputs.get("input_ids"), inputs.get("inputs_embeds"))
                inputs[name or self._cache_kwarg()] = self.get_prompt(batch)
            return inputs
        # prompt tuning / P-tuning: the model numbers virtual + real tokens itself from the cache length
        inputs.pop("position_ids", None)
        if prefill:
            embeds = inputs.get("inputs_embeds")
            if embeds is None:
                embeds = self._embed(inputs["input_ids"])
            prompts = self.get_prompt(embeds.shape[0]).to(embeds.dtype)
            inputs["inputs_embeds"] = torch.cat((prompts, embeds), dim=1)
            inputs["input_ids"] = None
        return inputs

    def _prepare_seq2seq_step(self, original: Any, input_ids: torch.Tensor, **kwargs: Any) -> dict:
        config = self.active_peft_config
        inputs = original(input_ids, **kwargs)
        name, cache = self._cache_in(inputs)
        prefill = self._is_prefill(kwargs, inputs, cache)
        if inputs.get("decoder_attention_mask") is not None:
            inputs["decoder_attention_mask"] = _prepend(inputs["decoder_attention_mask"], config.num_virtual_tokens)
        if prefill:
            batch = inputs["decoder_input_ids"].shape[0]
            inputs[name or self._cache_kwarg()] = self.get_prompt(batch)
        return inputs

    # ---- saving and loading in HF PEFT's format ---------------------------------------------
    def get_prompt_embedding_to_save(self, adapter_name: str) -> torch.Tensor:
        """The encoder's output for the virtual tokens (what HF PEFT saves as `prompt_embeddings`)."""
        return self.prompt_encoder[adapter_name].output_rows().detach().cpu()

    def prompt_modules_to_save_state_dict(self, adapter_name: str) -> dict[str, torch.Tensor]:
        """`base_model.<module>.<param>` for the adapter's trainable copies (e.g. the classifier head)."""
        out = {}
        for key, wrapper in self._prompt_wrappers():
            if adapter_name in wrapper.modules_to_save:
                for name, value in wrapper.modules_to_save[adapter_name].state_dict().items():
                    out[f"base_model.{key}.{name}"] = value
        return out

    def _expected_prompt_shape(self, adapter_name: str) -> tuple[int, int]:
        config = self._prompt_configs[adapter_name]
        if config.peft_type == PeftType.PREFIX_TUNING:
            return config.num_virtual_tokens, config.num_layers * 2 * config.token_dim
        return config.num_virtual_tokens * config.num_transformer_submodules, config.token_dim

    def load_prompt_embeddings(self, state_dict: dict[str, torch.Tensor], adapter_name: str) -> None:
        """Load `prompt_embeddings` (+ modules_to_save weights); everything is checked before anything is written."""
        extra = self.prompt_modules_to_save_state_dict(adapter_name)
        expected = {"prompt_embeddings": self._expected_prompt_shape(adapter_name)}
        expected.update({k: tuple(v.shape) for k, v in extra.items()})
        missing = sorted(set(expected) - set(state_dict))
        unexpected = sorted(set(state_dict) - set(expected))
        shapes = [f"{k}: file {tuple(state_dict[k].shape)} vs model {expected[k]}" for k in expected
                  if k in state_dict and tuple(state_dict[k].shape) != tuple(expected[k])]
        problems = [f"{what}: {', '.join(items[:5])}" for what, items in
                    (("shape mismatches", shapes), ("missing keys", missing), ("unexpected keys", unexpected)) if items]
        if problems:
            raise ValueError(f"the adapter weights do not fit adapter {adapter_name!r} of this model "
                             f"({'; '.join(problems)}). Load the adapter into the base model it was trained for.")
        self.prompt_encoder[adapter_name].load_output_rows(state_dict["prompt_embeddings"])
        with torch.no_grad():
            for key, value in extra.items():
                value.copy_(state_dict[key].to(device=value.device, dtype=value.dtype))


_GRADIENT_CHECKPOINTING_ERROR = (
    "prefix tuning does not work with gradient checkpointing: the prefix is passed as a key/value cache, which "
    "checkpointed layers do not accept. Call model.gradient_checkpointing_disable(), or use prompt tuning / P-tuning"
)

__all__ = ["PromptLearningMixin", "find_word_embeddings"]
