"""Misuse of the adapter API at run time (names, deletion, merging, wrapping): a clear error and the model as it was."""

from __future__ import annotations

import pytest
import torch
from helpers import snapshot, tiny_llama, unchanged

import lightning_peft as lp


def test_two_adapters_training_biases_conflict():
    model = lp.get_peft_model(tiny_llama(), lp.LoraConfig(target_modules=["q_proj"], bias="all"))
    with pytest.raises(ValueError, match="only one adapter may train biases"):
        model.add_adapter("second", lp.LoraConfig(target_modules=["v_proj"], bias="lora_only"))
    assert list(model.peft_config) == ["default"]


def test_modules_to_save_that_match_nothing():
    base = tiny_llama()
    before = snapshot(base)
    with pytest.raises(ValueError, match="modules_to_save entry 'head' matches no module"):
        lp.get_peft_model(base, lp.LoraConfig(target_modules=["q_proj"], modules_to_save=["head"]))
    assert unchanged(base, before)


def test_adding_an_adapter_under_a_taken_name():
    model = lp.get_peft_model(tiny_llama(), lp.LoraConfig(target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="an adapter named 'default' already exists"):
        model.add_adapter("default", lp.LoraConfig(target_modules=["q_proj"]))


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


def test_targets_that_match_no_module_name_the_ones_there():
    base = tiny_llama()
    before = snapshot(base)
    with pytest.raises(ValueError) as err:
        lp.get_peft_model(base, lp.LoraConfig(target_modules=["nope"]))
    assert str(err.value).startswith(
        "target_modules={'nope'} matched no module of the model; leaf module names end "
        "in: embed_tokens, q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj"
    )
    assert unchanged(base, before)
    assert not any("lora" in n for n, _ in base.named_modules())


def test_safe_merge_of_a_nan_adapter_is_refused_and_the_base_kept():
    model = lp.get_peft_model(tiny_llama(), lp.LoraConfig(target_modules=["q_proj"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.fill_(float("nan"))  # e.g. after a NaN loss
    before = snapshot(model)[0]
    with pytest.raises(ValueError) as err:
        model.merge_and_unload(safe_merge=True)
    assert str(err.value) == (
        "merging adapter 'default' would put NaN/inf into Linear weights; the merge was aborted "
        "and the base weights are unchanged (the adapter is broken: retrain or reload it)"
    )
    after = model.state_dict()
    assert sorted(after) == sorted(before)
    assert all(torch.equal(after[k], v) or (v.isnan().all() and after[k].isnan().all()) for k, v in before.items())
    assert not model.base_model.model.model.layers[0].self_attn.q_proj.merged


def test_merging_twice_warns_and_merges_once():
    model = lp.get_peft_model(tiny_llama(), lp.LoraConfig(target_modules=["q_proj"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.fill_(0.02)
    model.base_model.merge_adapter()
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    once = layer.get_base_layer().weight.clone()
    with pytest.warns(
        UserWarning,
        match=r"adapter\(s\) \['default'\] already merged into Linear; not merging them "
        "twice",
    ):
        model.base_model.merge_adapter()
    assert torch.equal(layer.get_base_layer().weight, once)


@pytest.mark.parametrize("call", ["delete_adapter", "set_adapter"])
def test_an_adapter_name_that_does_not_exist(call):
    model = lp.get_peft_model(tiny_llama(), lp.LoraConfig(target_modules=["q_proj"]))
    before = snapshot(model)
    with pytest.raises(ValueError) as err:
        getattr(model, call)("nope")
    assert str(err.value) == "no adapter named 'nope'; this model has: default"
    assert unchanged(model, before) and model.active_adapter == "default"
