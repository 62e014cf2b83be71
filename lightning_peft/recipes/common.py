"""Pieces the recipes share: reading the small data files, building HF models, the optimizer."""

from __future__ import annotations

import csv
import json
import math
import os
from pathlib import Path
from typing import Any, Optional

import lightning.pytorch as pl
import torch
import transformers
from torch.utils.data import DataLoader, Dataset

try:  # resumable mid-epoch when torchdata is installed (Lightning saves its state_dict)
    from torchdata.stateful_dataloader import StatefulDataLoader as _Loader
except ImportError:  # pragma: no cover - torchdata is optional
    _Loader = DataLoader


def read_rows(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Rows of a .csv (with header) or .jsonl file as dicts; a relative path is relative to the working
    directory (the app's configs point at the data shipped in `lightning_peft/app/data/` with an absolute
    path, `${pkg_path:lightning_peft.app,data,reviews.csv}`)."""
    p = Path(path).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"data file {str(p)!r} does not exist")
    with open(p, newline="") as f:
        if p.suffix == ".csv":
            return list(csv.DictReader(f))
        if p.suffix in (".jsonl", ".json"):
            return [json.loads(line) for line in f if line.strip()]
    raise ValueError(f"data file {str(p)!r}: use .csv or .jsonl")


def split_rows(rows: list[dict], split_column: str, split: str) -> list[dict]:
    chosen = [r for r in rows if r.get(split_column) == split]
    if not chosen:
        found = sorted({str(r.get(split_column)) for r in rows})
        raise ValueError(f"no rows with {split_column}={split!r}; the file has splits {found}")
    return chosen


def load_tokenizer(name_or_path: str, **kwargs: Any):
    tok = transformers.AutoTokenizer.from_pretrained(str(name_or_path), **kwargs)
    if tok.pad_token is None:  # GPT-style tokenizers ship without one
        tok.pad_token = tok.eos_token
    return tok


def build_model(
    auto_class: str,
    name_or_path: Optional[str] = None,
    config: Optional[dict] = None,
    tokenizer: Any = None,
    **kwargs: Any,
) -> torch.nn.Module:
    """A pretrained model (`name_or_path`) or a freshly initialised one from a config dict
    (`config: {model_type: bert, hidden_size: 32, ...}`) — the latter is how tests get tiny models."""
    cls = getattr(transformers, auto_class)
    if name_or_path:
        model = cls.from_pretrained(str(name_or_path), **kwargs)
    elif config:
        config = dict(config)
        hf_config = transformers.AutoConfig.for_model(config.pop("model_type"), **config, **kwargs)
        model = cls.from_config(hf_config)
    else:
        raise ValueError("model: set `name_or_path` (hub name or local folder) or `config` (a dict with model_type)")
    if tokenizer is not None and getattr(model.config, "pad_token_id", None) is None:
        # sequence classification over padded batches needs to know the pad id
        model.config.pad_token_id = tokenizer.pad_token_id
    return model


class ListDataset(Dataset):
    def __init__(self, items: list[dict]):
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        return self.items[i]


class TextDataModule(pl.LightningDataModule):
    """Loads one file with a split column, tokenizes once in `setup`, pads per batch."""

    def __init__(
        self,
        path: str,
        tokenizer: Any = None,
        split_column: str = "split",
        train_split: str = "train",
        val_split: str = "val",
        batch_size: int = 32,
        eval_batch_size: Optional[int] = None,
        max_length: int = 64,
        num_workers: int = 0,
        limit_train_rows: Optional[int] = None,
        limit_val_rows: Optional[int] = None,
        seed: int = 0,
    ):
        super().__init__()
        self.save_hyperparameters(ignore=["tokenizer"])
        self.tokenizer = tokenizer
        self.train_set: Optional[ListDataset] = None
        self.val_set: Optional[ListDataset] = None

    # subclasses turn rows into tokenized examples and pad them
    def encode(self, rows: list[dict]) -> list[dict]:
        raise NotImplementedError

    def collate(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def setup(self, stage: Optional[str] = None) -> None:
        if self.tokenizer is None:
            raise ValueError(f"{type(self).__name__} needs a tokenizer")
        if self.train_set is not None:
            return
        hp = self.hparams
        rows = read_rows(hp.path)
        train = split_rows(rows, hp.split_column, hp.train_split)[: hp.limit_train_rows]
        val = split_rows(rows, hp.split_column, hp.val_split)[: hp.limit_val_rows]
        self.train_set, self.val_set = ListDataset(self.encode(train)), ListDataset(self.encode(val))

    def _loader(self, data: Dataset, batch_size: int, shuffle: bool) -> DataLoader:
        kwargs: dict[str, Any] = {}
        if shuffle:  # order = f(seed + epoch): the same in every run, and after a resume (lightning_peft.lightning.rng)
            from lightning_peft.lightning.rng import SeedEpochSampler

            kwargs["sampler"] = SeedEpochSampler(data, seed=self.hparams.seed)
        return _Loader(
            data, batch_size=batch_size, collate_fn=self.collate, num_workers=self.hparams.num_workers, **kwargs
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, self.hparams.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, self.hparams.eval_batch_size or self.hparams.batch_size, shuffle=False)

    def pad(self, examples: list[dict], keys: tuple[str, ...] = ("input_ids", "attention_mask")) -> dict:
        return self.tokenizer.pad([{k: e[k] for k in keys} for e in examples], return_tensors="pt")


def pad_labels(seqs: list[list[int]], value: int = -100) -> torch.Tensor:
    width = max(len(s) for s in seqs)
    return torch.tensor([s + [value] * (width - len(s)) for s in seqs], dtype=torch.long)


class HFTaskModule(pl.LightningModule):
    """Training step, logging and AdamW + linear warmup/decay over whatever is trainable."""

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Any = None,
        learning_rate: float = 1e-3,
        weight_decay: float = 0.0,
        warmup_ratio: float = 0.0,
    ):
        super().__init__()
        self.save_hyperparameters(ignore=["model", "tokenizer"])
        self.model = model.train()  # from_pretrained returns eval mode; Lightning keeps modules' modes
        self.tokenizer = tokenizer

    def forward(self, **batch: torch.Tensor) -> Any:
        return self.model(**batch)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss = self.model(**batch).loss
        self.log("train_loss", loss, prog_bar=True, batch_size=batch["input_ids"].size(0))
        return loss

    def configure_optimizers(self):
        # called after the adapter is injected, so only adapter (and head) parameters are here
        params = [p for p in self.parameters() if p.requires_grad]
        if not params:
            raise RuntimeError("nothing to train: no parameter requires grad (was a tuner applied?)")
        opt = torch.optim.AdamW(params, lr=self.hparams.learning_rate, weight_decay=self.hparams.weight_decay)
        estimated = self.trainer.estimated_stepping_batches
        if not math.isfinite(estimated):  # unbounded run: constant learning rate
            return opt
        total = max(1, int(estimated))
        warmup = int(total * self.hparams.warmup_ratio)

        def schedule(step: int) -> float:
            if step < warmup:
                return (step + 1) / (warmup + 1)
            return max(0.0, (total - step) / max(1, total - warmup))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
