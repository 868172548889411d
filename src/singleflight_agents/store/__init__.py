"""Stores: chosen by URL. A path or ``sqlite:///path`` opens the embedded SQLite store."""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from pathlib import Path
from urllib.parse import parse_qsl, urlencode

from ..models import StoreError
from .base import Admin, Busy, Failure, Lease, ReceiptsAndLeases, ReceiptStore, Statistics
from .sqlite import SQLiteStore

DEFAULT_PATH = Path(".singleflight") / "receipts.db"

__all__ = ["DEFAULT_PATH", "REDIS_SCHEMES", "Admin", "Busy", "Failure", "Lease",
           "ReceiptStore", "ReceiptsAndLeases", "SQLiteStore", "Statistics", "is_sqlite_url",
           "open_store", "redact_url", "register_backend", "sqlite_path"]


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


ENTRY_POINTS = "singleflight_agents.stores"  # a package's backends, found by URL scheme
_BACKENDS: dict[str, Callable[[str], ReceiptStore]] = {}


def register_backend(scheme: str, opener: Callable[[str], ReceiptStore]) -> None:
    """Open store URLs ``<scheme>://...`` with ``opener(url)`` (a third backend; see
    docs/stores.md). A package may instead name its opener in the ``singleflight_agents.stores``
    entry-point group, under the scheme, and be found without an import."""
    if not re.fullmatch(r"[a-z][a-z0-9+.-]*", scheme) or scheme in ("sqlite", "redis", "rediss",
                                                                      "unix"):
        raise ValueError(f"register_backend(): {scheme!r} is not a scheme of its own; give the "
                         f"part of the URL before :// (lower-case), not sqlite or redis")
    _BACKENDS[scheme] = opener


def _opener(url: object) -> Callable[[str], ReceiptStore] | None:
    if not isinstance(url, str) or "://" not in url:
        return None
    scheme = url.split("://", 1)[0]
    if scheme in _BACKENDS or scheme in ("sqlite", "redis", "rediss", "unix"):
        return _BACKENDS.get(scheme)
    from importlib.metadata import entry_points

    for entry in entry_points(group=ENTRY_POINTS, name=scheme):
        _BACKENDS[scheme] = entry.load()
        return _BACKENDS[scheme]
    return None


def is_sqlite_url(url: str | os.PathLike[str] | None) -> bool:
    """Whether ``url`` names an SQLite file (a path, ``sqlite://`` or the default)."""
    return not (isinstance(url, str) and url.startswith(REDIS_SCHEMES)) and _opener(url) is None


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


def open_store(url: str | os.PathLike[str] | None = None) -> ReceiptStore:
    """The store for ``url``: ``redis://``, ``rediss://`` and ``unix://`` URLs open a
    :class:`RedisStore` (extra ``[redis]``), anything else an SQLite file (see
    :func:`sqlite_path`), created if missing."""
    opener = _opener(url)
    if opener is not None:
        assert isinstance(url, str)
        store = opener(url)
        if not isinstance(store, ReceiptStore):
            raise StoreError(f"the backend for {redact_url(url)!r} opened a "
                             f"{type(store).__name__}, not a ReceiptStore")
        return store
    if not is_sqlite_url(url):
        assert isinstance(url, str)
        try:
            from .redis import RedisStore
        except ImportError:
            raise StoreError(f"store URL {redact_url(url)!r} needs the redis client: "
                             f"pip install 'singleflight-agents[redis]'") from None
        return RedisStore(url)
    return SQLiteStore(sqlite_path(url))
