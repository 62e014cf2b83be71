"""8-bit base (bitsandbytes Linear8bitLt on CPU) under LoRA / IA3, and a Lightning run that exports and reloads."""

from __future__ import annotations

import sys
import warnings

import pytest
import torch
from helpers import quiet_trainer, tiny_bert_classifier, tiny_gpt2, tiny_llama, token_loader
from torch import nn

pytest.importorskip("bitsandbytes")

from lightning_peft import IA3Config, LoraConfig, PeftModel, PromptTuningConfig, get_peft_model  # noqa: E402
from lightning_peft import quantization as q  # noqa: E402
from lightning_peft.serialization import get_peft_model_state_dict  # noqa: E402
from lightning_peft.tuners.lora import Linear8bitLt  # noqa: E402

LLAMA_LINEARS = {
    f"model.layers.{i}.{m}"
    for i in range(2)
    for m in (
        "self_attn.q_proj",
        "self_attn.k_proj",
        "self_attn.v_proj",
        "self_attn.o_proj",
        "mlp.gate_proj",
        "mlp.up_proj",
        "mlp.down_proj",
    )
}


def test_quantizes_base_linears_but_not_the_head_or_skipped_modules(token_ids):
    model = tiny_llama()
    with torch.no_grad():
        reference = model(input_ids=token_ids).logits
    q.quantize_base_linears(model)
    assert set(q.int8_layers(model)) == LLAMA_LINEARS
    assert type(model.lm_head) is nn.Linear and model.lm_head.weight.dtype == torch.float32
    assert all(model.get_submodule(n).weight.dtype == torch.int8 for n in LLAMA_LINEARS)
    with torch.no_grad():
        out = model(input_ids=token_ids).logits
    assert 0 < (out - reference).abs().max() < 0.05  # quantized: close, not equal

    bert = q.quantize_base_linears(tiny_bert_classifier(), skip=["pooler"])
    names = set(q.int8_layers(bert))
    assert not any(n.startswith(("classifier", "bert.pooler")) for n in names) and len(names) == 12


def test_conv1d_is_quantized_transposed(token_ids):
    model = tiny_gpt2()
    with torch.no_grad():
        reference = model(input_ids=token_ids).logits
    q.quantize_base_linears(model)
    assert set(q.int8_layers(model)) == {
        f"transformer.h.{i}.{m}" for i in range(2) for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
    }
    assert model.transformer.h[0].attn.c_attn.weight.shape == (96, 32)
    with torch.no_grad():
        assert (model(input_ids=token_ids).logits - reference).abs().max() < 0.05


def test_refuses_a_model_that_already_has_adapters():
    peft = get_peft_model(tiny_llama(), LoraConfig(target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="quantize the base model first"):
        q.quantize_base_linears(peft)


def test_lora_over_int8_trains_only_fp32_adapters(token_ids):
    peft = get_peft_model(q.quantize_base_linears(tiny_llama()), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    layer = peft.base_model.model.model.layers[0].self_attn.q_proj
    assert isinstance(layer, Linear8bitLt) and q.is_linear8bit(layer.base_layer)
    trainable = {n for n, p in peft.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert all(p.dtype == torch.float32 for n, p in peft.named_parameters() if p.requires_grad)
    peft.train()
    peft(input_ids=token_ids, labels=token_ids).loss.backward()
    assert all(p.grad is not None for p in peft.parameters() if p.requires_grad)


def _trained_lora_over_int8(seed: int = 0):
    peft = get_peft_model(
        q.quantize_base_linears(tiny_llama(seed)),
        LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False),
    )
    return peft.eval()


def test_merge_into_int8_requantizes_with_one_warning(token_ids):
    peft = _trained_lora_over_int8()
    with torch.no_grad():
        unmerged = peft(input_ids=token_ids).logits
    Linear8bitLt._warned_rounding = False
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        merged = peft.merge_and_unload()
    rounding = [w for w in caught if "requantizes" in str(w.message)]
    assert len(rounding) == 1
    assert set(q.int8_layers(merged)) == LLAMA_LINEARS  # still 8-bit
    with torch.no_grad():
        out = merged(input_ids=token_ids).logits
    assert (out - unmerged).abs().max() < 0.05


def test_dequantize_then_merge_is_exact_in_the_compute_dtype(token_ids):
    peft = _trained_lora_over_int8()
    q.dequantize_base_linears(peft)
    assert q.int8_layers(peft) == []
    assert type(peft.base_model.model.model.layers[0].self_attn.q_proj.base_layer) is nn.Linear
    with torch.no_grad():
        unmerged = peft(input_ids=token_ids).logits
        merged = peft.merge_and_unload()(input_ids=token_ids).logits
    torch.testing.assert_close(merged, unmerged, rtol=1e-5, atol=1e-5)


def test_dequantized_weight_matches_the_original_within_int8_rounding():
    linear = nn.Linear(16, 8)
    layer = q._make_linear8bit(linear.weight.data, linear.bias.data, threshold=0.0)
    step = linear.weight.abs().amax(dim=1, keepdim=True) / 127
    error = (q.dequantize_weight(layer) - linear.weight).abs()
    assert (error <= step * 0.55).all()  # half a step, plus bitsandbytes' fp16 statistics
    assert error.max() > 0


def test_ia3_over_int8_runs_but_merge_is_refused(token_ids):
    peft = get_peft_model(
        q.quantize_base_linears(tiny_llama()),
        IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"]),
    )
    peft(input_ids=token_ids, labels=token_ids).loss.backward()
    with pytest.raises(ValueError, match="cannot merge IA3"):
        peft.merge_and_unload()
    with pytest.raises(ValueError, match="set merge=false"):
        q.check_int8_compatible(IA3Config(target_modules=["k_proj"]), merge=True)
    q.check_int8_compatible(IA3Config(target_modules=["k_proj"]), merge=False)
    q.check_int8_compatible(LoraConfig(target_modules=["k_proj"]), merge=True)
    q.check_int8_compatible(PromptTuningConfig(num_virtual_tokens=2, task_type="CAUSAL_LM"), merge=True)


def test_a_tuner_without_8bit_support_is_refused():
    class FutureConfig:
        peft_type = "OFT"
        is_prompt_learning = False

    with pytest.raises(ValueError, match="OFT tuner cannot run over 8-bit.*use one of: IA3, LORA"):
        q.check_int8_compatible(FutureConfig())


def test_missing_bitsandbytes_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # `import bitsandbytes` raises ImportError
    with pytest.raises(ImportError, match=r"pip install lightning_peft\[int8\]"):
        q.quantize_base_linears(tiny_llama())
    from lightning_peft.lightning.strategies import make_strategy

    with pytest.raises(ImportError, match=r"pip install lightning_peft\[int8\]"):
        make_strategy("int8")


def test_lightning_run_over_int8_exports_an_adapter_that_loads_back(tmp_path, token_ids):
    import lightning.pytorch as pl
    from safetensors.torch import load_file
    from transformers import LlamaForCausalLM

    from lightning_peft.lightning import PEFTCallback

    class LitLM(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = q.quantize_base_linears(tiny_llama())

        def training_step(self, batch, batch_idx):
            return self.model(input_ids=batch[0], labels=batch[0]).loss

        def configure_optimizers(self):
            return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=1e-2)

    config = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    module = LitLM()
    callback = PEFTCallback(config, export_dir=str(tmp_path), merge_on_train_end=True)
    trainer = quiet_trainer(max_steps=3, devices=1, enable_checkpointing=False, callbacks=[callback])
    data = token_loader()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, data)
    exported = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert set(exported) == {
        f"base_model.model.model.layers.{i}.self_attn.{m}.lora_{ab}.weight"
        for i in range(2)
        for m in ("q_proj", "v_proj")
        for ab in "AB"
    }
    assert any(v.abs().sum() > 0 for k, v in exported.items() if "lora_B" in k)  # trained
    assert all(v.dtype == torch.float32 for v in exported.values())

    assert module.model is not None and hasattr(module.model, "peft_config")  # after fit: still the adapter model
    merged_in_memory = callback.merged_model.eval()  # merged into copies of the 8-bit layers (requantized)
    assert set(q.int8_layers(merged_in_memory)) == LLAMA_LINEARS
    reloaded = PeftModel.from_pretrained(q.quantize_base_linears(tiny_llama()), str(tmp_path / "adapter"))
    with torch.no_grad():
        adapter_out = reloaded(input_ids=token_ids).logits
        merged_out = merged_in_memory(input_ids=token_ids).logits
        assert (adapter_out - merged_out).abs().max() < 0.05
        # merged/ was written dequantized (fp32): it loads as a plain model, without bitsandbytes
        plain = LlamaForCausalLM.from_pretrained(tmp_path / "merged").eval()
        assert all(type(m) is not Linear8bitLt and not q.is_linear8bit(m) for m in plain.modules())
        assert (plain(input_ids=token_ids).logits - adapter_out).abs().max() < 0.05
    loaded_keys = get_peft_model_state_dict(reloaded)
    for key, value in exported.items():
        torch.testing.assert_close(loaded_keys[key], value, rtol=0, atol=0)
