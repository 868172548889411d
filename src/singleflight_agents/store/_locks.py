"""Per-key lock files beside the SQLite store: the liveness lock of a lease.

The holder keeps a liveness lock (:mod:`._liveness`: ``flock`` on POSIX) on its key's lock
file for as long as it executes. Waiters in other processes wait on that lock, so they wake
the moment the holder finishes and also when it dies: a killed holder is taken over at once
instead of after its lease lapses.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import stat
import threading
from pathlib import Path

from .._platform import (
    O_CLOEXEC,
    O_DIRECTORY,
    O_NOFOLLOW,
    O_NONBLOCK,
    at_fork_in_child,
    owned_by_someone_else,
    refuse_symlink,
)
from ..models import StoreError
from ._liveness import LivenessLock

# Lock fds this process holds; closed in a forked child so a child cannot keep a
# parent's lease alive after the parent is gone.
_HELD_FDS: set[int] = set()


def _close_inherited_fds() -> None:
    for fd in list(_HELD_FDS):
        with contextlib.suppress(OSError):
            os.close(fd)
    _HELD_FDS.clear()


at_fork_in_child(_close_inherited_fds)


class KeyLocks:
    """One lock file per key in flight; the file exists only while a holder runs.

    Lock files live only in a real directory of this user, and only under names of the
    lock-file form, so that ``prune`` can tell its own files from anything else."""

    def __init__(self, directory: Path, lock: LivenessLock) -> None:
        self.directory = directory
        self._lock = lock

    def _path(self, key: str) -> str:
        if not _LOCK_NAME.fullmatch(key):
            raise StoreError(f"lock key {key!r} is not a fingerprint (64 lowercase hex digits)")
        return os.path.join(self.directory, key)

    def try_lock(self, key: str) -> int | None:
        path = self._path(key)
        self._check_directory(create=True)
        while True:
            try:
                fd = _open_lock_file(path, os.O_RDWR | os.O_CREAT)
            except (FileNotFoundError, NotADirectoryError):  # removed since the check
                self._check_directory(create=True)
                continue
            try:
                info = _regular(fd, path)
                locked = self._lock.try_lock(fd)
            except BaseException:
                os.close(fd)
                raise
            if not locked:
                os.close(fd)
                return None
            if _same_file(path, info):
                _HELD_FDS.add(fd)
                return fd
            os.close(fd)  # the previous holder unlinked it after we opened: lock the new one

    def unlock(self, key: str, fd: int) -> None:
        path = self._path(key)
        # Where open files cannot be unlinked, the file stays until prune.
        if self._lock.unlinks_open_files and _same_file(path, os.fstat(fd)):  # not a newer holder's
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        _HELD_FDS.discard(fd)
        # Unlock before closing: a forked child may still hold a copy of this fd.
        self._lock.unlock(fd)
        os.close(fd)

    def wait(self, key: str, timeout: float) -> None:
        path = self._path(key)
        if not self._check_directory(create=False):
            return
        try:
            fd = _open_lock_file(path, os.O_RDONLY)
        except FileNotFoundError:
            return
        try:
            _regular(fd, path)
        except BaseException:
            os.close(fd)
            raise
        released = threading.Event()

        def block() -> None:
            try:
                self._lock.wait_free(fd)
            finally:
                os.close(fd)
                released.set()

        # The lock has no timeout: block in a helper thread and stop waiting for it after
        # `timeout`. The thread ends when the holder does and closes only its own fd.
        threading.Thread(target=block, name="singleflight-wait", daemon=True).start()
        released.wait(timeout)

    def _check_directory(self, create: bool) -> bool:
        """Whether the lock directory exists (made if ``create``); raises unless it is a
        real directory of this user. Checked by path before each use: replacing it after
        the check needs write access to the store's own directory (a sticky /tmp does
        not give that), and whoever has it can replace the store itself."""
        try:
            info = os.lstat(self.directory)
        except FileNotFoundError:
            if not create:
                return False
            self._make_directory()
            info = os.lstat(self.directory)
        self._refuse_unless_ours(info)
        return True

    def _refuse_unless_ours(self, info: os.stat_result) -> None:
        if stat.S_ISLNK(info.st_mode):
            raise StoreError(f"lock directory {self.directory} is a symlink, and lock files are "
                             f"only kept in a real directory; delete the symlink (not its target)")
        if not stat.S_ISDIR(info.st_mode):
            raise StoreError(f"cannot make the lock directory {self.directory}: a file of that "
                             f"name exists; move that file away")
        if owned_by_someone_else(info):
            raise StoreError(f"lock directory {self.directory} belongs to another user; delete "
                             f"it or pass another --db")

    def _make_directory(self) -> None:
        try:
            self.directory.mkdir(mode=0o700, exist_ok=True)
        except OSError as exc:  # e.g. a file of that name
            raise StoreError(f"cannot make the lock directory {self.directory}: "
                             f"{exc.strerror}; move that file away") from None

    def prune(self) -> int:
        """Delete the lock files no holder has locked: only regular files of this user, with
        names of the lock-file form, in this user's real lock directory (never through a
        symlink, which would delete the files it points to)."""
        if not self._check_directory(create=False):
            return 0
        if not _DIR_FDS:  # Windows: by path, checked just above
            return sum(self._prune_file(None, os.path.join(self.directory, name))
                       for name in os.listdir(self.directory) if _LOCK_NAME.fullmatch(name))
        # Opened without following a symlink, so the directory listed is the one checked.
        try:
            directory = os.open(self.directory, os.O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC)
        except FileNotFoundError:
            return 0
        try:
            self._refuse_unless_ours(os.fstat(directory))
            return sum(self._prune_file(directory, name) for name in os.listdir(directory)
                       if _LOCK_NAME.fullmatch(name))
        finally:
            os.close(directory)

    def _prune_file(self, directory: int | None, name: str) -> int:
        """1 if the lock file ``name`` was stale and deleted; anything not provably a lock
        file of this user (a symlink, FIFO, directory, another user's file) is left alone."""
        try:
            refuse_symlink(name)
            fd = os.open(name, os.O_RDWR | _LOCK_FLAGS, dir_fd=directory)
        except OSError:  # gone, a symlink, a directory, a socket: not ours to delete
            return 0
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode) or owned_by_someone_else(info):
                return 0
            if not self._lock.try_lock(fd):
                return 0  # a live holder's
            if self._lock.unlinks_open_files:
                try:  # unlinked while locked, so no new holder can have locked it meanwhile
                    return _unlink_if_same(directory, name, info)
                finally:
                    self._lock.unlock(fd)  # before closing: a forked child may share this fd
            # Windows: the unlink fails while anyone, this process included, has it open.
            self._lock.unlock(fd)
            os.close(fd)
            fd = -1
            return _unlink_if_same(directory, name, info)
        finally:
            if fd >= 0:
                os.close(fd)


# What fingerprint_of returns: the only names a lock file ever has, and the only ones
# prune deletes.
_LOCK_NAME = re.compile(r"[0-9a-f]{64}")

# O_NOFOLLOW: a symlink is never a lock file. O_NONBLOCK: opening a FIFO planted at a
# lock path must not hang (it is then refused as not a regular file). The locks ignore it.
_LOCK_FLAGS = O_NOFOLLOW | O_NONBLOCK | O_CLOEXEC

# Whether a directory can be opened, listed and used as dir_fd (not on Windows).
_DIR_FDS = os.open in os.supports_dir_fd and os.listdir in os.supports_fd and bool(O_DIRECTORY)


def _open_lock_file(path: str, flags: int) -> int:
    try:
        refuse_symlink(path)
        return os.open(path, flags | _LOCK_FLAGS, 0o600)
    except OSError as exc:
        if exc.errno != errno.ELOOP:
            raise
    raise StoreError(f"lock file {path} is a symlink, never a lock file; delete the symlink")


def _regular(fd: int, path: str) -> os.stat_result:
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        raise StoreError(f"lock file {path} is not a regular file; delete it")
    return info


def _same_file(path: str, info: os.stat_result) -> bool:
    try:
        now = os.lstat(path)
    except FileNotFoundError:
        return False
    return (now.st_dev, now.st_ino) == (info.st_dev, info.st_ino)


def _unlink_if_same(directory: int | None, name: str, info: os.stat_result) -> int:
    """Unlink ``name`` unless a new holder has made a new file there since (that one is
    live); on Windows the unlink itself fails while anyone has the file open."""
    try:
        now = os.stat(name, dir_fd=directory, follow_symlinks=False)
        if (now.st_dev, now.st_ino) != (info.st_dev, info.st_ino):
            return 0
        os.unlink(name, dir_fd=directory)
        return 1
    except (FileNotFoundError, PermissionError):
        return 0
