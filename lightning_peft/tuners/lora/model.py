"""`LoraModel`: the LoRA tuner. Finds the targets (HF PEFT's default table by model type when `target_modules` is
unset), wraps them in the `layer.py` layers, and adds what is LoRA-only on top of `BaseTuner`: mixed-adapter batches
(`adapter_names=` in forward / generate) and `add_weighted_adapter` (linear, concatenated and SVD combinations).
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any, Iterator, Optional, cast

import torch
from torch import nn

from ...utils.constants import model_type_of
from ...utils.error import NoMatchingPeftModuleError
from ..base import (
    BaseTuner,
    ModulesToSaveWrapper,
    check_adapter_name,
    is_conv1d,
    pattern_value,
    requires_grad_kept_on_failure,
    resolve_fan_in_fan_out,
    strip_adapter_name,
)
from ..mixed_batch import BASE_NAME, MERGED_REFUSAL, MixedBatch, check_batch_size, checked_names, generate_expansion
from . import param_wrapper, replication, trainable_tokens
from .config import LoraConfig
from .dora import MAGNITUDE as DORA_KEY
from .init import (
    base_kept,
    base_weights_restored_on_failure,
    check_conversion,
    check_init_targets,
    converted_to_lora,
    init_kind,
    layer_init_argument,
)
from .layer import Conv2d, Embedding, Linear, LoraLayer
from .targets import DEFAULT_TARGET_MODULES


def _new_layer(target: nn.Module, adapter_name: str, config: LoraConfig, **kwargs: Any) -> Optional[nn.Module]:
    if isinstance(target, nn.Embedding):
        return Embedding(target, adapter_name, **kwargs)
    if isinstance(target, nn.Conv2d):
        return Conv2d(target, adapter_name, **kwargs)
    if isinstance(target, nn.Linear):
        kwargs["fan_in_fan_out"] = resolve_fan_in_fan_out(config, False, "torch.nn.Linear")
        return Linear(target, adapter_name, **kwargs)
    if is_conv1d(target):
        kwargs["fan_in_fan_out"] = resolve_fan_in_fan_out(config, True, "transformers Conv1D")
        return Linear(target, adapter_name, is_target_conv_1d_layer=True, **kwargs)
    return None


class LoraModel(BaseTuner):
    """Injects LoRA layers into `model` (see `LoraConfig`)."""

    prefix = "lora_"
    peft_type = LoraConfig.PEFT_TYPE

    def __init__(self, model: nn.Module, config: Any, adapter_name: str = "default") -> None:
        # the configs adapters had before `prepare_model_for_compiled_hotswap` rescaled their alpha values: a hot-swap
        # checks the new adapter's config against these (hotswap.py)
        self.hotswap_reference_configs: dict[str, LoraConfig] = {}
        super().__init__(model, config, adapter_name)

    def add_adapter(self, adapter_name: str, config: Any) -> None:
        # layer_replication: the model's layer stack is rebuilt first (HF PEFT's order); a refused adapter puts it back
        undo = replication.replicate(self, getattr(config, "layer_replication", None))
        try:
            super().add_adapter(adapter_name, config)
        except BaseException:
            if undo is not None:
                undo()
            raise

    def _unload_and_optionally_merge(
        self, merge: bool, progressbar: bool, safe_merge: bool, adapter_names: Optional[list[str]]
    ) -> nn.Module:
        model = super()._unload_and_optionally_merge(merge, progressbar, safe_merge, adapter_names)
        if merge:  # layer_replication: the merged copies get weights of their own (unload keeps them shared, as HF)
            replication.unshare(self)
        return model

    # ---- running, and mixed-adapter batches --------------------------------------------------
    supports_mixed_batch = True  # `adapter_names=` in forward() / generate(): one adapter per sample

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if "adapter_names" not in kwargs:
            return self.model(*args, **kwargs)
        names = kwargs.pop("adapter_names")
        if names is None:
            return self.model(*args, **kwargs)
        with self.mixed_batch(names, batch_size=_batch_size(args, kwargs)):
            return self.model(*args, **kwargs)

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        names = kwargs.pop("adapter_names", None)
        model: Any = self.model  # a transformers model that generates
        if names is None:
            return model.generate(*args, **kwargs)
        with self.mixed_batch(names, batch_size=_batch_size(args, kwargs), expand=generate_expansion(model, kwargs)):
            return model.generate(*args, **kwargs)

    @contextmanager
    def mixed_batch(
        self, adapter_names: list[str], batch_size: Optional[int] = None, expand: int = 1
    ) -> Iterator[None]:
        """Inside the block every forward runs sample i of the batch through adapter `adapter_names[i]`
        ("__base__": the base model alone), as HF PEFT's `adapter_names=` does. Refused as HF PEFT refuses it (in
        training mode, with merged adapters, an unknown name, or a name count other than the batch size), before
        anything runs. `expand`: generate() runs each sample as that many rows (beams / returned sequences) past
        the encoder. The layers hold the names only for the block: they are taken back however it ends."""
        names = checked_names(adapter_names)
        self.check_attached()
        if self.training:
            raise ValueError("Cannot pass `adapter_names` when the model is in training mode.")
        unknown = sorted({n for n in names if n != BASE_NAME} - set(self.peft_config))
        if unknown:
            raise ValueError(
                f"Trying to infer with non-existing adapter(s): {', '.join(unknown)}; this model has "
                f"{', '.join(self.peft_config) or 'no adapter'} (and {BASE_NAME!r} runs the base model alone)"
            )
        if any(isinstance(m, LoraLayer) and m.merged for _, m in self.tuner_layers()):
            raise ValueError(MERGED_REFUSAL)
        batch = MixedBatch(names)
        if batch_size is not None:
            check_batch_size(batch_size, batch)
        expanded = batch.repeated(expand)
        encoder = _encoder_modules(self.model) if expand > 1 else set()
        kinds = (LoraLayer, ModulesToSaveWrapper, trainable_tokens.TrainableTokensLayer)
        layers = [m for _, m in self.tuner_layers() if isinstance(m, kinds)]
        before = [m._mixed_batch for m in layers]
        try:
            for m in layers:
                m._mixed_batch = batch if id(m) in encoder else expanded  # the encoder runs before the expansion
            yield
        finally:
            for m, was in zip(layers, before):
                m._mixed_batch = was

    def prepare_adapter_config(self, config: LoraConfig, model: nn.Module) -> LoraConfig:
        if config.target_modules is None:  # HF PEFT's default targets for the model's family (a regex stays one)
            default = DEFAULT_TARGET_MODULES.get(model_type_of(model) or "")
            if default is not None:
                config.target_modules = default if isinstance(default, str) else set(default)
        if config.target_modules is None and config.target_parameters:  # parameters only (HF PEFT allows it)
            return config
        return super().prepare_adapter_config(config, model)

    # ---- targets beyond modules: nn.Parameters (param_wrapper.py) and token rows (trainable_tokens.py) ----------
    def matching_keys(self, config: LoraConfig) -> list[str]:
        return [] if config.target_modules is None else super().matching_keys(config)

    def _plan_extra_targets(self, config: LoraConfig, keys: list[str]) -> Any:
        param_wrapper.check_config(config, self.peft_config)
        params = param_wrapper.parameter_targets(self.model, config, keys)
        tokens = trainable_tokens.plan(self.model, config, keys)
        if config.target_parameters and not params:
            if not keys and not tokens:  # HF PEFT's error
                raise NoMatchingPeftModuleError(
                    "No `target_modules` passed but also no `target_parameters` found. Please check the values for "
                    f"these arguments (target_parameters={config.target_parameters!r} matched no parameter)."
                )
            warnings.warn(
                f"target_parameters={config.target_parameters} were set but no parameter was matched.",
                RuntimeWarning,
                stacklevel=3,
            )
        return (params, tokens) if params or tokens else None

    def _inject_extra_targets(
        self, config: LoraConfig, adapter_name: str, plan: Any, originals: list[tuple[nn.Module, str, nn.Module]]
    ) -> None:
        params, tokens = plan
        param_wrapper.inject(self.model, config, adapter_name, params, originals)
        trainable_tokens.inject(self.model, config, adapter_name, tokens, originals)

    def _extra_saved_tensors(self, state_dict: dict[str, torch.Tensor], adapter_name: str) -> dict[str, torch.Tensor]:
        return trainable_tokens.saved_tensors(state_dict, adapter_name)

    def _extra_model_key(self, key: str, adapter_name: str) -> Optional[str]:
        return trainable_tokens.model_key(key, adapter_name)

    def _auto_saves_embeddings(self, config: LoraConfig) -> bool:
        return config.trainable_token_indices is None

    def _embedding_file_keys(self, adapter_name: Optional[str], targeted: Optional[bool] = None) -> dict[str, str]:
        keys = super()._embedding_file_keys(adapter_name, targeted)
        return trainable_tokens.embedding_file_keys(self.model, keys, adapter_name)  # HF PEFT's keys for those

    def set_adapter(self, adapter_name: str | list[str], inference_mode: bool = False) -> None:
        names = [adapter_name] if isinstance(adapter_name, str) else adapter_name
        if isinstance(names, (list, tuple)) and all(isinstance(n, str) for n in names):
            trainable_tokens.check_set_adapter(self.model, list(names))  # before any change
        super().set_adapter(adapter_name, inference_mode)

    def _check_new_adapter_config(self, config: LoraConfig) -> None:
        if not isinstance(config, LoraConfig):
            raise TypeError(f"LoraModel takes a LoraConfig, got {type(config).__name__}")
        check_init_targets(self, config)  # PiSSA / OLoRA / LoftQ change base weights: refused before any change
        if config.bias != "none" and any(c.bias != "none" for c in self.peft_config.values()):
            raise ValueError("only one adapter may train biases (bias != 'none'); set bias='none' for the others")

    # PiSSA / OLoRA / LoftQ change the base weights (init.py): BaseTuner's hooks for that, as PeftModel calls them
    @classmethod
    def guard_base_weights(cls) -> AbstractContextManager[None]:
        return base_weights_restored_on_failure()

    def loading_into_existing(self, old_config: Any) -> AbstractContextManager[None]:
        return base_kept() if init_kind(getattr(old_config, "init_lora_weights", None)) else nullcontext()

    def check_weight_conversion(self, adapter_names: list[str], initial: Any) -> None:
        check_conversion(self, adapter_names, initial)

    def adapter_for_save(
        self, adapter_name: str, tensors: dict[str, torch.Tensor], config: Any, initial: Any
    ) -> tuple[dict[str, torch.Tensor], Any]:
        return (tensors, config) if initial is None else converted_to_lora(tensors, config, initial)

    def _is_supported_target(self, module: nn.Module) -> bool:
        if isinstance(module, nn.Conv2d) and module.groups != 1:
            return False  # checked here so the error comes before any layer is replaced
        return (
            isinstance(module, (LoraLayer, nn.Linear, nn.Embedding, nn.Conv2d))
            or is_conv1d(module)
            or self.quantized_layer_for(module) is not None
        )

    def _create_and_replace(
        self, config: LoraConfig, adapter_name: str, target: nn.Module, current_key: str
    ) -> Optional[nn.Module]:
        kwargs = dict(
            r=pattern_value(config.rank_pattern, current_key, config.r),
            lora_alpha=pattern_value(config.alpha_pattern, current_key, config.lora_alpha),
            lora_dropout=config.lora_dropout,
            init_lora_weights=layer_init_argument(config),
            use_rslora=config.use_rslora,
            use_dora=config.use_dora,
        )
        if isinstance(target, LoraLayer):
            target.update_layer(adapter_name, **kwargs)
            return None
        kwargs["fan_in_fan_out"] = config.fan_in_fan_out
        quantized = self.quantized_layer_for(target)
        if quantized is not None:
            kwargs["fan_in_fan_out"] = resolve_fan_in_fan_out(config, False, f"bitsandbytes {type(target).__name__}")
            new_module = quantized(target, adapter_name, **kwargs)
        else:
            new_module = _new_layer(target, adapter_name, config, **kwargs)
        if new_module is None:
            raise ValueError(f"cannot apply LoRA to {current_key} of type {type(target).__name__}")
        return new_module

    def _mark_extra_trainable(self, config: LoraConfig) -> None:
        bias = config.bias
        if bias == "none" or config.inference_mode:
            return
        warnings.warn(f"bias={bias!r}: biases are trained, so disabling the adapter no longer gives the base model")
        if bias == "all":
            for n, p in self.model.named_parameters():
                # not the frozen originals of saved modules nor other adapters' copies: they never run
                unused = ".original_module." in n or (
                    ".modules_to_save." in n
                    and not any(f".modules_to_save.{name}." in n for name in self.active_adapters)
                )
                if n.rsplit(".", 1)[-1] == "bias" and not unused:
                    p.requires_grad_(True)
        else:
            for module in self.model.modules():
                if isinstance(module, LoraLayer) and module.bias is not None:
                    module.bias.requires_grad_(True)

    def _bias_state_dict(
        self, state_dict: dict[str, torch.Tensor], config: LoraConfig, adapter_name: str
    ) -> dict[str, torch.Tensor]:
        if config.bias == "all":
            # HF PEFT saves every bias, the frozen original and the adapter's copy of saved modules included
            return {
                strip_adapter_name(k, adapter_name): v
                for k, v in state_dict.items()
                if k.rsplit(".", 1)[-1] == "bias"
                and (".modules_to_save." not in k or f".modules_to_save.{adapter_name}." in k)
            }
        if config.bias == "lora_only":
            names = {
                f"model.{n}.base_layer.bias"
                for n, m in self.model.named_modules()
                if isinstance(m, LoraLayer) and m.bias is not None
            }
            return {k: v for k, v in state_dict.items() if k in names}
        return {}

    # DoRA's magnitude: `…lora_magnitude_vector.<adapter>.weight` in the model, `…lora_magnitude_vector` in files (HF's)
    def adapter_state_dict(self, state_dict: dict[str, torch.Tensor], adapter_name: str) -> dict[str, torch.Tensor]:
        out = super().adapter_state_dict(state_dict, adapter_name)
        return {k.removesuffix(".weight") if k.endswith(DORA_KEY + ".weight") else k: v for k, v in out.items()}

    def adapter_key_to_model_key(self, key: str, adapter_name: str) -> str:
        model_key = super().adapter_key_to_model_key(key, adapter_name)
        return model_key + ".weight" if key.endswith(DORA_KEY) else model_key

    # ---- combining adapters -----------------------------------------------------------------
    def add_weighted_adapter(
        self,
        adapters: list[str],
        weights: list[float],
        adapter_name: str,
        combination_type: str = "svd",
        svd_rank: Optional[int] = None,
        svd_clamp: Optional[float] = None,
        svd_full_matrices: bool = True,
        svd_driver: Optional[str] = None,
    ) -> None:
        """Add `adapter_name` as a weighted combination of existing adapters (its scaling is 1). Everything is
        checked and computed before the adapter is added, so a failure leaves the model as it was.

        Saved whole modules (`modules_to_save`, e.g. a classifier head) cannot be combined: two or more of
        `adapters` holding a copy of the same module are refused (as HF PEFT refuses them); where one of them holds
        it, the new adapter gets a copy of that adapter's trained module (HF PEFT gives it an untrained copy of the
        original)."""
        self.check_attached()
        adapters, weights = list(adapters), list(weights)
        if not adapters:
            raise ValueError("add_weighted_adapter needs at least one adapter to combine; got adapters=[]")
        for name in adapters:
            self.check_adapter_exists(name)
        for name in adapters:  # HF PEFT refuses target_parameters; trained token rows have no weighted combination
            if self.peft_config[name].target_parameters or self.peft_config[name].trainable_token_indices:
                raise ValueError(
                    f"add_weighted_adapter does not support adapters on nn.Parameters (target_parameters) or with "
                    f"trainable tokens (trainable_token_indices): adapter {name!r} has them"
                )
        if len(adapters) != len(weights):
            raise ValueError(f"got {len(adapters)} adapters but {len(weights)} weights; give one weight per adapter")
        bad = [w for w in weights if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w)]
        if bad:
            raise ValueError(f"weights must be finite numbers, got {bad[0]!r} in weights={weights!r}")
        if adapter_name in self.peft_config:
            raise ValueError(f"an adapter named {adapter_name!r} already exists; choose a new name")
        dora = [a for a in adapters if self.peft_config[a].use_dora]
        if dora:  # HF PEFT gives the result a magnitude of its random start: no trained magnitude survives
            raise ValueError(
                f"add_weighted_adapter cannot combine DoRA adapters ({', '.join(map(repr, dora))}): their trained "
                "magnitudes (lora_magnitude_vector) have no weighted combination; merge them one by one instead "
                "(merge_adapter / merge_and_unload)"
            )
        check_adapter_name(adapter_name, self, self.prefix, taken=self.peft_config)
        # saved whole modules: which input adapter's trained copy the new adapter takes, per wrapper
        saved_sources: dict[str, str] = {}
        for key, wrapper in self.model.named_modules():
            if not isinstance(wrapper, ModulesToSaveWrapper):
                continue
            holders = list(dict.fromkeys(a for a in adapters if a in wrapper.modules_to_save))
            if len(holders) > 1:
                raise ValueError(
                    f"Cannot add weighted adapters if they target the same module with modules_to_save: adapters "
                    f"{holders} each hold a trained copy of {key}, and whole modules cannot be combined; combine "
                    "adapters of which at most one saves it"
                )
            if holders:
                saved_sources[key] = holders[0]
        modules_to_save = list(
            dict.fromkeys(n for a in adapters for n in (getattr(self.peft_config[a], "modules_to_save", None) or []))
        )
        ranks = [self.peft_config[a].r for a in adapters]
        layers = [
            (name, m)
            for name, m in self.model.named_modules()
            if isinstance(m, LoraLayer) and any(a in m.r for a in adapters)
        ]
        if combination_type == "linear":
            if len({m.r[a] for _, m in layers for a in adapters if a in m.r} | set(ranks)) > 1:
                raise ValueError(
                    f"combination_type='linear' needs adapters of equal rank, got r={ranks}; "
                    "use 'cat' or 'svd' for different ranks"
                )
            new_rank = ranks[0]
        elif combination_type == "cat":
            new_rank = sum(ranks)
        elif combination_type == "svd":
            new_rank = max(ranks) if svd_rank is None else svd_rank
            _check_svd_options(svd_rank, svd_clamp, svd_driver, layers, adapters)
        else:
            raise ValueError(f"combination_type={combination_type!r} is not valid; use one of: 'svd', 'linear', 'cat'")
        if combination_type != "svd" and any(self.peft_config[a].rank_pattern for a in adapters):
            raise ValueError(
                f"combination_type={combination_type!r} needs one rank per adapter; "
                "these adapters use rank_pattern, use 'svd'"
            )
        for layer_name, module in layers:
            for a in adapters:
                if a in module.r and not all(torch.isfinite(t).all() for t in _factors(module, a)):
                    raise ValueError(
                        f"adapter {a!r} holds NaN/inf values in {layer_name}; combining it would spread them into "
                        f"{adapter_name!r}. Retrain or reload {a!r} first"
                    )
        # every new factor is computed before the adapter exists
        factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        with torch.no_grad():
            for layer_name, module in layers:
                present = [(a, w) for a, w in zip(adapters, weights) if a in module.r]
                if combination_type == "svd":
                    factors[layer_name] = _svd_combination(
                        module, present, new_rank, svd_clamp, svd_full_matrices, svd_driver
                    )
                else:
                    factors[layer_name] = _factor_combination(module, present, combination_type, new_rank)
        # exactly the layers that hold any of the inputs: their own target / layer filters may differ
        config = dataclasses.replace(
            self.peft_config[adapters[0]],
            r=new_rank,
            lora_alpha=new_rank,
            target_modules=sorted(factors),
            layers_to_transform=None,
            layers_pattern=None,
            rank_pattern={},
            alpha_pattern={},
            init_lora_weights=False,
            modules_to_save=modules_to_save or None,
            use_rslora=False,  # the combined factors carry the scalings: lora_alpha / r = 1 (HF's rsLoRA gives sqrt(r))
        )
        with requires_grad_kept_on_failure(self):
            self.add_adapter(adapter_name, config)
            try:
                self._fill_combined(adapter_name, factors, saved_sources)
            except BaseException:
                self.delete_adapter(adapter_name, force=True)
                raise

    def _fill_combined(
        self,
        adapter_name: str,
        factors: dict[str, tuple[torch.Tensor, torch.Tensor]],
        saved_sources: dict[str, str],
    ) -> None:
        """Write the combined factors into the new adapter, and its saved modules from their source adapter."""
        with torch.no_grad():
            for key, source in saved_sources.items():
                wrapper = cast(ModulesToSaveWrapper, self.model.get_submodule(key))
                if adapter_name in wrapper.modules_to_save:
                    wrapper.modules_to_save[adapter_name].load_state_dict(wrapper.modules_to_save[source].state_dict())
        for layer_name, (new_A, new_B) in factors.items():
            target_A, target_B = _factors(cast(LoraLayer, self.model.get_submodule(layer_name)), adapter_name)
            if new_A.shape != target_A.shape or new_B.shape != target_B.shape:
                raise ValueError(
                    f"the combined factors of {layer_name} have shapes {tuple(new_A.shape)}, {tuple(new_B.shape)} "
                    f"but the new adapter's are {tuple(target_A.shape)}, {tuple(target_B.shape)}"
                )
            with torch.no_grad():
                target_A.copy_(new_A.to(target_A.dtype))
                target_B.copy_(new_B.to(target_B.dtype))


SVD_DRIVERS = ("gesvd", "gesvdj", "gesvda")


def _check_svd_options(
    svd_rank: Any, svd_clamp: Any, svd_driver: Any, layers: list[tuple[str, LoraLayer]], adapters: list[str]
) -> None:
    if svd_rank is not None:
        if isinstance(svd_rank, bool) or not isinstance(svd_rank, int) or svd_rank <= 0:
            raise ValueError(f"svd_rank={svd_rank!r} is not valid; give a positive int, or None for the largest rank")
        for layer_name, module in layers:
            rows, cols = _delta_shape(module, next(a for a in adapters if a in module.r))
            if svd_rank > min(rows, cols):
                raise ValueError(
                    f"svd_rank={svd_rank} is larger than {layer_name} allows: its {rows}x{cols} update has rank at "
                    f"most {min(rows, cols)}; use svd_rank <= {min(rows, cols)}"
                )
    if svd_clamp is not None and (
        isinstance(svd_clamp, bool) or not isinstance(svd_clamp, (int, float)) or not 0 <= svd_clamp <= 1
    ):
        raise ValueError(f"svd_clamp={svd_clamp!r} is not valid; it is a quantile: give a number in [0, 1] or None")
    if svd_driver is not None:
        if svd_driver not in SVD_DRIVERS:
            raise ValueError(f"svd_driver={svd_driver!r} is not valid; use None or one of: {', '.join(SVD_DRIVERS)}")
        devices = {p.device.type for _, m in layers for p in cast(nn.Module, m).parameters()}
        if devices != {"cuda"}:
            raise ValueError(
                f"svd_driver={svd_driver!r} is a CUDA (cuSOLVER) driver, but the adapters are on "
                f"{', '.join(sorted(devices))}; leave svd_driver=None there"
            )


def _delta_shape(layer: LoraLayer, adapter: str) -> tuple[int, int]:
    """(rows, cols) of the matrix the svd combination factorises for this layer."""
    A, B = _factors(layer, adapter)
    if adapter in layer.lora_A:
        return B.shape[0], int(A[0].numel())  # (out, in * kernel) for Linear and Conv2d
    return A.shape[1], B.shape[0]  # embedding: (num_embeddings, embedding_dim)


def _batch_size(args: tuple, kwargs: dict) -> Optional[int]:
    """The batch size of a model call, where its inputs show it (input_ids / inputs_embeds / a first tensor)."""
    for value in (kwargs.get("input_ids"), kwargs.get("inputs_embeds"), args[0] if args else None):
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            return int(value.shape[0])
    return None


def _encoder_modules(model: nn.Module) -> set[int]:
    """ids of the modules of an encoder-decoder model's encoder (empty for other models)."""
    if not getattr(getattr(model, "config", None), "is_encoder_decoder", False):
        return set()
    get_encoder = getattr(model, "get_encoder", None)
    encoder = get_encoder() if callable(get_encoder) else None
    return {id(m) for m in encoder.modules()} if isinstance(encoder, nn.Module) else set()


def _factors(layer: LoraLayer, adapter: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) as stored: Linear/Conv2d weights, or the embedding's raw parameters."""
    if adapter in layer.lora_A:
        return cast(torch.Tensor, layer.lora_A[adapter].weight), cast(torch.Tensor, layer.lora_B[adapter].weight)
    return layer.lora_embedding_A[adapter], layer.lora_embedding_B[adapter]


def _factor_combination(
    layer: LoraLayer, present: list[tuple[str, float]], combination_type: str, new_rank: int
) -> tuple[torch.Tensor, torch.Tensor]:
    A: Optional[torch.Tensor]
    B: Optional[torch.Tensor]
    if combination_type == "cat":
        As = [_factors(layer, a)[0] * w * layer.scaling[a] for a, w in present]
        Bs = [_factors(layer, a)[1] for a, _ in present]
        A, B = torch.cat(As, dim=0), torch.cat(Bs, dim=1)
        # an adapter missing from this layer leaves its slice of the new rank at zero
        full_A = A.new_zeros((new_rank,) + tuple(A.shape[1:]))
        full_B = B.new_zeros((B.shape[0], new_rank) + tuple(B.shape[2:]))
        full_A[: A.shape[0]] = A
        full_B[:, : B.shape[1]] = B
        return full_A, full_B
    # linear: split sqrt(|w * s|) between A and B, the sign on A only
    A = B = None
    for a, w in present:
        ws = w * layer.scaling[a]
        root = abs(ws) ** 0.5
        fa, fb = _factors(layer, a)
        A = fa * (root if ws >= 0 else -root) if A is None else A + fa * (root if ws >= 0 else -root)
        B = fb * root if B is None else B + fb * root
    return cast(torch.Tensor, A), cast(torch.Tensor, B)  # not None: `present` is never empty


def _svd_combination(
    layer: LoraLayer,
    present: list[tuple[str, float]],
    new_rank: int,
    clamp: Optional[float],
    full_matrices: bool,
    driver: Optional[str],
) -> tuple[torch.Tensor, torch.Tensor]:
    delta = cast(torch.Tensor, sum(layer.get_delta_weight(a) * w for a, w in present))  # `present` is never empty
    is_embedding = present[0][0] in layer.lora_embedding_A
    target_A, target_B = _factors(layer, present[0][0])
    conv2d = isinstance(layer, Conv2d)
    if conv2d:
        delta = delta.squeeze() if delta.shape[2:4] == (1, 1) else delta.flatten(start_dim=1)
    if getattr(layer, "fan_in_fan_out", False) or is_embedding:
        delta = delta.T
    U, S, Vh = torch.linalg.svd(delta, full_matrices=full_matrices, driver=driver)
    U = U[:, :new_rank] @ torch.diag(S[:new_rank])
    Vh = Vh[:new_rank, :]
    if clamp is not None:
        high = torch.quantile(torch.cat([U.flatten(), Vh.flatten()]), clamp)
        U, Vh = U.clamp(-high, high), Vh.clamp(-high, high)
    if conv2d:
        kernel_A = cast(torch.Tensor, layer.lora_A[present[0][0]].weight).shape[1:]
        U = U.reshape(U.shape[0], new_rank, 1, 1)
        Vh = Vh.reshape((new_rank,) + tuple(kernel_A))
    return Vh, U
