"""What every benchmark module shares: run sizes, the stores, the results table, timing and
formatting."""

from __future__ import annotations

import argparse
import contextlib
import itertools
import math
import os
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from singleflight_agents import Singleflight

# The stores every store-dependent benchmark measures, side by side in one run. The Redis
# store needs a secret; the SQLite store gets the same one, so both sign alike.
STORES = ("sqlite", "redis")
REDIS_URL = "redis://127.0.0.1:6379/14"  # run.py's --redis-url replaces it
SECRET = "singleflight-agents benchmark secret"
RUN_TAG = os.urandom(4).hex()  # every Redis key of this run starts with sf-bench-RUN_TAG-
_PREFIXES = itertools.count()


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
    model_iterations: int  # model turns: per repeat and variant (a quarter on Redis)
    model_repeats: int
    model_trials: int  # model turns: in-flight and eval-suite trials


FULL = Config("full", hit_iterations=4_000, hit_repeats=25, miss_keys=2_000, miss_repeats=3,
              fanout_repeats=5, mp_repeats=5, wake_trials=50, crash_trials=10,
              failure_trials=20, import_runs=25, model_iterations=400, model_repeats=15,
              model_trials=5)
QUICK = Config("quick", hit_iterations=300, hit_repeats=6, miss_keys=200, miss_repeats=1,
               fanout_repeats=1, mp_repeats=1, wake_trials=4, crash_trials=2,
               failure_trials=2, import_runs=3, model_iterations=40, model_repeats=3,
              model_trials=1)


@dataclass
class Row:
    bench: str
    metric: str
    value: str
    target: str = ""
    met: bool | None = None  # None: no target
    store: str = ""  # "" for rows that do not depend on the store


@dataclass
class Results:
    """The table rows, raw numbers for the write-up, failed correctness checks, and notes
    (such as why a store was left out)."""

    rows: list[Row] = field(default_factory=list)
    numbers: dict[str, float] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def add(self, bench: str, metric: str, value: str, target: str = "",
            met: bool | None = None, store: str = "") -> None:
        self.rows.append(Row(bench, metric, value, target, met, store))
        label = f"[{store}] {metric}" if store else metric
        print(f"  {label:<50} {value:<36} {verdict(met) if target else ''}", flush=True)

    def check(self, ok: bool, what: str) -> bool:
        """Record a failed correctness check (the run then exits with status 1)."""
        if not ok:
            self.failures.append(what)
        return ok

    def missed(self) -> list[str]:
        return [f"{row.bench}: {row.store + ' ' if row.store else ''}{row.metric}"
                for row in self.rows if row.met is False]

    def table(self) -> str:
        """The rows as a Markdown table, columns padded to line up."""
        header = ("Benchmark", "Store", "Metric", "Result", "Target", "Met")
        body = [(r.bench, r.store, r.metric, r.value, r.target, verdict(r.met) if r.target else "")
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


@contextlib.contextmanager
def store_url(store: str, tmp: Path) -> Iterator[str]:
    """A fresh, empty store of kind ``store``: a file in ``tmp``, or a Redis prefix of its
    own whose keys are deleted on exit."""
    if store == "sqlite":
        yield str(tmp / "receipts.db")
        return
    prefix = f"sf-bench-{RUN_TAG}-{next(_PREFIXES)}"
    try:
        yield f"{REDIS_URL}?prefix={prefix}"
    finally:
        drop_redis_keys(f"{prefix}:*")


def open_engine(url: str) -> Singleflight:
    """The engine on store ``url`` (in this process or a spawned one)."""
    return Singleflight(store=url, secret=SECRET)


def redis_problem(url: str) -> str | None:
    """Why the Redis store cannot be measured at ``url``, or None if a server answers."""
    try:
        import redis
    except ImportError:
        return "the redis client is not installed (pip install 'singleflight-agents[redis]')"
    try:
        client = redis.Redis.from_url(url, socket_connect_timeout=2, socket_timeout=2)
        client.ping()
        client.close()
    except (redis.RedisError, ValueError) as exc:
        return f"no Redis server answers at {url} ({exc})"
    return None


def redis_info(url: str) -> str:
    """The Redis server's version and the client's, for the machine description."""
    import redis

    client = redis.Redis.from_url(url, socket_connect_timeout=2, socket_timeout=2)
    try:
        server = client.info("server")
        return (f"{server['redis_version']} on {url} (same machine, TCP loopback), "
                f"redis-py {redis.__version__}")
    finally:
        client.close()


def drop_redis_keys(pattern: str) -> int:
    """Delete the keys of ``REDIS_URL``'s database that match ``pattern`` (SCAN, never
    KEYS); how many there were."""
    import redis

    client = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2, socket_timeout=10)
    try:
        names = list(client.scan_iter(match=pattern, count=1000))
        for start in range(0, len(names), 1000):
            client.delete(*names[start:start + 1000])
        return len(names)
    finally:
        client.close()


def section(title: str) -> None:
    print(f"\n== {title}", flush=True)


def store_list(text: str) -> list[str]:
    """``--stores sqlite,redis`` as a list; an unknown name is an argparse error."""
    stores = [name.strip() for name in text.split(",") if name.strip()]
    unknown = sorted(set(stores) - set(STORES))
    if unknown or not stores:
        raise argparse.ArgumentTypeError(f"unknown store {', '.join(unknown) or '(none)'}; "
                                         f"choose from {', '.join(STORES)}")
    return list(dict.fromkeys(stores))
