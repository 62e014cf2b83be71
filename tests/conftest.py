"""Fixtures shared by the test files; the helpers themselves (tiny models, inputs, ...) live in tests/helpers.py."""

from __future__ import annotations

import pytest
import torch
from helpers import ids


@pytest.fixture
def token_ids() -> torch.Tensor:
    return ids()
