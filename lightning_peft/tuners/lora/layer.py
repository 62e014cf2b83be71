"""LoRA layers: a wrapper per base layer type, all sharing `LoraLayer`'s bookkeeping and merge logic."""

from __future__ import annotations

import math
import operator
from typing import Any, Optional, cast

import torch
import torch.nn.functional as F
from torch import nn

from ..._compat import has_global_module_hooks, has_module_hooks, own_parameters
from ..base import BaseTunerLayer, adapter_dtype
from ..mixed_batch import MERGED_REFUSAL, MixedBatch, add_rows, check_batch_size, checked_names
from . import dora
from .fused import _lora_linear, _lora_linear_no_grad, _LoraLinearFunction
from .init import init_from_base, init_kind


def transpose(weight: torch.Tensor, fan_in_fan_out: bool) -> torch.Tensor:
    return weight.T if fan_in_fan_out else weight


_CONV1D: Optional[type] = None


def _conv1d_class() -> type:
    """transformers' Conv1D, looked up once: the fused path checks exact types on every forward."""
    global _CONV1D
    if _CONV1D is None:
        from transformers.pytorch_utils import Conv1D

        _CONV1D = Conv1D
    return _CONV1D


def _variant(kwargs: dict) -> tuple[bool, bool]:
    """(use_rslora, use_dora) from a layer constructor's keyword arguments (HF PEFT passes them there too)."""
    return bool(kwargs.get("use_rslora", False)), bool(kwargs.get("use_dora", False))


class LoraLayer(BaseTunerLayer):
    adapter_layer_names = ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector")
    other_param_names = ("r", "lora_alpha", "scaling", "lora_dropout", "use_rslora", "use_dora")

    in_features: int
    out_features: int
    fan_in_fan_out: bool
    r: dict[str, int]
    lora_alpha: dict[str, float]
    scaling: dict[str, float]
    lora_dropout: nn.ModuleDict
    lora_A: nn.ModuleDict  # adapter name -> nn.Linear / nn.Conv2d
    lora_B: nn.ModuleDict
    lora_embedding_A: nn.ParameterDict
    lora_embedding_B: nn.ParameterDict
    # set by the tuner for one call with `adapter_names=` (a mixed-adapter batch), None otherwise
    _mixed_batch: Optional[MixedBatch] = None

    def _init_lora_layer(self, base_layer: nn.Module, in_features: int, out_features: int) -> None:
        self._init_tuner_layer(base_layer)
        self.in_features = in_features
        self.out_features = out_features
        self.r = {}
        self.lora_alpha = {}
        self.scaling = {}
        self.lora_dropout = nn.ModuleDict()
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_embedding_A = nn.ParameterDict()
        self.lora_embedding_B = nn.ParameterDict()
        self.use_rslora: dict[str, bool] = {}  # scaling lora_alpha / sqrt(r)
        self.use_dora: dict[str, bool] = {}
        self.lora_magnitude_vector = nn.ModuleDict()  # DoRA adapters' magnitudes (dora.py)

    repr_prefix = "lora."  # HF PEFT's LoRA layers print as lora.Linear(...)

    def lora_repr(self) -> str:
        return self.repr_prefix + nn.Module.__repr__(self)  # type: ignore[arg-type]  # mixed into nn.Module subclasses

    def _add_first_adapter(self, adapter_name: str, fan_in_fan_out: bool, *args: Any, **kwargs: Any) -> None:
        """The constructor's adapter: `args` / `kwargs` are those of `update_layer` after the name."""
        self.fan_in_fan_out = fan_in_fan_out
        self._active_adapters = [adapter_name]
        self.update_layer(adapter_name, *args, **kwargs)

    def update_layer(
        self,
        adapter_name: str,
        r: int,
        lora_alpha: float,
        lora_dropout: float,
        init_lora_weights: bool | str,
        use_rslora: bool = False,
        use_dora: bool = False,
    ) -> None:
        # every refusal of the arguments comes before the first change of state
        try:
            operator.index(r)
        except TypeError:
            raise TypeError(f"r must be a positive integer, got {r!r} ({type(r).__name__})") from None
        if r <= 0:
            raise ValueError(f"r must be a positive integer, got {r}")
        if use_dora:
            dora.check_dora_base(self)
        dropout = nn.Dropout(p=lora_dropout) if lora_dropout > 0.0 else nn.Identity()
        self._set_adapter_settings(adapter_name, r, lora_alpha, use_rslora, use_dora)
        if adapter_name in self.lora_magnitude_vector:
            del self.lora_magnitude_vector[adapter_name]
        self.lora_dropout[adapter_name] = dropout
        self._create_adapter_weights(adapter_name, r)
        self.reset_lora_parameters(adapter_name, init_lora_weights)
        weight = self._adapted_weight()
        for attr in self.adapter_layer_names:
            holder = getattr(self, attr)
            if adapter_name in holder:
                holder[adapter_name] = holder[adapter_name].to(device=weight.device, dtype=adapter_dtype(weight))
        if use_dora:
            dora.add_magnitude(self, adapter_name)
        self.set_adapter(self.active_adapters or [adapter_name])

    def _set_adapter_settings(
        self, adapter_name: str, r: int, lora_alpha: float, use_rslora: bool, use_dora: bool
    ) -> None:
        """`adapter_name`'s rank, alpha, variant flags and scaling (lora_alpha / r; rsLoRA: lora_alpha / sqrt(r))."""
        scaling = lora_alpha / (math.sqrt(r) if use_rslora else r)  # first: a bad lora_alpha changes nothing
        self.r[adapter_name] = r
        self.lora_alpha[adapter_name] = lora_alpha
        self.scaling[adapter_name] = scaling
        self.use_rslora[adapter_name], self.use_dora[adapter_name] = use_rslora, use_dora

    def _adapted_weight(self) -> torch.Tensor:
        """The weight the adapters follow in device and dtype (`adapter_dtype`)."""
        return cast(torch.Tensor, self.get_base_layer().weight)

    def _create_adapter_weights(self, adapter_name: str, r: int) -> None:
        self.lora_A[adapter_name] = nn.Linear(self.in_features, r, bias=False)
        self.lora_B[adapter_name] = nn.Linear(r, self.out_features, bias=False)

    def reset_lora_parameters(self, adapter_name: str, init_lora_weights: bool | str) -> None:
        if init_lora_weights is False:
            return
        if init_kind(init_lora_weights) is not None and adapter_name in self.lora_A:  # PiSSA / OLoRA / LoftQ
            return init_from_base(self, adapter_name, cast(str, init_lora_weights))
        if adapter_name in self.lora_A:
            weight_A = cast(torch.Tensor, self.lora_A[adapter_name].weight)
            if init_lora_weights is True:
                nn.init.kaiming_uniform_(weight_A, a=math.sqrt(5))
            else:  # "gaussian"
                nn.init.normal_(weight_A, std=1 / self.r[adapter_name])
            nn.init.zeros_(cast(torch.Tensor, self.lora_B[adapter_name].weight))
        if adapter_name in self.lora_embedding_A:
            nn.init.zeros_(self.lora_embedding_A[adapter_name])
            nn.init.normal_(self.lora_embedding_B[adapter_name])

    # ---- merge ------------------------------------------------------------------------------
    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        raise NotImplementedError

    def _merged_weight(self, adapter_name: str) -> torch.Tensor:
        if adapter_name in self.lora_magnitude_vector:
            return dora.merged_weight(self, adapter_name)[0]
        weight = cast(torch.Tensor, self.get_base_layer().weight)
        return weight.data + self.get_delta_weight(adapter_name).to(weight.dtype)

    def merged_tensors(self, adapter_name: str) -> dict[str, torch.Tensor]:
        return {"weight": self._merged_weight(adapter_name)}

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        for name in self._adapters_to_merge(adapter_names):
            if safe_merge:
                self.check_finite_delta(name)
            if name in self.lora_magnitude_vector:
                dora.merge(self, name)
            elif not self._add_delta_in_place(name, 1.0):
                weight = cast(torch.Tensor, self.get_base_layer().weight)
                weight.data = self._merged_weight(name)
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        if self.retie_base_weight():  # merged into its own copy of a tied weight: the shared one is back, exact
            return
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            if name in self.lora_magnitude_vector:
                dora.unmerge(self, name)
            elif not self._add_delta_in_place(name, -1.0):
                weight = cast(torch.Tensor, self.get_base_layer().weight)
                weight.data -= self.get_delta_weight(name).to(weight.dtype)

    _MERGE_ROWS = 128  # rows of a half-precision weight merged per block (the fp32 block stays in cache)

    @torch.no_grad()
    def _add_delta_in_place(self, adapter_name: str, sign: float) -> bool:
        """weight += sign * scaling * B A for a Linear / Conv1D adapter, without a full-size delta: one
        `addmm_` into a weight of the adapter's dtype; for a half-precision weight, blocks of rows
        computed in fp32 and rounded once into the weight. False: not handled here."""
        if type(self) is not Linear or adapter_name not in self.lora_A:  # subclasses (8-bit) merge their own way
            return False
        weight = cast(torch.Tensor, self.get_base_layer().weight)
        lora_A, lora_B = self.lora_A[adapter_name], self.lora_B[adapter_name]
        if type(lora_A) is not nn.Linear or type(lora_B) is not nn.Linear or weight.dim() != 2:
            return False
        A, B = lora_A.weight, lora_B.weight * (sign * self.scaling[adapter_name])  # (r, in), (out, r)
        target = weight.data.t() if self.fan_in_fan_out else weight.data  # (out, in), a view of the weight
        if weight.dtype == A.dtype:
            target.addmm_(B, A)
            return True
        if not weight.dtype.is_floating_point:
            return False
        for start in range(0, target.shape[0], self._MERGE_ROWS):
            rows = target[start : start + self._MERGE_ROWS]
            block = torch.mm(B[start : start + self._MERGE_ROWS], A)
            rows.copy_(block.add_(rows))
        return True

    # ---- mixed-adapter batches ------------------------------------------------------------------
    def _batch_of(self, kwargs: dict) -> Optional[MixedBatch]:
        """The per-sample adapters of this call: `adapter_names=` given to the layer itself (taken out of `kwargs`,
        which go on to the base layer), else those the tuner set for the model's call, else None."""
        names = kwargs.pop("adapter_names", None)
        return MixedBatch(checked_names(names)) if names is not None else self._mixed_batch

    def _check_mixed_batch(self, x: torch.Tensor, batch: MixedBatch) -> None:
        """HF PEFT's refusals, in its order: one name per sample, no merged adapter."""
        check_batch_size(len(x), batch)
        if self.merged:
            raise ValueError(MERGED_REFUSAL)
        dora.refuse_mixed_batch(self, batch.adapters())

    def _mixed_batch_forward(self, x: torch.Tensor, batch: MixedBatch, *args: Any, **kwargs: Any) -> torch.Tensor:
        """Linear / Conv2d: the base output for the whole batch, plus each adapter's update on its own rows
        (`__base__` rows and adapters this layer does not hold get none)."""
        self._check_mixed_batch(x, batch)
        result = self.base_layer(x, *args, **kwargs)
        if self.disable_adapters:
            return result
        result_dtype = result.dtype
        for name in batch.adapters():
            if name not in self.lora_A:
                continue
            rows = batch.rows(name, x.device)
            lora_A, lora_B, dropout = self.lora_A[name], self.lora_B[name], self.lora_dropout[name]
            weight_A = cast(torch.Tensor, lora_A.weight)
            sub = x[rows]
            sub = sub if sub.dtype == weight_A.dtype else sub.to(weight_A.dtype)
            if not isinstance(dropout, nn.Identity):
                sub = dropout(sub)
            update = lora_B(lora_A(sub)) * self.scaling[name]
            add_rows(result, rows, update if update.dtype == result_dtype else update.to(result_dtype))
        return result

    def _forward_with_adapter_modules(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """Shared by Linear and Conv2d, whose A and B are modules applied to the input.

        The general path, written op for op as `base(x) + B(A(dropout(x))) * scaling`: any base layer
        (8-bit, hooked, extra arguments), several active adapters, autocast, torch.compile.
        """
        batch = self._batch_of(kwargs)
        if batch is not None:
            return self._mixed_batch_forward(x, batch, *args, **kwargs)
        if not self._check_forward():
            return self.base_layer(x, *args, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        result_dtype = result.dtype
        for name in self.active_adapters_in(self.lora_A):
            lora_A, lora_B = self.lora_A[name], self.lora_B[name]
            dropout = self.lora_dropout[name]
            weight_A = cast(torch.Tensor, lora_A.weight)
            x_lora = x if x.dtype == weight_A.dtype else x.to(weight_A.dtype)
            if name in self.lora_magnitude_vector:
                result = dora.dora_forward(self, name, x_lora, result)
                continue
            if not isinstance(dropout, nn.Identity):  # p == 0 keeps nn.Identity: no call, no copy
                x_lora = dropout(x_lora)
            result = result + lora_B(lora_A(x_lora)) * self.scaling[name]
        return result if result.dtype == result_dtype else result.to(result_dtype)


class Linear(nn.Module, LoraLayer):
    """LoRA over `nn.Linear` or transformers' `Conv1D` (`fan_in_fan_out=True`, weight stored (in, out)).

    `Linear(base_layer, adapter_name, r, ...)` wraps an existing layer; the HF PEFT 0.6 form
    `Linear(adapter_name, in_features, out_features, r, ...)` builds its own (randomly initialised) base.
    """

    def __init__(
        self,
        base_layer: nn.Module | str,
        adapter_name: str | int,
        *args: Any,
        r: int = 0,
        lora_alpha: float = 1,
        lora_dropout: float = 0.0,
        fan_in_fan_out: bool = False,
        is_target_conv_1d_layer: bool = False,
        init_lora_weights: bool | str = True,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        legacy = isinstance(base_layer, str)  # (adapter_name, in_features, out_features, r, alpha, ...)
        positional = dict(
            zip(
                ("r", "lora_alpha", "lora_dropout", "fan_in_fan_out", "is_target_conv_1d_layer"),
                args[1:] if legacy else args,
            )
        )
        r = positional.get("r", r)
        lora_alpha = positional.get("lora_alpha", lora_alpha)
        lora_dropout = positional.get("lora_dropout", lora_dropout)
        fan_in_fan_out = positional.get("fan_in_fan_out", fan_in_fan_out)
        is_target_conv_1d_layer = positional.get("is_target_conv_1d_layer", is_target_conv_1d_layer)
        if legacy:
            in_features, out_features = cast(int, adapter_name), args[0]
            adapter_name, base_layer = cast(str, base_layer), nn.Linear(in_features, out_features)
            if fan_in_fan_out:  # stored (in, out): a Conv1D, so every path computes x @ W (as HF 0.6's layer did)
                linear, conv1d = base_layer, _conv1d_class()(out_features, in_features)
                conv1d.weight = nn.Parameter(linear.weight.data.T.contiguous())
                conv1d.bias = linear.bias
                base_layer = conv1d
        # from here on the (possibly legacy) arguments are in their place
        base_layer, adapter_name = cast(nn.Module, base_layer), cast(str, adapter_name)
        weight = cast(torch.Tensor, base_layer.weight)
        in_features, out_features = weight.shape if fan_in_fan_out else weight.shape[::-1]
        if hasattr(base_layer, "in_features") and not fan_in_fan_out:
            in_features, out_features = cast(int, base_layer.in_features), cast(int, base_layer.out_features)
        self._init_lora_layer(base_layer, in_features, out_features)
        self.is_target_conv_1d_layer = is_target_conv_1d_layer
        self._add_first_adapter(
            adapter_name, fan_in_fan_out, r, lora_alpha, lora_dropout, init_lora_weights, *_variant(kwargs)
        )

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        weight_B = cast(torch.Tensor, self.lora_B[adapter_name].weight)
        delta = weight_B @ cast(torch.Tensor, self.lora_A[adapter_name].weight)
        return transpose(delta, self.fan_in_fan_out) * self.scaling[adapter_name]

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if not args and not kwargs and not torch.compiler.is_compiling():
            fused = self._fused_inputs(x)
            if fused is not None:
                return self._fused_forward(x, *fused)
        return self._forward_with_adapter_modules(x, *args, **kwargs)

    def _fused_inputs(self, x: torch.Tensor) -> Optional[tuple]:
        """(weight, bias, A, B, scaling, p) when the fused path computes exactly what the general one would:
        one active adapter, unmerged, over a plain frozen nn.Linear / Conv1D of x's dtype, no hooks
        or autocast that the general path would honour. Runs on every forward of every adapted layer,
        so modules and parameters are read from their dicts (`nn.Module.__getattr__` costs ~0.8 us each)."""
        if (
            self.disable_adapters
            or self.merged_adapters
            or len(self._active_adapters) != 1
            or self._mixed_batch is not None
        ):
            return None
        name = self._active_adapters[0]
        modules: dict[str, Any] = self._modules
        lora_A = modules["lora_A"]._modules.get(name)
        if lora_A is None or name in modules["lora_magnitude_vector"]._modules:  # DoRA: dora.py
            return None
        base, lora_B = modules["base_layer"], modules["lora_B"]._modules.get(name)
        dropout = modules["lora_dropout"]._modules.get(name)
        base_type = type(base)
        if base_type is not nn.Linear and base_type is not _conv1d_class():
            return None
        if type(lora_A) is not nn.Linear or type(lora_B) is not nn.Linear:
            return None
        base_params, params_A = own_parameters(base), own_parameters(lora_A)
        weight, bias = base_params.get("weight"), base_params.get("bias")
        weight_A, weight_B = params_A.get("weight"), own_parameters(lora_B).get("weight")
        if weight is None or weight_A is None or weight_B is None or params_A.get("bias") is not None:
            return None
        if weight.requires_grad or weight.dtype != x.dtype or weight_A.dtype != x.dtype:
            return None
        if type(dropout) is nn.Identity:
            p = 0.0
        elif type(dropout) is nn.Dropout and not dropout.inplace:
            p = dropout.p if dropout.training else 0.0
        else:
            return None
        if p >= 1.0:  # nn.Dropout(p=1) drops everything: the fused path would divide by 1 - p
            return None
        hooked = has_module_hooks
        if hooked(base) or hooked(lora_A) or hooked(lora_B) or hooked(dropout) or has_global_module_hooks():
            return None
        if torch.is_autocast_enabled(x.device.type):
            return None
        return weight, bias, weight_A, weight_B, self.scaling[name], p

    def _fused_forward(
        self,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: Optional[torch.Tensor],
        weight_A: torch.Tensor,
        weight_B: torch.Tensor,
        scaling: float,
        p: float,
    ) -> torch.Tensor:
        # the weights of a plain nn.Linear / Conv1D and its adapter (`_fused_inputs` checked them)
        if torch.is_grad_enabled():
            if (
                x.requires_grad
                or weight_A.requires_grad
                or weight_B.requires_grad
                or (bias is not None and bias.requires_grad)
            ):
                return _LoraLinearFunction.apply(x, weight, bias, weight_A, weight_B, scaling, p, self.fan_in_fan_out)
            with torch.no_grad():  # frozen adapters: nothing to differentiate, no graph
                return self._fused_forward(x, weight, bias, weight_A, weight_B, scaling, p)
        # inference: no graph
        if p == 0.0:
            return _lora_linear_no_grad(x, weight, bias, weight_A, weight_B, scaling, self.fan_in_fan_out)
        return _lora_linear(x, weight, bias, weight_A, weight_B, scaling, p, self.fan_in_fan_out)[0]

    __repr__ = LoraLayer.lora_repr


class _SizedByBaseLayer(nn.Module, LoraLayer):
    """LoRA over a base layer whose input / output sizes it reads from the layer itself (`_sizes`)."""

    def __init__(
        self,
        base_layer: nn.Module,
        adapter_name: str,
        r: int = 0,
        lora_alpha: float = 1,
        lora_dropout: float = 0.0,
        init_lora_weights: bool | str = True,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        self._init_lora_layer(base_layer, *self._sizes(base_layer))
        self._add_first_adapter(adapter_name, False, r, lora_alpha, lora_dropout, init_lora_weights, *_variant(kwargs))

    def _sizes(self, base_layer: Any) -> tuple[int, int]:
        raise NotImplementedError

    __repr__ = LoraLayer.lora_repr


class Embedding(_SizedByBaseLayer):
    """LoRA over `nn.Embedding`: A (r, num_embeddings) starts at zero, B (dim, r) normal."""

    def _sizes(self, base_layer: nn.Embedding) -> tuple[int, int]:
        return base_layer.num_embeddings, base_layer.embedding_dim

    def _create_adapter_weights(self, adapter_name: str, r: int) -> None:
        self.lora_embedding_A[adapter_name] = nn.Parameter(torch.randn(r, self.in_features))
        self.lora_embedding_B[adapter_name] = nn.Parameter(torch.randn(self.out_features, r))

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        delta = self.lora_embedding_B[adapter_name] @ self.lora_embedding_A[adapter_name]
        return delta.T * self.scaling[adapter_name]

    def _embed(self, ids: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        base = cast(nn.Embedding, self.get_base_layer())
        return F.embedding(
            ids,
            weight,
            padding_idx=base.padding_idx,
            max_norm=base.max_norm,
            norm_type=base.norm_type,
            scale_grad_by_freq=base.scale_grad_by_freq,
            sparse=base.sparse,
        )

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        batch = self._batch_of(kwargs)
        if batch is not None:
            return self._mixed_batch_forward(x, batch, *args, **kwargs)
        if not self._check_forward():
            return self.base_layer(x, *args, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        result_dtype = result.dtype
        for name in self.active_adapters_in(self.lora_embedding_A):
            if name in self.lora_magnitude_vector:
                result = dora.dora_embedding_forward(self, name, x, result)
                continue
            after_A = self._embed(x, self.lora_embedding_A[name].T)
            result = result + self._scaled((after_A @ self.lora_embedding_B[name].T) * self.scaling[name])
        return result.to(result_dtype)

    def _scaled(self, update: torch.Tensor) -> torch.Tensor:
        """`update` times the base layer's scalar `embed_scale` where it has one (Gemma 3's scaled word embedding
        multiplies its lookup by it), as HF PEFT: the adapter's rows are scaled as the base rows are."""
        scale = getattr(self.get_base_layer(), "embed_scale", None)
        if isinstance(scale, torch.Tensor) and scale.numel() == 1:
            return update * scale.to(update.dtype)
        return update * scale if isinstance(scale, (int, float)) and not isinstance(scale, bool) else update

    def _mixed_batch_forward(self, x: torch.Tensor, batch: MixedBatch, *args: Any, **kwargs: Any) -> torch.Tensor:
        """Each sample's ids looked up in its own adapter's A, then through its B (see the Linear one)."""
        self._check_mixed_batch(x, batch)
        result = self.base_layer(x, *args, **kwargs)
        if self.disable_adapters:
            return result
        for name in batch.adapters():
            if name not in self.lora_embedding_A:
                continue
            rows = batch.rows(name, x.device)
            after_A = self._embed(x[rows], self.lora_embedding_A[name].T)
            update = self._scaled((after_A @ self.lora_embedding_B[name].T) * self.scaling[name])
            add_rows(result, rows, update if update.dtype == result.dtype else update.to(result.dtype))
        return result


class Conv2d(_SizedByBaseLayer):
    """LoRA over `nn.Conv2d`: A is a conv with the base kernel/stride/padding, B a 1x1 conv."""

    def _sizes(self, base_layer: nn.Conv2d) -> tuple[int, int]:
        if base_layer.groups != 1:
            raise ValueError(f"LoRA supports Conv2d with groups=1 only, got groups={base_layer.groups}")
        return base_layer.in_channels, base_layer.out_channels

    def _create_adapter_weights(self, adapter_name: str, r: int) -> None:
        base = cast(nn.Conv2d, self.get_base_layer())
        # nn.Conv2d holds 2-tuples (or a padding string); its annotations say tuple[int, ...]
        kernel_size, stride = cast(tuple[int, int], base.kernel_size), cast(tuple[int, int], base.stride)
        padding = cast("str | tuple[int, int]", base.padding)
        self.lora_A[adapter_name] = nn.Conv2d(self.in_features, r, kernel_size, stride, padding, bias=False)
        self.lora_B[adapter_name] = nn.Conv2d(r, self.out_features, (1, 1), (1, 1), bias=False)

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        weight_A = cast(torch.Tensor, self.lora_A[adapter_name].weight)
        weight_B = cast(torch.Tensor, self.lora_B[adapter_name].weight)
        if cast(nn.Conv2d, self.get_base_layer()).weight.shape[2:4] == (1, 1):
            delta = (weight_B.squeeze(3).squeeze(2) @ weight_A.squeeze(3).squeeze(2)).unsqueeze(2).unsqueeze(3)
        else:
            delta = F.conv2d(weight_A.permute(1, 0, 2, 3), weight_B).permute(1, 0, 2, 3)
        return delta * self.scaling[adapter_name]

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self._forward_with_adapter_modules(x, *args, **kwargs)
