"""IA3: parity with the installed HF `peft` (logits both ways, merged, saved keys), identities, errors."""

from __future__ import annotations

import copy

import peft
import pytest
import torch
from helpers import (
    fresh_saved_shapes,
    ids,
    image,
    logits,
    perturb,
    quiet,
    save_and_reload,
    tiny_bert_classifier,
    tiny_convnet,
    tiny_gpt2,
    tiny_llama,
    tiny_t5,
)
from safetensors.torch import load_file

import lightning_peft as lp
from lightning_peft.tuners.ia3 import IA3Layer

ATOL = 1e-5


def _ids() -> torch.Tensor:
    return ids(length=9)


def _t5_inputs() -> dict:
    x = _ids()
    return dict(input_ids=x, decoder_input_ids=x[:, :5].contiguous())


# name -> (model factory, inputs, IA3Config kwargs)
CASES = {
    "gpt2-conv1d-defaults": (tiny_gpt2, _ids, dict(task_type="CAUSAL_LM")),  # c_attn + mlp.c_proj (feedforward)
    "llama-gqa": (
        tiny_llama,
        _ids,
        dict(target_modules=["k_proj", "v_proj", "down_proj", "up_proj"], feedforward_modules=["down_proj", "up_proj"]),
    ),
    "t5-regex": (
        tiny_t5,
        _t5_inputs,
        dict(
            target_modules=r".*(SelfAttention\.(k|v)|DenseReluDense\.wo)", feedforward_modules=r".*DenseReluDense\.wo"
        ),
    ),
    "bert-cls": (
        tiny_bert_classifier,
        _ids,
        dict(
            task_type="SEQ_CLS", target_modules=["key", "value", "output.dense"], feedforward_modules=["output.dense"]
        ),
    ),
    "conv2d": (tiny_convnet, image, dict(target_modules=["conv1", "conv2", "head"], feedforward_modules=["conv2"])),
}


@pytest.mark.parametrize("case", list(CASES))
def test_fresh_ia3_model_equals_base(case):
    factory, inputs, kwargs = CASES[case]
    base, x = factory(), inputs()
    with torch.no_grad():
        expected = logits(base, x)
        model = quiet(lp.get_peft_model, copy.deepcopy(base), lp.IA3Config(**kwargs)).eval()
        if kwargs.get("task_type") == "SEQ_CLS":  # the head copy starts equal to the original
            assert any(".modules_to_save.default." in n for n, _ in model.named_parameters())
        torch.testing.assert_close(logits(model, x), expected, atol=0, rtol=0)
    assert any(isinstance(m, IA3Layer) for m in model.modules())


@pytest.mark.parity("IA3")
@pytest.mark.parametrize("case", list(CASES))
def test_our_files_load_in_peft_with_equal_logits_and_merge(case, tmp_path):
    factory, inputs, kwargs = CASES[case]
    base, x = factory(), inputs()
    ours, theirs = save_and_reload(lp, peft, base, "IA3Config", kwargs, tmp_path, scale=0.3, silence=True)
    expected, got, plain = logits(ours, x), logits(theirs, x), logits(base, x)
    assert not torch.allclose(expected, plain, atol=1e-3), "the adapter must change the output"
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)
    merged_ours = logits(quiet(ours.merge_and_unload), x)
    merged_theirs = logits(quiet(theirs.merge_and_unload), x)
    assert not any(isinstance(m, IA3Layer) for m in ours.modules())
    torch.testing.assert_close(merged_ours, expected, atol=1e-4, rtol=0)
    torch.testing.assert_close(merged_theirs, merged_ours, atol=ATOL, rtol=0)


@pytest.mark.parametrize("case", list(CASES))
def test_peft_files_load_in_ours_with_equal_logits(case, tmp_path):
    factory, inputs, kwargs = CASES[case]
    base, x = factory(), inputs()
    theirs, ours = save_and_reload(peft, lp, base, "IA3Config", kwargs, tmp_path, scale=0.3, silence=True)
    torch.testing.assert_close(logits(ours, x), logits(theirs, x), atol=ATOL, rtol=0)
    assert not any(p.requires_grad for p in ours.parameters())


@pytest.mark.parametrize("case", list(CASES))
def test_saved_key_sets_and_shapes_identical(case, tmp_path):
    factory, _, kwargs = CASES[case]
    base = factory()
    ours = fresh_saved_shapes(lp, base, lp.IA3Config(**kwargs), tmp_path / "ours")
    assert ours == fresh_saved_shapes(peft, base, peft.IA3Config(**kwargs), tmp_path / "peft")


def test_saved_keys_and_shapes_are_exactly(tmp_path):
    """Tiny GPT-2 with the CAUSAL_LM defaults: c_attn (32 -> 96) scales its outputs, the feedforward mlp.c_proj
    (128 -> 32) its inputs; the file holds the vectors under plain names (no adapter name)."""
    assert fresh_saved_shapes(lp, tiny_gpt2(), lp.IA3Config(task_type="CAUSAL_LM"), tmp_path) == {
        "base_model.model.transformer.h.0.attn.c_attn.ia3_l": (96, 1),
        "base_model.model.transformer.h.0.mlp.c_proj.ia3_l": (1, 128),
        "base_model.model.transformer.h.1.attn.c_attn.ia3_l": (96, 1),
        "base_model.model.transformer.h.1.mlp.c_proj.ia3_l": (1, 128),
    }


def test_vector_shapes_scale_outputs_or_inputs():
    model = quiet(
        lp.get_peft_model,
        tiny_llama(),
        lp.IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"]),
    )
    layers = model.base_model.model.model.layers[0]
    assert tuple(layers.self_attn.k_proj.ia3_l["default"].shape) == (16, 1)  # 2 kv heads x 8: output
    assert tuple(layers.mlp.down_proj.ia3_l["default"].shape) == (1, 64)  # intermediate: input
    # the math: output scaling for attention targets, input scaling for feedforward ones
    k_proj, down = layers.self_attn.k_proj, layers.mlp.down_proj
    perturb(model, scale=0.3)
    x, h = torch.randn(3, 32), torch.randn(3, 64)
    with torch.no_grad():
        torch.testing.assert_close(k_proj(x), k_proj.base_layer(x) * k_proj.ia3_l["default"].flatten())
        torch.testing.assert_close(down(h), down.base_layer(h * down.ia3_l["default"].flatten()))


def test_training_reaches_only_the_vectors():
    model = quiet(lp.get_peft_model, tiny_gpt2(), lp.IA3Config(task_type="CAUSAL_LM")).train()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".ia3_l.default" in n for n in trainable)
    x = _ids()
    model(input_ids=x, labels=x).loss.backward()
    for name, p in model.named_parameters():
        if name in trainable:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None, name


def test_merge_unmerge_roundtrip_and_unload():
    base = tiny_gpt2()
    x = _ids()
    model = quiet(lp.get_peft_model, copy.deepcopy(base), lp.IA3Config(task_type="CAUSAL_LM")).eval()
    perturb(model, scale=0.3)
    with torch.no_grad():
        adapted = logits(model, x)
        c_attn = model.base_model.model.transformer.h[0].attn.c_attn
        before_merge = c_attn.base_layer.weight.clone()
        model.base_model.merge_adapter()
        assert not torch.equal(c_attn.base_layer.weight, before_merge)  # the vector went into the weight
        torch.testing.assert_close(logits(model, x), adapted, atol=1e-4, rtol=0)
        with pytest.warns(UserWarning, match="inexact"):
            model.base_model.unmerge_adapter()
        torch.testing.assert_close(logits(model, x), adapted, atol=1e-4, rtol=0)
        with model.disable_adapter():
            torch.testing.assert_close(logits(model, x), logits(base, x), atol=1e-4, rtol=0)
        plain = model.unload()
        torch.testing.assert_close(logits(plain, x), logits(base, x), atol=1e-4, rtol=0)
    assert not any(isinstance(m, IA3Layer) for m in plain.modules())


def test_safe_merge_refuses_non_finite_and_leaves_weights_untouched():
    model = quiet(lp.get_peft_model, tiny_gpt2(), lp.IA3Config(task_type="CAUSAL_LM"))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        model.base_model.model.transformer.h[1].attn.c_attn.ia3_l["default"][0, 0] = float("inf")
    with pytest.raises(ValueError, match="NaN/inf"):
        model.merge_and_unload(safe_merge=True)
    after = model.state_dict()
    for key, value in before.items():
        if "ia3_l" not in key:
            assert torch.equal(after[key], value), key


def test_feedforward_modules_must_be_within_target_modules():
    with pytest.raises(ValueError, match=r"feedforward_modules must be a subset of target_modules; \['down_proj'\]"):
        lp.IA3Config(target_modules=["k_proj", "v_proj"], feedforward_modules=["down_proj"])
    config = lp.IA3Config(target_modules=r".*\.k_proj", feedforward_modules=r".*\.down_proj")
    with pytest.raises(ValueError, match="matches modules outside target_modules"):
        lp.get_peft_model(tiny_llama(), config)


def test_merging_into_an_8bit_layer_is_refused():
    pytest.importorskip("bitsandbytes")
    from lightning_peft.quantization import quantize_base_linears

    model = quantize_base_linears(tiny_llama())
    peft_model = quiet(
        lp.get_peft_model,
        model,
        lp.IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"]),
    )
    x = _ids()
    with torch.no_grad():
        before = logits(peft_model, x)
    perturb(peft_model, scale=0.3)
    with torch.no_grad():
        adapted = logits(peft_model, x)
    assert not torch.allclose(before, adapted, atol=1e-3)  # the vectors act on the 8-bit layers
    with pytest.raises(ValueError, match="cannot merge IA3 adapters into bitsandbytes 8-bit layers"):
        peft_model.merge_and_unload()
    with torch.no_grad():
        torch.testing.assert_close(logits(peft_model, x), adapted, atol=0, rtol=0)  # nothing was merged


def test_two_named_adapters_and_config_roundtrip(tmp_path):
    model = quiet(lp.get_peft_model, tiny_gpt2(), lp.IA3Config(task_type="CAUSAL_LM"))
    model.add_adapter("other", lp.IA3Config(target_modules=["c_attn"], init_ia3_weights=False))
    model.save_pretrained(tmp_path)
    config = lp.PeftConfig.from_pretrained(tmp_path / "other")
    assert isinstance(config, lp.IA3Config) and config.init_ia3_weights is False
    assert config.feedforward_modules == set() and config.target_modules == {"c_attn"}
    assert sorted(load_file(tmp_path / "other" / "adapter_model.safetensors")) == [
        "base_model.model.transformer.h.0.attn.c_attn.ia3_l",
        "base_model.model.transformer.h.1.attn.c_attn.ia3_l",
    ]
