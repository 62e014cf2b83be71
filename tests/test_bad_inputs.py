"""A catalogue of bad inputs to the tuner API and adapter files: each gets an error that says what to
do, and leaves the model (and the files) as they were."""

from __future__ import annotations

import copy
import json
import shutil

import pytest
import torch
from helpers import tiny_bert_classifier, tiny_gpt2, tiny_llama
from safetensors.torch import load_file, save_file

import lightning_peft as lp

GPT2_LORA = dict(target_modules=["c_attn"], fan_in_fan_out=True)


def _snapshot(model: torch.nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, bool], dict[str, type]]:
    """The weights, which parameters require grad, and the module types (wrappers left behind show there)."""
    return (
        {k: v.clone() for k, v in model.state_dict().items()},
        {n: p.requires_grad for n, p in model.named_parameters()},
        {n: type(m) for n, m in model.named_modules()},
    )


def _unchanged(model: torch.nn.Module, before: tuple) -> bool:
    weights, requires_grad, types = before
    after = model.state_dict()
    return (
        sorted(after) == sorted(weights)
        and all(torch.equal(after[k], v) for k, v in weights.items())
        and {n: p.requires_grad for n, p in model.named_parameters()} == requires_grad
        and {n: type(m) for n, m in model.named_modules()} == types
    )


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


@pytest.mark.parametrize(
    "kwargs,error,message",
    [
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
    ],
)
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


def test_a_failed_prompt_learning_load_gives_the_classifier_back(tmp_path):
    saved = lp.get_peft_model(tiny_bert_classifier(), lp.PromptTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=4))
    saved.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    tensors["prompt_embeddings"] = torch.zeros(3, tensors["prompt_embeddings"].shape[1])
    save_file(tensors, tmp_path / "adapter_model.safetensors")
    base = tiny_bert_classifier()
    base.bert.embeddings.requires_grad_(False)  # the user's own choice of what trains must survive too
    before = _snapshot(base)
    with pytest.raises(ValueError, match=r"shape mismatches: prompt_embeddings: file \(3, 32\) vs model \(4, 32\)"):
        lp.PeftModel.from_pretrained(base, tmp_path, is_trainable=True)
    assert type(base.classifier) is torch.nn.Linear
    assert not base.bert.embeddings.word_embeddings.weight.requires_grad and base.classifier.weight.requires_grad
    assert _unchanged(base, before), "a failed load must leave the base model untouched"


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


# =============================================================================================
# more of the catalogue (issue 8): each case checks the message says what to do and nothing changed
# =============================================================================================
# ---- configs ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(r=0), "r must be a positive integer (the LoRA rank), got 0"),
        (dict(r=-2), "r must be a positive integer (the LoRA rank), got -2"),
        (dict(lora_dropout=1.0), "lora_dropout must be a number in [0, 1), got 1.0"),
        (
            dict(target_modules="(q"),
            "target_modules='(q' is not a valid regex (missing ), unterminated subpattern at position 0)",
        ),
        (dict(target_modules=[]), "target_modules is empty; name at least one module (e.g. ['q_proj', 'v_proj'])"),
        (
            dict(target_modules=".*q_proj", layers_to_transform=[0]),
            "layers_to_transform cannot be used when target_modules is a regex string; give target_modules as a list",
        ),
        (
            dict(target_modules=["q_proj"], layers_pattern="layers"),
            "layers_pattern only has an effect together with layers_to_transform; set both",
        ),
        (dict(bias="some"), "bias='some' is not valid; use one of: 'none', 'all', 'lora_only'"),
        (
            dict(task_type="NOPE"),
            "task_type='NOPE' is not valid; use one of: CAUSAL_LM, SEQ_2_SEQ_LM, SEQ_CLS, "
            "TOKEN_CLS, QUESTION_ANS, FEATURE_EXTRACTION",
        ),
    ],
)
def test_lora_config_values_out_of_range_or_conflicting(kwargs, message):
    with pytest.raises(ValueError) as err:
        lp.LoraConfig(**kwargs)
    assert str(err.value) == message


def test_ia3_feedforward_modules_outside_the_targets():
    with pytest.raises(ValueError) as err:
        lp.IA3Config(target_modules=["q_proj"], feedforward_modules=["down_proj"])
    assert str(err.value) == (
        "feedforward_modules must be a subset of target_modules; ['down_proj'] are not in "
        "target_modules=['q_proj']. Add them to target_modules or drop them from "
        "feedforward_modules"
    )


def test_targets_that_match_no_module_name_the_ones_there():
    base = tiny_llama()
    before = _snapshot(base)
    with pytest.raises(ValueError) as err:
        lp.get_peft_model(base, lp.LoraConfig(target_modules=["nope"]))
    assert str(err.value).startswith(
        "target_modules={'nope'} matched no module of the model; leaf module names end "
        "in: embed_tokens, q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj"
    )
    assert _unchanged(base, before)
    assert not any("lora" in n for n, _ in base.named_modules())


@pytest.mark.parametrize(
    "config,error,message",
    [
        (
            5,
            TypeError,
            "config must be a tuner config (e.g. LoraConfig(...)) or a dict / DictConfig with 'peft_type' or "
            "'_target_', got int",
        ),
        (
            {"_target_": "torch.nn.Identity"},
            TypeError,
            "_target_='torch.nn.Identity' built a Identity, not a tuner config (e.g. lightning_peft.LoraConfig)",
        ),
        ({"peft_type": "LORA", "r": -1}, ValueError, "r must be a positive integer (the LoRA rank), got -1"),
        (
            {"r": 8},
            ValueError,
            "the tuner config {'r': 8} has neither 'peft_type' (e.g. LORA) nor '_target_' "
            "(e.g. lightning_peft.LoraConfig); say which tuner it is for",
        ),
    ],
)
def test_peft_callback_config_errors(config, error, message):
    from lightning_peft.lightning import PEFTCallback

    with pytest.raises(error) as err:
        PEFTCallback(config)
    assert str(err.value) == message


# ---- Hydra overrides (composition; misspelled keys are in tests/test_app.py) -------------------
def _compose(override):
    from hydra import compose, initialize_config_dir

    from lightning_peft.app import CONFIG_DIR
    from lightning_peft.app.schema import register_configs

    register_configs()  # main() does this; importing the app does not
    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        return compose("train", overrides=[override])


def test_misspelled_config_group_names_the_group():
    from lightning_peft.app.schema import UnknownKeyError, check_overrides

    with pytest.raises(UnknownKeyError) as err:
        check_overrides(["tunr=lora"])
    assert str(err.value).startswith("Unknown key 'tunr'. Did you mean 'tuner'? Valid keys of the top level: ")


@pytest.mark.parametrize(
    "override,options",
    [
        ("tuner=loha", "Available options in 'tuner':\n\tia3\n\tlora\n\tp_tuning\n\tprefix_tuning\n\tprompt_tuning"),
        ("strategy=fsdp3", "Available options in 'strategy':\n\tddp\n\tfsdp\n\tfsdp1\n\tint8\n\tsingle"),
    ],
)
def test_unknown_group_choice_lists_the_available_ones(override, options):
    from hydra.errors import MissingConfigException

    with pytest.raises(MissingConfigException) as err:
        _compose(override)
    assert f"Could not find '{override.replace('=', '/')}'" in str(err.value) and options in str(err.value)


@pytest.mark.parametrize(
    "override,cause",
    [
        ("seed=abc", "Value 'abc' of type 'str' could not be converted to Integer\n    full_key: seed"),
        ("quantize=int4", "Invalid value 'int4', expected one of [int8]\n    full_key: quantize"),
    ],
)
def test_top_level_values_of_the_wrong_type(override, cause):
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException) as err:
        _compose(override)
    assert str(err.value) == f"Error merging override {override}"
    assert str(err.value.__cause__).startswith(cause)


@pytest.mark.parametrize(
    "override,message",
    [
        ("tuner.r=abc", "r must be a positive integer (the LoRA rank), got 'abc'"),
        ("tuner.lora_dropout=1.5", "lora_dropout must be a number in [0, 1), got 1.5"),
    ],
)
def test_tuner_values_from_the_command_line_are_checked(override, message):
    from hydra.errors import InstantiationException

    from lightning_peft.app.train import tuner_config

    cfg = _compose(override)
    with pytest.raises(InstantiationException) as err:
        tuner_config(cfg)  # as the app builds it (the tuner's `optim` defaults left out)
    assert message in str(err.value)


# ---- adapter files ---------------------------------------------------------------------------
def _edit_config(folder, **changes):
    data = json.loads((folder / "adapter_config.json").read_text())
    data.update(changes)
    (folder / "adapter_config.json").write_text(json.dumps(data))
    return data


def test_config_whose_rank_does_not_match_the_weights(saved_adapter):
    base, folder = saved_adapter
    _edit_config(folder, r=4)
    _load_fails(
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
    _load_fails(
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
    _load_fails(base, folder, r"missing keys: .*ia3_l.*unexpected keys: .*lora_A\.weight")


def test_config_with_a_wrong_value(saved_adapter):
    base, folder = saved_adapter
    _edit_config(folder, r="x")
    _load_fails(base, folder, "r must be a positive integer \\(the LoRA rank\\), got 'x'")


def test_config_of_an_unknown_tuner(saved_adapter):
    base, folder = saved_adapter
    _edit_config(folder, peft_type="LOHA")
    _load_fails(base, folder, "unknown peft_type 'LOHA'; lightning_peft knows: LORA, IA3")


def test_empty_weights_file(saved_adapter):
    base, folder = saved_adapter
    (folder / "adapter_model.safetensors").write_bytes(b"")
    _load_fails(base, folder, "not a readable safetensors file .*header too small.*export the adapter again")


# ---- checkpoints -----------------------------------------------------------------------------
def _fit(callback, root, ckpt_path=None, steps=2, holder=None):
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import ModelCheckpoint

    class Module(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = tiny_llama()

        def training_step(self, batch, batch_idx):
            return self.model(input_ids=batch[0], labels=batch[0]).loss

        def configure_optimizers(self):
            return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=0.1)

    data = torch.utils.data.TensorDataset(torch.randint(1, 64, (8, 12), generator=torch.Generator().manual_seed(0)))
    module = Module()
    if holder is not None:
        holder["module"] = module
    trainer = pl.Trainer(
        max_steps=steps,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=root,
        callbacks=[callback, ModelCheckpoint(dirpath=root, save_last=True)],
    )
    trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=4), ckpt_path=ckpt_path)
    return module, trainer


def test_checkpoint_from_another_tuner_is_refused_and_nothing_is_loaded(tmp_path):
    from lightning_peft.lightning import PEFTCallback

    _fit(
        PEFTCallback(
            lp.IA3Config(target_modules=["q_proj", "down_proj"], feedforward_modules=["down_proj"]),
            merge_on_train_end=False,
        ),
        tmp_path / "ia3",
    )
    holder = {}
    with pytest.raises(ValueError) as err:
        _fit(
            PEFTCallback(lp.LoraConfig(target_modules=["q_proj"]), merge_on_train_end=False),
            tmp_path / "lora",
            ckpt_path=str(tmp_path / "ia3" / "last.ckpt"),
            holder=holder,
        )
    message = str(err.value)
    assert message.startswith(
        "refusing to load this state into Module: it does not hold the adapter 'default' (LORA) "
        "of `self.model` (4 of 4 adapter tensors are missing: model.base_model.model.model."
        "layers.0.self_attn.q_proj.lora_A.default.weight"
    )
    assert message.endswith(
        "It was saved without the adapter or for a different tuner config / model; nothing was loaded."
    )
    assert not (tmp_path / "lora").exists()  # no checkpoint written
    peft = holder["module"].model
    fresh = tiny_llama()  # the same seeded base: not a weight of it was touched
    base = {k.replace("base_layer.", ""): v for k, v in peft.get_base_model().state_dict().items() if "lora_" not in k}
    assert sorted(base) == sorted(fresh.state_dict())
    assert all(torch.equal(v, base[k]) for k, v in fresh.state_dict().items())
    lora_b = [p for n, p in peft.named_parameters() if "lora_B" in n]
    assert len(lora_b) == 2 and all(torch.count_nonzero(p) == 0 for p in lora_b)  # as injected: zeros, untrained


# ---- runtime ---------------------------------------------------------------------------------
def test_safe_merge_of_a_nan_adapter_is_refused_and_the_base_kept():
    model = lp.get_peft_model(tiny_llama(), lp.LoraConfig(target_modules=["q_proj"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.fill_(float("nan"))  # e.g. after a NaN loss
    before = _snapshot(model)[0]
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
    before = _snapshot(model)
    with pytest.raises(ValueError) as err:
        getattr(model, call)("nope")
    assert str(err.value) == "no adapter named 'nope'; this model has: default"
    assert _unchanged(model, before) and model.active_adapter == "default"


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
