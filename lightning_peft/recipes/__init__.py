"""Task recipes: one LightningModule + LightningDataModule per task, each with torchmetrics.

Every module keeps the Hugging Face model in `self.model` and calls `self.model(**batch)`, which is
what `lightning_peft.lightning.PEFTCallback` expects.
"""
