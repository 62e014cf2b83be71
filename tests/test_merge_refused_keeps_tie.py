"""A merge refused by a layer (two active TrainableTokens adapters training one row) after BaseTuner gave the layers
of tied embeddings their own weight copies to merge into: the refused call leaves the tie as it found it (GPT-2's
`lm_head.weight` is `wte.weight` again) and the weight unchanged."""

from __future__ import annotations

import pytest
import torch
from helpers import quiet, tiny_gpt2

import lightning_peft as lp


def test_refused_merge_reties_tied_embeddings():
    base = tiny_gpt2()
    quiet(base.resize_token_embeddings, 70)
    model = quiet(lp.get_peft_model, base.eval(), lp.TrainableTokensConfig(token_indices=[64, 65]))
    model.add_adapter("b", lp.TrainableTokensConfig(token_indices=[65, 66]))
    model.base_model.set_adapter(["default", "b"])
    inner = model.base_model.model
    wte, head = inner.transformer.wte, inner.lm_head
    shared = wte.get_base_layer().weight
    assert head.get_base_layer().weight is shared
    before = shared.detach().clone()
    with pytest.raises(ValueError, match="Token indices of adapter b are already defined"):
        model.merge_adapter()
    assert wte.get_base_layer().weight is shared and head.get_base_layer().weight is shared
    assert not wte.merged and not head.merged and wte._shared_weight == () and head._shared_weight == ()
    assert torch.equal(shared, before)
