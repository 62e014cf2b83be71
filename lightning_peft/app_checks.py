"""Fail fast on misspelled keys: each `key.path=value` on the command line is checked against the
composed config before Hydra runs, and an unknown key is reported with the valid keys at that level
(plus, for a `_target_` node, the parameters of the class it builds) and the closest match."""

from __future__ import annotations

import difflib
import importlib
import inspect
import itertools
from pathlib import Path
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf

from lightning_peft.app import CONFIG_DIR

MAX_COMBINATIONS = 64  # group-choice sweeps are checked choice by choice up to this many


class UnknownKeyError(KeyError):
    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0])


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
    return [p.name for p in params if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]


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
        raise UnknownKeyError(f"Unknown key '{dotted}'.{hint} Valid keys of {where}: {', '.join(valid)}")


def _is_group(key: str, config_dir: Path) -> bool:
    return (config_dir / key.split("@")[0]).is_dir()


def check_overrides(overrides: list[str], config_name: str = "train",
                    config_dir: Optional[Path] = None) -> None:
    """Compose the config for each combination of group choices in `overrides` and check every
    `key=value` override's key in it. Group choices themselves are Hydra's to check (it lists the
    available options)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import OverrideType

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


def check_command_line(argv: list[str]) -> None:
    """`check_overrides` for a full command line; options Hydra handles itself are skipped."""
    from hydra._internal.utils import get_args_parser

    args = get_args_parser().parse_args(argv)
    if args.help or args.hydra_help or args.info or args.shell_completion or args.config_path \
            or args.config_dir:
        return
    try:
        check_overrides(args.overrides, config_name=args.config_name or "train")
    except UnknownKeyError:
        raise
    except Exception:  # anything else (a bad group choice, a syntax error) Hydra reports itself
        return
