"""LoRA against the installed HF `peft`: same weights -> same numbers, files readable both ways."""

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
    save_and_reload,
    tiny_bert_classifier,
    tiny_convnet,
    tiny_gpt2,
    tiny_llama,
)

import lightning_peft as lp

ATOL = 1e-5


# name -> (model factory, input factory, LoraConfig kwargs)
CASES = {
    "gpt2-conv1d": (
        tiny_gpt2,
        ids,
        dict(target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True, lora_alpha=16, task_type="CAUSAL_LM"),
    ),
    "gpt2-regex-layers": (tiny_gpt2, ids, dict(target_modules=r".*\.h\.1\.attn\.c_attn", fan_in_fan_out=True)),
    "gpt2-layers-to-transform": (
        tiny_gpt2,
        ids,
        dict(target_modules=["c_attn", "c_fc"], fan_in_fan_out=True, layers_to_transform=[1], layers_pattern="h"),
    ),
    "llama-linear-patterns": (
        tiny_llama,
        ids,
        dict(
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "down_proj"],
            r=4,
            rank_pattern={"q_proj": 2, "layers.1.mlp.down_proj": 6},
            alpha_pattern={"v_proj": 32},
        ),
    ),
    "llama-embedding": (tiny_llama, ids, dict(target_modules=["embed_tokens", "q_proj"], r=4)),
    "bert-cls-lora-only-bias": (
        tiny_bert_classifier,
        ids,
        dict(task_type="SEQ_CLS", target_modules=["query", "value"], bias="lora_only"),
    ),
    "bert-cls-all-bias-modules": (
        tiny_bert_classifier,
        ids,
        dict(task_type="SEQ_CLS", target_modules=["query", "key"], bias="all", modules_to_save=["pooler"]),
    ),
    "conv2d": (tiny_convnet, image, dict(target_modules=["conv1", "conv2", "head"], r=4, lora_alpha=8)),
}


@pytest.mark.parity("LORA")
@pytest.mark.parametrize("case", list(CASES))
def test_our_files_load_in_peft_with_equal_logits(case, tmp_path):
    factory, inputs, kwargs = CASES[case]
    base, x = factory(), inputs()
    ours, theirs = save_and_reload(lp, peft, base, "LoraConfig", kwargs, tmp_path)
    expected, got, plain = logits(ours, x), logits(theirs, x), logits(base, x)
    assert not torch.allclose(expected, plain, atol=1e-3), "the adapter must change the output"
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)
    merged_ours = logits(ours.merge_and_unload(), x)
    merged_theirs = logits(theirs.merge_and_unload(), x)
    torch.testing.assert_close(merged_ours, expected, atol=1e-4, rtol=0)  # float rounding of W + dW
    torch.testing.assert_close(merged_theirs, merged_ours, atol=ATOL, rtol=0)


@pytest.mark.parametrize("case", list(CASES))
def test_peft_files_load_in_ours_with_equal_logits(case, tmp_path):
    factory, inputs, kwargs = CASES[case]
    base, x = factory(), inputs()
    theirs, ours = save_and_reload(peft, lp, base, "LoraConfig", kwargs, tmp_path)
    torch.testing.assert_close(logits(ours, x), logits(theirs, x), atol=ATOL, rtol=0)


@pytest.mark.parametrize("case", list(CASES))
def test_saved_key_sets_and_shapes_identical(case, tmp_path):
    factory, _, kwargs = CASES[case]
    base = factory()
    ours = fresh_saved_shapes(lp, base, lp.LoraConfig(**kwargs), tmp_path / "ours")
    assert ours == fresh_saved_shapes(peft, base, peft.LoraConfig(**kwargs), tmp_path / "peft")


# the files' contents written out: tiny GPT-2 (n_embd 32, c_attn 32 -> 96) and BERT classifier (hidden 32, 3 labels)
SAVED_KEYS = {
    "gpt2-c_attn-r8": (
        tiny_gpt2,
        dict(target_modules=["c_attn"], fan_in_fan_out=True),
        {
            "base_model.model.transformer.h.0.attn.c_attn.lora_A.weight": (8, 32),
            "base_model.model.transformer.h.0.attn.c_attn.lora_B.weight": (96, 8),
            "base_model.model.transformer.h.1.attn.c_attn.lora_A.weight": (8, 32),
            "base_model.model.transformer.h.1.attn.c_attn.lora_B.weight": (96, 8),
        },
    ),
    "bert-cls-query-r4-pooler-saved": (
        tiny_bert_classifier,
        dict(task_type="SEQ_CLS", target_modules=["query"], r=4, modules_to_save=["pooler"]),
        {
            "base_model.model.bert.encoder.layer.0.attention.self.query.lora_A.weight": (4, 32),
            "base_model.model.bert.encoder.layer.0.attention.self.query.lora_B.weight": (32, 4),
            "base_model.model.bert.encoder.layer.1.attention.self.query.lora_A.weight": (4, 32),
            "base_model.model.bert.encoder.layer.1.attention.self.query.lora_B.weight": (32, 4),
            "base_model.model.bert.pooler.dense.weight": (32, 32),  # modules_to_save: whole modules, plain names
            "base_model.model.bert.pooler.dense.bias": (32,),
            "base_model.model.classifier.weight": (3, 32),  # SEQ_CLS saves the head too
            "base_model.model.classifier.bias": (3,),
        },
    ),
    "llama-embedding-r4": (
        tiny_llama,
        dict(target_modules=["embed_tokens"], r=4),
        {
            "base_model.model.model.embed_tokens.lora_embedding_A": (4, 64),  # (r, vocab)
            "base_model.model.model.embed_tokens.lora_embedding_B": (32, 4),  # (hidden, r)
            # a targeted embedding is saved whole as well (peft's save_embedding_layers="auto")
            "base_model.model.model.embed_tokens.base_layer.weight": (64, 32),
        },
    ),
}


@pytest.mark.parametrize("case", list(SAVED_KEYS))
def test_saved_keys_and_shapes_are_exactly(case, tmp_path):
    factory, kwargs, expected = SAVED_KEYS[case]
    assert fresh_saved_shapes(lp, factory(), lp.LoraConfig(**kwargs), tmp_path) == expected


COMBINE_CASES = {
    "gpt2": (tiny_gpt2, ids, dict(target_modules=["c_attn", "c_fc"], fan_in_fan_out=True)),
    "llama-embedding": (tiny_llama, ids, dict(target_modules=["embed_tokens", "q_proj", "v_proj"])),
    "conv2d": (tiny_convnet, image, dict(target_modules=["conv1", "conv2"])),
}
COMBINATIONS = [
    ("svd", {}),
    ("svd", dict(svd_rank=3, svd_clamp=0.95, svd_full_matrices=False)),
    ("linear", {}),
    ("cat", {}),
]


@pytest.mark.parametrize("case", list(COMBINE_CASES))
@pytest.mark.parametrize("combination_type,options", COMBINATIONS)
def test_add_weighted_adapter_matches_peft(case, combination_type, options, tmp_path):
    factory, inputs, kwargs = COMBINE_CASES[case]
    base, x = factory(), inputs()
    second_r = 4 if combination_type == "linear" else 2
    for name, seed, r, alpha in (("a", 5, 4, 8), ("b", 6, second_r, 16)):
        m = lp.get_peft_model(copy.deepcopy(base), lp.LoraConfig(r=r, lora_alpha=alpha, **kwargs))
        perturb(m, seed)
        m.save_pretrained(tmp_path / name)
    outputs = []
    for lib in (lp, peft):
        m = lib.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "a", adapter_name="a")
        m.load_adapter(tmp_path / "b", adapter_name="b")
        m.add_weighted_adapter(["a", "b"], [0.7, -0.4], "mix", combination_type=combination_type, **options)
        m.set_adapter("mix")
        outputs.append(logits(m.eval(), x))
    torch.testing.assert_close(outputs[0], outputs[1], atol=ATOL, rtol=0)


@pytest.mark.parametrize("combination_type", ["linear", "cat"])
def test_exact_combinations_equal_the_weighted_sum_of_deltas(combination_type):
    """cat is exact; linear too when one adapter has weight 0 (then it is a rescaling)."""
    model = lp.get_peft_model(tiny_llama(), lp.LoraConfig(r=4, target_modules=["q_proj"]), adapter_name="a")
    model.add_adapter("b", lp.LoraConfig(r=4, lora_alpha=4, target_modules=["q_proj"]))
    perturb(model)
    model.set_adapter("b")
    perturb(model, seed=9)
    weights = [0.5, 2.0] if combination_type == "cat" else [1.5, 0.0]
    model.add_weighted_adapter(["a", "b"], weights, "mix", combination_type=combination_type)
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    expected = weights[0] * layer.get_delta_weight("a") + weights[1] * layer.get_delta_weight("b")
    torch.testing.assert_close(layer.get_delta_weight("mix"), expected, atol=1e-6, rtol=0)
    assert model.peft_config["mix"].lora_alpha == model.peft_config["mix"].r
