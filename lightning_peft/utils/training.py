"""Small training helpers with HF PEFT's names and behaviour (HF has them in `peft.utils.other`)."""

from __future__ import annotations

import warnings
from typing import Any, Callable, Optional, cast

import torch
from torch import nn


def shift_tokens_right(
    input_ids: torch.Tensor, pad_token_id: Optional[int], decoder_start_token_id: int
) -> torch.Tensor:
    """Decoder inputs from labels, as HF PEFT computes them: every row moved one place to the right, the first place
    `decoder_start_token_id`, and the label padding `-100` replaced by `pad_token_id` (a ValueError when that is
    None). `input_ids` is (batch, sequence, ...); it is not modified."""
    if not isinstance(input_ids, torch.Tensor):
        raise TypeError(f"input_ids must be a tensor of token ids, got {type(input_ids).__name__}")
    if input_ids.dim() < 2:  # HF PEFT fails with an IndexError here; the same type, with a message
        raise IndexError(f"input_ids must be (batch, sequence), got a tensor of shape {tuple(input_ids.shape)}")
    shifted = torch.empty_like(input_ids)
    shifted[:, 0] = decoder_start_token_id
    shifted[:, 1:] = input_ids[:, :-1]
    if pad_token_id is None:
        raise ValueError("self.model.config.pad_token_id has to be defined.")  # HF PEFT's message
    return shifted.masked_fill_(shifted == -100, pad_token_id)


def cast_mixed_precision_params(model: nn.Module, dtype: torch.dtype) -> None:
    """For mixed-precision training, as HF PEFT does: every frozen parameter of `model` cast to `dtype`
    (`torch.float16` or `torch.bfloat16`), every trainable one to float32, in place (the Parameter objects stay, so
    an optimizer made before keeps them).

    Parameters that are not floating point (quantized weights) are left as they are: casting them would turn their
    stored integers into wrong weights. A `dtype` that is not a floating-point dtype is refused before any change."""
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype must be a torch.dtype such as torch.bfloat16, got {dtype!r}")
    if not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating-point dtype such as torch.float16 or torch.bfloat16, got {dtype}")
    for param in model.parameters():
        if param.is_floating_point():
            param.data = param.data.to(torch.float32 if param.requires_grad else dtype)


# quantization methods whose parameters HF PEFT leaves in their dtype (their half-precision tensors are quantized data)
_KEEP_DTYPE_METHODS = ("gptq", "aqlm", "eetq", "torchao", "hqq")


def _keeps_dtype(model: nn.Module) -> bool:
    """A GPTQ / AQLM / EETQ / HQQ / torchao model: its half-precision tensors are quantized data (not cast)."""
    return getattr(model, "quantization_method", None) in _KEEP_DTYPE_METHODS or bool(
        getattr(model, "hqq_quantized", False)
    )


def _loaded_in_kbit(model: nn.Module) -> bool:
    """As HF PEFT: transformers' `is_loaded_in_8bit` / `is_loaded_in_4bit`, or a GPTQ / AQLM / EETQ / HQQ / torchao
    `quantization_method`; here also a model holding bitsandbytes
    layers (e.g. quantized by `lightning_peft.quantization.quantize_base_linears`, which sets neither flag)."""
    if getattr(model, "is_loaded_in_8bit", False) or getattr(model, "is_loaded_in_4bit", False):
        return True
    if _keeps_dtype(model):
        return True  # HF also checkpoints GPTQ / AQLM / EETQ / HQQ / torchao models
    from ..quantization import is_quantized_linear  # imports the tuners: not at module level

    return any(is_quantized_linear(m) for m in model.modules())


def prepare_model_for_kbit_training(
    model: nn.Module,
    use_gradient_checkpointing: bool = True,
    gradient_checkpointing_kwargs: Optional[dict[str, Any]] = None,
    auto_clear_cache: bool = True,
) -> nn.Module:
    """Prepare a quantized (8-bit / 4-bit) base model for adapter training, as HF PEFT does; returns `model`,
    changed in place:

    1. every parameter frozen;
    2. every float16 / bfloat16 parameter that is not a bitsandbytes 4-bit weight cast to float32 (layer norms,
       embeddings, the output head: the quantized layers keep their data), unless the model was quantized by
       GPTQ / AQLM / EETQ / HQQ / torchao (`quantization_method`), whose half-precision tensors are quantized data;
    3. for a quantized model with `use_gradient_checkpointing`: the input embeddings' output made to require grad
       (unless `gradient_checkpointing_kwargs` sets `use_reentrant=False`, which needs no such help), then
       `model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=...)`.

    `auto_clear_cache` empties the CUDA cache after the casts (as HF). Bad arguments are refused before any change.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"prepare_model_for_kbit_training: model must be a torch nn.Module, got {type(model).__name__}")
    if not isinstance(use_gradient_checkpointing, bool):
        raise TypeError(
            f"prepare_model_for_kbit_training: use_gradient_checkpointing must be True or False, got "
            f"{use_gradient_checkpointing!r}"
        )
    if gradient_checkpointing_kwargs is None:
        gradient_checkpointing_kwargs = {}
    if not isinstance(gradient_checkpointing_kwargs, dict):
        raise TypeError(
            "prepare_model_for_kbit_training: gradient_checkpointing_kwargs must be a dict of keyword arguments for "
            "torch.utils.checkpoint.checkpoint (e.g. {'use_reentrant': False}), got "
            f"{gradient_checkpointing_kwargs!r}"
        )
    checkpointing = use_gradient_checkpointing and _loaded_in_kbit(model)
    enable = getattr(model, "gradient_checkpointing_enable", None)
    if checkpointing and not callable(enable):
        raise AttributeError(
            f"prepare_model_for_kbit_training: {type(model).__name__} has no gradient_checkpointing_enable() (a "
            "transformers model has it); pass use_gradient_checkpointing=False, or enable checkpointing yourself"
        )
    for param in model.parameters():
        param.requires_grad = False
    from ..quantization import keep_plain_layouts

    keep_plain_layouts(model)  # bitsandbytes' one-way CPU repacking of 4-bit layers breaks training (not in HF)
    if not _keeps_dtype(model):
        for param in model.parameters():
            if param.dtype in (torch.float16, torch.bfloat16) and type(param).__name__ != "Params4bit":
                param.data = param.data.to(torch.float32)
        if auto_clear_cache and torch.cuda.is_available():
            torch.cuda.empty_cache()
    if checkpointing:
        if gradient_checkpointing_kwargs.get("use_reentrant", True):
            if callable(getattr(model, "enable_input_require_grads", None)):
                cast(Any, model).enable_input_require_grads()
            else:
                cast(Any, model).get_input_embeddings().register_forward_hook(_make_output_require_grad)
        import inspect

        enable = cast(Callable[..., Any], enable)
        if "gradient_checkpointing_kwargs" in inspect.signature(enable).parameters:
            enable(gradient_checkpointing_kwargs=gradient_checkpointing_kwargs)
        else:
            if gradient_checkpointing_kwargs:
                warnings.warn(
                    "gradient_checkpointing_kwargs is not supported in this version of transformers. The passed "
                    "kwargs will be ignored. if you want to use that feature, please upgrade to the latest version "
                    "of transformers.",
                    FutureWarning,
                )
            enable()
    return model


def _make_output_require_grad(module: nn.Module, inputs: Any, output: torch.Tensor) -> None:
    output.requires_grad_(True)
