#!/usr/bin/env python
"""HTTP receipts against pytest-recording (vcrpy): one eval suite recorded and replayed by each.

    python bench/http_vcr.py            # full run: a warm-up, then 3 repetitions (5-6 minutes)
    python bench/http_vcr.py --quick    # smoke run: 1 repetition, no warm-up (about 2 minutes)
    python bench/http_vcr.py --docs     # also write its section of docs/performance.md
    python bench/http_vcr.py --json F   # also save the figures; --from-json F [--docs] reprints

Needs the ``bench`` extra (vcrpy, pytest-recording) besides ``dev``. The section it writes is a
``## `` section that bench/report.py does not generate, so ``python bench/run.py`` keeps it.

(Named http_vcr.py, not http.py: a module named ``http`` in bench/ would shadow the standard
library's ``http`` package for every script here, bench/ being first on their sys.path, and
httpx, demo_provider and run.py's model benchmark all import ``http.client`` or ``http.server``.)

One stand-in provider (``demo_provider.Server(Provider(delay=0.05))``, 50 ms per answer) runs
in this process on 127.0.0.1 for the whole run; the pytest sessions, run by ``python -m pytest
-q -p no:cacheprovider -p no:hypothesispytest -p no:langsmith_plugin`` in subprocesses (the last
two: slow autoloaded plugins of this environment that have nothing to do with HTTP), and their
xdist workers, reach it over HTTP, its URL in $SF_BENCH_PROVIDER_URL. The requests reaching it
are counted around each session.

The suite, generated into a temporary directory, has 24 parametrized eval cases over 8 distinct
requests, each made by 3 cases: 6 OpenAI SDK chat completions, 1 OpenAI chat completion with
``stream=True`` (the test asserts the concatenated deltas and the usage chunk) and 1 Anthropic
``messages.stream()`` (``get_final_text()`` and the usage). Every test is marked
``@pytest.mark.vcr``. The streamed tests also note the cuts in which the response body
reached the SDK (an httpx2 response hook) against the chunks the server sent. Each variant is a
record session on a fresh store or cassette directory, then a replay session on it with the API
keys removed from the environment:

    singleflight       -p no:recording --singleflight-http=127.0.0.1 --singleflight-db=DIR/receipts.db
                       replay: the same and --singleflight-mode=replay
    pytest-recording   -p no:singleflight --record-mode=once; replay: --record-mode=none
                       (vcr_config: filter_headers authorization and x-api-key, as pytest-recording
                       advises, and match_on the default plus the body; a cassette per test)
    shared cassette    pytest-recording with @pytest.mark.default_cassette("shared.yaml") on every
                       test, --record-mode=new_episodes (once refuses the second test's new request)

each serial and with ``-n 4``. Wall times are the subprocess's wall clock, best and median of the
repetitions, the variants' order rotating between repetitions; CPU times (user + system of
pytest and its workers, from getrusage) are steadier on a shared machine. Sizes are bytes of the
files: the SQLite file, its key file and any -wal/-shm left, against the cassette directory.

Checks (the exit status is 1 if one fails): every record session and every replay session
passes every test (except the shared cassette with -n 4, reported only); a replay makes no
request; singleflight makes each distinct request once (8), a cassette per test one per test
(24), the shared cassette once per distinct request serially; no API key in any store or
cassette; the docs section, once written, is one that bench/report.py keeps.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import report

from singleflight_agents.demo_provider import Provider, Server

DOCS = Path(__file__).resolve().parents[1] / "docs" / "performance.md"
TITLE = "HTTP receipts against pytest-recording (vcrpy)"
DELAY = 0.05
CASES, DISTINCT = 24, 8
STREAMED = 2 * CASES // DISTINCT  # 3 cases of each streamed request
# In every session: no cache provider, and two autoloaded plugins of this environment that have
# nothing to do with HTTP and take 1.5 s to import (unknown names are ignored by pytest).
QUIET_PLUGINS = ("-p", "no:cacheprovider", "-p", "no:hypothesispytest", "-p", "no:langsmith_plugin")
OPENAI_KEY, ANTHROPIC_KEY = "sk-bench-OPENAI-SECRET-1f2e3d", "sk-ant-bench-SECRET-4c5b6a"

PYTEST_INI = """\
[pytest]
asyncio_default_fixture_loop_scope = function
markers =
    vcr: recorded and replayed by pytest-recording (inert under -p no:recording)
    default_cassette: the cassette's name (pytest-recording)
"""

CONFTEST = '''\
"""The SDK clients of the stand-in provider, and the cuts in which each body reached them."""

import os

import anthropic
import httpx2
import openai
import pytest

URL = os.environ["SF_BENCH_PROVIDER_URL"]


@pytest.fixture
def seen():
    """The response body's chunks as the SDK read them, and the request they answer."""
    seen = {"cuts": [], "request": None}

    def watch(response):
        inner = response.stream
        seen["request"] = response.request

        class Watched(httpx2.SyncByteStream):
            def __iter__(self):
                for chunk in inner:
                    seen["cuts"].append(bytes(chunk))
                    yield chunk

            def close(self):
                inner.close()

        response.stream = Watched()

    seen["hooks"] = {"response": [watch]}
    return seen


@pytest.fixture
def oai(seen):
    return openai.OpenAI(api_key=os.environ.get("OPENAI_API_KEY", "no-key-in-replay"),
                         base_url=URL + "/v1", max_retries=0,
                         http_client=openai.DefaultHttpxClient(event_hooks=seen["hooks"]))


@pytest.fixture
def claude(seen):
    return anthropic.Anthropic(api_key=os.environ.get("ANTHROPIC_API_KEY", "no-key-in-replay"),
                               base_url=URL, max_retries=0,
                               http_client=anthropic.DefaultHttpxClient(event_hooks=seen["hooks"]))


# pytest-recording's: keys out of the cassettes, and the body matched (a changed prompt is a
# miss, as it is for receipts; the default matches method and URL only).
@pytest.fixture(scope="module")
def vcr_config():
    return {"filter_headers": ["authorization", "x-api-key"],
            "match_on": ["method", "scheme", "host", "port", "path", "query", "body"]}


@pytest.fixture(scope="module")
def vcr_cassette_dir():
    return os.environ["SF_BENCH_CASSETTES"]
'''

TESTS = '''\
"""{cases} eval cases over {distinct} distinct requests: OpenAI chat completions, one streamed,
and an Anthropic messages stream."""

import hashlib
import json
import os

import pytest

from singleflight_agents.demo_provider import ROUTES

PROMPTS = [f"eval question {{n}}: what is {{n}} + {{n}}?" for n in range({distinct})]
KINDS = ("chat",) * ({distinct} - 2) + ("chat-stream", "claude-stream")
pytestmark = [pytest.mark.vcr]
if os.environ.get("SF_BENCH_SHARED_CASSETTE"):
    pytestmark.append(pytest.mark.default_cassette("shared.yaml"))


def note(request, seen, kind):
    """What the streamed test saw: the cuts of the body, against the chunks the server sent."""
    sent = ROUTES[seen["request"].url.path](json.loads(seen["request"].content))[2]
    name = hashlib.sha256(request.node.nodeid.encode()).hexdigest()[:16] + ".json"
    with open(os.path.join(os.environ["SF_BENCH_OUT"], name), "w") as handle:
        json.dump({{"test": request.node.nodeid, "kind": kind, "cuts": len(seen["cuts"]),
                   "sent": len(sent), "same": seen["cuts"] == sent}}, handle)


@pytest.mark.parametrize("case", [pytest.param(i, id=f"{{i:02d}}-{{KINDS[i % {distinct}]}}")
                                  for i in range({cases})])
def test_eval(case, oai, claude, seen, request):
    prompt, kind = PROMPTS[case % {distinct}], KINDS[case % {distinct}]
    messages = [{{"role": "user", "content": prompt}}]
    if kind == "chat":
        reply = oai.chat.completions.create(model="gpt-4o-mini", messages=messages)
        assert reply.choices[0].message.content == f"echo: {{prompt}}"
    elif kind == "chat-stream":
        chunks = list(oai.chat.completions.create(model="gpt-4o-mini", messages=messages,
                                                  stream=True,
                                                  stream_options={{"include_usage": True}}))
        note(request, seen, kind)
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text == "".join(word + " " for word in f"echo: {{prompt}}".split(" "))
        assert chunks[-1].usage.completion_tokens == 7
    else:
        with claude.messages.stream(model="claude-sonnet-4-5", max_tokens=64,
                                    messages=messages) as stream:
            text = stream.get_final_text()
            tokens = stream.get_final_message().usage.output_tokens
        note(request, seen, kind)
        assert text == f"echo: {{prompt}}"
        assert tokens == 9
'''


@dataclass(frozen=True)
class Variant:
    tool: str  # "singleflight" or "vcr"
    workers: int  # 0: serial
    shared: bool = False  # one cassette for the whole suite
    expected: int | None = None  # requests a record session must make; None: reported only
    checked: bool = True  # every test must pass, in record and replay

    @property
    def name(self) -> str:
        label = {"singleflight": "singleflight (HTTP receipts)",
                 "vcr": "pytest-recording, a cassette per test"}[self.tool]
        return "pytest-recording, one shared cassette" if self.shared else label

    @property
    def where(self) -> str:
        return f"{self.name}, {f'-n {self.workers}' if self.workers else 'serial'}"

    def args(self, state: Path, replay: bool) -> list[str]:
        xdist = ["-n", str(self.workers)] if self.workers else []
        if self.tool == "singleflight":
            replaying = ["--singleflight-mode=replay"] if replay else []
            return ["-p", "no:recording", "--singleflight-http=127.0.0.1",
                    f"--singleflight-db={state / 'receipts.db'}", *replaying, *xdist]
        mode = "none" if replay else "new_episodes" if self.shared else "once"
        return ["-p", "no:singleflight", f"--record-mode={mode}", *xdist]


VARIANTS = [
    Variant("singleflight", 0, expected=DISTINCT),
    Variant("singleflight", 4, expected=DISTINCT),
    Variant("vcr", 0, expected=CASES),
    Variant("vcr", 4, expected=CASES),
    Variant("vcr", 0, shared=True, expected=DISTINCT),
    Variant("vcr", 4, shared=True, checked=False),
]


@dataclass
class Session:
    """One pytest session's outcome."""

    wall: float
    cpu: float  # user + system of pytest and its xdist workers
    requests: int
    passed: int
    failed: list[str]
    notes: list[dict[str, Any]]
    tail: str


@dataclass
class Measured:
    record: list[Session] = field(default_factory=list)
    replay: list[Session] = field(default_factory=list)
    sizes: list[tuple[int, int]] = field(default_factory=list)  # (bytes, files)


@dataclass
class Bench:
    root: Path
    server: Server
    env: dict[str, str]
    results: dict[Variant, Measured] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)

    def session(self, variant: Variant, state: Path, replay: bool) -> Session:
        out = Path(tempfile.mkdtemp(prefix="out-", dir=self.root))
        env = {**self.env, "SF_BENCH_OUT": str(out), "SF_BENCH_CASSETTES": str(state / "cassettes")}
        if variant.shared:
            env["SF_BENCH_SHARED_CASSETTE"] = "1"
        if not replay:
            env |= {"OPENAI_API_KEY": OPENAI_KEY, "ANTHROPIC_API_KEY": ANTHROPIC_KEY}
        command = [sys.executable, "-m", "pytest", "-q", *QUIET_PLUGINS,
                   f"--junitxml={out / 'junit.xml'}", *variant.args(state, replay)]
        before, cpu = len(self.server.provider.seen), _children_cpu()
        start = time.perf_counter()
        try:
            done = subprocess.run(command, cwd=self.root / "suite", env=env, text=True,
                                  capture_output=True, timeout=600)
            output = done.stdout + done.stderr
        except subprocess.TimeoutExpired as exc:
            output = f"timed out after {exc.timeout} s"
        wall, cpu = time.perf_counter() - start, _children_cpu() - cpu
        passed, failed = _outcomes(out / "junit.xml")
        notes = [json.loads(p.read_text()) for p in sorted(out.glob("*.json"))]
        shutil.rmtree(out)
        tail = "\n".join(output.splitlines()[-12:])
        return Session(wall, cpu, len(self.server.provider.seen) - before, passed, failed, notes, tail)

    def pair(self, variant: Variant, label: str) -> None:
        """A record session on a fresh store or cassette directory, then a replay session."""
        state = Path(tempfile.mkdtemp(prefix="state-", dir=self.root))
        (state / "cassettes").mkdir()
        record = self.session(variant, state, replay=False)
        size = _size(state, variant)
        self.check_store(variant, state, label)
        replay = self.session(variant, state, replay=True)
        shutil.rmtree(state)
        self.check(variant, record, replay, label)
        measured = self.results.setdefault(variant, Measured())
        measured.record.append(record)
        measured.replay.append(replay)
        measured.sizes.append(size)

    def check(self, variant: Variant, record: Session, replay: Session, label: str) -> None:
        where = f"{label}, {variant.where}"
        if replay.requests:
            self.failures.append(f"{where}: the replay made {replay.requests} requests")
        if variant.expected is not None and record.requests != variant.expected:
            self.failures.append(f"{where}: the record session made {record.requests} requests, "
                                 f"expected {variant.expected}")
        if not variant.checked:
            return
        for kind, session in (("record", record), ("replay", replay)):
            if session.passed != CASES or session.failed:
                self.failures.append(f"{where}: {kind} passed {session.passed} of {CASES} "
                                     f"tests; failed: {', '.join(session.failed[:4]) or '-'}\n"
                                     f"{session.tail}")

    def check_store(self, variant: Variant, state: Path, label: str) -> None:
        for path in state.rglob("*"):
            if path.is_file():
                data = path.read_bytes()
                if OPENAI_KEY.encode() in data or ANTHROPIC_KEY.encode() in data:
                    self.failures.append(f"{label}, {variant.where}: an API key is in "
                                         f"{path.relative_to(state)}")


def _children_cpu() -> float:
    """User + system time of this process's finished children, theirs included."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _outcomes(junit: Path) -> tuple[int, list[str]]:
    """Tests passed, and the ids of the failed ones, from pytest's JUnit XML."""
    if not junit.exists():
        return 0, ["(no report: the session did not finish)"]
    passed, failed = 0, []
    for case in ET.parse(junit).getroot().iter("testcase"):
        problem = case.find("failure")
        problem = case.find("error") if problem is None else problem
        if problem is not None:
            message = (problem.get("message") or "").splitlines()[:1]
            failed.append(f"{case.get('name', '?')}: {''.join(message)[:160]}")
        elif case.find("skipped") is None:
            passed += 1
    return passed, failed


def _size(state: Path, variant: Variant) -> tuple[int, int]:
    """Bytes and files of the store (the SQLite file, its key, any -wal/-shm) or the cassettes."""
    if variant.tool == "singleflight":
        files = [p for p in state.glob("receipts.db*") if p.is_file()]
    else:
        files = [p for p in (state / "cassettes").rglob("*") if p.is_file()]
    return sum(p.stat().st_size for p in files), len(files)


def setup(root: Path) -> None:
    suite = root / "suite"
    suite.mkdir()
    (suite / "pytest.ini").write_text(PYTEST_INI)
    (suite / "conftest.py").write_text(CONFTEST)
    (suite / "test_evals.py").write_text(TESTS.format(cases=CASES, distinct=DISTINCT))


@dataclass
class Run:
    """What a run measured, all the docs section needs (and what --json writes)."""

    results: dict[Variant, Measured]
    failures: list[str]
    info: dict[str, str]
    runs: int
    took: float = 0.0
    load_start: str = ""
    load_end: str = ""
    cores: int = 0

    def to_json(self) -> str:
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)} | {"results": [
            {"variant": dataclasses.asdict(v), "measured": dataclasses.asdict(m)}
            for v, m in self.results.items()]}
        return json.dumps(data, indent=1)

    @classmethod
    def from_json(cls, text: str) -> Run:
        data = json.loads(text)
        results = {}
        for item in data.pop("results"):
            m = item["measured"]
            results[Variant(**item["variant"])] = Measured(
                [Session(**x) for x in m["record"]], [Session(**x) for x in m["replay"]],
                [(b, f) for b, f in m["sizes"]])
        return cls(results=results, **data)


def _seconds(sessions: list[Session]) -> str:
    walls, cpus = [s.wall for s in sessions], [s.cpu for s in sessions]
    return (f"{min(walls):.2f} s ({statistics.median(walls):.2f} s); "
            f"CPU {statistics.median(cpus):.2f} s")


def _kb(size: float) -> str:
    return f"{size / 1024:.1f} KB"


def _span(values: list[int]) -> str:
    """"8", or "12-15" when the repetitions differ."""
    low, high = min(values), max(values)
    return str(low) if low == high else f"{low}-{high}"


def _streams(sessions: list[Session]) -> str:
    """How the streamed cases fared on replay, over the repetitions."""
    notes = [n for s in sessions for n in s.notes]
    failed = sum(1 for s in sessions for t in s.failed if "stream" in t.split(":")[0])
    total = STREAMED * len(sessions)
    right = f"{total - failed}/{total} passed"
    if not notes:
        return f"{right}; no cuts noted"
    same = sum(1 for n in notes if n["same"])
    cuts = sorted({(int(n["cuts"]), int(n["sent"])) for n in notes})
    shown = ", ".join(f"{c} of {s}" for c, s in cuts[:3]) + (", ..." if len(cuts) > 3 else "")
    return f"{right}; as sent: {same}/{len(notes)} ({shown} cuts)"


def rows(run: Run) -> list[tuple[str, ...]]:
    table: list[tuple[str, ...]] = [("Tool", "Workers", f"Requests in record ({CASES} calls)",
              f"Record: wall best (median) of {run.runs}; CPU median",
              f"Replay: wall best (median) of {run.runs}; CPU median",
              "Replay: tests passed; requests", "Store / cassettes on disk",
              "Streamed cases on replay: passed; body cuts as the server sent them")]
    for variant in VARIANTS:
        m = run.results.get(variant)
        if m is None:
            continue
        size, files = statistics.median([b for b, _ in m.sizes]), m.sizes[-1][1]
        what = "SQLite file + key" if variant.tool == "singleflight" else \
            f"{files} YAML file{'s' if files != 1 else ''}"
        table.append((
            variant.name, str(variant.workers or "serial"), _span([s.requests for s in m.record]),
            _seconds(m.record), _seconds(m.replay),
            f"{_span([s.passed for s in m.replay])}/{CASES}; {max(s.requests for s in m.replay)}",
            f"{_kb(size)} ({what})", _streams(m.replay)))
    return table


def markdown(table: list[tuple[str, ...]]) -> str:
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]

    def line(cells: tuple[str, ...]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    rule = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(table[0]), rule, *(line(row) for row in table[1:])])


def versions() -> dict[str, str]:
    def version(name: str) -> str:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return "not installed"

    names = ("singleflight-agents", "openai", "anthropic", "httpx2", "vcrpy", "pytest-recording",
             "pytest", "pytest-xdist")
    info = {"Python": f"{platform.python_implementation()} {platform.python_version()}",
            **{name: version(name) for name in names}}
    return info | {"singleflight-agents": info["singleflight-agents"] + _commit()}


def _commit() -> str:
    """" (commit abc1234)" of the checkout measured, noting uncommitted changes to src/."""
    root = Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, text=True,
                              capture_output=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "src"], cwd=root, text=True,
                               capture_output=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return ""
    return f" (commit {head}{', with uncommitted changes in src/' if dirty else ''})"


def numbers(run: Run) -> dict[str, float]:
    """The figures the interpretation quotes, by variant key ("sf0", "vcr4", "shared4", ...)."""
    n: dict[str, float] = {}
    for variant, m in run.results.items():
        kind = "shared" if variant.shared else "sf" if variant.tool == "singleflight" else "vcr"
        key = f"{kind}{variant.workers}"
        n[f"{key}_requests"] = max(s.requests for s in m.record)
        n[f"{key}_requests_min"] = min(s.requests for s in m.record)
        for phase, sessions in (("record", m.record), ("replay", m.replay)):
            n[f"{key}_{phase}"] = min(s.wall for s in sessions)
            n[f"{key}_{phase}_median"] = statistics.median(s.wall for s in sessions)
            n[f"{key}_{phase}_cpu"] = statistics.median(s.cpu for s in sessions)
            n[f"{key}_{phase}_passed_min"] = min(s.passed for s in sessions)
        n[f"{key}_record_broken"] = sum(1 for s in m.record if s.failed)
        n[f"{key}_size"] = statistics.median([b for b, _ in m.sizes])
        notes = [x for s in m.replay for x in s.notes]
        n[f"{key}_cuts_same"] = sum(1 for x in notes if x["same"]) / len(notes) if notes else -1
        n[f"{key}_cuts_max"] = max((int(x["cuts"]) for x in notes), default=0)
        n[f"{key}_sent_min"] = min((int(x["sent"]) for x in notes), default=0)
        n[f"{key}_sent_max"] = max((int(x["sent"]) for x in notes), default=0)
    return n


def _first_failure(run: Run, phase: str) -> str:
    """The exception's name of the first failure of the shared cassette with -n 4 in ``phase``."""
    for variant, m in run.results.items():
        if variant.shared and variant.workers:
            for session in getattr(m, phase):
                for failed in session.failed:
                    text = failed.split(": ", 1)[-1]
                    text = text.split('with "', 1)[-1]  # 'failed on setup with "TypeError: ..."'
                    return str(text.split(":", 1)[0].rsplit(".", 1)[-1])
    return ""


def _both(serial: float, xdist: float) -> str:
    return f"{serial:.0f} both ways" if serial == xdist else f"{serial:.0f} and {xdist:.0f}"


def interpretation(run: Run) -> str:
    """One paragraph of about five sentences, from this run's figures."""
    n, parts = numbers(run), []
    if {"sf0_requests", "sf4_requests", "vcr0_requests", "vcr4_requests"} <= n.keys():
        parts.append(
            f"Receipts are keyed by the request, not the test: the {CASES} cases made "
            f"{n['sf0_requests']:.0f} requests serially and {n['sf4_requests']:.0f} with `-n 4` "
            f"(the workers share one SQLite store and join a request in flight), where a cassette "
            f"per test, pytest-recording's default, shares nothing between tests, with or without "
            f"xdist, and made {_both(n['vcr0_requests'], n['vcr4_requests'])}: every "
            f"repeated prompt is paid for again in tokens, rate limit and time (here "
            f"{n['vcr0_requests'] - n['sf0_requests']:.0f} answers of 50 ms; serial record "
            f"{n['sf0_record']:.2f} s against {n['vcr0_record']:.2f} s, best of {run.runs}).")
    if {"shared0_requests", "shared4_requests"} <= n.keys():
        lost = CASES - n["shared4_replay_passed_min"]
        broken = int(n["shared4_record_broken"])
        during = (f", {broken} of {run.runs} record sessions had a test error reading the file "
                  f"half-written (`{_first_failure(run, 'record')}` in vcrpy's deserializer)"
                  if broken else "")
        after = (f" and the replays failed up to {lost:.0f} of the {CASES} tests "
                 f"(`{_first_failure(run, 'replay')}`: interactions lost)" if lost else
                 " (every replay still passed in this run, by luck: nothing coordinates the "
                 "writes)")
        parts.append(
            f"vcrpy's way to record a repeat once is one shared cassette (`new_episodes`): "
            f"{n['shared0_requests']:.0f} requests serially, but with `-n 4` each worker reads "
            f"the file when its test starts and writes back its own view when the test ends, so "
            f"the record sessions made "
            f"{_span([int(n['shared4_requests_min']), int(n['shared4_requests'])])} requests"
            f"{during},{after}.")
    if "sf0_cuts_same" in n and "vcr0_cuts_same" in n:
        short = [f"{'the shared cassette' if v.shared else v.tool} "
                 f"{'with `-n ' + str(v.workers) + '`' if v.workers else 'serially'}"
                 for v, m in run.results.items()
                 if any("stream" in t.split(":")[0] for s in m.replay for t in s.failed)]
        where = f"everywhere but in {' and '.join(short)}" if short else "in every variant"
        parts.append(
            f"The streamed cases' text and usage replayed exactly {where}, "
            f"but vcrpy reads the whole body before handing the "
            f"response on, recording as replaying, and stores one string: the SDK read "
            f"{n['vcr0_cuts_max']:.0f} cut where the server sent {n['vcr0_sent_min']:.0f}-"
            f"{n['vcr0_sent_max']:.0f} chunks, while receipts gave back the server's exact "
            f"chunks in {min(n['sf0_cuts_same'], n.get('sf4_cuts_same', 1.0)) * 100:.0f}% of "
            f"streamed replays (neither shows a stream's timing: both read the whole answer "
            f"first).")
    if {"sf0_replay", "vcr0_replay", "sf0_size", "vcr0_size"} <= n.keys():
        more = ""
        if n["sf0_replay_cpu"] > n["vcr0_replay_cpu"] + 0.1:
            more = (", receipts' extra being their per-process start (httpx and httpx2 imported "
                    "to route their transports; the genai-prices catalogue loaded at the first "
                    "metered answer, about 0.2 s in a profile, again in each xdist worker)")
        parts.append(
            f"No replay made a request, and a session's time is mostly the interpreter and the "
            f"SDKs' import (serial replay CPU, medians: {n['sf0_replay_cpu']:.2f} s for receipts, "
            f"{n['vcr0_replay_cpu']:.2f} s for cassettes{more}); `-n 4` costs more than it saves "
            f"for a suite this small, five processes on {run.cores} cores.")
        parts.append(
            f"The store is a SQLite file of 4 KB pages plus a 65-byte key, "
            f"{_kb(n['sf0_size'])} for {n['sf0_requests']:.0f} receipts, growing with distinct "
            f"requests, not tests; the {CASES} YAML cassettes, {_kb(n['vcr0_size'])} with every "
            f"request's headers, can be read and diffed in review, which the SQLite file cannot.")
    return " ".join(parts)


def _wrap(text: str) -> str:
    """Prose paragraphs filled to the page's width; tables, lists and code left as they are."""
    return "\n\n".join(
        part if part.startswith(("|", "    ", "- ")) else
        textwrap.fill(" ".join(part.split()), 96, break_on_hyphens=False, break_long_words=False)
        for part in text.split("\n\n"))


def section(run: Run, command: str) -> str:
    machine = "\n".join(f"- **{k}**: {v}" for k, v in run.info.items())
    failed = "; ".join(f.splitlines()[0] for f in run.failures) or "none"
    timing = (f"best and median of {run.runs} repetitions after an untimed warm-up, the "
              f"variants' order rotating" if run.runs > 1 else
              "one repetition without a warm-up (a smoke run: the first session pays for "
              "compiling the bytecode)")
    return _wrap(f"""## {TITLE}

    {command}

`bench/http_vcr.py` generates a suite of {CASES} parametrized eval cases over {DISTINCT} distinct
requests, each made by {CASES // DISTINCT} cases: {DISTINCT - 2} OpenAI SDK chat completions, 1
chat completion with `stream=True` (the test asserts the concatenated deltas and the usage chunk)
and 1 Anthropic `messages.stream()` (`get_final_text()` and the usage). The SDKs talk to the
stand-in provider (`demo_provider.Server(Provider(delay=0.05))`, 50 ms per answer) on 127.0.0.1:
one server, in the benchmark's process, whose requests are counted around each pytest session.
Each variant records on a fresh store or cassette directory, then replays it with the API keys
removed from the environment, serially and with `-n 4` (pytest-xdist): singleflight with
`--singleflight-http=127.0.0.1` (`--singleflight-mode=replay` to replay; `-p no:recording`);
pytest-recording with every test `@pytest.mark.vcr`, `--record-mode=once` then `none` (`-p
no:singleflight`; `vcr_config` filters the `authorization` and `x-api-key` headers, as
pytest-recording advises, and matches the body too); and pytest-recording with one cassette for
all the tests (`default_cassette`, `--record-mode=new_episodes`). Every session is `python -m
pytest -q {' '.join(QUIET_PLUGINS)}` (two autoloaded plugins of this environment that take
1.5 s to import and have nothing to do with HTTP left out). vcrpy supports httpx2, which these
SDKs are built on: its `vcr/patch.py` patches `httpx2.HTTPTransport` and its siblings as it
does httpx's. Times are each session's wall clock, {timing}, and its CPU time (pytest and
its workers); sizes are the files' bytes. The streamed tests also note the cuts in which the body
reached the SDK (an httpx2 response hook), against the chunks the server sent.

{machine}
- **Machine**: {run.cores} cores usable, a shared VM; other test suites were running (load
  average {run.load_start} at the start, {run.load_end} at the end): read the comparisons
  within the run, and the CPU times, rather than the absolute wall times
- **Run**: took {run.took:.0f} s; failed checks: {failed}

{markdown(rows(run))}

{interpretation(run)}
""")


def write_docs(path: Path, text: str) -> None:
    """Replace the page's section of this title (from its heading to the next `## `), or append
    it; bench/report.py keeps any `## ` section it does not generate."""
    lines = path.read_text().splitlines(keepends=True) if path.exists() else []
    heading = f"## {TITLE}"
    start = next((i for i, line in enumerate(lines) if line.rstrip("\n") == heading), None)
    if start is None:
        before, after = "".join(lines).rstrip("\n") + "\n\n", ""
    else:
        end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")),
                   len(lines))
        before, after = "".join(lines[:start]), "".join(lines[end:])
        after = "\n" + after if after else ""
    path.write_text(before + text.rstrip("\n") + "\n" + after)
    print(f"wrote the section {heading!r} of {path}")


def measure(quick: bool, runs: int) -> Run:
    load = report.loadavg()
    run = Run({}, [], versions(), runs, load_start=load, cores=report.cores())
    print(f"HTTP receipts against pytest-recording: {CASES} cases over {DISTINCT} requests, "
          f"{runs} repetition(s); {run.cores} cores usable, load average {load}; "
          + ", ".join(f"{k} {v}" for k, v in run.info.items()), flush=True)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="sf-bench-http-") as tmp, \
            Server(Provider(delay=DELAY)) as server:
        root = Path(tmp)
        setup(root)
        # Bytecode cached in a prefix of the run's own; no key, run id, addopts or proxy from
        # the environment (httpx2 honours proxies); the API keys are set for record sessions.
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("SINGLEFLIGHT_", "OPENAI_", "ANTHROPIC_", "SF_BENCH_"))
               and k not in ("PYTEST_ADDOPTS", "PYTEST_PLUGINS", "PYTHONDONTWRITEBYTECODE")
               and k.lower() not in ("http_proxy", "https_proxy", "all_proxy")}
        env |= {"PYTHONPYCACHEPREFIX": str(root / "pycache"), "NO_PROXY": "127.0.0.1",
                "SF_BENCH_PROVIDER_URL": server.url}
        bench = Bench(root, server, env, run.results, run.failures)
        if not quick:  # untimed record sessions: the bytecode cache filled, the modules read
            began = time.perf_counter()
            for variant in (VARIANTS[0], VARIANTS[2]):
                scratch = Path(tempfile.mkdtemp(prefix="warm-up-", dir=root))
                (scratch / "cassettes").mkdir()
                bench.session(variant, scratch, replay=False)
                shutil.rmtree(scratch)
            print(f"  warm-up: {time.perf_counter() - began:.1f} s", flush=True)
        for rep in range(runs):
            began = time.perf_counter()
            order = VARIANTS[rep % len(VARIANTS):] + VARIANTS[:rep % len(VARIANTS)]
            for variant in order:
                bench.pair(variant, f"repetition {rep + 1}")
            print(f"  repetition {rep + 1}/{runs}: {time.perf_counter() - began:.1f} s",
                  flush=True)
    run.took, run.load_end = time.perf_counter() - started, report.loadavg()
    return run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: 1 repetition, no warm-up")
    parser.add_argument("--repeats", type=int, default=3, help="repetitions (default 3)")
    parser.add_argument("--docs", nargs="?", const=DOCS, type=Path, default=None,
                        help=f"write the section into this page (default {DOCS})")
    parser.add_argument("--json", type=Path, help="also write every session's figures as JSON")
    parser.add_argument("--from-json", type=Path, metavar="JSON",
                        help="measure nothing: print (and with --docs write) a saved run's figures")
    args = parser.parse_args(argv)
    if args.from_json:
        run = Run.from_json(args.from_json.read_text())
    else:
        run = measure(args.quick, 1 if args.quick else args.repeats)
    print(f"\n{markdown(rows(run))}\n\ntook {run.took:.0f} s; load average at the end "
          f"{run.load_end}")
    if args.json:
        args.json.write_text(run.to_json())
    if args.docs:
        quick = " --quick" if run.runs == 1 else ""
        write_docs(args.docs, section(run, f"python bench/http_vcr.py --docs{quick}"))
        if f"## {TITLE}" not in report.kept_sections(args.docs):
            run.failures.append("the docs section is not one bench/report.py keeps")
    for failure in run.failures:
        print(f"CHECK FAILED: {failure}")
    print("CHECKS FAILED" if run.failures else "all checks passed")
    return 1 if run.failures else 0


if __name__ == "__main__":
    sys.exit(main())
