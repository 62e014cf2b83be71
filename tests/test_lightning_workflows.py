"""The adapter in common Lightning workflows around it, on real Trainer runs: torch.compile wherever a user puts it,
StochasticWeightAveraging in either callback order, the tuner (lr_find / scale_batch_size), a tuner config among
the module's saved hyperparameters (weights_only loads)."""

from __future__ import annotations

import warnings
from types import SimpleNamespace

import lightning.pytorch as pl
import peft as hf_peft
import pytest
import torch
from helpers import quiet_trainer
from lightning.pytorch.callbacks import ModelCheckpoint, StochasticWeightAveraging
from lightning.pytorch.tuner import Tuner
from safetensors.torch import load_file

from lightning_peft import LoraConfig, PeftModel
from lightning_peft.lightning import PEFTCallback, PEFTMixin

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"), pytest.mark.filterwarnings("ignore::FutureWarning")]


def trainable(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and len(a) > 0 and all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------------------------------------
# torch.compile: the model compiled in __init__ (before injection; PEFTMixin), in configure_model (after
# PEFTCallback's injection) or the whole LightningModule given to fit (PEFTCallback). One straight 2-epoch run
# (a checkpoint at each epoch's end) and one resumed from its first checkpoint per placement. A small MLP keeps
# compiling quick (GPT-2 through dynamo takes ~10 s per fit here).
# ---------------------------------------------------------------------------------------------
class MLP(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc1, self.fc2 = torch.nn.Linear(8, 16), torch.nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


MLP_LORA = dict(r=2, lora_alpha=4, init_lora_weights=False, target_modules=["fc1", "fc2"])
MLP_KEYS = {f"model.base_model.model.{m}.lora_{ab}.default.weight" for m in ("fc1", "fc2") for ab in "AB"}
PLACEMENTS = {  # placement -> (backend, mixin); inductor (the default backend) where the original bug was
    "__init__": ("aot_eager", True),
    "configure_model": ("inductor", False),
    "module": ("aot_eager", False),
}


class CompiledMLP(pl.LightningModule):
    def __init__(self, placement: str) -> None:
        super().__init__()
        self.placement, self.backend = placement, PLACEMENTS[placement][0]
        self.model = torch.compile(MLP(), backend=self.backend) if placement == "__init__" else MLP()

    def configure_model(self) -> None:
        if self.placement == "configure_model" and not hasattr(self.model, "_orig_mod"):
            self.model = torch.compile(self.model, backend=self.backend)  # PEFTCallback's setup injected before

    def training_step(self, batch, batch_idx):
        return torch.nn.functional.mse_loss(self.model(batch[0]), batch[1])

    def configure_optimizers(self):
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=1e-2)


class CompiledMixinMLP(PEFTMixin, CompiledMLP):
    def __init__(self, placement: str) -> None:
        super().__init__(placement)
        self.peft_config = LoraConfig(**MLP_LORA)


def mlp_loader() -> torch.utils.data.DataLoader:
    g = torch.Generator().manual_seed(1)
    data = torch.utils.data.TensorDataset(torch.randn(8, 8, generator=g), torch.randn(8, 4, generator=g))
    return torch.utils.data.DataLoader(data, batch_size=4)


def _compiled_fit(placement: str, root, ckpt_path=None) -> SimpleNamespace:
    backend, mixin = PLACEMENTS[placement]
    module = CompiledMixinMLP(placement) if mixin else CompiledMLP(placement)
    checkpoints = ModelCheckpoint(dirpath=root / "ckpt", every_n_epochs=1, save_on_train_epoch_end=True, save_top_k=-1)
    callbacks: list = [checkpoints]
    if not mixin:
        callbacks.append(
            PEFTCallback(LoraConfig(**MLP_LORA), export_dir=str(root / "export"), merge_on_train_end=False)
        )
    trainer = quiet_trainer(max_epochs=2, callbacks=callbacks, default_root_dir=str(root))
    fitted = torch.compile(module, backend=backend) if placement == "module" else module
    trainer.fit(fitted, mlp_loader(), ckpt_path=ckpt_path)
    if mixin:
        module.save_adapter(str(root / "export" / "adapter"))
    return SimpleNamespace(module=module, trainer=trainer, root=root, adapter=trainable(module))


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    runs: dict[str, SimpleNamespace] = {}

    def get(placement: str) -> SimpleNamespace:
        if placement not in runs:
            straight = _compiled_fit(placement, tmp_path_factory.mktemp("straight"))
            first = straight.root / "ckpt" / "epoch=0-step=2.ckpt"
            resumed = _compiled_fit(placement, tmp_path_factory.mktemp("resumed"), ckpt_path=str(first))
            runs[placement] = SimpleNamespace(straight=straight, resumed=resumed, first=first)
        return runs[placement]

    return get


@pytest.mark.parametrize("placement", list(PLACEMENTS))
def test_compiled_checkpoints_hold_exactly_the_adapter_under_uncompiled_names(compiled, placement):
    run = compiled(placement)
    for path in (run.first, run.straight.root / "ckpt" / "epoch=1-step=4.ckpt"):
        assert set(torch.load(path, map_location="cpu", weights_only=True)["state_dict"]) == MLP_KEYS
    assert set(run.straight.module.state_dict()) == MLP_KEYS  # what every Lightning save reads
    model = run.straight.module.model
    if placement != "module":  # still compiled, with the tuner inside the compiled region
        assert hasattr(model, "_orig_mod") and isinstance(model._orig_mod, PeftModel)


@pytest.mark.parametrize("placement", list(PLACEMENTS))
def test_compiled_export_has_hf_peft_key_names_and_loads_into_hf_peft(compiled, placement):
    folder = compiled(placement).straight.root / "export" / "adapter"
    saved = load_file(str(folder / "adapter_model.safetensors"))
    reference = hf_peft.get_peft_model(MLP(), hf_peft.LoraConfig(**MLP_LORA))
    assert set(saved) == set(hf_peft.get_peft_model_state_dict(reference))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = hf_peft.PeftModel.from_pretrained(MLP(), str(folder))
    assert not [str(w.message) for w in caught if "key" in str(w.message).lower()]  # HF's "missing adapter keys"
    assert same(hf_peft.get_peft_model_state_dict(loaded), saved)


@pytest.mark.parametrize("placement", list(PLACEMENTS))
def test_compiled_resume_gives_the_adapter_of_the_straight_run(compiled, placement):
    run = compiled(placement)
    assert run.resumed.trainer.global_step == 4
    assert same(run.resumed.adapter, run.straight.adapter)
    at_first = torch.load(run.first, map_location="cpu", weights_only=True)["state_dict"]
    final = run.straight.module.state_dict()
    assert not any(torch.equal(at_first[k], final[k]) for k in MLP_KEYS)  # it trained after the checkpoint


# ---------------------------------------------------------------------------------------------
# other callbacks and tools
# ---------------------------------------------------------------------------------------------
class PlainMLP(pl.LightningModule):
    """`self.model` a plain MLP; `peft_config` only recorded by save_hyperparameters (PEFTCallback applies it)."""

    def __init__(self, peft_config=None, lr: float = 1e-2, batch_size: int = 4) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.model, self.lr, self.batch_size = MLP(), lr, batch_size

    def training_step(self, batch, batch_idx):
        return torch.nn.functional.mse_loss(self.model(batch[0]), batch[1])

    def train_dataloader(self):
        g = torch.Generator().manual_seed(1)
        data = torch.utils.data.TensorDataset(torch.randn(16, 8, generator=g), torch.randn(16, 4, generator=g))
        return torch.utils.data.DataLoader(data, batch_size=self.batch_size)

    def configure_optimizers(self):
        self.__dict__.setdefault("adapter_seen", []).append(trainable(self))  # each fit's adapter, once injected
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=self.lr)


class MixinMLP(PEFTMixin, PlainMLP):
    def __init__(self, peft_config=None, **kwargs) -> None:
        super().__init__(peft_config, **kwargs)
        self.peft_config = peft_config


def _swa_fit(swa_first: bool, mixin: bool) -> dict[str, torch.Tensor]:
    module = MixinMLP(LoraConfig(**MLP_LORA)) if mixin else PlainMLP()
    base = {n: p.detach().clone() for n, p in module.model.named_parameters()}
    swa = StochasticWeightAveraging(swa_lrs=1e-2, swa_epoch_start=1)
    ours = [] if mixin else [PEFTCallback(LoraConfig(**MLP_LORA), merge_on_train_end=False)]
    callbacks = [swa, *ours] if swa_first else [*ours, swa]
    trainer = quiet_trainer(max_epochs=3, limit_train_batches=2, callbacks=callbacks, enable_checkpointing=False)
    trainer.fit(module)
    peft = module.model
    assert isinstance(peft, PeftModel)
    # the frozen base is untouched (SWA writes its averages into every parameter, paired by position)
    frozen = {n.replace(".base_layer", "").removeprefix("base_model.model."): p for n, p in peft.named_parameters()}
    assert all(torch.equal(frozen[n], v) for n, v in base.items())
    return trainable(module)


def test_stochastic_weight_averaging_in_either_order_and_with_the_mixin():
    # SWA deep-copies the module in its setup: before our injection when listed first, and always before PEFTMixin's
    # (configure_model runs after every callback's setup); it then pairs that copy's parameters with the module's
    after = _swa_fit(swa_first=False, mixin=False)
    assert same(_swa_fit(swa_first=True, mixin=False), after)
    assert same(_swa_fit(swa_first=True, mixin=True), after)


def _tuner_run(tool: str, mixin: bool, root):
    module = MixinMLP(LoraConfig(**MLP_LORA), batch_size=2) if mixin else PlainMLP(batch_size=2)
    callbacks = [] if mixin else [PEFTCallback(LoraConfig(**MLP_LORA), merge_on_train_end=False)]
    trainer = quiet_trainer(max_steps=2, callbacks=callbacks, enable_checkpointing=False, default_root_dir=str(root))
    tuner = Tuner(trainer)
    if tool == "lr_find":
        result = tuner.lr_find(module, num_training=6, update_attr=False)
        assert result is not None and len(result.results["loss"]) == 6
    else:
        assert tuner.scale_batch_size(module, max_trials=2, steps_per_trial=1) == 4 == module.batch_size
    return module, trainer


@pytest.mark.parametrize(
    "tool,mixin", [("lr_find", False), ("lr_find", True), ("scale_batch_size", False)], ids=["lr", "lr-mixin", "bs"]
)
def test_tuner_leaves_the_adapter_as_it_was(tool, mixin, tmp_path):
    module, trainer = _tuner_run(tool, mixin, tmp_path)
    before = module.adapter_seen[0]  # as injected, before the tuner's training steps
    assert same(trainable(module), before)  # the tuner's steps undone
    trainer.fit(module)  # the real fit: the same adapter, not a second one
    assert same(module.adapter_seen[-1], before)
    assert sum(isinstance(m, PeftModel) for m in module.modules()) == 1
    assert len(module.model.peft_config) == 1 and set(trainable(module)) == set(before)


@pytest.mark.parametrize("mixin", [False, True], ids=["callback", "mixin"])
def test_a_tuner_config_in_the_hyperparameters_loads_with_weights_only(tmp_path, mixin):
    config = LoraConfig(**MLP_LORA)
    module = MixinMLP(config) if mixin else PlainMLP(config)
    callbacks = [] if mixin else [PEFTCallback(config, merge_on_train_end=False)]
    trainer = quiet_trainer(max_steps=2, callbacks=callbacks, default_root_dir=str(tmp_path))
    trainer.fit(module)
    path = tmp_path / "saved.ckpt"
    trainer.save_checkpoint(path)
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    assert checkpoint["hyper_parameters"]["peft_config"] == config
    assert isinstance(checkpoint["hyper_parameters"]["peft_config"], LoraConfig)
    if mixin:  # Lightning loads with torch's default, weights_only; the mixin applies the config, loads the adapter
        restored = MixinMLP.load_from_checkpoint(path)
        assert restored.hparams.peft_config == config and same(trainable(restored), trainable(module))
    resumed = quiet_trainer(max_steps=3, callbacks=[PEFTCallback(config)] if not mixin else [], logger=False)
    resumed.fit(module, ckpt_path=str(path))  # the resume reads the file the same way
    assert resumed.global_step == 3
