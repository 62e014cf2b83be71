"""Adversarial inputs to PiSSA / OLoRA's public entries (tuners/lora/init.py): sizes from a file, NaN tensors in the
initial adapter of `save_pretrained(path_initial_model_for_weight_conversion=...)`."""

from __future__ import annotations

import json
import os
import shutil
import time

import pytest
import torch
from helpers import tiny_gpt2
from safetensors.torch import load_file, save_file

import lightning_peft as lp
from lightning_peft.tuners.lora.init import MAX_PISSA_NITER


@pytest.fixture(scope="module")
def saved_pissa(tmp_path_factory: pytest.TempPathFactory) -> tuple[lp.PeftModel, str]:
    model = lp.get_peft_model(
        tiny_gpt2(), lp.LoraConfig(r=2, lora_alpha=4, init_lora_weights="pissa", target_modules=["c_attn"])
    )
    folder = str(tmp_path_factory.mktemp("pissa") / "initial")
    model.save_pretrained(folder)
    return model, folder


@pytest.mark.parametrize("niter", [str(MAX_PISSA_NITER + 1), "99999999999", "9" * 5000])
def test_pissa_niter_above_the_cap_is_refused(niter: str) -> None:
    with pytest.raises(ValueError, match=f"at most {MAX_PISSA_NITER} iterations"):
        lp.LoraConfig(init_lora_weights=f"pissa_niter_{niter}")
    lp.LoraConfig(init_lora_weights=f"pissa_niter_{MAX_PISSA_NITER}")  # the cap itself is taken
    lp.LoraConfig(init_lora_weights="pissa_niter_0004")


def test_from_pretrained_with_huge_niter_in_the_file_is_refused_fast(saved_pissa, tmp_path) -> None:
    _, initial = saved_pissa
    folder = tmp_path / "huge"
    shutil.copytree(initial, folder)
    config = json.loads((folder / "adapter_config.json").read_text())
    config["init_lora_weights"] = "pissa_niter_99999999999"
    (folder / "adapter_config.json").write_text(json.dumps(config))
    base = tiny_gpt2()
    before = {k: v.clone() for k, v in base.state_dict().items()}
    start = time.perf_counter()
    with pytest.raises(ValueError, match="at most"):
        lp.PeftModel.from_pretrained(base, str(folder))
    assert time.perf_counter() - start < 10
    assert all(torch.equal(before[k], v) for k, v in base.state_dict().items())


def test_conversion_refuses_an_initial_adapter_with_nan(saved_pissa, tmp_path) -> None:
    model, initial = saved_pissa
    broken = tmp_path / "broken"
    broken.mkdir()
    tensors = load_file(os.path.join(initial, "adapter_model.safetensors"))
    key = sorted(tensors)[0]
    tensors[key][0, 0] = float("nan")
    save_file(tensors, str(broken / "adapter_model.safetensors"), metadata={"format": "pt"})
    out = tmp_path / "out"
    with pytest.raises(ValueError, match="NaN or inf.*" + key.replace(".", r"\.")):
        model.save_pretrained(str(out), path_initial_model_for_weight_conversion=str(broken))
    assert not out.exists()  # nothing written


def test_conversion_refused_when_two_adapters_changed_the_base(tmp_path) -> None:
    """Each PiSSA adapter took its start out of the base; converting either against the original base alone would
    give another model (HF PEFT writes it silently)."""
    config = dict(r=2, lora_alpha=4, init_lora_weights="pissa", target_modules=["c_attn"])
    model = lp.get_peft_model(tiny_gpt2(), lp.LoraConfig(**config))
    initial = tmp_path / "initial"
    model.save_pretrained(str(initial))
    model.add_adapter("other", lp.LoraConfig(**config))
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=r"\['default', 'other'\] each replaced the base"):
        model.save_pretrained(
            str(out), selected_adapters=["default"], path_initial_model_for_weight_conversion=str(initial)
        )
    assert not out.exists()  # nothing written
