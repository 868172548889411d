"""Runs where its users run (issue 18): no POSIX-only name is needed to import the package
and share a call; the liveness lock has a Windows implementation and a lease-expiry
fallback; no SQLite connection is leaked or carried across a fork.

The whole store suite also runs with the non-``fcntl`` paths forced on, in processes of their
own: ``SINGLEFLIGHT_TEST_PLATFORM=windows-lock|no-lock PYTHONPATH=tests/portable`` (.ci/run)."""

from __future__ import annotations

import gc
import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest

from singleflight_agents.store import Busy, Lease, SQLiteStore
from singleflight_agents.store import sqlite as sqlite_module
from singleflight_agents.store._liveness import WindowsLock, platform_lock
from singleflight_agents.store._locks import KeyLocks

PORTABLE = Path(__file__).parent / "portable"
KEY = "ab" * 32


def test_the_forced_platform_is_in_force() -> None:
    """Guards the forced-portable runs: they must really run without ``fcntl``."""
    forced = os.environ.get("SINGLEFLIGHT_TEST_PLATFORM")
    if not forced:
        pytest.skip("not a forced-portable run (SINGLEFLIGHT_TEST_PLATFORM unset)")
    lock = platform_lock()
    assert (lock.name if lock else None) == {"windows-lock": "msvcrt", "no-lock": None}[forced]
    with pytest.raises(ImportError):
        import fcntl  # noqa: F401
    # ... and so must the processes the tests start (chaos workers, spawned callers).
    child = subprocess.run([sys.executable, "-c", "from singleflight_agents.store._liveness import "
                            "platform_lock as p; print(getattr(p(), 'name', None))"],
                           capture_output=True, text=True, timeout=60, check=True)
    assert child.stdout.strip() == str(lock.name if lock else None)


# The script removes every POSIX-only name the package could reach for, then imports it.
_WITHOUT_POSIX = """
import os, sys, threading
sys.modules["fcntl"] = None
for name in ("register_at_fork", "O_CLOEXEC", "O_NOFOLLOW", "O_NONBLOCK", "O_DIRECTORY",
             "geteuid", "uname"):
    if hasattr(os, name):
        delattr(os, name)
{extra}
from singleflight_agents import Singleflight
from singleflight_agents.store._liveness import platform_lock

db = sys.argv[1]
lock = platform_lock()
print("lock", lock.name if lock else None)
runs = []

def tool_on(sf):
    @sf.tool(deterministic=True, tool_name="portable.lookup")
    def lookup(q):
        runs.append(q)
        return {{"q": q}}
    return lookup

sf = Singleflight(store=db)
lookup = tool_on(sf)
threads = [threading.Thread(target=lookup, args=("x",)) for _ in range(8)]
for t in threads:
    t.start()
for t in threads:
    t.join(60)
sf.close()
again = Singleflight(store=db)  # a new engine: the receipt, signed with the key file
tool_on(again)("x")
print("hits", again.summary()["cache_hits"])
again.close()
print("runs", len(runs))
"""


# These force a platform themselves, with the real fcntl at hand: not within a forced run.
self_forcing = pytest.mark.skipif(bool(os.environ.get("SINGLEFLIGHT_TEST_PLATFORM")),
                                  reason="a forced-portable run has no fcntl to build on")


@pytest.mark.slow
@self_forcing
@pytest.mark.parametrize("lock", ["msvcrt", "none"])
def test_imports_and_shares_a_call_with_every_posix_name_missing(tmp_path: Path, lock: str) -> None:
    extra = ("" if lock == "none" else
             f"sys.path.insert(0, {str(PORTABLE)!r}); import fake_msvcrt, importlib; "
             f"sys.modules['msvcrt'] = fake_msvcrt.make(importlib.import_module('_fcntl_real'))")
    script = _WITHOUT_POSIX.format(extra=extra)
    if lock == "msvcrt":  # the stand-in needs the real flock, imported before it is hidden
        script = "import fcntl as _f, sys; sys.modules['_fcntl_real'] = _f\n" + script
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path / "r.db")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    lines = dict(line.split(" ", 1) for line in done.stdout.splitlines())
    assert lines == {"lock": "msvcrt" if lock == "msvcrt" else "None",
                     "hits": "1", "runs": "1"}, done.stdout


# -- the Windows lock, on the stand-in for msvcrt ------------------------------------------


@pytest.fixture
def windows_locks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> KeyLocks:
    sys.path.insert(0, str(PORTABLE))
    try:
        import fake_msvcrt
    finally:
        sys.path.remove(str(PORTABLE))
    import fcntl

    monkeypatch.setitem(sys.modules, "msvcrt", fake_msvcrt.make(fcntl))
    return KeyLocks(tmp_path / "r.db.locks", WindowsLock())


@self_forcing
def test_the_windows_lock_excludes_wakes_its_waiter_and_leaves_the_file_to_prune(
        windows_locks: KeyLocks) -> None:
    fd = windows_locks.try_lock(KEY)
    assert fd is not None
    assert windows_locks.try_lock(KEY) is None  # held: a second holder is refused
    waited = threading.Event()
    waiter = threading.Thread(target=lambda: (windows_locks.wait(KEY, 30), waited.set()))
    waiter.start()
    assert not waited.wait(0.2)  # still held: the waiter is still waiting
    windows_locks.unlock(KEY, fd)
    waiter.join(30)
    assert waited.is_set()
    lock_file = windows_locks.directory / KEY
    assert lock_file.exists()  # Windows cannot unlink a file others hold open: kept for prune
    held = windows_locks.try_lock("cd" * 32)
    assert held is not None
    assert windows_locks.prune() == 1  # the finished holder's file, not the live one's
    assert not lock_file.exists() and (windows_locks.directory / ("cd" * 32)).exists()
    windows_locks.unlock("cd" * 32, held)


# -- no liveness lock: leases expire ---------------------------------------------------------


def test_without_a_liveness_lock_a_held_lease_excludes_until_it_lapses(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sqlite_module, "platform_lock", lambda: None)
    first, second = SQLiteStore(tmp_path / "r.db"), SQLiteStore(tmp_path / "r.db")
    try:
        lease = first.acquire(KEY, "first", 30.0)
        assert isinstance(lease, Lease) and not lease.takeover
        busy = second.acquire(KEY, "second", 30.0)
        assert isinstance(busy, Busy) and busy.since_token == lease.token
        assert not (tmp_path / "r.db.locks").exists()  # no lock files without a lock
        first.release(lease)
        again = second.acquire(KEY, "second", 30.0)
        assert isinstance(again, Lease) and not again.takeover
        # A holder that died: its lease is taken over once it has lapsed, not before.
        with second._write() as conn:
            conn.execute("UPDATE leases SET expires_at = 0")
        taken = first.acquire(KEY, "first", 30.0)
        assert isinstance(taken, Lease) and taken.takeover and taken.token > again.token
        second.wait(KEY, 0.05)  # a held, live lease: returns at its timeout
    finally:
        first.close()
        second.close()


# -- no leaked connections, none across a fork ------------------------------------------------


def _connection_of_a_thread(store: SQLiteStore) -> Any:
    box: list[Any] = []
    worker = threading.Thread(target=lambda: (store.get(KEY), box.append(store._conn())))
    worker.start()
    worker.join(30)
    return box[0]


def test_close_closes_the_connections_of_every_thread(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "r.db")
    main_conn = store._conn()
    store.get(KEY)
    box: list[Any] = []
    ready, finish = threading.Event(), threading.Event()

    def use() -> None:
        store.get(KEY)
        box.append(store._conn())
        ready.set()
        finish.wait(30)

    worker = threading.Thread(target=use)
    worker.start()
    assert ready.wait(30)
    store.close()  # from the main thread, while the worker is still alive
    finish.set()
    worker.join(30)
    for conn in (main_conn, box[0]):
        with pytest.raises(Exception, match="closed database"):
            conn.execute("SELECT 1")


def test_a_threads_connection_is_closed_when_the_thread_ends(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "r.db")
    try:
        conn = _connection_of_a_thread(store)
        gc.collect()
        with pytest.raises(Exception, match="closed database"):
            conn.execute("SELECT 1")
    finally:
        store.close()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork on this platform")
def test_no_connection_is_open_across_a_fork(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "r.db")
    try:
        before = store._conn()
        store.get(KEY)
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: a store operation works on a connection of its own
            try:
                ok = store.get(KEY) is None and store._conn() is not before
                os.write(write, b"ok" if ok else b"no")
            finally:
                os._exit(0)
        os.close(write)
        assert os.read(read, 2) == b"ok"
        os.close(read)
        os.waitpid(pid, 0)
        with pytest.raises(Exception, match="closed database"):  # closed before the fork
            before.execute("SELECT 1")
        assert store.get(KEY) is None  # and the parent reopens on its next operation
    finally:
        store.close()


def test_close_waits_for_an_operation_in_flight_instead_of_closing_under_it(
        tmp_path: Path) -> None:
    """Closing a connection a statement is using crashes SQLite: close() waits for it."""
    import contextlib
    import sqlite3

    store = SQLiteStore(tmp_path / "r.db")
    entered, closed = threading.Event(), threading.Event()
    enter = store._conns.enter

    def entering() -> None:
        enter()
        entered.set()

    store._conns.enter = entering  # type: ignore[method-assign]
    blocker = sqlite3.connect(tmp_path / "r.db", isolation_level=None)
    results: list[Any] = []
    try:
        blocker.execute("BEGIN IMMEDIATE")  # the operation below waits for this write lock
        worker = threading.Thread(target=lambda: results.append(
            store.save_stats("run", "proc", {"t": {"calls": 1}})))
        worker.start()
        assert entered.wait(30)
        closer = threading.Thread(target=lambda: (store.close(), closed.set()))
        closer.start()
        assert not closed.wait(0.3)  # still waiting for the operation
        blocker.execute("COMMIT")
        worker.join(30)
        closer.join(30)
        assert results == [None] and closed.is_set()
        assert store.load_stats("run")[0][2]["calls"] == 1  # the store reopens on use
    finally:
        with contextlib.suppress(sqlite3.Error):
            blocker.execute("ROLLBACK")
        blocker.close()
        store.close()


def test_a_store_made_during_a_fork_is_left_alone_by_the_after_fork_hook(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "r.db")
    try:
        store._conns._after_fork()  # as for a store made between the fork's two hooks
        assert store.get(KEY) is None  # not paused, its lock not released twice
    finally:
        store.close()
