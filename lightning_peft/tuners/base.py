"""What the tuners share. LoRA and IA3: target matching, injection, freezing, named adapters, merge / unload
(`BaseTuner`, `BaseTunerLayer`). Every tuner, prompt learning included: `TunerAttributes`, `ModulesToSaveWrapper`,
`check_tensors_fit`.

A tuner is a `BaseTuner` subclass (the model-level object) plus `BaseTunerLayer` subclasses
(the wrappers that replace targeted modules). The tuner says how to build a layer for a target;
everything else here is generic.
"""

from __future__ import annotations

import copy
import itertools
import re
import warnings
import weakref
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import TYPE_CHECKING, Any, Iterable, Iterator, Optional, cast

import torch
from torch import nn

from ..config import SAVED_PREFIX, listed
from ..utils.constants import EMBEDDING_LAYER_NAMES, SEQ_CLS_HEAD_NAMES
from ..utils.constants import INCLUDE_LINEAR_LAYERS_SHORTHAND as ALL_LINEAR  # matched in any case
from ..utils.error import NoMatchingPeftModuleError
from ..utils.warning import PeftWarning
from .mixed_batch import MixedBatch, check_batch_size
from .registry import get_tuner

DEFAULT_LAYERS_PATTERNS = ("layers", "h", "block", "blocks", "layer")
TASK_HEAD_NAMES = frozenset({"classifier", "score", "qa_outputs"})


# ---------------------------------------------------------------------------------------------
# target matching
# ---------------------------------------------------------------------------------------------
def _layer_index(key: str, layers_pattern: Any) -> Optional[int]:
    patterns = [layers_pattern] if isinstance(layers_pattern, str) else list(layers_pattern or DEFAULT_LAYERS_PATTERNS)
    for pattern in patterns:
        match = re.match(rf"(?:.*\.)?{re.escape(pattern)}\.(\d+)\.", key)
        if match is not None:
            return int(match.group(1))
    return None


def name_matches(key: str, names: Any) -> bool:
    """A list of names matches a module whose full dotted name equals one or ends with "." + one;
    a string is a regex that must match the whole name."""
    if isinstance(names, str):
        return re.fullmatch(names, key) is not None
    return any(key == n or key.endswith("." + n) for n in names)


def target_matches(config: Any, key: str) -> bool:
    """Does the module named `key` (full dotted name) belong to the config's targets?"""
    targets = config.target_modules
    if not name_matches(key, targets):
        return False
    if isinstance(targets, str):
        return True  # layer filters apply to name lists only, as in HF PEFT
    layers = getattr(config, "layers_to_transform", None)
    if layers is None or (isinstance(layers, list) and len(layers) == 0):
        return True
    index = _layer_index(key, getattr(config, "layers_pattern", None))
    if index is None:
        return False
    return index == layers if isinstance(layers, int) else index in layers


def is_excluded(config: Any, key: str) -> bool:
    """HF PEFT's `exclude_modules`: a list entry excludes a module whose full name equals it or ends with "." + it,
    a string is a regex that must match the whole name; None / empty excludes nothing."""
    names = getattr(config, "exclude_modules", None)
    return bool(names) and name_matches(key, names)


MIN_TARGET_MODULES_FOR_OPTIMIZATION = 20  # HF PEFT's: a target list this long is condensed to the suffixes needed


def _is_linear(module: nn.Module) -> bool:
    """A layer that "all-linear" adapts, as HF PEFT counts them: nn.Linear (bitsandbytes' 8-bit / 4-bit linears
    subclass it), transformers' Conv1D, and a tuner layer already wrapping one (HF PEFT goes by its class name)."""
    if isinstance(module, nn.Linear) or is_conv1d(module) or is_linear8bit(module):
        return True
    return isinstance(module, BaseTunerLayer) and "Linear" in type(module).__name__


def expand_all_linear(config: Any, model: nn.Module) -> None:
    """`target_modules="all-linear"` (any case) becomes, in place, the set of the full names of `model`'s linear
    layers (`_is_linear`), as HF PEFT's `_maybe_include_all_linear_layers` does (LoRA and IA3 alike): a
    transformers model's output layer (`get_output_embeddings()`) is left out, and, when it has none and the task is
    SEQ_CLS, its `score` / `classifier` head; so is everything inside a tuner layer or a saved module's wrapper."""
    targets = config.target_modules
    if not (isinstance(targets, str) and targets.lower() == ALL_LINEAR):
        return
    from transformers import PreTrainedModel

    excluded: set[int] = set()
    if isinstance(model, PreTrainedModel):
        head = model.get_output_embeddings()
        if head is None and getattr(config, "task_type", None) == "SEQ_CLS":
            head = next((getattr(model, n) for n in SEQ_CLS_HEAD_NAMES if getattr(model, n, None) is not None), None)
        if isinstance(head, nn.Module):
            excluded.add(id(head))
    for module in model.modules():
        if isinstance(module, (BaseTunerLayer, ModulesToSaveWrapper)):
            excluded.update(id(m) for m in module.modules() if m is not module)
    names = {n for n, module in model.named_modules() if n and id(module) not in excluded and _is_linear(module)}
    if not names:  # HF PEFT's error type, before anything changes
        raise NoMatchingPeftModuleError(
            f"target_modules={targets!r} found no linear layer (nn.Linear, transformers Conv1D, 8-bit Linear) to adapt "
            f"outside the output layer; name the modules to adapt instead. {describe_module_names(model)}"
        )
    config.target_modules = names


def _suffixes(name: str) -> list[str]:
    """The names a list entry may give for module `name`, shortest first: "a.b.c" -> ["c", "b.c", "a.b.c"]."""
    parts = name.split(".")
    return [".".join(parts[i:]) for i in range(len(parts) - 1, -1, -1)]


def condense_target_modules(config: Any, model: nn.Module) -> None:
    """HF PEFT's optimisation of a long target list (>= 20 names; not for IA3): in place, the fewest module-name
    suffixes that match exactly the modules the list matched (e.g. T5's 32 "all-linear" paths become
    {"q", "k", "v", "o", "wi", "wo"}), so the saved config is HF PEFT's."""
    targets = config.target_modules
    if isinstance(targets, str) or targets is None or len(targets) < MIN_TARGET_MODULES_FOR_OPTIMIZATION:
        return
    targets = set(targets)
    if "" in targets:
        return
    others = [n for n, _ in model.named_modules() if n not in targets and not name_matches(n, targets)]
    blocked = {suffix for name in others for suffix in _suffixes(name)}
    chosen: set[str] = set()
    for name in sorted(targets, key=_suffixes):
        if name_matches(name, chosen):
            continue
        free = next((s for s in _suffixes(name) if s not in blocked), None)
        if free is None:
            return  # cannot happen (the full name is never another module's suffix); keep the list as it is
        chosen.add(free)
    if len(chosen) < len(targets):
        config.target_modules = chosen


def pattern_value(patterns: dict, key: str, default: Any) -> Any:
    """`rank_pattern` / `alpha_pattern` lookup: a pattern applies to names matching `(.*\\.)?pattern$`."""
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", key):
            return value
    return default


def is_conv1d(module: nn.Module) -> bool:
    """transformers' `Conv1D` (GPT-2's linear layer, weight stored (in, out))."""
    from transformers.pytorch_utils import Conv1D

    return isinstance(module, Conv1D)


def is_linear8bit(module: nn.Module) -> bool:
    """A bitsandbytes `Linear8bitLt`, checked by name so that bitsandbytes is not imported for it."""
    return any(c.__name__ == "Linear8bitLt" and c.__module__.startswith("bitsandbytes") for c in type(module).__mro__)


def resolve_fan_in_fan_out(config: Any, expected: bool, layer_kind: str) -> bool:
    """The layer type decides how its weight is stored; a config that says otherwise is corrected
    (in place, so the warning comes once per adapter) with a warning."""
    if config.fan_in_fan_out != expected:
        warnings.warn(
            f"fan_in_fan_out is set to {not expected} but the target is {layer_kind}; using fan_in_fan_out={expected}"
        )
        config.fan_in_fan_out = expected
    return expected


def adapter_dtype(base_weight: torch.Tensor) -> torch.dtype:
    """Adapters train in fp32 over half-precision or quantized bases (fp64 stays fp64)."""
    return base_weight.dtype if base_weight.dtype in (torch.float32, torch.float64) else torch.float32


def freeze_adapter(model: nn.Module, adapter_name: str) -> None:
    """requires_grad=False for every parameter of `adapter_name` (its name is a part of their names)."""
    for n, p in model.named_parameters():
        if f".{adapter_name}." in n or n.endswith(f".{adapter_name}"):
            p.requires_grad_(False)


def active_after_delete(
    deleted: str, active: list[str], remaining: Iterable[str], *, warn: bool, by_name: bool = True, stacklevel: int = 2
) -> list[str]:
    """The adapters active once `deleted` is deleted (HF PEFT's rule): the other active ones; when none is left, the
    first remaining adapter (`by_name`: sorted by name, as HF PEFT's layers and tuners; else the first added, as its
    prompt learning), with HF PEFT's warning unless `warn` is False; none once the last one is gone.
    `remaining` may still hold `deleted`; `stacklevel` is the warning's, counted from the caller."""
    others = [a for a in active if a != deleted]
    if deleted not in active or others:
        return others
    candidates = [n for n in remaining if n != deleted]
    if by_name:
        candidates.sort()
    if candidates and warn:
        warnings.warn(
            f"Adapter {deleted} was active which is now deleted. Setting active adapter to {candidates[0]}.",
            stacklevel=stacklevel + 1,
        )
    return candidates[:1]


class RequiresGradSnapshot:
    """The requires_grad flag of every parameter of `modules` when made; `restore()` gives each back. `by_name`: the
    flags are kept by parameter name and given to the parameters holding those names at `restore()` (for code that
    rebuilds parameters under the same names); a name not there on entry is left as it is."""

    def __init__(self, *modules: nn.Module, by_name: bool = False) -> None:
        self._modules = modules
        self._by_name = by_name
        self._flags = [(p, p.requires_grad) for m in modules for p in m.parameters()] if not by_name else []
        self._named = (
            {(i, n): p.requires_grad for i, m in enumerate(modules) for n, p in m.named_parameters()} if by_name else {}
        )

    def restore(self) -> None:
        for p, flag in self._flags:
            p.requires_grad_(flag)
        if self._by_name:
            for i, module in enumerate(self._modules):
                for n, p in module.named_parameters():
                    if (i, n) in self._named:
                        p.requires_grad_(self._named[(i, n)])


@contextmanager
def requires_grad_kept_on_failure(*modules: nn.Module) -> Iterator[None]:
    """Whatever escapes the block (an error, a KeyboardInterrupt), every parameter of `modules` (as they are on entry)
    gets back the requires_grad it had on entry. Used by every path that adds an adapter (get_peft_model,
    from_pretrained, add_adapter, load_adapter, add_weighted_adapter): a refused call changes no flag."""
    flags = RequiresGradSnapshot(*modules)
    try:
        yield
    except BaseException:
        flags.restore()
        raise


def parameter_counts(module: nn.Module) -> tuple[int, int]:
    """(trainable, total); DTensor parameters count at their global size, so every rank agrees."""
    trainable = total = 0
    for p in module.parameters():
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    return trainable, total


def get_submodule_parent(model: nn.Module, key: str) -> tuple[nn.Module, nn.Module, str]:
    parent_name, _, child_name = key.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    return parent, getattr(parent, child_name), child_name


# modules that cannot be saved whole: containers without a forward of their own (HF PEFT refuses the same)
UNSAVEABLE_CONTAINERS = (nn.ModuleDict, nn.ModuleList, nn.ParameterDict, nn.ParameterList)


def check_modules_to_save(model: nn.Module, names: Optional[list[str]]) -> None:
    """Every `modules_to_save` entry must name a module of `model` (exact dotted name or its last part(s));
    the usual task-head names are exempt (task wrappers add them all, as HF PEFT does; a model has one). A container
    (ModuleDict, ModuleList, ...) or an adapted layer is refused with a TypeError, as in HF PEFT."""
    for name in names or []:
        matched = [(k, m) for k, m in model.named_modules() if name_matches(k, [name])]
        if not matched and name not in TASK_HEAD_NAMES:
            raise ValueError(f"modules_to_save entry {name!r} matches no module; {describe_module_names(model)}")
        for key, module in matched:
            if ".modules_to_save." in f".{key}." or ".original_module" in f".{key}":
                continue
            if isinstance(module, UNSAVEABLE_CONTAINERS) or isinstance(module, BaseTunerLayer):
                what = "a container without a forward" if not isinstance(module, BaseTunerLayer) else "an adapted layer"
                raise TypeError(
                    f"modules_to_save entry {name!r} names {key!r}, a {type(module).__name__} ({what}), which cannot "
                    "be saved as a whole module; name the modules inside it (e.g. "
                    f"{key}.<child>) or leave it out"
                )


def inside_saved_module(key: str, names: Any) -> bool:
    """Whether a module above `key` is named in `modules_to_save`: it is saved whole, so nothing in it is adapted
    (as in HF PEFT, where such targets are excluded)."""
    parts = key.split(".")
    return bool(names) and any(name_matches(".".join(parts[:i]), names) for i in range(1, len(parts)))


def wrap_modules_to_save(model: nn.Module, names: Optional[list[str]], adapter_name: str) -> list[ModulesToSaveWrapper]:
    """Give `adapter_name` a trainable copy of every module of `model` matching `names`: a module already wrapped
    gets the adapter added, any other is replaced by a `ModulesToSaveWrapper`. Modules inside a wrapper (its
    `original_module` / `modules_to_save` copies) are skipped. Returns the wrappers now holding `adapter_name`."""
    touched = []
    for key, module in list(model.named_modules()):
        if ".modules_to_save." in f".{key}." or ".original_module" in f".{key}":
            continue
        if not name_matches(key, names or []):
            continue
        if isinstance(module, ModulesToSaveWrapper):
            module.add(adapter_name)
        else:
            parent, _, child = get_submodule_parent(model, key)
            module = ModulesToSaveWrapper(module, adapter_name)
            setattr(parent, child, module)
        touched.append(module)
    return touched


def model_embedding(model: nn.Module, getter: str) -> tuple[Optional[str], Optional[nn.Module]]:
    """(name in `model`, module) of what `model.<getter>()` gives (`get_input_embeddings` / `get_output_embeddings`,
    a tuner layer where one wraps it); (None, None) for a model without the method, one whose method raises
    NotImplementedError / AttributeError (transformers' base class without embeddings) or gives no module."""
    method = getattr(model, getter, None)
    try:
        layer = method() if callable(method) else None
    except (NotImplementedError, AttributeError):
        layer = None
    if not isinstance(layer, nn.Module):
        return None, None
    return next((n for n, m in model.named_modules() if m is layer), None), layer


def describe_module_names(model: nn.Module, limit: int = 8) -> str:
    """A short list of leaf module names, to show the user what targets exist."""
    names = [n for n, m in model.named_modules() if n and len(list(m.children())) == 0]
    suffixes = list(dict.fromkeys(n.rsplit(".", 1)[-1] for n in names))
    sample = ", ".join(names[:limit])
    return f"leaf module names end in: {', '.join(suffixes[:12])} (e.g. {sample})"


ADAPTER_NAME_RULE = "letters, digits, '_', '-' and inner spaces, 1 to 64 characters (e.g. 'default', 'task-2')"
# parts of the parameter paths of every tuner (besides its prefix): an adapter named so would be confused with them
RESERVED_NAME_PARTS = frozenset(
    {"model", "base_model", "base_layer", "original_module", "modules_to_save", "prompt_encoder", "weight", "bias"}
)
# attributes of the dicts that hold per-adapter modules and parameters: torch refuses them as keys
_DICT_ATTRIBUTES = frozenset(dir(nn.ModuleDict()) + dir(nn.ParameterDict()))


def check_adapter_name(name: Any, model: Optional[nn.Module] = None, prefix: str = "", taken: Any = ()) -> None:
    """An adapter name becomes a folder name (`save_pretrained` writes non-default adapters to `<dir>/<name>`) and a
    part of parameter paths (`...lora_A.<name>.weight`), so it must be a plain word that is neither a path nor a part
    of the paths around it. With `model`, names that are a part of its module / parameter paths (`h`, `0`,
    `weight`, ...) are refused too (existing adapter names, `taken`, excepted), and names starting with `prefix`."""
    if not isinstance(name, str) or re.fullmatch(r"[\w\-]([\w\- ]{0,62}[\w\-])?", name) is None:
        raise ValueError(
            f"adapter name {name!r} is not valid: it names a folder in save_pretrained and a part of parameter "
            f"names, so no paths, '.', '/', '\\' or control characters; use {ADAPTER_NAME_RULE}"
        )
    if name in _DICT_ATTRIBUTES:
        raise ValueError(f"adapter name {name!r} is not valid: it is an attribute of torch's ModuleDict; pick another")
    twin = next((t for t in taken if t != name and t.casefold() == name.casefold()), None)
    if twin is not None:
        raise ValueError(
            f"adapter name {name!r} differs from the existing adapter {twin!r} only by case: save_pretrained writes "
            "each adapter to a sub-folder named after it, and the two would be one folder on a case-insensitive "
            "file system (macOS, Windows); pick another name"
        )
    if model is None:
        return
    parts = set(RESERVED_NAME_PARTS)
    for path, _ in itertools.chain(model.named_modules(), model.named_parameters(), model.named_buffers()):
        parts.update(path.split("."))
    parts.difference_update(taken)
    if name in parts or (prefix and name.startswith(prefix)):
        what = f"starts with the tuner's prefix {prefix!r}" if name not in parts else "is a part of the model's paths"
        raise ValueError(
            f"adapter name {name!r} {what} (module and parameter names such as "
            f"'transformer.h.0.attn.lora_A.<adapter>.weight'), so its tensors could not be told apart on save and "
            f"load; pick another name ({ADAPTER_NAME_RULE})"
        )


# ---------------------------------------------------------------------------------------------
# layers
# ---------------------------------------------------------------------------------------------
class BaseTunerLayer:
    """Mixin for a module that wraps `base_layer` and holds per-adapter parameters.

    `adapter_layer_names` name the ModuleDict / ParameterDict attributes holding trainable
    per-adapter parameters; `other_param_names` the plain dicts of per-adapter settings.
    """

    adapter_layer_names: tuple[str, ...] = ()
    other_param_names: tuple[str, ...] = ()
    merge_refusal: Optional[str] = None  # why this layer can never take a merge (checked before any layer merges)
    repr_prefix = ""  # put before the class name in repr() and in get_layer_status's module_type (LoRA: "lora.")

    base_layer: nn.Module
    _active_adapters: list[str]
    merged_adapters: list[str]
    _disable_adapters: bool

    if TYPE_CHECKING:
        # every concrete layer is also an nn.Module (`class Linear(nn.Module, LoraLayer)`) and implements these
        def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None: ...

        def unmerge(self) -> None: ...

    def _init_tuner_layer(self, base_layer: nn.Module) -> None:
        self.base_layer = base_layer
        self._active_adapters = []
        self.merged_adapters = []
        self._disable_adapters = False

    def get_base_layer(self) -> nn.Module:
        return self.base_layer

    @property
    def weight(self) -> torch.Tensor:
        return cast(torch.Tensor, self.base_layer.weight)

    @property
    def bias(self) -> Optional[torch.Tensor]:
        return getattr(self.base_layer, "bias", None)

    @property
    def active_adapters(self) -> list[str]:
        return self._active_adapters

    @property
    def active_adapter(self) -> list[str]:
        """A list, as HF PEFT's layers answer (its `set_adapter` keeps even a single name as a list)."""
        return self._active_adapters

    def active_adapters_in(self, holder: Any) -> list[str]:
        """The active adapters that have an entry in `holder` (e.g. `lora_A`), in order."""
        return [name for name in self.active_adapters if name in holder]

    @property
    def disable_adapters(self) -> bool:
        return self._disable_adapters

    @property
    def merged(self) -> bool:
        return bool(self.merged_adapters)

    def adapter_names(self) -> list[str]:
        names: list[str] = []
        for attr in self.adapter_layer_names:
            names.extend(k for k in getattr(self, attr).keys() if k not in names)
        return names

    def _adapter_parameters(self, names: Optional[Any] = None) -> Iterator[tuple[str, nn.Parameter]]:
        """(adapter name, parameter) for every adapter parameter of this layer (of `names` only, when given)."""
        for attr in self.adapter_layer_names:
            for key, holder in getattr(self, attr).items():
                if names is None or key in names:
                    for p in holder.parameters() if isinstance(holder, nn.Module) else [holder]:
                        yield key, p

    def set_adapter(self, adapter_names: str | list[str], inference_mode: bool = False) -> None:
        """Make `adapter_names` the active adapters here (their outputs add up; names this layer does not hold are
        kept and skipped in forward, as in HF PEFT). Their parameters train unless `inference_mode`; every other
        adapter's are frozen."""
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        for key, p in self._adapter_parameters():
            p.requires_grad_(key in names and not inference_mode)
        self._active_adapters = names

    def set_requires_grad(self, adapter_names: str | list[str], requires_grad: bool = True) -> None:
        """requires_grad of the named adapters' parameters here (active or not), as HF PEFT's."""
        names = {adapter_names} if isinstance(adapter_names, str) else set(adapter_names)
        for _, p in self._adapter_parameters(names):
            p.requires_grad_(requires_grad)

    def enable_adapters(self, enabled: bool) -> None:
        """As HF PEFT: disabling freezes every adapter parameter here, enabling makes the active ones train again."""
        if enabled:
            self.set_adapter(self.active_adapters)
        else:
            for _, p in self._adapter_parameters():
                p.requires_grad_(False)
        self._disable_adapters = not enabled

    def _remove_adapter(self, adapter_name: str) -> None:
        """Drop the adapter's entries (the active list as it is: the caller says what is active next)."""
        for attr in self.adapter_layer_names + self.other_param_names:
            holder = getattr(self, attr)
            if adapter_name in holder:
                del holder[adapter_name]

    def delete_adapter(self, adapter_name: str) -> None:
        """Delete the adapter here. When it was active, the other active ones stay; when none is left, the first
        remaining adapter (by name) becomes active, with a warning, as HF PEFT's layers do. (A tuner's
        delete_adapter picks one adapter for the whole model.)"""
        self._remove_adapter(adapter_name)
        if adapter_name not in self._active_adapters:
            return
        self.set_adapter(active_after_delete(adapter_name, self._active_adapters, self.adapter_names(), warn=True))

    def _check_forward(self) -> bool:
        """True when the adapters take part in this forward (not disabled, not merged)."""
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return False
        return not self.merged

    def merged_tensors(self, adapter_name: str) -> dict[str, torch.Tensor]:
        """The base layer's tensors ("weight", maybe "bias") as merging `adapter_name` would leave them."""
        raise NotImplementedError

    def check_finite_delta(self, adapter_name: str) -> None:
        """`safe_merge`: refuse, before any change, a merge that would put NaN/inf into the base layer."""
        if not all(torch.isfinite(t).all() for t in self.merged_tensors(adapter_name).values()):
            raise ValueError(
                f"merging adapter {adapter_name!r} would put NaN/inf into {type(self.get_base_layer()).__name__} "
                "weights; the merge was aborted and the base weights are unchanged (the adapter is broken: retrain "
                "or reload it)"
            )

    # ---- merging into a weight another module shares (tied input / output embeddings) ----------------------------
    # (the shared Parameter,) while this layer's base layer holds its own merged copy of it; () otherwise. A tuple:
    # nn.Module does not register it as a parameter of this layer.
    _shared_weight: tuple[nn.Parameter, ...] = ()

    def pending_merges(self, adapter_names: Optional[list[str]]) -> list[str]:
        """The adapters a `merge(adapter_names=...)` would merge here (no warning: `_adapters_to_merge` warns)."""
        names = self.active_adapters if adapter_names is None else adapter_names
        held = self.adapter_names()
        return [n for n in names if n not in self.merged_adapters and n in held]

    def untie_base_weight(self) -> None:
        """Before merging into a weight that another module shares (GPT-2's `lm_head.weight` is `wte.weight`): give
        the base layer its own copy to merge into, so the other module keeps the weight it was trained with; `unmerge`
        puts the shared Parameter itself back (`retie_base_weight`)."""
        base = self.get_base_layer()
        shared = cast(nn.Parameter, base.weight)
        base.weight = nn.Parameter(shared.detach().clone(), requires_grad=shared.requires_grad)
        self._shared_weight = (shared,)

    def retie_base_weight(self) -> bool:
        """Undo `untie_base_weight` exactly (the shared Parameter itself, unmerged, back in the base layer) and forget
        the merged adapters; False when the layer was not untied (unmerge by arithmetic then)."""
        if not self._shared_weight:
            return False
        self.get_base_layer().weight = self._shared_weight[0]
        self._shared_weight = ()
        self.merged_adapters.clear()
        return True

    def _adapters_to_merge(self, adapter_names: Optional[list[str]]) -> list[str]:
        names = self.active_adapters if adapter_names is None else adapter_names
        already = [n for n in names if n in self.merged_adapters]
        if already:
            warnings.warn(f"adapter(s) {already} already merged into {type(self).__name__}; not merging them twice")
        return [n for n in names if n not in self.merged_adapters and n in self.adapter_names()]

    # subclasses implement merge / unmerge / get_delta_weight / forward


class ModulesToSaveWrapper(nn.Module):
    """A trainable copy per adapter of a whole module (e.g. a classifier head); the original stays
    frozen for `unload()` and disabled adapters. At most one adapter is active here (two active adapters cannot
    both replace the module: `check_set_adapter`), as in HF PEFT; with none, the original runs."""

    def __init__(self, module: nn.Module, adapter_name: str) -> None:
        super().__init__()
        self.original_module = module
        self.modules_to_save = nn.ModuleDict()
        self._active_adapter: str | list[str] = [adapter_name]
        self._disabled = False
        self.add(adapter_name)

    def add(self, adapter_name: str) -> None:
        """A copy of the original for `adapter_name`, frozen until the adapter is set active (`set_adapter`)."""
        self.original_module.requires_grad_(False)
        if adapter_name not in self.modules_to_save:
            copy_ = copy.deepcopy(self.original_module)
            copy_.requires_grad_(False)
            self.modules_to_save[adapter_name] = copy_

    @property
    def active_adapter(self) -> str | list[str]:
        """As HF PEFT's: the name after set_adapter(name), a list when set with one (empty: none active)."""
        return self._active_adapter

    @property
    def active_adapters(self) -> list[str]:
        return [self._active_adapter] if isinstance(self._active_adapter, str) else list(self._active_adapter)

    def check_set_adapter(self, adapter_names: str | list[str]) -> Optional[str]:
        """The adapter of `adapter_names` to activate here (None: none of them has a copy here). Two of them
        holding a copy of this module cannot be active together: ValueError, as HF PEFT."""
        if isinstance(adapter_names, str):
            return adapter_names
        if not adapter_names:
            raise ValueError(
                "set_adapter([]) on a model with modules_to_save: name at least one adapter (HF PEFT refuses it too)"
            )
        here = [n for n in adapter_names if n in self.modules_to_save]
        if len(here) > 1:
            raise ValueError(
                f"adapters {here} each have their own copy of this module ({type(self.original_module).__name__}, "
                "modules_to_save) and only one copy can run: only one adapter can be set at a time for it; activate "
                "adapters whose modules_to_save differ"
            )
        return here[0] if here else None

    def set_adapter(self, adapter_names: str | list[str], inference_mode: bool = False) -> None:
        """Activate one adapter's copy (it trains unless `inference_mode`) or none (`[]`: the original runs)."""
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        if len(names) > 1:
            raise ValueError(f"Attempted to set multiple ({names}) adapters at once for modules_to_save.")
        if names and names[0] not in self.modules_to_save:
            raise ValueError(f"adapter {names[0]!r} has no copy of this module; it holds: {list(self.modules_to_save)}")
        for module in self.modules_to_save.values():
            module.requires_grad_(False)
        self.original_module.requires_grad_(False)
        if not names:
            self._active_adapter = []
            return
        self.modules_to_save[names[0]].requires_grad_(not inference_mode)
        self._active_adapter = names[0]

    def set_requires_grad(self, adapter_names: str | list[str], requires_grad: bool = True) -> None:
        names = {adapter_names} if isinstance(adapter_names, str) else set(adapter_names)
        for key, module in self.modules_to_save.items():
            if key in names:
                module.requires_grad_(requires_grad)

    def enable_adapters(self, enabled: bool) -> None:
        """As HF PEFT: disabling freezes every copy, enabling makes the active one train again."""
        self._disabled = not enabled
        for key, module in self.modules_to_save.items():
            module.requires_grad_(enabled and key in self.active_adapters)

    def delete_adapter(self, adapter_name: str, new_active_adapters: Optional[list[str]] = None) -> None:
        """Drop the adapter's copy; when it was the active one, the copy of `new_active_adapters` held here (if any)
        becomes active."""
        if adapter_name not in self.modules_to_save:
            return
        was_active = adapter_name in self.active_adapters
        del self.modules_to_save[adapter_name]
        if was_active:
            here = [n for n in new_active_adapters or [] if n in self.modules_to_save]
            self.set_adapter(here[:1])

    @property
    def adapters_enabled(self) -> bool:
        return not self._disabled

    def _running(self) -> Optional[nn.Module]:
        """The copy the forward runs, or None for the original."""
        active = self.active_adapters
        if self._disabled or not active or active[0] not in self.modules_to_save:
            return None
        return self.modules_to_save[active[0]]

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self._mixed_batch is not None and args:
            return self._mixed_batch_forward(*args, **kwargs)
        running = self._running()
        return (self.original_module if running is None else running)(*args, **kwargs)

    _mixed_batch: Optional[MixedBatch] = None  # set by the tuner for one call with `adapter_names=`

    def _mixed_batch_forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """Each sample through its adapter's copy (`__base__`, an adapter without a copy here, or disabled
        adapters: the original module), the outputs put back in the batch's order."""
        batch = cast(MixedBatch, self._mixed_batch)
        check_batch_size(len(x), batch)
        if self._disabled:
            return self.original_module(x, *args, **kwargs)
        result: Optional[torch.Tensor] = None
        for name in batch.groups:
            rows = batch.rows(name, x.device)
            module = self.modules_to_save[name] if name in self.modules_to_save else self.original_module
            out = module(x[rows], *args, **kwargs)
            if result is None:
                result = out.new_empty((len(batch), *out.shape[1:]))
            result[rows] = out
        return cast(torch.Tensor, result)


# ---------------------------------------------------------------------------------------------
# model-level tuners
# ---------------------------------------------------------------------------------------------
# the models a live prompt-learning tuner feeds (it leaves no trace in the model's modules), and every module of
# them: module -> (tuner, whether the module is the fed model itself)
_PROMPT_WRAPPED: weakref.WeakKeyDictionary[nn.Module, tuple[weakref.ref, bool]] = weakref.WeakKeyDictionary()


def mark_wrapped(model: nn.Module, tuner: nn.Module) -> None:
    """Record that `tuner` feeds `model` without putting layers into it. Every module of `model` is marked, so a
    container of `model` and a part of it are refused for wrapping as `model` is."""
    ref = weakref.ref(tuner)
    for module in model.modules():
        _PROMPT_WRAPPED[module] = (ref, module is model)


def unmark_wrapped(tuner: nn.Module) -> None:
    """Forget every mark of `tuner` (its unload())."""
    for module, (ref, _) in list(_PROMPT_WRAPPED.items()):
        if ref() is tuner:
            _PROMPT_WRAPPED.pop(module, None)


def describe_wrapping(model: nn.Module) -> Optional[str]:
    """What of a live adapter `model` holds (tuner layers, saved-module wrappers) or is fed by (itself, a module of
    it, or a model it is a part of), or None."""
    for name, module in model.named_modules():
        if isinstance(module, (BaseTunerLayer, ModulesToSaveWrapper)):
            return f"its module {name or '(the model itself)'} is a {type(module).__name__} of an adapter"
    for name, module in model.named_modules():
        ref, whole = _PROMPT_WRAPPED.get(module, (None, False))
        tuner = ref() if ref is not None else None
        if tuner is None or not getattr(tuner, "peft_config", None) or getattr(tuner, "is_unloaded", False):
            continue
        what = f"a {tuner.peft_type} adapter ({', '.join(tuner.peft_config)})"
        if not whole:
            where = "it is" if not name else f"its module {name} is"
            return f"{where} a part of a model that {what} feeds its prompt"
        return f"{what} feeds {'it' if not name else f'its module {name}'} its prompt"
    return None


# adapter methods only some tuners have, and why the others do not
TUNER_ONLY_METHODS = {
    "add_weighted_adapter": "only LoRA adapters can be combined into a new adapter in lightning_peft",
    "merge_adapter": "prompt learning has no weights to merge into the model (the prompt is fed through forward())",
    "unmerge_adapter": "prompt learning has no weights to merge into the model (the prompt is fed through forward())",
}


class TunerAttributes:
    """What every tuner model class (`BaseTuner`, `PromptLearningModel`) shares: it holds the user's model as
    `model`, its configs by adapter name as `peft_config`, and answers for the model's own attributes."""

    model: nn.Module
    peft_config: dict[str, Any]
    is_unloaded = False  # set by unload() / merge_and_unload(): the model was given back

    def check_attached(self) -> None:
        """After unload() / merge_and_unload() the model belongs to the caller (and maybe to a new PeftModel):
        every adapter operation of this one is refused rather than acting on it."""
        if self.is_unloaded:
            raise ValueError(
                "this PeftModel was unloaded (unload() / merge_and_unload() gave its base model back), so it holds "
                "no adapter any more; wrap the base again with get_peft_model(...) / PeftModel.from_pretrained(...) "
                "and use that one"
            )

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)  # type: ignore[misc]  # nn.Module's, for parameters and children
        except AttributeError:
            if name == "model":
                raise
            if name in TUNER_ONLY_METHODS:  # not the base model's AttributeError: say which tuner lacks what
                raise AttributeError(
                    f"{self.peft_type} adapters have no {name}(): {TUNER_ONLY_METHODS[name]}"
                ) from None
            return getattr(self.model, name)

    def check_adapter_exists(self, adapter_name: str) -> None:
        """Refuse (ValueError) an adapter name this tuner does not hold, or any name once it is unloaded."""
        self.check_attached()
        if adapter_name not in self.peft_config:
            raise ValueError(
                f"no adapter named {adapter_name!r}; this model has: {', '.join(self.peft_config) or 'none'}"
            )

    # ---- for a tuner whose adapters change the base model's own weights (LoRA's PiSSA / OLoRA / LoftQ): PeftModel
    # calls these hooks; the neutral defaults fit every tuner that leaves the base weights alone
    @classmethod
    def guard_base_weights(cls) -> AbstractContextManager[None]:
        """Around a call that may create adapters (wrapping, add_adapter, load_adapter, from_pretrained): if it fails,
        every base weight an adapter's initialisation replaced in it gets its original tensor back. A classmethod,
        so the wrap that builds the tuner is guarded too."""
        return nullcontext()

    def loading_into_existing(self, old_config: Any) -> AbstractContextManager[None]:
        """Around the rebuild of an existing adapter (its config was `old_config`) whose saved weights are loaded
        next: an initialisation that changes the base weights, which it already did, must not run again."""
        return nullcontext()

    def check_weight_conversion(self, adapter_names: list[str], initial: Any) -> None:
        """`save_pretrained(path_initial_model_for_weight_conversion=initial)`'s checks, before anything is written:
        refused unless the tuner converts its adapters for the original base."""
        raise self._no_weight_conversion(adapter_names[0])

    def adapter_for_save(
        self, adapter_name: str, tensors: dict[str, torch.Tensor], config: Any, initial: Any
    ) -> tuple[dict[str, torch.Tensor], Any]:
        """The tensors and the config `save_pretrained` writes for `adapter_name`: as they are, or converted for
        the original base when `initial` (`path_initial_model_for_weight_conversion`) is given."""
        if initial is not None:
            raise self._no_weight_conversion(adapter_name)
        return tensors, config

    def _no_weight_conversion(self, adapter_name: str) -> ValueError:
        peft_type = getattr(self.peft_type, "value", self.peft_type)
        return ValueError(
            f"path_initial_model_for_weight_conversion converts LoRA adapters; {adapter_name!r} is {peft_type}: "
            "call save_pretrained without it"
        )


def check_tensors_fit(
    expected: dict[str, tuple[int, ...]],
    tensors: dict[str, torch.Tensor],
    adapter_name: str,
    optional: frozenset[str] = frozenset(),
) -> None:
    """Refuse, before anything is written, adapter tensors whose keys or shapes differ from `expected`
    (keys in `optional` may be absent)."""
    shapes = [
        f"{k}: file {tuple(tensors[k].shape)} vs model {tuple(shape)}"
        for k, shape in expected.items()
        if k in tensors and tuple(tensors[k].shape) != tuple(shape)
    ]
    missing = sorted(set(expected) - set(tensors) - optional)
    unexpected = sorted(set(tensors) - set(expected))
    problems = [
        f"{what}: {listed(items)}"
        for what, items in (("shape mismatches", shapes), ("missing keys", missing), ("unexpected keys", unexpected))
        if items
    ]
    if problems:
        raise ValueError(
            f"the adapter weights do not fit adapter {adapter_name!r} of this model ({'; '.join(problems)}). "
            "Load the adapter into the base model (and config) it was trained for."
        )


def check_tied_values(tensors: dict[str, torch.Tensor], where: dict[str, torch.Tensor]) -> None:
    """Keys of a file that land on one tensor of the model (tied weights, which HF PEFT saves once per name) must
    hold equal values: otherwise which of them the model ends up with would depend on the file's order."""
    first: dict[int, str] = {}
    for key in tensors:
        other = first.setdefault(id(where[key]), key)
        if other != key and not torch.equal(tensors[other].to(tensors[key].dtype), tensors[key]):
            raise ValueError(
                f"the adapter weights hold {other} and {key}, which are one tensor in this model (tied weights), "
                "with different values; a file written for these tied weights holds the same values under both keys"
            )


class BaseTuner(TunerAttributes, nn.Module):
    """Injects a tuner's layers into `model` and manages named adapters.

    Subclasses set `prefix` (the name stem of their parameters, e.g. "lora_") and `peft_type`, and
    implement `_create_and_replace`.
    """

    prefix: str = ""
    peft_type: Any = None
    can_merge = True  # the adapter has weights to fold into the base model
    wraps_base_layers = True  # it replaces base layers (so it needs its own layer for a quantized one)

    def __init__(self, model: nn.Module, config: Any, adapter_name: str = "default") -> None:
        super().__init__()
        self.model = model
        self.peft_config: dict[str, Any] = {}
        # as HF PEFT's: the name after set_adapter(name), a list after set_adapter([...]), add_adapter and
        # delete_adapter (empty: none active)
        self.active_adapter: str | list[str] = adapter_name
        self.add_adapter(adapter_name, config)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.model(*args, **kwargs)

    def peft_model_modules(self) -> dict[str, nn.Module]:
        """The modules a `PeftModel` registers for this tuner, by attribute (HF PEFT's layout: the tuner itself)."""
        return {"base_model": self}

    @property
    def targeted_module_names(self) -> list[str]:
        """The names (relative to `model`) of the modules holding this tuner's layers (HF PEFT's attribute), in HF
        PEFT's order: each adapter's in model order, the adapters in the order they were added."""
        layers = [(name, m) for name, m in self.model.named_modules() if isinstance(m, BaseTunerLayer)]
        names = {name: None for adapter in self.peft_config for name, m in layers if adapter in m.adapter_names()}
        names.update({name: None for name, _ in layers})  # a layer left without adapters stays targeted
        return list(names)

    # ---- hooks for subclasses --------------------------------------------------------------
    def _check_new_adapter_config(self, config: Any) -> None:
        """Raise on configs that cannot live beside the adapters already present."""

    condenses_target_list = True  # HF PEFT condenses long target lists (not IA3's: its feedforward list pairs them)

    def prepare_adapter_config(self, config: Any, model: nn.Module) -> Any:
        """The config's targets as matched: "all-linear" expanded (`expand_all_linear`), a long list condensed as HF
        PEFT condenses it (`condense_target_modules`). Subclasses fill their defaults first, then call this."""
        if config.target_modules is None:
            raise ValueError(
                f"{type(config).__name__}.target_modules is None and no default is known for this model; "
                f"name the modules to adapt. {describe_module_names(model)}"
            )
        expand_all_linear(config, model)
        if self.condenses_target_list:
            condense_target_modules(config, model)
        return config

    def _create_and_replace(self, config: Any, adapter_name: str, target: nn.Module, key: str) -> Optional[nn.Module]:
        """Add `adapter_name` to the module named `key`: a new tuner layer wrapping `target` to put in its place,
        or None when `target` already is one of this tuner's layers and took the adapter in place."""
        raise NotImplementedError

    def _is_supported_target(self, module: nn.Module) -> bool:
        """Whether a matched module can be wrapped (or already is)."""
        return True

    def quantized_layer_for(self, module: nn.Module) -> Optional[type]:
        """This tuner's layer class for a quantized base layer (as registered), or None."""
        for layer_cls in get_tuner(self.peft_type).quantized_layers.values():
            if layer_cls.accepts(module):
                return layer_cls
        return None

    # ---- injection ------------------------------------------------------------------------
    def matching_keys(self, config: Any) -> list[str]:
        """The names of the modules `config` targets (its `modules_to_save` left out)."""
        keys = []
        modules_to_save = set(getattr(config, "modules_to_save", None) or [])
        for key, module in self.model.named_modules():
            if not key or f".{self.prefix}" in f".{key}" or ".base_layer" in key or ".original_module" in key:
                continue
            if name_matches(key, modules_to_save) or inside_saved_module(key, modules_to_save):
                continue
            if ".modules_to_save." in key:
                continue
            if target_matches(config, key) and not is_excluded(config, key):
                keys.append(key)
        return keys

    def _internal(self, key: str) -> bool:
        """Whether module `key` is inside an earlier adapter's layer or saved-module wrapper (not the user's)."""
        return any(s in f".{key}" for s in (f".{self.prefix}", ".base_layer", ".original_module", ".modules_to_save."))

    def _check_exclusions(self, config: Any, keys: list[str]) -> None:
        """`exclude_modules` as HF PEFT checks it: an error when it excluded every module the targets matched, a
        warning when it excluded no module of the model (nor did `modules_to_save`)."""
        exclude = getattr(config, "exclude_modules", None)
        if not exclude:
            return
        names = [k for k, _ in self.model.named_modules() if k and is_excluded(config, k) and not self._internal(k)]
        if not keys:
            dropped = [k for k in names if target_matches(config, k)]
            if dropped:  # HF PEFT's NoMatchingPeftModuleError
                raise NoMatchingPeftModuleError(
                    f"No modules were targeted for adaptation: exclude_modules={exclude!r} excluded every module "
                    f"target_modules={config.target_modules!r} matched ({listed(dropped)}); "
                    "check your target_modules and exclude_modules"
                )
        saved = getattr(config, "modules_to_save", None)
        if keys and not names and not any(name_matches(k, saved or []) for k, _ in self.model.named_modules()):
            warnings.warn(
                f"You have passed exclude_modules={exclude} but no modules were excluded. "
                "Please check that exclude_modules was set correctly.",
                stacklevel=3,
            )

    def add_adapter(self, adapter_name: str, config: Any) -> None:
        """Validate everything first, then inject: a bad config leaves the model untouched, and a failure (or an
        interrupt) mid-way takes back every layer, wrapper and requires_grad change made."""
        self.check_attached()
        check_adapter_name(adapter_name, self, self.prefix, taken=self.peft_config)
        if adapter_name in self.peft_config:
            raise ValueError(
                f"an adapter named {adapter_name!r} already exists; pick another name or delete_adapter it"
            )
        config = self.prepare_adapter_config(copy.deepcopy(config), self.model)
        self._check_new_adapter_config(config)
        keys = self.matching_keys(config)
        self._check_layers_exist(config, matched=bool(keys))
        self._warn_unmatched_patterns(config, keys)
        self._check_exclusions(config, keys)
        extra = self._plan_extra_targets(config, keys)  # targets beyond modules (LoRA: parameters, token rows)
        if not keys and not extra:
            raise NoMatchingPeftModuleError(
                f"target_modules={config.target_modules!r} matched no module of the model; "
                f"{describe_module_names(self.model)}"
            )
        unsupported = [k for k in keys if not self._is_supported_target(self.model.get_submodule(k))]
        if unsupported:
            kinds = sorted({type(self.model.get_submodule(k)).__name__ for k in unsupported})
            raise ValueError(
                f"{type(self).__name__} cannot adapt {unsupported[:4]} (type {', '.join(kinds)}); "
                "target only supported layer types (Linear, Conv1D, Embedding, Conv2d with groups=1, 8-bit Linear)"
            )
        check_modules_to_save(self.model, getattr(config, "modules_to_save", None))
        originals: list[tuple[nn.Module, str, nn.Module]] = []
        # the first adapter (of a new model, or after the last was deleted) becomes active and trains unless loaded
        # for inference; a later one is added inactive and frozen, every existing flag kept (as HF PEFT)
        first = not self.peft_config
        flags = RequiresGradSnapshot() if first else RequiresGradSnapshot(self)
        with requires_grad_kept_on_failure(self):
            self.peft_config[adapter_name] = config
            try:
                for key in keys:
                    parent, target, target_name = get_submodule_parent(self.model, key)
                    originals.append((parent, target_name, target))
                    new_module = self._create_and_replace(config, adapter_name, target, key)
                    if new_module is not None:
                        setattr(parent, target_name, new_module)
                if extra:
                    self._inject_extra_targets(config, adapter_name, extra, originals)
                wrap_modules_to_save(self.model, getattr(config, "modules_to_save", None), adapter_name)
                if first:
                    self.active_adapter = adapter_name
                    self._mark_only_adapters_as_trainable()
                else:
                    self._unmerge_before_switching()
                    # new layers run the active adapters
                    self.activate_adapters(self.active_adapters, inference_mode=True)
                    flags.restore()
                self.active_adapter = list(self.active_adapters)
            except BaseException:  # a KeyboardInterrupt too: no half-built adapter stays behind
                self._undo_injection(adapter_name, originals)
                raise

    def _plan_extra_targets(self, config: Any, keys: list[str]) -> Any:
        """What `config` adapts besides the modules `keys` (checked, before any change; falsy: nothing). A tuner
        that has such targets overrides this and `_inject_extra_targets`."""
        return None

    def _inject_extra_targets(
        self, config: Any, adapter_name: str, plan: Any, originals: list[tuple[nn.Module, str, nn.Module]]
    ) -> None:
        """Carry out `_plan_extra_targets`' plan, appending (parent, name, replaced module) to `originals` before
        each change (undone like the modules' on failure)."""

    def _check_layers_exist(self, config: Any, matched: bool) -> None:
        """`layers_to_transform` naming layers the model does not have is blamed on itself: an error when nothing
        matched because of it, a warning when only some of the named layers exist."""
        layers, targets = getattr(config, "layers_to_transform", None), config.target_modules
        if layers is None or layers == [] or isinstance(targets, str):
            return
        wanted = {layers} if isinstance(layers, int) else set(layers)
        pattern = getattr(config, "layers_pattern", None)
        indices = (_layer_index(key, pattern) for key, _ in self.model.named_modules() if name_matches(key, targets))
        present = {index for index in indices if index is not None}
        missing = sorted(wanted - present)
        if not missing:
            return
        where = (
            f"the layers holding {sorted(targets)} are numbered {min(present)}..{max(present)}"
            if present
            else f"no numbered layers (layers_pattern={pattern!r}) hold {sorted(targets)}"
        )
        message = f"layers_to_transform={layers!r} names layers {missing} that the model does not have: {where}"
        if not matched:  # nothing to adapt: HF PEFT's NoMatchingPeftModuleError (a ValueError)
            raise NoMatchingPeftModuleError(message + "; pick layers that exist")
        warnings.warn(message + "; those are skipped", PeftWarning, stacklevel=3)

    def _warn_unmatched_patterns(self, config: Any, keys: list[str]) -> None:
        """`rank_pattern` / `alpha_pattern` keys that match no targeted module have no effect: HF PEFT's warning."""
        for field_name in ("rank_pattern", "alpha_pattern"):
            patterns = getattr(config, field_name, None) or {}
            unmatched = sorted(p for p in patterns if not any(pattern_value({p: True}, key, False) for key in keys))
            if unmatched:
                warnings.warn(
                    f"The following {field_name} keys did not match any targeted module and were ignored: {unmatched}.",
                    RuntimeWarning,
                    stacklevel=3,
                )

    def _undo_injection(self, adapter_name: str, originals: list[tuple[nn.Module, str, nn.Module]]) -> None:
        """A layer failed to build mid-way: put back what was replaced (layers, saved-module wrappers), so the model
        is as before."""
        for parent, name, original in originals:
            if isinstance(original, BaseTunerLayer):
                original._remove_adapter(adapter_name)
            else:
                setattr(parent, name, original)
        for key, module in list(self.model.named_modules()):
            if isinstance(module, ModulesToSaveWrapper) and adapter_name in module.modules_to_save:
                module.delete_adapter(adapter_name)
                if not module.modules_to_save:  # it was made for this adapter: the original goes back
                    parent, _, child = get_submodule_parent(self.model, key)
                    setattr(parent, child, module.original_module)
        self.peft_config.pop(adapter_name, None)

    # ---- adapters by name -----------------------------------------------------------------
    def tuner_layers(self) -> Iterator[tuple[str, BaseTunerLayer | ModulesToSaveWrapper]]:
        """(name, module) of every adapter layer and `modules_to_save` wrapper in the model."""
        for name, module in self.model.named_modules():
            if isinstance(module, (BaseTunerLayer, ModulesToSaveWrapper)):
                yield name, module

    @property
    def active_adapters(self) -> list[str]:
        active = self.active_adapter
        return [active] if isinstance(active, str) else list(active)

    def _wrappers(self) -> list[ModulesToSaveWrapper]:
        return [m for _, m in self.tuner_layers() if isinstance(m, ModulesToSaveWrapper)]

    def _adapter_list(self, adapter_names: Any, what: str = "adapter_name") -> list[str]:
        """`adapter_names` (a name or a list of names) as a list of existing adapters; TypeError / ValueError
        otherwise, before anything changes."""
        if isinstance(adapter_names, str):
            names = [adapter_names]
        elif isinstance(adapter_names, (list, tuple)) and all(isinstance(n, str) for n in adapter_names):
            names = list(adapter_names)
        else:
            raise TypeError(f"{what} must be an adapter name or a list of adapter names, got {adapter_names!r}")
        self.check_attached()
        for name in names:
            self.check_adapter_exists(name)
        return names

    def set_adapter(self, adapter_name: str | list[str], inference_mode: bool = False) -> None:
        """Make `adapter_name` (one name, or a list: their outputs add up) the active adapter(s), as HF PEFT's
        `LoraModel.set_adapter`. Their parameters (and their copies of `modules_to_save`) train unless
        `inference_mode`; every other adapter's are frozen; base weights keep their flags. Merged layers are
        unmerged first (with a warning). Two active adapters cannot both hold a copy of one `modules_to_save` module
        (ValueError, as HF PEFT; nothing changes)."""
        names = self._adapter_list(adapter_name)
        for wrapper in self._wrappers():
            wrapper.check_set_adapter(adapter_name)  # every refusal before any change
        self._unmerge_before_switching()
        self.activate_adapters(names, inference_mode)
        self.active_adapter = adapter_name if isinstance(adapter_name, str) else names

    def _unmerge_before_switching(self) -> None:
        for _, module in self.tuner_layers():
            if isinstance(module, BaseTunerLayer) and module.merged:
                warnings.warn("an adapter is merged; unmerging it before switching adapters")
                module.unmerge()

    def activate_adapters(self, names: list[str], inference_mode: bool = False) -> None:
        """Point every layer and saved-module wrapper at `names` (a wrapper at the one of them it holds, if any),
        with requires_grad as `set_adapter` says. No checks (the callers made them)."""
        for _, module in self.tuner_layers():
            if isinstance(module, ModulesToSaveWrapper):
                module.set_adapter([n for n in names if n in module.modules_to_save][:1], inference_mode)
            else:
                module.set_adapter(names, inference_mode)

    def set_requires_grad(self, adapter_names: str | list[str], requires_grad: bool = True) -> None:
        """Make the named adapters' parameters (and their `modules_to_save` copies) train or not, active or not, as
        HF PEFT's."""
        names = self._adapter_list(adapter_names, "adapter_names")
        for _, module in self.tuner_layers():
            module.set_requires_grad(names, requires_grad)

    def _mark_only_adapters_as_trainable(self) -> None:
        """The first adapter: freeze every base weight; the active adapter trains unless it was loaded for
        inference (with its config's extras, e.g. LoRA's biases)."""
        for n, p in self.model.named_parameters():
            if f".{self.prefix}" not in f".{n}" and ".modules_to_save." not in n:
                p.requires_grad_(False)
        configs = [self.peft_config[name] for name in self.active_adapters]
        self.activate_adapters(self.active_adapters, inference_mode=all(c.inference_mode for c in configs))
        for config in configs:
            if not config.inference_mode:
                self._mark_extra_trainable(config)

    def _mark_extra_trainable(self, config: Any) -> None:
        """Tuner-specific extras that train with the adapter (e.g. LoRA's biases)."""

    def _set_adapter_layers(self, enabled: bool) -> None:
        self.check_attached()
        for _, module in self.tuner_layers():
            module.enable_adapters(enabled)

    def enable_adapter_layers(self) -> None:
        """Enable every layer; the active adapters train again (as HF PEFT)."""
        self._set_adapter_layers(True)

    def disable_adapter_layers(self) -> None:
        """Disable every layer (the base model runs alone); every adapter parameter is frozen (as HF PEFT)."""
        self._set_adapter_layers(False)

    @contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Run the base model alone inside the block, every adapter parameter frozen (as HF PEFT does). On exit every
        layer is as it was found (a nested block, or one after disable_adapter_layers(), leaves the adapters
        disabled), and so is every requires_grad flag (HF PEFT makes the active adapters train after the block,
        also ones that were frozen before it)."""
        self.check_attached()
        layers = [module for _, module in self.tuner_layers()]
        was = [not _layer_enabled(module) for module in layers]
        flags = RequiresGradSnapshot(self)
        for module in layers:
            module.enable_adapters(False)
        try:
            yield
        finally:
            for module, disabled in zip(layers, was):
                module.enable_adapters(not disabled)
            flags.restore()

    def delete_adapter(self, adapter_name: str, force: bool = False) -> None:
        """Delete an adapter, as HF PEFT does: a merged one is refused (unmerge first). When it was active, the other
        active adapters stay active (and train); when none is left, the first remaining adapter by name becomes
        active, with a warning; after the last one, no adapter is active (`active_adapter == []`). `force` (for an
        adapter that failed to load) skips the merged check and the warning."""
        self.check_adapter_exists(adapter_name)
        if not force and any(
            isinstance(m, BaseTunerLayer) and adapter_name in m.merged_adapters for _, m in self.tuner_layers()
        ):
            raise ValueError(f"adapter {adapter_name!r} is merged; unmerge() before deleting it")
        active = self.active_adapters
        new_active = active_after_delete(adapter_name, active, self.peft_config, warn=not force, stacklevel=3)
        for _, module in self.tuner_layers():
            if isinstance(module, ModulesToSaveWrapper):
                module.delete_adapter(adapter_name, new_active)
            else:
                module._remove_adapter(adapter_name)
        del self.peft_config[adapter_name]
        if adapter_name in active:
            self.activate_adapters(new_active)
        self.active_adapter = new_active

    # ---- merge ----------------------------------------------------------------------------
    def merge_adapter(self, adapter_names: Optional[list[str]] = None, safe_merge: bool = False) -> None:
        self.check_attached()
        for name in adapter_names or []:
            self.check_adapter_exists(name)
        refusing = [n for n, m in self.tuner_layers() if isinstance(m, BaseTunerLayer) and m.merge_refusal]
        if refusing:
            reason = self.model.get_submodule(refusing[0]).merge_refusal
            raise ValueError(f"{reason} ({', '.join(refusing[:3])})")
        layers = [m for _, m in self.tuner_layers() if isinstance(m, BaseTunerLayer)]
        if safe_merge:
            # check every layer before touching any, so a bad adapter leaves the whole model untouched
            for layer in layers:
                for name in layer._adapters_to_merge(adapter_names):
                    layer.check_finite_delta(name)
        untied = self._layers_to_untie(layers, adapter_names)
        for layer in untied:
            layer.untie_base_weight()
        try:
            for layer in layers:
                layer.merge(safe_merge=safe_merge, adapter_names=adapter_names)
        except BaseException:  # a layer refused (overlapping token rows): a layer that merged nothing is tied again
            for layer in untied:
                if not layer.merged_adapters:
                    layer.retie_base_weight()
            raise

    def _layers_to_untie(
        self, layers: list[BaseTunerLayer], adapter_names: Optional[list[str]]
    ) -> list[BaseTunerLayer]:
        """The layers about to merge into a weight that another module of the model also holds (tied embeddings:
        GPT-2's `lm_head.weight` is `transformer.wte.weight`). Merging in place would change that other module too
        (HF PEFT 0.21 does: the merged model's logits then differ from the trained one's); these get their own copy
        to merge into instead. A weight that cannot be copied as a plain Parameter is refused before any change."""
        uses: dict[int, int] = {}
        for _, p in self.model.named_parameters(remove_duplicate=False):
            uses[id(p)] = uses.get(id(p), 0) + 1
        found = []
        for layer in layers:
            weight = getattr(layer.get_base_layer(), "weight", None)
            if weight is None or uses.get(id(weight), 0) < 2 or layer._shared_weight:
                continue
            if not layer.pending_merges(adapter_names):
                continue
            if type(weight) is not nn.Parameter:
                raise ValueError(
                    f"cannot merge into {type(layer.get_base_layer()).__name__}: its weight "
                    f"({type(weight).__name__}) is shared with another module of the model (tied weights) and cannot "
                    "be given its own copy; untie it first (e.g. set the model config's tie_word_embeddings=False and "
                    "clone the output embedding's weight) or keep the adapter unmerged"
                )
            found.append(layer)
        return found

    def unmerge_adapter(self) -> None:
        self.check_attached()
        for _, module in self.tuner_layers():
            if isinstance(module, BaseTunerLayer):
                module.unmerge()

    def _unload_and_optionally_merge(
        self, merge: bool, progressbar: bool, safe_merge: bool, adapter_names: Optional[list[str]]
    ) -> nn.Module:
        self.check_attached()
        if merge:
            self.merge_adapter(adapter_names, safe_merge=safe_merge)
        else:
            self.unmerge_adapter()
        untied = [  # the shared Parameters and the copies merged into (both sides of a tie may have one)
            p
            for _, m in self.tuner_layers()
            if isinstance(m, BaseTunerLayer) and m._shared_weight
            for p in (m._shared_weight[0], m.get_base_layer().weight)
        ]
        entries = list(self.tuner_layers())[::-1]  # inner layers first: nested ones (LoRA's ParamWrapper) unwrap
        if progressbar:
            from tqdm.auto import tqdm

            entries = tqdm(entries, desc="Unloading " + ("and merging " if merge else "") + "model")
        for key, module in entries:
            parent, _, child = get_submodule_parent(self.model, key)
            if isinstance(module, BaseTunerLayer):
                module._shared_weight = ()  # the model is the caller's now: no unmerge to come
                setattr(parent, child, module.get_base_layer())
            elif merge and module.active_adapters and module.active_adapters[0] in module.modules_to_save:
                setattr(parent, child, module.modules_to_save[module.active_adapters[0]])
            else:
                setattr(parent, child, module.original_module)
        self.is_unloaded = True  # the model is the caller's now: this tuner refuses every adapter operation
        if untied:
            untie_in_config(self.model, untied)
        return self.model

    def merge_and_unload(
        self, progressbar: bool = False, safe_merge: bool = False, adapter_names: Optional[list[str]] = None
    ) -> nn.Module:
        """The base model with the active adapter(s) merged into its weights and every tuner layer removed."""
        return self._unload_and_optionally_merge(True, progressbar, safe_merge, adapter_names)

    def unload(self) -> nn.Module:
        """The base model as it was, adapters dropped unmerged."""
        return self._unload_and_optionally_merge(False, False, False, None)

    # ---- state dict in HF PEFT's saved format ---------------------------------------------
    def peft_state_dict(
        self,
        adapter_name: str,
        state_dict: Optional[dict[str, torch.Tensor]] = None,
        save_embedding_layers: bool | str = False,
    ) -> dict[str, torch.Tensor]:
        """The adapter's tensors keyed as HF PEFT saves them (adapter name stripped). `state_dict` is the
        PeftModel's (keys `base_model.…`) when given, else this tuner's own.

        `save_embedding_layers=True` adds the base model's input / output embedding tensors as HF PEFT saves them
        (`_embedding_base_keys`); "auto" means True when the config targets `embed_tokens` / `lm_head` (HF PEFT's
        test, with its warning) and the tuner saves them on "auto" (`_auto_saves_embeddings`)."""
        self.check_attached()
        if state_dict is None:
            inner = self.state_dict()
        else:
            inner = {k[len(SAVED_PREFIX) :]: v for k, v in state_dict.items() if k.startswith(SAVED_PREFIX)}
        out = {SAVED_PREFIX + k: v for k, v in self.adapter_state_dict(inner, adapter_name).items()}
        targeted = self._embedding_targeted(self.peft_config[adapter_name])
        if save_embedding_layers == "auto":
            save_embedding_layers = targeted and self._auto_saves_embeddings(self.peft_config[adapter_name])
            if save_embedding_layers:
                warnings.warn(
                    "Setting `save_embedding_layers` to `True` as embedding layers found in `target_modules`.",
                    stacklevel=3,
                )
        if save_embedding_layers:
            if not callable(getattr(self.model, "get_input_embeddings", None)):
                warnings.warn(
                    "Could not identify embedding layer(s) because the model is not a 🤗 transformers model.",
                    stacklevel=3,
                )
            embedding_keys = self._embedding_file_keys(adapter_name, targeted)
            out.update({SAVED_PREFIX + k: inner[m] for k, m in embedding_keys.items() if m in inner})
        return out

    def _auto_saves_embeddings(self, config: Any) -> bool:
        """Whether `save_embedding_layers="auto"` saves the embeddings `config` targets; a tuner training token rows
        says no (HF PEFT: their point is a small file)."""
        return True

    def _embedding_targeted(self, config: Any) -> bool:
        """HF PEFT's test of whether the config targets the embeddings: a name list holding `embed_tokens` /
        `lm_head` as such, or a regex (not "all-linear") matching a module whose name ends in one of them."""
        targets = getattr(config, "target_modules", None)
        if isinstance(targets, str):
            if targets == ALL_LINEAR:
                return False
            ends = re.compile(rf"(.*\.)?({'|'.join(EMBEDDING_LAYER_NAMES)})$")
            return any(ends.match(k) and name_matches(k, targets) for k, _ in self.model.named_modules())
        return targets is not None and any(n in targets for n in EMBEDDING_LAYER_NAMES)

    def _embedding_layers(self) -> list[tuple[str, nn.Module]]:
        """(name, module) of the model's input and output embeddings as its `get_input_embeddings()` /
        `get_output_embeddings()` give them (a tuner layer where one wraps them); none for other models."""
        found = (model_embedding(self.model, g) for g in ("get_input_embeddings", "get_output_embeddings"))
        return [(name, layer) for name, layer in found if name and layer is not None]

    def _embedding_base_keys(self, targeted: Optional[bool] = None) -> set[str]:
        """Keys (relative to this tuner) of the base embedding tensors that HF PEFT's `save_embedding_layers`
        saves: those of a tuner layer's base layer (`….wte.base_layer.weight`), and, when the config does not target
        the embeddings (`targeted=False`, HF PEFT's test), those of an embedding left as it is (`….wte.weight`,
        `lm_head.weight`). `targeted=None`: all of them, the keys a file may carry (loading)."""
        prefixes = []
        for name, layer in self._embedding_layers():
            if isinstance(layer, BaseTunerLayer):
                if isinstance(layer.get_base_layer(), (nn.Linear, nn.Embedding)):
                    prefixes.append(f"model.{name}.base_layer.")
            elif not targeted and not isinstance(layer, ModulesToSaveWrapper):
                prefixes.append(f"model.{name}.")
        if not prefixes:
            return set()
        return {k for k in self.state_dict() if k.startswith(tuple(prefixes))}

    def _embedding_file_keys(self, adapter_name: Optional[str], targeted: Optional[bool] = None) -> dict[str, str]:
        """{saved key: model key} (relative to this tuner) of what `save_embedding_layers` adds to `adapter_name`'s
        file: the base embedding tensors (`_embedding_base_keys`) under their own keys; a tuner whose embedding layers
        HF PEFT saves under other keys (LoRA's trainable tokens) overrides this."""
        return {k: k for k in self._embedding_base_keys(targeted)}

    def embedding_tensors(self, adapter_name: Optional[str] = None) -> dict[str, torch.Tensor]:
        """{saved key: the model's tensor} for every base embedding tensor a file of `adapter_name` may carry
        (`_embedding_file_keys`): loading checks their shapes and dtypes as the adapter's and writes them into the
        base model, as HF PEFT restores them."""
        own = self.state_dict()
        return {SAVED_PREFIX + k: own[m] for k, m in self._embedding_file_keys(adapter_name).items()}

    def load_peft_state_dict(self, tensors: dict[str, torch.Tensor], adapter_name: str) -> None:
        """Load adapter tensors saved in HF PEFT's format into `adapter_name`; every key and shape is checked
        before anything is written, so a wrong file leaves the model untouched. Base embedding tensors (saved with
        `save_embedding_layers`) may be present: they are checked alike and written into the base model."""
        self.check_attached()
        # keep_vars: parameters as such, and every name of a tied one (lm_head.weight is wte.weight in GPT-2)
        targets: dict[str, torch.Tensor] = self.state_dict(keep_vars=True)
        embedding_keys = self._embedding_file_keys(adapter_name)  # as `embedding_tensors`, computed once here
        expected = {k: tuple(v.shape) for k, v in self.peft_state_dict(adapter_name).items()}
        expected.update({SAVED_PREFIX + k: tuple(targets[m].shape) for k, m in embedding_keys.items()})
        check_tensors_fit(expected, tensors, adapter_name, optional=frozenset(SAVED_PREFIX + k for k in embedding_keys))
        where = {
            key: targets[
                embedding_keys.get(key[len(SAVED_PREFIX) :])
                or self.adapter_key_to_model_key(key[len(SAVED_PREFIX) :], adapter_name)
            ]
            for key in tensors
        }
        check_tied_values(tensors, where)
        with torch.no_grad():
            for key, value in tensors.items():
                target = where[key]
                target.copy_(value.to(device=target.device, dtype=target.dtype))

    def adapter_state_dict(self, state_dict: dict[str, torch.Tensor], adapter_name: str) -> dict[str, torch.Tensor]:
        """Keys as HF PEFT saves them, relative to this tuner (`peft_state_dict` prefixes `base_model.`)."""
        config = self.peft_config[adapter_name]
        out = {}
        for key, value in state_dict.items():
            if f".{self.prefix}" in f".{key}" and adapter_name in key.split("."):
                out[strip_adapter_name(key, adapter_name)] = value
            elif f".modules_to_save.{adapter_name}." in key:
                out[key.replace(f".modules_to_save.{adapter_name}.", ".")] = value
        out.update(self._bias_state_dict(state_dict, config, adapter_name))
        out.update(self._extra_saved_tensors(state_dict, adapter_name))
        return out

    def _bias_state_dict(
        self, state_dict: dict[str, torch.Tensor], config: Any, adapter_name: str
    ) -> dict[str, torch.Tensor]:
        return {}

    def _extra_saved_tensors(self, state_dict: dict[str, torch.Tensor], adapter_name: str) -> dict[str, torch.Tensor]:
        """Adapter tensors saved under keys of the tuner's own making (LoRA: trainable token rows)."""
        return {}

    def _extra_model_key(self, key: str, adapter_name: str) -> Optional[str]:
        """The model key of a saved key `_extra_saved_tensors` made, else None."""
        return None

    def adapter_key_to_model_key(self, key: str, adapter_name: str) -> str:
        """Inverse of `adapter_state_dict`'s renaming (keys relative to this tuner)."""
        extra = self._extra_model_key(key, adapter_name)
        if extra is not None:
            return extra
        prefix_part = f".{self.prefix}"
        if prefix_part in f".{key}":
            head, _, tail = key.partition(self.prefix)
            layer_attr, _, rest = tail.partition(".")
            return f"{head}{self.prefix}{layer_attr}.{adapter_name}" + (f".{rest}" if rest else "")
        for name, module in self.tuner_layers():
            if isinstance(module, ModulesToSaveWrapper) and key.startswith(f"model.{name}."):
                rest = key[len(name) + 7 :]
                if rest.startswith("original_module."):
                    return key
                if rest.startswith(f"modules_to_save.{adapter_name}."):
                    return key
                rest = rest.removeprefix("modules_to_save.")
                return f"model.{name}.modules_to_save.{adapter_name}.{rest}"
        return key


def untie_in_config(model: nn.Module, shared: list[Any]) -> None:
    """After a merge gave some modules their own copy of a tied weight (`BaseTuner._layers_to_untie`), make the
    transformers model say so: the pairs of its `all_tied_weights_keys` that no longer hold one Parameter are dropped
    (a later `tie_weights()` call from transformers' own code must not tie them back), and when no pair is left tied
    its config gets `tie_word_embeddings=False`, so that `save_pretrained` / `from_pretrained` keep the merged
    embedding and the untouched output layer apart. (When some pairs stay tied, e.g. T5's encoder / decoder / lm_head
    with only `shared` merged, the config stays as it is: `save_pretrained` writes both untied tensors and
    `from_pretrained` does not tie tensors whose values differ.)"""
    ids = {id(p) for p in shared}
    for module in model.modules():
        pairs = getattr(module, "all_tied_weights_keys", None)
        config = getattr(module, "config", None)
        if not isinstance(pairs, dict) or not pairs or not getattr(config, "tie_word_embeddings", False):
            continue
        params = dict(module.named_parameters(remove_duplicate=False))
        broken = [
            target
            for target, source in pairs.items()
            if target in params
            and source in params
            and params[target] is not params[source]
            and (id(params[target]) in ids or id(params[source]) in ids)
        ]
        if not broken:
            continue
        for target in broken:
            del pairs[target]
        if not pairs:
            config.tie_word_embeddings = False
            text_config = getattr(config, "get_text_config", lambda: config)()
            if text_config is not config and getattr(text_config, "tie_word_embeddings", False):
                text_config.tie_word_embeddings = False


def _layer_enabled(module: BaseTunerLayer | ModulesToSaveWrapper) -> bool:
    if isinstance(module, ModulesToSaveWrapper):
        return module.adapters_enabled
    return not module.disable_adapters


def strip_adapter_name(key: str, adapter_name: str) -> str:
    """HF PEFT's rule: drop the adapter name only where it ends the key or precedes the last part."""
    if key.endswith(f".{adapter_name}"):
        return key.removesuffix(f".{adapter_name}")
    head, _, last = key.rpartition(".")
    return f"{head.removesuffix(f'.{adapter_name}')}.{last}"
