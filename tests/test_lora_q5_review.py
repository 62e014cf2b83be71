"""Review of LoRA layer_replication (issue 15): a merged replicated model is the plain deeper model its config
describes. Before the fix, merge_and_unload left the copies' unmerged weights shared between layers, so that
transformers' save_pretrained refused it (RuntimeError: shared tensors), and PEFTCallback's fit failed at its
merged/ export."""

from __future__ import annotations

import copy

import lightning.pytorch as pl
import peft
import pytest
import torch
import transformers
from helpers import ids, logits, perturb, quiet, quiet_trainer, tiny_llama, token_loader

import lightning_peft as lp
from lightning_peft.lightning import PEFTCallback

REPLICATION = dict(target_modules=["q_proj", "v_proj"], layer_replication=[[0, 2], [1, 3]])


@pytest.fixture(scope="module")
def llama():
    return tiny_llama(num_hidden_layers=3)


def test_merged_replicated_model_saves_and_loads_with_transformers(llama, tmp_path):
    model = lp.get_peft_model(copy.deepcopy(llama), lp.LoraConfig(**REPLICATION, init_lora_weights=False)).eval()
    perturb(model)
    x = ids()
    expected = logits(model, x)
    merged = model.merge_and_unload()
    layers = merged.model.layers
    assert layers[1].mlp.up_proj.weight is not layers[2].mlp.up_proj.weight  # each copy its own weights
    merged.save_pretrained(tmp_path)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert loaded.config.num_hidden_layers == 4
    torch.testing.assert_close(logits(loaded, x), expected, rtol=1e-5, atol=1e-5)
    unloaded = lp.get_peft_model(copy.deepcopy(llama), lp.LoraConfig(**REPLICATION)).unload()
    assert unloaded.model.layers[1].mlp.up_proj.weight is unloaded.model.layers[2].mlp.up_proj.weight  # HF: kept


class _Lit(pl.LightningModule):
    def __init__(self, base):
        super().__init__()
        self.model = copy.deepcopy(base)

    def training_step(self, batch, batch_idx):
        return self.model(input_ids=batch[0], labels=batch[0]).loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-2)


def test_callback_fit_exports_replicated_merged_and_adapter(llama, tmp_path):
    callback = PEFTCallback(lp.LoraConfig(**REPLICATION), export_dir=str(tmp_path / "export"))
    module = _Lit(llama)
    quiet_trainer(max_steps=2, callbacks=[callback]).fit(module, token_loader())
    model = module.model.eval()
    layers = model.base_model.model.model.layers
    assert layers[1].mlp.up_proj.weight is layers[2].mlp.up_proj.weight  # the model in memory still shares them
    x = ids()
    expected = logits(model, x)
    merged = transformers.AutoModelForCausalLM.from_pretrained(callback.merged_dir).eval()
    assert merged.config.num_hidden_layers == 4
    torch.testing.assert_close(logits(merged, x), expected, rtol=1e-5, atol=1e-5)
    hf = quiet(peft.PeftModel.from_pretrained, copy.deepcopy(llama), callback.adapter_dir).eval()
    torch.testing.assert_close(logits(hf, x), expected)
