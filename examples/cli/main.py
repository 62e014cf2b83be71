"""LightningCLI with lightning_peft: the tuner is configured in YAML and on the command line.

    python examples/cli/main.py fit --config examples/cli/config.yaml
    python examples/cli/main.py fit --config examples/cli/config.yaml \
        --trainer.callbacks.init_args.config.init_args.r=2        # a nested field of the callback's LoraConfig
    python examples/cli/main.py fit --config examples/cli/mixin.yaml \
        --model.peft_config.init_args.r=2                         # the same, for a PEFTMixin module

`config.yaml` adds `PEFTCallback` to an ordinary LightningModule (`TinyLM`); `mixin.yaml` uses `TinyPEFTLM`, a
`PEFTMixin` module taking `peft_config` as an `__init__` argument. Both configs are checked by jsonargparse against
the tuner config's fields: a misspelled one (`r` written `rr`) stops the command with its name in the error. The
model is a tiny GPT-2 built from its config and the data random tokens, so the example runs offline in seconds.
"""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from lightning.pytorch.cli import LightningCLI
from torch.utils.data import DataLoader, TensorDataset
from transformers import GPT2Config, GPT2LMHeadModel

from lightning_peft.lightning import PEFTMixin, TunerConfig


class TinyLM(pl.LightningModule):
    """A small GPT-2 (random weights) trained on next-token prediction."""

    def __init__(self, n_layer: int = 2, n_embd: int = 32, vocab_size: int = 64, lr: float = 1e-3) -> None:
        super().__init__()
        config = GPT2Config(
            n_layer=n_layer,
            n_embd=n_embd,
            n_head=4,
            vocab_size=vocab_size,
            n_positions=64,
            bos_token_id=0,
            eos_token_id=0,
        )
        self.model = GPT2LMHeadModel(config)
        self.lr = lr

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        (input_ids,) = batch
        loss = self.model(input_ids=input_ids, labels=input_ids).loss
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=self.lr)


class TinyPEFTLM(PEFTMixin, TinyLM):
    """`TinyLM` applying its tuner itself: `peft_config` is an `__init__` argument (`model.init_args.peft_config`)."""

    def __init__(
        self, peft_config: TunerConfig, n_layer: int = 2, n_embd: int = 32, vocab_size: int = 64, lr: float = 1e-3
    ) -> None:
        super().__init__(n_layer=n_layer, n_embd=n_embd, vocab_size=vocab_size, lr=lr)
        self.peft_config = peft_config


class RandomTokens(pl.LightningDataModule):
    """Random token ids (1..vocab_size-1), the same for the same seed."""

    def __init__(self, rows: int = 32, length: int = 16, batch_size: int = 8, vocab_size: int = 64, seed: int = 0):
        super().__init__()
        self.rows, self.length, self.batch_size, self.vocab_size, self.seed = rows, length, batch_size, vocab_size, seed

    def train_dataloader(self) -> DataLoader:
        generator = torch.Generator().manual_seed(self.seed)
        ids = torch.randint(1, self.vocab_size, (self.rows, self.length), generator=generator)
        return DataLoader(TensorDataset(ids), batch_size=self.batch_size)


def main(args: list[str] | None = None) -> LightningCLI:
    # model: any LightningModule by class name (TinyLM, TinyPEFTLM) or class path; the resolved config is written
    # to the log dir as config.yaml (replacing an earlier run's)
    return LightningCLI(datamodule_class=RandomTokens, args=args, save_config_kwargs={"overwrite": True})


if __name__ == "__main__":
    main()
