"""Small file helpers shared by the config, adapter and export writers, and `atomic_folder`: a folder
written as one unit (see its docstring and README "Atomic exports")."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import re
import shutil
import stat
import sys
import tempfile
import threading
import time
from typing import Callable, Iterator, Optional


def default_mode(directory: bool = False) -> int:
    """The permissions a plain `open()` / `mkdir()` would give (temporary files start private)."""
    umask = os.umask(0)
    os.umask(umask)
    return (0o777 if directory else 0o666) & ~umask


def atomic_write(path: str, write: Callable[[str], None], suffix: str = "") -> None:
    """`write(tmp)` writes the file at the path it is given: a temporary file in `path`'s folder, given the
    permissions a plain `open()` would (mkstemp makes it private; exports are read by other processes) and renamed
    to `path`, so a crash never leaves half a file (on failure the temporary file is removed)."""
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=suffix, dir=os.path.dirname(os.path.abspath(path)))
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, default_mode())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def atomic_write_text(path: str, text: str) -> None:
    """`text` written to `path` as UTF-8 by `atomic_write`."""

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)

    atomic_write(path, write)


def package_version() -> str:
    """lightning_peft's version, read from the loaded package (it imports the modules that ask, so importing it here
    would be circular)."""
    return str(sys.modules[__name__.rpartition(".")[0]].__version__)


# ---------------------------------------------------------------------------------------------
# a folder as one unit: written aside, swapped in whole, one writer at a time
# ---------------------------------------------------------------------------------------------
LOCK_TIMEOUT_S = 600.0  # how long a second writer of the same folder waits for the first
_TMP, _NEW, _PREV = ".tmp-", ".new-", ".prev-"  # ".<name><kind><token>" beside the folder
_TOKEN = re.compile(r"[a-z0-9_]{8}")  # what tempfile.mkdtemp adds to a prefix: one save's token
_LONGEST_AFFIX = len(".") + len(_PREV) + 8  # ".<name>.prev-<token>": the longest name written beside the folder
# Inside every folder this mechanism creates or moves aside, holding the save's token: only folders holding it
# (or paired to one that does through the token) are ever restored or removed; a user's `.adapter.old-2024`
# or `.adapter.prev-backup1` is never touched. It is removed from the folder once it is in place.
MARKER = ".lightning-peft-save"
# temporary folders this process is filling -> the folder each becomes (a save nested in one writes straight in)
_building: dict[str, str] = {}
_building_lock = threading.Lock()
_held_locks: dict[str, int] = {}  # lock file -> the thread of this process holding it
_RENAME_EXCHANGE = 2  # linux/fs.h


class FolderLockTimeout(TimeoutError):
    """Another writer held a folder's lock for longer than the timeout."""


def _inside_building(path: str) -> bool:
    with _building_lock:
        return any(path == tmp or path.startswith(tmp + os.sep) for tmp in _building)


def user_path(path: str) -> str:
    """`path` as the user knows it: a path inside a temporary folder `atomic_folder` is filling is given under the
    folder it becomes (for messages: `.adapter.tmp-x1y2z3ab/README.md` reads `adapter/README.md`)."""
    with _building_lock:
        for tmp, final in _building.items():
            if path == tmp or path.startswith(tmp + os.sep):
                return final + path[len(tmp) :]
    return path


def _writable_error(final: str, parent: str, error: OSError) -> OSError:
    if error.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return OSError(
            error.errno,
            f"cannot save {final}: its parent folder {parent} is not writable ({error.strerror}); "
            "the folder is written beside itself and swapped in whole, so its parent must be writable. "
            "Nothing was changed",
        )
    return error


def _mount_point_error(final: str, error: Optional[OSError] = None) -> OSError:
    why = f" ({os.strerror(error.errno)})" if error is not None and error.errno else ""
    return OSError(
        errno.EBUSY,
        f"cannot save {final}: it is a mount point{why}; save into a sub-folder of it. The folder is written "
        "beside itself and swapped in whole by a rename, which a mount point (e.g. a Docker / Kubernetes volume) "
        "refuses. Nothing was changed",
    )


@contextlib.contextmanager
def folder_lock(final: str, timeout: Optional[float] = None) -> Iterator[None]:
    """Hold an exclusive `fcntl.flock` on `.<name>.lock` beside `final` (waits up to `timeout` seconds).

    The lock file is removed on release; a waiter that got the lock on a file removed meanwhile retries on
    the new one (inode check), so two writers never both hold it. Other threads of this process wait like
    other processes; the thread already holding it gets an error at once (it would wait for itself)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX: no inter-process lock
        yield
        return
    timeout = LOCK_TIMEOUT_S if timeout is None else timeout
    parent, name = os.path.split(final)
    path = os.path.join(parent, f".{name}.lock")
    with _building_lock:
        if _held_locks.get(path) == threading.get_ident():
            raise RuntimeError(
                f"already saving {final} in this process; write into the folder you were given (a callback "
                "such as export_extras gets the temporary folder that becomes it), not into the folder itself"
            )
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
    with _building_lock:
        _held_locks[path] = threading.get_ident()
    try:
        yield
    finally:
        with _building_lock:
            _held_locks.pop(path, None)
        try:
            with contextlib.suppress(FileNotFoundError):  # removed by someone else meanwhile
                os.unlink(path)  # while still holding it
        finally:
            os.close(fd)


# ---- the marker -------------------------------------------------------------------------------
def _mark(folder: str, token: str) -> None:
    fd = os.open(os.path.join(folder, MARKER), os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o644)
    try:
        os.write(fd, token.encode())
    finally:
        os.close(fd)


def _marker_token(folder: str) -> Optional[str]:
    """The token in `folder`'s marker, or None (no marker, not a plain file, not a real folder)."""
    try:
        if os.path.islink(folder):
            return None
        fd = os.open(os.path.join(folder, MARKER), os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        token = os.read(fd, 64).decode("ascii", "replace")
    except OSError:
        return None
    finally:
        os.close(fd)
    return token if _TOKEN.fullmatch(token) else None


def _unmark(folder: str, token: str) -> None:
    if _marker_token(folder) == token:
        with contextlib.suppress(OSError):
            os.unlink(os.path.join(folder, MARKER))


def _leftovers(parent: str, name: str) -> list[tuple[str, str, str]]:
    """(kind, token, path) of every real folder in `parent` named like one of ours for `name` (whoever made it)."""
    found = []
    for entry in os.listdir(parent):
        for kind in (_TMP, _NEW, _PREV):
            prefix = f".{name}{kind}"
            token = entry[len(prefix) :]
            path = os.path.join(parent, entry)
            if entry.startswith(prefix) and _TOKEN.fullmatch(token) and os.path.isdir(path):
                if not os.path.islink(path):
                    found.append((kind, token, path))
    return found


def interrupted_save(final: str | os.PathLike) -> Optional[str]:
    """The complete folder a save interrupted between its two renames left beside a missing `final`
    (`.<name>.new-<token>` holding the marker), or None. The next save of `final` puts it back."""
    final = os.path.abspath(os.fspath(final))
    if os.path.lexists(final):
        return None
    parent, name = os.path.split(final)
    try:
        found = _leftovers(parent, name)
    except OSError:
        return None
    complete = [path for kind, token, path in found if kind == _NEW and _marker_token(path) == token]
    return _by_age(complete)[0] if complete else None


def interrupted_save_note(final: str | os.PathLike) -> str:
    """A sentence for a reader's "folder does not exist" error when an interrupted save explains it."""
    new = interrupted_save(final)
    if new is None:
        return ""
    return (
        f"; a save into it was interrupted between its two renames: the complete folder is {new} "
        f"(the next save of {os.fspath(final)} puts it back, or rename it yourself)"
    )


def _by_age(paths: list[str]) -> list[str]:
    return sorted(paths, key=lambda p: os.lstat(p).st_mtime, reverse=True)


def recover_and_clean(final: str) -> None:
    """After a killed save (call with the folder's lock held): put the folder back under `final` if a save died
    between the two renames of the fallback swap, then remove what killed saves left beside it.

    Only folders of this mechanism are touched: ones holding the marker, or paired through their token to one
    that holds it (`final` itself, or a `.new-`). A missing `final` is restored only from a complete `.new-`
    (it is marked before the previous folder moves away), else from the `.prev-` of the same save; a stale
    `.prev-` of a finished save never comes back after the user deleted the folder."""
    parent, name = os.path.split(final)
    found = _leftovers(parent, name)
    marked = {token for _, token, path in found if _marker_token(path) == token}
    final_token = _marker_token(final)  # a save killed after its swap, before removing the marker
    if final_token is not None:
        marked.add(final_token)
    if not os.path.lexists(final):
        news = {token: path for kind, token, path in found if kind == _NEW}
        complete = [path for kind, token, path in found if kind == _NEW and _marker_token(path) == token]
        paired = [path for kind, token, path in found if kind == _PREV and token in news]
        candidates = _by_age(complete) + _by_age(paired)
        if candidates:  # the newest complete version first, else the previous one of that save
            os.rename(candidates[0], final)
    for _, token, path in found:
        if not os.path.isdir(path) or os.path.islink(path):
            continue
        try:
            only_marker = set(os.listdir(path)) <= {MARKER}  # killed before / while writing its marker, or removing it
        except OSError:
            only_marker = False
        if token in marked or only_marker:
            _remove(path)
    final_token = _marker_token(final)
    if final_token is not None:
        _unmark(final, final_token)


def _remove(folder: str) -> None:
    """Remove a folder of ours, its marker last: one killed while removing it is still marked (or empty)."""
    with contextlib.suppress(OSError):
        with os.scandir(folder) as entries:
            listing = list(entries)
        for entry in listing:
            if entry.name == MARKER:
                continue
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path, ignore_errors=True)
            else:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(entry.path)
    shutil.rmtree(folder, ignore_errors=True)


# ---- the swap ---------------------------------------------------------------------------------
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


def _fsync_tree(root: str, kept: set[tuple[int, int]]) -> None:
    """Flush the regular files this save wrote (not the `kept` ones linked from the previous folder, not FIFOs,
    sockets or devices, which an open could block on) and every folder's entries."""
    for folder, _, files in os.walk(root):
        for name in files:
            path = os.path.join(folder, name)
            try:
                st = os.lstat(path)
            except FileNotFoundError:
                continue
            if not stat.S_ISREG(st.st_mode) or (st.st_dev, st.st_ino) in kept:
                continue
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW)
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


_KINDS_OF_FILE = {stat.S_IFIFO: "a FIFO", stat.S_IFSOCK: "a socket", stat.S_IFCHR: "a device", stat.S_IFBLK: "a device"}


def _keep_existing(src: str, dst: str, root: str, kept: set[tuple[int, int]]) -> None:
    """Put every entry of the folder `src` into `dst`: folders re-created (same mode), symlinks re-made, anything
    else hard-linked (safe: our writers replace files, never write into them); a regular file that cannot be
    linked is copied. Linked inodes go into `kept` (already on disk: not flushed again)."""
    with os.scandir(src) as entries:
        listing = list(entries)
    for entry in listing:
        if entry.name == MARKER and src == root:
            continue  # a killed save's marker
        source, target = entry.path, os.path.join(dst, entry.name)
        st = entry.stat(follow_symlinks=False)
        if stat.S_ISDIR(st.st_mode):
            os.mkdir(target, 0o700)
            _keep_existing(source, target, root, kept)
            os.chmod(target, stat.S_IMODE(st.st_mode))
        elif stat.S_ISLNK(st.st_mode):
            os.symlink(os.readlink(source), target)
        else:
            try:
                os.link(source, target, follow_symlinks=False)
                kept.add((st.st_dev, st.st_ino))
                continue
            except OSError as error:
                link_error = error
            if not stat.S_ISREG(st.st_mode):
                kind = _KINDS_OF_FILE.get(stat.S_IFMT(st.st_mode), "not a regular file")
                raise OSError(
                    link_error.errno,
                    f"cannot keep {source} ({kind}) in the new folder: it cannot be hard-linked "
                    f"({link_error.strerror}) and is not copied; move it out of {root}. Nothing was changed",
                )
            try:
                shutil.copy2(source, target, follow_symlinks=False)
            except OSError as error:
                raise OSError(
                    error.errno,
                    f"cannot keep {source} in the new folder: it can be neither hard-linked ({link_error.strerror}) "
                    f"nor read ({error.strerror}); make it readable or move it out of {root}. Nothing was changed",
                ) from error


def _swap_in(tmp: str, final: str, token: str) -> None:
    """Put the complete, marked folder `tmp` under `final`; `final` names a whole folder at every moment (the
    fallback: but for a save killed between two renames, which the next save repairs)."""
    parent, name = os.path.split(final)
    if not os.path.lexists(final):
        os.rename(tmp, final)
        _unmark(final, token)
        return
    try:
        exchanged = _exchange(tmp, final)  # one step: `final` is the new folder, `tmp` the previous one
    except OSError as error:
        if error.errno in (errno.EBUSY, errno.EXDEV):
            raise _mount_point_error(final, error) from error
        raise
    if exchanged:
        _finish(final, tmp, token)
        return
    # fallback (no RENAME_EXCHANGE): `final` is missing between two renames. The complete new folder is put
    # under `.new-<token>` (marked) first; an exception between the renames puts the previous folder back, a
    # kill there is repaired by `recover_and_clean` from `.new-<token>`
    new, prev = (os.path.join(parent, f".{name}{kind}{token}") for kind in (_NEW, _PREV))
    try:
        os.rename(tmp, new)
        os.rename(final, prev)
        os.rename(new, final)
    except BaseException as error:
        if not os.path.lexists(final) and os.path.isdir(prev):
            os.rename(prev, final)  # the save failed: the previous folder, as it was
        if os.path.isdir(new):
            _remove(new)
        if os.path.isdir(prev):  # the new folder got in place after all
            _remove(prev)
        _unmark(final, token)
        if isinstance(error, OSError) and error.errno in (errno.EBUSY, errno.EXDEV):
            raise _mount_point_error(final, error) from error
        raise
    _finish(final, prev, token)


def _finish(final: str, previous: str, token: str) -> None:
    """`final` holds the new folder (with the marker), `previous` the folder it replaced: mark that one as ours,
    take the marker out of the new one, remove the previous one."""
    with contextlib.suppress(OSError):  # unmarked, it is still paired to `final` until the marker goes
        _mark(previous, token)
    _unmark(final, token)
    _remove(previous)


def _check_target(final: str) -> str:
    """The real folder to replace for `final`, or a clear error for one that cannot be replaced whole."""
    if os.path.islink(final):  # save where the link points, as a plain write would
        try:
            os.stat(final)
        except OSError as error:
            if error.errno == errno.ELOOP:
                raise ValueError(f"cannot save {final}: it is a symlink loop; remove the link or point it at a folder")
            raise ValueError(
                f"cannot save {final}: it is a symlink to {os.readlink(final)}, which does not exist; create that "
                "folder or remove the link (folders a link points to are not created)"
            ) from error
        final = os.path.realpath(final)
    parent, name = os.path.split(final)
    if not name:
        raise ValueError(f"cannot replace {final} as a whole; give a folder below it")
    existing = parent
    while not os.path.isdir(existing) and os.path.dirname(existing) != existing:
        existing = os.path.dirname(existing)
    try:
        name_max = os.pathconf(existing, "PC_NAME_MAX")
    except (OSError, ValueError):
        name_max = 255
    size = len(os.fsencode(name))
    if size + _LONGEST_AFFIX > name_max:
        raise ValueError(
            f"cannot save {final}: its name is {size} bytes; at most {name_max - _LONGEST_AFFIX} bytes fit, since "
            f"the save writes .<name>{_PREV}xxxxxxxx beside it (the file system allows {name_max})"
        )
    if os.path.lexists(final) and not os.path.isdir(final):
        raise ValueError(f"{final} is a file; give a folder")
    if os.path.ismount(final):
        raise _mount_point_error(final)
    if os.path.isdir(final) and not os.access(final, os.W_OK):
        mode = stat.S_IMODE(os.stat(final).st_mode)
        raise PermissionError(
            errno.EACCES,
            f"cannot save {final}: the folder is not writable (mode {mode:o}); a read-only folder is kept as it "
            "is. Make it writable (chmod u+w) to save into it. Nothing was changed",
        )
    return final


@contextlib.contextmanager
def atomic_folder(
    final: str | os.PathLike, keep_existing: bool = False, lock_timeout: Optional[float] = None
) -> Iterator[str]:
    """Yield a temporary folder to fill; on success it replaces `final` whole, on error it is removed.

    - Readers see either the previous folder or the new one, never a mix, and `final` never goes missing
      (Linux: `renameat2(RENAME_EXCHANGE)`; elsewhere two renames: an exception between them puts the
      previous folder back, a kill there is repaired by the next save).
    - `keep_existing=True` starts the new folder as hard links to the current one's entries (FIFOs and
      sockets included; regular files that cannot be linked are copied), so files the caller does not write
      are kept (how `save_pretrained` writes into a folder holding other files). Only files this save wrote
      are flushed.
    - The folder keeps its mode (and group where allowed); a folder that is not writable is refused, as is a
      mount point (it cannot be renamed: save into a sub-folder of it), a dangling symlink or a symlink loop.
    - The temporary folder holds a marker file (`MARKER`) until it is in place: only such folders are ever
      restored or removed by a later save.
    - Writers of the same folder take turns (`fcntl.flock` on `.<name>.lock` beside it, `lock_timeout`
      seconds, default `LOCK_TIMEOUT_S`); each save first removes what killed saves left beside it. The same
      thread saving the folder again while it saves it gets an error at once.
    - Inside another `atomic_folder`'s temporary folder it writes straight in (the outer one swaps).
    """
    final = os.path.abspath(os.fspath(final))
    if os.path.islink(final) and os.path.exists(final):
        final = os.path.realpath(final)
    if _inside_building(final):
        os.makedirs(final, exist_ok=True)
        yield final
        return
    final = _check_target(final)
    parent, name = os.path.split(final)
    try:
        os.makedirs(parent, exist_ok=True)
    except OSError as error:
        raise _writable_error(final, parent, error) from error
    with folder_lock(final, lock_timeout):
        recover_and_clean(final)
        try:
            tmp = tempfile.mkdtemp(prefix=f".{name}{_TMP}", dir=parent)  # owner-writable while it is filled
        except OSError as error:
            raise _writable_error(final, parent, error) from error
        token = os.path.basename(tmp)[len(f".{name}{_TMP}") :]
        with _building_lock:
            _building[tmp] = final
        try:
            _mark(tmp, token)
            kept: set[tuple[int, int]] = set()
            previous = os.stat(final) if os.path.isdir(final) else None
            if keep_existing and previous is not None:
                _keep_existing(final, tmp, final, kept)
            yield tmp
            if _marker_token(tmp) != token:  # the caller emptied the folder
                _mark(tmp, token)
            if previous is not None:
                if previous.st_gid != os.stat(tmp).st_gid:
                    with contextlib.suppress(OSError):  # allowed where we are in that group
                        os.chown(tmp, -1, previous.st_gid)
                os.chmod(tmp, stat.S_IMODE(previous.st_mode))
            else:
                os.chmod(tmp, default_mode(directory=True))  # mkdtemp makes it private; others read exports
            _fsync_tree(tmp, kept)  # the new folder is on disk before its name is
            try:
                cwd_was_final = os.path.samefile(os.getcwd(), final)
            except OSError:
                cwd_was_final = False
            _swap_in(tmp, final, token)
            _fsync_dir(parent)
            if cwd_was_final:  # `save_pretrained(".")`: stay in the folder, not in the swapped-out one
                os.chdir(final)
        except BaseException:
            _remove(tmp)
            raise
        finally:
            with _building_lock:
                _building.pop(tmp, None)
