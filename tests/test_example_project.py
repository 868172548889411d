"""``example_project/`` does what its README says: record with a key, replay without one.

The project is copied to a temporary directory and run the way a user runs it (``pytest`` in
its directory, its own ``pytest.ini``), in a subprocess: record mode with the stand-in model's
API key, replay mode without it (no paid model call at all), and a replay after a question
changed (that test fails and says how to record it).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

EXAMPLE = Path(__file__).resolve().parent.parent / "example_project"
MODEL = "model:gpt-4.1"
CHANGED_CASE = "test_support_eval.py::test_support_answer[return-rerun]"


def _run(project: Path, mode: str, *, api_key: bool) -> tuple[subprocess.CompletedProcess[str], Any]:
    env = {name: value for name, value in os.environ.items()
           if not name.startswith(("PYTEST_", "SINGLEFLIGHT_", "GITHUB_", "EXAMPLE_MODEL_"))}
    env["SINGLEFLIGHT_SECRET"] = "example-project-test-secret-0123456789"
    if api_key:
        env["EXAMPLE_MODEL_API_KEY"] = "sk-example-not-a-real-key"
    report = project / f"report-{mode}.json"
    report.unlink(missing_ok=True)
    result = subprocess.run(
        # Plugins the example does not use, off for speed (blocking an absent one is a no-op).
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-p", "no:hypothesispytest",
         "-p", "no:langsmith_plugin", f"--singleflight-mode={mode}",
         f"--singleflight-report={report.name}"],
        cwd=project, env=env, capture_output=True, text=True, timeout=120, check=False)
    data = json.loads(report.read_text()) if report.exists() else None
    return result, data


def _explain(result: subprocess.CompletedProcess[str]) -> str:
    return f"exit {result.returncode}\n--- stdout\n{result.stdout}\n--- stderr\n{result.stderr}"


def test_example_project_records_then_replays_without_a_key(tmp_path: Path) -> None:
    project = tmp_path / "example_project"
    shutil.copytree(EXAMPLE, project, ignore=shutil.ignore_patterns(
        ".singleflight", "__pycache__", ".pytest_cache", "report*.json"))

    # 1. Record, with the key: each distinct turn is paid for once, repeats are served.
    result, report = _run(project, "record", api_key=True)
    assert result.returncode == 0, _explain(result)
    assert "6 passed" in result.stdout, _explain(result)
    assert "model tokens avoided" in result.stdout and "gpt-4.1" in result.stdout, _explain(result)
    row = report["tools"][MODEL]
    assert row["calls"] == 12 and row["executed"] == 8 and row["cache_hits"] == 4, row
    assert f"paid model calls: {row['executed']}" in result.stdout, _explain(result)
    assert row["tokens_in"] > 0 and row["dollars_spent"] > 0 and row["tokens_in_saved"] > 0, row
    assert (project / ".singleflight" / "receipts.db").exists()
    assert not (project / ".singleflight" / "receipts.db.key").exists()  # the secret signs

    # 2. Replay, without the key: everything passes and the paid model is never called.
    result, report = _run(project, "replay", api_key=False)
    assert result.returncode == 0, _explain(result)
    assert "6 passed" in result.stdout, _explain(result)
    assert "paid model calls: 0" in result.stdout, _explain(result)
    assert "model tokens avoided" in result.stdout, _explain(result)
    row = report["tools"][MODEL]
    assert row["calls"] == 12 and row["executed"] == 0 and row["cache_hits"] == 12, row
    assert row["tokens_in_saved"] > 0 and row["tokens_out_saved"] > 0, row
    assert row["dollars_saved"] > 0 and row["dollars_spent"] == 0, row

    # 3. A changed question was never recorded: that test fails in replay, naming the command.
    source = project / "test_support_eval.py"
    text = source.read_text()
    old = '"Can I return order C3003?", "can be returned until 2025-06-29", id="return-rerun"'
    assert text.count(old) == 1, "the example's cases changed: update this test"
    source.write_text(text.replace(old, old.replace("Can I return", "Can I still return")))
    result, report = _run(project, "replay", api_key=False)
    assert result.returncode == 1, _explain(result)
    assert "1 failed, 5 passed" in result.stdout, _explain(result)
    assert f"FAILED {CHANGED_CASE}" in result.stdout, _explain(result)
    assert "--singleflight-mode=record" in result.stdout, _explain(result)
    assert "Can I still return order C3003?" in result.stdout, _explain(result)
    assert "paid model calls: 0" in result.stdout, _explain(result)
    assert report["tools"][MODEL]["executed"] == 0 and report["replay_misses"] == 1, report
