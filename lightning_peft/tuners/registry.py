"""The tuners lightning_peft implements, by peft type.

A tuner is one folder under `tuners/` whose `__init__.py` calls `register_tuner(...)` with its config
class, its model class and the layers it has for quantized bases. Every folder is imported on the first
lookup, so adding a tuner touches nothing outside its folder (and its app YAML). This module imports
nothing else of lightning_peft, so configs can look tuners up without an import cycle.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class TunerSpec:
    """What the rest of the package may know about a tuner."""

    config_class: type[Any]  # a PeftConfig subclass (not imported here: no import cycle)
    model_class: type
    # quantization kind ("int8", "int4") -> the tuner layer wrapping such a base layer; a tuner that never wraps base
    # layers (prompt learning) runs over any quantized base and needs none
    quantized_layers: Mapping[str, type[Any]] = field(default_factory=dict)
    # whether its adapters can be merged into quantized base layers (dequantize, add, requantize)
    merges_into_quantized: bool = False

    @property
    def peft_type(self) -> str:
        return str(self.config_class.PEFT_TYPE)

    @property
    def can_merge(self) -> bool:
        """Whether the adapter has weights to fold into the base model (`merge_and_unload`)."""
        return bool(getattr(self.model_class, "can_merge", False))

    @property
    def wraps_base_layers(self) -> bool:
        return bool(getattr(self.model_class, "wraps_base_layers", True))

    def runs_over(self, quantization: str) -> bool:
        return not self.wraps_base_layers or quantization in self.quantized_layers


_TUNERS: dict[str, TunerSpec] = {}
_discovered = False


def register_tuner(
    config_class: type,
    model_class: type,
    quantized_layers: Mapping[str, type] | None = None,
    merges_into_quantized: bool = False,
) -> TunerSpec:
    """Called once by each tuner folder; the config class says which peft type it is (`PEFT_TYPE`)."""
    if not isinstance(config_class, type) or getattr(config_class, "PEFT_TYPE", None) is None:
        raise TypeError(f"register_tuner: {config_class!r} is not a tuner config class (one with PEFT_TYPE set)")
    missing = [
        name
        for name in (
            "add_adapter",
            "set_adapter",
            "delete_adapter",
            "peft_state_dict",
            "load_peft_state_dict",
            "peft_model_modules",
        )
        if not callable(getattr(model_class, name, None))
    ]
    if not isinstance(model_class, type) or missing:
        raise TypeError(f"register_tuner: {model_class!r} is not a tuner model class (it lacks {', '.join(missing)})")
    bad_layers = [
        kind for kind, layer in (quantized_layers or {}).items() if not callable(getattr(layer, "accepts", None))
    ]
    if bad_layers:
        raise TypeError(f"register_tuner: the quantized layers for {bad_layers} need an `accepts(module)` check")
    spec = TunerSpec(config_class, model_class, dict(quantized_layers or {}), merges_into_quantized)
    known = _TUNERS.get(spec.peft_type)
    if known is not None and known != spec:
        raise ValueError(
            f"peft_type {spec.peft_type} is registered twice ({known.config_class.__name__} and "
            f"{config_class.__name__})"
        )
    _TUNERS[spec.peft_type] = spec
    return spec


def _discover() -> None:
    """Import every tuner folder (each registers itself)."""
    global _discovered
    if _discovered:
        return
    from lightning_peft import tuners

    for info in pkgutil.iter_modules(tuners.__path__):
        if info.ispkg:
            importlib.import_module(f"{tuners.__name__}.{info.name}")
    _discovered = True


def _key(peft_type: Any) -> str:
    return str(getattr(peft_type, "value", peft_type)).upper()


def find_tuner(peft_type: Any) -> TunerSpec | None:
    """The spec of a tuner lightning_peft implements, or None."""
    _discover()
    return _TUNERS.get(_key(peft_type))


def get_tuner(peft_type: Any) -> TunerSpec:
    spec = find_tuner(peft_type)
    if spec is None:
        from ..utils.error import UnknownNameError  # a ValueError, and a KeyError as in HF PEFT (utils imports tuners)

        raise UnknownNameError(f"unknown peft_type {peft_type!r}; lightning_peft knows: {', '.join(sorted(_TUNERS))}")
    return spec


def get_config_class(peft_type: Any) -> type:
    return get_tuner(peft_type).config_class


def get_model_class(peft_type: Any) -> type:
    return get_tuner(peft_type).model_class


def registered_tuners() -> dict[str, TunerSpec]:
    """peft type -> spec, for every tuner lightning_peft implements."""
    _discover()
    return dict(_TUNERS)
