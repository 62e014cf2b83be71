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
