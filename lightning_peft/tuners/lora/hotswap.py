"""Hot-swapping LoRA adapters, as HF PEFT's `peft.utils.hotswap` (importable from `lightning_peft.utils.hotswap`, HF's
path): replace the weights of a loaded adapter with those of
another one in place, so that a `torch.compile`d model keeps its compiled graphs.

    model = PeftModel.from_pretrained(base, "adapter-0")
    prepare_model_for_compiled_hotswap(model, target_rank=16)  # only if ranks / scalings of later adapters differ
    model = torch.compile(model)
    ...
    hotswap_adapter(model, "adapter-1", adapter_name="default")  # no recompilation

Every Parameter stays the same object (values are copied into it); a new adapter of a smaller rank is zero-padded
into the existing tensors; scalings that `prepare_model_for_compiled_hotswap` turned into tensors are filled in place.
Everything is checked before anything is written: a refused swap (other targets, a larger rank, other shapes, a
half-present layer, NaN / inf, a merged adapter, incompatible config) leaves the model as it was.
"""

from __future__ import annotations

import copy
import math
import os
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, Optional, Union, cast

import torch
from torch import nn

from ..._compat import COMPILED_PREFIX, is_compiled, unwrap_compiled
from ...config import SAVED_PREFIX, PeftConfig, PeftType, adapter_folder
from ...serialization import check_adapter_tensors, load_peft_weights, tuner_of
from ..base import pattern_value
from .config import LoraConfig
from .layer import LoraLayer
from .model import LoraModel

# config fields that change the output beyond the weights and the scaling (HF PEFT's list)
CONFIG_KEYS_TO_CHECK = {PeftType.LORA: ["use_rslora", "lora_dropout", "alpha_pattern", "use_dora"]}

# which dimension of each LoRA tensor is the rank
_RANK_DIM = {"lora_A": 0, "lora_B": 1, "lora_embedding_A": 0, "lora_embedding_B": 1}


def _unwrap(model: nn.Module) -> nn.Module:
    """The model under `torch.compile`'s wrapper(s)."""
    return cast(nn.Module, unwrap_compiled(model))


def _lora_tuner(model: nn.Module) -> tuple[LoraModel, str]:
    """The LoRA tuner of `model` (a PeftModel, its LoraModel, or a model given adapters by inject_adapter_in_model;
    compiled or not) and the prefix `model`'s own keys lack compared with a PeftModel's."""
    tuner, prefix = tuner_of(_unwrap(model))
    if not isinstance(tuner, LoraModel):
        raise ValueError(f"Hotswapping only supports LORA but {getattr(tuner, 'peft_type', None)} was passed.")
    tuner.check_attached()
    return tuner, prefix


def _is_compiled(model: nn.Module) -> bool:
    return is_compiled(model)


# ---- before compiling ----------------------------------------------------------------------------------------------
def prepare_model_for_compiled_hotswap(
    model: nn.Module,
    *,
    target_rank: Optional[int] = None,
    config: Optional[Union[LoraConfig, dict[str, LoraConfig]]] = None,
    check_compiled: Literal["error", "warn", "ignore"] = "error",
) -> None:
    """Make later hot-swaps of adapters with other scalings (`lora_alpha / r`) or smaller ranks run without
    recompiling: every scaling becomes a 0-d tensor (a value swapped into it is no new constant), and with
    `target_rank` every adapter's tensors are zero-padded to that rank (the outputs do not change). Call it after
    loading the first adapter and before `torch.compile`, as HF PEFT's.

    The model's own adapter configs are updated to describe the padded tensors (r = target_rank, lora_alpha scaled so
    the scaling stays), so `save_pretrained` still writes an adapter that reloads to the same outputs. `config` (HF
    PEFT's argument: configs kept elsewhere, e.g. for later adapters) gets `r` / `rank_pattern` = target_rank."""
    if check_compiled not in ("error", "warn", "ignore"):
        raise ValueError(
            f"check_compiled should be one of 'error', 'warn', or 'ignore', got '{check_compiled}' instead."
        )
    if _is_compiled(model):
        if check_compiled == "error":
            raise ValueError("Call prepare_model_for_compiled_hotswap *before* compiling the model")
        if check_compiled == "warn":
            warnings.warn(
                "prepare_model_for_compiled_hotswap was called with a model that is already compiled. This will likely "
                "result in re-compilation, hurting performance. Call the function before compiling the model.",
                stacklevel=2,
            )
    layers = [m for m in _unwrap(model).modules() if isinstance(m, LoraLayer)]
    if not layers:
        raise ValueError(
            "No adapter layers found on the model, make sure call `prepare_model_for_compiled_hotswap` after loading "
            "the first adapter and before loading the second adapter."
        )
    if target_rank is not None:
        if isinstance(target_rank, bool) or not isinstance(target_rank, int) or target_rank <= 0:
            raise ValueError(f"target_rank must be a positive int (the largest rank to swap in), got {target_rank!r}")
        larger = sorted({r for layer in layers for r in layer.r.values() if r > target_rank})
        if larger:
            raise ValueError(
                f"Trying to pad the adapter to the target rank {target_rank}, but the original rank is larger "
                f"({larger[-1]}). This is not possible; pass target_rank >= {larger[-1]}."
            )
    try:
        tuner: Optional[LoraModel] = _lora_tuner(model)[0]
    except (TypeError, ValueError):  # LoRA layers in a model without a lightning_peft tuner: no config to update
        tuner = None
    # from here on nothing can be refused
    for layer in layers:
        scaling: dict[str, Any] = layer.scaling  # floats, or 0-d tensors from here on (both multiply alike)
        for name, value in scaling.items():
            if not isinstance(value, torch.Tensor):
                scaling[name] = torch.tensor(float(value), device=layer.weight.device)
    if target_rank is None:
        return
    for layer in layers:
        for name in list(layer.r):
            _pad_layer(layer, name, target_rank)
    if tuner is not None:
        for name, own in tuner.peft_config.items():
            tuner.hotswap_reference_configs.setdefault(name, copy.deepcopy(own))
            _rescale_config(own, target_rank)
    configs = [] if not config else list(config.values()) if isinstance(config, dict) else [config]
    for other in configs:
        if any(other is own for own in (tuner.peft_config.values() if tuner is not None else [])):
            continue  # already described as padded above
        other.r = target_rank
        other.rank_pattern = {key: target_rank for key in other.rank_pattern}


def _pad_layer(layer: LoraLayer, name: str, target_rank: int) -> None:
    """Zero-pad adapter `name`'s tensors of `layer` to `target_rank`, keeping the Parameter objects."""
    rank = layer.r[name]
    if rank == target_rank:
        return
    with torch.no_grad():
        for attr, dim in _RANK_DIM.items():
            holder = getattr(layer, attr)
            if name not in holder:
                continue
            module = holder[name]
            param = module if isinstance(module, nn.Parameter) else module.weight
            shape = list(param.shape)
            shape[dim] = target_rank
            padded = param.new_zeros(shape)
            padded.narrow(dim, 0, rank).copy_(param)
            param.data = padded
            if isinstance(module, nn.Linear):
                if dim == 0:
                    module.out_features = target_rank
                else:
                    module.in_features = target_rank
            elif isinstance(module, nn.Conv2d):
                if dim == 0:
                    module.out_channels = target_rank
                else:
                    module.in_channels = target_rank
    layer.r[name] = target_rank


def _rescale_config(config: LoraConfig, target_rank: int) -> None:
    """The config of tensors padded to `target_rank` whose scalings did not change."""

    def rank_for(key: str) -> int:
        return int(pattern_value(config.rank_pattern, key, config.r))

    def factor(rank: int) -> float:  # the scaling alpha / r (rsLoRA: alpha / sqrt(r)) must not change
        return math.sqrt(target_rank / rank) if config.use_rslora else target_rank / rank

    alphas = {key: alpha * factor(rank_for(key)) for key, alpha in config.alpha_pattern.items()}
    for key, rank in config.rank_pattern.items():  # a rank of its own without an alpha of its own: the default alpha
        alphas.setdefault(key, config.lora_alpha * factor(rank))
    config.alpha_pattern = alphas
    config.lora_alpha = config.lora_alpha * factor(config.r)
    config.r = target_rank
    config.rank_pattern = {key: target_rank for key in config.rank_pattern}


# ---- checks ---------------------------------------------------------------------------------------------------------
def check_hotswap_configs_compatible(config0: PeftConfig, config1: PeftConfig) -> None:
    """Refuse (ValueError, as HF PEFT) swapping between configs whose other fields would change the output: another
    tuner type, a tuner other than LoRA, or another `lora_dropout` / `alpha_pattern` / `use_rslora` / `use_dora`."""
    if config0.peft_type != config1.peft_type:
        raise ValueError(f"Incompatible PEFT types found: {config0.peft_type} and {config1.peft_type}")
    if config0.peft_type not in CONFIG_KEYS_TO_CHECK:
        raise ValueError(
            f"Hotswapping only supports {', '.join(str(k) for k in CONFIG_KEYS_TO_CHECK)} but {config0.peft_type} "
            "was passed."
        )
    sentinel = object()
    for key in CONFIG_KEYS_TO_CHECK[PeftType(config0.peft_type)]:
        val0, val1 = getattr(config0, key, sentinel), getattr(config1, key, sentinel)
        if val0 != val1:
            raise ValueError(f"Configs are incompatible: for {key}, {val0} != {val1}")


def _layer_and_part(tuner: LoraModel, key: str, adapter_name: str) -> Optional[tuple[str, str]]:
    """(module path relative to the tuner, LoRA attribute) of a tuner-relative parameter key of the adapter."""
    parts = key.split(".")
    for i, part in enumerate(parts[:-1]):
        if part in _RANK_DIM and parts[i + 1] == adapter_name:
            return ".".join(parts[:i]), part
    return None


# ---- swapping -------------------------------------------------------------------------------------------------------
def hotswap_adapter_from_state_dict(
    model: nn.Module,
    state_dict: dict[str, torch.Tensor],
    adapter_name: str,
    config: LoraConfig,
    parameter_prefix: str = "lora_",
) -> None:
    """Swap the weights of `state_dict` into adapter `adapter_name` of `model`, in place (HF PEFT's signature: the
    keys are those of `model.state_dict()`, adapter name included). The scalings follow `config`.

    Refused before anything changes: keys the adapter does not have (other targets: RuntimeError, as HF PEFT), a
    layer with only some of its tensors (RuntimeError), a rank larger than the adapter's tensors or other shapes
    (ValueError: prepare_model_for_compiled_hotswap pads them), ranks that differ from `config`'s, NaN / inf values, a
    merged adapter (ValueError). Layers the new adapter does not target get zeros (as HF PEFT does; their output is
    the base layer's, as after loading the new adapter fresh)."""
    tuner, prefix = _lora_tuner(model)
    if parameter_prefix != tuner.prefix:
        raise ValueError(f"parameter_prefix must be {tuner.prefix!r} for LoRA adapters, got {parameter_prefix!r}")
    tuner.check_adapter_exists(adapter_name)
    if not isinstance(config, LoraConfig):
        raise TypeError(f"config must be a LoraConfig, got {type(config).__name__}")
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"state_dict must be a dict of tensors by parameter name, got {type(state_dict).__name__}")
    # tuner-relative keys: a PeftModel's keys start with "base_model.", the caller's may lack a part of that
    tensors: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        if not isinstance(key, str):
            raise TypeError(f"state_dict's keys must be parameter names (str), got {key!r}")
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"state_dict[{key!r}] is a {type(value).__name__}, not a tensor")
        full = prefix + key.removeprefix(COMPILED_PREFIX)
        tensors[full.removeprefix(SAVED_PREFIX)] = value
    _swap(tuner, tensors, adapter_name, config)


def _adapter_parameters(tuner: LoraModel, adapter_name: str) -> dict[str, nn.Parameter]:
    """The adapter's parameters by tuner-relative name: its LoRA tensors and its copies of saved modules."""
    found = {}
    for key, param in tuner.named_parameters():
        if _layer_and_part(tuner, key, adapter_name) is not None or f".modules_to_save.{adapter_name}." in key:
            found[key] = param
    return found


@dataclass
class _SwapPlan:
    """What a checked swap writes: each parameter's new value (already on its device and dtype), the LoRA layers the
    new adapter does not target (zeroed), and each targeted layer's new scaling."""

    own: dict[str, nn.Parameter]  # the adapter's parameters by tuner-relative name
    ready: dict[str, torch.Tensor]
    zeroed: list[str]
    zeroed_keys: list[str]
    scalings: dict[str, float]


def _swap(tuner: LoraModel, tensors: dict[str, torch.Tensor], adapter_name: str, config: LoraConfig) -> None:
    """Check everything, then write: a refused swap changes nothing."""
    plan = _check_swap(tuner, tensors, adapter_name, config)
    _write_swap(tuner, plan, adapter_name, config)


def _check_swap(tuner: LoraModel, tensors: dict[str, torch.Tensor], adapter_name: str, config: LoraConfig) -> _SwapPlan:
    """Every refusal of a swap (see `hotswap_adapter_from_state_dict`); nothing is written."""
    if config.use_dora or any(
        isinstance(m, LoraLayer) and adapter_name in m.lora_magnitude_vector for m in tuner.modules()
    ):
        raise ValueError(
            f"hot-swapping DoRA adapters (use_dora=True) is not supported: load the new adapter with load_adapter "
            f"and set_adapter instead of swapping it into {adapter_name!r}"
        )
    if any(isinstance(m, LoraLayer) and adapter_name in m.merged_adapters for m in tuner.modules()):
        raise ValueError(
            f"Cannot hot-swap adapter '{adapter_name}' because it is currently merged into the base weights. Please "
            "unmerge the adapter first by calling `peft_model.unmerge_adapter()`; unmerging after a swap of merged "
            "weights would otherwise corrupt them."
        )
    own = _adapter_parameters(tuner, adapter_name)
    unexpected = sorted(set(tensors) - set(own))
    if unexpected:
        raise RuntimeError(
            "Hot swapping the adapter did not succeed, unexpected keys found: "
            f"{', '.join(SAVED_PREFIX + k for k in unexpected[:8])}{' ...' if len(unexpected) > 8 else ''}. The new "
            "adapter targets layers (or saves modules) that the loaded one does not; load it with load_adapter instead"
        )
    # per LoRA layer: its keys, the present ones, the rank of the new tensors
    layers: dict[str, dict[str, str]] = {}
    saved_module_keys = []
    for key in own:
        where = _layer_and_part(tuner, key, adapter_name)
        if where is None:
            saved_module_keys.append(key)
        else:
            layers.setdefault(where[0], {})[where[1]] = key
    absent_saved = sorted(k for k in saved_module_keys if k not in tensors)
    if absent_saved:
        raise RuntimeError(
            f"Hot swapping the adapter did not succeed: the new adapter lacks the saved module tensors "
            f"{', '.join(absent_saved[:4])} that adapter {adapter_name!r} holds (modules_to_save); they cannot be "
            "left out of a swap"
        )
    zeroed, ranks = [], {}
    for layer_name, parts in layers.items():
        present = [p for p, k in parts.items() if k in tensors]
        if not present:
            zeroed.append(layer_name)
            continue
        if len(present) != len(parts):
            missing = sorted(set(parts) - set(present))
            raise RuntimeError(
                f"Hot swapping the adapter did not succeed: {layer_name} has {', '.join(present)} but not "
                f"{', '.join(missing)} in the new adapter; the file is incomplete"
            )
        new_ranks = set()
        for part, key in parts.items():
            old, new = own[key], tensors[key]
            dim = _RANK_DIM[part]
            others_equal = new.dim() == old.dim() and all(
                n == o for d, (n, o) in enumerate(zip(new.shape, old.shape)) if d != dim
            )
            if not others_equal or new.shape[dim] > old.shape[dim] or new.shape[dim] == 0:
                raise ValueError(
                    f"Incompatible shapes found for LoRA weights {key}: {tuple(old.shape)} vs {tuple(new.shape)}. "
                    "Please ensure that all ranks are padded to the largest rank among all LoRA adapters by using "
                    "lightning_peft.utils.hotswap.prepare_model_for_compiled_hotswap (before compiling)."
                )
            new_ranks.add(int(new.shape[dim]))
        rank = int(pattern_value(config.rank_pattern, layer_name.removeprefix("model."), config.r))
        if new_ranks != {rank}:
            raise ValueError(
                f"the new adapter's tensors of {layer_name} have rank {sorted(new_ranks)} but its config says "
                f"r={rank}; the adapter files do not belong together"
            )
        ranks[layer_name] = rank
    expected_dtypes = {k: own[k].dtype for k in tensors}
    check_adapter_tensors(tensors, expected_dtypes, what="the new adapter's weights", opt_in="the swap was refused")
    # the new values, on the parameters' devices and dtypes, before any write
    ready = {k: v.to(device=own[k].device, dtype=own[k].dtype) for k, v in tensors.items()}
    scalings = {}
    for layer_name, rank in ranks.items():
        alpha = float(pattern_value(config.alpha_pattern, layer_name.removeprefix("model."), config.lora_alpha))
        scalings[layer_name] = alpha / (math.sqrt(rank) if config.use_rslora else rank)
    zeroed_keys = [key for layer_name in zeroed for key in layers[layer_name].values()]
    return _SwapPlan(own=own, ready=ready, zeroed=zeroed, zeroed_keys=zeroed_keys, scalings=scalings)


def _write_swap(tuner: LoraModel, plan: _SwapPlan, adapter_name: str, config: LoraConfig) -> None:
    """Write a checked swap: nothing here can be refused."""
    own, scalings = plan.own, plan.scalings
    padded = False
    with torch.no_grad():
        for key in plan.zeroed_keys:
            own[key].zero_()
        for key, value in plan.ready.items():
            param = own[key]
            if param.shape == value.shape:
                param.copy_(value)
            else:
                padded = True
                where = _layer_and_part(tuner, key, adapter_name)
                dim = _RANK_DIM[cast(tuple[str, str], where)[1]]
                param.zero_()
                param.narrow(dim, 0, value.shape[dim]).copy_(value)
    for layer_name, scaling in scalings.items():
        layer = cast(LoraLayer, tuner.get_submodule(layer_name))
        current = layer.scaling[adapter_name]
        if isinstance(current, torch.Tensor):
            current.fill_(scaling)
        elif current != scaling:
            layer.scaling[adapter_name] = scaling
    _update_config(tuner, adapter_name, config, scalings, padded or bool(plan.zeroed))


def _update_config(
    tuner: LoraModel, adapter_name: str, config: LoraConfig, scalings: dict[str, float], reshaped: bool
) -> None:
    """The stored config describes the swapped adapter, so save_pretrained writes one that reloads to its outputs."""
    own = cast(LoraConfig, tuner.peft_config[adapter_name])
    tuner.hotswap_reference_configs.pop(adapter_name, None)
    if not reshaped:
        own.r, own.lora_alpha = config.r, config.lora_alpha
        own.rank_pattern, own.alpha_pattern = dict(config.rank_pattern), dict(config.alpha_pattern)
        return
    # tensors padded / layers zeroed: r and rank_pattern keep describing the tensors; one lora_alpha for them all
    alphas = set()
    for layer_name, scaling in scalings.items():
        layer = cast(LoraLayer, tuner.get_submodule(layer_name))
        rank = layer.r[adapter_name]
        alphas.add(round(scaling * (math.sqrt(rank) if own.use_rslora else rank), 9))
    if len(alphas) == 1 and not own.alpha_pattern:
        own.lora_alpha = alphas.pop()
        return
    warnings.warn(
        f"adapter {adapter_name!r} was hot-swapped into padded tensors with per-layer scalings that its config cannot "
        "express; save_pretrained would write it with the old alpha values. Save the new adapter's own files instead",
        stacklevel=3,
    )


def hotswap_adapter(
    model: nn.Module,
    model_name_or_path: Union[str, os.PathLike],
    adapter_name: str,
    torch_device: Optional[str] = None,
    **kwargs: Any,
) -> None:
    """Replace the weights of the loaded adapter `adapter_name` of `model` (a PeftModel with LoRA adapters, compiled
    or not) with those of the adapter saved in `model_name_or_path`, in place: the adapter keeps its name, and a
    compiled model is not recompiled. `subfolder=` reads both files from a sub-folder, `allow_pickle=` as in
    `load_adapter`; HF hub arguments are not used (the adapter is a local folder).

    The configs must agree on what the weights do not carry (`check_hotswap_configs_compatible`: ValueError); the
    scalings follow the new config (a changed scaling recompiles a compiled model unless
    `prepare_model_for_compiled_hotswap` ran before compiling). See `hotswap_adapter_from_state_dict` for what is
    refused; a refused swap leaves the model as it was."""
    tuner, _ = _lora_tuner(model)
    tuner.check_adapter_exists(adapter_name)
    folder = adapter_folder(model_name_or_path, kwargs.get("subfolder"))
    config = PeftConfig.from_pretrained(folder)
    reference = tuner.hotswap_reference_configs.get(adapter_name, tuner.peft_config[adapter_name])
    check_hotswap_configs_compatible(reference, config)
    weights = load_peft_weights(folder, device=torch_device or "cpu", allow_pickle=bool(kwargs.get("allow_pickle")))
    tensors = {}
    for key, value in weights.items():
        if not key.startswith(SAVED_PREFIX):
            raise RuntimeError(f"Hot swapping the adapter did not succeed, unexpected keys found: {key}")
        tensors[tuner.adapter_key_to_model_key(key[len(SAVED_PREFIX) :], adapter_name)] = value
    _swap(tuner, tensors, adapter_name, cast(LoraConfig, config))


__all__ = [
    "check_hotswap_configs_compatible",
    "hotswap_adapter",
    "hotswap_adapter_from_state_dict",
    "prepare_model_for_compiled_hotswap",
]
