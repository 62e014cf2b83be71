"""What the callback and the mixin share: one `AdapterState` per LightningModule.

It injects the tuner into `module.<model_attr>` (through `get_peft_model`), and installs three
torch hooks on the LightningModule so that every checkpoint path of Lightning (full saves,
weights-only saves, `trainer.test(ckpt_path=...)`, `load_from_checkpoint`) sees adapter-only state:

- a `state_dict` post-hook drops every frozen tensor of the model (the base), so a `.ckpt` holds
  exactly the adapter's tensors (plus whatever lives outside `model_attr`);
- a `load_state_dict` pre-hook checks, before anything is copied, that the incoming state holds
  every adapter tensor with the right shape, and refuses it otherwise (never a half load); after a
  merge it first puts the adapter back (see `restore_unmerged`);
- a `load_state_dict` post-hook forgives the base weights that are "missing" from such a state, so
  `strict_loading=True` keeps catching unexpected keys.

Hooks rather than callback hooks because Lightning loads module weights before any callback's
`on_load_checkpoint` and skips callbacks entirely for weights-only saves.
"""

from __future__ import annotations

import copy
import functools
import os
from typing import Any, Callable, Optional, cast

import torch
from torch import nn

from .._files import atomic_folder
from ..config import PeftConfig, listed
from ..peft_model import PeftModel, get_peft_model
from ..serialization import check_adapter_tensors, get_peft_model_state_dict, nonfinite_keys
from ..tuners.registry import get_tuner

STATE_ATTR = "_lightning_peft_state"
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
    from ..quantization import dequantized_copy, int8_layers

    if int8_layers(model):  # an 8-bit base: write it in fp32 so that it loads without bitsandbytes
        model = dequantized_copy(model)
    with atomic_folder(directory) as tmp:
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
COMPILED_PART = "_orig_mod."


def plain_key(key: str) -> str:
    """`key` without the `_orig_mod.` parts that torch.compile's wrapper adds."""
    if COMPILED_PART not in key:
        return key
    return ".".join(part for part in key.split(".") if part != COMPILED_PART[:-1])


def is_compiled(model: Any) -> bool:
    """Whether `model` is `torch.compile(module)`'s wrapper (torch's `OptimizedModule`, kept private by torch)."""
    return (
        isinstance(model, nn.Module)
        and isinstance(getattr(model, "_orig_mod", None), nn.Module)
        and (hasattr(model, "dynamo_ctx"))
    )


def uncompiled(model: Any) -> Any:
    while is_compiled(model):
        model = model._orig_mod
    return model


def recompiled(compiled: nn.Module, model: nn.Module) -> nn.Module:
    """`model` under a wrapper like `compiled` (same class, same compile options: `dynamo_ctx`)."""
    wrapper: Any = type(compiled)  # torch's OptimizedModule(mod, dynamo_ctx)
    return cast(nn.Module, wrapper(model, compiled.dynamo_ctx))


# ---------------------------------------------------------------------------------------------
# the state
# ---------------------------------------------------------------------------------------------
def validate_model_attr(model_attr: Any) -> None:
    if not isinstance(model_attr, str) or not model_attr or model_attr.startswith(".") or model_attr.endswith("."):
        raise ValueError(f"model_attr must name the LightningModule attribute holding the model, got {model_attr!r}")


def log_trainable_parameters(trainer: Any, state: "AdapterState") -> None:
    """Once per module: trainable / total parameters to the console and every logger of the trainer."""
    if state.logged:
        return
    state.logged = True
    from lightning.pytorch.utilities.rank_zero import rank_zero_info

    trainable, total, percent = state.describe_counts()
    rank_zero_info(
        f"lightning_peft: {state.config.peft_type} adapter {state.adapter_name!r} on "
        f"`{state.model_attr}`: trainable params {trainable:,d} of {total:,d} ({percent:.4f}%)"
    )
    if trainer is None:
        return
    metrics = {
        "peft/trainable_params": float(trainable),
        "peft/total_params": float(total),
        "peft/trainable_percent": percent,
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
        if isinstance(callback, StochasticWeightAveraging) and callback._average_model is not None:
            callback._average_model = cast(Any, copy.deepcopy(module))


class AdapterState:
    """The adapter of one LightningModule: config, where the model lives, and checkpoint rules."""

    def __init__(
        self, config: PeftConfig, model_attr: str = "model", adapter_name: str = "default", owner: str = "callback"
    ) -> None:
        validate_model_attr(model_attr)
        self.config = config
        self.model_attr = model_attr
        self.adapter_name = adapter_name
        self.owner = owner
        self.peft: Optional[PeftModel] = None
        self.merged = False
        self.adapter_keys: frozenset[str] = frozenset()  # LightningModule state-dict keys of the adapter
        self.trainable_counts: Optional[tuple[int, int]] = None
        self.logged = False
        self._snapshot: Optional[dict[str, torch.Tensor]] = None  # what `restore_unmerged` needs after a merge
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
        return self.peft is not None or self.merged

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
        if isinstance(uncompiled(model), PeftModel):
            raise ValueError(
                f"{type(module).__name__}.{self.model_attr} is already a PeftModel; give {who} the "
                "plain model (it applies the tuner itself) or drop the tuner config"
            )
        # a model compiled before injection (`self.model = torch.compile(model)` in __init__): the tuner goes into
        # the model itself and the compiled wrapper, with the user's options, goes around the PeftModel
        peft = get_peft_model(uncompiled(model), self.config, self.adapter_name)
        _set_path(module, self.model_attr, recompiled(model, peft) if is_compiled(model) else peft)
        self._adopt(module, peft)
        return True

    def apply(self, module: nn.Module, trainer: Any, who: str, fitting: bool) -> None:
        """Inject the tuner (once) and log the parameter counts; after a merge, a new fit first puts the adapter
        back."""
        if not self.injected:
            self.inject(module, who=who)
            log_trainable_parameters(trainer, self)
        elif self.merged and fitting:
            self.restore_unmerged(module)  # train on: the adapter as it was before the merge
        else:
            return
        refresh_module_copies(trainer, module)

    def _adopt(self, module: nn.Module, peft: PeftModel) -> None:
        self.peft = peft
        self.merged = False
        state = peft.state_dict(keep_vars=True)
        trainable = {k for k, v in state.items() if v.requires_grad}
        owners = {k.rpartition(".")[0] for k in trainable}
        buffers = {n for n, _ in peft.named_buffers(remove_duplicate=False)}
        adapter = trainable | {k for k in state if k in buffers and k.rpartition(".")[0] in owners}
        self.adapter_keys = frozenset(plain_key(self.prefix + k) for k in adapter)  # as checkpoints hold them
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

    # ---- merge --------------------------------------------------------------------------------
    def merge_and_unload(self, module: nn.Module) -> nn.Module:
        """Merge the adapter into the base weights and put the plain model back under `model_attr`.

        A CPU copy of the adapter and of the base tensors the merge overwrites is kept, so that a later
        `trainer.test(ckpt_path=...)` / `fit` can put the adapter back exactly (`restore_unmerged`).
        """
        if self.merged:
            return _get_path(module, self.model_attr)
        peft = self.require_peft("merge")
        self.check_finite("merge it into the base model")
        snapshot = _merge_snapshot(peft)
        merged = peft.merge_and_unload()
        _set_path(module, self.model_attr, merged)
        self.peft = None
        self.merged = True
        self._snapshot = snapshot
        return merged

    def restore_unmerged(self, module: nn.Module) -> PeftModel:
        """Undo `merge_and_unload` exactly: re-inject the tuner, then put back the kept base tensors and adapter."""
        if not self.merged:
            return self.require_peft("restore")
        model = _get_path(module, self.model_attr)
        peft = get_peft_model(model, self.config, self.adapter_name)
        snapshot = self._snapshot or {}
        result = peft.load_state_dict(snapshot, strict=False)
        if result.unexpected_keys:  # the model under model_attr was replaced since the merge
            raise RuntimeError(
                f"cannot put the adapter back into {type(module).__name__}.{self.model_attr}: it no "
                f"longer has {result.unexpected_keys[:3]}; was the model replaced after the merge?"
            )
        _set_path(module, self.model_attr, peft)
        self._snapshot = None
        self._adopt(module, peft)
        return peft

    def require_peft(self, action: str) -> PeftModel:
        if self.peft is None:
            if self.merged:
                raise ValueError(
                    f"cannot {action}: the adapter was merged into the base model (merge_and_unload); "
                    "load a checkpoint or an adapter folder to get it back"
                )
            raise ValueError(
                f"cannot {action}: the tuner has not been applied yet (it is applied at setup / configure_model)"
            )
        return self.peft

    # ---- files --------------------------------------------------------------------------------
    def save_adapter(self, directory: str, is_main_process: bool = True, extras: ExportExtras = None) -> None:
        """HF PEFT format (`adapter_config.json` + `adapter_model.safetensors`), and whatever `extras(folder)`
        adds, written into a new folder that replaces `directory` whole."""
        peft = self.require_peft("save the adapter")
        if not is_main_process:
            return
        self.check_finite(f"export it to {directory}")
        with atomic_folder(directory) as tmp:
            peft.save_pretrained(tmp, selected_adapters=[self.adapter_name])  # nested: writes straight into tmp
            if extras is not None:
                extras(tmp)

    def check_finite(self, action: str) -> None:
        """Refuse to export or merge an adapter holding NaN / inf (a diverged run): it would write a broken adapter
        or fill the merged model's weights with NaN. Nothing is written or changed."""
        peft = self.require_peft(action)
        bad = nonfinite_keys(get_peft_model_state_dict(peft, adapter_name=self.adapter_name))
        if bad:
            raise ValueError(
                f"adapter {self.adapter_name!r} holds NaN or inf values in {len(bad)} tensors "
                f"({listed(bad)}); refusing to {action}. Training diverged: lower the learning rate or "
                "resume from an earlier checkpoint"
            )


def _merge_snapshot(peft: PeftModel) -> dict[str, torch.Tensor]:
    """CPU copies (keyed as in `peft.state_dict()`) of the adapter and of every base tensor a merge overwrites."""
    from ..tuners.base import BaseTunerLayer, ModulesToSaveWrapper

    names = {id(m): n for n, m in peft.named_modules()}
    touched_prefixes = []
    for module in peft.modules():
        if isinstance(module, BaseTunerLayer):
            touched_prefixes.append(names[id(module.get_base_layer())] + ".")
        elif isinstance(module, ModulesToSaveWrapper):
            touched_prefixes.append(names[id(module.original_module)] + ".")
    prefixes = tuple(touched_prefixes)
    snapshot = {}
    for key, value in peft.state_dict(keep_vars=True).items():
        if value.requires_grad or key.startswith(prefixes):
            snapshot[key] = value.detach().to("cpu", copy=True)
    return snapshot


# ---------------------------------------------------------------------------------------------
# torch hooks on the LightningModule
# ---------------------------------------------------------------------------------------------
def _state_dict_post_hook(
    state: AdapterState, module: nn.Module, state_dict: dict, prefix: str, local_metadata: Any
) -> None:
    if state.peft is None:  # merged (the plain model is the state) or not injected yet
        return
    for key in [k for k in state_dict if k.startswith(prefix)]:
        name = plain_key(key[len(prefix) :])  # torch.compile's `_orig_mod.` parts out
        if name.startswith(state.prefix) and name not in state.adapter_keys:
            del state_dict[key]  # the frozen base
    _rename_keys(state_dict, prefix, state, plain_key)  # the adapter's keys as an uncompiled model has them


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
    _rename_keys(state_dict, prefix, state, plain_key)  # a checkpoint of a compiled model: `_orig_mod.` out
    if state.merged:
        if not any(prefix + k in state_dict for k in state.adapter_keys):
            return  # a plain (e.g. merged) state: load it as such
        state.restore_unmerged(module)
    if state.peft is None:
        return
    present = [k for k in state.adapter_keys if prefix + k in state_dict]
    if not strict and not present:
        return  # a non-strict load of other parts of the module
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


def get_state(module: nn.Module) -> Optional[AdapterState]:
    return module.__dict__.get(STATE_ATTR)


def attach_state(module: nn.Module, state: AdapterState) -> AdapterState:
    module.__dict__[STATE_ATTR] = state
    return state


def allow_weights_only_resume(checkpoint: dict) -> bool:
    """Let `trainer.fit(ckpt_path=<weights-only .ckpt>)` resume: adapter and loop position come back, the
    optimizer and LR schedulers start fresh (Lightning would refuse a checkpoint without their states)."""
    if "state_dict" not in checkpoint or "optimizer_states" in checkpoint:
        return False
    checkpoint["optimizer_states"] = []
    checkpoint.setdefault("lr_schedulers", [])
    return True
