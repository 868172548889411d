"""The Redis store's cache of receipts (client tracking): a repeated hit is the very object
read before, and no receipt is served once another client replaced, deleted or flushed it,
once it expired on the server, or after the tracking connection was lost; a forked child
starts empty. Writers are other connections, other store objects and other processes; each
read below starts after the writer's command returned."""

from __future__ import annotations

import multiprocessing
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import SECRET, redis_or_skip

from singleflight_agents import Singleflight, StoreError
from singleflight_agents.models import Receipt
from singleflight_agents.store import open_store

redis = pytest.importorskip("redis")
redis_store = pytest.importorskip("singleflight_agents.store.redis")

SPAWN = multiprocessing.get_context("spawn")
pytestmark = pytest.mark.timeout(120)


def receipt(key: str, token: int = 1, ttl: float = 600.0, output: str = "out") -> Receipt:
    now = time.time()
    return Receipt(fingerprint=key, tool_name="cache.t", namespace="", scope="", version="",
                   inputs=None, inputs_sha256="0" * 64, codec="json", output=output,
                   created_at=now, expires_at=now + ttl, latency_ms=1.0, cost_usd=0.0,
                   executor="test", token=token, key_id="k", signature="s")


@pytest.fixture
def stores(redis_url: str) -> Iterator[tuple[Any, Any]]:
    """A reader and a writer: two store objects (two connection pools) on one prefix."""
    reader, writer = open_store(redis_url), open_store(redis_url)
    yield reader, writer
    reader.close()
    writer.close()


def cached(store: Any, key: str) -> bool:
    return key in store._cache._entries


def test_a_repeated_hit_is_the_same_object_and_costs_no_round_trip(stores: tuple[Any, Any]) -> None:
    reader, writer = stores
    writer.import_receipt(receipt("k1"))
    first = reader.get("k1")
    assert first is not None and first.token == 1
    reads: list[str] = []
    real = reader._redis.hgetall
    reader._redis.hgetall = lambda name: reads.append(name) or real(name)
    assert all(reader.get("k1") is first for _ in range(100))
    assert reads == []


def test_a_replaced_receipt_is_never_served_after_the_write_returned(
        stores: tuple[Any, Any]) -> None:
    reader, writer = stores
    for token in range(1, 301):
        writer.import_receipt(receipt("k", token))
        got = reader.get("k")
        assert got is not None and got.token == token
        assert reader.get("k") is got  # and kept until the next write


def test_a_deleted_receipt_is_never_served_after_the_delete_returned(
        stores: tuple[Any, Any], redis_url: str) -> None:
    reader, writer = stores
    by_hand = redis.Redis.from_url(redis_url.partition("?")[0])
    for i in range(100):
        writer.import_receipt(receipt(f"k{i}"))
        assert reader.get(f"k{i}") is not None and cached(reader, f"k{i}")
        by_hand.delete(f"{reader.prefix}r:k{i}")
        assert reader.get(f"k{i}") is None
    by_hand.close()


def test_a_receipt_known_absent_is_served_once_written(stores: tuple[Any, Any]) -> None:
    reader, writer = stores
    for i in range(100):
        assert reader.get(f"new{i}") is None and cached(reader, f"new{i}")
        writer.import_receipt(receipt(f"new{i}", token=i))
        got = reader.get(f"new{i}")
        assert got is not None and got.token == i


def test_a_receipt_is_not_served_past_its_expiry_on_the_server(stores: tuple[Any, Any]) -> None:
    reader, writer = stores
    writer.import_receipt(receipt("short", ttl=0.3))
    assert reader.get("short") is not None and cached(reader, "short")
    time.sleep(0.35)
    assert reader.get("short") is None


def test_an_answer_older_than_a_change_seen_meanwhile_is_not_kept(
        stores: tuple[Any, Any]) -> None:
    # A read in flight while its key changes: the server answered before the change, whose
    # notice is taken in (by another read) before the answer is kept.
    reader, writer = stores
    cache = reader._cache
    reader.get("warm-up")
    snapshot = cache.snapshot()
    old = reader._redis.hgetall(f"{reader.prefix}r:raced")
    assert old == {}
    writer.import_receipt(receipt("raced"))
    reader.get("other")  # takes in the notice of "raced"
    cache.keep("raced", None, snapshot)
    assert not cached(reader, "raced")
    assert reader.get("raced") is not None


def test_a_lost_tracking_connection_empties_the_cache(stores: tuple[Any, Any],
                                                      redis_url: str) -> None:
    reader, writer = stores
    writer.import_receipt(receipt("k", 1))
    assert reader.get("k").token == 1 and cached(reader, "k")
    admin = redis.Redis.from_url(redis_url.partition("?")[0])
    admin.client_kill_filter(_id=reader._cache._conn.handshake_metadata["id"])
    writer.import_receipt(receipt("k", 2))  # while the reader is not tracking
    time.sleep(0.05)
    assert reader.get("k").token == 2
    assert reader.get("k").token == 2  # tracking again after the retry delay, or uncached
    time.sleep(redis_store._RETRY_SECONDS + 0.1)
    assert reader.get("k").token == 2 and reader.get("k") is reader.get("k")
    writer.import_receipt(receipt("k", 3))
    assert reader.get("k").token == 3
    admin.close()


def test_a_stale_confirmation_is_renewed_before_a_cached_read(stores: tuple[Any, Any]) -> None:
    # Entries are served only while a PING on the tracking connection was answered within
    # the last second: a silent connection cannot serve old receipts for longer.
    reader, writer = stores
    writer.import_receipt(receipt("k"))
    first = reader.get("k")
    reader._cache._confirmed -= 10
    before = time.monotonic()
    assert reader.get("k") is first
    assert reader._cache._confirmed >= before


def test_one_miss_reads_the_receipt_once(redis_url: str) -> None:
    # The look after taking the lease is answered by the lease script itself.
    sf = Singleflight(store=redis_url, secret=SECRET)
    reads: list[str] = []
    real = sf.store._redis.hgetall  # type: ignore[attr-defined]
    sf.store._redis.hgetall = lambda name: reads.append(name) or real(name)  # type: ignore[attr-defined]

    @sf.tool(deterministic=True, tool_name="cache.once")
    def tool(x: int) -> int:
        return x * 2

    assert tool(21) == 42
    assert len(reads) == 1
    # The receipt just stored is kept until the notice of its own write comes, which drops
    # it: the first hit after that reads it once more, the next ones not at all.
    for _ in range(5):
        assert tool(21) == 42
    assert len(reads) <= 2
    sf.close()


def test_the_cache_can_be_turned_off_and_a_bad_size_is_refused(redis_url: str) -> None:
    store = open_store(redis_url + "&cache=0")
    assert store._cache is None  # type: ignore[attr-defined]
    store.close()
    with pytest.raises(StoreError, match="cache='lots'"):
        open_store(redis_url + "&cache=lots")


def test_the_cache_is_bounded(redis_url: str) -> None:
    reader = open_store(redis_url + "&cache=8")
    for i in range(20):
        reader.get(f"k{i}")
    assert len(reader._cache._entries) == 8  # type: ignore[attr-defined]
    reader.close()


# -- other processes -----------------------------------------------------------------


def _writer(url: str, conn: Any, rounds: int) -> None:
    store = open_store(url)
    for token in range(1, rounds + 1):
        if token % 10 == 0:
            store._redis.delete(f"{store.prefix}r:k")  # type: ignore[attr-defined]
            conn.send(-token)
        else:
            store.import_receipt(receipt("k", token))
            conn.send(token)
        assert conn.recv() == "read"
    store.close()


def test_another_process_replacing_and_deleting_is_seen_at_once(stores: tuple[Any, Any],
                                                                redis_url: str) -> None:
    reader, _ = stores
    here, there = SPAWN.Pipe()
    proc = SPAWN.Process(target=_writer, args=(redis_url, there, 200))
    proc.start()
    try:
        for _ in range(200):
            assert here.poll(30)
            token = here.recv()  # the write has returned in the other process
            got = reader.get("k")
            if token < 0:
                assert got is None
            else:
                assert got is not None and got.token == token
                assert reader.get("k") is got
            here.send("read")
    finally:
        proc.join(30)
    assert proc.exitcode == 0


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork here")
def test_a_forked_child_starts_empty_and_leaves_the_parent_tracking(
        stores: tuple[Any, Any]) -> None:
    reader, writer = stores
    writer.import_receipt(receipt("k", 1))
    assert reader.get("k").token == 1
    pid = os.fork()
    if pid == 0:  # the child: nothing cached, its own tracking connection
        ok = not reader._cache._entries and reader._cache._sock is None \
            and reader.get("k").token == 1 and reader.get("k") is reader.get("k")
        os._exit(0 if ok else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    writer.import_receipt(receipt("k", 2))
    assert reader.get("k").token == 2  # the child did not take the parent's notices


# -- a server of this test's own: FLUSHALL, restart -----------------------------------


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[int]:
    redis_or_skip()
    server = shutil.which("redis-server")
    if server is None:
        pytest.skip("no redis-server on PATH")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = subprocess.Popen([server, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no", "--dir", str(tmp_path)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                redis.Redis(port=port, socket_connect_timeout=0.2).ping()
                break
            except redis.RedisError:
                assert time.monotonic() < deadline, "the private redis-server did not start"
                time.sleep(0.02)
        yield port
    finally:
        proc.kill()
        proc.wait(10)


def test_a_flush_empties_the_cache(private_redis: int) -> None:
    url = f"redis://127.0.0.1:{private_redis}/0?prefix=flush"
    reader, writer = open_store(url), open_store(url)
    writer.import_receipt(receipt("k"))
    assert reader.get("k") is not None and reader.get("absent") is None
    redis.Redis(port=private_redis).flushall()
    # Redis writes FLUSHALL's reply before the invalidation it sends the tracking connection
    # (queued after the command): a loaded server may be descheduled between the two writes,
    # the window docs/stores.md states. The invalidation must then arrive within it.
    deadline = time.monotonic() + 5
    while reader.get("k") is not None:
        assert time.monotonic() < deadline, "the flush never reached the cache"
        time.sleep(0.001)
    writer.import_receipt(receipt("absent"))
    assert reader.get("absent") is not None
    reader.close()
    writer.close()


def test_a_user_without_client_tracking_reads_uncached(private_redis: int) -> None:
    admin = redis.Redis(port=private_redis)
    admin.acl_setuser("plain", enabled=True, nopass=True, keys=["*"], channels=["*"],
                      commands=["+@all", "-client"])
    url = f"redis://plain@127.0.0.1:{private_redis}/0?prefix=plain"
    reader, writer = open_store(url), open_store(url)
    writer.import_receipt(receipt("k", 1))
    assert reader.get("k").token == 1  # type: ignore[union-attr]
    writer.import_receipt(receipt("k", 2))
    assert reader.get("k").token == 2  # type: ignore[union-attr]
    assert reader._cache._disabled and not reader._cache._entries  # type: ignore[attr-defined]
    reader.close()
    writer.close()


# -- listing: streamed in batches, in the documented order -----------------------------


def test_listing_streams_every_receipt_in_tool_then_fingerprint_order(redis_url: str) -> None:
    import random

    store = open_store(redis_url)
    client = store._redis  # type: ignore[attr-defined]
    wanted = []
    for i in random.sample(range(1200), 1200):  # more than two batches
        r = receipt(f"{i:05d}")
        r = Receipt(**{**r.to_dict(), "tool_name": f"tool{i % 3}"})
        store.import_receipt(r)
        wanted.append((r.tool_name, r.fingerprint))
    client.set(f"{store.prefix}r:not-a-hash", "x")  # skipped here, reported by check()
    client.rename(f"{store.prefix}r:00007", f"{store.prefix}r:renamed")
    listing = store.keyed_receipts()
    assert not isinstance(listing, list)
    got = [(r.tool_name, r.fingerprint, key) for key, r in listing]
    assert [(t, f) for t, f, _ in got] == sorted(wanted)
    assert ("tool1", "00007", "renamed") in got
    assert [r.fingerprint for r in store.iter_receipts()] == [f for _, f, _ in got]
    store.close()
