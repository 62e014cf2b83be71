"""The fused LoRA Linear path computes what the op-for-op path computes (values, gradients, dropout draws)."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from lightning_peft.tuners.lora import Linear
from lightning_peft.tuners.lora import layer as lora_layer


def _layer(kind: str, dropout: float = 0.0, alpha: float = 8, bias_grad: bool = False) -> Linear:
    torch.manual_seed(0)
    base = nn.Linear(16, 24) if kind == "linear" else Conv1D(24, 16)
    base.requires_grad_(False)
    layer = Linear(
        base,
        "default",
        r=4,
        lora_alpha=alpha,
        lora_dropout=dropout,
        fan_in_fan_out=kind == "conv1d",
        init_lora_weights=False,
    )
    if bias_grad:
        base.bias.requires_grad_(True)
    return layer


def _run(layer: Linear, x: torch.Tensor, fused: bool, seed: int = 7):
    for p in layer.parameters():
        p.grad = None
    x = x.clone().requires_grad_(True)
    torch.manual_seed(seed)
    out = layer(x) if fused else layer._forward_with_adapter_modules(x)
    (out * torch.linspace(-1, 1, out.shape[-1])).sum().backward()
    grads = {n: p.grad.clone() for n, p in layer.named_parameters() if p.grad is not None}
    return out.detach(), x.grad, grads


def _count_fused(monkeypatch) -> dict:
    calls = {"n": 0}
    apply = lora_layer._LoraLinearFunction.apply

    def counting(*args):
        calls["n"] += 1
        return apply(*args)

    monkeypatch.setattr(lora_layer._LoraLinearFunction, "apply", counting)
    return calls


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
@pytest.mark.parametrize("alpha", [8, 12, 4])  # scaling 2 (power of two), 3, 1
@pytest.mark.parametrize("bias_grad", [False, True])
def test_fused_equals_general_without_dropout(kind, alpha, bias_grad, monkeypatch):
    layer = _layer(kind, alpha=alpha, bias_grad=bias_grad)
    x = torch.randn(3, 5, 16)
    calls = _count_fused(monkeypatch)
    out_f, gx_f, g_f = _run(layer, x, fused=True)
    assert calls["n"] == 1
    out_g, gx_g, g_g = _run(layer, x, fused=False)
    assert torch.equal(out_f, out_g)  # bit for bit
    torch.testing.assert_close(gx_f, gx_g, atol=1e-6, rtol=1e-6)
    assert g_f.keys() == g_g.keys()
    for name in g_f:
        torch.testing.assert_close(g_f[name], g_g[name], atol=1e-6, rtol=1e-6, msg=name)


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_fused_dropout_draws_the_same_mask(kind):
    # p = 0.3 > GEOMETRIC_MAX_P: nn.Dropout's own mask. Below it (on CPU) the mask has the same distribution
    # but another draw: tests/test_lora_dropout_sampler.py checks that path against its own mask
    layer = _layer(kind, dropout=0.3).train()
    x = torch.randn(4, 6, 16) + 2.0  # no zeros in x: a dropped entry is visible in A's gradient
    out_f, gx_f, g_f = _run(layer, x, fused=True)
    out_g, gx_g, g_g = _run(layer, x, fused=False)
    torch.testing.assert_close(out_f, out_g, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gx_f, gx_g, atol=1e-5, rtol=1e-5)
    for name in g_f:
        torch.testing.assert_close(g_f[name], g_g[name], atol=1e-5, rtol=1e-5, msg=name)
    # and another seed draws another mask
    out_other = _run(layer, x, fused=True, seed=8)[0]
    assert not torch.allclose(out_other, out_f)


def test_dropout_only_in_training_mode():
    layer = _layer("linear", dropout=0.5).eval()
    x = torch.randn(2, 16)
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    no_dropout = layer.base_layer(x) + x @ A.T @ B.T * layer.scaling["default"]
    torch.testing.assert_close(layer(x), layer._forward_with_adapter_modules(x), atol=0, rtol=0)
    torch.testing.assert_close(layer(x), no_dropout, atol=1e-5, rtol=0)
    layer.train()
    assert not torch.allclose(layer(x), no_dropout, atol=1e-3)  # training mode does drop


def test_inference_mode_and_frozen_adapter_take_the_graphless_path(monkeypatch):
    layer = _layer("linear")
    x = torch.randn(2, 3, 16)
    expected = layer._forward_with_adapter_modules(x).detach()
    calls = _count_fused(monkeypatch)
    with torch.inference_mode():  # the update is summed before the base product there: rounding only
        torch.testing.assert_close(layer(x), expected, atol=1e-6, rtol=1e-6)
    layer.requires_grad_(False)
    out = layer(x)
    assert not out.requires_grad
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-6)
    layer.base_layer.bias = None  # no bias: no extra rank
    torch.testing.assert_close(layer(x), layer._forward_with_adapter_modules(x), atol=1e-6, rtol=1e-6)
    assert calls["n"] == 0


def test_general_path_when_fused_would_differ(monkeypatch):
    layer = _layer("linear")
    layer.update_layer("second", r=2, lora_alpha=2, lora_dropout=0.0, init_lora_weights=False)
    x = torch.randn(2, 16)
    calls = _count_fused(monkeypatch)
    layer.set_adapter(["default", "second"])  # two active adapters: both deltas added
    expected = layer.base_layer(x) + sum(
        layer.lora_B[n](layer.lora_A[n](x)) * layer.scaling[n] for n in ("default", "second")
    )
    torch.testing.assert_close(layer(x), expected, atol=1e-6, rtol=0)
    layer.set_adapter("default")
    seen = []
    handle = layer.base_layer.register_forward_hook(lambda m, i, o: seen.append(1))
    layer(x)  # a hooked base must run as a module
    handle.remove()
    assert seen == [1] and calls["n"] == 0
    layer.base_layer.weight.requires_grad_(True)  # a trainable base weight needs its own gradient
    layer(x).sum().backward()
    assert layer.base_layer.weight.grad is not None and calls["n"] == 0
    layer.base_layer.weight.requires_grad_(False)
    layer(x)
    assert calls["n"] == 1


def test_merged_and_disabled_layers_skip_the_adapter():
    layer = _layer("linear")
    x = torch.randn(2, 16)
    base = layer.base_layer(x)
    unmerged = layer(x)
    layer.merge()
    torch.testing.assert_close(layer(x), unmerged, atol=1e-5, rtol=0)
    layer.unmerge()
    layer.enable_adapters(False)
    torch.testing.assert_close(layer(x), base, atol=1e-5, rtol=0)  # W + dW - dW: rounding only


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_in_place_merge_adds_the_delta_once(kind, dtype):
    layer = _layer(kind)
    layer.base_layer.to(dtype)
    layer._MERGE_ROWS = 5  # several blocks, one partial
    original = layer.base_layer.weight.detach().clone()
    delta = layer.get_delta_weight("default")
    layer.merge()
    expected = (original.float() + delta).to(dtype)  # one rounding of the fp32 sum
    tol = dict(atol=1e-6, rtol=1e-6) if dtype == torch.float32 else dict(atol=0, rtol=0)
    torch.testing.assert_close(layer.base_layer.weight.detach(), expected, **tol)
    layer.unmerge()
    torch.testing.assert_close(layer.base_layer.weight.detach().float(), original.float(), atol=1e-2, rtol=0)
