"""LoRA+ (`create_loraplus_optimizer`) against HF PEFT 0.21's on tiny models: the same parameter groups (members by
name, learning rates, weight decays) and the same steps; its refusals; `loraplus_optimizer` from Lightning's
`configure_optimizers` with a PEFTCallback; `tuner.optim.loraplus_lr_ratio` in the app."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import lightning.pytorch as pl
import peft
import pytest
import torch
from helpers import ids, perturb, quiet, quiet_trainer, tiny_bert_classifier, tiny_gpt2, token_loader
from peft.optimizers import create_loraplus_optimizer as hf_create

import lightning_peft as lp
from lightning_peft.lightning import PEFTCallback, loraplus_optimizer
from lightning_peft.optimizers import create_loraplus_optimizer

# every group has members: lora_A / a saved head's weight (A), a LoRA embedding (embedding), lora_B weights
# (B), biases and layer-norm weights of saved modules (B without decay)
BERT = dict(
    task_type="SEQ_CLS",
    target_modules=["query", "value", "word_embeddings"],
    modules_to_save=["embeddings.LayerNorm"],
    init_lora_weights=False,
)


@pytest.fixture(scope="module")
def pair():
    """(ours, HF's): the same tiny BERT classifier with the same adapter values."""
    base = tiny_bert_classifier()
    hf = quiet(peft.get_peft_model, copy.deepcopy(base), peft.LoraConfig(**BERT))
    perturb(hf)
    ours = lp.get_peft_model(copy.deepcopy(base), lp.LoraConfig(**BERT))
    ours.load_state_dict(hf.state_dict())
    return ours, hf


def _groups(optimizer, model):
    names = {id(p): n for n, p in model.named_parameters()}
    return [(g["lr"], g["weight_decay"], [names[id(p)] for p in g["params"]]) for g in optimizer.param_groups]


def test_param_groups_are_hf_peft_groups(pair):
    ours, hf = pair
    kwargs = dict(lr=1e-3, loraplus_lr_ratio=16, loraplus_weight_decay=0.1, loraplus_lr_embedding=1e-4)
    mine = _groups(create_loraplus_optimizer(ours, torch.optim.AdamW, **kwargs), ours)
    theirs = _groups(hf_create(hf, torch.optim.AdamW, **kwargs), hf)
    assert mine == theirs
    assert [(lr, wd) for lr, wd, _ in mine] == [(1e-3, 0.1), (1e-4, 0.1), (0.016, 0.1), (0.016, 0.0)]
    assert all(members for _, _, members in mine)  # every rule is exercised
    assert any("lora_B" in n for n in mine[2][2]) and any(n.endswith("bias") for n in mine[3][2])


def test_steps_equal_hf_peft_steps(pair):
    ours, hf = (copy.deepcopy(m).train() for m in pair)
    kwargs = dict(lr=1e-2, loraplus_lr_ratio=16, loraplus_weight_decay=0.05, betas=(0.8, 0.99))
    optimizers = [
        create_loraplus_optimizer(ours, torch.optim.AdamW, **kwargs),
        hf_create(hf, torch.optim.AdamW, **kwargs),
    ]
    labels = torch.tensor([0, 2])
    for _ in range(2):
        for model, optimizer in zip((ours, hf), optimizers):
            torch.manual_seed(0)
            model(input_ids=ids(), labels=labels).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    after = dict(hf.named_parameters())
    moved = 0
    for name, p in ours.named_parameters():
        torch.testing.assert_close(p, after[name], msg=name)
        moved += p.requires_grad and not torch.equal(p, dict(pair[0].named_parameters())[name])
    assert moved > 0


def test_refusals_change_nothing():
    model = lp.get_peft_model(tiny_gpt2(), lp.LoraConfig(target_modules=["c_attn"], fan_in_fan_out=True))
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    for bad, error, match in (
        (dict(lr=0), ValueError, "lr must be a finite number > 0"),
        (dict(lr="1e-3"), TypeError, "lr must be a number"),
        (dict(loraplus_lr_ratio=float("nan")), ValueError, "loraplus_lr_ratio must be a finite number > 0"),
        (dict(loraplus_lr_ratio=-16), ValueError, "loraplus_lr_ratio"),
        (dict(loraplus_weight_decay=-1), ValueError, "loraplus_weight_decay must be a number >= 0"),
        (dict(loraplus_lr_embedding=0), ValueError, "loraplus_lr_embedding"),
    ):
        kwargs = {"lr": 1e-3, "loraplus_lr_ratio": 16, **bad}
        with pytest.raises(error, match=match):
            create_loraplus_optimizer(model, torch.optim.AdamW, **kwargs)
    with pytest.raises(TypeError, match="optimizer_cls must be a torch.optim.Optimizer class"):
        create_loraplus_optimizer(model, "AdamW", lr=1e-3, loraplus_lr_ratio=16)
    with pytest.raises(TypeError):  # lr and the ratio are keyword-only, as in HF PEFT
        create_loraplus_optimizer(model, torch.optim.AdamW, 1e-3, 16)
    frozen = lp.get_peft_model(tiny_gpt2(), lp.LoraConfig(target_modules=["c_attn"], inference_mode=True))
    with pytest.raises(ValueError, match="no parameter of PeftModel.* requires grad"):
        create_loraplus_optimizer(frozen, torch.optim.AdamW, lr=1e-3, loraplus_lr_ratio=16)
    with pytest.raises(ValueError, match="no trainable LoRA parameter"):
        loraplus_optimizer(tiny_gpt2().train(), lr=1e-3, loraplus_lr_ratio=16)  # all of it trains, no adapter
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags


class _LM(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.model = tiny_gpt2()

    def training_step(self, batch, batch_idx):
        (input_ids,) = batch
        return self.model(input_ids=input_ids, labels=input_ids).loss

    def configure_optimizers(self):
        return loraplus_optimizer(self, lr=1e-3, loraplus_lr_ratio=8, loraplus_weight_decay=0.01)


def test_loraplus_optimizer_in_configure_optimizers_with_the_callback(tmp_path):
    module = _LM()
    callback = PEFTCallback(
        lp.LoraConfig(target_modules=["c_attn", "wte"], fan_in_fan_out=True), export_dir=tmp_path, exact_resume=False
    )
    trainer = quiet_trainer(max_steps=2, callbacks=[callback], default_root_dir=tmp_path)
    before = {n: p.detach().clone() for n, p in module.named_parameters() if "lora_B" in n}
    trainer.fit(module, token_loader(rows=4))
    groups = _groups(trainer.optimizers[0], module)
    assert [(lr, wd) for lr, wd, _ in groups] == [(1e-3, 0.01), (1e-6, 0.01), (8e-3, 0.01), (8e-3, 0.0)]
    assert {n for n in groups[2][2]} == {n for n, p in module.named_parameters() if "lora_B" in n and ".wte." not in n}
    assert groups[1][2] and all(".wte." in n for n in groups[1][2])
    assert not before  # the adapter came with the callback, at setup: after __init__, before configure_optimizers
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()


# ---- the app ----------------------------------------------------------------------------------------
def test_app_loraplus_lr_ratio_reaches_the_recipe_optimizer():
    from test_app import compose

    from lightning_peft.app.schema import ConfigValueError, UnknownKeyError, check_overrides, check_values
    from lightning_peft.recipes.classification import SequenceClassificationModule

    cfg = compose(["tuner.optim.loraplus_lr_ratio=16", "tuner.optim.lr=1e-3"])
    assert cfg.recipe.module.loraplus_lr_ratio == 16
    assert compose([]).recipe.module.loraplus_lr_ratio is None  # off by default
    assert compose(["tuner=ia3"]).recipe.module.loraplus_lr_ratio is None
    for bad in ("0", "-2", "nan", "'x'"):
        with pytest.raises(ConfigValueError, match="tuner.optim.loraplus_lr_ratio=.*a finite number > 0"):
            check_values(compose([f"tuner.optim.loraplus_lr_ratio={bad}"]))
    with pytest.raises(UnknownKeyError, match="tuner.optim.loraplus_lr_ratio"):
        check_overrides(["tuner=ia3", "tuner.optim.loraplus_lr_ratio=16"])  # LoRA+ needs LoRA
    peft_model = lp.get_peft_model(tiny_bert_classifier(), lp.LoraConfig(task_type="SEQ_CLS"))
    for ratio, lrs in ((16, [1e-3, 1e-6, 0.016, 0.016]), (None, [1e-3])):
        module = SequenceClassificationModule(peft_model, num_labels=3, learning_rate=1e-3, loraplus_lr_ratio=ratio)
        module.trainer = SimpleNamespace(estimated_stepping_batches=10)
        optimizer = module.configure_optimizers()["optimizer"]
        assert [g["initial_lr"] for g in optimizer.param_groups] == lrs  # the warm-up scales "lr"
