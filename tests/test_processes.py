"""Real processes sharing one SQLite store: dedupe, slow and killed holders, failure
fan-out, fencing, and a forked child.

Every execution appends a line to a log file opened with O_APPEND (see
``_proc_workers.py``); the tests count executions there. Processes are synchronised
with multiprocessing events and barriers, never with sleeps (sleeps appear only inside
tools, as simulated work).
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import sqlite3
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import _proc_workers as workers
import pytest

from singleflight_agents import Receipt, Singleflight, Source, ToolExecutionOptions
from singleflight_agents.store import SQLiteStore
from singleflight_agents.store.base import Busy, Lease

SPAWN = multiprocessing.get_context("spawn")
FORK = multiprocessing.get_context("fork")
SIGNAL_TIMEOUT = 30.0  # generous bound for "the other process got there"; never reached

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def procs() -> Iterator[list[Any]]:
    """Processes a test started; any still alive at teardown is killed."""
    started: list[Any] = []
    yield started
    for proc in started:
        if proc.is_alive():
            proc.kill()
        proc.join(10)


@pytest.fixture
def paths(tmp_path: Path) -> dict[str, str]:
    return {"db": str(tmp_path / "receipts.db"), "log": str(tmp_path / "executions.log")}


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


def _spec(paths: dict[str, str], key: str, behaviour: str, **extra: Any) -> dict[str, Any]:
    return {"db": paths["db"], "log": paths["log"], "key": key, "behaviour": behaviour, **extra}


# -- 1. many processes, many keys --------------------------------------------------------


def test_8_processes_20_keys_execute_each_key_once(paths: dict[str, str], procs: list[Any]) -> None:
    keys = [f"k{i:02d}" for i in range(20)]
    # No store file yet: the 8 processes also race to create the schema and switch the
    # fresh file to WAL (the race test_opening_a_fresh_store_waits_for_a_concurrent_writer
    # pins down deterministically).
    barrier, queue = SPAWN.Barrier(8), SPAWN.Queue()
    for idx in range(8):
        # half the processes call from asyncio tasks, half from threads: the async and
        # the sync implementation share one tool name, so they share executions too
        _start(procs, SPAWN, workers.grid_worker, idx, paths["db"], paths["log"], keys,
               "async" if idx % 2 else "threads", barrier, queue)
    results = _collect(queue, 8)
    for proc in procs:
        proc.join(10)
        assert proc.exitcode == 0

    for result in results:
        assert not [w for w in result["warnings"] if "locked" in w or "without sharing" in w], \
            result["warnings"]
    runs = workers.read_log(paths["log"])
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

    with Singleflight(paths["db"], run_id="grid") as sf:
        totals = sf.summary()
    assert totals["calls"] == 160 and totals["executed"] == 20
    assert totals["avoided_calls"] == 140 and totals["fallbacks"] == 0


# -- 2. a holder that outlives its lease term many times over ------------------------------


def test_slow_holder_keeps_its_lease_and_runs_once(paths: dict[str, str], procs: list[Any]) -> None:
    lease_seconds, work_seconds, callers = 0.3, 1.0, 3
    barrier, queue = SPAWN.Barrier(callers), SPAWN.Queue()
    spec = _spec(paths, "slow", "slow", tool_name="procs.slow", work_seconds=work_seconds,
                 options={"lease_seconds": lease_seconds})
    for _ in range(callers):
        _start(procs, SPAWN, workers.call_worker, spec, queue, None, None, None, barrier)
    results = _collect(queue, callers)

    runs = workers.read_log(paths["log"])
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

    # The heartbeat renewed the lease while the tool ran: the row the tool saw at its
    # end expires later than the row it saw at its start by more than one whole term
    # (only a renewal after the first term had lapsed can do that).
    value = by_pid[holder_pid]["value"]
    (_, token0, state0, expires0), = value["lease_at_start"]
    (_, token1, state1, expires1), = value["lease_at_end"]
    assert (state0, state1) == ("held", "held") and token0 == token1
    assert expires1 > expires0 + lease_seconds, (expires0, expires1)
    # and the lease is finished now, with the holder's token on the receipt
    conn = sqlite3.connect(paths["db"])
    try:
        assert conn.execute("SELECT token, state FROM leases").fetchall() == [(token0, "done")]
        assert conn.execute("SELECT token FROM receipts").fetchall() == [(token0,)]
    finally:
        conn.close()


# -- 3. a holder killed mid-execution --------------------------------------------------------


def test_killed_holder_is_taken_over_within_3_seconds(paths: dict[str, str], procs: list[Any]) -> None:
    started, waiting = SPAWN.Event(), SPAWN.Event()
    holder_q, queue = SPAWN.Queue(), SPAWN.Queue()  # kept referenced while children start
    holder = _start(procs, SPAWN, workers.call_worker, _spec(paths, "k", "block"), holder_q,
                    started)
    _wait_for(started, "the holder to start executing")
    _start(procs, SPAWN, workers.call_worker, _spec(paths, "k", "return"), queue, None, None,
           waiting)
    _wait_for(waiting, "the second caller to block on the holder")

    t_kill = time.time()
    os.kill(holder.pid, signal.SIGKILL)
    (result,) = _collect(queue, 1, timeout=20)
    takeover_seconds = result["t_done"] - t_kill
    print(f"\ntakeover after SIGKILL: {takeover_seconds * 1000:.1f} ms")

    holder.join(10)
    assert holder.exitcode == -signal.SIGKILL
    assert "error" not in result, result
    assert result["source"] == "executed" and result["takeover"] is True
    assert result["value"] == {"key": "k", "by": result["pid"]}
    assert takeover_seconds < 3.0
    runs = workers.read_log(paths["log"])
    assert [pid for pid, _, _ in runs] == [holder.pid, result["pid"]]
    # the taker's receipt is stored under a newer token than the dead holder's
    with Singleflight(paths["db"]) as sf:
        outcome = sf.execute_sync(workers.tool, "k", options=ToolExecutionOptions(
            tool_name="procs.tool", deterministic=True))
    assert outcome.source is Source.CACHE_HIT and outcome.value == result["value"]
    assert outcome.receipt is not None and outcome.receipt.token == result["receipt_token"]


# -- 4. a failure while another process waits ------------------------------------------------


@pytest.mark.parametrize("share_failures", [False, True])
def test_failure_reaches_a_waiting_process(paths: dict[str, str], procs: list[Any],
                                           share_failures: bool) -> None:
    started, go, waiting = SPAWN.Event(), SPAWN.Event(), SPAWN.Event()
    holder_q, waiter_q = SPAWN.Queue(), SPAWN.Queue()
    options = {"share_failures": share_failures}
    _start(procs, SPAWN, workers.call_worker, _spec(paths, "k", "fail", options=options),
           holder_q, started, go)
    _wait_for(started, "the holder to start executing")
    _start(procs, SPAWN, workers.call_worker, _spec(paths, "k", "return", options=options),
           waiter_q, None, None, waiting)
    _wait_for(waiting, "the waiter to block on the holder")
    go.set()  # the holder raises now

    (holder,) = _collect(holder_q, 1)
    (waiter,) = _collect(waiter_q, 1)
    assert holder["error"] == {"type": "ValueError", "text": "boom for k"}
    t_raise = holder["t_raise"]
    runs = workers.read_log(paths["log"])
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
    print(f"\nfailure fan-out (share_failures={share_failures}): {fan_out * 1000:.1f} ms")
    assert 0 <= fan_out < 1.0


# -- 5. fencing ------------------------------------------------------------------------------


def _receipt(key: str, token: int, output: str) -> Receipt:
    now = time.time()
    return Receipt(fingerprint=key, tool_name="t", namespace="default", scope="default",
                   version="1", inputs=None, inputs_sha256="0" * 64, codec="json", output=output,
                   created_at=now, expires_at=now + 60, latency_ms=1.0, cost_usd=0.0,
                   executor="x", token=token, key_id="0" * 16, signature="")


@pytest.mark.parametrize("stale_writes_first", [False, True])
def test_a_lease_lost_to_a_newer_token_cannot_write(tmp_path: Path, stale_writes_first: bool) -> None:
    """The flock keeps a live holder's lease; the only way to lose it is to lose the lock
    file (here: it is deleted, as a cleanup script might). A second store then takes a new,
    higher token, and the old holder's renew and put are refused: the fence is the token
    compared inside put's write transaction."""
    db = tmp_path / "receipts.db"
    old_store, new_store = SQLiteStore(db), SQLiteStore(db)
    key = "f" * 64
    try:
        old = old_store.acquire(key, "old", 10.0)
        assert isinstance(old, Lease)
        assert isinstance(new_store.acquire(key, "new", 10.0), Busy)  # the flock excludes
        os.unlink(db.with_name(db.name + ".locks") / key)  # the old holder loses its lock

        new = new_store.acquire(key, "new", 10.0)
        assert isinstance(new, Lease)
        assert new.takeover and new.token > old.token
        assert old_store.renew(old) is False
        assert new_store.renew(new) is True
        if stale_writes_first:
            assert old_store.put(_receipt(key, old.token, '"old"'), old) is False
            assert old_store.get(key) is None  # the refused write left nothing behind
            assert new_store.put(_receipt(key, new.token, '"new"'), new) is True
        else:
            assert new_store.put(_receipt(key, new.token, '"new"'), new) is True
            assert old_store.put(_receipt(key, old.token, '"old"'), old) is False
        stored = old_store.get(key)
        assert stored is not None and (stored.output, stored.token) == ('"new"', new.token)
        # releasing the stale lease (as the engine does after an error) changes nothing
        old_store.release(old, ("ValueError", "late"))
        assert new_store.last_failure(key) is None
    finally:
        old_store.close()
        new_store.close()


def test_engine_holder_fenced_out_by_a_takeover_keeps_the_newer_receipt(
        paths: dict[str, str], procs: list[Any]) -> None:
    """The same through the engine across processes: the old holder's result is not
    persisted, it is told so, and the taker's receipt is the one served afterwards."""
    started, go = SPAWN.Event(), SPAWN.Event()
    old_q, new_q = SPAWN.Queue(), SPAWN.Queue()
    _start(procs, SPAWN, workers.call_worker, _spec(paths, "k", "gate"), old_q, started, go)
    _wait_for(started, "the first holder to start executing")
    (lock_file,) = Path(paths["db"] + ".locks").iterdir()
    lock_file.unlink()  # the first holder loses its lock

    _start(procs, SPAWN, workers.call_worker, _spec(paths, "k", "return"), new_q)
    (new,) = _collect(new_q, 1)
    assert new["source"] == "executed" and new["takeover"] is True
    go.set()
    (old,) = _collect(old_q, 1)
    assert old["source"] == "executed" and old["receipt_token"] is None
    assert any("lease was taken over" in w for w in old["warnings"]), old["warnings"]
    assert new["receipt_token"] is not None

    with Singleflight(paths["db"]) as sf:
        outcome = sf.execute_sync(workers.tool, "k", options=ToolExecutionOptions(
            tool_name="procs.tool", deterministic=True))
    assert outcome.source is Source.CACHE_HIT
    assert outcome.value == {"key": "k", "by": new["pid"]}
    assert outcome.receipt is not None and outcome.receipt.token == new["receipt_token"]
    assert len(workers.read_log(paths["log"])) == 2


# -- 6. a forked child using the parent's engine -------------------------------------------


def test_forked_child_shares_the_parents_engine(paths: dict[str, str], procs: list[Any]) -> None:
    waiting = FORK.Event()
    go = threading.Event()
    started = threading.Event()
    workers.CONFIG.update(log=paths["log"], db=paths["db"], behaviour="gate", started=started,
                          go=go)
    opts = ToolExecutionOptions(tool_name="procs.fork", deterministic=True)
    sf = Singleflight(store=workers.SignallingStore(paths["db"], waiting))
    try:
        # The parent holds "a" (a thread is inside the tool, holding the lease's lock
        # file) when it forks; the child must wait for the parent, not for itself.
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

        runs = workers.read_log(paths["log"])
        assert [(pid, key) for pid, key, _ in runs] == [(os.getpid(), "a"), (child.pid, "b")]
        totals = sf.summary()  # one run id: the parent's and both children's counters
        assert totals["executed"] == 2 and totals["shared_waits"] == 1
        assert totals["cache_hits"] == 1
    finally:
        workers.CONFIG.update(behaviour="return", started=None, go=None)
        sf.close()


# -- the race of opening a fresh store ------------------------------------------------------


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
