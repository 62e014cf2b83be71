"""Fixtures shared by the test files; the helpers themselves (tiny models, inputs, ...) live in tests/helpers.py."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import GPT2_LORA, ids, tiny_gpt2

import lightning_peft as lp


@pytest.fixture
def token_ids() -> torch.Tensor:
    return ids()


@pytest.fixture
def saved_adapter(tmp_path):
    """An adapter of tiny GPT-2 with non-zero weights, and the base it belongs to."""
    base = tiny_gpt2()
    model = lp.get_peft_model(copy.deepcopy(base), lp.LoraConfig(**GPT2_LORA))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.fill_(0.01)
    folder = tmp_path / "adapter"
    model.save_pretrained(folder)
    return base, folder
