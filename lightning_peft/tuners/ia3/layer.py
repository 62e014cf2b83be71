"""(IA)^3 layers: a learned vector per adapter scaling a base layer's output (or, for feedforward targets, its
input)."""

from __future__ import annotations

import warnings
from typing import Any, Optional, cast

import torch
from torch import nn

from ..base import BaseTunerLayer, adapter_dtype

# Added to the vector before dividing in unmerge, as HF PEFT does, so a zero entry cannot produce inf.
UNMERGE_EPS = 1e-8


class IA3Layer(BaseTunerLayer):
    adapter_layer_names = ("ia3_l",)

    ia3_l: nn.ParameterDict
    is_feedforward: bool
    in_features: int
    out_features: int
    fan_in_fan_out: bool

    def _init_ia3_layer(self, base_layer: nn.Module, is_feedforward: bool, in_features: int, out_features: int) -> None:
        self._init_tuner_layer(base_layer)
        self.ia3_l = nn.ParameterDict()
        self.is_feedforward = is_feedforward
        self.in_features = in_features
        self.out_features = out_features

    def _add_first_adapter(self, adapter_name: str, init_ia3_weights: bool, fan_in_fan_out: bool = False) -> None:
        self.fan_in_fan_out = fan_in_fan_out
        self._active_adapters = [adapter_name]
        self.update_layer(adapter_name, init_ia3_weights)

    def _vector_shape(self) -> tuple[int, ...]:
        return (1, self.in_features) if self.is_feedforward else (self.out_features, 1)

    def update_layer(self, adapter_name: str, init_ia3_weights: bool = True) -> None:
        vector = torch.randn(self._vector_shape())  # random only when init_ia3_weights=False (tests)
        if init_ia3_weights:
            vector = torch.ones_like(vector)
        weight = cast(torch.Tensor, self.get_base_layer().weight)
        self.ia3_l[adapter_name] = nn.Parameter(vector.to(device=weight.device, dtype=adapter_dtype(weight)))
        self.set_adapter(self.active_adapters or [adapter_name])

    def _scaling(self) -> Optional[torch.Tensor]:
        """The product of the active adapters' vectors, or None when no active adapter lives here."""
        scaling = None
        for name in self.active_adapters:
            if name in self.ia3_l:
                scaling = self.ia3_l[name] if scaling is None else scaling * self.ia3_l[name]
        return scaling

    # ---- merge --------------------------------------------------------------------------------
    def _weight_factor(self, adapter_name: str) -> torch.Tensor:
        raise NotImplementedError

    def merged_tensors(self, adapter_name: str) -> dict[str, torch.Tensor]:
        base = self.get_base_layer()
        merged = {"weight": cast(torch.Tensor, base.weight).data * self._weight_factor(adapter_name)}
        if not self.is_feedforward and getattr(base, "bias", None) is not None:
            bias = cast(torch.Tensor, base.bias)
            merged["bias"] = bias.data * self.ia3_l[adapter_name].data.reshape(bias.shape)
        return merged

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        for name in self._adapters_to_merge(adapter_names):
            if safe_merge:
                self.check_finite_delta(name)
            base = self.get_base_layer()
            for attr, value in self.merged_tensors(name).items():
                getattr(base, attr).data = value.to(getattr(base, attr).dtype)
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        if not self.merged or self.retie_base_weight():  # retie: the tied weight back as it was, exactly
            return
        warnings.warn("unmerging (IA)^3 divides the weights by the learned vector; the result can be inexact")
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            base = self.get_base_layer()
            factor = self._weight_factor(name) + UNMERGE_EPS
            weight = cast(torch.Tensor, base.weight)
            weight.data = (weight.data / factor).to(weight.dtype)
            if not self.is_feedforward and getattr(base, "bias", None) is not None:
                bias = cast(torch.Tensor, base.bias)
                scale = self.ia3_l[name].data.reshape(bias.shape) + UNMERGE_EPS
                bias.data = (bias.data / scale).to(bias.dtype)


class Linear(nn.Module, IA3Layer):
    """(IA)^3 over `nn.Linear` or transformers' `Conv1D` (`fan_in_fan_out=True`, weight stored (in, out))."""

    def __init__(
        self,
        base_layer: nn.Module,
        adapter_name: str,
        is_feedforward: bool = False,
        fan_in_fan_out: bool = False,
        is_target_conv_1d_layer: bool = False,
        init_ia3_weights: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        if hasattr(base_layer, "in_features") and not fan_in_fan_out:
            in_features, out_features = cast(int, base_layer.in_features), cast(int, base_layer.out_features)
        else:
            rows, cols = cast(torch.Tensor, base_layer.weight).shape
            in_features, out_features = (rows, cols) if fan_in_fan_out else (cols, rows)
        self._init_ia3_layer(base_layer, is_feedforward, in_features, out_features)
        self.is_target_conv_1d_layer = is_target_conv_1d_layer
        self._add_first_adapter(adapter_name, init_ia3_weights, fan_in_fan_out)

    def _weight_factor(self, adapter_name: str) -> torch.Tensor:
        # (out, 1) scales weight rows, (1, in) columns; a (in, out) Conv1D weight needs the transpose
        vector = self.ia3_l[adapter_name].data
        return vector.T if self.fan_in_fan_out else vector

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        scaling = self._scaling() if self._check_forward() else None
        if scaling is None:
            return self.base_layer(x, *args, **kwargs)
        previous_dtype = x.dtype
        scaling = scaling.flatten()
        if self.is_feedforward:
            return self.base_layer((x.to(scaling.dtype) * scaling).to(previous_dtype), *args, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        return (result * scaling).to(result.dtype)


class SizedByBaseLayer(nn.Module, IA3Layer):
    """(IA)^3 over a base layer whose input / output sizes it reads from the layer itself (`_sizes`)."""

    def __init__(
        self,
        base_layer: nn.Module,
        adapter_name: str,
        is_feedforward: bool = False,
        init_ia3_weights: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        self._init_ia3_layer(base_layer, is_feedforward, *self._sizes(base_layer))
        self._add_first_adapter(adapter_name, init_ia3_weights)

    def _sizes(self, base_layer: Any) -> tuple[int, int]:
        raise NotImplementedError


class Conv2d(SizedByBaseLayer):
    """(IA)^3 over `nn.Conv2d`; the vector is (1, channels, 1, 1) as in HF PEFT."""

    def _sizes(self, base_layer: nn.Conv2d) -> tuple[int, int]:
        return base_layer.in_channels, base_layer.out_channels

    def _vector_shape(self) -> tuple[int, ...]:
        return (1, self.in_features if self.is_feedforward else self.out_features, 1, 1)

    def _weight_factor(self, adapter_name: str) -> torch.Tensor:
        vector = self.ia3_l[adapter_name].data
        if not self.is_feedforward:
            return vector.transpose(0, 1)  # (out, 1, 1, 1): one factor per output channel
        base = cast(nn.Conv2d, self.get_base_layer())
        if base.groups == 1:
            return vector
        # grouped conv: weight is (out, in/groups, kh, kw); give each group's filters its own input channels
        in_per_group, out_per_group = base.in_channels // base.groups, base.out_channels // base.groups
        grouped = vector.reshape(base.groups, 1, in_per_group, 1, 1).expand(
            base.groups, out_per_group, in_per_group, 1, 1
        )
        return grouped.reshape(base.out_channels, in_per_group, 1, 1)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        scaling = self._scaling() if self._check_forward() else None
        if scaling is None:
            return self.base_layer(x, *args, **kwargs)
        previous_dtype = x.dtype
        if self.is_feedforward:
            weight_dtype = cast(torch.Tensor, self.get_base_layer().weight).dtype
            result = self.base_layer((x.to(scaling.dtype) * scaling).to(weight_dtype), *args, **kwargs)
        else:
            result = self.base_layer(x, *args, **kwargs).to(scaling.dtype) * scaling
        return result.to(previous_dtype)
