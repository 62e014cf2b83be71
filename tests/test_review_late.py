"""Late review: the TrainableTokens tuner's layer status, the tuner hooks guarding PiSSA's base weights when a load is
interrupted, and the fused LoRA Linear path against the op-for-op path on edge inputs."""

from __future__ import annotations

import warnings

import peft as hf
import pytest
import torch
from helpers import tiny_llama
from torch import nn
from transformers.pytorch_utils import Conv1D

import lightning_peft as lp
import lightning_peft.peft_model as peft_model_module
from lightning_peft.tuners.lora.layer import Linear

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def test_trainable_tokens_layer_status_module_type_as_hf():
    """HF PEFT's module_type is the layer's repr up to '(': 'TrainableTokensLayer' (no tuner prefix), for the
    TrainableTokens tuner and for LoRA's trainable_token_indices alike."""
    for lib in (hf, lp):
        model = lib.get_peft_model(tiny_llama(), lib.TrainableTokensConfig(token_indices=[3, 5]))
        assert [s.module_type for s in model.get_layer_status()] == ["TrainableTokensLayer"], lib.__name__
        assert repr(model.base_model.model.model.embed_tokens).startswith("TrainableTokensLayer(")


def _base(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n.replace(".base_layer.", "."): p.detach().clone() for n, p in model.named_parameters() if "lora_" not in n}


def test_interrupted_pissa_loads_give_the_base_weights_back(tmp_path, monkeypatch):
    config = lp.LoraConfig(target_modules=["q_proj"], r=2, init_lora_weights="pissa")
    lp.get_peft_model(tiny_llama(), config).save_pretrained(tmp_path)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(peft_model_module, "set_peft_model_state_dict", interrupted)
    plain = tiny_llama()
    before = _base(plain)
    with pytest.raises(KeyboardInterrupt):
        lp.PeftModel.from_pretrained(plain, tmp_path)
    assert before.keys() == _base(plain).keys() and all(torch.equal(v, _base(plain)[k]) for k, v in before.items())
    other = lp.get_peft_model(tiny_llama(), lp.LoraConfig(target_modules=["v_proj"], r=2))
    before = _base(other)
    with pytest.raises(KeyboardInterrupt):
        other.load_adapter(tmp_path, adapter_name="pissa")
    after = _base(other)
    assert list(other.peft_config) == ["default"] and all(torch.equal(v, after[k]) for k, v in before.items())


def _layer(kind: str, p: float = 0.0, bias: bool = True) -> Linear:
    torch.manual_seed(0)
    base: nn.Module = Conv1D(5, 6) if kind == "conv1d" else nn.Linear(6, 5, bias=bias)
    base.requires_grad_(False)
    layer = Linear(base, "default", r=3, lora_alpha=6, lora_dropout=p, fan_in_fan_out=kind == "conv1d")
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_()
    return layer


def _fused_and_general(layer: Linear, x: torch.Tensor, grad: bool) -> list[tuple[torch.Tensor, list]]:
    results = []
    for forward in (layer.forward, layer._forward_with_adapter_modules):
        xx = x.detach().clone().requires_grad_(grad)
        layer.zero_grad(set_to_none=True)
        y = forward(xx)
        grads = []
        if grad:
            (y * torch.arange(y.numel()).view(y.shape)).sum().backward()
            grads = [xx.grad] + [q.grad for q in layer.parameters() if q.requires_grad]
        results.append((y, grads))
    return results


EDGE_INPUTS = {
    "1-D": lambda: torch.randn(6),
    "3-D": lambda: torch.randn(2, 4, 6),
    "no tokens": lambda: torch.randn(0, 6),
    "no tokens 3-D": lambda: torch.randn(2, 0, 6),
    "non-contiguous": lambda: torch.randn(6, 40).t(),
    "stride 0": lambda: torch.randn(1, 6).expand(300, 6),
    "many tokens": lambda: torch.randn(500, 6),
}


@pytest.mark.parametrize("kind", ["linear", "conv1d", "linear-no-bias"])
@pytest.mark.parametrize("mode", ["train", "no_grad", "inference_mode"])
def test_fused_path_equals_the_op_for_op_path_on_edge_inputs(kind, mode):
    layer = _layer(kind.split("-")[0], bias=kind != "linear-no-bias")
    for name, make in EDGE_INPUTS.items():
        x = make()
        if mode == "train":
            (fused, fused_grads), (general, general_grads) = _fused_and_general(layer.train(), x, grad=True)
            for a, b in zip(fused_grads, general_grads):
                torch.testing.assert_close(a, b, msg=name)
        else:
            with torch.no_grad() if mode == "no_grad" else torch.inference_mode():
                (fused, _), (general, _) = _fused_and_general(layer.eval(), x, grad=False)
        assert fused.shape == general.shape, name
        torch.testing.assert_close(fused, general, msg=name)


def test_fused_dropout_p_one_as_the_op_for_op_path():
    """nn.Dropout(p=1.0) is a valid module (drops everything): the general path gives the base output; the fused
    path divides by 1 - p = 0."""
    layer = _layer("linear", p=0.5).train()
    layer.lora_dropout["default"].p = 1.0
    x = torch.randn(4, 6)
    (fused, fused_grads), (general, general_grads) = _fused_and_general(layer, x, grad=True)
    torch.testing.assert_close(fused, general)
    for a, b in zip(fused_grads, general_grads):
        torch.testing.assert_close(a, b)


def test_legacy_fan_in_fan_out_linear_fused_and_general_paths_agree():
    """HF PEFT 0.6's form Linear(adapter_name, in, out, r, fan_in_fan_out=True) stores the base weight (in, out), as
    HF 0.6 did: the fused and the general path both compute x @ W(in, out) (the base was an nn.Linear holding
    (in, out), which the general path ran as x @ W.T)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        layer = Linear("default", 6, 6, 3, fan_in_fan_out=True)
    layer.base_layer.requires_grad_(False)
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_()
    (fused, _), (general, _) = _fused_and_general(layer.eval(), torch.randn(4, 6), grad=False)
    torch.testing.assert_close(fused, general)
