"""What differs between POSIX and Windows, in one place: the rest of the package imports
these names instead of reaching for a POSIX-only one, so that it imports everywhere."""

from __future__ import annotations

import errno
import os
from collections.abc import Callable

# Flags that only some platforms define; 0 leaves a flag out where it does not exist.
# Without O_NOFOLLOW (Windows), callers check for a symlink by path before opening.
O_CLOEXEC: int = getattr(os, "O_CLOEXEC", 0)
O_NOFOLLOW: int = getattr(os, "O_NOFOLLOW", 0)
O_NONBLOCK: int = getattr(os, "O_NONBLOCK", 0)
O_DIRECTORY: int = getattr(os, "O_DIRECTORY", 0)
# Windows opens files in text mode unless told otherwise.
O_BINARY: int = getattr(os, "O_BINARY", 0)


def at_fork_in_child(reset: Callable[[], None]) -> None:
    """Run ``reset`` in a forked child; nothing where processes are never forked."""
    at_fork(after_in_child=reset)


def at_fork(**hooks: Callable[[], None]) -> None:
    """``os.register_at_fork(**hooks)`` where processes can be forked; else nothing."""
    register = getattr(os, "register_at_fork", None)
    if register is not None:
        register(**hooks)


def user_id() -> int | None:
    """This process's effective user id, or ``None`` where files have no POSIX owner."""
    geteuid = getattr(os, "geteuid", None)
    return geteuid() if geteuid is not None else None


def owned_by_someone_else(info: os.stat_result) -> bool:
    """Whether a file belongs to another user; never on a platform without POSIX owners,
    whose protection is the directory's access list (docs/security.md)."""
    uid = user_id()
    return uid is not None and info.st_uid != uid


def has_posix_modes() -> bool:
    """Whether a file's mode bits say who may read and write it (not on Windows)."""
    return os.name == "posix"


def host_name() -> str:
    import socket  # here: only an engine's owner id needs it, not the import

    return socket.gethostname()


def refuse_symlink(path: str | os.PathLike[str]) -> None:
    """Where ``O_NOFOLLOW`` is missing: raise ``OSError(ELOOP)`` if ``path`` is a symlink,
    checked by path just before the open (the best a platform without the flag allows)."""
    if not O_NOFOLLOW and os.path.islink(path):
        raise OSError(errno.ELOOP, "Too many levels of symbolic links", os.fspath(path))
