"""`TunerConfig`: the type of `PEFTCallback(config=...)` and of a `PEFTMixin` module's `peft_config` argument.

LightningCLI (jsonargparse) reads it from the signature: a YAML / command-line value is checked against the tuner
configs' fields (a misspelled field is named in the error) and built into the config object, e.g.

    trainer:
      callbacks:
        - class_path: lightning_peft.lightning.PEFTCallback
          init_args:
            config:
              class_path: lightning_peft.LoraConfig
              init_args: {r: 8, target_modules: [c_attn]}

or, without `class_path`, the fields alone (the first tuner config that has all of them is built: LoRA's fields give
a `LoraConfig`). The configs are dataclasses, so jsonargparse takes each listed class itself, not its subclasses: a
tuner registered outside this package is passed in Python (or as a dict with `peft_type`).

In Python the callback and the mixin also take a dict or an OmegaConf `DictConfig` holding `peft_type` or `_target_`
(see `PEFTCallback`); the type checker sees that wider type. The command line does not offer the dict form, so
that a misspelled field is an error there rather than a dict that fails later.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping, Union

from ..config import PeftConfig
from ..tuners.ia3.config import IA3Config
from ..tuners.lora.config import LoraConfig
from ..tuners.p_tuning.config import PromptEncoderConfig
from ..tuners.prefix_tuning.config import PrefixTuningConfig
from ..tuners.prompt_tuning.config import PromptTuningConfig
from ..tuners.trainable_tokens.config import TrainableTokensConfig

if TYPE_CHECKING:
    TunerConfig = Union[PeftConfig, Mapping[str, Any]]
else:  # what jsonargparse sees: one of the tuner configs, built from its fields
    TunerConfig = Union[
        LoraConfig, IA3Config, PromptTuningConfig, PromptEncoderConfig, PrefixTuningConfig, TrainableTokensConfig
    ]

__all__ = ["TunerConfig"]
