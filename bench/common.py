"""What every benchmark module shares: run sizes, the results table, timing and formatting."""

from __future__ import annotations

import contextlib
import math
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Config:
    """How much of each benchmark to run."""

    name: str
    hit_iterations: int  # per repeat and variant: short repeats, so that a noisy
    hit_repeats: int  # moment of the machine hits every variant alike
    miss_keys: int  # per repeat and variant
    miss_repeats: int
    fanout_repeats: int
    mp_repeats: int
    wake_trials: int  # per waiter kind (sync, async)
    crash_trials: int
    failure_trials: int  # per variant
    import_runs: int  # fresh interpreters per variant


FULL = Config("full", hit_iterations=4_000, hit_repeats=25, miss_keys=2_000, miss_repeats=3,
              fanout_repeats=5, mp_repeats=3, wake_trials=50, crash_trials=10,
              failure_trials=20, import_runs=25)
QUICK = Config("quick", hit_iterations=500, hit_repeats=8, miss_keys=200, miss_repeats=1,
               fanout_repeats=1, mp_repeats=1, wake_trials=6, crash_trials=2,
               failure_trials=3, import_runs=3)


@dataclass
class Row:
    bench: str
    metric: str
    value: str
    target: str = ""
    met: bool | None = None  # None: no target


@dataclass
class Results:
    """The table rows, raw numbers for the write-up, and failed correctness checks."""

    rows: list[Row] = field(default_factory=list)
    numbers: dict[str, float] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)

    def add(self, bench: str, metric: str, value: str, target: str = "",
            met: bool | None = None) -> None:
        self.rows.append(Row(bench, metric, value, target, met))
        print(f"  {metric:<50} {value:<36} {verdict(met) if target else ''}", flush=True)

    def check(self, ok: bool, what: str) -> bool:
        """Record a failed correctness check (the run then exits with status 1)."""
        if not ok:
            self.failures.append(what)
        return ok

    def missed(self) -> list[str]:
        return [f"{row.bench}: {row.metric}" for row in self.rows if row.met is False]

    def table(self) -> str:
        """The rows as a Markdown table, columns padded to line up."""
        header = ("Benchmark", "Metric", "Result", "Target", "Met")
        body = [(r.bench, r.metric, r.value, r.target, verdict(r.met) if r.target else "")
                for r in self.rows]
        widths = [max(len(line[i]) for line in [header, *body]) for i in range(len(header))]

        def line(cells: tuple[str, ...]) -> str:
            return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"

        rule = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
        return "\n".join([line(header), rule, *(line(cells) for cells in body)])


def verdict(met: bool | None) -> str:
    return {True: "yes", False: "**NO**", None: ""}[met]


def pct(samples: Sequence[float], q: float) -> float:
    """Nearest-rank percentile, ``q`` in [0, 1]."""
    ordered = sorted(samples)
    return ordered[max(0, min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1))]


def us(ns: float) -> str:
    """Nanoseconds as microseconds."""
    return f"{ns / 1000:.1f} µs"


def ms(seconds: float) -> str:
    """Seconds as milliseconds."""
    return f"{seconds * 1000:.1f} ms"


def executions_label(per_run: list[int]) -> str:
    """How many times a tool ran, per run: "1 (each of 5 runs)" or "1/2/1"."""
    if len(set(per_run)) > 1:
        return "/".join(map(str, per_run))
    return f"{per_run[0]} (each of {len(per_run)} runs)" if len(per_run) > 1 else str(per_run[0])


def time_calls(func: Callable[[int], Any], arg: int, iterations: int, out: list[int]) -> None:
    """Call ``func(arg)`` repeatedly, appending each call's duration in ns to ``out``."""
    clock = time.perf_counter_ns
    for _ in range(iterations):
        start = clock()
        func(arg)
        out.append(clock() - start)


async def time_calls_async(func: Callable[[int], Any], arg: int, iterations: int,
                           out: list[int]) -> None:
    """``time_calls`` for a coroutine function, awaited in the running loop."""
    clock = time.perf_counter_ns
    for _ in range(iterations):
        start = clock()
        await func(arg)
        out.append(clock() - start)


def payload(x: int) -> dict[str, Any]:
    """The benchmarked tool: cheap, returns a small JSON-able result."""
    return {"query": x, "rows": [x, x * 2, x * 3], "ok": True}


@contextlib.contextmanager
def store_dir(name: str) -> Iterator[Path]:
    """A fresh temporary directory for one benchmark's stores."""
    with tempfile.TemporaryDirectory(prefix=f"sf-bench-{name}-") as tmp:
        yield Path(tmp)


def section(title: str) -> None:
    print(f"\n== {title}", flush=True)
