"""One training process for tests/test_reliability.py: a plain LightningModule (an MLP with dropout in
the base) with LoRA (dropout too) through PEFTCallback or PEFTMixin, a StatefulDataLoader, checkpoints
every few steps and validation in between. It can kill itself with SIGKILL, resume from a checkpoint,
and export its adapter (and the RNG draws of every training step) to --out.

    python reliability_worker.py --out DIR [--api callback|mixin] [--kill-at-step N] [--ckpt PATH]
        [--no-exact-resume] [--loader sampler|shuffle] [--epochs N] [--kill-in-export N]
        [--workers N [--augment] [--persistent]] [--epoch-end-ckpt]

--augment: the training Dataset adds torch, numpy and python `random` noise in `__getitem__` (a random
augmentation), which with --workers runs in the DataLoader's worker processes.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import sys

import numpy as np
import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import lightning.pytorch as pl  # noqa: E402
from lightning.pytorch.callbacks import ModelCheckpoint  # noqa: E402
from torchdata.stateful_dataloader import StatefulDataLoader  # noqa: E402

import lightning_peft as lp  # noqa: E402
from lightning_peft.lightning import PEFTCallback, PEFTMixin  # noqa: E402
from lightning_peft.lightning.rng import SeedEpochSampler  # noqa: E402

ROWS, BATCH, EPOCHS = 64, 8, 3  # 8 steps per epoch, 24 in all
LORA = dict(r=4, lora_alpha=8, lora_dropout=0.25, target_modules=["fc1", "fc2"])


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(16, 32)
        self.fc2 = nn.Linear(32, 32)
        self.drop = nn.Dropout(0.3)  # dropout in the base model
        self.head = nn.Linear(32, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.drop(torch.relu(self.fc2(self.drop(torch.relu(self.fc1(x)))))))


class Plain(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.model = Net()
        self.draws: list[list[float]] = []  # per training step: what numpy and python's RNGs give

    def training_step(self, batch, batch_idx):
        x, y = batch
        self.draws.append([self.global_step, float(np.random.rand()), random.random()])
        return nn.functional.cross_entropy(self.model(x) + 0.01 * torch.randn(1), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        torch.rand(3)  # validation draws from the global generator (and so does its iterator)
        self.log("val_loss", nn.functional.cross_entropy(self.model(x), y))

    def configure_optimizers(self):
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=0.05)


class WithMixin(PEFTMixin, Plain):
    peft_config = lp.LoraConfig(**LORA)

    def on_train_batch_end(self, outputs, batch, batch_idx):  # an override without super(): still exact
        pass


class Augmented(torch.utils.data.Dataset):
    """Random noise from torch, numpy and python `random` added to every row as it is read."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        noise = 0.1 * torch.randn(16) + float(np.random.rand()) * 0.1 + random.random() * 0.1
        return self.x[i] + noise, self.y[i]


class Data(pl.LightningDataModule):
    def __init__(self, loader: str, workers: int = 0, augment: bool = False, persistent: bool = False) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(1)
        self.x, self.y = torch.randn(ROWS, 16, generator=g), torch.randint(0, 4, (ROWS,), generator=g)
        self.loader = loader
        self.workers, self.augment, self.persistent = workers, augment, persistent

    def train_dataloader(self):
        ds = Augmented(self.x, self.y) if self.augment else torch.utils.data.TensorDataset(self.x, self.y)
        kwargs = dict(batch_size=BATCH, num_workers=self.workers, persistent_workers=self.persistent)
        if self.loader == "shuffle":
            return StatefulDataLoader(ds, shuffle=True, **kwargs)
        return StatefulDataLoader(ds, sampler=SeedEpochSampler(ds, seed=7), **kwargs)

    def val_dataloader(self):
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(self.x[:16], self.y[:16]), batch_size=8)


class Kill(pl.Callback):
    """SIGKILL this process at the start of a training step (checkpoints written before it stay)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


class KillInExport(pl.Callback):
    """SIGKILL this process during the export at fit end, right after its n-th safetensors file is written
    (the adapter's is the first, the merged model's the second); both are written into temporary folders."""

    def __init__(self, nth: int) -> None:
        self.nth = nth

    def on_fit_end(self, trainer, pl_module):
        import safetensors.torch

        import lightning_peft.serialization as serialization

        original, calls = safetensors.torch.save_file, []

        def save_then_die(*args, **kwargs):
            original(*args, **kwargs)
            calls.append(1)
            if len(calls) == self.nth:
                os.kill(os.getpid(), signal.SIGKILL)

        safetensors.torch.save_file = serialization.save_file = save_then_die


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--api", choices=["callback", "mixin"], default="callback")
    parser.add_argument("--kill-at-step", type=int, default=None)
    parser.add_argument("--ckpt", default=None)
    parser.add_argument("--no-exact-resume", action="store_true")
    parser.add_argument("--loader", choices=["sampler", "shuffle"], default="sampler")
    parser.add_argument("--epochs", type=int, default=EPOCHS)
    parser.add_argument("--kill-in-export", type=int, default=None)
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--augment", action="store_true")
    parser.add_argument("--persistent", action="store_true")
    parser.add_argument("--epoch-end-ckpt", action="store_true", help="checkpoint at each epoch's end instead")
    args = parser.parse_args()

    pl.seed_everything(123, verbose=False)
    exact = not args.no_exact_resume
    every = (
        {"every_n_epochs": 1, "save_on_train_epoch_end": True} if args.epoch_end_ckpt else {"every_n_train_steps": 4}
    )
    callbacks: list[pl.Callback] = [
        ModelCheckpoint(dirpath=os.path.join(args.out, "ckpt"), save_last=True, save_top_k=-1, **every)
    ]
    if args.api == "callback":
        module: Plain = Plain()
        peft = PEFTCallback(lp.LoraConfig(**LORA), export_dir=args.out, exact_resume=exact)
        callbacks.insert(0, peft)
    else:
        module = WithMixin()
        module.peft_exact_resume = exact
        peft = None
    if args.kill_at_step is not None:
        callbacks.append(Kill(args.kill_at_step))
    if args.kill_in_export:
        callbacks.insert(0, KillInExport(args.kill_in_export))  # its on_fit_end runs before PEFTCallback's
    trainer = pl.Trainer(
        max_epochs=args.epochs,
        accelerator="cpu",
        devices=1,
        callbacks=callbacks,
        val_check_interval=4,
        num_sanity_val_steps=0,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=args.out,
    )
    trainer.fit(module, datamodule=Data(args.loader, args.workers, args.augment, args.persistent), ckpt_path=args.ckpt)
    if peft is None:
        module.save_adapter(os.path.join(args.out, "adapter"))
    with open(os.path.join(args.out, "draws.json"), "w") as f:
        json.dump({"draws": module.draws, "global_step": trainer.global_step}, f)


if __name__ == "__main__":
    main()
