"""Opening the Redis store's client: its store URL checked and parsed (key prefix, cache
size), the connection made, and each way that fails told in one line."""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import parse_qsl, unquote, urlencode

import redis

from ..models import StoreError
from ._redis_cache import CACHE_ENTRIES


def parse_url(url: str, shown: str) -> tuple[str, str, int, bool]:
    # The URL for the redis client, the key prefix, the size of the receipt cache and whether
    # async callers' store operations leave their event loop (?offload=1). The
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
    cache = query.pop("cache", str(CACHE_ENTRIES))
    if not (cache.isascii() and cache.isdigit()):
        raise StoreError(f"store URL {shown!r}: cache={cache!r} is not a number of receipts; "
                         f"write cache=0 for no cache in this process, or e.g. cache=16384")
    offload = query.pop("offload", "0")
    if offload not in ("0", "1"):
        raise StoreError(f"store URL {shown!r}: offload={offload!r} is not 0 or 1; write "
                         f"offload=1 to run async callers' store operations in store threads")
    if not base.startswith("unix://"):
        # The client reads a path that is not a number as database 0, and /0/1 as 1.
        db = unquote(base.partition("://")[2].partition("/")[2])
        if db and not (db.isascii() and db.isdigit()):
            raise StoreError(f"store URL {shown!r}: database {db!r} is not a database number; "
                             f"write redis://host:port/0 (they are numbered from 0)")
        if db and "db" in query:
            raise StoreError(f"store URL {shown!r} names the database twice (/{db} and "
                             f"?db={query['db']}); give it once")
    return base + (f"?{urlencode(query)}" if query else ""), prefix, int(cache), offload == "1"


def connect(client_url: str, shown: str) -> Any:
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
