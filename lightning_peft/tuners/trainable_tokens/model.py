"""`TrainableTokensModel`: HF PEFT 0.21's TrainableTokens tuner. Each target embedding is wrapped in the
`TrainableTokensLayer` that LoRA's `trainable_token_indices` uses (tuners/lora/trainable_tokens.py); a module tied to
the input embedding (a tied LM head) follows its rows, as HF PEFT does. Saved as HF PEFT saves it:
`<embedding>.trainable_tokens_delta`, and a tied module's rows a second time under its own name. Several adapters
can be active together when their rows differ (overlapping rows are refused at the forward and at merging, as HF
PEFT does)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any, Optional

import torch
from torch import nn

from ..base import BaseTuner, model_embedding
from ..lora import trainable_tokens as tt
from .config import TrainableTokensConfig

SAVED_NAME = "trainable_tokens_delta"  # HF PEFT's key part (the tuner's own layer: no wrapper in between)


class TrainableTokensModel(BaseTuner):
    """Trains the rows `token_indices` of the embeddings `target_modules` names (see `TrainableTokensConfig`)."""

    prefix = "trainable_tokens_"
    peft_type = TrainableTokensConfig.PEFT_TYPE
    # only embedding rows (and a tied output layer) change: layers quantization never touches, so it runs and
    # merges over any quantized base
    wraps_base_layers = False

    def prepare_adapter_config(self, config: TrainableTokensConfig, model: nn.Module) -> TrainableTokensConfig:
        if config.target_modules is None:  # HF PEFT: the input embedding's name, else "embed_tokens"
            name, _ = model_embedding(model, "get_input_embeddings")
            config.target_modules = name or "embed_tokens"
        return super().prepare_adapter_config(config, model)

    def _check_new_adapter_config(self, config: TrainableTokensConfig) -> None:
        if not isinstance(config, TrainableTokensConfig):
            raise TypeError(f"TrainableTokensModel takes a TrainableTokensConfig, got {type(config).__name__}")
        if not config.token_indices:
            raise ValueError("token_indices is empty; list the indices of the tokens to train (e.g. [50257, 50258])")

    def _is_supported_target(self, module: nn.Module) -> bool:
        return True  # the plan below checks each target (TypeError naming it), before any change

    def _plan_extra_targets(self, config: TrainableTokensConfig, keys: list[str]) -> Any:
        if not keys:
            return None
        wanted = SimpleNamespace(trainable_token_indices={k: list(config.token_indices) for k in keys})
        planned = tt.plan(self.model, wanted, [], field="token_indices")
        return planned or None

    def _create_and_replace(
        self, config: TrainableTokensConfig, adapter_name: str, target: nn.Module, current_key: str
    ) -> Optional[nn.Module]:
        return None  # every target is wrapped by `_inject_extra_targets` (with the tied ones)

    def _inject_extra_targets(
        self, config: Any, adapter_name: str, plan: Any, originals: list[tuple[nn.Module, str, nn.Module]]
    ) -> None:
        settings = SimpleNamespace(init_lora_weights=config.init_weights)
        tt.inject(self.model, settings, adapter_name, plan, originals)

    def _auto_saves_embeddings(self, config: TrainableTokensConfig) -> bool:
        return False

    def _extra_saved_tensors(self, state_dict: dict[str, torch.Tensor], adapter_name: str) -> dict[str, torch.Tensor]:
        out = tt.saved_tensors(state_dict, adapter_name, SAVED_NAME)
        tied = tt.tied_file_keys(self.model, adapter_name, SAVED_NAME)  # HF PEFT saves a tied layer's rows too
        out.update({k: state_dict[m] for k, m in tied.items() if m in state_dict})
        return out

    def adapter_state_dict(self, state_dict: dict[str, torch.Tensor], adapter_name: str) -> dict[str, torch.Tensor]:
        return self._extra_saved_tensors(state_dict, adapter_name)

    def _extra_model_key(self, key: str, adapter_name: str) -> Optional[str]:
        tied = tt.tied_file_keys(self.model, adapter_name, SAVED_NAME)
        return tied.get(key) or tt.model_key(key, adapter_name, SAVED_NAME)


__all__ = ["TrainableTokensModel"]
