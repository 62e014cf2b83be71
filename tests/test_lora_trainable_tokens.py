"""Trainable tokens (`LoraConfig.trainable_token_indices`): only the listed embedding rows train. Compared with HF
`peft` 0.21 both ways through files on a tiny Llama (untied and tied embeddings) and GPT-2 (tied) with added
tokens, merged, trained one step, with mixed-adapter batches; the refusals."""

from __future__ import annotations

import copy

import peft
import pytest
import torch
from helpers import perturb, quiet, saved_shapes, tiny_gpt2, tiny_llama
from torch import nn

import lightning_peft as lp
from lightning_peft.tuners.lora.trainable_tokens import TrainableTokensLayer

X = torch.tensor([[1, 64, 65, 66, 3], [66, 2, 64, 5, 65]])  # new tokens 64..66 and old ones


def _base(kind: str) -> nn.Module:
    model = tiny_gpt2() if kind == "gpt2" else tiny_llama(tie_word_embeddings=kind == "llama-tied")
    quiet(model.resize_token_embeddings, 70)  # three tokens added (and some spare rows)
    return model.eval()


def _logits(model: nn.Module, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        return model(X, **kwargs).logits


CASES = {
    "llama-list": ("llama", [64, 65, 66]),
    "llama-dict-with-head": ("llama", {"embed_tokens": [64], "lm_head": [65, 66]}),
    "llama-tied-list": ("llama-tied", [64, 65, 66]),
    "llama-tied-other-head-rows": ("llama-tied", {"embed_tokens": [64], "lm_head": [65, 66]}),
    "gpt2-tied-same-rows": ("gpt2", {"wte": [64, 65], "lm_head": [64, 65]}),
}


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request, tmp_path_factory):
    kind, indices = CASES[request.param]
    base = _base(kind)
    kwargs = dict(r=2, target_modules=["c_attn"] if kind == "gpt2" else ["q_proj"], trainable_token_indices=indices)
    hf = quiet(peft.get_peft_model, copy.deepcopy(base), peft.LoraConfig(**kwargs))
    perturb(hf, scale=0.3)
    folder = tmp_path_factory.mktemp("hf")
    hf.save_pretrained(folder)
    return base, kwargs, hf, folder


@pytest.mark.parity("LORA")
def test_files_both_ways_keys_and_flags_as_hf(case, tmp_path):
    base, kwargs, hf, folder = case
    ours = quiet(lp.PeftModel.from_pretrained, copy.deepcopy(base), folder)
    assert ours.peft_config["default"].trainable_token_indices == kwargs["trainable_token_indices"]
    torch.testing.assert_close(_logits(ours), _logits(hf))
    assert not torch.allclose(_logits(ours), _logits(base))
    ours.save_pretrained(tmp_path)
    assert saved_shapes(tmp_path) == saved_shapes(folder)
    assert any(k.endswith(".token_adapter.trainable_tokens_delta") for k in saved_shapes(tmp_path))
    back = quiet(peft.PeftModel.from_pretrained, copy.deepcopy(base), tmp_path)
    torch.testing.assert_close(_logits(back), _logits(ours))
    # the same trainable parameters (HF keeps the rows one level deeper, under `token_adapter`)
    fresh = quiet(lp.get_peft_model, copy.deepcopy(base), lp.LoraConfig(**kwargs))
    hf_fresh = quiet(peft.get_peft_model, copy.deepcopy(base), peft.LoraConfig(**kwargs))
    assert sorted((n, p.requires_grad) for n, p in fresh.named_parameters()) == sorted(
        (n.replace(".token_adapter.", "."), p.requires_grad) for n, p in hf_fresh.named_parameters()
    )
    torch.testing.assert_close(_logits(fresh), _logits(hf_fresh))  # rows start at their values: no change


@pytest.mark.parity("LORA")
def test_merge_and_unload_and_a_training_step(case):
    base, kwargs, hf, folder = case
    ours = quiet(lp.PeftModel.from_pretrained, copy.deepcopy(base), folder, is_trainable=True)
    expected = _logits(hf)
    merged = quiet(copy.deepcopy(ours).merge_and_unload)
    assert not any(isinstance(m, TrainableTokensLayer) for m in merged.modules())
    torch.testing.assert_close(_logits(merged), expected, rtol=1e-5, atol=1e-5)  # HF's merge: not when tied rows differ
    # one SGD step from the same weights: the same rows after it, and no other embedding row moved
    hf_train = quiet(peft.PeftModel.from_pretrained, copy.deepcopy(base), folder, is_trainable=True)
    embed_before = ours.get_input_embeddings().get_base_layer().weight.clone()
    for model in (ours, hf_train):
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
        model(X, labels=X).loss.backward()
        optimizer.step()
    hf_rows = {n.replace(".token_adapter.", "."): p for n, p in hf_train.named_parameters() if "trainable_tokens" in n}
    ours_rows = {n: p for n, p in ours.named_parameters() if "trainable_tokens" in n}
    assert ours_rows.keys() == hf_rows.keys() and ours_rows
    for name, p in ours_rows.items():
        torch.testing.assert_close(p, hf_rows[name], rtol=1e-5, atol=1e-6)
    assert torch.equal(ours.get_input_embeddings().get_base_layer().weight, embed_before)
    ours.eval()
    with ours.disable_adapter():
        torch.testing.assert_close(_logits(ours), _logits(base))


def test_merge_twice_save_after_merge_and_mixed_batch(tmp_path):
    base = _base("llama-tied")
    kwargs = dict(r=2, target_modules=["q_proj"], trainable_token_indices=[64, 65])
    hf = quiet(peft.get_peft_model, copy.deepcopy(base), peft.LoraConfig(**kwargs))
    quiet(hf.add_adapter, "other", peft.LoraConfig(**dict(kwargs, trainable_token_indices=[66])))
    perturb(hf, scale=0.3)
    hf.set_adapter("other")
    perturb(hf, seed=4, scale=0.3)
    hf.save_pretrained(tmp_path / "hf")
    ours = quiet(lp.PeftModel.from_pretrained, copy.deepcopy(base), tmp_path / "hf")
    ours.load_adapter(tmp_path / "hf" / "other", "other")
    hf.set_adapter("default")
    hf.eval()
    torch.testing.assert_close(_logits(ours), _logits(hf))
    names = ["default", "__base__"]
    torch.testing.assert_close(_logits(ours, adapter_names=names), _logits(hf, adapter_names=names))
    before = _state(ours)
    with pytest.raises(ValueError, match="Only one adapter can be set at a time"):
        ours.base_model.set_adapter(["default", "other"])
    assert _state(ours) == before and ours.active_adapters == ["default"]
    expected = _logits(ours)
    ours.save_pretrained(tmp_path / "before")
    ours.merge_adapter()
    with pytest.warns(UserWarning, match="already merged"):
        ours.merge_adapter()
    torch.testing.assert_close(_logits(ours), expected)
    ours.save_pretrained(tmp_path / "after")
    assert saved_shapes(tmp_path / "before/other") == saved_shapes(tmp_path / "after/other")
    ours.unmerge_adapter()
    torch.testing.assert_close(_logits(ours), expected)


def _state(model: nn.Module) -> list:
    return [(n, type(m).__name__) for n, m in model.named_modules()] + [
        (n, p.requires_grad) for n, p in model.named_parameters()
    ]


@pytest.mark.parametrize(
    ("indices", "extra", "error", "match", "hf_error"),
    [
        ([70], {}, IndexError, "out of range", IndexError),
        ({"embed_tokens": [1]}, {"modules_to_save": ["embed_tokens"]}, ValueError, "not both", ValueError),
        ({"nothere": [1]}, {}, ValueError, "matches no module", ValueError),
        ({"embed_tokens": [1]}, {"target_modules": ["embed_tokens"]}, TypeError, "cannot be applied", TypeError),
        ({"q_proj": [1]}, {}, TypeError, "cannot be applied", TypeError),
        ({"k_proj": [1]}, {}, TypeError, "only an nn.Embedding", None),  # HF takes any Linear and drops its bias
    ],
    ids=["out-of-range", "also-saved", "missing", "also-lora", "lora-linear", "plain-linear"],
)
def test_refusals_leave_the_model_as_it_was(indices, extra, error, match, hf_error):
    kwargs = dict(dict(r=2, target_modules=["q_proj"], trainable_token_indices=indices), **extra)
    if hf_error is not None:
        with pytest.raises(hf_error):
            quiet(peft.get_peft_model, tiny_llama(), peft.LoraConfig(**kwargs))
    model = tiny_llama()
    before = _state(model)
    with pytest.raises(error, match=match):
        lp.get_peft_model(model, lp.LoraConfig(**kwargs))
    assert _state(model) == before


@pytest.mark.parametrize(
    ("value", "error", "match"),
    [
        ([-1], IndexError, "negative"),  # HF PEFT fails at the first forward
        ([3, 3], ValueError, "more than once"),  # HF PEFT trains two copies of the row, one of which wins
        ([], ValueError, "is empty"),
        ([1.5], TypeError, "list of token indices"),
        ("abc", TypeError, "list of token indices"),
        ({"embed_tokens": "x"}, TypeError, "list of token indices"),
        ({3: [1]}, TypeError, "keys must be module names"),
    ],
)
def test_field_values(value, error, match):
    with pytest.raises(error, match=match):
        lp.LoraConfig(target_modules=["q_proj"], trainable_token_indices=value)
