"""(IA)^3 over a bitsandbytes quantized base layer (`Linear8bitLt`, `Linear4bit`)."""

from __future__ import annotations

from typing import Any, Optional, cast

import torch
from torch import nn

from ...quantization import is_linear4bit, keep_plain_layout
from ..base import is_linear8bit
from .layer import SizedByBaseLayer


class Linear8bitLt(SizedByBaseLayer):
    """(IA)^3 over a bitsandbytes `Linear8bitLt`; runs and trains, but cannot be merged into the int8 weight."""

    accepts = staticmethod(is_linear8bit)  # which base layers this class wraps

    def _sizes(self, base_layer: Any) -> tuple[int, int]:
        return base_layer.in_features, base_layer.out_features

    def update_layer(self, adapter_name: str, init_ia3_weights: bool = True) -> None:
        vector = torch.ones(self._vector_shape()) if init_ia3_weights else torch.randn(self._vector_shape())
        weight = cast(torch.Tensor, self.get_base_layer().weight)
        self.ia3_l[adapter_name] = nn.Parameter(vector.to(weight.device))  # fp32 over int8
        self.set_adapter(self.active_adapters or [adapter_name])

    merge_refusal = (
        "cannot merge IA3 adapters into bitsandbytes 8-bit layers: their int8 weights cannot hold the "
        "scaled values. Use the adapter unmerged, call unload(), or load the base model in full precision "
        "to merge"
    )

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        raise ValueError(self.merge_refusal)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        scaling = None if self.disable_adapters else self._scaling()
        if scaling is None:
            return self.base_layer(x, *args, **kwargs)
        scaling = scaling.flatten()
        previous_dtype = x.dtype
        if self.is_feedforward:
            result = self.base_layer(x.to(scaling.dtype) * scaling, *args, **kwargs)
        else:
            result = self.base_layer(x, *args, **kwargs) * scaling
        return result.to(previous_dtype)


class Linear4bit(Linear8bitLt):
    """(IA)^3 over a bitsandbytes `Linear4bit` (NF4 / FP4); runs and trains, but cannot be merged into the 4-bit
    weight (as HF PEFT, which refuses to merge IA3 on a 4-bit model)."""

    accepts = staticmethod(is_linear4bit)  # which base layers this class wraps

    def __init__(self, base_layer: nn.Module, *args: Any, **kwargs: Any) -> None:
        keep_plain_layout(base_layer)  # bitsandbytes' CPU repacking breaks training (see keep_plain_layout)
        super().__init__(base_layer, *args, **kwargs)

    merge_refusal = (
        "cannot merge IA3 adapters into bitsandbytes 4-bit layers: their 4-bit weights cannot hold the "
        "scaled values. Use the adapter unmerged, call unload(), or load the base model in full precision "
        "to merge"
    )
