#!/usr/bin/env python
"""The pytest plugin's overhead per test: generated projects run by pytest in subprocesses.

    python bench/plugin_overhead.py              # all hits: 2,000 tests, serial, -n 2, -n 4
    python bench/plugin_overhead.py --quick      # the same, 300 tests, 2 repetitions
    python bench/plugin_overhead.py --all        # every variant below (500 tests by default)

By default (and through ``measure()``, for a bigger benchmark to call) only the all-hits
figure is measured: for each of serial, ``-n 2`` and ``-n 4``, the baseline and a run served
entirely from receipts (after an untimed record run on its store); it prints a small table
(tests, mode, baseline s, with plugin s, overhead per test ms; wall time, then CPU time).
With ``--all``:

A generated project of --tests parametrized tests, each making one call of a
``bounded_read=True`` tool of an app engine created at import (test i calls it with i // 2,
so half the calls repeat an argument), is run by ``python -m pytest -q -p no:cacheprovider``
in a temporary directory, as:

    baseline        -p no:singleflight, the tool left undecorated and called directly
    record          the plugin in record mode on a fresh SQLite store
    from receipts   a second serial run on that store: every call served from a receipt
    replay          --singleflight-mode=replay on that store
    -n 2 ...        pytest-xdist with 2 workers: baseline, record (fresh store), from receipts

and a project of as many trivial tests that never call a tool, with ``-p no:singleflight``
and with the plugin (the cost of the plugin being loaded: a session per process, a scope per
test), and the same for a project of one trivial test (the part of that cost paid once per
session). Each session's wall time and CPU time (user + system of pytest and its xdist
workers, from getrusage) are measured, every variant once per repetition (the short
one-test sessions three times, in pairs), their order rotating between repetitions (a record
run always precedes the runs on its store). The overhead per test of a variant is the
median, over repetitions, of (its time minus the same repetition's baseline) / tests; serial
variants are compared with the serial baseline, xdist variants with the xdist baseline, the
trivial projects with themselves without the plugin (the one-test project per session). On
a shared machine the CPU time is the steadier figure: other processes' load stretches wall
time far more than the CPU time a session uses.

Checks (the exit status is 1 if one fails): every session passes every test; the tool runs
once per test in the baseline, once per distinct argument in a record run (serial or across
the xdist workers), never from receipts or in replay; the app engine's own store is never
created (the plugin's session governs it).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import report
from common import ms

import singleflight_agents

APP = '''\
"""The app: one engine created at import, one bounded-read tool."""

import os

EXECUTIONS = []


def lookup(x):
    EXECUTIONS.append(x)
    return {"query": x, "rows": [x, x * 2, x * 3], "ok": True}


if os.environ.get("SF_BENCH_UNDECORATED") != "1":
    from singleflight_agents import Singleflight

    sf = Singleflight(os.path.join(os.environ["SF_BENCH_OUT"], "app-own.db"))
    lookup = sf.tool(bounded_read=True, tool_name="app.lookup")(lookup)
'''

TOOL_TESTS = '''\
import pytest

import app


@pytest.mark.parametrize("i", range({tests}))
def test_lookup(i):
    assert app.lookup(i // 2)["query"] == i // 2
'''

CONFTEST = '''\
import os

import app


def pytest_sessionfinish(session):
    """How many times the tool ran in this process (the xdist controller writes 0)."""
    name = f"executions-{os.environ.get('PYTEST_XDIST_WORKER', 'main')}-{os.getpid()}"
    with open(os.path.join(os.environ["SF_BENCH_OUT"], name), "w") as handle:
        handle.write(str(len(app.EXECUTIONS)))
'''

TRIVIAL_TESTS = '''\
import pytest


@pytest.mark.parametrize("i", range({tests}))
def test_trivial(i):
    assert i >= 0
'''


@dataclass(frozen=True)
class Variant:
    name: str
    project: str  # "tools", "trivial" or "single" (one trivial test)
    args: tuple[str, ...]
    store: str = ""  # the store's chain: "serial" or "xdist"; "" for no plugin store
    executions: str = ""  # expected tool executions: "all", "distinct", "none"; "" unchecked
    baseline: str = ""  # the variant it is compared with


NO_PLUGIN = ("-p", "no:singleflight")
XDIST = ("-n", "2")
XDIST4 = ("-n", "4")
VARIANTS = [
    Variant("baseline", "tools", NO_PLUGIN, executions="all"),
    Variant("record, fresh store", "tools", (), "serial", "distinct", "baseline"),
    Variant("from receipts", "tools", (), "serial", "none", "baseline"),
    Variant("replay", "tools", ("--singleflight-mode=replay",), "serial", "none", "baseline"),
    Variant("-n 2 baseline", "tools", (*NO_PLUGIN, *XDIST), executions="all"),
    Variant("-n 2 record, fresh store", "tools", XDIST, "xdist", "distinct", "-n 2 baseline"),
    Variant("-n 2 from receipts", "tools", XDIST, "xdist", "none", "-n 2 baseline"),
    Variant("-n 4 baseline", "tools", (*NO_PLUGIN, *XDIST4), executions="all"),
    Variant("-n 4 record, fresh store", "tools", XDIST4, "xdist4", "distinct", "-n 4 baseline"),
    Variant("-n 4 from receipts", "tools", XDIST4, "xdist4", "none", "-n 4 baseline"),
    Variant("trivial, no plugin", "trivial", NO_PLUGIN),
    Variant("trivial, plugin loaded", "trivial", (), baseline="trivial, no plugin"),
    Variant("1 trivial test, no plugin", "single", NO_PLUGIN),
    Variant("1 trivial test, plugin loaded", "single", (), baseline="1 trivial test, no plugin"),
]
BY_NAME = {v.name: v for v in VARIANTS}
# What runs in one repetition, in groups whose order rotates; within a group the order is
# fixed, because the runs after a record run use its store. The one-test sessions are short
# and their difference small: they run in SINGLE_PAIRS pairs per repetition.
SINGLE_PAIRS = 3
GROUPS = [["baseline"], ["record, fresh store", "from receipts", "replay"], ["-n 2 baseline"],
          ["-n 2 record, fresh store", "-n 2 from receipts"], ["-n 4 baseline"],
          ["-n 4 record, fresh store", "-n 4 from receipts"], ["trivial, no plugin"],
          ["trivial, plugin loaded"],
          ["1 trivial test, no plugin", "1 trivial test, plugin loaded"] * SINGLE_PAIRS]


@dataclass
class Bench:
    root: Path
    tests: int
    env: dict[str, str]
    times: dict[str, list[tuple[float, float]]] = field(default_factory=dict)  # (wall, CPU)
    failures: list[str] = field(default_factory=list)

    def project(self, kind: str) -> Path:
        return self.root / kind

    def count(self, variant: Variant) -> int:
        """How many tests the variant's project has."""
        return 1 if variant.project == "single" else self.tests

    def run(self, variant: Variant, store: Path | None, label: str) -> tuple[float, float]:
        """One pytest session of ``variant``: its wall time and CPU time (user + system, the
        xdist workers' included); checks its outcome."""
        out = Path(tempfile.mkdtemp(prefix="out-", dir=self.root))
        env = {**self.env, "SF_BENCH_OUT": str(out)}
        if variant.project == "tools" and "no:singleflight" in variant.args:
            env["SF_BENCH_UNDECORATED"] = "1"
        command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                   *variant.args]
        if store is not None:
            command.append(f"--singleflight-db={store}")
        cpu_before = _children_cpu()
        start = time.perf_counter()
        done = subprocess.run(command, cwd=self.project(variant.project), env=env, text=True,
                              capture_output=True)
        elapsed = time.perf_counter() - start, _children_cpu() - cpu_before
        self.check(variant, done, out, label)
        shutil.rmtree(out)
        return elapsed

    def check(self, variant: Variant, done: subprocess.CompletedProcess[str], out: Path,
              label: str) -> None:
        where, tests = f"{label}, {variant.name}", self.count(variant)
        if done.returncode != 0 or not re.search(rf"\b{tests} passed\b", done.stdout):
            tail = "\n".join((done.stdout + done.stderr).splitlines()[-15:])
            self.failures.append(f"{where}: not all {tests} tests passed "
                                 f"(exit {done.returncode}):\n{textwrap.indent(tail, '    ')}")
        if (out / "app-own.db").exists():
            self.failures.append(f"{where}: the app engine opened its own store")
        if variant.executions:
            ran = sum(int(p.read_text()) for p in out.glob("executions-*"))
            expected = {"all": self.tests, "distinct": (self.tests + 1) // 2,
                        "none": 0}[variant.executions]
            if ran != expected:
                self.failures.append(f"{where}: the tool ran {ran} times, expected {expected}")


def _children_cpu() -> float:
    """User + system time of this process's finished children, theirs included."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def setup(root: Path, tests: int) -> None:
    for kind, files in {"tools": {"app.py": APP, "conftest.py": CONFTEST,
                                  "test_tools.py": TOOL_TESTS.format(tests=tests)},
                        "trivial": {"test_trivial.py": TRIVIAL_TESTS.format(tests=tests)},
                        "single": {"test_trivial.py": TRIVIAL_TESTS.format(tests=1)}}.items():
        directory = root / kind
        directory.mkdir()
        # An ini file of the project's own: its rootdir, and no addopts from elsewhere.
        (directory / "pytest.ini").write_text("[pytest]\n")
        for name, text in files.items():
            (directory / name).write_text(text)


def repetition(bench: Bench, rep: int) -> None:
    """Every variant once, the groups in an order rotated by ``rep``."""
    run_groups(bench, GROUPS[rep % len(GROUPS):] + GROUPS[:rep % len(GROUPS)],
               f"repetition {rep + 1}", record=True)


def run_groups(bench: Bench, groups: list[list[str]], label: str, record: bool,
               all_hits: bool = False) -> None:
    stores = {chain: bench.root / f"store-{chain}" / "receipts.db"
              for chain in ("serial", "xdist", "xdist4")}
    for group in groups:
        for name in group:
            variant = BY_NAME[name]
            store = stores[variant.store] if variant.store else None
            elapsed = bench.run(variant, store, label)
            if record and not (all_hits and "record" in name):
                bench.times.setdefault(name, []).append(elapsed)
    for path in stores.values():
        shutil.rmtree(path.parent, ignore_errors=True)


def table(bench: Bench) -> str:
    """The results as a Markdown table, one row per variant."""
    rows = [("Session", "Wall time: median (min-max)", "CPU time: median",
             "Overhead per test: wall / CPU", "Same-run ratio: wall / CPU")]
    for variant in VARIANTS:
        runs = bench.times[variant.name]
        walls, cpus = [w for w, _ in runs], [c for _, c in runs]
        wall = f"{ms(statistics.median(walls))} ({ms(min(walls))}-{ms(max(walls))})"
        overhead = ratio = ""
        if variant.baseline:
            base = bench.times[variant.baseline]
            tests = bench.count(variant)
            per_test = [[(t[i] - b[i]) / tests * 1000 for t, b in zip(runs, base, strict=True)]
                        for i in (0, 1)]
            ratios = [[t[i] / b[i] for t, b in zip(runs, base, strict=True)] for i in (0, 1)]
            overhead = " / ".join(f"{statistics.median(x):+.2f} ms" for x in per_test)
            overhead += " per session" if tests == 1 else ""
            ratio = " / ".join(f"{statistics.median(x):.2f}x" for x in ratios)
        rows.append((variant.name, wall, ms(statistics.median(cpus)), overhead, ratio))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]

    def line(cells: tuple[str, ...]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    rule = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(rows[0]), rule, *(line(row) for row in rows[1:])])


# The all-hits figure (measure()): per mode, its baseline, and its run served from receipts
# after an untimed record run on a fresh store.
MODES = {"serial": ("baseline", "from receipts"), "-n 2": ("-n 2 baseline", "-n 2 from receipts"),
         "-n 4": ("-n 4 baseline", "-n 4 from receipts")}
HIT_GROUPS = [["baseline"], ["record, fresh store", "from receipts"], ["-n 2 baseline"],
              ["-n 2 record, fresh store", "-n 2 from receipts"], ["-n 4 baseline"],
              ["-n 4 record, fresh store", "-n 4 from receipts"]]


def _environment(root: Path) -> dict[str, str]:
    # Bytecode cached, as installed, in a prefix of the run's own: nothing is written into
    # the checkout. No key or run id from the environment: the store keeps a key file, each
    # session is a run of its own.
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONDONTWRITEBYTECODE", "PYTEST_ADDOPTS", "SINGLEFLIGHT_SECRET",
                        "SINGLEFLIGHT_RUN_ID", "SINGLEFLIGHT_SESSION")}
    env["PYTHONPYCACHEPREFIX"] = str(root / "pycache")
    return env


def measure(tests: int = 2000, repeats: int = 3) -> list[dict[str, Any]]:
    """The plugin's overhead per test in an all-hits run, serial, ``-n 2`` and ``-n 4``: one
    dict per mode with ``tests``, ``mode``, ``baseline_s``, ``plugin_s``,
    ``overhead_ms_per_test`` (wall time, medians over ``repeats``), the same three for CPU
    time (``baseline_cpu_s``, ``plugin_cpu_s``, ``overhead_cpu_ms_per_test``) and
    ``failures`` (checks that failed: a test not passing, a tool run from receipts).
    Each repetition runs every session once, the modes' order rotating."""
    with tempfile.TemporaryDirectory(prefix="sf-bench-plugin-") as tmp:
        root = Path(tmp)
        setup(root, tests)
        bench = Bench(root, tests, _environment(root))
        run_groups(bench, [HIT_GROUPS[1], HIT_GROUPS[3]], "warm-up", record=False)
        for rep in range(repeats):
            shift = 2 * (rep % len(MODES))
            run_groups(bench, HIT_GROUPS[shift:] + HIT_GROUPS[:shift], f"repetition {rep + 1}",
                       record=True, all_hits=True)
    rows = []
    for mode, (base_name, hit_name) in MODES.items():
        base, hit = bench.times[base_name], bench.times[hit_name]
        row: dict[str, Any] = {"tests": tests, "mode": mode}
        for i, suffix in ((0, ""), (1, "_cpu")):
            row[f"baseline{suffix}_s"] = statistics.median(b[i] for b in base)
            row[f"plugin{suffix}_s"] = statistics.median(h[i] for h in hit)
            row[f"overhead{suffix}_ms_per_test"] = statistics.median(
                (h[i] - b[i]) / tests * 1000 for h, b in zip(hit, base, strict=True))
        rows.append(row)
    if rows:
        rows[0]["failures"] = bench.failures
    return rows


def hits_table(rows: list[dict[str, Any]]) -> str:
    lines = ["| tests | mode   | baseline s | with plugin s | overhead per test ms | "
             "CPU: baseline s | with plugin s | overhead per test ms |",
             "|------:|--------|-----------:|--------------:|---------------------:|"
             "----------------:|--------------:|---------------------:|"]
    for r in rows:
        lines.append(f"| {r['tests']:5} | {r['mode']:6} | {r['baseline_s']:10.2f} | "
                     f"{r['plugin_s']:13.2f} | {r['overhead_ms_per_test']:+20.3f} | "
                     f"{r['baseline_cpu_s']:15.2f} | {r['plugin_cpu_s']:13.2f} | "
                     f"{r['overhead_cpu_ms_per_test']:+20.3f} |")
    return "\n".join(lines)


def pytest_version() -> str:
    import pytest
    import xdist

    return f"{pytest.__version__}, pytest-xdist {xdist.__version__}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--tests", type=int, help="tests per project (default 2000; "
                        "500 with --all, 300 with --quick)")
    parser.add_argument("--repeats", type=int, help="repetitions (default 3; 5 with --all)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 2 repetitions")
    parser.add_argument("--all", action="store_true", help="every variant, not only all hits")
    parser.add_argument("--json", type=Path, help="also write every session's times as JSON")
    args = parser.parse_args(argv)
    repeats = 2 if args.quick else args.repeats or (5 if args.all else 3)
    args.tests = args.tests or (300 if args.quick else 500 if args.all else 2000)
    if not args.all:
        return main_hits(args.tests, repeats, args.json)
    print(f"pytest plugin overhead: {args.tests} tests per project, {repeats} repetitions "
          f"after a warm-up, {report.cores()} cores usable, load average {report.loadavg()}; "
          f"{sys.executable} -m pytest {pytest_version()}; singleflight_agents from "
          f"{Path(singleflight_agents.__file__).parent}", flush=True)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="sf-bench-plugin-") as tmp:
        root = Path(tmp)
        setup(root, args.tests)
        bench = Bench(root, args.tests, _environment(root))
        # Warm-up, not timed: the bytecode cache filled, xdist and the plugin's modules read.
        run_groups(bench, [GROUPS[1], GROUPS[3], GROUPS[6]], "warm-up", record=False)
        for rep in range(repeats):
            began = time.perf_counter()
            repetition(bench, rep)
            print(f"  repetition {rep + 1}/{repeats}: {time.perf_counter() - began:.1f} s",
                  flush=True)
    print(f"\n{table(bench)}\n\ntook {time.perf_counter() - started:.0f} s; "
          f"load average at the end {report.loadavg()}")
    if args.json:
        args.json.write_text(json.dumps({"tests": args.tests, "repeats": repeats,
                                         "seconds_wall_cpu": bench.times,
                                         "failures": bench.failures}, indent=2))
    for failure in bench.failures:
        print(f"CHECK FAILED: {failure}")
    print("CHECKS FAILED" if bench.failures else "all checks passed")
    return 1 if bench.failures else 0


def main_hits(tests: int, repeats: int, json_path: Path | None) -> int:
    print(f"pytest plugin overhead, all hits: {tests} tests, {repeats} repetitions, "
          f"{report.cores()} cores usable, load average {report.loadavg()}; pytest "
          f"{pytest_version()}; singleflight_agents from "
          f"{Path(singleflight_agents.__file__).parent}", flush=True)
    started = time.perf_counter()
    rows = measure(tests, repeats)
    failures = rows[0].pop("failures", []) if rows else []
    print(f"\n{hits_table(rows)}\n\ntook {time.perf_counter() - started:.0f} s; load average "
          f"at the end {report.loadavg()}")
    if json_path:
        json_path.write_text(json.dumps({"rows": rows, "failures": failures}, indent=2))
    for failure in failures:
        print(f"CHECK FAILED: {failure}")
    print("CHECKS FAILED" if failures else "all checks passed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
