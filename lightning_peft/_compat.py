"""Every private API of another package (Lightning, torch, transformers, Hydra, the stdlib) that lightning_peft
touches, in one place, each with why it is needed. Other modules import from here; `tests/test_compat.py` fails
when a module of the package uses a private foreign name itself.

When a dependency changes one of these, this file is the only one to adapt.
"""

from __future__ import annotations

import importlib
import re
from typing import Any, Callable, Optional

import torch
from torch import nn

# ---------------------------------------------------------------------------------------------
# stdlib
# ---------------------------------------------------------------------------------------------


def regex_parser() -> Any:
    """The stdlib's own regex parser (`re._parser` since 3.11, `sre_parse` before): there is no public one, and
    the pattern checks of `config.py` need the parsed tree."""
    return getattr(re, "_parser", None) or importlib.import_module("sre_parse")


# ---------------------------------------------------------------------------------------------
# torch
# ---------------------------------------------------------------------------------------------
# what `torch.compile(module)` wraps a module in: an `OptimizedModule` whose parameters are named under this prefix
COMPILED_PREFIX = "_orig_mod."


def compiled_inner(model: Any) -> Optional[nn.Module]:
    """The module `torch.compile` wrapped (`OptimizedModule._orig_mod`), else None: adapters and their keys live
    on the inner module, and torch exposes it under no public name."""
    inner = getattr(model, "_orig_mod", None)
    return inner if isinstance(inner, nn.Module) else None


def unwrap_compiled(model: Any) -> Any:
    """`model` without `torch.compile`'s wrapper(s)."""
    while (inner := compiled_inner(model)) is not None:
        model = inner
    return model


def is_compiled(model: nn.Module) -> bool:
    """`model` is `torch.compile`'s wrapper, or was compiled in place (`module.compile()` sets
    `_compiled_call_impl`; no public flag tells)."""
    return compiled_inner(model) is not None or getattr(model, "_compiled_call_impl", None) is not None


def incompatible_keys(missing_keys: list[str], unexpected_keys: list[str]) -> Any:
    """The named tuple `nn.Module.load_state_dict` returns (`torch.nn.modules.module._IncompatibleKeys`), so that
    our `load_state_dict` returns what torch's does."""
    from torch.nn.modules.module import _IncompatibleKeys

    return _IncompatibleKeys(missing_keys=missing_keys, unexpected_keys=unexpected_keys)


def child_modules(module: nn.Module) -> dict[str, Optional[nn.Module]]:
    """`module._modules`: the direct children by attribute name, including None entries, without building
    `named_children()` on every step of a key walk."""
    return module._modules


def own_parameters(module: nn.Module) -> dict[str, Optional[nn.Parameter]]:
    """`module._parameters`: its direct parameters by name. The fused LoRA path checks them on every forward of
    every adapted layer, where `nn.Module.__getattr__` costs ~0.8 us per lookup."""
    return module._parameters


def has_module_hooks(module: nn.Module) -> bool:
    """`module` has forward / backward hooks of its own: torch has no public query, and a fused fast path must
    not skip them."""
    return bool(
        module._forward_hooks or module._forward_pre_hooks or module._backward_hooks or module._backward_pre_hooks
    )


def has_global_module_hooks() -> bool:
    """Hooks registered for every module (`register_module_forward_hook` & co.): same reason, torch keeps them in
    private globals of `torch.nn.modules.module`."""
    g = torch.nn.modules.module
    return bool(
        g._global_forward_hooks
        or g._global_forward_pre_hooks
        or g._global_backward_hooks
        or g._global_backward_pre_hooks
    )


def state_dict_metadata(state_dict: Any) -> Any:
    """`state_dict._metadata` (the per-module metadata `nn.Module.state_dict` attaches, versions included): the
    adapter configs ride there, so that they travel with the state dict into checkpoints and back."""
    return getattr(state_dict, "_metadata", None)


def tensor_version(tensor: torch.Tensor) -> int:
    """`tensor._version` (bumped by every in-place write): tells which tensors a state-dict load wrote."""
    return int(tensor._version)


# ---------------------------------------------------------------------------------------------
# transformers
# ---------------------------------------------------------------------------------------------
def name_or_path(config: Any) -> Optional[str]:
    """`PretrainedConfig._name_or_path`: where a transformers model was loaded from (HF PEFT writes it as
    `base_model_name_or_path`); transformers has no public attribute for it."""
    return getattr(config, "_name_or_path", None)


def no_split_modules(model: Any) -> Optional[list[str]]:
    """`PreTrainedModel._no_split_modules`: the transformer block classes, which FSDP2 shards one by one."""
    return getattr(model, "_no_split_modules", None)


def from_config(cls: Any, config: Any) -> Optional[nn.Module]:
    """`PreTrainedModel._from_config`: a fresh model of `cls` from `config` without loading weights (the public
    `from_config` lives on the Auto classes only); None when `cls` is not a transformers model."""
    build = getattr(cls, "_from_config", None)
    return None if build is None else build(config)


# ---------------------------------------------------------------------------------------------
# Hydra
# ---------------------------------------------------------------------------------------------
def hydra_args_parser() -> Any:
    """Hydra's own command-line parser (`hydra._internal.utils.get_args_parser`): to tell overrides from Hydra's
    options exactly as Hydra will, before it runs."""
    from hydra._internal.utils import get_args_parser

    return get_args_parser()


# ---------------------------------------------------------------------------------------------
# Lightning
# ---------------------------------------------------------------------------------------------
def attached_trainer(module: Any) -> Any:
    """The Trainer a LightningModule is attached to, or None (`module.trainer` raises when there is none; the
    mixin's methods also run outside a Trainer)."""
    return getattr(module, "_trainer", None)


def generate_state_key(callback: Any, **fields: Any) -> str:
    """`Callback._generate_state_key`: Lightning's own format for a callback's `state_key` from its distinguishing
    fields (what its built-in callbacks use), so that several instances keep apart in checkpoints."""
    return str(callback._generate_state_key(**fields))


def loaded_checkpoint(trainer: Any) -> Optional[dict[str, Any]]:
    """The checkpoint Lightning holds between restoring the module and restoring the training state
    (`trainer._checkpoint_connector._loaded_checkpoint`): a callback's `on_load_checkpoint` is skipped for a
    weights-only checkpoint, and `on_fit_start` is the last point to let one resume a fit."""
    return getattr(getattr(trainer, "_checkpoint_connector", None), "_loaded_checkpoint", None)


def fit_loop_train_loaders(trainer: Any) -> list[Any]:
    """The train dataloaders of the current fit (`fit_loop._combined_loader.flattened`): exact resume installs
    worker seeds on them after Lightning built them."""
    combined = getattr(getattr(trainer, "fit_loop", None), "_combined_loader", None)
    return list(getattr(combined, "flattened", None) or [])


def fit_loop_data_fetcher(trainer: Any) -> Any:
    """The fit loop's data fetcher (`fit_loop._data_fetcher`): `iter()` on it rebuilds the train iterator."""
    return getattr(getattr(trainer, "fit_loop", None), "_data_fetcher", None)


def pending_loader_states(trainer: Any) -> Any:
    """The train loaders' saved states the fit loop has not loaded yet (`fit_loop._combined_loader_states_to_load`,
    Lightning issue #20550)."""
    return getattr(getattr(trainer, "fit_loop", None), "_combined_loader_states_to_load", None)


def set_pending_loader_states(trainer: Any, states: Any) -> None:
    """Queue loader states for `load_pending_loader_states` (Lightning loaded and consumed them already when
    exact resume rebuilds the iterator with worker seeds)."""
    trainer.fit_loop._combined_loader_states_to_load = states


def load_pending_loader_states(trainer: Any) -> bool:
    """Load the queued loader states into the train loaders (`fit_loop._load_combined_loader_states`); False
    when this Lightning has no such method."""
    fit_loop = getattr(trainer, "fit_loop", None)
    load: Optional[Callable[[], None]] = getattr(fit_loop, "_load_combined_loader_states", None)
    if load is None:
        return False
    load()
    return True


def drop_persistent_iterator(loader: Any) -> None:
    """`DataLoader._iterator = None`: a `persistent_workers=True` loader reuses its iterator (and its workers,
    started with the old `worker_init_fn`) otherwise."""
    loader._iterator = None


def swa_average_model(callback: Any) -> Any:
    """`StochasticWeightAveraging._average_model`: the copy of the module SWA made in its `setup`, before a tuner
    injected later (PEFTMixin's `configure_model`) existed in it; it must be replaced by a copy of the injected
    module, and SWA exposes it under no public name."""
    return callback._average_model


def set_swa_average_model(callback: Any, model: Any) -> None:
    """Replace SWA's averaged copy (see `swa_average_model`)."""
    callback._average_model = model


def materialize_distributed_module(module: nn.Module, device: torch.device) -> None:
    """Lightning's own materialisation of meta-device parameters after FSDP2 sharding
    (`lightning.fabric.strategies.model_parallel._materialize_distributed_module`), as ModelParallelStrategy does."""
    from lightning.fabric.strategies.model_parallel import _materialize_distributed_module

    _materialize_distributed_module(module, device)


def optimizers_to_device(optimizers: Any, device: torch.device) -> None:
    """`lightning.fabric.utilities.optimizer._optimizers_to_device`: ModelParallelStrategy.setup's last step."""
    from lightning.fabric.utilities.optimizer import _optimizers_to_device

    _optimizers_to_device(optimizers, device)


def is_full_checkpoint(path: Any) -> bool:
    """`lightning.fabric.strategies.model_parallel._is_full_checkpoint`: a single-file (consolidated) checkpoint,
    as ModelParallelStrategy tells it from a distributed one."""
    from lightning.fabric.strategies.model_parallel import _is_full_checkpoint

    return bool(_is_full_checkpoint(path))


def load_model_parallel_checkpoint(*args: Any, **kwargs: Any) -> Any:
    """`lightning.fabric.strategies.model_parallel._load_checkpoint`: ModelParallelStrategy's loading of a
    consolidated or distributed checkpoint into sharded modules."""
    from lightning.fabric.strategies.model_parallel import _load_checkpoint

    return _load_checkpoint(*args, **kwargs)


def run_after_configure_model(module: Any, after: Callable[[], None]) -> None:
    """Call `after()` right after the LightningModule's next `configure_model()` returns (once).

    Why: PEFTCallback must inject its tuner into a model that the module only builds in `configure_model`, after
    that hook and before `strategy.setup` (precision conversion, DDP / FSDP wrapping, `configure_optimizers`).
    Lightning 2.6 calls no callback hook in between (`Trainer._run`: `_call_setup_hook`, `_call_configure_model`,
    the checkpoint restore (only with `ckpt_path`), `strategy.setup`), and calling `configure_model` early from
    the callback's `setup` would run it before the module's own `setup`. So the callback shadows the bound method
    on this one instance (through its `__dict__`) for that one call; the class and the user's method are untouched
    and the shadow removes itself. PEFTMixin needs none of this (its `configure_model` is called by `super()`)."""
    original = module.configure_model

    def configure_model_then() -> None:
        module.__dict__.pop("configure_model", None)  # one-shot: the class's method is back
        original()
        after()

    module.__dict__["configure_model"] = configure_model_then


# ---------------------------------------------------------------------------------------------
# Lightning: a LightningModule built as load_from_checkpoint builds it, weights not loaded yet
# ---------------------------------------------------------------------------------------------
def load_module_without_weights(module_class: Any, checkpoint: dict, **kwargs: Any) -> Any:
    """`module_class` instantiated exactly as `load_from_checkpoint` does (saved hyperparameters, CLI
    instantiators, `configure_model`, `on_load_checkpoint`) but with no weights loaded: PEFTCallback's
    `load_from_checkpoint` must apply the adapters in between. Lightning has only the private `_load_state`
    for this; it is handed the checkpoint with an empty state dict and loads nothing."""
    import warnings

    from lightning.pytorch.core.saving import _load_state

    stub = {k: v for k, v in checkpoint.items() if k != "state_dict"}
    stub["state_dict"] = {}
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message=".*Found keys that are in the model state dict but not in the checkpoint"
        )
        return _load_state(module_class, stub, strict=False, **kwargs)


# ---------------------------------------------------------------------------------------------
# bitsandbytes
# ---------------------------------------------------------------------------------------------
def unpack_bnb_cpu_4bit(weight: Any) -> None:
    """Undo, in place, bitsandbytes' CPU repacking of a 4-bit weight. On a CPU with AVX512-BF16,
    `Linear4bit.forward` in eval mode (input without grad) rewrites `weight.data` and `weight.quant_state` into a
    packed layout (`quant_state.packing_format_for_cpu`) that `dequantize_4bit` misreads; bitsandbytes itself
    undoes it with `functional._convert_weight_packed_for_cpu_inverse` before saving a state dict. Dequantizing
    (merge, export) needs the plain layout."""
    quant_state = getattr(weight, "quant_state", None)
    if quant_state is None or not getattr(quant_state, "packing_format_for_cpu", False):
        return
    from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

    weight.data, weight.quant_state = _convert_weight_packed_for_cpu_inverse(weight.data, quant_state)
