"""Review of QLoRA (48763d8): the merged export of a 4-bit base (exact fp32 merge; a model loaded in 4-bit by
transformers written without its quantization_config; GPT-2's Conv1D layout), bitsandbytes' CPU repacking of the
layers no adapter wraps, prepare_model_for_kbit_training's checkpointing for GPTQ-like models as HF, argument checks
of quantize_base_linears."""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch
from helpers import ids, quiet, quiet_trainer, snapshot, tiny_gpt2, token_loader, unchanged

bnb = pytest.importorskip("bitsandbytes")
import lightning.pytorch as pl  # noqa: E402
import peft as hf  # noqa: E402
from transformers import AutoModelForCausalLM, BitsAndBytesConfig  # noqa: E402

import lightning_peft as lp  # noqa: E402
from lightning_peft import quantization as q  # noqa: E402
from lightning_peft.lightning import PEFTCallback  # noqa: E402
from lightning_peft.lightning._state import save_merged_model  # noqa: E402


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("gpt2_64")
    tiny_gpt2(n_embd=64).save_pretrained(folder)
    return folder


def hf_4bit(folder):
    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32)
    return quiet(AutoModelForCausalLM.from_pretrained, folder, quantization_config=config, device_map="cpu")


def eval_logits(model, x):
    with torch.no_grad():
        return model.eval()(input_ids=x).logits


class LitLM(pl.LightningModule):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def training_step(self, batch, batch_idx):
        return self.model(input_ids=batch[0], labels=batch[0]).loss

    def validation_step(self, batch, batch_idx):
        self.log("val", self.model(input_ids=batch[0], labels=batch[0]).loss)

    def configure_optimizers(self):
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=1e-2)


def test_fit_on_transformers_4bit_gpt2_exports_an_exact_plain_merged_model(gpt2_dir, tmp_path):
    """Validation (an eval forward) before training; merged/ loads as plain GPT-2 (no quantization_config, Conv1D
    layout) and equals the trained model's fp32 merge (not a 4-bit requantization of it)."""
    module = LitLM(hf_4bit(gpt2_dir))
    config = lp.LoraConfig(r=4, target_modules=["c_attn"], lora_dropout=0.0)
    callback = PEFTCallback(config, export_dir=str(tmp_path), merge_on_train_end=True)
    trainer = quiet_trainer(
        max_steps=2, devices=1, enable_checkpointing=False, callbacks=[callback], num_sanity_val_steps=1
    )
    data = token_loader()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, data, data)  # the sanity validation used to repack c_proj: training then failed
    merged_dir = tmp_path / "merged"
    assert "quantization_config" not in json.loads((merged_dir / "config.json").read_text())
    plain = AutoModelForCausalLM.from_pretrained(merged_dir)
    assert type(plain.transformer.h[0].attn.c_attn).__name__ == "Conv1D"
    x = ids(length=10)
    trained = q.dequantized_copy(module.model)  # W4 dequantized + LoRA, in fp32
    torch.testing.assert_close(eval_logits(plain, x), eval_logits(trained, x), atol=1e-5, rtol=0)
    # the model in memory keeps its 4-bit layers and transformers' marks
    assert q.int4_layers(module.model) and module.model.get_base_model().config.quantization_config is not None
    assert module.model.get_base_model().is_loaded_in_4bit is True


def test_prepare_model_for_kbit_training_keeps_every_4bit_layer_trainable_after_eval(gpt2_dir):
    model = lp.prepare_model_for_kbit_training(hf_4bit(gpt2_dir), use_gradient_checkpointing=False)
    peft_model = lp.get_peft_model(model, lp.LoraConfig(r=4, target_modules=["c_attn"]))
    x = ids(length=10)
    eval_logits(peft_model, x)  # may repack the untargeted c_proj / c_fc (AVX512-BF16 CPUs)
    peft_model.train()(input_ids=x, labels=x).loss.backward()
    assert all(p.grad is not None for p in peft_model.parameters() if p.requires_grad)


def test_our_4bit_gpt2_merged_export_loads_with_conv1d_layout(tmp_path):
    model = q.quantize_base_linears(tiny_gpt2(n_embd=64), bits=4)
    peft_model = lp.get_peft_model(model, lp.LoraConfig(r=4, target_modules=["c_attn"], init_lora_weights=False))
    merged = q.dequantize_base_linears(peft_model).merge_and_unload()
    save_merged_model(merged, str(tmp_path))
    assert type(merged.transformer.h[0].attn.c_attn) is torch.nn.Linear  # put back after the save
    plain = AutoModelForCausalLM.from_pretrained(tmp_path)
    x = ids(length=10)
    torch.testing.assert_close(eval_logits(plain, x), eval_logits(merged, x), atol=1e-5, rtol=0)


@pytest.mark.parametrize("method", ["gptq", "torchao"])
def test_prepare_model_for_kbit_training_checkpoints_quantized_methods_as_hf(method):
    theirs = tiny_gpt2().to(torch.bfloat16)
    theirs.quantization_method = method
    mine = copy.deepcopy(theirs)
    hf.prepare_model_for_kbit_training(theirs)
    lp.prepare_model_for_kbit_training(mine)
    assert mine.is_gradient_checkpointing is theirs.is_gradient_checkpointing is True
    assert {n: (p.dtype, p.requires_grad) for n, p in mine.named_parameters()} == {
        n: (p.dtype, p.requires_grad) for n, p in theirs.named_parameters()
    }
    x = ids(length=6)
    assert mine.get_input_embeddings()(x).requires_grad  # the input-grads hook, as HF's


def test_quantize_refuses_a_str_skip_and_a_non_bool_include_conv1d():
    model = tiny_gpt2(n_embd=64)
    before = snapshot(model)
    for kwargs, match in [
        (dict(skip="c_attn"), "skip must be a list of module names"),
        (dict(skip=[1]), "skip must be a list of module names"),
        (dict(include_conv1d="no"), "include_conv1d must be True or False"),
    ]:
        with pytest.raises(ValueError, match=match):
            q.quantize_base_linears(model, bits=4, **kwargs)
    assert unchanged(model, before) and not q.quantized_layer_names(model)
    q.quantize_base_linears(model, skip=(n for n in ["c_attn"]), bits=4)  # any iterable of names
    assert not q.is_linear4bit(model.transformer.h[0].attn.c_attn) and q.is_linear4bit(model.transformer.h[0].mlp.c_fc)
