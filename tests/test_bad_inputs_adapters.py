"""Misuse of the adapter API at run time (names, deletion, merging, wrapping): a clear error and the model as it was."""

from __future__ import annotations

import shutil

import pytest
import torch
from helpers import (
    GPT2_LORA,
    ids,
    logits,
    perturb,
    quiet,
    snapshot,
    tiny_bert_classifier,
    tiny_gpt2,
    tiny_llama,
    unchanged,
)

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


def test_deleting_the_active_adapter_activates_a_remaining_one_with_a_warning():
    """As HF PEFT (tests/test_hf_adapter_state.py compares the two)."""
    model = lp.get_peft_model(tiny_llama(), lp.LoraConfig(target_modules=["q_proj"]))
    model.add_adapter("b", lp.LoraConfig(target_modules=["q_proj"]))
    with pytest.warns(UserWarning, match="Adapter default was active which is now deleted. Setting active adapter to"):
        model.delete_adapter("default")
    assert model.active_adapter == "b" and list(model.peft_config) == ["b"]


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
    with pytest.raises(
        ValueError,
        match=r"target_modules=\{'nope'\} matched no module of the model; leaf module names end "
        "in: embed_tokens, q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj",
    ):
        lp.get_peft_model(base, lp.LoraConfig(target_modules=["nope"]))
    assert unchanged(base, before)
    assert not any("lora" in n for n, _ in base.named_modules())


def test_safe_merge_of_a_nan_adapter_is_refused_and_the_base_kept():
    model = lp.get_peft_model(tiny_llama(), lp.LoraConfig(target_modules=["q_proj"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.fill_(float("nan"))  # e.g. after a NaN loss
    before = snapshot(model)[0]
    with pytest.raises(ValueError, match="merging adapter 'default' would put NaN/inf into Linear weights"):
        model.merge_and_unload(safe_merge=True)
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
    with pytest.raises(ValueError, match="no adapter named 'nope'; this model has: default"):
        getattr(model, call)("nope")
    assert unchanged(model, before) and model.active_adapter == "default"


# ---- wrapping never destroys a live adapter (HF peft 0.21 warns and re-initialises or replaces it) ----
def _live_lora(value=0.01, name="default"):
    base = tiny_gpt2()
    model = lp.get_peft_model(base, lp.LoraConfig(**GPT2_LORA), adapter_name=name)
    _fill(model, "lora_B", value)
    return base, model


def _fill(model, part, value):
    with torch.no_grad():
        for n, p in model.named_parameters():
            if part in n:
                p.fill_(value)


def _lora_b(model, name="default"):
    return model.base_model.model.transformer.h[0].attn.c_attn.lora_B[name].weight


@pytest.mark.parametrize(
    "wrap",
    [
        lambda base, model, folder: lp.get_peft_model(base, lp.LoraConfig(**GPT2_LORA)),
        lambda base, model, folder: lp.get_peft_model(base, lp.LoraConfig(**GPT2_LORA), adapter_name="other"),
        lambda base, model, folder: lp.PeftModel(base, lp.IA3Config(target_modules=["c_attn"])),
        lambda base, model, folder: lp.PeftModel.from_pretrained(base, folder),
        lambda base, model, folder: lp.PeftModel.from_pretrained(base, folder / "missing"),
    ],
    ids=["get_peft_model-same-name", "get_peft_model-other-name", "PeftModel-ia3", "from_pretrained", "failed-load"],
)
def test_wrapping_a_base_that_holds_a_live_adapter_is_refused(wrap, saved_adapter):
    _, folder = saved_adapter
    base, model = _live_lora(0.5)
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"already carries a live adapter .*add_adapter\(name, config\).*unload\(\)"):
        wrap(base, model, folder)
    assert unchanged(model, before)
    assert float(_lora_b(model)[0, 0]) == 0.5 and list(model.peft_config) == ["default"]


def test_wrapping_a_peft_model_is_refused():
    _, model = _live_lora(0.5)
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"already a PeftModel \(adapters: default\); add an adapter"):
        lp.get_peft_model(model, lp.LoraConfig(target_modules=["c_attn"]))
    with pytest.raises(ValueError, match="already a LoraModel"):
        lp.get_peft_model(model.base_model, lp.LoraConfig(target_modules=["c_attn"]))
    assert unchanged(model, before)


def test_a_base_fed_by_a_prompt_adapter_is_refused_until_unload():
    base = tiny_gpt2()
    model = lp.get_peft_model(base, lp.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4))
    before, base_before = snapshot(model), snapshot(base)
    with pytest.raises(ValueError, match=r"a PROMPT_TUNING adapter \(default\) feeds it its prompt"):
        lp.get_peft_model(base, lp.LoraConfig(**GPT2_LORA))
    assert unchanged(model, before) and unchanged(base, base_before)
    assert base.transformer.h[0].attn.c_attn.__class__.__name__ == "Conv1D"
    model.unload()
    assert type(lp.get_peft_model(base, lp.LoraConfig(**GPT2_LORA)).base_model).__name__ == "LoraModel"


# ---- files: what a folder names is read from that folder ----
def test_from_pretrained_and_load_adapter_read_config_and_weights_from_the_subfolder(tmp_path):
    _, model = _live_lora(0.25)
    model.add_adapter("b", lp.LoraConfig(**GPT2_LORA, lora_alpha=32))
    model.set_adapter("b")
    _fill(model, "lora_B.b", 0.75)
    model.save_pretrained(tmp_path)  # default in the root, "b" in tmp_path/b
    loaded = lp.PeftModel.from_pretrained(tiny_gpt2(), tmp_path, subfolder="b")
    assert loaded.peft_config["default"].lora_alpha == 32 and float(_lora_b(loaded)[0, 0]) == 0.75
    root = lp.PeftModel.from_pretrained(tiny_gpt2(), tmp_path)
    assert root.peft_config["default"].lora_alpha == 8 and float(_lora_b(root)[0, 0]) == 0.25
    root.load_adapter(tmp_path, adapter_name="x", subfolder="b")
    assert root.peft_config["x"].lora_alpha == 32 and float(_lora_b(root, "x")[0, 0]) == 0.75
    assert root.base_model.model.transformer.h[0].attn.c_attn.scaling == {"default": 1.0, "x": 4.0}


def test_load_adapter_into_an_existing_adapter_takes_the_files_config(tmp_path):
    _, writer = _live_lora(0.5)
    writer.add_adapter("b", lp.LoraConfig(**GPT2_LORA, lora_alpha=32))
    _fill(writer, "lora_B.b", 0.75)
    writer.save_pretrained(tmp_path, selected_adapters=["b"])
    _, model = _live_lora(0.1)
    model.add_adapter("other", lp.LoraConfig(**GPT2_LORA))
    model.load_adapter(tmp_path / "b", adapter_name="default")
    assert model.peft_config["default"].lora_alpha == 32  # HF peft 0.21 keeps 8: its weights under another config
    layer = model.base_model.model.transformer.h[0].attn.c_attn
    assert layer.scaling == {"other": 1.0, "default": 4.0} and float(_lora_b(model)[0, 0]) == 0.75
    assert list(model.peft_config) == ["default", "other"] and model.active_adapter == "default"
    assert model.peft_config["default"].inference_mode and not _lora_b(model).requires_grad


def test_load_adapter_into_an_existing_adapter_of_another_shape_is_refused(tmp_path):
    _, writer = _live_lora(0.5)
    writer.add_adapter("b", lp.LoraConfig(target_modules=["c_attn", "c_proj"], fan_in_fan_out=True))
    writer.save_pretrained(tmp_path, selected_adapters=["b"])
    _, model = _live_lora(0.1)
    model.add_adapter("other", lp.LoraConfig(**GPT2_LORA))
    before, config = snapshot(model), model.peft_config["default"].to_dict()
    with pytest.raises(ValueError, match=r"has other targets or shapes than adapter 'default' .*new adapter_name"):
        model.load_adapter(tmp_path / "b", adapter_name="default")
    assert unchanged(model, before) and model.peft_config["default"].to_dict() == config
    assert list(model.peft_config) == ["default", "other"] and model.active_adapter == "default"


# ---- adapter names: never a path, never a part of the model's parameter paths ----
BAD_NAMES = ["/tmp/lp-abs", "a/b", "a\\b", "..", "a\0b", "", " x", "h", "0", "weight", "base_layer", "lora_A"]
BAD_NAMES += ["forward", 3]


@pytest.mark.parametrize("name", BAD_NAMES)
@pytest.mark.parametrize("call", ["add_adapter", "get_peft_model", "from_pretrained", "load_adapter"])
def test_bad_adapter_names_are_refused_and_nothing_changes(name, call, saved_adapter, tmp_path):
    base, folder = saved_adapter
    model = lp.get_peft_model(tiny_gpt2(), lp.LoraConfig(**GPT2_LORA))
    before, base_before = snapshot(model), snapshot(base)
    with pytest.raises(ValueError, match=r"adapter name .* (is not valid|is a part of the model's paths|prefix)"):
        if call == "add_adapter":
            model.add_adapter(name, lp.LoraConfig(**GPT2_LORA))
        elif call == "get_peft_model":
            lp.get_peft_model(base, lp.LoraConfig(**GPT2_LORA), adapter_name=name)
        elif call == "from_pretrained":
            lp.PeftModel.from_pretrained(base, folder, adapter_name=name)
        else:
            model.load_adapter(folder, adapter_name=name)
    assert unchanged(model, before) and unchanged(base, base_before) and list(model.peft_config) == ["default"]
    model.save_pretrained(tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "README.md",
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    assert not (tmp_path / "lp-abs").exists() and not __import__("os").path.exists("/tmp/lp-abs")


def test_the_allowed_names_are_spelled_out():
    with pytest.raises(ValueError, match=r"no paths, '.', '/', '\\' or control characters; use letters, digits"):
        lp.get_peft_model(tiny_gpt2(), lp.LoraConfig(**GPT2_LORA), adapter_name="../x")


@pytest.mark.parametrize("name", ["my task-2", "7", "Ünï_cøde"])
def test_an_unusual_allowed_name_round_trips_exactly(name, tmp_path):
    _, model = _live_lora(0.5)
    model.add_adapter(name, lp.LoraConfig(**GPT2_LORA, lora_alpha=16))
    perturb(model.base_model.model, seed=5)  # every adapter, the new one included (set_adapter below)
    model.set_adapter(name)
    perturb(model.base_model.model, seed=6)
    model.save_pretrained(tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert (tmp_path / "out" / name / "adapter_model.safetensors").is_file()
    written = lp.get_peft_model_state_dict(model, adapter_name=name)
    loaded = lp.PeftModel.from_pretrained(tiny_gpt2(), tmp_path / "out", subfolder=name, adapter_name=name)
    again = lp.get_peft_model_state_dict(loaded, adapter_name=name)
    assert sorted(again) == sorted(written) and all(torch.equal(again[k], written[k]) for k in written)
    model.load_adapter(tmp_path / "out", adapter_name="dup", subfolder=name)
    copied = lp.get_peft_model_state_dict(model, adapter_name="dup")
    assert all(torch.equal(copied[k], written[k]) for k in written)
    assert model.peft_config["dup"].lora_alpha == 16


# ---- add_weighted_adapter: all or nothing ----
def _two_adapters():
    model = lp.get_peft_model(tiny_gpt2(), lp.LoraConfig(**GPT2_LORA), adapter_name="a")
    model.add_adapter("b", lp.LoraConfig(**GPT2_LORA))
    perturb(model.base_model.model, seed=7)
    return model


NAN = float("nan")


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(svd_rank=33), r"svd_rank=33 is larger than transformer.h.0.attn.c_attn allows: its 96x32 update"),
        (dict(svd_rank=0), r"svd_rank=0 is not valid; give a positive int"),
        (dict(svd_rank=-2), r"svd_rank=-2 is not valid"),
        (dict(svd_rank=2.5), r"svd_rank=2.5 is not valid"),
        (dict(svd_clamp=1.5), r"svd_clamp=1.5 is not valid; it is a quantile: give a number in \[0, 1\]"),
        (dict(svd_clamp=-0.1), r"svd_clamp=-0.1 is not valid"),
        (dict(weights=[NAN, 1.0]), r"weights must be finite numbers, got nan"),
        (dict(weights=[1.0, float("inf")], combination_type="cat"), r"weights must be finite numbers, got inf"),
        (dict(svd_driver="gesvd"), r"svd_driver='gesvd' is a CUDA \(cuSOLVER\) driver, but the adapters are on cpu"),
        (dict(svd_driver="magic"), r"svd_driver='magic' is not valid; use None or one of: gesvd"),
        (dict(adapters=[], weights=[]), r"needs at least one adapter to combine; got adapters=\[\]"),
        (dict(weights=[1.0]), r"got 2 adapters but 1 weights; give one weight per adapter"),
        (dict(adapters=["a", "zz"]), r"no adapter named 'zz'; this model has: a, b"),
        (dict(adapter_name="a"), r"an adapter named 'a' already exists"),
        (dict(adapter_name="h"), r"adapter name 'h' is a part of the model's paths"),
        (dict(combination_type="mean"), r"combination_type='mean' is not valid"),
    ],
)
def test_a_failed_add_weighted_adapter_leaves_nothing_behind(kwargs, match):
    model = _two_adapters()
    before = snapshot(model)
    call = dict(adapters=["a", "b"], weights=[0.5, 0.5], adapter_name="mix", combination_type="svd") | kwargs
    with pytest.raises(ValueError, match=match):
        model.add_weighted_adapter(**call)
    assert unchanged(model, before) and list(model.peft_config) == ["a", "b"] and model.active_adapter == "a"


@pytest.mark.parametrize("combination_type", ["svd", "linear", "cat"])
def test_add_weighted_adapter_refuses_nan_adapter_tensors(combination_type):
    model = _two_adapters()
    with torch.no_grad():
        model.base_model.model.transformer.h[1].attn.c_attn.lora_A["b"].weight[0, 0] = NAN
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"adapter 'b' holds NaN/inf values in transformer.h.1.attn.c_attn"):
        model.add_weighted_adapter(["a", "b"], [0.5, 0.5], "mix", combination_type=combination_type)
    after = model.state_dict()
    assert sorted(after) == sorted(before[0]) and list(model.peft_config) == ["a", "b"]
    assert {n: type(m) for n, m in model.named_modules()} == before[2]


def test_svd_rank_at_the_layer_limit_works():
    model = _two_adapters()
    model.add_weighted_adapter(["a", "b"], [0.5, 0.5], "mix", svd_rank=32, svd_clamp=1.0)
    assert model.base_model.model.transformer.h[0].attn.c_attn.lora_A["mix"].weight.shape == (32, 32)


# ---- deleting the last adapter; methods a tuner lacks ----
def test_deleting_the_only_adapter_warns_and_save_pretrained_then_refuses(tmp_path):
    _, model = _live_lora()
    with pytest.warns(UserWarning, match="deleted 'default', the only adapter"):
        model.delete_adapter("default")
    with pytest.raises(ValueError, match="there is no adapter to save"):
        model.save_pretrained(tmp_path / "out")
    assert not (tmp_path / "out").exists()  # HF peft 0.21: KeyError after creating the empty folder


@pytest.mark.parametrize(
    "config",
    [
        lp.IA3Config(target_modules=["c_attn"], feedforward_modules=[]),
        lp.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4),
    ],
    ids=["ia3", "prompt_tuning"],
)
def test_add_weighted_adapter_on_a_tuner_without_it_says_so(config):
    model = lp.get_peft_model(tiny_gpt2(), config)
    before = snapshot(model)
    with pytest.raises(AttributeError, match=r"adapters have no add_weighted_adapter\(\): only LoRA adapters can be"):
        model.add_weighted_adapter(["default"], [1.0], "mix")
    assert not hasattr(model, "add_weighted_adapter") and unchanged(model, before)


def test_merging_prompt_learning_says_there_is_nothing_to_merge():
    model = lp.get_peft_model(tiny_gpt2(), lp.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4))
    with pytest.raises(ValueError, match="PROMPT_TUNING is prompt learning: there are no weights to merge"):
        model.merge_and_unload()
    with pytest.raises(AttributeError, match=r"PROMPT_TUNING adapters have no merge_adapter\(\): prompt learning"):
        model.merge_adapter()


# ---- state restored exactly, wrapped models detached after unload, rollbacks of every kind ----
_IA3_GPT2 = dict(target_modules=["c_attn"], feedforward_modules=[], fan_in_fan_out=True)


@pytest.mark.parametrize("kind", ["LoraConfig", "IA3Config"])
def test_disable_adapter_gives_back_the_state_it_found(kind):
    """HF peft keeps a nested block, and a block after disable_adapter_layers(), disabled on exit; so do we."""
    import peft

    def same(a: torch.Tensor, b: torch.Tensor) -> bool:  # equal but for the BLAS's thread-dependent rounding
        return torch.allclose(a, b, rtol=0, atol=1e-6)

    for lib in (lp, peft):
        kwargs = GPT2_LORA if kind == "LoraConfig" else _IA3_GPT2
        model = quiet(lib.get_peft_model, tiny_gpt2(), getattr(lib, kind)(**kwargs))
        perturb(model)
        with model.disable_adapter():
            base_out = logits(model, ids())
        adapted = logits(model, ids())
        assert not same(base_out, adapted)
        with model.disable_adapter():
            with model.disable_adapter():
                pass
            assert same(logits(model, ids()), base_out), lib.__name__  # the outer block still holds
        assert same(logits(model, ids()), adapted)
        model.base_model.disable_adapter_layers()
        with model.disable_adapter():
            pass
        assert same(logits(model, ids()), base_out), lib.__name__  # disabled as it was found
        model.base_model.enable_adapter_layers()
        assert same(logits(model, ids()), adapted)


@pytest.mark.parametrize("how", ["unload", "merge_and_unload"])
@pytest.mark.parametrize(
    "call",
    [
        lambda p, cfg, d: p.delete_adapter("default"),
        lambda p, cfg, d: p.merge_and_unload(),
        lambda p, cfg, d: p.unload(),
        lambda p, cfg, d: p.add_adapter("x", cfg),
        lambda p, cfg, d: p.set_adapter("default"),
        lambda p, cfg, d: p.save_pretrained(d / "out"),
        lambda p, cfg, d: p.load_adapter(d / "adapter", adapter_name="x"),
        lambda p, cfg, d: p.merge_adapter(),
        lambda p, cfg, d: p.base_model.disable_adapter().__enter__(),
        lambda p, cfg, d: p.add_weighted_adapter(["default"], [1.0], "w"),
    ],
    ids=["delete", "merge_and_unload", "unload", "add", "set", "save", "load", "merge", "disable", "weighted"],
)
def test_an_unloaded_peft_model_refuses_every_adapter_operation(how, call, saved_adapter):
    """HF peft 0.21 lets the old PeftModel go on acting on the base it gave back (and on a new PeftModel wrapping
    it): delete its layers, save `{}` or the new adapter's tensors under the old config. Ours refuses."""
    _, folder = saved_adapter
    cfg = lp.LoraConfig(**GPT2_LORA)
    old = lp.get_peft_model(tiny_gpt2(), cfg)
    base = getattr(old, how)()
    new = lp.get_peft_model(base, cfg)
    perturb(new)
    before, out = snapshot(new), logits(new, ids())
    with pytest.raises(ValueError, match=r"this PeftModel was unloaded .*wrap the base again"):
        call(old, cfg, folder.parent)
    assert unchanged(new, before) and torch.equal(logits(new, ids()), out) and list(new.peft_config) == ["default"]
    assert not (folder.parent / "out").exists()


def test_an_unloaded_prompt_learning_model_refuses_adapter_operations():
    cfg = lp.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4)
    model = lp.get_peft_model(tiny_gpt2(), cfg)
    base = model.unload()
    with pytest.raises(ValueError, match="this PeftModel was unloaded"):
        model.add_adapter("b", cfg)
    with pytest.raises(ValueError, match="this PeftModel was unloaded"):
        model.set_adapter("default")
    assert torch.equal(logits(model, ids()), logits(base, ids()))  # it runs the base alone
    lp.get_peft_model(base, cfg)  # the base is free to wrap again


def _classifier_with_two_adapters(lib):
    cfg = lib.LoraConfig(task_type="SEQ_CLS", target_modules=["query", "value"])
    model = quiet(lib.get_peft_model, tiny_bert_classifier(), cfg)
    quiet(model.add_adapter, "b", cfg)
    perturb(model)
    model.set_adapter("b")
    perturb(model, seed=5)
    model.set_adapter("default")
    return model


def test_add_weighted_adapter_refuses_two_adapters_saving_the_same_module():
    import peft

    with pytest.raises(ValueError, match="target the same module with modules_to_save"):  # HF peft's words
        _classifier_with_two_adapters(peft).add_weighted_adapter(["default", "b"], [0.5, 0.5], "w", "cat")
    model = _classifier_with_two_adapters(lp)
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"Cannot add weighted adapters if they target the same module with "):
        model.add_weighted_adapter(["default", "b"], [0.5, 0.5], "w", combination_type="cat")
    assert unchanged(model, before) and list(model.peft_config) == ["default", "b"]


def test_add_weighted_adapter_of_one_adapter_saving_a_head_copies_its_trained_head():
    """HF peft 0.21 gives the combined adapter an untrained copy of the original head; ours copies the trained one."""
    model = _classifier_with_two_adapters(lp)
    model.add_weighted_adapter(["default"], [1.0], "w", combination_type="linear")
    head = model.base_model.model.classifier
    assert torch.equal(head.modules_to_save["w"].weight, head.modules_to_save["default"].weight)
    assert not torch.equal(head.modules_to_save["w"].weight, head.original_module.weight)
    assert model.peft_config["w"].modules_to_save == model.peft_config["default"].modules_to_save
    expected = logits(model, ids())
    model.set_adapter("w")
    assert torch.allclose(logits(model, ids()), expected, atol=1e-5)


@pytest.mark.parametrize(
    "name, config, match",
    [
        ("transformer", {}, "adapter name 'transformer' is a part of the model's paths"),
        ("default", {"modules_to_save": ["nope"]}, "modules_to_save entry 'nope' matches no module"),
    ],
)
@pytest.mark.parametrize("kind", ["PromptTuningConfig", "PrefixTuningConfig"])
def test_a_failed_prompt_learning_wrap_leaves_the_base_flags_as_they_were(kind, name, config, match):
    base = tiny_gpt2()
    base.transformer.h[0].requires_grad_(False)  # the user's own mix of flags
    before = snapshot(base)
    with pytest.raises(ValueError, match=match):
        lp.get_peft_model(base, getattr(lp, kind)(task_type="CAUSAL_LM", num_virtual_tokens=4, **config), name)
    assert unchanged(base, before)
    lp.get_peft_model(base, lp.LoraConfig(**GPT2_LORA))  # nothing marks it as wrapped


def _lora_with_user_flags():
    model = lp.get_peft_model(tiny_gpt2(), lp.LoraConfig(**GPT2_LORA))
    model.base_model.model.transformer.ln_f.weight.requires_grad_(True)  # unfrozen by the user
    model.base_model.model.transformer.h[0].attn.c_attn.lora_A["default"].weight.requires_grad_(False)  # frozen
    return model


@pytest.mark.parametrize("kind", ["missing", "nan"])
def test_a_failed_load_adapter_of_a_new_adapter_keeps_every_requires_grad(kind, saved_adapter, tmp_path):
    from safetensors.torch import load_file, save_file

    _, folder = saved_adapter
    bad = tmp_path / "bad"
    shutil.copytree(folder, bad)
    tensors = load_file(folder / "adapter_model.safetensors")
    key = sorted(tensors)[0]
    if kind == "missing":
        del tensors[key]
    else:
        tensors[key] = tensors[key].clone()
        tensors[key][0, 0] = float("nan")
    save_file(tensors, bad / "adapter_model.safetensors")
    model = _lora_with_user_flags()
    before = snapshot(model)
    with pytest.raises(ValueError, match="missing keys" if kind == "missing" else "NaN or inf"):
        model.load_adapter(bad, adapter_name="x")
    assert unchanged(model, before) and list(model.peft_config) == ["default"]


@pytest.mark.parametrize("exc", [RuntimeError, KeyboardInterrupt])
def test_an_add_adapter_failing_or_interrupted_mid_injection_takes_everything_back(exc, monkeypatch):
    from lightning_peft.tuners.lora import model as lora_model

    model = _lora_with_user_flags()
    model.add_adapter("b", lp.LoraConfig(r=4, **GPT2_LORA))
    model.set_adapter("b")
    model.base_model.model.transformer.h[1].attn.c_attn.lora_B["b"].weight.requires_grad_(False)
    before = snapshot(model)
    original, calls = lora_model._new_layer, []

    def fail_second(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise exc("stop")
        return original(*args, **kwargs)

    monkeypatch.setattr(lora_model, "_new_layer", fail_second)
    with pytest.raises(exc):  # c_attn layers take "c" in place (update_layer), c_fc layers are new
        model.add_adapter("c", lp.LoraConfig(target_modules=["c_attn", "c_fc"], fan_in_fan_out=True))
    assert unchanged(model, before) and list(model.peft_config) == ["default", "b"] and model.active_adapter == "b"


def test_an_interrupted_get_peft_model_leaves_the_base_as_it_was(monkeypatch):
    from lightning_peft.tuners.lora import model as lora_model

    base = tiny_gpt2()
    before = snapshot(base)
    original, calls = lora_model._new_layer, []

    def interrupt_second(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(lora_model, "_new_layer", interrupt_second)
    with pytest.raises(KeyboardInterrupt):
        lp.get_peft_model(base, lp.LoraConfig(**GPT2_LORA))
    monkeypatch.setattr(lora_model, "_new_layer", original)
    assert unchanged(base, before)
    lp.get_peft_model(base, lp.LoraConfig(**GPT2_LORA))  # no layer left behind to refuse it


@pytest.mark.parametrize(
    "part, match",
    [
        (lambda model: torch.nn.Sequential(model), r"feeds its module 0\.base_model its prompt"),
        (lambda model: model.base_model.transformer, r"it is a part of a model that a PROMPT_TUNING adapter"),
        (lambda model: model.base_model.transformer.h[0], r"it is a part of a model that a PROMPT_TUNING adapter"),
    ],
    ids=["container", "submodule", "block"],
)
def test_wrapping_a_container_or_a_part_of_a_prompt_fed_model_is_refused(part, match):
    model = lp.get_peft_model(tiny_gpt2(), lp.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4))
    perturb(model)
    before, out = snapshot(model), logits(model, ids())
    with pytest.raises(ValueError, match=match):
        lp.get_peft_model(part(model), lp.LoraConfig(target_modules=["c_attn"], fan_in_fan_out=True))
    assert unchanged(model, before) and torch.equal(logits(model, ids()), out)
    target = part(model)
    model.unload()
    lp.get_peft_model(target, lp.LoraConfig(target_modules=["c_attn"], fan_in_fan_out=True), "x")  # free now


def test_load_adapter_with_is_trainable_into_a_frozen_adapter_makes_it_trainable(saved_adapter):
    """HF peft 0.21 keeps the old flags (frozen parameters); ours trains as the config now says."""
    base, folder = saved_adapter
    model = lp.PeftModel.from_pretrained(base, folder)
    assert model.get_nb_trainable_parameters()[0] == 0
    model.load_adapter(folder, adapter_name="default", is_trainable=True)
    assert model.peft_config["default"].inference_mode is False
    lora = [p for n, p in model.named_parameters() if "lora_" in n]
    assert lora and all(p.requires_grad for p in lora)
    model.load_adapter(folder, adapter_name="default")  # and back to frozen
    assert model.peft_config["default"].inference_mode is True and not any(p.requires_grad for p in lora)


@pytest.mark.parametrize(
    "call",
    [
        lambda m, cfg, folder: m.add_adapter("Default", cfg),
        lambda m, cfg, folder: m.load_adapter(folder, adapter_name="DEFAULT"),
        lambda m, cfg, folder: m.add_weighted_adapter(["default"], [1.0], "dEfault"),
    ],
    ids=["add", "load", "weighted"],
)
def test_an_adapter_name_differing_from_another_only_by_case_is_refused(call, saved_adapter):
    _, folder = saved_adapter
    cfg = lp.LoraConfig(**GPT2_LORA)
    model = lp.get_peft_model(tiny_gpt2(), cfg)
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"differs from the existing adapter 'default' only by case"):
        call(model, cfg, folder)
    assert unchanged(model, before) and list(model.peft_config) == ["default"]


def test_an_adapter_name_differing_only_by_case_is_refused_for_prompt_learning():
    cfg = lp.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4)
    model = lp.get_peft_model(tiny_gpt2(), cfg, adapter_name="a")
    with pytest.raises(ValueError, match=r"differs from the existing adapter 'a' only by case"):
        model.add_adapter("A", cfg)
    assert list(model.peft_config) == ["a"]
