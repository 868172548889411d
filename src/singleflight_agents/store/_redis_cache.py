"""The Redis store's receipt cache in this process, kept true by a RESP3 client-tracking
connection (``CLIENT TRACKING ON BCAST PREFIX {prefix}r:``) that the callers read themselves.
"""

from __future__ import annotations

import contextlib
import math
import select
import threading
import time
from collections import OrderedDict, deque
from typing import Any

import redis

from ..models import Receipt

MISS: Any = object()  # not in the cache (None there means: known to be absent)
CACHE_ENTRIES = 16384
_CONFIRMED_SECONDS = 1.0  # a cached read needs a PING answered on the tracking connection
_PING_AFTER = 0.5         # sent this long before, ahead of time, so that busy callers never wait
RETRY_SECONDS = 1.0       # a lost tracking connection is opened again at most this often
_LOG = 1024               # invalidations remembered for reads in flight
_PING = b"*1\r\n$4\r\nPING\r\n"


class _Protocol(Exception):
    """Bytes on the tracking connection that are not the RESP3 it should carry."""


def _parse(buf: bytearray, at: int) -> tuple[Any, int]:
    """One RESP3 value from ``buf[at:]`` and where it ends; ``(MISS, at)`` when it is not
    all there yet. Push frames come back as ``(">", items)``, errors as ``("-", text)``."""
    end = buf.find(b"\r\n", at)
    if end < 0:
        return MISS, at
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
            return MISS, at
        return bytes(buf[after:after + size]), after + size + 2
    if kind in b"*>~":
        count, items = int(line), []
        for _ in range(max(count, 0)):
            item, after = _parse(buf, after)
            if item is MISS:
                return MISS, at
            items.append(item)
        return ((">", items) if kind == b">" else items), after
    raise _Protocol(f"unexpected RESP3 type {bytes(kind)!r}")


class ReceiptCache:
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
        """``(receipt or None, _)`` if cached, else ``(MISS, snapshot)`` where the snapshot,
        passed to :meth:`keep` with what the server then says, is ``None`` when the answer
        must not be kept."""
        with self._lock:
            if not self._ready():
                return MISS, None
            entry = self._entries.get(key)
            if entry is not None:
                if entry[1] > time.time():
                    self._entries.move_to_end(key)
                    return entry[0], None
                del self._entries[key]  # expired on the server's clock, or about to be
            return MISS, self._seq

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
            if message is MISS:
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
            self._retry_at = time.monotonic() + RETRY_SECONDS
        if conn is not None:
            with contextlib.suppress(Exception):
                conn.disconnect()

    def _readable(self, wait: float) -> bool:
        if self._poller is not None:
            return bool(self._poller.poll(wait * 1000))
        return bool(select.select([self._sock], [], [], wait)[0])  # Windows: no poll
