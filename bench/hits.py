"""Benchmarks 1 and 2: a warm cache hit and a miss + store, against diskcache and lru_cache."""

from __future__ import annotations

import asyncio
import cProfile
import functools
import pstats
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import diskcache
from common import (
    Config,
    Results,
    payload,
    pct,
    section,
    store_dir,
    time_calls,
    time_calls_async,
    us,
)
from workers import SPAWN, busy_writer

from singleflight_agents import Singleflight


async def payload_async(x: int) -> dict[str, Any]:
    return payload(x)


def bench_warm_hit(cfg: Config, res: Results) -> None:
    section("1. warm cache hit (same argument, repeatedly)")
    with store_dir("hit") as tmp:
        sf = Singleflight(tmp / "receipts.db")
        ours = sf.tool(deterministic=True, tool_name="bench.hit")(payload)
        ours_async = sf.tool(deterministic=True, tool_name="bench.hit_async")(payload_async)
        cache = diskcache.Cache(str(tmp / "diskcache"))
        theirs = cache.memoize()(payload)
        floor = functools.lru_cache(maxsize=None)(payload)
        arg = 7
        ours(arg), asyncio.run(ours_async(arg)), theirs(arg), floor(arg)  # fill every cache

        samples: dict[str, list[int]] = {k: [] for k in ("sync", "async", "diskcache", "lru")}
        n = cfg.hit_iterations
        runs: list[Callable[[], None]] = [
            lambda: time_calls(ours, arg, n, samples["sync"]),
            lambda: asyncio.run(time_calls_async(ours_async, arg, n, samples["async"])),
            lambda: time_calls(theirs, arg, n, samples["diskcache"]),
            lambda: time_calls(floor, arg, n, samples["lru"]),
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
            if key in ("sync", "async"):
                res.add("1 warm hit", f"{label}: median / p99", f"{us(median)} / {us(p99)}",
                        "median ≤ diskcache's", median <= diskcache_median)
            else:
                res.add("1 warm hit", f"{label}: median / p99", f"{us(median)} / {us(p99)}")
        _hit_beside_writer(cfg, res, tmp / "receipts.db", ours, theirs, arg)
        cache.close()
        sf.close()


def _hit_beside_writer(cfg: Config, res: Results, db_path: Path, ours: Callable[[int], Any],
                       theirs: Callable[[int], Any], arg: int) -> None:
    """Warm hits while another process keeps committing to the same store (so anything
    cached between hits must be revalidated), diskcache measured under the same load."""
    pipe, child = SPAWN.Pipe()
    writer = SPAWN.Process(target=busy_writer, args=(str(db_path), child), daemon=True)
    writer.start()
    child.close()  # ours is gone: if the writer dies, recv() raises EOFError, not hangs
    pipe.recv()
    start = time.perf_counter()
    samples: dict[str, list[int]] = {"sync": [], "diskcache": []}
    pair = [("sync", ours), ("diskcache", theirs)]
    for repeat in range(cfg.hit_repeats):
        for key, func in pair if repeat % 2 else reversed(pair):
            time_calls(func, arg, cfg.hit_iterations // 2, samples[key])
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


def bench_miss(cfg: Config, res: Results) -> None:
    section("2. miss + store (a distinct argument per call)")
    samples: dict[str, list[int]] = {"ours": [], "diskcache": []}
    wall: dict[str, float] = {"ours": 0.0, "diskcache": 0.0}
    with store_dir("miss") as tmp:
        sf = Singleflight(tmp / "receipts.db")
        ours = sf.tool(deterministic=True, tool_name="bench.miss")(payload)
        cache = diskcache.Cache(str(tmp / "diskcache"))
        theirs = cache.memoize()(payload)
        ours(-1), theirs(-1)  # open connections, start the heartbeat thread
        for repeat in range(cfg.miss_repeats):
            base = (repeat + 1) * 10_000_000
            for key, func in (("ours", ours), ("diskcache", theirs)):
                clock, out = time.perf_counter_ns, samples[key]
                start = time.perf_counter()
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
        res.add("2 miss + store", f"{label}: calls/s; median / p99",
                f"{rate:,.0f}/s; {us(median)} / {us(p99)}")


def profile(cfg: Config, top: int = 15) -> None:
    """cProfile of warm hits and of misses, functions by own time (printed only).

    cProfile inflates many small calls: read the shares, not the absolute times.
    """
    with store_dir("profile") as tmp:
        sf = Singleflight(tmp / "receipts.db")
        tool = sf.tool(deterministic=True, tool_name="bench.profile")(payload)
        tool(0)

        def call_all(args: Sequence[int]) -> None:
            for arg in args:
                tool(arg)

        hits, misses = [0] * (cfg.hit_iterations * 5), range(1, cfg.miss_keys + 1)
        for label, args in (("warm hits", hits), ("misses", misses)):
            section(f"profile: {len(args):,} {label}, top {top} functions by own time")
            profiler = cProfile.Profile()
            profiler.runcall(call_all, args)
            pstats.Stats(profiler, stream=sys.stdout).sort_stats("tottime").print_stats(top)
        sf.close()
