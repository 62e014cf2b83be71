"""Small file helpers shared by the config, adapter and export writers, and `atomic_folder`: a folder
written as one unit (see its docstring and README "Atomic exports")."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import re
import shutil
import sys
import tempfile
import threading
import time
from typing import Iterator, Optional


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


# ---------------------------------------------------------------------------------------------
# a folder as one unit: written aside, swapped in whole, one writer at a time
# ---------------------------------------------------------------------------------------------
LOCK_TIMEOUT_S = 600.0  # how long a second writer of the same folder waits for the first
_TMP, _NEW, _PREV, _LEGACY_OLD = ".tmp-", ".new-", ".prev-", ".old-"  # ".<name><kind><random>" beside the folder
_MKDTEMP_SUFFIX = re.compile(r"[a-z0-9_]{8}")  # what tempfile.mkdtemp adds to a prefix
_building: set[str] = set()  # temporary folders this process is filling (a save nested in one writes straight in)
_building_lock = threading.Lock()
_RENAME_EXCHANGE = 2  # linux/fs.h


class FolderLockTimeout(TimeoutError):
    """Another writer held a folder's lock for longer than the timeout."""


def _inside_building(path: str) -> bool:
    with _building_lock:
        return any(path == tmp or path.startswith(tmp + os.sep) for tmp in _building)


def _writable_error(final: str, parent: str, error: OSError) -> OSError:
    if error.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return OSError(
            error.errno,
            f"cannot save {final}: its parent folder {parent} is not writable ({error.strerror}); "
            "the folder is written beside itself and swapped in whole, so its parent must be writable. "
            "Nothing was changed",
        )
    return error


@contextlib.contextmanager
def folder_lock(final: str, timeout: Optional[float] = None) -> Iterator[None]:
    """Hold an exclusive `fcntl.flock` on `.<name>.lock` beside `final` (waits up to `timeout` seconds).

    The lock file is removed on release; a waiter that got the lock on a file removed meanwhile retries on
    the new one (inode check), so two writers never both hold it."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX: no inter-process lock
        yield
        return
    timeout = LOCK_TIMEOUT_S if timeout is None else timeout
    parent, name = os.path.split(final)
    path = os.path.join(parent, f".{name}.lock")
    deadline = time.monotonic() + timeout
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as error:
            raise _writable_error(final, parent, error) from error
        try:
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        raise FolderLockTimeout(
                            f"{final} is being saved by another process (it holds {path}); waited {timeout:g} s. "
                            "Let that save finish, or save elsewhere"
                        ) from None
                    time.sleep(0.05)
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(path))
            except FileNotFoundError:
                same = False
        except BaseException:
            os.close(fd)
            raise
        if same:
            break
        os.close(fd)  # the previous holder removed this file after we opened it: lock the new one
    try:
        yield
    finally:
        try:
            os.unlink(path)  # while still holding it
        finally:
            os.close(fd)


def _leftovers(parent: str, name: str) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {_TMP: [], _NEW: [], _PREV: [], _LEGACY_OLD: []}
    for entry in os.listdir(parent):
        for kind in found:
            prefix = f".{name}{kind}"
            if entry.startswith(prefix) and _MKDTEMP_SUFFIX.fullmatch(entry[len(prefix) :]):
                found[kind].append(os.path.join(parent, entry))
    return found


def _by_age(paths: list[str]) -> list[str]:
    return sorted(paths, key=lambda p: os.lstat(p).st_mtime, reverse=True)


def recover_and_clean(final: str) -> None:
    """After a killed save (call with the folder's lock held): put a folder back under `final` if a save died
    between two renames (only the fallback swap has such a moment), then remove every leftover folder."""
    parent, name = os.path.split(final)
    found = _leftovers(parent, name)
    if not os.path.lexists(final):
        # complete new version first (".new-" is only ever a fully written folder), else the previous one
        legacy = [
            os.path.join(p, "x") for p in _by_age(found[_LEGACY_OLD]) if os.path.isdir(p) and os.listdir(p) == ["x"]
        ]  # atomic_directory before 0.2 moved the old folder to .<name>.old-*/x
        for candidate in _by_age(found[_NEW]) + _by_age(found[_PREV]) + legacy:
            if os.path.isdir(candidate):
                os.rename(candidate, final)
                break
    for paths in found.values():
        for path in paths:
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path, ignore_errors=True)
            elif os.path.lexists(path):
                os.remove(path)


def _exchange(a: str, b: str) -> bool:
    """Swap two paths atomically (Linux `renameat2(RENAME_EXCHANGE)`); False where the OS or file system can't."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):  # no renameat2 in this libc (glibc < 2.28)
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    renameat2.restype = ctypes.c_int
    at_fdcwd = -100
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False  # e.g. NFS, old kernels
    raise OSError(err, f"cannot swap {a} into {b}: {os.strerror(err)}")


def _fsync_tree(root: str) -> None:
    for folder, _, files in os.walk(root):
        for name in files:
            path = os.path.join(folder, name)
            if os.path.islink(path):
                continue
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(folder)


def _fsync_dir(folder: str) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover - some file systems refuse fsync on folders
        pass
    finally:
        os.close(fd)


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)  # safe: our writers replace files (temporary file + rename), never write into them
    except OSError:
        shutil.copy2(src, dst)


def _swap_in(tmp: str, final: str) -> None:
    """Put the complete folder `tmp` under `final`; `final` names a whole folder at every moment."""
    parent, name = os.path.split(final)
    if not os.path.lexists(final):
        os.rename(tmp, final)
        return
    if _exchange(tmp, final):  # one step: `final` is the new folder, `tmp` the previous one
        shutil.rmtree(tmp, ignore_errors=True)
        return
    # fallback (no RENAME_EXCHANGE): `final` is missing between two renames; `recover_and_clean` repairs a
    # save killed there (the complete new folder is marked .new- before the previous one moves away)
    new = tempfile.mkdtemp(prefix=f".{name}{_NEW}", dir=parent)
    os.rename(tmp, new)  # an empty folder is replaced
    prev = tempfile.mkdtemp(prefix=f".{name}{_PREV}", dir=parent)
    os.rename(final, prev)
    os.rename(new, final)
    shutil.rmtree(prev, ignore_errors=True)


@contextlib.contextmanager
def atomic_folder(
    final: str | os.PathLike, keep_existing: bool = False, lock_timeout: Optional[float] = None
) -> Iterator[str]:
    """Yield a temporary folder to fill; on success it replaces `final` whole, on error it is removed.

    - Readers see either the previous folder or the new one, never a mix, and `final` never goes missing
      (Linux: `renameat2(RENAME_EXCHANGE)`; elsewhere two renames, repaired by the next save if killed between).
    - `keep_existing=True` starts the new folder as a copy (hard links) of the current one, so files the
      caller does not write are kept (how `save_pretrained` writes into a folder holding other files).
    - Writers of the same folder take turns (`fcntl.flock` on `.<name>.lock` beside it, `lock_timeout`
      seconds, default `LOCK_TIMEOUT_S`); each save first removes what killed saves left beside it.
    - Inside another `atomic_folder`'s temporary folder it writes straight in (the outer one swaps).
    """
    final = os.path.abspath(os.fspath(final))
    if os.path.islink(final):  # save where the link points, as a plain write would
        final = os.path.realpath(final)
    if _inside_building(final):
        os.makedirs(final, exist_ok=True)
        yield final
        return
    parent, name = os.path.split(final)
    if not name:
        raise ValueError(f"cannot replace {final} as a whole; give a folder below it")
    try:
        os.makedirs(parent, exist_ok=True)
    except OSError as error:
        raise _writable_error(final, parent, error) from error
    if os.path.lexists(final) and not os.path.isdir(final):
        raise ValueError(f"{final} is a file; give a folder")
    with folder_lock(final, lock_timeout):
        recover_and_clean(final)
        try:
            tmp = tempfile.mkdtemp(prefix=f".{name}{_TMP}", dir=parent)
        except OSError as error:
            raise _writable_error(final, parent, error) from error
        with _building_lock:
            _building.add(tmp)
        try:
            os.chmod(tmp, default_mode(directory=True))  # mkdtemp makes it private; others read exports
            if keep_existing and os.path.isdir(final):
                shutil.copytree(final, tmp, symlinks=True, dirs_exist_ok=True, copy_function=_link_or_copy)
            yield tmp
            _fsync_tree(tmp)  # the new folder is on disk before its name is
            try:
                cwd_was_final = os.path.samefile(os.getcwd(), final)
            except OSError:
                cwd_was_final = False
            _swap_in(tmp, final)
            _fsync_dir(parent)
            if cwd_was_final:  # `save_pretrained(".")`: stay in the folder, not in the swapped-out one
                os.chdir(final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        finally:
            with _building_lock:
                _building.discard(tmp)
