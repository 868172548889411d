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
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import threading
import time
import weakref
from collections.abc import Iterator, Mapping
from typing import Any
from urllib.parse import parse_qsl, unquote, urlencode

import redis

from .._platform import at_fork_in_child
from ..models import RECEIPT_FIELDS, RECEIPT_NUMBERS, Receipt, StoreError
from . import redact_url
from .base import Busy, Failure, Lease, ReceiptStore, load_counters, translating

_NOW_MS = "local t = redis.call('TIME') local now = t[1] * 1000 + math.floor(t[2] / 1000) "
_ACQUIRE = _NOW_MS + """
local lease = redis.call('HMGET', KEYS[1], 'state', 'expires', 'token')
local takeover = 0
if lease[1] == 'held' then
  if tonumber(lease[2]) > now then return {0, tonumber(lease[3])} end
  takeover = 1
end
if redis.call('EXISTS', KEYS[2]) == 0 then
  -- A lost counter (a restart without persistence) restarts above every token handed out
  -- before it: microseconds of the server's clock.
  redis.call('SET', KEYS[2], now * 1000)
end
local token = redis.call('INCR', KEYS[2])
redis.call('HSET', KEYS[1], 'state', 'held', 'token', token, 'owner', ARGV[1],
           'expires', now + tonumber(ARGV[2]), 'error_type', '', 'error_message', '')
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return {1, token, takeover}
"""
_RENEW = _NOW_MS + """
local lease = redis.call('HMGET', KEYS[1], 'state', 'token')
if lease[1] ~= 'held' or lease[2] ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'expires', now + tonumber(ARGV[2]))
return 1
"""
_RELEASE = _NOW_MS + """
if redis.call('HGET', KEYS[1], 'token') ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'state', ARGV[2], 'expires', now, 'error_type', ARGV[3],
           'error_message', ARGV[4])
redis.call('PUBLISH', ARGV[5], '1')
return 1
"""
_PRUNE = _NOW_MS + """
local lease = redis.call('HMGET', KEYS[1], 'state', 'expires')
if lease[1] ~= 'held' or (tonumber(lease[2]) or 0) < now - tonumber(ARGV[1]) then
  return redis.call('DEL', KEYS[1])
end
return 0
"""
_PUT = """
local lease = redis.call('HMGET', KEYS[1], 'state', 'token')
if lease[1] ~= 'held' or lease[2] ~= ARGV[1] then return 0 end
redis.call('DEL', KEYS[2])
redis.call('HSET', KEYS[2], unpack(ARGV, 4))
redis.call('PEXPIREAT', KEYS[2], ARGV[2])
redis.call('HSET', KEYS[1], 'state', 'done')
redis.call('PUBLISH', ARGV[3], '1')
return 1
"""
_LEASE_RETENTION_MS = 24 * 3600 * 1000  # a lease hash outlives any holder, then goes
_RECHECK_SECONDS = 1.0
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


def _parse_url(url: str, shown: str) -> tuple[str, str]:
    # The URL for the redis client and the key prefix. The client itself accepts some
    # mistakes silently (a database that is not a number is 0), so they are refused here.
    try:
        url.encode()
    except UnicodeEncodeError:  # e.g. bytes of another encoding in a command line argument
        raise StoreError(f"store URL {shown!r} is not valid UTF-8 text; fix the URL") from None
    base, _, query_text = url.partition("?")
    pairs = parse_qsl(query_text, keep_blank_values=True)
    names = [name for name, _ in pairs]
    for name in names:
        if names.count(name) > 1:
            raise StoreError(f"store URL {shown!r} gives {name!r} twice; give it once")
    query = dict(pairs)
    prefix = query.pop("prefix", "singleflight")
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", prefix):
        raise StoreError(f"store URL prefix {prefix!r}: use letters, digits, '-', '_' or "
                         f"'.' (':' would nest one prefix in another, glob characters would "
                         f"match other prefixes' keys)")
    if not base.startswith("unix://"):
        # The client reads a path that is not a number as database 0, and /0/1 as 1.
        db = unquote(base.partition("://")[2].partition("/")[2])
        if db and not (db.isascii() and db.isdigit()):
            raise StoreError(f"store URL {shown!r}: database {db!r} is not a database number; "
                             f"write redis://host:port/0 (they are numbered from 0)")
        if db and "db" in query:
            raise StoreError(f"store URL {shown!r} names the database twice (/{db} and "
                             f"?db={query['db']}); give it once")
    return base + (f"?{urlencode(query)}" if query else ""), prefix


def _connect(client_url: str, shown: str) -> Any:
    # Typed Any: redis-py's stubs cannot express decode_responses=True (str, not bytes).
    try:
        # Short timeouts: a dead server must turn into a fallback, not a stall.
        # ?socket_timeout=... in the URL overrides them.
        # Bytes that are not UTF-8 (an edited receipt) decode to surrogate escapes, so the
        # receipt fails its signature check instead of the read raising UnicodeDecodeError.
        client = redis.Redis.from_url(client_url, decode_responses=True, socket_timeout=2,
                                      socket_connect_timeout=2,
                                      encoding_errors="surrogateescape")
        client.ping()
    except TypeError as exc:  # an ?option the client has no parameter for
        option = str(exc).rpartition(" ")[2]
        raise StoreError(f"store URL {shown!r}: unknown option {option}; remove it") from None
    except ValueError as exc:  # the client's verdict on the URL: a port, an ?option's value
        raise StoreError(f"store URL {shown!r}: {exc}; fix the URL") from None
    except redis.AuthenticationError as exc:
        raise StoreError(f"Redis at {shown} refused the credentials: {exc}; fix the user "
                         f"and password in the URL") from None
    except redis.ResponseError as exc:  # it answered, so starting it is not the fix
        hint = ("this server has fewer databases (its 'databases' setting, 16 by default); "
                "use a lower database number in the URL") if "DB index" in str(exc) \
            else "fix the URL or the server's settings"
        raise StoreError(f"Redis at {shown} refused the connection: {exc}; {hint}") from None
    except redis.RedisError as exc:
        raise StoreError(f"cannot reach Redis at {shown}: {exc}; start it or pass another "
                         f"store URL") from None
    return client


class RedisStore(ReceiptStore):
    """A :class:`ReceiptStore` on a Redis server; see the module docstring."""

    def __init__(self, url: str) -> None:
        self.url = redact_url(url)  # no password in messages
        client_url, prefix = _parse_url(url, self.url)
        self.prefix = prefix + ":"
        self._redis: Any = _connect(client_url, self.url)
        kwargs = self._redis.connection_pool.connection_kwargs
        where = kwargs.get("path") or f"{kwargs.get('host')}:{kwargs.get('port')}"
        self.identity = f"redis:{where}/{kwargs.get('db', 0)}/{self.prefix}"
        self._acquire = self._redis.register_script(_ACQUIRE)
        self._renew = self._redis.register_script(_RENEW)
        self._release = self._redis.register_script(_RELEASE)
        self._put = self._redis.register_script(_PUT)
        self._prune = self._redis.register_script(_PRUNE)
        self._wake: dict[str, threading.Event] = {}
        self._wake_lock = threading.Lock()
        self._listener: tuple[int, Any] | None = None  # (pid, pubsub worker thread)
        _STORES.add(self)

    def _after_fork(self) -> None:
        # The listener thread did not survive the fork, and may have held the lock.
        self._wake_lock, self._wake, self._listener = threading.Lock(), {}, None

    def _key(self, kind: str, key: str) -> str:
        return f"{self.prefix}{kind}:{key}"

    # -- receipts and leases --------------------------------------------------------

    @translated
    def get(self, key: str) -> Receipt | None:
        fields = self._redis.hgetall(self._key("r", key))
        return _receipt(fields) if fields else None

    @translated
    def acquire(self, key: str, owner: str, lease_seconds: float) -> Lease | Busy:
        result = self._acquire(keys=[self._key("l", key), f"{self.prefix}token"],
                               args=[owner, int(lease_seconds * 1000), _LEASE_RETENTION_MS])
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
        return bool(self._put(
            keys=[self._key("l", lease.key), self._key("r", lease.key)],
            args=[lease.token, int(receipt.expires_at * 1000), self._key("w", lease.key),
                  *fields]))

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
        return iter([receipt for _, receipt in self._keyed()])

    def keyed_receipts(self) -> Iterator[tuple[str, Receipt]]:
        """Every receipt with the fingerprint its key names: the engine serves a receipt
        only under its own fingerprint, and a hash can be renamed onto another key."""
        return iter(self._keyed())

    @translated
    def _keyed(self) -> list[tuple[str, Receipt]]:
        start = len(self.prefix) + 2
        found = []
        for name in self._redis.scan_iter(match=f"{self.prefix}r:*", count=500):
            try:
                fields = self._redis.hgetall(name)
            except redis.ResponseError as exc:
                if "WRONGTYPE" not in str(exc):
                    raise
                continue  # not a receipt: check() reports it
            if fields:
                found.append((name[start:], _receipt(fields)))
        found.sort(key=lambda item: (str(item[1].tool_name), str(item[1].fingerprint), item[0]))
        return found

    @translated
    def import_receipt(self, receipt: Receipt) -> None:
        name = self._key("r", receipt.fingerprint)
        pipe = self._redis.pipeline()
        pipe.delete(name)
        pipe.hset(name, mapping={k: (repr(v) if type(v) is float else v)
                                 for k, v in receipt.to_dict().items() if v is not None})
        pipe.pexpireat(name, int(receipt.expires_at * 1000))
        pipe.execute()

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
        self._redis.close()


_STORES: weakref.WeakSet[RedisStore] = weakref.WeakSet()


def _reset_after_fork() -> None:
    for store in list(_STORES):
        store._after_fork()


at_fork_in_child(_reset_after_fork)


def _keep_listening(error: BaseException, pubsub: Any, worker: Any) -> None:
    # The connection dropped: waiters fall back on their bounded re-check meanwhile.
    # redis-py reconnects and subscribes again on its next read.
    time.sleep(0.5)
