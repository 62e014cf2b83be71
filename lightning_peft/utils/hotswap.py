"""HF PEFT's import path `peft.utils.hotswap`: the LoRA hot-swap functions, which live in
`lightning_peft.tuners.lora.hotswap`."""

from ..tuners.lora.hotswap import (
    CONFIG_KEYS_TO_CHECK,
    check_hotswap_configs_compatible,
    hotswap_adapter,
    hotswap_adapter_from_state_dict,
    prepare_model_for_compiled_hotswap,
)

__all__ = [
    "CONFIG_KEYS_TO_CHECK",
    "check_hotswap_configs_compatible",
    "hotswap_adapter",
    "hotswap_adapter_from_state_dict",
    "prepare_model_for_compiled_hotswap",
]
