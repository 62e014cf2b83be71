"""LoRA on `nn.Parameter`s (`LoraConfig.target_parameters`), as HF PEFT 0.21's `lora.ParamWrapper`.

A targeted parameter (2-D `(out, in)`, or 3-D `(experts, ., .)` such as the stacked expert weights of a
mixture-of-experts layer) gets a low-rank update per expert: `lora_A` is `Linear(in, r * experts)` and `lora_B`
`Linear(r * experts, out)`, laid out exactly as HF PEFT's so that the saved tensors are interchangeable. The
module holding the parameter is wrapped; the wrapper runs the module with `parameter + delta` in place of the
parameter (`torch.func.functional_call`), so any module using its parameters in any way works. Each wrapper adapts one
parameter; two parameters of one module give nested wrappers (`experts.base_layer.lora_A...`), in the order the module
registers its parameters, as in HF PEFT.

A 3-D parameter is read as `(experts, out, in)` unless its module has `is_transposed = True` (then
`(experts, in, out)`), HF PEFT's convention. Restrictions (HF PEFT's, same exception types): no `lora_dropout` (x cannot
be factored out of the update), no `fan_in_fan_out`, no DoRA, no mixed-adapter batches, not for a parameter of a module
also named in `target_modules`, not for a parameter of the top-level model; every adapter using `target_parameters`
must target the same parameters.
"""

from __future__ import annotations

import warnings
from typing import Any, Optional, cast

import torch
from torch import nn
from torch.func import functional_call

from ..base import BaseTunerLayer, get_submodule_parent, pattern_value
from .layer import LoraLayer


class ParamWrapper(nn.Module, LoraLayer):
    """LoRA over one `nn.Parameter` (named `parameter_name`) of `base_layer` (the module holding it, or another
    `ParamWrapper` of that module)."""

    def __init__(
        self,
        base_layer: nn.Module,
        adapter_name: str,
        parameter_name: str,
        r: int = 0,
        lora_alpha: float = 1,
        lora_dropout: float = 0.0,
        init_lora_weights: bool | str = True,
        fan_in_fan_out: bool = False,
        use_rslora: bool = False,
        use_dora: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        name = type(self).__name__
        if fan_in_fan_out:
            raise ValueError(f"lora.{name} does not work with fan_in_fan_out (target_parameters); set it to False")
        self.parameter_name = parameter_name
        owner = _owner(base_layer)
        param = getattr(owner, parameter_name, None)
        if not isinstance(param, torch.Tensor):
            raise ValueError(f"lora.{name}: {type(owner).__name__} has no parameter {parameter_name!r}")
        shape = tuple(param.shape)
        if len(shape) == 3:
            # (experts, out, in) as HF PEFT reads it, or (experts, in, out) for a module with is_transposed = True
            self.transposed = bool(getattr(owner, "is_transposed", False))
            experts, first, second = shape
            in_features, out_features = (first, second) if self.transposed else (second, first)
        elif len(shape) == 2:
            self.transposed = False
            experts, (out_features, in_features) = 1, shape
        else:
            raise ValueError(
                f"lora.{name} was initialized with {len(shape)} dimensional Parameter, but only 2d and 3d are "
                f"supported ({type(owner).__name__}.{parameter_name} has shape {shape})"
            )
        self.num_experts = experts
        self.param_ndim = len(shape)
        self._init_lora_layer(base_layer, in_features, out_features)
        self._add_first_adapter(
            adapter_name, False, r, lora_alpha, lora_dropout, init_lora_weights, use_rslora, use_dora
        )

    def update_layer(
        self,
        adapter_name: str,
        r: int,
        lora_alpha: float,
        lora_dropout: float,
        init_lora_weights: bool | str,
        use_rslora: bool = False,
        use_dora: bool = False,
        **kwargs: Any,
    ) -> None:
        name = type(self).__name__
        if lora_dropout:
            # dropout acts on the layer's input, which the update of a parameter never sees
            raise ValueError(f"lora.{name} does not work with lora_dropout != 0. (target_parameters); set it to 0")
        if use_dora:
            raise ValueError(f"lora.{name} does not work with LoRA variants like DoRA (target_parameters)")
        super().update_layer(adapter_name, r, lora_alpha, 0.0, init_lora_weights, use_rslora)

    def _create_adapter_weights(self, adapter_name: str, r: int) -> None:
        self.lora_A[adapter_name] = nn.Linear(self.in_features, r * self.num_experts, bias=False)
        self.lora_B[adapter_name] = nn.Linear(r * self.num_experts, self.out_features, bias=False)

    # ---- the parameter ------------------------------------------------------------------------
    def get_param(self) -> torch.Tensor:
        """The adapted parameter itself (in the module under every nested wrapper)."""
        return cast(torch.Tensor, getattr(_owner(self.base_layer), self.parameter_name))

    _adapted_weight = get_param  # the adapters follow the parameter's device and dtype

    def _param_path(self) -> str:
        """The parameter's name relative to `base_layer` (through nested wrappers)."""
        parts, module = [], self.base_layer
        while isinstance(module, ParamWrapper):
            parts.append("base_layer")
            module = module.base_layer
        return ".".join([*parts, self.parameter_name])

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """scaling * B A per expert, shaped like the parameter (HF PEFT's layout of the r * experts rows)."""
        weight_A = cast(torch.Tensor, self.lora_A[adapter_name].weight)  # (r * experts, in)
        weight_B = cast(torch.Tensor, self.lora_B[adapter_name].weight)  # (out, r * experts)
        if self.param_ndim == 2:
            delta = weight_B @ weight_A
        else:
            A = weight_A.reshape(self.num_experts, -1, weight_A.shape[-1])  # (experts, r, in): rows expert-major
            B = weight_B.reshape(weight_B.shape[0], -1, self.num_experts)  # (out, r, experts): columns expert-minor
            delta = torch.einsum("ore,eri->eio" if self.transposed else "ore,eri->eoi", B, A)
        return delta * self.scaling[adapter_name]

    def merged_tensors(self, adapter_name: str) -> dict[str, torch.Tensor]:
        param = self.get_param()
        return {self.parameter_name: param.data + self.get_delta_weight(adapter_name).to(param.dtype)}

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        for name in self._adapters_to_merge(adapter_names):
            if safe_merge:
                self.check_finite_delta(name)
            param = self.get_param()
            with torch.no_grad():
                param.data += self.get_delta_weight(name).to(param.dtype)
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            param = self.get_param()
            with torch.no_grad():
                param.data -= self.get_delta_weight(name).to(param.dtype)

    def forward(self, x: Any, *args: Any, **kwargs: Any) -> Any:
        if self._mixed_batch is not None or kwargs.get("adapter_names") is not None:
            raise ValueError(
                f"lora.{type(self).__name__} does not support mixed batch inference (adapter_names=): an adapter on "
                "target_parameters changes a whole parameter, not the rows of one sample"
            )
        kwargs.pop("adapter_names", None)
        if not self._check_forward():
            return self.base_layer(x, *args, **kwargs)
        names = self.active_adapters_in(self.lora_A)
        if not names:
            return self.base_layer(x, *args, **kwargs)
        param = self.get_param()
        delta = sum(self.get_delta_weight(name) for name in names)
        weight = param + cast(torch.Tensor, delta).to(param.dtype)
        return functional_call(self.base_layer, {self._param_path(): weight}, (x, *args), kwargs, strict=False)

    def __repr__(self) -> str:
        text = nn.Module.__repr__(self)
        cut = text.find("(") + 1  # HF PEFT shows the parameter's name first
        return f"{self.repr_prefix}{text[:cut]}\n  parameter_name='{self.parameter_name}',{text[cut:]}"


def _owner(module: nn.Module) -> nn.Module:
    """The module under every nested `ParamWrapper`."""
    while isinstance(module, ParamWrapper):
        module = module.base_layer
    return module


def _strip_wrappers(name: str) -> str:
    """A module path without the `.base_layer` parts that tuner layers insert."""
    return ".".join(part for part in name.split(".") if part != "base_layer") if name else name


def parameter_targets(model: nn.Module, config: Any, module_keys: list[str]) -> list[tuple[str, str]]:
    """(module name as the user sees it, parameter name) of every parameter `config.target_parameters` names, in HF
    PEFT's order (modules in model order, each module's parameters in registration order). An entry matches the full
    name `module.param` exactly or as its dotted suffix. Everything HF PEFT refuses is refused here, before any change;
    `module_keys`: the modules `target_modules` is about to adapt."""
    wanted = list(config.target_parameters or [])
    if not wanted:
        return []
    found: list[tuple[str, str]] = []
    for name, module in model.named_modules():
        if isinstance(module, BaseTunerLayer) or any(
            part.startswith("lora_") or part in ("modules_to_save", "original_module") for part in name.split(".")
        ):
            continue
        user_name = _strip_wrappers(name)
        for param_name, param in module.named_parameters(recurse=False):
            key = f"{user_name}.{param_name}" if user_name else param_name
            if not any(key == w or key.endswith("." + w) for w in wanted):
                continue
            if not user_name:
                raise ValueError(
                    f"Targeting an nn.Parameter on the top-level module is not supported (parameter {param_name!r}); "
                    "target_parameters can only name parameters of a sub-module"
                )
            holder = model.get_submodule(user_name)
            if user_name in module_keys or (
                isinstance(holder, BaseTunerLayer) and not isinstance(holder, ParamWrapper)
            ):
                raise ValueError(
                    f"Trying to wrap an `nn.Parameter` of layer {user_name!r} of type {type(module).__name__}, which "
                    "is not a valid target: the layer is also adapted through target_modules. Leave it out of "
                    "target_modules (e.g. target_modules=[]) or of target_parameters"
                )
            if param.dim() not in (2, 3):
                raise ValueError(
                    f"target_parameters: {key} has {param.dim()} dimensions (shape {tuple(param.shape)}), but only "
                    "2d and 3d parameters can be adapted"
                )
            found.append((user_name, param_name))
    unmatched = [w for w in wanted if not any(f"{m}.{p}" == w or f"{m}.{p}".endswith("." + w) for m, p in found)]
    if found and unmatched:
        warnings.warn(
            f"target_parameters entries {unmatched} matched no parameter of the model and were ignored",
            RuntimeWarning,
            stacklevel=4,
        )
    return found


def check_config(config: Any, others: dict[str, Any]) -> None:
    """HF PEFT's refusals of a config with `target_parameters`, before any change."""
    wanted = config.target_parameters
    if not wanted:
        return
    if config.lora_dropout:
        raise ValueError(
            "lora.ParamWrapper does not work with lora_dropout != 0. (target_parameters): dropout acts on a layer's "
            "input, which the update of a parameter never sees; set lora_dropout=0"
        )
    if config.use_dora:
        raise ValueError("lora.ParamWrapper does not work with LoRA variants like DoRA (target_parameters)")
    for name, other in others.items():
        theirs = other.target_parameters
        if theirs and set(theirs) != set(wanted):
            raise ValueError(
                "When using multiple adapters with `target_parameters`, all adapters must target the same set of "
                f"parameters, but got {sorted(wanted)} for the new adapter and {sorted(theirs)} for adapter "
                f"{name!r}."
            )


def inject(
    model: nn.Module,
    config: Any,
    adapter_name: str,
    targets: list[tuple[str, str]],
    originals: list[tuple[nn.Module, str, nn.Module]],
) -> None:
    """Wrap every targeted parameter (or add the adapter to its wrapper from an earlier adapter). `originals` gets
    (parent, name, what was there) before each change, for the tuner's undo on failure."""
    for user_name, param_name in targets:
        existing: Optional[nn.Module] = model.get_submodule(user_name)
        while isinstance(existing, ParamWrapper) and existing.parameter_name != param_name:
            existing = existing.base_layer
        key = f"{user_name}.{param_name}"  # rank / alpha patterns match the parameter's name, as in HF PEFT
        r = pattern_value(config.rank_pattern, key, config.r)
        alpha = pattern_value(config.alpha_pattern, key, config.lora_alpha)
        options = dict(
            r=r,
            lora_alpha=alpha,
            lora_dropout=config.lora_dropout,
            init_lora_weights=config.init_lora_weights,
            use_rslora=config.use_rslora,
            use_dora=config.use_dora,
        )
        parent, target, child = get_submodule_parent(model, user_name)
        originals.append((parent, child, existing if isinstance(existing, ParamWrapper) else target))
        if isinstance(existing, ParamWrapper):
            existing.update_layer(adapter_name, **options)
            continue
        new = ParamWrapper(target, adapter_name, param_name, fan_in_fan_out=config.fan_in_fan_out, **options)
        setattr(parent, child, new)
