"""Causal language modelling: perplexity (torchmetrics) on the validation split, and a generated
sample from a fixed prompt at the end of training."""

from __future__ import annotations

from typing import Any, Optional

import torch
from lightning.pytorch.utilities import rank_zero_info
from torchmetrics.text import Perplexity

from .common import HFTaskModule, TextDataModule, pad_labels, require_text


class CausalLMDataModule(TextDataModule):
    """Each row's text column is one training sequence; loss on every non-pad token."""

    def __init__(self, path: str, tokenizer: Any = None, text_column: str = "text", **kwargs: Any):
        super().__init__(path, tokenizer, **kwargs)

    def encode(self, rows: list[dict]) -> list[dict]:
        texts = require_text(self.hparams.path, rows, self.hparams.text_column)
        enc = self.tokenizer(texts, truncation=True, max_length=self.hparams.max_length, return_token_type_ids=False)
        return [
            {"input_ids": ids, "attention_mask": mask} for ids, mask in zip(enc["input_ids"], enc["attention_mask"])
        ]

    def collate(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        batch = dict(self.pad(examples))
        batch["labels"] = pad_labels([e["input_ids"] for e in examples])  # the model shifts them
        return batch


class CausalLMModule(HFTaskModule):
    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Any = None,
        sample_prompt: str = "the food was",
        max_new_tokens: int = 16,
        **kwargs: Any,
    ):
        super().__init__(model, tokenizer, **kwargs)
        self.val_ppl = Perplexity(ignore_index=-100)
        self.sample: Optional[str] = None

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        out = self.model(**batch)
        labels = batch["labels"]
        # prompt tuners return logits for the virtual tokens too; score the real positions only
        logits = out.logits[:, -labels.size(1) :]
        self.val_ppl(logits[:, :-1].float(), labels[:, 1:])
        n = labels.size(0)
        self.log("val_loss", out.loss, prog_bar=True, batch_size=n, sync_dist=True)
        self.log("val_ppl", self.val_ppl, prog_bar=True, batch_size=n)

    @torch.no_grad()
    def generate_sample(self, prompt: Optional[str] = None) -> str:
        prompt = prompt if prompt is not None else self.hparams.sample_prompt
        enc = self.tokenizer(prompt, return_tensors="pt", return_token_type_ids=False, add_special_tokens=False).to(
            self.device
        )
        was_training = self.model.training
        self.model.eval()
        out = self.model.generate(
            **enc, max_new_tokens=self.hparams.max_new_tokens, do_sample=False, pad_token_id=self.tokenizer.pad_token_id
        )
        self.model.train(was_training)
        # some wrappers return prompt + continuation, some only the continuation: decode what is new
        new = out[0, enc["input_ids"].size(1) :] if out.size(1) > enc["input_ids"].size(1) else out[0]
        return prompt + " " + self.tokenizer.decode(new, skip_special_tokens=True).strip()

    def on_train_end(self) -> None:
        # runs after the callbacks' on_train_end but before PEFTCallback merges (on_fit_end): the trained,
        # still unmerged adapter model
        self.sample = self.generate_sample()
        rank_zero_info(f"generated sample: {self.sample!r}")
