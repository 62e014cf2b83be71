"""`ExactResume`: a resumed fit ends where the uninterrupted one would have, with or without PEFT.

    trainer = L.Trainer(callbacks=[ExactResume(), ModelCheckpoint(...)])
    trainer.fit(module, datamodule, ckpt_path="last")

Lightning restores the weights, optimizer, loop position and (with a torchdata `StatefulDataLoader`)
the data position, but not the random-number generators. This callback saves the torch / numpy /
python RNG states with every checkpoint of a fit and puts them back at the first training batch after
a restore, keeps the training stream apart from draws made between batches (validation, iterator
creation, a main-process collate) and seeds DataLoader workers from saved values (see `rng.py` for
the mechanics). Use a `SeedEpochSampler` (or another order that depends only on seed and epoch) for
the shuffle. `PEFTCallback(exact_resume=True)` and `PEFTMixin` (`peft_exact_resume = True`, through
`configure_callbacks`) use it; several instances on one module share one tracker and act once.

Per-step work: two RNG state copies per training batch (microseconds).
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.utilities.rank_zero import rank_zero_warn

from .rng import prepare_train_loaders, training_rng


class ExactResume(pl.Callback):
    """Save the RNG states with each checkpoint of a fit and put them back when the fit resumes from it."""

    def setup(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        if stage == "fit":  # before any restore: a fit that does not resume starts from the current RNG state
            training_rng(pl_module).reset()

    def on_train_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        tracker = training_rng(pl_module)
        if not tracker.loaders_prepared:  # once per fit, whatever the number of ExactResume instances
            tracker.loaders_prepared = True
            prepare_train_loaders(trainer, pl_module)  # worker seeds; Lightning #20550: the loader's saved position

    def on_train_batch_start(
        self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", batch: Any, batch_idx: int
    ) -> None:
        training_rng(pl_module).on_train_batch_start()

    def on_train_batch_end(
        self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        # Lightning runs ModelCheckpoint's on_train_batch_end after this one; a checkpoint written earlier in this
        # hook takes the snapshot itself (TrainingRNG.on_save_checkpoint)
        training_rng(pl_module).on_train_batch_end()

    def on_save_checkpoint(
        self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", checkpoint: dict[str, Any]
    ) -> None:
        """Adds the RNG states of the last finished training batch (`checkpoint["lightning_peft_rng"]`)."""
        if trainer.state.fn == "fit":
            training_rng(pl_module).on_save_checkpoint(checkpoint)

    def on_load_checkpoint(
        self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", checkpoint: dict[str, Any]
    ) -> None:
        """Takes this process's RNG state back, to be put in place at the first training batch."""
        if trainer.state.fn == "fit":
            warning = training_rng(pl_module).on_load_checkpoint(checkpoint)
            if warning:
                rank_zero_warn(warning)
