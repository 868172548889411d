"""The two-turn agent of the Agents SDK across processes: 4 spawned processes on one SQLite store
run each turn once in total, and 2 xdist workers add up to one report priced from the ini file.

Slow (processes and a pytest subprocess): ``pytest -m "not slow"`` leaves them out.
Processes meet on a barrier; no sleeps synchronise anything.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import textwrap
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from _fake_models import CONFIG, FINAL, NAME, QUESTION, TOOL, TURN_DOLLARS, USAGE, answer, is_turn_two, lookup
from agents import Agent, Runner
from agents.testing import ModelCall, ModelStep, ScriptedModel
from conftest import SECRET

from singleflight_agents import Singleflight
from singleflight_agents.adapters.openai_models import receipt_model

pytestmark = pytest.mark.slow

SPAWN = multiprocessing.get_context("spawn")
PRICES = {NAME: {"input": 2.0, "output": 8.0}}


# -- 4 spawned processes, one SQLite store: each turn runs once in total -------------------------


def _append(log: str, line: str) -> None:
    fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (line + "\n").encode())
    finally:
        os.close(fd)


def agent_in_process(db: str, log: str, out: str, run_id: str, barrier: Any) -> None:
    """A spawned process: the two-turn agent on its own engine; each real model call is logged."""

    def respond(call: ModelCall) -> list[Any]:
        _append(log, f"{'turn-2' if is_turn_two(call) else 'turn-1'} {os.getpid()}")
        return answer(call)

    with Singleflight(db, secret=SECRET, run_id=run_id, prices=PRICES) as engine:
        model = ScriptedModel([ModelStep.respond(respond), ModelStep.respond(respond)])
        model.set_default_usage(USAGE)
        wrapped = receipt_model(engine, model, model_name=NAME, deterministic=True)
        agent = Agent(name="weather", instructions="Answer in one sentence.", tools=[lookup],
                      model=wrapped)
        barrier.wait(60)  # all four start the run together
        result = Runner.run_sync(agent, QUESTION, run_config=CONFIG)
    Path(out).write_text(json.dumps({
        "final": result.final_output, "calls": len(model.calls),
        "items": [item.to_input_item() for item in result.new_items]}, default=str))


def test_four_spawned_processes_run_each_turn_of_a_two_turn_agent_once(
        tmp_path: Path, procs: list[Any]) -> None:
    db, log, run_id = str(tmp_path / "receipts.db"), str(tmp_path / "calls.log"), "model-processes"
    barrier = SPAWN.Barrier(4)
    outs = [tmp_path / f"out-{i}.json" for i in range(4)]
    for out in outs:
        proc = SPAWN.Process(target=agent_in_process, args=(db, log, str(out), run_id, barrier),
                             daemon=True)
        proc.start()
        procs.append(proc)
    for proc in procs:
        proc.join(90)
        assert proc.exitcode == 0
    results = [json.loads(out.read_text()) for out in outs]
    executions = Counter(line.split()[0] for line in Path(log).read_text().splitlines())
    assert executions == {"turn-1": 1, "turn-2": 1}
    assert sum(r["calls"] for r in results) == 2
    assert [r["final"] for r in results] == [FINAL] * 4
    assert all(r["items"] == results[0]["items"] for r in results)  # same call ids, same outputs

    with Singleflight(db, secret=SECRET, run_id=run_id) as reader:
        row = reader.summary()["tools"][TOOL]
    assert (row["calls"], row["executed"], row["cache_hits"] + row["shared_waits"]) == (8, 2, 6)
    assert (row["fallbacks"], row["failures"], row["takeovers"]) == (0, 0, 0)
    assert (row["tokens_in"], row["tokens_out"]) == (2 * 1000, 2 * 200)
    assert (row["tokens_in_saved"], row["tokens_out_saved"]) == (6 * 1000, 6 * 200)
    assert row["dollars_spent"] == pytest.approx(2 * TURN_DOLLARS)
    assert row["dollars_saved"] == pytest.approx(6 * TURN_DOLLARS)


# -- xdist: two workers, one report; the ini's price table is found from a subdirectory ----------

XDIST_TEST = """
from agents import Agent, RunConfig, Runner, Usage, function_tool
from agents.testing import ModelStep, ScriptedModel, assistant_message, function_call

from singleflight_agents.adapters.openai_models import receipt_model


@function_tool
def lookup(city: str) -> str:
    \"\"\"Look up the weather in a city.\"\"\"
    return "sunny in " + city


def answer(call):  # by the request, not by position: a worker may be asked turn 2 first
    if isinstance(call.input, list) and any(
            isinstance(i, dict) and i.get("type") == "function_call_output" for i in call.input):
        return [assistant_message("Sunny.")]
    return [function_call("lookup", {"city": "Oslo"}, call_id="call-1")]


def run(singleflight):
    model = ScriptedModel([ModelStep.respond(answer), ModelStep.respond(answer)])
    model.set_default_usage(Usage(requests=1, input_tokens=1000, output_tokens=200, total_tokens=1200))
    agent = Agent(name="weather", instructions="Be brief.", tools=[lookup],
                  model=receipt_model(singleflight, model, model_name="scripted", deterministic=True))
    result = Runner.run_sync(agent, "Weather in Oslo?", run_config=RunConfig(tracing_disabled=True))
    assert result.final_output == "Sunny."


def test_one(singleflight):
    run(singleflight)


def test_two(singleflight):
    run(singleflight)
"""


def test_xdist_workers_add_up_to_one_report_priced_from_the_ini(
        pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("xdist")
    for name in ("GITHUB_STEP_SUMMARY", "SINGLEFLIGHT_RUN_ID", "SINGLEFLIGHT_PRICES",
                 "PYTEST_XDIST_WORKER", "PYTEST_XDIST_AUTO_NUM_WORKERS", "PYTEST_ADDOPTS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("SINGLEFLIGHT_SECRET", SECRET)
    pytester.makeini("[pytest]\nsingleflight_prices = prices.json\n")
    (pytester.path / "prices.json").write_text(json.dumps({NAME: [2.0, 8.0]}))
    sub = pytester.mkpydir("evals")
    (sub / "test_evals.py").write_text(textwrap.dedent(XDIST_TEST))
    monkeypatch.chdir(sub)  # run from a subdirectory: the ini's relative paths are the rootdir's
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-p", "no:hypothesispytest",
                                           "-n", "2", "--singleflight-report=report.json")
    result.assert_outcomes(passed=2)
    report = json.loads((sub / "report.json").read_text())
    row = report["tools"][TOOL]
    assert (row["calls"], row["executed"], row["cache_hits"] + row["shared_waits"]) == (4, 2, 2)
    assert (row["tokens_in"], row["tokens_in_saved"], row["unpriced"]) == (2000, 2000, 0)
    assert row["dollars_spent"] == pytest.approx(2 * TURN_DOLLARS)
    assert row["dollars_saved"] == pytest.approx(2 * TURN_DOLLARS)
    assert (pytester.path / ".singleflight" / "receipts.db").exists()
    assert "no price" not in result.stdout.str()
