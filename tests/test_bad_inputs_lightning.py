"""Bad inputs to the Lightning layer: callback configs and checkpoints that do not hold the adapter."""

from __future__ import annotations

import pytest
import torch
from helpers import quiet_trainer, tiny_llama

import lightning_peft as lp


@pytest.mark.parametrize(
    "config,error,message",
    [
        (
            5,
            TypeError,
            "config must be a tuner config (e.g. LoraConfig(...)) or a dict / DictConfig with 'peft_type' or "
            "'_target_', got int",
        ),
        (
            {"_target_": "torch.nn.Identity"},
            TypeError,
            "_target_='torch.nn.Identity' built a Identity, not a tuner config (e.g. lightning_peft.LoraConfig)",
        ),
        ({"peft_type": "LORA", "r": -1}, ValueError, "r must be a positive integer (the LoRA rank), got -1"),
        (
            {"r": 8},
            ValueError,
            "the tuner config {'r': 8} has neither 'peft_type' (e.g. LORA) nor '_target_' "
            "(e.g. lightning_peft.LoraConfig); say which tuner it is for",
        ),
    ],
)
def test_peft_callback_config_errors(config, error, message):
    from lightning_peft.lightning import PEFTCallback

    with pytest.raises(error) as err:
        PEFTCallback(config)
    assert str(err.value) == message


def _fit(callback, root, ckpt_path=None, steps=2, holder=None):
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import ModelCheckpoint

    class Module(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = tiny_llama()

        def training_step(self, batch, batch_idx):
            return self.model(input_ids=batch[0], labels=batch[0]).loss

        def configure_optimizers(self):
            return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=0.1)

    data = torch.utils.data.TensorDataset(torch.randint(1, 64, (8, 12), generator=torch.Generator().manual_seed(0)))
    module = Module()
    if holder is not None:
        holder["module"] = module
    trainer = quiet_trainer(
        max_steps=steps,
        default_root_dir=root,
        callbacks=[callback, ModelCheckpoint(dirpath=root, save_last=True)],
    )
    trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=4), ckpt_path=ckpt_path)
    return module, trainer


def test_checkpoint_from_another_tuner_is_refused_and_nothing_is_loaded(tmp_path):
    from lightning_peft.lightning import PEFTCallback

    _fit(
        PEFTCallback(
            lp.IA3Config(target_modules=["q_proj", "down_proj"], feedforward_modules=["down_proj"]),
            merge_on_train_end=False,
        ),
        tmp_path / "ia3",
    )
    holder = {}
    with pytest.raises(ValueError) as err:
        _fit(
            PEFTCallback(lp.LoraConfig(target_modules=["q_proj"]), merge_on_train_end=False),
            tmp_path / "lora",
            ckpt_path=str(tmp_path / "ia3" / "last.ckpt"),
            holder=holder,
        )
    message = str(err.value)
    # the checkpoint carries its adapter config: the tuner type is named before any tensor is looked at
    assert message.startswith(
        "refusing to load this checkpoint into Module: the adapter config of `model` differs from the model's "
        "(adapter 'default': peft_type: checkpoint 'IA3' vs now 'LORA')"
    )
    assert message.endswith("nothing was loaded.")
    assert not (tmp_path / "lora").exists()  # no checkpoint written
    peft = holder["module"].model
    fresh = tiny_llama()  # the same seeded base: not a weight of it was touched
    base = {k.replace("base_layer.", ""): v for k, v in peft.get_base_model().state_dict().items() if "lora_" not in k}
    assert sorted(base) == sorted(fresh.state_dict())
    assert all(torch.equal(v, base[k]) for k, v in fresh.state_dict().items())
    lora_b = [p for n, p in peft.named_parameters() if "lora_B" in n]
    assert len(lora_b) == 2 and all(torch.count_nonzero(p) == 0 for p in lora_b)  # as injected: zeros, untrained


@pytest.mark.parametrize("where", ["", "adapter", "merged"])
def test_an_export_dir_that_is_a_file_is_refused_before_training(tmp_path, where):
    from lightning_peft.lightning import PEFTCallback

    export_dir = tmp_path / "out"
    if where:
        export_dir.mkdir()
    (export_dir / where if where else export_dir).write_text("not a folder")
    holder: dict = {}
    with pytest.raises(NotADirectoryError, match=r"is a file, but the adapter is exported into a folder there"):
        _fit(
            PEFTCallback(lp.LoraConfig(target_modules=["q_proj"]), export_dir=str(export_dir)), tmp_path, holder=holder
        )
    assert not any("lora_" in n for n, _ in holder["module"].named_modules())  # refused before the tuner went in
    assert (export_dir / where if where else export_dir).read_text() == "not a folder"
