"""LoRA against the installed HF `peft`: same weights -> same numbers, files readable both ways."""

from __future__ import annotations

import copy

import peft
import pytest
import torch
from safetensors.torch import load_file

import lightning_peft as lp
from conftest import tiny_bert_classifier, tiny_convnet, tiny_gpt2, tiny_llama

ATOL = 1e-5


def _ids(seed: int = 1) -> torch.Tensor:
    return torch.randint(1, 64, (2, 12), generator=torch.Generator().manual_seed(seed))


def _image(seed: int = 1) -> torch.Tensor:
    return torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(seed))


def _logits(model, x):
    out = model(x)
    return out if isinstance(out, torch.Tensor) else out.logits


# name -> (model factory, input factory, LoraConfig kwargs)
CASES = {
    "gpt2-conv1d": (tiny_gpt2, _ids, dict(target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True,
                                           lora_alpha=16, task_type="CAUSAL_LM")),
    "gpt2-regex-layers": (tiny_gpt2, _ids, dict(target_modules=r".*\.h\.1\.attn\.c_attn", fan_in_fan_out=True)),
    "gpt2-layers-to-transform": (tiny_gpt2, _ids, dict(target_modules=["c_attn", "c_fc"], fan_in_fan_out=True,
                                                        layers_to_transform=[1], layers_pattern="h")),
    "llama-linear-patterns": (tiny_llama, _ids, dict(target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                                                                     "gate_proj", "down_proj"],
                                                     r=4, rank_pattern={"q_proj": 2, "layers.1.mlp.down_proj": 6},
                                                     alpha_pattern={"v_proj": 32})),
    "llama-embedding": (tiny_llama, _ids, dict(target_modules=["embed_tokens", "q_proj"], r=4)),
    "bert-cls-lora-only-bias": (tiny_bert_classifier, _ids, dict(task_type="SEQ_CLS", target_modules=["query", "value"],
                                                                  bias="lora_only")),
    "bert-cls-all-bias-modules": (tiny_bert_classifier, _ids, dict(task_type="SEQ_CLS", target_modules=["query", "key"],
                                                                    bias="all", modules_to_save=["pooler"])),
    "conv2d": (tiny_convnet, _image, dict(target_modules=["conv1", "conv2", "head"], r=4, lora_alpha=8)),
}


def _perturb_trainable(model: torch.nn.Module, seed: int = 3) -> None:
    """Give every trainable tensor (A, B, biases, saved modules) a non-trivial value."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters()):
            if p.requires_grad:
                p.add_(0.2 * torch.randn(p.shape, generator=gen))


@pytest.mark.parametrize("case", list(CASES))
def test_our_files_load_in_peft_with_equal_logits(case, tmp_path):
    factory, inputs, kwargs = CASES[case]
    base, x = factory(), inputs()
    ours = lp.get_peft_model(copy.deepcopy(base), lp.LoraConfig(**kwargs)).eval()
    _perturb_trainable(ours)
    ours.save_pretrained(tmp_path)
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    with torch.no_grad():
        expected, got, plain = _logits(ours, x), _logits(theirs, x), _logits(base, x)
    assert not torch.allclose(expected, plain, atol=1e-3), "the adapter must change the output"
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)
    with torch.no_grad():
        merged_ours = _logits(ours.merge_and_unload(), x)
        merged_theirs = _logits(theirs.merge_and_unload(), x)
    torch.testing.assert_close(merged_ours, expected, atol=1e-4, rtol=0)  # float rounding of W + dW
    torch.testing.assert_close(merged_theirs, merged_ours, atol=ATOL, rtol=0)


@pytest.mark.parametrize("case", list(CASES))
def test_peft_files_load_in_ours_with_equal_logits(case, tmp_path):
    factory, inputs, kwargs = CASES[case]
    base, x = factory(), inputs()
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**kwargs)).eval()
    _perturb_trainable(theirs)
    theirs.save_pretrained(tmp_path)
    ours = lp.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(_logits(ours, x), _logits(theirs, x), atol=ATOL, rtol=0)


@pytest.mark.parametrize("case", list(CASES))
def test_saved_key_sets_and_shapes_identical(case, tmp_path):
    factory, _, kwargs = CASES[case]
    base = factory()
    lp.get_peft_model(copy.deepcopy(base), lp.LoraConfig(**kwargs)).save_pretrained(tmp_path / "ours")
    peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**kwargs)).save_pretrained(tmp_path / "peft")
    ours = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    theirs = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    assert sorted(ours) == sorted(theirs)
    assert {k: tuple(v.shape) for k, v in ours.items()} == {k: tuple(v.shape) for k, v in theirs.items()}


COMBINE_CASES = {
    "gpt2": (tiny_gpt2, _ids, dict(target_modules=["c_attn", "c_fc"], fan_in_fan_out=True)),
    "llama-embedding": (tiny_llama, _ids, dict(target_modules=["embed_tokens", "q_proj", "v_proj"])),
    "conv2d": (tiny_convnet, _image, dict(target_modules=["conv1", "conv2"])),
}
COMBINATIONS = [
    ("svd", {}), ("svd", dict(svd_rank=3, svd_clamp=0.95, svd_full_matrices=False)),
    ("linear", {}), ("cat", {}),
]


@pytest.mark.parametrize("case", list(COMBINE_CASES))
@pytest.mark.parametrize("combination_type,options", COMBINATIONS)
def test_add_weighted_adapter_matches_peft(case, combination_type, options, tmp_path):
    factory, inputs, kwargs = COMBINE_CASES[case]
    base, x = factory(), inputs()
    second_r = 4 if combination_type == "linear" else 2
    for name, seed, r, alpha in (("a", 5, 4, 8), ("b", 6, second_r, 16)):
        m = lp.get_peft_model(copy.deepcopy(base), lp.LoraConfig(r=r, lora_alpha=alpha, **kwargs))
        _perturb_trainable(m, seed)
        m.save_pretrained(tmp_path / name)
    outputs = []
    for lib in (lp, peft):
        m = lib.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "a", adapter_name="a")
        m.load_adapter(tmp_path / "b", adapter_name="b")
        m.add_weighted_adapter(["a", "b"], [0.7, -0.4], "mix", combination_type=combination_type, **options)
        m.set_adapter("mix")
        with torch.no_grad():
            outputs.append(_logits(m.eval(), x))
    torch.testing.assert_close(outputs[0], outputs[1], atol=ATOL, rtol=0)


@pytest.mark.parametrize("combination_type", ["linear", "cat"])
def test_exact_combinations_equal_the_weighted_sum_of_deltas(combination_type):
    """cat is exact; linear too when one adapter has weight 0 (then it is a rescaling)."""
    model = lp.get_peft_model(tiny_llama(), lp.LoraConfig(r=4, target_modules=["q_proj"]), adapter_name="a")
    model.add_adapter("b", lp.LoraConfig(r=4, lora_alpha=4, target_modules=["q_proj"]))
    _perturb_trainable(model)
    model.set_adapter("b")
    _perturb_trainable(model, seed=9)
    weights = [0.5, 2.0] if combination_type == "cat" else [1.5, 0.0]
    model.add_weighted_adapter(["a", "b"], weights, "mix", combination_type=combination_type)
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    expected = weights[0] * layer.get_delta_weight("a") + weights[1] * layer.get_delta_weight("b")
    torch.testing.assert_close(layer.get_delta_weight("mix"), expected, atol=1e-6, rtol=0)
    assert model.peft_config["mix"].lora_alpha == model.peft_config["mix"].r
