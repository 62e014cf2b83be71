"""`PEFTCallback`: apply a tuner to an ordinary LightningModule's `self.model`.

Hooks, in the order Lightning calls them (Lightning 2.6):

- `setup` (before the module's `configure_model`, checkpoint restore, `strategy.setup` and
  `configure_optimizers`): inject the tuner, freeze the base, log trainable/total once. A model that
  the module only builds in `configure_model` gets the tuner right after that hook returns.
  After a merge (a previous `fit`), a new `fit` first puts the adapter back.
- checkpoints: the LightningModule's own `state_dict` / `load_state_dict` carry the adapter-only
  rules (torch hooks installed at injection, see `_state.py`), so full saves, weights-only saves and
  `trainer.test(ckpt_path=...)` all see exactly the adapter.
- `on_fit_start` (after `strategy.setup`, before optimizer states are restored): lets a weights-only
  checkpoint resume a fit (fresh optimizer).
- `on_fit_end` (after every `on_train_end`, so after `ModelCheckpoint` wrote `last.ckpt` with the
  adapter): export the adapter, merge, export the merged model.
- exact resume (`exact_resume=True`, see `rng.py`): `on_train_batch_end` snapshots the torch / numpy /
  python RNG states, `on_train_batch_start` puts the snapshot back; checkpoints carry it, and after a
  restore it is put back at the first training batch. That is the only per-step work (microseconds).
"""

from __future__ import annotations

import os
from typing import Any, Callable, Optional

import lightning.pytorch as pl
from lightning.pytorch.utilities.model_helpers import is_overridden
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn

from ._state import (
    ADAPTER_SUBDIR,
    MERGED_SUBDIR,
    AdapterState,
    allow_weights_only_resume,
    attach_state,
    get_state,
    resolve_peft_config,
    save_merged_model,
    validate_model_attr,
)
from .rng import exact_resume_hook, training_rng
from .types import TunerConfig


class PEFTCallback(pl.Callback):
    """Apply a tuner (LoRA, IA3, prompt learning) to `pl_module.<model_attr>` for training.

    Args:
        config: a tuner config (`LoraConfig(...)`), or a dict / Hydra `DictConfig` holding `peft_type`
            or `_target_`.
        model_attr: the LightningModule attribute holding the model (dotted paths allowed).
        adapter_name: the adapter's name inside the `PeftModel`.
        merge_on_train_end: after `fit`, merge the adapter into the base (`pl_module.<model_attr>`
            becomes the plain model) and export it to `export_dir/merged`. Prompt-learning tuners have
            nothing to merge and stay wrapped.
        export_dir: where `adapter/` (HF PEFT format) and `merged/` go after `fit`; default: the
            trainer's log dir (`trainer.log_dir`, else `default_root_dir`).
        exact_resume: save the torch / numpy / python RNG states with checkpoints and put them back at
            the first training batch after a restore (with a dataloader that restores its own position, a
            resumed run then ends with the adapter of an uninterrupted one); see `lightning_peft.lightning.rng`.
        export_extras: called with each export's folder (`adapter/`, `merged/`) while it is still being
            written, before it replaces the previous export (e.g. `tokenizer.save_pretrained`): the export
            appears whole, extras included.
    """

    def __init__(
        self,
        config: TunerConfig,
        model_attr: str = "model",
        adapter_name: str = "default",
        merge_on_train_end: bool = True,
        export_dir: Optional[str] = None,
        exact_resume: bool = True,
        export_extras: Optional[Callable[[str], None]] = None,
    ) -> None:
        super().__init__()
        self.config = resolve_peft_config(config)
        validate_model_attr(model_attr)  # early, not at setup
        self.model_attr = model_attr
        self.adapter_name = adapter_name
        self.merge_on_train_end = merge_on_train_end
        self.export_dir = None if export_dir is None else os.fspath(export_dir)
        self.exact_resume = bool(exact_resume)
        self.export_extras = export_extras
        self.adapter_dir: Optional[str] = None  # set by the export after fit
        self.merged_dir: Optional[str] = None

    # ---- setup --------------------------------------------------------------------------------
    def _state(self, pl_module: "pl.LightningModule") -> AdapterState:
        state = get_state(pl_module)
        if state is None:
            state = attach_state(
                pl_module, AdapterState(self.config, self.model_attr, self.adapter_name, owner="callback")
            )
        elif state.owner != "callback":
            raise ValueError(
                f"{type(pl_module).__name__} already applies a tuner itself (PEFTMixin with "
                "peft_config set); use either PEFTMixin.peft_config or PEFTCallback, not both"
            )
        return state

    def setup(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        if stage == "fit":  # before any restore: a fit that does not resume starts from the current RNG state
            training_rng(pl_module).reset()
            self._check_export_dir(trainer)
        state = self._state(pl_module)
        if not state.injected and state.find_model(pl_module) is None and _builds_model_later(pl_module):
            self._inject_after_configure_model(trainer, pl_module, state)
            return
        state.apply(pl_module, trainer, who="PEFTCallback", fitting=stage == "fit")

    def _check_export_dir(self, trainer: "pl.Trainer") -> None:
        """Refuse, before training, export folders that cannot be written (a file where a folder belongs)."""
        if self.export_dir is None:  # the logger's folder, known only once the logger made it
            return
        for path in (
            self.export_dir,
            os.path.join(self.export_dir, ADAPTER_SUBDIR),
            os.path.join(self.export_dir, MERGED_SUBDIR),
        ):
            if os.path.exists(path) and not os.path.isdir(path):
                raise NotADirectoryError(
                    f"PEFTCallback(export_dir={self.export_dir!r}): {path} is a file, but the adapter is exported "
                    "into a folder there after fit; move the file or pass another export_dir"
                )

    def _inject_after_configure_model(
        self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", state: AdapterState
    ) -> None:
        original = pl_module.configure_model

        def configure_model_then_inject() -> None:
            pl_module.__dict__.pop("configure_model", None)  # one-shot: the class method is back
            original()  # a PEFTMixin module has injected already (its configure_model wrapper): then a no-op
            state.apply(pl_module, trainer, who="PEFTCallback", fitting=False)

        pl_module.__dict__["configure_model"] = configure_model_then_inject

    # ---- resume from a weights-only checkpoint ------------------------------------------------
    def on_fit_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        # Lightning keeps the loaded checkpoint here until the training state is restored, which
        # happens right after this hook; a weights-only one would be refused for lacking optimizer states.
        checkpoint = getattr(getattr(trainer, "_checkpoint_connector", None), "_loaded_checkpoint", None)
        if checkpoint and allow_weights_only_resume(checkpoint):
            rank_zero_warn(
                "lightning_peft: resuming from a weights-only checkpoint: the adapter and the loop "
                "position are restored, the optimizer and LR schedulers start fresh"
            )

    # ---- exact resume: RNG states (rng.py) ----------------------------------------------------
    def on_train_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if self.exact_resume:
            exact_resume_hook("on_train_start", trainer, pl_module)

    def on_train_batch_start(
        self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", batch: Any, batch_idx: int
    ) -> None:
        if self.exact_resume:
            exact_resume_hook("on_train_batch_start", trainer, pl_module)

    def on_train_batch_end(
        self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self.exact_resume:  # before ModelCheckpoint's own on_train_batch_end (Lightning moves it last)
            exact_resume_hook("on_train_batch_end", trainer, pl_module)

    def on_save_checkpoint(
        self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", checkpoint: dict[str, Any]
    ) -> None:
        if self.exact_resume and trainer.state.fn == "fit":
            exact_resume_hook("on_save_checkpoint", trainer, pl_module, checkpoint)

    def on_load_checkpoint(
        self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", checkpoint: dict[str, Any]
    ) -> None:
        if self.exact_resume and trainer.state.fn == "fit":
            exact_resume_hook("on_load_checkpoint", trainer, pl_module, checkpoint)

    # ---- end of fit ---------------------------------------------------------------------------
    def resolve_export_dir(self, trainer: "pl.Trainer") -> str:
        return self.export_dir or trainer.log_dir or trainer.default_root_dir

    def on_fit_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        state = get_state(pl_module)
        if state is None or state.peft is None:
            return
        if trainer.fast_dev_run:  # type: ignore[attr-defined]  # Lightning sets it; Trainer does not declare it
            rank_zero_info("lightning_peft: fast_dev_run: not exporting or merging the adapter")
            return
        export_dir = self.resolve_export_dir(trainer)
        from .strategies import export_sharded, is_sharded

        if is_sharded(pl_module):  # FSDP2: gather full tensors on every rank, rank 0 writes (strategies.py)
            self.adapter_dir, self.merged_dir = export_sharded(
                trainer, pl_module, state, export_dir, merge=self.merge_on_train_end, extras=self.export_extras
            )
            rank_zero_info(f"lightning_peft: adapter gathered from shards and written to {self.adapter_dir}")
            return
        is_main = trainer.is_global_zero
        self.adapter_dir = os.path.join(export_dir, ADAPTER_SUBDIR)
        state.save_adapter(self.adapter_dir, is_main_process=is_main, extras=self.export_extras)
        rank_zero_info(f"lightning_peft: adapter written to {self.adapter_dir}")
        if self.merge_on_train_end:
            if not state.can_merge:
                rank_zero_info(
                    f"lightning_peft: {state.config.peft_type} has no weights to merge; "
                    f"`{state.model_attr}` stays the wrapped model"
                )
            else:
                merged = state.merge_and_unload(pl_module)
                self.merged_dir = os.path.join(export_dir, MERGED_SUBDIR)
                if is_main:
                    save_merged_model(merged, self.merged_dir, extras=self.export_extras)
                rank_zero_info(f"lightning_peft: adapter merged; merged model written to {self.merged_dir}")
        trainer.strategy.barrier("lightning_peft.export")


def _builds_model_later(pl_module: "pl.LightningModule") -> bool:
    return is_overridden("configure_model", pl_module)
