"""HF PEFT's status API: `get_layer_status` / `get_model_status` and the `TunerLayerStatus` / `TunerModelStatus` they
return (also importable from `lightning_peft.peft_model`, and `PeftModel`'s methods of the same names)."""

from __future__ import annotations

import dataclasses
from typing import Any, Literal, Optional, Union, cast

import torch
from torch import nn

from .quantization import is_linear4bit
from .serialization import is_transformers_model, peft_model_tuner
from .tuners.base import BaseTuner, BaseTunerLayer, ModulesToSaveWrapper, is_linear8bit, parameter_counts

__all__ = ["TunerLayerStatus", "TunerModelStatus", "get_layer_status", "get_model_status"]


# ---- status, as HF PEFT's `get_layer_status` / `get_model_status` report it -----------------------------------
@dataclasses.dataclass
class TunerLayerStatus:
    name: str
    module_type: str
    enabled: bool
    active_adapters: list[str]
    merged_adapters: list[str]
    requires_grad: dict[str, Union[bool, Literal["irregular"]]]
    available_adapters: list[str]
    devices: dict[str, list[str]]
    quantization_backend: Optional[str]


@dataclasses.dataclass
class TunerModelStatus:
    base_model_type: str
    adapter_model_type: str
    peft_types: dict[str, str]
    trainable_params: int
    total_params: int
    num_adapter_layers: int
    enabled: Union[bool, Literal["irregular"]]
    active_adapters: Union[list[str], Literal["irregular"]]
    merged_adapters: Union[list[str], Literal["irregular"]]
    requires_grad: dict[str, Union[bool, Literal["irregular"]]]
    available_adapters: list[str]
    devices: dict[str, list[str]]
    quantization_backend: Union[Optional[str], Literal["irregular"]]


def _all_or_irregular(values: list[Any]) -> Any:
    """True / False when every value is it, else "irregular"."""
    if all(v is True for v in values):
        return True
    if all(v is False for v in values):
        return False
    return "irregular"


def _adapter_tensors(module: nn.Module, attrs: tuple[str, ...]) -> dict[str, list[torch.Tensor]]:
    """adapter name -> its tensors among the per-adapter dicts `attrs` of a tuner layer."""
    out: dict[str, list[torch.Tensor]] = {}
    for attr in attrs:
        holder: Any = getattr(module, attr, None)
        if isinstance(holder, (nn.ModuleDict, nn.ParameterDict)) or type(holder).__name__ == "BufferDict":
            for key, entry in holder.items():
                found = [entry] if isinstance(entry, torch.Tensor) else list(entry.parameters())
                out.setdefault(key, []).extend(found)
    return out


def _layer_status(name: str, module: nn.Module) -> TunerLayerStatus:
    if isinstance(module, ModulesToSaveWrapper):
        trainable = _adapter_tensors(module, ("modules_to_save",))
        devices_of = trainable
        enabled = module.adapters_enabled
        active, merged = list(module.active_adapters), []
        available = sorted(module.modules_to_save)
        module_type = "ModulesToSaveWrapper"
        backend = None
    else:
        layer = cast(BaseTunerLayer, module)
        trainable = _adapter_tensors(module, layer.adapter_layer_names)
        devices_of = _adapter_tensors(module, layer.adapter_layer_names + layer.other_param_names)
        enabled = not layer.disable_adapters
        active, merged = list(layer.active_adapters), list(layer.merged_adapters)
        available = sorted(layer.adapter_names())
        module_type = layer.repr_prefix + type(module).__name__  # what HF PEFT reads off the layer's repr()
        backend = getattr(getattr(module, "quantization_backend", None), "backend_name", None)
        if backend is None and is_linear8bit(layer.get_base_layer()):
            backend = "bnb 8bit"
        elif backend is None and is_linear4bit(layer.get_base_layer()):
            backend = "bnb 4bit"
    return TunerLayerStatus(
        name=name,
        module_type=module_type,
        enabled=enabled,
        active_adapters=active,
        merged_adapters=merged,
        requires_grad={k: _all_or_irregular([t.requires_grad for t in v]) for k, v in trainable.items()},
        available_adapters=available,
        devices={k: sorted({t.device.type for t in v}) for k, v in devices_of.items()},
        quantization_backend=backend,
    )


def _status_root(model: Any, what: str) -> nn.Module:
    if peft_model_tuner(model) is not None:  # a PeftModel
        if not isinstance(model.tuner, BaseTuner):
            raise TypeError(
                f"{what}() got an invalid PeftModel instance: its adapter is {model.peft_type} (prompt learning), "
                "which adds virtual tokens and replaces no layer, so there is no layer status to report. Read "
                "model.peft_config and model.print_trainable_parameters() instead"
            )
        return model.tuner
    return model


def get_layer_status(model: nn.Module) -> list[TunerLayerStatus]:
    """One `TunerLayerStatus` per adapter layer (tuner layers and `modules_to_save` wrappers) of a `PeftModel`, a
    tuner model or a model given adapters by `inject_adapter_in_model`, with HF PEFT's fields and values."""
    root = _status_root(model, "get_layer_status")
    statuses = [
        _layer_status(name, cast(nn.Module, module))
        for name, module in root.named_modules()
        if isinstance(module, (BaseTunerLayer, ModulesToSaveWrapper))
    ]
    if not statuses:
        raise ValueError(
            "No adapter layers found in the model, please ensure that it's a PEFT model or that you have PEFT adapters "
            "injected in the model."
        )
    return statuses


def get_model_status(model: nn.Module) -> TunerModelStatus:
    """The adapters' state over the whole model (HF PEFT's `get_model_status`): a field whose layers disagree is
    "irregular"."""
    peft_model: Any = model  # a PeftModel's methods are read below (this module cannot import its class)
    if peft_model_tuner(model) is not None:  # a PeftModel
        _status_root(model, "get_model_status")
        base_model_type = type(peft_model.get_base_model()).__name__
        trainable, total = peft_model.get_nb_trainable_parameters()
        peft_types = {name: str(config.peft_type) for name, config in peft_model.peft_config.items()}
        adapter_model_type = type(peft_model.tuner).__name__
    else:
        base_model_type = type(model).__name__ if is_transformers_model(model) else "other"
        trainable, total = parameter_counts(model)
        peft_types, adapter_model_type = {}, "None"
    layers = get_layer_status(model)
    enabled_values = {s.enabled for s in layers}
    enabled: Union[bool, Literal["irregular"]] = enabled_values.pop() if len(enabled_values) == 1 else "irregular"
    available = sorted(set().union(*(s.available_adapters for s in layers)))
    active_sets = {tuple(s.active_adapters) for s in layers}
    active: Any = list(active_sets.pop()) if len(active_sets) == 1 else "irregular"
    merged_all = set().union(*(s.merged_adapters for s in layers))
    merged: Any = sorted(merged_all)
    if any((set(s.available_adapters) - set(s.merged_adapters)) & merged_all for s in layers):
        merged = "irregular"
    grads: dict[str, list[Any]] = {}
    devices: dict[str, set[str]] = {}
    for status in layers:
        for key, value in status.requires_grad.items():
            grads.setdefault(key, []).append(value)
        for key, found in status.devices.items():
            devices.setdefault(key, set()).update(found)
    backends = {s.quantization_backend for s in layers}
    return TunerModelStatus(
        base_model_type=base_model_type,
        adapter_model_type=adapter_model_type,
        peft_types=peft_types,
        trainable_params=trainable,
        total_params=total,
        num_adapter_layers=len(layers),
        enabled=enabled,
        active_adapters=active,
        merged_adapters=merged,
        requires_grad={k: _all_or_irregular(v) for k, v in grads.items()},
        available_adapters=available,
        devices={k: sorted(v) for k, v in devices.items()},
        quantization_backend=backends.pop() if len(backends) == 1 else "irregular",
    )
