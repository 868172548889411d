"""The Redis store: one deduplication domain for many machines (extra ``[redis]``).

Every key lives under one prefix (``?prefix=`` in the URL, default ``singleflight:``):

- ``{prefix}r:{fingerprint}``: the receipt, a hash, expiring with the receipt (PEXPIREAT);
- ``{prefix}l:{fingerprint}``: the lease, a hash (state, token, owner, expires in ms,
  error), changed only by Lua scripts so every check-and-act is one step;
- ``{prefix}token``: the fencing counter (INCR), so tokens only grow;
- ``{prefix}w:{fingerprint}``: the pub/sub channel a holder publishes on when it
  finishes, fails or gives up; ``{prefix}s:{run}`` and ``{prefix}runs``: statistics;
  ``{prefix}seen:{run}``: the keys a run in mode ``off`` called, for a day.

Waiters are woken by pub/sub; a lost message or a dead holder (who never publishes) is
covered by re-checking the lease at most every second and when it lapses.

Receipts read are kept in this process (:mod:`._redis_cache`, ``?cache=N`` entries,
default 16384, ``?cache=0`` for none) while Redis says their keys did not change: one
connection per process has ``CLIENT TRACKING ON BCAST PREFIX {prefix}r:`` (RESP3), so the
server pushes the name of every receipt written, deleted or expired, and a flush. Each
cached read first reads what that connection has received; see docs/stores.md for the exact
guarantee.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time
import weakref
from collections.abc import Iterator, Mapping
from typing import Any

import redis

from .._platform import at_fork_in_child
from ..models import RECEIPT_FIELDS, RECEIPT_NUMBERS, Receipt, StoreError
from . import _redis_scripts as scripts
from . import redact_url
from ._redis_cache import MISS, RETRY_SECONDS, ReceiptCache
from ._redis_connect import connect, parse_url
from .base import Busy, Failure, Lease, ReceiptStore, load_counters, translating

_BATCH = 500  # keys per SCAN step and per pipeline of the admin commands
_LEASE_RETENTION_MS = 24 * 3600 * 1000  # a lease hash outlives any holder, then goes
_RECHECK_SECONDS = 1.0
_RETRY_SECONDS = RETRY_SECONDS  # how long the receipt cache waits to reconnect
translated = translating(redis.RedisError)


def _receipt(fields: Mapping[str, str]) -> Receipt:
    values: dict[str, Any] = {}
    for name in RECEIPT_FIELDS:
        raw = values[name] = fields.get(name)  # an absent "inputs" is None (not stored)
        convert = RECEIPT_NUMBERS.get(name)
        if convert is not None and raw is not None:
            # A value edited into nonsense is left as found: its signature check fails.
            with contextlib.suppress(ValueError):
                values[name] = convert(raw)
    return Receipt(**values)


class RedisStore(ReceiptStore):
    """A :class:`ReceiptStore` on a Redis server; see the module docstring."""

    def __init__(self, url: str) -> None:
        self.url = redact_url(url)  # no password in messages
        client_url, prefix, cache, offload = parse_url(url, self.url)
        # An async caller's store operations on its loop (a round trip each: in a storm of
        # misses, 2.4x faster in wall time here than handing each to a store thread), or, with
        # ?offload=1, in store threads: its loop never waits on the network.
        self.runs_on_loop = not offload
        self.prefix = prefix + ":"
        self._redis: Any = connect(client_url, self.url)
        self._cache = ReceiptCache(self._redis, self.prefix, cache) if cache else None
        kwargs = self._redis.connection_pool.connection_kwargs
        where = kwargs.get("path") or f"{kwargs.get('host')}:{kwargs.get('port')}"
        self.identity = f"redis:{where}/{kwargs.get('db', 0)}/{self.prefix}"
        self._acquire = self._redis.register_script(scripts.ACQUIRE)
        self._renew = self._redis.register_script(scripts.RENEW)
        self._release = self._redis.register_script(scripts.RELEASE)
        self._put = self._redis.register_script(scripts.PUT)
        self._prune = self._redis.register_script(scripts.PRUNE)
        self._wake: dict[str, threading.Event] = {}
        self._wake_lock = threading.Lock()
        self._listener: tuple[int, Any] | None = None  # (pid, pubsub worker thread)
        _STORES.add(self)

    def _after_fork(self) -> None:
        # The listener thread did not survive the fork, and may have held the lock.
        self._wake_lock, self._wake, self._listener = threading.Lock(), {}, None
        if self._cache is not None:
            self._cache._after_fork()

    def _key(self, kind: str, key: str) -> str:
        return f"{self.prefix}{kind}:{key}"

    # -- receipts and leases --------------------------------------------------------

    @translated
    def get(self, key: str) -> Receipt | None:
        cache, snapshot = self._cache, None
        if cache is not None:
            # The very object read before, while its key is unchanged: the engine then
            # skips the signature check it did the first time.
            found, snapshot = cache.lookup(key)
            if found is not MISS:
                return found  # type: ignore[no-any-return]
        fields = self._redis.hgetall(self._key("r", key))
        receipt = _receipt(fields) if fields else None
        if cache is not None:
            cache.keep(key, receipt, snapshot)
        return receipt

    @translated
    def acquire(self, key: str, owner: str, lease_seconds: float) -> Lease | Busy:
        cache = self._cache
        snapshot = None if cache is None else cache.snapshot()
        result = self._acquire(
            keys=[self._key("l", key), f"{self.prefix}token", self._key("r", key)],
            args=[owner, int(lease_seconds * 1000), _LEASE_RETENTION_MS])
        if cache is not None and isinstance(result[3], list):  # else not a hash: uncached
            fields = result[3]
            cache.keep(key, _receipt(dict(zip(fields[::2], fields[1::2], strict=True)))
                       if fields else None, snapshot)
        if result[0] == 0:
            return Busy(since_token=int(result[1]))
        return Lease(key, int(result[1]), owner, lease_seconds, bool(result[2]))

    @translated
    def renew(self, lease: Lease) -> bool:
        return bool(self._renew(keys=[self._key("l", lease.key)],
                                args=[lease.token, int(lease.lease_seconds * 1000)]))

    @translated
    def release(self, lease: Lease, failure: tuple[str, str] | None = None) -> None:
        error_type, message = failure or ("", "")
        self._release(keys=[self._key("l", lease.key)],
                      args=[lease.token, "failed" if failure else "released", error_type,
                            message, self._key("w", lease.key)])

    @translated
    def put(self, receipt: Receipt, lease: Lease) -> bool:
        fields: list[Any] = []
        for name in RECEIPT_FIELDS:
            value = getattr(receipt, name)
            if value is not None:
                fields += [name, repr(value) if type(value) is float else value]
        cache = self._cache
        snapshot = None if cache is None else cache.snapshot()
        stored = bool(self._put(
            keys=[self._key("l", lease.key), self._key("r", lease.key)],
            args=[lease.token, int(receipt.expires_at * 1000), self._key("w", lease.key),
                  *fields]))
        if cache is not None:
            # Ours to serve at once, until the change's own notice comes (read-your-writes);
            # fenced out, whatever is stored is someone else's.
            cache.forget(lease.key)
            if stored:
                cache.keep(lease.key, receipt, snapshot)
        return stored

    @translated
    def last_failure(self, key: str) -> Failure | None:
        state, token, error_type, message = self._redis.hmget(
            self._key("l", key), ["state", "token", "error_type", "error_message"])
        return Failure(int(token), error_type, message) if state == "failed" else None

    @translated
    def wait(self, key: str, timeout: float) -> None:
        event = threading.Event()
        with self._wake_lock:
            self._ensure_listener()
            self._wake[key] = event
        try:
            # Checked after subscribing, so a holder finishing meanwhile is not missed.
            state, expires = self._redis.hmget(self._key("l", key), ["state", "expires"])
            if state != "held":
                return
            lapses_in = max(0.0, int(expires) / 1000 - time.time()) + 0.05
            event.wait(min(timeout, _RECHECK_SECONDS, lapses_in))
        finally:
            with self._wake_lock:
                if self._wake.get(key) is event:
                    del self._wake[key]

    def _ensure_listener(self) -> None:
        if self._listener is not None and self._listener[0] == os.getpid():
            return
        pubsub = self._redis.pubsub()
        pubsub.psubscribe(**{f"{self.prefix}w:*": self._on_wake})
        # Wait for Redis to confirm the subscription: a wake-up published before that
        # would be missed (the re-check would still catch it, a second later).
        deadline = time.monotonic() + 2
        while time.monotonic() < deadline:
            message = pubsub.get_message(timeout=0.1)
            if message is not None and message["type"] == "psubscribe":
                break
        pubsub.ignore_subscribe_messages = True
        worker = pubsub.run_in_thread(sleep_time=1.0, daemon=True,
                                      exception_handler=_keep_listening)
        self._listener = (os.getpid(), worker)

    def _on_wake(self, message: Mapping[str, Any]) -> None:
        key = str(message["channel"]).rpartition(":")[2]
        with self._wake_lock:
            event = self._wake.get(key)
        if event is not None:
            event.set()

    # -- statistics -----------------------------------------------------------------

    @translated
    def save_stats(
        self, run_id: str, process_id: str, counters: Mapping[str, Mapping[str, float]]
    ) -> None:
        pipe = self._redis.pipeline()
        pipe.hset(f"{self.prefix}s:{run_id}", mapping={
            f"{process_id}\x1f{tool}": json.dumps(dict(values), sort_keys=True)
            for tool, values in counters.items()})
        pipe.zadd(f"{self.prefix}runs", {run_id: time.time()})
        pipe.execute()

    @translated
    def load_stats(self, run_id: str | None) -> list[tuple[str, str, dict[str, float]]]:
        runs = [run_id] if run_id else self._redis.zrange(f"{self.prefix}runs", 0, -1)
        rows = []
        for run in runs:
            for field, counters in self._redis.hgetall(f"{self.prefix}s:{run}").items():
                tool = field.partition("\x1f")[2]
                rows.append((run, tool, load_counters(
                    counters, f"store {self.url}", run, tool,
                    f"delete the field from the hash {self.prefix}s:{run}")))
        return rows

    @translated
    def first_call(self, run_id: str, key: str) -> bool:
        name = f"{self.prefix}seen:{run_id}"
        pipe = self._redis.pipeline()
        pipe.sadd(name, key)
        pipe.expire(name, 86400)
        added, _ = pipe.execute()
        return bool(added)

    @translated
    def latest_run(self) -> str | None:
        latest = self._redis.zrange(f"{self.prefix}runs", -1, -1)
        return latest[0] if latest else None

    # -- maintenance ----------------------------------------------------------------

    def iter_receipts(self) -> Iterator[Receipt]:
        return (receipt for _, receipt in self._keyed())

    def keyed_receipts(self) -> Iterator[tuple[str, Receipt]]:
        """Every receipt with the fingerprint its key names: the engine serves a receipt
        only under its own fingerprint, and a hash can be renamed onto another key."""
        return self._keyed()

    def _keyed(self) -> Iterator[tuple[str, Receipt]]:
        # In the documented order (tool name, fingerprint), which Redis cannot give: a first
        # pass reads only those two fields of each hash (a few dozen bytes per receipt,
        # sorted here), a second reads the receipts in that order, a batch at a time.
        try:
            yield from self._keyed_in_order()
        except redis.RedisError as exc:
            raise StoreError(f"store {self.url}: {exc}") from exc

    def _keyed_in_order(self) -> Iterator[tuple[str, Receipt]]:
        start = len(self.prefix) + 2
        order: list[tuple[str, str, str]] = []
        tools: dict[str, str] = {}  # one string per tool name, however many receipts
        for names in _batches(self._redis.scan_iter(match=f"{self.prefix}r:*", count=_BATCH)):
            pipe = self._redis.pipeline(transaction=False)
            for name in names:
                pipe.hmget(name, ["tool_name", "fingerprint"])
            for name, found in zip(names, pipe.execute(raise_on_error=False), strict=True):
                if isinstance(found, list):  # else not a hash: check() reports it
                    tool = str(found[0])
                    order.append((tools.setdefault(tool, tool), str(found[1]), name[start:]))
        order.sort()
        # SCAN may return a key twice: once sorted, side by side.
        keys = (key for i, (_, _, key) in enumerate(order) if i == 0 or order[i - 1] != order[i])
        for batch in _batches(keys):
            pipe = self._redis.pipeline(transaction=False)
            for key in batch:
                pipe.hgetall(self._key("r", key))
            for key, fields in zip(batch, pipe.execute(raise_on_error=False), strict=True):
                if isinstance(fields, dict) and fields:  # gone, or retyped, meanwhile
                    yield key, _receipt(fields)

    @translated
    def import_receipt(self, receipt: Receipt) -> None:
        name = self._key("r", receipt.fingerprint)
        pipe = self._redis.pipeline()
        pipe.delete(name)
        pipe.hset(name, mapping={k: (repr(v) if type(v) is float else v)
                                 for k, v in receipt.to_dict().items() if v is not None})
        pipe.pexpireat(name, int(receipt.expires_at * 1000))
        pipe.execute()
        if self._cache is not None:
            self._cache.forget(receipt.fingerprint)

    @translated
    def prune(self, now: float) -> dict[str, int]:
        # Receipts expire by themselves; leases go once finished or silent for an hour.
        leases = 0
        for name in self._redis.scan_iter(match=f"{self.prefix}l:*", count=500):
            leases += self._prune(keys=[name], args=[3600 * 1000])  # check and delete at once
        return {"receipts": 0, "leases": leases, "lock_files": 0}

    @translated
    def check(self) -> list[str]:
        if not self._redis.ping():
            return [f"{self.url}: no answer to PING"]
        # A receipt key holding another type (written by hand) is one the engine cannot read.
        names = list(self._redis.scan_iter(match=f"{self.prefix}r:*", count=500))
        pipe = self._redis.pipeline(transaction=False)
        for name in names:
            pipe.type(name)
        return [f"{self.url}: key {name!r} holds a {kind}, not a receipt hash; delete it"
                for name, kind in zip(names, pipe.execute(), strict=True) if kind != "hash"]

    def close(self) -> None:
        if self._listener is not None and self._listener[0] == os.getpid():
            self._listener[1].stop()
        self._listener = None
        if self._cache is not None:
            self._cache.close()
        self._redis.close()


_STORES: weakref.WeakSet[RedisStore] = weakref.WeakSet()


def _batches(items: Iterator[Any]) -> Iterator[list[Any]]:
    batch: list[Any] = []
    for item in items:
        batch.append(item)
        if len(batch) == _BATCH:
            yield batch
            batch = []
    if batch:
        yield batch


def _reset_after_fork() -> None:
    for store in list(_STORES):
        store._after_fork()


at_fork_in_child(_reset_after_fork)


def _keep_listening(error: BaseException, pubsub: Any, worker: Any) -> None:
    # The connection dropped: waiters fall back on their bounded re-check meanwhile.
    # redis-py reconnects and subscribes again on its next read.
    time.sleep(0.5)
