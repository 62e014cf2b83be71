"""The model card (README.md) `save_pretrained` writes next to an adapter, as HF PEFT's `create_or_update_model_card`
does; an existing card keeps its text and metadata."""

from __future__ import annotations

import json
import os
import re
import stat
import warnings
from typing import Any, Optional

from ._compat import name_or_path
from ._files import atomic_write_text, package_version, user_path
from .serialization import is_transformers_model

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
    exists = _card_state(path, shown)
    base = peft_model.get_base_model()
    name = name_or_path(getattr(base, "config", None)) or None
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
    version_line, heading = f"- lightning_peft {package_version()}", "### Framework versions"
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


def _card_state(path: str, shown: str) -> Optional[bool]:
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
