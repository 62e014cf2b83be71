"""LoRA over a bitsandbytes quantized base layer (`Linear8bitLt`, `Linear4bit`); bitsandbytes is imported only when
one is built."""

from __future__ import annotations

import warnings
from typing import Any, Callable, ClassVar, Optional, cast

import torch
from torch import nn

from ...quantization import dequantize_weight, is_linear4bit, keep_plain_layout, quantize_weight, quantize_weight_4bit
from ..base import is_linear8bit
from .layer import Linear


class _QuantizedLinear(Linear):
    """LoRA over a bitsandbytes layer: the quantized base runs as is, A and B train in full precision.

    Merging dequantizes the base weight, adds the delta and requantizes with the layer's own settings (one
    warning about rounding per process and kind); `dequantize_base_linears` before merging gives an exact merge
    in the compute dtype instead.
    """

    accepts: Callable[[nn.Module], bool]  # a staticmethod in each subclass
    _bits: ClassVar[str]  # "8-bit" / "4-bit", for the warning
    _warned_rounding = False

    def __init__(self, base_layer: nn.Module, adapter_name: str, **kwargs: Any) -> None:
        kwargs.pop("is_target_conv_1d_layer", None)
        kwargs["fan_in_fan_out"] = False  # bitsandbytes stores (out, in) whatever the layer it replaced
        super().__init__(base_layer, adapter_name, **kwargs)

    def _is_quantized(self) -> bool:
        return type(self).accepts(self.get_base_layer())  # False after dequantize_base_linears: a plain LoRA merge

    def _merged_weight(self, adapter_name: str) -> torch.Tensor:
        if not self._is_quantized():
            return super()._merged_weight(adapter_name)
        return dequantize_weight(self.get_base_layer()) + self.get_delta_weight(adapter_name).float()

    def _quantized(self, weight: torch.Tensor) -> nn.Parameter:
        raise NotImplementedError

    def _requantize(self, weight: torch.Tensor) -> None:
        self.get_base_layer().weight = self._quantized(weight)
        cls = type(self)
        if not cls._warned_rounding:
            cls._warned_rounding = True
            warnings.warn(
                f"merging LoRA into {cls._bits} base layers dequantizes, adds and requantizes the weights: the "
                f"merged model's outputs differ slightly from the unmerged one ({cls._bits} rounding). To export a "
                "merged model without rounding, call lightning_peft.quantization.dequantize_base_linears() "
                "on the model before merging"
            )

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        if not self._is_quantized():
            return super().merge(safe_merge=safe_merge, adapter_names=adapter_names)
        for name in self._adapters_to_merge(adapter_names):
            merged = self._merged_weight(name)
            if safe_merge and not torch.isfinite(merged).all():
                self.check_finite_delta(name)
            self._requantize(merged)
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        if not self._is_quantized():
            return super().unmerge()
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            self._requantize(dequantize_weight(self.get_base_layer()) - self.get_delta_weight(name).float())


class Linear8bitLt(_QuantizedLinear):
    """LoRA over a bitsandbytes `Linear8bitLt`: the int8 base runs as is, A and B train in fp32."""

    accepts = staticmethod(is_linear8bit)  # which base layers this class wraps
    _bits = "8-bit"
    _warned_rounding = False

    def _quantized(self, weight: torch.Tensor) -> nn.Parameter:
        base = self.get_base_layer()
        param = quantize_weight(weight, device=cast(torch.Tensor, base.weight).device)
        if hasattr(base, "state"):  # bitsandbytes caches the weight's statistics in the layer state
            state: Any = base.state  # a bitsandbytes MatmulLtState
            state.CB, state.SCB = None, None
        return param


class Linear4bit(_QuantizedLinear):
    """LoRA over a bitsandbytes `Linear4bit` (QLoRA): the NF4 / FP4 base runs in its compute dtype, A and B train
    in fp32 (a half-precision input is cast to A's dtype for the update, whose result is cast back)."""

    accepts = staticmethod(is_linear4bit)  # which base layers this class wraps
    _bits = "4-bit"
    _warned_rounding = False

    def __init__(self, base_layer: nn.Module, adapter_name: str, **kwargs: Any) -> None:
        keep_plain_layout(base_layer)  # bitsandbytes' CPU repacking breaks training (see keep_plain_layout)
        super().__init__(base_layer, adapter_name, **kwargs)

    def _quantized(self, weight: torch.Tensor) -> nn.Parameter:
        base = self.get_base_layer()
        old = cast(torch.Tensor, base.weight)
        param = quantize_weight_4bit(weight, like=old, device=old.device)
        return param
