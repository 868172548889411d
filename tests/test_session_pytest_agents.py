"""The plugin in replay keeps an OpenAI Agents SDK agent from running anything it has no receipt
for: real pytest runs through ``pytester`` (a subprocess each) on the embedded SQLite store.

- An app module builds its engine at import (``sf = Singleflight()``) and its tool with
  ``function_tool(sf, ..., bounded_read=True)``; a scripted model calls the tool and answers from
  its output, or makes an answer up when the SDK hands it an error message instead. Record runs
  the tool once per distinct argument; replay runs nothing; a new question in replay fails its
  test although the agent "answered" and the test's assertion passed.
- The ``singleflight`` fixture with explicit options (``execute_sync``, ``execute``, ``wrap``):
  a replay miss never runs the tool and fails the test, raised or swallowed.
- ``receipt_model(singleflight.engine, ...)``: a new model turn in replay fails the test and
  never calls the model.
"""

from __future__ import annotations

import json
import re
import shlex
from typing import Any

import pytest

pytestmark = pytest.mark.slow  # seven pytest subprocesses, each importing the Agents SDK

MISSES = "singleflight: calls with no receipt to replay, so they did not run:"
INI = "[pytest]\nasyncio_default_fixture_loop_scope = function\n"


class Project:
    """A pytester directory with a store path and helpers to run it and read its logs."""

    def __init__(self, pytester: pytest.Pytester) -> None:
        self.pytester = pytester
        self.path = pytester.path
        self.db = str(pytester.path / "receipts.db")
        pytester.makeini(INI)

    def questions(self, *questions: str) -> None:
        (self.path / "questions.json").write_text(json.dumps(list(questions)))

    def run(self, mode: str, *args: str) -> pytest.RunResult:
        return self.pytester.runpytest_subprocess(
            "-p", "no:cacheprovider", f"--singleflight-db={self.db}",
            f"--singleflight-mode={mode}", "--singleflight-report=report.json", "-rA", *args,
            timeout=120)

    def log(self, name: str) -> list[Any]:
        path = self.path / name
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []

    def report(self) -> dict[str, Any]:
        data: dict[str, Any] = json.loads((self.path / "report.json").read_text())
        return data

    def record_command(self, nodeid: str) -> str:
        """What the plugin tells a replay miss to run (as ``_Run.record_command`` builds it)."""
        return (f"pytest --singleflight-mode=record --singleflight-db={shlex.quote(self.db)} "
                f"{shlex.quote(nodeid)}")


def failures(result: pytest.RunResult) -> dict[str, str]:
    """The FAILURES block of a run's output, one text per failed test (by its header)."""
    sections: dict[str, list[str]] = {}
    lines = iter(result.stdout.lines)
    for line in lines:
        if re.fullmatch(r"=+ FAILURES =+", line):
            break
    name = None
    for line in lines:
        if line.startswith("="):
            break
        header = re.fullmatch(r"_{3,} (.+?) _{3,}", line)
        if header:
            name = header.group(1)
            sections[name] = []
        elif name is not None:
            sections[name].append(line)
    return {name: "\n".join(text) for name, text in sections.items()}


@pytest.fixture
def project(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> Project:
    for name in ("GITHUB_STEP_SUMMARY", "SINGLEFLIGHT_RUN_ID", "SINGLEFLIGHT_SECRET",
                 "SINGLEFLIGHT_SESSION", "SINGLEFLIGHT_PRICES"):
        monkeypatch.delenv(name, raising=False)  # the key file beside the store is the key
    return Project(pytester)


# -- 1. an Agents SDK agent whose function tool is on an app engine made at import ----------------

AGENT_APP = '''
import json
from pathlib import Path

from agents import Agent, RunConfig, Runner
from agents.testing import ModelStep, ScriptedModel, assistant_message, function_call

from singleflight_agents import Singleflight
from singleflight_agents.adapters import function_tool

HERE = Path(__file__).parent
sf = Singleflight()  # the app's own engine, created at import, on its default store


def log(name, entry):
    with open(HERE / name, "a") as handle:
        handle.write(json.dumps(entry) + "\\n")


def lookup_policy(topic: str) -> str:
    """Look up the help-center policy on a topic.

    Args:
        topic: What the customer asks about.
    """
    log("executions.log", topic)
    return f"{topic}: accepted within 30 days of delivery"


lookup = function_tool(sf, lookup_policy, bounded_read=True)


def answer_from_tool_output(call):
    """The model's second turn: an answer from the tool's output, or made up if it failed."""
    [output] = [item["output"] for item in call.input
                if isinstance(item, dict) and item.get("type") == "function_call_output"]
    if output.startswith("An error occurred"):  # the SDK's message for a tool that raised
        answer = "Everything is accepted within 30 days."  # made up, and plausible
    else:
        answer = f"Policy: {output}"
    log("model.log", {"tool_output": output, "answer": answer})
    return [assistant_message(answer)]


async def ask(question):
    model = ScriptedModel([
        [function_call("lookup_policy", {"topic": question}, call_id="call-1")],
        ModelStep.respond(answer_from_tool_output),
    ])
    agent = Agent(name="support", instructions="Answer from the policy.", model=model,
                  tools=[lookup])
    result = await Runner.run(agent, f"What is the policy on {question}?",
                              run_config=RunConfig(tracing_disabled=True))
    return result.final_output
'''

AGENT_SUITE = '''
import json
from pathlib import Path

import pytest

import app

QUESTIONS = json.loads((Path(__file__).parent / "questions.json").read_text())


@pytest.mark.asyncio
@pytest.mark.parametrize("question", QUESTIONS)
async def test_answers(question):
    answer = await app.ask(question)
    assert "30 days" in answer
    app.log("asserted.log", [question, answer])  # the test's own assertion passed
'''


def test_an_agents_tool_on_an_app_engine_records_replays_and_fails_a_new_question(
        project: Project) -> None:
    project.pytester.makepyfile(app=AGENT_APP, test_agent=AGENT_SUITE)

    # Record: the tool runs once per distinct argument.
    project.questions("returns", "shipping", "returns", "gift cards")
    record = project.run("record")
    record.assert_outcomes(passed=4)
    assert sorted(project.log("executions.log")) == ["gift cards", "returns", "shipping"]
    report = project.report()
    assert (report["mode"], report["executed"], report["replay_misses"]) == ("record", 3, 0)
    assert "app.lookup_policy" in report["tools"]
    assert not (project.path / ".singleflight").exists()  # the app engine's store: never opened

    # Replay with the same questions: every answer is served, nothing runs.
    project.questions("returns", "shipping", "gift cards")
    served = project.run("replay")
    served.assert_outcomes(passed=3)
    assert len(project.log("executions.log")) == 3
    assert (project.report()["cache_hits"], project.report()["replay_misses"]) == (3, 0)
    assert [e["tool_output"] for e in project.log("model.log")[-3:]] == [
        f"{q}: accepted within 30 days of delivery" for q in ("returns", "shipping", "gift cards")]

    # Replay with a new question: its test fails, though the agent answered and it asserted.
    project.questions("returns", "exchanges")
    replay = project.run("replay")
    replay.assert_outcomes(passed=1, failed=1)
    assert len(project.log("executions.log")) == 3  # the tool never ran
    assert project.log("model.log")[-1] == {  # the SDK handed the model an error message ...
        "tool_output": "An error occurred while running the tool. Please try again.",
        "answer": "Everything is accepted within 30 days."}  # ... and the model made one up
    assert project.log("asserted.log")[-1] == ["exchanges", "Everything is accepted within 30 days."]
    [(name, failure)] = failures(replay).items()
    miss = ('app.lookup_policy: no receipt to replay for arguments {"topic":"exchanges"}; record '
            f"it with: {project.record_command('test_agent.py::test_answers[exchanges]')}")
    assert name == "test_answers[exchanges]"
    assert failure.startswith(f"{MISSES}\n  {miss}\n")  # the plugin's failure, no traceback
    assert "- singleflight replay misses -" in failure  # and the report section
    assert "PASSED test_agent.py::test_answers[returns]" in replay.stdout.str()
    assert project.report()["replay_misses"] == 1


# -- 2. the fixture with explicit options, in replay ----------------------------------------------

FIXTURE_SUITE = '''
import json
from pathlib import Path

import pytest

from singleflight_agents import ReplayMissError, ToolExecutionOptions

HERE = Path(__file__).parent
QUESTIONS = json.loads((HERE / "questions.json").read_text())
OPTIONS = ToolExecutionOptions(tool_name="t.paid", bounded_read=True)


def log(entry):
    with open(HERE / "executions.log", "a") as handle:
        handle.write(json.dumps(entry) + "\\n")


def paid(query):
    log(["sync", query])
    return {"answer": query.upper()}


async def apaid(query):
    log(["async", query])
    return {"answer": query.upper()}


def swallowing(call, query):
    """Agent code that turns a tool's error into an answer, as frameworks do."""
    try:
        return call(query)
    except ReplayMissError as exc:
        return {"answer": query.upper(), "error": str(exc)}


async def aswallowing(call, query):
    try:
        return await call(query)
    except ReplayMissError as exc:
        return {"answer": query.upper(), "error": str(exc)}


@pytest.mark.parametrize("query", QUESTIONS)
def test_execute_sync(singleflight, query):
    outcome = singleflight.execute_sync(paid, query, options=OPTIONS)
    assert outcome.value == {"answer": query.upper()}


@pytest.mark.parametrize("query", QUESTIONS)
def test_execute_sync_swallowed(singleflight, query):
    answer = swallowing(lambda q: singleflight.execute_sync(paid, q, options=OPTIONS).value, query)
    assert answer["answer"] == query.upper()


@pytest.mark.asyncio
@pytest.mark.parametrize("query", QUESTIONS)
async def test_execute(singleflight, query):
    outcome = await singleflight.execute(apaid, query, options=OPTIONS)
    assert outcome.value == {"answer": query.upper()}


@pytest.mark.asyncio
@pytest.mark.parametrize("query", QUESTIONS)
async def test_execute_swallowed(singleflight, query):
    async def call(q):
        return (await singleflight.execute(apaid, q, options=OPTIONS)).value

    answer = await aswallowing(call, query)
    assert answer["answer"] == query.upper()


@pytest.mark.parametrize("query", QUESTIONS)
def test_wrap(singleflight, query):
    assert singleflight.wrap(paid, bounded_read=True)(query) == {"answer": query.upper()}


@pytest.mark.parametrize("query", QUESTIONS)
def test_wrap_swallowed(singleflight, query):
    answer = swallowing(singleflight.wrap(paid, bounded_read=True), query)
    assert answer["answer"] == query.upper()


@pytest.mark.asyncio
@pytest.mark.parametrize("query", QUESTIONS)
async def test_wrap_async(singleflight, query):
    assert await singleflight.wrap(apaid, bounded_read=True)(query) == {"answer": query.upper()}
'''

FIXTURE_TESTS = ["test_execute_sync", "test_execute_sync_swallowed", "test_execute",
                 "test_execute_swallowed", "test_wrap", "test_wrap_swallowed", "test_wrap_async"]


def test_the_fixture_with_explicit_options_never_runs_a_miss_in_replay(project: Project) -> None:
    project.pytester.makepyfile(test_paid=FIXTURE_SUITE)
    project.questions("known")
    project.run("record").assert_outcomes(passed=len(FIXTURE_TESTS))
    recorded = project.log("executions.log")
    # t.paid is one tool whichever entry calls it, sync or async (run once, by execute_sync);
    # wrap names each function's own (module.qualname): test_paid.paid, test_paid.apaid.
    assert recorded == [["sync", "known"], ["sync", "known"], ["async", "known"]]

    project.questions("known", "q")
    replay = project.run("replay")
    replay.assert_outcomes(passed=len(FIXTURE_TESTS), failed=len(FIXTURE_TESTS))
    assert project.log("executions.log") == recorded  # nothing ran: neither "known" nor "q"
    out, failed = replay.stdout.str(), failures(replay)
    assert sorted(failed) == sorted(f"{name}[q]" for name in FIXTURE_TESTS)
    for name in FIXTURE_TESTS:
        assert f"PASSED test_paid.py::{name}[known]" in out
        tool = ("t.paid" if name.startswith("test_execute")
                else "test_paid.apaid" if name == "test_wrap_async" else "test_paid.paid")
        miss = (f'{tool}: no receipt to replay for arguments {{"query":"q"}}; record it with: '
                f"{project.record_command(f'test_paid.py::{name}[q]')}")
        failure = failed[f"{name}[q]"]
        if name.endswith("_swallowed"):  # the test passed on its own: the plugin failed it
            assert failure.startswith(f"{MISSES}\n  {miss}\n"), name
        else:  # the miss raised through the test
            assert f"ReplayMissError: {miss}\n" in failure, name
        assert "- singleflight replay misses -" in failure, name
    report = project.report()
    assert (report["replay_misses"], report["cache_hits"]) == (len(FIXTURE_TESTS),) * 2


# -- 3. receipt_model on the session's engine: a new turn in replay ----------------------------

MODEL_SUITE = '''
import json
from pathlib import Path

import pytest
from agents import Agent, RunConfig, Runner
from agents.testing import ScriptedModel, assistant_message

from singleflight_agents import ReplayMissError
from singleflight_agents.adapters import receipt_model

HERE = Path(__file__).parent
INSTRUCTIONS = json.loads((HERE / "questions.json").read_text())


@pytest.mark.asyncio
@pytest.mark.parametrize("handling", ["raise", "fallback"])
@pytest.mark.parametrize("instructions", INSTRUCTIONS)
async def test_greets(singleflight, instructions, handling):
    scripted = ScriptedModel([[assistant_message("hello")]])
    model = receipt_model(singleflight.engine, scripted, model_name="m", deterministic=True)
    agent = Agent(name="greeter", instructions=instructions, model=model)
    try:
        answer = (await Runner.run(agent, "hi", run_config=RunConfig(tracing_disabled=True))
                  ).final_output
    except ReplayMissError:
        if handling == "raise":
            raise
        answer = "hello"  # app code with a canned fallback
    finally:
        with open(HERE / "model_calls.log", "a") as handle:
            handle.write(json.dumps([instructions, handling, len(scripted.calls)]) + "\\n")
    assert answer == "hello"
'''


def test_receipt_model_on_the_fixtures_engine_never_calls_the_model_for_a_new_turn_in_replay(
        project: Project) -> None:
    project.pytester.makepyfile(test_model=MODEL_SUITE)
    project.questions("Greet.")
    project.run("record").assert_outcomes(passed=2)
    calls = project.log("model_calls.log")
    assert sum(n for _, _, n in calls) == 1  # the second test was served the recorded turn

    project.questions("Greet.", "Greet in French.")
    replay = project.run("replay")
    replay.assert_outcomes(passed=2, failed=2)
    replayed = project.log("model_calls.log")[len(calls):]
    assert sorted(map(tuple, replayed)) == [
        ("Greet in French.", "fallback", 0), ("Greet in French.", "raise", 0),
        ("Greet.", "fallback", 0), ("Greet.", "raise", 0)]  # the scripted model: never called
    out, failed = replay.stdout.str(), failures(replay)
    assert sorted(failed) == ["test_greets[Greet in French.-fallback]",
                              "test_greets[Greet in French.-raise]"]
    for handling in ("raise", "fallback"):
        assert f"PASSED test_model.py::test_greets[Greet.-{handling}]" in out
        failure = failed[f"test_greets[Greet in French.-{handling}]"]
        command = project.record_command(f"test_model.py::test_greets[Greet in French.-{handling}]")
        miss = re.compile(r'model:m: no receipt to replay for arguments \{"request":\{.*; record '
                          rf"it with: {re.escape(command)}\n")
        assert miss.search(failure), handling
        if handling == "fallback":  # the app's fallback answered: the plugin failed the test
            assert failure.startswith(f"{MISSES}\n  model:m: "), handling
        else:
            assert "ReplayMissError: model:m: " in failure
    report = project.report()
    assert (report["replay_misses"], report["cache_hits"]) == (2, 2)
