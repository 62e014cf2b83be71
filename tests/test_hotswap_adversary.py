"""Adversarial inputs to the hot-swap entries (tuners/lora/hotswap.py): paths and wrong types; a refused swap leaves
the adapter as it was."""

from __future__ import annotations

import os

import pytest
import torch
from helpers import tiny_gpt2

import lightning_peft as lp
from lightning_peft.utils.error import AdapterNotFoundError
from lightning_peft.utils.hotswap import hotswap_adapter, hotswap_adapter_from_state_dict


@pytest.fixture(scope="module")
def swapped(tmp_path_factory: pytest.TempPathFactory) -> tuple[lp.PeftModel, str]:
    model = lp.get_peft_model(tiny_gpt2(), lp.LoraConfig(r=2, target_modules=["c_attn"]))
    folder = str(tmp_path_factory.mktemp("hotswap") / "adapter")
    model.save_pretrained(folder)
    return model, folder


def _snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _same(model: torch.nn.Module, before: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_paths_as_names_and_files_as_folders(swapped) -> None:
    model, folder = swapped
    before = _snapshot(model)
    for name in ("../default", "default/x", os.path.join(folder, "default")):
        with pytest.raises(ValueError, match="no adapter named"):
            hotswap_adapter(model, folder, name)
    with pytest.raises(AdapterNotFoundError, match="is a file"):
        hotswap_adapter(model, os.path.join(folder, "adapter_model.safetensors"), "default")
    with pytest.raises(AdapterNotFoundError, match="does not exist"):
        hotswap_adapter(model, os.path.join(folder, "missing"), "default")
    assert _same(model, before)


def test_state_dict_of_wrong_types(swapped) -> None:
    model, _ = swapped
    config = model.peft_config["default"]
    before = _snapshot(model)
    with pytest.raises(TypeError, match="state_dict must be a dict"):
        hotswap_adapter_from_state_dict(model, [torch.zeros(1)], "default", config)
    with pytest.raises(TypeError, match="keys must be parameter names"):
        hotswap_adapter_from_state_dict(model, {1: torch.zeros(1)}, "default", config)
    with pytest.raises(TypeError, match="not a tensor"):
        hotswap_adapter_from_state_dict(model, {"x.lora_A.default.weight": [0.0]}, "default", config)
    assert _same(model, before)
