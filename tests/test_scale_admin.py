"""Issue 16 (scale), the admin side: export and import stream, long commands show progress on
a terminal, prune prints the store's true sizes, and finished leases leave no row."""

from __future__ import annotations

import contextlib
import io
import re
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from singleflight_agents import Singleflight, ToolExecutionOptions, _cli_common
from singleflight_agents.cli import main
from singleflight_agents.store import SQLiteStore
from singleflight_agents.store import sqlite as sqlite_module

SHARED = ToolExecutionOptions(tool_name="crm.lookup", deterministic=True)


def _fill(db: Path, n: int, ttl: float = 3600.0, tools: int = 3) -> None:
    with Singleflight(db) as sf:
        for i in range(n):
            sf.execute_sync(str.upper, f"k{i}", options=SHARED.replace(
                tool_name=f"t{i % tools}", ttl_seconds=ttl))


def _leases(db: Path) -> list[tuple[Any, ...]]:
    with contextlib.closing(sqlite3.connect(db)) as conn:
        return conn.execute("SELECT fingerprint, state FROM leases").fetchall()


def test_finished_leases_leave_no_row(db_path: Path) -> None:
    _fill(db_path, 50)
    assert _leases(db_path) == []


def test_a_failed_lease_keeps_its_row_until_the_key_succeeds(db_path: Path) -> None:
    options = SHARED.replace(share_failures=True)

    def boom(x: str) -> str:
        raise ValueError(x)

    with Singleflight(db_path) as sf:
        with pytest.raises(ValueError):
            sf.execute_sync(boom, "a", options=options)
        (row,) = _leases(db_path)
        assert row[1] == "failed"
        failure = sf.store.last_failure(row[0])
        assert failure is not None and failure.error_type == "ValueError"
        sf.execute_sync(lambda x: x, "a", options=options)  # same key (same tool name, args)
        assert _leases(db_path) == []
        assert sf.store.last_failure(row[0]) is None
        # tokens still only grow: they come from the counter, not from the rows
        lease = sf.store.acquire(row[0], "me", 10.0)
        assert not isinstance(lease, type(None)) and getattr(lease, "token", 0) > failure.token
        sf.store.release(lease)  # type: ignore[arg-type]
        assert _leases(db_path) == []


@pytest.mark.parametrize("batch", [1000, 7])
def test_iter_receipts_pages_in_order_with_no_read_left_open(
        db_path: Path, batch: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sqlite_module, "BATCH", batch)
    _fill(db_path, 40)
    with contextlib.closing(sqlite3.connect(db_path)) as raw, raw:  # a NULL key, edited in
        raw.execute("UPDATE receipts SET tool_name = NULL WHERE rowid = 3")
    store = SQLiteStore(db_path)
    try:
        with contextlib.closing(sqlite3.connect(db_path)) as conn:
            expected = conn.execute("SELECT tool_name, fingerprint FROM receipts "
                                    "ORDER BY tool_name, fingerprint").fetchall()
        receipts = store.iter_receipts()
        first = next(receipts)
        # Mid-listing, nothing holds a read snapshot: a TRUNCATE checkpoint completes.
        with contextlib.closing(sqlite3.connect(db_path, timeout=0.1)) as other:
            assert other.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0] == 0
        got = [first, *receipts]
        assert [(r.tool_name, r.fingerprint) for r in got] == expected and len(got) == 40
    finally:
        store.close()


def test_import_batches_and_a_malformed_line_imports_nothing(
        db_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sqlite_module, "BATCH", 4)
    _fill(db_path, 10)
    out = tmp_path / "all.jsonl"
    assert main(["export", "--db", str(db_path), "-o", str(out)]) == 0
    lines = out.read_text().splitlines()
    target = tmp_path / "copy.db"
    Path(f"{target}.key").write_text(Path(f"{db_path}.key").read_text())
    Path(f"{target}.key").chmod(0o600)
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join([*lines, "{not json"]) + "\n")
    assert main(["import", "--db", str(target), str(bad)]) == 2
    assert f"{bad}:11: not a receipt" in capsys.readouterr().err
    assert not target.exists() or _count(target) == 0
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(out.read_bytes())))
    assert main(["import", "--db", str(target), "-"]) == 0
    assert capsys.readouterr().out == "imported 10 of 10 receipts\n"
    assert _count(target) == 10
    assert main(["export", "--db", str(target)]) == 0
    assert capsys.readouterr().out.splitlines() == lines


def test_import_reads_a_file_that_cannot_be_read_twice(db_path: Path, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    import os
    import threading

    _fill(db_path, 5)
    out = tmp_path / "all.jsonl"
    assert main(["export", "--db", str(db_path), "-o", str(out)]) == 0
    target = tmp_path / "copy.db"
    Path(f"{target}.key").write_text(Path(f"{db_path}.key").read_text())
    Path(f"{target}.key").chmod(0o600)
    fifo = tmp_path / "receipts.fifo"  # what `import <(cat file)` or `/dev/stdin` hands it
    os.mkfifo(fifo)
    writer = threading.Thread(target=lambda: fifo.write_bytes(out.read_bytes()))
    writer.start()
    try:
        assert main(["import", "--db", str(target), str(fifo)]) == 0
    finally:
        writer.join(10)
    assert capsys.readouterr().out == "imported 5 of 5 receipts\n"
    assert _count(target) == 5


def _count(db: Path) -> int:
    with contextlib.closing(sqlite3.connect(db)) as conn:
        return int(conn.execute("SELECT count(*) FROM receipts").fetchone()[0])


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize("command", ["verify", "export", "import", "prune"])
def test_progress_shows_on_a_terminal_only(db_path: Path, tmp_path: Path, command: str,
                                           monkeypatch: pytest.MonkeyPatch,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    _fill(db_path, 20)
    out = tmp_path / "all.jsonl"
    assert main(["export", "--db", str(db_path), "-o", str(out)]) == 0
    argv = {"verify": ["verify"], "export": ["export", "-o", str(tmp_path / "again.jsonl")],
            "import": ["import", str(out)], "prune": ["prune"]}[command]
    argv += ["--db", str(db_path)]
    capsys.readouterr()
    assert main(argv) == 0
    plain = capsys.readouterr()
    assert "\r" not in plain.err + plain.out  # not a terminal: byte-identical to before
    monkeypatch.setattr(_cli_common, "PROGRESS_AFTER", 0.0)
    monkeypatch.setattr(_cli_common, "PROGRESS_EVERY", 0.01)
    terminal = _Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    if command != "prune":  # fast: slowed down so that the line is drawn while it runs
        real = sqlite_module.SQLiteStore.import_receipts if command == "import" else None
        pages = sqlite_module.SQLiteStore._receipts_page

        def slow_page(self: SQLiteStore, after: Any) -> Any:
            time.sleep(0.05)
            return pages(self, after)
        monkeypatch.setattr(sqlite_module.SQLiteStore, "_receipts_page", slow_page)
        if real is not None:
            def slow_import(self: SQLiteStore, receipts: Any) -> int:
                time.sleep(0.05)
                return real(self, receipts)
            monkeypatch.setattr(sqlite_module.SQLiteStore, "import_receipts", slow_import)
    else:
        prune = sqlite_module.SQLiteStore.prune

        def slow_prune(self: SQLiteStore, now: float) -> dict[str, int]:
            time.sleep(0.1)
            return prune(self, now)
        monkeypatch.setattr(sqlite_module.SQLiteStore, "prune", slow_prune)
    assert main(argv) == 0
    shown = terminal.getvalue()
    name = command
    assert f"\r{name}: " in shown and shown.count("\n") >= 1, shown
    progress = shown.split("\n")[0]
    assert progress.endswith(" s") and "Traceback" not in shown
    if command != "prune":
        assert re.search(rf"{name}: (20|0) receipts, \d+ s$", progress), progress
    again = capsys.readouterr().out  # the command's own output is unchanged (prune: but sizes)
    assert again.split(";")[0] == plain.out.split(";")[0] and again.count("\n") == plain.out.count("\n")


def test_prune_prints_the_true_sizes_when_everything_expired(
        db_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _fill(db_path, 2000, ttl=0.5)
    time.sleep(0.6)
    # another process has the store open while prune runs, as a fleet would
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from singleflight_agents import "
         "Singleflight; sf = Singleflight(sys.argv[1]); sf.summary(); print('up', flush=True); "
         "sys.stdin.read()", str(db_path)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "up\n"
        assert main(["prune", "--db", str(db_path)]) == 0
        text = capsys.readouterr().out
        assert "pruned 2000 expired receipts, 0 finished leases" in text, text
        before, after = map(int, re.search(r"; (\d+) -> (\d+) bytes", text).groups())  # type: ignore[union-attr]
        assert after == _on_disk(db_path) and after < before / 4, (before, after)
    finally:
        holder.communicate("", timeout=30)
    assert _on_disk(db_path) <= after


def _on_disk(db: Path) -> int:
    wal = db.with_name(db.name + "-wal")
    return db.stat().st_size + (wal.stat().st_size if wal.exists() else 0)


def test_export_streams_rows_from_store_to_file(db_path: Path, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """No list of every receipt: the first line is written before the last page is read."""
    monkeypatch.setattr(sqlite_module, "BATCH", 5)
    _fill(db_path, 23)
    out = tmp_path / "all.jsonl"
    pages = sqlite_module.SQLiteStore._receipts_page
    written_at_page: list[int] = []

    def watched(self: SQLiteStore, after: Any) -> Any:
        written_at_page.append(out.stat().st_size if out.exists() else -1)
        return pages(self, after)
    monkeypatch.setattr(sqlite_module.SQLiteStore, "_receipts_page", watched)
    assert main(["export", "--db", str(db_path), "-o", str(out)]) == 0
    assert len(out.read_text().splitlines()) == 23
    assert len(written_at_page) == 1 + 5  # the NULL-key page, then 5 pages of up to 5
