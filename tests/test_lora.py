"""LoRA behaviour: identities (fresh = base, unload, merge/unmerge), named adapters, config files, errors."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from helpers import ids, tiny_bert_classifier, tiny_convnet, tiny_gpt2, tiny_llama
from transformers import GPT2LMHeadModel

import lightning_peft as lp
from lightning_peft.tuners.lora import LoraLayer


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _assert_same_state(model: torch.nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = model.state_dict()
    assert sorted(after) == sorted(before)
    for key, value in before.items():
        assert torch.equal(after[key], value), key


def _randomise_adapters(model: torch.nn.Module, seed: int = 3) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(0.3 * torch.randn(p.shape, generator=gen))


GPT2_TARGETS = dict(target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True)


@pytest.mark.parametrize("init", [True, "gaussian"])
def test_fresh_lora_model_equals_its_base(init):
    base, x = tiny_gpt2(), ids()
    expected = base(x).logits
    model = lp.get_peft_model(base, lp.LoraConfig(init_lora_weights=init, **GPT2_TARGETS))
    assert torch.equal(model(x).logits, expected)


def test_init_lora_weights_distributions():
    model = lp.get_peft_model(
        tiny_llama(), lp.LoraConfig(r=8, target_modules=["q_proj", "embed_tokens"], init_lora_weights="gaussian")
    )
    q = model.base_model.model.model.layers[0].self_attn.q_proj
    assert torch.count_nonzero(q.lora_B["default"].weight) == 0
    assert abs(q.lora_A["default"].weight.std().item() - 1 / 8) < 0.03
    emb = model.base_model.model.model.embed_tokens
    assert torch.count_nonzero(emb.lora_embedding_A["default"]) == 0  # roles swap for embeddings
    assert torch.count_nonzero(emb.lora_embedding_B["default"]) == emb.lora_embedding_B["default"].numel()


def test_forward_is_base_plus_scaled_low_rank_update():
    model = lp.get_peft_model(tiny_llama(), lp.LoraConfig(r=4, lora_alpha=12, target_modules=["q_proj"]))
    _randomise_adapters(model)
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    x = torch.randn(3, 32)
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    expected = layer.base_layer(x) + (x @ A.T @ B.T) * (12 / 4)
    torch.testing.assert_close(layer(x), expected, atol=1e-6, rtol=0)
    assert layer.scaling["default"] == 3.0


def test_rank_and_alpha_patterns_override_per_module():
    config = lp.LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "v_proj"],
        rank_pattern={"layers.1.self_attn.q_proj": 2},
        alpha_pattern={"v_proj": 2},
    )
    model = lp.get_peft_model(tiny_llama(), config)
    layers = model.base_model.model.model.layers
    assert layers[0].self_attn.q_proj.r["default"] == 4
    assert layers[1].self_attn.q_proj.r["default"] == 2
    assert layers[1].self_attn.q_proj.lora_A["default"].weight.shape == (2, 32)
    assert layers[0].self_attn.v_proj.scaling["default"] == 2 / 4


def test_target_matching_rules():
    def targeted(**kwargs):
        model = lp.get_peft_model(tiny_gpt2(), lp.LoraConfig(fan_in_fan_out=True, **kwargs))
        return sorted(n for n, m in model.base_model.model.named_modules() if isinstance(m, LoraLayer))

    assert targeted(target_modules=["attn.c_proj"]) == ["transformer.h.0.attn.c_proj", "transformer.h.1.attn.c_proj"]
    assert targeted(target_modules=r"transformer\.h\.0\..*c_proj") == [
        "transformer.h.0.attn.c_proj",
        "transformer.h.0.mlp.c_proj",
    ]
    assert targeted(target_modules=["c_attn"], layers_to_transform=1) == ["transformer.h.1.attn.c_attn"]
    # no 'blocks.N.' in GPT-2's names: the layer filter is blamed on itself
    with pytest.raises(ValueError, match=r"no numbered layers \(layers_pattern='blocks'\) hold \['c_attn'\]"):
        targeted(target_modules=["c_attn"], layers_to_transform=[0, 1], layers_pattern="blocks")
    # the regex must match the whole name, not a part of it
    with pytest.raises(ValueError, match="matched no module"):
        targeted(target_modules=r"c_attn")


def test_unload_returns_the_base_exactly():
    base = tiny_gpt2()
    before = _state(base)
    model = lp.get_peft_model(base, lp.LoraConfig(bias="all", **GPT2_TARGETS))
    _randomise_adapters(model)
    restored = model.unload()
    assert type(restored) is GPT2LMHeadModel and restored is base
    _assert_same_state(restored, before)
    assert not any(isinstance(m, LoraLayer) for m in restored.modules())


def test_unload_restores_the_original_of_modules_to_save():
    base = tiny_bert_classifier()
    before = _state(base)
    model = lp.get_peft_model(base, lp.LoraConfig(task_type="SEQ_CLS", target_modules=["query"]))
    with torch.no_grad():
        model.base_model.model.classifier.modules_to_save["default"].weight.add_(1.0)
    _assert_same_state(model.unload(), before)


def test_merge_then_unmerge_restores_the_base_and_merge_and_unload_keeps_outputs():
    base, x = tiny_convnet(), torch.randn(2, 3, 8, 8)
    before = _state(base)
    model = lp.get_peft_model(base, lp.LoraConfig(target_modules=["conv1", "conv2", "head"]))
    _randomise_adapters(model)
    adapted = model(x)
    model.base_model.merge_adapter()
    assert not torch.equal(base.conv1.base_layer.weight, before["conv1.weight"])  # the delta went into the weight
    torch.testing.assert_close(model(x), adapted, atol=1e-5, rtol=0)
    model.base_model.unmerge_adapter()
    base_weights = {k.replace(".base_layer", ""): v for k, v in base.state_dict().items() if "lora_" not in k}
    assert sorted(base_weights) == sorted(before)
    for key, value in before.items():
        torch.testing.assert_close(base_weights[key], value, atol=1e-6, rtol=0)
    merged = model.merge_and_unload(progressbar=True)
    assert type(merged).__name__ == "TinyConvNet"
    torch.testing.assert_close(merged(x), adapted, atol=1e-5, rtol=0)


def test_merging_twice_is_refused_with_a_warning():
    model = lp.get_peft_model(tiny_llama(), lp.LoraConfig(target_modules=["q_proj"]))
    _randomise_adapters(model)
    model.base_model.merge_adapter()
    weight = model.base_model.model.model.layers[0].self_attn.q_proj.base_layer.weight.clone()
    with pytest.warns(UserWarning, match="already merged"):
        model.base_model.merge_adapter()
    assert torch.equal(model.base_model.model.model.layers[0].self_attn.q_proj.base_layer.weight, weight)


def test_disable_adapter_context_gives_the_base_output():
    base, x = tiny_gpt2(), ids()
    expected = base(x).logits
    model = lp.get_peft_model(base, lp.LoraConfig(**GPT2_TARGETS))
    _randomise_adapters(model)
    adapted = model(x).logits
    with model.disable_adapter():
        assert torch.equal(model(x).logits, expected)
    assert torch.equal(model(x).logits, adapted)


def test_only_the_adapter_trains_and_bias_modes():
    def trainable(**kwargs):
        model = lp.get_peft_model(tiny_bert_classifier(), lp.LoraConfig(target_modules=["query"], **kwargs))
        return {n.removeprefix("base_model.model.") for n, p in model.named_parameters() if p.requires_grad}

    lora = {f"bert.encoder.layer.{i}.attention.self.query.lora_{ab}.default.weight" for i in (0, 1) for ab in "AB"}
    assert trainable() == lora
    assert trainable(bias="lora_only") == lora | {
        f"bert.encoder.layer.{i}.attention.self.query.base_layer.bias" for i in (0, 1)
    }
    all_bias = trainable(bias="all")
    assert lora < all_bias and "bert.encoder.layer.1.output.dense.bias" in all_bias
    assert all(n.endswith("bias") for n in all_bias - lora)
    head = trainable(modules_to_save=["classifier"])
    assert head == lora | {"classifier.modules_to_save.default.weight", "classifier.modules_to_save.default.bias"}


def test_named_adapters_add_set_delete():
    base, x = tiny_gpt2(), ids()
    model = lp.get_peft_model(base, lp.LoraConfig(**GPT2_TARGETS), adapter_name="first")
    model.add_adapter("second", lp.LoraConfig(r=2, **GPT2_TARGETS))
    _randomise_adapters(model)
    assert model.active_adapter == "first"
    out_first = model(x).logits
    model.set_adapter("second")
    assert model.active_adapter == "second"
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".second." in n for n in trainable)
    out_second = model(x).logits
    assert not torch.allclose(out_first, out_second)
    with pytest.warns(UserWarning, match="Adapter second was active which is now deleted. Setting active adapter to"):
        model.delete_adapter("second")  # as HF PEFT: the remaining adapter becomes active
    assert list(model.peft_config) == ["first"] and model.active_adapter == "first"
    assert not any("second" in n for n, _ in model.named_parameters())
    torch.testing.assert_close(model(x).logits, out_first, atol=0, rtol=0)


def test_save_and_load_round_trip_named_adapters(tmp_path):
    base, x = tiny_gpt2(), ids()
    model = lp.get_peft_model(copy.deepcopy(base), lp.LoraConfig(**GPT2_TARGETS))
    model.add_adapter("other", lp.LoraConfig(r=2, **GPT2_TARGETS))
    _randomise_adapters(model)
    model.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "README.md",  # the model card, as HF PEFT writes it
        "adapter_config.json",
        "adapter_model.safetensors",
        "other",
    ]
    assert sorted(p.name for p in (tmp_path / "other").iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["peft_type"] == "LORA" and saved["inference_mode"] is True and saved["r"] == 8
    assert model.peft_config["default"].inference_mode is False

    loaded = lp.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    loaded.load_adapter(tmp_path / "other", adapter_name="other")
    assert not any(p.requires_grad for p in loaded.parameters())
    for name in ("default", "other"):
        model.set_adapter(name)
        loaded.set_adapter(name)
        assert torch.equal(loaded(x).logits, model(x).logits)

    trainable = lp.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path, is_trainable=True)
    assert {n for n, p in trainable.named_parameters() if p.requires_grad} == {
        n for n, p in trainable.named_parameters() if ".lora_" in n
    }


def test_config_round_trip_and_files_from_newer_peft(tmp_path):
    config = lp.LoraConfig(r=4, target_modules=["q", "v"], rank_pattern={"q": 2}, task_type="SEQ_2_SEQ_LM")
    config.save_pretrained(tmp_path)
    again = lp.PeftConfig.from_pretrained(tmp_path)
    assert isinstance(again, lp.LoraConfig) and again == config
    assert again.task_type is lp.TaskType.SEQ_2_SEQ_LM

    data = json.loads((tmp_path / "adapter_config.json").read_text())
    data.update(use_dora=False, megatron_core="megatron.core", some_future_flag=3)
    (tmp_path / "adapter_config.json").write_text(json.dumps(data))
    with pytest.warns(UserWarning, match="unknown to lightning_peft: some_future_flag$"):
        assert lp.PeftConfig.from_pretrained(tmp_path) == config

    data["use_dora"] = True  # DoRA is implemented (tests/test_lora_dora.py): read as such
    (tmp_path / "adapter_config.json").write_text(json.dumps(data))
    assert lp.PeftConfig.from_pretrained(tmp_path).use_dora is True


def test_parameter_counts():
    model = lp.get_peft_model(tiny_llama(), lp.LoraConfig(r=4, target_modules=["q_proj"]))
    trainable, total = model.get_nb_trainable_parameters()
    assert trainable == 2 * (4 * 32 + 32 * 4)
    assert total == sum(p.numel() for p in tiny_llama().parameters()) + trainable


# ---- bad input: one clear error, the model untouched ----------------------------------------
def test_targets_that_match_nothing_list_real_names_and_leave_the_model_untouched():
    base = tiny_llama()
    before = _state(base)
    with pytest.raises(ValueError, match=r"matched no module.*q_proj"):
        lp.get_peft_model(base, lp.LoraConfig(target_modules=["query_proj"]))
    _assert_same_state(base, before)
    assert not any(isinstance(m, LoraLayer) for m in base.modules())


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(r=0), "r must be a positive integer"),
        (dict(r=-2), "r must be a positive integer"),
        (dict(r=2.5), "r must be a positive integer"),
        (dict(bias="some"), r"bias='some' is not valid; use one of: 'none', 'all', 'lora_only'"),
        (dict(lora_dropout=1.0), r"lora_dropout must be a number in \[0, 1\)"),
        (dict(init_lora_weights="eva"), "init_lora_weights='eva' is an HF PEFT initialisation"),
        (dict(target_modules="("), "not a valid regex"),
        (dict(target_modules=[]), "target_modules is empty"),
        (dict(target_modules="q_proj", layers_to_transform=[0]), "layers_to_transform cannot be used"),
        (dict(target_modules=["q_proj"], layers_pattern="layers"), "layers_pattern only has an effect"),
        (dict(rank_pattern={"q_proj": 0}), "must be a positive integer rank"),
        (dict(task_type="CLASSIFY"), "task_type='CLASSIFY' is not valid"),
    ],
)
def test_config_validation(kwargs, message):
    with pytest.raises((ValueError, TypeError), match=message):
        lp.LoraConfig(**kwargs)


def test_linear_combination_of_different_ranks_is_refused():
    model = lp.get_peft_model(tiny_llama(), lp.LoraConfig(r=4, target_modules=["q_proj"]), adapter_name="a")
    model.add_adapter("b", lp.LoraConfig(r=2, target_modules=["q_proj"]))
    before = _state(model)
    with pytest.raises(ValueError, match=r"'linear' needs adapters of equal rank, got r=\[4, 2\]; use 'cat' or 'svd'"):
        model.add_weighted_adapter(["a", "b"], [1.0, 1.0], "mix", combination_type="linear")
    assert list(model.peft_config) == ["a", "b"]
    _assert_same_state(model, before)


def test_unknown_adapter_name():
    model = lp.get_peft_model(tiny_llama(), lp.LoraConfig(target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="no adapter named 'nope'; this model has: default"):
        model.set_adapter("nope")
    with pytest.raises(ValueError, match="no adapter named 'nope'"):
        model.add_weighted_adapter(["default", "nope"], [1, 1], "mix")


def test_loading_an_adapter_of_the_wrong_shape_lists_mismatches_and_changes_nothing(tmp_path):
    from transformers import GPT2Config

    lp.get_peft_model(tiny_gpt2(), lp.LoraConfig(**GPT2_TARGETS)).save_pretrained(tmp_path)
    torch.manual_seed(0)
    wider = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=48, n_head=4, vocab_size=64, n_positions=64))
    before = _state(wider)
    with pytest.raises(
        ValueError,
        match=r"shape mismatches: base_model\.model\.transformer\.h\.0\.attn\.c_attn\.lora_A"
        r"\.weight: file \(8, 32\) vs model \(8, 48\)",
    ):
        lp.PeftModel.from_pretrained(wider, tmp_path)
    _assert_same_state(wider, before)
    assert not any(isinstance(m, LoraLayer) for m in wider.modules())


def test_loading_an_adapter_with_missing_keys_is_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    lp.get_peft_model(tiny_gpt2(), lp.LoraConfig(**GPT2_TARGETS)).save_pretrained(tmp_path)
    path = tmp_path / "adapter_model.safetensors"
    tensors = load_file(path)
    dropped = sorted(tensors)[0]
    del tensors[dropped]
    save_file(tensors, path)
    with pytest.raises(ValueError, match=f"missing keys: {dropped}"):
        lp.PeftModel.from_pretrained(tiny_gpt2(), tmp_path)


def test_missing_adapter_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        lp.PeftModel.from_pretrained(tiny_gpt2(), tmp_path / "nowhere")


def test_nan_adapter_with_safe_merge_raises_and_leaves_the_base_untouched():
    base = tiny_gpt2()
    model = lp.get_peft_model(base, lp.LoraConfig(**GPT2_TARGETS))
    _randomise_adapters(model)
    with torch.no_grad():
        model.base_model.model.transformer.h[1].mlp.c_fc.lora_B["default"].weight[0, 0] = math.nan
    before = {k: v.clone() for k, v in base.state_dict().items() if "base_layer" in k}
    with pytest.raises(ValueError, match="merging adapter 'default' would put NaN/inf.*unchanged"):
        model.merge_and_unload(safe_merge=True)
    for key, value in before.items():
        assert torch.equal(base.state_dict()[key], value), key
    assert sum(isinstance(m, LoraLayer) for m in base.modules()) == 8


def test_layer_api_both_constructor_forms_and_delta_weight():
    from lightning_peft.tuners.lora import Linear

    legacy = Linear("default", 16, 32, 4, 8)  # HF PEFT 0.6: (adapter_name, in, out, r, lora_alpha)
    assert legacy.base_layer.weight.shape == (32, 16) and legacy.r == {"default": 4} and legacy.scaling["default"] == 2
    conv1d_like = Linear("default", 16, 32, r=4, fan_in_fan_out=True)
    assert conv1d_like.base_layer.weight.shape == (16, 32)
    wrapped = Linear(torch.nn.Linear(16, 32), "a", r=2, lora_alpha=6, init_lora_weights=False)
    delta = wrapped.get_delta_weight("a")
    assert delta.shape == (32, 16)
    torch.testing.assert_close(delta, wrapped.lora_B["a"].weight @ wrapped.lora_A["a"].weight * 3.0)
    x = torch.randn(4, 16)
    torch.testing.assert_close(
        wrapped(x), x @ (wrapped.base_layer.weight + delta).T + wrapped.base_layer.bias, atol=1e-5, rtol=0
    )


def test_adapter_names_sharing_a_prefix_save_and_load_apart(tmp_path):
    base = tiny_gpt2()
    model = lp.get_peft_model(copy.deepcopy(base), lp.LoraConfig(**GPT2_TARGETS))
    model.add_adapter("default2", lp.LoraConfig(r=2, **GPT2_TARGETS))
    model.add_adapter("a", lp.LoraConfig(r=2, **GPT2_TARGETS))  # ".a" is also a prefix of ".attn"
    _randomise_adapters(model)
    model.save_pretrained(tmp_path)
    from safetensors.torch import load_file

    saved = load_file(tmp_path / "adapter_model.safetensors")
    assert len(saved) == 2 * 8 and all(v.shape[0] == 8 or v.shape[1] == 8 for v in saved.values())
    assert len(load_file(tmp_path / "a" / "adapter_model.safetensors")) == 2 * 8
    loaded = lp.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    loaded.load_adapter(tmp_path / "a", adapter_name="a")
    x = ids()
    for name in ("default", "a"):
        model.set_adapter(name)
        loaded.set_adapter(name)
        assert torch.equal(loaded(x).logits, model(x).logits)


def test_a_layer_that_cannot_be_adapted_leaves_the_whole_model_untouched():
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = torch.nn.Conv2d(4, 4, 3)
            self.b = torch.nn.Conv2d(4, 4, 3, groups=2)

    net = Net()
    types_before = {n: type(m) for n, m in net.named_modules()}
    with pytest.raises(ValueError, match=r"cannot adapt \['b'\].*Conv2d with groups=1"):
        lp.get_peft_model(net, lp.LoraConfig(target_modules=["a", "b"]))
    assert {n: type(m) for n, m in net.named_modules()} == types_before


def test_weighted_adapter_covers_every_layer_of_every_input():
    model = lp.get_peft_model(
        tiny_llama(), lp.LoraConfig(target_modules=["q_proj"], layers_to_transform=0), adapter_name="a"
    )
    model.add_adapter("b", lp.LoraConfig(target_modules=["q_proj"], layers_to_transform=1))
    _randomise_adapters(model)
    model.add_weighted_adapter(["a", "b"], [0.5, 2.0], "mix", combination_type="cat")
    layers = model.base_model.model.model.layers
    torch.testing.assert_close(
        layers[0].self_attn.q_proj.get_delta_weight("mix"),
        0.5 * layers[0].self_attn.q_proj.get_delta_weight("a"),
        atol=1e-6,
        rtol=0,
    )
    torch.testing.assert_close(
        layers[1].self_attn.q_proj.get_delta_weight("mix"),
        2.0 * layers[1].self_attn.q_proj.get_delta_weight("b"),
        atol=1e-6,
        rtol=0,
    )


def test_bias_all_trains_no_parameter_that_never_runs():
    model = lp.get_peft_model(
        tiny_bert_classifier(), lp.LoraConfig(task_type="SEQ_CLS", target_modules=["query"], bias="all")
    )
    model.add_adapter("other", lp.LoraConfig(task_type="SEQ_CLS", target_modules=["query"]))
    model.set_adapter("default")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "base_model.model.classifier.modules_to_save.default.bias" in trainable
    assert not any(".original_module." in n or ".modules_to_save.other." in n or ".other." in n for n in trainable)


def test_every_classification_adapter_gets_its_own_head():
    model = lp.get_peft_model(tiny_bert_classifier(), lp.LoraConfig(task_type="SEQ_CLS", target_modules=["query"]))
    model.add_adapter("second", lp.LoraConfig(task_type="SEQ_CLS", target_modules=["query"]))
    head = model.base_model.model.classifier
    assert sorted(head.modules_to_save) == ["default", "second"]
    model.set_adapter("second")
    assert (
        head.modules_to_save["second"].weight.requires_grad and not head.modules_to_save["default"].weight.requires_grad
    )
