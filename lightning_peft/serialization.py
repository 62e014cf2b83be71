"""Adapter weights in HF PEFT's saved format: key mapping, shape checks, safetensors files."""

from __future__ import annotations

import json
import os
import re
import stat
import sys
import tempfile
import warnings
from typing import Any, NamedTuple, Optional

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ._files import atomic_write_text, default_mode, user_path
from .config import (
    CONFIG_NAME,
    PICKLE_WEIGHTS_NAME,  # noqa: F401  (re-exported: it was defined here)
    SAVED_PREFIX,
    WEIGHTS_NAME,
    check_loaded_weights_fit_folder_config,
    check_regular_file,
    listed,
)

# where an injected model (`inject_adapter_in_model`: no PeftModel) keeps the tuner that manages its layers
INJECTED_TUNER_ATTRIBUTE = "_lightning_peft_tuner"
PEFT_MODEL_PREFIX = SAVED_PREFIX + "model."  # what a PeftModel's keys have before a wrapped model's own


def tuner_of(model: Any) -> tuple[Any, str]:
    """The tuner holding `model`'s adapters and the prefix that `model`'s own state-dict keys lack compared with a
    `PeftModel`'s: "" for a PeftModel, "base_model." for a tuner (`LoraModel`, ...), "base_model.model." for a model
    that `inject_adapter_in_model` gave adapters to."""
    tuner = model.__dict__.get("tuner") if isinstance(model, torch.nn.Module) else None
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
        model = getattr(model, "_orig_mod", model)
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


class LoadResult(NamedTuple):
    """What `set_peft_model_state_dict` returns, as torch's `load_state_dict` (and HF PEFT's) does: the model's keys
    the call did not write, and the given keys it did not use (always empty: any such key is refused)."""

    missing_keys: list[str]
    unexpected_keys: list[str]


def set_peft_model_state_dict(
    model: Any,
    peft_model_state_dict: dict[str, torch.Tensor],
    adapter_name: str = "default",
    ignore_mismatched_sizes: bool = False,
    low_cpu_mem_usage: bool = False,
    *,
    allow_nonfinite: bool = False,
) -> LoadResult:
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
    own = {**tuner.peft_state_dict(adapter_name), **getattr(tuner, "embedding_tensors", dict)()}
    if ignore_mismatched_sizes:
        mismatched = [
            f"- {k[len(prefix) :]}: found shape {tuple(v.shape)} in the checkpoint and {tuple(own[k].shape)} in the "
            "model instantiated"
            for k, v in tensors.items()
            if k in own and tuple(v.shape) != tuple(own[k].shape)
        ]
        if mismatched:
            for key in [k for k, v in tensors.items() if k in own and tuple(v.shape) != tuple(own[k].shape)]:
                tensors[key] = own[key].detach().clone()  # left as it is in the model
            warnings.warn(
                f"Some weights of {type(model).__name__} were not initialized from the model checkpoint and are being "
                f"ignored because you passed `ignore_mismatched_sizes=True`: {chr(10).join(mismatched)}.",
                stacklevel=2,
            )
    expected = {k: v.dtype for k, v in own.items()}
    check_adapter_tensors(tensors, expected, allow_nonfinite=allow_nonfinite)
    # the keys written are those whose tensor changed version (every write is in place) or was replaced
    before = {k: (v, v._version) for k, v in model.state_dict(keep_vars=True).items()}
    tuner.load_peft_state_dict(tensors, adapter_name)
    after = model.state_dict(keep_vars=True)
    missing = [k for k, (v, version) in before.items() if after.get(k) is v and v._version == version]
    return LoadResult(missing_keys=missing, unexpected_keys=[])


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
    from .utils.error import AdapterNotFoundError  # (utils imports this module)

    if not os.path.isdir(model_id):
        raise AdapterNotFoundError(f"adapter folder {model_id!s} does not exist")
    raise AdapterNotFoundError(
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


def atomic_torch_save(tensors: dict[str, torch.Tensor], path: str) -> None:
    """`save_pretrained(safe_serialization=False)`: `torch.save` of plain CPU tensors (a pickle HF PEFT reads;
    lightning_peft reads it with `allow_pickle=True`), written aside and renamed into place."""
    folder = os.path.dirname(path) or "."
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".bin", dir=folder)
    os.close(fd)
    try:
        torch.save({k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}, tmp)
        os.chmod(tmp, default_mode())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


MODEL_CARD_NAME = "README.md"


def write_model_card(peft_model: Any, folder: str) -> None:
    """Write `folder/README.md` as HF PEFT's `create_or_update_model_card` does: its YAML metadata says
    `library_name: peft`, the tags (`transformers`, `lora`, `base_model:adapter:<base>`), the base model and, for a
    causal LM, `pipeline_tag: text-generation`; the text lists the framework version. A README.md already there
    keeps its text and metadata (its tags too: a single string is one tag, other values are written as text, empty
    ones dropped), with these fields set and the version line added once. The card never fails a save: one that is
    not UTF-8 text or whose metadata cannot be read or written back is kept byte for byte, with one warning, and so
    is a README.md symlink to nothing (the link is kept). A symlink to a file is replaced by the updated card (the
    file it pointed to, maybe outside the folder, is not written); a folder, FIFO, ... named README.md is refused,
    naming the user's folder (nothing is saved)."""
    path = os.path.join(folder, MODEL_CARD_NAME)
    shown = user_path(path)  # `folder` may be the temporary folder of the save: messages name the user's
    exists = _card_exists(path, shown)
    base = peft_model.get_base_model()
    name = getattr(getattr(base, "config", None), "_name_or_path", None) or None
    fields: dict[str, Any] = {"library_name": "peft"}
    tags = set(getattr(base, "model_tags", None) or [])
    if is_transformers_model(base):
        tags.add("transformers")
    if str(peft_model.peft_type) == "LORA":
        tags.add("lora")
    if name:
        tags.add(f"base_model:adapter:{name}")
        fields["base_model"] = name
    causal = str(peft_model.active_peft_config.task_type) == "CAUSAL_LM"
    version_line, heading = f"- lightning_peft {_package_version()}", "### Framework versions"
    text = (
        f"\n# {name or type(base).__name__} adapter\n\nA {peft_model.peft_type} adapter in HF PEFT's format. Load it "
        f"with `PeftModel.from_pretrained(base_model, <this folder>)` (lightning_peft or HF PEFT).\n\n{heading}\n\n"
        f"{version_line}\n"
    )
    meta = dict(fields, **({"tags": sorted(tags)} if tags else {}))
    if causal:
        meta["pipeline_tag"] = "text-generation"
    # JSON strings are YAML strings: the card written for a new folder needs no YAML library
    fresh = "---\n" + "".join(f"{k}: {json.dumps(v)}\n" for k, v in sorted(meta.items())) + "---\n" + text
    if exists is None:  # a symlink to nothing: kept as it is
        return
    if not exists:
        atomic_write_text(path, fresh)
        return
    with open(path, "rb") as fh:
        raw = fh.read()
    try:
        content = raw.decode("utf-8-sig")  # strict: a card that is not UTF-8 is not rewritten with U+FFFD
    except UnicodeDecodeError as err:
        warnings.warn(f"{shown} is not UTF-8 text ({err}); it is kept unchanged as the model card", stacklevel=3)
        return
    if content == fresh:  # this model's card, as a previous save wrote it
        return
    import yaml  # a dependency of transformers

    try:
        card = _updated_card(content, fields, tags, causal, version_line, heading, yaml)
    except (ValueError, TypeError, RecursionError, yaml.YAMLError) as err:  # what a card's content can cause
        warnings.warn(f"{shown} could not be read as a model card ({err}); it is kept unchanged", stacklevel=3)
        return
    atomic_write_text(path, card)


def _card_exists(path: str, shown: str) -> Optional[bool]:
    """Whether a README.md is there to update (True: a regular file, or a symlink to one), none is (False), or it is
    a symlink to nothing (None, with a warning: it is kept as it is). Anything else at `path` (a folder, a FIFO, ...)
    is refused, naming `shown` (the user's path)."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return False
    if stat.S_ISLNK(mode):
        try:
            mode = os.stat(path).st_mode
        except OSError as err:  # missing target, a loop, ...
            warnings.warn(
                f"{shown} is a symlink to {os.readlink(path)!r}, which cannot be opened ({err.strerror}); the model "
                "card is not written and the link is kept as it is",
                stacklevel=4,
            )
            return None
    if stat.S_ISREG(mode):
        return True
    kinds = [(stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISSOCK, "a socket")]
    what = next((kind for test, kind in kinds if test(mode)), "a device file")
    raise ValueError(
        f"{shown} is {what}, not a file: save_pretrained writes the adapter's model card there. Move or rename it, "
        "then save again (nothing was saved)"
    )


def _updated_card(
    content: str, fields: dict[str, Any], tags: set[str], causal: bool, version_line: str, heading: str, yaml: Any
) -> str:
    """The card `content` with the adapter's metadata `fields` and `tags` set and the version line added once."""
    meta, text = _split_card(content, yaml)
    meta.update(fields)
    tags = tags | set(_card_tags(meta.get("tags")))
    if tags:
        meta["tags"] = sorted(tags)
    if not meta.get("pipeline_tag") and causal:
        meta["pipeline_tag"] = "text-generation"
    lines = text.splitlines()
    if version_line not in lines:
        if heading in lines:
            lines.insert(lines.index(heading) + 2, version_line)
        else:
            lines += ["", heading, "", version_line]
    front = yaml.safe_dump(meta, sort_keys=True, allow_unicode=True)
    return f"---\n{front}---\n" + "\n".join(lines) + "\n"


def _card_tags(value: Any) -> list[str]:
    """A card's `tags` as tag names: a string is one tag, a list's items are written as text (None dropped); a
    mapping (or a list holding one, or a list) is not a tag: ValueError."""
    items = value if isinstance(value, (list, tuple)) else [value]
    tags = []
    for item in items:
        if item is None:
            continue
        if isinstance(item, (dict, list, tuple, set)):
            raise ValueError(f"its tags hold {type(item).__name__} {str(item)[:80]}, not a tag name")
        if str(item):
            tags.append(str(item))
    return tags


def _split_card(content: str, yaml: Any) -> tuple[dict[str, Any], str]:
    """(metadata, text) of a model card: the YAML block between `---` lines at its top, and the rest."""
    match = re.match(r"\A---\s*\n(.*?\n)?---\s*(?:\n|\Z)", content, re.S)
    if match is None:
        return {}, content
    meta = yaml.safe_load(match.group(1) or "") or {}
    if not isinstance(meta, dict):
        raise ValueError("its metadata block is not a YAML mapping")
    return meta, content[match.end() :]


def _package_version() -> str:
    # read from the loaded package, not imported (the package imports this module)
    return str(sys.modules[__name__.rpartition(".")[0]].__version__)


def is_transformers_model(model: Any) -> bool:
    """Whether `model` is a transformers `PreTrainedModel` (never when transformers was not imported: the check
    does not import it, which takes seconds)."""
    transformers = sys.modules.get("transformers")
    return transformers is not None and isinstance(model, transformers.PreTrainedModel)
