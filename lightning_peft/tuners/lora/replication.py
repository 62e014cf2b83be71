"""HF PEFT's `layer_replication`: before LoRA is injected, the base model's stack of transformer layers is rebuilt
from ranges of its layers (`[[0, 4], [2, 5]]`: layers 0 1 2 3 2 3 4), the copies sharing the original's weights, so
that each copy gets LoRA layers of its own (saved under the new layer indices, as HF PEFT saves them).

Differs from HF PEFT on purpose: a second adapter with the same `layer_replication` keeps the model as it is (HF
PEFT replicates the replicated stack again), one with another map is refused; a map naming layers the model does
not have is a ValueError before anything changes; a failed injection puts the original stack back."""

from __future__ import annotations

import copy
from typing import Any, Callable, Optional

from torch import nn

from ...config import short_repr


def check_layer_map(value: Any) -> Optional[list[list[int]]]:
    """`layer_replication`: None, or a list of [start, end) layer ranges (0 <= start < end) as lists."""
    if value is None:
        return None
    pairs = list(value) if isinstance(value, (list, tuple)) else None
    ok = pairs is not None and all(
        isinstance(p, (list, tuple)) and len(p) == 2 and all(isinstance(i, int) and not isinstance(i, bool) for i in p)
        for p in pairs
    )
    if not ok:
        raise TypeError(
            "layer_replication must be a list of [start, end] layer ranges, e.g. [[0, 4], [2, 5]]; "
            f"got {short_repr(value)}"
        )
    for start, end in pairs:  # type: ignore[union-attr]  # checked above
        if not 0 <= start < end:
            raise ValueError(
                f"layer_replication range [{start}, {end}] is not valid: each range [start, end) needs "
                "0 <= start < end (e.g. [[0, 4], [2, 5]])"
            )
    return [list(p) for p in pairs] if pairs else None


def _layer_stack(model: nn.Module) -> tuple[nn.Module, nn.Module, str, nn.ModuleList]:
    """(model found, owner, attribute, ModuleList) of the transformer layers, found where HF PEFT looks: `.model` as
    deep as it goes (then `.bert`), and there `layers` (Llama-like), `encoder.layer` (BERT-like)
    or `h` (Falcon-like)."""
    inner: Any = model
    while isinstance(getattr(inner, "model", None), nn.Module):
        inner = inner.model
    if isinstance(getattr(inner, "bert", None), nn.Module):
        inner = inner.bert
    for owner, attr in ((inner, "layers"), (getattr(inner, "encoder", None), "layer"), (inner, "h")):
        layers = getattr(owner, attr, None) if owner is not None else None
        if isinstance(layers, nn.ModuleList):
            return inner, owner, attr, layers  # type: ignore[return-value]
    raise ValueError(
        "layer_replication could not find the model's layers (a ModuleList at .layers, .encoder.layer or .h of the "
        "innermost .model): it works for Llama-, BERT- and Falcon-like models; leave layer_replication unset"
    )


def _shared_copy(layer: nn.Module) -> nn.Module:
    """A copy of `layer` whose parameters are the original's (buffers copied), as HF PEFT's `clone_module`."""
    clone = copy.deepcopy(layer)
    for name, module in layer.named_modules():
        target = clone.get_submodule(name)
        for pname, param in module.named_parameters(recurse=False):
            target.register_parameter(pname, param)
    return clone


def replicate(tuner: Any, layer_map: Optional[list[list[int]]]) -> Optional[Callable[[], None]]:
    """Rebuild the layer stack of `tuner.model` for `layer_map`; returns a function that puts the original stack
    back (None when nothing changed: no map, or the model already replicated with this one)."""
    if not layer_map:
        return None
    done = vars(tuner).get("_replicated_layers")
    if done is not None:
        if done == layer_map:
            return None
        raise ValueError(
            f"the model's layers were replicated with layer_replication={done} for an earlier adapter; an adapter "
            f"with layer_replication={layer_map} cannot be added to it (adapters of one model share its layers)"
        )
    inner, owner, attr, layers = _layer_stack(tuner.model)
    too_far = [pair for pair in layer_map if pair[1] > len(layers)]
    if too_far:
        raise ValueError(
            f"layer_replication={layer_map} names layers up to {max(p[1] for p in too_far) - 1}, but the model has "
            f"{len(layers)} (0..{len(layers) - 1}); ranges are [start, end) with end <= {len(layers)}"
        )
    copies: list[nn.Module] = []
    for start, end in layer_map:
        for i in range(start, end):
            layer = _shared_copy(layers[i])
            for module in layer.modules():  # transformers' per-layer cache index
                if hasattr(module, "layer_idx"):
                    setattr(module, "layer_idx", len(copies))
            copies.append(layer)
    config: Any = getattr(inner, "config", None)
    old_count = getattr(config, "num_hidden_layers", None)
    setattr(owner, attr, nn.ModuleList(copies))
    if old_count is not None:
        config.num_hidden_layers = len(copies)
    vars(tuner)["_replicated_layers"] = layer_map

    def undo() -> None:
        setattr(owner, attr, layers)
        if old_count is not None:
            config.num_hidden_layers = old_count
        vars(tuner).pop("_replicated_layers", None)

    return undo


def unshare(tuner: Any) -> None:
    """After a merge: every copy of a replicated layer gets parameters of its own (the merged layers already have
    theirs), so that the merged model is the plain deeper model its config describes: transformers' save_pretrained
    refuses tensors shared between layers, and from_pretrained of such a folder builds independent layers anyway."""
    if vars(tuner).get("_replicated_layers") is None:
        return
    seen: set[int] = set()
    for module in _layer_stack(tuner.model)[3].modules():
        for name, param in list(module.named_parameters(recurse=False)):
            if id(param) in seen:
                module.register_parameter(name, nn.Parameter(param.detach().clone(), requires_grad=param.requires_grad))
            else:
                seen.add(id(param))
