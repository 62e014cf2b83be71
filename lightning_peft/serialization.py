"""Adapter weights in HF PEFT's saved format: key mapping, shape checks, safetensors files."""

from __future__ import annotations

import os
import tempfile
from typing import Any, Optional

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ._files import default_mode
from .config import CONFIG_NAME, WEIGHTS_NAME

PICKLE_WEIGHTS_NAME = "adapter_model.bin"


EMBEDDING_LAYER_NAMES = ("embed_tokens", "lm_head")


def get_peft_model_state_dict(model: Any, state_dict: Optional[dict] = None, adapter_name: str = "default",
                              save_embedding_layers: bool | str = False) -> dict[str, torch.Tensor]:
    """The adapter's tensors keyed as HF PEFT saves them (adapter name stripped).

    `save_embedding_layers` ("auto": when `embed_tokens` / `lm_head` are targets, as HF PEFT does)
    adds the full base weights of the targeted input / output embeddings.
    """
    config = model.peft_config[adapter_name]
    if config.is_prompt_learning:
        out = {"prompt_embeddings": model.get_prompt_embedding_to_save(adapter_name)}
        out.update(model.prompt_modules_to_save_state_dict(adapter_name))  # e.g. the classifier head
        return out
    if state_dict is None:
        state_dict = model.state_dict()
    inner = {k[len("base_model."):]: v for k, v in state_dict.items() if k.startswith("base_model.")}
    out = {"base_model." + k: v for k, v in model.base_model.adapter_state_dict(inner, adapter_name).items()}
    if save_embedding_layers == "auto":
        targets = config.target_modules
        save_embedding_layers = not isinstance(targets, str) and any(n in targets for n in EMBEDDING_LAYER_NAMES)
    if save_embedding_layers:
        out.update({k: v for k, v in state_dict.items() if k in _embedding_base_keys(model)})
    return out


def _embedding_base_keys(model: Any) -> set[str]:
    """Keys of the base weights of the targeted input / output embeddings."""
    base = model.get_base_model()
    layers = [getattr(base, f)() for f in ("get_input_embeddings", "get_output_embeddings") if hasattr(base, f)]
    return {f"base_model.model.{name}.base_layer.weight" for name, module in base.named_modules()
            if any(module is layer for layer in layers if layer is not None) and hasattr(module, "base_layer")}


def _model_keys_for(model: Any, peft_state_dict: dict[str, torch.Tensor], adapter_name: str) -> dict[str, str]:
    tuner = model.base_model
    mapping = {}
    for key in peft_state_dict:
        inner = key[len("base_model."):] if key.startswith("base_model.") else key
        mapping[key] = "base_model." + tuner.adapter_key_to_model_key(inner, adapter_name)
    return mapping


def _describe_mismatches(items: list[str], what: str, limit: int = 5) -> str:
    more = f" (+{len(items) - limit} more)" if len(items) > limit else ""
    return f"{what}: {', '.join(items[:limit])}{more}"


def set_peft_model_state_dict(model: Any, peft_state_dict: dict[str, torch.Tensor],
                              adapter_name: str = "default") -> None:
    """Load adapter weights saved in HF PEFT's format into `adapter_name`.

    Every key, and every shape, is checked before anything is written, so a wrong file leaves
    the model untouched.
    """
    config = model.peft_config[adapter_name]
    if config.is_prompt_learning:
        model.load_prompt_embeddings(peft_state_dict, adapter_name)
        return
    expected = get_peft_model_state_dict(model, adapter_name=adapter_name)
    missing = sorted(set(expected) - set(peft_state_dict))
    embedding_keys = _embedding_base_keys(model)  # HF PEFT may save them; optional when loading
    unexpected = sorted(set(peft_state_dict) - set(expected) - embedding_keys)
    expected.update({k: v for k, v in model.state_dict().items() if k in embedding_keys})
    shapes = [f"{k}: file {tuple(peft_state_dict[k].shape)} vs model {tuple(expected[k].shape)}"
              for k in expected if k in peft_state_dict and peft_state_dict[k].shape != expected[k].shape]
    problems = []
    if shapes:
        problems.append(_describe_mismatches(shapes, "shape mismatches"))
    if missing:
        problems.append(_describe_mismatches(missing, "missing keys"))
    if unexpected:
        problems.append(_describe_mismatches(unexpected, "unexpected keys"))
    if problems:
        raise ValueError(
            f"the adapter weights do not fit adapter {adapter_name!r} of this model ({'; '.join(problems)}). "
            "Load the adapter into the base model (and config) it was trained for."
        )
    model_keys = _model_keys_for(model, peft_state_dict, adapter_name)
    params = dict(model.named_parameters())
    params.update(dict(model.named_buffers()))
    with torch.no_grad():
        for key, value in peft_state_dict.items():
            target = params[model_keys[key]]
            target.copy_(value.to(device=target.device, dtype=target.dtype))


def load_peft_weights(model_id: str | os.PathLike, device: str = "cpu",
                      allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    """Read `adapter_model.safetensors`; a pickled `.bin` only with `allow_pickle=True` (weights only)."""
    path = os.path.join(model_id, WEIGHTS_NAME)
    if os.path.isfile(path):
        try:
            return load_file(path, device=device)
        except (SafetensorError, OSError, ValueError) as err:
            raise ValueError(f"{path} is not a readable safetensors file ({err}); it may be truncated or "
                             "corrupt: export the adapter again") from err
    bin_path = os.path.join(model_id, PICKLE_WEIGHTS_NAME)
    if os.path.isfile(bin_path):
        if not allow_pickle:
            raise ValueError(f"{model_id} holds only a pickled {PICKLE_WEIGHTS_NAME}; pickles can run code, so it is "
                             "refused. Convert it to safetensors, or pass allow_pickle=True if you trust the file.")
        return torch.load(bin_path, map_location=device, weights_only=True)
    if not os.path.isdir(model_id):
        raise FileNotFoundError(f"adapter folder {model_id!s} does not exist")
    raise FileNotFoundError(f"{model_id} has no {WEIGHTS_NAME}; an adapter folder holds {CONFIG_NAME} and {WEIGHTS_NAME}")


def _unshared(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses tensors sharing memory (e.g. a bias saved under two names): copy repeats."""
    seen, out = set(), {}
    for key, value in tensors.items():
        value = value.detach().contiguous().cpu()
        ptr = (value.untyped_storage().data_ptr(), value.storage_offset())
        out[key] = value.clone() if ptr in seen else value
        seen.add(ptr)
    return out


def atomic_save_file(tensors: dict[str, torch.Tensor], path: str, metadata: Optional[dict] = None) -> None:
    """Write to a temporary file in the same folder and rename it, so a crash never leaves half a file."""
    folder = os.path.dirname(path) or "."
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".safetensors", dir=folder)
    os.close(fd)
    try:
        save_file(_unshared(tensors), tmp, metadata=metadata)
        os.chmod(tmp, default_mode())  # mkstemp makes it private; exports are read by other processes
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
