"""Small training helpers with HF PEFT's names and behaviour (HF has them in `peft.utils.other`)."""

from __future__ import annotations

from typing import Optional

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
