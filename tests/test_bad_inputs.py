"""A catalogue of bad inputs to the tuner API and adapter files: each gets an error that says what to
do, and leaves the model (and the files) as they were."""

from __future__ import annotations

import copy
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import lightning_peft as lp
from conftest import tiny_gpt2, tiny_llama

GPT2_LORA = dict(target_modules=["c_attn"], fan_in_fan_out=True)


def _snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _unchanged(model: torch.nn.Module, before: dict[str, torch.Tensor]) -> bool:
    after = model.state_dict()
    return sorted(after) == sorted(before) and all(torch.equal(after[k], v) for k, v in before.items())


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


def _load_fails(base, folder, match, **kwargs):
    before = _snapshot(base)
    with pytest.raises((ValueError, FileNotFoundError, TypeError), match=match):
        lp.PeftModel.from_pretrained(base, folder, **kwargs)
    assert _unchanged(base, before), "a failed load must leave the base model untouched"


# ---- configs ---------------------------------------------------------------------------------
def test_unknown_tuner():
    with pytest.raises(ValueError, match="unknown peft_type 'LOHA'; lightning_peft knows: LORA, IA3"):
        lp.PeftConfig.from_dict({"peft_type": "LOHA", "r": 8})


def test_config_without_peft_type():
    with pytest.raises(ValueError, match="no 'peft_type'; say which tuner"):
        lp.PeftConfig.from_dict({"r": 8})


@pytest.mark.parametrize("kwargs,error,message", [
    (dict(r="8"), ValueError, "r must be a positive integer"),
    (dict(lora_alpha="16"), TypeError, "lora_alpha must be a number"),
    (dict(lora_dropout=-0.1), ValueError, r"lora_dropout must be a number in \[0, 1\)"),
    (dict(target_modules=[3]), TypeError, "target_modules must be a list of module names or a regex"),
    (dict(target_modules=""), ValueError, "target_modules is an empty string"),
    (dict(modules_to_save="classifier"), TypeError, "modules_to_save must be a list"),
    (dict(layers_to_transform=["0"], target_modules=["q"]), TypeError, "layers_to_transform must be a layer index"),
    (dict(rank_pattern=["q"]), TypeError, "rank_pattern must be a dict"),
    (dict(alpha_pattern={"[": 2}), ValueError, "alpha_pattern key '\\[' is not a valid regex"),
    (dict(inference_mode="yes"), TypeError, "inference_mode must be True or False"),
])
def test_wrong_types_and_values(kwargs, error, message):
    with pytest.raises(error, match=message):
        lp.LoraConfig(**kwargs)


def test_config_for_another_tuner_class():
    with pytest.raises(ValueError, match="this config is for peft_type=IA3, not LORA"):
        lp.LoraConfig.from_dict({"peft_type": "IA3", "target_modules": ["q"]})


def test_two_adapters_training_biases_conflict():
    model = lp.get_peft_model(tiny_llama(), lp.LoraConfig(target_modules=["q_proj"], bias="all"))
    with pytest.raises(ValueError, match="only one adapter may train biases"):
        model.add_adapter("second", lp.LoraConfig(target_modules=["v_proj"], bias="lora_only"))
    assert list(model.peft_config) == ["default"]


def test_modules_to_save_that_match_nothing():
    base = tiny_llama()
    before = _snapshot(base)
    with pytest.raises(ValueError, match="modules_to_save entry 'head' matches no module"):
        lp.get_peft_model(base, lp.LoraConfig(target_modules=["q_proj"], modules_to_save=["head"]))
    assert _unchanged(base, before)


def test_adding_an_adapter_under_a_taken_name():
    model = lp.get_peft_model(tiny_llama(), lp.LoraConfig(target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="an adapter named 'default' already exists"):
        model.add_adapter("default", lp.LoraConfig(target_modules=["q_proj"]))


# ---- adapter files ---------------------------------------------------------------------------
def test_missing_weights_file(saved_adapter):
    base, folder = saved_adapter
    (folder / "adapter_model.safetensors").unlink()
    _load_fails(base, folder, "has no adapter_model.safetensors")


def test_missing_config_file(saved_adapter):
    base, folder = saved_adapter
    (folder / "adapter_config.json").unlink()
    _load_fails(base, folder, "adapter_config.json is missing")


def test_config_file_that_is_not_json(saved_adapter):
    base, folder = saved_adapter
    (folder / "adapter_config.json").write_text("{not json")
    _load_fails(base, folder, "is not valid JSON")


def test_truncated_safetensors(saved_adapter):
    base, folder = saved_adapter
    path = folder / "adapter_model.safetensors"
    path.write_bytes(path.read_bytes()[:-40])
    _load_fails(base, folder, "not a readable safetensors file.*truncated or corrupt")


def test_corrupt_safetensors_header(saved_adapter):
    base, folder = saved_adapter
    path = folder / "adapter_model.safetensors"
    data = bytearray(path.read_bytes())
    data[8:16] = b"garbage!"
    path.write_bytes(bytes(data))
    _load_fails(base, folder, "not a readable safetensors file")


def test_extra_keys(saved_adapter):
    base, folder = saved_adapter
    path = folder / "adapter_model.safetensors"
    tensors = load_file(path)
    tensors["base_model.model.transformer.h.0.mlp.c_fc.lora_A.weight"] = torch.zeros(8, 32)
    save_file(tensors, path)
    _load_fails(base, folder, r"unexpected keys: base_model\.model\.transformer\.h\.0\.mlp\.c_fc\.lora_A\.weight")


def test_pickled_weights_are_refused_unless_opted_in(saved_adapter):
    base, folder = saved_adapter
    tensors = load_file(folder / "adapter_model.safetensors")
    (folder / "adapter_model.safetensors").unlink()
    torch.save(tensors, folder / "adapter_model.bin")
    _load_fails(base, folder, "pickles can run code, so it is refused.*allow_pickle=True")
    loaded = lp.PeftModel.from_pretrained(base, folder, allow_pickle=True)
    assert torch.equal(loaded.base_model.model.transformer.h[0].attn.c_attn.lora_B["default"].weight,
                       tensors["base_model.model.transformer.h.0.attn.c_attn.lora_B.weight"])


def test_a_pickle_with_code_is_not_executed_even_when_opted_in(saved_adapter, tmp_path):
    base, folder = saved_adapter
    (folder / "adapter_model.safetensors").unlink()
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    torch.save({"x": Evil()}, folder / "adapter_model.bin")
    with pytest.raises(Exception, match="Weights only load failed"):
        lp.PeftModel.from_pretrained(base, folder, allow_pickle=True)
    assert not marker.exists()


def test_adapter_of_another_tuner_type_into_a_lora_model(saved_adapter, tmp_path):
    base, folder = saved_adapter
    other = tmp_path / "other"
    shutil.copytree(folder, other)
    data = json.loads((other / "adapter_config.json").read_text())
    data["peft_type"] = "IA3"
    data = {k: v for k, v in data.items() if k in ("peft_type", "target_modules", "task_type", "fan_in_fan_out")}
    (other / "adapter_config.json").write_text(json.dumps(data))
    model = lp.PeftModel.from_pretrained(base, folder)
    with pytest.raises(ValueError, match="cannot add a IA3 adapter to a LORA model"):
        model.load_adapter(other, adapter_name="other")
    assert list(model.peft_config) == ["default"]


def test_adapter_recorded_for_another_base_model(saved_adapter):
    base, folder = saved_adapter
    data = json.loads((folder / "adapter_config.json").read_text())
    data["base_model_name_or_path"] = "meta-llama/Llama-3.2-1B"
    (folder / "adapter_config.json").write_text(json.dumps(data))
    base.config._name_or_path = "/models/gpt2"
    _load_fails(base, folder, "trained on 'meta-llama/Llama-3.2-1B'.*ignore_base_model_mismatch=True")
    data["base_model_name_or_path"] = "openai-community/gpt2"  # same model, another place: accepted
    (folder / "adapter_config.json").write_text(json.dumps(data))
    lp.PeftModel.from_pretrained(base, folder)


def test_a_failed_load_into_an_existing_peft_model_adds_nothing(saved_adapter, tmp_path):
    base, folder = saved_adapter
    model = lp.PeftModel.from_pretrained(copy.deepcopy(base), folder)
    wrong = tmp_path / "wrong"
    lp.get_peft_model(tiny_gpt2(), lp.LoraConfig(r=4, **GPT2_LORA)).save_pretrained(wrong)
    tensors = load_file(wrong / "adapter_model.safetensors")
    tensors = {k: torch.zeros(3, 3) if "lora_A" in k else v for k, v in tensors.items()}
    save_file(tensors, wrong / "adapter_model.safetensors")
    before = _snapshot(model)
    with pytest.raises(ValueError, match=r"shape mismatches: .*file \(3, 3\) vs model \(4, 32\)"):
        model.load_adapter(wrong, adapter_name="second")
    assert list(model.peft_config) == ["default"]
    assert _unchanged(model, before)


# ---- runtime ---------------------------------------------------------------------------------
def test_deleting_the_active_adapter_says_what_to_do():
    model = lp.get_peft_model(tiny_llama(), lp.LoraConfig(target_modules=["q_proj"]))
    model.add_adapter("b", lp.LoraConfig(target_modules=["q_proj"]))
    with pytest.raises(ValueError, match=r"'default' is the active adapter; set_adapter\(\) another one \(b\)"):
        model.delete_adapter("default")


def test_deleting_a_merged_adapter_is_refused():
    model = lp.get_peft_model(tiny_llama(), lp.LoraConfig(target_modules=["q_proj"]), adapter_name="a")
    model.add_adapter("b", lp.LoraConfig(target_modules=["q_proj"]))
    model.base_model.merge_adapter(["b"])
    with pytest.raises(ValueError, match=r"adapter 'b' is merged; unmerge\(\) before deleting it"):
        model.delete_adapter("b")


def test_bad_adapter_names():
    with pytest.raises(ValueError, match="adapter name 'a.b' is not valid"):
        lp.get_peft_model(tiny_llama(), lp.LoraConfig(target_modules=["q_proj"]), adapter_name="a.b")


def test_get_peft_model_needs_a_config_object():
    with pytest.raises(TypeError, match="peft_config must be a tuner config"):
        lp.get_peft_model(tiny_llama(), {"peft_type": "LORA"})
