"""Sequence classification: accuracy and macro F1 (torchmetrics) on the validation split."""

from __future__ import annotations

from typing import Any

import torch
from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score

from .common import HFTaskModule, TextDataModule, require_columns, require_text, row_error


class TextClassificationDataModule(TextDataModule):
    """A .csv/.jsonl file with a text column, an integer label column and a split column."""

    def __init__(
        self,
        path: str,
        tokenizer: Any = None,
        text_column: str = "text",
        label_column: str = "label",
        num_labels: int = 2,
        **kwargs: Any,
    ):
        super().__init__(path, tokenizer, **kwargs)

    def encode(self, rows: list[dict]) -> list[dict]:
        hp = self.hparams
        texts = require_text(hp.path, rows, hp.text_column)
        require_columns(hp.path, rows, hp.label_column)
        labels = []
        for r in rows:
            value = r[hp.label_column]
            try:
                label = int(value) if not isinstance(value, float) else int(str(value))
            except (TypeError, ValueError):
                raise row_error(hp.path, r, f"{hp.label_column!r} must be an integer, got {value!r}") from None
            if not 0 <= label < hp.num_labels:
                raise row_error(hp.path, r, f"{hp.label_column!r} {label} is outside [0, num_labels={hp.num_labels})")
            labels.append(label)
        # no token_type_ids: single sentences, and prompt tuners prepend virtual tokens
        enc = self.tokenizer(texts, truncation=True, max_length=hp.max_length, return_token_type_ids=False)
        return [
            {"input_ids": ids, "attention_mask": mask, "labels": y}
            for ids, mask, y in zip(enc["input_ids"], enc["attention_mask"], labels)
        ]

    def collate(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        batch = self.pad(examples)
        batch["labels"] = torch.tensor([e["labels"] for e in examples], dtype=torch.long)
        return dict(batch)


class SequenceClassificationModule(HFTaskModule):
    def __init__(self, model: torch.nn.Module, tokenizer: Any = None, num_labels: int = 2, **kwargs: Any):
        super().__init__(model, tokenizer, **kwargs)
        self.val_acc = MulticlassAccuracy(num_classes=num_labels, average="micro")
        self.val_f1 = MulticlassF1Score(num_classes=num_labels, average="macro")

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        out = self.model(**batch)
        preds = out.logits.argmax(dim=-1)
        n = batch["labels"].size(0)
        self.val_acc(preds, batch["labels"])
        self.val_f1(preds, batch["labels"])
        self.log("val_loss", out.loss, prog_bar=True, batch_size=n, sync_dist=True)
        self.log("val_acc", self.val_acc, prog_bar=True, batch_size=n)
        self.log("val_f1", self.val_f1, batch_size=n)
