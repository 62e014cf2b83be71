"""Error messages fixed after the issue-13 review: each names what is wrong and what to do, and the call changes
nothing; PeftConfig.save_pretrained ignores keywords that are no settings, as HF PEFT does."""

from __future__ import annotations

import json
import os

import peft
import pytest
import torch
from helpers import GPT2_LORA, quiet, snapshot, tiny_gpt2, unchanged

import lightning_peft as lp
from lightning_peft.utils.hotswap import prepare_model_for_compiled_hotswap


@pytest.fixture(scope="module")
def lora_model():
    return lp.get_peft_model(tiny_gpt2(), lp.LoraConfig(**GPT2_LORA))


def test_hotswap_names_its_check_compiled_parameter(lora_model):
    before = snapshot(lora_model)
    with pytest.raises(ValueError, match=r"^check_compiled should be one of"):
        prepare_model_for_compiled_hotswap(lora_model, check_compiled="sometimes")
    assert unchanged(lora_model, before)


def test_auto_class_constructor_names_only_from_pretrained():
    for lib in (peft, lp):  # the same type as HF PEFT's
        with pytest.raises(OSError, match=r"from_pretrained\(pretrained_model_name_or_path\)") as err:
            lib.AutoPeftModelForCausalLM()
    assert "from_config" not in str(err.value)


def test_status_of_prompt_learning_says_what_to_read_instead():
    model = quiet(lp.get_peft_model, tiny_gpt2(), lp.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2))
    with pytest.raises(TypeError, match=r"invalid PeftModel.*PROMPT_TUNING.*print_trainable_parameters"):
        lp.get_layer_status(model)
    assert "adaption prompt" not in str(pytest.raises(TypeError, lp.get_model_status, model).value)


def test_a_refused_key_from_a_file_says_what_to_do(tmp_path):
    data = lp.IA3Config(target_modules=["c_attn"], feedforward_modules=[]).to_dict()
    data["use_dora"] = True  # a LoRA feature, refused in any tuner's file
    with pytest.raises(ValueError, match=r"use_dora=True.*Load it with HF PEFT"):
        lp.PeftConfig.from_dict(data)
    data["use_dora"] = 0  # off, as HF PEFT reads it: dropped silently
    assert isinstance(lp.PeftConfig.from_dict(data), lp.IA3Config)


def test_integer_tensors_are_refused_for_files_and_in_memory_dicts(lora_model):
    state = lp.get_peft_model_state_dict(lora_model)
    bad = {k: v.to(torch.int64) for k, v in state.items()}
    before = snapshot(lora_model)
    with pytest.raises(ValueError, match=r"not made by get_peft_model_state_dict / save_pretrained"):
        lp.set_peft_model_state_dict(lora_model, bad)
    assert unchanged(lora_model, before)


def test_config_save_pretrained_ignores_push_to_hub_keywords_as_hf(tmp_path):
    for lib, folder in ((peft, tmp_path / "hf"), (lp, tmp_path / "ours")):
        lib.LoraConfig(**GPT2_LORA).save_pretrained(
            str(folder), push_to_hub=False, commit_message="x", auto_mapping_dict={"base_model_class": "GPT2"}
        )
    ours = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    theirs = json.loads((tmp_path / "hf" / "adapter_config.json").read_text())
    assert "push_to_hub" not in ours and "commit_message" not in ours
    assert ours["auto_mapping"] == theirs["auto_mapping"] == {"base_model_class": "GPT2"}
    assert os.listdir(tmp_path / "ours") == ["adapter_config.json"]
