"""DoRA (weight-decomposed LoRA, `use_dora=True`): HF PEFT 0.21's math, state and file format.

An adapter's layer output is `m / ||W + s B A||_row * (W + s B A) x + bias`: the LoRA update gives the direction, the
trained vector `m` (`lora_magnitude_vector[name].weight`, saved as `…lora_magnitude_vector`) the length of each output
row. The norm is detached from the graph (paper section 4.3, as HF PEFT). Written as HF PEFT does, on top of the base
result:

    out = result + (m/n - 1) * base + (m/n) * s * B(A(x))

with `base = result - bias` without dropout (or in eval mode); with dropout in training, `x` is the dropped-out input
and `base = dropout(x) W^T` (a second product of the base weight, as HF PEFT computes it).

Two things are cheaper than HF PEFT's code, with the same values up to float rounding:
- the row norms `||W + s B A||` come through the r-wide factors, never as an (out x in) matrix:
  `||W_i||^2 + 2 s <B_i, (W A^T)_i> + s^2 <B_i, (B (A A^T))_i>` (HF PEFT multiplies an identity matrix through A and
  B and adds the full-size product to W on every forward);
- the single-adapter Linear / Conv1D step without dropout runs as one autograd node (`_DoraLinearFunction`):
  `out = (m/n) * (result - bias + s (x A^T) B^T) + bias`, with its gradients written out, instead of the nine
  element-wise passes over the (tokens x out) activations that the op-for-op composition records;
- with an nn.Dropout in training, the same layer runs as one node too (`_DoraDropoutLinearFunction`): the mask is
  drawn once as the fused LoRA path draws it (`fused._dropped_copy`: the distribution of nn.Dropout's mask; on CPU
  for p <= 0.25 as drop positions, so not the same draw as nn.Dropout's for a given seed), one masked copy of x feeds
  both the second base product and A, and the 1/(1-p), s and m/n ride on the r-wide factors where they can.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Optional, cast

import torch
import torch.nn.functional as F
from torch import nn

from ..._compat import has_global_module_hooks, has_module_hooks
from .fused import _dropped_copy, _zero_dropped, _zeroed_copy

if TYPE_CHECKING:
    from .layer import LoraLayer

MAGNITUDE = "lora_magnitude_vector"  # HF PEFT's attribute and saved key


class DoraLinearLayer(nn.Module):
    """The trained magnitude of one DoRA adapter (`weight`), as HF PEFT's module of the same name holds it."""

    def __init__(self, fan_in_fan_out: bool) -> None:
        super().__init__()
        self.fan_in_fan_out = fan_in_fan_out
        # while the adapter is merged: the row norms it was merged with (unmerging divides by the same factor)
        self.merged_norm: Optional[torch.Tensor] = None

    def _apply(self, fn: Any, recurse: bool = True) -> Any:  # .to() / .half() / .cuda(): move the merge norm along
        out = super()._apply(fn, recurse)
        if self.merged_norm is not None:
            self.merged_norm = fn(self.merged_norm)
        return out

    def __repr__(self) -> str:
        return "lora.dora." + super().__repr__()


class DoraEmbeddingLayer(DoraLinearLayer):
    pass


class DoraConv2dLayer(DoraLinearLayer):
    pass


_HOLDERS = {"Embedding": DoraEmbeddingLayer, "Conv2d": DoraConv2dLayer}


def _holder(layer: LoraLayer, name: str) -> DoraLinearLayer:
    return cast(DoraLinearLayer, layer.lora_magnitude_vector[name])


def _magnitude(layer: LoraLayer, name: str) -> torch.Tensor:
    return cast(torch.Tensor, _holder(layer, name).weight)


# ---- the weight as a 2-D (out, in) matrix and the adapter's factors --------------------------------------------------
def _oriented(layer: LoraLayer, weight: torch.Tensor) -> torch.Tensor:
    """The base weight as (rows whose norms DoRA takes, everything else): Linear (out, in), Conv1D transposed,
    Conv2d (out, in * kh * kw), Embedding (dim, num_embeddings)."""
    kind = type(layer).__name__
    if kind == "Embedding":
        return weight.t()
    if weight.dim() > 2:
        return weight.flatten(1)
    return weight.t() if getattr(layer, "fan_in_fan_out", False) else weight


def _factors(layer: LoraLayer, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(B (rows, r), A (r, cols)) such that the oriented update is s * B @ A."""
    if name in layer.lora_embedding_A:
        return layer.lora_embedding_B[name], layer.lora_embedding_A[name]
    weight_A = cast(torch.Tensor, layer.lora_A[name].weight)
    weight_B = cast(torch.Tensor, layer.lora_B[name].weight)
    r = weight_A.shape[0]
    return weight_B.reshape(-1, r), weight_A.reshape(r, -1)


def _row_norms(weight2d: torch.Tensor, B: torch.Tensor, A: torch.Tensor, scaling: float) -> torch.Tensor:
    """||W_i + s (B A)_i|| for every row i, in fp32 (or fp64), detached, without building the (rows x cols) update."""
    with torch.no_grad():
        dtype = torch.float64 if weight2d.dtype == torch.float64 else torch.float32
        W, B, A = weight2d.to(dtype), B.detach().to(dtype), A.detach().to(dtype)
        squares = (W * W).sum(1)
        cross = (B * (W @ A.t())).sum(1)  # <W_i, (B A)_i> through (W A^T): rows x r
        own = (B * (B @ (A @ A.t()))).sum(1)  # ||(B A)_i||^2 = B_i (A A^T) B_i^T
        total = squares + (2.0 * scaling) * cross + (scaling * scaling) * own
        return total.clamp_min_(0).sqrt_()


def weight_norm(layer: LoraLayer, name: str, weight: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The detached row norms of the adapter's full weight over `weight` (default: the base weight as it is), shaped as
    the magnitude is."""
    if weight is None:
        weight = cast(torch.Tensor, layer.get_base_layer().weight)
    B, A = _factors(layer, name)
    norms = _row_norms(_oriented(layer, weight.detach()), B, A, float(layer.scaling[name]))
    if type(layer).__name__ == "Conv2d":
        norms = norms.view(1, -1, 1, 1)
    return norms


# ---- creation --------------------------------------------------------------------------------------------------------
_PLAIN_BASES = ("Linear", "Conv1D", "Embedding", "Conv2d")


def check_dora_base(layer: LoraLayer) -> None:
    """DoRA needs the base weight in float to take its norms: an 8-bit (or other quantized) base is refused."""
    base = layer.get_base_layer()
    weight = getattr(base, "weight", None)
    if (
        type(base).__name__ not in _PLAIN_BASES
        or not isinstance(weight, torch.Tensor)
        or not weight.dtype.is_floating_point
        or type(weight) not in (torch.Tensor, nn.Parameter)
    ):
        raise ValueError(
            f"use_dora=True is not supported over a {type(base).__name__} base layer here (DoRA takes the norms of "
            "the base weight, which needs it unquantized); use_dora works over nn.Linear, transformers Conv1D, "
            "nn.Embedding and nn.Conv2d in float. Set use_dora=False, or dequantize the base layers first "
            "(lightning_peft.quantization.dequantize_base_linears)"
        )


def add_magnitude(layer: LoraLayer, name: str) -> None:
    """Create adapter `name`'s magnitude as HF PEFT does: the row norms of W + s B A at the adapter's start
    (`update_layer` has checked the base with `check_dora_base` before any change)."""
    holder = _HOLDERS.get(type(layer).__name__, DoraLinearLayer)(
        fan_in_fan_out=type(layer).__name__ == "Embedding" or bool(getattr(layer, "fan_in_fan_out", False))
    )
    B, _ = _factors(layer, name)
    norms = weight_norm(layer, name)
    holder.weight = nn.Parameter(norms.to(device=B.device, dtype=B.dtype))
    layer.lora_magnitude_vector[name] = holder


def refuse_mixed_batch(layer: LoraLayer, names: list[str]) -> None:
    """HF PEFT's refusal: no `adapter_names=` batch that runs a DoRA adapter."""
    if any(n in layer.lora_magnitude_vector for n in names):
        raise ValueError("Cannot pass `adapter_names` when DoRA is enabled.")


# ---- forward ---------------------------------------------------------------------------------------------------------
class _DoraLinearFunction(torch.autograd.Function):
    """out = k * (result - bias + s (x A^T) B^T) + bias, k = m / n (n detached), as one node.

    Gradients: d result = g k;  d m = sum_tokens(g * z) / n with z = result - bias + s (x A^T) B^T;
    d x = s ((g k) B) A;  d A = s ((g k) B)^T x;  d B = s (g k)^T (x A^T);  d bias = sum_tokens(g (1 - k))."""

    @staticmethod
    def forward(ctx: Any, *args: Any) -> torch.Tensor:
        result, x, weight_A, weight_B, magnitude, inv_norm, bias, scaling = args
        out_features = result.shape[-1]
        r2 = result.reshape(-1, out_features)
        x2 = x.reshape(-1, x.shape[-1])
        z = r2 - bias if bias is not None else r2.clone()
        after_A = torch.mm(x2, weight_A.t())
        z.addmm_(after_A, weight_B.t(), alpha=scaling)
        k = magnitude * inv_norm
        out = torch.addcmul(bias, z, k) if bias is not None else z * k
        ctx.save_for_backward(x2, z, after_A, weight_A, weight_B, k, inv_norm)
        ctx.scaling, ctx.shapes = scaling, (result.shape, x.shape)
        return out.view(result.shape)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Optional[torch.Tensor], ...]:
        x2, z, after_A, weight_A, weight_B, k, inv_norm = ctx.saved_tensors
        need_result, need_x, need_A, need_B, need_m, _, need_bias = ctx.needs_input_grad[:7]
        result_shape, x_shape = ctx.shapes
        s = ctx.scaling
        g = grad.reshape(-1, grad.shape[-1])
        gk = g * k
        grad_result = grad_x = grad_A = grad_B = grad_m = grad_bias = None
        if need_x or need_A:
            inner = torch.mm(gk, weight_B).mul_(s)  # (tokens, r)
            if need_x:
                grad_x = torch.mm(inner, weight_A).view(x_shape)
            if need_A:
                grad_A = torch.mm(inner.t(), x2)
        if need_B:
            grad_B = torch.mm(gk.t(), after_A).mul_(s)
        if need_m:
            grad_m = torch.linalg.vecdot(g, z, dim=0).mul_(inv_norm)  # (einsum: 20x slower on CPU)
        if need_bias:
            grad_bias = g.sum(0) - gk.sum(0)
        if need_result:
            grad_result = gk.view(result_shape)
        return grad_result, grad_x, grad_A, grad_B, grad_m, None, grad_bias, None


class _DoraDropoutLinearFunction(torch.autograd.Function):
    """HF PEFT's DoRA step with dropout, as one node: with x_m = x masked (dropped entries zeroed), c = 1/(1-p),
    k = m / n (n detached) and W the frozen base weight (out, in),

        out = result + (k - 1) c (x_m W^T) + k s c (x_m A^T) B^T

    (HF: `result + (k - 1) * dropout(x) W^T + k * s * B(A(dropout(x)))`). One masked copy of x feeds both products;
    the mask is drawn as the fused LoRA path draws it (`fused._dropped_copy`: the same distribution as nn.Dropout's).
    Gradients, with y = x_m W^T, a = x_m A^T, G = g^T a (out, r):
    d result = g;  d x = mask * (c ((k - 1) g) W + s c ((g k) B) A);  d A = s c ((g k) B)^T x_m;
    d B = s c k G;  d m = c (sum_tokens(g y) + s <G, B>_row) / n."""

    @staticmethod
    def forward(ctx: Any, *args: Any) -> torch.Tensor:
        result, x, weight, weight_A, weight_B, magnitude, inv_norm, scaling, p = args
        out_features = result.shape[-1]
        x2 = x.reshape(-1, x.shape[-1])
        x_m, mask = _dropped_copy(x2, p)
        c = 1.0 / (1.0 - p)
        k = magnitude * inv_norm
        y = torch.mm(x_m, weight.t())  # (tokens, out)
        after_A = torch.mm(x_m, weight_A.t())  # (tokens, r)
        out = torch.addcmul(result.reshape(-1, out_features), y, (k - 1.0) * c)
        up = weight_B * (k * (scaling * c)).unsqueeze(1)  # (out, r): k s c folded into B's rows
        out.addmm_(after_A, up.t())
        if mask.dtype != torch.bool:  # positions: keep x itself, backward zeroes a copy again (as fused.py)
            x_m = x2
        ctx.save_for_backward(x_m, mask, y, after_A, weight, weight_A, weight_B, k, inv_norm, up)
        ctx.scaling, ctx.c, ctx.shapes = scaling, c, (result.shape, x.shape)
        return out.view(result.shape)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Optional[torch.Tensor], ...]:
        x_m, mask, y, after_A, weight, weight_A, weight_B, k, inv_norm, up = ctx.saved_tensors
        need_result, need_x, _, need_A, need_B, need_m = ctx.needs_input_grad[:6]
        result_shape, x_shape = ctx.shapes
        s, c = ctx.scaling, ctx.c
        g = grad.reshape(-1, grad.shape[-1])
        grad_result = grad_x = grad_A = grad_B = grad_m = None
        inner = torch.mm(g, up)  # (tokens, r): s c ((g k) B)
        if need_x:
            grad_x = torch.mm(g * ((k - 1.0) * c), weight)
            grad_x.addmm_(inner, weight_A)
            _zero_dropped(grad_x, mask)
            grad_x = grad_x.view(x_shape)
        if need_A:
            if mask.dtype != torch.bool:
                x_m = _zeroed_copy(x_m, mask)
            grad_A = torch.mm(inner.t(), x_m)
        if need_B or need_m:
            G = torch.mm(g.t(), after_A)  # (out, r)
            if need_B:
                grad_B = G * (k * (s * c)).unsqueeze(1)
            if need_m:
                grad_m = torch.linalg.vecdot(g, y, dim=0).add_((G * weight_B).sum(1), alpha=s).mul_(inv_norm * c)
        if need_result:
            grad_result = grad
        return grad_result, grad_x, None, grad_A, grad_B, grad_m, None, None, None


def _fast_path(layer: LoraLayer, name: str, x: torch.Tensor, result: torch.Tensor) -> Optional[float]:
    """The dropout rate p of a one-node path (0.0: no dropout at work, `_DoraLinearFunction`; p in (0, 1):
    `_DoraDropoutLinearFunction`), or None for the op-for-op path. A node computes what the op-for-op path would: a
    Linear / Conv1D LoRA layer, plain A and B (no hooks, no bias), an nn.Dropout (or none), one dtype, a frozen base
    weight under dropout, no autocast or compilation."""
    if type(layer).__name__ != "Linear" or torch.compiler.is_compiling():
        return None
    lora_A, lora_B, dropout = layer.lora_A[name], layer.lora_B[name], layer.lora_dropout[name]
    if type(lora_A) is not nn.Linear or type(lora_B) is not nn.Linear:
        return None
    if lora_A.bias is not None or lora_B.bias is not None:
        return None
    p = 0.0
    if not isinstance(dropout, nn.Identity) and layer.training:
        if type(dropout) is not nn.Dropout or dropout.inplace or not dropout.training or has_module_hooks(dropout):
            return None
        p = float(dropout.p)
        weight = getattr(layer.get_base_layer(), "weight", None)
        if not (0.0 <= p < 1.0) or not isinstance(weight, torch.Tensor) or weight.requires_grad:
            return None
        if weight.dtype != x.dtype or weight.dim() != 2:
            return None
    weight_A = lora_A.weight
    if not (x.dtype == result.dtype == weight_A.dtype == _magnitude(layer, name).dtype):
        return None
    if any(has_module_hooks(m) for m in (lora_A, lora_B, layer.lora_magnitude_vector[name])):
        return None
    if has_global_module_hooks():
        return None
    return None if torch.is_autocast_enabled(x.device.type) else p


def dora_forward(layer: LoraLayer, name: str, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
    """`result` (the base output plus the earlier active adapters') with DoRA adapter `name` applied; `x` is the
    layer's input in the adapter's dtype (before dropout)."""
    magnitude = _magnitude(layer, name)
    scaling = layer.scaling[name]
    base = layer.get_base_layer()
    bias = cast(Optional[torch.Tensor], getattr(base, "bias", None))
    norm = weight_norm(layer, name)
    p = _fast_path(layer, name, x, result)
    if p is not None and p > 0.0:
        return _DoraDropoutLinearFunction.apply(
            result,
            x,
            _oriented(layer, cast(torch.Tensor, base.weight)),
            layer.lora_A[name].weight,
            layer.lora_B[name].weight,
            magnitude,
            norm.reciprocal().to(magnitude.dtype),
            scaling,
            p,
        )
    if p is not None:
        inv_norm = norm.reciprocal().to(magnitude.dtype)
        bias_in = bias if bias is None or bias.dtype == result.dtype else None
        if bias is None or bias_in is not None:
            return _DoraLinearFunction.apply(
                result, x, layer.lora_A[name].weight, layer.lora_B[name].weight, magnitude, inv_norm, bias_in, scaling
            )
    lora_A, lora_B, dropout = layer.lora_A[name], layer.lora_B[name], layer.lora_dropout[name]
    conv = type(layer).__name__ == "Conv2d"
    k = magnitude / norm.to(magnitude.dtype)
    if not conv:
        k = k.view(1, -1) if k.dim() == 1 else k
    if isinstance(dropout, nn.Identity) or not layer.training:  # type: ignore[attr-defined]
        base_result = result
        if bias is not None:
            base_result = result - (bias.view(1, -1, *([1] * (result.dim() - 2))) if conv else bias)
    else:
        x = dropout(x)
        weight = cast(torch.Tensor, base.weight).to(x.dtype)
        if conv:
            conv_base = cast(nn.Conv2d, base)
            base_result = F.conv2d(
                x, weight, None, conv_base.stride, conv_base.padding, conv_base.dilation, conv_base.groups
            )
        else:
            base_result = F.linear(x, _oriented(layer, weight))
    return result + (k - 1) * base_result + k * lora_B(lora_A(x)) * scaling


def dora_embedding_forward(layer: Any, name: str, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
    """HF PEFT's Embedding DoRA: (m/n) * result + (m/n) * s * embed(x, A^T) B^T (n per embedding dimension)."""
    magnitude = _magnitude(layer, name)
    k = magnitude / weight_norm(layer, name).to(magnitude.dtype)
    after_A = layer._embed(x, layer.lora_embedding_A[name].T)
    return k * result + k * (after_A @ layer.lora_embedding_B[name].T) * layer.scaling[name]


# ---- merging ---------------------------------------------------------------------------------------------------------
def _factor_view(layer: LoraLayer, factor: torch.Tensor) -> torch.Tensor:
    """m / n shaped to scale the base weight's rows (as stored: Conv1D and Embedding transposed)."""
    kind = type(layer).__name__
    if kind == "Conv2d":
        return factor.reshape(-1, 1, 1, 1)
    if kind == "Embedding" or getattr(layer, "fan_in_fan_out", False):
        return factor.reshape(1, -1)
    return factor.reshape(-1, 1)


def _unmerged_weight(layer: LoraLayer) -> torch.Tensor:
    """The base weight with the merged adapters taken out (on a copy; the layer is not touched): DoRA needs the norms
    of the weight its forward sees."""
    weight = cast(torch.Tensor, layer.get_base_layer().weight).detach()
    if not layer.merged_adapters:
        return weight
    weight = weight.clone()
    for name in reversed(layer.merged_adapters):
        delta = layer.get_delta_weight(name).to(weight.dtype)
        if name in layer.lora_magnitude_vector:
            norm = cast(torch.Tensor, _holder(layer, name).merged_norm)
            factor = _factor_view(layer, _magnitude(layer, name).detach().reshape(-1) / norm)
            weight = weight / factor.to(weight.dtype) - delta
        else:
            weight = weight - delta
    return weight


def merged_weight(layer: LoraLayer, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(the base weight with DoRA adapter `name` merged, the row norms it used): (m / n) * (W + delta) with n the norms
    over the unmerged weight, as HF PEFT merges."""
    weight = cast(torch.Tensor, layer.get_base_layer().weight).detach()
    norm = weight_norm(layer, name, _unmerged_weight(layer)).reshape(-1)
    magnitude = _magnitude(layer, name).detach().reshape(-1)
    factor = _factor_view(layer, magnitude / norm.to(magnitude.dtype))
    delta = layer.get_delta_weight(name)
    merged = factor * (weight + delta.to(weight.dtype))
    return merged.to(weight.dtype), norm


def merge(layer: LoraLayer, name: str) -> None:
    weight = cast(torch.Tensor, layer.get_base_layer().weight)
    merged, norm = merged_weight(layer, name)
    weight.data = merged
    _holder(layer, name).merged_norm = norm


def unmerge(layer: LoraLayer, name: str) -> None:
    weight = cast(torch.Tensor, layer.get_base_layer().weight)
    holder = _holder(layer, name)
    norm = cast(torch.Tensor, holder.merged_norm)
    magnitude = _magnitude(layer, name).detach().reshape(-1)
    factor = _factor_view(layer, magnitude / norm.to(magnitude.dtype))
    delta = layer.get_delta_weight(name)
    weight.data = (weight.data / factor.to(weight.dtype) - delta.to(weight.dtype)).to(weight.dtype)
    holder.merged_norm = None
