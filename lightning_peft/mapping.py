"""HF PEFT's `peft.mapping` names: `inject_adapter_in_model`, `get_peft_config` and the peft-type tables."""

from __future__ import annotations

import copy
import re
import warnings
from collections.abc import Iterator, Mapping
from typing import Any, Callable, Optional

import torch
from torch import nn

from ._compat import name_or_path
from .config import SAVED_PREFIX, PeftConfig
from .serialization import INJECTED_TUNER_ATTRIBUTE, PEFT_MODEL_PREFIX
from .tuners.base import BaseTuner, check_adapter_name, requires_grad_kept_on_failure
from .tuners.registry import get_model_class, registered_tuners


class _RegistryView(Mapping):
    """peft type -> what the registry holds for it (every tuner registered so far, one registered later too)."""

    def __init__(self, pick: Callable[[Any], Any]) -> None:
        self._pick = pick

    def _table(self) -> dict[str, Any]:
        return {peft_type: self._pick(spec) for peft_type, spec in registered_tuners().items()}

    def __getitem__(self, peft_type: Any) -> Any:
        return self._table()[str(getattr(peft_type, "value", peft_type))]

    def __iter__(self) -> Iterator[str]:
        return iter(self._table())

    def __len__(self) -> int:
        return len(self._table())


PEFT_TYPE_TO_CONFIG_MAPPING: Mapping[str, type] = _RegistryView(lambda spec: spec.config_class)
PEFT_TYPE_TO_TUNER_MAPPING: Mapping[str, type] = _RegistryView(lambda spec: spec.model_class)


def get_peft_config(config_dict: dict[str, Any]) -> PeftConfig:
    """A config from a dict holding `peft_type` (as `adapter_config.json` does)."""
    return PeftConfig.from_dict(config_dict)


def inject_adapter_in_model(
    peft_config: PeftConfig,
    model: nn.Module,
    adapter_name: str = "default",
    low_cpu_mem_usage: bool = False,
    state_dict: Optional[dict[str, torch.Tensor]] = None,
) -> nn.Module:
    """Put the adapter's layers into `model` in place and return `model` itself (no `PeftModel`), as HF PEFT does.

    For tuners that adapt layers (LoRA, IA3); prompt learning needs a `PeftModel` (`get_peft_model`). A second call
    on the same model adds another adapter beside the first. `state_dict`: adapter tensors (only their keys are
    used) that name the modules to adapt, when `target_modules` is not known. `low_cpu_mem_usage` is accepted for
    HF PEFT's signature; the adapter is created with its initial values (not on the meta device), so the model runs
    before weights are loaded too. The model's own `get_peft_model_state_dict` / `set_peft_model_state_dict` keys are
    its module names (`transformer.h.0.attn.c_attn.lora_A.weight`), as in HF PEFT."""
    if not isinstance(peft_config, PeftConfig):
        raise TypeError(f"peft_config must be a tuner config (e.g. LoraConfig), got {type(peft_config).__name__}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if peft_config.is_prompt_learning:
        raise ValueError(
            "inject_adapter_in_model does not support prompt learning (prompt / prefix / P-tuning feed the model "
            "through a PeftModel's forward); use get_peft_model"
        )
    check_adapter_name(adapter_name)
    config = copy.deepcopy(peft_config)
    if state_dict is not None:
        config = _targets_from_state_dict(config, state_dict)
    tuner = model.__dict__.get(INJECTED_TUNER_ATTRIBUTE)
    if tuner is not None and not tuner.is_unloaded:
        if config.peft_type != tuner.peft_type:
            raise ValueError(
                f"the model holds {tuner.peft_type} adapters ({', '.join(tuner.peft_config)}); a {config.peft_type} "
                "adapter cannot join them"
            )
        tuner.add_adapter(adapter_name, config)
        return model
    from .peft_model import check_not_wrapped  # the same refusal as get_peft_model's (no import cycle at load)

    check_not_wrapped(model)
    if config.base_model_name_or_path is None:
        config.base_model_name_or_path = name_or_path(getattr(model, "config", None)) or None
    tuner_cls = get_model_class(config.peft_type)
    if not issubclass(tuner_cls, BaseTuner):
        raise ValueError(f"inject_adapter_in_model does not support {config.peft_type}; use get_peft_model")
    with requires_grad_kept_on_failure(model):
        tuner = tuner_cls(model, config, adapter_name)
    model.__dict__[INJECTED_TUNER_ATTRIBUTE] = tuner  # not a child module: the tuner holds the model
    model.__dict__["peft_config"] = tuner.peft_config  # HF PEFT's attribute on an injected model
    return model


def _targets_from_state_dict(config: Any, state_dict: dict[str, torch.Tensor]) -> Any:
    """`config` targeting the modules that `state_dict`'s adapter keys name (HF PEFT: the state dict decides; a
    warning when the config's own targets differ)."""
    prefix = getattr(get_model_class(config.peft_type), "prefix", "")
    if not prefix:
        return config
    names = set()
    for key in state_dict:
        key = key.removeprefix(PEFT_MODEL_PREFIX).removeprefix(SAVED_PREFIX)
        match = re.match(rf"(.+?)\.{re.escape(prefix)}", key)
        if match is not None:
            names.add(match.group(1))
    if not names:
        raise ValueError(
            f"state_dict holds no {config.peft_type} adapter keys (none contains '.{prefix}'); pass the adapter's "
            "tensors as get_peft_model_state_dict gives them, or leave state_dict out"
        )
    targets = config.target_modules
    if targets is not None and (isinstance(targets, str) or set(targets) != names):
        warnings.warn(
            f"target_modules={targets!r} differ from the modules the state_dict holds adapters for; the state_dict's "
            f"{len(names)} modules are adapted",
            RuntimeWarning,
            stacklevel=3,
        )
    config.target_modules = names
    return config
