"""Turning a prefix encoder's output into the installed transformers' cache objects, and handing that cache to
models whose top-level forward takes none (encoder-only classifiers such as BertForSequenceClassification)."""

from __future__ import annotations

import inspect
from contextlib import contextmanager
from typing import Any, Iterator

import torch
from torch import nn

CACHE_ARG_NAMES = ("cache", "past_key_values")  # the newer name first


def cache_arg_name(module: nn.Module) -> str | None:
    """Which keyword `module.forward` takes for a key/value cache, if any."""
    try:
        params = inspect.signature(module.forward).parameters
    except (TypeError, ValueError):
        return None
    return next((name for name in CACHE_ARG_NAMES if name in params), None)


def prefix_key_values(config: Any, flat: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(batch, num_virtual_tokens, num_layers*2*token_dim) -> per layer (key, value), each
    (batch, heads, num_virtual_tokens, head_dim), in HF PEFT's order.

    For encoder-decoder models HF PEFT repeats the flat prefix and takes four tensors per layer (the first two
    are the decoder self-attention's key and value); that layout is kept so its adapters give the same numbers.
    """
    batch, tokens = flat.shape[:2]
    heads = config.num_attention_heads
    per_layer = flat.view(batch, tokens, config.num_layers * 2, heads, config.token_dim // heads)
    if config.num_transformer_submodules == 2:
        per_layer = torch.cat([per_layer, per_layer], dim=2)
    chunks = per_layer.permute(2, 0, 3, 1, 4).split(2 * config.num_transformer_submodules)
    return [(chunk[0], chunk[1]) for chunk in chunks]


def build_prefix_cache(config: Any, flat: torch.Tensor, encoder_decoder: bool) -> Any:
    from transformers import DynamicCache, EncoderDecoderCache

    self_attention = DynamicCache(prefix_key_values(config, flat))
    if not encoder_decoder:
        return self_attention
    # the encoder output changes nothing here, but cross-attention must be computed afresh: empty cache
    return EncoderDecoderCache(self_attention, DynamicCache())


def cache_route(model: nn.Module) -> tuple[str, str] | None:
    """Where a key/value cache can be handed to `model`: ("", keyword) when its own forward takes one, else
    (child name, keyword) for the first direct sub-model whose forward does (e.g. BertModel inside
    BertForSequenceClassification), else None. It reads forward signatures: compute it once per model."""
    name = cache_arg_name(model)
    if name is not None:
        return "", name
    for child_name, child in model.named_children():
        name = cache_arg_name(child)
        if name is not None:
            return child_name, name
    return None


@contextmanager
def prefix_cache_passed(model: nn.Module, cache: Any, route: tuple[str, str] | None) -> Iterator[dict]:
    """Yield the extra forward kwargs that hand `cache` to `model`, by `route` (`cache_route(model)`).

    A task model whose forward takes no cache (e.g. BertForSequenceClassification in transformers 5) still wraps a
    backbone that does (BertModel): a forward pre-hook on that backbone adds the cache for this call only. The
    backbone then prepends the prefix keys/values in every self-attention layer, and its key-side mask covers the
    prefix because the caller extended the 2D attention mask.
    """
    if route is None:
        raise ValueError(
            f"prefix tuning needs attention layers that accept prefix keys/values, but neither {type(model).__name__} "
            "nor any of its direct sub-models takes a key/value cache (`cache` / `past_key_values`); use prompt "
            "tuning or P-tuning for this model"
        )
    child_name, name = route
    if not child_name:
        yield {name: cache}
        return
    backbone = getattr(model, child_name)

    def add_cache(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        return args, {**kwargs, name: cache}

    handle = backbone.register_forward_pre_hook(add_cache, with_kwargs=True)
    try:
        yield {}
    finally:
        handle.remove()
