#!/usr/bin/env python
"""Benchmarks of singleflight-agents against its peers, on this machine, in one run.

    python bench/run.py            # full run (a few minutes); rewrites docs/performance.md
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
from collections.abc import Callable, Iterator
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
    hit_iterations: int  # per repeat and variant
    hit_repeats: int
    miss_keys: int  # per repeat and variant
    miss_repeats: int
    fanout_repeats: int
    mp_repeats: int
    wake_trials: int  # per waiter kind (sync, async)
    crash_trials: int
    failure_trials: int  # per variant
    import_runs: int
    profile_calls: int


FULL = Config("full", hit_iterations=20_000, hit_repeats=5, miss_keys=2_000, miss_repeats=3,
              fanout_repeats=5, mp_repeats=3, wake_trials=50, crash_trials=10,
              failure_trials=20, import_runs=10, profile_calls=20_000)
QUICK = Config("quick", hit_iterations=2_000, hit_repeats=2, miss_keys=200, miss_repeats=1,
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


def pct(samples: list[float], q: float) -> float:
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
        for _ in range(cfg.hit_repeats):  # interleaved, so drift hits every variant alike
            _time_calls(ours, arg, cfg.hit_iterations, samples["sync"])
            asyncio.run(_time_calls_async(ours_async, arg, cfg.hit_iterations, samples["async"]))
            _time_calls(theirs, arg, cfg.hit_iterations, samples["diskcache"])
            _time_calls(floor, arg, cfg.hit_iterations, samples["lru"])

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
        if statistics.median(samples["sync"]) > diskcache_median:
            profile_warm_hit(cfg, res, sf, ours, theirs, cache, arg)
        cache.close()
        sf.close()


def profile_warm_hit(cfg: Config, res: Results, sf: Singleflight, ours: Callable[[int], Any],
                     theirs: Callable[[int], Any], cache: diskcache.Cache, arg: int) -> None:
    """Where a warm hit spends its time: stage timings (no profiler) and cProfile shares."""
    print("  (our hit is slower than diskcache's: profiling it)", flush=True)
    lines = ["### Where a warm hit spends its time", "",
             "Stage timings: each step of the hit path called on its own, median over "
             f"{cfg.profile_calls:,} calls (no profiler attached, so no profiler overhead).", ""]
    try:
        lines += _stage_breakdown(cfg, sf, ours, theirs, cache, arg)
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


def _stage_breakdown(cfg: Config, sf: Singleflight, ours: Callable[[int], Any],
                     theirs: Callable[[int], Any], cache: diskcache.Cache, arg: int) -> list[str]:
    # Private names on purpose: this explains the public call's cost step by step.
    from singleflight_agents import codec
    from singleflight_agents.fingerprint import bind_arguments, encode_inputs, fingerprint_of
    from singleflight_agents.flights import FLIGHTS

    raw = ours.__wrapped__  # type: ignore[attr-defined]
    options = ours.singleflight_options  # type: ignore[attr-defined]
    name = options.tool_name
    bound = bind_arguments(raw, (arg,), {})
    inputs = encode_inputs(name, bound)
    call = sf._prepare(ours, (arg,), {}, None)
    receipt = sf.store.get(call.key)
    assert receipt is not None
    hit = sf._lookup(call)
    assert hit is not None
    dc_key = next(iter(cache.iterkeys()))

    def median_ns(func: Callable[[], Any]) -> float:
        clock, samples = time.perf_counter_ns, []
        for _ in range(cfg.profile_calls):
            start = clock()
            func()
            samples.append(clock() - start)
        return statistics.median(samples)

    # (label, step, kind): "top" steps make up the call, "sub" split the step above,
    # "peer" are diskcache's for comparison.
    stages = [
        ("whole call: `tool(x)`", lambda: ours(arg), "whole"),
        ("`_prepare` (bind + canonical JSON + SHA-256 fingerprint)",
         lambda: sf._prepare(ours, (arg,), {}, None), "top"),
        ("  of which `bind_arguments` (inspect.Signature.bind)",
         lambda: bind_arguments(raw, (arg,), {}), "sub"),
        ("  of which `encode_inputs` (canonical JSON)", lambda: encode_inputs(name, bound), "sub"),
        ("  of which `fingerprint_of` (header JSON + SHA-256)",
         lambda: fingerprint_of(name, inputs), "sub"),
        ("`FLIGHTS.peek`", lambda: FLIGHTS.peek((sf.store.identity, call.key)), "top"),
        ("`_lookup` (get + verify + decode)", lambda: sf._lookup(call), "top"),
        ("  of which `store.get` (SQLite SELECT, Receipt build)",
         lambda: sf.store.get(call.key), "sub"),
        ("  of which `verify_receipt` (HMAC-SHA256 over 16 fields)",
         lambda: sf.verify_receipt(receipt), "sub"),
        ("  of which `codec.decode` (json.loads)",
         lambda: codec.decode(receipt.codec, receipt.output), "sub"),
        ("`_finish` (stats counters + ExecutionOutcome)",
         lambda: sf._finish(call, hit, time.perf_counter()), "top"),
        ("diskcache: whole memoized call", lambda: theirs(arg), "peer"),
        ("diskcache: `Cache.get` alone (SQLite SELECT + unpickle)",
         lambda: cache.get(dc_key), "peer"),
    ]
    timings = [(label, median_ns(func), kind) for label, func, kind in stages]
    whole = timings[0][1]
    out = ["| step | median | share of our hit |", "|---|---|---|"]
    for label, value, _kind in timings:
        out.append(f"| {label} | {us(value)} | {value / whole:.0%} |")
    parts = sum(value for _label, value, kind in timings if kind == "top")
    out += ["", f"The top-level steps add up to {us(parts)} of the {us(whole)} call; the rest "
            "is the decorator wrapper and `_execute_sync` glue."]
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
            (f"{n:,} asyncio callers, async tool",
             functools.partial(lambda n, key: asyncio.run(gather(slow_async, n, key)), n))
            for n in (10, 100, 1000)
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
        os.write(fd, f"{os.getpid()} {key}\n".encode())
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
    conn.send(("ready", os.getpid()))
    start_at = conn.recv()
    time.sleep(max(0.0, start_at - time.time()))

    async def all_keys() -> list[str]:
        outcomes = await asyncio.gather(*(sf.execute(fanout_tool, k, options=options)
                                          for k in keys))
        return [str(outcome.source) for outcome in outcomes]

    sources = asyncio.run(all_keys())
    conn.send(("done", time.time(), sources))
    sf.close()


def bench_processes(cfg: Config, res: Results, processes: int = 8, keys: int = 20) -> None:
    section(f"4. {processes} processes x {keys} keys, all concurrent (tool takes 20 ms)")
    executions, walls = [], []
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
                _, t_done, _sources = pipe.recv()
                finished.append(t_done)
            for worker in workers:
                worker.join()
            executions.append(len(log.read_text().splitlines()) if log.exists() else 0)
            walls.append(max(finished) - start_at)
    ok = res.check(all(e == keys for e in executions), f"{processes}x{keys}: {executions}")
    res.numbers["mp_wall_s"] = statistics.median(walls)
    res.add("4 processes", f"{processes} processes x {keys} keys: executions", _executions(executions),
            f"exactly {keys}", ok)
    res.add("4 processes", "wall time, start to last process done (median; max)",
            f"{ms(statistics.median(walls))}; {ms(max(walls))} (ideal 20 ms)")


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
            variants = (("default options: until the waiter's re-execution starts", {}, "t_start"),
                        ("share_failures=True: until the waiter raises", {"share_failures": True},
                         "t_got"))
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

    def run(code: str) -> float:
        start = time.perf_counter()
        subprocess.run([sys.executable, "-c", code], check=True, cwd=tempfile.gettempdir())
        return time.perf_counter() - start

    diffs = []
    for _ in range(cfg.import_runs):
        diffs.append(run("import singleflight_agents") - run("pass"))
    median = statistics.median(diffs)
    res.numbers["import_s"] = median
    res.add("8 import", f"`import singleflight_agents` minus `pass`, median of {len(diffs)}",
            ms(median), "< 50 ms", median < 0.05)

    # -X importtime: the package's own cumulative time, and the costliest modules it pulls in
    cumulative, selfs = [], {}
    baseline = _importtime("pass")
    for _ in range(cfg.import_runs):
        rows = _importtime("import singleflight_agents")
        cumulative.append(rows["singleflight_agents"][1])
        for module, (own, _cum) in rows.items():
            if module not in baseline:
                selfs.setdefault(module, []).append(own)
    median_cum = statistics.median(cumulative) / 1e6
    res.numbers["import_cumulative_s"] = median_cum
    heaviest = sorted(((statistics.median(v), m) for m, v in selfs.items()), reverse=True)[:6]
    res.add("8 import", "-X importtime cumulative (median)", ms(median_cum), "< 50 ms",
            median_cum < 0.05)
    res.notes.append("### Heaviest modules imported by `import singleflight_agents`\n\n"
                     "Own (self) import time, median of runs, `python -X importtime`; modules "
                     "a bare interpreter already has are left out.\n\n| module | self |\n|---|---|\n"
                     + "\n".join(f"| `{m}` | {t / 1000:.1f} ms |" for t, m in heaviest))


def _importtime(code: str) -> dict[str, tuple[int, int]]:
    """``{module: (self µs, cumulative µs)}`` from ``python -X importtime -c code``."""
    done = subprocess.run([sys.executable, "-X", "importtime", "-c", code], check=True,
                          capture_output=True, text=True, cwd=tempfile.gettempdir())
    rows = {}
    for line in done.stderr.splitlines():
        if not line.startswith("import time:") or "self [us]" in line:
            continue
        own, cumulative, module = line.removeprefix("import time:").split("|")
        rows[module.strip()] = (int(own), int(cumulative))
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
    }


def write_docs(path: Path, cfg: Config, res: Results, info: dict[str, str],
               elapsed: float, command: str) -> None:
    n = res.numbers
    ratio = n["hit_sync_median_ns"] / n["hit_diskcache_median_ns"]
    faster_or_slower = (f"{ratio:.2f}x diskcache's, i.e. slower" if ratio > 1
                        else f"{1 / ratio:.2f}x faster than diskcache's")
    miss_ratio = n["miss_diskcache_rate"] / n["miss_ours_rate"]
    missed = [f"{r.bench}: {r.metric}" for r in res.rows if r.met is False]
    text = f"""# Performance

Measured by `bench/run.py` on one machine, every peer in the same run. Reproduce with:

```
{command}
```

({cfg.name} mode, {elapsed:.0f} s; `python bench/run.py --quick` is a smoke run.)

## Machine

{chr(10).join(f"- **{k}**: {v}" for k, v in info.items())}

## Results

{res.table()}

Targets missed: {"none" if not missed else "; ".join(missed)}.
Correctness checks failed: {"none" if not res.failures else "; ".join(res.failures)}.

## What the numbers say

- **Warm hit.** A hit fingerprints the arguments (bind to the signature, canonical JSON,
  SHA-256), reads the receipt from SQLite, checks its HMAC and decodes a fresh copy of the
  value. That is {us(n["hit_sync_median_ns"])} per sync call, {faster_or_slower}
  ({us(n["hit_diskcache_median_ns"])}, which keys on the pickled arguments and unpickles the
  value, no signature). `lru_cache` ({us(n["hit_lru_median_ns"])}, mostly timer overhead)
  is the floor for any cache that hands back a shared object instead of a copy. Against a
  tool call that costs milliseconds to seconds (an API request, an LLM call), either is noise.
- **Miss + store.** A miss writes twice (take the lease, then store the signed receipt and
  mark the lease done) and creates/removes the per-key lock file, so it costs about
  {miss_ratio:.1f}x a diskcache miss ({n["miss_ours_rate"]:,.0f} vs
  {n["miss_diskcache_rate"]:,.0f} calls/s). That buys cross-process exactly-once, which a
  plain cache does not give: two diskcache processes with a cold key both run the tool.
- **Fan-out.** In one process, concurrent identical calls join one in-memory flight; the
  store is touched once by the owner, so 1,000 callers cost one execution and the overhead
  is the cost of scheduling 1,000 tasks and handing each a decoded copy of the result.
  Across {8} processes the flock on the per-key lock file makes {20} keys run exactly {20}
  times; the wall time over the tool's 20 ms is spawn-free (workers start together) and is
  mostly SQLite write serialisation on {info["CPU"].split(", ")[-1]}.
- **Wake-up and crash.** Waiters in other processes block in `flock`, so the kernel wakes
  them when the holder releases the lock, whether it finished, failed or was killed; the
  waiter then reads the receipt (wake-up) or takes the lease over (crash,
  `takeover=True`) without waiting for the {10:.0f} s lease to lapse.
- **Failures.** By default a waiter in another process re-executes after a failed holder
  (same wake-up path); with `share_failures=True` it raises `SharedExecutionError` instead.
  In one process all waiters get the owner's exception from the shared future.
- **Import.** The package imports only the standard library.
"""
    for note in res.notes:
        text += "\n" + note + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    print(f"\nwrote {path}")


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
    parser.add_argument("--docs", type=Path, default=None,
                        help=f"write the report here (default in full mode: {DOCS})")
    parser.add_argument("--no-docs", action="store_true", help="write no report")
    parser.add_argument("--json", type=Path, help="also write the rows and numbers as JSON")
    args = parser.parse_args(argv)
    cfg = QUICK if args.quick else FULL
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
