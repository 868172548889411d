"""Files beside an SQLite store that someone else planted or loosened (issue 12: 1, 10, 14).

``prune`` deletes only lock files it can prove are its own; a symlinked or foreign lock
directory is never used; a FIFO or anything else that is not a regular file, at the key
or at a lock path, is refused at once instead of hanging; a key readable by others is
accepted with a one-line warning that says how to fix it."""

from __future__ import annotations

import contextlib
import os
import shutil
import threading
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import pytest

from singleflight_agents import Singleflight, Source, StoreError, ToolExecutionOptions
from singleflight_agents.cli import main
from singleflight_agents.store import Lease, SQLiteStore
from singleflight_agents.store._liveness import platform_lock

# Lock files exist only where the platform has a liveness lock (see the forced-portable runs,
# docs/ci.md); without one, leases expire instead.
needs_lock_files = pytest.mark.skipif(
    platform_lock() is None, reason="no liveness lock on this platform: no lock files to check")

SHARED = ToolExecutionOptions(tool_name="t.hardening", deterministic=True)
KEY = "ab" * 32  # a fingerprint: the form of every lock file's name


def _tool(x: int) -> int:
    return x * 2


def _store_with_a_receipt(db_path: Path) -> None:
    with Singleflight(db_path) as sf:
        assert sf.execute_sync(_tool, 1, options=SHARED).source is Source.EXECUTED


def _bounded(call: Callable[[], object], seconds: float = 10.0) -> BaseException | None:
    """Run ``call`` in a thread; fail unless it returns within ``seconds`` (where a blocking
    open of a FIFO would hang it forever). Returns what it raised."""
    raised: list[BaseException] = []

    def run() -> None:
        try:
            call()
        except BaseException as exc:  # handed to the test
            raised.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"still blocked after {seconds} s"
    return raised[0] if raised else None


def _unblock(fifo: Path) -> None:
    # Lets a reader stuck opening the FIFO (the bug) go, so a failing run leaves no thread.
    with contextlib.suppress(OSError):  # no reader: nothing to let go
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))


# -- 1. prune deletes only its own lock files ----------------------------------------------


@needs_lock_files
def test_prune_never_deletes_through_a_symlinked_lock_directory(
        db_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _store_with_a_receipt(db_path)
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "thesis.tex").write_text("years of work")
    (precious / KEY).write_text("named like a lock file, still not one")
    shutil.rmtree(f"{db_path}.locks")
    Path(f"{db_path}.locks").symlink_to(precious)
    size = db_path.stat().st_size

    assert main(["prune", "--db", str(db_path)]) == 2
    err = capsys.readouterr().err
    assert err == (f"singleflight-agents: error: lock directory {db_path}.locks is a symlink, "
                   f"and lock files are only kept in a real directory; delete the symlink (not "
                   f"its target)\n")
    assert sorted(p.name for p in precious.iterdir()) == sorted(["thesis.tex", KEY])
    assert db_path.stat().st_size == size  # refused before anything was pruned


@needs_lock_files
def test_prune_removes_only_stale_lock_files_of_its_own(
        db_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _store_with_a_receipt(db_path)
    locks = Path(f"{db_path}.locks")
    # Where open files cannot be unlinked (Windows), finished holders leave theirs to prune.
    finished = {p.name for p in locks.iterdir()}
    outside = tmp_path / "outside.txt"
    outside.write_text("not the store's")
    stale = "0" * 64
    (locks / stale).write_text("")  # left by a killed holder: the one file to delete
    (locks / "notes.txt").write_text("mine")
    (locks / KEY.upper()).write_text("")  # not the form: lock names are lowercase
    (locks / ("1" * 64)).symlink_to(outside)
    os.mkfifo(locks / ("2" * 64))
    (locks / ("3" * 64)).mkdir()
    foreign = locks / ("4" * 64)
    foreign.write_text("")
    try:
        os.chown(foreign, 65534, -1)  # another user's file
    except PermissionError:
        foreign.unlink()  # only root can give a file away
    holder = SQLiteStore(db_path)
    live = holder.acquire("5" * 64, "holder", 30.0)  # a live holder's lock file
    assert isinstance(live, Lease)
    kept = {p.name for p in locks.iterdir()} - {stale} - finished
    try:
        assert _bounded(lambda: main(["prune", "--db", str(db_path)])) is None
        assert {p.name for p in locks.iterdir()} == kept
    finally:
        _unblock(locks / ("2" * 64))
        holder.release(live)
        holder.close()
    assert f"{1 + len(finished)} stale lock files" in capsys.readouterr().out
    assert outside.read_text() == "not the store's"


@needs_lock_files
def test_a_lock_directory_of_another_user_is_refused(db_path: Path) -> None:
    _store_with_a_receipt(db_path)
    try:
        os.chown(f"{db_path}.locks", 65534, -1)
    except PermissionError:
        pytest.skip("changing a directory's owner needs root")
    store = SQLiteStore(db_path)
    try:
        for use in (lambda: store.acquire(KEY, "me", 30.0), lambda: store.prune(time.time())):
            with pytest.raises(StoreError) as info:
                use()
            assert str(info.value) == (f"lock directory {db_path}.locks belongs to another "
                                       f"user; delete it or pass another --db")
    finally:
        store.close()


# -- a symlinked lock directory, and what is planted at a lock path, are never used ---------


@needs_lock_files
def test_a_symlinked_lock_directory_is_never_used(db_path: Path, tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    Path(f"{db_path}.locks").symlink_to(elsewhere)  # planted before the first lease
    message = (f"lock directory {db_path}.locks is a symlink, and lock files are only kept in "
               f"a real directory; delete the symlink (not its target)")
    store = SQLiteStore(db_path)
    try:
        with pytest.raises(StoreError) as info:
            store.acquire(KEY, "me", 30.0)
        assert str(info.value) == message
        with pytest.raises(StoreError, match="is a symlink"):
            store.wait(KEY, 1.0)
    finally:
        store.close()
    with Singleflight(db_path) as sf, pytest.warns(RuntimeWarning, match="is a symlink"):
        assert sf.execute_sync(_tool, 1, options=SHARED).value == 2  # run, not shared
    assert list(elsewhere.iterdir()) == []


@needs_lock_files
def test_a_symlink_or_fifo_at_a_lock_path_is_refused_without_blocking(
        db_path: Path, tmp_path: Path) -> None:
    _store_with_a_receipt(db_path)
    locks = Path(f"{db_path}.locks")
    target = tmp_path / "target"
    (locks / KEY).symlink_to(target)
    fifo = locks / ("c" * 64)
    os.mkfifo(fifo)
    store = SQLiteStore(db_path)
    try:
        with pytest.raises(StoreError) as info:
            store.acquire(KEY, "me", 30.0)
        assert str(info.value) == f"lock file {locks / KEY} is a symlink, never a lock file; " \
                                  f"delete the symlink"
        assert not target.exists()  # nothing was created through it
        for use in (lambda: store.acquire("c" * 64, "me", 30.0),
                    lambda: store.wait("c" * 64, 1.0)):
            try:
                raised = _bounded(use)
            finally:
                _unblock(fifo)
            assert isinstance(raised, StoreError)
            assert str(raised) == f"lock file {fifo} is not a regular file; delete it"
    finally:
        store.close()


@needs_lock_files
def test_a_lock_key_that_is_not_a_fingerprint_is_refused(db_path: Path) -> None:
    store = SQLiteStore(db_path)
    try:
        with pytest.raises(StoreError) as info:
            store.acquire("../escaped", "me", 30.0)
        assert str(info.value) == ("lock key '../escaped' is not a fingerprint (64 lowercase "
                                   "hex digits)")
    finally:
        store.close()
    assert not (db_path.parent / "escaped").exists()


# -- 10. the key file: anything but a regular file is refused, without blocking ------------


def test_a_fifo_at_the_key_path_is_refused_without_blocking(
        db_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _store_with_a_receipt(db_path)
    key = Path(f"{db_path}.key")
    key.unlink()
    os.mkfifo(key, 0o600)
    message = f"signing key file {key} is not a regular file; delete it or set SINGLEFLIGHT_SECRET"
    try:
        raised = _bounded(lambda: Singleflight(db_path).store)
        assert isinstance(raised, StoreError)
        assert str(raised) == message
        assert _bounded(lambda: main(["verify", "--db", str(db_path)])) is None
    finally:
        _unblock(key)
    assert capsys.readouterr().err.endswith(f"error: {message}\n")
    assert main(["verify", "--db", str(db_path)]) == 2


def test_a_directory_at_the_key_path_is_refused(db_path: Path) -> None:
    Path(f"{db_path}.key").mkdir()
    with pytest.raises(StoreError) as info:
        Singleflight(db_path).store  # noqa: B018 -- the first use opens the store and its key
    assert str(info.value) == (f"signing key file {db_path}.key is not a regular file; delete "
                               f"it or set SINGLEFLIGHT_SECRET")


def test_a_dangling_key_symlink_is_refused_not_called_missing(
        db_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _store_with_a_receipt(db_path)
    Path(f"{db_path}.key").unlink()
    Path(f"{db_path}.key").symlink_to(tmp_path / "nowhere")
    assert main(["verify", "--db", str(db_path)]) == 2
    assert capsys.readouterr().err == (
        f"singleflight-agents: error: cannot read signing key file {db_path}.key: Too many "
        f"levels of symbolic links (a symlink is refused); fix it or set SINGLEFLIGHT_SECRET\n")


def test_a_key_file_that_is_not_text_is_one_line(db_path: Path) -> None:
    key = Path(f"{db_path}.key")
    key.write_bytes(b"\xff\xfe" + os.urandom(30))
    key.chmod(0o600)
    with pytest.raises(StoreError) as info:
        Singleflight(db_path).store  # noqa: B018 -- the first use opens the store and its key
    assert str(info.value) == (f"signing key file {key} is not UTF-8 text; delete it or set "
                               f"SINGLEFLIGHT_SECRET")


# -- 14. a key readable by others: accepted, with a warning that says how to fix it --------


def test_a_key_readable_by_others_is_used_with_a_one_line_warning(db_path: Path) -> None:
    _store_with_a_receipt(db_path)
    key = Path(f"{db_path}.key")
    key.chmod(0o644)  # as a git checkout or a CI cache restore leaves it
    with pytest.warns(RuntimeWarning) as caught, Singleflight(db_path) as sf:
        assert sf.execute_sync(_tool, 1, options=SHARED).source is Source.CACHE_HIT
    assert [str(w.message) for w in caught] == [
        f"signing key file {key} is readable by group or others, who could forge receipts "
        f"with it; chmod 600 {key}"]
    key.chmod(0o600)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with Singleflight(db_path) as sf:
            assert sf.execute_sync(_tool, 1, options=SHARED).source is Source.CACHE_HIT


def test_a_fifo_given_as_the_price_table_is_refused_without_blocking(tmp_path: Path) -> None:
    import threading

    from singleflight_agents.pricing import PriceTable

    fifo = tmp_path / "prices.json"
    os.mkfifo(fifo)
    raised: list[BaseException] = []

    def load() -> None:
        try:
            PriceTable.load(str(fifo))
        except ValueError as exc:
            raised.append(exc)

    loader = threading.Thread(target=load, daemon=True)
    loader.start()
    loader.join(30)
    assert not loader.is_alive(), "loading a FIFO as the price table blocked"
    assert len(raised) == 1 and str(raised[0]).startswith(
        f"price table {str(fifo)!r} cannot be read (not a regular file); give a JSON file like ")
