"""Small file helpers shared by the config, adapter and export writers."""

from __future__ import annotations

import os
import tempfile


def default_mode(directory: bool = False) -> int:
    """The permissions a plain `open()` / `mkdir()` would give (temporary files start private)."""
    umask = os.umask(0)
    os.umask(umask)
    return (0o777 if directory else 0o666) & ~umask


def atomic_write_text(path: str, text: str) -> None:
    """Write to a temporary file in the same folder and rename it: a crash never leaves half a file."""
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=os.path.dirname(os.path.abspath(path)))
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.chmod(tmp, default_mode())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
