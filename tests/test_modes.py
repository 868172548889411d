"""The engine's modes, without pytest: record, replay, refresh, off."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from conftest import SECRET

import singleflight_agents
from singleflight_agents import ReplayMissError, Singleflight, Source, ToolExecutionOptions, session
from singleflight_agents.reporting import format_summary

RECORD = ToolExecutionOptions(tool_name="search.web", bounded_read=True, estimated_cost_usd=0.1)


def _search(query: str) -> list[str]:
    return [query.upper()]


def test_replay_serves_recorded_calls_and_never_runs_shared_tools(
        sf: Singleflight, store_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    sf.execute_sync(_search, "refund", options=RECORD.replace(ttl_seconds=1))
    real = time.time
    monkeypatch.setattr(time, "time", lambda: real() + 3600)  # long expired: replay ignores expiry
    with Singleflight(store=store_url, secret=SECRET, mode="replay",
                      record_command="make record") as replayer:
        assert replayer.current_mode() == "replay"
        assert replayer.execute_sync(_search, "refund", options=RECORD).source is Source.CACHE_HIT

        def never(query: str) -> list[str]:
            raise AssertionError("replay ran a shared tool")

        with pytest.raises(ReplayMissError) as info:
            replayer.execute_sync(never, "shipping", options=RECORD)
        message = str(info.value)
        assert "search.web" in message and '{"query":"shipping"}' in message \
            and "make record" in message
        assert replayer.summary()["replay_misses"] == 1


async def test_replay_miss_from_async_code(store_url: str) -> None:
    Singleflight(store=store_url, secret=SECRET).summary()  # a store, nothing recorded
    with Singleflight(store=store_url, secret=SECRET, mode="replay") as replayer, \
            pytest.raises(ReplayMissError, match=r"search\.web"):
        await replayer.execute(_search, "nothing", options=RECORD)


def test_side_effecting_tools_run_in_every_mode(store_url: str) -> None:
    runs = []

    def send(to: str) -> str:
        runs.append(to)
        return "sent"

    options = ToolExecutionOptions(tool_name="mail.send", side_effecting=True)
    for mode in ("record", "replay", "refresh", "off"):
        with Singleflight(store=store_url, secret=SECRET, mode=mode) as engine:
            assert engine.execute_sync(send, "a@x", options=options).source \
                is Source.EXECUTED_UNSHARED
    assert len(runs) == 4


def test_refresh_runs_each_call_once_per_session(db_path: Path) -> None:
    runs = []

    def tool(x: int) -> int:
        runs.append(x)
        return x

    with Singleflight(db_path) as first:
        first.execute_sync(tool, 1, options=RECORD)
    with Singleflight(db_path, mode="refresh") as second:  # a new run: old receipts run again, once
        assert second.execute_sync(tool, 1, options=RECORD).source is Source.EXECUTED
        assert second.execute_sync(tool, 1, options=RECORD).source is Source.CACHE_HIT
    with Singleflight(db_path) as third:  # and the refreshed receipt serves record mode
        assert third.execute_sync(tool, 1, options=RECORD).source is Source.CACHE_HIT
    assert runs == [1, 1]


def test_off_runs_everything_and_counts_duplicates(store_url: str) -> None:
    with Singleflight(store=store_url, secret=SECRET, mode="off") as engine:
        outcomes = [engine.execute_sync(_search, q, options=RECORD) for q in ("a", "a", "b", "a")]
        assert {o.source for o in outcomes} == {Source.EXECUTED_UNSHARED}
        summary = engine.summary()
        assert summary["duplicates"] == 2 and summary["duplicate_dollars"] == pytest.approx(0.2)
        assert summary["unique_executions"] == 0
        assert engine.store.get(outcomes[0].fingerprint) is None  # off mode writes no receipts


def test_unknown_mode_is_refused() -> None:
    with pytest.raises(ValueError, match="mode must be one of record, replay, refresh, off"):
        Singleflight(mode="replay-all")
    with pytest.raises(ValueError, match="mode must be one of record, replay, refresh, off"):
        session(mode="replay-all")
    # The mode belongs to the run, not to a tool: an option saying otherwise is refused.
    with pytest.raises(TypeError, match=r"mode= is not a tool option: it belongs to the run"):
        ToolExecutionOptions().replace(mode="replay")



def test_the_session_function_is_reachable_from_the_package() -> None:
    """No submodule of that name shadows it once the engine is imported."""
    assert singleflight_agents.Singleflight is not None  # imports the engine
    assert callable(singleflight_agents.session)
    with pytest.raises(ValueError, match="mode must be one of record, replay, refresh, off"):
        singleflight_agents.session(mode="replay-all")


def test_replay_with_another_key_serves_nothing_and_says_so(store_url: str) -> None:
    with Singleflight(store=store_url, secret="the recording key, 32 bytes long") as recorder:
        recorder.execute_sync(_search, "refund", options=RECORD)
    with Singleflight(store=store_url, secret="another key, also long enough!!",
                      mode="replay") as replayer:
        with pytest.warns(RuntimeWarning, match=r"signed with another key\); not served"), \
                pytest.raises(ReplayMissError):
            replayer.execute_sync(_search, "refund", options=RECORD)
        summary = replayer.summary()
    assert (summary["tampered"], summary["replay_misses"], summary["executed"]) == (1, 1, 0)
    assert "were not served" in format_summary(summary)


def test_the_key_file_content_is_the_secret(db_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """Recorded with a key file; replayed with its content as the secret and no key file
    (as CI does with SINGLEFLIGHT_SECRET="$(cat receipts.db.key)"): served."""
    monkeypatch.delenv("SINGLEFLIGHT_SECRET", raising=False)
    with Singleflight(db_path) as recorder:
        recorder.execute_sync(_search, "refund", options=RECORD)
    key_file = Path(f"{db_path}.key")
    content = key_file.read_text().strip()  # what $(cat ...) gives: no trailing newline
    key_file.unlink()

    def never(query: str) -> list[str]:
        raise AssertionError("replay ran a shared tool")

    with Singleflight(db_path, secret=content, mode="replay") as replayer:
        assert replayer.execute_sync(never, "refund", options=RECORD).source is Source.CACHE_HIT
        assert replayer.summary()["tampered"] == 0
    monkeypatch.setenv("SINGLEFLIGHT_SECRET", content)
    with session(db_path, mode="replay"), Singleflight(db_path) as engine:
        assert engine.execute_sync(never, "refund", options=RECORD).source is Source.CACHE_HIT
    assert not key_file.exists()  # neither made a new key file
