"""Receipts are signed and verified; the SQLite store fails clearly and creates only its own files."""

from __future__ import annotations

import contextlib
import os
import sqlite3
import stat
from pathlib import Path

import pytest
from _backdoor import edit_receipts, swap_receipts

from singleflight_agents import Singleflight, Source, StoreError, ToolExecutionOptions
from singleflight_agents.signing import Signer
from singleflight_agents.store import SQLiteStore, open_store, sqlite_path

SHARED = ToolExecutionOptions(tool_name="t.read", deterministic=True, estimated_cost_usd=0.1)


def _tool(x: int) -> dict[str, int]:
    return {"x": x}


def _edit(db_path: Path, sql: str, *params: object) -> None:
    db = sqlite3.connect(db_path)
    with db:
        db.execute(sql, params)
    db.close()


@pytest.mark.parametrize(
    ("column", "value"),
    [
        ("output", '{"x":999}'),
        ("inputs", '{"x":2}'),
        ("expires_at", 4102444800.0),
        ("cost_usd", 0.0),
        ("tool_name", "t.other"),
        ("latency_ms", 0.5),
        ("codec", "pickle"),
        ("signature", "0" * 64),
        ("key_id", "0" * 16),
    ],
)
def test_an_edited_receipt_is_never_served(sf: Singleflight, column: str, value: object) -> None:
    sf.execute_sync(_tool, 1, options=SHARED)
    edit_receipts(sf.store, column, value)
    with pytest.warns(RuntimeWarning, match="signature check"):
        outcome = sf.execute_sync(_tool, 1, options=SHARED)
    assert outcome.source is Source.EXECUTED and outcome.value == {"x": 1}
    assert sf.summary()["tampered"] == 1
    # the re-execution overwrote the tampered receipt with a valid one
    assert sf.execute_sync(_tool, 1, options=SHARED).source is Source.CACHE_HIT


def test_swapped_receipts_are_not_served(sf: Singleflight) -> None:
    first = sf.execute_sync(_tool, 1, options=SHARED).fingerprint
    second = sf.execute_sync(_tool, 2, options=SHARED).fingerprint
    swap_receipts(sf.store, first, second)
    with pytest.warns(RuntimeWarning):
        assert sf.execute_sync(_tool, 1, options=SHARED).value == {"x": 1}
        assert sf.execute_sync(_tool, 2, options=SHARED).value == {"x": 2}


def test_another_key_is_a_miss_not_a_hit(store_url: str) -> None:
    with Singleflight(store=store_url, secret="a" * 32) as first:
        first.execute_sync(_tool, 1, options=SHARED)
    with Singleflight(store=store_url, secret="b" * 32) as second, pytest.warns(RuntimeWarning):
        assert second.execute_sync(_tool, 1, options=SHARED).source is Source.EXECUTED


def test_secret_from_environment(db_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SINGLEFLIGHT_SECRET", "s" * 32)
    with Singleflight(db_path) as sf:
        sf.execute_sync(_tool, 1, options=SHARED)
    assert not Path(f"{db_path}.key").exists()
    with Singleflight(db_path, secret="s" * 32) as sf:
        assert sf.execute_sync(_tool, 1, options=SHARED).source is Source.CACHE_HIT


def test_files_are_private_and_the_key_is_not_in_the_store(sqlite_sf: Singleflight,
                                                           db_path: Path) -> None:
    sf = sqlite_sf
    sf.execute_sync(_tool, 1, options=SHARED)
    key_file = Path(f"{db_path}.key")
    for path in (db_path, key_file, Path(f"{db_path}-wal")):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    key = key_file.read_text().strip()  # the secret, as text: what $SINGLEFLIGHT_SECRET holds
    assert key.encode() not in db_path.read_bytes()
    outcome = sf.execute_sync(_tool, 1, options=SHARED)
    assert outcome.receipt is not None and outcome.receipt.key_id == Signer(key.encode()).key_id


def test_given_a_path_nothing_is_created_elsewhere(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    target = tmp_path / "elsewhere" / "r.db"
    with Singleflight(target) as sf:
        assert not target.parent.exists()  # the store is opened on first use
        sf.execute_sync(_tool, 1, options=SHARED)
    assert target.is_file()
    assert list(cwd.iterdir()) == []
    assert {p.name for p in target.parent.iterdir()} <= {
        "r.db", "r.db-wal", "r.db-shm", "r.db.key", "r.db.locks"}


def test_default_store_is_under_the_cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    with Singleflight() as sf:
        assert list(tmp_path.iterdir()) == []  # the store is opened on first use
        sf.execute_sync(_tool, 1, options=SHARED)
    assert (tmp_path / ".singleflight" / "receipts.db").is_file()


def test_a_non_sqlite_file_gives_one_clear_line(tmp_path: Path) -> None:
    path = tmp_path / "notes.db"
    path.write_bytes(b"this is not a database" * 100)
    engine = Singleflight(path)  # opens nothing yet
    with pytest.raises(StoreError, match=r"notes\.db is not a usable singleflight store") as info:
        engine.store  # noqa: B018 -- the first use opens the store
    assert "\n" not in str(info.value)
    assert path.read_bytes() == b"this is not a database" * 100  # nothing was destroyed


def test_another_programs_database_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "app.db"
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE users (id INTEGER)")
    db.commit()
    db.close()
    with pytest.raises(StoreError, match="another program"):
        SQLiteStore(path)
    with contextlib.closing(sqlite3.connect(path)) as check:  # refused without being changed
        assert check.execute("PRAGMA journal_mode").fetchone() == ("delete",)
        assert check.execute("SELECT name FROM sqlite_master").fetchall() == [("users",)]


def test_a_newer_schema_is_refused(db_path: Path) -> None:
    SQLiteStore(db_path).close()
    _edit(db_path, "PRAGMA user_version = 99")
    with pytest.raises(StoreError, match=r"newer singleflight-agents.*schema 99"):
        SQLiteStore(db_path)


def test_a_directory_path_is_refused(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="is a directory"):
        SQLiteStore(tmp_path)


def test_store_urls(tmp_path: Path) -> None:
    assert sqlite_path("sqlite:///rel.db") == Path("rel.db")
    assert sqlite_path(f"sqlite:///{tmp_path}/abs.db") == tmp_path / "abs.db"
    store = open_store(f"sqlite:///{tmp_path}/abs.db")
    assert isinstance(store, SQLiteStore) and store.path == tmp_path / "abs.db"
    with pytest.raises(StoreError, match="unknown scheme 'ftp'"):
        open_store("ftp://x/y")
    with pytest.raises(StoreError, match="has no path"):
        open_store("sqlite://")


def _make_key_file(db_path: Path) -> None:
    with Singleflight(db_path) as sf:
        sf.execute_sync(_tool, 1, options=SHARED)
    assert Path(f"{db_path}.key").is_file()


def test_a_world_writable_key_file_is_refused(db_path: Path) -> None:
    _make_key_file(db_path)
    os.chmod(f"{db_path}.key", 0o666)
    with pytest.raises(StoreError, match=r"writable by group or others.*chmod 600") as info:
        Singleflight(db_path).store  # noqa: B018 -- the first use opens the store and its key
    assert "\n" not in str(info.value)
    # a shared call on a store whose key anyone could have changed is refused, not run around
    with Singleflight(db_path) as sf, pytest.raises(StoreError, match="writable by group"):
        sf.execute_sync(_tool, 1, options=SHARED)
    with Singleflight(db_path, mode="replay") as replayer, \
            pytest.raises(StoreError, match="writable by group or others"):
        replayer.execute_sync(_tool, 1, options=SHARED)  # replay never runs it


def test_a_key_file_of_another_user_is_refused(db_path: Path) -> None:
    _make_key_file(db_path)
    try:
        os.chown(f"{db_path}.key", 65534, -1)
    except PermissionError:
        pytest.skip("changing a file's owner needs root")
    with pytest.raises(StoreError, match="belongs to another user") as info:
        Singleflight(db_path).store  # noqa: B018 -- the first use opens the store and its key
    assert "\n" not in str(info.value)


def test_a_symlinked_key_file_is_refused(db_path: Path, tmp_path: Path) -> None:
    real = tmp_path / "elsewhere.key"
    real.write_text("a secret of more than sixteen bytes\n")
    real.chmod(0o600)
    Path(f"{db_path}.key").symlink_to(real)
    with pytest.raises(StoreError, match="symlink is refused") as info:
        Singleflight(db_path).store  # noqa: B018 -- the first use opens the store and its key
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(("column", "value"), [
    ("token", "x"), ("latency_ms", None), ("expires_at", "soon"), ("created_at", None)])
def test_a_receipt_with_malformed_fields_is_a_miss(sf: Singleflight, column: str,
                                                   value: object) -> None:
    sf.execute_sync(_tool, 1, options=SHARED)
    edit_receipts(sf.store, column, value)
    with pytest.warns(RuntimeWarning, match="signature check"):
        assert sf.execute_sync(_tool, 1, options=SHARED).source is Source.EXECUTED
    assert sf.execute_sync(_tool, 1, options=SHARED).source is Source.CACHE_HIT


def _restore() -> str:
    return "restored"


class _Pickled:
    def __reduce__(self) -> tuple[object, tuple[()]]:
        return (_restore, ())


@pytest.mark.filterwarnings("ignore:.*not persisted")
def test_a_signed_pickle_that_no_longer_loads_is_run_again(
        sf: Singleflight, monkeypatch: pytest.MonkeyPatch) -> None:
    options = SHARED.replace(tool_name="t.pickled", allow_pickle=True)
    runs = []

    def tool() -> object:
        runs.append(1)
        return _Pickled()

    sf.execute_sync(tool, options=options)
    assert sf.execute_sync(tool, options=options).value == "restored"
    monkeypatch.delitem(globals(), "_restore")  # the stored pickle names a function now gone
    with pytest.warns(RuntimeWarning, match="could not be decoded"):
        assert sf.execute_sync(tool, options=options).source is Source.EXECUTED
    assert len(runs) == 2


def test_a_key_file_holds_the_secret_as_text(db_path: Path) -> None:
    """Any text of 16 bytes or more is a key (the file's content, stripped, as for
    $SINGLEFLIGHT_SECRET); a shorter one is refused in one line."""
    key_file = Path(f"{db_path}.key")
    key_file.write_text("  a passphrase chosen by hand  \n")
    key_file.chmod(0o600)
    with Singleflight(db_path) as sf:
        outcome = sf.execute_sync(_tool, 1, options=SHARED)
    with Singleflight(db_path, secret="a passphrase chosen by hand") as sf:
        assert sf.execute_sync(_tool, 1, options=SHARED).source is Source.CACHE_HIT
    assert outcome.receipt is not None
    assert outcome.receipt.key_id == Signer(b"a passphrase chosen by hand").key_id
    key_file.write_text("too short\n")
    with pytest.raises(StoreError, match="shorter than 16 bytes") as info:
        Singleflight(db_path).store  # noqa: B018 -- the first use opens the store and its key
    assert "\n" not in str(info.value)
