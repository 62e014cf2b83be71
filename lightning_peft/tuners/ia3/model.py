"""`IA3Model`: the (IA)^3 tuner. Fills `target_modules` / `feedforward_modules` from HF PEFT's tables by model
type when unset, and wraps each target in a layer that scales its output (or, for a feedforward module, its input)
by a learned vector.
"""

from __future__ import annotations

from typing import Optional

from torch import nn

from ...utils.constants import model_type_of
from ..base import BaseTuner, describe_module_names, is_conv1d, is_excluded, name_matches, resolve_fan_in_fan_out
from .config import IA3Config, check_feedforward_subset
from .layer import Conv2d, IA3Layer, Linear
from .targets import DEFAULT_FEEDFORWARD_MODULES, DEFAULT_TARGET_MODULES


def is_feedforward_key(config: IA3Config, key: str) -> bool:
    return config.feedforward_modules is not None and name_matches(key, config.feedforward_modules)


class IA3Model(BaseTuner):
    """Injects (IA)^3 layers into `model` (see `IA3Config`)."""

    prefix = "ia3_"
    peft_type = IA3Config.PEFT_TYPE
    condenses_target_list = False  # as HF PEFT: the feedforward list is paired with the target list

    def prepare_adapter_config(self, config: IA3Config, model: nn.Module) -> IA3Config:
        model_type = model_type_of(model) or ""
        if config.target_modules is None and model_type in DEFAULT_TARGET_MODULES:
            config.target_modules = set(DEFAULT_TARGET_MODULES[model_type])
        if config.feedforward_modules is None:
            # HF PEFT's default feedforward modules for the model's family where they are targets (as they are with
            # the default targets, and where a regex targets); none otherwise: every vector then scales an output
            default = DEFAULT_FEEDFORWARD_MODULES.get(model_type)
            targets = config.target_modules
            fits = targets is not None and (isinstance(targets, str) or set(default or ()) <= set(targets))
            if default is not None and fits:
                config.feedforward_modules = set(default)
            else:
                config.feedforward_modules = set()
        config = super().prepare_adapter_config(config, model)  # "all-linear" expanded (HF PEFT: after the defaults)
        check_feedforward_subset(config)
        return config

    def _check_new_adapter_config(self, config: IA3Config) -> None:
        if not isinstance(config, IA3Config):
            raise TypeError(f"IA3Model takes an IA3Config, got {type(config).__name__}")
        if isinstance(config.feedforward_modules, str):
            # a regex cannot be checked against target_modules statically: check it against the model
            targets = set(self.matching_keys(config))
            stray = [
                k
                for k, _ in self.model.named_modules()
                if k
                and is_feedforward_key(config, k)
                and k not in targets
                and not is_excluded(config, k)
                and not self._internal(k)
            ]
            if stray:
                raise ValueError(
                    f"feedforward_modules={config.feedforward_modules!r} matches modules outside "
                    f"target_modules: {stray[:4]}; feedforward_modules must be a subset of target_modules"
                )

    def _is_supported_target(self, module: nn.Module) -> bool:
        return (
            isinstance(module, (IA3Layer, nn.Linear, nn.Conv2d))
            or is_conv1d(module)
            or self.quantized_layer_for(module) is not None
        )

    def _create_and_replace(
        self, config: IA3Config, adapter_name: str, target: nn.Module, current_key: str
    ) -> Optional[nn.Module]:
        is_feedforward = is_feedforward_key(config, current_key)
        if isinstance(target, IA3Layer):
            if target.is_feedforward != is_feedforward:
                raise ValueError(
                    f"{current_key} is {'a' if target.is_feedforward else 'not a'} feedforward module "
                    "for an existing IA3 adapter; every adapter must agree on feedforward_modules"
                )
            target.update_layer(adapter_name, config.init_ia3_weights)
            return None
        kwargs = dict(is_feedforward=is_feedforward, init_ia3_weights=config.init_ia3_weights)
        quantized = self.quantized_layer_for(target)
        if quantized is not None:
            new_module: nn.Module = quantized(target, adapter_name, **kwargs)
        elif isinstance(target, nn.Conv2d):
            new_module = Conv2d(target, adapter_name, **kwargs)
        elif isinstance(target, nn.Linear):
            new_module = Linear(
                target, adapter_name, fan_in_fan_out=resolve_fan_in_fan_out(config, False, "torch.nn.Linear"), **kwargs
            )
        elif is_conv1d(target):
            new_module = Linear(
                target,
                adapter_name,
                is_target_conv_1d_layer=True,
                fan_in_fan_out=resolve_fan_in_fan_out(config, True, "transformers Conv1D"),
                **kwargs,
            )
        else:
            raise ValueError(
                f"cannot apply IA3 to {current_key} of type {type(target).__name__}; "
                f"supported: Linear, Conv1D, Conv2d, 8-bit Linear. {describe_module_names(self.model)}"
            )
        return new_module


__all__ = ["IA3Model", "is_feedforward_key"]
