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

Receipts read are kept in this process (:class:`_ReceiptCache`, ``?cache=N`` entries,
default 16384, ``?cache=0`` for none) while Redis says their keys did not change: one
connection per process has ``CLIENT TRACKING ON BCAST PREFIX {prefix}r:`` (RESP3), so the
server pushes the name of every receipt written, deleted or expired, and a flush. Each
cached read first reads what that connection has received; see docs/stores.md for the exact
guarantee.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import select
import threading
import time
import weakref
from collections import OrderedDict, deque
from collections.abc import Iterator, Mapping
from typing import Any
from urllib.parse import parse_qsl, unquote, urlencode

import redis

from .._platform import at_fork_in_child
from ..models import RECEIPT_FIELDS, RECEIPT_NUMBERS, Receipt, StoreError
from . import redact_url
from .base import Busy, Failure, Lease, ReceiptStore, load_counters, translating

_NOW_MS = "local t = redis.call('TIME') local now = t[1] * 1000 + math.floor(t[2] / 1000) "
# The receipt as it is when the lease is taken (or found busy) comes back too, as the
# flat field list of HGETALL (-1 if the key is not a hash): the engine's look right after
# taking a lease then costs no round trip, and sees what the holder saw.
_ACQUIRE = _NOW_MS + """
local receipt = redis.pcall('HGETALL', KEYS[3])
if type(receipt) ~= 'table' or receipt.err then receipt = -1 end
local lease = redis.call('HMGET', KEYS[1], 'state', 'expires', 'token')
local takeover = 0
if lease[1] == 'held' then
  if tonumber(lease[2]) > now then return {0, tonumber(lease[3]), 0, receipt} end
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
return {1, token, takeover, receipt}
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
_BATCH = 500  # keys per SCAN step and per pipeline of the admin commands
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


def _parse_url(url: str, shown: str) -> tuple[str, str, int]:
    # The URL for the redis client, the key prefix and the size of the receipt cache. The
    # client itself accepts some mistakes silently (a database that is not a number is 0),
    # so they are refused here.
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
    cache = query.pop("cache", str(_CACHE_ENTRIES))
    if not (cache.isascii() and cache.isdigit()):
        raise StoreError(f"store URL {shown!r}: cache={cache!r} is not a number of receipts; "
                         f"write cache=0 for no cache in this process, or e.g. cache=16384")
    if not base.startswith("unix://"):
        # The client reads a path that is not a number as database 0, and /0/1 as 1.
        db = unquote(base.partition("://")[2].partition("/")[2])
        if db and not (db.isascii() and db.isdigit()):
            raise StoreError(f"store URL {shown!r}: database {db!r} is not a database number; "
                             f"write redis://host:port/0 (they are numbered from 0)")
        if db and "db" in query:
            raise StoreError(f"store URL {shown!r} names the database twice (/{db} and "
                             f"?db={query['db']}); give it once")
    return base + (f"?{urlencode(query)}" if query else ""), prefix, int(cache)


def _connect(client_url: str, shown: str) -> Any:
    # Typed Any: redis-py's stubs cannot express decode_responses=True (str, not bytes).
    try:
        # Short timeouts: a dead server must turn into a fallback, not a stall.
        # ?socket_timeout=... in the URL overrides them.
        # Bytes that are not UTF-8 (an edited receipt) decode to surrogate escapes, so the
        # receipt fails its signature check instead of the read raising UnicodeDecodeError.
        # redis-py 8 caps a pool at 100 connections and then raises: every thread of a
        # process in a command at once (waiters of a storm) can need more (?max_connections=).
        client = redis.Redis.from_url(client_url, decode_responses=True, socket_timeout=2,
                                      socket_connect_timeout=2, max_connections=1000,
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


_MISS: Any = object()  # not in the cache (None there means: known to be absent)
_CACHE_ENTRIES = 16384
_CONFIRMED_SECONDS = 1.0  # a cached read needs a PING answered on the tracking connection
_PING_AFTER = 0.5         # sent this long before, ahead of time, so that busy callers never wait
_RETRY_SECONDS = 1.0      # a lost tracking connection is opened again at most this often
_LOG = 1024               # invalidations remembered for reads in flight
_PING = b"*1\r\n$4\r\nPING\r\n"


class _Protocol(Exception):
    """Bytes on the tracking connection that are not the RESP3 it should carry."""


def _parse(buf: bytearray, at: int) -> tuple[Any, int]:
    """One RESP3 value from ``buf[at:]`` and where it ends; ``(_MISS, at)`` when it is not
    all there yet. Push frames come back as ``(">", items)``, errors as ``("-", text)``."""
    end = buf.find(b"\r\n", at)
    if end < 0:
        return _MISS, at
    kind, line, after = buf[at:at + 1], bytes(buf[at + 1:end]), end + 2
    if kind in b"+:":
        return line, after
    if kind == b"-":
        return ("-", line.decode(errors="replace")), after
    if kind == b"_":
        return None, after
    if kind == b"$":
        size = int(line)
        if size < 0:
            return None, after
        if len(buf) < after + size + 2:
            return _MISS, at
        return bytes(buf[after:after + size]), after + size + 2
    if kind in b"*>~":
        count, items = int(line), []
        for _ in range(max(count, 0)):
            item, after = _parse(buf, after)
            if item is _MISS:
                return _MISS, at
            items.append(item)
        return ((">", items) if kind == b">" else items), after
    raise _Protocol(f"unexpected RESP3 type {bytes(kind)!r}")


class _ReceiptCache:
    """Receipts this process read, each kept until Redis says its key changed.

    The tracking connection (RESP3, ``CLIENT TRACKING ON BCAST PREFIX {prefix}r:``) is read
    by the callers themselves, without a thread: every cached read first takes in what it
    has received, drops the receipts it names, and serves an entry only while a PING on it
    was answered less than a second ago (every change the server made before that PING has
    then been seen). Reads from the server are kept only if no change of their key arrived
    while they were in flight (``_seq``/``_log``). A lost connection empties the cache,
    which stays unused until tracking is on again; a forked child starts empty.
    """

    def __init__(self, redis_client: Any, prefix: str, size: int) -> None:
        pool = redis_client.connection_pool
        self._connection_class, self._kwargs = pool.connection_class, pool.connection_kwargs
        self._names = f"{prefix}r:"
        self._size = size
        self._timeout = float(self._kwargs.get("socket_timeout") or 2.0)
        self._disabled = False  # the server has no client tracking: never cache
        self._after_fork()

    def _after_fork(self) -> None:
        # Nothing of the parent's: its socket is left alone (reading it would steal the
        # parent's messages), its lock may have been held.
        self._lock = threading.Lock()
        self._conn: Any = None
        self._sock: Any = None
        self._entries: OrderedDict[str, tuple[Receipt | None, float]] = OrderedDict()
        self._seq = self._floor = 0
        self._log: deque[tuple[int, str | None]] = deque(maxlen=_LOG)
        self._buf = bytearray()
        self._pings: deque[float] = deque()  # when each unanswered PING was sent
        self._confirmed = -math.inf  # every change made before this (monotonic) was seen
        self._retry_at = 0.0
        self._poller: Any = None
        self._skew = 0.0  # the server's clock minus ours, plus the error of that estimate

    # -- what the store calls -------------------------------------------------------

    def lookup(self, key: str) -> tuple[Any, int | None]:
        """``(receipt or None, _)`` if cached, else ``(_MISS, snapshot)`` where the snapshot,
        passed to :meth:`keep` with what the server then says, is ``None`` when the answer
        must not be kept."""
        with self._lock:
            if not self._ready():
                return _MISS, None
            entry = self._entries.get(key)
            if entry is not None:
                if entry[1] > time.time():
                    self._entries.move_to_end(key)
                    return entry[0], None
                del self._entries[key]  # expired on the server's clock, or about to be
            return _MISS, self._seq

    def snapshot(self) -> int | None:
        """Taken before a command whose view of a receipt is then kept (:meth:`keep`)."""
        with self._lock:  # not before tracking is known to be on
            return self._seq if self._confirmed > -math.inf else None

    def keep(self, key: str, receipt: Receipt | None, snapshot: int | None) -> None:
        """Keep what the server said of ``key`` after ``snapshot``, unless a change of it
        has been seen since (the answer may predate it)."""
        if snapshot is None:
            return
        until = math.inf
        if receipt is not None:
            expires = receipt.expires_at
            if type(expires) is not float and type(expires) is not int:
                return  # an edited field: not worth keeping
            until = expires - self._skew  # the server drops the key at its own clock
        with self._lock:
            if self._sock is None or snapshot < self._floor or not self._unchanged(key, snapshot):
                return
            self._entries[key] = (receipt, until)
            self._entries.move_to_end(key)
            if len(self._entries) > self._size:
                self._entries.popitem(last=False)

    def forget(self, key: str) -> None:
        with self._lock:
            self._entries.pop(key, None)

    def close(self) -> None:
        with self._lock:
            self._drop(retry=False)

    # -- the tracking connection ----------------------------------------------------

    def _unchanged(self, key: str, snapshot: int) -> bool:
        if self._seq == snapshot:
            return True
        if not self._log or self._log[0][0] > snapshot + 1:
            return False  # changes since then no longer all in the log
        return not any(seq > snapshot and name in (key, None) for seq, name in self._log)

    def _ready(self) -> bool:
        """Whether cached entries may be served: connected, caught up, confirmed."""
        try:
            if self._sock is None:
                if self._disabled or time.monotonic() < self._retry_at:
                    return False
                self._connect()
            self._take_in(0.0)
            age = time.monotonic() - self._confirmed
            if age > _PING_AFTER and not self._pings:
                self._pings.append(time.monotonic())
                self._sock.sendall(_PING)
            if age > _CONFIRMED_SECONDS:
                deadline = time.monotonic() + self._timeout
                while time.monotonic() - self._confirmed > _CONFIRMED_SECONDS:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise TimeoutError("no answer to PING on the tracking connection")
                    self._take_in(left)
        except (OSError, redis.RedisError, _Protocol, ValueError):
            self._drop()
            return False
        return True

    def _connect(self) -> None:
        conn = self._connection_class(**{**self._kwargs, "protocol": 3})
        try:
            conn.connect()  # the handshake: HELLO 3, credentials, database
            before = time.time()
            conn.send_command("TIME")
            seconds, micros = conn.read_response()
            after = time.time()
            # From here on the socket is read here, not by redis-py: nothing is pending
            # on it (no push comes before tracking is on).
            sock = conn._sock
            sock.sendall(b"".join(conn.pack_command("CLIENT", "TRACKING", "ON", "BCAST",
                                                    "PREFIX", self._names)))
        except redis.ResponseError:  # no RESP3 or no tracking (Redis < 6): no cache
            self._disabled = True
            with contextlib.suppress(Exception):
                conn.disconnect()
            raise
        except BaseException:
            with contextlib.suppress(Exception):
                conn.disconnect()
            raise
        self._conn, self._sock, self._buf = conn, sock, bytearray()
        if hasattr(select, "poll"):
            self._poller = select.poll()
            self._poller.register(sock, select.POLLIN)
        self._pings = deque([time.monotonic()])  # the tracking command's answer confirms
        self._skew = int(seconds) + int(micros) / 1e6 - (before + after) / 2 \
            + (after - before) / 2 + 0.002

    def _take_in(self, wait: float) -> None:
        """Read what has arrived (waiting up to ``wait`` seconds for something) and act on
        each complete message."""
        sock = self._sock
        pending = getattr(sock, "pending", None)  # TLS: decrypted bytes already buffered
        if not (pending is not None and pending()) and not self._readable(wait):
            return
        while True:
            data = sock.recv(65536)
            if not data:
                raise ConnectionError("the tracking connection was closed")
            self._buf += data
            if not (pending is not None and pending()) and not self._readable(0.0):
                break
        at = 0
        while True:
            message, end = _parse(self._buf, at)
            if message is _MISS:
                break
            at = end
            self._act(message)
        del self._buf[:at]

    def _act(self, message: Any) -> None:
        if isinstance(message, tuple) and message[0] == ">":
            items = message[1]
            if items and items[0] == b"invalidate":
                names = items[1] if len(items) > 1 else None
                if names is None:  # FLUSHDB, FLUSHALL: everything
                    self._clear()
                else:
                    start = len(self._names)
                    for raw in names:
                        key = raw.decode(errors="surrogateescape")[start:]
                        self._seq += 1
                        self._log.append((self._seq, key))
                        self._entries.pop(key, None)
            return
        if isinstance(message, tuple):  # the tracking command refused (ACL, an old server)
            self._disabled = True
            raise _Protocol(message[1])
        if not self._pings:
            raise _Protocol(f"an answer to no command: {message!r}")
        self._confirmed = max(self._confirmed, self._pings.popleft())

    def _clear(self) -> None:
        self._entries.clear()
        self._seq += 1
        self._floor = self._seq
        self._log.clear()

    def _drop(self, retry: bool = True) -> None:
        self._clear()
        conn, self._conn, self._sock, self._poller = self._conn, None, None, None
        self._pings.clear()
        self._confirmed = -math.inf
        if retry:
            self._retry_at = time.monotonic() + _RETRY_SECONDS
        if conn is not None:
            with contextlib.suppress(Exception):
                conn.disconnect()

    def _readable(self, wait: float) -> bool:
        if self._poller is not None:
            return bool(self._poller.poll(wait * 1000))
        return bool(select.select([self._sock], [], [], wait)[0])  # Windows: no poll


class RedisStore(ReceiptStore):
    """A :class:`ReceiptStore` on a Redis server; see the module docstring."""

    def __init__(self, url: str) -> None:
        self.url = redact_url(url)  # no password in messages
        client_url, prefix, cache = _parse_url(url, self.url)
        self.prefix = prefix + ":"
        self._redis: Any = _connect(client_url, self.url)
        self._cache = _ReceiptCache(self._redis, self.prefix, cache) if cache else None
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
            if found is not _MISS:
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
