"""LoRA `trainable_token_indices` saved with `save_embedding_layers=True`, both ways with HF `peft` 0.21: HF PEFT
writes the base embedding under its wrapper (`<embedding>.token_adapter.base_layer.weight`) and, for a tied LM head,
the trained rows a second time (`lm_head.token_adapter.trainable_tokens_delta`). We write the same keys and read
them strictly: the base embedding is restored, the tied copy must equal the rows it repeats."""

from __future__ import annotations

import copy
import warnings

import peft
import pytest
import torch
from helpers import perturb, quiet, saved_shapes, tiny_gpt2, tiny_llama
from safetensors.torch import load_file, save_file
from torch import nn

import lightning_peft as lp

X = torch.tensor([[1, 64, 65, 66, 3], [66, 2, 64, 5, 65]])

CASES = {
    "llama-list": ("llama", dict(target_modules=["q_proj"], trainable_token_indices=[64, 65, 66])),
    "llama-dict-with-head": (
        "llama",
        dict(target_modules=["q_proj"], trainable_token_indices={"embed_tokens": [64], "lm_head": [65, 66]}),
    ),
    "llama-tied-list": ("llama-tied", dict(target_modules=["q_proj"], trainable_token_indices=[64, 65])),
    "gpt2-tied-list": ("gpt2", dict(target_modules=["c_attn"], trainable_token_indices=[64, 65])),
    "gpt2-own-head-rows": (
        "gpt2",
        dict(target_modules=["c_attn"], trainable_token_indices={"wte": [64], "lm_head": [65]}),
    ),
}


def _base(kind: str) -> nn.Module:
    model = tiny_gpt2() if kind == "gpt2" else tiny_llama(tie_word_embeddings=kind == "llama-tied")
    quiet(model.resize_token_embeddings, 70)
    return model.eval()


def _other_embeddings(base: nn.Module) -> nn.Module:
    """The same model with other values in its embedding / LM head rows (as a fresh resize would give): loading
    must restore the saved ones."""
    other = copy.deepcopy(base)
    with torch.no_grad():
        for layer in (other.get_input_embeddings(), other.get_output_embeddings()):
            layer.weight[60:] += 0.5
    return other


def _logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(X).logits


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request, tmp_path_factory):
    kind, kwargs = CASES[request.param]
    base = _base(kind)
    hf = quiet(peft.get_peft_model, copy.deepcopy(base), peft.LoraConfig(r=2, **kwargs))
    perturb(hf, seed=3, scale=0.3)
    hf_dir = tmp_path_factory.mktemp("hf")
    quiet(hf.save_pretrained, hf_dir, save_embedding_layers=True)
    ours = lp.get_peft_model(copy.deepcopy(base), lp.LoraConfig(r=2, **kwargs))
    perturb(ours, seed=4, scale=0.3)
    our_dir = tmp_path_factory.mktemp("ours")
    ours.save_pretrained(our_dir, save_embedding_layers=True)
    return base, hf, hf_dir, ours, our_dir


def test_saved_keys_are_hf_peft_s(case):
    _, _, hf_dir, _, our_dir = case
    assert saved_shapes(our_dir) == saved_shapes(hf_dir)
    assert any(".token_adapter.base_layer.weight" in k for k in saved_shapes(our_dir))


def test_we_load_hf_peft_s_folder_and_restore_the_embeddings(case):
    base, hf, hf_dir, _, _ = case
    other = _other_embeddings(base)
    assert not torch.allclose(_logits(other), _logits(base))
    loaded = lp.PeftModel.from_pretrained(other, hf_dir)
    torch.testing.assert_close(_logits(loaded), _logits(hf), atol=1e-5, rtol=0)


def test_hf_peft_loads_our_folder_and_restores_the_embeddings(case):
    base, _, _, ours, our_dir = case
    loaded = quiet(peft.PeftModel.from_pretrained, _other_embeddings(base), our_dir)
    torch.testing.assert_close(_logits(loaded), _logits(ours), atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "key",
    [
        "base_model.model.lm_head.token_adapter.trainable_tokens_delta",
        "base_model.model.lm_head.token_adapter.base_layer.weight",
    ],
)
def test_tied_copies_with_other_values_are_refused_and_nothing_changes(key, tmp_path):
    """GPT-2's LM head is the embedding: the file holds its rows / weight twice; different values cannot both be
    loaded (HF PEFT keeps whichever comes last): refused, the model as it was."""
    base = _base("gpt2")
    kwargs = dict(r=2, target_modules=["c_attn"], trainable_token_indices=[64, 65])
    hf = quiet(peft.get_peft_model, copy.deepcopy(base), peft.LoraConfig(**kwargs))
    perturb(hf, seed=3, scale=0.3)
    quiet(hf.save_pretrained, tmp_path, save_embedding_layers=True)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    tensors[key] = tensors[key] + 1.0
    save_file(tensors, tmp_path / "adapter_model.safetensors")
    model = lp.get_peft_model(copy.deepcopy(base), lp.LoraConfig(**kwargs))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="one tensor in this model \\(tied weights\\), with different values"):
        model.load_adapter(tmp_path, adapter_name="other")
    assert list(model.peft_config) == ["default"]
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_our_old_key_for_the_wrapped_embedding_is_refused(tmp_path):
    """`<embedding>.base_layer.weight` (what an earlier version wrote, which HF PEFT ignores) is not HF's key for an
    embedding wrapped by trainable tokens: strict loading names it."""
    base = _base("llama")
    kwargs = dict(r=2, target_modules=["q_proj"], trainable_token_indices=[64])
    ours = lp.get_peft_model(copy.deepcopy(base), lp.LoraConfig(**kwargs))
    ours.save_pretrained(tmp_path, save_embedding_layers=True)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    old = "base_model.model.model.embed_tokens.base_layer.weight"
    tensors[old] = tensors.pop("base_model.model.model.embed_tokens.token_adapter.base_layer.weight")
    save_file(tensors, tmp_path / "adapter_model.safetensors")
    with pytest.raises(ValueError, match="unexpected keys: base_model.model.model.embed_tokens.base_layer.weight"):
        lp.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)


def test_lora_on_the_embedding_and_tokens_on_the_head(tmp_path):
    """Embedding targeted by LoRA, rows of the (untied) LM head trained: HF PEFT's save_embedding_layers then skips
    the head (its wrapper has no `base_layer`); we save it too, under HF's key, and HF PEFT loads it."""
    base = _base("llama")
    kwargs = dict(r=2, target_modules=["q_proj", "embed_tokens"], trainable_token_indices={"lm_head": [65, 66]})
    ours = lp.get_peft_model(copy.deepcopy(base), lp.LoraConfig(init_lora_weights=False, **kwargs))
    perturb(ours, seed=5, scale=0.3)
    ours.save_pretrained(tmp_path / "ours", save_embedding_layers=True)
    hf = quiet(peft.get_peft_model, copy.deepcopy(base), peft.LoraConfig(**kwargs))
    quiet(hf.save_pretrained, tmp_path / "hf", save_embedding_layers=True)
    head = "base_model.model.lm_head.token_adapter.base_layer.weight"
    assert set(saved_shapes(tmp_path / "ours")) - set(saved_shapes(tmp_path / "hf")) == {head}
    loaded = quiet(peft.PeftModel.from_pretrained, _other_embeddings(base), tmp_path / "ours")
    torch.testing.assert_close(_logits(loaded), _logits(ours), atol=1e-5, rtol=0)
    back = lp.PeftModel.from_pretrained(_other_embeddings(base), tmp_path / "ours")
    torch.testing.assert_close(_logits(back), _logits(ours), atol=1e-5, rtol=0)


def test_auto_does_not_save_the_embeddings_with_trainable_tokens(tmp_path):
    """HF PEFT's `save_embedding_layers="auto"` saves the embeddings when the targets name one, except with trainable
    tokens (their point is a small file): same keys, and no warning."""
    base = _base("llama")
    kwargs = dict(r=2, target_modules=["q_proj", "lm_head"], trainable_token_indices={"embed_tokens": [64]})
    hf = quiet(peft.get_peft_model, copy.deepcopy(base), peft.LoraConfig(**kwargs))
    quiet(hf.save_pretrained, tmp_path / "hf")
    ours = lp.get_peft_model(copy.deepcopy(base), lp.LoraConfig(**kwargs))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ours.save_pretrained(tmp_path / "ours")
    assert saved_shapes(tmp_path / "ours") == saved_shapes(tmp_path / "hf")
    assert not any("base_layer" in k for k in saved_shapes(tmp_path / "ours"))
