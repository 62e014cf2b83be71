"""The adapter state machine against HF PEFT on the same tiny models: several active adapters (outputs, requires_grad
flags, the active adapter at every level, the modules_to_save rules), set_adapter(inference_mode=), delete_adapter of
an active / merged / last adapter, disable_adapter's requires_grad, load_adapter's result, from_pretrained(config=).

Each pair is built from one base: ours is perturbed (every tensor) and its state dict loaded into HF PEFT's, so both
hold the same numbers under the same names."""

from __future__ import annotations

import copy
import warnings

import peft
import pytest
import torch
from helpers import GPT2_LORA, ids, logits, perturb, quiet, tiny_bert_classifier, tiny_gpt2

import lightning_peft as lp

IA3_GPT2 = dict(target_modules=["c_attn"], feedforward_modules=[], fan_in_fan_out=True)
KWARGS = {"LoraConfig": GPT2_LORA, "IA3Config": IA3_GPT2}


def flags(model) -> dict[str, bool]:
    return {n: p.requires_grad for n, p in model.named_parameters()}


def layer(model):
    """The adapted c_attn of the first GPT-2 block."""
    return model.base_model.model.transformer.h[0].attn.c_attn


def same_state(ours, theirs) -> None:
    assert flags(ours) == flags(theirs)
    assert ours.active_adapters == theirs.active_adapters
    assert ours.base_model.active_adapter == theirs.base_model.active_adapter
    assert ours.base_model.active_adapters == theirs.base_model.active_adapters
    assert layer(ours).active_adapter == layer(theirs).active_adapter
    assert layer(ours).active_adapters == layer(theirs).active_adapters


def both(base, kind: str, names=("b",), kwargs=None):
    """(ours, HF PEFT's) with adapters "default" + `names` holding the same (perturbed) numbers."""
    kwargs = KWARGS[kind] if kwargs is None else kwargs
    ours = lp.get_peft_model(copy.deepcopy(base), getattr(lp, kind)(**kwargs))
    theirs = quiet(peft.get_peft_model, copy.deepcopy(base), getattr(peft, kind)(**kwargs))
    for name in names:
        ours.add_adapter(name, getattr(lp, kind)(**kwargs))
        quiet(theirs.add_adapter, name, getattr(peft, kind)(**kwargs))
    perturb(ours, trainable_only=False)
    theirs.load_state_dict(ours.state_dict())
    return ours.eval(), theirs.eval()


@pytest.fixture(scope="module")
def gpt2():
    return tiny_gpt2()


@pytest.fixture(scope="module")
def bert():
    return tiny_bert_classifier()


# ---- several active adapters ------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["LoraConfig", "IA3Config"])
def test_several_active_adapters_run_together_as_in_hf_peft(gpt2, kind):
    ours, theirs = both(gpt2, kind, names=("b", "c"))
    same_state(ours, theirs)
    x = ids()
    single = logits(ours, x)
    for model in (ours, theirs):
        model.base_model.set_adapter(["default", "b"])
    same_state(ours, theirs)
    assert ours.active_adapter == theirs.active_adapter == "default"
    assert ours.active_adapters == ["default", "b"] and layer(ours).active_adapter == ["default", "b"]
    together = logits(ours, x)
    torch.testing.assert_close(together, logits(theirs, x), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(together, single, atol=1e-3)
    if kind == "LoraConfig":  # the layer's updates add up
        h = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(0))
        c_attn = layer(ours)
        with torch.no_grad():
            both_delta = c_attn(h) - c_attn.base_layer(h)
            deltas = []
            for name in ("default", "b"):
                c_attn.set_adapter(name)
                deltas.append(c_attn(h) - c_attn.base_layer(h))
        torch.testing.assert_close(both_delta, deltas[0] + deltas[1], atol=1e-6, rtol=1e-5)
        ours.base_model.set_adapter(["default", "b"])
    # inference_mode freezes the active adapters too
    for model in (ours, theirs):
        model.base_model.set_adapter(["b", "c"], inference_mode=True)
    same_state(ours, theirs)
    assert not any(flags(ours).values())
    for model in (ours, theirs):
        model.set_adapter("c", inference_mode=False)
    same_state(ours, theirs)
    assert ours.active_adapter == "c" and any(flags(ours).values())


def test_set_adapter_refusals_have_hf_peft_exception_types_and_change_nothing(gpt2):
    ours, theirs = both(gpt2, "LoraConfig")
    ours.base_model.set_adapter(["default", "b"])
    before, out = flags(ours), logits(ours, ids())
    with pytest.raises(TypeError):
        theirs.set_adapter(["default", "b"])
    with pytest.raises(TypeError, match=r"PeftModel.set_adapter takes one adapter name.*base_model.set_adapter"):
        ours.set_adapter(["default", "b"])
    with pytest.raises(ValueError):
        theirs.set_adapter("nope")
    with pytest.raises(ValueError, match="no adapter named 'nope'; this model has: default, b"):
        ours.set_adapter("nope")
    with pytest.raises(ValueError, match="no adapter named 'nope'"):  # HF peft's tuner accepts any name
        ours.base_model.set_adapter(["default", "nope"])
    with pytest.raises(TypeError, match="must be an adapter name or a list of adapter names"):
        ours.base_model.set_adapter(3)
    assert flags(ours) == before and ours.active_adapters == ["default", "b"]
    assert torch.equal(logits(ours, ids()), out)


def test_tuner_layers_take_several_active_adapters_as_in_hf_peft(gpt2):
    ours, theirs = both(gpt2, "LoraConfig")
    h = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(0))
    for model in (ours, theirs):
        layer(model).set_adapter(["default", "b"])
    assert layer(ours).active_adapter == layer(theirs).active_adapter == ["default", "b"]
    assert flags(layer(ours)) == flags(layer(theirs))
    with torch.no_grad():
        torch.testing.assert_close(layer(ours)(h), layer(theirs)(h), atol=1e-6, rtol=1e-5)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for model in (ours, theirs):
            layer(model).delete_adapter("default")
            layer(model).delete_adapter("b")  # the last adapter of this layer: none is active
    assert layer(ours).active_adapter == layer(theirs).active_adapter == []
    assert not caught


# ---- modules_to_save with several active adapters -------------------------------------------------------------
SAVES = {"a": ["classifier"], "b": ["classifier"], "c": ["pooler"], "d": ["pooler", "classifier"], "e": None}


@pytest.fixture(scope="module")
def saving_pair(bert):
    def build(lib):
        cfg = lambda saves: lib.LoraConfig(target_modules=["query"], modules_to_save=saves)  # noqa: E731
        model = quiet(lib.get_peft_model, copy.deepcopy(bert), cfg(SAVES["a"]), adapter_name="a")
        for name in "bcde":
            quiet(model.add_adapter, name, cfg(SAVES[name]))
        return model.eval()

    ours, theirs = build(lp), build(peft)
    perturb(ours, trainable_only=False)
    theirs.load_state_dict(ours.state_dict())
    return ours, theirs


def wrappers_state(model):
    inner = model.base_model.model
    return inner.classifier.active_adapter, inner.bert.pooler.active_adapter


@pytest.mark.parametrize(
    "names, allowed",
    [
        (["a", "b"], False),  # the same module saved by both
        (["a", "d"], False),  # overlapping modules_to_save
        (["c", "d"], False),
        (["a", "c"], True),  # different modules
        (["a", "e"], True),  # one without modules_to_save
        (["e"], True),  # no copy active anywhere: the originals run
        ([], False),  # HF peft refuses an empty list once a model has modules_to_save
        ("d", True),
    ],
)
def test_modules_to_save_rules_for_several_active_adapters(saving_pair, names, allowed):
    ours, theirs = saving_pair
    for model in (ours, theirs):
        model.set_adapter("a")
    before, out = flags(ours), logits(ours, ids())
    if not allowed:
        with pytest.raises(ValueError):
            theirs.base_model.set_adapter(names)
        with pytest.raises(ValueError, match="only one adapter can be set at a time for it|name at least one"):
            ours.base_model.set_adapter(names)
        # HF peft 0.21 leaves some wrappers switched; ours changes nothing
        assert flags(ours) == before and torch.equal(logits(ours, ids()), out)
        assert ours.active_adapters == ["a"] and wrappers_state(ours) == ("a", [])
        return
    for model in (ours, theirs):
        model.base_model.set_adapter(names)
    assert wrappers_state(ours) == wrappers_state(theirs)
    assert flags(ours) == flags(theirs) and ours.base_model.active_adapter == theirs.base_model.active_adapter
    torch.testing.assert_close(logits(ours, ids()), logits(theirs, ids()), atol=1e-5, rtol=1e-5)


def test_deleting_an_active_adapter_with_saved_modules_as_in_hf_peft(bert):
    def build(lib):
        cfg = lambda saves: lib.LoraConfig(target_modules=["query"], modules_to_save=saves)  # noqa: E731
        model = quiet(lib.get_peft_model, copy.deepcopy(bert), cfg(["classifier"]), adapter_name="a")
        quiet(model.add_adapter, "c", cfg(["pooler"]))
        model.base_model.set_adapter(["a", "c"])
        return model

    ours, theirs = build(lp), build(peft)
    for model in (ours, theirs):
        model.delete_adapter("c")
    assert wrappers_state(ours) == wrappers_state(theirs) == ("a", [])
    assert flags(ours) == flags(theirs) and ours.active_adapter == theirs.active_adapter == "a"


def test_deleting_the_active_adapter_activates_every_saved_copy_of_the_new_one(bert):
    """HF peft 0.21 leaves the saved copies of an adapter added later inactive when deleting makes it the active one
    (its pooler runs the original: not what set_adapter gives); ours activates them, as set_adapter does."""
    models = {}
    for lib in (lp, peft):
        cfg = lambda saves: lib.LoraConfig(target_modules=["query"], modules_to_save=saves)  # noqa: E731
        model = quiet(lib.get_peft_model, copy.deepcopy(bert), cfg(["classifier"]), adapter_name="a")
        quiet(model.add_adapter, "d", cfg(["pooler", "classifier"]))
        perturb(model.base_model.model.bert.pooler, trainable_only=False)
        quiet(model.delete_adapter, "a")
        models[lib] = model.eval()
    assert wrappers_state(models[peft]) == ("d", [])
    ours = models[lp]
    assert wrappers_state(ours) == ("d", "d") and ours.active_adapter == "d"
    out = logits(ours, ids())
    ours.set_adapter("d")
    assert torch.equal(logits(ours, ids()), out)


# ---- the adapter life cycle ----------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["LoraConfig", "IA3Config"])
def test_delete_adapter_activates_what_hf_peft_activates(gpt2, kind):
    ours, theirs = both(gpt2, kind, names=("c", "b"))
    x = ids()
    # one of two active adapters: the other stays
    for model in (ours, theirs):
        model.base_model.set_adapter(["b", "c"])
        model.delete_adapter("c")
    same_state(ours, theirs)
    assert ours.active_adapter == theirs.active_adapter == "b"
    torch.testing.assert_close(logits(ours, x), logits(theirs, x), atol=1e-5, rtol=1e-5)
    # the only active one: the first remaining by name, with HF peft's warning
    for model in (ours, theirs):
        with pytest.warns(UserWarning, match="Adapter b was active which is now deleted. Setting active adapter to"):
            model.delete_adapter("b")
    same_state(ours, theirs)
    assert ours.active_adapter == "default" and ours.active_adapters == ["default"]
    torch.testing.assert_close(logits(ours, x), logits(theirs, x), atol=1e-5, rtol=1e-5)
    # the last one: nothing active, the base model runs
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        theirs.delete_adapter("default")
    assert not [w for w in caught if "was active" in str(w.message)]
    with pytest.warns(UserWarning, match="deleted 'default', the only adapter"):  # ours says what follows
        ours.delete_adapter("default")
    same_state(ours, theirs)
    assert ours.active_adapters == [] and ours.base_model.active_adapter == []
    assert ours.active_adapter == []  # HF peft 0.21 still names the deleted adapter here
    torch.testing.assert_close(logits(ours, x), logits(gpt2_perturbed(ours), x))


def gpt2_perturbed(model):
    """The base model as `model` holds it (its perturbed base weights), without adapters."""
    plain = tiny_gpt2()
    state = {k.replace(".base_layer", ""): v for k, v in model.base_model.model.state_dict().items()}
    plain.load_state_dict({k: v for k, v in state.items() if k in plain.state_dict()})
    return plain


def test_deleting_merged_adapters_as_in_hf_peft(gpt2):
    ours, theirs = both(gpt2, "LoraConfig")
    x = ids()
    for model in (ours, theirs):
        model.base_model.set_adapter(["default", "b"])
        model.merge_adapter()
    for model in (ours, theirs):
        with pytest.raises(ValueError):
            model.delete_adapter("b")
    assert list(ours.peft_config) == ["default", "b"] and layer(ours).merged_adapters == ["default", "b"]
    for model in (ours, theirs):
        model.unmerge_adapter()
        model.merge_adapter(["b"])
    with pytest.raises(ValueError, match=r"adapter 'b' is merged; unmerge\(\) before deleting it"):
        ours.delete_adapter("b")
    for model in (ours, theirs):
        model.delete_adapter("default")  # not merged: allowed while "b" is
    same_state(ours, theirs)
    assert layer(ours).merged_adapters == layer(theirs).merged_adapters == ["b"]
    torch.testing.assert_close(logits(ours, x), logits(theirs, x), atol=1e-5, rtol=1e-5)


def test_add_adapter_keeps_every_flag_and_adds_the_new_one_frozen(gpt2):
    ours, theirs = both(gpt2, "LoraConfig", names=())
    for model in (ours, theirs):
        layer(model).lora_A["default"].weight.requires_grad_(False)  # the user's own choices
        model.base_model.model.transformer.ln_f.weight.requires_grad_(True)
        quiet(model.add_adapter, "b", getattr(lp if model is ours else peft, "LoraConfig")(**GPT2_LORA))
    same_state(ours, theirs)
    assert not layer(ours).lora_A["b"].weight.requires_grad and ours.active_adapter == "default"


def test_disable_adapter_freezes_the_adapters_inside_and_restores_every_flag(gpt2):
    ours, theirs = both(gpt2, "LoraConfig")
    for model in (ours, theirs):
        model.base_model.set_adapter(["default", "b"])
    before = flags(ours)
    for model in (ours, theirs):
        with model.disable_adapter():
            inside = flags(model)
            assert not any(v for n, v in inside.items() if "lora_" in n)
        assert flags(model) == before
    assert flags(ours) == flags(theirs)
    # frozen before the block: frozen after it (HF peft 0.21 makes the active adapters train after the block)
    for model in (ours, theirs):
        model.base_model.set_adapter(["default", "b"], inference_mode=True)
        with model.disable_adapter():
            pass
    assert not any(flags(ours).values()) and any(flags(theirs).values())


def test_load_adapter_returns_the_load_result_and_new_adapters_train_only_when_asked(gpt2, tmp_path):
    ours, theirs = both(gpt2, "LoraConfig")
    ours.save_pretrained(tmp_path)
    results = {}
    for lib in (lp, peft):
        model = quiet(lib.PeftModel.from_pretrained, copy.deepcopy(gpt2), tmp_path)
        results[lib.__name__] = quiet(model.load_adapter, tmp_path / "b", adapter_name="other")
        quiet(model.load_adapter, tmp_path / "b", adapter_name="trained", is_trainable=True)
        results[lib.__name__ + " flags"] = flags(model)
        results[lib.__name__ + " active"] = model.active_adapters
    mine, hf = results["lightning_peft"], results["peft"]
    assert type(mine) is type(hf) and mine.missing_keys == hf.missing_keys == []
    assert mine.unexpected_keys == hf.unexpected_keys == []
    assert results["lightning_peft flags"] == results["peft flags"]
    assert results["lightning_peft active"] == results["peft active"] == ["default"]
    assert any(results["lightning_peft flags"].values())  # "trained" trains, inactive


def test_from_pretrained_uses_the_config_given(gpt2, tmp_path):
    ours, _ = both(gpt2, "LoraConfig", names=())
    ours.save_pretrained(tmp_path)  # lora_alpha 8
    x = ids()
    out = {}
    for lib in (lp, peft):
        config = lib.LoraConfig(**GPT2_LORA, lora_alpha=32)
        model = quiet(lib.PeftModel.from_pretrained, copy.deepcopy(gpt2), tmp_path, config=config)
        out[lib.__name__] = logits(model, x)
        assert model.peft_config["default"].lora_alpha == 32
        with pytest.raises(ValueError):
            quiet(lib.PeftModel.from_pretrained, copy.deepcopy(gpt2), tmp_path, config={"lora_alpha": 32})
    torch.testing.assert_close(out["lightning_peft"], out["peft"], atol=1e-5, rtol=1e-5)
    from_folder = logits(lp.PeftModel.from_pretrained(copy.deepcopy(gpt2), tmp_path), x)
    assert not torch.allclose(out["lightning_peft"], from_folder, atol=1e-4)


# ---- prompt learning: one adapter at a time -------------------------------------------------------------------
def test_prompt_learning_set_and_delete_as_in_hf_peft(gpt2):
    def build(lib):
        cfg = lib.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4)
        model = quiet(lib.get_peft_model, copy.deepcopy(gpt2), cfg)
        quiet(model.add_adapter, "b", cfg)
        return model

    ours, theirs = build(lp), build(peft)
    for model in (ours, theirs):
        with pytest.raises(TypeError):
            model.set_adapter(["default", "b"])
        model.set_adapter("b")
    with pytest.raises(TypeError, match="set_requires_grad is not supported for prompt learning"):
        ours.set_requires_grad("b")
    for model in (ours, theirs):
        with pytest.warns(UserWarning, match="Adapter b was active which is now deleted. Setting active adapter to"):
            model.delete_adapter("b")
        assert model.active_adapter == "default" and model.active_adapters == ["default"]
    quiet(theirs.delete_adapter, "default")
    quiet(ours.delete_adapter, "default")
    assert ours.active_adapter == theirs.active_adapter == [] and ours.active_adapters == theirs.active_adapters == []
