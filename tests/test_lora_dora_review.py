"""Review of use_dora / use_rslora against HF PEFT 0.21: the one-node DoRA gradients checked numerically, DoRA over
Conv2d with stride / padding and over an Embedding with padding_idx in training (dropout masks, gradients), DoRA with
layer_replication merged and unmerged, and LoRA over a scaled word embedding (Gemma 3's `embed_scale`)."""

from __future__ import annotations

import copy

import peft
import pytest
import torch
from helpers import ids, logits, perturb, quiet, save_and_reload, tiny_llama
from torch import nn

import lightning_peft as lp
from lightning_peft.tuners.lora import dora

CLOSE = dict(atol=2e-5, rtol=2e-5)


def test_one_node_function_passes_gradcheck_in_double():
    """Every input's gradient of `_DoraLinearFunction` (the norm is an input here: detached by design), with and
    without bias."""
    gen = torch.Generator().manual_seed(0)

    def leaf(*shape, offset=0.0):
        return (torch.randn(*shape, generator=gen, dtype=torch.double) + offset).requires_grad_()

    result, x, A, B = leaf(3, 5), leaf(3, 4), leaf(2, 4), leaf(5, 2)
    magnitude, bias = leaf(5, offset=2.0), leaf(5)
    inv_norm = torch.rand(5, generator=gen, dtype=torch.double) + 0.5
    for b in (bias, None):
        assert torch.autograd.gradcheck(dora._DoraLinearFunction.apply, (result, x, A, B, magnitude, inv_norm, b, 0.7))


class _ConvEmbed(nn.Module):
    """A strided / padded Conv2d pair (one without bias, a non-square kernel) and an Embedding with padding_idx."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 6, 3, stride=2, padding=1)
        self.c2 = nn.Conv2d(6, 4, (3, 2), stride=(1, 2), padding=(2, 0), bias=False)
        self.emb = nn.Embedding(10, 4, padding_idx=0)

    def forward(self, x: dict) -> torch.Tensor:
        return self.c2(self.c1(x["image"])).sum((2, 3)) + self.emb(x["ids"]).sum(1)


@pytest.fixture(scope="module")
def conv_embed():
    torch.manual_seed(0)
    return _ConvEmbed().eval()


def test_conv_stride_padding_and_padding_idx_train_as_hf(conv_embed, tmp_path):
    kwargs = dict(target_modules=["c1", "c2", "emb"], use_dora=True, lora_dropout=0.3)
    hf, mine = save_and_reload(peft, lp, conv_embed, "LoraConfig", kwargs, tmp_path, silence=True)
    x = {"image": torch.randn(2, 3, 9, 9, generator=torch.Generator().manual_seed(1)), "ids": torch.tensor([[0, 3, 9]])}
    torch.testing.assert_close(mine(x), hf(x), **CLOSE)
    runs = {}
    for name, model in (("hf", hf), ("ours", mine)):
        model.train()
        for n, p in model.named_parameters():
            p.requires_grad_("lora_" in n)
        torch.manual_seed(5)  # the same dropout masks
        out = model(x)
        out.square().sum().backward()
        runs[name] = (out.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    torch.testing.assert_close(runs["ours"][0], runs["hf"][0], **CLOSE)
    assert runs["ours"][1].keys() == runs["hf"][1].keys() and any("magnitude" in n for n in runs["hf"][1])
    for n, g in runs["hf"][1].items():
        torch.testing.assert_close(runs["ours"][1][n], g, atol=2e-5, rtol=1e-4, msg=n)
    mine.eval()
    before = mine(x).detach()
    merged = mine.merge_and_unload()
    torch.testing.assert_close(merged(x), before, **CLOSE)


def test_dora_with_layer_replication_merges_and_unmerges(tmp_path):
    """Replicated layers share their base weights: merging one copy's DoRA adapter must not scale the other's."""
    base, x = tiny_llama(), ids()
    kwargs = dict(target_modules=["q_proj", "v_proj"], use_dora=True, layer_replication=[[0, 2], [1, 2]])
    hf, mine = save_and_reload(peft, lp, base, "LoraConfig", kwargs, tmp_path, silence=True)
    before = logits(mine, x)
    torch.testing.assert_close(before, logits(hf, x), **CLOSE)
    mine.merge_adapter()
    torch.testing.assert_close(logits(mine, x), before, **CLOSE)
    mine.unmerge_adapter()
    torch.testing.assert_close(logits(mine, x), before, **CLOSE)
    torch.testing.assert_close(logits(mine.merge_and_unload(), x), before, **CLOSE)


class _ScaledEmbedding(nn.Embedding):
    """transformers' Gemma3TextScaledWordEmbedding, in short: the lookup times a scalar buffer."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.register_buffer("embed_scale", torch.tensor(3.0), persistent=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return super().forward(ids) * self.embed_scale.to(self.weight.dtype)


class _ScaledModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = _ScaledEmbedding(10, 6)
        self.out = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.emb(x))


def test_lora_on_a_scaled_word_embedding_equals_hf(tmp_path):
    """Before: the adapter's rows were added unscaled (logits off by ~1 against HF PEFT and against the merged model,
    whose merged rows the base layer does scale)."""
    torch.manual_seed(0)
    base = _ScaledModel().eval()
    tokens = torch.tensor([[0, 1, 2, 9], [4, 4, 5, 6]])
    kwargs = dict(target_modules=["emb"])
    hf, mine = save_and_reload(peft, lp, base, "LoraConfig", kwargs, tmp_path / "hf", silence=True)
    with torch.no_grad():
        expected = hf(tokens)
        torch.testing.assert_close(mine(tokens), expected, **CLOSE)
        # mixed batch: row 0 with the adapter, row 1 the base
        mixed = mine(tokens, adapter_names=["default", "__base__"])
        torch.testing.assert_close(mixed[0], expected[0], **CLOSE)
        torch.testing.assert_close(mixed[1], base(tokens)[1], **CLOSE)
        torch.testing.assert_close(copy.deepcopy(mine).merge_and_unload()(tokens), expected, **CLOSE)
    ours = quiet(lp.get_peft_model, copy.deepcopy(base), lp.LoraConfig(**kwargs)).eval()
    perturb(ours)
    ours.save_pretrained(tmp_path / "ours")
    read_by_hf = quiet(peft.PeftModel.from_pretrained, copy.deepcopy(base), tmp_path / "ours").eval()
    with torch.no_grad():
        torch.testing.assert_close(read_by_hf(tokens), ours(tokens), **CLOSE)
