"""HF PEFT's `AutoPeftModel*` classes: load the base model an adapter folder names, then the adapter on it.

`AutoPeftModelForCausalLM.from_pretrained("my-adapter")` reads `adapter_config.json`, loads the base named by its
`base_model_name_or_path` with the matching transformers Auto class (the extra keyword arguments go to that
`from_pretrained`), checks the adapter's task type as HF PEFT does (a ValueError for another task) and returns
`PeftModel.from_pretrained(base, "my-adapter", ...)`.

No code from files runs: a `trust_remote_code` that asks for it is refused, and transformers' Auto classes load the
base and the tokenizer with it off. An adapter without a task type names its base class in `auto_mapping`; as in HF PEFT
only modules of the libraries in `import_allowlist` are imported for it.
"""

from __future__ import annotations

import importlib
import inspect
import os
import re
from typing import Any, ClassVar, Optional

from torch import nn

from .config import PeftConfig, adapter_folder
from .peft_model import (
    MODEL_TYPE_TO_PEFT_MODEL,
    PeftModel,
    PeftModelForCausalLM,
    PeftModelForFeatureExtraction,
    PeftModelForQuestionAnswering,
    PeftModelForSeq2SeqLM,
    PeftModelForSequenceClassification,
    PeftModelForTokenClassification,
)
from .tuners.base import check_adapter_name

TOKENIZER_CONFIG_NAME = "tokenizer_config.json"

# HF PEFT's `peft.auto.MODEL_TYPE_TO_PEFT_MODEL_MAPPING` (also a top-level name): task type -> its PeftModel class
MODEL_TYPE_TO_PEFT_MODEL_MAPPING = MODEL_TYPE_TO_PEFT_MODEL

_SHARED_KWARGS = frozenset({"low_cpu_mem_usage"})  # HF PEFT hands these to both loads
# the keyword arguments of our PeftModel.from_pretrained that the Auto class does not pass itself (and `subfolder`,
# which it reads from **kwargs); every other one goes to the base model's from_pretrained
_PEFT_KWARGS = (
    frozenset(inspect.signature(PeftModel.from_pretrained).parameters)
    - {"model", "model_id", "adapter_name", "is_trainable", "config", "kwargs"}
    - _SHARED_KWARGS
) | {"subfolder"}
_MODULE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")


def get_default_import_allowlist() -> list[str]:
    """The libraries (and their submodules) whose classes an adapter's `auto_mapping` may name, as in HF PEFT."""
    return ["diffusers", "lerobot", "megatron-core", "transformers"]


def check_import_allowlist(allowlist: list[str], parent_name: str) -> bool:
    """Is `parent_name` one of the allowed libraries or a submodule of one?"""
    return parent_name in allowlist or any(parent_name.startswith(f"{allowed}.") for allowed in allowlist)


class _BaseAutoPeftModel:
    _target_class: ClassVar[Optional[str]] = None  # the transformers Auto class for the base (by name: loaded lazily)
    _target_peft_class: ClassVar[type[PeftModel]] = PeftModel

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        name = type(self).__name__
        raise OSError(  # transformers' Auto classes raise EnvironmentError (an OSError) here, and so does HF PEFT
            f"{name} is designed to be instantiated using the `{name}.from_pretrained(pretrained_model_name_or_path)` "
            "method."
        )

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        adapter_name: str = "default",
        is_trainable: bool = False,
        config: Optional[PeftConfig] = None,
        revision: Optional[str] = None,
        import_allowlist: Optional[list[str]] = None,
        **kwargs: Any,
    ) -> PeftModel:
        """Load the base model the adapter in `pretrained_model_name_or_path` was trained on, and the adapter on it.

        Arguments as `PeftModel.from_pretrained`'s; its own keyword arguments (`subfolder`, `allow_pickle`,
        `ignore_base_model_mismatch`, ...) go to it, every other one to the base model's `from_pretrained`
        (`torch_dtype`, `device_map`, ...). The base is loaded at the `revision` the adapter config records;
        `revision=` is the adapter's, which a local folder does not have. A `tokenizer_config.json` beside the
        adapter is read (offline) and the base's embeddings grown to the tokenizer's size where it is larger, as
        HF PEFT does. `import_allowlist`: the libraries an `auto_mapping` may import (see
        `get_default_import_allowlist`)."""
        if kwargs.get("trust_remote_code"):
            raise ValueError(
                "trust_remote_code is refused: lightning_peft runs no code from model or adapter files. Load a "
                "base whose architecture transformers has, or build the model in your code and use "
                "PeftModel.from_pretrained(model, adapter_dir)"
            )
        kwargs.pop("trust_remote_code", None)
        check_adapter_name(adapter_name)  # before the base is loaded: a bad name must not cost a model load
        if import_allowlist is None:
            import_allowlist = get_default_import_allowlist()
        elif isinstance(import_allowlist, str) or not all(isinstance(n, str) for n in import_allowlist):
            raise TypeError(f"import_allowlist must be a list of library names, got {import_allowlist!r}")
        peft_kwargs = {k: v for k, v in kwargs.items() if k in _PEFT_KWARGS | _SHARED_KWARGS}
        base_kwargs = {k: v for k, v in kwargs.items() if k not in _PEFT_KWARGS}

        folder = adapter_folder(pretrained_model_name_or_path, kwargs.get("subfolder"))
        peft_config = PeftConfig.from_pretrained(folder)
        target_class = cls._base_model_class(peft_config, import_allowlist)
        base_path = peft_config.base_model_name_or_path
        if not isinstance(base_path, str) or not base_path:
            raise ValueError(
                f"the adapter config in {folder!s} names no base_model_name_or_path; load the base model yourself "
                "and use PeftModel.from_pretrained(model, adapter_dir)"
            )
        if target_class.__module__.startswith("transformers.") and target_class.__name__.startswith("Auto"):
            base_kwargs["trust_remote_code"] = False  # an Auto class would otherwise ask (or fail) on a code folder
        base_model = target_class.from_pretrained(base_path, revision=peft_config.revision, **base_kwargs)
        _grow_embeddings_to_tokenizer(base_model, pretrained_model_name_or_path)
        return cls._target_peft_class.from_pretrained(
            base_model,
            pretrained_model_name_or_path,
            adapter_name=adapter_name,
            is_trainable=is_trainable,
            config=config,
            **peft_kwargs,
        )

    @classmethod
    def _base_model_class(cls, peft_config: PeftConfig, import_allowlist: list[str]) -> Any:
        """The class whose `from_pretrained` loads the base, checked against the adapter's task type as HF PEFT
        does (every refusal is a ValueError, before anything is loaded)."""
        task_type = peft_config.task_type
        if cls._target_class is None and task_type is not None:
            raise ValueError(
                "Cannot use `AutoPeftModel` with a task type, please use a specific class for your task type. "
                f"(e.g. `AutoPeftModelForCausalLM` for `task_type='CAUSAL_LM'`); this adapter has "
                f"task_type={task_type!s}"
            )
        if task_type is not None:
            expected = MODEL_TYPE_TO_PEFT_MODEL_MAPPING[task_type]
            if cls._target_peft_class is not expected:
                raise ValueError(
                    f"Expected target PEFT class: {expected.__name__}, but you have asked for: "
                    f"{cls._target_peft_class.__name__} make sure that you are loading the correct model for your "
                    f"task type (the adapter's task_type is {task_type!s})."
                )
            import transformers

            return getattr(transformers, cls._target_class)  # type: ignore[arg-type]
        if peft_config.auto_mapping is not None:
            return _auto_mapping_class(peft_config.auto_mapping, import_allowlist)
        raise ValueError(
            "Cannot infer the auto class from the config, please make sure that you are loading the correct model for "
            "your task type (the adapter config has neither a task_type nor an auto_mapping)."
        )


def _auto_mapping_class(auto_mapping: Any, import_allowlist: list[str]) -> Any:
    """The base class an `auto_mapping` names (`{"base_model_class": ..., "parent_library": ...}`), imported only
    from an allowed library."""
    if not isinstance(auto_mapping, dict) or not all(
        isinstance(auto_mapping.get(k), str) for k in ("base_model_class", "parent_library")
    ):
        raise ValueError(
            f"the adapter config's auto_mapping must be {{'base_model_class': str, 'parent_library': str}}, got "
            f"{auto_mapping!r}"
        )
    class_name, library = auto_mapping["base_model_class"], auto_mapping["parent_library"]
    if not check_import_allowlist(import_allowlist, library):
        raise ValueError(
            f"The auto mapping wants to import '{library}' which is not in the import allowlist. If you are sure that "
            f"importing this library is safe, specify `import_allowlist=['{library}']` in `from_pretrained()`."
        )
    if not _MODULE_NAME.fullmatch(library):
        raise ValueError(f"the adapter config's auto_mapping names {library!r}, which is not a module name")
    target = getattr(importlib.import_module(library), class_name, None)
    if not isinstance(target, type) or not callable(getattr(target, "from_pretrained", None)):
        raise ValueError(
            f"the adapter config's auto_mapping names {library}.{class_name}, which is not a model class with a "
            "from_pretrained method"
        )
    return target


def _grow_embeddings_to_tokenizer(base_model: nn.Module, adapter_dir: str | os.PathLike) -> None:
    """As HF PEFT: a tokenizer saved beside the adapter with more tokens than the base's input embeddings has rows
    grows them (new tokens were added for the adapter). Read offline, with no code from the folder."""
    if not os.path.isfile(os.path.join(adapter_dir, TOKENIZER_CONFIG_NAME)):
        return
    get_embeddings = getattr(base_model, "get_input_embeddings", None)
    if get_embeddings is None:
        return
    from transformers import AutoTokenizer

    offline = {"local_files_only": True}
    tokenizer = AutoTokenizer.from_pretrained(adapter_dir, trust_remote_code=False, **offline)
    if len(tokenizer) > get_embeddings().weight.shape[0]:
        base_model.resize_token_embeddings(len(tokenizer))  # type: ignore[operator]


class AutoPeftModel(_BaseAutoPeftModel):
    _target_class = None
    _target_peft_class = PeftModel


class AutoPeftModelForCausalLM(_BaseAutoPeftModel):
    _target_class = "AutoModelForCausalLM"
    _target_peft_class = PeftModelForCausalLM


class AutoPeftModelForSeq2SeqLM(_BaseAutoPeftModel):
    _target_class = "AutoModelForSeq2SeqLM"
    _target_peft_class = PeftModelForSeq2SeqLM


class AutoPeftModelForSequenceClassification(_BaseAutoPeftModel):
    _target_class = "AutoModelForSequenceClassification"
    _target_peft_class = PeftModelForSequenceClassification


class AutoPeftModelForTokenClassification(_BaseAutoPeftModel):
    _target_class = "AutoModelForTokenClassification"
    _target_peft_class = PeftModelForTokenClassification


class AutoPeftModelForQuestionAnswering(_BaseAutoPeftModel):
    _target_class = "AutoModelForQuestionAnswering"
    _target_peft_class = PeftModelForQuestionAnswering


class AutoPeftModelForFeatureExtraction(_BaseAutoPeftModel):
    _target_class = "AutoModel"
    _target_peft_class = PeftModelForFeatureExtraction


__all__ = [
    "MODEL_TYPE_TO_PEFT_MODEL_MAPPING",
    "AutoPeftModel",
    "AutoPeftModelForCausalLM",
    "AutoPeftModelForFeatureExtraction",
    "AutoPeftModelForQuestionAnswering",
    "AutoPeftModelForSeq2SeqLM",
    "AutoPeftModelForSequenceClassification",
    "AutoPeftModelForTokenClassification",
    "check_import_allowlist",
    "get_default_import_allowlist",
]
