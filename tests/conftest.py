"""Fixtures shared by the test files; the helpers themselves (tiny models, inputs, ...) live in tests/helpers.py."""

from __future__ import annotations

import copy
import os
from pathlib import Path

import pytest
import torch
from helpers import GPT2_LORA, ids, tiny_gpt2

import lightning_peft as lp

REPO_ROOT = Path(__file__).resolve().parent.parent
# what the tooling itself leaves in the checkout; anything else new there after the run is a test writing into cwd
TOOLING_LEFTOVERS = {".pytest_cache", ".mypy_cache", ".ruff_cache", "__pycache__"}


@pytest.fixture(scope="session", autouse=True)
def tests_leave_the_checkout_alone():
    """A test whose trainer or export forgets its folder writes into the working directory (the checkout): fail the
    run, naming what appeared, instead of leaving adapter/ or lightning_logs/ beside the sources."""
    before = set(os.listdir(REPO_ROOT))
    yield
    appeared = sorted(set(os.listdir(REPO_ROOT)) - before - TOOLING_LEFTOVERS)
    assert not appeared, f"tests wrote into the checkout: {appeared}; give each Trainer / export a tmp_path"


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
