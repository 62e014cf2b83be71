"""`IA3Config`: HF PEFT 0.21's (IA)^3 settings, read and written as its adapter_config.json, with the check that
every feedforward module is also a target."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Optional, Union

from ...config import PeftConfig, PeftType, check_exclude_modules, check_regex, check_target_modules, short_repr


def check_feedforward_subset(config: "IA3Config") -> None:
    """Every feedforward module must also be a target; otherwise it would silently get no vector. A feedforward
    name may also end a target's name ("mlp.c_proj" of "transformer.h.0.mlp.c_proj"): "all-linear" targets become
    full names while the family's feedforward default stays short, in HF PEFT's saved configs as here."""
    ff, targets = config.feedforward_modules, config.target_modules
    if ff is None or targets is None or isinstance(ff, str) or isinstance(targets, str):
        return
    outside = sorted(f for f in set(ff) if f not in targets and not any(t.endswith("." + f) for t in targets))
    if outside:
        raise ValueError(
            f"feedforward_modules must be a subset of target_modules; {outside} are not in "
            f"target_modules={sorted(targets)}. Add them to target_modules or drop them from feedforward_modules"
        )


@dataclass
class IA3Config(PeftConfig):
    """(IA)^3: a learned vector scales a target's output, or its input for feedforward targets."""

    PEFT_TYPE: ClassVar[PeftType] = PeftType.IA3

    target_modules: Optional[Union[list[str], set[str], str]] = None  # a list becomes a set
    feedforward_modules: Optional[Union[list[str], set[str], str]] = None  # a list becomes a set
    fan_in_fan_out: bool = False
    modules_to_save: Optional[list[str]] = None
    init_ia3_weights: bool = True
    exclude_modules: Optional[Union[list[str], set[str], str]] = None  # a list becomes a set

    def __post_init__(self) -> None:
        super().__post_init__()
        check_target_modules(self)
        check_exclude_modules(self)
        ff = self.feedforward_modules
        if isinstance(ff, str):
            check_regex("feedforward_modules", ff)
        elif ff is not None:
            if not isinstance(ff, (list, tuple, set)) or not all(isinstance(t, str) and t for t in ff):
                raise TypeError(
                    f"feedforward_modules must be a list of module names or a regex string, got {short_repr(ff)}"
                )
            self.feedforward_modules = set(ff)
        if not isinstance(self.fan_in_fan_out, bool):
            raise TypeError(f"fan_in_fan_out must be True or False, got {short_repr(self.fan_in_fan_out)}")
        if not isinstance(self.init_ia3_weights, bool):
            raise TypeError(f"init_ia3_weights must be True or False, got {short_repr(self.init_ia3_weights)}")
        check_feedforward_subset(self)
