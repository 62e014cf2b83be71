"""Hardware strategies for adapters: one small adapter per strategy, built on Lightning's own engines.

    trainer = Trainer(strategy=make_strategy("fsdp"), accelerator="cpu", devices=2, callbacks=[PEFTCallback(cfg)])

- `single` / `int8` / `int4`: Lightning's default single-device strategy (`int8` / `int4` only check that
  bitsandbytes is installed; the app (`quantize: int8` / `int4`) quantizes the base model's linear layers before
  injection, through `lightning_peft.quantization.quantize_base_linears`).
- `ddp`: Lightning's `DDPStrategy` with `find_unused_parameters=False`. Every tuner keeps each parameter
  that requires grad in the graph (frozen originals of `modules_to_save`, inactive adapters and the
  frozen word embeddings do not require grad), so DDP needs no unused-parameter search.
- `fsdp`: FSDP2 (`torch.distributed.fsdp.fully_shard`) through `PeftFSDP2Strategy`, a Lightning
  `ModelParallelStrategy` that shards each transformer block (classes from the HF model's
  `_no_split_modules`, or `block_classes=`) and then each top-level child of the LightningModule, in
  `setup`, i.e. after the adapter was injected. Runs on CPU (gloo) and GPU (nccl). Checkpoints are one
  consolidated file; adapter exports gather full tensors (`DTensor.full_tensor()`).
  A model holding bitsandbytes (8-bit / 4-bit) layers is refused (`check_fsdp2_quantization`).
- `fsdp1`: Lightning's `FSDPStrategy` (`use_orig_params=True`, auto-wrap by block), CUDA only.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional, Union, cast

import lightning.pytorch as pl
import torch
from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy, ModelParallelStrategy, Strategy
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch import nn

from .._compat import (
    from_config,
    is_full_checkpoint,
    load_model_parallel_checkpoint,
    materialize_distributed_module,
    no_split_modules,
    optimizers_to_device,
)
from ..tuners.base import parameter_counts  # noqa: F401 - re-exported for strategy users

FSDP1_ON_CPU = (
    "the `fsdp1` strategy (FSDP1, Lightning's FSDPStrategy) runs on CUDA GPUs only; on CPU use `fsdp` "
    "(FSDP2 through ModelParallelStrategy), e.g. `strategy=fsdp` or make_strategy('fsdp')"
)


# ---------------------------------------------------------------------------------------------
# transformer blocks
# ---------------------------------------------------------------------------------------------
def no_split_module_names(module: nn.Module) -> set[str]:
    """Block class names from every HF model inside `module` (`_no_split_modules`)."""
    names: set[str] = set()
    for sub in module.modules():
        found = no_split_modules(sub)
        if found:
            names.update(found)
    return names


def resolve_block_classes(module: nn.Module, block_classes: Optional[Iterable[Union[str, type]]] = None) -> set[type]:
    """The classes to shard / wrap one by one: given (names or classes) or the HF model's `_no_split_modules`."""
    wanted = list(block_classes) if block_classes else sorted(no_split_module_names(module))
    if not wanted:
        raise ValueError(
            f"cannot tell the transformer blocks of {type(module).__name__}: it has no HF model with "
            "_no_split_modules; pass block_classes=['MyBlock'] (class names or classes)"
        )
    names = {w for w in wanted if isinstance(w, str)}
    classes = {w for w in wanted if isinstance(w, type)}
    for sub in module.modules():
        for cls in type(sub).__mro__:
            if cls.__name__ in names:
                classes.add(cls)
    found_names = {c.__name__ for c in classes}
    missing = sorted(names - found_names)
    if missing:
        raise ValueError(
            f"block class(es) {missing} do not occur in {type(module).__name__}; its module classes are "
            f"e.g. {sorted({type(m).__name__ for m in module.modules()})[:12]}"
        )
    return classes


# ---------------------------------------------------------------------------------------------
# FSDP2
# ---------------------------------------------------------------------------------------------
def _is_fsdp2(module: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


def shard_blocks(module: nn.Module, mesh: Any, block_classes: Iterable[type], **fully_shard_kwargs: Any) -> int:
    """`fully_shard` every block (innermost first), then every top-level child holding parameters.
    Idempotent: already-sharded modules are left alone. Returns the number of blocks sharded now."""
    from torch.distributed.fsdp import fully_shard

    classes = tuple(block_classes)
    blocks = [m for m in module.modules() if isinstance(m, classes) and not _is_fsdp2(m)]
    for block in reversed(blocks):  # children before parents: a block inside a block gets its own unit
        fully_shard(block, mesh=mesh, **fully_shard_kwargs)
    for _, child in module.named_children():
        if not _is_fsdp2(child) and any(True for _ in child.parameters()):
            fully_shard(child, mesh=mesh, **fully_shard_kwargs)
    return len(blocks)


def is_sharded(module_or_trainer: Any) -> bool:
    """Whether the model holds DTensor (FSDP2 / tensor-parallel) parameters."""
    module = module_or_trainer.lightning_module if isinstance(module_or_trainer, pl.Trainer) else module_or_trainer
    if module is None:
        return False
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in module.parameters())


@contextlib.contextmanager
def full_tensors(module: nn.Module) -> Iterator[nn.Module]:
    """Inside the block every DTensor parameter / buffer of `module` is replaced by its full tensor
    (`DTensor.full_tensor()`, a collective: every rank must enter); afterwards the shards are put back.
    For reading (exports, comparisons): do not run FSDP forwards or optimizer steps inside."""
    from torch.distributed.tensor import DTensor

    swapped: list[tuple[nn.Module, str, str, Any]] = []
    try:
        for sub in module.modules():
            for kind in ("_parameters", "_buffers"):
                holder = getattr(sub, kind)
                for name, value in list(holder.items()):
                    if isinstance(value, DTensor):
                        full = value.full_tensor().detach()
                        holder[name] = (
                            nn.Parameter(full, requires_grad=value.requires_grad) if kind == "_parameters" else full
                        )
                        swapped.append((sub, kind, name, value))
        yield module
    finally:
        for sub, kind, name, value in reversed(swapped):
            getattr(sub, kind)[name] = value


def full_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """`module.state_dict()` with full tensors on CPU on every rank (collective under FSDP2)."""
    with full_tensors(module):
        return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}


def check_fsdp2_quantization(module: nn.Module) -> None:
    """Refuse to shard bitsandbytes 4-bit / 8-bit layers with FSDP2 (measured with bitsandbytes 0.50 on 2 gloo
    processes): `fully_shard` replaces their `Params4bit` / `Int8Params` weight by a plain DTensor of the packed
    bytes, which drops the quantization state (`quant_state`, `SCB`) their forward needs ("quant_state is
    required")."""
    from ..quantization import quantized_layer_names

    names = quantized_layer_names(module)
    if names:
        more = f" and {len(names) - 3} more" if len(names) > 3 else ""
        raise ValueError(
            f"FSDP2 cannot shard bitsandbytes quantized layers ({', '.join(names[:3])}{more}): fully_shard turns "
            "their packed weight into a plain DTensor and drops the quantization state their forward needs. Train a "
            "quantized (QLoRA / 8-bit) base on one device (strategy=int4 / int8), or shard a full-precision base "
            "with fsdp"
        )


class PeftFSDP2Strategy(ModelParallelStrategy):
    """FSDP2 for adapters: Lightning's `ModelParallelStrategy` with data parallelism over every process
    and the blocks sharded in `setup` (after the tuner was injected in `setup` / `configure_model`).

    Args:
        block_classes: class names (or classes) to shard one by one; default the HF model's
            `_no_split_modules`.
        reshard_after_forward: passed to `fully_shard` (False trades memory for one all-gather less).
        save_distributed_checkpoint: False (default) writes one consolidated `.ckpt` on rank 0.
        mp_policy: an optional `torch.distributed.fsdp.MixedPrecisionPolicy`.
    """

    def __init__(
        self,
        block_classes: Optional[Iterable[Union[str, type]]] = None,
        reshard_after_forward: bool = True,
        save_distributed_checkpoint: bool = False,
        mp_policy: Any = None,
        **kwargs: Any,
    ) -> None:
        kwargs.setdefault("data_parallel_size", "auto")
        kwargs.setdefault("tensor_parallel_size", 1)
        super().__init__(save_distributed_checkpoint=save_distributed_checkpoint, **kwargs)
        self.block_classes = list(block_classes) if block_classes else None
        self.fully_shard_kwargs: dict[str, Any] = {"reshard_after_forward": reshard_after_forward}
        if mp_policy is not None:
            self.fully_shard_kwargs["mp_policy"] = mp_policy

    def setup_environment(self) -> None:
        if self._data_parallel_size == "auto":  # pure FSDP: every process is a data-parallel rank
            self._data_parallel_size = self.num_nodes * self.num_processes
        super().setup_environment()

    def shard(self) -> None:
        module = cast(pl.LightningModule, self.lightning_module)  # set: the trainer connected the model
        if any(_is_fsdp2(m) for m in module.modules()):
            return  # already sharded (e.g. validate / test after fit) or sharded by the user's configure_model
        check_fsdp2_quantization(module)
        classes = resolve_block_classes(module, self.block_classes)
        mesh = self.device_mesh["data_parallel"]
        count = shard_blocks(module, mesh, classes, **self.fully_shard_kwargs)
        rank_zero_info(
            f"lightning_peft: FSDP2 sharded {count} blocks ({', '.join(sorted(c.__name__ for c in classes))})"
            f" over {mesh.size()} processes"
        )

    def setup(self, trainer: "pl.Trainer") -> None:
        # ModelParallelStrategy.setup without its "configure_model must be overridden" rule: we shard here
        from lightning.pytorch.trainer.states import TrainerFn

        if self.model is None or self.accelerator is None:
            raise RuntimeError("PeftFSDP2Strategy.setup ran before Lightning connected the model and accelerator")
        self.accelerator.setup(trainer)
        self.shard()
        materialize_distributed_module(self.model, self.root_device)
        self.model = self.precision_plugin.convert_module(self.model)
        self.model_to_device()
        self.barrier()
        if trainer.state.fn == TrainerFn.FITTING:
            self.setup_optimizers(trainer)
        self.setup_precision_plugin()
        if trainer.state.fn == TrainerFn.FITTING:
            optimizers_to_device(self.optimizers, self.root_device)

    def load_checkpoint(self, checkpoint_path: Any, weights_only: Optional[bool] = None) -> dict[str, Any]:
        """Adapter-only checkpoints: every adapter tensor must be in the file, the frozen base need not be."""
        from ._state import all_adapter_keys

        path = Path(self.broadcast(checkpoint_path))
        module = cast(pl.LightningModule, self.lightning_module)  # set: the trainer connected the model
        adapter_keys = all_adapter_keys(module)
        strict = module.strict_loading
        if adapter_keys and is_full_checkpoint(path):
            saved = torch.load(
                path,
                mmap=True,
                map_location="cpu",  # weights only unless the caller opted out
                weights_only=True if weights_only is None else weights_only,
            )
            missing = sorted(adapter_keys - set(saved["state_dict"]))
            if missing:
                raise KeyError(
                    f"checkpoint {str(path)!r} lacks {len(missing)} adapter tensor(s) of this model, e.g. "
                    f"{missing[:3]}; was it written for another adapter config?"
                )
            del saved
            strict = False  # the base weights are not in an adapter checkpoint
        optimizers = {f"optimizer_{i}": opt for i, opt in enumerate(self.optimizers)}
        return load_model_parallel_checkpoint(
            path=path,
            state={"state_dict": self.model, **optimizers},
            strict=strict,
            optimizer_states_from_list=True,
            weights_only=weights_only,
        )


# ---------------------------------------------------------------------------------------------
# FSDP1 (GPU)
# ---------------------------------------------------------------------------------------------
class PeftFSDP1Strategy(FSDPStrategy):
    """Lightning's `FSDPStrategy` with `use_orig_params=True` (frozen base and trainable adapter share
    units) and auto-wrap by transformer block, resolved at `setup` from the injected model. CUDA only."""

    def __init__(self, block_classes: Optional[Iterable[Union[str, type]]] = None, **kwargs: Any) -> None:
        kwargs.setdefault("use_orig_params", True)
        if not kwargs["use_orig_params"]:
            raise ValueError(
                "FSDP1 with adapters needs use_orig_params=True (frozen and trainable parameters share FSDP units)"
            )
        super().__init__(**kwargs)
        self.block_classes = list(block_classes) if block_classes else None

    def setup_environment(self) -> None:
        if self.root_device.type != "cuda":
            raise RuntimeError(FSDP1_ON_CPU)
        super().setup_environment()

    def setup(self, trainer: "pl.Trainer") -> None:
        if "auto_wrap_policy" not in self.kwargs:
            from torch.distributed.fsdp.wrap import ModuleWrapPolicy

            module = cast(pl.LightningModule, self.lightning_module)  # set: the trainer connected the model
            self.kwargs["auto_wrap_policy"] = ModuleWrapPolicy(resolve_block_classes(module, self.block_classes))
        super().setup(trainer)


# ---------------------------------------------------------------------------------------------
# building a strategy from a name
# ---------------------------------------------------------------------------------------------
class StrategyAdapter:
    """How one named strategy is built; subclasses override what differs."""

    name = "single"
    requires_gpu = False

    def check(self, accelerator: str) -> None:
        if self.requires_gpu and (accelerator == "cpu" or (accelerator == "auto" and not torch.cuda.is_available())):
            raise RuntimeError(FSDP1_ON_CPU)

    def build(self, **kwargs: Any) -> Union[str, Strategy]:
        return "auto"


class SingleAdapter(StrategyAdapter):
    pass


class Int8Adapter(StrategyAdapter):
    name = "int8"

    def check(self, accelerator: str) -> None:
        from ..quantization import require_bitsandbytes

        require_bitsandbytes()


class DDPAdapter(StrategyAdapter):
    name = "ddp"

    def build(self, **kwargs: Any) -> Strategy:
        kwargs.setdefault("find_unused_parameters", False)
        return DDPStrategy(**kwargs)


class FSDP2Adapter(StrategyAdapter):
    name = "fsdp"

    def build(self, **kwargs: Any) -> Strategy:
        return PeftFSDP2Strategy(**kwargs)


class FSDP1Adapter(StrategyAdapter):
    name = "fsdp1"
    requires_gpu = True

    def build(self, **kwargs: Any) -> Strategy:
        return PeftFSDP1Strategy(**kwargs)


class Int4Adapter(Int8Adapter):
    name = "int4"


STRATEGIES: dict[str, StrategyAdapter] = {
    a.name: a for a in (SingleAdapter(), Int8Adapter(), Int4Adapter(), DDPAdapter(), FSDP2Adapter(), FSDP1Adapter())
}


def get_adapter(name: str) -> StrategyAdapter:
    if name not in STRATEGIES:
        raise ValueError(f"unknown strategy {name!r}; use one of: {', '.join(STRATEGIES)}")
    return STRATEGIES[name]


def make_strategy(name: str, accelerator: str = "auto", **kwargs: Any) -> Union[str, Strategy]:
    """The Lightning strategy object (or "auto") for a strategy name; clear errors for impossible choices."""
    adapter = get_adapter(name)
    adapter.check(accelerator)
    return adapter.build(**kwargs)


# ---------------------------------------------------------------------------------------------
# exports under FSDP2 (called by PEFTCallback.on_fit_end on every rank)
# ---------------------------------------------------------------------------------------------
def export_sharded(
    trainer: "pl.Trainer",
    pl_module: "pl.LightningModule",
    state: Any,
    export_dir: str,
    merge: bool,
    extras: Optional[Callable[[str], None]] = None,
    tensors: Optional[dict[str, torch.Tensor]] = None,
) -> tuple[str, Optional[str]]:
    """Write `adapter/` (and `merged/`) from full tensors gathered from every rank; rank 0 writes.

    The sharded model in memory keeps its adapter unmerged (merging DTensor shards in place would be
    undone by FSDP's next all-gather); `merged/` is built on rank 0 from a fresh, unsharded copy of
    the base model (HF models: `from_config`) with the gathered weights, then merged and saved.
    `tensors` (rank 0: the adapter read from the best checkpoint) replace the adapter's own.
    """
    from ._state import ADAPTER_SUBDIR, MERGED_SUBDIR, save_merged_model

    adapter_dir = os.path.join(export_dir, ADAPTER_SUBDIR)
    merged_dir = os.path.join(export_dir, MERGED_SUBDIR) if merge and state.can_merge else None
    peft = state.require_peft("export the adapter")
    with full_tensors(pl_module):
        state.save_adapter(adapter_dir, is_main_process=trainer.is_global_zero, extras=extras, tensors=tensors)
        full = (
            {k: v.detach().cpu() for k, v in peft.state_dict().items()}
            if merged_dir and trainer.is_global_zero
            else None
        )
        if full is not None and tensors:
            full.update(tensors)
    if merged_dir and trainer.is_global_zero:
        merged = _unsharded_merged_copy(peft, state, cast(dict[str, torch.Tensor], full))  # gathered: same condition
        if merged is None:
            rank_zero_warn(
                "lightning_peft: under FSDP the merged model is rebuilt from the model's config, which "
                f"{type(peft.get_base_model()).__name__} lacks; only the adapter was exported"
            )
            merged_dir = None
        else:
            save_merged_model(merged, merged_dir, extras=extras)
    trainer.strategy.barrier("lightning_peft.export_sharded")
    return adapter_dir, merged_dir


def _unsharded_merged_copy(peft: Any, state: Any, full: dict[str, torch.Tensor]) -> Optional[nn.Module]:
    from ..peft_model import get_peft_model

    base = peft.get_base_model()
    config = getattr(base, "config", None)
    cls = type(base)
    fresh = None if config is None else from_config(cls, config)
    if fresh is None:
        return None
    copy_ = get_peft_model(fresh, state.config, state.adapter_name)
    for name, config in peft.peft_config.items():  # earlier adapters (a second fit): kept, not merged
        if name != state.adapter_name:
            copy_.add_adapter(name, config)
    copy_.set_adapter(state.adapter_name)
    copy_.load_state_dict(full, strict=True)
    return copy_.merge_and_unload()


__all__ = [
    "make_strategy",
    "get_adapter",
    "STRATEGIES",
    "PeftFSDP2Strategy",
    "PeftFSDP1Strategy",
    "full_tensors",
    "full_state_dict",
    "is_sharded",
    "check_fsdp2_quantization",
    "shard_blocks",
    "resolve_block_classes",
    "export_sharded",
    "parameter_counts",
    "FSDP1_ON_CPU",
]
