"""Adapter weights in HF PEFT's saved format: key mapping, shape checks, safetensors files."""

from __future__ import annotations

import os
import sys
import warnings
from typing import Any, Optional

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ._compat import incompatible_keys, tensor_version
from ._compat import unwrap_compiled as strip_compile_wrapper
from ._files import atomic_write
from .config import (
    CONFIG_NAME,
    PICKLE_WEIGHTS_NAME,  # noqa: F401  (re-exported: it was defined here)
    SAFETENSORS_WEIGHTS_NAME,
    SAVED_PREFIX,
    check_loaded_weights_fit_folder_config,
    check_regular_file,
    listed,
)

# where an injected model (`inject_adapter_in_model`: no PeftModel) keeps the tuner that manages its layers
INJECTED_TUNER_ATTRIBUTE = "_lightning_peft_tuner"
PEFT_MODEL_PREFIX = SAVED_PREFIX + "model."  # what a PeftModel's keys have before a wrapped model's own


def peft_model_tuner(model: Any) -> Any:
    """The tuner of a `PeftModel` (which keeps it in its `__dict__`, not as a child module); None for anything else.
    For modules that cannot import `peft_model` (it imports them)."""
    return model.__dict__.get("tuner") if isinstance(model, torch.nn.Module) else None


def tuner_of(model: Any) -> tuple[Any, str]:
    """The tuner holding `model`'s adapters and the prefix that `model`'s own state-dict keys lack compared with a
    `PeftModel`'s: "" for a PeftModel, "base_model." for a tuner (`LoraModel`, ...), "base_model.model." for a model
    that `inject_adapter_in_model` gave adapters to."""
    tuner = peft_model_tuner(model)
    if tuner is not None:
        return tuner, ""
    if callable(getattr(model, "peft_state_dict", None)) and hasattr(model, "peft_config"):
        return model, SAVED_PREFIX
    tuner = getattr(model, "__dict__", {}).get(INJECTED_TUNER_ATTRIBUTE)
    if tuner is not None:
        return tuner, PEFT_MODEL_PREFIX
    raise TypeError(
        f"{type(model).__name__} holds no lightning_peft adapter: pass a PeftModel (get_peft_model / "
        "PeftModel.from_pretrained), a tuner model, or a model given adapters by inject_adapter_in_model"
    )


def get_peft_model_state_dict(
    model: Any,
    state_dict: Optional[dict] = None,
    adapter_name: str = "default",
    unwrap_compiled: bool = False,
    save_embedding_layers: bool | str = "auto",
) -> dict[str, torch.Tensor]:
    """The adapter's tensors keyed as HF PEFT saves them (adapter name stripped), for a `PeftModel` (keys
    `base_model.model....`), a tuner model (`model....`) or a model given adapters by `inject_adapter_in_model` (the
    model's own names), as HF PEFT keys them. `state_dict`: `model.state_dict()` (or one keyed alike) to read the
    tensors from; `unwrap_compiled`: `model` is `torch.compile`'s wrapper; `save_embedding_layers` (True; "auto":
    when `embed_tokens` / `lm_head` are targets) adds the base model's embedding weights as HF PEFT saves them."""
    if unwrap_compiled:
        model = strip_compile_wrapper(model)
    tuner, prefix = tuner_of(model)
    _check_adapter_named(tuner, adapter_name)
    if state_dict is not None and prefix:
        state_dict = {prefix + k: v for k, v in state_dict.items()}
    tensors = tuner.peft_state_dict(adapter_name, state_dict, save_embedding_layers)
    return {k[len(prefix) :]: v for k, v in tensors.items()} if prefix else tensors


def _check_adapter_named(tuner: Any, adapter_name: str) -> None:
    """An adapter name the model does not have: `UnknownNameError`, a ValueError and (as in HF PEFT) a KeyError."""
    if adapter_name not in tuner.peft_config:
        from .utils.error import UnknownNameError  # (utils imports this module)

        raise UnknownNameError(
            f"no adapter named {adapter_name!r}; this model has: {', '.join(tuner.peft_config) or 'none'}"
        )


def set_peft_model_state_dict(
    model: Any,
    peft_model_state_dict: dict[str, torch.Tensor],
    adapter_name: str = "default",
    ignore_mismatched_sizes: bool = False,
    low_cpu_mem_usage: bool = False,
    *,
    allow_nonfinite: bool = False,
) -> Any:
    """Load adapter weights saved in HF PEFT's format (keyed as `get_peft_model_state_dict` gives them for `model`)
    into `adapter_name`. Every key, shape and dtype is checked before anything is written, so a wrong file leaves
    the model untouched; NaN / inf values are refused unless `allow_nonfinite=True`. `ignore_mismatched_sizes=True`
    leaves the tensors whose shape differs from the model's out (with a warning, as HF PEFT does) and loads the rest.
    `low_cpu_mem_usage` is accepted for HF PEFT's signature (the adapter's tensors exist already: they are
    overwritten in place).

    Returns the model's state-dict keys that were not written (`missing_keys`: the base model's and other adapters'
    among them, as HF PEFT / torch count them) and `unexpected_keys` (empty)."""
    tuner, prefix = tuner_of(model)
    _check_adapter_named(tuner, adapter_name)
    if not isinstance(peft_model_state_dict, dict):
        raise TypeError(f"peft_model_state_dict must be a dict of tensors, got {type(peft_model_state_dict).__name__}")
    tensors = {prefix + k: v for k, v in peft_model_state_dict.items()} if prefix else dict(peft_model_state_dict)
    # with the base embedding tensors a file may carry (save_embedding_layers), checked and loaded alike
    own = {**tuner.peft_state_dict(adapter_name), **getattr(tuner, "embedding_tensors", lambda _: {})(adapter_name)}
    if ignore_mismatched_sizes:
        mismatched_keys = [k for k, v in tensors.items() if k in own and tuple(v.shape) != tuple(own[k].shape)]
        if mismatched_keys:
            mismatched = [
                f"- {k[len(prefix) :]}: found shape {tuple(tensors[k].shape)} in the checkpoint and "
                f"{tuple(own[k].shape)} in the model instantiated"
                for k in mismatched_keys
            ]
            for key in mismatched_keys:
                tensors[key] = own[key].detach().clone()  # left as it is in the model
            warnings.warn(
                f"Some weights of {type(model).__name__} were not initialized from the model checkpoint and are being "
                f"ignored because you passed `ignore_mismatched_sizes=True`: {chr(10).join(mismatched)}.",
                stacklevel=2,
            )
    expected = {k: v.dtype for k, v in own.items()}
    check_adapter_tensors(tensors, expected, allow_nonfinite=allow_nonfinite)
    # the keys written are those whose tensor changed version (every write is in place) or was replaced
    before = {k: (v, tensor_version(v)) for k, v in model.state_dict(keep_vars=True).items()}
    tuner.load_peft_state_dict(tensors, adapter_name)
    after = model.state_dict(keep_vars=True)
    missing = [k for k, (v, version) in before.items() if after.get(k) is v and tensor_version(v) == version]
    # torch's `_IncompatibleKeys`, as torch's `load_state_dict` (and so HF PEFT) returns: the model's keys the call did
    # not write, and the given keys it did not use (always empty: any such key is refused)
    return incompatible_keys(missing_keys=missing, unexpected_keys=[])


def _finite_as(value: torch.Tensor, dtype: Optional[torch.dtype]) -> bool:
    """Whether `value` holds no NaN / inf once cast to `dtype` (the model's), where it is loaded: a float64 1e300
    or a float32 1e5 bound for float16 becomes inf in the cast."""
    if not (value.is_floating_point() or value.is_complex()):
        return True
    if dtype is not None and dtype.is_floating_point and value.dtype != dtype and value.is_floating_point():
        # cast to be exact: a value just above the target's max may round down to it or up to inf
        return bool(torch.isfinite(value).all()) and bool(torch.isfinite(value.to(dtype)).all())
    return bool(torch.isfinite(value).all())


def nonfinite_keys(
    tensors: dict[str, torch.Tensor], target_dtypes: Optional[dict[str, torch.dtype]] = None
) -> list[str]:
    """Keys of the floating-point tensors holding a NaN or an inf (as they are, or once cast to their key's dtype
    in `target_dtypes`), sorted."""
    targets = target_dtypes or {}
    return sorted(k for k, v in tensors.items() if not _finite_as(v, targets.get(k)))


def check_adapter_tensors(
    tensors: dict[str, torch.Tensor],
    expected_dtypes: Optional[dict[str, torch.dtype]] = None,
    allow_nonfinite: bool = False,
    what: str = "the adapter weights",
    opt_in: str = "pass allow_nonfinite=True to load it anyway",
) -> None:
    """Refuse integer / bool tensors where the model holds float weights (they would be cast silently), and NaN /
    inf values unless `allow_nonfinite=True`; errors name the tensors."""
    wrong = sorted(
        f"{k} ({v.dtype})"
        for k, v in tensors.items()
        if expected_dtypes is not None
        and k in expected_dtypes
        and expected_dtypes[k].is_floating_point
        and not v.is_floating_point()
    )
    if wrong:
        raise ValueError(
            f"{what} hold integer or bool tensors where the model has float weights: {listed(wrong)}; they are "
            "not cast. They were not made by get_peft_model_state_dict / save_pretrained; export the adapter again "
            "with one of them"
        )
    if not allow_nonfinite:
        bad = nonfinite_keys(tensors, expected_dtypes)
        if bad:
            raise ValueError(
                f"{what} hold NaN or inf values in {len(bad)} tensors: {listed(bad)}. The adapter is broken "
                f"(retrain it or load an earlier export; values are checked as saved and once cast to the model's "
                f"dtype); {opt_in}"
            )


def load_peft_weights(
    model_id: str | os.PathLike, device: str = "cpu", allow_pickle: bool = False
) -> dict[str, torch.Tensor]:
    """Read `adapter_model.safetensors`; a pickled `.bin` only with `allow_pickle=True` (weights only)."""
    path = os.path.join(model_id, SAFETENSORS_WEIGHTS_NAME)
    bin_path = os.path.join(model_id, PICKLE_WEIGHTS_NAME)
    check_regular_file(path)
    check_regular_file(bin_path)
    if os.path.isfile(path):
        try:
            return load_file(path, device=device)
        except (SafetensorError, OSError, ValueError) as err:
            raise ValueError(
                f"{path} is not a readable safetensors file ({err}); it may be truncated or "
                "corrupt: export the adapter again"
            ) from err
    if os.path.isfile(bin_path):
        if not allow_pickle:
            raise ValueError(
                f"{model_id} holds only a pickled {PICKLE_WEIGHTS_NAME}; pickles can run code, so it is "
                "refused. Convert it to safetensors, or pass allow_pickle=True if you trust the file."
            )
        tensors = torch.load(bin_path, map_location=device, weights_only=True)
        if not isinstance(tensors, dict) or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in tensors.items()
        ):
            raise ValueError(f"{bin_path} does not hold a dict of named tensors; export the adapter again")
        # read before the adapter is built, so its config's sizes are checked against these as against a header
        check_loaded_weights_fit_folder_config(model_id, {k: tuple(v.shape) for k, v in tensors.items()}, bin_path)
        return tensors
    from .utils.error import AdapterNotFoundError  # (utils imports this module)

    if not os.path.isdir(model_id):
        raise AdapterNotFoundError(f"adapter folder {model_id!s} does not exist")
    raise AdapterNotFoundError(
        f"{model_id} has no {SAFETENSORS_WEIGHTS_NAME}; an adapter folder holds {CONFIG_NAME} and "
        f"{SAFETENSORS_WEIGHTS_NAME}"
    )


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
    """A safetensors file written by `atomic_write`, so a crash never leaves half a file."""
    atomic_write(path, lambda tmp: save_file(_unshared(tensors), tmp, metadata=metadata), suffix=".safetensors")


def atomic_torch_save(tensors: dict[str, torch.Tensor], path: str) -> None:
    """`save_pretrained(safe_serialization=False)`: `torch.save` of plain CPU tensors (a pickle HF PEFT reads;
    lightning_peft reads it with `allow_pickle=True`), written aside and renamed into place."""
    plain = {k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}
    atomic_write(path, lambda tmp: torch.save(plain, tmp), suffix=".bin")


def is_transformers_model(model: Any) -> bool:
    """Whether `model` is a transformers `PreTrainedModel` (never when transformers was not imported: the check
    does not import it, which takes seconds)."""
    transformers = sys.modules.get("transformers")
    return transformers is not None and isinstance(model, transformers.PreTrainedModel)
