"""Stores: chosen by URL. A path or ``sqlite:///path`` opens the embedded SQLite store."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import parse_qsl, urlencode

from ..models import Receipt, StoreError
from .base import Busy, Failure, Lease, ReceiptStore
from .sqlite import SQLiteStore

DEFAULT_PATH = Path(".singleflight") / "receipts.db"

__all__ = ["DEFAULT_PATH", "REDIS_SCHEMES", "Busy", "Failure", "Lease", "ReceiptStore",
           "SQLiteStore", "is_sqlite_url", "keyed_receipts", "open_store", "redact_url",
           "sqlite_path"]


def sqlite_path(url: str | os.PathLike[str] | None) -> Path:
    """The file an SQLite store URL names: ``None`` (the default), a path, or
    ``sqlite:///relative.db`` / ``sqlite:////absolute.db``."""
    if url is None:
        return DEFAULT_PATH
    text = os.fspath(url)
    if text.startswith("sqlite://"):
        path = text.removeprefix("sqlite://")
        if not path.startswith("/") or path == "/":
            raise StoreError(f"store URL {text!r} has no path; write sqlite:///relative.db "
                             f"or sqlite:////absolute/path.db")
        return Path(path[1:])
    if "://" in text:
        scheme = text.split("://", 1)[0]
        raise StoreError(f"store URL {text!r}: unknown scheme {scheme!r}; use a file path, "
                         f"sqlite:///path or redis://host:port/db")
    if not text.strip():
        raise StoreError("store path is empty; pass a file path such as .singleflight/receipts.db")
    return Path(text)


REDIS_SCHEMES = ("redis://", "rediss://", "unix://")


def is_sqlite_url(url: str | os.PathLike[str] | None) -> bool:
    """Whether ``url`` names an SQLite file (a path, ``sqlite://`` or the default)."""
    return not (isinstance(url, str) and url.startswith(REDIS_SCHEMES))


def redact_url(url: str) -> str:
    """``url`` without its password (user info or ``password=`` query), for messages."""
    if "://" not in url:
        return url
    # By hand, not urlsplit/urlunsplit: those turn unix:///path into unix:/path and raise
    # on a malformed host, and a message about a bad URL must still show it.
    scheme, _, rest = url.partition("://")
    rest, mark, query = rest.partition("?")
    if scheme == "unix":
        netloc, slash, path = rest.partition("/")
        rest = netloc.rpartition("@")[2] + slash + path
    else:  # the rest is host, port and db: user info ends at its last '@'
        rest = rest.rpartition("@")[2]
    if mark:
        query = urlencode([(k, v) for k, v in parse_qsl(query, keep_blank_values=True)
                           if k != "password"], errors="surrogateescape")
    return f"{scheme}://{rest}" + (f"?{query}" if query else "")


def keyed_receipts(store: ReceiptStore) -> Iterator[tuple[object, Receipt]]:
    """Every receipt with the key the engine looks it up by, which must be its fingerprint.
    On SQLite the key *is* the fingerprint column, so only a Redis key can differ."""
    keyed = getattr(store, "keyed_receipts", None)  # the Redis store's own
    if keyed is not None:
        return iter(keyed())
    return ((receipt.fingerprint, receipt) for receipt in store.iter_receipts())


def open_store(url: str | os.PathLike[str] | None = None) -> ReceiptStore:
    """The store for ``url``: ``redis://``, ``rediss://`` and ``unix://`` URLs open a
    :class:`RedisStore` (extra ``[redis]``), anything else an SQLite file (see
    :func:`sqlite_path`), created if missing."""
    if not is_sqlite_url(url):
        assert isinstance(url, str)
        try:
            from .redis import RedisStore
        except ImportError:
            raise StoreError(f"store URL {redact_url(url)!r} needs the redis client: "
                             f"pip install 'singleflight-agents[redis]'") from None
        return RedisStore(url)
    return SQLiteStore(sqlite_path(url))
