"""8-bit base models (bitsandbytes `Linear8bitLt`): quantizing a base model before a tuner is injected.

The base model's linear layers are quantized *before* the tuner is injected, so the adapter's own
layers (LoRA's A / B, IA3 vectors, prompt encoders), the output head and the task heads stay in full
precision. Lightning's `BitsandbytesPrecision` is not used: it is CUDA-only and converts every
`nn.Linear`, the adapter's own included.

    model = quantize_base_linears(model)             # Linear / Conv1D -> Linear8bitLt (int8 weight)
    peft = get_peft_model(model, LoraConfig(...))    # LoRA A/B in fp32 over the 8-bit layers

Merging (see the README, "8-bit base"):
- `merge_and_unload()` / `merge_adapter()` on an 8-bit base dequantizes the int8 weight, adds the
  LoRA delta and requantizes (row-wise absmax, as bitsandbytes does): memory stays 8-bit, but the
  merged weight is rounded again, so outputs differ slightly from the unmerged model (one warning).
- `dequantize_base_linears(peft_model)` first turns every 8-bit layer back into an `nn.Linear` in the
  compute dtype; a merge after it is an exact floating-point add. This is how a merged model is
  exported (`save_pretrained` of a plain model that loads without bitsandbytes).
IA3 cannot be merged into 8-bit layers at all (its layer refuses); `check_int8_compatible` says so
before training starts. Each tuner's own 8-bit layer lives in its folder (`tuners/lora/bnb.py`,
`tuners/ia3/bnb.py`) and is declared where the tuner registers itself.

bitsandbytes is imported only when a model is quantized (or an 8-bit layer is wrapped).
"""

from __future__ import annotations

import warnings
from typing import Any, Iterable, Optional, cast

import torch
from torch import nn

from .tuners.base import (
    TASK_HEAD_NAMES,
    BaseTunerLayer,
    ModulesToSaveWrapper,
    get_submodule_parent,
    is_conv1d,
    is_linear8bit,
    name_matches,
)
from .tuners.registry import find_tuner, registered_tuners

MIN_BITSANDBYTES = (0, 48)
INSTALL_HINT = "pip install lightning_peft[int8]"
DEFAULT_THRESHOLD = 6.0  # LLM.int8() outlier threshold (0 disables the mixed-precision decomposition)


# ---------------------------------------------------------------------------------------------
# bitsandbytes
# ---------------------------------------------------------------------------------------------
def require_bitsandbytes() -> Any:
    """The bitsandbytes module, or an ImportError that says which extra to install."""
    try:
        import bitsandbytes
    except ImportError as err:
        raise ImportError(
            f"8-bit base models need bitsandbytes >= {'.'.join(map(str, MIN_BITSANDBYTES))}, which is not "
            f"installed ({err}); install the extra: `{INSTALL_HINT}`"
        ) from err
    version = tuple(int(p) for p in bitsandbytes.__version__.split(".")[:2] if p.isdigit())
    if version < MIN_BITSANDBYTES:
        raise ImportError(
            f"bitsandbytes {bitsandbytes.__version__} is too old for 8-bit training on CPU (needs >= "
            f"{'.'.join(map(str, MIN_BITSANDBYTES))}); upgrade with `{INSTALL_HINT}`"
        )
    return bitsandbytes


def dequantize_weight(layer: nn.Module) -> torch.Tensor:
    """The fp32 weight (out, in) of a `Linear8bitLt` (int8 row-wise absmax: W = CB * SCB / 127)."""
    weight = cast(torch.Tensor, layer.weight)
    if weight.dtype != torch.int8:  # not quantized yet (still on the meta device or has_fp16_weights)
        return weight.data.float()
    scb = getattr(weight, "SCB", None)
    if scb is None:
        scb = getattr(layer.state, "SCB", None)
    if scb is None:
        raise ValueError("this Linear8bitLt has an int8 weight but no row statistics (SCB); it cannot be dequantized")
    return weight.data.float() * (scb.float().unsqueeze(1) / 127.0)


def quantize_weight(weight: torch.Tensor, device: Optional[torch.device] = None) -> nn.Parameter:
    """An `Int8Params` holding `weight` (out, in) quantized by bitsandbytes' own code path."""
    bnb = require_bitsandbytes()
    device = torch.device(device) if device is not None else weight.device
    param = bnb.nn.Int8Params(weight.detach().to("cpu", torch.float32), requires_grad=False, has_fp16_weights=False)
    return param.to(device)  # moving an unquantized Int8Params quantizes it


def _make_linear8bit(weight: torch.Tensor, bias: Optional[torch.Tensor], threshold: float) -> nn.Module:
    bnb = require_bitsandbytes()
    out_features, in_features = weight.shape
    layer = bnb.nn.Linear8bitLt(
        in_features, out_features, bias=bias is not None, has_fp16_weights=False, threshold=threshold, device="meta"
    )
    layer.weight = quantize_weight(weight, device=weight.device)
    if bias is not None:
        layer.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
    return layer


# ---------------------------------------------------------------------------------------------
# quantizing / dequantizing a model
# ---------------------------------------------------------------------------------------------


def quantize_base_linears(
    model: nn.Module, skip: Iterable[str] = (), threshold: float = DEFAULT_THRESHOLD, include_conv1d: bool = True
) -> nn.Module:
    """Replace the base model's `nn.Linear` (and transformers `Conv1D`, transposed) layers by
    bitsandbytes `Linear8bitLt` with int8 weights, in place; returns `model`.

    Never quantized: the output embeddings (`lm_head`), task heads (`classifier`, `score`,
    `qa_outputs`), modules named in `skip` (pass the tuner's `modules_to_save`), anything inside
    them, and the layers of an adapter. Quantize before injecting a tuner: a model that already
    holds adapters is refused.
    """
    require_bitsandbytes()
    if any(isinstance(m, (BaseTunerLayer, ModulesToSaveWrapper)) for m in model.modules()):
        raise ValueError(
            "quantize_base_linears: this model already holds adapters; quantize the base model first, "
            "then inject the tuner (so the adapter's own layers stay in full precision)"
        )
    skip_names = set(skip or ()) | set(TASK_HEAD_NAMES) | {"lm_head"}
    get_output_embeddings = getattr(model, "get_output_embeddings", None)
    head = get_output_embeddings() if callable(get_output_embeddings) else None
    skipped_prefixes = [
        name for name, module in model.named_modules() if name and (module is head or name_matches(name, skip_names))
    ]
    replaced = 0
    for name, module in list(model.named_modules()):
        if not name or any(name == p or name.startswith(p + ".") for p in skipped_prefixes):
            continue
        bias: Optional[torch.Tensor]
        if type(module) is nn.Linear:  # exact type: subclasses (and 8-bit layers) keep their own behaviour
            weight, bias = module.weight.data, module.bias.data if module.bias is not None else None
        elif include_conv1d and is_conv1d(module):
            weight, bias = module.weight.data.T, module.bias.data if module.bias is not None else None
        else:
            continue
        parent, _, child = get_submodule_parent(model, name)
        setattr(parent, child, _make_linear8bit(weight, bias, threshold))
        replaced += 1
    if replaced == 0:
        warnings.warn(
            "quantize_base_linears: the model has no Linear / Conv1D layer to quantize (outside the "
            "output head and skipped modules); it stays in full precision"
        )
    setattr(model, "_lightning_peft_quantized", "int8")  # a plain attribute (not a tensor or module)
    return model


def dequantize_base_linears(model: nn.Module, dtype: torch.dtype = torch.float32) -> nn.Module:
    """Replace every `Linear8bitLt` (adapters' base layers included) by an `nn.Linear` holding the
    dequantized weight in `dtype`, in place; returns `model`. Use it before `merge_and_unload()` to
    export a merged model in the compute dtype (an exact add, no requantization)."""
    for name, module in list(model.named_modules()):
        if not name or not is_linear8bit(module):
            continue
        linear = nn.Linear(
            module.in_features,
            module.out_features,
            bias=module.bias is not None,
            device=module.weight.device,
            dtype=dtype,
        )
        with torch.no_grad():
            linear.weight.copy_(dequantize_weight(module).to(dtype))
            if module.bias is not None:
                linear.bias.copy_(module.bias.detach().to(dtype))
        linear.requires_grad_(False)
        parent, _, child = get_submodule_parent(model, name)
        setattr(parent, child, linear)
    if getattr(model, "_lightning_peft_quantized", None):
        setattr(model, "_lightning_peft_quantized", None)
    return model


def dequantized_copy(model: nn.Module, dtype: torch.dtype = torch.float32) -> nn.Module:
    """A copy of `model` with every 8-bit layer dequantized to `dtype` (for saving a merged model that loads
    without bitsandbytes); `model` itself keeps its int8 weights."""
    import copy

    return dequantize_base_linears(copy.deepcopy(model), dtype=dtype)


def int8_layers(model: nn.Module) -> list[str]:
    return [name for name, module in model.named_modules() if is_linear8bit(module)]


def check_int8_compatible(config: Any, merge: bool = False) -> None:
    """Refuse, before training, a tuner that cannot run (or, with `merge`, be merged) over an 8-bit base."""
    peft_type = getattr(config, "peft_type", None)
    spec = find_tuner(peft_type)
    if spec is None or not spec.runs_over("int8"):
        supported = ", ".join(sorted(t for t, s in registered_tuners().items() if s.runs_over("int8")))
        raise ValueError(
            f"the {peft_type} tuner cannot run over 8-bit (bitsandbytes) base layers; with "
            f"quantize=int8 use one of: {supported}, or drop quantize=int8"
        )
    if merge and spec.can_merge and not spec.merges_into_quantized:
        raise ValueError(
            f"{peft_type} adapters cannot be merged into 8-bit base layers (their int8 weights "
            "cannot hold the scaled values); with quantize=int8 set merge=false (merge_on_train_end=False) "
            "and export the adapter only, or use LoRA, or train on a full-precision base"
        )


__all__ = [
    "quantize_base_linears",
    "dequantize_base_linears",
    "dequantize_weight",
    "quantize_weight",
    "check_int8_compatible",
    "require_bitsandbytes",
    "dequantized_copy",
    "is_linear8bit",
    "int8_layers",
    "INSTALL_HINT",
]
