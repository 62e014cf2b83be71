"""Rank-stabilised LoRA (`use_rslora=True`: scaling lora_alpha / sqrt(r)) against HF PEFT 0.21: per-layer scalings with
rank_pattern / alpha_pattern, files both ways, hot-swap, compiled-hotswap padding and add_weighted_adapter."""

from __future__ import annotations

import copy
import math

import peft
import pytest
import torch
from helpers import ids, logits, quiet, save_and_reload, saved_shapes, tiny_llama

import lightning_peft as lp
from lightning_peft.utils.hotswap import hotswap_adapter, prepare_model_for_compiled_hotswap

KWARGS = dict(
    r=4,
    lora_alpha=8,
    target_modules=["q_proj", "v_proj", "down_proj"],
    rank_pattern={"v_proj": 2},
    alpha_pattern={"down_proj": 3},
    use_rslora=True,
)
CLOSE = dict(atol=1e-5, rtol=1e-5)


@pytest.fixture(scope="module")
def base():
    return tiny_llama()


def _scalings(model, lora_layer_type):
    return {n: dict(m.scaling) for n, m in model.named_modules() if isinstance(m, lora_layer_type)}


def test_scalings_files_and_outputs_equal_hf(base, tmp_path):
    x = ids()
    hf, mine = save_and_reload(peft, lp, base, "LoraConfig", KWARGS, tmp_path / "hf", silence=True)
    torch.testing.assert_close(logits(mine, x), logits(hf, x), **CLOSE)
    ours_scalings = _scalings(mine, lp.tuners.lora.LoraLayer)
    assert ours_scalings == _scalings(hf, peft.tuners.lora.LoraLayer)
    assert ours_scalings["base_model.model.model.layers.0.self_attn.v_proj"]["default"] == 8 / math.sqrt(2)
    assert ours_scalings["base_model.model.model.layers.0.mlp.down_proj"]["default"] == 3 / 2
    ours, read_by_hf = save_and_reload(lp, peft, base, "LoraConfig", KWARGS, tmp_path / "ours", silence=True)
    torch.testing.assert_close(logits(read_by_hf, x), logits(ours, x), **CLOSE)
    assert saved_shapes(tmp_path / "hf") == saved_shapes(tmp_path / "ours")
    assert lp.PeftConfig.from_pretrained(tmp_path / "hf").use_rslora is True
    with pytest.raises(TypeError, match="use_rslora must be True or False"):
        lp.LoraConfig(target_modules=["q_proj"], use_rslora="sqrt")


def test_hotswap_uses_the_rslora_scaling(base, tmp_path):
    x = ids()
    first = quiet(lp.get_peft_model, copy.deepcopy(base), lp.LoraConfig(**KWARGS, init_lora_weights=False))
    first.save_pretrained(tmp_path / "first")
    second = quiet(
        lp.get_peft_model, copy.deepcopy(base), lp.LoraConfig(**dict(KWARGS, lora_alpha=5), init_lora_weights=False)
    )
    second.save_pretrained(tmp_path / "second")
    expected = logits(quiet(lp.PeftModel.from_pretrained, copy.deepcopy(base), tmp_path / "second"), x)
    model = lp.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "first")
    hotswap_adapter(model, str(tmp_path / "second"), "default")
    torch.testing.assert_close(logits(model, x), expected, **CLOSE)
    # (HF PEFT 0.21's hotswap_adapter gives other outputs here than loading the second adapter fresh)


def test_compiled_hotswap_padding_keeps_outputs_and_saved_config(base, tmp_path):
    x = ids()
    model = quiet(lp.get_peft_model, copy.deepcopy(base), lp.LoraConfig(**KWARGS, init_lora_weights=False))
    before = logits(model, x)
    prepare_model_for_compiled_hotswap(model, target_rank=8)
    torch.testing.assert_close(logits(model, x), before, **CLOSE)
    model.save_pretrained(tmp_path / "padded")
    again = lp.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "padded")
    torch.testing.assert_close(logits(again, x), before, **CLOSE)


def test_add_weighted_adapter_keeps_the_combined_update(base):
    """The combined adapter's factors carry the inputs' scalings, so its own scaling is 1. (HF PEFT copies
    use_rslora into the new config, so its combination is sqrt(r) times too large: a deliberate difference.)"""
    x = ids()
    kwargs = dict(KWARGS, rank_pattern={}, alpha_pattern={}, init_lora_weights=False)
    model = quiet(lp.get_peft_model, copy.deepcopy(base), lp.LoraConfig(**kwargs))
    expected = logits(model, x)
    for kind in ("linear", "cat", "svd"):
        model.add_weighted_adapter(["default"], [1.0], f"mix_{kind}", combination_type=kind)
        assert model.peft_config[f"mix_{kind}"].use_rslora is False
        model.set_adapter(f"mix_{kind}")
        torch.testing.assert_close(logits(model, x), expected, atol=1e-4, rtol=1e-4)
        model.set_adapter("default")
