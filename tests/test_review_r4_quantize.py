"""Final review (R4): a second quantize_base_linears call is refused, the model left as it was."""

from __future__ import annotations

import pytest
import torch
from helpers import tiny_llama


@pytest.mark.parametrize("first, second", [(4, 8), (8, 4)])
def test_quantize_refuses_a_model_already_quantized_and_leaves_it_as_it_was(first, second):
    pytest.importorskip("bitsandbytes")
    import lightning_peft.quantization as q

    model = q.quantize_base_linears(tiny_llama(), bits=first)
    names = q.quantized_layer_names(model)
    layers = {name: type(m) for name, m in model.named_modules()}
    state = {k: v.clone() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
    with pytest.raises(ValueError, match=r"already holds bitsandbytes 8-/4-bit layers \(model\.layers\.0.*more\)"):
        q.quantize_base_linears(model, bits=second)
    assert {name: type(m) for name, m in model.named_modules()} == layers
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in state.items())
    q.quantize_base_linears(q.dequantize_base_linears(model), bits=second)  # the way out the message names
    assert q.quantized_layer_names(model) == names
