"""LoRA on tied embeddings (GPT-2's `wte` / Llama's `embed_tokens` with `tie_word_embeddings=True`, or the tied
`lm_head`): merging must give the trained model's logits. HF PEFT 0.21 merges into the shared Parameter, so the
output layer changes too; here the merged layer gets its own copy (the other keeps the weight it was trained with),
the merged model's config says `tie_word_embeddings=False` so `save_pretrained` / `from_pretrained` keep the two
apart, and `unmerge_adapter()` puts the shared Parameter itself back."""

from __future__ import annotations

import copy
import warnings

import lightning.pytorch as pl
import peft
import pytest
import torch
from helpers import ids, logits, perturb, quiet, quiet_trainer, tiny_gpt2, tiny_llama, token_loader
from transformers import AutoModelForCausalLM

import lightning_peft as lp
from lightning_peft.lightning import PEFTCallback

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"), pytest.mark.filterwarnings("ignore::FutureWarning")]

CASES = {
    "gpt2-wte": (lambda: tiny_gpt2(), dict(target_modules=["wte", "c_attn"], fan_in_fan_out=True)),
    "llama-embed_tokens": (
        lambda: tiny_llama(tie_word_embeddings=True),
        dict(target_modules=["embed_tokens", "q_proj"]),
    ),
    "gpt2-lm_head": (lambda: tiny_gpt2(), dict(target_modules=["lm_head"])),
}


def _embeddings(model):
    """(input embedding weight Parameter, output embedding weight Parameter) under any tuner layer."""
    inner, outer = model.get_input_embeddings(), model.get_output_embeddings()
    return getattr(inner, "base_layer", inner).weight, getattr(outer, "base_layer", outer).weight


@pytest.mark.parametrize("case", sorted(CASES))
def test_merge_and_unload_keeps_the_trained_logits_where_hf_peft_does_not(case, tmp_path):
    make, kwargs = CASES[case]
    base = make()
    assert base.config.tie_word_embeddings and _embeddings(base)[0] is _embeddings(base)[1]
    x = ids()

    ours = lp.get_peft_model(copy.deepcopy(base), lp.LoraConfig(r=4, **kwargs))
    perturb(ours)
    hf = quiet(peft.get_peft_model, copy.deepcopy(base), peft.LoraConfig(r=4, **kwargs))
    hf.load_state_dict(ours.state_dict())  # the same adapter weights (same module names and keys)
    trained = logits(ours, x)
    torch.testing.assert_close(logits(hf, x), trained)

    # merge_adapter / unmerge_adapter: the tie comes back exactly (the shared Parameter itself, its values unchanged)
    shared = _embeddings(ours.base_model.model)[0]
    original = shared.detach().clone()
    ours.merge_adapter()
    torch.testing.assert_close(logits(ours, x), trained, atol=1e-5, rtol=0)
    assert _embeddings(ours.base_model.model)[0] is not _embeddings(ours.base_model.model)[1]
    ours.unmerge_adapter()
    inner, outer = _embeddings(ours.base_model.model)
    assert inner is outer is shared and torch.equal(shared, original)
    torch.testing.assert_close(logits(ours, x), trained, atol=1e-5, rtol=0)

    merged = ours.merge_and_unload()
    hf_merged = quiet(hf.merge_and_unload)
    ours_error = (logits(merged, x) - trained).abs().max().item()
    hf_error = (logits(hf_merged, x) - trained).abs().max().item()
    assert ours_error < 1e-5, ours_error
    assert hf_error > 1.0, f"HF PEFT's merge of a tied weight was expected to be wrong; error {hf_error}"
    inner, outer = _embeddings(merged)
    assert inner is not outer and torch.equal(_embeddings(merged)[0 if case == "gpt2-lm_head" else 1], original)
    assert merged.config.tie_word_embeddings is False and not merged.all_tied_weights_keys

    # saved and reloaded with transformers: still untied, still the trained logits
    merged.save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert _embeddings(reloaded)[0] is not _embeddings(reloaded)[1]
    torch.testing.assert_close(logits(reloaded, x), trained, atol=1e-5, rtol=0)


def test_untied_model_is_left_as_it_was():
    """A model without tied embeddings merges in place as before (no copy) and keeps its config."""
    base = tiny_llama(tie_word_embeddings=False)
    model = lp.get_peft_model(base, lp.LoraConfig(r=4, target_modules=["embed_tokens"]))
    perturb(model)
    weight = model.base_model.model.get_input_embeddings().base_layer.weight
    model.merge_adapter()
    assert model.base_model.model.get_input_embeddings().base_layer.weight is weight
    merged = model.merge_and_unload()
    assert merged.config.tie_word_embeddings is False and merged.get_input_embeddings().weight is weight


# ---- through PEFTCallback: the merged export reloads with the trained model's logits ---------------------------
class LitLM(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.model = tiny_gpt2(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)

    def training_step(self, batch, batch_idx):
        (input_ids,) = batch
        return self.model(input_ids=input_ids, labels=input_ids).loss

    def configure_optimizers(self):
        # a large step, so that the embedding adapter (A starts at zero) moves and HF PEFT's merge error shows
        return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=5.0)


def test_peft_callback_merged_export_of_a_tied_embedding(tmp_path):
    config = lp.LoraConfig(r=4, target_modules=["wte", "c_attn"], fan_in_fan_out=True)
    callback = PEFTCallback(config, export_dir=str(tmp_path))
    quiet_trainer(max_steps=3, callbacks=[callback], enable_checkpointing=False).fit(LitLM(), token_loader())
    x = ids()
    fresh = dict(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    trained = logits(lp.PeftModel.from_pretrained(tiny_gpt2(**fresh), callback.adapter_dir).eval(), x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        merged = AutoModelForCausalLM.from_pretrained(callback.merged_dir).eval()
        hf_merged = peft.PeftModel.from_pretrained(tiny_gpt2(**fresh), callback.adapter_dir).merge_and_unload()
    assert merged.get_input_embeddings().weight is not merged.get_output_embeddings().weight
    torch.testing.assert_close(logits(merged, x), trained, atol=1e-5, rtol=0)
    hf_error = (logits(hf_merged.eval(), x) - trained).abs().max().item()
    assert hf_error > 0.1, f"the trained embedding adapter should make HF PEFT's merge visibly wrong; error {hf_error}"
