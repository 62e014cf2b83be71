"""LoRA over a bitsandbytes 8-bit base layer (`Linear8bitLt`); bitsandbytes is imported only when one is built."""

from __future__ import annotations

import warnings
from typing import Any, Optional, cast

import torch
from torch import nn

from ...quantization import dequantize_weight, quantize_weight
from ..base import is_linear8bit
from .layer import Linear


class Linear8bitLt(Linear):
    """LoRA over a bitsandbytes `Linear8bitLt`: the int8 base runs as is, A and B train in fp32.

    Merging dequantizes the base weight, adds the delta and requantizes (one warning about rounding);
    `dequantize_base_linears` before merging gives an exact merge in the compute dtype instead.
    """

    accepts = staticmethod(is_linear8bit)  # which base layers this class wraps
    _warned_rounding = False

    def __init__(self, base_layer: nn.Module, adapter_name: str, **kwargs: Any) -> None:
        kwargs.pop("is_target_conv_1d_layer", None)
        kwargs["fan_in_fan_out"] = False  # bitsandbytes stores (out, in) whatever the layer it replaced
        super().__init__(base_layer, adapter_name, **kwargs)

    def _is_int8(self) -> bool:
        return is_linear8bit(self.get_base_layer())  # False after dequantize_base_linears: a plain LoRA merge

    def _merged_weight(self, adapter_name: str) -> torch.Tensor:
        if not self._is_int8():
            return super()._merged_weight(adapter_name)
        return dequantize_weight(self.get_base_layer()) + self.get_delta_weight(adapter_name).float()

    def _requantize(self, weight: torch.Tensor) -> None:
        base = self.get_base_layer()
        base.weight = quantize_weight(weight, device=cast(torch.Tensor, base.weight).device)
        if hasattr(base, "state"):  # bitsandbytes caches the weight's statistics in the layer state
            state: Any = base.state  # a bitsandbytes MatmulLtState
            state.CB, state.SCB = None, None
        if not Linear8bitLt._warned_rounding:
            Linear8bitLt._warned_rounding = True
            warnings.warn(
                "merging LoRA into 8-bit base layers dequantizes, adds and requantizes the weights: the "
                "merged model's outputs differ slightly from the unmerged one (int8 rounding). To export a "
                "merged model without rounding, call lightning_peft.quantization.dequantize_base_linears() "
                "on the model before merging"
            )

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        if not self._is_int8():
            return super().merge(safe_merge=safe_merge, adapter_names=adapter_names)
        for name in self._adapters_to_merge(adapter_names):
            merged = self._merged_weight(name)
            if safe_merge and not torch.isfinite(merged).all():
                self.check_finite_delta(name)
            self._requantize(merged)
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        if not self._is_int8():
            return super().unmerge()
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            self._requantize(dequantize_weight(self.get_base_layer()) - self.get_delta_weight(name).float())
