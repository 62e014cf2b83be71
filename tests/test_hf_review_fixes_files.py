"""Review fixes against HF PEFT 0.21 (issue 13's review): the model card beside an adapter (a README.md that is not
UTF-8, tags that are not a list of strings, a README.md symlink to nothing or a folder of that name), exception
classes that are both ours and HF's for a missing adapter folder / an unknown adapter name / an unknown peft_type,
IA3's layer status, the `peft_version` written, `use_dora: 0` in a file, and `has_active_enabled_adapter`."""

from __future__ import annotations

import copy
import json
import os
import warnings

import peft
import pytest
import torch
from helpers import GPT2_LORA, edit_config, ids, logits, perturb, quiet, snapshot, tiny_gpt2, unchanged
from packaging.version import Version

import lightning_peft as lp
from lightning_peft.config import HF_PEFT_FORMAT_VERSION
from lightning_peft.utils.error import AdapterNotFoundError, UnknownNameError

IA3_GPT2 = dict(target_modules=["c_attn"], feedforward_modules=[], fan_in_fan_out=True)


@pytest.fixture(scope="module")
def gpt2():
    return tiny_gpt2()


@pytest.fixture(scope="module")
def ours(gpt2):
    model = lp.get_peft_model(copy.deepcopy(gpt2), lp.LoraConfig(**GPT2_LORA))
    perturb(model)
    return model


@pytest.fixture(scope="module")
def saved(ours, tmp_path_factory):
    folder = tmp_path_factory.mktemp("saved") / "adapter"
    ours.save_pretrained(folder)
    return folder


def card_save(model, folder, readme: bytes):
    """Save `model` into `folder` holding a README.md with the bytes `readme`; the warnings given."""
    folder.mkdir()
    (folder / "README.md").write_bytes(readme)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.save_pretrained(folder)
    assert (folder / "adapter_model.safetensors").is_file()  # the card never fails the save
    return [str(w.message) for w in caught]


def front_matter(folder):
    import yaml

    text = (folder / "README.md").read_text()
    return yaml.safe_load(text.split("---\n")[1])


# ---- 1. a README.md that is not UTF-8 is kept byte for byte ------------------------------------------------------
@pytest.mark.parametrize(
    "readme",
    [b"---\nlicense: mit\n---\ncaf\xe9 (Latin-1)\n", b"\x89PNG\r\n\x1a\n\x00\xff\xfe binary"],
    ids=["latin1", "binary"],
)
def test_a_readme_that_is_not_utf8_is_kept_byte_for_byte_with_one_warning(ours, tmp_path, readme):
    messages = card_save(ours, tmp_path / "a", readme)
    assert (tmp_path / "a" / "README.md").read_bytes() == readme
    card_warnings = [m for m in messages if "README.md" in m]
    assert len(card_warnings) == 1 and "is not UTF-8 text" in card_warnings[0] and "kept unchanged" in card_warnings[0]
    assert ".tmp-" not in card_warnings[0] and str(tmp_path / "a" / "README.md") in card_warnings[0]
    # HF peft 0.21 fails the whole save there (UnicodeDecodeError); ours saves the adapter
    theirs = quiet(peft.get_peft_model, tiny_gpt2(), peft.LoraConfig(**GPT2_LORA))
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "README.md").write_bytes(readme)
    with pytest.raises(UnicodeDecodeError):
        quiet(theirs.save_pretrained, tmp_path / "hf")


# ---- 2. tags that are not a list of strings ------------------------------------------------------------------------
@pytest.mark.parametrize(
    "tags,expected",
    [("foo", {"foo"}), ("[1, 2]", {"1", "2"}), ("[null, '']", set()), ("[foo, 3.5, true]", {"foo", "3.5", "True"})],
)
def test_card_tags_that_are_not_a_list_of_strings_are_read_as_tag_names(ours, tmp_path, tags, expected):
    messages = card_save(ours, tmp_path / "a", f"---\ntags: {tags}\nlicense: mit\n---\nMine.\n".encode())
    assert not [m for m in messages if "README.md" in m]
    meta = front_matter(tmp_path / "a")
    assert set(meta["tags"]) == expected | {"lora", "transformers"} and meta["license"] == "mit"
    assert all(isinstance(t, str) for t in meta["tags"])
    assert "Mine." in (tmp_path / "a" / "README.md").read_text()


@pytest.mark.parametrize(
    "readme",
    ["---\ntags: {a: 1}\n---\nx\n", "---\ntags: [[a]]\n---\nx\n", "---\nkey: [open\n---\nx\n", "---\n[a, b]\n---\nx\n"],
    ids=["mapping", "nested list", "bad YAML", "not a mapping"],
)
def test_a_card_whose_metadata_cannot_be_merged_is_kept_with_a_warning(ours, tmp_path, readme):
    messages = card_save(ours, tmp_path / "a", readme.encode())
    assert (tmp_path / "a" / "README.md").read_text() == readme
    assert len([m for m in messages if "could not be read as a model card" in m]) == 1


# ---- 3. a README.md symlink to nothing, a folder named README.md, a symlink to a file -----------------------------
def test_a_dangling_readme_symlink_is_kept_and_the_adapter_saved(ours, tmp_path):
    folder = tmp_path / "a"
    folder.mkdir()
    os.symlink(tmp_path / "nowhere.md", folder / "README.md")
    with pytest.warns(UserWarning, match=r"README.md is a symlink to .*nowhere.md.*the link is kept as it is") as rec:
        ours.save_pretrained(folder)
    assert all(".tmp-" not in str(w.message) for w in rec)
    assert os.readlink(folder / "README.md") == str(tmp_path / "nowhere.md")
    assert not (tmp_path / "nowhere.md").exists()  # HF PEFT creates the link's target
    assert (folder / "adapter_model.safetensors").is_file()


def test_a_folder_named_readme_is_refused_naming_the_users_path(ours, tmp_path):
    folder = tmp_path / "a"
    (folder / "README.md").mkdir(parents=True)
    with pytest.raises(ValueError, match=r"is a directory, not a file") as err:
        ours.save_pretrained(folder)
    assert str(folder / "README.md") in str(err.value) and ".tmp-" not in str(err.value)
    assert os.listdir(folder) == ["README.md"] and (folder / "README.md").is_dir()  # nothing saved
    assert sorted(os.listdir(tmp_path)) == ["a"]  # no temporary folder or lock left


def test_a_readme_symlink_to_a_file_becomes_the_updated_card_and_the_target_is_not_written(ours, tmp_path):
    target = tmp_path / "shared.md"
    target.write_text("---\nlicense: mit\n---\nShared.\n")
    folder = tmp_path / "a"
    folder.mkdir()
    os.symlink(target, folder / "README.md")
    ours.save_pretrained(folder)
    assert not os.path.islink(folder / "README.md")
    assert target.read_text() == "---\nlicense: mit\n---\nShared.\n"
    assert front_matter(folder)["license"] == "mit" and "Shared." in (folder / "README.md").read_text()


# ---- 4. exception classes that are both ours and HF PEFT's ----------------------------------------------------------
def hf_error(fn):
    try:
        quiet(fn)
    except Exception as err:  # noqa: BLE001 (the test compares what HF PEFT raises)
        return type(err)
    return None


@pytest.mark.parametrize("kind", ["missing", "empty"])
def test_a_missing_or_empty_adapter_folder_is_both_file_not_found_and_hfs_value_error(gpt2, tmp_path, kind):
    folder = tmp_path / "adapter"
    if kind == "empty":
        folder.mkdir()
    calls = {
        "PeftModel.from_pretrained": lambda L: L.PeftModel.from_pretrained(copy.deepcopy(gpt2), folder),
        "PeftConfig.from_pretrained": lambda L: L.PeftConfig.from_pretrained(folder),
        "load_adapter": lambda L: L.get_peft_model(copy.deepcopy(gpt2), L.LoraConfig(**GPT2_LORA)).load_adapter(
            folder, "other"
        ),
    }
    for name, call in calls.items():
        assert hf_error(lambda: call(peft)) is ValueError, name
        for style in (ValueError, FileNotFoundError):
            with pytest.raises(style, match=r"does not exist|is missing") as err:
                call(lp)
            assert type(err.value) is AdapterNotFoundError, name
    # a refused load_adapter leaves the model as it was
    model = lp.get_peft_model(copy.deepcopy(gpt2), lp.LoraConfig(**GPT2_LORA))
    before = snapshot(model)
    with pytest.raises(ValueError):
        model.load_adapter(folder, "other")
    assert unchanged(model, before) and list(model.peft_config) == ["default"]


def test_an_unknown_adapter_name_is_both_keyerror_as_in_hf_and_value_error(gpt2, ours):
    theirs = quiet(peft.get_peft_model, copy.deepcopy(gpt2), peft.LoraConfig(**GPT2_LORA))
    state = lp.get_peft_model_state_dict(ours)
    before = snapshot(ours)
    for lib, model in ((peft, theirs), (lp, ours)):
        calls = [
            lambda: lib.get_peft_model_state_dict(model, adapter_name="nope"),
            lambda: lib.set_peft_model_state_dict(model, state, adapter_name="nope"),
        ]
        for call in calls:
            with pytest.raises(KeyError):
                call()
            if lib is lp:
                with pytest.raises(ValueError, match=r"^no adapter named 'nope'; this model has: default$") as err:
                    call()
                assert type(err.value) is UnknownNameError and str(err.value)[0] == "n"  # no KeyError quotes
    assert unchanged(ours, before)


def test_get_peft_config_with_an_unknown_type_is_both_keyerror_as_in_hf_and_value_error():
    assert hf_error(lambda: peft.get_peft_config({"peft_type": "NOT_A_TUNER"})) is KeyError
    for style in (KeyError, ValueError):
        with pytest.raises(style, match=r"^unknown peft_type 'NOT_A_TUNER'; lightning_peft knows: IA3, LORA"):
            lp.get_peft_config({"peft_type": "NOT_A_TUNER"})


# ---- 5. layer status module_type as HF PEFT's ----------------------------------------------------------------------
@pytest.mark.parametrize("kind,kwargs", [("IA3Config", IA3_GPT2), ("LoraConfig", GPT2_LORA)])
def test_layer_status_module_type_and_layer_repr_as_in_hf(gpt2, kind, kwargs):
    mine = lp.get_peft_model(copy.deepcopy(gpt2), getattr(lp, kind)(**kwargs))
    theirs = quiet(peft.get_peft_model, copy.deepcopy(gpt2), getattr(peft, kind)(**kwargs))
    types = [s.module_type for s in lp.get_layer_status(mine)]
    assert types == [s.module_type for s in peft.get_layer_status(theirs)]
    assert types[0] == {"IA3Config": "Linear", "LoraConfig": "lora.Linear"}[kind]
    layer = mine.base_model.model.transformer.h[0].attn.c_attn
    hf_layer = theirs.base_model.model.transformer.h[0].attn.c_attn
    assert repr(layer).partition("(")[0] == repr(hf_layer).partition("(")[0]


# ---- 6. peft_version ------------------------------------------------------------------------------------------------
def test_peft_version_names_hf_peft_s_format_version_then_ours(saved, gpt2):
    written = json.loads((saved / "adapter_config.json").read_text())["peft_version"]
    assert written == f"{HF_PEFT_FORMAT_VERSION}@lightning_peft-{lp.__version__}"
    # HF PEFT's reading (OFT's check): the part before "@" is a PEFT version, not older than 0.18 (which added it)
    assert Version(written.partition("@")[0]) >= Version("0.18.0")
    assert HF_PEFT_FORMAT_VERSION == peft.__version__, "the format tests pass against a new HF PEFT: raise it"
    read = quiet(peft.PeftModel.from_pretrained, copy.deepcopy(gpt2), saved)
    assert read.peft_config["default"].peft_version == written


@pytest.mark.parametrize("value,kept", [(5, "5"), (["0.1"], "['0.1']")])
def test_a_non_string_peft_version_in_a_file_loads_with_a_warning(ours, gpt2, tmp_path, value, kept):
    folder = tmp_path / "a"
    ours.save_pretrained(folder)
    edit_config(folder, peft_version=value)
    hf = quiet(peft.PeftModel.from_pretrained, copy.deepcopy(gpt2), folder)  # HF PEFT loads it
    with pytest.warns(UserWarning, match=r"peft_version should be a version string.*the field has no effect"):
        mine = lp.PeftModel.from_pretrained(copy.deepcopy(gpt2), folder)
    assert mine.peft_config["default"].peft_version == kept
    torch.testing.assert_close(logits(mine, ids()), logits(hf, ids()), atol=1e-5, rtol=0)


# ---- 7. use_dora: 0 -------------------------------------------------------------------------------------------------
def test_bool_feature_flags_at_zero_in_a_file_are_off_as_in_hf(ours, gpt2, tmp_path):
    folder = tmp_path / "a"
    ours.save_pretrained(folder)
    edit_config(folder, use_dora=0, use_rslora=0, lora_bias=0.0)
    hf = quiet(peft.PeftModel.from_pretrained, copy.deepcopy(gpt2), folder)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        mine = lp.PeftModel.from_pretrained(copy.deepcopy(gpt2), folder)
    torch.testing.assert_close(logits(mine, ids()), logits(hf, ids()), atol=1e-5, rtol=0)
    torch.testing.assert_close(logits(mine, ids()), logits(ours, ids()), atol=0, rtol=0)
    for on in (1, True):  # on, as HF PEFT reads it (DoRA itself: tests/test_lora_dora.py)
        edit_config(folder, use_dora=on)
        assert lp.PeftConfig.from_pretrained(folder).use_dora is True
    with pytest.raises(ValueError, match=r"use_dora=1"):  # an IA3 file (no use_dora field): the same rule
        lp.IA3Config.from_dict({"peft_type": "IA3", "use_dora": 1})
    assert lp.IA3Config.from_dict({"peft_type": "IA3", "use_dora": 0, "target_modules": ["c_attn"]})


# ---- 8. has_active_enabled_adapter ----------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["LoraConfig", "PromptTuningConfig"])
def test_has_active_enabled_adapter_as_in_hf(gpt2, kind):
    kwargs = GPT2_LORA if kind == "LoraConfig" else dict(task_type="CAUSAL_LM", num_virtual_tokens=2)
    mine = lp.get_peft_model(copy.deepcopy(gpt2), getattr(lp, kind)(**kwargs))
    theirs = quiet(peft.get_peft_model, copy.deepcopy(gpt2), getattr(peft, kind)(**kwargs))
    assert mine.has_active_enabled_adapter is theirs.has_active_enabled_adapter is True
    with mine.disable_adapter(), theirs.disable_adapter():
        assert mine.has_active_enabled_adapter is theirs.has_active_enabled_adapter is False
    assert mine.has_active_enabled_adapter is theirs.has_active_enabled_adapter is True


def test_has_active_enabled_adapter_after_disabled_layers_and_the_last_delete(gpt2):
    mine = lp.get_peft_model(copy.deepcopy(gpt2), lp.LoraConfig(**GPT2_LORA))
    theirs = quiet(peft.get_peft_model, copy.deepcopy(gpt2), peft.LoraConfig(**GPT2_LORA))
    mine.base_model.disable_adapter_layers()
    theirs.base_model.disable_adapter_layers()
    assert mine.has_active_enabled_adapter is False  # no adapter runs; HF peft 0.21 says True (it ignores the layers)
    assert theirs.has_active_enabled_adapter is True
    with mine.disable_adapter():
        assert mine.has_active_enabled_adapter is False
    assert mine.has_active_enabled_adapter is False  # the block restores the disabled layers
    mine.base_model.enable_adapter_layers()
    assert mine.has_active_enabled_adapter is True
    quiet(mine.delete_adapter, "default")
    quiet(theirs.delete_adapter, "default")
    assert mine.has_active_enabled_adapter is False  # none left; HF peft 0.21 raises KeyError
    with pytest.raises(KeyError):
        _ = theirs.has_active_enabled_adapter
