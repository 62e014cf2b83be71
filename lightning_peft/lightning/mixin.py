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

Exact resume (`peft_exact_resume = True`, see `rng.py`): the RNG states are snapshotted at each
training batch's end, put back at the next one's start and saved with checkpoints, through
`on_train_start` / `on_train_batch_start` / `on_train_batch_end` / `on_save_checkpoint` /
`on_load_checkpoint`. A
subclass that overrides one of these hooks keeps this without calling `super()` (its hook is wrapped).
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any, Optional

import torch
from torch import nn

from ..peft_model import PeftModel
from ..serialization import get_peft_model_state_dict
from ._state import AdapterState, allow_weights_only_resume, attach_state, get_state, resolve_peft_config
from .rng import exact_resume_hook, training_rng

if TYPE_CHECKING:
    # what the mixin is used with: the type checker sees a LightningModule (its hooks, `_trainer`, an nn.Module)
    from lightning.pytorch import LightningModule as _MixinBase
else:
    _MixinBase = object

_RNG_HOOKS = (
    "on_train_start",
    "on_train_batch_start",
    "on_train_batch_end",
    "on_save_checkpoint",
    "on_load_checkpoint",
)


class PEFTMixin(_MixinBase):
    """Mix in before `LightningModule`; set `self.peft_config` (a tuner config, dict or DictConfig)."""

    peft_config: Any = None
    peft_model_attr: str = "model"
    peft_adapter_name: str = "default"
    peft_exact_resume: bool = True

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        own = cls.__dict__.get("configure_model")
        if own is not None and not getattr(own, "_lightning_peft_wrapped", False):

            @functools.wraps(own)
            def configure_model(self: Any, *args: Any, **kw: Any) -> Any:
                out = own(self, *args, **kw)
                self._peft_apply()
                return out

            setattr(configure_model, "_lightning_peft_wrapped", True)
            setattr(cls, "configure_model", configure_model)
        for name in _RNG_HOOKS:  # our part first, then the subclass's own hook (idempotent if it calls super())
            hook = cls.__dict__.get(name)
            if hook is not None and not getattr(hook, "_lightning_peft_wrapped", False):
                setattr(cls, name, _with_rng_hook(name, hook))

    def configure_model(self) -> None:
        self._peft_apply()

    # ---- applying the tuner -------------------------------------------------------------------
    def _peft_state(self, create: bool = True) -> Optional[AdapterState]:
        state = get_state(self)
        if state is None and create and self.peft_config is not None:
            config = resolve_peft_config(self.peft_config)
            state = attach_state(
                self, AdapterState(config, self.peft_model_attr, self.peft_adapter_name, owner="mixin")
            )
        return state

    def _peft_apply(self) -> None:
        """Inject the tuner if a config is set (or a PEFTCallback waits for the model) and it is not in yet."""
        state = self._peft_state()
        if state is None:
            return
        trainer = getattr(self, "_trainer", None)
        if state.owner == "mixin" and trainer is not None and trainer.state.fn == "fit":
            training_rng(self).reset()  # before any restore: a fit that does not resume keeps the current RNG
        state.apply(
            self,
            trainer,
            who=type(self).__name__ if state.owner == "mixin" else "PEFTCallback",
            fitting=trainer is not None and trainer.state.fn == "fit",
        )

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
        """Load adapter weights written by `save_adapter` (or HF PEFT) into this module's adapter; it stays
        trainable."""
        state = self._peft_require("load an adapter")
        if state.merged:
            state.restore_unmerged(self)
        peft = state.require_peft("load an adapter")
        peft.load_adapter(str(directory), adapter_name=state.adapter_name, is_trainable=True)

    def merge_and_unload(self) -> nn.Module:
        """Merge the adapter into the base weights; `self.<peft_model_attr>` becomes the plain model."""
        state = self._peft_require("merge")
        return state.merge_and_unload(self)

    # ---- checkpoints and exact resume ---------------------------------------------------------
    def _peft_rng_active(self) -> bool:
        """The mixin manages RNG states when it applies the tuner itself (else PEFTCallback does)."""
        state = get_state(self)
        trainer = getattr(self, "_trainer", None)
        return (
            bool(self.peft_exact_resume)
            and state is not None
            and state.owner == "mixin"
            and trainer is not None
            and trainer.state.fn == "fit"
        )

    def _peft_hook(self, name: str, *args: Any) -> None:
        if self.__dict__.get("_peft_hook_done") == name:  # a subclass's hook ran it first, then called super()
            return
        if name == "on_load_checkpoint":
            trainer = getattr(self, "_trainer", None)
            if trainer is not None and trainer.state.fn == "fit" and get_state(self) is not None:
                allow_weights_only_resume(args[0])
        if self._peft_rng_active():
            exact_resume_hook(name, self._trainer, self, *args)

    def on_train_start(self) -> None:
        self._peft_hook("on_train_start")
        parent = getattr(super(), "on_train_start", None)
        if parent is not None:
            parent()

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> Optional[int]:
        self._peft_hook("on_train_batch_start")
        parent = getattr(super(), "on_train_batch_start", None)
        return None if parent is None else parent(batch, batch_idx)

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        self._peft_hook("on_train_batch_end")
        parent = getattr(super(), "on_train_batch_end", None)
        if parent is not None:
            parent(outputs, batch, batch_idx)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Adds the RNG states of the last finished training batch (`checkpoint["lightning_peft_rng"]`)."""
        self._peft_hook("on_save_checkpoint", checkpoint)
        parent = getattr(super(), "on_save_checkpoint", None)
        if parent is not None:
            parent(checkpoint)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Lets `trainer.fit(ckpt_path=<weights-only .ckpt>)` resume (fresh optimizer) and takes the RNG states back."""
        self._peft_hook("on_load_checkpoint", checkpoint)
        parent = getattr(super(), "on_load_checkpoint", None)
        if parent is not None:
            parent(checkpoint)


def _with_rng_hook(name: str, hook: Any) -> Any:
    """A subclass's own `on_train_batch_start` (etc.) with the mixin's part run first."""

    takes_checkpoint = name.endswith("_checkpoint")

    @functools.wraps(hook)
    def wrapped(self: Any, *args: Any, **kwargs: Any) -> Any:
        if not isinstance(self, PEFTMixin):
            return hook(self, *args, **kwargs)
        self._peft_hook(name, *([args[0] if args else kwargs["checkpoint"]] if takes_checkpoint else []))
        self.__dict__["_peft_hook_done"] = name  # the mixin's own hook, reached through super(), is not run again
        try:
            return hook(self, *args, **kwargs)
        finally:
            self.__dict__.pop("_peft_hook_done", None)

    setattr(wrapped, "_lightning_peft_wrapped", True)
    return wrapped
