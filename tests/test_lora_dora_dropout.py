"""DoRA's one-node Linear / Conv1D step with dropout in training (`dora._DoraDropoutLinearFunction`).

HF PEFT's definition: `base(x) + (m/n - 1) * dropout(x) W^T + (m/n) * s * B(A(dropout(x)))`, n detached. The node
draws the mask as the fused LoRA path does (drop positions on CPU for p <= 0.25, nn.Dropout's own mask above), so
its values and gradients must equal that formula written op for op with the same mask; gradcheck in float64.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_peft.tuners.lora import Linear, dora, fused


def test_node_passes_gradcheck_in_double():
    """Both mask kinds (positions for p <= 0.25, bool above); the seed is reset so every call draws the same mask."""
    gen = torch.Generator().manual_seed(0)

    def leaf(*shape, offset=0.0):
        return (torch.randn(*shape, generator=gen, dtype=torch.double) + offset).requires_grad_()

    result, x, A, B, magnitude = leaf(3, 5), leaf(3, 4), leaf(2, 4), leaf(5, 2), leaf(5, offset=2.0)
    weight = torch.randn(5, 4, generator=gen, dtype=torch.double)
    inv_norm = torch.rand(5, generator=gen, dtype=torch.double) + 0.5
    for p in (0.2, 0.5):

        def node(result, x, A, B, magnitude, p=p):
            torch.manual_seed(3)
            return dora._DoraDropoutLinearFunction.apply(result, x, weight, A, B, magnitude, inv_norm, 0.7, p)

        assert torch.autograd.gradcheck(node, (result, x, A, B, magnitude))


def _layer(kind: str, p: float) -> Linear:
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    base = nn.Linear(32, 24) if kind == "linear" else Conv1D(24, 32)
    base.requires_grad_(False)
    layer = Linear(base, "default", r=4, lora_alpha=12, lora_dropout=p, fan_in_fan_out=kind == "conv1d", use_dora=True)
    nn.init.normal_(layer.lora_B["default"].weight)  # B = 0 would hide the adapter's share
    return layer.train()


def _step(layer: Linear, x: torch.Tensor, forward) -> tuple:
    xg = x.clone().requires_grad_(True)
    out = forward(xg)
    (out * torch.linspace(-1, 1, out.shape[-1])).sum().backward()
    grads = {n: q.grad.clone() for n, q in layer.named_parameters() if q.grad is not None}
    for q in layer.parameters():
        q.grad = None
    return out.detach(), xg.grad, grads


def _op_for_op(layer: Linear, x: torch.Tensor, keep: torch.Tensor, p: float) -> torch.Tensor:
    base = layer.base_layer
    weight = base.weight.t() if layer.fan_in_fan_out else base.weight
    magnitude = layer.lora_magnitude_vector["default"].weight
    k = magnitude / dora.weight_norm(layer, "default")
    dropped = x * keep / (1 - p)
    lora = layer.lora_B["default"](layer.lora_A["default"](dropped)) * layer.scaling["default"]
    return base(x) + (k - 1) * torch.nn.functional.linear(dropped, weight) + k * lora


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
@pytest.mark.parametrize("p", [0.1, 0.5])
def test_layer_equals_the_op_for_op_formula_with_the_same_mask(kind, p):
    layer = _layer(kind, p)
    x = torch.randn(4, 50, 32) + 3.0  # no zeros in x: a dropped entry is visible in A's gradient
    torch.manual_seed(5)
    out, grad_x, grads = _step(layer, x, layer)
    assert out.shape == (4, 50, 24)

    # the mask the node drew from the same generator state: positions (p <= 0.25 on CPU) or nn.Dropout's own
    torch.manual_seed(5)
    if p <= fused.GEOMETRIC_MAX_P:
        keep = torch.ones(x.numel())
        keep[fused.drop_positions(x.numel(), p)] = 0.0
        keep = keep.view(x.shape)
    else:
        keep = torch.empty(x.shape, dtype=torch.bool).bernoulli_(1.0 - p).to(x.dtype)
    assert 0 < int((keep == 0).sum()) < x.numel() * 2 * p
    ref_out, ref_grad_x, ref_grads = _step(layer, x, lambda xr: _op_for_op(layer, xr, keep, p))

    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grad_x, ref_grad_x, atol=1e-5, rtol=1e-5)
    assert (
        set(grads)
        == set(ref_grads)
        == {
            "lora_A.default.weight",
            "lora_B.default.weight",
            "lora_magnitude_vector.default.weight",
        }
    )
    for name, grad in grads.items():
        torch.testing.assert_close(grad, ref_grads[name], atol=1e-4, rtol=1e-5, msg=name)


def test_large_p_draws_nn_dropouts_mask_as_the_op_for_op_path(monkeypatch):
    """p > 0.25: the node's mask is the one nn.Dropout draws for the same seed (the op-for-op path, as HF PEFT)."""
    layer = _layer("linear", 0.5)
    x = torch.randn(3, 7, 32)
    torch.manual_seed(9)
    out, grad_x, grads = _step(layer, x, layer)
    monkeypatch.setattr(dora, "_fast_path", lambda *a: None)
    torch.manual_seed(9)
    ref_out, ref_grad_x, ref_grads = _step(layer, x, layer)
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grad_x, ref_grad_x, atol=1e-5, rtol=1e-5)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, ref_grads[name], atol=1e-4, rtol=1e-5, msg=name)


def test_node_runs_only_where_it_computes_the_same():
    layer = _layer("linear", 0.1)
    x = torch.randn(2, 3, 32, requires_grad=True)
    assert type(layer(x).grad_fn).__name__ == "_DoraDropoutLinearFunctionBackward"
    layer.eval()  # no dropout at work: the no-dropout node
    assert type(layer(x).grad_fn).__name__ == "_DoraLinearFunctionBackward"
    layer.train()
    layer.base_layer.weight.requires_grad_(True)  # a trained base weight: op for op (the node treats W as frozen)
    assert "DoraDropout" not in type(layer(x).grad_fn).__name__
    layer.base_layer.weight.requires_grad_(False)
    handle = layer.lora_dropout["default"].register_forward_hook(lambda *a: None)  # a hooked dropout: op for op
    assert "DoraDropout" not in type(layer(x).grad_fn).__name__
    handle.remove()
    layer.lora_dropout["default"] = nn.Dropout(p=0.1, inplace=True)  # in place: op for op
    assert "DoraDropout" not in type(layer(x * 1.0).grad_fn).__name__
