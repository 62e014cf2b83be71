"""A refused `update_layer` (bad r, lora_alpha or lora_dropout) leaves the LoRA layer as it was."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_peft.tuners.lora.layer import Linear


def _state(layer: Linear) -> tuple:
    return (
        dict(layer.r),
        dict(layer.lora_alpha),
        dict(layer.scaling),
        list(layer.lora_dropout),
        list(layer.lora_A),
        list(layer.lora_B),
        list(layer.active_adapters),
    )


@pytest.mark.parametrize(
    ("options", "error", "match"),
    [
        (dict(r=2.5), TypeError, "r must be a positive integer"),
        (dict(r=float("nan")), TypeError, "r must be a positive integer"),
        (dict(r="2"), TypeError, "r must be a positive integer"),
        (dict(r=0), ValueError, "r must be a positive integer"),
        (dict(lora_alpha="8"), TypeError, None),
        (dict(lora_dropout=1.5), ValueError, "dropout probability"),
        (dict(lora_dropout="0.1"), TypeError, None),
    ],
)
def test_refused_update_layer_changes_nothing(options: dict, error: type, match: str | None) -> None:
    torch.manual_seed(0)
    layer = Linear(nn.Linear(4, 3), "a", r=2)
    before = _state(layer)
    arguments = dict(r=2, lora_alpha=4, lora_dropout=0.0, init_lora_weights=True) | options
    with pytest.raises(error, match=match):
        layer.update_layer("x", **arguments)
    assert _state(layer) == before
    layer.update_layer("x", r=2, lora_alpha=4, lora_dropout=0.0, init_lora_weights=True)  # the name is still free
    assert "x" in layer.lora_A and layer.scaling["x"] == 2.0


def test_numpy_integer_rank_still_accepted() -> None:
    np = pytest.importorskip("numpy")
    layer = Linear(nn.Linear(4, 3), "a", r=np.int64(2))
    assert layer.lora_A["a"].weight.shape == (2, 4)
