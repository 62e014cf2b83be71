"""`ExactResume` on its own (a plain LightningModule, no PEFT), inside PEFTCallback and PEFTMixin, and the
mixin's `configure_model` contract (issue 14 item 9)."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities.model_helpers import is_overridden
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lightning_peft as lp
from lightning_peft.lightning import ExactResume, PEFTCallback, PEFTMixin
from lightning_peft.lightning.rng import CHECKPOINT_KEY, SeedEpochSampler
from tests.helpers import GPT2_LORA, quiet_trainer, tiny_gpt2, token_loader

HOOKS = (
    "setup",
    "on_train_start",
    "on_train_batch_start",
    "on_train_batch_end",
    "on_save_checkpoint",
    "on_load_checkpoint",
)


class Dropout(pl.LightningModule):
    """No PEFT: a small regression net whose training draws dropout masks; `between` draws from the global
    generators between batches, as a main-process augmentation or a validation would."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Dropout(0.5), nn.Linear(16, 1))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.mse_loss(self.net(x), y)

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:  # the module's own hook: no super() needed
        torch.rand(3)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _data() -> DataLoader:
    g = torch.Generator().manual_seed(1)
    dataset = TensorDataset(torch.randn(16, 8, generator=g), torch.randn(16, 1, generator=g))
    return DataLoader(dataset, batch_size=4, sampler=SeedEpochSampler(dataset, seed=0))


def _fit(root, callbacks, epochs: int, ckpt_path=None) -> dict[str, torch.Tensor]:
    torch.manual_seed(123)  # every process starts from the same state; a resumed one from another (see below)
    if ckpt_path is not None:
        torch.rand(7)  # the resumed process has drawn other numbers before its fit
    module = Dropout()
    trainer = quiet_trainer(
        max_epochs=epochs,
        callbacks=callbacks,
        default_root_dir=str(root),
        enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in callbacks),
    )
    trainer.fit(module, _data(), ckpt_path=ckpt_path)
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _epoch_ckpt(root) -> ModelCheckpoint:
    return ModelCheckpoint(dirpath=str(root / "ckpt"), every_n_epochs=1, save_top_k=-1, save_on_train_epoch_end=True)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A straight 3-epoch run, and a 2-epoch one that checkpointed each epoch, with ExactResume."""
    root = tmp_path_factory.mktemp("exact")
    straight = _fit(root / "straight", [ExactResume()], 3)
    first = root / "first"
    _fit(first, [ExactResume(), _epoch_ckpt(first)], 2)
    return straight, str(first / "ckpt" / "epoch=1-step=8.ckpt")


def test_plain_module_resumed_with_exact_resume_equals_the_uninterrupted_run(runs, tmp_path):
    straight, ckpt = runs
    assert CHECKPOINT_KEY in torch.load(ckpt, weights_only=True)  # weights-only loadable, RNG states inside
    resumed = _fit(tmp_path, [ExactResume()], 3, ckpt_path=ckpt)
    assert all(torch.equal(v, straight[k]) for k, v in resumed.items())
    # the control: the same resume without ExactResume draws other dropout masks
    control = _fit(tmp_path / "control", [], 3, ckpt_path=ckpt)
    assert not all(torch.equal(v, straight[k]) for k, v in control.items())


def test_several_exact_resume_instances_act_once(runs, tmp_path):
    """Two instances (e.g. two PEFTCallbacks with exact_resume on one module) give the run of one."""
    straight, _ = runs
    assert all(torch.equal(v, straight[k]) for k, v in _fit(tmp_path, [ExactResume(), ExactResume()], 3).items())


def test_exact_resume_has_a_method_per_hook():
    for hook in HOOKS:
        assert is_overridden(hook, ExactResume(), parent=pl.Callback), hook
    callback = PEFTCallback(lp.LoraConfig(**GPT2_LORA))
    assert isinstance(callback.exact_resume_callback, ExactResume)
    assert PEFTCallback(lp.LoraConfig(**GPT2_LORA), exact_resume=False).exact_resume_callback is None


# ---------------------------------------------------------------------------------------------
# PEFTMixin: configure_callbacks, and configure_model without rewriting
# ---------------------------------------------------------------------------------------------
class LM(pl.LightningModule):
    def __init__(self, model=None) -> None:
        super().__init__()
        self.model = model

    def training_step(self, batch, batch_idx):
        (ids,) = batch
        return self.model(input_ids=ids, labels=ids).loss

    def configure_optimizers(self):
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=1e-3)


class BuildsLate(PEFTMixin, LM):
    peft_config = lp.LoraConfig(**GPT2_LORA)

    def configure_model(self) -> None:
        if self.model is None:
            self.model = tiny_gpt2()
        super().configure_model()

    def on_train_batch_start(self, batch, batch_idx):  # an own hook, no super(): left as written
        self.saw_batch = True


class ForgetsSuper(PEFTMixin, LM):
    peft_config = lp.LoraConfig(**GPT2_LORA)

    def configure_model(self) -> None:
        if self.model is None:
            self.model = tiny_gpt2()


def test_mixin_methods_are_not_rewritten_and_exact_resume_comes_from_configure_callbacks(tmp_path):
    for cls in (BuildsLate, ForgetsSuper):
        for name in ("configure_model", "on_train_batch_start"):
            own = cls.__dict__.get(name)
            assert own is None or not hasattr(own, "__wrapped__"), (cls, name)  # the class's function, as written
    module = BuildsLate()
    callbacks = module.configure_callbacks()
    assert [type(c) for c in callbacks if isinstance(c, ExactResume)] == [ExactResume]
    trainer = quiet_trainer(max_steps=2, enable_checkpointing=False)
    trainer.fit(module, token_loader())
    assert module.saw_batch and module.peft_model is not None
    assert any(isinstance(c, ExactResume) for c in trainer.callbacks)
    module.peft_exact_resume = False
    assert not any(isinstance(c, ExactResume) for c in module.configure_callbacks())


def test_mixin_configure_model_without_super_is_a_clear_error_at_fit_start(tmp_path):
    trainer = quiet_trainer(max_steps=1, enable_checkpointing=False)
    with pytest.raises(RuntimeError, match=r"ForgetsSuper.configure_model must call super\(\).configure_model\(\)"):
        trainer.fit(ForgetsSuper(), token_loader())
