"""IA3: parity with the installed HF `peft` (logits both ways, merged, saved keys), identities, errors."""

from __future__ import annotations

import copy
import warnings

import peft
import pytest
import torch
from safetensors.torch import load_file

import lightning_peft as lp
from conftest import tiny_bert_classifier, tiny_convnet, tiny_gpt2, tiny_llama, tiny_t5
from lightning_peft.tuners.ia3 import IA3Layer

ATOL = 1e-5


def _ids(seed: int = 1) -> torch.Tensor:
    return torch.randint(1, 64, (2, 9), generator=torch.Generator().manual_seed(seed))


def _image(seed: int = 1) -> torch.Tensor:
    return torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(seed))


def _run(model, x):
    if isinstance(x, dict):
        out = model(**x)
    else:
        out = model(x)
    return out if isinstance(out, torch.Tensor) else out.logits


def _t5_inputs() -> dict:
    ids = _ids()
    return dict(input_ids=ids, decoder_input_ids=ids[:, :5].contiguous())


# name -> (model factory, inputs, IA3Config kwargs)
CASES = {
    "gpt2-conv1d-defaults": (tiny_gpt2, _ids, dict(task_type="CAUSAL_LM")),  # c_attn + mlp.c_proj (feedforward)
    "llama-gqa": (tiny_llama, _ids, dict(target_modules=["k_proj", "v_proj", "down_proj", "up_proj"],
                                        feedforward_modules=["down_proj", "up_proj"])),
    "t5-regex": (tiny_t5, _t5_inputs, dict(target_modules=r".*(SelfAttention\.(k|v)|DenseReluDense\.wo)",
                                           feedforward_modules=r".*DenseReluDense\.wo")),
    "bert-cls": (tiny_bert_classifier, _ids, dict(task_type="SEQ_CLS", target_modules=["key", "value", "output.dense"],
                                                  feedforward_modules=["output.dense"])),
    "conv2d": (tiny_convnet, _image, dict(target_modules=["conv1", "conv2", "head"], feedforward_modules=["conv2"])),
}


def _perturb(model: torch.nn.Module, seed: int = 3) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters()):
            if p.requires_grad:
                p.add_(0.3 * torch.randn(p.shape, generator=gen))


def _quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


@pytest.mark.parametrize("case", list(CASES))
def test_fresh_ia3_model_equals_base(case):
    factory, inputs, kwargs = CASES[case]
    base, x = factory(), inputs()
    with torch.no_grad():
        expected = _run(base, x)
        model = _quiet(lp.get_peft_model, copy.deepcopy(base), lp.IA3Config(**kwargs)).eval()
        if kwargs.get("task_type") == "SEQ_CLS":  # the head copy starts equal to the original
            assert any(".modules_to_save.default." in n for n, _ in model.named_parameters())
        torch.testing.assert_close(_run(model, x), expected, atol=0, rtol=0)
    assert any(isinstance(m, IA3Layer) for m in model.modules())


@pytest.mark.parametrize("case", list(CASES))
def test_our_files_load_in_peft_with_equal_logits_and_merge(case, tmp_path):
    factory, inputs, kwargs = CASES[case]
    base, x = factory(), inputs()
    ours = _quiet(lp.get_peft_model, copy.deepcopy(base), lp.IA3Config(**kwargs)).eval()
    _perturb(ours)
    ours.save_pretrained(tmp_path)
    theirs = _quiet(peft.PeftModel.from_pretrained, copy.deepcopy(base), tmp_path).eval()
    with torch.no_grad():
        expected, got, plain = _run(ours, x), _run(theirs, x), _run(base, x)
        assert not torch.allclose(expected, plain, atol=1e-3), "the adapter must change the output"
        torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)
        merged_ours = _run(_quiet(ours.merge_and_unload), x)
        merged_theirs = _run(_quiet(theirs.merge_and_unload), x)
    assert not any(isinstance(m, IA3Layer) for m in ours.modules())
    torch.testing.assert_close(merged_ours, expected, atol=1e-4, rtol=0)
    torch.testing.assert_close(merged_theirs, merged_ours, atol=ATOL, rtol=0)


@pytest.mark.parametrize("case", list(CASES))
def test_peft_files_load_in_ours_with_equal_logits(case, tmp_path):
    factory, inputs, kwargs = CASES[case]
    base, x = factory(), inputs()
    theirs = _quiet(peft.get_peft_model, copy.deepcopy(base), peft.IA3Config(**kwargs)).eval()
    _perturb(theirs)
    theirs.save_pretrained(tmp_path)
    ours = _quiet(lp.PeftModel.from_pretrained, copy.deepcopy(base), tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(_run(ours, x), _run(theirs, x), atol=ATOL, rtol=0)
    assert not any(p.requires_grad for p in ours.parameters())


@pytest.mark.parametrize("case", list(CASES))
def test_saved_key_sets_and_shapes_identical(case, tmp_path):
    factory, _, kwargs = CASES[case]
    base = factory()
    _quiet(lp.get_peft_model, copy.deepcopy(base), lp.IA3Config(**kwargs)).save_pretrained(tmp_path / "ours")
    _quiet(peft.get_peft_model, copy.deepcopy(base), peft.IA3Config(**kwargs)).save_pretrained(tmp_path / "peft")
    ours = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    theirs = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    assert sorted(ours) == sorted(theirs)
    assert {k: tuple(v.shape) for k, v in ours.items()} == {k: tuple(v.shape) for k, v in theirs.items()}


def test_vector_shapes_scale_outputs_or_inputs():
    model = _quiet(lp.get_peft_model, tiny_llama(), lp.IA3Config(target_modules=["k_proj", "down_proj"],
                                                                  feedforward_modules=["down_proj"]))
    layers = model.base_model.model.model.layers[0]
    assert tuple(layers.self_attn.k_proj.ia3_l["default"].shape) == (16, 1)  # 2 kv heads x 8: output
    assert tuple(layers.mlp.down_proj.ia3_l["default"].shape) == (1, 64)  # intermediate: input
    # the math: output scaling for attention targets, input scaling for feedforward ones
    k_proj, down = layers.self_attn.k_proj, layers.mlp.down_proj
    _perturb(model)
    x, h = torch.randn(3, 32), torch.randn(3, 64)
    with torch.no_grad():
        torch.testing.assert_close(k_proj(x), k_proj.base_layer(x) * k_proj.ia3_l["default"].flatten())
        torch.testing.assert_close(down(h), down.base_layer(h * down.ia3_l["default"].flatten()))


def test_training_reaches_only_the_vectors():
    model = _quiet(lp.get_peft_model, tiny_gpt2(), lp.IA3Config(task_type="CAUSAL_LM")).train()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".ia3_l.default" in n for n in trainable)
    ids = _ids()
    model(input_ids=ids, labels=ids).loss.backward()
    for name, p in model.named_parameters():
        if name in trainable:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None, name


def test_merge_unmerge_roundtrip_and_unload():
    base = tiny_gpt2()
    x = _ids()
    model = _quiet(lp.get_peft_model, copy.deepcopy(base), lp.IA3Config(task_type="CAUSAL_LM")).eval()
    _perturb(model)
    with torch.no_grad():
        adapted = _run(model, x)
        c_attn = model.base_model.model.transformer.h[0].attn.c_attn
        before_merge = c_attn.base_layer.weight.clone()
        model.base_model.merge_adapter()
        assert not torch.equal(c_attn.base_layer.weight, before_merge)  # the vector went into the weight
        torch.testing.assert_close(_run(model, x), adapted, atol=1e-4, rtol=0)
        with pytest.warns(UserWarning, match="inexact"):
            model.base_model.unmerge_adapter()
        torch.testing.assert_close(_run(model, x), adapted, atol=1e-4, rtol=0)
        with model.disable_adapter():
            torch.testing.assert_close(_run(model, x), _run(base, x), atol=1e-4, rtol=0)
        plain = model.unload()
        torch.testing.assert_close(_run(plain, x), _run(base, x), atol=1e-4, rtol=0)
    assert not any(isinstance(m, IA3Layer) for m in plain.modules())


def test_safe_merge_refuses_non_finite_and_leaves_weights_untouched():
    model = _quiet(lp.get_peft_model, tiny_gpt2(), lp.IA3Config(task_type="CAUSAL_LM"))
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
    peft_model = _quiet(lp.get_peft_model, model, lp.IA3Config(target_modules=["k_proj", "v_proj", "down_proj"],
                                                                feedforward_modules=["down_proj"]))
    x = _ids()
    with torch.no_grad():
        before = _run(peft_model, x)
    _perturb(peft_model)
    with torch.no_grad():
        adapted = _run(peft_model, x)
    assert not torch.allclose(before, adapted, atol=1e-3)  # the vectors act on the 8-bit layers
    with pytest.raises(ValueError, match="cannot merge IA3 adapters into bitsandbytes 8-bit layers"):
        peft_model.merge_and_unload()
    with torch.no_grad():
        torch.testing.assert_close(_run(peft_model, x), adapted, atol=0, rtol=0)  # nothing was merged


def test_two_named_adapters_and_config_roundtrip(tmp_path):
    model = _quiet(lp.get_peft_model, tiny_gpt2(), lp.IA3Config(task_type="CAUSAL_LM"))
    model.add_adapter("other", lp.IA3Config(target_modules=["c_attn"], init_ia3_weights=False))
    model.save_pretrained(tmp_path)
    config = lp.PeftConfig.from_pretrained(tmp_path / "other")
    assert isinstance(config, lp.IA3Config) and config.init_ia3_weights is False
    assert config.feedforward_modules == set() and config.target_modules == {"c_attn"}
    assert sorted(load_file(tmp_path / "other" / "adapter_model.safetensors")) == [
        "base_model.model.transformer.h.0.attn.c_attn.ia3_l", "base_model.model.transformer.h.1.attn.c_attn.ia3_l"]
