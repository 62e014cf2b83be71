"""Pieces the recipes share: reading the small data files, building HF models, the optimizer."""

from __future__ import annotations

import codecs
import csv
import io
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
    if p.suffix not in (".csv", ".jsonl", ".json"):
        raise ValueError(f"data file {str(p)!r}: use .csv or .jsonl")
    data = p.read_bytes()
    bom = len(codecs.BOM_UTF8) if data.startswith(codecs.BOM_UTF8) else 0  # Excel's "CSV UTF-8" starts with one
    try:  # the whole file at once: the error's offset is then the file's
        text = data[bom:].decode("utf-8")
    except UnicodeDecodeError as err:
        start = err.start + bom
        line = data[:start].count(b"\n") + 1
        raise ValueError(
            f"data file {str(p)!r} is not UTF-8 text ({err.reason} at byte {start}, line {line}); save it as UTF-8"
        ) from None
    rows: list[dict[str, Any]] = []  # errors name the file, and the line where it is one row
    if p.suffix == ".csv":
        reader = csv.DictReader(io.StringIO(text, newline=""))
        for row in reader:
            rows.append(Row(row, line=reader.line_num))  # errors name the row's line (`row_error`)
        return rows
    for number, line_text in enumerate(text.splitlines(), 1):
        if not line_text.strip():
            continue
        try:
            value = json.loads(line_text)
        except json.JSONDecodeError as err:
            raise ValueError(f"data file {str(p)!r}, line {number}: not valid JSON ({err.msg})") from None
        if not isinstance(value, dict):
            raise ValueError(f"data file {str(p)!r}, line {number}: expected a JSON object, got {line_text.strip()!r}")
        rows.append(Row(value, line=number))
    return rows


class Row(dict):
    """A row of a data file: a dict, plus the line it was read from (`line`, for errors)."""

    def __init__(self, values: dict, line: Optional[int] = None) -> None:
        super().__init__(values)
        self.line = line


def require_columns(path: str | os.PathLike, rows: list[dict], *columns: str) -> None:
    """Raise a ValueError naming the file and the column when a row lacks one of `columns`."""
    for row in rows:
        missing = [c for c in columns if row.get(c) is None]
        if missing:
            have = sorted(k for k in row if isinstance(k, str) and row[k] is not None)
            where = f"line {row.line}" if getattr(row, "line", None) else "a row"
            raise ValueError(f"data file {str(path)!r}, {where}: no column {missing[0]!r} (columns: {', '.join(have)})")


def row_error(path: str | os.PathLike, row: dict, message: str) -> ValueError:
    """A ValueError naming the file and the row's line."""
    return ValueError(f"data file {str(path)!r}, line {getattr(row, 'line', None) or '?'}: {message}")


def require_text(path: str | os.PathLike, rows: list[dict], column: str) -> list[str]:
    """The `column` of every row, refusing an empty one by its line."""
    require_columns(path, rows, column)
    for row in rows:
        if not str(row[column]).strip():
            raise row_error(path, row, f"empty {column!r}")
    return [str(row[column]) for row in rows]


def split_rows(rows: list[dict], split_column: str, split: str, path: Optional[str | os.PathLike] = None) -> list[dict]:
    if path is not None:  # every row has a split (a short row names its line)
        require_columns(path, rows, split_column)
    chosen = [r for r in rows if r.get(split_column) == split]
    if not chosen:
        found = sorted({str(r.get(split_column)) for r in rows})
        where = f"data file {str(path)!r}: " if path is not None else ""
        raise ValueError(f"{where}no rows with {split_column}={split!r}; the file has splits {found}")
    return chosen


def check_local_path(name_or_path: Any, field: str) -> None:
    """A name that can only be a local path (./x, ../x, /x, ~/x, or more than one '/') must exist: otherwise
    transformers reports it as a malformed hub repo id."""
    text = str(name_or_path)
    looks_local = text.startswith((".", "/", "~")) or "\\" in text or text.count("/") > 1
    if looks_local and not os.path.exists(os.path.expanduser(text)):
        raise FileNotFoundError(
            f"{field}={text!r} is a local path that does not exist (relative to {os.getcwd()}); give an existing "
            "model folder or a hub model name"
        )


def check_model_folder(name_or_path: Any, field: str) -> None:
    """An existing folder given as a model must hold `config.json` (what `save_pretrained` writes): otherwise
    transformers asks for a `model_type` key. An adapter folder (adapter_config.json) is named as one."""
    folder = Path(os.path.expanduser(str(name_or_path)))
    if not folder.is_dir() or (folder / "config.json").is_file():
        return
    if (folder / "adapter_config.json").is_file():
        raise ValueError(
            f"{field}={str(name_or_path)!r} is an adapter folder (adapter_config.json), not a model: give the base "
            "model (or a merged/ folder) here; an adapter is loaded on top of it (PeftModel.from_pretrained)"
        )
    raise ValueError(
        f"{field}={str(name_or_path)!r} is a folder without config.json: not a saved model (give a folder that "
        "save_pretrained wrote, e.g. a run's merged/, or a hub model name)"
    )


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
        train = split_rows(rows, hp.split_column, hp.train_split, hp.path)[: hp.limit_train_rows]
        val = split_rows(rows, hp.split_column, hp.val_split, hp.path)[: hp.limit_val_rows]
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
        loraplus_lr_ratio: Optional[float] = None,
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
        if self.hparams.loraplus_lr_ratio is None:
            opt = torch.optim.AdamW(params, lr=self.hparams.learning_rate, weight_decay=self.hparams.weight_decay)
        else:  # LoRA+: lora_B (and 1-D parameters) at learning_rate * loraplus_lr_ratio, HF PEFT's groups
            from ..lightning.loraplus import loraplus_optimizer

            opt = loraplus_optimizer(
                self,
                torch.optim.AdamW,
                lr=self.hparams.learning_rate,
                loraplus_lr_ratio=self.hparams.loraplus_lr_ratio,
                loraplus_weight_decay=self.hparams.weight_decay,
            )
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
