"""What the callback and the mixin share: one `AdapterState` per (LightningModule, model_attr).

Each state injects the tuner into `module.<model_attr>` (through `get_peft_model`), and installs three
torch hooks on the LightningModule that touch only that model's keys, so that every checkpoint path of
Lightning (full saves, weights-only saves, `trainer.save_checkpoint`, `trainer.test(ckpt_path=...)`,
`load_from_checkpoint`) sees adapter-only state:

- a `state_dict` post-hook drops every frozen tensor of the model (the base), so a `.ckpt` holds
  exactly the adapters' tensors (plus whatever lives outside the models), and writes the adapter
  configs as plain data into the state dict's metadata (`checkpoint_adapter_configs`);
- a `load_state_dict` pre-hook checks, before anything is copied, that the incoming state was saved
  with the same adapter configs and holds every adapter tensor with the right shape, and refuses it
  otherwise (never a half load);
- a `load_state_dict` post-hook forgives the base weights that are "missing" from such a state, so
  `strict_loading=True` keeps catching unexpected keys.

Hooks rather than callback hooks because Lightning loads module weights before any callback's
`on_load_checkpoint` and skips callbacks entirely for weights-only saves.

The module in memory is never merged: the merged model is built on request (`merged_model`) from a copy
that shares every untouched tensor with the module, and nothing is kept after an export.
"""

from __future__ import annotations

import contextlib
import contextvars
import copy
import dataclasses
import enum
import functools
import itertools
import os
from typing import Any, Callable, Iterator, Optional, cast

import torch
from torch import nn

from .._compat import (
    COMPILED_PREFIX,
    compiled_inner,
    set_swa_average_model,
    state_dict_metadata,
    swa_average_model,
    unwrap_compiled,
)
from .._files import atomic_folder
from ..config import PeftConfig, listed
from ..peft_model import PeftModel, get_peft_model
from ..quantization import dequantize_base_linears, keep_plain_layouts, plain_for_export
from ..serialization import check_adapter_tensors, get_peft_model_state_dict, nonfinite_keys
from ..tuners.registry import get_tuner

STATES_ATTR = "_lightning_peft_states"  # {model_attr: AdapterState} in the module's __dict__
ADAPTER_SUBDIR = "adapter"  # the export folders under PEFTCallback's export_dir
MERGED_SUBDIR = "merged"


# ---------------------------------------------------------------------------------------------
# config
# ---------------------------------------------------------------------------------------------
def resolve_peft_config(config: Any) -> PeftConfig:
    """A tuner config object from a config object, a dict / DictConfig with `peft_type`, or one with `_target_`."""
    if isinstance(config, PeftConfig):
        return copy.deepcopy(config)
    data = config
    try:
        from omegaconf import DictConfig, OmegaConf

        if isinstance(config, DictConfig):
            data = OmegaConf.to_container(config, resolve=True)
    except ImportError:  # pragma: no cover - omegaconf comes with hydra-core
        pass
    if not isinstance(data, dict):
        raise TypeError(
            f"config must be a tuner config (e.g. LoraConfig(...)) or a dict / DictConfig with "
            f"'peft_type' or '_target_', got {type(config).__name__}"
        )
    if "_target_" in data:
        from hydra.utils import instantiate

        built = instantiate(data, _convert_="all")
        if not isinstance(built, PeftConfig):
            raise TypeError(
                f"_target_={data['_target_']!r} built a {type(built).__name__}, not a tuner config "
                "(e.g. lightning_peft.LoraConfig)"
            )
        return built
    if "peft_type" not in data:
        raise ValueError(
            f"the tuner config {data!r} has neither 'peft_type' (e.g. LORA) nor '_target_' "
            "(e.g. lightning_peft.LoraConfig); say which tuner it is for"
        )
    return PeftConfig.from_dict(data)


# ---------------------------------------------------------------------------------------------
# files
# ---------------------------------------------------------------------------------------------
# One mechanism for every export (`lightning_peft/_files.py::atomic_folder`): the folder is filled beside
# the target, with whatever else goes into it (`extras`, e.g. the app's tokenizer), then swapped in whole.
ExportExtras = Optional[Callable[[str], None]]


def save_merged_model(model: nn.Module, directory: str, extras: ExportExtras = None) -> None:
    """`save_pretrained` for transformers models, else `model.safetensors` (a state dict) in `directory`;
    `extras(folder)` adds more files (e.g. a tokenizer) before the folder is put in place."""
    # an 8-/4-bit base is written in fp32, so that it loads without bitsandbytes
    with plain_for_export(model) as model, atomic_folder(directory) as tmp:
        if callable(getattr(model, "save_pretrained", None)):
            cast(Any, model).save_pretrained(tmp)  # a transformers model
        else:
            from safetensors.torch import save_model

            save_model(model, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
        if extras is not None:
            extras(tmp)


# ---------------------------------------------------------------------------------------------
# attribute paths ("model" or "backbone.encoder")
# ---------------------------------------------------------------------------------------------
def _get_path(obj: Any, path: str) -> Any:
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def _set_path(obj: Any, path: str, value: Any) -> None:
    head, _, last = path.rpartition(".")
    setattr(_get_path(obj, head) if head else obj, last, value)


def _children_names(module: nn.Module) -> str:
    names = [n for n, _ in module.named_children()]
    return ", ".join(names) if names else "none"


# ---------------------------------------------------------------------------------------------
# torch.compile: `torch.compile(model)` is a wrapper (`OptimizedModule`) holding the model as `_orig_mod`, so
# every state-dict key under it gains a `_orig_mod.` part. Checkpoints and exports use the keys without it
# (`plain_key`): the same names whether and wherever the user compiled, loadable either way.
# ---------------------------------------------------------------------------------------------


def plain_key(key: str) -> str:
    """`key` without the `_orig_mod.` parts that torch.compile's wrapper adds."""
    if COMPILED_PREFIX not in key:
        return key
    return ".".join(part for part in key.split(".") if part != COMPILED_PREFIX[:-1])


def is_compiled(model: Any) -> bool:
    """Whether `model` is `torch.compile(module)`'s wrapper (torch's `OptimizedModule`, kept private by torch)."""
    return isinstance(model, nn.Module) and compiled_inner(model) is not None and (hasattr(model, "dynamo_ctx"))


def recompiled(compiled: nn.Module, model: nn.Module) -> nn.Module:
    """`model` under a wrapper like `compiled` (same class, same compile options: `dynamo_ctx`)."""
    wrapper: Any = type(compiled)  # torch's OptimizedModule(mod, dynamo_ctx)
    return cast(nn.Module, wrapper(model, compiled.dynamo_ctx))


# ---------------------------------------------------------------------------------------------
# the adapter config in checkpoints: plain data (strings, numbers, lists, dicts), so a checkpoint still loads
# with torch.load(weights_only=True). It rides in the state dict's own metadata (`state_dict._metadata[""]`,
# which torch.save keeps and `load_state_dict` hands to the load pre-hook), so every checkpoint path carries it:
# full and weights-only saves, `trainer.save_checkpoint`, and it is checked before any weight is copied.
# ---------------------------------------------------------------------------------------------
CHECKPOINT_KEY = "lightning_peft"
# fields that change no tensor and no maths of a trained adapter: a resume may change them (e.g. lower the dropout)
_IGNORED_FIELDS = frozenset(
    {"inference_mode", "base_model_name_or_path", "revision", "auto_mapping", "peft_version", "lora_dropout"}
)


def plain(value: Any) -> Any:
    """`value` as plain data (what `torch.load(weights_only=True)` reads back)."""
    if isinstance(value, enum.Enum):
        return plain(value.value)
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (set, frozenset)):
        return sorted((plain(v) for v in value), key=repr)
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    to_dict = getattr(value, "to_dict", None)
    if callable(to_dict):
        return plain(to_dict())
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return plain(dataclasses.asdict(value))
    return repr(value)


def config_entry(config: PeftConfig) -> dict[str, Any]:
    return {"peft_type": str(plain(config.peft_type)), "config": plain(config.to_dict())}


def _comparable(value: Any) -> Any:
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return sorted(value)  # target / module name lists: the order means nothing
    return value


def config_differences(saved: dict[str, Any], current: dict[str, Any], was: str = "checkpoint") -> list[str]:
    """`field: checkpoint X vs now Y` for each field both configs have and that differs."""
    fields = sorted((set(saved) & set(current)) - _IGNORED_FIELDS)
    return [
        f"{f}: {was} {saved[f]!r} vs now {current[f]!r}"
        for f in fields
        if _comparable(saved[f]) != _comparable(current[f])
    ]


def checkpoint_adapter_configs(checkpoint: Any) -> dict[str, dict[str, Any]]:
    """The adapter configs a checkpoint (a path, a loaded checkpoint dict or its `state_dict`) was saved with:
    `{model_attr: {"adapter_name": active, "peft_type": ..., "config": {...}, "adapters": {name: {...}}}}`."""
    if isinstance(checkpoint, (str, os.PathLike)):
        checkpoint = torch.load(checkpoint, map_location="cpu", weights_only=True)
    state_dict = checkpoint.get("state_dict", checkpoint) if isinstance(checkpoint, dict) else checkpoint
    metadata = state_dict_metadata(state_dict) or {}
    return valid_entries((metadata.get("") or {}).get(CHECKPOINT_KEY))


def valid_entries(raw: Any) -> dict[str, dict[str, Any]]:
    """The checkpoint's `lightning_peft` metadata (see `checkpoint_adapter_configs`), refused with a clear message
    when it is not of that shape (an edited or foreign checkpoint), before any module is built or weight copied."""
    if not raw:
        return {}

    def bad(what: str) -> ValueError:
        return ValueError(
            f"the checkpoint's adapter metadata (state_dict._metadata['']['{CHECKPOINT_KEY}']) is malformed: {what}; "
            "it was not written by PEFTCallback / PEFTMixin or was edited. Nothing was loaded"
        )

    if not isinstance(raw, dict):
        raise bad(f"a {type(raw).__name__}, not a dict of model_attr -> entry")
    for attr, entry in raw.items():
        if not isinstance(entry, dict):
            raise bad(f"the entry of {attr!r} is a {type(entry).__name__}, not a dict")
        adapters = entry.get("adapters") or {entry.get("adapter_name", "default"): entry}
        if not isinstance(adapters, dict):
            raise bad(f"{attr!r}: 'adapters' is a {type(adapters).__name__}, not a dict of name -> config")
        for name, adapter in adapters.items():
            if not isinstance(adapter, dict) or not isinstance(adapter.get("config"), dict):
                raise bad(f"{attr!r}: adapter {name!r} has no 'config' dict")
        if entry.get("adapter_name", next(iter(adapters), None)) not in adapters:
            raise bad(f"{attr!r}: the active adapter {entry.get('adapter_name')!r} is not among {sorted(adapters)}")
    return dict(raw)


# ---------------------------------------------------------------------------------------------
# the states: one per (LightningModule, model_attr)
# ---------------------------------------------------------------------------------------------
def validate_model_attr(model_attr: Any) -> None:
    if not isinstance(model_attr, str) or not model_attr or model_attr.startswith(".") or model_attr.endswith("."):
        raise ValueError(f"model_attr must name the LightningModule attribute holding the model, got {model_attr!r}")


def log_trainable_parameters(trainer: Any, state: "AdapterState") -> None:
    """Trainable / total parameters to the console and every logger of the trainer (at every fit)."""
    from lightning.pytorch.utilities.rank_zero import rank_zero_info

    trainable, total, percent = state.describe_counts()
    rank_zero_info(
        f"lightning_peft: {state.config.peft_type} adapter {state.adapter_name!r} on "
        f"`{state.model_attr}`: trainable params {trainable:,d} of {total:,d} ({percent:.4f}%)"
    )
    if trainer is None:
        return
    key = "peft" if state.model_attr == "model" else f"peft/{state.model_attr}"
    metrics = {
        f"{key}/trainable_params": float(trainable),
        f"{key}/total_params": float(total),
        f"{key}/trainable_percent": percent,
    }
    for logger in trainer.loggers:
        logger.log_metrics(metrics, step=trainer.global_step)


def refresh_module_copies(trainer: Any, module: nn.Module) -> None:
    """Callbacks that copied the LightningModule before the tuner went in get a new copy.

    `StochasticWeightAveraging` deep-copies the module in its `setup` (`_average_model`) and later pairs that copy's
    parameters with the module's by position: a copy made before injection (SWA listed before PEFTCallback, or any
    PEFTMixin module, which injects in `configure_model`, after every callback's `setup`) pairs base weights with
    adapter tensors (a shape error, or silently wrong weights)."""
    if trainer is None:
        return
    from lightning.pytorch.callbacks import StochasticWeightAveraging

    for callback in trainer.callbacks:
        if isinstance(callback, StochasticWeightAveraging) and swa_average_model(callback) is not None:
            set_swa_average_model(callback, copy.deepcopy(module))


class AdapterState:
    """The adapter(s) of one model of a LightningModule (`module.<model_attr>`): configs, checkpoint rules, exports.

    `config` / `adapter_name` are the adapter being trained (the active one); earlier ones (a second `fit` with
    another `adapter_name`) stay in the model, frozen, and in every checkpoint.
    """

    def __init__(
        self,
        config: PeftConfig,
        model_attr: str = "model",
        adapter_name: str = "default",
        owner: str = "PEFTCallback",
        owner_obj: Any = None,
    ) -> None:
        validate_model_attr(model_attr)
        self.config = config
        self.model_attr = model_attr
        self.adapter_name = adapter_name
        self.owner = owner  # who applies it: "PEFTCallback", "PEFTMixin", "load_from_checkpoint"
        self.owner_obj = owner_obj  # the PEFTCallback applying it in the current fit (None for the mixin)
        self.peft: Optional[PeftModel] = None
        self.given: dict[str, dict[str, Any]] = {}  # adapter name -> config_entry of the config as given
        self.adapter_keys: frozenset[str] = frozenset()  # LightningModule state-dict keys of every adapter
        self.trainable_counts: Optional[tuple[int, int]] = None
        self._hooks: list[Any] = []
        # a checkpoint whose adapter holds NaN / inf is refused unless this is True; exports and merges never
        # take a non-finite adapter
        self.allow_nonfinite = False

    # ---- lookup -------------------------------------------------------------------------------
    @property
    def prefix(self) -> str:
        return self.model_attr + "."

    @property
    def can_merge(self) -> bool:
        """Whether the tuner has weights to fold into the model (prompt learning has none)."""
        return get_tuner(self.config.peft_type).can_merge

    @property
    def injected(self) -> bool:
        return self.peft is not None

    def describe(self) -> str:
        return f"{self.owner}(model_attr={self.model_attr!r}, adapter_name={self.adapter_name!r})"

    def find_model(self, module: nn.Module) -> Optional[nn.Module]:
        """The model under `model_attr`, or None while it is not built yet (missing or None)."""
        try:
            model = _get_path(module, self.model_attr)
        except AttributeError:
            return None
        if model is not None and not isinstance(model, nn.Module):
            raise TypeError(
                f"{type(module).__name__}.{self.model_attr} is a {type(model).__name__}, not a "
                "torch.nn.Module; pass model_attr= the attribute that holds the model"
            )
        return model

    def missing_model_error(self, module: nn.Module, who: str) -> AttributeError:
        return AttributeError(
            f"{who}(model_attr={self.model_attr!r}): {type(module).__name__} has no model in "
            f"`self.{self.model_attr}` (its child modules are: {_children_names(module)}). Keep the model in "
            f"`self.{self.model_attr}` or pass model_attr= the attribute that holds it; a model built in "
            "configure_model() must exist once configure_model() returns."
        )

    # ---- injection ----------------------------------------------------------------------------
    def inject(self, module: nn.Module, who: str = "PEFTCallback") -> bool:
        """Wrap the model with the adapter (once). Returns True when it injected now."""
        if self.injected:
            return False
        model = self.find_model(module)
        if model is None:
            raise self.missing_model_error(module, who)
        if isinstance(unwrap_compiled(model), PeftModel):
            raise ValueError(
                f"{type(module).__name__}.{self.model_attr} is already a PeftModel; give {who} the "
                "plain model (it applies the tuner itself) or drop the tuner config"
            )
        given = config_entry(self.config)
        # a model compiled before injection (`self.model = torch.compile(model)` in __init__): the tuner goes into
        # the model itself and the compiled wrapper, with the user's options, goes around the PeftModel
        peft = get_peft_model(unwrap_compiled(model), self.config, self.adapter_name)
        keep_plain_layouts(peft)  # a 4-bit base: bitsandbytes' CPU repacking in validation would break training
        _set_path(module, self.model_attr, recompiled(model, peft) if is_compiled(model) else peft)
        self.given = {self.adapter_name: given}
        self._adopt(module, peft)
        return True

    def apply(
        self,
        module: nn.Module,
        trainer: Any,
        who: str,
        fitting: bool,
        config: Optional[PeftConfig] = None,
        adapter_name: Optional[str] = None,
    ) -> None:
        """Inject the tuner (first time), or make `adapter_name` with `config` the adapter that trains (added next to
        the earlier ones when new); log the parameter counts at every fit."""
        if not self.injected:
            if config is not None:
                self.config = config
            if adapter_name is not None:
                self.adapter_name = adapter_name
            self.inject(module, who=who)
            refresh_module_copies(trainer, module)
        elif config is not None or adapter_name is not None:
            self.switch(module, config or self.config, adapter_name or self.adapter_name, who)
            refresh_module_copies(trainer, module)
        if fitting:
            log_trainable_parameters(trainer, self)

    def switch(self, module: nn.Module, config: PeftConfig, adapter_name: str, who: str) -> None:
        """Train `adapter_name`: the same adapter again (same config), or a new one added beside the others (same
        tuner type). Refused before anything changes: the same name with another config, another tuner type."""
        peft = self.require_peft("add an adapter")
        entry = config_entry(config)
        if adapter_name in self.given:
            diffs = config_differences(self.given[adapter_name]["config"], entry["config"], was="trained with")
            if entry["peft_type"] != self.given[adapter_name]["peft_type"]:
                diffs.insert(0, f"peft_type: {self.given[adapter_name]['peft_type']!r} vs {entry['peft_type']!r}")
            if diffs:
                raise ValueError(
                    f"{who}(model_attr={self.model_attr!r}, adapter_name={adapter_name!r}): "
                    f"{type(module).__name__}.{self.model_attr} already holds adapter {adapter_name!r}, trained with "
                    f"another config ({'; '.join(diffs)}). Pass a new adapter_name= to train a second adapter beside "
                    "it, or the config it was trained with to train it on; nothing was changed"
                )
            if adapter_name != self.adapter_name:
                peft.set_adapter(adapter_name)
                self.adapter_name, self.config = adapter_name, peft.peft_config[adapter_name]
            return
        if entry["peft_type"] != self.given[self.adapter_name]["peft_type"]:
            raise ValueError(
                f"{who}(model_attr={self.model_attr!r}, adapter_name={adapter_name!r}): "
                f"{type(module).__name__}.{self.model_attr} holds {self.given[self.adapter_name]['peft_type']} "
                f"adapter(s) {listed(sorted(self.given))}; a {entry['peft_type']} adapter cannot be added to it (one "
                "model holds adapters of one tuner type). Use the same tuner type, or a fresh model; nothing was "
                "changed"
            )
        peft.add_adapter(adapter_name, config)
        peft.set_adapter(adapter_name)  # it trains; the earlier adapters stay as trained, frozen
        self.given[adapter_name] = entry
        self.adapter_name, self.config = adapter_name, config
        self._adopt(module, peft)

    def _adopt(self, module: nn.Module, peft: PeftModel) -> None:
        self.peft = peft
        state = peft.state_dict(keep_vars=True)
        trainable = {k for k, v in state.items() if v.requires_grad}
        owners = {k.rpartition(".")[0] for k in trainable}
        buffers = {n for n, _ in peft.named_buffers(remove_duplicate=False)}
        adapter = trainable | {k for k in state if k in buffers and k.rpartition(".")[0] in owners}
        # earlier adapters (frozen now) stay adapter tensors: saved and required in every checkpoint
        self.adapter_keys = self.adapter_keys | frozenset(plain_key(self.prefix + k) for k in adapter)  # as saved
        self.trainable_counts = peft.get_nb_trainable_parameters()
        if not self._hooks:
            self._hooks = [
                module.register_state_dict_post_hook(functools.partial(_state_dict_post_hook, self)),
                module.register_load_state_dict_pre_hook(functools.partial(_load_pre_hook, self)),
                module.register_load_state_dict_post_hook(functools.partial(_load_post_hook, self)),
            ]

    def describe_counts(self) -> tuple[int, int, float]:
        trainable, total = self.trainable_counts or (0, 0)
        return trainable, total, (100.0 * trainable / total if total else 0.0)

    def require_peft(self, action: str) -> PeftModel:
        if self.peft is None:
            raise ValueError(
                f"cannot {action}: the tuner has not been applied yet (it is applied at setup / configure_model)"
            )
        return self.peft

    # ---- checkpoints --------------------------------------------------------------------------
    def checkpoint_entry(self) -> dict[str, Any]:
        active = self.given.get(self.adapter_name) or config_entry(self.config)
        return {"adapter_name": self.adapter_name, **copy.deepcopy(active), "adapters": copy.deepcopy(self.given)}

    def check_entry(self, entry: dict[str, Any], where: str) -> None:
        """Refuse (before anything is copied) a checkpoint whose adapters were trained with other configs."""
        saved = entry.get("adapters") or {
            entry.get("adapter_name", "default"): {"peft_type": entry.get("peft_type"), "config": entry.get("config")}
        }
        problems = []
        for name, current in self.given.items():
            old = saved.get(name)
            if not isinstance(old, dict):
                continue  # the key check names the missing tensors
            if old.get("peft_type") != current["peft_type"]:
                problems.append(
                    f"adapter {name!r}: peft_type: checkpoint {old.get('peft_type')!r} vs now {current['peft_type']!r}"
                )
            elif isinstance(old.get("config"), dict):
                diffs = config_differences(old["config"], current["config"])
                if diffs:
                    problems.append(f"adapter {name!r}: " + "; ".join(diffs))
        extra = sorted(set(saved) - set(self.given))
        if extra:
            problems.append(
                f"adapter(s) {listed(extra)} are in the checkpoint but not in the model "
                f"(it holds {listed(sorted(self.given))})"
            )
        if problems:
            raise ValueError(
                f"refusing to load {where}: the adapter config of `{self.model_attr}` "
                f"differs from the model's ({'; '.join(problems)}). Build the module with the config the checkpoint "
                "was trained with (PEFTCallback.load_from_checkpoint(cls, path) does; "
                "lightning_peft.lightning.checkpoint_adapter_configs(path) shows it); nothing was loaded."
            )

    def read_adapter_tensors(self, path: str) -> dict[str, torch.Tensor]:
        """This model's adapter tensors from a `.ckpt` (weights only, nothing else loaded), keyed as in
        `self.peft.state_dict()`; the module in memory is not touched."""
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        state_dict = checkpoint.get("state_dict") or {}
        entry = checkpoint_adapter_configs(state_dict).get(self.model_attr)
        if entry is not None:
            self.check_entry(entry, f"the checkpoint {path}")
        missing = sorted(k for k in self.adapter_keys if k not in state_dict)
        if missing:
            raise ValueError(
                f"the checkpoint {path} lacks {len(missing)} adapter tensors of `{self.model_attr}` "
                f"({listed(missing, 3)}); pass export='last' to export the adapter in memory"
            )
        return {k[len(self.prefix) :]: state_dict[k] for k in self.adapter_keys}

    # ---- merged model and exports -------------------------------------------------------------
    def working_copy(self, tensors: Optional[dict[str, torch.Tensor]] = None, for_merge: bool = False) -> PeftModel:
        """A copy of the PeftModel that shares every tensor it will not change with the model in memory: only the
        adapters (and, `for_merge`, the base weights of the targeted layers, which a merge overwrites) are copied.
        `tensors` (keyed as `self.peft.state_dict()`) replace the copy's adapter tensors. The model in memory is not
        touched; the copy's extra memory is freed with it."""
        from ..tuners.base import BaseTunerLayer

        peft = self.require_peft("copy the adapter")
        own = {id(v) for k, v in peft.state_dict(keep_vars=True).items() if self.prefix + k in self.adapter_keys}
        if for_merge:
            for layer in peft.modules():
                if isinstance(layer, BaseTunerLayer):
                    base = layer.get_base_layer()
                    own.update(id(t) for t in itertools.chain(base.parameters(), base.buffers()))
        memo: dict[int, Any] = {
            id(t): t
            for t in itertools.chain(peft.parameters(), peft.buffers())
            if id(t) not in own and not t.requires_grad
        }
        copy_ = copy.deepcopy(peft, memo)
        if tensors:
            target = copy_.state_dict(keep_vars=True)
            wrong = sorted(k for k, v in tensors.items() if k not in target or target[k].shape != v.shape)
            if wrong:
                raise ValueError(f"adapter tensors that do not fit `{self.model_attr}`: {listed(wrong, 3)}")
            with torch.no_grad():
                for key, value in tensors.items():
                    target[key].copy_(value)
        return copy_

    def merged_model(self, tensors: Optional[dict[str, torch.Tensor]] = None, dequantize: bool = False) -> nn.Module:
        """The model with the adapter merged in, the module in memory left as it is. Costs a copy of the targeted
        layers' base weights (and of the adapters); every other tensor is shared with the module in memory.
        `dequantize`: an 8-/4-bit base is dequantized to fp32 before the merge (an exact add, as the merged/ export
        is written in fp32), instead of merged into the quantized layers (dequantize, add, requantize: rounded)."""
        if not self.can_merge:
            raise ValueError(f"cannot merge: {self.config.peft_type} has no weights to merge into the model")
        copy_ = self.working_copy(tensors, for_merge=True)
        self.check_finite("merge it into the base model", copy_)
        if dequantize:
            dequantize_base_linears(copy_)  # replaces the copy's layers: the module in memory keeps its own
        return copy_.merge_and_unload()

    def save_adapter(
        self,
        directory: str,
        is_main_process: bool = True,
        extras: ExportExtras = None,
        tensors: Optional[dict[str, torch.Tensor]] = None,
    ) -> None:
        """HF PEFT format (`adapter_config.json` + `adapter_model.safetensors`), and whatever `extras(folder)`
        adds, written into a new folder that replaces `directory` whole. `tensors` (e.g. read from the best
        checkpoint) replace the adapter's tensors in the file; the model in memory is not touched."""
        peft = self.require_peft("save the adapter")
        if not is_main_process:
            return
        kwargs: dict[str, Any] = {}
        if tensors:
            kwargs["state_dict"] = {**peft.state_dict(), **tensors}
        self.check_finite(f"export it to {directory}", state_dict=kwargs.get("state_dict"))
        with atomic_folder(directory) as tmp:
            peft.save_pretrained(tmp, selected_adapters=[self.adapter_name], **kwargs)  # nested: writes into tmp
            if extras is not None:
                extras(tmp)

    def check_finite(self, action: str, peft: Optional[PeftModel] = None, state_dict: Optional[dict] = None) -> None:
        """Refuse to export or merge an adapter holding NaN / inf (a diverged run): it would write a broken adapter
        or fill the merged model's weights with NaN. Nothing is written or changed."""
        peft = peft or self.require_peft(action)
        bad = nonfinite_keys(get_peft_model_state_dict(peft, state_dict=state_dict, adapter_name=self.adapter_name))
        if bad:
            raise ValueError(
                f"adapter {self.adapter_name!r} holds NaN or inf values in {len(bad)} tensors "
                f"({listed(bad)}); refusing to {action}. Training diverged: lower the learning rate or "
                "resume from an earlier checkpoint"
            )


# ---------------------------------------------------------------------------------------------
# torch hooks on the LightningModule (one set per state: each touches only its model's keys)
# ---------------------------------------------------------------------------------------------
def _state_dict_post_hook(
    state: AdapterState, module: nn.Module, state_dict: dict, prefix: str, local_metadata: Any
) -> None:
    if state.peft is None:
        return
    for key in [k for k in state_dict if k.startswith(prefix)]:
        name = plain_key(key[len(prefix) :])  # torch.compile's `_orig_mod.` parts out
        if name.startswith(state.prefix) and name not in state.adapter_keys:
            del state_dict[key]  # the frozen base
    _rename_keys(state_dict, prefix, state, plain_key)  # the adapter's keys as an uncompiled model has them
    if isinstance(local_metadata, dict):
        local_metadata.setdefault(CHECKPOINT_KEY, {})[state.model_attr] = state.checkpoint_entry()


# set while PEFTCallback.load_from_checkpoint has Lightning build the module with an empty state dict. The load
# pre-hook cannot tell that load from a strict one by `strict`: torch hands every pre-hook strict=True
_WITHOUT_WEIGHTS: contextvars.ContextVar[bool] = contextvars.ContextVar("lightning_peft_without_weights", default=False)


@contextlib.contextmanager
def building_without_weights() -> Iterator[None]:
    token = _WITHOUT_WEIGHTS.set(True)
    try:
        yield
    finally:
        _WITHOUT_WEIGHTS.reset(token)


def _load_pre_hook(
    state: AdapterState,
    module: nn.Module,
    state_dict: dict,
    prefix: str,
    local_metadata: Any,
    strict: bool,
    missing_keys: list,
    unexpected_keys: list,
    error_msgs: list,
) -> None:
    if state.peft is None:
        return
    _rename_keys(state_dict, prefix, state, plain_key)  # a checkpoint of a compiled model: `_orig_mod.` out
    present = [k for k in state.adapter_keys if prefix + k in state_dict]
    if not state_dict and _WITHOUT_WEIGHTS.get():
        return  # PEFTCallback.load_from_checkpoint building the module: the weights come after the adapters
    entry = valid_entries((local_metadata or {}).get(CHECKPOINT_KEY)).get(state.model_attr)
    if entry is not None:
        state.check_entry(entry, f"this checkpoint into {type(module).__name__}")
    params = {plain_key(k): v for k, v in state.peft.state_dict(keep_vars=True).items()}
    missing = sorted(k for k in state.adapter_keys if prefix + k not in state_dict)
    shapes = sorted(
        f"{k}: checkpoint {tuple(state_dict[prefix + k].shape)} vs model {tuple(params[k[len(state.prefix) :]].shape)}"
        for k in present
        if tuple(state_dict[prefix + k].shape) != tuple(params[k[len(state.prefix) :]].shape)
    )
    if not missing and not shapes:
        incoming = {k: state_dict[prefix + k] for k in present if isinstance(state_dict[prefix + k], torch.Tensor)}
        expected = {k: params[k[len(state.prefix) :]].dtype for k in incoming}
        try:
            check_adapter_tensors(
                incoming,
                expected,
                state.allow_nonfinite,
                what="the checkpoint's adapter tensors",
                opt_in="set lightning_peft.lightning._state.get_state(module).allow_nonfinite = True to load it anyway",
            )
        except ValueError as err:
            raise ValueError(
                f"refusing to load this state into {type(module).__name__}: {err}; nothing was loaded"
            ) from None
        names = _module_names(module, state)  # the module's own names (`_orig_mod.` where it is compiled)
        _rename_keys(state_dict, prefix, state, lambda name: names.get(name, name))
        return
    problems = []
    if missing:
        problems.append(
            f"{len(missing)} of {len(state.adapter_keys)} adapter tensors are missing: {listed(missing, 3)}"
        )
    if shapes:
        problems.append(f"shape mismatches: {'; '.join(shapes[:3])}")
    raise ValueError(
        f"refusing to load this state into {type(module).__name__}: it does not hold the adapter "
        f"{state.adapter_name!r} ({state.config.peft_type}) of `self.{state.model_attr}` "
        f"({'; '.join(problems)}). It was saved without the adapter or for a different tuner config / model; "
        "nothing was loaded."
    )


def _rename_keys(state_dict: dict, prefix: str, state: AdapterState, rename: Callable[[str], str]) -> None:
    """Rename, in place and in order, the keys of `state_dict` under the model (`prefix` + `model_attr`)."""
    renames = {}
    for key in state_dict:
        if key.startswith(prefix) and plain_key(key[len(prefix) :]).startswith(state.prefix):
            new = prefix + rename(key[len(prefix) :])
            if new != key:
                renames[key] = new
    if renames:
        items = list(state_dict.items())
        state_dict.clear()
        state_dict.update((renames.get(k, k), v) for k, v in items)


def _module_names(module: nn.Module, state: AdapterState) -> dict[str, str]:
    """The adapter's checkpoint keys (`plain_key`) -> the module's names for them."""
    named = [*module.named_parameters(remove_duplicate=False), *module.named_buffers(remove_duplicate=False)]
    return {plain_key(n): n for n, _ in named if plain_key(n) in state.adapter_keys}


def _load_post_hook(state: AdapterState, module: nn.Module, incompatible_keys: Any) -> None:
    if state.peft is None:
        return
    missing = incompatible_keys.missing_keys
    frozen = [k for k in missing if plain_key(k).startswith(state.prefix) and plain_key(k) not in state.adapter_keys]
    for key in frozen:
        missing.remove(key)


def get_states(module: nn.Module) -> dict[str, AdapterState]:
    """Every adapter state of the module, by model_attr."""
    return cast(dict[str, AdapterState], module.__dict__.get(STATES_ATTR) or {})


def get_state(module: nn.Module, model_attr: Optional[str] = None) -> Optional[AdapterState]:
    """The state of `model_attr`; without it, the module's only state (or that of `model` when it has several)."""
    states = get_states(module)
    if model_attr is not None:
        return states.get(model_attr)
    if len(states) == 1:
        return next(iter(states.values()))
    return states.get("model") or next(iter(states.values()), None)


def attach_state(module: nn.Module, state: AdapterState) -> AdapterState:
    """Register `state` for its model_attr; two states on one model (the same or nested attributes) are refused."""
    states = module.__dict__.setdefault(STATES_ATTR, {})
    for attr, other in states.items():
        if attr == state.model_attr:
            raise ValueError(
                f"{type(module).__name__}.{attr} gets an adapter from both {other.describe()} and "
                f"{state.describe()}; use one of them (a second adapter on the same model: a second fit with "
                "another adapter_name)"
            )
        if attr.startswith(state.prefix) or state.model_attr.startswith(other.prefix):
            raise ValueError(
                f"{other.describe()} and {state.describe()} put adapters on nested models of "
                f"{type(module).__name__} ({attr!r} / {state.model_attr!r}); give each one a separate model"
            )
    states[state.model_attr] = state
    return state


def all_adapter_keys(module: nn.Module) -> frozenset[str]:
    """The LightningModule state-dict keys of every adapter of every state."""
    keys: frozenset[str] = frozenset()
    for state in get_states(module).values():
        keys = keys | state.adapter_keys
    return keys


def allow_weights_only_resume(checkpoint: dict) -> bool:
    """Let `trainer.fit(ckpt_path=<weights-only .ckpt>)` resume: adapter and loop position come back, the
    optimizer and LR schedulers start fresh (Lightning would refuse a checkpoint without their states)."""
    if "state_dict" not in checkpoint or "optimizer_states" in checkpoint:
        return False
    checkpoint["optimizer_states"] = []
    checkpoint.setdefault("lr_schedulers", [])
    return True
