"""The fused LoRA Linear path: `base(x) + B(A(dropout(x))) * s` as one autograd node.

`LoraLayer`'s Linear wrapper (layer.py) decides when it applies (`Linear._fused_inputs`) and calls
`_LoraLinearFunction` / `_lora_linear_no_grad` / `_lora_linear` from here.
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
# m is an i.i.d. Bernoulli(1-p) keep mask, the distribution nn.Dropout draws. On CPU with p <= 0.25
# (`GEOMETRIC_MAX_P`) it is drawn as the positions of the dropped entries (`drop_positions`: the gaps
# between drops are i.i.d. Geometric(p), about p*N random numbers instead of N Bernoulli draws), applied
# with `put_` to a copy of x and to the input gradient, and saved as those positions (int64, ~p*N of
# them) beside x itself (backward zeroes a copy again, instead of a copy held per layer). Same
# distribution as nn.Dropout's mask, but not the same draw for a given seed (the same seed gives the
# same mask twice). Elsewhere (p > 0.25, other devices) it is the mask nn.Dropout draws (the same
# generator call, so the same mask for the same seed), kept as bool and applied with `where`. Either
# way a dropped NaN/inf input gives 0 rather than NaN (the base path carries it anyway); the 1/(1-p)
# and the scaling act on the r-wide factors, never on a full activation (a rounding-level reordering
# of the same products). With p == 0 there is no mask and no copy of x, and the output is
# bit-identical to the op-for-op path.

# The positions sampler costs ~p * (one Geometric draw) per element against one Bernoulli draw per
# element: several times cheaper for small p, no gain near p = 0.3 and above (measured on CPU).
GEOMETRIC_MAX_P = 0.25
# a chunk of gaps covers the rest of the tensor unless the gaps run this many standard deviations short
_CHUNK_SIGMAS = 6.0


def drop_positions(n: int, p: float, device: Optional[torch.device] = None) -> torch.Tensor:
    """The sorted flat indices (int64) of the dropped entries among `n` i.i.d. Bernoulli(p) trials.

    A Bernoulli(p) process is exactly the set of partial sums of i.i.d. Geometric(p) gaps (the number
    of trials up to and including the next success): drop k sits at G_1 + ... + G_k - 1. Each gap is drawn
    by inversion, G = 1 + floor(log(1 - U) / log(1 - p)) with U uniform in [0, 1) (53-bit float64: then
    P(G > k) = P(1 - U <= (1 - p)^k) = (1 - p)^k), vectorised (a third cheaper than `geometric_`, which
    draws the same way one element at a time); the partial sums are exact integers in float64 below
    2^53. The gaps come in chunks sized to cover `n` with overwhelming probability; a short chunk is
    continued from its last drop with another draw, so the result is the same stream of gaps whatever the
    chunking, and the same for the same generator state.
    """
    if not 0.0 < p < 1.0:
        raise ValueError(f"drop_positions: p must be in (0, 1), got {p}")
    parts = []
    last = -1.0  # position of the previous drop
    inv_log_keep = 1.0 / math.log1p(-p)  # < 0
    while True:
        mean = (n - 1 - last) * p
        chunk = max(1, int(mean + _CHUNK_SIGMAS * math.sqrt(mean * (1.0 - p)) + 16.0))
        uniform = torch.rand(chunk, dtype=torch.float64, device=device)
        positions = torch.log1p(uniform.neg_()).mul_(inv_log_keep).floor_().add_(1.0).cumsum_(0).add_(last)
        end = float(positions[-1])
        if end >= n:
            parts.append(positions[: int(torch.searchsorted(positions, float(n)))])
            break
        parts.append(positions)
        last = end
    return (parts[0] if len(parts) == 1 else torch.cat(parts)).to(torch.int64)


def _dropped_copy(x2: torch.Tensor, p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(x with the dropped entries zeroed, a fresh contiguous copy; what marks them: positions or a bool
    keep mask)."""
    if x2.device.type == "cpu" and p <= GEOMETRIC_MAX_P:
        positions = drop_positions(x2.numel(), p, x2.device)
        return _zeroed_copy(x2, positions), positions
    mask = torch.empty(x2.shape, dtype=torch.bool, device=x2.device).bernoulli_(1.0 - p)
    return torch.where(mask, x2, x2.new_zeros(())), mask


def _zeroed_copy(x2: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """A fresh contiguous copy of x2 with the entries at the (flat) positions zeroed."""
    x_lora = x2.clone(memory_format=torch.contiguous_format)
    _zero_at(x_lora, positions)
    return x_lora


def _zero_dropped(grad: torch.Tensor, dropped: torch.Tensor) -> None:
    """Zero in place the entries of a fresh contiguous (tokens x in) gradient that the mask dropped."""
    if dropped.dtype == torch.bool:
        torch.where(dropped, grad, grad.new_zeros(()), out=grad)
    else:
        _zero_at(grad, dropped)


def _zero_at(t: torch.Tensor, positions: torch.Tensor) -> None:
    """t.view(-1)[positions] = 0 for a contiguous t: `put_` from a stride-0 zero is the cheapest way on CPU (about
    half of `index_fill_`'s time, measured)."""
    if torch.are_deterministic_algorithms_enabled():  # torch flags put_ as nondeterministic (positions are distinct)
        t.view(-1).index_fill_(0, positions, 0.0)
    else:
        t.view(-1).put_(positions, t.new_zeros(()).expand(positions.numel()))


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
    """The fused forward: (output, x after the dropout mask (2-D), what marks the dropped entries (their
    positions or a bool keep mask; None without dropout), A's output scaled by 1/(1-p)).

    Without dropout the output equals the general path's `base(x) + (x A^T B^T) * s` bit for bit: the
    update goes into the base result with `addmm_` (which adds the finished product once, like `+`),
    and the scaling rides on the r-wide factor when it is a power of two (exact), else on the product.
    """
    x2 = x.reshape(-1, x.shape[-1])
    w_t = weight if fan_in_fan_out else weight.t()  # (in, out)
    out = torch.mm(x2, w_t) if bias is None else torch.addmm(bias, x2, w_t)
    if p > 0.0:
        x_lora, mask = _dropped_copy(x2, p)
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
    """Inference without dropout, by whichever of two ways moves fewer bytes (a rounding-level reordering of
    the same sum either way; the autograd path keeps the base-then-update order):

    - many tokens, fp32/fp64: the layer's weight merged on the fly, `W + s B A` into a temporary (the stored
      weight is untouched), then one matmul: the extra work is one pass over the weight instead of passes
      over the (tokens x features) activations. Not in half precision, where rounding the merged weight
      would lose the update's low bits (what the unmerged model exists to avoid).
    - otherwise: the low-rank update (with the bias as one more rank) is written first and the base
      product accumulates into it inside the big matmul, so the output is written once, as for the base
      layer alone.
    """
    x2 = x.reshape(-1, x.shape[-1])
    n_in, n_out = x2.shape[1], lora_B.shape[0]
    if x2.dtype in _MERGE_ON_THE_FLY_DTYPES and x2.shape[0] * (n_in + 2 * n_out) > 2 * n_in * n_out:
        if fan_in_fan_out:  # weight stored (in, out)
            w_t = torch.addmm(weight, lora_A.t(), lora_B.t(), alpha=scaling)
        else:
            w_t = torch.addmm(weight, lora_B, lora_A, alpha=scaling).t()
        out = torch.mm(x2, w_t) if bias is None else torch.addmm(bias, x2, w_t)
        return out.view(*x.shape[:-1], n_out)
    after_A = torch.mm(x2, lora_A.t())  # (tokens, r)
    up = lora_B.t() * scaling  # (r, out), tiny
    if bias is not None:
        after_A = torch.cat([after_A, after_A.new_ones(after_A.shape[0], 1)], dim=1)
        up = torch.cat([up, bias.unsqueeze(0).to(up.dtype)], dim=0)
    out = torch.mm(after_A, up)
    out.addmm_(x2, weight if fan_in_fan_out else weight.t())
    return out.view(*x.shape[:-1], out.shape[-1])


# the dtypes in which inference may merge the weight on the fly (see `_lora_linear_no_grad`)
_MERGE_ON_THE_FLY_DTYPES = (torch.float32, torch.float64)


class _LoraLinearFunction(torch.autograd.Function):
    """y = x W_base^T + b + s * B(A(dropout_p(x))) over a frozen base weight (see above)."""

    @staticmethod
    def forward(ctx: Any, *args: Any) -> torch.Tensor:
        """`args`: those of `_lora_linear` (x, weight, bias, lora_A, lora_B, scaling, p, fan_in_fan_out)."""
        out, x_lora, mask, after_A = _lora_linear(*args)
        x, weight, _, lora_A, lora_B, scaling, p, fan_in_fan_out = args
        if mask is not None and mask.dtype != torch.bool:
            # drop positions: keep x itself rather than the masked copy (no copy of every adapted layer's input
            # held until backward, as without dropout); backward zeroes a copy again for the one matmul that
            # needs it (same step time, measured: the copy costs what holding it costs)
            x_lora = x.reshape(-1, x.shape[-1])
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
                _zero_dropped(grad_x, mask)
            grad_x.addmm_(g, weight.t() if ctx.fan_in_fan_out else weight)
            grad_x = grad_x.view(ctx.x_shape)
        if need_bias:
            grad_bias = g.sum(0)
        if need_A:
            if mask is not None and mask.dtype != torch.bool:
                x_lora = _zeroed_copy(x_lora, mask)
            grad_A = torch.mm(grad_after_A.t(), x_lora)
        if need_B:
            grad_B = torch.mm(g.t(), after_A).mul_(ctx.scaling)
        return grad_x, None, grad_bias, grad_A, grad_B, None, None, None
