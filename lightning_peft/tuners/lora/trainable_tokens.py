"""Trainable tokens (`LoraConfig.trainable_token_indices`), as HF PEFT 0.21: only the listed rows of an embedding
matrix train (typically the rows of tokens added to a tokenizer), the rest of it stays frozen.

Each adapter holds the trained rows themselves (`trainable_tokens_delta`, initialised to the rows' values, so an
untrained adapter changes nothing) and the original rows (not saved). The forward runs the embedding with those rows
replaced, merging writes them into the weight and unmerging writes the originals back. Saved as HF PEFT saves them:
`<embedding>.token_adapter.trainable_tokens_delta`.

Tied weights: when the input embedding is wrapped, the modules that hold the very same weight (an LM head tied to
it) get a layer tied to the embedding's: the same rows, one saved tensor. A dict naming both with the same indices
does the same; with different indices each module trains its own rows (HF PEFT's rule).

Differences from HF PEFT (both refuse what would silently compute something else): a duplicate, negative or
out-of-range index is refused when the adapter is made (HF PEFT takes duplicates and fails on negatives at the first
forward); a `nn.Linear` is only accepted when it is the model's output embedding (HF PEFT applies it to any Linear
and drops its bias). In memory the rows are `<embedding>.trainable_tokens_delta.<adapter>` (HF PEFT:
`<embedding>.token_adapter.trainable_tokens_delta.<adapter>`); the files are the same.
"""

from __future__ import annotations

from typing import Any, Iterator, Optional, cast

import torch
from torch import nn
from torch.func import functional_call

from ...config import short_repr
from ..base import (
    BaseTunerLayer,
    ModulesToSaveWrapper,
    adapter_dtype,
    get_submodule_parent,
    model_embedding,
    name_matches,
)
from ..mixed_batch import MERGED_REFUSAL, MixedBatch, check_batch_size

SAVED_NAME = "token_adapter.trainable_tokens_delta"  # HF PEFT's key part for the trained rows


class _Rows(nn.Module):
    """The original rows per adapter, as non-persistent buffers (moved with the model, never saved)."""

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name in dict(self.named_buffers(recurse=False))

    def __getitem__(self, name: str) -> torch.Tensor:
        return cast(torch.Tensor, getattr(self, name))

    def __setitem__(self, name: str, value: torch.Tensor) -> None:
        self.register_buffer(name, value, persistent=False)

    def __delitem__(self, name: str) -> None:
        delattr(self, name)

    def keys(self) -> Iterator[str]:
        return iter([n for n, _ in self.named_buffers(recurse=False)])


class TrainableTokensLayer(nn.Module, BaseTunerLayer):
    """Trains the rows `token_indices` of `base_layer`'s weight (an `nn.Embedding`, or the output `nn.Linear`).

    A layer made with `tied_to` (the output layer of tied embeddings) holds no tensors of its own: it uses the rows of
    the layer it is tied to."""

    adapter_layer_names = ("trainable_tokens_delta",)
    other_param_names = ("token_indices", "trainable_tokens_original")
    _mixed_batch: Optional[MixedBatch] = None  # set by the tuner for one call with `adapter_names=`

    def __init__(self, base_layer: nn.Module, tied_to: Optional[TrainableTokensLayer] = None) -> None:
        super().__init__()
        self._init_tuner_layer(base_layer)
        # a tied layer keeps the layer it follows in a tuple (not registered: its tensors are saved once, there)
        self._tied = (tied_to,) if tied_to is not None else ()
        if tied_to is None:
            self.trainable_tokens_delta = nn.ParameterDict()
            self.trainable_tokens_original = _Rows()
            self.token_indices: dict[str, list[int]] = {}

    trainable_tokens_delta: nn.ParameterDict
    trainable_tokens_original: _Rows
    SHARED = ("trainable_tokens_delta", "trainable_tokens_original", "token_indices")

    def __getattr__(self, name: str) -> Any:
        tied = self.__dict__.get("_tied")
        if tied and name in self.SHARED:  # a tied layer's rows are those of the layer it follows
            return getattr(tied[0], name)
        return super().__getattr__(name)

    @property
    def tied_adapter(self) -> Optional[TrainableTokensLayer]:
        """The layer this one is tied to (HF PEFT's name), or None."""
        return self._tied[0] if self._tied else None

    def update_layer(self, adapter_name: str, token_indices: list[int], init_weights: bool = True) -> None:
        """Add `adapter_name` training rows `token_indices` (their current values, or random ones when
        `init_weights` is False). A tied layer follows the layer it is tied to: nothing to add."""
        if self._tied:
            return
        weight = cast(torch.Tensor, self.get_base_layer().weight)
        index = torch.tensor(token_indices, dtype=torch.long, device=weight.device)
        originals = weight.detach()[index].clone()
        values = originals if init_weights else torch.randn_like(originals)
        self.token_indices[adapter_name] = list(token_indices)
        self.trainable_tokens_delta[adapter_name] = nn.Parameter(values.to(adapter_dtype(weight)).clone())
        self.trainable_tokens_original[adapter_name] = originals
        self.set_adapter(self.active_adapters or [adapter_name])

    def _remove_adapter(self, adapter_name: str) -> None:
        if not self._tied:
            super()._remove_adapter(adapter_name)

    # ---- the weight with the trained rows ----------------------------------------------------------------------
    def _check_overlap(self, names: list[str]) -> None:
        seen: set[int] = set()
        for name in dict.fromkeys(names):
            rows = set(self.token_indices[name])
            if seen & rows:
                raise ValueError(
                    f"Token indices of adapter {name} are already defined and would result in undefined merging "
                    f"behavior (rows {sorted(seen & rows)[:8]}): only adapters training disjoint rows can be active or "
                    "merged together"
                )
            seen |= rows

    def _weight_with(self, weight: torch.Tensor, names: list[str]) -> torch.Tensor:
        for name in names:
            index = torch.tensor(self.token_indices[name], dtype=torch.long, device=weight.device)
            weight = weight.index_copy(0, index, self.trainable_tokens_delta[name].to(weight.dtype))
        return weight

    def get_merged_weights(self, active_adapters: list[str]) -> torch.Tensor:
        """The weight the forward uses with `active_adapters` (HF PEFT's name)."""
        return self._weight_with(cast(torch.Tensor, self.get_base_layer().weight), active_adapters)

    def merged_tensors(self, adapter_name: str) -> dict[str, torch.Tensor]:
        weight = cast(torch.Tensor, self.get_base_layer().weight)
        return {"weight": self._weight_with(weight.data, [adapter_name])}

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        names = self._adapters_to_merge(adapter_names)
        if not names:
            return
        self._check_overlap(self.merged_adapters + names)
        weight = cast(torch.Tensor, self.get_base_layer().weight)
        merged = self._weight_with(weight.data, names)
        if safe_merge and not torch.isfinite(merged).all():
            raise ValueError(f"NaNs detected in the merged weights. The adapter(s) {names} seem to be broken")
        weight.data = merged
        self.merged_adapters.extend(names)

    def unmerge(self) -> None:
        if self.retie_base_weight():  # merged into its own copy of a tied weight: the shared one is back, exact
            return
        weight = cast(torch.Tensor, self.get_base_layer().weight)
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            index = torch.tensor(self.token_indices[name], dtype=torch.long, device=weight.device)
            weight.data.index_copy_(0, index, self.trainable_tokens_original[name].to(weight.dtype))

    def _run(self, x: Any, names: list[str], args: tuple, kwargs: dict) -> Any:
        """The base layer's own forward with the rows of `names` in its weight."""
        if not names:
            return self.base_layer(x, *args, **kwargs)
        weight = self.get_merged_weights(names)
        return functional_call(self.base_layer, {"weight": weight}, (x, *args), kwargs, strict=False)

    def forward(self, x: Any, *args: Any, **kwargs: Any) -> Any:
        names_given = kwargs.pop("adapter_names", None)
        batch = MixedBatch(list(names_given)) if names_given is not None else self._mixed_batch
        if batch is not None:
            return self._mixed_batch_forward(x, batch, args, kwargs)
        if not self._check_forward():
            return self.base_layer(x, *args, **kwargs)
        names = self.active_adapters_in(self.trainable_tokens_delta)
        self._check_overlap(names)
        return self._run(x, names, args, kwargs)

    def _mixed_batch_forward(self, x: torch.Tensor, batch: MixedBatch, args: tuple, kwargs: dict) -> torch.Tensor:
        """Each sample with its own adapter's rows (`__base__`, or an adapter without rows here: the base weight)."""
        check_batch_size(len(x), batch)
        if self.merged:
            raise ValueError(MERGED_REFUSAL)
        result: Optional[torch.Tensor] = None
        for name in batch.groups:
            rows = batch.rows(name, x.device)
            held = [name] if name in self.trainable_tokens_delta and not self.disable_adapters else []
            out = self._run(x[rows], held, args, kwargs)
            if result is None:
                result = out.new_empty((len(batch), *out.shape[1:]))
            result[rows] = out
        return cast(torch.Tensor, result)


# ---------------------------------------------------------------------------------------------------------------------
# the tuner's side: planning (every check before any change), injection, saved keys
# ---------------------------------------------------------------------------------------------------------------------
def check_indices(where: str, value: Any) -> list[int]:
    """A list of distinct non-negative token indices (TypeError / IndexError / ValueError otherwise)."""
    if not isinstance(value, (list, tuple)) or not all(isinstance(i, int) and not isinstance(i, bool) for i in value):
        raise TypeError(f"{where} must be a list of token indices (ints), got {short_repr(value)}")
    if not value:
        raise ValueError(f"{where} is empty; list the indices of the tokens to train (or leave the field None)")
    negative = [i for i in value if i < 0]
    if negative:
        raise IndexError(f"{where} holds negative token indices {negative[:8]}; give rows of the embedding, from 0")
    duplicates = sorted({i for i in value if value.count(i) > 1})
    if duplicates:
        raise ValueError(
            f"{where} lists token indices {duplicates[:8]} more than once; each row can be trained once, list it once"
        )
    return list(value)


def check_field(value: Any) -> Any:
    """`LoraConfig.trainable_token_indices` as given: None, a list of indices (the input embedding), or a dict
    {embedding module name: list of indices}."""
    if value is None:
        return None
    if isinstance(value, dict):
        if not value:
            raise ValueError(
                "trainable_token_indices={} names no embedding; give {module name: [token indices]} or None"
            )
        for key, indices in value.items():
            if not isinstance(key, str) or not key:
                raise TypeError(f"trainable_token_indices keys must be module names, got {short_repr(key)}")
            check_indices(f"trainable_token_indices[{key!r}]", indices)
        return {k: list(v) for k, v in value.items()}
    return check_indices("trainable_token_indices", value)


def _visible_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """The model's modules outside tuner layers and saved-module wrappers (their insides are not the user's)."""
    skip: set[int] = set()
    for name, module in model.named_modules():
        if id(module) in skip:
            continue
        if isinstance(module, (BaseTunerLayer, ModulesToSaveWrapper)):
            skip.update(id(m) for m in cast(nn.Module, module).modules() if m is not module)
        yield name, module


def _all_paths(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every path to a module (a module reached by two paths is listed twice), outside tuner layers and saved-module
    wrappers."""
    out: list[tuple[str, nn.Module]] = []
    inside: list[str] = []
    for name, module in model.named_modules(remove_duplicate=False):
        if any(name.startswith(w + ".") for w in inside):
            continue
        if isinstance(module, (BaseTunerLayer, ModulesToSaveWrapper)):
            inside.append(name)
        if name:
            out.append((name, module))
    return out


class Plan:
    """What `trainable_token_indices` will do: [(module name, indices)] to wrap (or add the adapter to) and
    [(module name, name of the layer it is tied to)]."""

    def __init__(self) -> None:
        self.own: list[tuple[str, list[int]]] = []
        self.tied: list[tuple[str, str]] = []

    def __bool__(self) -> bool:
        return bool(self.own)


def plan(model: nn.Module, config: Any, module_keys: list[str], field: str = "trainable_token_indices") -> Plan:
    """Every check of `config.trainable_token_indices` against `model`, before any change (`module_keys`: the modules
    `target_modules` is about to adapt; `field`: the config field the errors name)."""
    result = Plan()
    value = config.trainable_token_indices
    if value is None:
        return result
    embed_name, embed = model_embedding(model, "get_input_embeddings")
    if isinstance(embed, TrainableTokensLayer):
        embed = embed.get_base_layer()
    targets = dict(value) if isinstance(value, dict) else {embed_name or "embed_tokens": list(value)}
    saved = getattr(config, "modules_to_save", None) or []
    for name in targets:
        if name in saved:
            raise ValueError(
                "The embedding layer is already marked to be trained fully, either specify "
                f"`modules_to_save=[..., \"{name}\", ...]` or `trainable_tokens={{'{name}': x}}` but not both."
            )
    visible = list(_visible_modules(model))
    _, output = model_embedding(model, "get_output_embeddings")
    shared = getattr(embed, "weight", None) if embed is not None else None
    # modules holding the input embedding's very weight (a tied LM head), and the other paths to the embedding
    # module itself (T5 after `resize_token_embeddings`: encoder.embed_tokens is model.shared), as HF PEFT
    tied_names = [
        n
        for n, m in _all_paths(model)
        if shared is not None
        and n != embed_name
        and (m is embed or _base(m) is embed or getattr(_base(m), "weight", None) is shared)
    ]
    chosen: dict[str, list[int]] = {}
    for name, indices in targets.items():
        matches = [(n, m) for n, m in visible if n and name_matches(n, [name])]
        if not matches:
            raise ValueError(
                f"{field} names {name!r}, which matches no module of the model; name the embedding "
                "layer (e.g. 'embed_tokens')"
            )
        for key, module in matches:
            base = _base(module)
            if key in module_keys or (
                isinstance(module, BaseTunerLayer) and not isinstance(module, TrainableTokensLayer)
            ):
                raise TypeError(
                    f"{field} cannot be applied to modules of type {type(module).__name__} ({key} is "
                    "also adapted through target_modules); leave it out of target_modules"
                )
            is_output = output is not None and (module is output or base is output)
            if not isinstance(base, nn.Embedding) and not (
                isinstance(base, nn.Linear) and (is_output or key in tied_names)
            ):
                raise TypeError(
                    f"{field}[{name!r}] names {key}, a {type(base).__name__}: only an nn.Embedding (or "
                    "the model's output nn.Linear, whose rows are tokens too) has rows per token"
                )
            rows = base.weight.shape[0]
            outside = [i for i in indices if i >= rows]
            if outside:
                raise IndexError(
                    f"{field}: {outside[:8]} are out of range for {key}, which has {rows} rows "
                    "(resize the embeddings to the tokenizer first: model.resize_token_embeddings(len(tokenizer)))"
                )
            if isinstance(module, TrainableTokensLayer) and module.tied_adapter is not None:
                raise ValueError(
                    f"{key} follows the rows of the input embedding (tied weights); an adapter cannot give it rows of "
                    "its own"
                )
            chosen[key] = list(indices)
    # HF PEFT's rule for tied weights: the embedding and its tied modules named with equal indices train one set of rows
    if tied_names and embed_name in chosen:
        named_tied = [n for n in tied_names if n in chosen]
        if all(chosen[n] == chosen[embed_name] for n in named_tied):
            for n in named_tied:
                del chosen[n]
            for n in tied_names:
                module = model.get_submodule(n)
                if n in module_keys or (
                    isinstance(module, BaseTunerLayer) and not isinstance(module, TrainableTokensLayer)
                ):
                    raise TypeError(
                        f"{field} cannot be applied to modules of type {type(module).__name__}: {n} "
                        f"shares the input embedding's weight (tied) and is also adapted through target_modules"
                    )
                if isinstance(module, TrainableTokensLayer) and module.tied_adapter is None:
                    raise ValueError(
                        f"{n} shares the input embedding's weight but an earlier adapter gave it rows of its own; "
                        "name it with the embedding's indices in a dict or with its own ones, as that adapter did"
                    )
                result.tied.append((n, embed_name))
    result.own = list(chosen.items())
    return result


def _base(module: nn.Module) -> nn.Module:
    return module.get_base_layer() if isinstance(module, BaseTunerLayer) else module


def inject(
    model: nn.Module,
    config: Any,
    adapter_name: str,
    planned: Plan,
    originals: list[tuple[nn.Module, str, nn.Module]],
) -> None:
    """Carry out `planned`: `originals` gets (parent, name, what was there) before each change (the tuner's undo)."""
    init_weights = config.init_lora_weights is not False
    for key, indices in planned.own:
        parent, target, child = get_submodule_parent(model, key)
        originals.append((parent, child, target))
        if isinstance(target, TrainableTokensLayer):
            target.update_layer(adapter_name, indices, init_weights)
            continue
        layer = TrainableTokensLayer(target)
        layer._active_adapters = [adapter_name]
        setattr(parent, child, layer)
        layer.update_layer(adapter_name, indices, init_weights)
    for key, source_name in planned.tied:
        parent, target, child = get_submodule_parent(model, key)
        if isinstance(target, TrainableTokensLayer):
            continue
        source = cast(TrainableTokensLayer, model.get_submodule(source_name))
        originals.append((parent, child, target))
        tied = TrainableTokensLayer(target, tied_to=source)
        tied._active_adapters = list(source.active_adapters)
        setattr(parent, child, tied)


def saved_tensors(
    state_dict: dict[str, torch.Tensor], adapter_name: str, saved_name: str = SAVED_NAME
) -> dict[str, torch.Tensor]:
    """The trained rows of `adapter_name` under HF PEFT's keys (LoRA's `<module>.token_adapter.trainable_tokens_delta`;
    the TrainableTokens tuner's `<module>.trainable_tokens_delta`)."""
    suffix = f".trainable_tokens_delta.{adapter_name}"
    return {k[: -len(suffix)] + "." + saved_name: v for k, v in state_dict.items() if k.endswith(suffix)}


def model_key(key: str, adapter_name: str, saved_name: str = SAVED_NAME) -> Optional[str]:
    """The model's key for a saved `...token_adapter.trainable_tokens_delta` key (None for other keys)."""
    if not key.endswith("." + saved_name):
        return None
    return key[: -len(saved_name)] + f"trainable_tokens_delta.{adapter_name}"


def tied_layers(model: nn.Module) -> list[tuple[str, str]]:
    """[(name of a tied layer, name of the layer it follows)] in `model`."""
    names = {id(m): n for n, m in model.named_modules()}
    return [
        (n, names[id(m.tied_adapter)])
        for n, m in model.named_modules()
        if isinstance(m, TrainableTokensLayer) and m.tied_adapter is not None and id(m.tied_adapter) in names
    ]


def tied_file_keys(model: nn.Module, adapter_name: Optional[str], saved_name: str) -> dict[str, str]:
    """{saved key: model key} (relative to the tuner) of the rows HF PEFT saves a second time under a tied layer's
    name (`lm_head.<saved_name>`): they are the rows of the layer it follows. On loading, both keys must hold the
    same values (`check_tied_values`)."""
    if adapter_name is None:
        return {}
    return {
        f"model.{tied}.{saved_name}": f"model.{source}.trainable_tokens_delta.{adapter_name}"
        for tied, source in tied_layers(model)
        if adapter_name in cast(TrainableTokensLayer, model.get_submodule(source)).trainable_tokens_delta
    }


def embedding_file_keys(model: nn.Module, keys: dict[str, str], adapter_name: Optional[str]) -> dict[str, str]:
    """LoRA's `save_embedding_layers` keys (`keys`: {saved key: model key}) as HF PEFT writes them where trainable
    tokens wrap an embedding: HF PEFT saves everything under its wrapper, so the base weight is
    `<module>.token_adapter.base_layer.weight` and a tied layer's rows come a second time,
    `<module>.token_adapter.trainable_tokens_delta`."""
    wrapped = [n for n, m in model.named_modules() if isinstance(m, TrainableTokensLayer)]
    out: dict[str, str] = {}
    saved_under: set[str] = set()
    for key, model_key_ in keys.items():
        name = next((n for n in wrapped if key.startswith(f"model.{n}.base_layer.")), None)
        if name is None:
            out[key] = model_key_
            continue
        saved_under.add(name)
        out[f"model.{name}.token_adapter.{key[len(name) + 7 :]}"] = model_key_
    tied = tied_file_keys(model, adapter_name, SAVED_NAME)
    out.update({k: v for k, v in tied.items() if k[len("model.") : -len("." + SAVED_NAME)] in saved_under})
    return out


def check_set_adapter(model: nn.Module, names: list[str]) -> None:
    """Two adapters with rows in one layer cannot be active together (HF PEFT's refusal), checked before any change."""
    for key, module in model.named_modules():
        if isinstance(module, TrainableTokensLayer) and module.tied_adapter is None:
            here = [n for n in names if n in module.trainable_tokens_delta]
            if len(here) > 1:
                raise ValueError(
                    f"Only one adapter can be set at a time for {key} (trainable tokens), got {len(here)}: {here}"
                )
