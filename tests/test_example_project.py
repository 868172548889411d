"""``example_project/`` does what its README says: record with a key, replay without one.

The project is copied to a temporary directory and run the way a user runs it (``pytest`` in
its directory, its own ``pytest.ini``), in a subprocess: record mode with the stand-in model's
API key, a second record run (everything served), replay mode without the key (no paid model
call at all), a replay after a question changed (that test fails and says how to record it),
and a record run under pytest-xdist on a fresh store. Both the model turns (wrapped through the
plugin's fixture) and the agent's ``lookup_order`` tool (decorated by the application's own
engine at import, governed by the plugin's session) are checked in the report.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

EXAMPLE = Path(__file__).resolve().parent.parent / "example_project"
MODEL = "model:gpt-4.1"
TOOL = "support.lookup_order"
CHANGED_CASE = "test_support_eval.py::test_support_answer[return-rerun]"
# Six cases, four distinct questions (two are asked twice): 4 distinct lookups, and two turns
# each (tool call, then answer), so 8 distinct model turns.
CALLS = {MODEL: 12, TOOL: 6}
DISTINCT = {MODEL: 8, TOOL: 4}


def _copy(tmp_path: Path, name: str) -> Path:
    project = tmp_path / name
    shutil.copytree(EXAMPLE, project, ignore=shutil.ignore_patterns(
        ".singleflight", "__pycache__", ".pytest_cache", "report*.json"))
    return project


def _run(project: Path, mode: str, *, api_key: bool, label: str = "",
         extra: tuple[str, ...] = ()) -> tuple[subprocess.CompletedProcess[str], Any]:
    env = {name: value for name, value in os.environ.items()
           if not name.startswith(("PYTEST_", "SINGLEFLIGHT_", "GITHUB_", "EXAMPLE_"))}
    env["SINGLEFLIGHT_SECRET"] = "example-project-test-secret-0123456789"
    if api_key:
        env["EXAMPLE_MODEL_API_KEY"] = "sk-example-not-a-real-key"
    report = project / f"report-{label or mode}.json"
    report.unlink(missing_ok=True)
    result = subprocess.run(
        # Plugins the example does not use, off for speed (blocking an absent one is a no-op).
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-p", "no:hypothesispytest",
         "-p", "no:langsmith_plugin", f"--singleflight-mode={mode}",
         f"--singleflight-report={report.name}", *extra],
        cwd=project, env=env, capture_output=True, text=True, timeout=180, check=False)
    data = json.loads(report.read_text()) if report.exists() else None
    return result, data


def _explain(result: subprocess.CompletedProcess[str]) -> str:
    return f"exit {result.returncode}\n--- stdout\n{result.stdout}\n--- stderr\n{result.stderr}"


def _executed(report: Any) -> dict[str, int]:
    return {tool: row["executed"] for tool, row in report["tools"].items()}


@pytest.mark.slow
def test_example_project_records_then_replays_without_a_key(tmp_path: Path) -> None:
    project = _copy(tmp_path, "example_project")

    # 1. Record, with the key: each distinct call (model turn or lookup) runs once, repeats
    #    are served; the tool decorated in support_agent.py is in the run's report.
    result, report = _run(project, "record", api_key=True)
    assert result.returncode == 0, _explain(result)
    assert "6 passed" in result.stdout, _explain(result)
    assert "model tokens avoided" in result.stdout and "gpt-4.1" in result.stdout, _explain(result)
    assert _executed(report) == DISTINCT, report["tools"]
    for tool, calls in CALLS.items():
        row = report["tools"][tool]
        assert row["calls"] == calls and row["cache_hits"] == calls - DISTINCT[tool], row
    assert "paid model calls: 8" in result.stdout, _explain(result)
    row = report["tools"][MODEL]
    assert row["tokens_in"] > 0 and row["dollars_spent"] > 0 and row["tokens_in_saved"] > 0, row
    assert (project / ".singleflight" / "receipts.db").exists()
    assert not (project / ".singleflight" / "receipts.db.key").exists()  # the secret signs

    # 2. The same run again, key still set: everything is served, nothing runs.
    result, report = _run(project, "record", api_key=True, label="record-again")
    assert result.returncode == 0, _explain(result)
    assert "6 passed" in result.stdout, _explain(result)
    assert _executed(report) == {MODEL: 0, TOOL: 0}, report["tools"]
    assert report["executed"] == 0 and report["cache_hits"] == sum(CALLS.values()), report
    assert "paid model calls: 0" in result.stdout, _explain(result)

    # 3. Replay, without the key: everything passes and the paid model is never called.
    result, report = _run(project, "replay", api_key=False)
    assert result.returncode == 0, _explain(result)
    assert "6 passed" in result.stdout, _explain(result)
    assert "paid model calls: 0" in result.stdout, _explain(result)
    assert "model tokens avoided" in result.stdout, _explain(result)
    assert _executed(report) == {MODEL: 0, TOOL: 0}, report["tools"]
    for tool, calls in CALLS.items():
        assert report["tools"][tool]["cache_hits"] == calls, report["tools"][tool]
    row = report["tools"][MODEL]
    assert row["tokens_in_saved"] > 0 and row["tokens_out_saved"] > 0, row
    assert row["dollars_saved"] > 0 and row["dollars_spent"] == 0, row

    # 4. A changed question was never recorded: that test fails in replay, naming the command.
    source = project / "test_support_eval.py"
    text = source.read_text()
    old = '"Can I return order C3003?", "can be returned until 2025-06-29", id="return-rerun"'
    assert text.count(old) == 1, "the example's cases changed: update this test"
    source.write_text(text.replace(old, old.replace("Can I return", "Can I still return")))
    result, report = _run(project, "replay", api_key=False, label="replay-changed")
    assert result.returncode == 1, _explain(result)
    assert "1 failed, 5 passed" in result.stdout, _explain(result)
    assert f"FAILED {CHANGED_CASE}" in result.stdout, _explain(result)
    assert "--singleflight-mode=record" in result.stdout, _explain(result)
    assert "Can I still return order C3003?" in result.stdout, _explain(result)
    assert "paid model calls: 0" in result.stdout, _explain(result)
    assert report["executed"] == 0 and report["replay_misses"] == 1, report


@pytest.mark.slow
def test_example_project_under_xdist_runs_each_distinct_call_once(tmp_path: Path) -> None:
    pytest.importorskip("xdist")
    project = _copy(tmp_path, "example_project")

    # Two workers on one fresh store: the run still executes each distinct call once, and the
    # paid-call count printed by the controller is every worker's, not its own (zero).
    result, report = _run(project, "record", api_key=True, label="record-n2", extra=("-n", "2"))
    assert result.returncode == 0, _explain(result)
    assert "6 passed" in result.stdout, _explain(result)
    assert _executed(report) == DISTINCT, report["tools"]
    for tool, calls in CALLS.items():
        row = report["tools"][tool]
        assert row["calls"] == calls, row
        assert row["cache_hits"] + row["shared_waits"] == calls - DISTINCT[tool], row
    assert f"paid model calls: {DISTINCT[MODEL]}" in result.stdout, _explain(result)
