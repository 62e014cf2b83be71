"""LoRA+ (Hayou et al., 2024, https://arxiv.org/abs/2402.12354): the same optimizer, with `lora_B` learning
`loraplus_lr_ratio` times faster than `lora_A`. `create_loraplus_optimizer` builds the parameter groups HF PEFT 0.21's
function builds (same order, members, learning rates and weight decays), so a step is HF PEFT's step."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from ..config import short_repr

EIGHT_BIT_OPTIMIZERS = ("Adam8bit", "AdamW8bit", "PagedAdam8bit", "PagedAdamW8bit")  # bitsandbytes' names


def _norm_layers() -> tuple[type, ...]:
    """The layer types whose parameters get no weight decay (transformers' `ALL_LAYERNORM_LAYERS`, as HF PEFT)."""
    try:
        from transformers.pytorch_utils import ALL_LAYERNORM_LAYERS
    except ImportError:  # pragma: no cover - older / newer transformers
        return (nn.LayerNorm,)
    return tuple(ALL_LAYERNORM_LAYERS)


def decay_parameter_names(model: nn.Module) -> set[str]:
    """Names of the parameters that take weight decay: those not inside a layer norm (the model itself aside),
    without "bias" in their name (transformers' `get_parameter_names` minus biases, as HF PEFT uses it)."""
    norms = _norm_layers()
    inside_norm = {name for name, m in model.named_modules(remove_duplicate=False) if name and isinstance(m, norms)}
    names = set()
    for name, _ in model.named_parameters(remove_duplicate=False):
        parts = name.split(".")
        if any(".".join(parts[:i]) in inside_norm for i in range(1, len(parts))) or "bias" in name:
            continue
        names.add(name)
    return names


def _check_rate(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"create_loraplus_optimizer: {name} must be a number > 0, got {short_repr(value)}")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"create_loraplus_optimizer: {name} must be a finite number > 0, got {short_repr(value)}")


def create_loraplus_optimizer(
    model: nn.Module, optimizer_cls: type[torch.optim.Optimizer], *, lr: float, loraplus_lr_ratio: float, **kwargs: Any
) -> torch.optim.Optimizer:
    """An `optimizer_cls` over the trainable parameters of `model` (a PeftModel, or any module holding one, e.g. a
    LightningModule) in HF PEFT's four LoRA+ groups, in this order:

    - A: every 2-D (or larger) parameter that is not a `lora_B` (the `lora_A` weights, a saved head's weight):
      `lr`, weight decay `loraplus_weight_decay`;
    - embedding: the parameters of LoRA embedding layers: `loraplus_lr_embedding` (default 1e-6), the same decay;
    - B: the `lora_B` weights and every 1-D parameter that takes decay: `lr * loraplus_lr_ratio`,
      `loraplus_weight_decay`;
    - B without decay: the `lora_B` / 1-D parameters that take none (biases, layer-norm weights): `lr *
      loraplus_lr_ratio`, weight decay 0.

    `loraplus_weight_decay` (default 0.0) and `loraplus_lr_embedding` are taken out of `kwargs`; the rest (betas,
    eps, ...) go to `optimizer_cls`. For bitsandbytes' 8-bit Adam optimizers, the embeddings' weights are kept in
    32-bit optimizer states, as HF PEFT does. Differs from HF PEFT on purpose: a model without any trainable
    parameter, a learning rate or ratio that is not a finite number > 0, or an `optimizer_cls` that is no
    `torch.optim.Optimizer` class are refused (HF PEFT builds an optimizer that trains nothing, or the wrong way)."""
    from ..tuners.lora.layer import Embedding

    if not (isinstance(optimizer_cls, type) and issubclass(optimizer_cls, torch.optim.Optimizer)):
        raise TypeError(
            "create_loraplus_optimizer: optimizer_cls must be a torch.optim.Optimizer class (e.g. torch.optim.AdamW), "
            f"got {short_repr(optimizer_cls)}"
        )
    _check_rate("lr", lr)
    _check_rate("loraplus_lr_ratio", loraplus_lr_ratio)
    weight_decay = kwargs.pop("loraplus_weight_decay", 0.0)
    lr_embedding = kwargs.pop("loraplus_lr_embedding", 1e-6)
    _check_rate("loraplus_lr_embedding", lr_embedding)
    if isinstance(weight_decay, bool) or not isinstance(weight_decay, (int, float)) or not 0 <= weight_decay < math.inf:
        raise ValueError(  # inf would turn every weight into -inf / nan on the first step
            "create_loraplus_optimizer: loraplus_weight_decay must be a number >= 0 (a finite one), got "
            f"{short_repr(weight_decay)}"
        )
    decay = decay_parameter_names(model)
    modules = dict(model.named_modules())
    groups: dict[str, list[nn.Parameter]] = {"A": [], "embedding": [], "B": [], "B_no_decay": []}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        holder = modules.get(".".join(name.split(".")[:-2]))  # the layer above the ModuleDict / ParameterDict
        if isinstance(holder, Embedding):
            groups["embedding"].append(param)
        elif "lora_B" in name or param.ndim == 1:
            groups["B" if name in decay else "B_no_decay"].append(param)
        else:
            groups["A"].append(param)
    if not any(groups.values()):
        raise ValueError(
            f"create_loraplus_optimizer: no parameter of {type(model).__name__} requires grad, so the optimizer "
            "would train nothing; add the adapter (get_peft_model / PEFTCallback) before building the optimizer"
        )
    kwargs["lr"] = lr
    optimizer = optimizer_cls(
        [
            {"params": groups["A"], "weight_decay": weight_decay, "lr": lr},
            {"params": groups["embedding"], "weight_decay": weight_decay, "lr": lr_embedding},
            {"params": groups["B"], "weight_decay": weight_decay, "lr": lr * loraplus_lr_ratio},
            {"params": groups["B_no_decay"], "weight_decay": 0.0, "lr": lr * loraplus_lr_ratio},
        ],
        **kwargs,
    )
    if optimizer_cls.__name__ in EIGHT_BIT_OPTIMIZERS:
        import bitsandbytes

        manager = bitsandbytes.optim.GlobalOptimManager.get_instance()
        for module in model.modules():
            if isinstance(module, nn.Embedding):
                manager.register_module_override(module, "weight", {"optim_bits": 32})
    return optimizer
