"""The command line: every command, and one clear line with exit 2 for user mistakes."""

from __future__ import annotations

import contextlib
import json
import re
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import SECRET

from singleflight_agents import Singleflight, ToolExecutionOptions
from singleflight_agents.cli import main

SHARED = ToolExecutionOptions(tool_name="crm.lookup", deterministic=True, estimated_cost_usd=0.1)


@pytest.fixture
def filled(db_path: Path) -> Path:
    with Singleflight(db_path, run_id="run-1") as sf:
        for email in ("a@x", "b@x", "a@x"):
            sf.execute_sync(str.upper, email, options=SHARED)
    return db_path


@pytest.mark.slow
def test_demo_shows_six_versus_three(tmp_path: Path) -> None:
    db = tmp_path / "demo.db"
    result = subprocess.run([sys.executable, "-m", "singleflight_agents", "demo", "--db", str(db)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "without singleflight: 6 executions, ~$0.72" in result.stdout
    assert "with singleflight:    3 executions, ~$0.36" in result.stdout
    assert "search.web" in result.stdout and "saved $0.36" in result.stdout
    # a second run starts cold again and tells the same story
    again = subprocess.run([sys.executable, "-m", "singleflight_agents", "--db", str(db), "demo"],
                           capture_output=True, text=True, timeout=60)
    assert "with singleflight:    3 executions" in again.stdout


def test_summary_text_and_json(filled: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["summary", "--db", str(filled)]) == 0
    text = capsys.readouterr().out
    assert "run run-1" in text and "crm.lookup" in text and "█" in text
    assert main(["summary", "--db", str(filled), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["calls"] == 3 and data["unique_executions"] == 2 and data["avoided_calls"] == 1
    assert data["dollars_saved"] == pytest.approx(0.1)
    assert main(["summary", "--db", str(filled), "--markdown"]) == 0
    assert "| `crm.lookup` | 3 | 2 | 1 | 0 |" in capsys.readouterr().out


def test_verify_passes_then_fails_on_tampering(filled: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["verify", "--db", str(filled)]) == 0
    assert "ok: 2 of 2 receipts verified" in capsys.readouterr().out
    with contextlib.closing(sqlite3.connect(filled)) as db, db:
        db.execute("UPDATE receipts SET output = '\"forged\"' WHERE rowid = 1")
    assert main(["verify", "--db", str(filled)]) == 1
    out = capsys.readouterr().out
    assert "FAIL crm.lookup" in out and "signature mismatch" in out


def test_verify_reports_malformed_fields(filled: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with contextlib.closing(sqlite3.connect(filled)) as db, db:
        db.execute("UPDATE receipts SET token = 'x' WHERE rowid = 1")
    assert main(["verify", "--db", str(filled)]) == 1
    assert "signature mismatch" in capsys.readouterr().out


def test_verify_with_the_wrong_key_is_a_usage_error(filled: Path, capsys: pytest.CaptureFixture[str],
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SINGLEFLIGHT_SECRET", "w" * 32)
    assert main(["verify", "--db", str(filled)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "signed with another key" in err


def test_verify_without_the_key_file(filled: Path, capsys: pytest.CaptureFixture[str]) -> None:
    Path(f"{filled}.key").unlink()
    assert main(["verify", "--db", str(filled)]) == 2
    err = capsys.readouterr().err
    assert "key file" in err and "missing" in err and err.count("\n") == 1
    assert not Path(f"{filled}.key").exists()  # verify never makes a new key


def test_export_import_round_trip(filled: Path, tmp_path: Path,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "receipts.jsonl"
    assert main(["export", "--db", str(filled), "-o", str(out)]) == 0
    lines = out.read_text().splitlines()
    assert len(lines) == 2
    assert main(["export", "--db", str(filled)]) == 0
    assert capsys.readouterr().out.splitlines() == lines  # stable order
    target = tmp_path / "copy.db"
    Path(f"{target}.key").write_text(Path(f"{filled}.key").read_text())
    Path(f"{target}.key").chmod(0o600)
    assert main(["import", "--db", str(target), str(out)]) == 0
    with Singleflight(target) as sf:
        assert sf.execute_sync(str.upper, "a@x", options=SHARED).source == "cache_hit"
    forged = json.loads(lines[0]) | {"output": '"forged"'}
    out.write_text(json.dumps(forged) + "\n")
    assert main(["import", "--db", str(target), str(out)]) == 1
    assert "not imported" in capsys.readouterr().out


def test_prune_drops_expired_receipts(db_path: Path, capsys: pytest.CaptureFixture[str],
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    with Singleflight(db_path) as sf:
        sf.execute_sync(str.upper, "a", options=SHARED.replace(ttl_seconds=1))
        sf.execute_sync(str.upper, "b", options=SHARED.replace(ttl_seconds=3600))
    import time
    real = time.time
    monkeypatch.setattr(time, "time", lambda: real() + 10)
    assert main(["prune", "--db", str(db_path)]) == 0
    assert "pruned 1 expired receipts" in capsys.readouterr().out
    with contextlib.closing(sqlite3.connect(db_path)) as db:
        assert db.execute("SELECT count(*) FROM receipts").fetchone() == (1,)


def test_prune_reports_the_true_sizes_of_the_store(db_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    big = "x" * 4000
    with Singleflight(db_path) as sf:
        for i in range(300):
            sf.execute_sync(str.upper, f"{i}{big}", options=SHARED.replace(ttl_seconds=0.001))
    assert main(["prune", "--db", str(db_path)]) == 0
    before, after = map(int, re.search(r"; (\d+) -> (\d+) bytes", capsys.readouterr().out).groups())
    wal = db_path.with_name(db_path.name + "-wal")
    on_disk = db_path.stat().st_size + (wal.stat().st_size if wal.exists() else 0)
    assert after == on_disk and after < before / 10


@pytest.mark.parametrize("argv", [
    ["summary", "--db", "/nonexistent/r.db"],
    ["verify", "--db", "/nonexistent/r.db"],
    ["export", "--db", "/nonexistent/r.db"],
    ["summary", "--db", "ftp://host/x"],
    ["import", "--db", "/tmp/whatever.db", "/nonexistent/file.jsonl"],
])
def test_user_mistakes_print_one_line_and_exit_2(argv: list[str],
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("singleflight-agents: error: ") and err.count("\n") == 1


def test_a_corrupt_store_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.db"
    bad.write_bytes(b"\x00garbage" * 512)
    assert main(["verify", "--db", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "bad.db is not a usable singleflight store" in err and err.count("\n") == 1


def test_bad_arguments_exit_2_without_a_traceback() -> None:
    result = subprocess.run([sys.executable, "-m", "singleflight_agents", "summary", "--bogus"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "Traceback" not in result.stderr


def test_summary_verify_export_on_both_stores(store_url: str, capsys: pytest.CaptureFixture[str],
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SINGLEFLIGHT_SECRET", SECRET)
    with Singleflight(store=store_url, run_id="cli-run") as sf:
        for email in ("a@x", "b@x", "a@x"):
            sf.execute_sync(str.upper, email, options=SHARED)
    assert main(["summary", "--db", store_url, "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert (data["run_id"], data["calls"], data["unique_executions"]) == ("cli-run", 3, 2)
    assert main(["verify", "--db", store_url]) == 0
    assert "ok: 2 of 2 receipts verified" in capsys.readouterr().out
    assert main(["export", "--db", store_url]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 2
    assert main(["prune", "--db", store_url]) == 0


def test_a_short_secret_is_one_line(filled: Path, capsys: pytest.CaptureFixture[str],
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SINGLEFLIGHT_SECRET", "short")
    assert main(["verify", "--db", str(filled)]) == 2
    assert "shorter than 16 bytes" in capsys.readouterr().err


def test_import_says_the_key_must_travel(filled: Path, tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str],
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SINGLEFLIGHT_SECRET", raising=False)
    out = tmp_path / "receipts.jsonl"
    assert main(["export", "--db", str(filled), "-o", str(out)]) == 0
    capsys.readouterr()
    # A new store with no key: refused before anything is created.
    fresh = tmp_path / "fresh" / "copy.db"
    assert main(["import", "--db", str(fresh), str(out)]) == 2
    err = capsys.readouterr().err
    assert "must travel" in err and "SINGLEFLIGHT_SECRET" in err and err.count("\n") == 1
    assert not (tmp_path / "fresh").exists()
    # A store with another key: each receipt says why, and the last line says how to fix it.
    other = tmp_path / "other.db"
    Singleflight(other).summary()
    assert main(["import", "--db", str(other), str(out)]) == 1
    text = capsys.readouterr().out
    assert text.count("signed with another key; not imported") == 2
    assert "the key must travel with them: set SINGLEFLIGHT_SECRET" in text
    # The key file's content, set as the secret, is the fix.
    monkeypatch.setenv("SINGLEFLIGHT_SECRET", Path(f"{filled}.key").read_text())
    assert main(["import", "--db", str(fresh), str(out)]) == 0
    assert "imported 2 of 2 receipts" in capsys.readouterr().out
