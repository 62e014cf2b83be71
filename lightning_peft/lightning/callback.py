"""`PEFTCallback`: apply a tuner to an ordinary LightningModule's `self.model`.

Hooks, in the order Lightning calls them (Lightning 2.6):

- `setup` (before the module's `configure_model`, checkpoint restore, `strategy.setup` and
  `configure_optimizers`): inject the tuner, freeze the base, log trainable/total to the loggers (at
  every fit). A model that the module only builds in `configure_model` gets the tuner right after that
  hook returns. A later `fit` with another `adapter_name` adds that adapter (same tuner type) and trains
  it; the earlier ones stay as trained, frozen, in every checkpoint.
- checkpoints: the LightningModule's own `state_dict` / `load_state_dict` carry the adapter-only
  rules (torch hooks installed at injection, see `_state.py`), so full saves, weights-only saves and
  `trainer.test(ckpt_path=...)` all see exactly the adapter.
- `on_fit_start` (after `strategy.setup`, before optimizer states are restored): lets a weights-only
  checkpoint resume a fit (fresh optimizer).
- `on_fit_end` (after every `on_train_end`, so after `ModelCheckpoint` wrote `last.ckpt` with the
  adapter): export the adapter (`export="best"`: read from the best checkpoint; `"last"`: the one in
  memory) and the merged model. The module in memory is never merged and keeps no copy of anything:
  after fit it still holds the (last) adapter, so `trainer.save_checkpoint`, `test(ckpt_path="best")`
  and a further `fit` see an ordinary adapter module.
- exact resume (`exact_resume=True`): each hook of the `ExactResume` callback (`exact_resume.py`) is
  called from the same hook here; that is the only per-step work (microseconds).
"""

from __future__ import annotations

import os
from typing import Any, Callable, Optional, Union

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities.model_helpers import is_overridden
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch import nn

from .._compat import generate_state_key, load_module_without_weights, loaded_checkpoint, run_after_configure_model
from ..config import PeftConfig
from ._state import (
    ADAPTER_SUBDIR,
    MERGED_SUBDIR,
    AdapterState,
    allow_weights_only_resume,
    attach_state,
    building_without_weights,
    checkpoint_adapter_configs,
    get_state,
    resolve_peft_config,
    save_merged_model,
    validate_model_attr,
)
from .exact_resume import ExactResume
from .types import TunerConfig

EXPORT_CHOICES = ("best", "last")


class PEFTCallback(pl.Callback):
    """Apply a tuner (LoRA, IA3, prompt learning) to `pl_module.<model_attr>` for training.

    Args:
        config: a tuner config (`LoraConfig(...)`), or a dict / Hydra `DictConfig` holding `peft_type`
            or `_target_`.
        model_attr: the LightningModule attribute holding the model (dotted paths allowed).
        adapter_name: the adapter's name inside the `PeftModel`.
        merge_on_train_end: after `fit`, write the model with the adapter merged in to `export_dir/merged`
            (the module in memory is left unmerged; `merged_model` builds it on request). Prompt-learning
            tuners have nothing to merge.
        export_dir: where `adapter/` (HF PEFT format) and `merged/` go after `fit`; default: the
            trainer's log dir (`trainer.log_dir`, else `default_root_dir`), plus `/<model_attr>` when
            several PEFTCallbacks share the trainer. Two callbacks exporting to one folder are refused.
        exact_resume: save the torch / numpy / python RNG states with checkpoints and put them back at
            the first training batch after a restore (with a dataloader that restores its own position, a
            resumed run then ends with the adapter of an uninterrupted one); see `lightning_peft.lightning.rng`.
        export_extras: called with each export's folder (`adapter/`, `merged/`) while it is still being
            written, before it replaces the previous export (e.g. `tokenizer.save_pretrained`): the export
            appears whole, extras included.
        export: which adapter `adapter/` and `merged/` hold: `"best"` (the best checkpoint of the
            `ModelCheckpoint` that monitors a metric; its adapter tensors are read from the file, the module
            in memory is not touched) or `"last"` (the adapter in memory at the end of fit). Default: `"best"`
            when a `ModelCheckpoint` monitors a metric, else `"last"`. A fit that ran no training step
            (`max_epochs=0`, `fast_dev_run`, a finished run resumed) never overwrites an earlier export.
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
        export: Optional[str] = None,
    ) -> None:
        super().__init__()
        self.config = resolve_peft_config(config)
        validate_model_attr(model_attr)  # early, not at setup
        self.model_attr = model_attr
        self.adapter_name = adapter_name
        self.merge_on_train_end = merge_on_train_end
        if export_dir is not None and (not isinstance(export_dir, (str, os.PathLike)) or not os.fspath(export_dir)):
            raise ValueError(
                f"PEFTCallback(export_dir={export_dir!r}): pass a folder path (str or os.PathLike), or None for the "
                "trainer's log folder"
            )
        if export_extras is not None and not callable(export_extras):
            raise TypeError(
                f"PEFTCallback(export_extras={export_extras!r}): pass a callable taking the export folder's path "
                "(e.g. tokenizer.save_pretrained), or None"
            )
        self.export_dir = None if export_dir is None else os.fspath(export_dir)
        self.exact_resume = bool(exact_resume)
        # PEFTCallback(exact_resume=True) is PEFTCallback + ExactResume(): each of its hooks below calls this one's
        self.exact_resume_callback: Optional[ExactResume] = ExactResume() if self.exact_resume else None
        self.export_extras = export_extras
        if export is not None and export not in EXPORT_CHOICES:
            raise ValueError(
                f"PEFTCallback(export={export!r}): pass 'best', 'last' or None (best when a ModelCheckpoint "
                "monitors a metric, else last)"
            )
        self.export = export
        self.adapter_dir: Optional[str] = None  # set by the export after fit
        self.merged_dir: Optional[str] = None
        self.exported_from: Optional[str] = None  # "last", or the path of the best checkpoint exported
        self._applied: Optional[AdapterState] = None
        self._start_step: Optional[int] = None
        self._best_at_start: Optional[str] = None  # the monitoring ModelCheckpoint's best path when training started
        self._warned_no_training = False

    @property
    def state_key(self) -> str:
        # several PEFTCallbacks in one trainer (one per model_attr) keep apart in checkpoints
        return generate_state_key(self, model_attr=self.model_attr, adapter_name=self.adapter_name)

    # ---- setup --------------------------------------------------------------------------------
    def _state(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> AdapterState:
        """This callback's state on `pl_module.<model_attr>`; another applier of the same model is refused."""
        from .mixin import PEFTMixin

        me = f"PEFTCallback(model_attr={self.model_attr!r}, adapter_name={self.adapter_name!r})"
        mixin_attr = getattr(pl_module, "peft_model_attr", None)
        if isinstance(pl_module, PEFTMixin) and pl_module.peft_config is not None and mixin_attr == self.model_attr:
            raise ValueError(
                f"{type(pl_module).__name__} applies a tuner to `{self.model_attr}` itself (PEFTMixin.peft_config) "
                f"and {me} applies one too; use one of them, or give the callback another model_attr"
            )
        state = get_state(pl_module, self.model_attr)
        if state is None:
            state = AdapterState(self.config, self.model_attr, self.adapter_name, owner="PEFTCallback", owner_obj=self)
            return attach_state(pl_module, state)
        if state.owner == "PEFTMixin":
            raise ValueError(
                f"{type(pl_module).__name__} applies a tuner to `{self.model_attr}` itself (PEFTMixin.peft_config) "
                f"and {me} applies one too; use one of them, or give the callback another model_attr"
            )
        other = state.owner_obj
        if other is not None and other is not self and any(c is other for c in _callbacks(trainer)):
            raise ValueError(
                f"{other_name(other)} and {me} both put an adapter on {type(pl_module).__name__}.{self.model_attr}; "
                "use one PEFTCallback per model (a second adapter on one model: a second fit with another adapter_name)"
            )
        state.owner, state.owner_obj = "PEFTCallback", self
        return state

    def setup(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        if self.exact_resume_callback is not None:
            self.exact_resume_callback.setup(trainer, pl_module, stage)
        state = self._state(trainer, pl_module)
        if stage == "fit":
            self._check_export_dir(trainer)
            self._check_export_choice(trainer)
            self._start_step = None
        self._applied = state
        if not state.injected and state.find_model(pl_module) is None and _builds_model_later(pl_module):
            self._inject_after_configure_model(trainer, pl_module, state)
            return
        state.apply(
            pl_module,
            trainer,
            who="PEFTCallback",
            fitting=stage == "fit",
            config=self.config,
            adapter_name=self.adapter_name,
        )

    def _check_export_dir(self, trainer: "pl.Trainer") -> None:
        """Refuse, before training, export folders that cannot be written (a file where a folder belongs)."""
        mine = os.path.abspath(self.resolve_export_dir(trainer))
        for other in _callbacks(trainer):
            if (
                isinstance(other, PEFTCallback)
                and other is not self
                and other.model_attr != self.model_attr  # one model twice: refused by _state with its own message
                and os.path.abspath(other.resolve_export_dir(trainer)) == mine
            ):
                raise ValueError(
                    f"{other_name(other)} and PEFTCallback(model_attr={self.model_attr!r}) both export to {mine}; "
                    "pass each one its own export_dir"
                )
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

    def _check_export_choice(self, trainer: "pl.Trainer") -> None:
        if self.export == "best" and _monitoring_checkpoint(trainer) is None:
            raise ValueError(
                "PEFTCallback(export='best') needs a ModelCheckpoint(monitor=...) among the trainer's callbacks "
                "(the best checkpoint is read at the end of fit); add one or pass export='last'"
            )

    def _inject_after_configure_model(
        self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", state: AdapterState
    ) -> None:
        # no callback hook runs between configure_model and strategy.setup: see _compat.run_after_configure_model
        run_after_configure_model(pl_module, lambda: state.apply(pl_module, trainer, who="PEFTCallback", fitting=False))

    # ---- resume from a weights-only checkpoint ------------------------------------------------
    def on_fit_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        # Lightning keeps the loaded checkpoint here until the training state is restored, which
        # happens right after this hook; a weights-only one would be refused for lacking optimizer states.
        checkpoint = loaded_checkpoint(trainer)
        if checkpoint and allow_weights_only_resume(checkpoint):
            rank_zero_warn(
                "lightning_peft: resuming from a weights-only checkpoint: the adapter and the loop "
                "position are restored, the optimizer and LR schedulers start fresh"
            )

    # ---- exact resume: the ExactResume callback's hooks ---------------------------------------
    def on_train_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self._start_step = trainer.global_step  # after a restore: a fit that adds no step exports nothing
        checkpoint = _monitoring_checkpoint(trainer)
        self._best_at_start = checkpoint.best_model_path if checkpoint is not None else None
        if self.exact_resume_callback is not None:
            self.exact_resume_callback.on_train_start(trainer, pl_module)

    def on_train_batch_start(
        self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", batch: Any, batch_idx: int
    ) -> None:
        if self.exact_resume_callback is not None:
            self.exact_resume_callback.on_train_batch_start(trainer, pl_module, batch, batch_idx)

    def on_train_batch_end(
        self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self.exact_resume_callback is not None:
            self.exact_resume_callback.on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    def on_save_checkpoint(
        self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", checkpoint: dict[str, Any]
    ) -> None:
        if self.exact_resume_callback is not None:
            self.exact_resume_callback.on_save_checkpoint(trainer, pl_module, checkpoint)

    def on_load_checkpoint(
        self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", checkpoint: dict[str, Any]
    ) -> None:
        if self.exact_resume_callback is not None:
            self.exact_resume_callback.on_load_checkpoint(trainer, pl_module, checkpoint)

    # ---- end of fit ---------------------------------------------------------------------------
    def resolve_export_dir(self, trainer: "pl.Trainer") -> str:
        if self.export_dir is not None:
            return self.export_dir
        base = trainer.log_dir or trainer.default_root_dir
        if sum(isinstance(c, PEFTCallback) for c in _callbacks(trainer)) > 1:
            return os.path.join(base, self.model_attr)
        return base

    def _export_source(self, trainer: "pl.Trainer") -> Optional[str]:
        """The best checkpoint's path when the export is "best", None for "last"."""
        checkpoint = _monitoring_checkpoint(trainer)
        if (self.export or ("best" if checkpoint is not None else "last")) == "last" or checkpoint is None:
            return None
        path = checkpoint.best_model_path
        if not path or not os.path.isfile(path):
            rank_zero_warn(
                f"lightning_peft: export='best' but ModelCheckpoint(monitor={checkpoint.monitor!r}) has no best "
                "checkpoint on disk (the metric was never logged, save_top_k=0, or the file was deleted); "
                "exporting the last adapter"
            )
            return None
        if path == self._best_at_start and trainer.ckpt_path is None:
            # the best is an earlier fit's (e.g. before a new adapter was added) and this fit never beat it
            rank_zero_warn(
                f"lightning_peft: export='best' but no checkpoint of this fit beat the earlier best ({path}); "
                "exporting the last adapter"
            )
            return None
        return str(path)

    def on_fit_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        state = get_state(pl_module, self.model_attr)
        if state is None or state.peft is None:
            return
        if trainer.fast_dev_run:  # type: ignore[attr-defined]  # Lightning sets it; Trainer does not declare it
            rank_zero_info("lightning_peft: fast_dev_run: not exporting the adapter")
            return
        export_dir = self.resolve_export_dir(trainer)
        if self._start_step is None or trainer.global_step <= self._start_step:
            if not self._warned_no_training:
                self._warned_no_training = True
                rank_zero_warn(
                    f"lightning_peft: this fit ran no training step (max_epochs=0 / max_steps=0, or a finished run "
                    f"resumed): nothing exported, an earlier export in {export_dir} is kept"
                )
            return
        best = self._export_source(trainer)
        tensors = state.read_adapter_tensors(best) if best is not None and trainer.is_global_zero else None
        self.exported_from = best or "last"
        from .strategies import export_sharded, is_sharded

        if is_sharded(pl_module):  # FSDP2: gather full tensors on every rank, rank 0 writes (strategies.py)
            self.adapter_dir, self.merged_dir = export_sharded(
                trainer,
                pl_module,
                state,
                export_dir,
                merge=self.merge_on_train_end,
                extras=self.export_extras,
                tensors=tensors,
            )
            rank_zero_info(f"lightning_peft: adapter gathered from shards and written to {self.adapter_dir}")
            return
        is_main = trainer.is_global_zero
        self.adapter_dir = os.path.join(export_dir, ADAPTER_SUBDIR)
        state.save_adapter(self.adapter_dir, is_main_process=is_main, extras=self.export_extras, tensors=tensors)
        rank_zero_info(f"lightning_peft: adapter ({self.exported_from}) written to {self.adapter_dir}")
        if self.merge_on_train_end:
            if not state.can_merge:
                rank_zero_info(f"lightning_peft: {state.config.peft_type} has no weights to merge; no merged export")
            else:
                self.merged_dir = os.path.join(export_dir, MERGED_SUBDIR)
                if is_main:  # built, written and freed here: the module in memory stays unmerged
                    save_merged_model(
                        state.merged_model(tensors, dequantize=True), self.merged_dir, extras=self.export_extras
                    )
                rank_zero_info(f"lightning_peft: merged model written to {self.merged_dir}")
        trainer.strategy.barrier("lightning_peft.export")

    # ---- the merged model and loading ---------------------------------------------------------
    @property
    def merged_model(self) -> nn.Module:
        """The model with the exported adapter (best or last, as `adapter/`) merged in, built on each access.

        The module in memory is not changed. Memory: a copy of the targeted layers' base weights and of the
        adapters; every other tensor is shared with the training module (so do not modify them in place).
        """
        state = self._applied
        if state is None or state.peft is None:
            raise ValueError("PEFTCallback.merged_model: no fit has applied this callback's adapter yet")
        best = self.exported_from if self.exported_from not in (None, "last") else None
        return state.merged_model(state.read_adapter_tensors(best) if best else None)

    @classmethod
    def load_from_checkpoint(
        cls,
        module_class: "type[pl.LightningModule]",
        checkpoint_path: Union[str, "os.PathLike[str]"],
        map_location: Any = None,
        **kwargs: Any,
    ) -> "pl.LightningModule":
        """`module_class` rebuilt from a checkpoint written with PEFTCallback: the module is built as
        `module_class.load_from_checkpoint` builds it (saved hyperparameters, `kwargs` win), the adapters are
        applied with the configs stored in the checkpoint, then every tensor is loaded strictly.

            module = PEFTCallback.load_from_checkpoint(LitLM, "best.ckpt")
        """
        checkpoint = torch.load(checkpoint_path, map_location=map_location or "cpu", weights_only=True)
        entries = checkpoint_adapter_configs(checkpoint)
        if not entries:
            raise ValueError(
                f"{os.fspath(checkpoint_path)} holds no adapter config (not written by PEFTCallback / PEFTMixin "
                "of this version); build the module, apply the tuner and call load_state_dict yourself"
            )
        with building_without_weights():  # a PEFTMixin module applies its adapter in there
            module = load_module_without_weights(module_class, checkpoint, **kwargs)
        who = "PEFTCallback.load_from_checkpoint"
        for attr, entry in entries.items():
            if get_state(module, attr) is not None:
                continue  # applied by the module itself (PEFTMixin); the load below checks its config
            adapters = entry.get("adapters") or {entry.get("adapter_name", "default"): entry}  # shape: valid_entries
            configs = {name: PeftConfig.from_dict(dict(a["config"])) for name, a in adapters.items()}
            names = list(configs)
            state = attach_state(module, AdapterState(configs[names[0]], attr, names[0], owner=who))
            state.inject(module, who=who)
            for name in [*names[1:], entry.get("adapter_name", names[0])]:
                state.switch(module, configs[name], name, who)
        module.load_state_dict(checkpoint["state_dict"], strict=True)
        return module


def other_name(callback: Any) -> str:
    return (
        f"PEFTCallback(model_attr={getattr(callback, 'model_attr', '?')!r}, "
        f"adapter_name={getattr(callback, 'adapter_name', '?')!r})"
    )


def _callbacks(trainer: "pl.Trainer") -> list[Any]:
    return list(getattr(trainer, "callbacks", []))


def _monitoring_checkpoint(trainer: "pl.Trainer") -> Any:
    """The first ModelCheckpoint that monitors a metric, or None."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    for callback in trainer.checkpoint_callbacks:
        if isinstance(callback, ModelCheckpoint) and callback.monitor is not None:
            return callback
    return None


def _builds_model_later(pl_module: "pl.LightningModule") -> bool:
    return is_overridden("configure_model", pl_module)
