"""The Redis store when Redis fails: unreachable at start, lost mid-run, restarted empty.

Each test starts a private ``redis-server`` (no persistence: ``--save '' --appendonly
no``) on a free port in its temp dir, and stops it with SIGKILL (or pauses it with
SIGSTOP) to simulate the failure. What the engine does, as observed:

- unreachable at start: ``StoreError`` at the first use of the store (well under a
  second for a refused connection), one line naming the URL without its password; a
  call then runs its tool without sharing (in replay, the ``StoreError`` is raised);
- lost (connection refused): every store call raises ``StoreError``; the engine runs the
  tool without sharing, ``executed_fallback``, with one ``RuntimeWarning`` per tool and
  engine ("executing without sharing because the store failed: store <url>: Error 111
  connecting to ... Connection refused."). A call made after the loss returns in
  milliseconds; a call already waiting on another process's lease falls back at its next
  re-check, within the store's 1 s re-check; a holder whose tool was running keeps its
  value but warns "result not persisted";
- restarted empty: receipts from before are gone (the call runs again), the pub/sub
  listener subscribes again by itself, and a partial or edited receipt hash is never
  served.

Each test below once caught a library bug; they now guard the fixes.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import _proc_workers as workers
import pytest
from _backdoor import unsigned_receipt
from conftest import SECRET

from singleflight_agents import (
    ExecutionOutcome,
    Singleflight,
    Source,
    StoreError,
    ToolExecutionOptions,
    make_fingerprint,
)
from singleflight_agents.store import open_store
from singleflight_agents.store.base import Lease

redis = pytest.importorskip("redis")
redis_store = pytest.importorskip("singleflight_agents.store.redis")

REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"
SPAWN = multiprocessing.get_context("spawn")
TOOL = "faults.tool"
WAIT = 5.0  # wait_timeout_seconds of the calls under test; "never hang past" this

pytestmark = pytest.mark.timeout(60)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class PrivateRedis:
    """A redis-server of this test's own that keeps nothing on disk."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.port = _free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    def url(self, prefix: str = "faults") -> str:
        return f"redis://127.0.0.1:{self.port}/0?prefix={prefix}"

    def client(self) -> Any:
        return redis.Redis(host="127.0.0.1", port=self.port, decode_responses=True,
                           socket_connect_timeout=1, socket_timeout=2)

    def start(self) -> None:
        log = self.directory / "redis.log"
        self.proc = subprocess.Popen(
            [REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--daemonize", "no", "--dir", str(self.directory),
             "--logfile", str(log)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while True:
            if self.proc.poll() is not None:
                tail = log.read_text()[-500:] if log.exists() else ""
                raise RuntimeError(f"redis-server exited with {self.proc.returncode}: {tail}")
            probe = redis.Redis(host="127.0.0.1", port=self.port, socket_connect_timeout=0.2,
                                socket_timeout=0.5)
            try:
                if probe.ping():
                    return
            except redis.RedisError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"redis-server on port {self.port} did not answer PING "
                                       f"within 10 s") from None
                time.sleep(0.02)
            finally:
                probe.close()

    def kill(self) -> None:
        """Gone at once (SIGKILL): its clients see refused connections; its data is lost."""
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(10)

    def pause(self) -> None:
        """Alive but silent (SIGSTOP), like a hung server or a dropped network path."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.kill()
            self.proc.wait(10)


@pytest.fixture
def server(tmp_path: Path) -> Iterator[PrivateRedis]:
    if not os.access(REDIS_SERVER, os.X_OK):
        reason = f"no redis-server at {REDIS_SERVER}; install redis-server to run these tests"
        if os.environ.get("SINGLEFLIGHT_REQUIRE_REDIS") == "1":
            pytest.fail(reason + " (SINGLEFLIGHT_REQUIRE_REDIS=1)")
        pytest.skip(reason)
    private = PrivateRedis(tmp_path)
    try:
        private.start()
        yield private
    finally:
        private.stop()


@pytest.fixture
def engines() -> Iterator[list[Singleflight]]:
    """Engines a test opened, closed at teardown even when their Redis is gone (``close``
    then warns that the statistics were not written)."""
    opened: list[Singleflight] = []
    yield opened
    for sf in opened:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            sf.close()




def _engine(engines: list[Singleflight], store: str | Any) -> Singleflight:
    sf = Singleflight(store=store, secret=SECRET)
    engines.append(sf)
    return sf


RUNS: list[str] = []


def tool(key: str) -> dict[str, str]:
    RUNS.append(key)
    return {"key": key}


async def async_tool(key: str) -> dict[str, str]:
    RUNS.append(key)
    return {"key": key}


@pytest.fixture(autouse=True)
def _fresh_runs() -> None:
    RUNS.clear()


def _options(**extra: Any) -> ToolExecutionOptions:
    return ToolExecutionOptions(tool_name=TOOL, deterministic=True, wait_timeout_seconds=WAIT,
                                **extra)


def _call(sf: Singleflight, key: str, entry: str = "sync") -> ExecutionOutcome:
    if entry == "async":
        return asyncio.run(sf.execute(async_tool, key, options=_options()))
    return sf.execute_sync(tool, key, options=_options())


def _parked_in_redis_wait() -> bool:
    """Whether some thread sleeps in ``RedisStore.wait``'s ``Event.wait``, that is after
    it subscribed and checked the lease (not still on its way in)."""
    for frame in sys._current_frames().values():
        inner: Any = frame
        while inner is not None:
            caller = inner.f_back
            if (inner.f_code.co_name == "wait" and inner.f_code.co_filename == threading.__file__
                    and caller is not None and caller.f_code.co_name == "wait"
                    and caller.f_code.co_filename == redis_store.__file__):
                return True
            inner = caller
    return False


def _until_parked_in_redis_wait() -> None:
    deadline = time.monotonic() + 10
    while not _parked_in_redis_wait():
        assert time.monotonic() < deadline, "no caller went to sleep in RedisStore.wait"
        time.sleep(0.001)


def _in_thread(func: Callable[[], Any]) -> tuple[threading.Thread, dict[str, Any]]:
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["value"] = func()
        except BaseException as exc:
            box["error"] = exc
        box["t_done"] = time.monotonic()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, box


# -- (a) unreachable at start ----------------------------------------------------------------


def test_unreachable_at_start_is_one_error_naming_the_url() -> None:
    port = _free_port()  # nothing listens there
    shown = f"redis://127.0.0.1:{port}/0?prefix=p"
    started = time.monotonic()
    url = f"redis://agent:hunter2@127.0.0.1:{port}/0?prefix=p"
    sf = Singleflight(store=url, secret=SECRET)
    with pytest.raises(StoreError) as info:
        sf.store  # noqa: B018 -- the store is opened (and the server reached) on first use
    elapsed = time.monotonic() - started
    message = str(info.value)
    print(f"\n{message}\n(after {elapsed * 1000:.1f} ms)")
    assert "\n" not in message and shown in message, message
    assert "hunter2" not in message  # the password is not shown
    assert elapsed < 5.0
    # a first call says the same (redacted) line: a store never reached is a setting to fix
    with pytest.raises(StoreError, match=re.escape(shown)) as first_call:
        _call(sf, "a")
    assert "hunter2" not in str(first_call.value)
    with Singleflight(store=url, secret=SECRET, mode="replay") as replayer, \
            pytest.raises(StoreError, match=re.escape(shown)) as refused:
        _call(replayer, "a")  # replay never runs a shared tool
    assert "hunter2" not in str(refused.value)
    assert RUNS == []


# -- (b) lost mid-run ----------------------------------------------------------------------


@pytest.mark.parametrize("entry", ["sync", "async"])
def test_lost_before_a_call_runs_it_without_sharing(server: PrivateRedis,
                                                    engines: list[Singleflight],
                                                    entry: str) -> None:
    sf = _engine(engines, server.url())
    assert _call(sf, "a", entry).source is Source.EXECUTED
    assert _call(sf, "a", entry).source is Source.CACHE_HIT
    server.kill()

    started = time.monotonic()
    with pytest.warns(RuntimeWarning, match="executing without sharing because the store "
                      "failed") as caught:
        lost_hit = _call(sf, "a", entry)  # its receipt is out of reach now
    with warnings.catch_warnings(record=True) as later:
        warnings.simplefilter("always")
        other = _call(sf, "b", entry)  # still a fallback, but one warning per tool is enough
    assert later == []
    elapsed = time.monotonic() - started
    print(f"\n{caught[0].message}\n(two calls after the loss: {elapsed * 1000:.1f} ms)")
    assert server.url() in str(caught[0].message)
    assert lost_hit.source is Source.EXECUTED_FALLBACK and lost_hit.value == {"key": "a"}
    assert other.source is Source.EXECUTED_FALLBACK and other.value == {"key": "b"}
    assert lost_hit.receipt is None and other.receipt is None
    assert RUNS == ["a", "a", "b"]
    assert elapsed < WAIT  # a refused connection fails fast: milliseconds, in practice


@pytest.mark.slow
@pytest.mark.parametrize("entry", ["sync", "async"])
def test_lost_while_a_call_waits_and_another_runs(server: PrivateRedis, engines: list[Singleflight],
                                                  procs: list[Any], tmp_path: Path,
                                                  entry: str) -> None:
    """Another process holds the lease (its tool runs behind a gate) and this process
    waits for it when Redis dies. The waiter falls back at its next re-check; the
    holder keeps its value but cannot store it."""
    started, go, holder_q = SPAWN.Event(), SPAWN.Event(), SPAWN.Queue()
    spec = {"store": server.url(), "secret": SECRET, "log": str(tmp_path / "executions.log"),
            "key": "k", "behaviour": "gate", "tool_name": TOOL}
    holder = SPAWN.Process(target=workers.call_worker, args=(spec, holder_q, started, go),
                           daemon=True)
    holder.start()
    procs.append(holder)
    assert started.wait(30), "the holder never started its tool"

    waiting = threading.Event()
    sf = _engine(engines, workers.signalling_store(server.url(), waiting))
    call = ((lambda: asyncio.run(sf.execute(async_tool, "k", options=_options())))
            if entry == "async" else (lambda: sf.execute_sync(tool, "k", options=_options())))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        thread, box = _in_thread(call)
        assert waiting.wait(30), "the caller never waited for the holder"
        _until_parked_in_redis_wait()  # subscribed and checked: asleep until woken
        t_kill = time.monotonic()
        server.kill()
        thread.join(WAIT + 5)
    assert not thread.is_alive(), "the waiter hung after Redis was lost"
    after_loss = box["t_done"] - t_kill
    print(f"\nwaiter fell back {after_loss * 1000:.1f} ms after Redis was killed")
    assert "error" not in box, box["error"]
    outcome: ExecutionOutcome = box["value"]
    assert outcome.source is Source.EXECUTED_FALLBACK and outcome.value == {"key": "k"}
    assert outcome.fingerprint == make_fingerprint(TOOL, {"key": "k"})
    messages = [str(w.message) for w in caught]
    assert any("executing without sharing because the store failed" in m for m in messages), \
        messages
    # The waiter notices at its next re-check of the lease (at most every second; about
    # 1.0 s here, as it had just gone to sleep), not after wait_timeout_seconds.
    assert after_loss < WAIT

    go.set()  # the holder's tool returns now, with Redis gone
    (result,) = [holder_q.get(timeout=30)]
    holder.join(10)
    assert result["crash"] is None, result["crash"]
    assert result["source"] == "executed" and result["value"]["key"] == "k"
    assert result["receipt_token"] is None
    assert any("not persisted" in w for w in result["warnings"]), result["warnings"]
    print(f"holder: {result['warnings']}; close(): {result.get('close_error')}")


def test_close_after_redis_is_lost_does_not_raise(server: PrivateRedis) -> None:
    sf = Singleflight(store=server.url(), secret=SECRET)
    try:
        sf.execute_sync(tool, "a", options=_options())  # counters to flush at close
        server.kill()
        with pytest.warns(RuntimeWarning):
            assert sf.execute_sync(tool, "b", options=_options()).source is Source.EXECUTED_FALLBACK
        with pytest.warns(RuntimeWarning, match="statistics not written"):
            sf.close()
    finally:
        sf.store.close()


def test_lost_right_after_the_lease_is_taken_still_runs_the_tool(server: PrivateRedis,
                                                                 engines: list[Singleflight]) -> None:
    class DiesAfterAcquire(redis_store.RedisStore):  # type: ignore[misc]
        def acquire(self, key: str, owner: str, lease_seconds: float) -> Any:
            got = super().acquire(key, owner, lease_seconds)
            server.kill()  # after the lease is taken, before the holder looks again
            return got

    sf = _engine(engines, DiesAfterAcquire(server.url()))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        outcome = sf.execute_sync(tool, "a", options=_options())
    assert outcome.value == {"key": "a"} and RUNS == ["a"]
    assert outcome.source in (Source.EXECUTED, Source.EXECUTED_FALLBACK)
    assert caught, "losing the store should be reported"


@pytest.mark.slow
def test_unresponsive_redis_does_not_hold_a_call_past_its_wait_timeout(
        server: PrivateRedis, engines: list[Singleflight]) -> None:
    sf = _engine(engines, server.url())
    options = _options().replace(wait_timeout_seconds=1.0)
    sf.execute_sync(tool, "a", options=options)
    server.pause()
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        thread, box = _in_thread(lambda: sf.execute_sync(tool, "b", options=options))
        try:
            thread.join(1.0 + 4.0)  # generous: wait_timeout_seconds + 4 s
            assert not thread.is_alive(), "the call still blocks on the paused server"
        finally:
            server.stop()  # the blocked socket read ends at once
            thread.join(15)
    assert box["value"].source is Source.EXECUTED_FALLBACK


# -- (c) restarted empty ---------------------------------------------------------------------


def test_restart_serves_nothing_from_before(server: PrivateRedis, engines: list[Singleflight]) -> None:
    sf = _engine(engines, server.url())
    before = _call(sf, "a")
    assert before.source is Source.EXECUTED and before.receipt is not None
    server.kill()
    with pytest.warns(RuntimeWarning, match="without sharing"):
        assert _call(sf, "a").source is Source.EXECUTED_FALLBACK
    server.start()  # same port, empty: nothing was on disk

    # The same engine works again without reopening it, and runs "a" again: the receipt
    # from before the restart is gone, not served from anywhere.
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback, no tampering
        again = _call(sf, "a")
        assert again.source is Source.EXECUTED and again.receipt is not None
        assert _call(sf, "a").source is Source.CACHE_HIT
    assert RUNS == ["a", "a", "a"]
    assert sf.summary()["executed"] >= 1  # statistics are written again too


@pytest.mark.parametrize("damage", ["no signature", "output only", "token nonsense",
                                    "expiry nonsense", "empty output"])
def test_a_partial_or_edited_receipt_hash_is_not_served(server: PrivateRedis,
                                                        engines: list[Singleflight],
                                                        damage: str) -> None:
    """A receipt is written by one Lua script, so a crash cannot leave half of one; an
    edited or half-copied hash (say, restored by hand after a restart) must still never be
    served: it fails the signature check and the call runs again."""
    sf = _engine(engines, server.url())
    first = _call(sf, "a")
    name = f"faults:r:{first.fingerprint}"
    client = server.client()
    try:
        fields = client.hgetall(name)
        assert fields["signature"]
        if damage == "no signature":
            del fields["signature"]
        elif damage == "output only":
            fields = {"output": fields["output"]}
        elif damage == "token nonsense":
            fields["token"] = "not-a-number"
        elif damage == "expiry nonsense":
            fields["expires_at"] = "soon"
        else:
            fields["output"] = ""
        client.delete(name)
        client.hset(name, mapping=fields)
    finally:
        client.close()

    other = _engine(engines, server.url())  # not the engine that checked the good one
    with pytest.warns(RuntimeWarning, match="signature check"):
        outcome = _call(other, "a")
    assert outcome.source is Source.EXECUTED and outcome.value == {"key": "a"}
    assert _call(other, "a").source is Source.CACHE_HIT  # rewritten whole and signed
    assert RUNS == ["a", "a"]


def test_wake_ups_resume_after_a_restart(server: PrivateRedis, engines: list[Singleflight]) -> None:
    """The per-process pub/sub listener survives the restart: it subscribes again by
    itself, and a waiter is woken by the holder's message, not by the 1 s re-check."""
    waiting = threading.Event()
    sf = _engine(engines, workers.signalling_store(server.url(), waiting))
    holder_store = open_store(server.url())
    client = server.client()
    try:
        def woken_after(key: str) -> float:
            """How long after another process's lease on ``key`` ends our waiter runs."""
            lease = holder_store.acquire(make_fingerprint(TOOL, {"key": key}), "other", 30.0)
            assert isinstance(lease, Lease)
            waiting.clear()
            thread, box = _in_thread(lambda: sf.execute_sync(tool, key, options=_options()))
            assert waiting.wait(10), "the caller never waited"
            released = time.monotonic()
            holder_store.release(lease)  # publishes the wake-up
            thread.join(10)
            assert "error" not in box, box["error"]
            assert box["value"].source is Source.EXECUTED
            return box["t_done"] - released

        before = woken_after("w0")  # starts the listener
        assert client.pubsub_numpat() == 1
        server.kill()
        server.start()
        client.close()
        client = server.client()
        deadline = time.monotonic() + 10
        while client.pubsub_numpat() != 1:  # the listener retries every 0.5 s
            assert time.monotonic() < deadline, "the listener never subscribed again"
            time.sleep(0.05)
        after = woken_after("w1")
    finally:
        client.close()
        holder_store.close()
    print(f"\nwoken {before * 1000:.1f} ms before the restart, {after * 1000:.1f} ms after")
    assert before < 0.9 and after < 0.9  # the message, not the 1 s re-check (margin for load)


def test_a_holder_from_before_a_restart_is_fenced_out(server: PrivateRedis) -> None:
    old_store = open_store(server.url())
    key = "f" * 64
    try:
        old = old_store.acquire(key, "old", 30.0)
        assert isinstance(old, Lease)
        server.kill()
        server.start()
        new_store = open_store(server.url())
        try:
            new = new_store.acquire(key, "new", 30.0)
            assert isinstance(new, Lease)
            stale_written = old_store.put(unsigned_receipt(key, old.token, '"old"'), old)
            new_written = new_store.put(unsigned_receipt(key, new.token, '"new"'), new)
            stored = new_store.get(key)
            print(f"\ntokens: old {old.token}, new {new.token}; old put {stale_written}, "
                  f"new put {new_written}")
            assert (stale_written, new_written) == (False, True)
            assert stored is not None and stored.output == '"new"'
        finally:
            new_store.close()
    finally:
        old_store.close()
