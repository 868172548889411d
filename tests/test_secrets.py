"""Secrets in tool inputs stay out of the store, exports and messages."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import pytest

from singleflight_agents import ReplayMissError, Singleflight, Source, ToolExecutionOptions
from singleflight_agents.cli import main

API_KEY = "sk-live-4f9c1e7d2b8a"
EMAIL = "ada@example.com"


def fetch(url: str, api_key: str, headers: dict[str, Any]) -> dict[str, Any]:
    return {"url": url, "status": 200}


REDACTED = ToolExecutionOptions(tool_name="http.get", bounded_read=True,
                                redact=("api_key", "headers.Authorization", "headers.user.email"))
HEADERS = {"Authorization": f"Bearer {API_KEY}", "user": {"email": EMAIL, "plan": "pro"}}


def _everything_stored(sf: Singleflight) -> str:
    return "\n".join(repr(r) for r in sf.store.iter_receipts())


def test_named_arguments_and_paths_are_stored_redacted(sf: Singleflight) -> None:
    outcome = sf.execute_sync(fetch, "https://api.example.com", API_KEY, HEADERS,
                              options=REDACTED)
    assert outcome.receipt is not None and outcome.receipt.inputs is not None
    stored = _everything_stored(sf)
    assert API_KEY not in stored and EMAIL not in stored
    assert '"api_key":"[redacted]"' in outcome.receipt.inputs
    assert '"plan":"pro"' in outcome.receipt.inputs  # what is not named stays readable
    assert HEADERS["user"]["email"] == EMAIL  # the caller's data is untouched
    again = sf.execute_sync(fetch, "https://api.example.com", API_KEY, HEADERS, options=REDACTED)
    assert again.source is Source.CACHE_HIT


def test_the_key_still_covers_the_real_values(sf: Singleflight) -> None:
    first = sf.execute_sync(fetch, "u", API_KEY, {}, options=REDACTED)
    other = sf.execute_sync(fetch, "u", "sk-other-key-000000", {}, options=REDACTED)
    assert other.source is Source.EXECUTED  # another credential is another call
    assert first.fingerprint != other.fingerprint


def test_a_redact_function(sf: Singleflight) -> None:
    options = REDACTED.replace(tool_name="http.get2",
                               redact=lambda args: {"url": args["url"]})
    outcome = sf.execute_sync(fetch, "u", API_KEY, HEADERS, options=options)
    assert outcome.receipt is not None and outcome.receipt.inputs == '{"url":"u"}'


def test_inputs_can_be_kept_out_entirely(sqlite_sf: Singleflight, db_path: Path) -> None:
    options = ToolExecutionOptions(tool_name="http.get", bounded_read=True, store_inputs=False)
    outcome = sqlite_sf.execute_sync(fetch, "u", API_KEY, HEADERS, options=options)
    assert outcome.receipt is not None and outcome.receipt.inputs is None
    assert len(outcome.receipt.inputs_sha256) == 64
    sqlite_sf.close()
    db = sqlite3.connect(db_path)
    db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    db.close()
    assert API_KEY.encode() not in db_path.read_bytes()


def test_export_and_replay_misses_never_show_redacted_values(
        sqlite_sf: Singleflight, db_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    sqlite_sf.execute_sync(fetch, "u", API_KEY, HEADERS, options=REDACTED)
    assert main(["export", "--db", str(db_path)]) == 0
    exported = capsys.readouterr().out
    assert API_KEY not in exported and EMAIL not in exported and "[redacted]" in exported
    with Singleflight(db_path, mode="replay") as replayer, \
            pytest.raises(ReplayMissError) as info:
        replayer.execute_sync(fetch, "v", API_KEY, HEADERS, options=REDACTED)
    assert API_KEY not in str(info.value) and "[redacted]" in str(info.value)


def test_redact_is_validated() -> None:
    with pytest.raises(ValueError, match="redact takes a list"):
        ToolExecutionOptions(redact="api_key")
