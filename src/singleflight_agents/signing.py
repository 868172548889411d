"""HMAC-SHA256 signatures over receipts, and where the key comes from.

The key is ``secret=``, else ``$SINGLEFLIGHT_SECRET``, else a key file beside the
store (created 0600). The key file holds the secret as text, in the format of
``$SINGLEFLIGHT_SECRET``: its content set as that variable checks the same receipts. The
key is never written into the store it protects: the store only keeps a key id
(an HMAC of a fixed label), so a wrong key can be told from tampering.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import operator
import os
import stat
import warnings
from pathlib import Path

from ._platform import (
    O_BINARY,
    O_CLOEXEC,
    O_NOFOLLOW,
    O_NONBLOCK,
    has_posix_modes,
    owned_by_someone_else,
    refuse_symlink,
)
from .models import RECEIPT_FIELDS, RECEIPT_NUMBERS, Receipt, StoreError

ENV_SECRET = "SINGLEFLIGHT_SECRET"


# Every field but the signature itself, in the receipt's order.
_SIGNED = operator.attrgetter(*RECEIPT_FIELDS[:-1])
_NUMBER_AT = tuple((RECEIPT_FIELDS.index(name), kind) for name, kind in RECEIPT_NUMBERS.items())


class Signer:
    """Signs and verifies receipts with one key."""

    def __init__(self, key: bytes) -> None:
        if len(key) < 16:
            raise ValueError("the signing secret must be at least 16 bytes long")
        self.key_id = hmac.new(key, b"singleflight-agents key id", hashlib.sha256).hexdigest()[:16]
        self._mac = hmac.new(key, digestmod=hashlib.sha256)  # keyed once, copied per receipt

    def _digest(self, receipt: Receipt) -> str:
        # The repr of a tuple of str, None, float and int is unambiguous (quoted, escaped)
        # and built in C. Numbers are normalised, since a store may hand back 1.0 for 1.
        values = list(_SIGNED(receipt))
        for index, kind in _NUMBER_AT:
            number = _number(values[index])
            values[index] = int(number) if kind is int else number
        message = repr(tuple(values)).encode()
        mac = self._mac.copy()
        mac.update(message)
        return mac.hexdigest()

    def sign(self, receipt: Receipt) -> Receipt:
        unsigned = dataclasses.replace(receipt, key_id=self.key_id, signature="")
        return dataclasses.replace(unsigned, signature=self._digest(unsigned))

    def verify(self, receipt: Receipt) -> bool:
        return hmac.compare_digest(self._digest(receipt), receipt.signature)


def _number(value: object) -> float:
    # Text that looks like a number is not one: a field rewritten as text is tampered.
    if type(value) not in (int, float):
        raise TypeError(f"receipt field holds {type(value).__name__}, not a number")
    return float(value)  # type: ignore[arg-type]


def key_path_for(db_path: Path) -> Path:
    return db_path.with_name(db_path.name + ".key")


def secret_key(secret: str | bytes, source: str = "secret=") -> bytes:
    """The key a secret gives: a string stripped, as the key file is (`export
    SINGLEFLIGHT_SECRET="$(cat x.key)"`, or a secret pasted with its newline, is the same
    key); shorter than 16 bytes is refused."""
    key = secret.strip().encode() if isinstance(secret, str) else secret
    if len(key) < 16:
        raise StoreError(f"the signing secret from {source} is shorter than 16 bytes; use a "
                         f"long random one")
    return key


def load_key(secret: str | bytes | None, key_path: Path | None, create: bool = True) -> bytes:
    """The signing key, from the first source that has one; ``create`` makes the key file."""
    source = "secret="
    if secret is None:
        secret, source = os.environ.get(ENV_SECRET) or None, f"${ENV_SECRET}"
    if secret is not None:
        return secret_key(secret, source)
    if key_path is None:
        raise StoreError(f"no signing key: pass secret= or set {ENV_SECRET}")
    if not create and not os.path.lexists(key_path):
        raise StoreError(f"signing key file {key_path} is missing, so receipts cannot be checked; "
                         f"restore it or set {ENV_SECRET} to the secret that signed them")
    return _read_or_create_key_file(key_path)


def _read_or_create_key_file(path: Path) -> bytes:
    if not os.path.lexists(path):  # a dangling symlink is not missing: it is refused below
        tmp = path.with_name(f"{path.name}.{os.getpid()}.{os.urandom(4).hex()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(os.urandom(32).hex() + "\n")
        try:
            os.link(tmp, path)  # atomic: a concurrent creator's key wins, never a half-written one
        except FileExistsError:
            pass
        finally:
            os.unlink(tmp)
    info, data = _read_key_file(path)
    # Whoever can write the key can forge receipts, and forged pickles run code.
    if owned_by_someone_else(info):
        raise StoreError(f"signing key file {path} belongs to another user; delete it or set "
                         f"{ENV_SECRET}")
    if not has_posix_modes():
        pass  # Windows: the mode bits say nothing of its access list (docs/security.md)
    elif info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise StoreError(f"signing key file {path} is writable by group or others; "
                         f"chmod 600 it (and check nobody changed it) or set {ENV_SECRET}")
    elif info.st_mode & (stat.S_IRGRP | stat.S_IROTH):
        # Warned, not refused: a git checkout or a CI cache restore leaves 0644, and a refusal
        # would fail every such job without taking back what was already readable.
        warnings.warn(f"signing key file {path} is readable by group or others, who could "
                      f"forge receipts with it; chmod 600 {path}", RuntimeWarning, stacklevel=2)
    # The file holds the secret as text, exactly what $SINGLEFLIGHT_SECRET would hold, so
    # `SINGLEFLIGHT_SECRET="$(cat receipts.db.key)"` checks the same receipts in CI.
    try:
        key = data.decode().strip().encode()
    except UnicodeDecodeError:
        raise StoreError(f"signing key file {path} is not UTF-8 text; delete it or set "
                         f"{ENV_SECRET}") from None
    if len(key) < 16:
        raise StoreError(f"signing key file {path} holds a key shorter than 16 bytes; delete it")
    return key


def _read_key_file(path: Path) -> tuple[os.stat_result, bytes]:
    # O_NOFOLLOW: a symlink is refused. O_NONBLOCK: a FIFO planted here must not hang every
    # process that opens the store; it, like anything else not a regular file, is refused.
    try:
        refuse_symlink(path)
        fd = os.open(path, os.O_RDONLY | O_NOFOLLOW | O_NONBLOCK | O_CLOEXEC | O_BINARY)
    except OSError as exc:
        raise StoreError(f"cannot read signing key file {path}: {exc.strerror} (a symlink is "
                         f"refused); fix it or set {ENV_SECRET}") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise StoreError(f"signing key file {path} is not a regular file; delete it or set "
                             f"{ENV_SECRET}")
        with os.fdopen(fd, "rb", closefd=False) as handle:
            return info, handle.read()
    except OSError as exc:
        raise StoreError(f"cannot read signing key file {path}: {exc.strerror}; fix it or "
                         f"set {ENV_SECRET}") from None
    finally:
        os.close(fd)
