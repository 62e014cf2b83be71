"""The fused LoRA Linear path at inference (no grad, no dropout): with many tokens in fp32 it merges the
weight on the fly into a temporary (one pass over the weight instead of over the activations); the result
is the op-for-op sum up to rounding, the stored weights stay as they were, and half precision or few tokens
keep the unmerged product."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from lightning_peft.tuners.lora import Linear
from lightning_peft.tuners.lora import fused as lora_fused


def _layer(kind: str, bias: bool, dtype: torch.dtype = torch.float32) -> Linear:
    torch.manual_seed(0)
    base = nn.Linear(48, 40, bias=bias) if kind == "linear" else Conv1D(40, 48)
    base.requires_grad_(False)
    layer = Linear(base, "default", r=4, lora_alpha=12, fan_in_fan_out=kind == "conv1d", init_lora_weights=False)
    return layer.to(dtype).eval()


def _spy(monkeypatch) -> list:
    merged = []
    real = lora_fused.torch.addmm

    def addmm(*args, **kwargs):  # the on-the-fly merge is the one addmm with an `alpha`
        if "alpha" in kwargs:
            merged.append(args[0].shape)
        return real(*args, **kwargs)

    monkeypatch.setattr(lora_fused.torch, "addmm", addmm)
    return merged


@pytest.mark.parametrize(("kind", "bias"), [("linear", True), ("linear", False), ("conv1d", True)])
def test_many_tokens_merge_on_the_fly_and_match_the_general_path(kind, bias, monkeypatch):
    layer = _layer(kind, bias)
    weights = {n: p.detach().clone() for n, p in layer.named_parameters()}
    x = torch.randn(4, 64, 48)  # 256 tokens: the merge moves fewer bytes
    expected = layer._forward_with_adapter_modules(x).detach()
    merged = _spy(monkeypatch)
    with torch.inference_mode():
        out = layer(x)
    assert len(merged) == 1
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    assert out.shape == expected.shape and out.is_contiguous()
    for name, p in layer.named_parameters():  # the stored weights are untouched
        assert torch.equal(p.detach(), weights[name]), name


def test_few_tokens_and_half_precision_keep_the_unmerged_product(monkeypatch):
    merged = _spy(monkeypatch)
    layer = _layer("linear", True)
    x = torch.randn(2, 48)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), layer._forward_with_adapter_modules(x), atol=1e-6, rtol=1e-6)
    bf16 = _layer("linear", True, torch.bfloat16)
    xb = torch.randn(256, 48, dtype=torch.bfloat16)
    with torch.no_grad():
        out = bf16(xb)
        base = bf16.base_layer(xb).float()
        A, B = bf16.lora_A["default"].weight.float(), bf16.lora_B["default"].weight.float()
        update = xb.float() @ A.T @ B.T * bf16.scaling["default"]
    torch.testing.assert_close(out.float(), base + update, atol=0.05, rtol=0.02)
    assert merged == []
