"""`PEFTMixin`: a LightningModule that applies its tuner itself.

    class MyModule(PEFTMixin, L.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = build_model()            # or build it in configure_model()
            self.peft_config = LoraConfig(...)

The tuner is applied in `configure_model` (Lightning calls it after `setup`, before the strategy
wraps the model and before `configure_optimizers`; `load_from_checkpoint` calls it too). A subclass
that defines its own `configure_model` (the FSDP way: build the model there) calls
`super().configure_model()` last, once the model exists:

        def configure_model(self):
            if self.model is None:
                self.model = build_model()
            super().configure_model()

A fit whose module has a `peft_config` but never got its tuner (that call missing) stops at
`on_fit_start` with an error saying so.

Exact resume (`peft_exact_resume = True`): `configure_callbacks` returns an `ExactResume` callback
(`exact_resume.py`); a subclass that overrides `configure_callbacks` returns `super().configure_callbacks()`
too. The module's own hooks are left to the subclass (no `super()` needed in any of them).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Optional, Sequence

import lightning.pytorch as pl
import torch
from torch import nn

from .._compat import attached_trainer
from ..peft_model import PeftModel
from ..serialization import get_peft_model_state_dict
from ._state import AdapterState, allow_weights_only_resume, attach_state, get_state, resolve_peft_config
from .exact_resume import ExactResume

if TYPE_CHECKING:
    # what the mixin is used with: the type checker sees a LightningModule (its hooks, `_trainer`, an nn.Module)
    from lightning.pytorch import LightningModule as _MixinBase
else:
    _MixinBase = object


class PEFTMixin(_MixinBase):
    """Mix in before `LightningModule`; set `self.peft_config` (a tuner config, dict or DictConfig)."""

    peft_config: Any = None
    peft_model_attr: str = "model"
    peft_adapter_name: str = "default"
    peft_exact_resume: bool = True

    def configure_model(self) -> None:
        """Applies the tuner; a subclass that builds its model here calls `super().configure_model()` last."""
        self._peft_apply()

    def configure_callbacks(self) -> "Sequence[pl.Callback] | pl.Callback":
        """`ExactResume` (with `peft_exact_resume`) and the check that the tuner was applied; a subclass that
        overrides this returns these too (`[*super().configure_callbacks(), ...]`)."""
        if self.peft_config is None:  # the tuner comes from a PEFTCallback (or none): nothing of the mixin's to run
            return []
        callbacks: list[pl.Callback] = [_TunerApplied()]
        if self.peft_exact_resume:
            callbacks.append(ExactResume())
        return callbacks

    # ---- applying the tuner -------------------------------------------------------------------
    def _peft_state(self, create: bool = True) -> Optional[AdapterState]:
        """The state of `peft_model_attr` (the mixin's own when `peft_config` is set, else a PEFTCallback's)."""
        state = get_state(self, self.peft_model_attr)
        if self.peft_config is None:
            return state
        if state is not None and state.owner != "PEFTMixin":
            raise ValueError(
                f"{type(self).__name__} applies a tuner to `{self.peft_model_attr}` itself (PEFTMixin.peft_config) "
                f"and {state.describe()} applies one too; use one of them"
            )
        if state is None and create:
            config = resolve_peft_config(self.peft_config)
            state = attach_state(
                self, AdapterState(config, self.peft_model_attr, self.peft_adapter_name, owner="PEFTMixin")
            )
        return state

    def _peft_apply(self) -> None:
        """Inject the tuner if `peft_config` is set and it is not in yet; log the parameter counts at every fit."""
        state = self._peft_state()
        if state is None or state.owner != "PEFTMixin":  # a PEFTCallback applies its own
            return
        trainer = attached_trainer(self)
        state.apply(self, trainer, who=type(self).__name__, fitting=trainer is not None and trainer.state.fn == "fit")

    def _peft_require(self, action: str) -> AdapterState:
        state = self._peft_state()
        if state is None:
            raise ValueError(
                f"cannot {action}: {type(self).__name__} has no peft_config (and no PEFTCallback applied one)"
            )
        if not state.injected:
            self._peft_apply()
        return state

    @property
    def peft_model(self) -> Optional[PeftModel]:
        """The `PeftModel` under `peft_model_attr` (None before injection)."""
        state = get_state(self, self.peft_model_attr)
        return None if state is None else state.peft

    # ---- adapter API --------------------------------------------------------------------------
    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        """The adapter's tensors keyed as HF PEFT saves them."""
        state = self._peft_require("get the adapter state")
        peft = state.require_peft("get the adapter state")
        return get_peft_model_state_dict(peft, adapter_name=state.adapter_name)

    def save_adapter(self, directory: str) -> None:
        """Write the adapter in HF PEFT format (atomically: a temporary folder renamed into place)."""
        state = self._peft_require("save the adapter")
        trainer = attached_trainer(self)
        state.save_adapter(str(directory), is_main_process=trainer is None or trainer.is_global_zero)

    def load_adapter(self, directory: str) -> None:
        """Load adapter weights written by `save_adapter` (or HF PEFT) into this module's adapter; it stays
        trainable."""
        state = self._peft_require("load an adapter")
        peft = state.require_peft("load an adapter")
        peft.load_adapter(str(directory), adapter_name=state.adapter_name, is_trainable=True)

    def merge_and_unload(self) -> nn.Module:
        """The model with the adapter merged in. The module is not changed (it keeps training / checkpointing its
        adapter); the merged model shares every untargeted tensor with it and costs a copy of the targeted layers'
        base weights (and of the adapter), freed when it is dropped."""
        state = self._peft_require("merge")
        return state.merged_model()

    # ---- checkpoints ------------------------------------------------------------------------------
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Lets `trainer.fit(ckpt_path=<weights-only .ckpt>)` resume (fresh optimizer)."""
        trainer = attached_trainer(self)
        if trainer is not None and trainer.state.fn == "fit" and get_state(self) is not None:
            allow_weights_only_resume(checkpoint)
        parent = getattr(super(), "on_load_checkpoint", None)
        if parent is not None:
            parent(checkpoint)


class _TunerApplied(pl.Callback):
    """Stops a fit whose PEFTMixin module has a `peft_config` but never got its tuner: a `configure_model`
    override that does not call `super().configure_model()`."""

    def on_fit_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if isinstance(pl_module, PEFTMixin) and pl_module.peft_config is not None and pl_module.peft_model is None:
            raise RuntimeError(
                f"{type(pl_module).__name__} has a peft_config, but its tuner was never applied: "
                f"{type(pl_module).__name__}.configure_model must call super().configure_model() at its end "
                "(after building the model), as PEFTMixin applies the tuner there"
            )
