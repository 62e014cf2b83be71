"""Sequence-to-sequence: ROUGE (torchmetrics) of greedy generations against the targets."""

from __future__ import annotations

from typing import Any

import torch
from torchmetrics.text.rouge import ROUGEScore

from .common import HFTaskModule, TextDataModule, pad_labels, require_text


class Seq2SeqDataModule(TextDataModule):
    """Rows with a source and a target column (the shipped `lightning_peft/app/data/aspects.jsonl`)."""

    def __init__(
        self,
        path: str,
        tokenizer: Any = None,
        source_column: str = "source",
        target_column: str = "target",
        max_target_length: int = 32,
        **kwargs: Any,
    ):
        super().__init__(path, tokenizer, **kwargs)

    def encode(self, rows: list[dict]) -> list[dict]:
        hp = self.hparams
        src = self.tokenizer(
            require_text(hp.path, rows, hp.source_column),
            truncation=True,
            max_length=hp.max_length,
            return_token_type_ids=False,
        )
        tgt = self.tokenizer(
            require_text(hp.path, rows, hp.target_column),
            truncation=True,
            max_length=hp.max_target_length,
            return_token_type_ids=False,
        )
        return [
            {"input_ids": i, "attention_mask": m, "labels": t}
            for i, m, t in zip(src["input_ids"], src["attention_mask"], tgt["input_ids"])
        ]

    def collate(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        batch = dict(self.pad(examples))
        batch["labels"] = pad_labels([e["labels"] for e in examples])
        return batch


class Seq2SeqModule(HFTaskModule):
    def __init__(self, model: torch.nn.Module, tokenizer: Any = None, max_new_tokens: int = 24, **kwargs: Any):
        super().__init__(model, tokenizer, **kwargs)
        self.val_rouge = ROUGEScore(rouge_keys=("rouge1", "rougeL"))

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        out = self.model(**batch)
        n = batch["labels"].size(0)
        self.log("val_loss", out.loss, prog_bar=True, batch_size=n, sync_dist=True)
        generated = self.model.generate(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            max_new_tokens=self.hparams.max_new_tokens,
            do_sample=False,
        )
        refs = batch["labels"].masked_fill(batch["labels"] == -100, self.tokenizer.pad_token_id)
        preds = self.tokenizer.batch_decode(generated, skip_special_tokens=True)
        targets = self.tokenizer.batch_decode(refs, skip_special_tokens=True)
        self.val_rouge.update(preds, targets)

    def on_validation_epoch_end(self) -> None:
        scores = self.val_rouge.compute()  # syncs across processes
        self.log("val_rouge1", scores["rouge1_fmeasure"], prog_bar=True)
        self.log("val_rougeL", scores["rougeL_fmeasure"], prog_bar=True)
        self.val_rouge.reset()
