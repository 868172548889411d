"""Damaged, tampered and mis-keyed stores: never served, reported by ``verify``, never destroyed.

Each case checks three things: the engine does not serve what it cannot trust (it
re-executes, or refuses the store with one line naming it), ``singleflight-agents
verify`` exits non-zero with a report and no traceback, and the damaged file is left
where it was for a person to look at. Engine-side edits of single fields already in
test_receipts_and_store.py are not repeated; what is new here is the ``verify`` side on
both stores, the fields those tests leave out, a receipt the engine had already checked,
outputs swapped between receipts, damaged SQLite files, lost key files and imports.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import shutil
import sqlite3
import subprocess
import sys
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from _backdoor import edit_receipts
from conftest import SECRET

from singleflight_agents import (
    Receipt,
    Singleflight,
    Source,
    StoreError,
    ToolExecutionOptions,
    make_fingerprint,
)
from singleflight_agents.cli import main
from singleflight_agents.signing import Signer
from singleflight_agents.store import ReceiptStore, SQLiteStore

SHARED = ToolExecutionOptions(tool_name="t.read", deterministic=True)
RUNS: list[int] = []  # every real execution of _tool, in order
ENV = "SINGLEFLIGHT_SECRET"


def _tool(x: int) -> dict[str, Any]:
    RUNS.append(x)
    return {"x": x, "text": f"marker-{x:04d}-" + "p" * 200}


def _expected(x: int) -> dict[str, Any]:
    return {"x": x, "text": f"marker-{x:04d}-" + "p" * 200}


def _key(x: int) -> str:
    return make_fingerprint("t.read", {"x": x})


@pytest.fixture(autouse=True)
def _fresh_runs() -> None:
    RUNS.clear()


@pytest.fixture
def secret_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """The command line signs with the key the ``sf`` fixture uses."""
    monkeypatch.setenv(ENV, SECRET)


def _cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, list[str], list[str]]:
    capsys.readouterr()
    status = main(list(argv))
    captured = capsys.readouterr()
    return status, captured.out.splitlines(), captured.err.splitlines()


def _assert_one_line_error(err: list[str], *needles: str) -> None:
    assert len(err) == 1, err
    assert err[0].startswith("singleflight-agents: error: "), err
    assert err[0].isprintable(), err  # no control characters, no terminal escapes
    assert "Traceback" not in err[0]
    for needle in needles:
        assert needle in err[0], err


def _fail_lines(out: list[str]) -> list[str]:
    return [line for line in out if line.startswith("FAIL ")]


def _assert_report(out: list[str], *, failed: int, total: int) -> None:
    """A verify report: one FAIL line per bad receipt, then the summary line."""
    assert len(_fail_lines(out)) == failed, out
    assert len(out) == failed + 1, out
    status = "FAILED" if failed else "ok"
    assert out[-1].startswith(f"{status}: {total - failed} of {total} receipts verified"), out


# -- raw access to one receipt (tests/_backdoor.py edits every receipt at once) ------


def _get_field(store: ReceiptStore, key: str, field: str) -> Any:
    if isinstance(store, SQLiteStore):
        db = sqlite3.connect(store.path)
        try:
            return db.execute(f"SELECT {field} FROM receipts WHERE fingerprint = ?",
                              (key,)).fetchone()[0]
        finally:
            db.close()
    return store._redis.hget(f"{store.prefix}r:{key}", field)  # type: ignore[attr-defined]


def _set_field(store: ReceiptStore, key: str, field: str, value: Any) -> None:
    if isinstance(store, SQLiteStore):
        db = sqlite3.connect(store.path)
        with db:
            db.execute(f"UPDATE receipts SET {field} = ? WHERE fingerprint = ?", (value, key))
        db.close()
        return
    store._redis.hset(f"{store.prefix}r:{key}", field, value)  # type: ignore[attr-defined]


def _drop_receipts(store: ReceiptStore) -> None:
    if isinstance(store, SQLiteStore):
        db = sqlite3.connect(store.path)
        with db:
            db.execute("DELETE FROM receipts")
        db.close()
        return
    client = store._redis  # type: ignore[attr-defined]
    for name in client.scan_iter(match=f"{store.prefix}r:*"):  # type: ignore[attr-defined]
        client.delete(name)


def _run(sf: Singleflight, x: int, **options: Any) -> Source:
    """One call; its value must be the tool's own, whatever the store held."""
    outcome = sf.execute_sync(_tool, x, options=SHARED.replace(**options) if options else SHARED)
    assert outcome.value == _expected(x)
    if outcome.source is Source.CACHE_HIT:
        assert outcome.receipt is not None and sf.verify_receipt(outcome.receipt)
    return outcome.source


# -- 1. each receipt field edited in the store, on both stores ---------------------

FIELD_EDITS: dict[str, object] = {
    "fingerprint": "relabelled",  # replaced by the key of another call, see below
    "tool_name": "t.other",
    "namespace": "other",
    "scope": "other",
    "version": "2",
    "inputs": '{"x":3}',
    "inputs_sha256": "0" * 64,
    "codec": "pickle",
    "output": '{"x":999}',
    "created_at": 4102444800.0,  # "recorded in 2100": would survive every refresh
    "expires_at": 4102444800.0,
    "latency_ms": 1e6,
    "cost_usd": 1e6,
    "executor": "attacker:1:00000000",
    "token": 10**9,
    "key_id": "0" * 16,
    "signature": "0" * 64,
}


def test_every_receipt_field_is_in_the_table() -> None:
    assert set(FIELD_EDITS) == {f.name for f in dataclasses.fields(Receipt)}


@pytest.mark.parametrize("field", list(FIELD_EDITS))
def test_an_edited_field_is_never_served_and_verify_reports_it(
        sf: Singleflight, secret_env: None, field: str,
        capsys: pytest.CaptureFixture[str]) -> None:
    assert _run(sf, 1) is Source.EXECUTED
    assert _run(sf, 1) is Source.CACHE_HIT  # the engine has checked this receipt already
    # "fingerprint": the receipt of x=1 relabelled as the answer to x=3
    edit_receipts(sf.store, field, _key(3) if field == "fingerprint" else FIELD_EDITS[field])
    assert _run(sf, 2) is Source.EXECUTED  # an untouched receipt beside the edited one

    status, out, _ = _cli(capsys, "verify", "--db", sf.db_path)
    assert status == 1
    _assert_report(out, failed=1, total=2)
    reason = "signed with another key" if field == "key_id" else "signature mismatch"
    assert reason in _fail_lines(out)[0]

    with pytest.warns(RuntimeWarning, match="signature check"):
        assert _run(sf, 1) is Source.EXECUTED
        if field == "fingerprint":
            assert _run(sf, 3) is Source.EXECUTED
    assert _run(sf, 2) is Source.CACHE_HIT
    assert sf.summary()["tampered"] == 1
    # the re-execution overwrote the edited receipt: the store is whole again
    status, out, _ = _cli(capsys, "verify", "--db", sf.db_path)
    assert status == 0
    _assert_report(out, failed=0, total=3 if field == "fingerprint" else 2)
    assert _run(sf, 1) is Source.CACHE_HIT


@pytest.mark.parametrize("value", ["soon", None])
def test_verify_reports_a_non_numeric_expiry(sf: Singleflight, secret_env: None, value: object,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    _run(sf, 1)
    edit_receipts(sf.store, "expires_at", value)
    status, out, _ = _cli(capsys, "verify", "--db", sf.db_path)
    assert status == 1
    _assert_report(out, failed=1, total=1)
    assert "signature mismatch" in out[0]


@pytest.mark.parametrize("field", [
    "expires_at",
    "created_at",
    "latency_ms",
    "cost_usd",
    "token",
])
def test_a_number_rewritten_as_text_is_not_a_crash(db_path: Path, field: str,
                                                   monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """Only the type changes (SQLite keeps what it is given; Redis always hands back
    numbers): the call must still return the tool's value, served or re-executed."""
    monkeypatch.setenv(ENV, SECRET)
    with Singleflight(db_path) as sf:
        _run(sf, 1)
        _set_field(sf.store, _key(1), field, repr(_get_field(sf.store, _key(1), field)))
    with Singleflight(db_path) as sf, \
            Singleflight(db_path, refresh_since=0.0, mode="refresh") as refresher, \
            warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        _run(sf, 1)
        _run(refresher, 1)
        sf.summary()
        refresher.summary()
    status, _, _ = _cli(capsys, "verify", "--db", str(db_path))
    assert status in (0, 1)


# -- 2. outputs swapped between two receipts, on both stores --------------------------

ALL_BUT_FINGERPRINT = tuple(f.name for f in dataclasses.fields(Receipt) if f.name != "fingerprint")


@pytest.mark.parametrize("fields", [("output",), ("output", "signature"), ALL_BUT_FINGERPRINT],
                         ids=["output", "output+signature", "all-but-fingerprint"])
def test_swapped_outputs_are_never_served(sf: Singleflight, secret_env: None,
                                          fields: tuple[str, ...],
                                          capsys: pytest.CaptureFixture[str]) -> None:
    for x in (1, 2, 1, 2):  # executed, then checked and served once each
        _run(sf, x)
    for field in fields:
        first, second = (_get_field(sf.store, _key(x), field) for x in (1, 2))
        _set_field(sf.store, _key(1), field, second)
        _set_field(sf.store, _key(2), field, first)

    status, out, _ = _cli(capsys, "verify", "--db", sf.db_path)
    assert status == 1
    _assert_report(out, failed=2, total=2)
    assert all("signature mismatch" in line for line in _fail_lines(out))

    with pytest.warns(RuntimeWarning, match="signature check"):
        assert [_run(sf, 1), _run(sf, 2)] == [Source.EXECUTED, Source.EXECUTED]
    assert RUNS == [1, 2, 1, 2]
    status, out, _ = _cli(capsys, "verify", "--db", sf.db_path)
    assert status == 0
    _assert_report(out, failed=0, total=2)


# -- 3. a damaged SQLite file -------------------------------------------------------

N_RECEIPTS = 40
PAGE = 4096  # SQLite's default page size


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A store of 40 receipts and its key file, closed cleanly (no WAL left)."""
    path = tmp_path_factory.mktemp("pristine") / "receipts.db"
    with Singleflight(path) as sf:
        for x in range(N_RECEIPTS):
            sf.execute_sync(_tool, x, options=SHARED)
    assert not Path(f"{path}-wal").exists()
    return path


def _copy_store(source: Path, target_dir: Path) -> Path:
    target = target_dir / "receipts.db"
    shutil.copyfile(source, target)
    shutil.copyfile(f"{source}.key", f"{target}.key")
    os.chmod(f"{target}.key", 0o600)
    return target


def _overwrite(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as handle:
        handle.seek(offset)
        handle.write(data)


def _root_page(path: Path, name: str) -> int:
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return int(db.execute("SELECT rootpage FROM sqlite_master WHERE name = ?",
                              (name,)).fetchone()[0])
    finally:
        db.close()


def _inside_receipt(path: Path, x: int) -> int:
    """Where receipt x's output text sits in the file."""
    return path.read_bytes().index(f"marker-{x:04d}-".encode()) + 30


DAMAGE: dict[str, Callable[[Path], None]] = {
    "truncated-to-half": lambda p: os.truncate(p, p.stat().st_size // 2),
    "truncated-to-100-bytes": lambda p: os.truncate(p, 100),
    "truncated-to-0-bytes": lambda p: os.truncate(p, 0),
    # a whole page of random bytes: the table page holding a receipt, or an index page
    "random-page-in-the-table": lambda p: _overwrite(
        p, _inside_receipt(p, 7) // PAGE * PAGE, random.Random(1).randbytes(PAGE)),
    "random-page-in-an-index": lambda p: _overwrite(
        p, (_root_page(p, "receipts_by_expiry") - 1) * PAGE, random.Random(1).randbytes(PAGE)),
    # inside one receipt's output: letters keep the text valid UTF-8, bytes do not
    "random-letters-in-a-receipt": lambda p: _overwrite(
        p, _inside_receipt(p, 7), bytes(random.Random(2).choices(b"abcdefghij", k=64))),
    "random-bytes-in-a-receipt": lambda p: _overwrite(
        p, _inside_receipt(p, 7), random.Random(0).randbytes(64)),
}
DAMAGED_RECEIPT = 7  # the receipt the last two cases damage


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_verify_reports_a_damaged_file_and_leaves_it_alone(
        pristine: Path, tmp_path: Path, damage: str, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.delenv(ENV, raising=False)
    path = _copy_store(pristine, tmp_path)
    DAMAGE[damage](path)
    before, inode = path.read_bytes(), path.stat().st_ino

    status, out, err = _cli(capsys, "verify", "--db", str(path))
    assert status in (1, 2), (out, err)
    if status == 2:
        _assert_one_line_error(err, str(path))
        assert out == []
    else:
        assert err == []
        assert out[-1].startswith("FAILED: ")
        assert all(line.startswith("FAIL ") for line in out[:-1]), out
    # verify reads: the damaged file is still there, byte for byte
    assert path.stat().st_ino == inode and path.read_bytes() == before


def test_verify_counts_receipts_apart_from_damage_to_the_file(
        pristine: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.delenv(ENV, raising=False)
    path = _copy_store(pristine, tmp_path)
    DAMAGE["random-page-in-an-index"](path)
    status, out, _ = _cli(capsys, "verify", "--db", str(path))
    assert status == 1
    assert out[-1].startswith(f"FAILED: {N_RECEIPTS} of {N_RECEIPTS} receipts verified"), out


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_the_engine_survives_a_damaged_file(pristine: Path, tmp_path: Path, damage: str,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENV, raising=False)
    path = _copy_store(pristine, tmp_path)
    DAMAGE[damage](path)
    size, inode = path.stat().st_size, path.stat().st_ino
    engine = Singleflight(path)  # opens nothing yet
    try:
        engine.store  # noqa: B018 -- the store opens on first use
    except StoreError as exc:  # refused: one line that names the file
        assert "\n" not in str(exc) and str(path) in str(exc)
        # and so is a call, with the same line, never a traceback from deep in sqlite
        with engine, pytest.raises(StoreError) as refused:
            _run(engine, 1000)
        assert str(refused.value) == str(exc)
    else:
        with engine, warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            sources = {x: _run(engine, x) for x in (*range(N_RECEIPTS), 1000)}
        assert sources[1000] is Source.EXECUTED  # a new call is still recorded
        if damage.endswith("in-a-receipt"):
            assert sources[DAMAGED_RECEIPT] is not Source.CACHE_HIT
        for warning in caught:
            message = str(warning.message)
            assert "signature check" in message or str(path) in message, message
    # nothing replaced or deleted the file; it may only have grown
    assert path.exists() and path.stat().st_ino == inode and path.stat().st_size >= size


CRASHING_WRITER = """
import os, sys
from singleflight_agents import Singleflight, ToolExecutionOptions

def tool(x):
    return {"x": x, "text": f"marker-{x:04d}-" + "p" * 200}

sf = Singleflight(sys.argv[1])
for x in range(int(sys.argv[2]), int(sys.argv[3])):
    sf.execute_sync(tool, x, options=ToolExecutionOptions(tool_name="t.read", deterministic=True))
os._exit(0)  # no close, no checkpoint: the last receipts live only in the WAL
"""


@pytest.fixture(scope="module")
def crashed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A store whose writer died: receipts 0-9 checkpointed, 10-29 only in the WAL."""
    path = tmp_path_factory.mktemp("crashed") / "receipts.db"
    with Singleflight(path) as sf:
        for x in range(10):
            sf.execute_sync(_tool, x, options=SHARED)
    env = {k: v for k, v in os.environ.items() if k != ENV}
    subprocess.run([sys.executable, "-c", CRASHING_WRITER, str(path), "10", "30"], env=env,
                   check=True, timeout=60)
    assert Path(f"{path}-wal").stat().st_size > 0 and Path(f"{path}-shm").exists()
    return path


@pytest.mark.parametrize("deleted", [("-wal", "-shm"), ("-wal",), ("-shm",)])
def test_deleted_wal_or_shm_files_lose_receipts_but_serve_nothing_wrong(
        crashed: Path, tmp_path: Path, deleted: tuple[str, ...],
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """With its WAL gone the file is the store as of its last checkpoint: consistent, so
    verify passes (a lost receipt cannot be told from one never written); the lost
    receipts are re-executed, nothing wrong is served, and the file stays."""
    monkeypatch.delenv(ENV, raising=False)
    path = tmp_path / "receipts.db"
    for suffix in ("", "-wal", "-shm", ".key"):
        shutil.copyfile(f"{crashed}{suffix}", f"{path}{suffix}")
    os.chmod(f"{path}.key", 0o600)
    for suffix in deleted:
        os.unlink(f"{path}{suffix}")
    kept = 10 if "-wal" in deleted else 30

    status, out, _ = _cli(capsys, "verify", "--db", str(path))
    assert status == 0
    _assert_report(out, failed=0, total=kept)
    with Singleflight(path) as sf:
        sources = [_run(sf, x) for x in range(30)]
    assert sources == [Source.CACHE_HIT] * kept + [Source.EXECUTED] * (30 - kept)
    assert [*range(kept, 30)] == RUNS


# -- 4. the key file deleted ---------------------------------------------------------


def test_a_deleted_key_file_makes_every_old_receipt_a_miss(
        db_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.delenv(ENV, raising=False)
    key_file = Path(f"{db_path}.key")
    with Singleflight(db_path) as sf:
        for x in (1, 2, 3):
            _run(sf, x)
    old_key, inode = key_file.read_text(), db_path.stat().st_ino
    key_file.unlink()

    status, out, err = _cli(capsys, "verify", "--db", str(db_path))
    assert status == 2 and out == []
    _assert_one_line_error(err, "key file", "missing", str(key_file))
    assert not key_file.exists()

    # The engine makes a new key: the old receipts are "signed with another key", never served.
    with Singleflight(db_path) as sf, pytest.warns(RuntimeWarning, match="signature check"):
        assert [_run(sf, 1), _run(sf, 2)] == [Source.EXECUTED, Source.EXECUTED]
        assert sf.summary()["tampered"] == 2
    assert key_file.read_text() != old_key
    status, out, _ = _cli(capsys, "verify", "--db", str(db_path))
    assert status == 1
    _assert_report(out, failed=1, total=3)
    assert "signed with another key" in out[0]

    with Singleflight(db_path) as sf, pytest.warns(RuntimeWarning, match="signature check"):
        assert _run(sf, 3) is Source.EXECUTED
    assert RUNS == [1, 2, 3, 1, 2, 3]
    assert _cli(capsys, "verify", "--db", str(db_path))[0] == 0
    assert db_path.stat().st_ino == inode


# -- 5. a store signed with another key ------------------------------------------------


def test_a_store_signed_with_another_secret(store_url: str, monkeypatch: pytest.MonkeyPatch,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    secret_a, secret_b = "a" * 32, "b" * 32
    monkeypatch.setenv(ENV, secret_a)
    with Singleflight(store=store_url) as sf:
        assert [_run(sf, 1), _run(sf, 2)] == [Source.EXECUTED, Source.EXECUTED]

    monkeypatch.setenv(ENV, secret_b)
    status, out, err = _cli(capsys, "verify", "--db", store_url)
    assert status == 2 and out == []
    _assert_one_line_error(err, "signed with another key", "SINGLEFLIGHT_SECRET")
    with Singleflight(store=store_url) as sf, pytest.warns(RuntimeWarning, match="signature check"):
        assert _run(sf, 1) is Source.EXECUTED
    # now one receipt of each key: each side reports the other's
    for secret in (secret_b, secret_a):
        monkeypatch.setenv(ENV, secret)
        status, out, _ = _cli(capsys, "verify", "--db", store_url)
        assert status == 1
        _assert_report(out, failed=1, total=2)
        assert "signed with another key" in out[0]

    monkeypatch.setenv(ENV, secret_a)
    with Singleflight(store=store_url) as sf, pytest.warns(RuntimeWarning, match="signature check"):
        assert _run(sf, 2) is Source.CACHE_HIT
        assert _run(sf, 1) is Source.EXECUTED  # b's receipt is not served to a either
    assert RUNS == [1, 2, 1, 1]

    monkeypatch.delenv(ENV)  # and no key at all: one line, exit 2
    status, out, err = _cli(capsys, "verify", "--db", store_url)
    assert status == 2 and out == []
    _assert_one_line_error(err)


# -- 6. import of forged lines ---------------------------------------------------------


@pytest.fixture
def exported(sf: Singleflight, secret_env: None, tmp_path: Path,
             capsys: pytest.CaptureFixture[str]) -> Iterator[list[dict[str, Any]]]:
    """Receipts of x = 1, 2, 3 exported from ``sf``'s store, which is then emptied."""
    for x in (1, 2, 3):
        _run(sf, x)
    out = tmp_path / "receipts.jsonl"
    assert _cli(capsys, "export", "--db", sf.db_path, "-o", str(out))[0] == 0
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    _drop_receipts(sf.store)
    RUNS.clear()
    yield sorted(lines, key=lambda line: line["inputs"])


def _write_jsonl(path: Path, lines: list[Any]) -> str:
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n"
                            for line in lines))
    return str(path)


def test_an_import_with_forged_lines_rejects_them(
        sf: Singleflight, exported: list[dict[str, Any]], tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    one, two, three = exported
    forged_output = two | {"output": json.dumps(_expected(999), separators=(",", ":"))}
    attacker = Signer(b"attacker-secret-" * 2)
    resigned = attacker.sign(Receipt(**(three | {"output": '"forged"'}))).to_dict()
    our_key_id = resigned | {"key_id": one["key_id"]}  # claims our key, signed with theirs
    path = _write_jsonl(tmp_path / "forged.jsonl", [one, forged_output, resigned, our_key_id])

    status, out, _ = _cli(capsys, "import", "--db", sf.db_path, path)
    assert status == 1
    assert len(_fail_lines(out)) == 3 and all("not imported" in line for line in out[:-2])
    assert "does not verify (edited)" in out[0] and "another key" in out[1] and "edited" in out[2]
    assert out[-2] == "imported 1 of 4 receipts"
    assert out[-1].startswith("1 receipt(s) were signed with another key than this store's")
    assert [_run(sf, 1), _run(sf, 2), _run(sf, 3)] == [
        Source.CACHE_HIT, Source.EXECUTED, Source.EXECUTED]

    # a forged line never replaces the valid receipt already there
    path = _write_jsonl(tmp_path / "forged-again.jsonl", [forged_output])
    assert _cli(capsys, "import", "--db", sf.db_path, path)[0] == 1
    assert _run(sf, 2) is Source.CACHE_HIT
    assert RUNS == [2, 3]
    assert _cli(capsys, "verify", "--db", sf.db_path)[0] == 0


def test_an_import_with_a_malformed_line_imports_nothing(
        sf: Singleflight, exported: list[dict[str, Any]], tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    path = _write_jsonl(tmp_path / "broken.jsonl", [exported[0], '{"fingerprint": "0", oops'])
    status, out, err = _cli(capsys, "import", "--db", sf.db_path, path)
    assert status == 2 and out == []
    _assert_one_line_error(err, "broken.jsonl:2:")
    assert _run(sf, 1) is Source.EXECUTED  # the valid first line was not imported either


def test_an_imported_number_as_text_is_rejected_or_harmless(
        sf: Singleflight, exported: list[dict[str, Any]], tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    line = exported[0] | {"expires_at": repr(exported[0]["expires_at"])}
    path = _write_jsonl(tmp_path / "text.jsonl", [line])
    assert _cli(capsys, "import", "--db", sf.db_path, path)[0] in (0, 1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        _run(sf, 1)
    assert _cli(capsys, "verify", "--db", sf.db_path)[0] in (0, 1)
