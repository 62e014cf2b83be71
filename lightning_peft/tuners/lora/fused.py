"""The fused LoRA Linear path: `base(x) + B(A(dropout(x))) * s` as one autograd node.

`LoraLayer`'s Linear wrapper (layer.py) decides when it applies (`Linear._fused_inputs`) and calls
`lora_linear_function` / `lora_linear_no_grad` from here.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch

# ---------------------------------------------------------------------------------------------
# the fused Linear path
# ---------------------------------------------------------------------------------------------
# Over a frozen nn.Linear / Conv1D with one active adapter, `base(x) + B(A(dropout(x))) * scaling`
# runs as one autograd node (`_LoraLinearFunction`) instead of the seven that the op-for-op
# composition records (dropout's mask generation, scaling and division, two matmuls, a scaling
# multiply, an add, then the autograd sum of the two input gradients). Same math, fewer passes over
# the (tokens x features) activations:
#   forward:  y = x W^T + b;  y += s * (((x * m) A^T) / (1-p)) B^T   (addmm_ into y, in place)
#   backward: dx = ((s / (1-p)) (g B) A) * m + g W  (masked in place, then accumulated by the
#             big matmul itself);  dA, dB from the small (tokens x r) factors
# m is the same Bernoulli(1-p) mask nn.Dropout draws (the same generator call, so the same mask for
# the same seed), kept as bool and applied with `where` (a dropped NaN/inf input gives 0 rather than
# NaN; the base path carries it anyway); the 1/(1-p) and the scaling act on the r-wide factors,
# never on a full activation (a rounding-level reordering of the same products). With p == 0 there is no mask
# and no copy of x, and the output is bit-identical to the op-for-op path.


def _exact_scale(scaling: float) -> bool:
    """Multiplying by `scaling` commutes with float rounding: 1 or another power of two."""
    return scaling > 0 and math.frexp(scaling)[0] == 0.5


def _lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    p: float,
    fan_in_fan_out: bool,
) -> tuple:
    """The fused forward: (output, x after the dropout mask (2-D), the mask or None, A's output scaled by
    1/(1-p)).

    Without dropout the output equals the general path's `base(x) + (x A^T B^T) * s` bit for bit: the
    update goes into the base result with `addmm_` (which adds the finished product once, like `+`),
    and the scaling rides on the r-wide factor when it is a power of two (exact), else on the product.
    """
    x2 = x.reshape(-1, x.shape[-1])
    w_t = weight if fan_in_fan_out else weight.t()  # (in, out)
    out = torch.mm(x2, w_t) if bias is None else torch.addmm(bias, x2, w_t)
    if p > 0.0:
        mask = torch.empty(x2.shape, dtype=torch.bool, device=x2.device).bernoulli_(1.0 - p)
        x_lora = torch.where(mask, x2, x2.new_zeros(()))
        after_A = torch.mm(x_lora, lora_A.t()).mul_(1.0 / (1.0 - p))  # (tokens, r)
    else:
        mask, x_lora = None, x2
        after_A = torch.mm(x2, lora_A.t())
    if after_A.shape[1] > 1 and _exact_scale(scaling):
        out.addmm_(after_A if scaling == 1.0 else after_A * scaling, lora_B.t())
    else:
        update = torch.mm(after_A, lora_B.t())
        out.add_(update.mul_(scaling) if scaling != 1.0 else update)
    return out.view(*x.shape[:-1], out.shape[-1]), x_lora, mask, after_A


def _lora_linear_no_grad(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    fan_in_fan_out: bool,
) -> torch.Tensor:
    """Inference without dropout: the low-rank update (with the bias as one more rank) is written first
    and the base product accumulates into it inside the big matmul, so the output is written once, as
    for the base layer alone. A rounding-level reordering of the same sum (the autograd path keeps the
    base-then-update order)."""
    x2 = x.reshape(-1, x.shape[-1])
    after_A = torch.mm(x2, lora_A.t())  # (tokens, r)
    up = lora_B.t() * scaling  # (r, out), tiny
    if bias is not None:
        after_A = torch.cat([after_A, after_A.new_ones(after_A.shape[0], 1)], dim=1)
        up = torch.cat([up, bias.unsqueeze(0).to(up.dtype)], dim=0)
    out = torch.mm(after_A, up)
    out.addmm_(x2, weight if fan_in_fan_out else weight.t())
    return out.view(*x.shape[:-1], out.shape[-1])


class _LoraLinearFunction(torch.autograd.Function):
    """y = x W_base^T + b + s * B(A(dropout_p(x))) over a frozen base weight (see above)."""

    @staticmethod
    def forward(ctx: Any, *args: Any) -> torch.Tensor:
        """`args`: those of `_lora_linear` (x, weight, bias, lora_A, lora_B, scaling, p, fan_in_fan_out)."""
        out, x_lora, mask, after_A = _lora_linear(*args)
        x, weight, _, lora_A, lora_B, scaling, p, fan_in_fan_out = args
        ctx.save_for_backward(x_lora, mask, after_A, weight, lora_A, lora_B)
        ctx.scaling, ctx.keep, ctx.fan_in_fan_out, ctx.x_shape = scaling, 1.0 - p, fan_in_fan_out, x.shape
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Optional[torch.Tensor], ...]:
        x_lora, mask, after_A, weight, lora_A, lora_B = ctx.saved_tensors
        g = grad.reshape(-1, grad.shape[-1])
        need_x, _, need_bias, need_A, need_B = ctx.needs_input_grad[:5]
        # d loss / d (A's input after the mask), through B, the scaling and the 1/(1-p): (tokens, r)
        grad_after_A = torch.mm(g, lora_B).mul_(ctx.scaling / ctx.keep)
        grad_x = grad_bias = grad_A = grad_B = None
        if need_x:
            # the adapter's share first (masked in place), then the base's product accumulated into it
            grad_x = torch.mm(grad_after_A, lora_A)
            if mask is not None:
                torch.where(mask, grad_x, grad_x.new_zeros(()), out=grad_x)
            grad_x.addmm_(g, weight.t() if ctx.fan_in_fan_out else weight)
            grad_x = grad_x.view(ctx.x_shape)
        if need_bias:
            grad_bias = g.sum(0)
        if need_A:
            grad_A = torch.mm(grad_after_A.t(), x_lora)
        if need_B:
            grad_B = torch.mm(g.t(), after_A).mul_(ctx.scaling)
        return grad_x, None, grad_bias, grad_A, grad_B, None, None, None
