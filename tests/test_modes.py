"""The engine's modes, without pytest: record, replay, refresh, off."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from singleflight_agents import ReplayMissError, Singleflight, Source, ToolExecutionOptions
from singleflight_agents.reporting import format_summary

RECORD = ToolExecutionOptions(tool_name="search.web", bounded_read=True, estimated_cost_usd=0.1)


def _search(query: str) -> list[str]:
    return [query.upper()]


def test_replay_serves_recorded_calls_and_never_runs_shared_tools(sf: Singleflight,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    sf.execute_sync(_search, "refund", options=RECORD.replace(ttl_seconds=1))
    replay = RECORD.replace(mode="replay", record_command="make record")
    real = time.time
    monkeypatch.setattr(time, "time", lambda: real() + 3600)  # long expired: replay ignores expiry
    assert sf.execute_sync(_search, "refund", options=replay).source is Source.CACHE_HIT

    def never(query: str) -> list[str]:
        raise AssertionError("replay ran a shared tool")

    with pytest.raises(ReplayMissError) as info:
        sf.execute_sync(never, "shipping", options=replay)
    message = str(info.value)
    assert "search.web" in message and '{"query":"shipping"}' in message and "make record" in message
    assert sf.summary()["replay_misses"] == 1


async def test_replay_miss_from_async_code(sf: Singleflight) -> None:
    with pytest.raises(ReplayMissError, match=r"search\.web"):
        await sf.execute(_search, "nothing", options=RECORD.replace(mode="replay"))


def test_side_effecting_tools_run_in_every_mode(sf: Singleflight) -> None:
    runs = []

    def send(to: str) -> str:
        runs.append(to)
        return "sent"

    for mode in ("record", "replay", "refresh", "off"):
        options = ToolExecutionOptions(tool_name="mail.send", side_effecting=True, mode=mode)
        assert sf.execute_sync(send, "a@x", options=options).source is Source.EXECUTED_UNSHARED
    assert len(runs) == 4


def test_refresh_runs_each_call_once_per_session(db_path: Path) -> None:
    runs = []

    def tool(x: int) -> int:
        runs.append(x)
        return x

    with Singleflight(db_path) as first:
        first.execute_sync(tool, 1, options=RECORD)
    with Singleflight(db_path) as second:  # a new session: old receipts are run again, once
        refresh = RECORD.replace(mode="refresh")
        assert second.execute_sync(tool, 1, options=refresh).source is Source.EXECUTED
        assert second.execute_sync(tool, 1, options=refresh).source is Source.CACHE_HIT
    with Singleflight(db_path) as third:  # and the refreshed receipt serves record mode
        assert third.execute_sync(tool, 1, options=RECORD).source is Source.CACHE_HIT
    assert runs == [1, 1]


def test_off_runs_everything_and_counts_duplicates(sf: Singleflight) -> None:
    off = RECORD.replace(mode="off")
    outcomes = [sf.execute_sync(_search, q, options=off) for q in ("a", "a", "b", "a")]
    assert {o.source for o in outcomes} == {Source.EXECUTED_UNSHARED}
    summary = sf.summary()
    assert summary["duplicates"] == 2 and summary["duplicate_dollars"] == pytest.approx(0.2)
    assert summary["unique_executions"] == 0
    assert sf.store.get(outcomes[0].fingerprint) is None  # off mode writes no receipts


def test_unknown_mode_is_refused() -> None:
    with pytest.raises(ValueError, match="mode must be one of record, replay, refresh, off"):
        ToolExecutionOptions(mode="replay-all")


def test_replay_with_another_key_serves_nothing_and_says_so(store_url: str) -> None:
    with Singleflight(store=store_url, secret="the recording key, 32 bytes long") as recorder:
        recorder.execute_sync(_search, "refund", options=RECORD)
    with Singleflight(store=store_url, secret="another key, also long enough!!") as replayer:
        with pytest.warns(RuntimeWarning, match=r"signed with another key\); not served"), \
                pytest.raises(ReplayMissError):
            replayer.execute_sync(_search, "refund", options=RECORD.replace(mode="replay"))
        summary = replayer.summary()
    assert (summary["tampered"], summary["replay_misses"], summary["executed"]) == (1, 1, 0)
    assert "were not served" in format_summary(summary)
