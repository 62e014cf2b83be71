"""`get_peft_model` and the `PeftModel` family, named and behaving as in HF PEFT."""

from __future__ import annotations

import copy
import dataclasses
import os
import warnings
from contextlib import contextmanager
from typing import Any, Iterator, Optional

import torch
from torch import nn

from ._compat import incompatible_keys, name_or_path
from ._files import atomic_folder
from .config import PICKLE_WEIGHTS_NAME, SAFETENSORS_WEIGHTS_NAME, PeftConfig, TaskType, adapter_folder
from .model_card import write_model_card
from .serialization import (
    atomic_save_file,
    atomic_torch_save,
    get_peft_model_state_dict,
    load_peft_weights,
    set_peft_model_state_dict,
)
from .status import TunerLayerStatus, TunerModelStatus, get_layer_status, get_model_status  # HF's names here too
from .tuners.base import (
    BaseTuner,
    BaseTunerLayer,
    RequiresGradSnapshot,
    TunerAttributes,
    check_adapter_name,
    describe_wrapping,
    freeze_adapter,
    parameter_counts,
    requires_grad_kept_on_failure,
)
from .tuners.registry import get_model_class


class PeftModel(nn.Module):
    """A base model plus one or more named adapters of one tuner type.

    `tuner` (`LoraModel`, `IA3Model`, `PromptTuningModel`, ...) holds the adapters and the user's model
    (`tuner.model`); every adapter operation is the tuner's, whatever its kind. The modules sit where HF PEFT puts
    them (`peft_model_modules`): `base_model` is the tuner for LoRA / IA3, the user's model for prompt learning
    (with the encoders in `prompt_encoder`), so state-dict keys and attribute paths are HF PEFT's.
    """

    tuner: Any

    def __init__(
        self,
        model: nn.Module,
        peft_config: PeftConfig,
        adapter_name: str = "default",
        autocast_adapter_dtype: bool = True,
        low_cpu_mem_usage: bool = False,
    ) -> None:
        """`autocast_adapter_dtype=False` keeps the adapter's weights in a half-precision base layer's dtype (by
        default they are float32, as in HF PEFT); `low_cpu_mem_usage` is accepted for HF PEFT's signature (the
        adapter is created with its initial values, not on the meta device)."""
        super().__init__()
        check_adapter_name(adapter_name)
        if not isinstance(peft_config, PeftConfig):
            raise TypeError(f"peft_config must be a tuner config (e.g. LoraConfig), got {type(peft_config).__name__}")
        check_not_wrapped(model)
        peft_config = copy.deepcopy(peft_config)  # the model owns its config; the caller's stays as given
        self.peft_type = peft_config.peft_type
        if peft_config.base_model_name_or_path is None:
            peft_config.base_model_name_or_path = name_or_path(getattr(model, "config", None)) or None
        # every wrapping path (get_peft_model, PeftModel(...), from_pretrained) comes here: a refused or interrupted
        # wrap leaves the user's requires_grad flags as they were (the tuners freeze the model first)
        tuner_class: Any = get_model_class(peft_config.peft_type)  # a TunerAttributes subclass
        with requires_grad_kept_on_failure(model), tuner_class.guard_base_weights():
            tuner = tuner_class(model, peft_config, adapter_name)
        self.__dict__["tuner"] = tuner  # not a child itself: its modules are, under HF PEFT's attribute names
        for name, module in tuner.peft_model_modules().items():
            setattr(self, name, module)
        if not autocast_adapter_dtype:
            keep_base_dtype(tuner, adapter_name)

    # ---- attributes -------------------------------------------------------------------------
    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("base_model", "tuner"):
                raise
        base_model = self.base_model
        if base_model is not self.tuner:  # prompt learning: HF PEFT answers from the user's model first
            try:
                return getattr(base_model, name)
            except AttributeError:
                pass
        return getattr(self.tuner, name)

    def train(self, mode: bool = True) -> PeftModel:
        super().train(mode)
        self.tuner.training = mode  # a prompt-learning tuner is not a child module (its modules are)
        return self

    @property
    def peft_config(self) -> dict[str, PeftConfig]:
        return self.tuner.peft_config

    @property
    def active_adapter(self) -> Any:
        """The active adapter's name, as HF PEFT's: with several active (`base_model.set_adapter([...])`), the one
        set through this PeftModel (or first added) if it is among them, else the first of them (HF peft 0.21 names
        it even when it is not active any more); `[]` when none is (after the last adapter was deleted; HF peft 0.21
        goes on naming the deleted one there)."""
        active = self.tuner.active_adapter
        if isinstance(active, str):
            return active
        named = self.__dict__.get("_set_adapter_name", next(iter(self.peft_config), None))
        if named in active:
            return named
        return active[0] if active else []

    @property
    def active_peft_config(self) -> PeftConfig:
        active = self.active_adapter
        if not isinstance(active, str):
            raise ValueError("no adapter is active (the last one was deleted); add_adapter() / load_adapter() one")
        return self.peft_config[active]

    @property
    def active_adapters(self) -> list[str]:
        """Every active adapter's name (one, or several after `base_model.set_adapter([...])`; `[]`: none)."""
        return self.tuner.active_adapters

    @property
    def has_active_enabled_adapter(self) -> bool:
        """Whether an adapter runs in this model's forward (HF PEFT's property): some adapter is active and its
        layers are enabled (any of them). False inside `disable_adapter()`, after `base_model.disable_adapter_layers()`,
        after the last adapter was deleted, and after `unload()`. HF peft 0.21 answers True after
        `disable_adapter_layers()` and raises KeyError once the last adapter is deleted."""
        tuner = self.tuner
        if getattr(tuner, "is_unloaded", False) or not self.active_adapters:
            return False
        if isinstance(tuner, BaseTuner):
            return any(
                not module.disable_adapters for _, module in tuner.tuner_layers() if isinstance(module, BaseTunerLayer)
            )
        return not getattr(tuner, "_disabled", False)

    def get_base_model(self) -> nn.Module:
        return self.tuner.model

    @property
    def modules_to_save(self) -> Optional[set[str]]:
        """The `modules_to_save` names of every adapter's config together; None when there are none (HF PEFT's)."""
        names: set[str] = set()
        for config in self.peft_config.values():
            names.update(getattr(config, "modules_to_save", None) or [])
        return names or None

    def get_layer_status(self) -> list[TunerLayerStatus]:
        """The status of each adapter layer (see the function `get_layer_status`)."""
        return get_layer_status(self)

    def get_model_status(self) -> TunerModelStatus:
        """The adapters' status over the whole model (see the function `get_model_status`)."""
        return get_model_status(self)

    # ---- running ----------------------------------------------------------------------------
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """The model's forward through the adapters. `adapter_names=[...]` (LoRA): one adapter name per sample of
        the batch, "__base__" for the base model alone (inference only, no merged adapter)."""
        if "adapter_names" in kwargs:
            self._check_adapter_names(kwargs)
        return self.tuner(*args, **kwargs)

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        """The model's generate() through the adapters; `adapter_names=[...]` as in forward()."""
        if "adapter_names" in kwargs:
            self._check_adapter_names(kwargs)
        return self.tuner.generate(*args, **kwargs)

    def _check_adapter_names(self, kwargs: dict) -> None:
        """`adapter_names=None` is no request (dropped); a list goes to a tuner that runs mixed batches, and is
        refused by the others (HF PEFT ignores it for IA3 and prompt learning: each sample would silently run the
        active adapter)."""
        if kwargs["adapter_names"] is None:
            del kwargs["adapter_names"]
        elif not getattr(type(self.tuner), "supports_mixed_batch", False):
            raise ValueError(
                f"adapter_names= (one adapter per sample of the batch) is supported for LoRA adapters only; this "
                f"model holds {self.peft_type} adapters. Run one batch per adapter with set_adapter() instead"
            )

    @contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Run the base model alone inside the block. LoRA / IA3: every adapter parameter is frozen inside it (as in
        HF PEFT); on exit every layer's enabled state and every requires_grad flag is as it was found."""
        with self.tuner.disable_adapter():
            yield

    # ---- adapters by name -------------------------------------------------------------------
    def add_adapter(self, adapter_name: str, peft_config: PeftConfig) -> None:
        self.tuner.check_attached()
        check_adapter_name(adapter_name)
        if peft_config.peft_type != self.peft_type:
            raise ValueError(
                f"cannot add a {peft_config.peft_type} adapter to a {self.peft_type} model; "
                "one PeftModel holds adapters of one tuner type"
            )
        with self.tuner.guard_base_weights():  # (LoRA's PiSSA / OLoRA / LoftQ) the base back if the call fails
            self.tuner.add_adapter(adapter_name, peft_config)

    def set_adapter(self, adapter_name: str, inference_mode: bool = False) -> None:
        """Make `adapter_name` the active adapter; it trains unless `inference_mode` (every other adapter is
        frozen), as in HF PEFT. One name: several adapters run together through `model.base_model.set_adapter([...])`
        (LoRA / IA3)."""
        if not isinstance(adapter_name, str):
            raise TypeError(
                f"PeftModel.set_adapter takes one adapter name, got {adapter_name!r}; to run several adapters "
                "together (LoRA / IA3), call model.base_model.set_adapter([...]) as in HF PEFT"
            )
        self.tuner.set_adapter(adapter_name, inference_mode=inference_mode)
        self.__dict__["_set_adapter_name"] = adapter_name

    def set_requires_grad(self, adapter_names: str | list[str], requires_grad: bool = True) -> None:
        """Make the named adapters train or not, active or not (LoRA / IA3), as in HF PEFT."""
        if not isinstance(self.tuner, BaseTuner):
            raise TypeError(
                f"set_requires_grad is not supported for prompt learning methods like {self.peft_type}; the active "
                "adapter trains unless it was loaded for inference"
            )
        self.tuner.set_requires_grad(adapter_names, requires_grad)

    def delete_adapter(self, adapter_name: str) -> None:
        """Delete an adapter, as HF PEFT does: deleting the active one activates another (the other active ones, else
        the first remaining one, with a warning: by name, or for prompt learning the first added); a merged one is
        refused."""
        self.tuner.delete_adapter(adapter_name)
        if len(self.active_adapters) == 1:  # HF PEFT's PeftModel names it from then on
            self.__dict__["_set_adapter_name"] = self.active_adapters[0]
        if not self.peft_config:
            warnings.warn(
                f"deleted {adapter_name!r}, the only adapter: the model now runs the base model alone and "
                "save_pretrained refuses until add_adapter() / load_adapter() gives it one",
                stacklevel=2,
            )

    # ---- parameters -------------------------------------------------------------------------
    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        return parameter_counts(self)

    def print_trainable_parameters(self) -> None:
        trainable, total = self.get_nb_trainable_parameters()
        print(
            f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}"
        )

    # ---- files ------------------------------------------------------------------------------
    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        safe_serialization: bool = True,
        selected_adapters: Optional[list[str]] = None,
        save_embedding_layers: bool | str = "auto",
        is_main_process: bool = True,
        path_initial_model_for_weight_conversion: Optional[str] = None,
        **kwargs: Any,
    ) -> None:
        """Write `adapter_config.json` + `adapter_model.safetensors` per adapter (non-default ones in a
        sub-folder named after them) and a `README.md` model card, as HF PEFT does (HF PEFT's signature).

        `safe_serialization=False` writes `adapter_model.bin` (a pickle of plain tensors) instead, on request; the
        other format's file, if the folder held one, is removed so it cannot shadow the new weights. A
        `README.md` already there is kept, with the adapter's fields added to it. `state_dict=` (a keyword) is
        the model's state dict to take the tensors from.

        The folder is one unit (`atomic_folder`): everything is written into a new folder beside it (starting
        from hard links to the files already there, which are kept as HF PEFT keeps them) that is swapped in
        whole, so a crash or a full disk leaves the previous folder exactly as it was; a second process saving
        to the same folder waits for the first."""
        self.tuner.check_attached()  # after unload() there is nothing of this model's to save
        if not isinstance(safe_serialization, bool):
            raise TypeError(f"safe_serialization must be True or False, got {safe_serialization!r}")
        if os.path.isfile(save_directory):
            raise ValueError(f"save_directory {save_directory!s} is a file; give a folder")
        if isinstance(selected_adapters, str):
            raise TypeError(f"selected_adapters must be a list of adapter names, got the string {selected_adapters!r}")
        names = list(self.peft_config) if selected_adapters is None else list(selected_adapters)
        if not names:
            raise ValueError(
                "there is no adapter to save (the last one was deleted, or selected_adapters is empty); "
                "add_adapter() / load_adapter() one first"
            )
        for name in names:
            if name not in self.peft_config:
                raise ValueError(f"no adapter named {name!r} to save; this model has: {', '.join(self.peft_config)}")
        initial = path_initial_model_for_weight_conversion  # PiSSA / OLoRA saved as LoRA for the original base
        if initial is not None:
            self.tuner.check_weight_conversion(names, initial)
        state_dict = kwargs.get("state_dict")
        if not is_main_process:
            return
        weights_name, stale_name = (SAFETENSORS_WEIGHTS_NAME, PICKLE_WEIGHTS_NAME)
        if not safe_serialization:
            weights_name, stale_name = stale_name, weights_name
        with atomic_folder(save_directory, keep_existing=True) as root:
            write_model_card(self, root)
            for name in names:
                folder = root if name == "default" else os.path.join(root, name)
                os.makedirs(folder, exist_ok=True)
                tensors = get_peft_model_state_dict(
                    self, state_dict=state_dict, adapter_name=name, save_embedding_layers=save_embedding_layers
                )
                tensors, config = self.tuner.adapter_for_save(name, tensors, self.peft_config[name], initial)
                path = os.path.join(folder, weights_name)
                if safe_serialization:
                    atomic_save_file(tensors, path, metadata={"format": "pt"})
                else:
                    atomic_torch_save(tensors, path)
                if os.path.lexists(os.path.join(folder, stale_name)):
                    os.remove(os.path.join(folder, stale_name))  # the new folder's link: the old folder keeps it
                inference_mode = config.inference_mode
                config.inference_mode = True
                try:
                    config.save_pretrained(folder, auto_mapping_dict=self._auto_mapping(config))
                finally:
                    config.inference_mode = inference_mode

    def _auto_mapping(self, config: PeftConfig) -> Optional[dict[str, str]]:
        """For an adapter without a task type, the base model's class, so `AutoPeftModel` can rebuild it (HF's
        `auto_mapping`)."""
        if config.task_type is not None:
            return None
        base_class = type(self.get_base_model())
        return {"base_model_class": base_class.__name__, "parent_library": base_class.__module__}

    def load_adapter(
        self,
        model_id: str | os.PathLike,
        adapter_name: str,
        is_trainable: bool = False,
        allow_pickle: bool = False,
        ignore_base_model_mismatch: bool = False,
        allow_nonfinite: bool = False,
        **kwargs: Any,
    ) -> Any:
        """Add `adapter_name` from a folder written by `save_pretrained` (ours or HF PEFT's); `subfolder=` reads
        both files from `model_id/subfolder`. A new adapter is not made active (`set_adapter` does); it trains when
        `is_trainable`, as in HF PEFT. Into an existing adapter, the file's config comes with its weights:
        the adapter is rebuilt under it when its targets and shapes are the same, else the load is refused; its
        parameters then train or not as `is_trainable` says. A refused load changes nothing (requires_grad
        included).

        Returns the load result as HF PEFT does (`missing_keys`, `unexpected_keys`): both are empty, as a file with
        missing or extra adapter keys is refused."""
        self.tuner.check_attached()
        check_adapter_name(adapter_name)
        folder = adapter_folder(model_id, kwargs.pop("subfolder", None))
        config = PeftConfig.from_pretrained(folder, **kwargs)
        if not ignore_base_model_mismatch:
            check_base_model(config, self.get_base_model(), folder)
        if config.peft_type != self.peft_type:
            raise ValueError(
                f"cannot add a {config.peft_type} adapter to a {self.peft_type} model ({folder} holds one); "
                "one PeftModel holds adapters of one tuner type"
            )
        config.inference_mode = not is_trainable
        weights = load_peft_weights(folder, allow_pickle=allow_pickle)
        if adapter_name in self.peft_config:
            self._load_into_existing(adapter_name, config, weights, folder, allow_nonfinite)
        else:
            with requires_grad_kept_on_failure(self), self.tuner.guard_base_weights():
                self.add_adapter(adapter_name, config)
                try:
                    set_peft_model_state_dict(self, weights, adapter_name=adapter_name, allow_nonfinite=allow_nonfinite)
                except BaseException:
                    self.tuner.delete_adapter(adapter_name, force=True)  # even when it is the only or the active one
                    raise
        if not is_trainable:
            freeze_adapter(self, adapter_name)  # also when the weights went into an existing adapter
            self.eval()
        elif isinstance(self.tuner, BaseTuner):
            self.tuner.set_requires_grad(adapter_name)  # trains, active or not (as HF PEFT)
        else:
            self.tuner.sync_trainability()  # prompt learning: the active adapter trains, as its config now says
        # torch's own type for a load result (what nn.Module.load_state_dict returns, and HF PEFT's load_adapter);
        # its class is private to torch, but the value is public API

        return incompatible_keys(missing_keys=[], unexpected_keys=[])

    def _load_into_existing(
        self,
        name: str,
        config: PeftConfig,
        weights: dict[str, torch.Tensor],
        folder: str | os.PathLike,
        allow_nonfinite: bool = False,
    ) -> None:
        """Load the weights of `folder` into the existing adapter `name` together with the file's config. An
        equal config takes the weights in place (the parameters stay the same objects, e.g. for an optimizer);
        another one rebuilds the adapter under it, refused unless the saved tensors keep their keys and shapes.
        Whatever fails, the adapter is left as it was."""
        tuner = self.tuner
        if any(isinstance(m, BaseTunerLayer) and name in m.merged_adapters for m in self.modules()):
            raise ValueError(f"adapter {name!r} is merged; unmerge_adapter() before loading weights into it")
        old_config = tuner.peft_config[name]
        if _comparable(old_config) == _comparable(config):
            old_config.inference_mode = config.inference_mode
            set_peft_model_state_dict(self, weights, adapter_name=name, allow_nonfinite=allow_nonfinite)
            return
        order, active = list(tuner.peft_config), copy.copy(tuner.active_adapter)
        old_tensors = {
            k: v.detach().clone()
            for k, v in get_peft_model_state_dict(self, adapter_name=name, save_embedding_layers=False).items()
        }
        self._check_same_layout(name, config, weights, old_tensors, folder)
        # the rebuilt adapter's parameters have the same names: their flags are given back by name
        flags = RequiresGradSnapshot(self, by_name=True)
        tuner.delete_adapter(name, force=True)
        # an adapter whose initialisation changed the base (LoRA's PiSSA / OLoRA / LoftQ) did so already: the tuner
        # rebuilds it without running that again; a failed rebuild gives back any base weight it changed
        with tuner.guard_base_weights(), tuner.loading_into_existing(old_config):
            try:
                self.add_adapter(name, config)
                set_peft_model_state_dict(self, weights, adapter_name=name, allow_nonfinite=allow_nonfinite)
            except BaseException:
                if name in tuner.peft_config:
                    tuner.delete_adapter(name, force=True)
                tuner.add_adapter(name, old_config)
                set_peft_model_state_dict(self, old_tensors, adapter_name=name, allow_nonfinite=True)  # as they were
                raise
            finally:  # (after a failed rebuild only once the old adapter is back)
                _restore_order(tuner, order, active)
                flags.restore()

    def _check_same_layout(
        self,
        name: str,
        config: PeftConfig,
        weights: dict[str, torch.Tensor],
        old_tensors: dict[str, torch.Tensor],
        folder: str | os.PathLike,
    ) -> None:
        """Before anything changes: the file's tensors (and, for a tuner that wraps layers, its config's targets)
        must be those of adapter `name`, so the rebuilt adapter has the same layers and shapes."""
        tuner = self.tuner
        optional = set(getattr(tuner, "embedding_tensors", lambda _: {})(name))
        shapes = {k: tuple(v.shape) for k, v in weights.items() if k not in optional}
        old_shapes = {k: tuple(v.shape) for k, v in old_tensors.items()}
        differ = sorted(set(shapes) ^ set(old_shapes)) or sorted(k for k in shapes if shapes[k] != old_shapes[k])
        if not differ and isinstance(tuner, BaseTuner):
            new_config = tuner.prepare_adapter_config(copy.deepcopy(config), tuner.model)
            targets = set(tuner.matching_keys(new_config))
            held = {
                n for n, m in tuner.model.named_modules() if isinstance(m, BaseTunerLayer) and name in m.adapter_names()
            }
            differ = sorted(targets ^ held)
        if differ:
            raise ValueError(
                f"the adapter in {folder} has other targets or shapes than adapter {name!r} "
                f"(e.g. {', '.join(differ[:3])}); load it under a new adapter_name, or delete_adapter({name!r}) first"
            )

    @classmethod
    def from_pretrained(
        cls,
        model: nn.Module,
        model_id: str | os.PathLike,
        adapter_name: str = "default",
        is_trainable: bool = False,
        config: Optional[PeftConfig] = None,
        autocast_adapter_dtype: bool = True,
        ephemeral_gpu_offload: bool = False,
        low_cpu_mem_usage: bool = False,
        key_mapping: Optional[dict[str, str]] = None,
        allow_pickle: bool = False,
        ignore_base_model_mismatch: bool = False,
        allow_nonfinite: bool = False,
        **kwargs: Any,
    ) -> "PeftModel":
        """Wrap `model` with the adapter saved in `model_id` (`subfolder=`: in `model_id/subfolder`).

        HF PEFT's arguments: `autocast_adapter_dtype` as in `get_peft_model`; `ephemeral_gpu_offload` and
        `low_cpu_mem_usage` (memory-saving ways of loading) are accepted and change nothing here; `key_mapping`
        (renaming the file's keys) is not provided."""
        if key_mapping:
            raise NotImplementedError(
                "key_mapping (renaming the saved keys while loading) is not provided by lightning_peft; rename the "
                "keys of the weights file (get_peft_model_state_dict / set_peft_model_state_dict) instead"
            )
        check_adapter_name(adapter_name)
        check_not_wrapped(model)  # before anything is read: a failed load must not touch a live adapter either
        folder = adapter_folder(model_id, kwargs.pop("subfolder", None))
        if config is None:
            config = PeftConfig.from_pretrained(folder, **kwargs)
        elif isinstance(config, PeftConfig):
            config = copy.deepcopy(config)  # used instead of the folder's; the caller's object stays as given
        else:
            raise ValueError(f"config must be a PeftConfig (e.g. LoraConfig), got {type(config).__name__}")
        if not ignore_base_model_mismatch:
            check_base_model(config, model, folder)
        config.inference_mode = not is_trainable
        weights = load_peft_weights(folder, allow_pickle=allow_pickle)
        wrapper_cls = cls if cls is not PeftModel else MODEL_TYPE_TO_PEFT_MODEL.get(config.task_type, PeftModel)
        peft_model = None
        # wrapping froze the model: a failure gives back the user's flags (and a PiSSA / OLoRA / LoftQ start's base)
        tuner_class: Any = get_model_class(config.peft_type)
        with requires_grad_kept_on_failure(model), tuner_class.guard_base_weights():
            try:
                peft_model = wrapper_cls(model, config, adapter_name, autocast_adapter_dtype=autocast_adapter_dtype)
                set_peft_model_state_dict(
                    peft_model, weights, adapter_name=adapter_name, allow_nonfinite=allow_nonfinite
                )
            except BaseException:
                if peft_model is not None:
                    peft_model.tuner.unload()  # the user's model back as it was
                raise
        if not is_trainable:
            peft_model.requires_grad_(False)
            peft_model.eval()
        return peft_model


def check_not_wrapped(model: nn.Module) -> None:
    """Refuse to wrap a model that a live adapter already holds: a second wrapper would re-initialise or replace
    that adapter (or, failing, strip it); the model is left as it is."""
    if isinstance(model, (PeftModel, TunerAttributes)):
        raise ValueError(
            f"the model is already a {type(model).__name__} (adapters: {', '.join(model.peft_config) or 'none'}); "
            "add an adapter with peft_model.add_adapter(name, config) or peft_model.load_adapter(folder, "
            "adapter_name=name), or take the plain model back with unload() / merge_and_unload() first"
        )
    held = describe_wrapping(model)
    if held is not None:
        raise ValueError(
            f"the model already carries a live adapter ({held}); wrapping it again would re-initialise or replace "
            "it. Use that PeftModel's add_adapter(name, config) / load_adapter(folder, adapter_name=name), or call "
            "its unload() / merge_and_unload() first (or start from a fresh base model)"
        )


def _comparable(config: PeftConfig) -> dict[str, Any]:
    """A config's fields that decide the adapter's math and layout (not where it came from or whether it trains)."""
    data = config.to_dict()
    for key in ("inference_mode", "base_model_name_or_path", "revision", "peft_version", "auto_mapping"):
        data.pop(key, None)
    return data


def _restore_order(tuner: Any, order: list[str], active: Any) -> None:
    """Put the adapters back in their order, with the same ones active (the caller restores requires_grad)."""
    configs = {n: tuner.peft_config[n] for n in order if n in tuner.peft_config}
    tuner.peft_config.clear()
    tuner.peft_config.update(configs)
    names = [active] if isinstance(active, str) else list(active)
    if not all(n in tuner.peft_config for n in names):
        return
    if isinstance(tuner, BaseTuner):
        tuner.activate_adapters(names)  # no unmerge of other adapters, no checks: this was the active set
        tuner.active_adapter = active
    elif names:
        tuner.set_adapter(names[0])


def _model_name(name_or_path: Optional[str]) -> str:
    return os.path.basename(os.path.normpath(name_or_path)).lower() if name_or_path else ""


def check_base_model(config: PeftConfig, model: nn.Module, model_id: Any) -> None:
    """Refuse an adapter recorded for another base model (names compared without their folders, so
    the same model at another path or hub id passes); shapes alone cannot catch a same-sized model."""
    saved = _model_name(config.base_model_name_or_path)
    model_path = name_or_path(getattr(model, "config", None))
    actual = _model_name(model_path)
    if saved and actual and saved != actual:
        raise ValueError(
            f"the adapter in {model_id} was trained on {config.base_model_name_or_path!r}, but this model is "
            f"{model_path!r}; load the matching base model, or pass "
            "ignore_base_model_mismatch=True if you know the adapter fits"
        )


class PeftModelForCausalLM(PeftModel):
    pass


class PeftModelForSeq2SeqLM(PeftModel):
    pass


class _HeadTrainingPeftModel(PeftModel):
    """Task types whose fresh output head must train with the adapter (HF PEFT adds it to modules_to_save)."""

    head_names: tuple[str, ...] = ()

    def __init__(self, model: nn.Module, peft_config: PeftConfig, adapter_name: str = "default", **kwargs: Any) -> None:
        super().__init__(model, self._with_head(peft_config), adapter_name, **kwargs)

    def add_adapter(self, adapter_name: str, peft_config: PeftConfig) -> None:
        super().add_adapter(adapter_name, self._with_head(peft_config))  # each adapter gets its own head copy

    def _with_head(self, peft_config: PeftConfig) -> PeftConfig:
        if not hasattr(peft_config, "modules_to_save"):
            return peft_config
        names = list(peft_config.modules_to_save or [])
        names += [n for n in self.head_names if n not in names]
        config: Any = peft_config  # a tuner config: its dataclass fields include modules_to_save (checked above)
        return dataclasses.replace(config, modules_to_save=names)


class PeftModelForSequenceClassification(_HeadTrainingPeftModel):
    head_names = ("classifier", "score")


class PeftModelForTokenClassification(_HeadTrainingPeftModel):
    head_names = ("classifier", "score")


class PeftModelForQuestionAnswering(_HeadTrainingPeftModel):
    head_names = ("qa_outputs",)


class PeftModelForFeatureExtraction(PeftModel):
    pass


# keyed by TaskType (a str enum); looked up with a config's task_type, which may be None
MODEL_TYPE_TO_PEFT_MODEL: dict[Optional[str], type[PeftModel]] = {
    TaskType.CAUSAL_LM: PeftModelForCausalLM,
    TaskType.SEQ_2_SEQ_LM: PeftModelForSeq2SeqLM,
    TaskType.SEQ_CLS: PeftModelForSequenceClassification,
    TaskType.TOKEN_CLS: PeftModelForTokenClassification,
    TaskType.QUESTION_ANS: PeftModelForQuestionAnswering,
    TaskType.FEATURE_EXTRACTION: PeftModelForFeatureExtraction,
}


def get_peft_model(
    model: nn.Module,
    peft_config: PeftConfig,
    adapter_name: str = "default",
    mixed: bool = False,
    autocast_adapter_dtype: bool = True,
    revision: Optional[str] = None,
    low_cpu_mem_usage: bool = False,
) -> PeftModel:
    """Wrap `model` with a new adapter; the wrapper class follows `peft_config.task_type` (HF PEFT's signature).

    `autocast_adapter_dtype=False`: adapter weights over a half-precision base keep its dtype (float32 otherwise);
    `revision`: the base model's revision, recorded in the adapter's config (a different one already there is
    replaced with a warning, as HF PEFT does); `low_cpu_mem_usage`: accepted (the adapter is created with its
    initial values). `mixed=True` (HF PEFT's `PeftMixedModel`, adapters of several tuner types) is not provided."""
    if not isinstance(peft_config, PeftConfig):
        raise TypeError(f"peft_config must be a tuner config (e.g. LoraConfig), got {type(peft_config).__name__}")
    if mixed:
        raise NotImplementedError(
            "get_peft_model(..., mixed=True) (HF PEFT's PeftMixedModel: adapters of several tuner types in one model) "
            "is not provided by lightning_peft; use one PeftModel per tuner type"
        )
    if revision is not None:
        if not isinstance(revision, str):
            raise TypeError(f"revision must be a string (a branch, tag or commit of the base model), got {revision!r}")
        if peft_config.revision is not None and peft_config.revision != revision:
            warnings.warn(
                f"peft config has already set base model revision to {peft_config.revision}, overwriting with "
                f"revision {revision}",
                stacklevel=2,
            )
        peft_config = copy.deepcopy(peft_config)  # the caller's config stays as given (PeftModel copies it too)
        peft_config.revision = revision
    wrapper_cls = MODEL_TYPE_TO_PEFT_MODEL.get(peft_config.task_type, PeftModel)
    return wrapper_cls(
        model,
        peft_config,
        adapter_name,
        autocast_adapter_dtype=autocast_adapter_dtype,
        low_cpu_mem_usage=low_cpu_mem_usage,
    )


_HALF_DTYPES = (torch.float16, torch.bfloat16)


def keep_base_dtype(tuner: Any, adapter_name: str) -> None:
    """`autocast_adapter_dtype=False`: the adapter's float32 tensors in each layer over a float16 / bfloat16 base
    layer take the base layer's dtype (as HF PEFT leaves them); prompt-learning encoders stay float32 (HF PEFT's
    too)."""
    for module in tuner.modules() if isinstance(tuner, nn.Module) else []:
        if not isinstance(module, BaseTunerLayer):
            continue
        dtype = getattr(getattr(module.get_base_layer(), "weight", None), "dtype", None)
        if dtype not in _HALF_DTYPES:
            continue
        for attr in module.adapter_layer_names:
            holder = getattr(module, attr)
            if adapter_name not in holder:
                continue
            entry = holder[adapter_name]
            tensors = [entry] if isinstance(entry, torch.Tensor) else list(entry.parameters())
            for tensor in tensors:
                if tensor.dtype == torch.float32:
                    tensor.data = tensor.data.to(dtype)
