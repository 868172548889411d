"""One session governs every engine: the library session, and the plugin's session over an app
engine created at import (real pytest runs through ``pytester``, serial and under xdist)."""

from __future__ import annotations

import asyncio
import json
import os
import textwrap
import threading
from pathlib import Path
from typing import Any

import pytest
from conftest import SECRET

from singleflight_agents import (
    ReplayMissError,
    Singleflight,
    StoreError,
    ToolExecutionOptions,
    active_session,
    session,
)
from singleflight_agents.store import open_store

# -- the library session ------------------------------------------------------------------


def _counting_tool() -> tuple[list[str], Any]:
    ran: list[str] = []

    def search(query: str) -> dict[str, str]:
        ran.append(query)
        return {"query": query}

    return ran, search


def test_engines_created_before_and_after_the_session_use_its_store(tmp_path: Path) -> None:
    ran, search = _counting_tool()
    before = Singleflight(tmp_path / "app.db")  # like an app engine made at import
    tool = before.tool(search, tool_name="app.search", deterministic=True)
    with session(tmp_path / "run.db", run_id="run-1") as run:
        after = Singleflight(tmp_path / "other.db")
        assert tool("a") == {"query": "a"}
        assert after.execute_sync(search, "a", options=ToolExecutionOptions(
            tool_name="app.search", deterministic=True)).source == "cache_hit"
        assert run.engine.summary()["tools"]["app.search"]["calls"] == 2
    assert ran == ["a"]
    assert not (tmp_path / "app.db").exists() and not (tmp_path / "other.db").exists()
    [receipt] = list(open_store(tmp_path / "run.db").iter_receipts())
    assert receipt.tool_name == "app.search"
    assert active_session() is None


def test_calls_from_threads_and_tasks_count_in_the_open_scope(tmp_path: Path) -> None:
    ran, search = _counting_tool()
    sf = Singleflight(tmp_path / "app.db")
    tool = sf.tool(search, tool_name="app.search", bounded_read=True)

    async def from_tasks() -> None:
        await asyncio.gather(*(asyncio.to_thread(tool, "t") for _ in range(4)))

    with session(tmp_path / "run.db") as run, run.scope("test_one") as scope:
        threads = [threading.Thread(target=tool, args=("t",)) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        asyncio.run(from_tasks())
    assert len(scope.outcomes) == 8
    assert ran == ["t"]


def test_replay_never_runs_a_shared_call_from_any_entry(tmp_path: Path) -> None:
    ran, search = _counting_tool()

    async def asearch(query: str) -> dict[str, str]:
        ran.append(query)
        return {"query": query}

    db = tmp_path / "run.db"
    Singleflight(db).summary()  # an empty store with its key
    app = Singleflight(tmp_path / "app.db", mode="record")  # its own mode says record
    options = ToolExecutionOptions(tool_name="app.search", bounded_read=True)
    sync_tool = app.tool(search, tool_name="app.search", deterministic=True)
    async_tool = app.tool(asearch, tool_name="app.asearch", deterministic=True)
    Singleflight(tmp_path / "own.db").summary()
    own = Singleflight(tmp_path / "own.db", own_store=True)
    with session(db, mode="replay") as run, run.scope("t") as scope:
        entries = [
            lambda: sync_tool("x"),
            lambda: asyncio.run(async_tool("x")),
            lambda: app.execute_sync(search, "x", options=options),
            lambda: asyncio.run(app.execute(search, "x", options=options)),
            lambda: own.execute_sync(search, "x", options=options),  # keeps its store, not the mode
            lambda: run.engine.execute_sync(search, "x", options=options),
        ]
        for entry in entries:
            with pytest.raises(ReplayMissError, match="no receipt to replay"):
                entry()
    assert ran == []
    assert len(scope.misses) == len(entries)


def test_a_scope_may_ask_for_record_but_replay_and_off_win(tmp_path: Path) -> None:
    ran, search = _counting_tool()
    options = ToolExecutionOptions(tool_name="app.search", bounded_read=True)
    Singleflight(tmp_path / "run.db").summary()
    with session(tmp_path / "run.db", mode="replay") as run, run.scope("t", mode="record"), \
            pytest.raises(ReplayMissError):
        run.engine.execute_sync(search, "x", options=options)
    with session(tmp_path / "run.db", mode="off") as run, run.scope("t", mode="record"):
        run.engine.execute_sync(search, "x", options=options)
        run.engine.execute_sync(search, "x", options=options)
    with session(tmp_path / "run.db") as run, run.scope("t", mode="refresh"):
        assert run.mode_now() == "refresh"
    assert ran == ["x", "x"]


def test_sessions_nest_and_the_innermost_governs(tmp_path: Path) -> None:
    with session(tmp_path / "outer.db") as outer:
        with session(tmp_path / "inner.db") as inner:
            assert active_session() is inner
        assert active_session() is outer
    assert active_session() is None


def test_replay_without_a_store_or_key_fails_fast_and_creates_nothing(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SINGLEFLIGHT_SECRET", raising=False)
    missing = tmp_path / "ci" / "receipts.db"
    with pytest.raises(StoreError, match=r"receipts\.db does not exist; record it first"):
        session(missing, mode="replay").start()
    assert not (tmp_path / "ci").exists()

    Singleflight(tmp_path / "receipts.db").summary()
    (tmp_path / "receipts.db.key").unlink()
    with pytest.raises(StoreError, match=r"key of .*receipts\.db is missing .*SINGLEFLIGHT_SECRET"):
        session(tmp_path / "receipts.db", mode="replay").start()
    assert not (tmp_path / "receipts.db.key").exists()
    assert active_session() is None


def test_the_key_files_content_is_the_secret(tmp_path: Path) -> None:
    ran, search = _counting_tool()
    options = ToolExecutionOptions(tool_name="app.search", deterministic=True)
    with Singleflight(tmp_path / "receipts.db") as recorder:
        recorder.execute_sync(search, "x", options=options)
    secret = (tmp_path / "receipts.db.key").read_text().strip()
    moved = tmp_path / "ci"
    moved.mkdir()
    (moved / "receipts.db").write_bytes((tmp_path / "receipts.db").read_bytes())
    with session(moved / "receipts.db", mode="replay", secret=secret) as run:
        assert run.engine.execute_sync(search, "x", options=options).source == "cache_hit"
    assert ran == ["x"]
    assert not (moved / "receipts.db.key").exists()


def test_mode_is_the_runs_not_a_tools() -> None:
    with pytest.raises(TypeError, match=r"mode= is not a tool option: it belongs to the run"):
        ToolExecutionOptions().replace(mode="replay")
    with pytest.raises(TypeError, match="mode= is not a tool option"):
        Singleflight(store="unused.db").tool(tool_name="t", mode="replay")
    with pytest.raises(ValueError, match="session mode must be one of record, replay"):
        session(mode="replay-all")
    assert ToolExecutionOptions().replace(ttl=5, cost=0.5).ttl_seconds == 5
    assert Singleflight(store="unused.db").tool(tool_name="t", ttl=60)(len).singleflight_options \
        .ttl_seconds == 60
    assert not Path("unused.db").exists()


# -- the plugin's session over an app engine made at import --------------------------------

APP = '''
import json
from pathlib import Path

from singleflight_agents import Singleflight

HERE = Path(__file__).parent
sf = Singleflight()  # the app's own engine, created at import, on its default store


@sf.tool(tool_name="app.search", deterministic=True, cost=0.25)
def search(query):
    with open(HERE / "executions.log", "a") as handle:
        handle.write(json.dumps(query) + "\\n")
    return {"query": query, "hits": len(query)}
'''

SUITE = '''
import pytest
import app

QUERIES = {queries!r}


@pytest.mark.parametrize("query", QUERIES)
def test_search(query):
    assert app.search(query) == {{"query": query, "hits": len(query)}}
'''


class AppProject:
    def __init__(self, pytester: pytest.Pytester, store: str) -> None:
        self.pytester, self.store = pytester, store
        pytester.makepyfile(app=APP)
        pytester.makeini("[pytest]\nasyncio_default_fixture_loop_scope = function\n")

    def suite(self, *queries: str) -> None:
        self.pytester.makepyfile(test_app=textwrap.dedent(SUITE.format(queries=list(queries))))

    def run(self, *args: str) -> pytest.RunResult:
        return self.pytester.runpytest_subprocess(
            "-p", "no:cacheprovider", f"--singleflight-db={self.store}",
            "--singleflight-report=report.json", *args, timeout=120)

    def executions(self) -> list[str]:
        log = self.pytester.path / "executions.log"
        return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []

    def report(self) -> dict[str, Any]:
        data: dict[str, Any] = json.loads((self.pytester.path / "report.json").read_text())
        return data


@pytest.fixture
def app_project(pytester: pytest.Pytester, store_url: str,
                monkeypatch: pytest.MonkeyPatch) -> AppProject:
    for name in ("GITHUB_STEP_SUMMARY", "SINGLEFLIGHT_RUN_ID", "SINGLEFLIGHT_SECRET"):
        monkeypatch.delenv(name, raising=False)
    if "://" in store_url:  # a server store has no key file: the secret comes from the env
        monkeypatch.setenv("SINGLEFLIGHT_SECRET", SECRET)
    return AppProject(pytester, store_url)


@pytest.mark.slow
def test_the_plugin_governs_an_app_engine_made_at_import(app_project: AppProject) -> None:
    project = app_project
    project.suite("refund", "refund", "hours", "refund", "hours", "shipping")
    result = project.run("-n", "2")
    result.assert_outcomes(passed=6)
    assert sorted(project.executions()) == ["hours", "refund", "shipping"]
    report = project.report()
    assert (report["mode"], report["calls"], report["executed"]) == ("record", 6, 3)
    assert report["cache_hits"] + report["shared_waits"] == 3
    assert "app.search" in report["tools"]
    result.stdout.fnmatch_lines(["*singleflight summary - mode record*", "*app.search*"])
    assert not (project.pytester.path / ".singleflight").exists()  # the session's store only
    if "://" not in project.store:
        assert len(list(open_store(project.store).iter_receipts())) == 3

    # A second run executes nothing.
    project.run("-n", "2").assert_outcomes(passed=6)
    assert len(project.executions()) == 3
    assert project.report()["cache_hits"] == 6

    # Replay with a new argument: nothing runs, that test fails with the replay message.
    project.suite("refund", "hours", "warranty")
    replay = project.run("-n", "2", "--singleflight-mode=replay")
    replay.assert_outcomes(passed=2, failed=1)
    replay.stdout.fnmatch_lines([
        "*app.search: no receipt to replay for arguments {*warranty*}; record it with: "
        "pytest --singleflight-mode=record --singleflight-db=* ?test_app.py::test_search?warranty??"])
    assert len(project.executions()) == 3
    assert project.report()["replay_misses"] == 1

    # off runs every call, and counts the duplicates across both workers.
    project.suite("refund", "refund", "hours", "refund", "hours", "shipping")
    project.run("-n", "2", "--singleflight-mode=off").assert_outcomes(passed=6)
    assert len(project.executions()) == 3 + 6
    report = project.report()
    assert (report["mode"], report["calls"], report["duplicates"]) == ("off", 6, 3)


@pytest.mark.slow
def test_a_swallowed_replay_miss_still_fails_its_test(pytester: pytest.Pytester,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SINGLEFLIGHT_SECRET", raising=False)
    pytester.makepyfile(app=APP)
    pytester.makepyfile(test_swallow='''
        import app

        def answer(query):
            try:  # agent frameworks turn a tool's error into a message to the model
                return app.search(query)
            except Exception as exc:
                return {"error": str(exc)}

        def test_made_up_answer():
            assert answer("never recorded")  # passes on its own
    ''')
    db = pytester.path / "receipts.db"
    Singleflight(db).summary()
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", f"--singleflight-db={db}",
                                           "--singleflight-mode=replay", timeout=120)
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*calls with no receipt to replay, so they did not run:*",
                                 "*app.search: no receipt to replay for arguments*never recorded*"])
    assert not (pytester.path / "executions.log").exists()


def test_plugin_replay_without_a_store_stops_at_start(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_nothing="def test_nothing():\n    pass\n")
    db = pytester.path / "ci" / "receipts.db"
    result = pytester.runpytest("-p", "no:cacheprovider", f"--singleflight-db={db}",
                                "--singleflight-mode=replay")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["ERROR: singleflight: replay: receipt store *receipts.db does not "
                                 "exist; record it first (pytest --singleflight-mode=record "
                                 "--singleflight-db=*receipts.db) or copy it here*"])
    assert not (pytester.path / "ci").exists()
    assert os.listdir(pytester.path) == ["test_nothing.py"]


# -- what a hostile review found: every way around replay is closed -----------------------


def test_a_session_inside_a_replay_session_is_held_to_replay(tmp_path: Path) -> None:
    ran, search = _counting_tool()
    Singleflight(tmp_path / "run.db").summary()
    options = ToolExecutionOptions(tool_name="app.search", bounded_read=True)
    with session(tmp_path / "run.db", mode="replay"):
        inner = session(tmp_path / "eval.db")  # app code starting its own, in record mode
        assert inner.mode == "record"
        with pytest.raises(StoreError, match=r"eval\.db does not exist"):
            inner.start()  # held to replay, which needs the recorded store
    Singleflight(tmp_path / "eval.db").summary()
    with session(tmp_path / "run.db", mode="replay"), session(tmp_path / "eval.db") as inner:
        assert inner.mode_now() == "replay"
        with pytest.raises(ReplayMissError):
            Singleflight().execute_sync(search, "x", options=options)
    with session(tmp_path / "run.db", mode="off"), session(tmp_path / "eval.db") as inner:
        assert inner.mode_now() == "off"
    assert ran == []


def test_starting_a_session_twice_is_one_start(tmp_path: Path) -> None:
    run = session(tmp_path / "run.db")
    run.start()
    run.start()
    run.stop()
    assert active_session() is None
    assert "SINGLEFLIGHT_SESSION" not in os.environ


CHILD = '''
import json, sys
from singleflight_agents import ReplayMissError, Singleflight

sf = Singleflight(sys.argv[1] + "/child-own.db", mode="record")  # the child's own engine

@sf.tool(tool_name="app.search", bounded_read=True)
def search(query):
    print("RAN", query)
    return {"query": query}

try:
    print(json.dumps(search(sys.argv[2])))
except ReplayMissError as exc:
    print("MISS", exc)
'''


@pytest.mark.slow
def test_processes_a_session_starts_are_governed_by_it(tmp_path: Path) -> None:
    import subprocess
    import sys

    script = tmp_path / "child.py"
    script.write_text(CHILD)
    ran, search = _counting_tool()
    db = tmp_path / "run.db"
    with Singleflight(db) as recorder:
        recorder.execute_sync(search, "known", options=ToolExecutionOptions(
            tool_name="app.search", bounded_read=True))

    def child(query: str) -> str:
        done = subprocess.run([sys.executable, str(script), str(tmp_path), query],
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        return done.stdout

    with session(db, mode="replay"):
        assert child("known") == '{"query": "known"}\n'  # served from the session's store
        out = child("new")
        assert out.startswith("MISS app.search: no receipt to replay") and "RAN" not in out
    assert "RAN new" in child("new")  # no session: the child's own engine, in record mode
    assert ran == ["known"]


def test_an_undeclared_tool_is_refused_in_replay(tmp_path: Path) -> None:
    ran, search = _counting_tool()
    Singleflight(tmp_path / "run.db").summary()
    sf = Singleflight(tmp_path / "app.db")
    undeclared = sf.tool(search, tool_name="app.search")
    declared = sf.tool(search, tool_name="app.send", side_effecting=True)
    with session(tmp_path / "run.db", mode="replay") as run, run.scope("t") as scope:
        with pytest.raises(ReplayMissError, match=r"app\.search: declares no safety flag, so "
                                                   r"replay neither serves nor runs it"):
            undeclared("x")
        assert declared("x") == {"query": "x"}  # side_effecting: declared to run every time
    assert ran == ["x"] and len(scope.misses) == 1
    assert undeclared("y") == {"query": "y"}  # outside replay it runs, unshared


def test_replay_creates_nothing_with_or_without_a_session(tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SINGLEFLIGHT_SECRET", raising=False)
    ran, search = _counting_tool()
    options = ToolExecutionOptions(tool_name="app.search", bounded_read=True)
    engine = Singleflight(tmp_path / "sub" / "none.db", mode="replay")
    with pytest.raises(StoreError, match="does not exist; record it first"):
        engine.execute_sync(search, "x", options=options)
    assert not (tmp_path / "sub").exists()

    Singleflight(tmp_path / "rec.db").summary()
    (tmp_path / "rec.db.key").unlink()
    from singleflight_agents.store import SQLiteStore

    with pytest.raises(StoreError, match=r"key of .*rec\.db is missing"):
        session(SQLiteStore(tmp_path / "rec.db"), mode="replay").start()
    with pytest.raises(StoreError, match=r"key of .*rec\.db is missing"):
        Singleflight(tmp_path / "rec.db", mode="replay").execute_sync(search, "x", options=options)
    assert not (tmp_path / "rec.db.key").exists()  # never a new key beside recorded receipts
    assert ran == []


def test_a_bad_key_file_stops_a_replay_at_start(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SINGLEFLIGHT_SECRET", raising=False)
    Singleflight(tmp_path / "rec.db").summary()
    (tmp_path / "rec.db.key").chmod(0o664)  # checked out under umask 002
    with pytest.raises(StoreError, match="writable by group or others") as info:
        session(tmp_path / "rec.db", mode="replay").start()
    assert "\n" not in str(info.value) and active_session() is None
    monkeypatch.setenv("SINGLEFLIGHT_SECRET", "short")
    with pytest.raises(StoreError, match="shorter than 16 bytes"):
        session(tmp_path / "rec.db", mode="replay").start()
    with pytest.raises(StoreError, match="has no path"):
        session("sqlite://", mode="record")  # a bad URL, in every mode


def test_reading_the_engine_opens_no_store(tmp_path: Path) -> None:
    with session(tmp_path / "run.db") as run:
        assert run.engine.current_mode() == "record"
        assert not run.used
    assert not (tmp_path / "run.db").exists()


def _inline(pytester: pytest.Pytester, *args: str) -> pytest.RunResult:
    pytester.makeini("[pytest]\nasyncio_default_fixture_loop_scope = function\n")
    return pytester.runpytest("-p", "no:cacheprovider", "-p", "no:hypothesispytest", *args)


def test_plugin_misses_in_fixture_teardown_and_in_conftest_hooks_are_governed(
        pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SINGLEFLIGHT_SECRET", raising=False)
    pytester.makepyfile(app=APP)
    pytester.makeconftest('''
        import app

        def pytest_configure(config):  # runs after the plugin's: already governed
            try:
                app.search("at configure")
            except Exception as exc:
                print("CONFIGURE", type(exc).__name__)
    ''')
    pytester.makepyfile(test_teardown='''
        import pytest
        import app

        @pytest.fixture
        def agent():
            yield
            try:  # a miss swallowed while the fixture tears down
                app.search("in teardown")
            except Exception:
                pass

        def test_passes_itself(agent):
            pass
    ''')
    db = pytester.path / "receipts.db"
    Singleflight(db).summary()
    result = _inline(pytester, f"--singleflight-db={db}", "--singleflight-mode=replay", "-s")
    result.assert_outcomes(passed=1, errors=1)
    result.stdout.fnmatch_lines(["CONFIGURE ReplayMissError",
                                 "*app.search: no receipt to replay*in teardown*"])
    assert not (pytester.path / "executions.log").exists()
    assert not (pytester.path / ".singleflight").exists()


@pytest.mark.parametrize(("args", "message"), [
    (["--singleflight-ttl=0"], "singleflight_ttl = 0.0: give a positive number of seconds*"),
    (["--singleflight-ttl=-5"], "singleflight_ttl = -5.0: give a positive*"),
    (["--singleflight-ttl=nan"], "singleflight_ttl = nan: give a positive*"),
    (["--singleflight-report=out.txt"], "singleflight report 'out.txt': name a .json or .md file"),
    (["--singleflight-ttl=1e308"], "singleflight_ttl = 1e+308: give a positive number of seconds, "
                                   "at most 315360000 (10 years)"),
    (["--singleflight-db=sqlite://"], "singleflight: store URL 'sqlite://' has no path*"),
])
def test_plugin_bad_settings_are_one_line(pytester: pytest.Pytester, args: list[str],
                                          message: str) -> None:
    pytester.makepyfile(test_nothing="def test_nothing():\n    pass\n")
    result = _inline(pytester, *args)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([f"ERROR: {message}"])


def test_plugin_a_run_that_makes_no_call_creates_nothing(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_reads_engine_only='''
        def test_reads_the_engine(singleflight):
            assert singleflight.engine.current_mode() == "record"
    ''')
    result = _inline(pytester)
    result.assert_outcomes(passed=1)
    assert not (pytester.path / ".singleflight").exists()
    assert "singleflight summary" not in result.stdout.str()


def test_a_garbled_exported_session_is_one_clear_error(tmp_path: Path) -> None:
    import subprocess
    import sys

    child = ("from singleflight_agents import Singleflight\n"
             "sf = Singleflight('child.db')\n"
             "sf.tool(len, tool_name='t.len', bounded_read=True)('x')\n")
    done = subprocess.run([sys.executable, "-c", child], cwd=tmp_path, capture_output=True,
                          text=True, timeout=60, env={**os.environ, "SINGLEFLIGHT_SESSION": "{oops"})
    assert done.returncode == 1
    assert "$SINGLEFLIGHT_SESSION does not hold a session this library exported" in done.stderr
    assert not (tmp_path / "child.db").exists()


# -- a second hostile review ---------------------------------------------------------------


def test_replay_is_never_weakened_by_an_outer_off_session(tmp_path: Path) -> None:
    Singleflight(tmp_path / "run.db").summary()
    with session(tmp_path / "run.db", mode="off"):
        with session(tmp_path / "run.db", mode="replay") as inner:
            assert inner.run_mode == "replay"
        with session(tmp_path / "run.db", mode="record") as inner:
            assert inner.run_mode == "off"


def test_the_exported_session_is_always_the_innermost_running_one(tmp_path: Path) -> None:
    Singleflight(tmp_path / "run.db").summary()
    before = os.environ.get("SINGLEFLIGHT_SESSION")
    outer = session(tmp_path / "run.db", mode="replay").start()
    inner = session(tmp_path / "run.db").start()  # held to replay
    outer.stop()  # out of order: inner still governs, and is what children inherit
    assert active_session() is inner
    assert json.loads(os.environ["SINGLEFLIGHT_SESSION"])["mode"] == "replay"
    outer.start()
    outer.start()  # once on the stack, however often started
    outer.stop()
    inner.stop()
    assert active_session() is None and os.environ.get("SINGLEFLIGHT_SESSION") == before
    with session(tmp_path / "run.db") as run:
        assert run.run_mode == "record"  # held_to is decided afresh at each start
        with run.scope("t", mode="refresh"):  # a test's own mode reaches its children
            assert json.loads(os.environ["SINGLEFLIGHT_SESSION"])["mode"] == "refresh"
        assert json.loads(os.environ["SINGLEFLIGHT_SESSION"])["mode"] == "record"


def test_replay_leaves_no_lock_directory(tmp_path: Path) -> None:
    ran, search = _counting_tool()
    options = ToolExecutionOptions(tool_name="app.search", bounded_read=True)
    with Singleflight(tmp_path / "rec.db") as recorder:
        recorder.execute_sync(search, "x", options=options)
    import shutil

    shutil.rmtree(tmp_path / "rec.db.locks")
    with session(tmp_path / "rec.db", mode="replay") as run:
        assert run.engine.execute_sync(search, "x", options=options).source == "cache_hit"
    assert not (tmp_path / "rec.db.locks").exists()
    assert ran == ["x"]


def test_an_observer_that_raises_fails_the_scope_not_the_call(tmp_path: Path) -> None:
    def budget(outcome: Any) -> None:
        raise AssertionError("over budget")

    _, search = _counting_tool()
    with session(tmp_path / "run.db") as run, run.scope("t", on_outcome=budget) as scope:
        outcome = run.engine.execute_sync(search, "x", options=ToolExecutionOptions(
            tool_name="app.search", bounded_read=True))
    assert outcome.source == "executed" and [str(e) for e in scope.errors] == ["over budget"]
    assert run.engine.summary()["calls"] == 1


def test_the_command_line_is_not_governed_by_an_inherited_session(tmp_path: Path) -> None:
    import subprocess
    import sys

    Singleflight(tmp_path / "run.db").summary()
    with session(tmp_path / "run.db", mode="replay"):
        done = subprocess.run([sys.executable, "-m", "singleflight_agents", "demo", "--db",
                               str(tmp_path / "demo.db")], capture_output=True, text=True,
                              timeout=120)
    assert done.returncode == 0, done.stderr
    assert "with singleflight:    3 executions" in done.stdout
    assert Singleflight(tmp_path / "run.db").summary()["calls"] == 0


@pytest.mark.slow
def test_plugin_replay_holds_calls_made_while_conftest_is_imported(
        pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SINGLEFLIGHT_SECRET", raising=False)
    pytester.makepyfile(app=APP)
    pytester.makeconftest('''
        import app

        try:
            GOLDEN = app.search("at import")
        except Exception as exc:
            GOLDEN = type(exc).__name__
    ''')
    pytester.makepyfile(test_golden='''
        import conftest

        def test_golden():
            assert conftest.GOLDEN == "ReplayMissError"
    ''')
    db = pytester.path / "receipts.db"
    Singleflight(db).summary()
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", f"--singleflight-db={db}",
                                           "--singleflight-mode=replay", timeout=120)
    result.assert_outcomes(passed=1)
    assert not (pytester.path / "executions.log").exists()
    assert not (pytester.path / ".singleflight").exists()


def test_plugin_hook_errors_fail_the_test_and_patch_mistakes_are_one_line(
        pytester: pytest.Pytester) -> None:
    pytester.makepyfile(app=APP)
    pytester.makeconftest('''
        def pytest_singleflight_outcome(item, outcome):
            if item.name == "test_swallows_everything":
                assert outcome.source != "executed", "a budget: nothing may execute"
    ''')
    pytester.makepyfile(test_budget='''
        import pytest
        import app

        def test_swallows_everything():
            try:
                app.search("paid")
            except Exception:
                pass

        @pytest.mark.singleflight(patch=["app.nope"])
        def test_bad_target():
            pass

        @pytest.mark.singleflight(patch=["app.search"])
        def test_patching_an_engine_tool_keeps_its_flags():
            assert app.search("x")["query"] == "x"
    ''')
    result = _inline(pytester, f"--singleflight-db={pytester.path / 'r.db'}")
    result.assert_outcomes(passed=1, failed=1, errors=1)
    result.stdout.fnmatch_lines([
        "*ERROR at setup of test_bad_target*",
        "test_budget.py::test_bad_target: singleflight patch target 'app.nope' is not an "
        "importable module attribute",
        "*= FAILURES =*",
        "*pytest_singleflight_outcome raised AssertionError: a budget: nothing may execute*"])
    assert "During handling" not in result.stdout.str()  # one line, no chained traceback


def test_plugin_a_bad_marker_value_fails_the_collection_in_one_line(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_marked='''
        import pytest

        @pytest.mark.singleflight(ttl=1e308)
        def test_marked():
            raise AssertionError("must not run")
    ''')
    result = _inline(pytester)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["ERROR: test_marked.py::test_marked: @pytest.mark.singleflight: "
                                 "ToolExecutionOptions.ttl_seconds must be *"])
