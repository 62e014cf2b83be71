"""The TrainableTokens tuner changes only embedding rows, which quantization never touches: it runs, trains and
merges over an 8-bit or 4-bit base, and the app's quantized strategies accept it (they refused it before)."""

from __future__ import annotations

import pytest
import torch
from helpers import tiny_llama

import lightning_peft as lp
from lightning_peft.quantization import check_quantized_compatible, quantize_base_linears

pytest.importorskip("bitsandbytes")


@pytest.mark.parametrize("bits", [8, 4])
def test_trainable_tokens_train_and_merge_over_a_quantized_base(bits: int) -> None:
    config = lp.TrainableTokensConfig(token_indices=[1, 2])
    check_quantized_compatible(config, merge=True, kind=f"int{bits}")
    model = lp.get_peft_model(quantize_base_linears(tiny_llama(), bits=bits), config)
    ids = torch.tensor([[1, 2, 3, 4]])
    model(input_ids=ids).logits.sum().backward()
    trained = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trained and all("trainable_tokens_delta" in n for n in trained)
    assert all(p.grad is not None for n, p in model.named_parameters() if p.requires_grad)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.requires_grad:
                param.add_(0.5)
        before = model(input_ids=ids).logits
        merged = model.merge_and_unload()
        torch.testing.assert_close(merged(input_ids=ids).logits, before)


def test_tuners_that_wrap_base_layers_are_still_checked() -> None:
    with pytest.raises(ValueError, match="cannot be merged into 4-bit"):
        check_quantized_compatible(lp.IA3Config(target_modules=["q_proj"], feedforward_modules=[]), True, "int4")
