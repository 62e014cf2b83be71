"""Final review (R4): create_loraplus_optimizer refuses a weight decay that is not finite, changing nothing."""

from __future__ import annotations

import pytest
import torch
from helpers import tiny_gpt2

import lightning_peft as lp
from lightning_peft.optimizers import create_loraplus_optimizer


@pytest.mark.parametrize("weight_decay", [float("inf"), float("nan")])
def test_loraplus_refuses_a_weight_decay_that_is_not_finite(weight_decay):
    model = lp.get_peft_model(tiny_gpt2(), lp.LoraConfig(target_modules=["c_attn"], fan_in_fan_out=True))
    before = {n: (p.requires_grad, p.detach().clone()) for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match=r"weight_decay must be a number >= 0 \(a finite one\), got (inf|nan)"):
        create_loraplus_optimizer(
            model, torch.optim.AdamW, lr=1e-3, loraplus_lr_ratio=16, loraplus_weight_decay=weight_decay
        )
    after = dict(model.named_parameters())
    assert all(after[n].requires_grad == g and torch.equal(after[n], v) for n, (g, v) in before.items())
    create_loraplus_optimizer(model, torch.optim.AdamW, lr=1e-3, loraplus_lr_ratio=16, loraplus_weight_decay=1e9)
