"""Adapter weights in HF PEFT's saved format: key mapping, shape checks, safetensors files."""

from __future__ import annotations

import os
import tempfile
from typing import Any, Optional

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ._files import default_mode
from .config import (
    CONFIG_NAME,
    PICKLE_WEIGHTS_NAME,  # noqa: F401  (re-exported: it was defined here)
    WEIGHTS_NAME,
    check_loaded_weights_fit_folder_config,
    check_regular_file,
    listed,
)


def get_peft_model_state_dict(
    model: Any,
    state_dict: Optional[dict] = None,
    adapter_name: str = "default",
    save_embedding_layers: bool | str = False,
) -> dict[str, torch.Tensor]:
    """The adapter's tensors keyed as HF PEFT saves them (adapter name stripped); see the tuner's
    `peft_state_dict` for `save_embedding_layers`."""
    return model.tuner.peft_state_dict(adapter_name, state_dict, save_embedding_layers)


def set_peft_model_state_dict(
    model: Any, peft_state_dict: dict[str, torch.Tensor], adapter_name: str = "default", allow_nonfinite: bool = False
) -> None:
    """Load adapter weights saved in HF PEFT's format into `adapter_name`. Every key, shape and dtype is checked
    before anything is written, so a wrong file leaves the model untouched; NaN / inf values are refused unless
    `allow_nonfinite=True`."""
    expected = {k: v.dtype for k, v in model.tuner.peft_state_dict(adapter_name).items()}
    check_adapter_tensors(peft_state_dict, expected, allow_nonfinite=allow_nonfinite)
    model.tuner.load_peft_state_dict(peft_state_dict, adapter_name)


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
            "not cast. The file was not written by save_pretrained; export the adapter again"
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
    path = os.path.join(model_id, WEIGHTS_NAME)
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
    if not os.path.isdir(model_id):
        raise FileNotFoundError(f"adapter folder {model_id!s} does not exist")
    raise FileNotFoundError(
        f"{model_id} has no {WEIGHTS_NAME}; an adapter folder holds {CONFIG_NAME} and {WEIGHTS_NAME}"
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
