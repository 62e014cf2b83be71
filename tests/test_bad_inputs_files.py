"""Bad adapter folders and files: each is refused with a message naming the file and what to do, and a failed load
leaves the model untouched."""

from __future__ import annotations

import copy
import json
import shutil

import pytest
import torch
from helpers import GPT2_LORA, edit_config, load_fails, snapshot, tiny_bert_classifier, tiny_gpt2, unchanged
from safetensors.torch import load_file, save_file

import lightning_peft as lp


def test_missing_weights_file(saved_adapter):
    base, folder = saved_adapter
    (folder / "adapter_model.safetensors").unlink()
    load_fails(base, folder, "has no adapter_model.safetensors")


def test_missing_config_file(saved_adapter):
    base, folder = saved_adapter
    (folder / "adapter_config.json").unlink()
    load_fails(base, folder, "adapter_config.json is missing")


def test_config_file_that_is_not_json(saved_adapter):
    base, folder = saved_adapter
    (folder / "adapter_config.json").write_text("{not json")
    load_fails(base, folder, "is not valid JSON")


def test_truncated_safetensors(saved_adapter):
    base, folder = saved_adapter
    path = folder / "adapter_model.safetensors"
    path.write_bytes(path.read_bytes()[:-40])
    load_fails(base, folder, "not a readable safetensors file.*truncated or corrupt")


def test_corrupt_safetensors_header(saved_adapter):
    base, folder = saved_adapter
    path = folder / "adapter_model.safetensors"
    data = bytearray(path.read_bytes())
    data[8:16] = b"garbage!"
    path.write_bytes(bytes(data))
    load_fails(base, folder, "not a readable safetensors file")


def test_extra_keys(saved_adapter):
    base, folder = saved_adapter
    path = folder / "adapter_model.safetensors"
    tensors = load_file(path)
    tensors["base_model.model.transformer.h.0.mlp.c_fc.lora_A.weight"] = torch.zeros(8, 32)
    save_file(tensors, path)
    load_fails(base, folder, r"unexpected keys: base_model\.model\.transformer\.h\.0\.mlp\.c_fc\.lora_A\.weight")


def test_pickled_weights_are_refused_unless_opted_in(saved_adapter):
    base, folder = saved_adapter
    tensors = load_file(folder / "adapter_model.safetensors")
    (folder / "adapter_model.safetensors").unlink()
    torch.save(tensors, folder / "adapter_model.bin")
    load_fails(base, folder, "pickles can run code, so it is refused.*allow_pickle=True")
    loaded = lp.PeftModel.from_pretrained(base, folder, allow_pickle=True)
    assert torch.equal(
        loaded.base_model.model.transformer.h[0].attn.c_attn.lora_B["default"].weight,
        tensors["base_model.model.transformer.h.0.attn.c_attn.lora_B.weight"],
    )


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
    load_fails(base, folder, "trained on 'meta-llama/Llama-3.2-1B'.*ignore_base_model_mismatch=True")
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
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"shape mismatches: .*file \(3, 3\) vs model \(4, 32\)"):
        model.load_adapter(wrong, adapter_name="second")
    assert list(model.peft_config) == ["default"]
    assert unchanged(model, before)


def test_a_failed_prompt_learning_load_gives_the_classifier_back(tmp_path):
    saved = lp.get_peft_model(tiny_bert_classifier(), lp.PromptTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=4))
    saved.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    tensors["prompt_embeddings"] = torch.zeros(3, tensors["prompt_embeddings"].shape[1])
    save_file(tensors, tmp_path / "adapter_model.safetensors")
    base = tiny_bert_classifier()
    base.bert.embeddings.requires_grad_(False)  # the user's own choice of what trains must survive too
    before = snapshot(base)
    with pytest.raises(ValueError, match=r"shape mismatches: prompt_embeddings: file \(3, 32\) vs model \(4, 32\)"):
        lp.PeftModel.from_pretrained(base, tmp_path, is_trainable=True)
    assert type(base.classifier) is torch.nn.Linear
    assert not base.bert.embeddings.word_embeddings.weight.requires_grad and base.classifier.weight.requires_grad
    assert unchanged(base, before), "a failed load must leave the base model untouched"


def test_config_whose_rank_does_not_match_the_weights(saved_adapter):
    base, folder = saved_adapter
    edit_config(folder, r=4)
    load_fails(
        base,
        folder,
        r"shape mismatches: base_model\.model\.transformer\.h\.0\.attn\.c_attn\.lora_A\.weight: "
        r"file \(8, 32\) vs model \(4, 32\).*Load the adapter into the base model \(and config\) "
        "it was trained for",
    )


def test_weights_file_missing_a_tensor(saved_adapter):
    base, folder = saved_adapter
    path = folder / "adapter_model.safetensors"
    tensors = load_file(path)
    del tensors["base_model.model.transformer.h.1.attn.c_attn.lora_B.weight"]
    save_file(tensors, path)
    load_fails(
        base,
        folder,
        r"missing keys: base_model\.model\.transformer\.h\.1\.attn\.c_attn\.lora_B\.weight\)\. "
        "Load the adapter into the base model",
    )


def test_config_recorded_for_another_peft_type_than_its_weights(saved_adapter):
    base, folder = saved_adapter
    data = json.loads((folder / "adapter_config.json").read_text())
    data = {k: v for k, v in data.items() if k in ("target_modules", "task_type", "fan_in_fan_out")}
    (folder / "adapter_config.json").write_text(json.dumps({**data, "peft_type": "IA3"}))
    load_fails(base, folder, r"missing keys: .*ia3_l.*unexpected keys: .*lora_A\.weight")


def test_config_with_a_wrong_value(saved_adapter):
    base, folder = saved_adapter
    edit_config(folder, r="x")
    load_fails(base, folder, "r must be a positive integer \\(the LoRA rank\\), got 'x'")


def test_config_of_an_unknown_tuner(saved_adapter):
    base, folder = saved_adapter
    edit_config(folder, peft_type="LOHA")
    load_fails(base, folder, "unknown peft_type 'LOHA'; lightning_peft knows: LORA, IA3")


def test_empty_weights_file(saved_adapter):
    base, folder = saved_adapter
    (folder / "adapter_model.safetensors").write_bytes(b"")
    load_fails(base, folder, "not a readable safetensors file .*header too small.*export the adapter again")


def test_exported_files_are_readable_like_any_other_file(tmp_path):
    import os
    import stat

    umask = os.umask(0o022)
    try:
        lp.get_peft_model(tiny_gpt2(), lp.LoraConfig(**GPT2_LORA)).save_pretrained(tmp_path / "fresh")
        for name in ("adapter_model.safetensors", "adapter_config.json"):
            assert stat.S_IMODE(os.stat(tmp_path / "fresh" / name).st_mode) == 0o644, name
    finally:
        os.umask(umask)
