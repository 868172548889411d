"""What an engine opens on first use: its store, the key that signs for it, the heartbeat that
renews its leases, and the flush of its statistics at exit."""

from __future__ import annotations

import os
import weakref
from typing import Any

from ._accounting import flush_finally
from .heartbeat import Heartbeat
from .sessions import check_replayable
from .signing import Signer, load_key
from .stats import Stats
from .store import ReceiptStore, open_store


class Backend:
    __slots__ = ("flush_at_end", "heartbeat", "signer", "store")

    def __init__(self, store: ReceiptStore, signer: Signer, heartbeat: Heartbeat,
                 flush_at_end: weakref.finalize[Any, Any]) -> None:
        self.store, self.signer, self.heartbeat = store, signer, heartbeat
        self.flush_at_end = flush_at_end


def open_backend(engine: object, where: str | os.PathLike[str] | ReceiptStore | None,
                 secret: str | bytes | None, *, replay: bool, record_command: str,
                 stats: Stats, run_id: str, instance: str) -> Backend:
    """Open ``where`` and its key for ``engine``. For a replay, a missing store or key raises
    before anything is opened: a replay creates no file."""
    if replay:
        check_replayable(where, secret, record_command)
    store = where if isinstance(where, ReceiptStore) else open_store(where)
    try:
        signer = Signer(load_key(secret, store.key_path, create=not replay))
    except BaseException:
        if store is not where:
            store.close()
        raise
    # Pending counts are written at close, at exit, or when the engine is collected.
    flush = weakref.finalize(engine, flush_finally, store, stats, run_id, instance)
    return Backend(store, signer, Heartbeat(store), flush)
