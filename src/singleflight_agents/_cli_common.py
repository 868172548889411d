"""What every command of the command line shares: its name, the user's mistake, the store."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

from .engine import Singleflight
from .signing import Signer, load_key
from .store import ReceiptStore, SQLiteStore, is_sqlite_url, open_store, sqlite_path

PROG = "singleflight-agents"


class UsageError(Exception):
    """A mistake of the user's: printed as one line, exit status 2."""


@contextmanager
def existing_store(db: str | None) -> Iterator[ReceiptStore]:
    if not is_sqlite_url(db):
        store: ReceiptStore = open_store(db)
    else:
        path = sqlite_path(db)
        if not path.is_file():
            raise UsageError(f"no store at {path}; pass --db with the path of an existing store")
        if path.stat().st_size == 0:
            raise UsageError(f"{path} is empty, not a singleflight store; pass --db with the "
                             f"path of an existing store")
        if not os.access(path, os.R_OK | os.W_OK):
            raise UsageError(f"store {path} is not readable and writable by this user; fix its "
                             f"permissions")
        store = SQLiteStore(path)
    try:
        yield store
    finally:
        store.close()


@contextmanager
def new_store(db: str | None) -> Iterator[ReceiptStore]:
    with Singleflight(db) as sf:  # creates the store and its key file
        yield sf.store


def store_signer(store: ReceiptStore) -> Signer:
    return Signer(load_key(None, store.key_path, create=False))


def utf8(text: str) -> bool:
    # A predicate, not models.check_text: its message quotes the whole value, and an
    # export's FAIL line must not print a receipt's output.
    try:
        text.encode()
    except UnicodeEncodeError:  # lone surrogates: bytes of another encoding on the command line
        return False
    return True
