"""Review of the PiSSA / OLoRA / LoftQ starts (tuners/lora/init.py): calls that fail after an initialisation changed
base weights give the base back, and re-loading into an existing adapter does not run the initialisation again on
the base it already changed (HF PEFT has neither guarantee: its loads are not strict and it re-runs the init)."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import edit_config, ids, logits, perturb, quiet, snapshot, tiny_llama, unchanged
from safetensors.torch import load_file, save_file

import lightning_peft as lp

TARGETS = ["q_proj", "v_proj"]


@pytest.fixture(scope="module")
def llama():
    return tiny_llama()


def pissa(init="pissa", **kwargs):
    return lp.LoraConfig(**{"r": 4, "lora_alpha": 8, "target_modules": TARGETS, "init_lora_weights": init, **kwargs})


@pytest.fixture(scope="module")
def saved(llama, tmp_path_factory):
    """A trained PiSSA adapter's folder, a copy whose file holds a NaN, and the model that wrote them."""
    folder = tmp_path_factory.mktemp("pissa")
    model = quiet(lp.get_peft_model, copy.deepcopy(llama), pissa()).eval()
    perturb(model)
    model.save_pretrained(folder / "good")
    model.save_pretrained(folder / "nan")
    tensors = load_file(folder / "nan" / "adapter_model.safetensors")
    key = sorted(tensors)[0]
    tensors[key] = tensors[key].clone()
    tensors[key].view(-1)[0] = float("nan")
    save_file(tensors, folder / "nan" / "adapter_model.safetensors", metadata={"format": "pt"})
    return folder, model


def test_refused_from_pretrained_gives_the_base_back(llama, saved):
    folder, _ = saved
    base = copy.deepcopy(llama)
    before = snapshot(base)
    with pytest.raises(ValueError, match="NaN"):
        quiet(lp.PeftModel.from_pretrained, base, folder / "nan")
    assert unchanged(base, before)  # not left holding the residual W - s B A
    torch.testing.assert_close(logits(base, ids()), logits(llama, ids()), atol=0, rtol=0)


def test_refused_load_adapter_leaves_the_model_as_it_was(llama, saved):
    folder, _ = saved
    model = quiet(lp.get_peft_model, copy.deepcopy(llama), lp.LoraConfig(r=2, target_modules=TARGETS))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="NaN"):
        quiet(model.load_adapter, folder / "nan", "other")
    after = model.state_dict()
    assert sorted(after) == sorted(before)
    for key, value in before.items():
        torch.testing.assert_close(after[key], value, atol=0, rtol=0, msg=key)


@pytest.mark.parametrize("changes", [{}, {"lora_dropout": 0.1}])
def test_load_into_the_existing_pissa_adapter_keeps_the_residual(llama, saved, tmp_path, changes):
    """Into the model's own PiSSA adapter: a file whose config differs (here only in auto_mapping, or also in a
    field the rebuild compares) must not run the SVD again on the already-residual base."""
    folder, written = saved
    target = tmp_path / "copy"
    written.save_pretrained(target)
    if changes:
        edit_config(target, **changes)
    model = quiet(lp.get_peft_model, copy.deepcopy(llama), pissa())
    quiet(model.load_adapter, target, "default")
    model.eval()
    torch.testing.assert_close(logits(model, ids()), logits(written, ids()), atol=1e-5, rtol=0)


@pytest.mark.parametrize("init", ["pissa", "olora", "loftq"])
def test_interrupted_creation_gives_the_base_back(llama, monkeypatch, init):
    """A Ctrl-C (or an out-of-memory) during the second layer's decomposition: the first layer's base weight must not
    stay a residual / quantised copy."""
    extra = {"lora_alpha": 4, "loftq_config": lp.LoftQConfig()} if init == "loftq" else {}
    real = {"qr": torch.linalg.qr, "svd": torch.linalg.svd}
    calls = []

    def failing(name):
        def call(*args, **kwargs):
            calls.append(name)
            if len(calls) == 2:
                raise KeyboardInterrupt
            return real[name](*args, **kwargs)

        return call

    monkeypatch.setattr(torch.linalg, "qr", failing("qr"))
    monkeypatch.setattr(torch.linalg, "svd", failing("svd"))
    base = copy.deepcopy(llama)
    before = snapshot(base)
    with pytest.raises(KeyboardInterrupt):
        quiet(lp.get_peft_model, base, pissa(init, **extra))
    assert unchanged(base, before)
    # and a second adapter interrupted the same way: the first adapter's residual stays as it was
    monkeypatch.undo()
    model = quiet(lp.get_peft_model, copy.deepcopy(llama), pissa())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    calls.clear()
    monkeypatch.setattr(torch.linalg, "qr", failing("qr"))
    monkeypatch.setattr(torch.linalg, "svd", failing("svd"))
    with pytest.raises(KeyboardInterrupt):
        quiet(model.add_adapter, "second", pissa(init, **extra))
    after = model.state_dict()
    assert sorted(after) == sorted(before)
    for key, value in before.items():
        torch.testing.assert_close(after[key], value, atol=0, rtol=0, msg=key)
