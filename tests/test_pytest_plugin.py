"""The pytest plugin, driven through real pytest sessions (``pytester``).

Every project gets ``sftools.py``: tools that append one line per real execution to
``executions.log`` (a file, so counts add up across xdist workers and sessions), and
``note()``, which tests use to tell the outer test what they saw (``notes.log``).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest

from singleflight_agents import Singleflight
from singleflight_agents.codec import canonical_json
from singleflight_agents.models import Receipt
from singleflight_agents.store import open_store

SFTOOLS = '''
import asyncio
import json
from pathlib import Path

HERE = Path(__file__).parent


def _append(name, record):
    with open(HERE / name, "a") as handle:
        handle.write(json.dumps(record) + "\\n")


def note(*values):
    """What a test saw, for the test that ran the session."""
    _append("notes.log", list(values))


def lookup(x):
    _append("executions.log", ["lookup", x])
    return {"x": x, "upper": str(x).upper()}


async def alookup(x):
    await asyncio.sleep(0)
    _append("executions.log", ["alookup", x])
    return {"x": x, "upper": str(x).upper()}


def send_email(to):
    _append("executions.log", ["send_email", to])
    return "sent to " + to
'''


class Project:
    """A pytester project with ``sftools.py`` and a receipt store in pytester's tmp dir."""

    def __init__(self, pytester: pytest.Pytester) -> None:
        self.pytester = pytester
        self.path = pytester.path
        self.db = pytester.path / "receipts.db"
        pytester.makepyfile(sftools=SFTOOLS)
        pytester.makeini("[pytest]\nasyncio_default_fixture_loop_scope = function\n")

    def run(self, *args: str, db: bool = True) -> pytest.RunResult:
        """An in-process session (fast; no xdist)."""
        extra = [f"--singleflight-db={self.db}"] if db else []
        # Hypothesis' plugin re-imports hypothesis in every in-process session: seconds each.
        return self.pytester.runpytest("-p", "no:cacheprovider", "-p", "no:hypothesispytest",
                                       *extra, *args)

    def run_subprocess(self, *args: str) -> pytest.RunResult:
        return self.pytester.runpytest_subprocess(
            "-p", "no:cacheprovider", f"--singleflight-db={self.db}", *args, timeout=90)

    def _log(self, name: str) -> list[list[Any]]:
        path = self.path / name
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines()]

    def executions(self) -> list[list[Any]]:
        """One ``[tool, argument]`` per real execution, in every session and worker so far."""
        return self._log("executions.log")

    def notes(self) -> list[list[Any]]:
        return self._log("notes.log")

    def clear_notes(self) -> None:
        (self.path / "notes.log").unlink(missing_ok=True)

    def receipts(self) -> list[Receipt]:
        store = open_store(self.db)
        try:
            return sorted(store.iter_receipts(), key=lambda r: r.inputs or "")
        finally:
            store.close()


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    # In-process sessions read os.environ: never write into a real CI step summary.
    for name in ("GITHUB_STEP_SUMMARY", "SINGLEFLIGHT_RUN_ID", "PYTEST_XDIST_WORKER",
                 "PYTEST_XDIST_AUTO_NUM_WORKERS"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def project(pytester: pytest.Pytester) -> Project:
    return Project(pytester)


def _write(project: Project, name: str, source: str) -> None:
    project.pytester.makepyfile(**{name: textwrap.dedent(source)})


def _outcomes(result: pytest.RunResult) -> dict[str, int]:
    return {k: v for k, v in result.parseoutcomes().items() if k != "warnings"}


def _report_lines(result: pytest.RunResult) -> list[str]:
    return [line for line in result.outlines if line.startswith("singleflight")]


THREE_CASES = """
    import pytest
    import sftools

    @pytest.mark.parametrize("case", range(3))
    def test_lookup(singleflight, case):
        lookup = singleflight.wrap(sftools.lookup, bounded_read=True, tool_name="crm.lookup", cost=0.25)
        assert lookup("ada") == {"x": "ada", "upper": "ADA"}
        [outcome] = singleflight.outcomes
        sftools.note(case, str(outcome.source), outcome.tool_name)
"""


# -- 1. record mode ---------------------------------------------------------------------


def test_record_mode_executes_once_and_reports(project: Project) -> None:
    _write(project, "test_three", THREE_CASES)
    result = project.run()
    result.assert_outcomes(passed=3)
    assert project.executions() == [["lookup", "ada"]]
    assert project.notes() == [[0, "executed", "crm.lookup"], [1, "cache_hit", "crm.lookup"],
                               [2, "cache_hit", "crm.lookup"]]
    out = result.stdout.str()
    assert re.search(r"=+ singleflight =+", out)
    assert "singleflight summary - mode record - run pytest-" in out
    assert f"store {project.db}" in out
    assert "3 calls, 1 executed, 2 served from receipts, 0 shared in flight, 0 unshared; " \
           "saved $0.50" in out
    result.stdout.re_match_lines([r"\s+tool\s+calls\s+exec\s+hits\s+shared\s+saved \$",
                                  r"\s+crm\.lookup\s+3\s+1\s+2\s+0\s+0\.50\s+"])
    assert "warning" not in out

    # A second session in record mode serves the receipts; -q prints the one-line form.
    project.clear_notes()
    quiet = project.run("-q")
    quiet.assert_outcomes(passed=3)
    assert project.executions() == [["lookup", "ada"]]
    assert [n[1] for n in project.notes()] == ["cache_hit"] * 3
    [line] = _report_lines(quiet)
    assert line.startswith("singleflight: 3 calls, 0 executed, 3 avoided, saved $0.75 and ")
    assert line.endswith(f" [record, {project.db}]")
    assert "singleflight summary" not in quiet.stdout.str()


# -- 2. xdist ---------------------------------------------------------------------------


@pytest.mark.slow
def test_xdist_workers_share_executions_and_controller_reports_once(
        project: Project, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    step_summary = tmp_path / "step_summary.md"
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(step_summary))
    _write(project, "test_xdist", """
        import os
        import pytest
        import sftools

        @pytest.mark.parametrize("i", range(6))
        def test_shared(singleflight, i):
            lookup = singleflight.wrap(sftools.lookup, bounded_read=True, tool_name="crm.lookup",
                                       estimated_cost_usd=0.1)
            key = "ab"[i % 2]
            assert lookup(key)["upper"] == key.upper()
            sftools.note(os.environ["PYTEST_XDIST_WORKER"], str(singleflight.outcomes[0].source))
    """)
    result = project.run_subprocess("-n", "2", "--singleflight-report=out.json",
                                    "--singleflight-report=out.md")
    result.assert_outcomes(passed=6)
    assert sorted(e[1] for e in project.executions()) == ["a", "b"]
    notes = project.notes()
    assert {worker for worker, _ in notes} == {"gw0", "gw1"}  # both workers took part
    assert sorted(source for _, source in notes).count("executed") == 2
    out = result.stdout.str()
    assert out.count("singleflight summary") == 1
    assert "6 calls, 2 executed" in out
    result.stdout.re_match_lines([r"\s+crm\.lookup\s+6\s+2\s+"])
    report = json.loads((project.path / "out.json").read_text())
    assert report["mode"] == "record"
    assert (report["calls"], report["unique_executions"], report["avoided_calls"]) == (6, 2, 4)
    assert report["dollars_saved"] == pytest.approx(0.4)
    assert len(report["runs"]) == 1  # the controller's run id reached both workers
    markdown = (project.path / "out.md").read_text()
    assert "| `crm.lookup` | 6 | 2 |" in markdown
    assert step_summary.read_text() == markdown  # written once, by the controller


# -- 3. replay --------------------------------------------------------------------------


def test_replay_serves_recorded_calls_without_executing(project: Project) -> None:
    _write(project, "test_three", THREE_CASES)
    project.run().assert_outcomes(passed=3)
    assert len(project.executions()) == 1
    project.clear_notes()

    result = project.run("--singleflight-mode=replay")
    result.assert_outcomes(passed=3)
    assert len(project.executions()) == 1
    assert [n[1] for n in project.notes()] == ["cache_hit"] * 3
    out = result.stdout.str()
    assert "singleflight summary - mode replay" in out
    assert "3 calls, 0 executed, 3 served from receipts" in out
    assert "warning" not in out


def test_replay_miss_fails_the_test_naming_tool_arguments_and_record_command(
        project: Project) -> None:
    source = """
        import sftools

        def test_known(singleflight):
            assert singleflight.wrap(sftools.lookup, bounded_read=True, tool_name="crm.lookup")("ada")

        def test_new_argument(singleflight):
            assert singleflight.wrap(sftools.lookup, bounded_read=True, tool_name="crm.lookup")({ARG})
            sftools.note("not reached in replay")
    """
    _write(project, "test_replay_miss", source.replace("{ARG}", '"ada"'))
    project.run().assert_outcomes(passed=2)
    assert project.executions() == [["lookup", "ada"]]
    project.clear_notes()

    new_arg = {"name": "grace", "tags": ["b", "a"]}
    _write(project, "test_replay_miss", source.replace("{ARG}", repr(new_arg)))
    result = project.run("--singleflight-mode=replay")
    result.assert_outcomes(passed=1, failed=1)
    assert project.executions() == [["lookup", "ada"]]  # replay never runs a shared tool
    assert project.notes() == []
    out = result.stdout.str()
    inputs = canonical_json({"x": new_arg})
    command = (f"pytest --singleflight-mode=record --singleflight-db={project.db} "
               f"test_replay_miss.py::test_new_argument")
    assert (f"ReplayMissError: crm.lookup: no receipt to replay for arguments {inputs}; "
            f"record it with: {command}") in out
    result.stdout.fnmatch_lines(["FAILED test_replay_miss.py::test_new_argument*"])
    assert "warning: 1 call(s) had no receipt to replay" in out

    # The command it names records the call; replay passes afterwards.
    project.run("--singleflight-mode=record", "test_replay_miss.py::test_new_argument"
                ).assert_outcomes(passed=1)
    assert len(project.executions()) == 2
    project.run("--singleflight-mode=replay").assert_outcomes(passed=2)
    assert len(project.executions()) == 2


def test_replay_ignores_receipt_expiry(project: Project) -> None:
    _write(project, "test_expiring", """
        import pytest
        import sftools

        @pytest.mark.singleflight(ttl=0.001, bounded_read=True)
        def test_short_lived(singleflight):
            out = singleflight.execute_sync(sftools.lookup, "ada")
            sftools.note(str(out.source))
    """)
    project.run().assert_outcomes(passed=1)
    [receipt] = project.receipts()
    assert receipt.expires_at - receipt.created_at == pytest.approx(0.001, abs=1e-6)
    while time.time() <= receipt.expires_at:  # at most a millisecond
        time.sleep(0.001)

    project.clear_notes()
    project.run("--singleflight-mode=replay").assert_outcomes(passed=1)
    assert project.notes() == [["cache_hit"]]
    assert len(project.executions()) == 1

    # Control: the receipt really is expired, and record mode runs the call again.
    project.run().assert_outcomes(passed=1)
    assert project.notes()[-1] == ["executed"]
    assert len(project.executions()) == 2


# -- 4. refresh -------------------------------------------------------------------------


def test_refresh_runs_each_distinct_call_once_and_overwrites_receipts(project: Project) -> None:
    _write(project, "test_refresh", """
        import pytest
        import sftools

        @pytest.mark.parametrize("key", ["a", "a", "b"])
        @pytest.mark.singleflight(bounded_read=True)
        def test_lookup(singleflight, key):
            out = singleflight.execute_sync(sftools.lookup, key)
            sftools.note(key, str(out.source))
    """)
    project.run().assert_outcomes(passed=3)
    assert sorted(e[1] for e in project.executions()) == ["a", "b"]
    before = {r.inputs: r for r in project.receipts()}
    project.clear_notes()

    result = project.run("--singleflight-mode=refresh")
    result.assert_outcomes(passed=3)
    assert sorted(e[1] for e in project.executions()) == ["a", "a", "b", "b"]
    assert project.notes() == [["a", "executed"], ["a", "cache_hit"], ["b", "executed"]]
    assert "singleflight summary - mode refresh" in result.stdout.str()
    after = {r.inputs: r for r in project.receipts()}
    assert after.keys() == before.keys() and len(after) == 2
    for inputs, receipt in after.items():
        assert receipt.created_at > before[inputs].created_at
        assert receipt.token > before[inputs].token

    # The refreshed receipts serve the next record session.
    project.clear_notes()
    project.run().assert_outcomes(passed=3)
    assert len(project.executions()) == 4
    assert [n[1] for n in project.notes()] == ["cache_hit"] * 3


# -- 5. off -----------------------------------------------------------------------------


def test_off_executes_every_call_and_reports_avoidable_duplicates(project: Project) -> None:
    _write(project, "test_off", """
        import pytest
        import sftools

        @pytest.mark.parametrize("key", ["a", "a", "a", "b"])
        def test_lookup(singleflight, key):
            lookup = singleflight.wrap(sftools.lookup, bounded_read=True, tool_name="crm.lookup",
                                       estimated_cost_usd=0.5)
            lookup(key)
            sftools.note(str(singleflight.outcomes[0].source))
    """)
    result = project.run("--singleflight-mode=off")
    result.assert_outcomes(passed=4)
    assert sorted(e[1] for e in project.executions()) == ["a", "a", "a", "b"]
    assert [n[0] for n in project.notes()] == ["executed_unshared"] * 4
    out = result.stdout.str()
    assert "singleflight summary - mode off" in out
    assert "mode off: 2 duplicate call(s) ran that sharing would have avoided ($1.00)" in out

    quiet = project.run("--singleflight-mode=off", "-q")
    [line] = _report_lines(quiet)
    assert line.startswith("singleflight: mode off: 2 duplicate call(s) ran that sharing would "
                           "have avoided ($1.00) [off, ")
    assert len(project.executions()) == 8


# -- 6. side-effecting tools --------------------------------------------------------------


@pytest.mark.parametrize("mode", ["record", "replay", "refresh", "off"])
def test_side_effecting_tools_execute_in_every_mode(project: Project, mode: str) -> None:
    _write(project, "test_side_effects", """
        import pytest
        import sftools

        @pytest.mark.parametrize("i", range(2))
        def test_send(singleflight, i):
            send = singleflight.wrap(sftools.send_email, side_effecting=True)
            assert send("ada@example.com") == send("ada@example.com") == "sent to ada@example.com"
            assert [str(o.source) for o in singleflight.outcomes] == ["executed_unshared"] * 2
    """)
    if mode == "replay":  # replay needs a recorded store to start
        Singleflight(project.db).summary()
    project.run(f"--singleflight-mode={mode}").assert_outcomes(passed=2)
    assert project.executions() == [["send_email", "ada@example.com"]] * 4
    project.run(f"--singleflight-mode={mode}").assert_outcomes(passed=2)
    assert len(project.executions()) == 8


# -- 7. the marker ----------------------------------------------------------------------


def test_marker_on_module_class_and_function_closest_wins(project: Project) -> None:
    _write(project, "test_markers", """
        import pytest
        import sftools

        pytestmark = pytest.mark.singleflight(ttl=111, cost=0.5, scope="suite", bounded_read=True)

        def _note(name, out):
            r = out.receipt
            sftools.note(name, round(r.expires_at - r.created_at, 6), r.cost_usd, r.scope)

        def test_module_level(singleflight):
            assert singleflight.options(sftools.lookup).ttl_seconds == 111
            _note("module", singleflight.execute_sync(sftools.lookup, "m"))

        @pytest.mark.singleflight(ttl=222)
        class TestClass:
            def test_class_level(self, singleflight):
                _note("class", singleflight.execute_sync(sftools.lookup, "c"))

            @pytest.mark.singleflight(ttl=333, scope="fn")
            def test_function_level(self, singleflight):
                _note("function", singleflight.execute_sync(sftools.lookup, "f"))

            @pytest.mark.singleflight(ttl=333)
            def test_wrap_overrides_marker(self, singleflight):
                lookup = singleflight.wrap(sftools.lookup, bounded_read=True, ttl=444, cost=1.5)
                lookup("w")
                _note("wrap", singleflight.outcomes[0])
    """)
    _write(project, "test_unmarked", """
        import sftools

        def test_unmarked(singleflight):
            options = singleflight.options(sftools.lookup, bounded_read=True)
            r = singleflight.execute_sync(sftools.lookup, "u", options=options).receipt
            sftools.note("unmarked", round(r.expires_at - r.created_at, 6), r.cost_usd, r.scope)
    """)
    result = project.run("--strict-markers", "--singleflight-ttl=55")
    result.assert_outcomes(passed=5)
    assert sorted(project.notes()) == sorted([
        ["module", 111, 0.5, "suite"],
        ["class", 222, 0.5, "suite"],
        ["function", 333, 0.5, "fn"],
        ["wrap", 444, 1.5, "suite"],
        ["unmarked", 55, 0.0, "default"],
    ])


def test_marker_unknown_keyword_is_a_usage_error_at_collection(project: Project) -> None:
    _write(project, "test_typo", """
        import pytest

        @pytest.mark.singleflight(tll=5)
        def test_typo(singleflight):
            raise AssertionError("must not run")
    """)
    result = project.run()
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["ERROR: test_typo.py::test_typo: @pytest.mark.singleflight got "
                                 "unknown keyword 'tll'; known: mode, patch, *ttl*"])
    assert not project.db.exists()


@pytest.mark.parametrize(("marker", "expected"), [
    ("singleflight(3600)", "*takes keywords only, got (3600,)"),
    ('singleflight(patch="pkg.mod.func")', "*patch=...) takes a list of import paths*"),
    ("singleflight(tool_name='x')", "*unknown keyword 'tool_name'*"),
])
def test_marker_misuse_is_a_usage_error(project: Project, marker: str, expected: str) -> None:
    _write(project, "test_misuse", f"""
        import pytest

        @pytest.mark.{marker}
        def test_misuse():
            pass
    """)
    result = project.run()
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([f"ERROR: test_misuse.py::test_misuse: {expected}"])


def test_marker_is_registered(project: Project) -> None:
    _write(project, "test_strict", """
        import pytest

        @pytest.mark.singleflight(ttl=5)
        def test_marked():
            pass
    """)
    project.run("--strict-markers").assert_outcomes(passed=1)
    markers = project.run("--markers")
    assert "@pytest.mark.singleflight(ttl=..., mode=..., patch=[...], http=[...], **options)" in \
        markers.stdout.str()


# -- 8. patch= --------------------------------------------------------------------------


def _weather_package(project: Project) -> None:
    pkg = project.path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "weather.py").write_text(textwrap.dedent("""
        import sftools

        def forecast(city):
            sftools._append("executions.log", ["forecast", city])
            return {"city": city, "sky": "clear"}
    """))
    (pkg / "agent.py").write_text(textwrap.dedent("""
        from pkg import weather

        def plan(city):
            return "take sunglasses" if weather.forecast(city)["sky"] == "clear" else "stay in"
    """))


def test_patch_marker_deduplicates_for_that_test_only(project: Project) -> None:
    _weather_package(project)
    _write(project, "test_patch", """
        import pytest
        import sftools
        from pkg import agent, weather

        ORIGINAL = weather.forecast

        @pytest.mark.singleflight(patch=["pkg.weather.forecast"], bounded_read=True)
        def test_patched(singleflight):
            assert weather.forecast is not ORIGINAL
            assert agent.plan("oslo") == agent.plan("oslo") == "take sunglasses"
            sftools.note("patched", [(o.tool_name, str(o.source)) for o in singleflight.outcomes])

        def test_later_unpatched():
            assert weather.forecast is ORIGINAL
            assert agent.plan("oslo") == agent.plan("oslo") == "take sunglasses"
    """)
    result = project.run()
    result.assert_outcomes(passed=2)
    # 2 calls -> 1 execution in the patched test, then 2 real ones in the later test.
    assert project.executions() == [["forecast", "oslo"]] * 3
    assert project.notes() == [["patched", [["pkg.weather.forecast", "executed"],
                                            ["pkg.weather.forecast", "cache_hit"]]]]
    result.stdout.re_match_lines([r"\s+pkg\.weather\.forecast\s+2\s+1\s+1\s+"])


@pytest.mark.parametrize("target", ["pkg.weather.nope", "nopkg.weather.forecast", "forecast"])
def test_patch_bad_target_is_a_clear_error(project: Project, target: str) -> None:
    _weather_package(project)
    _write(project, "test_bad_patch", f"""
        import pytest

        @pytest.mark.singleflight(patch=[{target!r}])
        def test_bad(singleflight):
            raise AssertionError("must not run")
    """)
    result = project.run()
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines([f"*test_bad_patch.py::test_bad: singleflight patch target "
                                 f"{target!r} is not an importable module attribute*"])
    assert "must not run" not in result.stdout.str()


def test_patch_target_named_at_two_marker_levels_is_wrapped_once(project: Project) -> None:
    _weather_package(project)
    _write(project, "test_patch_twice", """
        import pytest
        from pkg import agent

        pytestmark = pytest.mark.singleflight(patch=["pkg.weather.forecast"],
                                              wait_timeout_seconds=0.5, bounded_read=True)

        @pytest.mark.singleflight(patch=["pkg.weather.forecast"], ttl=60)
        def test_patched(singleflight):
            agent.plan("oslo"), agent.plan("oslo")
            sources = [str(o.source) for o in singleflight.outcomes]
            assert sources == ["executed", "cache_hit"]
    """)
    result = project.run("--timeout=30", "-W", "error::RuntimeWarning")
    result.assert_outcomes(passed=1)
    assert project.executions() == [["forecast", "oslo"]]


# -- 9. the fixture API -----------------------------------------------------------------


FIXTURE_API = """
    import inspect
    import pytest
    import sftools

    pytestmark = pytest.mark.singleflight(bounded_read=True)

    def test_sync_api(singleflight):
        lookup = singleflight.wrap(sftools.lookup, bounded_read=True, tool_name="crm.lookup", cost=0.5)
        assert not inspect.iscoroutinefunction(lookup)
        assert lookup.__name__ == "lookup"
        assert lookup("ada") == lookup("ada") == {"x": "ada", "upper": "ADA"}

        @singleflight.tool(bounded_read=True, tool_name="crm.shout", cost=0.25)
        def shout(x):
            return sftools.lookup(x)["upper"] + "!"
        assert shout("bob") == shout("bob") == "BOB!"

        out = singleflight.execute_sync(sftools.lookup, "cy")
        again = singleflight.execute_sync(sftools.lookup, "cy")
        assert (out.source, again.source) == ("executed", "cache_hit")
        assert out.tool_name == "sftools.lookup" and again.value == out.value
        assert [str(o.source) for o in singleflight.outcomes] == ["executed", "cache_hit"] * 3
        stats = singleflight.stats
        assert (stats["calls"], stats["executed"], stats["cache_hit"]) == (6, 3, 3)
        assert stats["dollars_saved"] == pytest.approx(0.75)
        sftools.note("sync", "ok")

    ASYNC_MARK
    async def test_async_api(singleflight):
        alookup = singleflight.wrap(sftools.alookup, bounded_read=True, tool_name="crm.alookup", cost=1.0)
        assert inspect.iscoroutinefunction(alookup)
        assert await alookup("ada") == await alookup("ada") == {"x": "ada", "upper": "ADA"}

        @singleflight.tool(bounded_read=True, tool_name="crm.ashout")
        async def ashout(x):
            return (await sftools.alookup(x))["upper"] + "!"
        assert inspect.iscoroutinefunction(ashout)
        assert await ashout("bob") == await ashout("bob") == "BOB!"

        sync_in_async = singleflight.wrap(sftools.lookup, bounded_read=True, tool_name="crm.lookup")
        assert not inspect.iscoroutinefunction(sync_in_async)
        assert sync_in_async("dee")["upper"] == "DEE"  # a sync tool called on the loop

        out = await singleflight.execute(sftools.alookup, "cy")
        again = await singleflight.execute(sftools.alookup, "cy")
        sync_hit = singleflight.execute_sync(sftools.alookup, "cy")
        assert (out.source, again.source, sync_hit.source) == ("executed", "cache_hit", "cache_hit")
        assert [str(o.source) for o in singleflight.outcomes] == [
            "executed", "cache_hit", "executed", "cache_hit", "executed",
            "executed", "cache_hit", "cache_hit"]
        stats = singleflight.stats
        assert (stats["calls"], stats["executed"], stats["cache_hit"]) == (8, 4, 4)
        assert stats["dollars_saved"] == pytest.approx(1.0)
        sftools.note("async", "ok")
"""


@pytest.mark.parametrize("asyncio_mode", ["strict", "auto"])
def test_fixture_api_in_sync_and_async_tests(project: Project, asyncio_mode: str) -> None:
    mark = "@pytest.mark.asyncio" if asyncio_mode == "strict" else ""
    _write(project, "test_api", FIXTURE_API.replace("ASYNC_MARK", mark))
    result = project.run("-o", f"asyncio_mode={asyncio_mode}", "-W", "error")
    result.assert_outcomes(passed=2)
    assert sorted(project.notes()) == [["async", "ok"], ["sync", "ok"]]
    assert sorted(project.executions()) == sorted(
        [["lookup", "ada"], ["lookup", "bob"], ["lookup", "cy"],
         ["alookup", "ada"], ["alookup", "bob"], ["alookup", "cy"], ["lookup", "dee"]])


# -- 10. hooks --------------------------------------------------------------------------


def test_hooks_adjust_tool_options_and_see_every_outcome(project: Project) -> None:
    _weather_package(project)
    project.pytester.makeconftest("""
        import sftools

        def pytest_singleflight_tool_options(item, func, options):
            # one scope per test: the tests below then share nothing with each other
            return options.replace(scope="per-test:" + item.name, ttl_seconds=42)

        def pytest_singleflight_outcome(item, outcome):
            sftools._append("hook.log", [item.name, outcome.tool_name, str(outcome.source),
                                         outcome.receipt.scope if outcome.receipt else None])
    """)
    _write(project, "test_hooks", """
        import pytest
        import sftools
        from pkg import agent

        @pytest.mark.parametrize("i", range(2))
        def test_lookup(singleflight, i):
            lookup = singleflight.wrap(sftools.lookup, bounded_read=True, tool_name="crm.lookup")
            lookup("ada"), lookup("ada")
            r = singleflight.outcomes[0].receipt
            sftools.note(round(r.expires_at - r.created_at, 6))

        @pytest.mark.singleflight(patch=["pkg.weather.forecast"], bounded_read=True)
        def test_patched():
            agent.plan("oslo")
    """)
    result = project.run("-p", "no:xdist")
    result.assert_outcomes(passed=3)
    # Without the hook both tests would share one execution of lookup("ada").
    assert project.executions() == [["lookup", "ada"], ["lookup", "ada"], ["forecast", "oslo"]]
    assert project.notes() == [[42], [42]]
    hook_log = [json.loads(line) for line in (project.path / "hook.log").read_text().splitlines()]
    assert hook_log == [
        ["test_lookup[0]", "crm.lookup", "executed", "per-test:test_lookup[0]"],
        ["test_lookup[0]", "crm.lookup", "cache_hit", "per-test:test_lookup[0]"],
        ["test_lookup[1]", "crm.lookup", "executed", "per-test:test_lookup[1]"],
        ["test_lookup[1]", "crm.lookup", "cache_hit", "per-test:test_lookup[1]"],
        ["test_patched", "pkg.weather.forecast", "executed", "per-test:test_patched"],
    ]


# -- 11. report files -------------------------------------------------------------------


@pytest.mark.slow
def test_report_files_and_github_step_summary(project: Project, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    step_summary = tmp_path / "step_summary.md"
    step_summary.write_text("earlier step\n")
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(step_summary))
    _write(project, "test_three", THREE_CASES)
    result = project.run_subprocess("--singleflight-report=out.json",
                                    "--singleflight-report=reports/out.md")
    result.assert_outcomes(passed=3)
    report = json.loads((project.path / "out.json").read_text())
    assert report["mode"] == "record"
    assert (report["calls"], report["unique_executions"], report["cache_hits"]) == (3, 1, 2)
    assert report["dollars_saved"] == pytest.approx(0.5)
    assert report["tools"]["crm.lookup"]["calls"] == 3
    assert report["db_path"] == str(project.db)
    markdown = (project.path / "reports" / "out.md").read_text()
    assert markdown.startswith("### singleflight summary (record)\n")
    assert "| `crm.lookup` | 3 | 1 | 2 | 0 | 0.50 |" in markdown
    assert "saved **$0.50**" in markdown
    assert step_summary.read_text() == "earlier step\n" + markdown


# -- 12. disabled and unused --------------------------------------------------------------


def test_p_no_singleflight_disables_the_plugin(project: Project) -> None:
    _write(project, "test_disabled", """
        def test_uses_fixture(singleflight):
            pass

        def test_plain():
            pass
    """)
    result = project.run("-p", "no:singleflight", db=False)
    result.assert_outcomes(passed=1, errors=1)
    result.stdout.fnmatch_lines(["*fixture 'singleflight' not found*"])
    assert "singleflight summary" not in result.stdout.str()
    unknown_option = project.run("-p", "no:singleflight", f"--singleflight-db={project.db}",
                                 db=False)
    assert unknown_option.ret == pytest.ExitCode.USAGE_ERROR
    unknown_option.stderr.fnmatch_lines(["*unrecognized arguments: --singleflight-db=*"])
    assert not project.db.exists()


def test_unused_plugin_opens_no_store_and_prints_no_report(project: Project) -> None:
    _write(project, "test_unused", """
        import pytest

        def test_plain():
            pass

        @pytest.mark.singleflight(ttl=5)
        def test_marked_but_no_tools():
            pass
    """)
    for result in (project.run(), project.run(db=False)):  # given store, default store
        result.assert_outcomes(passed=2)
        assert not project.db.exists()
        assert not (project.path / ".singleflight").exists()
        assert _report_lines(result) == []
        assert "singleflight summary" not in result.stdout.str()


def test_importing_the_package_does_not_import_pytest() -> None:
    code = ("import singleflight_agents, sys; from singleflight_agents import Singleflight; "
            "assert 'pytest' not in sys.modules, 'pytest imported'; "
            "assert '_pytest' not in sys.modules, '_pytest imported'")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr


# -- 13. pytest-rerunfailures -------------------------------------------------------------


FLAKY = """
    from pathlib import Path
    import sftools

    def test_flaky(singleflight):
        lookup = singleflight.wrap(sftools.lookup, bounded_read=True, tool_name="crm.lookup", cost=0.5)
        assert lookup("ada")["upper"] == "ADA"
        sftools.note([str(o.source) for o in singleflight.outcomes])
        first_try = Path(__file__).with_name("first_try_done")
        if not first_try.exists():
            first_try.write_text("")
            raise AssertionError("flaky on the first try")
"""


def test_rerun_reuses_the_receipt_of_the_first_try(project: Project) -> None:
    _write(project, "test_flaky", FLAKY)
    result = project.run("--reruns", "1")
    assert _outcomes(result) == {"passed": 1, "rerun": 1}
    assert project.executions() == [["lookup", "ada"]]
    assert project.notes()[0] == [["executed"]]
    assert project.notes()[1][0][-1] == "cache_hit"  # the rerun's call
    assert "2 calls, 1 executed, 1 served from receipts" in result.stdout.str()


def test_rerun_starts_with_fresh_outcomes(project: Project) -> None:
    _write(project, "test_flaky", FLAKY)
    assert _outcomes(project.run("--reruns", "1")) == {"passed": 1, "rerun": 1}
    assert project.notes() == [[["executed"]], [["cache_hit"]]]


# -- configuration ----------------------------------------------------------------------


def test_ini_options(project: Project) -> None:
    project.pytester.makeini("""
        [pytest]
        asyncio_default_fixture_loop_scope = function
        singleflight_db = ini-store/receipts.db
        singleflight_mode = off
        singleflight_ttl = 77
        singleflight_report = ini-report.json
    """)
    _write(project, "test_ini", """
        import sftools

        def test_options(singleflight):
            options = singleflight.options(sftools.lookup, bounded_read=True)
            sftools.note(singleflight.engine.current_mode(), options.ttl_seconds)
            singleflight.execute_sync(sftools.lookup, "a", options=options)
            singleflight.execute_sync(sftools.lookup, "a", options=options)
    """)
    result = project.run(db=False)
    result.assert_outcomes(passed=1)
    assert project.notes() == [["off", 77]]
    assert len(project.executions()) == 2
    assert (project.path / "ini-store" / "receipts.db").exists()
    report = json.loads((project.path / "ini-report.json").read_text())
    assert (report["mode"], report["calls"], report["duplicates"]) == ("off", 2, 1)
    # the command line wins over the ini file
    result = project.run("--singleflight-mode=record", "--singleflight-ttl=5",
                         f"--singleflight-db={project.db}", db=False)
    result.assert_outcomes(passed=1)
    assert project.notes()[-1] == ["record", 5]
    assert len(project.executions()) == 3
    assert project.db.exists()


def test_ini_paths_are_taken_from_the_rootdir(project: Project, monkeypatch: pytest.MonkeyPatch) -> None:
    project.pytester.makeini("""
        [pytest]
        asyncio_default_fixture_loop_scope = function
        singleflight_db = ini-store/receipts.db
        singleflight_prices = prices.json
    """)
    (project.path / "prices.json").write_text('{"m": {"input": 1.0, "output": 2.0}}')
    _write(project, "test_ini_paths", """
        import sftools

        def test_prices(singleflight):
            singleflight.execute_sync(sftools.lookup, "a")
            sftools.note(singleflight.engine.prices.dollars("m", 1_000_000, 0))
    """)
    elsewhere = project.path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    result = project.pytester.runpytest(str(project.path), "-p", "no:cacheprovider",
                                        "-p", "no:hypothesispytest")
    result.assert_outcomes(passed=1)
    assert project.notes() == [[1.0]]
    assert (project.path / "ini-store" / "receipts.db").exists()
    assert not (elsewhere / "ini-store").exists()


@pytest.mark.parametrize(("option", "message"), [
    ("singleflight_mode = sometimes", "singleflight_mode must be one of record, replay*"),
    ("singleflight_ttl = soon", "singleflight_ttl = 'soon': give a positive number of seconds*"),
])
def test_bad_ini_values_are_usage_errors(project: Project, option: str, message: str) -> None:
    project.pytester.makeini(f"[pytest]\n{option}\n")
    _write(project, "test_nothing", "def test_nothing():\n    pass\n")
    result = project.run()
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([f"ERROR: {message}"])


def test_a_replay_session_wins_over_a_markers_mode(project: Project) -> None:
    _write(project, "test_pinned", """
        import pytest
        import sftools

        @pytest.mark.singleflight(mode="record")
        def test_pinned(singleflight):
            singleflight.wrap(sftools.lookup, bounded_read=True, tool_name="t.lookup")("new")
        """)
    Singleflight(project.db).summary()  # a store, with nothing recorded in it
    result = project.run("--singleflight-mode=replay")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*no receipt to replay*"])
    assert project.executions() == []  # replay never ran the paid tool


def test_an_unused_plugin_never_touches_an_unreachable_store(project: Project) -> None:
    _write(project, "test_plain", "def test_plain():\n    assert True\n")
    result = project.run("--singleflight-db=redis://:hunter2@127.0.0.1:1/13", db=False)
    result.assert_outcomes(passed=1)
    assert result.ret == 0
    assert "singleflight:" not in result.stdout.str() and "hunter2" not in result.stdout.str()


def test_urls_in_messages_carry_no_password() -> None:
    from singleflight_agents.store import redact_url

    assert redact_url("redis://:hunter2@cache:6379/0?prefix=ci") == "redis://cache:6379/0?prefix=ci"
    assert redact_url("rediss://user:pw@cache/1?password=pw&prefix=x") == "rediss://cache/1?prefix=x"
    assert redact_url("/tmp/receipts.db") == "/tmp/receipts.db"


@pytest.mark.slow
def test_a_crashed_xdist_worker_does_not_break_the_report(project: Project) -> None:
    _write(project, "test_crash", """
        import os
        import pytest
        import sftools

        @pytest.mark.parametrize("n", range(4))
        def test_calls(singleflight, n):
            singleflight.wrap(sftools.lookup, bounded_read=True, tool_name="t.lookup")("shared")

        def test_crash(singleflight):
            singleflight.wrap(sftools.lookup, bounded_read=True, tool_name="t.lookup")("shared")
            os._exit(3)  # the worker dies mid-session
        """)
    result = project.run_subprocess("-n", "2")
    result.assert_outcomes(passed=4, failed=1)
    result.stdout.fnmatch_lines(["*singleflight summary*", "*t.lookup*"])
    assert [e for e in project.executions() if e == ["lookup", "shared"]] == [["lookup", "shared"]]
