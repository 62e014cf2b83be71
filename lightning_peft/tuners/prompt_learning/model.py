"""Prompt learning as a tuner: the model class prompt tuning, P-tuning and prefix tuning share.

It has the adapter API of `BaseTuner` (add / set / delete / disable adapters, the saved state in HF PEFT's
format, `unload`) over the user's model, which stays frozen and unchanged; the prompt encoders live beside it in
`prompt_encoder`. Each tuner subclasses it with its encoder (`build_encoder`) and how its virtual tokens reach
the model (`injection`: prepended embeddings or a key/value prefix, see `injection.py`). HF PEFT's attribute
names (`prompt_encoder`, `prompt_tokens`, `word_embeddings`, `get_prompt`) are kept so code written for it works.
"""

from __future__ import annotations

import copy
import functools
import warnings
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Callable, Iterator, Optional, Union, cast

import torch
from torch import nn

from ...config import SAVED_PREFIX, TaskType
from ..base import (
    ModulesToSaveWrapper,
    TunerAttributes,
    active_after_delete,
    check_adapter_name,
    check_modules_to_save,
    check_tensors_fit,
    get_submodule_parent,
    mark_wrapped,
    requires_grad_kept_on_failure,
    unmark_wrapped,
    wrap_modules_to_save,
)
from .cache import cache_route
from .config import PROMPT_KEY, PromptLearningConfig, check_sizes_before_building, fill_config_from_model
from .encoder import PromptEncoderBase
from .injection import CAUSAL, ENCODER, SEQ2SEQ, KeyValuePrefix, PrependEmbeddings

if TYPE_CHECKING:
    from .config import FilledPromptLearningConfig


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


def keyword_inputs(args: tuple, kwargs: dict, what: str) -> dict:
    """HF PEFT accepts the input ids as the one positional argument; everything else is by keyword."""
    if args:
        if len(args) > 1 or "input_ids" in kwargs:
            raise TypeError(f"pass the {what} inputs as keyword arguments (input_ids=..., attention_mask=...)")
        kwargs["input_ids"] = args[0]
    return kwargs


class PromptLearningModel(TunerAttributes, nn.Module):
    """`model` (the user's, frozen) plus one prompt encoder per adapter; one adapter is active at a time."""

    peft_type: Any = None
    injection: Union[PrependEmbeddings, KeyValuePrefix]
    can_merge = False  # the prompt is fed through forward(); there are no weights to fold into the model
    wraps_base_layers = False  # so it runs over any (e.g. 8-bit) base

    def __init__(self, model: nn.Module, config: PromptLearningConfig, adapter_name: str = "default") -> None:
        super().__init__()
        self.model = model
        self.peft_config: dict[str, FilledPromptLearningConfig] = {}
        self.active_adapter: Any = adapter_name  # a name; `[]` once the last adapter is deleted (as HF PEFT)
        self._frozen_active = False  # set_adapter(..., inference_mode=True)
        self.prompt_encoder = nn.ModuleDict()
        self.prompt_tokens: dict[str, torch.Tensor] = {}
        self._disabled = False
        model.requires_grad_(False)
        # kept out of the module tree so the embedding is not registered (and saved) twice
        self._word_embeddings_ref = [find_word_embeddings(model)]
        # where a prefix cache goes, read from the forward signatures once (the model never changes)
        self.cache_route = cache_route(model)
        self._task_kind = self._kind_of(config.task_type)
        self.add_adapter(adapter_name, config)
        mark_wrapped(model, self)  # so that wrapping `model` again is refused while this tuner lives

    def peft_model_modules(self) -> dict[str, nn.Module]:
        """HF PEFT's layout: a PeftModel's `base_model` is the user's model and its encoders are `prompt_encoder`."""
        return {"base_model": self.model, "prompt_encoder": self.prompt_encoder}

    # ---- what each tuner provides -----------------------------------------------------------
    def build_encoder(self, config: FilledPromptLearningConfig) -> nn.Module:
        raise NotImplementedError

    # ---- lookups ----------------------------------------------------------------------------
    @property
    def word_embeddings(self) -> Optional[nn.Module]:
        return self._word_embeddings_ref[0]

    @property
    def active_adapters(self) -> list[str]:
        return [self.active_adapter] if isinstance(self.active_adapter, str) and self.active_adapter else []

    def cache_kwarg(self) -> str:
        """The keyword the model's forward takes a key/value cache by (`past_key_values` when it takes none)."""
        route = self.cache_route
        return route[1] if route is not None and not route[0] else "past_key_values"

    def task_kind(self) -> str:
        """How inputs are fed (CAUSAL, SEQ2SEQ or ENCODER): fixed by the first adapter, as HF PEFT fixes it by the
        PeftModel class that adapter's task type picks."""
        return self._task_kind

    def _kind_of(self, task: Optional[Union[str, TaskType]]) -> str:
        """The task kind of a task type; without one, what the model is (encoder-decoder, generating, or not)."""
        if task == TaskType.SEQ_2_SEQ_LM:
            return SEQ2SEQ
        if task == TaskType.CAUSAL_LM:
            return CAUSAL
        if task is not None:
            return ENCODER
        if getattr(getattr(self.model, "config", None), "is_encoder_decoder", False):
            return SEQ2SEQ
        can_generate = getattr(self.model, "can_generate", None)
        return CAUSAL if callable(can_generate) and can_generate() else ENCODER

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.word_embeddings is None:
            raise ValueError("no input embedding layer found; pass inputs_embeds instead of input_ids")
        return self.word_embeddings(input_ids)

    # ---- adapters by name -------------------------------------------------------------------
    def add_adapter(self, adapter_name: str, config: PromptLearningConfig) -> None:
        """Validate everything first, then add; a failure (or an interrupt) mid-way takes back what was added."""
        self.check_attached()
        if adapter_name in self.peft_config:
            raise ValueError(
                f"an adapter named {adapter_name!r} already exists; pick another name or delete_adapter it"
            )
        check_adapter_name(adapter_name, self.model, taken=self.peft_config)
        if not isinstance(config, PromptLearningConfig) or config.peft_type != self.peft_type:
            raise TypeError(f"{type(self).__name__} takes a {self.peft_type} config, got {type(config).__name__}")
        if config.task_type is not None and self._kind_of(config.task_type) != self._task_kind:
            warnings.warn(
                f"adapter {adapter_name!r} has task_type={config.task_type}, but this model feeds its inputs as its "
                f"first adapter's task ({self._task_kind}), as HF PEFT does; load it into a model of its own task"
            )
        config = fill_config_from_model(copy.deepcopy(config), self.model, self.injection)
        self.injection.check_config(self, config)
        check_sizes_before_building(config, self.model, self.injection)
        encoder = self.build_encoder(config)
        weight = next(iter(self.model.parameters()), None)
        if weight is not None:
            encoder.to(weight.device)
        encoder.requires_grad_(not config.inference_mode)
        check_modules_to_save(self.model, config.modules_to_save)
        with requires_grad_kept_on_failure(self, self.model):
            try:
                self.prompt_encoder[adapter_name] = encoder
                self.prompt_tokens[adapter_name] = torch.arange(
                    config.num_virtual_tokens * config.num_transformer_submodules
                )
                self.peft_config[adapter_name] = config
                for wrapper in wrap_modules_to_save(self.model, config.modules_to_save, adapter_name):
                    if config.inference_mode:
                        wrapper.modules_to_save[adapter_name].requires_grad_(False)
                self.sync_trainability()
            except BaseException:  # a KeyboardInterrupt too: no half-added adapter stays behind
                self._discard(adapter_name)
                raise

    def _discard(self, adapter_name: str) -> None:
        """Take back whatever of a failed add_adapter got in (no checks: parts may be missing)."""
        if adapter_name in self.prompt_encoder:
            del self.prompt_encoder[adapter_name]
        self.prompt_tokens.pop(adapter_name, None)
        self.peft_config.pop(adapter_name, None)
        for key, wrapper in self._wrappers():
            if adapter_name in wrapper.modules_to_save:
                wrapper.delete_adapter(adapter_name)
                if not wrapper.modules_to_save:
                    self._put_back(key, wrapper)

    def set_adapter(self, adapter_name: str, inference_mode: bool = False) -> None:
        """Make `adapter_name` the active adapter; it trains unless `inference_mode` or loaded for inference. One
        adapter at a time: prompt learning feeds one prompt (a list is refused with a TypeError, as HF PEFT's
        PeftModel.set_adapter refuses it)."""
        if not isinstance(adapter_name, str):
            raise TypeError(
                f"{self.peft_type} runs one adapter at a time (it feeds one prompt); set_adapter takes one adapter "
                f"name, got {adapter_name!r}"
            )
        self.check_adapter_exists(adapter_name)
        self.active_adapter = adapter_name
        self._frozen_active = inference_mode
        self.sync_trainability()

    def delete_adapter(self, adapter_name: str, force: bool = False) -> None:
        """Delete an adapter, as HF PEFT does: deleting the active one makes the first remaining adapter active (with
        a warning; `force`, for an adapter that failed to load, skips it); after the last, none is active (`[]`)."""
        self.check_adapter_exists(adapter_name)
        active = [self.active_adapter] if isinstance(self.active_adapter, str) else []
        # HF PEFT's prompt learning takes the first adapter added (its layers / tuners the first by name)
        new_active = active_after_delete(
            adapter_name, active, self.peft_config, warn=not force, by_name=False, stacklevel=3
        )
        del self.prompt_encoder[adapter_name]
        self.prompt_tokens.pop(adapter_name, None)
        del self.peft_config[adapter_name]
        for key, wrapper in self._wrappers():
            wrapper.delete_adapter(adapter_name)
            if not wrapper.modules_to_save:  # no adapter uses it any more: put the original back
                self._put_back(key, wrapper)
        if adapter_name == self.active_adapter:
            self.active_adapter = new_active[0] if new_active else []
            self._frozen_active = False
            self.sync_trainability()

    @contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Run the model alone inside the block."""
        self.check_attached()
        was = self._disabled
        wrappers = [w for _, w in self._wrappers()]
        self._disabled = True
        for wrapper in wrappers:
            wrapper.enable_adapters(False)
        try:
            yield
        finally:
            self._disabled = was
            for wrapper in wrappers:
                wrapper.enable_adapters(not was)

    def unload(self) -> nn.Module:
        """The model as it was: every wrapped module (e.g. the classifier head) back as the original. The model is
        the caller's from then on: this tuner refuses every adapter operation, and its forward runs the model
        alone."""
        self.check_attached()
        for key, wrapper in self._wrappers():
            self._put_back(key, wrapper)
        unmark_wrapped(self)
        self.is_unloaded = True
        return self.model

    def merge_and_unload(self, *args: Any, **kwargs: Any) -> nn.Module:
        self.check_attached()
        raise ValueError(
            f"{self.peft_type} is prompt learning: there are no weights to merge into the model (the "
            "prompt is fed through forward()); keep the PeftModel, or unload() for the model alone"
        )

    # ---- modules_to_save (e.g. the classifier head) -----------------------------------------
    def _wrappers(self) -> list[tuple[str, ModulesToSaveWrapper]]:
        return [(n, m) for n, m in self.model.named_modules() if isinstance(m, ModulesToSaveWrapper)]

    def _put_back(self, key: str, wrapper: ModulesToSaveWrapper) -> None:
        parent, _, child = get_submodule_parent(self.model, key)
        setattr(parent, child, wrapper.original_module)

    def sync_trainability(self) -> None:
        """Only the active adapter trains (unless loaded for inference): its prompt encoder and its copies of
        the modules_to_save require grad; every other adapter's are frozen. Every wrapper holding the active adapter
        is pointed at it here, so every path that changes the active adapter (set_adapter, add, delete) must call
        this; forward and generate do not re-check."""

        def trains(name: str) -> bool:
            return name == self.active_adapter and not self.peft_config[name].inference_mode and not self._frozen_active

        for name, encoder in self.prompt_encoder.items():
            encoder.requires_grad_(trains(name))
        for _, wrapper in self._wrappers():
            # a wrapper of other adapters only runs its original module (also one just made for a new adapter)
            wrapper.set_adapter([n for n in self.active_adapters if n in wrapper.modules_to_save])
            for name, module in wrapper.modules_to_save.items():
                module.requires_grad_(trains(name))

    # ---- the virtual tokens -----------------------------------------------------------------
    def get_prompt(self, batch_size: int, task_ids: Optional[torch.Tensor] = None) -> Any:
        """Prompt tuning / P-tuning: (batch, tokens, token_dim) embeddings. Prefix tuning: a cache object."""
        encoder = cast(PromptEncoderBase, self.prompt_encoder[self.active_adapter])
        device = encoder.embedding.weight.device
        tokens = self.prompt_tokens[self.active_adapter]
        if tokens.device != device:  # moved once (and again only if the encoder moves), not on every call
            tokens = self.prompt_tokens[self.active_adapter] = tokens.to(device)
        return self.injection.prompt(self, self.peft_config[self.active_adapter], encoder, tokens, batch_size)

    # ---- running ----------------------------------------------------------------------------
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        kwargs = keyword_inputs(args, kwargs, "model")
        if self._disabled or not self.peft_config or self.is_unloaded:
            return self.model(**kwargs)
        config = self.peft_config[self.active_adapter]
        self.injection.check_ready(self)
        kind = self.task_kind()
        run = {
            CAUSAL: self.injection.causal_forward,
            SEQ2SEQ: self.injection.seq2seq_forward,
            ENCODER: self.injection.encoder_forward,
        }[kind]
        return run(self, config, kwargs)

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        kwargs = keyword_inputs(args, kwargs, "generate()")
        if self._disabled or not self.peft_config or self.is_unloaded:
            model: Any = self.model  # a transformers model that generates
            return model.generate(**kwargs)
        config = self.peft_config[self.active_adapter]
        kind = self.task_kind()
        if kind == ENCODER:
            raise ValueError(
                f"generate() needs a causal or seq2seq language model; {type(self.model).__name__} with "
                f"task_type={config.task_type} does not generate"
            )
        return self.injection.generate(self, config, kind, kwargs)

    def generate_with_step_hook(self, step: Callable[..., None], kwargs: dict) -> Any:
        """`model.generate(**kwargs)` with `step(tuner, config, inputs, cache_name, prefill)` applied to the inputs
        of every decoding step (the model's `prepare_inputs_for_generation`, replaced for this call only)."""
        model: Any = self.model  # a transformers model (generate, prepare_inputs_for_generation)
        had_own = "prepare_inputs_for_generation" in model.__dict__
        original = model.prepare_inputs_for_generation
        model.prepare_inputs_for_generation = functools.partial(self._prepare_step, original, step)
        try:
            return model.generate(**kwargs)
        finally:
            if had_own:
                model.prepare_inputs_for_generation = original
            else:
                del model.prepare_inputs_for_generation

    def _prepare_step(
        self, original: Callable[..., dict], step: Callable[..., None], input_ids: torch.Tensor, **kwargs: Any
    ) -> dict:
        config = self.peft_config[self.active_adapter]
        inputs = original(input_ids, **kwargs)
        mask = inputs.get("attention_mask")
        if mask is not None and self.task_kind() == CAUSAL:
            if not isinstance(mask, torch.Tensor) or mask.dim() != 2:
                raise ValueError(
                    "generate() with prompt learning supports the default dynamic cache (2D attention "
                    "masks) only; do not use a static or compiled cache"
                )
            inputs["attention_mask"] = torch.cat((mask.new_ones((mask.shape[0], config.num_virtual_tokens)), mask), 1)
        name = next((n for n in ("cache", "past_key_values") if n in inputs), "")
        cache = inputs.get(name) if name else None
        # the prompt comes with the first step, every step without caching (the whole sequence is fed again),
        # and whenever the cache is empty
        prefill = (
            bool(kwargs.get("is_first_iteration"))
            or inputs.get("use_cache", kwargs.get("use_cache")) is False
            or cache is None
            or cache.get_seq_length() == 0
        )
        step(self, config, inputs, name or self.cache_kwarg(), prefill)
        return inputs

    # ---- the adapter's tensors in HF PEFT's format ------------------------------------------
    def get_prompt_embedding_to_save(self, adapter_name: str) -> torch.Tensor:
        """The encoder's output for the virtual tokens (what HF PEFT saves as `prompt_embeddings`)."""
        return cast(PromptEncoderBase, self.prompt_encoder[adapter_name]).output_rows().detach().cpu()

    def _modules_to_save_tensors(self, adapter_name: str) -> dict[str, torch.Tensor]:
        """`base_model.<module>.<param>` for the adapter's trainable copies (e.g. the classifier head)."""
        out = {}
        for key, wrapper in self._wrappers():
            if adapter_name in wrapper.modules_to_save:
                for name, value in wrapper.modules_to_save[adapter_name].state_dict().items():
                    out[f"{SAVED_PREFIX}{key}.{name}"] = value
        return out

    def peft_state_dict(
        self, adapter_name: str, state_dict: Optional[dict] = None, save_embedding_layers: Union[bool, str] = False
    ) -> dict[str, torch.Tensor]:
        """The tensors HF PEFT saves for a prompt-learning adapter (keys as in its files)."""
        self.check_attached()
        return {
            PROMPT_KEY: self.get_prompt_embedding_to_save(adapter_name),
            **self._modules_to_save_tensors(adapter_name),
        }

    def load_peft_state_dict(self, tensors: dict[str, torch.Tensor], adapter_name: str) -> None:
        """Load `prompt_embeddings` (+ modules_to_save weights); everything is checked before anything is written."""
        self.check_attached()
        extra = self._modules_to_save_tensors(adapter_name)
        expected: dict[str, tuple[int, ...]] = {PROMPT_KEY: self.injection.saved_shape(self.peft_config[adapter_name])}
        expected.update({k: tuple(v.shape) for k, v in extra.items()})
        check_tensors_fit(expected, tensors, adapter_name)
        cast(PromptEncoderBase, self.prompt_encoder[adapter_name]).load_output_rows(tensors[PROMPT_KEY])
        with torch.no_grad():
            for key, value in extra.items():
                value.copy_(tensors[key].to(device=value.device, dtype=value.dtype))
