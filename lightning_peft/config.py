"""Config base shared by every tuner, read and written in HF PEFT's `adapter_config.json` format."""

from __future__ import annotations

import dataclasses
import enum
import json
import math
import os
import re
import stat
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, ClassVar, Optional, Union

from ._compat import regex_parser
from ._files import atomic_write_text, interrupted_save_note, package_version
from .tuners.registry import get_config_class, registered_tuners

CONFIG_NAME = "adapter_config.json"
SAFETENSORS_WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_WEIGHTS_NAME = "adapter_model.bin"
SAVED_PREFIX = "base_model."  # adapter keys in HF PEFT's files start with it (its PeftModel's attribute)


def allow_in_weights_only_loads(cls: Any) -> Any:
    """Let `torch.load(weights_only=True)` (torch's default, so Lightning's) rebuild `cls`, a class of plain data (a
    tuner config, its enums and sub-configs): a Lightning checkpoint whose `hyper_parameters` hold a tuner config
    (`self.save_hyperparameters()` of a module given `LoraConfig(...)`) loads, and `load_from_checkpoint` gives the
    config object back. Rebuilding one runs no code of the file (a new instance, its fields set). Config classes
    and StrEnums register themselves (`__init_subclass__`); other sub-config classes use this as a decorator."""
    import torch.serialization

    torch.serialization.add_safe_globals([cls])
    return cls


class StrEnum(str, enum.Enum):
    """An enum of strings that prints as its value (HF PEFT's enums compare and print as plain strings)."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        allow_in_weights_only_loads(cls)

    def __str__(self) -> str:
        return self.value


class PeftType(StrEnum):
    """HF PEFT 0.21's tuner names (so configs and code naming any of them read); `tuners.registry` says which
    lightning_peft implements."""

    PROMPT_TUNING = "PROMPT_TUNING"
    MULTITASK_PROMPT_TUNING = "MULTITASK_PROMPT_TUNING"
    P_TUNING = "P_TUNING"
    PREFIX_TUNING = "PREFIX_TUNING"
    LORA = "LORA"
    ADALORA = "ADALORA"
    ADAMSS = "ADAMSS"
    BOFT = "BOFT"
    ADAPTION_PROMPT = "ADAPTION_PROMPT"
    IA3 = "IA3"
    BEFT = "BEFT"
    LILY = "LILY"
    LOHA = "LOHA"
    LOKR = "LOKR"
    OFT = "OFT"
    POLY = "POLY"
    LN_TUNING = "LN_TUNING"
    VERA = "VERA"
    FROD = "FROD"
    PVERA = "PVERA"
    FOURIERFT = "FOURIERFT"
    GLORA = "GLORA"
    XLORA = "XLORA"
    HRA = "HRA"
    VBLORA = "VBLORA"
    UNILORA = "UNILORA"
    CPT = "CPT"
    MISS = "MISS"
    RANDLORA = "RANDLORA"
    ROAD = "ROAD"
    TRAINABLE_TOKENS = "TRAINABLE_TOKENS"
    HIRA = "HIRA"
    SHIRA = "SHIRA"
    C3A = "C3A"
    WAVEFT = "WAVEFT"
    OSF = "OSF"
    DELORA = "DELORA"
    GRALORA = "GRALORA"
    CARTRIDGE = "CARTRIDGE"
    TINYLORA = "TINYLORA"
    PSOFT = "PSOFT"
    PEANUT = "PEANUT"
    SHADOW = "SHADOW"
    SUPERTUNING = "SUPERTUNING"
    DEFT = "DEFT"


class TaskType(StrEnum):
    CAUSAL_LM = "CAUSAL_LM"
    SEQ_2_SEQ_LM = "SEQ_2_SEQ_LM"
    SEQ_CLS = "SEQ_CLS"
    TOKEN_CLS = "TOKEN_CLS"  # noqa: S105  (a task name, not a password)
    QUESTION_ANS = "QUESTION_ANS"
    FEATURE_EXTRACTION = "FEATURE_EXTRACTION"


def listed(items: list[str], limit: int = 5) -> str:
    """The first `limit` items, comma-separated, and how many more there are (for error messages)."""
    more = f" (+{len(items) - limit} more)" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


def short_repr(value: Any, limit: int = 80) -> str:
    """`repr(value)` cut to `limit` characters (with the full length said), for quoting user values in errors."""
    text = repr(value)
    if len(text) <= limit:
        return text
    return f"{text[: limit - 3]}... ({len(text)} characters)"


def check_finite(name: str, value: Any) -> None:
    """Refuse NaN / inf for a number field (`float("nan")` passes every range comparison silently)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {short_repr(value)}")


# Regexes in configs (`target_modules` as a string, `rank_pattern` / `alpha_pattern` keys, ...) run against every
# module name of the model, so a config file must not be able to make matching take forever: Python's `re`
# backtracks, and a repetition nested in another (`(.*.*)*x`) is exponential in the name's length, while many
# variable-length repetitions in a row (`.*.*.*.*.*x`) are polynomial of that degree. Such patterns are refused.
MAX_PATTERN_LENGTH = 500
MAX_VARIABLE_REPEATS = 4


def _parse_regex(pattern: str) -> Any:
    parser: Any = regex_parser()  # the stdlib's own (private) regex parser, see _compat
    return parser.parse(pattern)


REPEATS = ("MAX_REPEAT", "MIN_REPEAT", "POSSESSIVE_REPEAT")
# backreferences and conditional groups: module names never need them, and a conditional's branches hide
# repetitions from simple walkers; they are refused outright
REFUSED_OPS = {"GROUPREF": "a backreference", "GROUPREF_EXISTS": "a conditional group '(?(1)...)'"}


def _children(op: Any, av: Any) -> list:
    """The sub-patterns directly inside one parsed item, whatever its kind (groups, repeats, alternations,
    lookarounds, atomic groups, conditionals): every one is walked, so no repetition hides from the checks."""
    name = str(op)
    if name in REPEATS:
        return [av[2]]
    if name == "SUBPATTERN":
        return [av[-1]]
    if name == "BRANCH":
        return list(av[1])
    if name in ("ASSERT", "ASSERT_NOT"):
        return [av[1]]
    if name == "ATOMIC_GROUP":
        return [av]
    if name == "GROUPREF_EXISTS":
        return [sub for sub in av[1:] if sub is not None]
    return []


def _repeat_profile(items: Any) -> tuple[int, bool]:
    """(number of variable-length repetitions, whether one of them holds another repetition or an alternation)."""
    count, nested = 0, False
    for op, av in items:
        inner = [_repeat_profile(sub) for sub in _children(op, av)]
        inner_count = sum(c for c, _ in inner)
        count, nested = count + inner_count, nested or any(n for _, n in inner)
        if str(op) in REPEATS:
            low, high, sub = av
            count += 1 if high != low else 0
            has_branch = any(str(o) in ("BRANCH", "GROUPREF_EXISTS") for o, _ in _walk(sub))
            nested = nested or (high > 1 and (inner_count > 0 or has_branch))
    return count, nested


def _walk(items: Any) -> Any:
    """Every (op, av) of a parsed pattern, depth first."""
    for op, av in items:
        yield op, av
        for sub in _children(op, av):
            yield from _walk(sub)


def check_regex(name: str, pattern: Any, is_key: bool = False) -> None:
    """A valid regex that cannot hang matching (see above); errors name the field and quote the pattern, cut short
    (`is_key`: the pattern is a key of the dict field `name`)."""
    if not isinstance(pattern, str):
        raise TypeError(f"{name} must be a regex string, got {short_repr(pattern)}")
    label = f"{name} key {short_repr(pattern)}" if is_key else f"{name}={short_repr(pattern)}"
    if len(pattern) > MAX_PATTERN_LENGTH:
        raise ValueError(
            f"{label} is longer than {MAX_PATTERN_LENGTH} characters; use a shorter regex or a list of module names"
        )
    try:
        parsed = _parse_regex(pattern)
        re.compile(pattern)
    except re.error as err:
        raise ValueError(f"{label} is not a valid regex ({err})") from None
    except RecursionError:
        raise ValueError(f"{label} nests groups too deeply; use a simpler regex or a list of module names") from None
    refused = sorted({REFUSED_OPS[str(op)] for op, _ in _walk(parsed) if str(op) in REFUSED_OPS})
    if refused:
        raise ValueError(
            f"{label} uses {' and '.join(refused)}, which module names never need and which can make matching "
            "take exponential time, so it is refused; write it without (e.g. '.*\\.q_proj') or give a list of "
            "module names"
        )
    if is_key:
        try:  # a key is matched inside a larger regex (`(.*\.)?(key)$`, as HF PEFT does)
            re.compile(rf"(.*\.)?({pattern})$")
        except re.error as err:
            raise ValueError(
                f"{label} cannot be used as a key ({err}): keys are matched inside a larger regex, so global "
                "inline flags like '(?i)' are not allowed; use a scoped flag group like '(?i:q_proj)'"
            ) from None
    count, nested = _repeat_profile(parsed)
    if nested:
        raise ValueError(
            f"{label} repeats a group that itself repeats or alternates (like '(a+)*' or "
            "'(a|b)*'): matching it can take exponential time, so it is refused. Write it without the outer "
            "repetition (e.g. '.*\\.q_proj') or give a list of module names"
        )
    if count > MAX_VARIABLE_REPEATS:
        raise ValueError(
            f"{label} has {count} variable-length repetitions (at most "
            f"{MAX_VARIABLE_REPEATS}); matching it against long module names can take very long. Simplify it "
            "(one '.*' is usually enough) or give a list of module names"
        )


def _coerce_enum(enum_cls: type[enum.Enum], value: Any, field_name: str) -> Any:
    if value is None or isinstance(value, enum_cls):
        return value
    if isinstance(value, enum.Enum):  # another library's member (HF PEFT's TaskType, ...): its value names it
        value = value.value
    try:
        return enum_cls(str(value).upper())
    except ValueError:
        allowed = ", ".join(m.value for m in enum_cls)
        raise ValueError(f"{field_name}={short_repr(value)} is not valid; use one of: {allowed}") from None


INTERNAL = {"internal": True}  # metadata of fields that are never written to (or read from) adapter_config.json
# metadata of settings that only matter while the adapter runs (HF PEFT's `runtime_config`): not written to
# adapter_config.json, and dropped with a warning when a file has them (as HF PEFT does)
RUNTIME = {"runtime": True}


def _math_changing_file_keys() -> dict[str, bool]:
    """Every registered tuner's `MATH_CHANGING_FILE_KEYS`: keys a config file may carry that lightning_peft does not
    implement; at their neutral value (None/False/empty) they are dropped silently, any other value changes the math,
    so it is refused."""
    keys: dict[str, bool] = {}
    for spec in registered_tuners().values():
        keys.update(spec.config_class.MATH_CHANGING_FILE_KEYS)
    return keys


def _is_neutral(value: Any, flag: bool = False) -> bool:
    """Whether `value` leaves a feature off: None, False, empty; for an on/off `flag` a number 0 as well (HF PEFT
    reads `use_dora: 0` as off), while 1 / True stay a request."""
    if flag and type(value) in (int, float) and value == 0:
        return True
    return value is None or value is False or (isinstance(value, (dict, list, tuple, set, str)) and len(value) == 0)


def refuse_not_implemented(config: Any, features: dict[str, str], none_only: Iterable[str] = ()) -> None:
    """HF PEFT fields a config class has so that HF's configs read (`{field: the feature it switches on}`), whose
    feature lightning_peft does not implement: at their neutral value (None / False / empty, HF's default; only None
    for the fields in `none_only`, which HF PEFT switches on by being set at all, e.g. `kasa_config={}`) they are
    kept, any other value is refused, since the adapter would compute something else than it was made for."""
    defaults = {f.name: f for f in dataclasses.fields(config)}
    strict = set(none_only)
    for name, feature in features.items():
        value = getattr(config, name)
        spec = defaults[name]
        default = spec.default_factory() if spec.default_factory is not dataclasses.MISSING else spec.default
        if value is None or (name not in strict and _is_neutral(value, flag=default is False)):
            continue
        raise ValueError(
            f"{name}={short_repr(value)} asks for {feature}, which lightning_peft does not implement (yet): the "
            f"adapter would not compute what it was made for. Leave {name} at its default ({default!r})"
        )


def plain_subconfig(name: str, value: Any) -> Any:
    """An HF PEFT sub-config field (`eva_config`, ...) as plain JSON data: None, a dict, or a dataclass instance
    (HF's own class, say) turned into its dict; anything else is a TypeError, as in HF PEFT."""
    if value is None or isinstance(value, dict):
        return value
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    raise TypeError(f"{name} must be a dict of its settings or None, got {short_repr(value)}")


@dataclass
class PeftConfig:
    """Fields every tuner config has. Subclasses validate their own fields in `__post_init__`."""

    PEFT_TYPE: ClassVar[Optional[PeftType]] = None  # each tuner's config class names its tuner

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        allow_in_weights_only_loads(cls)  # checkpoints holding a config load with weights_only=True

    # keys of this tuner's HF config that switch on a feature lightning_peft does not implement, refused (at a
    # non-neutral value) also when they turn up in another tuner's file: {key: whether it is an on/off flag, which
    # HF PEFT tests for truth, so `use_dora: 0` is off}
    MATH_CHANGING_FILE_KEYS: ClassVar[dict[str, bool]] = {}

    peft_type: Optional[Union[str, PeftType]] = field(default=None, metadata={"help": "the tuner"})
    task_type: Optional[Union[str, TaskType]] = field(default=None, metadata={"help": "the model's task"})
    inference_mode: bool = False
    base_model_name_or_path: Optional[str] = None
    revision: Optional[str] = None
    auto_mapping: Optional[dict] = None
    peft_version: Optional[str] = None  # the HF PEFT version that wrote the file (kept as read; no effect)
    # the folder `from_pretrained` read this config from (None: built in code). Not saved, and a file cannot set it:
    # what came from a file is untrusted (e.g. prompt tuning's tokenizer_kwargs are hardened for it).
    _source_dir: Optional[str] = field(default=None, kw_only=True, repr=False, compare=False, metadata=INTERNAL)

    def __post_init__(self) -> None:
        own = type(self).PEFT_TYPE
        self.peft_type = own if own is not None else _coerce_enum(PeftType, self.peft_type, "peft_type")
        self.task_type = _coerce_enum(TaskType, self.task_type, "task_type")
        if not isinstance(self.inference_mode, bool):
            raise TypeError(f"inference_mode must be True or False, got {self.inference_mode!r}")
        if self.peft_version is None:  # HF PEFT's field: the library that made the config (one read is kept)
            self.peft_version = written_by()
        elif not isinstance(self.peft_version, str):  # it has no effect: kept as text rather than refused
            from .utils.warning import PeftWarning  # (utils imports this module)

            warnings.warn(
                f"peft_version should be a version string, got {short_repr(self.peft_version)}; kept as "
                f"{str(self.peft_version)!r} (the field has no effect)",
                PeftWarning,
                stacklevel=3,
            )
            self.peft_version = str(self.peft_version)
        names = getattr(self, "modules_to_save", None)  # the field of every tuner that has one
        if names is not None:
            if isinstance(names, str) or not isinstance(names, Iterable) or not all(isinstance(m, str) for m in names):
                raise TypeError(f"modules_to_save must be a list of module names, got {names!r}")
            self.modules_to_save: Optional[list[str]] = list(names)

    @property
    def is_prompt_learning(self) -> bool:  # HF PEFT's name; kept for code written for it
        return False

    # ---- serialisation -------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        out = {}
        for f in dataclasses.fields(self):
            if f.metadata.get("internal") or f.metadata.get("runtime"):
                continue
            value = getattr(self, f.name)
            if isinstance(value, enum.Enum):
                value = value.value
            elif isinstance(value, set):
                value = sorted(value)
            out[f.name] = value
        return out

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs: Any) -> None:
        if os.path.isfile(save_directory):
            raise ValueError(f"save_directory {save_directory!s} is a file; give a folder")
        os.makedirs(save_directory, exist_ok=True)
        data = self.to_dict()
        # HF PEFT's keyword for the `auto_mapping` entry; other keywords (HF's push-to-hub options) are ignored, as
        # HF PEFT does: they are no config settings
        auto_mapping = kwargs.pop("auto_mapping_dict", None)
        if auto_mapping is not None:
            data["auto_mapping"] = auto_mapping
        atomic_write_text(os.path.join(save_directory, CONFIG_NAME), json.dumps(data, indent=2, sort_keys=True) + "\n")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "PeftConfig":
        """Build the right config class from a dict (the `peft_type` picks it when called on the base)."""
        data = dict(data)
        target_cls = cls
        if cls.PEFT_TYPE is None:  # called on a base class: the file's peft_type picks the class
            if "peft_type" not in data:  # a missing required key: a TypeError, as in HF PEFT
                raise TypeError("the config has no 'peft_type'; say which tuner it is for (e.g. LORA)")
            target_cls = get_config_class(data["peft_type"])
        own = target_cls.PEFT_TYPE
        if own is not None and "peft_type" in data and _coerce_enum(PeftType, data["peft_type"], "peft_type") != own:
            raise ValueError(
                f"this config is for peft_type={data['peft_type']}, not {own.value}; "
                f"load it with {get_config_class(data['peft_type']).__name__} or PeftConfig.from_pretrained"
            )
        data = {k: v for k, v in data.items() if k not in INTERNAL_FIELDS}
        runtime = sorted(f.name for f in dataclasses.fields(target_cls) if f.metadata.get("runtime") and f.name in data)
        if runtime:
            warnings.warn(
                f"the adapter config has {', '.join(runtime)}; ignored: runtime settings are only set in code, "
                "not read from a file",
                stacklevel=2,
            )
            data = {k: v for k, v in data.items() if k not in runtime}
        known = {f.name for f in dataclasses.fields(target_cls) if f.init}
        unknown = {k: v for k, v in data.items() if k not in known}
        math_changing = _math_changing_file_keys()
        refused = sorted(
            k for k, v in unknown.items() if k in math_changing and not _is_neutral(v, flag=math_changing[k])
        )
        if refused:
            raise ValueError(
                f"the adapter config sets {', '.join(f'{k}={short_repr(unknown[k])}' for k in refused)}, which "
                "lightning_peft "
                "does not implement; loading it would give different outputs than the adapter was trained for. "
                "Load it with HF PEFT, or, if the adapter was not trained with those settings, remove the keys from "
                f"its {CONFIG_NAME}"
            )
        ignored = sorted(k for k, v in unknown.items() if k not in math_changing and not _is_neutral(v))
        if ignored:
            warnings.warn(f"ignoring adapter config keys unknown to lightning_peft: {', '.join(ignored)}", stacklevel=2)
        return target_cls(**{k: v for k, v in data.items() if k in known})

    @classmethod
    def from_json_file(cls, path_json_file: str | os.PathLike, **kwargs: Any) -> dict[str, Any]:
        """The settings in a config JSON file, as a dict (HF PEFT's classmethod; `from_dict` / `from_pretrained`
        build the config). A `runtime_config` key is dropped with a warning, as HF PEFT does."""
        path = os.fspath(path_json_file)
        check_regular_file(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path} does not exist; give the path of an {CONFIG_NAME}")
        data = _read_json_object(path)
        if "runtime_config" in data:
            warnings.warn(
                "The configuration file contains a `runtime_config` key. This is ignored. Runtime configurations are "
                "only valid at runtime.",
                stacklevel=2,
            )
            del data["runtime_config"]
        return data

    @classmethod
    def from_pretrained(
        cls, pretrained_model_name_or_path: str | os.PathLike, subfolder: str | None = None, **kwargs: Any
    ) -> "PeftConfig":
        path = adapter_folder(pretrained_model_name_or_path, subfolder)
        config_file = os.path.join(path, CONFIG_NAME)
        from .utils.error import AdapterNotFoundError  # (utils imports this module)

        if not os.path.isdir(path):
            what = "is a file" if os.path.isfile(path) else "does not exist"  # e.g. the weights file's path
            raise AdapterNotFoundError(
                f"adapter folder {path!s} {what}; pass the folder save_pretrained wrote" + interrupted_save_note(path)
            )
        check_regular_file(config_file)
        if not os.path.isfile(config_file):
            raise AdapterNotFoundError(
                f"{config_file} is missing; an adapter folder holds {CONFIG_NAME} and {SAFETENSORS_WEIGHTS_NAME}"
            )
        data = _read_json_object(config_file)
        data.update(kwargs)
        config = cls.from_dict(data)
        config._source_dir = os.path.abspath(path)
        weights = os.path.join(path, SAFETENSORS_WEIGHTS_NAME)
        check_regular_file(weights)
        if os.path.isfile(weights):
            shapes = weights_header_shapes(weights)
            if shapes is not None:  # an unreadable file: loading the weights says what is wrong with it
                config.check_fits_weights(shapes, weights)
        return config

    def check_fits_weights(self, shapes: dict[str, tuple[int, ...]], weights_file: str) -> None:
        """Refuse sizes this config claims that the saved tensors (`shapes`, read from the file's header, or of a
        loaded `.bin`) cannot have, and a file without the tensors that back them: the adapter is built from the
        config before its weights are loaded, so a small file claiming a huge size would otherwise allocate it
        first. Each tuner's config checks its own size fields."""


# The HF PEFT version whose adapter file format (config fields, weight keys) lightning_peft writes and reads, tested
# against that release. It is the part of `peft_version` before the "@": HF PEFT splits the field on "@" and compares
# that part with its own versions (e.g. to know whether a file predates a change of format), so it must be a PEFT
# version, not ours. Raise it when the format tests pass against a newer HF PEFT.
HF_PEFT_FORMAT_VERSION = "0.21.2"


def adapter_folder(model_id: str | os.PathLike, subfolder: Optional[str]) -> str | os.PathLike:
    """The folder an adapter's files are read from: `model_id`, or its `subfolder` (HF PEFT's keyword)."""
    return os.path.join(model_id, subfolder) if subfolder else model_id


def written_by() -> str:
    """What `peft_version` says in configs made here: the HF PEFT version whose format we write, then after an "@"
    (where HF PEFT puts a development build's commit) `lightning_peft-<our version>`, e.g.
    "0.21.2@lightning_peft-0.1.0"."""
    return f"{HF_PEFT_FORMAT_VERSION}@lightning_peft-{package_version()}"


def _read_json_object(config_file: str) -> dict[str, Any]:
    """A config file's JSON object; any file that is not one is a ValueError naming it."""
    try:
        with open(config_file, encoding="utf-8") as fh:
            data = json.load(fh)
    except json.JSONDecodeError as err:
        raise ValueError(f"{config_file} is not valid JSON ({err}); re-export the adapter") from err
    except (RecursionError, UnicodeDecodeError, ValueError) as err:  # nested too deeply, not UTF-8, ...
        what = "its JSON is nested too deeply" if isinstance(err, RecursionError) else str(err)[:200]
        raise ValueError(f"{config_file} is not a valid adapter config ({what}); re-export the adapter") from None
    if not isinstance(data, dict):
        raise ValueError(f"{config_file} must hold a JSON object")
    return data


INTERNAL_FIELDS = frozenset(f.name for f in dataclasses.fields(PeftConfig) if f.metadata.get("internal"))


def check_regular_file(path: str) -> None:
    """Refuse, before anything opens it (a FIFO would block the reader), whatever stands at `path` that is not a
    regular file or a symlink to one; a missing path passes (the caller says what is missing)."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    what = None
    if stat.S_ISLNK(mode):
        if not os.path.exists(path):
            what = f"a symlink to {os.readlink(path)!r}, which does not exist"
        else:
            mode = os.stat(path).st_mode
    if what is None and not stat.S_ISREG(mode):
        kinds = [(stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISSOCK, "a socket")]
        what = next((name for test, name in kinds if test(mode)), "a device file") + ", not a file"
    if what is not None:
        raise ValueError(
            f"{path} is {what}; an adapter folder holds {CONFIG_NAME} and {SAFETENSORS_WEIGHTS_NAME} as regular "
            "files: export the adapter again"
        )


def weights_header_shapes(path: str) -> Optional[dict[str, tuple[int, ...]]]:
    """{key: shape} from a safetensors file's header; no tensor data is read. An unreadable file gives None
    (loading the weights then says what is wrong with it)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path, framework="pt") as fh:
            return {key: tuple(fh.get_slice(key).get_shape()) for key in fh.keys()}
    except (SafetensorError, OSError, ValueError):
        return None


def check_loaded_weights_fit_folder_config(
    folder: str | os.PathLike, shapes: dict[str, tuple[int, ...]], weights_file: str
) -> None:
    """The check `from_pretrained` makes against a safetensors header, for weights read otherwise (a pickled
    `.bin`, loaded weights-only before the adapter is built): the folder's own config must fit them. A folder
    whose config is missing or unreadable is skipped (reading that config says what is wrong)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # said once already, when the config was read
            config = PeftConfig.from_pretrained(folder)
    except (OSError, ValueError, TypeError):
        return
    config.check_fits_weights(shapes, weights_file)


def files_missing(weights_file: str, what: str, shapes: dict[str, tuple[int, ...]]) -> str:
    """The message for a weights file lacking the tensors that back the config's sizes."""
    held = listed(sorted(shapes), 3) if shapes else "no tensors"
    return (
        f"{weights_file} holds no {what} (it holds {held}), so nothing backs the sizes {CONFIG_NAME} claims: the "
        "file is not this adapter's weights. Export the adapter again"
    )


def size_mismatch(field_name: str, value: Any, weights_file: str, key: str, shape: tuple[int, ...], want: str) -> str:
    """The message for a config size that the saved tensor cannot have."""
    return (
        f"{field_name}={short_repr(value)} in {CONFIG_NAME} does not fit the weights: {weights_file} holds {key} "
        f"of shape {shape} ({want}). The config and weights file do not belong together; export the adapter again"
    )


def validate_choice(name: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise ValueError(f"{name}={short_repr(value)} is not valid; use one of: {', '.join(map(repr, allowed))}")


def check_target_modules(config: Any, empty_ok: bool = False) -> None:
    """`target_modules` of tuners that adapt named modules (LoRA, IA3): list entries are names, a string is a regex
    over the full name. An empty list is refused unless `empty_ok` (the tuner has other targets, e.g. LoRA's
    `target_parameters`)."""
    from .utils.error import NoMatchingPeftModuleError  # (utils imports this module)

    targets = config.target_modules
    if targets is None:
        return
    # targets that can match no module: HF PEFT's NoMatchingPeftModuleError (a ValueError), raised here already
    if isinstance(targets, str):
        if not targets:
            raise NoMatchingPeftModuleError("target_modules is an empty string; give module names or a regex")
        check_regex("target_modules", targets)
        return
    names = list(targets) if isinstance(targets, Iterable) else None
    if names is None or not all(isinstance(t, str) for t in names):
        raise TypeError(f"target_modules must be a list of module names or a regex string, got {short_repr(targets)}")
    if not names and not empty_ok:
        raise NoMatchingPeftModuleError("target_modules is empty; name at least one module (e.g. ['q_proj', 'v_proj'])")
    if "" in names:
        raise NoMatchingPeftModuleError(f"target_modules={short_repr(targets)} has an empty name: it matches no module")
    config.target_modules = set(names)


def check_exclude_modules(config: Any) -> None:
    """`exclude_modules` (LoRA, IA3): as HF PEFT, a list of module names (each excluding the module of that name or
    whose name ends with "." + it; a list becomes a set) or a regex over the full name; None or empty excludes none."""
    exclude = config.exclude_modules
    if exclude is None:
        return
    if isinstance(exclude, str):
        if exclude:
            check_regex("exclude_modules", exclude)
        return
    names = list(exclude) if isinstance(exclude, (list, tuple, set, frozenset)) else None
    if names is None or not all(isinstance(n, str) and n for n in names):
        raise TypeError(f"exclude_modules must be a list of module names or a regex string, got {short_repr(exclude)}")
    config.exclude_modules = set(names)
