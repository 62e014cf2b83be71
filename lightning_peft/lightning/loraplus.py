"""LoRA+ from a LightningModule's `configure_optimizers`:

    class MyModule(L.LightningModule):          # with PEFTCallback(LoraConfig(...)), or PEFTMixin
        def configure_optimizers(self):
            return loraplus_optimizer(self, torch.optim.AdamW, lr=2e-4, loraplus_lr_ratio=16)

Lightning calls `configure_optimizers` after `setup` and `configure_model`, so the adapter of a `PEFTCallback`
(injected at setup, or right after `configure_model` when the module builds its model there) or of a `PEFTMixin`
(injected in `configure_model`) is in the module by then, and its parameters are the ones grouped.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..optimizers.loraplus import create_loraplus_optimizer


def loraplus_optimizer(
    pl_module: nn.Module,
    optimizer_cls: type[torch.optim.Optimizer] = torch.optim.AdamW,
    *,
    lr: float,
    loraplus_lr_ratio: float,
    **kwargs: Any,
) -> torch.optim.Optimizer:
    """`create_loraplus_optimizer` over every trainable parameter of `pl_module` (the adapter's, and whatever else
    the module trains, e.g. a head: in HF PEFT's groups), for `configure_optimizers`. Refused (ValueError) when no
    trainable LoRA parameter is there yet: the adapter must be injected first (PEFTCallback / PEFTMixin do that
    before `configure_optimizers`; a module that builds its optimizer earlier, e.g. in `__init__`, cannot use it)."""
    if not any(p.requires_grad and ".lora_" in f".{n}" for n, p in pl_module.named_parameters()):
        raise ValueError(
            f"loraplus_optimizer: {type(pl_module).__name__} has no trainable LoRA parameter (lora_A / lora_B); "
            "LoRA+ gives lora_B a larger learning rate, so it needs a LoRA adapter: call it from "
            "configure_optimizers of a module whose LoRA adapter is in (PEFTCallback(LoraConfig(...)) or "
            "PEFTMixin inject it before configure_optimizers), with the adapter trainable"
        )
    return create_loraplus_optimizer(pl_module, optimizer_cls, lr=lr, loraplus_lr_ratio=loraplus_lr_ratio, **kwargs)
