"""`PEFTMixin`: a LightningModule that applies its tuner itself.

    class MyModule(PEFTMixin, L.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = build_model()            # or build it in configure_model()
            self.peft_config = LoraConfig(...)

The tuner is applied in `configure_model` (Lightning calls it after `setup`, before the strategy
wraps the model and before `configure_optimizers`; `load_from_checkpoint` calls it too). A subclass
that defines its own `configure_model` (the FSDP way: build the model there) gets the tuner right
after its `configure_model` returns, without having to call `super()`.
"""

from __future__ import annotations

import functools
from typing import Any, Optional

import torch
from torch import nn

from ..peft_model import PeftModel
from ..serialization import get_peft_model_state_dict
from ._state import AdapterState, allow_weights_only_resume, attach_state, get_state, resolve_peft_config


class PEFTMixin:
    """Mix in before `LightningModule`; set `self.peft_config` (a tuner config, dict or DictConfig)."""

    peft_config: Any = None
    peft_model_attr: str = "model"
    peft_adapter_name: str = "default"
    _lightning_peft_after_configure_model = True  # tells PEFTCallback not to patch configure_model

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        own = cls.__dict__.get("configure_model")
        if own is not None and not getattr(own, "_lightning_peft_wrapped", False):
            @functools.wraps(own)
            def configure_model(self: Any, *args: Any, **kw: Any) -> Any:
                out = own(self, *args, **kw)
                self._peft_apply()
                return out

            configure_model._lightning_peft_wrapped = True
            cls.configure_model = configure_model

    def configure_model(self) -> None:
        self._peft_apply()

    # ---- applying the tuner -------------------------------------------------------------------
    def _peft_state(self, create: bool = True) -> Optional[AdapterState]:
        state = get_state(self)
        if state is None and create and self.peft_config is not None:
            config = resolve_peft_config(self.peft_config)
            state = attach_state(self, AdapterState(config, self.peft_model_attr, self.peft_adapter_name, owner="mixin"))
        return state

    def _peft_apply(self) -> None:
        """Inject the tuner if a config is set (or a PEFTCallback waits for the model) and it is not in yet."""
        state = self._peft_state()
        if state is None:
            return
        trainer = getattr(self, "_trainer", None)
        if not state.injected:
            state.inject(self, who=type(self).__name__ if state.owner == "mixin" else "PEFTCallback")
            from .callback import log_trainable_parameters

            log_trainable_parameters(trainer, state)
        elif state.merged and trainer is not None and trainer.state.fn == "fit":
            state.restore_unmerged(self)

    def _peft_require(self, action: str) -> AdapterState:
        state = self._peft_state()
        if state is None:
            raise ValueError(f"cannot {action}: {type(self).__name__} has no peft_config (and no PEFTCallback applied one)")
        if not state.injected:
            self._peft_apply()
        return state

    @property
    def peft_model(self) -> Optional[PeftModel]:
        """The `PeftModel` under `peft_model_attr` (None before injection and after a merge)."""
        state = get_state(self)
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
        trainer = getattr(self, "_trainer", None)
        state.save_adapter(str(directory), is_main_process=trainer is None or trainer.is_global_zero)

    def load_adapter(self, directory: str) -> None:
        """Load adapter weights written by `save_adapter` (or HF PEFT) into this module's adapter; it stays trainable."""
        state = self._peft_require("load an adapter")
        if state.merged:
            state.restore_unmerged(self)
        peft = state.require_peft("load an adapter")
        peft.load_adapter(str(directory), adapter_name=state.adapter_name, is_trainable=True)

    def merge_and_unload(self) -> nn.Module:
        """Merge the adapter into the base weights; `self.<peft_model_attr>` becomes the plain model."""
        state = self._peft_require("merge")
        return state.merge_and_unload(self)

    # ---- checkpoints ----------------------------------------------------------------------------
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Lets `trainer.fit(ckpt_path=<weights-only .ckpt>)` resume (fresh optimizer). Call super() if you override it."""
        trainer = getattr(self, "_trainer", None)
        if trainer is not None and trainer.state.fn == "fit" and get_state(self) is not None:
            allow_weights_only_resume(checkpoint)
        parent = getattr(super(), "on_load_checkpoint", None)
        if parent is not None:
            parent(checkpoint)
