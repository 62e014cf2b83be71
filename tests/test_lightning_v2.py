"""Issue 14 (Lightning layer v2), items 1 / 3 / 4 / 5 on a real Trainer: several adapters (one per model_attr,
a second fit adding an adapter), the module after fit (never merged in place, adapter checkpoints, best adapter
tested), export="best" | "last", and checkpoints that carry the adapter config."""

from __future__ import annotations

import os
import warnings
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("lightning")
import lightning.pytorch as pl  # noqa: E402
from lightning.pytorch.callbacks import ModelCheckpoint  # noqa: E402
from lightning.pytorch.loggers import Logger  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

import lightning_peft as lp  # noqa: E402
from lightning_peft.lightning import PEFTCallback, PEFTMixin  # noqa: E402
from lightning_peft.lightning._state import checkpoint_adapter_configs, get_states  # noqa: E402
from tests.helpers import GPT2_LORA, ids, quiet_trainer, tiny_gpt2, token_loader  # noqa: E402

CFG_A = dict(r=4, lora_alpha=8, **GPT2_LORA)
CFG_B = dict(r=2, lora_alpha=4, **GPT2_LORA)


class Recorder(Logger):
    """Keeps every logged metric (the parameter counts of each fit)."""

    def __init__(self) -> None:
        super().__init__()
        self.metrics: list[dict] = []

    @property
    def name(self) -> str:
        return "recorder"

    @property
    def version(self) -> int:
        return 0

    def log_hyperparams(self, *args, **kwargs) -> None:
        pass

    def log_metrics(self, metrics, step=None) -> None:
        self.metrics.append(dict(metrics))


class LitTwo(pl.LightningModule):
    """Two models: `model` and `other`; val_loss grows with the epoch, so the best checkpoint is epoch 0's."""

    def __init__(self) -> None:
        super().__init__()
        self.model = tiny_gpt2(seed=0)
        self.other = tiny_gpt2(seed=1)

    def training_step(self, batch, batch_idx):
        x = batch[0]
        return self.model(input_ids=x, labels=x).loss + self.other(input_ids=x, labels=x).loss

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", float(self.current_epoch))

    def test_step(self, batch, batch_idx):
        x = batch[0]
        self.log("test_loss", self.model(input_ids=x, labels=x).loss)

    def configure_optimizers(self):
        return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=0.5)


class LitMixin(PEFTMixin, LitTwo):
    def __init__(self) -> None:
        super().__init__()
        self.peft_config = lp.LoraConfig(**CFG_A)


def adapter_tensors(module: pl.LightningModule, attr: str) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items() if k.startswith(attr + ".")}


def fit(module, callbacks, root, **kwargs):
    trainer = quiet_trainer(default_root_dir=str(root), callbacks=callbacks, **kwargs)
    trainer.fit(module, token_loader(rows=4), token_loader(rows=2))
    return trainer


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One fit with two PEFTCallbacks (model / other), a ModelCheckpoint on val_loss; 3 epochs of 2 steps."""
    root = tmp_path_factory.mktemp("v2")
    module = LitTwo()
    a = PEFTCallback(lp.LoraConfig(**CFG_A), model_attr="model", export_dir=str(root / "a"))
    b = PEFTCallback(lp.LoraConfig(**CFG_B), model_attr="other", export_dir=str(root / "b"), exact_resume=False)
    checkpoint = ModelCheckpoint(dirpath=str(root / "ckpt"), monitor="val_loss", save_top_k=1, save_last=True)
    recorder = Recorder()
    trainer = fit(module, [a, b, checkpoint], root, max_epochs=3, logger=recorder, enable_checkpointing=True)
    return SimpleNamespace(
        root=root,
        module=module,
        a=a,
        b=b,
        checkpoint=checkpoint,
        trainer=trainer,
        recorder=recorder,
        last={**adapter_tensors(module, "model"), **adapter_tensors(module, "other")},
    )


def test_two_callbacks_on_two_models_both_apply_checkpoint_and_export(run):
    module = run.module
    assert isinstance(module.model, lp.PeftModel) and isinstance(module.other, lp.PeftModel)  # not merged in place
    assert set(get_states(module)) == {"model", "other"}
    best = torch.load(run.checkpoint.best_model_path, weights_only=True)["state_dict"]
    assert {k.split(".")[0] for k in best} == {"model", "other"}
    assert all("lora_" in k for k in best)  # adapter tensors only, of both models
    assert any(k.startswith("other.") and ".lora_A.default." in k for k in best)
    # distinct folders, each with its own adapter (r=4 / r=2)
    for cb, r in ((run.a, 4), (run.b, 2)):
        saved = load_file(os.path.join(cb.adapter_dir, "adapter_model.safetensors"))
        assert {t.shape[0] for k, t in saved.items() if "lora_A" in k} == {r}
        assert os.path.isfile(os.path.join(cb.merged_dir, "model.safetensors"))
    assert run.a.state_key != run.b.state_key
    # parameter counts of each model reach the loggers
    keys = set().union(*run.recorder.metrics)
    assert {"peft/trainable_params", "peft/other/trainable_params"} <= keys


def test_export_best_reads_the_best_checkpoint_and_leaves_the_module_alone(run):
    assert run.a.exported_from == run.checkpoint.best_model_path  # default "best": a ModelCheckpoint monitors
    best = torch.load(run.checkpoint.best_model_path, weights_only=True)["state_dict"]
    assert not torch.equal(
        best["model.base_model.model.transformer.h.0.attn.c_attn.lora_B.default.weight"],
        run.last["model.base_model.model.transformer.h.0.attn.c_attn.lora_B.default.weight"],
    )
    saved = load_file(os.path.join(run.a.adapter_dir, "adapter_model.safetensors"))
    key = "base_model.model.transformer.h.0.attn.c_attn.lora_B.weight"
    torch.testing.assert_close(
        saved[key], best["model.base_model.model.transformer.h.0.attn.c_attn.lora_B.default.weight"]
    )
    # merged/ is base + best adapter, and equals callback.merged_model
    reference = lp.PeftModel.from_pretrained(tiny_gpt2(seed=0), run.a.adapter_dir).eval()
    merged = tiny_gpt2(seed=0)
    merged.load_state_dict(load_file(os.path.join(run.a.merged_dir, "model.safetensors")), strict=False)
    with torch.no_grad():
        expected = reference(input_ids=ids()).logits
        torch.testing.assert_close(merged.eval()(input_ids=ids()).logits, expected, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(run.a.merged_model.eval()(input_ids=ids()).logits, expected, rtol=1e-4, atol=1e-4)
    # the module in memory: still the last adapter, nothing merged into its base
    now = {**adapter_tensors(run.module, "model"), **adapter_tensors(run.module, "other")}
    assert now.keys() == run.last.keys() and all(torch.equal(now[k], run.last[k]) for k in now)


def test_after_fit_the_module_checkpoints_and_tests_as_an_adapter_module(run, tmp_path):
    trainer, module = run.trainer, run.module
    path = tmp_path / "after.ckpt"
    trainer.save_checkpoint(path)
    saved = torch.load(path, weights_only=True)["state_dict"]
    assert saved.keys() == run.last.keys()  # adapter-only, not a merged full model
    trainer.test(module, token_loader(rows=2), ckpt_path=str(path), verbose=False)
    trainer.test(module, token_loader(rows=2), ckpt_path="best", verbose=False)  # the best adapter is back
    best = torch.load(run.checkpoint.best_model_path, weights_only=True)["state_dict"]
    now = adapter_tensors(module, "model")
    assert now and all(torch.equal(now[k], best[k]) for k in now)  # not vacuous: the adapter's tensors are there
    # no hidden copy of base weights on the states
    for state in get_states(module).values():
        assert not any(
            isinstance(v, torch.Tensor) or isinstance(v, dict) and any(isinstance(t, torch.Tensor) for t in v.values())
            for v in vars(state).values()
        )
    trainer.test(module, token_loader(rows=2), ckpt_path=str(path), verbose=False)  # back to the last adapter


def test_checkpoints_carry_the_config_and_load_through_one_call(run):
    configs = checkpoint_adapter_configs(run.checkpoint.best_model_path)
    assert configs["model"]["config"]["r"] == 4 and configs["other"]["config"]["r"] == 2
    assert configs["model"]["peft_type"] == "LORA" and configs["model"]["adapter_name"] == "default"
    loaded = PEFTCallback.load_from_checkpoint(LitTwo, run.checkpoint.best_model_path)
    best = torch.load(run.checkpoint.best_model_path, weights_only=True)["state_dict"]
    assert loaded.state_dict().keys() == best.keys()
    assert all(torch.equal(loaded.state_dict()[k], best[k]) for k in best)
    assert isinstance(loaded.other, lp.PeftModel) and loaded.other.peft_config["default"].r == 2


@pytest.mark.parametrize(
    "change, field",
    [(dict(lora_alpha=64), "lora_alpha"), (dict(r=8), "r"), (dict(target_modules=["c_proj"]), "target_modules")],
)
def test_resuming_with_a_changed_config_names_the_field_before_any_copy(run, tmp_path, change, field):
    module = LitTwo()
    a = PEFTCallback(lp.LoraConfig(**{**CFG_A, **change}), model_attr="model", export_dir=str(tmp_path / "a"))
    b = PEFTCallback(lp.LoraConfig(**CFG_B), model_attr="other", export_dir=str(tmp_path / "b"), exact_resume=False)
    trainer = quiet_trainer(default_root_dir=str(tmp_path), callbacks=[a, b], max_epochs=4)
    with pytest.raises(ValueError, match=rf"{field}: checkpoint .* vs now"):
        trainer.fit(module, token_loader(rows=4), ckpt_path=run.checkpoint.last_model_path)
    assert not torch.equal(
        module.other.state_dict()["base_model.model.transformer.h.0.attn.c_attn.lora_A.default.weight"],
        run.last["other.base_model.model.transformer.h.0.attn.c_attn.lora_A.default.weight"],
    )
    with pytest.raises(ValueError, match="lora_alpha"):
        bad = LitTwo()
        ia = PEFTCallback(lp.LoraConfig(**{**CFG_A, "lora_alpha": 64}), model_attr="model")
        ia.setup(quiet_trainer(), bad, "validate")
        bad.load_state_dict(torch.load(run.checkpoint.best_model_path, weights_only=True)["state_dict"], strict=False)


def test_a_second_fit_with_a_new_adapter_name_trains_it_beside_the_first(tmp_path):
    module = LitTwo()
    fit(module, [PEFTCallback(lp.LoraConfig(**CFG_A), export_dir=str(tmp_path / "1"))], tmp_path, max_steps=2)
    first = adapter_tensors(module, "model")
    recorder = Recorder()
    second = PEFTCallback(lp.LoraConfig(**CFG_B), adapter_name="second", export_dir=str(tmp_path / "2"))
    trainer = fit(module, [second], tmp_path, max_steps=2, logger=recorder)
    now = adapter_tensors(module, "model")
    assert all(torch.equal(now[k], v) for k, v in first.items())  # the first stays as trained
    new = {k: v for k, v in now.items() if ".second." in k}
    assert new and any("lora_B" in k and v.abs().sum() > 0 for k, v in new.items())  # the new one trained
    assert module.model.active_adapter == "second"
    assert any("peft/trainable_params" in m for m in recorder.metrics)
    # the new adapter, in HF PEFT's layout for a named adapter (adapter/second/)
    saved = load_file(os.path.join(second.adapter_dir, "second", "adapter_model.safetensors"))
    assert {t.shape[0] for k, t in saved.items() if "lora_A" in k} == {2}
    path = tmp_path / "both.ckpt"
    trainer.save_checkpoint(path)
    saved_keys = {k for k in torch.load(path, weights_only=True)["state_dict"] if k.startswith("model.")}
    assert saved_keys == set(now)  # both adapters saved
    assert set(checkpoint_adapter_configs(path)["model"]["adapters"]) == {"default", "second"}
    # another tuner type, or the same name with another config: refused, nothing changed
    for callback, match in (
        (PEFTCallback(lp.IA3Config(target_modules=["c_attn"], feedforward_modules=[]), adapter_name="ia3"), "IA3"),
        (PEFTCallback(lp.LoraConfig(**{**CFG_A, "r": 8}), adapter_name="default"), "r: trained with 4 vs now 8"),
    ):
        with pytest.raises(ValueError, match=match):
            fit(module, [callback], tmp_path, max_steps=1)
        assert set(module.model.peft_config) == {"default", "second"} and module.model.active_adapter == "second"


def test_two_appliers_of_one_model_or_one_export_folder_are_refused_at_setup(tmp_path):
    cases = [
        (
            LitTwo,
            [PEFTCallback(lp.LoraConfig(**CFG_A)), PEFTCallback(lp.LoraConfig(**CFG_B), adapter_name="b")],
            r"PEFTCallback\(model_attr='model', adapter_name='default'\) and PEFTCallback\(model_attr='model'",
        ),
        (LitMixin, [PEFTCallback(lp.LoraConfig(**CFG_A))], r"PEFTMixin.peft_config\) and PEFTCallback"),
        (
            LitTwo,
            [
                PEFTCallback(lp.LoraConfig(**CFG_A), export_dir=str(tmp_path)),
                PEFTCallback(lp.LoraConfig(**CFG_B), model_attr="other", export_dir=str(tmp_path)),
            ],
            "both export to",
        ),
    ]
    for cls, callbacks, match in cases:
        module = cls()
        with pytest.raises(ValueError, match=match):
            fit(module, callbacks, tmp_path, max_steps=1)
        assert not any(p.requires_grad is False for p in module.other.parameters())  # other untouched


def test_a_fit_without_training_steps_keeps_the_earlier_export(tmp_path):
    module = LitTwo()
    fit(
        module,
        [PEFTCallback(lp.LoraConfig(**CFG_A), export_dir=str(tmp_path / "x"), export="last")],
        tmp_path,
        max_steps=1,
    )
    before = os.stat(tmp_path / "x" / "adapter").st_ino
    callback = PEFTCallback(lp.LoraConfig(**CFG_A), export_dir=str(tmp_path / "x"), export="last")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit(module, [callback], tmp_path, max_epochs=0)
    assert any("ran no training step" in str(w.message) for w in caught)
    assert os.stat(tmp_path / "x" / "adapter").st_ino == before and callback.adapter_dir is None
    with pytest.raises(ValueError, match=r"export='best'\) needs a ModelCheckpoint"):
        fit(LitTwo(), [PEFTCallback(lp.LoraConfig(**CFG_A), export="best")], tmp_path, max_steps=1)
    with pytest.raises(ValueError, match="export='first'"):
        PEFTCallback(lp.LoraConfig(**CFG_A), export="first")


def test_mixin_merge_and_unload_leaves_the_module_as_it_was(tmp_path):
    module = LitMixin()
    module.configure_model()
    before = adapter_tensors(module, "model")
    merged = module.merge_and_unload()
    assert isinstance(module.model, lp.PeftModel) and type(merged).__name__ == "GPT2LMHeadModel"
    assert all(torch.equal(v, adapter_tensors(module, "model")[k]) for k, v in before.items())
    with torch.no_grad():
        torch.testing.assert_close(merged.eval()(input_ids=ids()).logits, module.model.eval()(input_ids=ids()).logits)


def test_export_best_after_a_fit_that_never_beat_an_earlier_fits_best_exports_the_new_adapter(tmp_path):
    """The ModelCheckpoint's best is the first fit's (before `second` existed) and the second fit does not beat it:
    the second fit exports its last adapter with a warning (it crashed reading the stale file, which lacks `second`)."""
    module = LitTwo()
    checkpoint = ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), monitor="val_loss", save_top_k=1)
    first = PEFTCallback(lp.LoraConfig(**CFG_A), export_dir=str(tmp_path / "1"))
    fit(module, [first, checkpoint], tmp_path, max_epochs=1, enable_checkpointing=True)
    best = checkpoint.best_model_path
    second = PEFTCallback(lp.LoraConfig(**CFG_B), adapter_name="second", export_dir=str(tmp_path / "2"))
    with pytest.warns(UserWarning, match="no checkpoint of this fit beat the earlier best"):
        fit(module, [second, checkpoint], tmp_path, max_epochs=1, enable_checkpointing=True)
    assert checkpoint.best_model_path == best and second.exported_from == "last"
    saved = load_file(os.path.join(second.adapter_dir, "second", "adapter_model.safetensors"))
    now = adapter_tensors(module, "model")
    assert saved and all(torch.equal(t, now[f"model.{k[: -len('.weight')]}.second.weight"]) for k, t in saved.items())


def test_resuming_with_another_dropout_is_allowed(run, tmp_path):
    """Dropout changes no trained tensor: a resume may lower it (every other field stays checked)."""
    module = LitTwo()
    a = PEFTCallback(
        lp.LoraConfig(**{**CFG_A, "lora_dropout": 0.3}), model_attr="model", export_dir=str(tmp_path / "a")
    )
    b = PEFTCallback(lp.LoraConfig(**CFG_B), model_attr="other", export_dir=str(tmp_path / "b"), exact_resume=False)
    trainer = quiet_trainer(default_root_dir=str(tmp_path), callbacks=[a, b], max_epochs=4)
    trainer.fit(module, token_loader(rows=4), ckpt_path=run.checkpoint.last_model_path)
    assert trainer.global_step == 8
