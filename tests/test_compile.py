"""torch.compile over LoRA models: no graph breaks in our layers, same outputs and gradients as eager."""

from __future__ import annotations

import copy
from functools import partial

import pytest
import torch
from helpers import tiny_gpt2, tiny_llama

import lightning_peft as lp

# one transformer block each: dynamo traces every block again (the time of these tests), and a second block runs
# the same adapter code as the first
CASES = {
    "gpt2": (partial(tiny_gpt2, n_layer=1), dict(target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True)),
    "llama": (
        partial(tiny_llama, num_hidden_layers=1),
        dict(target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]),
    ),
}


def _model(case: str, dropout: float = 0.0) -> torch.nn.Module:
    factory, kwargs = CASES[case]
    model = lp.get_peft_model(
        factory(), lp.LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, init_lora_weights=False, **kwargs)
    )
    return model


def _breaks_in_our_code(explained) -> list[str]:
    return [
        r.reason
        for r in explained.break_reasons
        if any("lightning_peft" in str(frame.filename) for frame in r.user_stack)
    ]


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("train", [False, True])
def test_no_graph_breaks(case, train, token_ids):
    torch._dynamo.reset()
    model = _model(case, dropout=0.1)
    model.train(train)
    explained = torch._dynamo.explain(model)(input_ids=token_ids)
    assert not _breaks_in_our_code(explained)
    assert explained.graph_break_count == 0, [r.reason for r in explained.break_reasons]
    # with labels transformers' own loss code may break the graph; the adapter adds no break of its own
    plain = torch._dynamo.explain(CASES[case][0]().train(train))(input_ids=token_ids, labels=token_ids)
    explained = torch._dynamo.explain(model)(input_ids=token_ids, labels=token_ids)
    assert not _breaks_in_our_code(explained)
    assert explained.graph_break_count == plain.graph_break_count


@pytest.mark.parametrize("case", list(CASES))
def test_compiled_matches_eager(case, token_ids):
    torch._dynamo.reset()
    eager = _model(case).eval()  # eval: the base models' own dropout would make the two runs differ
    compiled_model = copy.deepcopy(eager)
    compiled = torch.compile(compiled_model, backend="aot_eager")
    losses, grads = [], []
    for model, params in ((eager, eager), (compiled, compiled_model)):
        loss = model(input_ids=token_ids, labels=token_ids).loss
        loss.backward()
        losses.append(loss.detach())
        grads.append({n: p.grad for n, p in params.named_parameters() if p.requires_grad})
    torch.testing.assert_close(losses[1], losses[0], atol=1e-5, rtol=1e-5)
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], atol=1e-5, rtol=1e-4, msg=name)


def test_compiled_respects_set_adapter_and_disable(token_ids):
    torch._dynamo.reset()
    model = _model("llama").eval()
    model.add_adapter(
        "other", lp.LoraConfig(r=2, lora_alpha=4, init_lora_weights=False, target_modules=["q_proj", "v_proj"])
    )
    compiled = torch.compile(model, backend="aot_eager")
    with torch.no_grad():
        per_adapter = []
        for name in ("default", "other"):
            model.set_adapter(name)
            per_adapter.append(model(input_ids=token_ids).logits)
        assert not torch.allclose(per_adapter[0], per_adapter[1])  # the adapters really differ
        for name in ("default", "other"):
            model.set_adapter(name)
            torch.testing.assert_close(
                compiled(input_ids=token_ids).logits, model(input_ids=token_ids).logits, atol=1e-5, rtol=0
            )
        with model.disable_adapter():
            torch.testing.assert_close(
                compiled(input_ids=token_ids).logits, model(input_ids=token_ids).logits, atol=1e-5, rtol=0
            )
