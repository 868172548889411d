"""Stores: chosen by URL. A path or ``sqlite:///path`` opens the embedded SQLite store."""

from __future__ import annotations

import os
from pathlib import Path

from ..models import StoreError
from .base import Busy, Failure, Lease, ReceiptStore
from .sqlite import SQLiteStore

DEFAULT_PATH = Path(".singleflight") / "receipts.db"

__all__ = ["Busy", "Failure", "Lease", "ReceiptStore", "SQLiteStore", "open_store"]


def open_store(url: str | os.PathLike[str] | None = None) -> ReceiptStore:
    """The store for ``url``: ``None`` (``.singleflight/receipts.db`` under the cwd), a
    file path, or ``sqlite:///relative/or//absolute/path``."""
    if url is None:
        return SQLiteStore(DEFAULT_PATH)
    text = os.fspath(url)
    if text.startswith("sqlite://"):
        path = text.removeprefix("sqlite://")
        if not path.startswith("/") or path == "/":
            raise StoreError(f"store URL {text!r} has no path; write sqlite:///relative.db "
                             f"or sqlite:////absolute/path.db")
        return SQLiteStore(path[1:])
    if "://" in text:
        scheme = text.split("://", 1)[0]
        raise StoreError(f"store URL {text!r}: unknown scheme {scheme!r}; use a file path or "
                         f"sqlite:///path")
    if not text:
        raise StoreError("store path is empty; pass a file path such as .singleflight/receipts.db")
    return SQLiteStore(text)
