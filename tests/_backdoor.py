"""Raw access to a store's data, as an attacker or a crashed process would leave it:
the same edits on SQLite and on Redis, so tamper and lease tests run on both."""

from __future__ import annotations

import sqlite3
import time
from typing import Any

from singleflight_agents.models import Receipt
from singleflight_agents.store import ReceiptStore, SQLiteStore


def _redis(store: ReceiptStore) -> Any:
    return store._redis  # type: ignore[attr-defined]


def edit_receipts(store: ReceiptStore, field: str, value: object) -> None:
    """Set ``field`` of every receipt to ``value`` (``None`` removes it)."""
    if isinstance(store, SQLiteStore):
        db = sqlite3.connect(store.path)
        with db:
            db.execute(f"UPDATE receipts SET {field} = ?", (value,))
        db.close()
        return
    client = _redis(store)
    for name in client.scan_iter(match=f"{store.prefix}r:*"):  # type: ignore[attr-defined]
        if value is None:
            client.hdel(name, field)
        else:
            client.hset(name, field, value)


def swap_receipts(store: ReceiptStore, first: str, second: str) -> None:
    """Exchange what is stored under two fingerprints."""
    if isinstance(store, SQLiteStore):
        db = sqlite3.connect(store.path)
        with db:
            db.execute("UPDATE receipts SET fingerprint = 'tmp' WHERE fingerprint = ?", (first,))
            db.execute("UPDATE receipts SET fingerprint = ? WHERE fingerprint = ?", (first, second))
            db.execute("UPDATE receipts SET fingerprint = ? WHERE fingerprint = 'tmp'", (second,))
        db.close()
        return
    client = _redis(store)
    a, b = (f"{store.prefix}r:{key}" for key in (first, second))  # type: ignore[attr-defined]
    client.rename(a, "swap-tmp")
    client.rename(b, a)
    client.rename("swap-tmp", b)


def lease_expiries(store: ReceiptStore) -> list[float]:
    """When each lease in the store lapses (Unix seconds)."""
    if isinstance(store, SQLiteStore):
        db = sqlite3.connect(store.path)
        try:
            return [row[0] for row in db.execute("SELECT expires_at FROM leases")]
        finally:
            db.close()
    client = _redis(store)
    return [int(client.hget(name, "expires")) / 1000
            for name in client.scan_iter(match=f"{store.prefix}l:*")]  # type: ignore[attr-defined]


def unsigned_receipt(key: str, token: int, output: str) -> Receipt:
    """A receipt as a store holds it, for store-level tests (no signature)."""
    now = time.time()
    return Receipt(fingerprint=key, tool_name="t", namespace="default", scope="default",
                   version="1", inputs=None, inputs_sha256="0" * 64, codec="json", output=output,
                   created_at=now, expires_at=now + 60, latency_ms=1.0, cost_usd=0.0,
                   executor="x", token=token, key_id="0" * 16, signature="")
