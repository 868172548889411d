"""Real processes sharing one store, on each backend (an SQLite file, then a Redis
prefix): dedupe, slow and killed holders, failure fan-out, fencing, and a forked child.

Every execution appends a line to a log file opened with O_APPEND (see
``_proc_workers.py``); the tests count executions there. Processes are synchronised
with multiprocessing events and barriers, never with sleeps (sleeps appear only inside
tools, as simulated work). Each worker process gets the store URL and the secret.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import sqlite3
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import _proc_workers as workers
import pytest
from _backdoor import unsigned_receipt
from conftest import SECRET

from singleflight_agents import Singleflight, Source, ToolExecutionOptions
from singleflight_agents.store import SQLiteStore, open_store
from singleflight_agents.store.base import Busy, Lease

SPAWN = multiprocessing.get_context("spawn")
FORK = multiprocessing.get_context("fork")
SIGNAL_TIMEOUT = 30.0  # generous bound for "the other process got there"; never reached

pytestmark = pytest.mark.timeout(60)




@pytest.fixture
def env(store_url: str, tmp_path: Path) -> dict[str, str]:
    """What every worker needs: the store URL (SQLite path or Redis URL with a prefix of
    this test's own), the secret, and the execution log."""
    return {"store": store_url, "secret": SECRET, "log": str(tmp_path / "executions.log")}


def _start(procs: list[Any], ctx: Any, target: Callable[..., None], *args: Any) -> Any:
    proc = ctx.Process(target=target, args=args, daemon=True)
    proc.start()
    procs.append(proc)
    return proc


def _collect(queue: Any, count: int, timeout: float = 45.0) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout
    results = [queue.get(timeout=max(0.1, deadline - time.monotonic())) for _ in range(count)]
    for result in results:
        assert result["crash"] is None, result["crash"]
    return results


def _wait_for(event: Any, what: str) -> None:
    assert event.wait(SIGNAL_TIMEOUT), f"timed out waiting for {what}"


def _spec(env: dict[str, str], key: str, behaviour: str, **extra: Any) -> dict[str, Any]:
    return {**env, "key": key, "behaviour": behaviour, **extra}


def _engine(env: dict[str, str], **kwargs: Any) -> Singleflight:
    return Singleflight(store=env["store"], secret=env["secret"], **kwargs)


# -- 1. many processes, many keys --------------------------------------------------------


@pytest.mark.slow
def test_8_processes_20_keys_execute_each_key_once(env: dict[str, str], procs: list[Any]) -> None:
    keys = [f"k{i:02d}" for i in range(20)]
    # On SQLite there is no store file yet: the 8 processes also race to create the
    # schema and switch the fresh file to WAL (the race
    # test_opening_a_fresh_store_waits_for_a_concurrent_writer pins down
    # deterministically). On Redis the prefix is fresh: no token counter yet.
    barrier, queue = SPAWN.Barrier(8), SPAWN.Queue()
    for idx in range(8):
        # half the processes call from asyncio tasks, half from threads: the async and
        # the sync implementation share one tool name, so they share executions too
        _start(procs, SPAWN, workers.grid_worker, idx, env, keys,
               "async" if idx % 2 else "threads", barrier, queue)
    results = _collect(queue, 8)
    for proc in procs:
        proc.join(10)
        assert proc.exitcode == 0

    for result in results:
        assert not [w for w in result["warnings"] if "locked" in w or "without sharing" in w], \
            result["warnings"]
    runs = workers.read_log(env["log"])
    assert sorted(key for _, key, _ in runs) == keys  # exactly one execution per key
    executor_of = {key: pid for pid, key, _ in runs}
    sources: Counter[str] = Counter()
    for result in results:
        assert len(result["outcomes"]) == 20
        for key, value, source, takeover in result["outcomes"]:
            # the right value for the key, produced by the one process that ran it
            assert value == {"key": key, "upper": key.upper(), "by": executor_of[key]}
            assert not takeover
            sources[source] += 1
    print(f"\nsources over 160 calls: {dict(sources)}")
    assert sources["executed"] == 20
    assert sources["executed"] + sources["shared_wait"] + sources["cache_hit"] == 160, sources

    with _engine(env, run_id="grid") as sf:
        totals = sf.summary()
    assert totals["calls"] == 160 and totals["executed"] == 20
    assert totals["avoided_calls"] == 140 and totals["fallbacks"] == 0


# -- 2. a holder that outlives its lease term many times over ------------------------------


@pytest.mark.slow
def test_slow_holder_keeps_its_lease_and_runs_once(env: dict[str, str], procs: list[Any]) -> None:
    # On Redis the waiters take the lease over the moment it lapses, so this is also
    # the test that the heartbeat (every third of the term) keeps it from lapsing.
    lease_seconds, work_seconds, callers = 0.5, 1.5, 3
    barrier, queue = SPAWN.Barrier(callers), SPAWN.Queue()
    spec = _spec(env, "slow", "slow", tool_name="procs.slow", work_seconds=work_seconds,
                 options={"lease_seconds": lease_seconds})
    for _ in range(callers):
        _start(procs, SPAWN, workers.call_worker, spec, queue, None, None, None, barrier)
    results = _collect(queue, callers)

    runs = workers.read_log(env["log"])
    assert len(runs) == 1, runs
    holder_pid = runs[0][0]
    by_pid = {r["pid"]: r for r in results}
    assert by_pid[holder_pid]["source"] == "executed"
    assert not by_pid[holder_pid]["takeover"]
    for result in results:
        assert "error" not in result and "shared_error" not in result, result
        assert result["value"]["by"] == holder_pid
        if result["pid"] != holder_pid:
            assert result["source"] in ("shared_wait", "cache_hit")

    # The heartbeat renewed the lease while the tool ran: the lease the tool saw at its
    # end expires later than the lease it saw at its start by more than one whole term
    # (only a renewal after the first term had lapsed can do that).
    value = by_pid[holder_pid]["value"]
    (fingerprint, token0, state0, expires0), = value["lease_at_start"]
    (_, token1, state1, expires1), = value["lease_at_end"]
    assert (state0, state1) == ("held", "held") and token0 == token1
    assert expires1 > expires0 + lease_seconds, (expires0, expires1)
    # and the lease is finished now, with the holder's token on the receipt
    store = open_store(env["store"])
    try:
        # (SQLite deletes a finished lease's row; Redis lets it expire)
        finished = [] if isinstance(store, SQLiteStore) else [(token0, "done")]
        assert [(token, state) for _, token, state, _ in workers.lease_rows(store)] == finished
        receipt = store.get(fingerprint)
        assert receipt is not None and receipt.token == token0
    finally:
        store.close()


# -- 3. a holder killed mid-execution --------------------------------------------------------


@pytest.mark.slow
def test_killed_holder_is_taken_over(env: dict[str, str], procs: list[Any]) -> None:
    """SQLite sees the holder's lock file unlocked by the kernel at once: takeover in
    well under 3 s with the default 10 s lease. Redis cannot see a death: the waiter
    takes over when the lease lapses, at most ``lease_seconds`` after the holder's last
    renewal, so the test uses a 1 s lease there and allows 2 s on top."""
    # Without a liveness lock (tests/portable), SQLite too waits for the lease to lapse.
    redis = workers.is_redis(env["store"]) or not workers.has_liveness_lock()
    options = {"lease_seconds": 1.0} if redis else {}
    bound = 1.0 + 2.0 if redis else 3.0
    started, waiting = SPAWN.Event(), SPAWN.Event()
    holder_q, queue = SPAWN.Queue(), SPAWN.Queue()  # kept referenced while children start
    holder = _start(procs, SPAWN, workers.call_worker, _spec(env, "k", "block", options=options),
                    holder_q, started)
    _wait_for(started, "the holder to start executing")
    _start(procs, SPAWN, workers.call_worker, _spec(env, "k", "return", options=options), queue,
           None, None, waiting)
    _wait_for(waiting, "the second caller to block on the holder")
    store = open_store(env["store"])
    try:
        ((_, dead_token, state, _),) = workers.lease_rows(store)
    finally:
        store.close()
    assert state == "held"

    t_kill = time.time()
    os.kill(holder.pid, signal.SIGKILL)
    (result,) = _collect(queue, 1, timeout=20)
    takeover_seconds = result["t_done"] - t_kill
    print(f"\ntakeover after SIGKILL ({'redis, 1 s lease' if redis else 'sqlite'}): "
          f"{takeover_seconds * 1000:.1f} ms")

    holder.join(10)
    assert holder.exitcode == -signal.SIGKILL
    assert "error" not in result, result
    assert result["source"] == "executed" and result["takeover"] is True
    assert result["value"] == {"key": "k", "by": result["pid"]}
    assert takeover_seconds < bound
    runs = workers.read_log(env["log"])
    assert [pid for pid, _, _ in runs] == [holder.pid, result["pid"]]
    # the taker's receipt is stored under a newer token than the dead holder's
    assert result["receipt_token"] > dead_token
    with _engine(env) as sf:
        outcome = sf.execute_sync(workers.tool, "k", options=ToolExecutionOptions(
            tool_name="procs.tool", deterministic=True))
    assert outcome.source is Source.CACHE_HIT and outcome.value == result["value"]
    assert outcome.receipt is not None and outcome.receipt.token == result["receipt_token"]


# -- 4. a failure while another process waits ------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("share_failures", [False, True])
def test_failure_reaches_a_waiting_process(env: dict[str, str], procs: list[Any],
                                           share_failures: bool) -> None:
    started, go, waiting = SPAWN.Event(), SPAWN.Event(), SPAWN.Event()
    holder_q, waiter_q = SPAWN.Queue(), SPAWN.Queue()
    options = {"share_failures": share_failures}
    _start(procs, SPAWN, workers.call_worker, _spec(env, "k", "fail", options=options),
           holder_q, started, go)
    _wait_for(started, "the holder to start executing")
    _start(procs, SPAWN, workers.call_worker, _spec(env, "k", "return", options=options),
           waiter_q, None, None, waiting)
    _wait_for(waiting, "the waiter to block on the holder")
    go.set()  # the holder raises now

    (holder,) = _collect(holder_q, 1)
    (waiter,) = _collect(waiter_q, 1)
    assert holder["error"] == {"type": "ValueError", "text": "boom for k"}
    t_raise = holder["t_raise"]
    runs = workers.read_log(env["log"])
    if share_failures:
        assert "source" not in waiter, waiter
        assert waiter["shared_error"]["error_type"] == "ValueError"
        assert waiter["shared_error"]["error_message"] == "boom for k"
        assert waiter["shared_error"]["tool_name"] == "procs.tool"
        assert [pid for pid, _, _ in runs] == [holder["pid"]]  # the waiter did not re-run it
        learned = waiter["t_done"]
    else:
        assert "error" not in waiter and "shared_error" not in waiter, waiter
        assert waiter["source"] == "executed" and waiter["takeover"] is False
        assert waiter["value"] == {"key": "k", "by": waiter["pid"]}
        assert [pid for pid, _, _ in runs] == [holder["pid"], waiter["pid"]]
        learned = runs[1][2]  # when the waiter's own execution started
    fan_out = learned - t_raise
    backend = "redis" if workers.is_redis(env["store"]) else "sqlite"
    print(f"\nfailure fan-out ({backend}, share_failures={share_failures}): "
          f"{fan_out * 1000:.1f} ms")
    # the wake-up (flock / pub/sub), not the 1 s re-check of the Redis store
    assert 0 <= fan_out < 1.0


# -- 5. fencing ------------------------------------------------------------------------------


@pytest.mark.parametrize("stale_writes_first", [False, True])
def test_a_lease_lost_to_a_newer_token_cannot_write(store_url: str, stale_writes_first: bool) -> None:
    """A live holder keeps its lease (SQLite: its flock; Redis: an unexpired lease hash).
    It loses it when the lock file is deleted (as a cleanup script might) or when the
    lease lapses (as after a long pause): ``steal_leases`` does either. A second store
    then takes a new, higher token, and the old holder's renew and put are refused: the
    fence is the token compared inside put's write transaction / Lua script."""
    old_store, new_store = open_store(store_url), open_store(store_url)
    key = "f" * 64
    try:
        old = old_store.acquire(key, "old", 10.0)
        assert isinstance(old, Lease)
        assert isinstance(new_store.acquire(key, "new", 10.0), Busy)  # the lease excludes
        assert workers.steal_leases(old_store) == 1  # the old holder loses its lease

        new = new_store.acquire(key, "new", 10.0)
        assert isinstance(new, Lease)
        assert new.takeover and new.token > old.token
        assert old_store.renew(old) is False
        assert new_store.renew(new) is True
        if stale_writes_first:
            assert old_store.put(unsigned_receipt(key, old.token, '"old"'), old) is False
            assert old_store.get(key) is None  # the refused write left nothing behind
            assert new_store.put(unsigned_receipt(key, new.token, '"new"'), new) is True
        else:
            assert new_store.put(unsigned_receipt(key, new.token, '"new"'), new) is True
            assert old_store.put(unsigned_receipt(key, old.token, '"old"'), old) is False
        stored = old_store.get(key)
        assert stored is not None and (stored.output, stored.token) == ('"new"', new.token)
        # releasing the stale lease (as the engine does after an error) changes nothing
        old_store.release(old, ("ValueError", "late"))
        assert new_store.last_failure(key) is None
        finished = [] if isinstance(new_store, SQLiteStore) else [(new.token, "done")]
        assert [(token, state) for _, token, state, _ in workers.lease_rows(new_store)] == finished
    finally:
        old_store.close()
        new_store.close()


@pytest.mark.slow
def test_engine_holder_fenced_out_by_a_takeover_keeps_the_newerunsigned_receipt(
        env: dict[str, str], procs: list[Any]) -> None:
    """The same through the engine across processes: the old holder's result is not
    persisted, it is told so, and the taker's receipt is the one served afterwards."""
    started, go = SPAWN.Event(), SPAWN.Event()
    old_q, new_q = SPAWN.Queue(), SPAWN.Queue()
    # A long term, so that the old holder's heartbeat (first renewal after 20 s) cannot
    # give a stolen Redis lease back to it before the new caller takes it over.
    _start(procs, SPAWN, workers.call_worker,
           _spec(env, "k", "gate", options={"lease_seconds": 60.0}), old_q, started, go)
    _wait_for(started, "the first holder to start executing")
    store = open_store(env["store"])
    try:
        assert workers.steal_leases(store) == 1  # the first holder loses its lease
    finally:
        store.close()

    _start(procs, SPAWN, workers.call_worker, _spec(env, "k", "return"), new_q)
    (new,) = _collect(new_q, 1)
    assert new["source"] == "executed" and new["takeover"] is True
    go.set()
    (old,) = _collect(old_q, 1)
    assert old["source"] == "executed" and old["receipt_token"] is None
    assert any("lease was taken over" in w for w in old["warnings"]), old["warnings"]
    assert new["receipt_token"] is not None

    with _engine(env) as sf:
        outcome = sf.execute_sync(workers.tool, "k", options=ToolExecutionOptions(
            tool_name="procs.tool", deterministic=True))
        assert outcome.source is Source.CACHE_HIT
        assert outcome.value == {"key": "k", "by": new["pid"]}
        assert outcome.receipt is not None and outcome.receipt.token == new["receipt_token"]
        # every process's counters, whatever its run id: the old holder counted the fence
        assert sum(c.get("fenced_out", 0) for _, _, c in sf.store.load_stats(None)) == 1
    assert len(workers.read_log(env["log"])) == 2


# -- 6. a forked child using the parent's engine -------------------------------------------


# Forking while a thread runs is what this test is about: Python 3.12+ warns that a lock held
# by another thread at the fork stays locked in the child. It is safe for what the child uses:
# the flight table and the heartbeat are reset in the child, the holder's lock fds are closed
# there, and every SQLite store closes its connections before the fork, after the operations
# in flight (store/_connections.py), so the child inherits no lock that a thread holds.
@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded, use of fork:DeprecationWarning")
def test_forked_child_shares_the_parents_engine(env: dict[str, str], procs: list[Any]) -> None:
    waiting = FORK.Event()
    go = threading.Event()
    started = threading.Event()
    workers.CONFIG.update(log=env["log"], behaviour="gate", started=started, go=go)
    opts = ToolExecutionOptions(tool_name="procs.fork", deterministic=True)
    sf = Singleflight(store=workers.signalling_store(env["store"], waiting), secret=env["secret"])
    try:
        # The parent holds "a" (a thread is inside the tool, holding the lease) when it
        # forks; the child must wait for the parent, not for itself, and must not keep
        # the parent's lease (SQLite: its lock file's fd) as its own.
        box: dict[str, Any] = {}
        holder = threading.Thread(target=lambda: box.setdefault(
            "outcome", sf.execute_sync(workers.tool, "a", options=opts)))
        holder.start()
        assert started.wait(SIGNAL_TIMEOUT)
        queue = FORK.Queue()
        child = _start(procs, FORK, workers.fork_child, sf, "a", queue)
        _wait_for(waiting, "the forked child to wait for the parent")
        go.set()
        holder.join(SIGNAL_TIMEOUT)
        assert box["outcome"].source is Source.EXECUTED
        (got,) = _collect(queue, 1, timeout=20)
        child.join(10)
        assert child.exitcode == 0
        assert got["source"] == "shared_wait" and got["value"] == {"key": "a", "by": os.getpid()}

        # The other way round: a child executes "b", the parent then finds its receipt.
        workers.CONFIG.update(behaviour="return", started=None)
        child = _start(procs, FORK, workers.fork_child, sf, "b", queue)
        (got,) = _collect(queue, 1, timeout=20)
        child.join(10)
        assert child.exitcode == 0
        assert got["source"] == "executed" and got["value"] == {"key": "b", "by": child.pid}
        outcome = sf.execute_sync(workers.tool, "b", options=opts)
        assert outcome.source is Source.CACHE_HIT and outcome.value == got["value"]

        runs = workers.read_log(env["log"])
        assert [(pid, key) for pid, key, _ in runs] == [(os.getpid(), "a"), (child.pid, "b")]
        totals = sf.summary()  # one run id: the parent's and both children's counters
        print("TOTALS", totals, sf.store.load_stats(None))
        assert totals["executed"] == 2 and totals["shared_waits"] == 1
        assert totals["cache_hits"] == 1
    finally:
        workers.CONFIG.update(behaviour="return", started=None, go=None)
        sf.close()


# -- SQLite only: the race of opening a fresh store ---------------------------------------


@pytest.mark.slow
def test_opening_a_fresh_store_waits_for_a_concurrent_writer(tmp_path: Path) -> None:
    """Reproduces, deterministically, the state that 8 processes opening one fresh store
    hit now and then: the first opener has committed the schema and is about to switch
    the file to WAL while a second opener holds the write lock (it read user_version 0
    before the commit and is inside BEGIN IMMEDIATE). The switch must wait for the lock
    like every other statement, not fail. (It failed at once with 'database is locked'
    before the WAL switch was retried; test 1 then crashed about one run in five.)"""
    from singleflight_agents.store import sqlite as sqlite_store

    db = tmp_path / "receipts.db"
    other = sqlite3.connect(db, isolation_level=None)
    try:
        for statement in sqlite_store._SCHEMA.split(";"):  # what the first opener committed
            if statement.strip():
                other.execute(statement)
        other.execute(f"PRAGMA user_version={sqlite_store.SCHEMA_VERSION}")
        assert other.execute("PRAGMA journal_mode").fetchone() == ("delete",)
        other.execute("BEGIN IMMEDIATE")  # the second opener holds the write lock

        box: dict[str, Any] = {}

        def open_store() -> None:
            try:
                SQLiteStore(db).close()
            except Exception as exc:
                box["error"] = exc

        opener = threading.Thread(target=open_store)
        opener.start()
        opener.join(1.0)  # a correct opener is still waiting for the lock here
        failed_while_locked = opener.is_alive() is False and "error" in box
        other.execute("COMMIT")
        opener.join(30)
    finally:
        other.close()
    assert not failed_while_locked, f"opening failed while the lock was held: {box['error']}"
    assert "error" not in box, box
    check = sqlite3.connect(db)
    try:
        assert check.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    finally:
        check.close()
