"""Writing rendered units to a directory: every file or none, never half a pair.

Everything that can be checked is checked before the first byte is written: no file is
replaced without --force, and nothing but a file (or a symlink, which is replaced, not
followed) ever is. Each unit is written to a new temporary file in the directory
(mkstemp: O_CREAT|O_EXCL|O_NOFOLLOW under a random name, so a planted symlink is never
followed), mode 0644 and synced, and only when all are written are they moved into place.
Errors name the unit file the user asked for, not a temporary one.
"""

import contextlib
import errno
import os
import stat
import tempfile

from forkproxy.errors import ForkproxyError

_TEMPORARY_PREFIX = ".forkproxy-units-"


def write_units(files: dict[str, str], directory: str, force: bool) -> list[str]:
    """Write every file or none; return the paths written."""
    paths = {name: os.path.join(directory, name) for name in files}
    try:
        os.makedirs(directory, exist_ok=True)
    except OSError as e:
        where = e.filename or directory
        raise ForkproxyError(f"cannot create directory '{where}': {e.strerror}") from None
    for path in paths.values():
        _check_replaceable(path, force)
    temporary: dict[str, str] = {}
    created: list[str] = []  # new files (not replacing any), removed again on a failure
    try:
        for name, text in files.items():
            temporary[name] = _write_temporary(directory, paths[name], text)
        for name in files:
            _move_into_place(temporary[name], paths[name], force)
            del temporary[name]
            if not force:
                created.append(paths[name])
    except ForkproxyError:
        for path in created:
            with contextlib.suppress(OSError):
                os.unlink(path)
        raise
    finally:
        for leftover in temporary.values():
            with contextlib.suppress(OSError):
                os.unlink(leftover)
    _sync_directory(directory)
    return list(paths.values())


def _check_replaceable(path: str, force: bool) -> None:
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    except OSError as e:
        raise ForkproxyError(f"cannot write '{path}': {e.strerror}") from None
    if not force:
        raise ForkproxyError(f"'{path}' exists: remove it or pass --force")
    if not (stat.S_ISREG(mode) or stat.S_ISLNK(mode)):
        raise ForkproxyError(f"cannot replace '{path}': not a file (--force replaces files only)")


def _write_temporary(directory: str, path: str, text: str) -> str:
    try:
        fd, temporary = tempfile.mkstemp(prefix=_TEMPORARY_PREFIX, suffix=".tmp", dir=directory)
    except OSError as e:
        raise ForkproxyError(f"cannot write '{path}': {e.strerror}") from None
    try:
        with open(fd, "w", encoding="utf-8", closefd=True) as f:
            os.fchmod(f.fileno(), 0o644)
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise ForkproxyError(f"cannot write '{path}': {e.strerror}") from None
    return temporary


def _move_into_place(temporary: str, path: str, force: bool) -> None:
    """rename(2) over the old file with --force; else link(2), which never replaces one
    that appeared since the check (rename(2) where the file system has no hard links)."""
    try:
        if force:
            os.replace(temporary, path)
            return
        try:
            os.link(temporary, path, follow_symlinks=False)
        except OSError as e:
            if e.errno not in (errno.EPERM, errno.EOPNOTSUPP) or os.path.lexists(path):
                raise
            os.replace(temporary, path)
        else:
            os.unlink(temporary)
    except FileExistsError:
        raise ForkproxyError(f"'{path}' exists: remove it or pass --force") from None
    except OSError as e:
        raise ForkproxyError(f"cannot write '{path}': {e.strerror}") from None


def _sync_directory(directory: str) -> None:
    """Make the new names durable; best effort (the files are in place already)."""
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems cannot sync a directory
    finally:
        os.close(fd)
