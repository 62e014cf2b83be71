"""Review fixes against the installed HF `peft` 0.21 (issue 13): `target_modules="all-linear"` for LoRA and IA3 (which
modules, the saved `target_modules`, IA3's feedforward modules), and `save_embedding_layers` files both ways (the base
embedding tensors HF PEFT saves, restored on load and strictly checked)."""

from __future__ import annotations

import copy
import json
import warnings

import peft
import pytest
import torch
from helpers import (
    ids,
    load_fails,
    logits,
    perturb,
    quiet,
    saved_shapes,
    tiny_bert_classifier,
    tiny_gpt2,
    tiny_llama,
    tiny_t5,
)
from safetensors.torch import load_file, save_file
from torch import nn

import lightning_peft as lp


class Toy(nn.Module):
    """The reviewer's model: `proj` names a Linear, a Conv2d and an Embedding; a Linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Module(), nn.Module(), nn.Module()
        self.a.proj = nn.Linear(8, 8)
        self.b.proj = nn.Conv2d(8, 8, 1)
        self.c.proj = nn.Embedding(16, 8)
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a.proj(self.c.proj(x))
        h = h + self.b.proj(h.transpose(1, 2).unsqueeze(-1)).squeeze(-1).transpose(1, 2)
        return self.head(h)


def toy() -> nn.Module:
    torch.manual_seed(0)
    return Toy().eval()


BUILD = {"gpt2": tiny_gpt2, "llama": tiny_llama, "t5": tiny_t5, "bert": tiny_bert_classifier, "toy": toy}


@pytest.fixture(scope="module")
def bases():
    return {name: build() for name, build in BUILD.items()}


def _x(family: str):
    if family == "t5":
        return {"input_ids": ids(), "decoder_input_ids": ids(seed=2, length=5)}
    return ids(length=6).clamp(max=15) if family == "toy" else ids()


def _requires_grad(model: nn.Module) -> dict[str, bool]:
    return {n: p.requires_grad for n, p in model.named_parameters()}


# ---- "all-linear" -------------------------------------------------------------------------------------------------
CASES = [
    ("gpt2", "LoraConfig", None),
    ("gpt2", "IA3Config", None),
    ("llama", "LoraConfig", None),
    ("llama", "IA3Config", None),
    ("t5", "LoraConfig", None),  # 32 linears: HF PEFT condenses the saved list to {q, k, v, o, wi, wo}
    ("t5", "IA3Config", None),  # ... but not IA3's
    ("bert", "LoraConfig", None),  # the classifier is a target ...
    ("bert", "LoraConfig", "SEQ_CLS"),  # ... but not for SEQ_CLS
    ("bert", "IA3Config", "SEQ_CLS"),
    ("toy", "LoraConfig", None),
]


@pytest.mark.parametrize(("family", "tuner", "task_type"), CASES, ids=[f"{f}-{t[:4]}-{k}" for f, t, k in CASES])
def test_all_linear_targets_the_modules_hf_peft_targets(bases, family, tuner, task_type):
    """The same targeted modules, saved target_modules (and IA3 feedforward modules), flags and logits as HF PEFT."""
    kwargs = dict(target_modules="all-linear", task_type=task_type)
    theirs = quiet(peft.get_peft_model, copy.deepcopy(bases[family]), getattr(peft, tuner)(**kwargs))
    ours = lp.get_peft_model(copy.deepcopy(bases[family]), getattr(lp, tuner)(**kwargs))
    assert ours.targeted_module_names == theirs.targeted_module_names
    our_config, their_config = ours.peft_config["default"], theirs.peft_config["default"]
    assert set(our_config.target_modules) == set(their_config.target_modules)
    if tuner == "IA3Config":
        assert our_config.feedforward_modules == their_config.feedforward_modules
        ff = {n for n, m in ours.named_modules() if getattr(m, "is_feedforward", False)}
        assert ff == {n for n, m in theirs.named_modules() if getattr(m, "is_feedforward", False)} and ff
    assert _requires_grad(ours) == _requires_grad(theirs)
    perturb(theirs)
    ours.load_state_dict(theirs.state_dict())
    torch.testing.assert_close(logits(ours, _x(family)), logits(theirs, _x(family)), atol=1e-5, rtol=1e-5)


def test_all_linear_on_the_toy_model_skips_conv2d_and_embedding_and_round_trips(bases, tmp_path):
    """The reviewer's repro: only a.proj and head (HF PEFT's set), full module paths in the saved config, and files
    that both libraries load into the same logits."""
    config = dict(target_modules="ALL-LINEAR", r=2)  # any case, as HF PEFT
    ours = lp.get_peft_model(copy.deepcopy(bases["toy"]), lp.LoraConfig(**config))
    assert ours.targeted_module_names == ["a.proj", "head"]
    inner = ours.get_base_model()
    assert isinstance(inner.b.proj, nn.Conv2d) and isinstance(inner.c.proj, nn.Embedding)
    perturb(ours)
    ours.save_pretrained(tmp_path / "ours")
    theirs = quiet(peft.get_peft_model, copy.deepcopy(bases["toy"]), peft.LoraConfig(**config))
    theirs.save_pretrained(tmp_path / "theirs")
    saved = [json.loads((tmp_path / d / "adapter_config.json").read_text()) for d in ("ours", "theirs")]
    assert sorted(saved[0]["target_modules"]) == sorted(saved[1]["target_modules"]) == ["a.proj", "head"]
    assert saved_shapes(tmp_path / "ours") == saved_shapes(tmp_path / "theirs")
    read = quiet(peft.PeftModel.from_pretrained, copy.deepcopy(bases["toy"]), tmp_path / "ours")
    torch.testing.assert_close(logits(read, _x("toy")), logits(ours, _x("toy")), atol=1e-6, rtol=1e-6)


def test_all_linear_second_adapter_targets_the_wrapped_layers_as_hf_peft(bases):
    """With a first adapter in place, "all-linear" counts the tuner's Linear layers (not their lora_A / lora_B)."""
    models = []
    for lib in (peft, lp):
        model = quiet(lib.get_peft_model, copy.deepcopy(bases["gpt2"]), lib.LoraConfig(target_modules=["c_attn"]))
        quiet(model.add_adapter, "other", lib.LoraConfig(target_modules="all-linear"))
        models.append(model)
    theirs, ours = models
    assert set(ours.peft_config["other"].target_modules) == set(theirs.peft_config["other"].target_modules)
    assert ours.targeted_module_names == theirs.targeted_module_names
    assert _requires_grad(ours) == _requires_grad(theirs)


def test_ia3_all_linear_file_from_hf_peft_loads(bases, tmp_path):
    """HF PEFT saves full target paths with the short feedforward default ("mlp.c_proj"); that file (which HF peft
    0.21 itself refuses to load) loads here, and so does ours, with the same feedforward layers and logits."""
    theirs = quiet(peft.get_peft_model, copy.deepcopy(bases["gpt2"]), peft.IA3Config(target_modules="all-linear"))
    perturb(theirs)
    theirs.save_pretrained(tmp_path / "theirs")
    ours = lp.PeftModel.from_pretrained(copy.deepcopy(bases["gpt2"]), tmp_path / "theirs")
    ff = {n for n, m in ours.named_modules() if getattr(m, "is_feedforward", False)}
    assert ff == {n for n, m in theirs.named_modules() if getattr(m, "is_feedforward", False)}
    torch.testing.assert_close(logits(ours, ids()), logits(theirs, ids()), atol=1e-5, rtol=1e-5)
    ours.save_pretrained(tmp_path / "ours")
    again = lp.PeftModel.from_pretrained(copy.deepcopy(bases["gpt2"]), tmp_path / "ours")
    torch.testing.assert_close(logits(again, ids()), logits(theirs, ids()), atol=1e-5, rtol=1e-5)
    # a feedforward name that ends no target is still refused, before anything is built
    base = copy.deepcopy(bases["gpt2"])
    with pytest.raises(ValueError, match=r"feedforward_modules must be a subset of target_modules; \['nope'\]"):
        lp.get_peft_model(base, lp.IA3Config(target_modules="all-linear", feedforward_modules=["nope"]))
    assert not any("ia3" in n for n, _ in base.named_parameters())


# ---- save_embedding_layers ----------------------------------------------------------------------------------------
EMBEDDING_CASES = {  # (family, LoRA config, whether HF PEFT saves the (untied) output layer too)
    "gpt2": ("gpt2", dict(target_modules=["c_attn"], fan_in_fan_out=True), True),  # tied wte / lm_head, untargeted
    "llama": ("llama", dict(target_modules=["q_proj"]), True),  # untied, untargeted: both
    # targeted: the wrapped layer's base_layer only (lm_head left as it is is not saved)
    "llama-embed_tokens": ("llama", dict(target_modules=["q_proj", "embed_tokens"]), False),
    "gpt2-wte": ("gpt2", dict(target_modules=["c_attn", "wte"], fan_in_fan_out=True), True),  # not HF's name
}


def _shift_embeddings(model: nn.Module, output_too: bool) -> None:
    """Change the base's embedding weights (as a resize / training would), so restoring them shows in the logits."""
    base = model.get_base_model()
    with torch.no_grad():
        for layer in (base.get_input_embeddings(), base.get_output_embeddings())[: 2 if output_too else 1]:
            weight = getattr(layer, "base_layer", layer).weight
            weight.add_(0.3 * torch.randn(weight.shape, generator=torch.Generator().manual_seed(weight.shape[0])))


@pytest.mark.parametrize("case", list(EMBEDDING_CASES))
def test_save_embedding_layers_files_round_trip_with_hf_peft(bases, tmp_path, case):
    """Ours writes the key set HF PEFT writes; each library loads the other's file, base embeddings restored."""
    family, config, output_too = EMBEDDING_CASES[case]
    written = {}
    for lib in (peft, lp):
        model = quiet(lib.get_peft_model, copy.deepcopy(bases[family]), lib.LoraConfig(**config))
        perturb(model)
        _shift_embeddings(model, output_too)
        quiet(model.save_pretrained, tmp_path / lib.__name__, save_embedding_layers=True)
        written[lib] = model
    assert saved_shapes(tmp_path / "lightning_peft") == saved_shapes(tmp_path / "peft")
    assert any("lora" not in k for k in saved_shapes(tmp_path / "peft"))  # the base embedding tensors are there
    for writer, reader in ((peft, lp), (lp, peft)):
        read = quiet(reader.PeftModel.from_pretrained, copy.deepcopy(bases[family]), tmp_path / writer.__name__)
        torch.testing.assert_close(logits(read, ids()), logits(written[writer], ids()), atol=1e-5, rtol=1e-5)


def test_save_embedding_layers_auto_and_non_transformers_warnings(bases, tmp_path):
    """As HF PEFT: "auto" saves the embeddings when the config targets embed_tokens / lm_head (with its warning), and
    True on a model without get_input_embeddings warns that the embeddings could not be identified."""
    model = lp.get_peft_model(copy.deepcopy(bases["llama"]), lp.LoraConfig(target_modules=["q_proj", "lm_head"]))
    with pytest.warns(UserWarning, match="Setting `save_embedding_layers` to `True` as embedding layers found"):
        model.save_pretrained(tmp_path / "auto")
    assert "base_model.model.lm_head.base_layer.weight" in saved_shapes(tmp_path / "auto")
    net = lp.get_peft_model(copy.deepcopy(bases["toy"]), lp.LoraConfig(target_modules=["head"]))
    with pytest.warns(UserWarning, match="Could not identify embedding layer"):
        net.save_pretrained(tmp_path / "toy", save_embedding_layers=True)
    assert all("lora" in k for k in saved_shapes(tmp_path / "toy"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning when nothing is asked for
        net.save_pretrained(tmp_path / "toy2")


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda t: t["base_model.model.transformer.wte.weight"][:-1].clone(), "shape mismatches: .*wte.weight"),
        (lambda t: t["base_model.model.lm_head.weight"].to(torch.int32), "integer or bool tensors"),
    ],
    ids=["shape", "dtype"],
)
def test_saved_embedding_tensors_are_checked_strictly(bases, tmp_path, edit, match):
    """A base embedding tensor of the wrong shape or dtype is refused and the base model left untouched."""
    family, config, _ = EMBEDDING_CASES["gpt2"]
    theirs = quiet(peft.get_peft_model, copy.deepcopy(bases[family]), peft.LoraConfig(**config))
    theirs.save_pretrained(tmp_path, save_embedding_layers=True)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    key = "base_model.model.transformer.wte.weight" if "shape" in match else "base_model.model.lm_head.weight"
    tensors[key] = edit(tensors)
    save_file({k: v.contiguous() for k, v in tensors.items()}, tmp_path / "adapter_model.safetensors")
    load_fails(copy.deepcopy(bases[family]), tmp_path, match)


def test_all_linear_without_linear_layers_is_refused_as_hf_peft_does():
    net = nn.Sequential(nn.Conv2d(3, 3, 1), nn.Embedding(4, 3))
    for lib in (peft, lp):
        with pytest.raises(lib.NoMatchingPeftModuleError):
            quiet(lib.get_peft_model, copy.deepcopy(net), lib.LoraConfig(target_modules="all-linear"))
    with pytest.raises(lp.NoMatchingPeftModuleError, match="'all-linear' found no linear layer"):
        lp.get_peft_model(net, lp.IA3Config(target_modules="all-linear"))
    assert all(type(m) in (nn.Sequential, nn.Conv2d, nn.Embedding) for m in net.modules())
