"""``example_project/http_evals`` does what the example's README says: an app on plain OpenAI
and Anthropic clients, its requests recorded through HTTP receipts with no code change
(``singleflight_http`` in the example's ``pytest.ini``), replayed without the API keys.

The project is copied to a temporary directory and run the way a user runs it (``pytest
http_evals`` in its directory), in a subprocess, against the stand-in provider its conftest.py
serves on 127.0.0.1 and counts (``provider requests: N``): a record run with both keys, a
replay with neither, a record run under pytest-xdist on a fresh store; and neither key is in
the store, nor in what ``singleflight-agents export`` prints.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

EXAMPLE = Path(__file__).resolve().parent.parent / "example_project"
SECRET = "example-http-test-secret-0123456789"
KEYS = {"OPENAI_API_KEY": "sk-proj-example-http-4f9c2a7b1e",
        "ANTHROPIC_API_KEY": "sk-ant-api03-example-http-8d3e6f0a2c"}
# Each suite: six cases, four distinct questions. OpenAI: chat completions (JSON and streamed,
# one model) and the Responses API (another); Anthropic: messages, JSON and streamed. One call
# per test.
CALLS = {"model:gpt-4o": 12, "model:gpt-4.1-mini": 6, "model:claude-sonnet-4-5": 12}
DISTINCT = {"model:gpt-4o": 8, "model:gpt-4.1-mini": 4, "model:claude-sonnet-4-5": 8}
TESTS = sum(CALLS.values())

Ran = tuple[subprocess.CompletedProcess[str], dict[str, Any]]


pytestmark = pytest.mark.slow  # pytest runs of the example, with a live server


def _copy_example(root: Path) -> Path:
    project = root / "example_project"
    shutil.copytree(EXAMPLE, project, ignore=shutil.ignore_patterns(
        ".singleflight", "__pycache__", ".pytest_cache", "report*.json"))
    return project


def _environment(*, keys: bool) -> dict[str, str]:
    env = {name: value for name, value in os.environ.items() if not name.startswith(
        ("PYTEST_", "SINGLEFLIGHT_", "GITHUB_", "EXAMPLE_", "OPENAI_", "ANTHROPIC_"))}
    env["SINGLEFLIGHT_SECRET"] = SECRET
    if keys:
        env.update(KEYS)
    return env


def _pytest(project: Path, mode: str, *, keys: bool, label: str, extra: tuple[str, ...] = ()) -> Ran:
    report = project / f"report-{label}.json"
    result = subprocess.run(
        # Plugins the example does not use, off for speed (blocking an absent one is a no-op).
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-p", "no:hypothesispytest",
         "-p", "no:langsmith_plugin", f"--singleflight-mode={mode}",
         f"--singleflight-report={report.name}", "http_evals", *extra],
        cwd=project, env=_environment(keys=keys), capture_output=True, text=True, timeout=110,
        check=False)
    assert report.exists(), _explain(result)
    return result, json.loads(report.read_text())


def _explain(result: subprocess.CompletedProcess[str]) -> str:
    return f"exit {result.returncode}\n--- stdout\n{result.stdout}\n--- stderr\n{result.stderr}"


def _passed(result: subprocess.CompletedProcess[str]) -> None:
    assert result.returncode == 0, _explain(result)
    assert re.search(rf"\b{TESTS} passed\b", result.stdout), _explain(result)


def _provider_requests(result: subprocess.CompletedProcess[str]) -> int:
    found = re.search(r"^provider requests: (\d+)$", result.stdout, re.MULTILINE)
    assert found, _explain(result)
    return int(found.group(1))


def _column(report: dict[str, Any], name: str) -> dict[str, Any]:
    return {tool: row[name] for tool, row in report["tools"].items()}


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _copy_example(tmp_path_factory.mktemp("http"))


@pytest.fixture(scope="module")
def recorded(project: Path) -> Ran:
    return _pytest(project, "record", keys=True, label="record")


@pytest.fixture(scope="module")
def replayed(project: Path, recorded: Ran) -> Ran:
    return _pytest(project, "replay", keys=False, label="replay")


def test_record_with_keys_sends_each_distinct_call_once_and_prices_it(project: Path,
                                                                      recorded: Ran) -> None:
    result, report = recorded
    _passed(result)
    assert _provider_requests(result) == sum(DISTINCT.values()), _explain(result)
    assert _column(report, "calls") == CALLS, report["tools"]
    assert _column(report, "executed") == DISTINCT, report["tools"]
    for tool, row in report["tools"].items():  # the repeated questions: from receipts
        assert row["cache_hits"] + row["shared_waits"] == CALLS[tool] - DISTINCT[tool], row
    prices = json.loads((project / "prices.json").read_text())
    for tool, row in report["tools"].items():
        price = prices[tool.removeprefix("model:")]
        assert row["tokens_in"] > 0 and row["tokens_out"] > 0, row
        assert not row.get("unpriced"), row
        assert row["dollars_spent"] == pytest.approx(
            (row["tokens_in"] * price["input"] + row["tokens_out"] * price["output"]) / 1e6), row
        assert row["tokens_in_saved"] > 0 and row["dollars_saved"] > 0, row
    assert "model tokens avoided" in result.stdout, _explain(result)
    assert not (project / ".singleflight" / "receipts.db.key").exists()  # the secret signs


def test_replay_without_keys_sends_no_request(replayed: Ran) -> None:
    result, report = replayed
    _passed(result)
    assert _provider_requests(result) == 0, _explain(result)
    assert _column(report, "executed") == dict.fromkeys(CALLS, 0), report["tools"]
    assert _column(report, "cache_hits") == CALLS, report["tools"]
    assert report["replay_misses"] == 0, report
    for row in report["tools"].values():
        assert row["tokens_in_saved"] > 0 and row["tokens_out_saved"] > 0, row
        assert row["dollars_saved"] > 0 and row["dollars_spent"] == 0, row
    assert "model tokens avoided" in result.stdout, _explain(result)


def test_no_api_key_is_in_the_store_or_its_export(project: Path, recorded: Ran,
                                                   replayed: Ran) -> None:
    _passed(recorded[0])
    _passed(replayed[0])
    files = [path for path in (project / ".singleflight").rglob("*") if path.is_file()]
    store = project / ".singleflight" / "receipts.db"
    assert store in files, files
    assert b"claude-sonnet-4-5" in store.read_bytes()  # the receipts are there, readable
    for path in files:
        data = path.read_bytes()
        for name, key in KEYS.items():
            assert key.encode() not in data, f"{name} is in {path}"
    script = Path(sys.executable).with_name("singleflight-agents")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "singleflight_agents"]
    exported = subprocess.run(
        [*command, "--db", str(store), "export"],
        cwd=project, env=_environment(keys=False), capture_output=True, text=True, timeout=60,
        check=False)
    assert exported.returncode == 0, _explain(exported)
    receipts = [json.loads(line) for line in exported.stdout.splitlines() if line.strip()]
    assert sorted(r["tool_name"] for r in receipts) == sorted(
        tool for tool, count in DISTINCT.items() for _ in range(count)), receipts
    for name, key in KEYS.items():
        assert key not in exported.stdout and key not in exported.stderr, f"{name} is exported"


@pytest.mark.slow
def test_record_under_xdist_sends_each_distinct_call_once(tmp_path: Path) -> None:
    pytest.importorskip("xdist")
    project = _copy_example(tmp_path)
    # Four workers on one fresh store: a repeated question finds its twin's receipt, or waits
    # for its request in flight, whichever worker runs it.
    result, report = _pytest(project, "record", keys=True, label="record-n4", extra=("-n", "4"))
    _passed(result)
    assert _provider_requests(result) == sum(DISTINCT.values()), _explain(result)
    assert _column(report, "calls") == CALLS, report["tools"]
    assert _column(report, "executed") == DISTINCT, report["tools"]
    for tool, row in report["tools"].items():
        assert row["cache_hits"] + row["shared_waits"] == CALLS[tool] - DISTINCT[tool], row
