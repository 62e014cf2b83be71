"""8-bit and 4-bit base models (bitsandbytes `Linear8bitLt` / `Linear4bit`, i.e. QLoRA): quantizing a base model
before a tuner is injected.

The base model's linear layers are quantized *before* the tuner is injected, so the adapter's own
layers (LoRA's A / B, IA3 vectors, prompt encoders), the output head and the task heads stay in full
precision. Lightning's `BitsandbytesPrecision` is not used: it is CUDA-only and converts every
`nn.Linear`, the adapter's own included.

    model = quantize_base_linears(model)             # Linear / Conv1D -> Linear8bitLt (int8 weight)
    model = quantize_base_linears(model, bits=4)     # ... or Linear4bit (NF4, double quantization, fp32 compute)
    peft = get_peft_model(model, LoraConfig(...))    # LoRA A/B in fp32 over the quantized layers

Merging (see the README, "8-bit base" and "4-bit base"):
- `merge_and_unload()` / `merge_adapter()` on a quantized base dequantizes the weight, adds the
  LoRA delta and requantizes (int8: row-wise absmax; 4-bit: blockwise with the layer's own quant type,
  block size and double quantization, as bitsandbytes does): memory stays quantized, but the merged
  weight is rounded again, so outputs differ slightly from the unmerged model (one warning).
- `dequantize_base_linears(peft_model)` first turns every quantized layer back into an `nn.Linear`;
  a merge after it is an exact floating-point add. This is how a merged model is exported
  (`plain_for_export`: `save_pretrained` of a plain model that loads without bitsandbytes).
IA3 cannot be merged into quantized layers at all (its layer refuses); `check_quantized_compatible`
says so before training starts. Each tuner's own 8-bit / 4-bit layers live in its folder (`tuners/lora/bnb.py`,
`tuners/ia3/bnb.py`) and are declared where the tuner registers itself.

bitsandbytes is imported only when a model is quantized (or a quantized layer is dequantized or requantized).
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Any, Iterable, Iterator, Optional, cast

import torch
from torch import nn

from ._compat import unpack_bnb_cpu_4bit
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
BITS = (8, 4)
QUANT_TYPES = ("nf4", "fp4")  # 4-bit data types of bitsandbytes (QLoRA uses NF4)
COMPUTE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def is_linear4bit(module: nn.Module) -> bool:
    """A bitsandbytes `Linear4bit` (or a subclass: `LinearNF4`, `LinearFP4`), checked by name so that bitsandbytes
    is not imported for it."""
    return any(c.__name__ == "Linear4bit" and c.__module__.startswith("bitsandbytes") for c in type(module).__mro__)


def is_quantized_linear(module: nn.Module) -> bool:
    return is_linear8bit(module) or is_linear4bit(module)


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
    """The fp32 weight (out, in) of a `Linear8bitLt` (int8 row-wise absmax: W = CB * SCB / 127) or a `Linear4bit`
    (bitsandbytes' blockwise dequantization)."""
    weight = cast(torch.Tensor, layer.weight)
    if is_linear4bit(layer):
        if getattr(weight, "quant_state", None) is None:  # not quantized yet (meta device / before `.to()`)
            return weight.data.float()
        unpack_bnb_cpu_4bit(weight)
        bnb = require_bitsandbytes()
        quant_state: Any = getattr(weight, "quant_state")
        return cast(torch.Tensor, bnb.functional.dequantize_4bit(weight.data, quant_state)).float()
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


def keep_plain_layout(layer: nn.Module) -> None:
    """Keep a bitsandbytes `Linear4bit` on its plain (fp32-exact) CPU path, undoing a repacking already done.

    bitsandbytes 0.50, on a CPU with AVX512-BF16, repacks a 4-bit weight for a bf16 kernel on the first forward in
    eval mode (input without grad). That repacking is one-way and breaks training: a later training-mode forward
    still takes the packed path, which fails on layers with a bias ("a view of a leaf Variable that requires grad
    is being used in an in-place operation": Lightning validates before and during training); it rounds the block
    statistics to bf16 for good; and it fails outright when the input size is not a multiple of the block size
    ("shape '[32, 0]' is invalid")."""
    if hasattr(layer, "support_avx512bf16_for_cpu"):
        setattr(layer, "support_avx512bf16_for_cpu", False)
    unpack_bnb_cpu_4bit(layer.weight)


def keep_plain_layouts(model: nn.Module) -> None:
    """`keep_plain_layout` on every bitsandbytes `Linear4bit` of `model`, the layers no adapter wraps included (a
    model loaded in 4-bit by transformers: its untargeted layers with a bias break training after an eval forward)."""
    for module in model.modules():
        if is_linear4bit(module):
            keep_plain_layout(module)


def quantize_weight_4bit(weight: torch.Tensor, like: Any, device: Optional[torch.device] = None) -> nn.Parameter:
    """A `Params4bit` holding `weight` (out, in) quantized by bitsandbytes with the settings of the 4-bit weight
    `like` (quant type, block size, double quantization, storage dtype), in `like`'s original dtype."""
    bnb = require_bitsandbytes()
    device = torch.device(device) if device is not None else weight.device
    quant_state = getattr(like, "quant_state", None)
    # the dtype it was quantized from (bitsandbytes' CPU repacking sets `dtype` to bfloat16 and keeps the original)
    dtype = getattr(quant_state, "original_dtype", None) or getattr(quant_state, "dtype", None) or torch.float32
    param = bnb.nn.Params4bit(
        weight.detach().to("cpu", dtype),
        requires_grad=False,
        blocksize=getattr(like, "blocksize", None),
        compress_statistics=getattr(like, "compress_statistics", True),
        quant_type=getattr(like, "quant_type", "nf4"),
        quant_storage=getattr(like, "quant_storage", torch.uint8),
    )
    return cast(nn.Parameter, param.to(device))  # moving an unquantized Params4bit quantizes it


def _make_linear4bit(
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    quant_type: str,
    compute_dtype: torch.dtype,
    double_quant: bool,
) -> nn.Module:
    bnb = require_bitsandbytes()
    out_features, in_features = weight.shape
    layer = bnb.nn.Linear4bit(
        in_features,
        out_features,
        bias=bias is not None,
        compute_dtype=compute_dtype,
        compress_statistics=double_quant,
        quant_type=quant_type,
        device="meta",
    )
    param = bnb.nn.Params4bit(
        weight.detach().clone(), requires_grad=False, compress_statistics=double_quant, quant_type=quant_type
    )
    layer.weight = param.to(weight.device)  # moving an unquantized Params4bit quantizes it
    keep_plain_layout(layer)
    if bias is not None:
        layer.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
    return layer


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


def _check_4bit_options(
    bits: Any, quant_type: Any, compute_dtype: Any, double_quant: Any, threshold: Any
) -> tuple[int, str, torch.dtype, bool]:
    """The checked (bits, quant_type, compute_dtype, double_quant); a bad value is refused naming the argument."""
    if isinstance(bits, bool) or bits not in BITS:
        raise ValueError(f"quantize_base_linears: bits must be 8 (LLM.int8) or 4 (QLoRA), got {bits!r}")
    if bits == 8:
        given = [
            name
            for name, value in (
                ("quant_type", quant_type),
                ("compute_dtype", compute_dtype),
                ("double_quant", double_quant),
            )
            if value is not None
        ]
        if given:
            raise ValueError(
                f"quantize_base_linears: {', '.join(given)} only apply to 4-bit layers; pass bits=4, or drop "
                f"{'them' if len(given) > 1 else 'it'} for 8-bit"
            )
        return 8, "", torch.float32, False
    if threshold != DEFAULT_THRESHOLD:
        raise ValueError(
            "quantize_base_linears: threshold is the LLM.int8() outlier threshold (bits=8); drop it for bits=4"
        )
    quant_type = "nf4" if quant_type is None else quant_type
    if not isinstance(quant_type, str) or quant_type.lower() not in QUANT_TYPES:
        raise ValueError(
            f"quantize_base_linears: quant_type must be one of {', '.join(QUANT_TYPES)}, got {quant_type!r}"
        )
    if compute_dtype is None:
        dtype = torch.float32
    elif isinstance(compute_dtype, torch.dtype) and compute_dtype in COMPUTE_DTYPES.values():
        dtype = compute_dtype
    elif isinstance(compute_dtype, str) and compute_dtype.removeprefix("torch.") in COMPUTE_DTYPES:
        dtype = COMPUTE_DTYPES[compute_dtype.removeprefix("torch.")]
    else:
        raise ValueError(
            f"quantize_base_linears: compute_dtype must be one of {', '.join(COMPUTE_DTYPES)} (a torch.dtype or its "
            f"name), got {compute_dtype!r}"
        )
    if double_quant is None:
        double_quant = True
    if not isinstance(double_quant, bool):
        raise ValueError(f"quantize_base_linears: double_quant must be True or False, got {double_quant!r}")
    return 4, quant_type.lower(), dtype, double_quant


def quantize_base_linears(
    model: nn.Module,
    skip: Iterable[str] = (),
    threshold: float = DEFAULT_THRESHOLD,
    include_conv1d: bool = True,
    *,
    bits: int = 8,
    quant_type: Optional[str] = None,
    compute_dtype: Optional[torch.dtype | str] = None,
    double_quant: Optional[bool] = None,
) -> nn.Module:
    """Replace the base model's `nn.Linear` (and transformers `Conv1D`, transposed) layers by bitsandbytes
    `Linear8bitLt` with int8 weights (`bits=8`, outlier `threshold`) or `Linear4bit` (`bits=4`: QLoRA), in place;
    returns `model`.

    4-bit options (as transformers' `BitsAndBytesConfig(load_in_4bit=True, ...)`, which gives the same weights):
    `quant_type` "nf4" (default) or "fp4" (`bnb_4bit_quant_type`), `compute_dtype` float32 (default), bfloat16 or
    float16 (`bnb_4bit_compute_dtype`), `double_quant` True (default: the block statistics are quantized too,
    `bnb_4bit_use_double_quant`). They are refused with `bits=8`.

    Never quantized: the output embeddings (`lm_head`), task heads (`classifier`, `score`,
    `qa_outputs`), modules named in `skip` (pass the tuner's `modules_to_save`), anything inside
    them, and the layers of an adapter. Quantize before injecting a tuner: a model that already
    holds adapters is refused.
    """
    bits, quant_type, dtype, double_quant = _check_4bit_options(
        bits, quant_type, compute_dtype, double_quant, threshold
    )
    # a str is iterable too: skip="pooler" would skip modules named "p", "o", ... and quantize the one meant
    names = [] if skip is None else None if isinstance(skip, str) or not isinstance(skip, Iterable) else list(skip)
    if names is None or not all(isinstance(n, str) for n in names):
        raise ValueError(f"quantize_base_linears: skip must be a list of module names, e.g. ['pooler'], got {skip!r}")
    if not isinstance(include_conv1d, bool):
        raise ValueError(f"quantize_base_linears: include_conv1d must be True or False, got {include_conv1d!r}")
    require_bitsandbytes()
    if any(isinstance(m, (BaseTunerLayer, ModulesToSaveWrapper)) for m in model.modules()):
        raise ValueError(
            "quantize_base_linears: this model already holds adapters; quantize the base model first, "
            "then inject the tuner (so the adapter's own layers stay in full precision)"
        )
    already = quantized_layer_names(model)
    if already:  # a second call (or a model loaded in 8-/4-bit by transformers): nothing left to quantize
        more = f" and {len(already) - 3} more" if len(already) > 3 else ""
        raise ValueError(
            f"quantize_base_linears: this model already holds bitsandbytes 8-/4-bit layers ({', '.join(already[:3])}"
            f"{more}); quantize a full-precision model once, or call dequantize_base_linears(model) first"
        )
    skip_names = set(names) | set(TASK_HEAD_NAMES) | {"lm_head"}
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
        if bits == 4:
            layer = _make_linear4bit(weight, bias, quant_type, dtype, double_quant)
        else:
            layer = _make_linear8bit(weight, bias, threshold)
        if type(module) is not nn.Linear:  # as transformers' bitsandbytes layers: the class replaced (Conv1D)
            setattr(layer, "source_cls", type(module))
        setattr(parent, child, layer)
        replaced += 1
    if replaced == 0:
        warnings.warn(
            "quantize_base_linears: the model has no Linear / Conv1D layer to quantize (outside the "
            "output head and skipped modules); it stays in full precision"
        )
    return model


def dequantize_base_linears(model: nn.Module, dtype: torch.dtype = torch.float32) -> nn.Module:
    """Replace every `Linear8bitLt` / `Linear4bit` (adapters' base layers included) by an `nn.Linear` holding the
    dequantized weight in `dtype`, in place; returns `model`. Use it before `merge_and_unload()` to
    export a merged model in the compute dtype (an exact add, no requantization)."""
    for name, module in list(model.named_modules()):
        if not name or not is_quantized_linear(module):
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
        if getattr(module, "source_cls", None) is not None:  # a Conv1D: the merged export writes its (in, out) layout
            setattr(linear, "source_cls", getattr(module, "source_cls"))
        parent, _, child = get_submodule_parent(model, name)
        setattr(parent, child, linear)
    return model


def dequantized_copy(model: nn.Module, dtype: torch.dtype = torch.float32) -> nn.Module:
    """A copy of `model` with every quantized (8-bit / 4-bit) layer dequantized to `dtype` (for saving a merged model
    that loads without bitsandbytes); `model` itself keeps its quantized weights."""
    import copy

    return dequantize_base_linears(copy.deepcopy(model), dtype=dtype)


def int8_layers(model: nn.Module) -> list[str]:
    return [name for name, module in model.named_modules() if is_linear8bit(module)]


def int4_layers(model: nn.Module) -> list[str]:
    return [name for name, module in model.named_modules() if is_linear4bit(module)]


def quantized_layer_names(model: nn.Module) -> list[str]:
    """The names of the bitsandbytes 8-bit and 4-bit layers of `model`."""
    return [name for name, module in model.named_modules() if is_quantized_linear(module)]


# what transformers' BitsAndBytesConfig loading leaves on the model (and `save_pretrained` writes into config.json)
_QUANTIZATION_MODEL_MARKS = {
    "hf_quantizer": None,
    "is_quantized": False,
    "is_loaded_in_4bit": False,
    "is_loaded_in_8bit": False,
    "quantization_method": None,
}
_QUANTIZATION_CONFIG_MARKS = ("quantization_config", "_is_quantized")


@contextlib.contextmanager
def _without_quantization_marks(model: nn.Module) -> Iterator[None]:
    """A model loaded in 8-/4-bit by transformers, its layers now dequantized: without this, `save_pretrained` writes
    the `quantization_config` into config.json and transformers loads the fp32 weights back into uninitialised
    bitsandbytes layers. The marks are put back afterwards (the model may be shared with the one in memory)."""
    config = getattr(model, "config", None)
    saved_model = {k: model.__dict__[k] for k in _QUANTIZATION_MODEL_MARKS if k in model.__dict__}
    saved_config = {k: vars(config)[k] for k in _QUANTIZATION_CONFIG_MARKS if k in getattr(config, "__dict__", {})}
    try:
        for key in saved_model:
            model.__dict__[key] = _QUANTIZATION_MODEL_MARKS[key]
        for key in saved_config:
            delattr(config, key)
        yield
    finally:
        model.__dict__.update(saved_model)
        for key, value in saved_config.items():
            setattr(config, key, value)


@contextlib.contextmanager
def _conv1d_layout(model: nn.Module) -> Iterator[None]:
    """Dequantized layers that were transformers `Conv1D`s (GPT-2; bitsandbytes stores them (out, in) and marks them
    with `source_cls`) written back as `Conv1D`s, weight (in, out), so that the model class loads them; the
    `nn.Linear`s are put back afterwards."""
    swapped = []
    for name, module in list(model.named_modules()):
        source = getattr(module, "source_cls", None)
        if type(module) is not nn.Linear or not isinstance(source, type) or source.__name__ != "Conv1D":
            continue
        conv = source(module.out_features, module.in_features)
        with torch.no_grad():
            conv.weight = nn.Parameter(module.weight.detach().T.contiguous(), requires_grad=False)
            conv.bias = module.bias if module.bias is not None else conv.bias
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, conv)
        swapped.append((parent, child, module))
    try:
        yield
    finally:
        for parent, child, module in swapped:
            setattr(parent, child, module)


@contextlib.contextmanager
def plain_for_export(model: nn.Module) -> Iterator[nn.Module]:
    """`model` as a plain full-precision model for `save_pretrained` (a merged export that loads without
    bitsandbytes): a dequantized copy if it holds 8-/4-bit layers, with transformers' quantization marks hidden and
    the dequantized `Conv1D`s in their own layout while the block runs."""
    if quantized_layer_names(model):
        model = dequantized_copy(model)
    with _without_quantization_marks(model), _conv1d_layout(model):
        yield model


_KIND_WORDS = {"int8": "8-bit", "int4": "4-bit"}


def check_quantized_compatible(config: Any, merge: bool = False, kind: str = "int8") -> None:
    """Refuse, before training, a tuner that cannot run (or, with `merge`, be merged) over a quantized base of
    `kind` ("int8" or "int4")."""
    if kind not in _KIND_WORDS:
        raise ValueError(f"check_quantized_compatible: kind must be one of {', '.join(_KIND_WORDS)}, got {kind!r}")
    words = _KIND_WORDS[kind]
    peft_type = getattr(config, "peft_type", None)
    spec = find_tuner(peft_type)
    if spec is None or not spec.runs_over(kind):
        supported = ", ".join(sorted(t for t, s in registered_tuners().items() if s.runs_over(kind)))
        raise ValueError(
            f"the {peft_type} tuner cannot run over {words} (bitsandbytes) base layers; with "
            f"quantize={kind} use one of: {supported}, or drop quantize={kind}"
        )
    # a tuner that wraps no quantizable base layer (its adapters live beside them) merges where it runs
    if merge and spec.can_merge and spec.wraps_base_layers and not spec.merges_into_quantized:
        raise ValueError(
            f"{peft_type} adapters cannot be merged into {words} base layers (their quantized weights "
            f"cannot hold the scaled values); with quantize={kind} set merge=false (merge_on_train_end=False) "
            "and export the adapter only, or use LoRA, or train on a full-precision base"
        )


def check_int8_compatible(config: Any, merge: bool = False) -> None:
    """Refuse, before training, a tuner that cannot run (or, with `merge`, be merged) over an 8-bit base."""
    check_quantized_compatible(config, merge=merge, kind="int8")


__all__ = [
    "quantize_base_linears",
    "dequantize_base_linears",
    "dequantize_weight",
    "quantize_weight",
    "check_int8_compatible",
    "check_quantized_compatible",
    "quantize_weight_4bit",
    "is_linear4bit",
    "keep_plain_layout",
    "keep_plain_layouts",
    "is_quantized_linear",
    "int4_layers",
    "quantized_layer_names",
    "require_bitsandbytes",
    "dequantized_copy",
    "plain_for_export",
    "is_linear8bit",
    "int8_layers",
    "INSTALL_HINT",
]
