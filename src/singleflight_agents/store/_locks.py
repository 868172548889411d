"""Per-key lock files beside the SQLite store: the liveness lock of a lease.

The holder keeps an ``flock`` on its key's lock file for as long as it executes. Waiters in
other processes block on that lock, so the kernel wakes them the moment the holder finishes
and also when it dies: no polling, and a killed holder is taken over at once instead of
after its lease lapses.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
import stat
import threading
from pathlib import Path

from ..models import StoreError

# Lock fds this process holds; closed in a forked child so a child cannot keep a
# parent's lease alive after the parent is gone.
_HELD_FDS: set[int] = set()


def _close_inherited_fds() -> None:
    for fd in list(_HELD_FDS):
        with contextlib.suppress(OSError):
            os.close(fd)
    _HELD_FDS.clear()


os.register_at_fork(after_in_child=_close_inherited_fds)


class KeyLocks:
    """One lock file per key in flight; the file exists only while a holder runs.

    Lock files live only in a real directory of this user, and only under names of the
    lock-file form, so that ``prune`` can tell its own files from anything else."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

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
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                return None
            except BaseException:
                os.close(fd)
                raise
            if _same_file(path, info):
                _HELD_FDS.add(fd)
                return fd
            os.close(fd)  # the previous holder unlinked it after we opened: lock the new one

    def unlock(self, key: str, fd: int) -> None:
        path = self._path(key)
        if _same_file(path, os.fstat(fd)):  # not a newer holder's file
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        _HELD_FDS.discard(fd)
        # Unlock before closing: a forked child may still hold a copy of this fd.
        fcntl.flock(fd, fcntl.LOCK_UN)
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
                fcntl.flock(fd, fcntl.LOCK_SH)
                fcntl.flock(fd, fcntl.LOCK_UN)  # explicit: a forked child may share this fd
            finally:
                os.close(fd)
                released.set()

        # flock has no timeout: block in a helper thread and stop waiting for it after
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
        if info.st_uid != os.geteuid():
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
        # Opened without following a symlink, so the directory listed is the one checked.
        try:
            directory = os.open(self.directory, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW
                                | os.O_CLOEXEC)
        except FileNotFoundError:
            return 0
        try:
            self._refuse_unless_ours(os.fstat(directory))
            return sum(_prune_file(directory, name) for name in os.listdir(directory)
                       if _LOCK_NAME.fullmatch(name))
        finally:
            os.close(directory)


# What fingerprint_of returns: the only names a lock file ever has, and the only ones
# prune deletes.
_LOCK_NAME = re.compile(r"[0-9a-f]{64}")

# O_NOFOLLOW: a symlink is never a lock file. O_NONBLOCK: opening a FIFO planted at a
# lock path must not hang (it is then refused as not a regular file). flock ignores it.
_LOCK_FLAGS = os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


def _open_lock_file(path: str, flags: int) -> int:
    try:
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


def _prune_file(directory: int, name: str) -> int:
    """1 if the lock file ``name`` was stale and deleted; anything not provably a lock
    file of this user (a symlink, FIFO, directory, another user's file) is left alone."""
    try:
        fd = os.open(name, os.O_RDWR | _LOCK_FLAGS, dir_fd=directory)
    except OSError:  # gone, a symlink, a directory, a socket: not ours to delete
        return 0
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_uid != os.geteuid():
            return 0
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return 0  # a live holder's
        try:
            now = os.stat(name, dir_fd=directory, follow_symlinks=False)
            # Its holder may have finished and a new one made a new file: that one is live.
            if (now.st_dev, now.st_ino) != (info.st_dev, info.st_ino):
                return 0
            os.unlink(name, dir_fd=directory)
            return 1
        except FileNotFoundError:
            return 0
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)  # before closing: a forked child may share this fd
    finally:
        os.close(fd)
