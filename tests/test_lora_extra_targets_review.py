"""Review of trainable_token_indices / target_parameters: what a merge leaves behind on a model with tied input /
output embeddings. When the merge gives BOTH sides of the tie their own copy (trainable tokens on the embedding
and on the LM head, or LoRA on both), the merged model must not still say it is tied: transformers' `tie_weights()`
(called by `resize_token_embeddings`, `post_init`, older `from_pretrained`s) would silently put the embedding back
in place of the merged LM head."""

from __future__ import annotations

import pytest
import torch
from helpers import quiet, tiny_llama
from transformers import AutoModelForCausalLM

import lightning_peft as lp

X = torch.tensor([[1, 64, 65, 66, 3], [66, 2, 64, 5, 65]])


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(X).logits


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(target_modules=["q_proj"], trainable_token_indices={"embed_tokens": [64], "lm_head": [65, 66]}),
        dict(target_modules=["embed_tokens", "lm_head"]),
        dict(target_modules=["q_proj"], trainable_token_indices=[64, 65]),
    ],
    ids=["tokens-own-head-rows", "lora-embedding-and-head", "tokens-tied-head"],
)
def test_merge_of_both_tied_sides_unties_the_config(kwargs, tmp_path):
    base = tiny_llama(tie_word_embeddings=True)
    quiet(base.resize_token_embeddings, 70)
    assert base.get_input_embeddings().weight is base.get_output_embeddings().weight
    model = lp.get_peft_model(base.eval(), lp.LoraConfig(r=2, init_lora_weights=False, **kwargs))
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters()):
            if p.requires_grad:
                p.add_(0.3 * torch.randn(p.shape, generator=gen))
    expected = _logits(model)
    merged = model.merge_and_unload()
    torch.testing.assert_close(_logits(merged), expected, atol=1e-4, rtol=0)
    tied = merged.get_input_embeddings().weight is merged.get_output_embeddings().weight
    assert tied or not merged.config.tie_word_embeddings  # separate tensors: the config must say so
    merged.tie_weights()  # transformers' own call: must keep the merged head
    torch.testing.assert_close(_logits(merged), expected, atol=1e-4, rtol=0)
    merged.save_pretrained(tmp_path)
    back = quiet(AutoModelForCausalLM.from_pretrained, tmp_path).eval()
    torch.testing.assert_close(_logits(back), expected, atol=1e-4, rtol=0)
