"""The public names HF PEFT users import, against the installed HF `peft` 0.21: signatures, default target tables,
injection without a PeftModel, state-dict functions and their load result, status dataclasses, save options (.bin,
model card, peft_version) through real files both ways, and the exception types."""

from __future__ import annotations

import copy
import dataclasses
import inspect
import json
import warnings

import peft
import peft.utils
import pytest
import torch
from helpers import ids, logits, perturb, quiet, tiny_bert_classifier, tiny_convnet, tiny_gpt2, tiny_llama, tiny_t5

import lightning_peft as lp
import lightning_peft.utils as lpu

# ---- names and signatures ------------------------------------------------------------------------------------------
TOP_LEVEL = [
    "MODEL_TYPE_TO_PEFT_MODEL_MAPPING",
    "PEFT_TYPE_TO_CONFIG_MAPPING",
    "PEFT_TYPE_TO_TUNER_MAPPING",
    "TRANSFORMERS_MODELS_TO_PREFIX_TUNING_POSTPROCESS_MAPPING",
    "NoMatchingPeftModuleError",
    "PeftError",
    "PeftWarning",
    "PromptLearningConfig",
    "get_layer_status",
    "get_model_status",
    "get_peft_config",
    "get_peft_model",
    "get_peft_model_state_dict",
    "set_peft_model_state_dict",
    "inject_adapter_in_model",
    "load_peft_weights",
]
UTILS = [
    "CONFIG_NAME",
    "SAFETENSORS_WEIGHTS_NAME",
    "WEIGHTS_NAME",
    "INCLUDE_LINEAR_LAYERS_SHORTHAND",
    "TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING",
    "TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING",
    "TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING",
    "TRANSFORMERS_MODELS_TO_PREFIX_TUNING_POSTPROCESS_MAPPING",
    "NoMatchingPeftModuleError",
    "PeftError",
    "PeftWarning",
    "PeftType",
    "TaskType",
    "get_peft_model_state_dict",
    "set_peft_model_state_dict",
    "load_peft_weights",
]


def test_names_exist_where_hf_peft_has_them():
    for name in TOP_LEVEL:
        assert hasattr(peft, name), name  # the list is HF's
        assert name in lp.__all__ and hasattr(lp, name), name
    for name in UTILS:
        assert hasattr(peft.utils, name), name
        assert name in lpu.__all__ and hasattr(lpu, name), name
    for name in ("CONFIG_NAME", "SAFETENSORS_WEIGHTS_NAME", "WEIGHTS_NAME", "INCLUDE_LINEAR_LAYERS_SHORTHAND"):
        assert getattr(lpu, name) == getattr(peft.utils, name), name
    from lightning_peft.mapping import inject_adapter_in_model  # HF's module path: peft.mapping
    from lightning_peft.peft_model import TunerLayerStatus, TunerModelStatus  # peft.peft_model

    assert inject_adapter_in_model is lp.inject_adapter_in_model
    for ours, theirs in (
        (TunerLayerStatus, peft.peft_model.TunerLayerStatus),
        (TunerModelStatus, peft.peft_model.TunerModelStatus),
    ):
        assert [f.name for f in dataclasses.fields(ours)] == [f.name for f in dataclasses.fields(theirs)]
    assert issubclass(lp.NoMatchingPeftModuleError, ValueError) and issubclass(
        lp.NoMatchingPeftModuleError, lp.PeftError
    )
    assert issubclass(lp.PeftWarning, UserWarning)
    assert set(lp.PEFT_TYPE_TO_CONFIG_MAPPING) >= {"LORA", "IA3", "PROMPT_TUNING", "P_TUNING", "PREFIX_TUNING"}
    assert (
        lp.PEFT_TYPE_TO_CONFIG_MAPPING["LORA"] is lp.LoraConfig and lp.PEFT_TYPE_TO_TUNER_MAPPING["IA3"] is lp.IA3Model
    )
    assert isinstance(lp.get_peft_config({"peft_type": "LORA", "r": 4, "target_modules": ["q"]}), lp.LoraConfig)


@pytest.mark.parametrize(
    "ours, theirs",
    [
        (lp.get_peft_model, peft.get_peft_model),
        (lp.inject_adapter_in_model, peft.inject_adapter_in_model),
        (lp.get_peft_model_state_dict, peft.get_peft_model_state_dict),
        (lp.set_peft_model_state_dict, peft.set_peft_model_state_dict),
        (lp.PeftModel.save_pretrained, peft.PeftModel.save_pretrained),
        (lp.PeftModel.from_pretrained, peft.PeftModel.from_pretrained),
        (lp.PeftModel.__init__, peft.PeftModel.__init__),
        (lp.PeftConfig.from_pretrained, peft.PeftConfig.from_pretrained),
        (lp.PeftConfig.from_json_file, peft.PeftConfig.from_json_file),
    ],
    ids=lambda f: getattr(f, "__qualname__", "?"),
)
def test_signatures_start_as_hf_peft(ours, theirs):
    """HF's parameters, in HF's order and with HF's defaults, come first (ours may add keyword options after)."""
    hf = [(p.name, p.default) for p in inspect.signature(theirs).parameters.values() if p.kind != p.VAR_KEYWORD]
    own = [(p.name, p.default) for p in inspect.signature(ours).parameters.values() if p.kind != p.VAR_KEYWORD]
    assert own[: len(hf)] == hf


# ---- default targets -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "name",
    [
        "TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING",
        "TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING",
        "TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING",
        "TRANSFORMERS_MODELS_TO_PREFIX_TUNING_POSTPROCESS_MAPPING",
    ],
)
def test_target_tables_equal_hf_peft(name):
    assert getattr(lpu, name) == getattr(peft.utils, name)


BASES = {"llama": tiny_llama, "gpt2": tiny_gpt2, "t5": tiny_t5, "bert": tiny_bert_classifier}
TASKS = {"llama": "CAUSAL_LM", "gpt2": "CAUSAL_LM", "t5": "SEQ_2_SEQ_LM", "bert": "SEQ_CLS"}


@pytest.fixture(scope="module")
def bases():
    return {name: build() for name, build in BASES.items()}


@pytest.mark.parametrize("family", list(BASES))
@pytest.mark.parametrize("tuner", ["LoraConfig", "IA3Config"])
def test_default_targets_are_hf_peft_s(bases, family, tuner):
    """A config without target_modules adapts the same modules as HF PEFT (IA3: the same feedforward ones)."""
    kwargs = dict(task_type=TASKS[family])
    theirs = quiet(peft.get_peft_model, copy.deepcopy(bases[family]), getattr(peft, tuner)(**kwargs))
    ours = lp.get_peft_model(copy.deepcopy(bases[family]), getattr(lp, tuner)(**kwargs))
    assert ours.targeted_module_names == theirs.targeted_module_names
    assert ours.tuner.targeted_module_names == theirs.base_model.targeted_module_names
    assert set(ours.peft_config["default"].target_modules) == set(theirs.peft_config["default"].target_modules)
    if tuner == "IA3Config":
        hf_ff = {n for n, m in theirs.named_modules() if getattr(m, "is_feedforward", False)}
        our_ff = {n for n, m in ours.named_modules() if getattr(m, "is_feedforward", False)}
        assert our_ff == hf_ff and our_ff
    assert {n: p.requires_grad for n, p in ours.named_parameters()} == {
        n: p.requires_grad for n, p in theirs.named_parameters()
    }


def test_unknown_model_type_and_no_match_errors():
    net = tiny_convnet()
    for lib in (peft, lp):  # no default targets for a model without a transformers model_type
        with pytest.raises(ValueError, match="target_modules"):
            quiet(lib.get_peft_model, copy.deepcopy(net), lib.LoraConfig())
    for lib in (peft, lp):
        with pytest.raises(lib.NoMatchingPeftModuleError):
            quiet(lib.get_peft_model, copy.deepcopy(net), lib.LoraConfig(target_modules=["nothing_here"]))
    before = {n: p.requires_grad for n, p in net.named_parameters()}
    with pytest.raises(lp.NoMatchingPeftModuleError, match="matched no module"):
        lp.inject_adapter_in_model(lp.LoraConfig(target_modules=["nothing_here"]), net)
    assert {n: p.requires_grad for n, p in net.named_parameters()} == before
    assert not hasattr(net, "peft_config")


# ---- get_peft_model's options --------------------------------------------------------------------------------------
@pytest.mark.parametrize("autocast", [True, False])
@pytest.mark.parametrize("tuner", ["LoraConfig", "IA3Config", "PromptTuningConfig"])
def test_autocast_adapter_dtype_as_hf_peft(bases, autocast, tuner):
    base = copy.deepcopy(bases["llama"]).to(torch.bfloat16)
    kwargs = dict(task_type="CAUSAL_LM", num_virtual_tokens=3) if tuner == "PromptTuningConfig" else {}
    theirs = quiet(
        peft.get_peft_model, copy.deepcopy(base), getattr(peft, tuner)(**kwargs), autocast_adapter_dtype=autocast
    )
    ours = lp.get_peft_model(copy.deepcopy(base), getattr(lp, tuner)(**kwargs), autocast_adapter_dtype=autocast)
    hf = {n: p.dtype for n, p in theirs.named_parameters() if p.requires_grad}
    assert {n: p.dtype for n, p in ours.named_parameters() if p.requires_grad} == hf
    assert set(hf.values()) == ({torch.bfloat16} if not autocast and tuner != "PromptTuningConfig" else {torch.float32})
    logits(ours, {"input_ids": ids()})  # runs in either dtype


def test_revision_mixed_and_low_cpu_mem_usage(bases):
    config = lp.LoraConfig(target_modules=["c_attn"], fan_in_fan_out=True, revision="v0")
    with pytest.warns(UserWarning, match="overwriting with revision v1"):
        model = lp.get_peft_model(copy.deepcopy(bases["gpt2"]), config, revision="v1")
    assert model.peft_config["default"].revision == "v1" and config.revision == "v0"  # the caller's stays
    hf = quiet(
        peft.get_peft_model,
        copy.deepcopy(bases["gpt2"]),
        peft.LoraConfig(target_modules=["c_attn"], fan_in_fan_out=True),
        revision="v1",
    )
    assert hf.peft_config["default"].revision == "v1"
    before = {n: p.requires_grad for n, p in bases["gpt2"].named_parameters()}
    with pytest.raises(NotImplementedError, match="mixed=True.*not provided"):
        lp.get_peft_model(bases["gpt2"], lp.LoraConfig(target_modules=["c_attn"], fan_in_fan_out=True), mixed=True)
    assert {n: p.requires_grad for n, p in bases["gpt2"].named_parameters()} == before
    assert not any(type(m).__module__.startswith("lightning_peft") for m in bases["gpt2"].modules())
    lazy = lp.get_peft_model(
        copy.deepcopy(bases["gpt2"]), lp.LoraConfig(target_modules=["c_attn"]), low_cpu_mem_usage=True
    )
    assert lazy.targeted_module_names == ["transformer.h.0.attn.c_attn", "transformer.h.1.attn.c_attn"]


# ---- inject_adapter_in_model + the state-dict functions ------------------------------------------------------------
def test_inject_adapter_in_model_and_state_dicts_both_ways(bases):
    kwargs = dict(target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"])
    hf_model = quiet(peft.inject_adapter_in_model, peft.LoraConfig(**kwargs), copy.deepcopy(bases["llama"]))
    base = copy.deepcopy(bases["llama"])
    our_model = lp.inject_adapter_in_model(lp.LoraConfig(**kwargs), base)
    assert our_model is base and not isinstance(our_model, lp.PeftModel)
    assert {n: p.requires_grad for n, p in our_model.named_parameters()} == {
        n: p.requires_grad for n, p in hf_model.named_parameters()
    }
    assert list(our_model.peft_config) == list(hf_model.peft_config) == ["default"]
    perturb(hf_model)
    hf_sd = peft.get_peft_model_state_dict(hf_model)
    # HF's tensors (its own keys: no PeftModel prefix) into ours, and ours back into a fresh HF injection
    result = lp.set_peft_model_state_dict(our_model, hf_sd)
    hf_result = peft.set_peft_model_state_dict(hf_model, hf_sd)
    assert sorted(result.missing_keys) == sorted(hf_result.missing_keys) and result.unexpected_keys == []
    torch.testing.assert_close(logits(our_model, ids()), logits(hf_model, ids()), atol=1e-5, rtol=0)
    our_sd = lp.get_peft_model_state_dict(our_model)
    assert sorted(our_sd) == sorted(hf_sd)
    again = quiet(peft.inject_adapter_in_model, peft.LoraConfig(**kwargs), copy.deepcopy(bases["llama"]))
    peft.set_peft_model_state_dict(again, our_sd)
    torch.testing.assert_close(logits(again, ids()), logits(hf_model, ids()), atol=1e-5, rtol=0)
    # status of an injected model, as HF reports it
    assert [dataclasses.asdict(s) for s in lp.get_layer_status(our_model)] == [
        dataclasses.asdict(s) for s in peft.get_layer_status(hf_model)
    ]
    # a second injection adds an adapter beside the first
    lp.inject_adapter_in_model(lp.LoraConfig(target_modules=["q_proj"]), our_model, adapter_name="other")
    assert list(our_model.peft_config) == ["default", "other"]
    assert set(lp.get_peft_model_state_dict(our_model, adapter_name="other")) == {
        f"model.layers.{i}.self_attn.q_proj.lora_{ab}.weight" for i in (0, 1) for ab in "AB"
    }
    for lib in (peft, lp):  # prompt learning needs a PeftModel
        with pytest.raises(ValueError, match="prompt learning"):
            lib.inject_adapter_in_model(
                lib.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2), tiny_gpt2()
            )


def test_inject_from_a_state_dict_s_keys(bases):
    source = lp.get_peft_model(copy.deepcopy(bases["gpt2"]), lp.LoraConfig(target_modules=r".*h\.1\.attn\.c_attn"))
    keys = lp.get_peft_model_state_dict(source)
    with pytest.warns(RuntimeWarning, match="differ from the modules the state_dict"):
        model = lp.inject_adapter_in_model(lp.LoraConfig(target_modules=["c_proj"]), tiny_gpt2(), state_dict=keys)
    assert lp.get_layer_status(model)[0].name == "transformer.h.1.attn.c_attn" and len(lp.get_layer_status(model)) == 1


def test_state_dict_functions_on_peft_models(bases):
    kwargs = dict(target_modules=["c_attn"], fan_in_fan_out=True)
    theirs = quiet(peft.get_peft_model, copy.deepcopy(bases["gpt2"]), peft.LoraConfig(**kwargs))
    ours = lp.get_peft_model(copy.deepcopy(bases["gpt2"]), lp.LoraConfig(**kwargs))
    perturb(theirs)
    hf_sd = peft.get_peft_model_state_dict(theirs)
    result = lp.set_peft_model_state_dict(ours, hf_sd)
    hf_result = peft.set_peft_model_state_dict(theirs, hf_sd)
    assert sorted(result.missing_keys) == sorted(hf_result.missing_keys) and result.unexpected_keys == []
    assert result._fields == hf_result._fields == ("missing_keys", "unexpected_keys")
    torch.testing.assert_close(logits(ours, ids()), logits(theirs, ids()), atol=1e-5, rtol=0)
    # state_dict= and unwrap_compiled= as HF PEFT
    sd = ours.state_dict()
    assert sorted(lp.get_peft_model_state_dict(ours, state_dict=sd)) == sorted(hf_sd)

    class Compiled(torch.nn.Module):  # what torch.compile returns keeps the model as _orig_mod
        def __init__(self, inner):
            super().__init__()
            self._orig_mod = inner

    assert sorted(lp.get_peft_model_state_dict(Compiled(ours), unwrap_compiled=True)) == sorted(hf_sd)
    # a wrong shape: refused with nothing written, unless ignore_mismatched_sizes (HF's warning; the rest loads)
    bad = {k: (torch.zeros(3, 3) if k.endswith("h.0.attn.c_attn.lora_A.weight") else v * 2) for k, v in hf_sd.items()}
    before = {k: v.clone() for k, v in ours.state_dict().items()}
    with pytest.raises(ValueError, match="shape mismatches"):
        lp.set_peft_model_state_dict(ours, bad)
    assert all(torch.equal(before[k], v) for k, v in ours.state_dict().items())
    with pytest.warns(UserWarning, match="ignore_mismatched_sizes=True"):
        lp.set_peft_model_state_dict(ours, bad, ignore_mismatched_sizes=True)
    now = lp.get_peft_model_state_dict(ours)
    key = "base_model.model.transformer.h.0.attn.c_attn.lora_A.weight"
    assert torch.equal(now[key], hf_sd[key]) and torch.equal(
        now[key.replace("h.0", "h.1")], 2 * hf_sd[key.replace("h.0", "h.1")]
    )
    with pytest.raises(TypeError, match="holds no lightning_peft adapter"):
        lp.get_peft_model_state_dict(tiny_gpt2())


# ---- status, targeted names, modules_to_save -----------------------------------------------------------------------
def _status_pair(bases, merge: bool):
    kwargs = dict(target_modules=["c_attn"], fan_in_fan_out=True, modules_to_save=["lm_head"])
    pair = []
    for lib in (peft, lp):
        model = quiet(lib.get_peft_model, copy.deepcopy(bases["gpt2"]), lib.LoraConfig(**kwargs))
        model.add_adapter("other", lib.LoraConfig(target_modules=["c_attn", "c_proj"], fan_in_fan_out=True))
        if merge:
            quiet(model.merge_adapter)
        pair.append(model)
    return pair


@pytest.mark.parametrize("merge", [False, True])
def test_layer_and_model_status_equal_hf_peft(bases, merge):
    theirs, ours = _status_pair(bases, merge)
    assert [dataclasses.asdict(s) for s in ours.get_layer_status()] == [
        dataclasses.asdict(s) for s in theirs.get_layer_status()
    ]
    assert dataclasses.asdict(lp.get_model_status(ours)) == dataclasses.asdict(peft.get_model_status(theirs))
    assert dataclasses.asdict(ours.get_model_status()) == dataclasses.asdict(theirs.get_model_status())
    assert ours.modules_to_save == theirs.modules_to_save == {"lm_head"}
    assert ours.targeted_module_names == theirs.targeted_module_names


def test_status_refusals_and_modules_to_save_none(bases):
    for lib in (peft, lp):
        prompt = quiet(
            lib.get_peft_model,
            copy.deepcopy(bases["gpt2"]),
            lib.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2),
        )
        with pytest.raises(TypeError, match="invalid PeftModel"):
            lib.get_layer_status(prompt)
        with pytest.raises(TypeError, match="invalid PeftModel"):
            lib.get_model_status(prompt)
        with pytest.raises(ValueError, match="No adapter layers found"):
            lib.get_layer_status(tiny_convnet())
        plain = quiet(lib.get_peft_model, copy.deepcopy(bases["gpt2"]), lib.LoraConfig(target_modules=["c_attn"]))
        assert plain.modules_to_save is None


# ---- save_pretrained's options, through files both ways ------------------------------------------------------------
def test_pickled_bin_both_ways(bases, tmp_path):
    kwargs = dict(target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    ours = lp.get_peft_model(copy.deepcopy(bases["llama"]), lp.LoraConfig(**kwargs))
    perturb(ours)
    (tmp_path / "ours").mkdir()
    (tmp_path / "ours" / "adapter_model.safetensors").write_text("stale")  # removed: it would shadow the .bin
    ours.save_pretrained(tmp_path / "ours", safe_serialization=False)
    assert not (tmp_path / "ours" / "adapter_model.safetensors").exists()
    assert (tmp_path / "ours" / "adapter_model.bin").is_file()
    read = quiet(peft.PeftModel.from_pretrained, copy.deepcopy(bases["llama"]), tmp_path / "ours")
    torch.testing.assert_close(logits(read, ids()), logits(ours, ids()), atol=1e-5, rtol=0)
    theirs = quiet(peft.get_peft_model, copy.deepcopy(bases["llama"]), peft.LoraConfig(**kwargs))
    perturb(theirs, seed=5)
    theirs.save_pretrained(tmp_path / "theirs", safe_serialization=False)
    with pytest.raises(ValueError, match="allow_pickle=True"):
        lp.PeftModel.from_pretrained(copy.deepcopy(bases["llama"]), tmp_path / "theirs")
    back = lp.PeftModel.from_pretrained(copy.deepcopy(bases["llama"]), tmp_path / "theirs", allow_pickle=True)
    torch.testing.assert_close(logits(back, ids()), logits(theirs, ids()), atol=1e-5, rtol=0)
    with pytest.raises(TypeError, match="safe_serialization"):
        ours.save_pretrained(tmp_path / "x", safe_serialization="no")
    with pytest.raises(ValueError, match="is not a folder"):  # the conversion itself: test_lora_init.py
        ours.save_pretrained(tmp_path / "pissa", path_initial_model_for_weight_conversion=str(tmp_path / "init"))
    assert not (tmp_path / "pissa").exists() and not (tmp_path / "init").exists()


def _front_matter(path):
    from huggingface_hub import ModelCard

    return ModelCard.load(path).data.to_dict()


def test_model_card_and_peft_version_both_ways(bases, tmp_path):
    kwargs = dict(target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    ours = lp.get_peft_model(copy.deepcopy(bases["llama"]), lp.LoraConfig(**kwargs))
    theirs = quiet(peft.get_peft_model, copy.deepcopy(bases["llama"]), peft.LoraConfig(**kwargs))
    perturb(ours)
    ours.save_pretrained(tmp_path / "ours")
    theirs.save_pretrained(tmp_path / "theirs")
    card = _front_matter(tmp_path / "ours" / "README.md")
    hf_card = _front_matter(tmp_path / "theirs" / "README.md")
    for key in ("library_name", "pipeline_tag"):
        assert card[key] == hf_card[key]
    assert set(card["tags"]) == set(hf_card["tags"]) - {"base_model:adapter:"}  # HF tags an empty base name
    assert f"- lightning_peft {lp.__version__}" in (tmp_path / "ours" / "README.md").read_text()
    # peft_version: ours written, HF's kept when read (by either library), without warnings
    written = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert written["peft_version"] == f"{peft.__version__}@lightning_peft-{lp.__version__}"  # HF's format version
    assert json.loads((tmp_path / "theirs" / "adapter_config.json").read_text())["peft_version"] == peft.__version__
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert lp.PeftConfig.from_pretrained(tmp_path / "theirs").peft_version == peft.__version__
        back = lp.PeftModel.from_pretrained(copy.deepcopy(bases["llama"]), tmp_path / "theirs")
    assert back.peft_config["default"].peft_version == peft.__version__
    read = quiet(peft.PeftModel.from_pretrained, copy.deepcopy(bases["llama"]), tmp_path / "ours")
    assert read.peft_config["default"].peft_version == written["peft_version"]
    torch.testing.assert_close(logits(read, ids()), logits(ours, ids()), atol=1e-5, rtol=0)
    # an existing README.md keeps its text and metadata; the fields and the version line are added once
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "README.md").write_text("---\nlicense: mit\n---\n\n# My adapter\n\nNotes.\n")
    ours.save_pretrained(folder)
    ours.save_pretrained(folder)
    text = (folder / "README.md").read_text()
    assert "# My adapter\n\nNotes." in text and text.count(f"- lightning_peft {lp.__version__}") == 1
    meta = _front_matter(folder / "README.md")
    assert meta["license"] == "mit" and meta["library_name"] == "peft" and "lora" in meta["tags"]


def test_save_embedding_layers_as_hf_peft(bases, tmp_path):
    kwargs = dict(target_modules=["embed_tokens", "q_proj"])
    for option in ("auto", False, True):
        keys = []
        for lib in (peft, lp):
            model = quiet(lib.get_peft_model, copy.deepcopy(bases["llama"]), lib.LoraConfig(**kwargs))
            folder = tmp_path / f"{lib.__name__}-{option}"
            quiet(model.save_pretrained, folder, save_embedding_layers=option)
            from safetensors.torch import load_file

            keys.append(sorted(load_file(folder / "adapter_model.safetensors")))
        assert keys[0] == keys[1], option
        assert any(k.endswith("embed_tokens.base_layer.weight") for k in keys[0]) == (option is not False)


def test_config_from_json_file_and_subfolder(bases, tmp_path):
    ours = lp.get_peft_model(copy.deepcopy(bases["gpt2"]), lp.LoraConfig(target_modules=["c_attn"]))
    ours.add_adapter("second", lp.LoraConfig(target_modules=["c_attn"], r=4))
    ours.save_pretrained(tmp_path)
    path = tmp_path / "adapter_config.json"
    assert lp.PeftConfig.from_json_file(path) == peft.PeftConfig.from_json_file(str(path))
    assert isinstance(lp.PeftConfig.from_json_file(path), dict)
    hf = peft.PeftConfig.from_pretrained(str(tmp_path), subfolder="second")
    mine = lp.PeftConfig.from_pretrained(tmp_path, subfolder="second")
    assert type(mine).__name__ == type(hf).__name__ == "LoraConfig" and mine.r == hf.r == 4
    data = json.loads(path.read_text())
    data["runtime_config"] = {}
    path.write_text(json.dumps(data))
    with pytest.warns(UserWarning, match="runtime_config"):
        assert "runtime_config" not in lp.PeftConfig.from_json_file(path)
    with pytest.raises(FileNotFoundError):
        lp.PeftConfig.from_json_file(tmp_path / "missing.json")
