"""The base model's own weights inside a PeftModel, under the base model's original keys (HF PEFT's
`get_base_model_state_dict` / `set_base_model_state_dict`, e.g. for loading base weights after wrapping)."""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

from ._compat import child_modules, incompatible_keys
from .tuners.base import BaseTunerLayer, ModulesToSaveWrapper


def _base_of(model: Any) -> nn.Module:
    get_base_model = getattr(model, "get_base_model", None)
    if not callable(get_base_model):
        raise TypeError(f"model must be a PeftModel, got {type(model).__name__}")
    return get_base_model()


def _original_key(root: nn.Module, key: str) -> Optional[str]:
    """The key `key` of the wrapped model's state dict has in the model before wrapping: the `base_layer` of a tuner
    layer and the `original_module` of a ModulesToSaveWrapper left out; None for an adapter's own tensors (anything
    else in those two)."""
    kept: list[str] = []
    module: Optional[nn.Module] = root
    for part in key.split("."):
        child = child_modules(module).get(part) if module is not None else None
        if isinstance(module, BaseTunerLayer):
            if part != "base_layer":
                return None
        elif isinstance(module, ModulesToSaveWrapper):
            if part != "original_module":
                return None
        else:
            kept.append(part)
        module = child
    return ".".join(kept)


def _original_to_wrapped(base: nn.Module) -> dict[str, str]:
    out = {}
    for key in base.state_dict():
        original = _original_key(base, key)
        if original is not None:
            out[original] = key
    return out


def get_base_model_state_dict(model: Any) -> dict[str, torch.Tensor]:
    """The base model's state dict under its original keys: without the adapters' tensors, and with the original
    module where a `modules_to_save` copy replaced one (as HF PEFT)."""
    base = _base_of(model)
    state = base.state_dict()
    return {original: state[key] for original, key in _original_to_wrapped(base).items()}


def set_base_model_state_dict(model: Any, state_dict: dict[str, torch.Tensor], strict: bool = True) -> Any:
    """Load `state_dict` (original keys, as `get_base_model_state_dict` gives) into the base model inside a
    PeftModel; the adapters are not touched. `strict=True`: a RuntimeError for missing or unexpected keys, as HF
    PEFT. A tensor of another shape is a RuntimeError too, and every refusal comes before anything is written."""
    base = _base_of(model)
    if not isinstance(state_dict, dict):
        raise TypeError(f"state_dict must be a dict of tensors, got {type(state_dict).__name__}")
    mapping = _original_to_wrapped(base)
    unexpected = [k for k in state_dict if k not in mapping]
    missing = [k for k in mapping if k not in state_dict]
    if strict and (missing or unexpected):
        problems = [f"Missing key(s) in state_dict: {missing}"] if missing else []
        problems += [f"Unexpected key(s) in state_dict: {unexpected}"] if unexpected else []
        raise RuntimeError("Error(s) in loading state_dict:\n\t" + "\n\t".join(problems))
    current = base.state_dict()
    not_tensors = [k for k, v in state_dict.items() if k in mapping and not isinstance(v, torch.Tensor)]
    if not_tensors and all(isinstance(current[mapping[k]], torch.Tensor) for k in not_tensors):
        raise TypeError(f"state_dict values must be tensors; not for {', '.join(not_tensors[:5])}")
    wrong = [
        f"{k}: {tuple(v.shape)} (the model has {tuple(current[mapping[k]].shape)})"
        for k, v in state_dict.items()
        if k in mapping and isinstance(v, torch.Tensor) and v.shape != current[mapping[k]].shape
    ]
    if wrong:
        raise RuntimeError(f"Error(s) in loading state_dict: size mismatch for {', '.join(wrong[:5])}")
    base.load_state_dict({mapping[k]: v for k, v in state_dict.items() if k in mapping}, strict=False)
    # torch's `_IncompatibleKeys` (HF PEFT returns a namedtuple of these fields, torch's on one path)
    return incompatible_keys(missing_keys=missing, unexpected_keys=unexpected)


__all__ = ["get_base_model_state_dict", "set_base_model_state_dict"]
