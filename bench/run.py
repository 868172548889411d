#!/usr/bin/env python
"""Benchmarks of singleflight-agents against its peers, on this machine, in one run.

    python bench/run.py            # full run (about a minute); rewrites docs/performance.md
    python bench/run.py --quick    # smoke run (< 30 s); writes no docs unless --docs PATH

Every store lives in its own temporary directory. Cross-process benchmarks use
``multiprocessing`` with the *spawn* start method, so every peer is a fresh interpreter
like a real second agent process; clocks across processes are compared with
``time.time()`` (one machine, one clock).

The exit status is 1 only if a correctness check failed (a tool executed more than
once, a crash was not taken over); missed performance targets are reported, not fatal.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import dataclasses
import datetime
import functools
import json
import math
import multiprocessing
import os
import platform
import pstats
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import diskcache

try:
    import singleflight_agents
except ImportError:  # run from a checkout without the package installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    import singleflight_agents

from singleflight_agents import Singleflight, ToolExecutionOptions

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs" / "performance.md"
SPAWN = multiprocessing.get_context("spawn")
HOLD_S = 0.1  # how long a cross-process holder runs its tool before finishing or failing


# -- configuration ------------------------------------------------------------------------


@dataclass(frozen=True)
class Config:
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
    import_runs: int
    profile_calls: int
    force_profile: bool = False  # break the warm hit down even when it beats diskcache


FULL = Config("full", hit_iterations=4_000, hit_repeats=25, miss_keys=2_000, miss_repeats=3,
              fanout_repeats=5, mp_repeats=3, wake_trials=50, crash_trials=10,
              failure_trials=20, import_runs=10, profile_calls=20_000)
QUICK = Config("quick", hit_iterations=500, hit_repeats=8, miss_keys=200, miss_repeats=1,
               fanout_repeats=1, mp_repeats=1, wake_trials=6, crash_trials=2,
               failure_trials=3, import_runs=3, profile_calls=2_000)


# -- results ------------------------------------------------------------------------------


@dataclass
class Row:
    bench: str
    metric: str
    value: str
    target: str = ""
    met: bool | None = None  # None: no target


@dataclass
class Results:
    rows: list[Row] = field(default_factory=list)
    numbers: dict[str, float] = field(default_factory=dict)  # raw values for the write-up
    failures: list[str] = field(default_factory=list)  # correctness checks that failed
    notes: list[str] = field(default_factory=list)  # extra sections for the write-up

    def add(self, bench: str, metric: str, value: str, target: str = "",
            met: bool | None = None) -> None:
        self.rows.append(Row(bench, metric, value, target, met))
        print(f"  {metric:<46} {value:<34} {_verdict(met) if target else ''}", flush=True)

    def check(self, ok: bool, what: str) -> bool:
        if not ok:
            self.failures.append(what)
        return ok

    def table(self) -> str:
        header = ("Benchmark", "Metric", "Result", "Target", "Met")
        body = [(r.bench, r.metric, r.value, r.target, _verdict(r.met) if r.target else "")
                for r in self.rows]
        widths = [max(len(line[i]) for line in [header, *body]) for i in range(len(header))]

        def line(cells: tuple[str, ...]) -> str:
            return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"

        rule = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
        return "\n".join([line(header), rule, *(line(cells) for cells in body)])


def _verdict(met: bool | None) -> str:
    return {True: "yes", False: "**NO**", None: ""}[met]


def pct(samples: Sequence[float], q: float) -> float:
    """Nearest-rank percentile, ``q`` in [0, 1]."""
    ordered = sorted(samples)
    return ordered[max(0, min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1))]


def us(ns: float) -> str:
    return f"{ns / 1000:.1f} µs"


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms"


@contextlib.contextmanager
def store_dir(name: str) -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix=f"sf-bench-{name}-") as tmp:
        yield Path(tmp)


def section(title: str) -> None:
    print(f"\n== {title}", flush=True)


# -- 1. warm cache hit --------------------------------------------------------------------


def _payload(x: int) -> dict[str, Any]:
    """The benchmarked tool: cheap, returns a small JSON-able result."""
    return {"query": x, "rows": [x, x * 2, x * 3], "ok": True}


async def _payload_async(x: int) -> dict[str, Any]:
    return _payload(x)


def _time_calls(func: Callable[[int], Any], arg: int, iterations: int, out: list[int]) -> None:
    clock = time.perf_counter_ns
    for _ in range(iterations):
        start = clock()
        func(arg)
        out.append(clock() - start)


async def _time_calls_async(func: Callable[[int], Any], arg: int, iterations: int,
                            out: list[int]) -> None:
    clock = time.perf_counter_ns
    for _ in range(iterations):
        start = clock()
        await func(arg)
        out.append(clock() - start)


def bench_warm_hit(cfg: Config, res: Results) -> None:
    section("1. warm cache hit (same argument, repeatedly)")
    with store_dir("hit") as tmp:
        sf = Singleflight(tmp / "receipts.db")
        ours = sf.tool(deterministic=True, tool_name="bench.hit")(_payload)
        ours_async = sf.tool(deterministic=True, tool_name="bench.hit_async")(_payload_async)
        cache = diskcache.Cache(str(tmp / "diskcache"))
        theirs = cache.memoize()(_payload)
        floor = functools.lru_cache(maxsize=None)(_payload)
        arg = 7
        ours(arg), asyncio.run(ours_async(arg)), theirs(arg), floor(arg)  # fill every cache

        samples: dict[str, list[int]] = {k: [] for k in ("sync", "async", "diskcache", "lru")}
        runs: list[Callable[[], None]] = [
            lambda: _time_calls(ours, arg, cfg.hit_iterations, samples["sync"]),
            lambda: asyncio.run(_time_calls_async(ours_async, arg, cfg.hit_iterations,
                                                  samples["async"])),
            lambda: _time_calls(theirs, arg, cfg.hit_iterations, samples["diskcache"]),
            lambda: _time_calls(floor, arg, cfg.hit_iterations, samples["lru"]),
        ]
        for repeat in range(cfg.hit_repeats):  # interleaved, in a rotating order
            for run in runs[repeat % 4:] + runs[:repeat % 4]:
                run()

        diskcache_median = statistics.median(samples["diskcache"])
        labels = {"sync": "singleflight, sync decorated call",
                  "async": "singleflight, async decorated call (await)",
                  "diskcache": "diskcache Cache.memoize() hit",
                  "lru": "functools.lru_cache hit (in-memory floor)"}
        for key, label in labels.items():
            median, p99 = statistics.median(samples[key]), pct(samples[key], 0.99)
            res.numbers[f"hit_{key}_median_ns"] = median
            res.numbers[f"hit_{key}_p99_ns"] = p99
            if key in ("sync", "async"):
                res.add("1 warm hit", f"{label}: median / p99", f"{us(median)} / {us(p99)}",
                        "median ≤ diskcache's", median <= diskcache_median)
            else:
                res.add("1 warm hit", f"{label}: median / p99", f"{us(median)} / {us(p99)}")
        _hit_beside_writer(cfg, res, tmp / "receipts.db", ours, theirs, arg)
        if statistics.median(samples["sync"]) > diskcache_median or cfg.force_profile:
            profile_warm_hit(cfg, res, sf, ours, theirs, cache, arg)
        cache.close()
        sf.close()


def _busy_writer(db_path: str, conn: Any) -> None:
    """A peer process that stores new receipts in a loop until told to stop."""
    sf = Singleflight(db_path)
    options = ToolExecutionOptions(deterministic=True, tool_name="bench.writer")
    conn.send("ready")
    stored = 0
    while not conn.poll():
        sf.execute_sync(_payload, 1_000_000_000 + stored, options=options)
        stored += 1
    conn.send(stored)
    sf.close()


def _hit_beside_writer(cfg: Config, res: Results, db_path: Path, ours: Callable[[int], Any],
                       theirs: Callable[[int], Any], arg: int) -> None:
    """Warm hits while another process keeps committing to the same store (so anything
    cached between hits must be revalidated), diskcache measured under the same load."""
    pipe, child = SPAWN.Pipe()
    writer = SPAWN.Process(target=_busy_writer, args=(str(db_path), child), daemon=True)
    writer.start()
    pipe.recv()
    start = time.perf_counter()
    samples: dict[str, list[int]] = {"sync": [], "diskcache": []}
    for repeat in range(cfg.hit_repeats):
        pair = [("sync", ours), ("diskcache", theirs)]
        for key, func in pair if repeat % 2 else reversed(pair):
            _time_calls(func, arg, cfg.hit_iterations // 2, samples[key])
    elapsed = time.perf_counter() - start
    pipe.send("stop")
    rate = pipe.recv() / elapsed
    writer.join()
    ours_median, theirs_median = (statistics.median(samples[k]) for k in ("sync", "diskcache"))
    res.numbers["hit_busy_sync_median_ns"] = ours_median
    res.numbers["hit_busy_diskcache_median_ns"] = theirs_median
    res.numbers["hit_busy_writer_rate"] = rate
    res.add("1 warm hit", f"beside a process storing {rate:,.0f} receipts/s: singleflight "
            "sync / diskcache, median (p99)",
            f"{us(ours_median)} ({us(pct(samples['sync'], 0.99))}) / {us(theirs_median)} "
            f"({us(pct(samples['diskcache'], 0.99))})")


def profile_warm_hit(cfg: Config, res: Results, sf: Singleflight, ours: Callable[[int], Any],
                     theirs: Callable[[int], Any], cache: diskcache.Cache, arg: int) -> None:
    """Where a warm hit spends its time: stage timings (no profiler) and cProfile shares."""
    why = "--profile given" if cfg.force_profile else "our hit is slower than diskcache's"
    print(f"  ({why}: profiling it)", flush=True)
    lines = ["### Where a warm hit spends its time", "",
             "Stage timings: each step of the hit path called on its own, median over "
             f"{cfg.profile_calls:,} calls taken in rounds across the steps (no profiler "
             "attached, so no profiler overhead).", ""]
    try:
        lines += _stage_breakdown(cfg, res, sf, ours, theirs, cache, arg)
    except Exception as exc:  # internals moved: the cProfile part still works
        lines.append(f"(stage breakdown unavailable: {type(exc).__name__}: {exc})")
    lines += ["", f"cProfile of {cfg.profile_calls:,} warm sync hits, functions by own time "
              "(tottime; cProfile inflates many small calls, so read shares, not absolutes):", ""]
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(cfg.profile_calls):
        ours(arg)
    profiler.disable()
    stats = pstats.Stats(profiler)
    entries = stats.stats  # type: ignore[attr-defined]
    total = sum(entry[2] for entry in entries.values())
    top = sorted(entries.items(), key=lambda item: item[1][2], reverse=True)[:15]
    lines += ["| function | own time share | calls per hit |", "|---|---|---|"]
    for (filename, lineno, name), (_cc, ncalls, tottime, _ct, _callers) in top:
        where = f"{Path(filename).name}:{lineno}" if filename != "~" else "builtin"
        lines.append(f"| `{name}` ({where}) | {tottime / total:.1%} | "
                     f"{ncalls / cfg.profile_calls:g} |")
    res.notes.append("\n".join(lines))
    print("\n".join("  " + line for line in lines), flush=True)


def _stage_breakdown(cfg: Config, res: Results, sf: Singleflight, ours: Callable[[int], Any],
                     theirs: Callable[[int], Any], cache: diskcache.Cache, arg: int) -> list[str]:
    # Private names on purpose: this explains the public call's cost step by step.
    from singleflight_agents import codec, fingerprint
    from singleflight_agents.fingerprint import encode_inputs, fingerprint_of
    from singleflight_agents.flights import FLIGHTS

    raw = ours.__wrapped__  # type: ignore[attr-defined]
    options = ours.singleflight_options  # type: ignore[attr-defined]
    name = options.tool_name
    if hasattr(fingerprint, "binder"):  # the engine's cached binder, where there is one
        bind_name, bind = "binder(f).bind", functools.partial(fingerprint.binder(raw).bind)
    else:
        bind_name, bind = "bind_arguments", functools.partial(fingerprint.bind_arguments, raw)
    bound = bind((arg,), {})
    inputs = encode_inputs(name, bound)
    call = sf._prepare(ours, (arg,), {}, None)
    receipt = sf.store.get(call.key)
    assert receipt is not None
    hit = sf._lookup(call)
    assert hit is not None
    dc_key = next(iter(cache.iterkeys()))

    # (label, step, kind): "top" steps make up the call, "sub" split the step above,
    # "peer" are diskcache's for comparison.
    stages = [
        ("whole call: `tool(x)`", lambda: ours(arg), "whole", "whole"),
        ("`_prepare` (bind + canonical JSON + SHA-256 fingerprint)",
         lambda: sf._prepare(ours, (arg,), {}, None), "top", "prepare"),
        (f"  of which `{bind_name}` (arguments by parameter name)",
         lambda: bind((arg,), {}), "sub", "bind"),
        ("  of which `encode_inputs` (canonical JSON)", lambda: encode_inputs(name, bound), "sub", "encode"),
        ("  of which `fingerprint_of` (header JSON + SHA-256)",
         lambda: fingerprint_of(name, inputs), "sub", "fingerprint"),
        ("`FLIGHTS.peek`", lambda: FLIGHTS.peek((sf.store.identity, call.key)), "top", "peek"),
        ("`_lookup` (get + verify + decode)", lambda: sf._lookup(call), "top", "lookup"),
        ("  of which `store.get` (the receipt, from SQLite or the store's memo)",
         lambda: sf.store.get(call.key), "sub", "get"),
        ("  of which `verify_receipt` (HMAC-SHA256; `_lookup` may skip it for a receipt "
         "object it already checked)",
         lambda: sf.verify_receipt(receipt), "sub", "verify"),
        ("  of which `codec.decode` (json.loads)",
         lambda: codec.decode(receipt.codec, receipt.output), "sub", "decode"),
        ("`_finish` (stats counters + ExecutionOutcome)",
         lambda: sf._finish(call, hit, time.perf_counter()), "top", "finish"),
        ("diskcache: whole memoized call", lambda: theirs(arg), "peer", "dc_whole"),
        ("diskcache: `Cache.get` alone (SQLite SELECT + unpickle)",
         lambda: cache.get(dc_key), "peer", "dc_get"),
    ]
    samples: list[list[int]] = [[] for _ in stages]
    clock, rounds = time.perf_counter_ns, 20
    for _ in range(rounds):  # round-robin, so a noisy moment hits every step alike
        for (_label, func, _kind, _id), taken in zip(stages, samples, strict=True):
            for _ in range(cfg.profile_calls // rounds):
                start = clock()
                func()
                taken.append(clock() - start)
    timings = [(label, statistics.median(got), kind)
               for (label, _func, kind, _id), got in zip(stages, samples, strict=True)]
    for (_label, _func, _kind, ident), got in zip(stages, samples, strict=True):
        res.numbers[f"stage_{ident}_ns"] = statistics.median(got)
    whole = timings[0][1]
    out = ["| step | median | share of our hit |", "|---|---|---|"]
    for label, value, _kind in timings:
        out.append(f"| {label} | {us(value)} | {value / whole:.0%} |")
    parts = sum(value for _label, value, kind in timings if kind == "top")
    out += ["", f"The top-level steps add up to {us(parts)} against the whole call's "
            f"{us(whole)}: the rest is the decorator wrapper and `_execute_sync` glue, and steps "
            "timed alone run with warmer caches than inside the call, so the sum is approximate."]
    return out


# -- 2. miss + store ----------------------------------------------------------------------


def bench_miss(cfg: Config, res: Results) -> None:
    section("2. miss + store (a distinct argument per call)")
    samples: dict[str, list[int]] = {"ours": [], "diskcache": []}
    wall: dict[str, float] = {"ours": 0.0, "diskcache": 0.0}
    with store_dir("miss") as tmp:
        sf = Singleflight(tmp / "receipts.db")
        ours = sf.tool(deterministic=True, tool_name="bench.miss")(_payload)
        cache = diskcache.Cache(str(tmp / "diskcache"))
        theirs = cache.memoize()(_payload)
        ours(-1), theirs(-1)  # open connections, start the heartbeat thread
        for repeat in range(cfg.miss_repeats):
            base = (repeat + 1) * 10_000_000
            for key, func in (("ours", ours), ("diskcache", theirs)):
                start = time.perf_counter()
                clock, out = time.perf_counter_ns, samples[key]
                for i in range(base, base + cfg.miss_keys):
                    t0 = clock()
                    func(i)
                    out.append(clock() - t0)
                wall[key] += time.perf_counter() - start
        res.notes.append(_miss_breakdown(sf, ours, cfg.miss_keys))
        cache.close()
        sf.close()
    total = cfg.miss_keys * cfg.miss_repeats
    labels = {"ours": "singleflight miss + store", "diskcache": "diskcache memoize miss + set"}
    for key, label in labels.items():
        rate = total / wall[key]
        median, p99 = statistics.median(samples[key]), pct(samples[key], 0.99)
        res.numbers[f"miss_{key}_rate"] = rate
        res.numbers[f"miss_{key}_median_ns"] = median
        res.add("2 miss + store", f"{label}: calls/s; median / p99",
                f"{rate:,.0f}/s; {us(median)} / {us(p99)}")


class StoreTimer:
    """Times calls of some methods of some objects (by shadowing them on the instance)."""

    def __init__(self) -> None:
        self.spent: dict[str, list[int]] = {}  # label -> [calls, total ns]
        self._lock = threading.Lock()
        self._patched: list[tuple[Any, str]] = []

    def wrap(self, owner: Any, attr: str, label: str) -> None:
        original = getattr(owner, attr)

        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter_ns()
            try:
                return original(*args, **kwargs)
            finally:
                elapsed = time.perf_counter_ns() - start
                with self._lock:
                    entry = self.spent.setdefault(label, [0, 0])
                    entry[0] += 1
                    entry[1] += elapsed

        setattr(owner, attr, timed)
        self._patched.append((owner, attr))
        self.spent.setdefault(label, [0, 0])  # report in the order wrapped

    def restore(self) -> None:
        for owner, attr in self._patched:
            delattr(owner, attr)  # the class's method shows through again
        self._patched.clear()


def _miss_breakdown(sf: Singleflight, ours: Callable[[int], Any], keys: int) -> str:
    """Where a miss spends its time: the store calls it makes, timed (private names)."""
    timer = StoreTimer()
    store: Any = sf.store
    try:
        for owner, attr, label in [
            (store, "get", "`store.get` (SELECT the receipt; 3 looks per miss)"),
            (store, "acquire", "`store.acquire` (lock file + write transaction)"),
            (store._locks, "try_lock", "  of which lock file open + flock + stat"),
            (store, "put", "`store.put` (write transaction, then unlink the lock file)"),
            (store._locks, "unlock", "  of which lock file unlink + close"),
            (store, "renew", "`store.renew` (heartbeat thread, overlaps the call)"),
            (store, "save_stats", "`store.save_stats` (stats flush, at most 1/s)"),
            (sf._signer, "sign", "`Signer.sign` (HMAC of the new receipt)"),
        ]:
            timer.wrap(owner, attr, label)
    except AttributeError as exc:
        timer.restore()
        return f"(miss breakdown unavailable: {exc})"
    start = time.perf_counter_ns()
    for i in range(50_000_000, 50_000_000 + keys):
        ours(i)
    whole = (time.perf_counter_ns() - start) / keys
    timer.restore()
    lines = ["### Where a miss spends its time", "",
             f"{keys:,} misses with the store's methods timed (some calls nest; `renew` runs in "
             "the heartbeat thread, concurrently).", "",
             "| step | calls per miss | time per miss | share |", "|---|---|---|---|",
             f"| whole miss: `tool(x)` with a new `x` | 1 | {us(whole)} | 100% |"]
    for label, (calls, total) in timer.spent.items():
        lines.append(f"| {label} | {calls / keys:.2f} | {us(total / keys)} | "
                     f"{total / keys / whole:.0%} |")
    print("\n".join("  " + line for line in lines), flush=True)
    return "\n".join(lines)


# -- 3. in-process fan-out ----------------------------------------------------------------


class _Counter:
    def __init__(self) -> None:
        self.value = 0
        self._lock = threading.Lock()

    def bump(self) -> None:
        with self._lock:
            self.value += 1


def bench_fanout(cfg: Config, res: Results) -> None:
    section("3. in-flight fan-out in one process (tool takes 50 ms)")
    with store_dir("fanout") as tmp:
        sf = Singleflight(tmp / "receipts.db")
        counter = _Counter()

        @sf.tool(deterministic=True, tool_name="bench.fanout_async")
        async def slow_async(key: str) -> str:
            counter.bump()
            await asyncio.sleep(0.05)
            return key

        @sf.tool(deterministic=True, tool_name="bench.fanout_sync")
        def slow_sync(key: str) -> str:
            counter.bump()
            time.sleep(0.05)
            return key

        async def gather(tool: Callable[..., Any], n: int, key: str) -> float:
            start = time.perf_counter()
            await asyncio.gather(*(sf.execute(tool, key) for _ in range(n)))
            return time.perf_counter() - start

        def threads(n: int, key: str) -> float:
            barrier = threading.Barrier(n + 1)

            def worker() -> None:
                barrier.wait()
                sf.execute_sync(slow_sync, key)

            pool = [threading.Thread(target=worker) for _ in range(n)]
            for thread in pool:
                thread.start()
            barrier.wait()
            start = time.perf_counter()
            for thread in pool:
                thread.join()
            return time.perf_counter() - start

        cases: list[tuple[str, Callable[[str], float]]] = [
            (f"{n:,} asyncio caller{'s' if n > 1 else ''}, async tool",
             functools.partial(lambda n, key: asyncio.run(gather(slow_async, n, key)), n))
            for n in (1, 10, 100, 1000)
        ]
        cases.append(("1,000 asyncio callers, sync tool",
                      lambda key: asyncio.run(gather(slow_sync, 1000, key))))
        cases.append(("32 threads, sync tool", lambda key: threads(32, key)))
        for index, (label, run) in enumerate(cases):
            executions, walls = [], []
            for repeat in range(cfg.fanout_repeats):
                counter.value = 0
                walls.append(run(f"case{index}-run{repeat}"))
                executions.append(counter.value)
            ok = res.check(all(e == 1 for e in executions), f"fan-out {label}: {executions}")
            overhead = statistics.median(walls) - 0.05
            res.numbers[f"fanout_{index}_overhead_s"] = overhead
            res.add("3 fan-out", f"{label}: executions; overhead over 50 ms",
                    f"{_executions(executions)}; {ms(overhead)} (max {ms(max(walls) - 0.05)})",
                    "1 execution", ok)
        sf.close()


def _executions(per_run: list[int]) -> str:
    if len(set(per_run)) == 1:
        return f"{per_run[0]} (each of {len(per_run)} runs)" if len(per_run) > 1 else str(
            per_run[0])
    return "/".join(map(str, per_run))


# -- cross-process workers ----------------------------------------------------------------
#
# Spawned interpreters import this file as ``__mp_main__``; the tools below therefore get
# explicit tool names, so that every process fingerprints them alike. ROLE says whether a
# process is the holder (it runs the slow path and reports "started" through CONN) or a
# waiter (its tool runs only if it has to take over or re-execute).

ROLE = "waiter"
CONN: Any = None
STATE: dict[str, float] = {}  # times a tool recorded during the current call
LOG_PATH = ""


def _started() -> None:
    STATE["t_start"] = time.time()
    if ROLE == "holder":
        CONN.send(("started", STATE["t_start"]))


def wake_tool(key: str) -> str:
    _started()
    if ROLE == "holder":
        time.sleep(HOLD_S)
    STATE["t_end"] = time.time()
    return key


async def wake_tool_async(key: str) -> str:
    _started()
    if ROLE == "holder":
        await asyncio.sleep(HOLD_S)
    STATE["t_end"] = time.time()
    return key


def crash_tool(key: str) -> str:
    _started()
    if ROLE == "holder":
        time.sleep(3600)  # until SIGKILLed
    return key


def fail_tool(key: str) -> str:
    _started()
    if ROLE == "holder":
        time.sleep(HOLD_S)
        STATE["t_raise"] = time.time()
        raise RuntimeError("the holder's tool failed")
    return key


async def fanout_tool(key: str) -> str:
    fd = os.open(LOG_PATH, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, f"{time.time()} {os.getpid()} {key}\n".encode())
    finally:
        os.close(fd)
    await asyncio.sleep(0.02)
    return key


TOOLS: dict[str, tuple[str, Callable[..., Any]]] = {
    "wake": ("bench.wake", wake_tool),
    "wake_async": ("bench.wake", wake_tool_async),  # same tool as "wake", async flavour
    "crash": ("bench.crash", crash_tool),
    "fail": ("bench.fail", fail_tool),
}


def _serve(role: str, db_path: str, conn: Any) -> None:
    """A peer process: runs ("call", tool, key, mode, options) commands until "stop"."""
    global ROLE, CONN
    ROLE, CONN = role, conn
    sf = Singleflight(db_path)
    conn.send(("ready", os.getpid()))
    while (message := conn.recv())[0] != "stop":
        _, tool_id, key, mode, extra = message
        tool_name, func = TOOLS[tool_id]
        options = ToolExecutionOptions(deterministic=True, tool_name=tool_name, **extra)
        STATE.clear()
        conn.send(("calling", time.time()))
        report: dict[str, Any] = {"source": None, "takeover": None, "error": None}
        try:
            if mode == "sync":
                outcome = sf.execute_sync(func, key, options=options)
                report["t_got"] = time.time()
            else:
                outcome, report["t_got"] = asyncio.run(_execute_async(sf, func, key, options))
            report.update(source=str(outcome.source), takeover=outcome.takeover)
        except Exception as exc:
            report.update(t_got=time.time(), error=type(exc).__name__)
        conn.send(("result", {**report, **STATE}))
    sf.close()


async def _execute_async(sf: Singleflight, func: Callable[..., Any], key: str,
                         options: ToolExecutionOptions) -> tuple[Any, float]:
    outcome = await sf.execute(func, key, options=options)
    return outcome, time.time()


class Peer:
    """A spawned ``_serve`` process and our end of its pipe."""

    def __init__(self, role: str, db_path: Path) -> None:
        self.conn, child = SPAWN.Pipe()
        self.process = SPAWN.Process(target=_serve, args=(role, str(db_path), child),
                                     daemon=True)
        self.process.start()
        child.close()
        self.expect("ready", timeout=60)

    def call(self, tool_id: str, key: str, mode: str = "sync", **options: Any) -> None:
        self.conn.send(("call", tool_id, key, mode, options))

    def expect(self, kind: str, timeout: float = 30) -> Any:
        """The payload of the next message of ``kind``; earlier kinds are skipped."""
        deadline = time.monotonic() + timeout
        while self.conn.poll(max(0.0, deadline - time.monotonic())):
            got, payload = self.conn.recv()
            if got == kind:
                return payload
        raise TimeoutError(f"peer {self.process.pid}: no {kind!r} within {timeout} s")

    def stop(self) -> None:
        with contextlib.suppress(OSError, BrokenPipeError):
            self.conn.send(("stop",))
        self.process.join(10)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()

    def kill(self) -> None:
        os.kill(self.process.pid, signal.SIGKILL)  # type: ignore[arg-type]
        self.process.join()


# -- 4. processes x keys ------------------------------------------------------------------


def _fanout_worker(db_path: str, log_path: str, keys: list[str], conn: Any) -> None:
    global LOG_PATH
    LOG_PATH = log_path
    sf = Singleflight(db_path)
    options = ToolExecutionOptions(deterministic=True, tool_name="bench.mp_fanout")
    timer = StoreTimer()  # time the event loop spends blocked in store calls
    for attr in ("get", "acquire", "put", "release", "last_failure", "save_stats"):
        with contextlib.suppress(AttributeError):
            timer.wrap(sf.store, attr, attr)
    conn.send(("ready", os.getpid()))
    start_at = conn.recv()
    time.sleep(max(0.0, start_at - time.time()))

    async def all_keys() -> list[str]:
        outcomes = await asyncio.gather(*(sf.execute(fanout_tool, k, options=options)
                                          for k in keys))
        return [str(outcome.source) for outcome in outcomes]

    sources = asyncio.run(all_keys())
    done = time.time()
    blocked = sum(total for _calls, total in timer.spent.values()) / 1e9
    conn.send(("done", done, sources, blocked))
    sf.close()


def bench_processes(cfg: Config, res: Results, processes: int = 8, keys: int = 20) -> None:
    section(f"4. {processes} processes x {keys} keys, all concurrent (tool takes 20 ms)")
    executions, walls, last_starts, blocked = [], [], [], []
    for repeat in range(cfg.mp_repeats):
        with store_dir("procs") as tmp:
            log = tmp / "executions.log"
            names = [f"run{repeat}-key{k}" for k in range(keys)]
            pipes, workers = [], []
            for _ in range(processes):
                ours, child = SPAWN.Pipe()
                worker = SPAWN.Process(target=_fanout_worker,
                                       args=(str(tmp / "receipts.db"), str(log), names, child))
                worker.start()
                pipes.append(ours)
                workers.append(worker)
            for pipe in pipes:
                assert pipe.recv()[0] == "ready"
            start_at = time.time() + 0.3  # every worker starts at this instant
            for pipe in pipes:
                pipe.send(start_at)
            finished = []
            for pipe in pipes:
                if not pipe.poll(120):
                    raise TimeoutError("a fan-out worker did not finish")
                _, t_done, _sources, in_store = pipe.recv()
                finished.append(t_done)
                blocked.append(in_store)
            for worker in workers:
                worker.join()
            starts = [float(line.split()[0]) for line in log.read_text().splitlines()]
            executions.append(len(starts))
            last_starts.append(max(starts) - start_at)
            walls.append(max(finished) - start_at)
    ok = res.check(all(e == keys for e in executions), f"{processes}x{keys}: {executions}")
    res.numbers["mp_wall_s"] = statistics.median(walls)
    res.add("4 processes", f"{processes} processes x {keys} keys: executions", _executions(executions),
            f"exactly {keys}", ok)
    res.add("4 processes", "wall time, start to last process done (median; max)",
            f"{ms(statistics.median(walls))}; {ms(max(walls))} (ideal 20 ms)")
    res.numbers["mp_last_start_s"] = statistics.median(last_starts)
    res.add("4 processes", f"last of the {keys} executions started after (median)",
            ms(statistics.median(last_starts)))
    res.numbers["mp_blocked_median_s"] = statistics.median(blocked)
    res.add("4 processes", "per process, event loop blocked in store calls (median; max)",
            f"{ms(statistics.median(blocked))}; {ms(max(blocked))}")


# -- 5. cross-process wake-up -------------------------------------------------------------


def bench_wakeup(cfg: Config, res: Results) -> None:
    section("5. cross-process wake-up (holder finishes -> waiter in another process has it)")
    with store_dir("wake") as tmp:
        holder, waiter = Peer("holder", tmp / "receipts.db"), Peer("waiter", tmp / "receipts.db")
        try:
            for mode in ("sync", "async"):
                latencies, skipped = [], 0
                for trial in range(cfg.wake_trials):
                    key = f"{mode}-{trial}"
                    holder.call("wake", key)
                    holder.expect("started")
                    waiter.call("wake" if mode == "sync" else "wake_async", key, mode)
                    got = waiter.expect("result")
                    held = holder.expect("result")
                    if got["source"] != "shared_wait":  # it did not wait: not a wake-up
                        skipped += 1
                        continue
                    latencies.append(got["t_got"] - held["t_end"])
                median, p95 = statistics.median(latencies), pct(latencies, 0.95)
                res.numbers[f"wake_{mode}_median_s"] = median
                note = f" ({skipped} trials did not wait, left out)" if skipped else ""
                res.add("5 wake-up", f"{mode} waiter, {len(latencies)} trials: median / p95",
                        f"{ms(median)} / {ms(p95)}{note}", "median < 5 ms", median < 0.005)
        finally:
            holder.stop()
            waiter.stop()


# -- 6. crash takeover --------------------------------------------------------------------


def bench_crash(cfg: Config, res: Results) -> None:
    section("6. crash takeover (holder SIGKILLed while executing)")
    latencies, takeovers = [], []
    with store_dir("crash") as tmp:
        waiter = Peer("waiter", tmp / "receipts.db")
        try:
            for trial in range(cfg.crash_trials):
                key = f"crash-{trial}"
                holder = Peer("holder", tmp / "receipts.db")
                holder.call("crash", key)
                holder.expect("started")
                waiter.call("crash", key)
                waiter.expect("calling")
                time.sleep(0.2)  # let the waiter block on the holder's lock
                killed_at = time.time()
                holder.kill()
                got = waiter.expect("result")
                latencies.append(got["t_got"] - killed_at)
                takeovers.append(bool(got["takeover"]))
        finally:
            waiter.stop()
    ok = res.check(all(takeovers), f"crash takeover flags: {takeovers}")
    res.numbers["crash_median_s"] = statistics.median(latencies)
    res.add("6 crash takeover", f"takeover=True in {sum(takeovers)}/{len(takeovers)} trials",
            f"{sum(takeovers)}/{len(takeovers)}", "all", ok)
    res.add("6 crash takeover", "SIGKILL -> waiter done: median / max",
            f"{ms(statistics.median(latencies))} / {ms(max(latencies))}", "≤ 3 s",
            max(latencies) <= 3.0)


# -- 7. failure fan-out -------------------------------------------------------------------


def bench_failure(cfg: Config, res: Results) -> None:
    section("7. failure fan-out (holder's tool raises)")
    with store_dir("fail") as tmp:
        holder, waiter = Peer("holder", tmp / "receipts.db"), Peer("waiter", tmp / "receipts.db")
        try:
            # (label, options, the waiter's time stamp that says it learned of the failure)
            variants: list[tuple[str, dict[str, Any], str]] = [
                ("default options: until the waiter's re-execution starts", {}, "t_start"),
                ("share_failures=True: until the waiter raises", {"share_failures": True},
                 "t_got"),
            ]
            for index, (label, extra, stamp) in enumerate(variants):
                latencies, skipped = [], 0
                for trial in range(cfg.failure_trials):
                    key = f"fail-{index}-{trial}"
                    holder.call("fail", key, **extra)
                    holder.expect("started")
                    waiter.call("fail", key, **extra)
                    got = waiter.expect("result")
                    held = holder.expect("result")
                    expected = ("executed", None) if not extra else (None, "SharedExecutionError")
                    if (got["source"], got["error"]) != expected or stamp not in got:
                        skipped += 1
                        continue
                    latencies.append(got[stamp] - held["t_raise"])
                median = statistics.median(latencies)
                res.numbers[f"fail_xproc_{index}_median_s"] = median
                note = f" ({skipped} trials unexpected, left out)" if skipped else ""
                res.add("7 failure", f"other process, {label}: median / max",
                        f"{ms(median)} / {ms(max(latencies))}{note}", "< 100 ms",
                        max(latencies) < 0.1)
        finally:
            holder.stop()
            waiter.stop()

    with store_dir("fail-local") as tmp:
        sf = Singleflight(tmp / "receipts.db")
        raised_at: list[float] = []

        @sf.tool(deterministic=True, tool_name="bench.fail_local")
        async def failing(key: str) -> str:
            await asyncio.sleep(0.05)
            raised_at.append(time.perf_counter())
            raise RuntimeError("the tool failed")

        async def caller(key: str) -> float:
            with contextlib.suppress(RuntimeError):
                await failing(key)
            return time.perf_counter()

        async def fan_out(key: str, n: int = 100) -> float:
            learned = await asyncio.gather(*(caller(key) for _ in range(n)))
            return max(learned) - raised_at[-1]  # when the last of them knew

        lasts = [asyncio.run(fan_out(f"local-{r}")) for r in range(max(3, cfg.failure_trials))]
        sf.close()
    res.numbers["fail_local_median_s"] = statistics.median(lasts)
    res.add("7 failure", "same process, 100 asyncio waiters: until the last raises "
            "(median / max)", f"{ms(statistics.median(lasts))} / {ms(max(lasts))}", "< 100 ms",
            max(lasts) < 0.1)


# -- 8. import time -----------------------------------------------------------------------


def bench_import(cfg: Config, res: Results) -> None:
    section("8. import time of singleflight_agents (fresh interpreter)")
    with tempfile.TemporaryDirectory(prefix="sf-bench-pycache-") as pycache:
        # As installed: bytecode cached (pip compiles it). The cache goes to a temporary
        # prefix, so nothing is written into the checkout.
        warm = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
        warm["PYTHONPYCACHEPREFIX"] = pycache
        cold = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}  # compiled at every import
        stdlib = _stdlib_imports()
        codes = {"pass": "pass", "package": "import singleflight_agents",
                 "stdlib": "import " + ", ".join(stdlib)}
        for code in codes.values():
            _run_python(code, warm)  # fill the bytecode cache
        times: dict[str, list[float]] = {k: [] for k in [*codes, "package_cold", "pass_cold"]}
        for _ in range(cfg.import_runs):  # interleaved, against drift
            for key, code in codes.items():
                times[key].append(_run_python(code, warm))
            times["package_cold"].append(_run_python(codes["package"], cold))
            times["pass_cold"].append(_run_python("pass", cold))
        # Per run: the package's cumulative time, and what each import made by one of its
        # modules cost (cumulative: with everything that import pulled in first).
        cumulative: list[int] = []
        direct: dict[tuple[str, str], list[int]] = {}
        own_total: list[int] = []
        for _ in range(cfg.import_runs):
            rows = _importtime("import singleflight_agents", warm)
            cumulative.append(rows["singleflight_agents"][1])
            own_total.append(sum(own for m, (own, _c, _p) in rows.items()
                                 if m.startswith("singleflight_agents")))
            for module, (_own, cum, parent) in rows.items():
                if parent.startswith("singleflight_agents") and not module.startswith(
                        "singleflight_agents"):
                    direct.setdefault((module, parent), []).append(cum)

    def over_bare(key: str, bare: str = "pass", pick: Callable[[list[float]], float] = (
            statistics.median)) -> float:
        return pick(times[key]) - pick(times[bare])

    def both(key: str, bare: str = "pass") -> str:  # the minimum is the least disturbed run
        return f"{ms(over_bare(key, bare))} (min {ms(over_bare(key, bare, min))})"

    package, runs = over_bare("package"), cfg.import_runs
    res.numbers["import_s"] = package
    res.add("8 import", f"`import singleflight_agents` minus `pass`: median of {runs} (min)",
            both("package"), "< 50 ms", package < 0.05)
    median_cum = statistics.median(cumulative) / 1e6
    res.numbers["import_cumulative_s"] = median_cum
    res.add("8 import", "same, `-X importtime` cumulative: median (min)",
            f"{ms(median_cum)} (min {ms(min(cumulative) / 1e6)})", "< 50 ms", median_cum < 0.05)
    res.add("8 import", "same without bytecode cache (PYTHONDONTWRITEBYTECODE=1)",
            both("package_cold", "pass_cold"))
    res.numbers["import_stdlib_s"] = over_bare("stdlib")
    res.add("8 import", f"for reference: just its {len(stdlib)} stdlib imports", both("stdlib"))
    heaviest = sorted(((statistics.median(v), m) for m, v in direct.items()), reverse=True)
    res.numbers["import_own_s"] = statistics.median(own_total) / 1e6
    res.notes.append(
        "### What `import singleflight_agents` spends its time on\n\n"
        f"`python -X importtime`, bytecode cached, median of {runs} runs: "
        f"{ms(median_cum)} in all, of which the package's own module bodies take "
        f"{ms(statistics.median(own_total) / 1e6)}. Every standard-library import a "
        "package module makes, with what that import pulled in (cumulative; an import "
        "that finds its module already loaded costs ~0 and is not listed):\n\n"
        "| import | made by | cumulative |\n|---|---|---|\n"
        + "\n".join(f"| `{module}` | `{parent}` | {t / 1000:.1f} ms |"
                    for t, (module, parent) in heaviest if t >= 200))


def _run_python(code: str, env: dict[str, str]) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], check=True, env=env, cwd=tempfile.gettempdir())
    return time.perf_counter() - start


def _stdlib_imports() -> list[str]:
    """Top-level modules that ``import singleflight_agents`` imports, outside the package."""
    import ast

    loaded = subprocess.run(  # only the package's modules that the import itself loads
        [sys.executable, "-c", "import sys, singleflight_agents; print('\\n'.join(m.__file__ "
         "for n, m in list(sys.modules.items()) if n.startswith('singleflight_agents')))"],
        check=True, capture_output=True, text=True, cwd=tempfile.gettempdir()).stdout.split()
    found: set[str] = set()
    for source in loaded:
        for node in ast.parse(Path(source).read_text()).body:
            if isinstance(node, ast.Import):
                found.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                found.add(node.module.split(".")[0])
    return sorted(found - {"__future__", "singleflight_agents"})


def _importtime(code: str, env: dict[str, str]) -> dict[str, tuple[int, int, str]]:
    """``{module: (self µs, cumulative µs, importing module)}`` from ``-X importtime``."""
    done = subprocess.run([sys.executable, "-X", "importtime", "-c", code], check=True, env=env,
                          capture_output=True, text=True, cwd=tempfile.gettempdir())
    lines = [line.removeprefix("import time:").split("|") for line in done.stderr.splitlines()
             if line.startswith("import time:") and "self [us]" not in line]
    rows: dict[str, tuple[int, int, str]] = {}
    stack: list[tuple[int, str]] = []  # a module's line comes after those it imported
    for own, cumulative, name in reversed(lines):
        depth = (len(name) - len(name.lstrip())) // 2
        while stack and stack[-1][0] >= depth:
            stack.pop()
        module = name.strip()
        rows[module] = (int(own), int(cumulative), stack[-1][1] if stack else "")
        stack.append((depth, module))
    return rows


# -- machine, report ----------------------------------------------------------------------


def machine() -> dict[str, str]:
    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "CPU": f"{cpu}, {cores} cores usable",
        "OS": f"{platform.system()} {platform.release()}",
        "Python": f"{platform.python_implementation()} {platform.python_version()}",
        "SQLite": sqlite3.sqlite_version,
        "singleflight-agents": getattr(singleflight_agents, "__version__", "?"),
        "diskcache": diskcache.__version__,
        "Date": datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
        "Load average at start (1/5/15 min)": _loadavg(),
    }


def _loadavg() -> str:
    try:
        return " / ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "unknown"


def write_docs(path: Path, cfg: Config, res: Results, info: dict[str, str],
               elapsed: float, command: str) -> None:
    n = res.numbers
    missed = [f"{r.bench}: {r.metric}" for r in res.rows if r.met is False]
    text = f"""# Performance

Measured by `bench/run.py` on one machine, every peer in the same run. Reproduce with:

```
{command}
```

({cfg.name} mode, took {elapsed:.0f} s, load average at the end {_loadavg()};
`python bench/run.py --quick` is a smoke run that writes no docs.)

## Machine

{chr(10).join(f"- **{k}**: {v}" for k, v in info.items())}

## Results

{res.table()}

Targets missed: {"none" if not missed else "; ".join(missed)}.
Correctness checks failed: {"none" if not res.failures else "; ".join(res.failures)}.

## What the numbers say

{_interpretation(n)}
"""
    for note in res.notes:
        text += "\n" + note + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    print(f"\nwrote {path}")


def _hit_gap(n: dict[str, float]) -> str:
    """Our hit's steps timed alone, from the breakdown (when it ran)."""
    if "stage_get_ns" not in n:
        return ""
    return (f"Timed alone, the steps cost: fingerprint {us(n['stage_prepare_ns'])}, "
            f"`store.get` {us(n['stage_get_ns'])}, HMAC check {us(n['stage_verify_ns'])} "
            f"(when it runs), decode {us(n['stage_decode_ns'])}, bookkeeping "
            f"{us(n['stage_finish_ns'])}, against diskcache's `Cache.get` "
            f"{us(n['stage_dc_get_ns'])}; see the breakdown below. ")


def _interpretation(n: dict[str, float]) -> str:
    """The write-up's prose, with this run's numbers in it; sections missing if not run."""
    parts = [
        "The machine is a small shared VM (other work ran beside the benchmark, see the load "
        "average above): absolute times moved by up to 2x between runs, so compare numbers "
        "taken in the same run, where the variants of a benchmark run interleaved."
    ]
    if "hit_sync_median_ns" in n:
        ratio = n["hit_sync_median_ns"] / n["hit_diskcache_median_ns"]
        verdict = (f"{ratio:.1f}x diskcache's {us(n['hit_diskcache_median_ns'])}" if ratio > 1
                   else f"{1 / ratio:.1f}x faster than diskcache's "
                   f"{us(n['hit_diskcache_median_ns'])}")
        parts.append(
            f"**Warm hit.** A hit fingerprints the arguments (bind them to the signature, "
            f"canonical JSON, SHA-256), asks SQLite for the receipt (at least one query per "
            f"call, so a write by another process is seen at once), checks its HMAC (the "
            f"engine skips that for a receipt object it has already checked) and decodes a "
            f"fresh copy of the value: {us(n['hit_sync_median_ns'])} per sync call, "
            f"{verdict}. diskcache's hit is one SQLite read and an unpickle, with no "
            f"fingerprint and no signature. {_hit_gap(n)}`lru_cache` "
            f"({us(n['hit_lru_median_ns'])}, mostly timer overhead) is the floor of a cache "
            f"that hands back a shared object instead of a copy. Next to a tool call of "
            f"milliseconds to seconds (an HTTP API, an LLM call), either hit is noise.")
        if "hit_busy_sync_median_ns" in n:
            parts.append(
                f"**Warm hit beside a writer.** While another process stores "
                f"{n['hit_busy_writer_rate']:,.0f} new receipts/s into the same store (so "
                f"anything remembered between hits has to be revalidated), our hit's median "
                f"is {us(n['hit_busy_sync_median_ns'])} against diskcache's "
                f"{us(n['hit_busy_diskcache_median_ns'])} under the same load.")
    if "miss_ours_rate" in n:
        parts.append(
            f"**Miss + store.** A miss looks for the receipt three times (fast path, before "
            f"and after taking the lease), writes two transactions (take the lease; store "
            f"the signed receipt and mark the lease done) and creates and removes the "
            f"per-key lock file: {n['miss_ours_rate']:,.0f} calls/s against diskcache's "
            f"{n['miss_diskcache_rate']:,.0f}/s, "
            f"{n['miss_diskcache_rate'] / n['miss_ours_rate']:.1f}x slower. That buys "
            f"exactly-once across processes, which a plain cache does not give: two "
            f"processes missing the same diskcache key both run the tool.")
    if "fanout_3_overhead_s" in n:
        parts.append(
            f"**Fan-out in one process.** Concurrent identical calls join one in-memory "
            f"flight and only its owner touches the store, so every case executed once. The "
            f"overhead over the tool's 50 ms grows with the number of callers: each one "
            f"still fingerprints its arguments, is woken through the event loop and decodes "
            f"its own copy of the result (1,000 async callers: "
            f"{ms(n['fanout_3_overhead_s'])}, about "
            f"{n['fanout_3_overhead_s'] / 1000 * 1e6:.0f} µs per caller).")
    if "mp_wall_s" in n:
        parts.append(
            f"**Processes.** 8 processes calling 20 keys at once ran each key exactly once. "
            f"Against the tool's 20 ms, the wall time was {ms(n['mp_wall_s'])}: the last "
            f"execution started {ms(n['mp_last_start_s'])} after the common start, since "
            f"taking a lease is a write transaction and the 8 processes queue for SQLite's "
            f"single write lock on 2 cores (each process's event loop spent a median "
            f"{ms(n['mp_blocked_median_s'])} blocked in store calls); storing the 20 receipts "
            f"queues the same way, and then every waiter wakes and reads.")
    if "wake_sync_median_s" in n:
        parts.append(
            f"**Wake-up, crash, failure.** Waiters in other processes block in `flock` on "
            f"the key's lock file, so the kernel wakes them the moment the holder lets go: "
            f"after it finished (median {ms(n['wake_sync_median_s'])} from the tool's "
            f"return to the waiter holding the result, including the holder's write), "
            f"failed, or was killed (takeover in {ms(n.get('crash_median_s', math.nan))}, "
            f"not after the 10 s lease lapses). A failed holder's waiter re-executes by "
            f"default, or raises `SharedExecutionError` with `share_failures=True`; in one "
            f"process every waiter gets the owner's exception from the shared future.")
    if "import_s" in n:
        parts.append(
            f"**Import.** `import singleflight_agents` costs {ms(n['import_s'])} of wall time "
            f"over a bare interpreter with bytecode cached ({ms(n['import_cumulative_s'])} by "
            f"`-X importtime`). Of that, the package's own module bodies take "
            f"{ms(n['import_own_s'])}; the rest is the standard library it imports: those "
            f"modules alone cost {ms(n['import_stdlib_s'])} of wall time (table at the end). "
            f"This VM is slow to start Python (a bare `python -c pass` takes about 20 ms).")
    return "\n\n".join(parts)


BENCHES: dict[str, Callable[[Config, Results], None]] = {
    "hit": bench_warm_hit,
    "miss": bench_miss,
    "fanout": bench_fanout,
    "processes": bench_processes,
    "wakeup": bench_wakeup,
    "crash": bench_crash,
    "failure": bench_failure,
    "import": bench_import,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke mode, < 30 s")
    parser.add_argument("--only", nargs="+", choices=sorted(BENCHES), help="run only these")
    parser.add_argument("--profile", action="store_true",
                        help="break the warm hit down even when it beats diskcache's")
    parser.add_argument("--docs", type=Path, default=None,
                        help=f"write the report here (default in full mode: {DOCS})")
    parser.add_argument("--no-docs", action="store_true", help="write no report")
    parser.add_argument("--json", type=Path, help="also write the rows and numbers as JSON")
    args = parser.parse_args(argv)
    cfg = QUICK if args.quick else FULL
    if args.profile:
        cfg = dataclasses.replace(cfg, force_profile=True)
    info = machine()
    print(f"singleflight-agents benchmarks ({cfg.name} mode)")
    for key, value in info.items():
        print(f"  {key}: {value}")

    res = Results()
    started = time.perf_counter()
    for name, bench in BENCHES.items():
        if not args.only or name in args.only:
            bench(cfg, res)
    elapsed = time.perf_counter() - started

    print(f"\n{res.table()}\n\n{cfg.name} mode took {elapsed:.1f} s")
    if res.failures:
        print("CORRECTNESS CHECKS FAILED: " + "; ".join(res.failures))
    docs = args.docs or (DOCS if not args.quick else None)
    if docs and not args.no_docs:
        if args.only:
            print("not writing docs: --only ran a subset")
        else:
            command = "python bench/run.py" + (" --quick" if args.quick else "")
            write_docs(docs, cfg, res, info, elapsed, command)
    if args.json:
        args.json.write_text(json.dumps({"mode": cfg.name, "machine": info,
                                         "rows": [asdict(r) for r in res.rows],
                                         "numbers": res.numbers, "failures": res.failures},
                                        indent=2))
    return 1 if res.failures else 0


if __name__ == "__main__":
    sys.exit(main())
