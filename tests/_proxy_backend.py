"""A third backend for the shared suite's own test: the SQLite store reached through a URL
scheme of its own (``proxy:///path``), registered as a package would register one."""

from __future__ import annotations

from singleflight_agents.store import SQLiteStore, register_backend


def open_proxy(url: str) -> SQLiteStore:
    return SQLiteStore(url.removeprefix("proxy://"))


register_backend("proxy", open_proxy)
