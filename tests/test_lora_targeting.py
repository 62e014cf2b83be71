"""Targeting options of HF PEFT 0.21 beyond `target_modules`: `exclude_modules` (LoRA and IA3) and LoRA's
`layer_replication`, checked against the installed `peft` on tiny models: the same modules adapted, the same errors
and warnings, the same logits and saved keys, files read both ways."""

from __future__ import annotations

import copy
import json
import warnings

import peft
import pytest
import torch
from helpers import ids, logits, perturb, quiet, saved_shapes, snapshot, tiny_bert_classifier, tiny_gpt2, tiny_llama
from helpers import unchanged as model_unchanged

import lightning_peft as lp


@pytest.fixture(scope="module")
def gpt2():
    return tiny_gpt2()


@pytest.fixture(scope="module")
def llama():
    return tiny_llama(num_hidden_layers=3)


def _targets(lib, base, config_cls, **kwargs):
    model = quiet(lib.get_peft_model, copy.deepcopy(base), getattr(lib, config_cls)(**kwargs))
    return sorted(model.base_model.targeted_module_names)


# ---- exclude_modules -------------------------------------------------------------------------------
EXCLUDE_CASES = {
    "all-linear, names": ("gpt2", dict(target_modules="all-linear", exclude_modules=["c_proj"])),
    "names, dotted suffix": ("gpt2", dict(target_modules=["c_attn", "c_proj"], exclude_modules=["mlp.c_proj"])),
    "names, regex": ("llama", dict(target_modules=["q_proj", "v_proj", "o_proj"], exclude_modules=r".*layers\.0\..*")),
    "regex, regex": ("llama", dict(target_modules=r".*_proj", exclude_modules=r".*(mlp|layers\.2)\..*")),
    "with layers_to_transform": (
        "llama",
        dict(target_modules=["q_proj", "k_proj"], layers_to_transform=[0, 1], exclude_modules=["k_proj"]),
    ),
}


@pytest.mark.parametrize("case", sorted(EXCLUDE_CASES))
def test_exclude_modules_adapts_the_modules_hf_peft_adapts(case, gpt2, llama):
    which, kwargs = EXCLUDE_CASES[case]
    base = gpt2 if which == "gpt2" else llama
    ours = _targets(lp, base, "LoraConfig", **kwargs)
    assert ours == _targets(peft, base, "LoraConfig", **kwargs)
    assert ours and not any(lp.tuners.base.is_excluded(lp.LoraConfig(**kwargs), k) for k in ours)


def test_exclude_modules_with_modules_to_save_and_ia3_as_hf_peft():
    base = tiny_bert_classifier()
    kwargs = dict(task_type="SEQ_CLS", target_modules="all-linear", exclude_modules=["query", "intermediate.dense"])
    assert _targets(lp, base, "LoraConfig", **kwargs) == _targets(peft, base, "LoraConfig", **kwargs)
    ia3 = dict(target_modules=["query", "value", "output.dense"], feedforward_modules=r".*output\.dense")
    ia3["exclude_modules"] = r".*layer\.0\.output\.dense"
    assert _targets(lp, base, "IA3Config", **ia3) == _targets(peft, base, "IA3Config", **ia3)


def test_exclude_modules_files_both_ways(gpt2, tmp_path):
    kwargs = dict(target_modules="all-linear", exclude_modules=["mlp.c_proj"], init_lora_weights=False)
    x = ids()
    for writer, reader in ((peft, lp), (lp, peft)):
        folder = tmp_path / writer.__name__
        written = quiet(writer.get_peft_model, copy.deepcopy(gpt2), writer.LoraConfig(**kwargs)).eval()
        perturb(written)
        written.save_pretrained(folder)
        stored = json.loads((folder / "adapter_config.json").read_text())
        assert stored["exclude_modules"] == ["mlp.c_proj"]
        read = quiet(reader.PeftModel.from_pretrained, copy.deepcopy(gpt2), folder).eval()
        assert set(read.peft_config["default"].exclude_modules) == {"mlp.c_proj"}
        assert sorted(read.base_model.targeted_module_names) == sorted(written.base_model.targeted_module_names)
        torch.testing.assert_close(logits(read, x), logits(written, x))
    assert saved_shapes(tmp_path / "peft") == saved_shapes(tmp_path / "lightning_peft")


def test_excluding_every_target_is_refused_as_hf_peft(gpt2):
    kwargs = dict(target_modules=["c_attn"], exclude_modules=r".*\.attn\..*")
    with pytest.raises(ValueError) as hf:
        quiet(peft.get_peft_model, copy.deepcopy(gpt2), peft.LoraConfig(**kwargs))
    base = copy.deepcopy(gpt2)
    before = snapshot(base)
    with pytest.raises(lp.utils.error.NoMatchingPeftModuleError, match="exclude_modules=.* excluded every module"):
        lp.get_peft_model(base, lp.LoraConfig(**kwargs))
    assert type(hf.value).__name__ == "NoMatchingPeftModuleError"
    assert model_unchanged(base, before)


def test_exclude_modules_that_excludes_nothing_warns_as_hf_peft(gpt2):
    kwargs = dict(target_modules=["c_attn"], exclude_modules=["no_such_module"])
    for lib in (peft, lp):
        with pytest.warns(UserWarning, match="but no modules were excluded"):
            lib.get_peft_model(copy.deepcopy(gpt2), lib.LoraConfig(**kwargs))
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*no modules were excluded")  # it excluded something: no warning
        kwargs = dict(target_modules=["c_attn"], exclude_modules=["h.0.attn.c_attn"], fan_in_fan_out=True)
        assert _targets(lp, gpt2, "LoraConfig", **kwargs) == ["transformer.h.1.attn.c_attn"]


@pytest.mark.parametrize("bad", [5, ["c_proj", 3], [""], {"c_proj": 1}])
def test_exclude_modules_of_a_wrong_type_is_refused(bad):
    for config_cls in (lp.LoraConfig, lp.IA3Config):
        with pytest.raises(TypeError, match="exclude_modules must be a list of module names or a regex"):
            config_cls(target_modules=["c_attn"], exclude_modules=bad)


def test_exclude_modules_regex_is_checked_and_a_list_becomes_a_set():
    with pytest.raises(ValueError, match="exclude_modules"):
        lp.LoraConfig(target_modules=["c_attn"], exclude_modules="(a+)*b")
    assert lp.LoraConfig(exclude_modules=["a", "a"]).exclude_modules == {"a"}
    assert lp.IA3Config(exclude_modules=[]).exclude_modules == set()


# ---- layer_replication -------------------------------------------------------------------------------
REPLICATION = dict(target_modules=["q_proj", "v_proj"], layer_replication=[[0, 2], [1, 3]], init_lora_weights=False)


@pytest.fixture(scope="module")
def replicated(llama):
    """(ours, HF's): the 3-layer Llama replicated to layers 0 1 1 2, with the same LoRA values."""
    hf = quiet(peft.get_peft_model, copy.deepcopy(llama), peft.LoraConfig(**REPLICATION)).eval()
    perturb(hf)
    ours = lp.get_peft_model(copy.deepcopy(llama), lp.LoraConfig(**REPLICATION)).eval()
    ours.load_state_dict(hf.state_dict())
    return ours, hf


def test_layer_replication_builds_hf_peft_model_and_logits(replicated, llama):
    ours, hf = replicated
    assert ours.base_model.targeted_module_names == hf.base_model.targeted_module_names
    layers = ours.base_model.model.model.layers
    assert len(layers) == 4 == ours.config.num_hidden_layers
    assert [m.self_attn.layer_idx for m in layers] == [0, 1, 2, 3]
    assert layers[1].self_attn.q_proj.base_layer.weight is layers[2].self_attn.q_proj.base_layer.weight  # shared
    assert layers[1].self_attn.q_proj.lora_A["default"] is not layers[2].self_attn.q_proj.lora_A["default"]
    x = ids()
    torch.testing.assert_close(logits(ours, x), logits(hf, x))
    assert not torch.allclose(logits(ours, x), logits(llama, x))
    with ours.disable_adapter():  # the deeper base: not the original model
        assert not torch.allclose(logits(ours, x), logits(llama, x))


def test_layer_replication_files_both_ways(replicated, llama, tmp_path):
    ours, hf = replicated
    x = ids()
    for writer, reader in ((hf, lp), (ours, peft)):
        folder = tmp_path / type(writer).__module__.split(".")[0]
        writer.save_pretrained(folder)
        assert json.loads((folder / "adapter_config.json").read_text())["layer_replication"] == [[0, 2], [1, 3]]
        read = quiet(reader.PeftModel.from_pretrained, copy.deepcopy(llama), folder).eval()
        assert read.peft_config["default"].layer_replication == [[0, 2], [1, 3]]
        torch.testing.assert_close(logits(read, x), logits(writer, x))
    keys = saved_shapes(tmp_path / "peft")
    assert keys == saved_shapes(tmp_path / "lightning_peft")
    assert "base_model.model.model.layers.3.self_attn.v_proj.lora_B.weight" in keys and len(keys) == 16


def test_layer_replication_merge_keeps_the_outputs(replicated):
    """HF PEFT 0.21 means to refuse this merge, but its check looks the field up among the adapter names and never
    fires: it adds each copy's update into the one shared weight. Here every copy merges into a weight of its own."""
    ours = copy.deepcopy(replicated[0])
    x = ids()
    before = logits(ours, x)
    merged = ours.merge_and_unload()
    torch.testing.assert_close(logits(merged, x), before, rtol=1e-5, atol=1e-5)
    hf = copy.deepcopy(replicated[1])
    hf_merged = quiet(hf.merge_and_unload)
    assert not torch.allclose(logits(hf_merged, x), before, atol=1e-3)  # HF PEFT's merge changes the outputs


def test_layer_replication_refusals_leave_the_model_as_it_was(llama, replicated):
    for bad, error in (([[0, 2], [1]], TypeError), ([[2, 1]], ValueError), ([[-1, 2]], ValueError), ("0-2", TypeError)):
        with pytest.raises(error, match="layer_replication"):
            lp.LoraConfig(target_modules=["q_proj"], layer_replication=bad)
    base = copy.deepcopy(llama)
    before = snapshot(base)
    with pytest.raises(ValueError, match=r"names layers up to 3, but the model has 3"):
        lp.get_peft_model(base, lp.LoraConfig(target_modules=["q_proj"], layer_replication=[[0, 4]]))
    with pytest.raises(ValueError, match="matched no module"):  # the stack was rebuilt, then put back
        lp.get_peft_model(base, lp.LoraConfig(target_modules=["nope"], layer_replication=[[0, 2], [1, 3]]))
    assert model_unchanged(base, before) and base.config.num_hidden_layers == 3
    ours = copy.deepcopy(replicated[0])
    ours.add_adapter("same", lp.LoraConfig(**REPLICATION))  # the same map: the model stays as it is
    assert len(ours.base_model.model.model.layers) == 4
    with pytest.raises(ValueError, match="were replicated with layer_replication=.* for an earlier adapter"):
        ours.add_adapter("other", lp.LoraConfig(target_modules=["q_proj"], layer_replication=[[0, 3]]))
    assert len(ours.base_model.model.model.layers) == 4 and set(ours.peft_config) == {"default", "same"}
