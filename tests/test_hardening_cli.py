"""Issue 12, items 11, 12 and 14 (export): ``verify`` checks what the engine checks on both
stores, the command line answers bad input with one line (never a traceback), and an export
is readable by its owner only."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import sqlite3
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import SECRET, redis_or_skip

from singleflight_agents import Singleflight, Source, StoreError, ToolExecutionOptions
from singleflight_agents.cli import main
from singleflight_agents.store import ReceiptStore, SQLiteStore, open_store, redact_url

SHARED = ToolExecutionOptions(tool_name="crm.lookup", deterministic=True)
PROG = "singleflight-agents"


@pytest.fixture(autouse=True)
def _secret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SINGLEFLIGHT_SECRET", SECRET)  # a Redis store has no key file


@pytest.fixture
def filled(store_url: str) -> str:
    """Two receipts and the statistics of run ``run-1``, on each store in turn."""
    with Singleflight(store_url, secret=SECRET, run_id="run-1") as sf:
        for email in ("a@x", "b@x"):
            sf.execute_sync(str.upper, email, options=SHARED)
    return store_url


def _cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, list[str], str]:
    capsys.readouterr()
    status = main(list(argv))
    captured = capsys.readouterr()
    return status, captured.out.splitlines(), captured.err


def _one_line(err: str, *parts: str) -> str:
    assert err.count("\n") == 1 and err.startswith(f"{PROG}: error: "), err
    assert "Traceback" not in err
    for part in parts:
        assert part in err, err
    return err


def _redis(store: ReceiptStore) -> Any:
    return store._redis  # type: ignore[attr-defined]


def _keys(store: ReceiptStore) -> list[str]:
    return sorted(receipt.fingerprint for receipt in store.iter_receipts())


def _rename(store: ReceiptStore, source: str, target: str) -> None:
    """Move what is stored under fingerprint ``source`` to the key of ``target``."""
    if isinstance(store, SQLiteStore):
        db = sqlite3.connect(store.path)
        with db:
            db.execute("UPDATE receipts SET fingerprint = ? WHERE fingerprint = ?",
                       (target, source))
        db.close()
        return
    prefix = store.prefix  # type: ignore[attr-defined]
    _redis(store).rename(f"{prefix}r:{source}", f"{prefix}r:{target}")


# -- 11. verify checks what the engine checks ---------------------------------------


def test_verify_fails_receipts_swapped_between_keys(filled: str,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    store = open_store(filled)
    first, second = _keys(store)
    prefix = getattr(store, "prefix", "")
    _rename(store, first, f"{prefix}-swap")  # on SQLite the key is the fingerprint column
    _rename(store, second, first)
    _rename(store, f"{prefix}-swap", second)
    store.close()

    status, out, _ = _cli(capsys, "verify", "--db", filled)
    assert status == 1
    assert out[-1] == "FAILED: 0 of 2 receipts verified (0 expired), store self-check passed"
    fails = [line for line in out if line.startswith("FAIL crm.lookup ")]
    assert len(fails) == 2
    if filled.startswith("redis"):
        # Each is validly signed: only the key it sits under gives it away, as in the engine.
        assert all("not under its own (moved in the store)" in line for line in fails), out
        assert f"stored under the key of fingerprint {second[:16]}" in fails[0]
    else:
        assert all("signature mismatch" in line for line in fails), out
    with Singleflight(filled, secret=SECRET) as sf, \
            pytest.warns(RuntimeWarning, match="failed its signature check"):
        # the engine refuses it too
        assert sf.execute_sync(str.upper, "a@x", options=SHARED).source is Source.EXECUTED


def test_verify_fails_a_receipt_copied_to_a_second_key(redis_url: str,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    with Singleflight(redis_url, secret=SECRET) as sf:
        sf.execute_sync(str.upper, "a@x", options=SHARED)
        [key] = _keys(sf.store)
        other = "f" * 64
        _redis(sf.store).copy(f"{sf.store.prefix}r:{key}",  # type: ignore[attr-defined]
                              f"{sf.store.prefix}r:{other}")  # type: ignore[attr-defined]
        status, out, _ = _cli(capsys, "verify", "--db", redis_url)
        assert status == 1
        assert out == [f"FAIL crm.lookup {key[:16]}: stored under the key of fingerprint "
                       f"{other[:16]}, not under its own (moved in the store); the engine does "
                       f"not serve it",
                       "FAILED: 1 of 2 receipts verified (0 expired), store self-check passed"]


def test_a_redis_receipt_with_bytes_that_are_not_utf8_is_tampered_not_a_crash(
        redis_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    with Singleflight(redis_url, secret=SECRET) as sf:
        sf.execute_sync(str.upper, "a@x", options=SHARED)
        [key] = _keys(sf.store)
        name = f"{sf.store.prefix}r:{key}"  # type: ignore[attr-defined]
        _redis(sf.store).hset(name, "tool_name", b"crm\xff\nok: forged")
        status, out, _ = _cli(capsys, "verify", "--db", redis_url)
        assert status == 1
        # one line, the edited name escaped: it cannot print an "ok" line of its own
        assert out[0] == f"FAIL 'crm\\udcff\\nok: forged' {key[:16]}: signature mismatch " \
                         f"(edited after it was signed)"
        assert out[1].startswith("FAILED: 0 of 1")
        with pytest.warns(RuntimeWarning, match="failed its signature check"):
            outcome = sf.execute_sync(str.upper, "a@x", options=SHARED)
        assert outcome.source is Source.EXECUTED and outcome.value == "A@X"


def test_verify_fails_a_receipt_key_of_another_type(redis_url: str,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    with Singleflight(redis_url, secret=SECRET) as sf:
        sf.execute_sync(str.upper, "a@x", options=SHARED)
        name = f"{sf.store.prefix}r:{'e' * 64}"  # type: ignore[attr-defined]
        _redis(sf.store).set(name, "not a hash")
    status, out, _ = _cli(capsys, "verify", "--db", redis_url)
    assert status == 1
    assert out == [f"FAIL {redact_url(redis_url)}: key {name!r} holds a string, not a receipt "
                   f"hash; delete it",
                   "FAILED: 1 of 1 receipts verified (0 expired), store self-check failed"]
    status, out, err = _cli(capsys, "export", "--db", redis_url)
    assert status == 0 and len(out) == 1 and err == "exported 1 receipts\n"


# -- 12. one line, never a traceback -------------------------------------------------


@pytest.mark.parametrize(("argv", "message"), [
    (["export", "-o", ""], "-o needs a file name; leave it out to write to stdout"),
    (["import", ""], "FILE is empty; pass a file written by export, or - for stdin"),
])
def test_an_empty_file_name_is_one_line(filled: str, argv: list[str], message: str,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    status, out, err = _cli(capsys, *argv, "--db", filled)
    assert status == 2 and out == []  # export -o '' wrote to stdout
    _one_line(err, message)


def test_import_of_a_binary_file_is_one_line(filled: str, tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str],
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "photo.jpg"
    path.write_bytes(b"\xff\xd8\xff\xe0\x00\x10JFIF\x00\n\x00\x01")
    status, out, err = _cli(capsys, "import", "--db", filled, str(path))
    assert status == 2 and out == []
    _one_line(err, f"{path}:1: not UTF-8 text, so not a file written by {PROG} export")
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(path.read_bytes())))
    status, out, err = _cli(capsys, "import", "--db", filled, "-")
    assert status == 2
    _one_line(err, "<stdin>:1: not UTF-8 text")


@pytest.mark.parametrize(("edit", "message"), [
    ({"fingerprint": 5}, "signature does not verify (edited)"),
    ({"fingerprint": None}, "signature does not verify (edited)"),
    ({"fingerprint": {"a": 1}, "key_id": 7}, "signed with another key"),
    ({"tool_name": "crm\nimported 1 of 1 receipts"}, "signature does not verify (edited)"),
])
def test_import_of_a_field_of_the_wrong_type_is_a_fail_line(
        filled: str, tmp_path: Path, capsys: pytest.CaptureFixture[str],
        edit: dict[str, Any], message: str) -> None:
    assert main(["export", "--db", filled, "-o", str(tmp_path / "all.jsonl")]) == 0
    first = json.loads((tmp_path / "all.jsonl").read_text().splitlines()[0])
    path = tmp_path / "edited.jsonl"
    path.write_text(json.dumps(first | edit) + "\n")
    status, out, err = _cli(capsys, "import", "--db", filled, str(path))
    assert status == 1 and err == ""
    assert out[0].startswith("FAIL ") and out[0].endswith(f": {message}; not imported")
    assert out[1] == "imported 0 of 1 receipts"  # a name edited in cannot print a line


@pytest.mark.parametrize(("line", "message"), [
    ("[" * 100_000, "not JSON"),
    ('["a list"]', "a JSON list, not a receipt"),
    ('{"fingerprint": "0"}', "no field 'tool_name'"),
])
def test_import_of_a_malformed_line_is_one_line(filled: str, tmp_path: Path, line: str,
                                                message: str,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text(line + "\n")
    status, _, err = _cli(capsys, "import", "--db", filled, str(path))
    assert status == 2
    _one_line(err, f"{path}:1: ", message)


def _damage_stats(url: str, counters: str) -> None:
    store = open_store(url)
    if isinstance(store, SQLiteStore):
        db = sqlite3.connect(store.path)
        with db:
            db.execute("UPDATE stats SET counters = ?", (counters,))
        db.close()
    else:
        client = _redis(store)
        name = f"{store.prefix}s:run-1"  # type: ignore[attr-defined]
        for field in client.hkeys(name):
            client.hset(name, field, counters)
    store.close()


@pytest.mark.parametrize(("counters", "message"), [
    ("{bad", "not JSON"),
    ("[1, 2]", "list, not an object of counters"),
    ('{"calls": "3"}', "counter 'calls' holds '3'"),
    ('{"calls": 1e999}', "counter 'calls' holds inf"),
])
def test_summary_with_a_damaged_statistics_row_is_one_line(
        filled: str, capsys: pytest.CaptureFixture[str], counters: str, message: str) -> None:
    _damage_stats(filled, counters)
    status, out, err = _cli(capsys, "summary", "--db", filled)
    assert status == 2 and out == []
    line = _one_line(err, "the statistics of run 'run-1'", "damaged", message)
    assert "summarize another run with --run ID" in line or "delete th" in line


@pytest.mark.parametrize("argv", [["summary", "--json"], ["summary"], ["export"], ["verify"]])
def test_output_cut_short_by_its_reader_ends_quietly(db_path: Path, argv: list[str]) -> None:
    with Singleflight(db_path, secret=SECRET, run_id="run-1") as sf:
        sf.execute_sync(str.upper, "a@x", options=SHARED)
    read, write = os.pipe()
    os.close(read)  # `| head` that has already gone: every write fails with EPIPE
    try:
        result = subprocess.run([sys.executable, "-m", "singleflight_agents", *argv,
                                 "--db", str(db_path)], stdout=write, stderr=subprocess.PIPE,
                                text=True, timeout=60)
    finally:
        os.close(write)
    assert result.stderr == ""  # not "error: : Broken pipe", nor "Exception ignored"
    assert result.returncode == 141  # as a shell shows a tool that SIGPIPE ended


@pytest.mark.parametrize(("tail", "message"), [
    ("/notanumber", "database 'notanumber' is not a database number"),
    ("/0/1", "database '0/1' is not a database number"),
    ("/-1", "database '-1' is not a database number"),
    ("/1?db=2", "names the database twice (/1 and ?db=2)"),
    ("/15?prefix=a&prefix=b", "gives 'prefix' twice"),
    ("/15?prefix=", "store URL prefix ''"),
    ("/15?no_such_option=1", "unknown option 'no_such_option'; remove it"),
    ("/15?socket_timeout=soon", "Invalid value for 'socket_timeout'"),
    ("/15?prefix=caf\udce9", "is not valid UTF-8 text"),
])
def test_a_malformed_redis_url_is_refused_in_one_line(
        tail: str, message: str, capsys: pytest.CaptureFixture[str]) -> None:
    base = redis_or_skip().rsplit("/", 1)[0]
    status, out, err = _cli(capsys, "summary", "--db", base + tail)
    assert status == 2 and out == []
    line = _one_line(err, message)
    assert "start it" not in line
    with pytest.raises(StoreError, match="store URL"):
        open_store(base + tail)


def test_redis_db_index_out_of_range_is_reported_as_such(capsys: pytest.CaptureFixture[str]) -> None:
    url = redis_or_skip().rsplit("/", 1)[0] + "/999999"
    status, _, err = _cli(capsys, "summary", "--db", url)
    assert status == 2
    line = _one_line(err, f"Redis at {redact_url(url)} refused the connection: DB index is out "
                          f"of range",
                      "use a lower database number in the URL")
    assert "cannot reach" not in line and "start it" not in line


def test_wrong_redis_credentials_are_not_reported_as_unreachable(
        capsys: pytest.CaptureFixture[str]) -> None:
    host = redis_or_skip().split("://", 1)[1].rsplit("/", 1)[0].rpartition("@")[2]
    status, _, err = _cli(capsys, "summary", "--db", f"redis://nobody:wrong@{host}/15")
    assert status == 2
    line = _one_line(err, f"Redis at redis://{host}/15 refused the credentials",
                     "fix the user and password in the URL")
    assert "wrong" not in line and "start it" not in line


def test_unix_socket_urls_reach_the_socket(capsys: pytest.CaptureFixture[str],
                                           tmp_path: Path) -> None:
    # urlunsplit made unix:///path into unix:/path, which the client does not take.
    missing = tmp_path / "no-redis.sock"
    status, _, err = _cli(capsys, "summary", "--db", f"unix://{missing}?db=1")
    assert status == 2
    _one_line(err, f"cannot reach Redis at unix://{missing}?db=1: ", str(missing),
              "No such file or directory")
    assert redact_url(f"unix://:pw@{missing}?db=1&password=pw") == f"unix://{missing}?db=1"


def test_a_store_on_a_unix_socket_works(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    server = shutil.which("redis-server")
    if server is None:
        pytest.skip("no redis-server to start on a unix socket")
    sock = tmp_path / "redis.sock"
    proc = subprocess.Popen([server, "--port", "0", "--unixsocket", str(sock), "--save", "",
                             "--appendonly", "no", "--dir", str(tmp_path)],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        for line in proc.stdout:  # its log says when it listens: no polling, no sleep
            if "ready to accept connections" in line.lower():
                break
        url = f"unix://{sock}?db=2&prefix=hardening"
        with Singleflight(url, secret=SECRET) as sf:
            assert sf.execute_sync(str.upper, "a@x", options=SHARED).value == "A@X"
            assert sf.execute_sync(str.upper, "a@x", options=SHARED).source is Source.CACHE_HIT
            assert sf.store.identity == f"redis:{sock}/2/hardening:"
        status, out, _ = _cli(capsys, "verify", "--db", url)
        assert status == 0 and out[-1].startswith("ok: 1 of 1 receipts verified")
    finally:
        proc.kill()
        proc.wait(10)
        proc.stdout.close()  # type: ignore[union-attr]


def test_summary_of_an_unknown_run_is_one_line(filled: str,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    status, out, err = _cli(capsys, "summary", "--db", filled, "--run", "NOPE")
    assert status == 2 and out == []
    _one_line(err, f"no run 'NOPE' in {redact_url(filled)} (its latest run is 'run-1'); "
                   f"pass a run id it holds, or --all")
    for bad in ("", "run-\udcff"):  # empty, or bytes of another encoding
        status, _, err = _cli(capsys, "summary", "--db", filled, "--run", bad)
        assert status == 2
        _one_line(err, "a run id is non-empty UTF-8 text")
    assert _cli(capsys, "summary", "--db", filled, "--run", "run-1")[0] == 0


def test_a_store_path_that_is_not_utf8_prints_as_it_came(db_path: Path) -> None:
    with Singleflight(db_path, secret=SECRET, run_id="run-1") as sf:
        sf.execute_sync(str.upper, "a@x", options=SHARED)
    odd = os.fsencode(db_path.parent) + b"/caf\xe9.db"
    os.rename(db_path, odd)
    env = os.environ | {"PYTHONIOENCODING": "utf-8:strict"}  # as a UTF-8 locale has it
    result = subprocess.run([sys.executable, "-m", "singleflight_agents", "summary", "--db", odd],
                            capture_output=True, env=env, timeout=60)
    assert result.returncode == 0, result.stderr
    assert b"store " + odd in result.stdout and b"Traceback" not in result.stderr


def _damage_receipt(store: ReceiptStore, fingerprint: str) -> None:
    """A field no export can carry: bytes on SQLite, NaN on Redis."""
    if isinstance(store, SQLiteStore):
        db = sqlite3.connect(store.path)
        with db:
            db.execute("UPDATE receipts SET output = ? WHERE fingerprint = ?",
                       (b"\x80\x04", fingerprint))
        db.close()
        return
    name = f"{store.prefix}r:{fingerprint}"  # type: ignore[attr-defined]
    _redis(store).hset(name, "latency_ms", "nan")


def test_export_of_a_damaged_receipt_skips_it_in_one_line(
        filled: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    store = open_store(filled)
    first, second = _keys(store)
    _damage_receipt(store, first)
    store.close()
    out_file = tmp_path / "export.jsonl"
    status, _, err = _cli(capsys, "export", "--db", filled, "-o", str(out_file))
    assert status == 1
    fail, summary = err.splitlines()
    assert fail.startswith(f"FAIL crm.lookup {first[:16]}: holds a value an export cannot "
                           f"carry (") and fail.endswith("not exported")
    assert summary == "exported 1 of 2 receipts"
    [line] = out_file.read_text().splitlines()
    assert json.loads(line)["fingerprint"] == second


# -- 14. exports are readable by their owner only -------------------------------------


def test_export_file_is_created_0600(filled: str, tmp_path: Path,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "receipts.jsonl"
    old_umask = os.umask(0)  # the most permissive: only the mode given at creation protects
    try:
        # No chmod after the fact: the file must have been created with that mode.
        monkeypatch.setattr(os, "chmod", lambda *args, **kwargs: None)
        monkeypatch.setattr(os, "fchmod", lambda *args, **kwargs: None)
        assert main(["export", "--db", filled, "-o", str(target)]) == 0
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    assert len(target.read_text().splitlines()) == 2


def test_export_over_a_readable_file_makes_it_0600(filled: str, tmp_path: Path) -> None:
    target = tmp_path / "receipts.jsonl"
    target.write_text("an older export\n" * 100)
    target.chmod(0o644)
    assert main(["export", "--db", filled, "-o", str(target)]) == 0
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    lines = target.read_text().splitlines()
    assert len(lines) == 2 and all(json.loads(line)["tool_name"] == "crm.lookup" for line in lines)


def test_a_damaged_statistics_row_is_one_line_in_the_library_too(tmp_path: Path) -> None:
    import sqlite3

    from singleflight_agents import Singleflight, StoreError, ToolExecutionOptions

    db = tmp_path / "r.db"
    with Singleflight(db, run_id="run-1") as sf:
        sf.execute_sync(str.upper, "a", options=ToolExecutionOptions(tool_name="t.up",
                                                                     deterministic=True))
    with contextlib.closing(sqlite3.connect(db)) as conn, conn:
        conn.execute("UPDATE stats SET counters = '{not json'")
    with pytest.raises(StoreError, match=r"statistics of run 'run-1', tool 't.up' are damaged"), \
            Singleflight(db, run_id="run-1") as sf:
        sf.summary()
    with contextlib.closing(sqlite3.connect(db)) as conn, conn:
        conn.execute("""UPDATE stats SET counters = '{"calls": "many"}'""")
    with pytest.raises(StoreError, match=r"damaged \(counter 'calls' holds 'many'\)"), \
            Singleflight(db, run_id="run-1") as sf:
        sf.summary()
