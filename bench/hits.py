"""Benchmarks 1 and 2: a warm cache hit and a miss + store, on each store, against
diskcache and lru_cache, all variants interleaved."""

from __future__ import annotations

import asyncio
import contextlib
import cProfile
import functools
import pstats
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import common
import diskcache
from common import (
    Config,
    Results,
    open_engine,
    payload,
    pct,
    section,
    store_dir,
    store_url,
    time_calls,
    time_calls_async,
    us,
)
from workers import SPAWN, busy_writer

# Redis hits take ten times as long as SQLite's: a fraction of the iterations gives as
# stable a median in a fraction of the time.
REDIS_FEWER = 8


async def payload_async(x: int) -> dict[str, Any]:
    return payload(x)


def bench_warm_hit(cfg: Config, res: Results, stores: Sequence[str]) -> None:
    section("1. warm cache hit (same argument, repeatedly)")
    with store_dir("hit") as tmp, contextlib.ExitStack() as stack:
        funcs: dict[str, Callable[[int], Any]] = {}
        urls = {}
        for store in stores:
            urls[store] = stack.enter_context(store_url(store, tmp))
            sf = open_engine(urls[store])
            stack.callback(sf.close)  # before the store's keys are dropped
            funcs[f"{store}_sync"] = sf.tool(deterministic=True, tool_name="bench.hit")(payload)
            funcs[f"{store}_async"] = sf.tool(deterministic=True,
                                              tool_name="bench.hit_async")(payload_async)
        cache = diskcache.Cache(str(tmp / "diskcache"))
        stack.callback(cache.close)
        funcs["diskcache"] = cache.memoize()(payload)
        funcs["lru"] = functools.lru_cache(maxsize=None)(payload)
        if "redis" in stores:  # the floor of any call to the Redis store: one round trip
            import redis

            client = redis.Redis.from_url(common.REDIS_URL, decode_responses=True)
            stack.callback(client.close)
            funcs["ping"] = lambda _arg: client.ping()
        arg = 7
        samples: dict[str, list[int]] = {key: [] for key in funcs}
        runs: list[Callable[[], None]] = []
        for key, func in funcs.items():
            n = cfg.hit_iterations // (REDIS_FEWER if key in ("redis_sync", "redis_async", "ping")
                                       else 1)
            if key.endswith("_async"):
                asyncio.run(func(arg))  # fill every cache
                runs.append(lambda f=func, n=n, out=samples[key]: asyncio.run(
                    time_calls_async(f, arg, n, out)))
            else:
                func(arg)
                runs.append(lambda f=func, n=n, out=samples[key]: time_calls(f, arg, n, out))
        for repeat in range(cfg.hit_repeats):  # interleaved, in a rotating order
            turn = repeat % len(runs)
            for run in runs[turn:] + runs[:turn]:
                run()

        diskcache_median = statistics.median(samples["diskcache"])
        for store in stores:
            for flavour, label in (("sync", "sync decorated call"),
                                   ("async", "async decorated call (await)")):
                key = f"{store}_{flavour}"
                median, p99 = statistics.median(samples[key]), pct(samples[key], 0.99)
                res.numbers[f"{key}_hit_median_ns"] = median
                if store == "sqlite":
                    res.add("1 warm hit", f"singleflight, {label}: median / p99",
                            f"{us(median)} / {us(p99)}", "median ≤ diskcache's",
                            median <= diskcache_median, store=store)
                else:  # a network round trip per hit: no target against a local cache
                    res.add("1 warm hit", f"singleflight, {label}: median / p99",
                            f"{us(median)} / {us(p99)}", store=store)
        for key, label in (("ping", "redis-py PING, the round-trip floor"),
                           ("diskcache", "diskcache Cache.memoize() hit"),
                           ("lru", "functools.lru_cache hit (in-memory floor)")):
            if key in samples:
                median, p99 = statistics.median(samples[key]), pct(samples[key], 0.99)
                res.numbers[f"hit_{key}_median_ns"] = median
                res.add("1 warm hit", f"{label}: median / p99", f"{us(median)} / {us(p99)}",
                        store="redis" if key == "ping" else "")
        for store in stores:
            _hit_beside_writer(cfg, res, store, urls[store], funcs[f"{store}_sync"],
                               funcs["diskcache"], arg)


def _hit_beside_writer(cfg: Config, res: Results, store: str, url: str,
                       ours: Callable[[int], Any], theirs: Callable[[int], Any], arg: int) -> None:
    """Warm hits while another process keeps committing to the same store (so anything
    cached between hits must be revalidated), diskcache measured under the same load."""
    pipe, child = SPAWN.Pipe()
    writer = SPAWN.Process(target=busy_writer, args=(url, child), daemon=True)
    writer.start()
    child.close()  # ours is gone: if the writer dies, recv() raises EOFError, not hangs
    pipe.recv()
    start = time.perf_counter()
    samples: dict[str, list[int]] = {"sync": [], "diskcache": []}
    pair = [("sync", ours), ("diskcache", theirs)]
    n = cfg.hit_iterations // (2 * (REDIS_FEWER if store == "redis" else 1))
    for repeat in range(cfg.hit_repeats):
        for key, func in pair if repeat % 2 else reversed(pair):
            time_calls(func, arg, n, samples[key])
    elapsed = time.perf_counter() - start
    pipe.send("stop")
    rate = pipe.recv() / elapsed
    writer.join()
    ours_median, theirs_median = (statistics.median(samples[k]) for k in ("sync", "diskcache"))
    res.numbers[f"{store}_hit_busy_median_ns"] = ours_median
    res.numbers[f"{store}_hit_busy_diskcache_median_ns"] = theirs_median
    res.numbers[f"{store}_hit_busy_writer_rate"] = rate
    res.add("1 warm hit", f"beside a process storing {rate:,.0f} receipts/s into it: "
            "singleflight sync / diskcache, median (p99)",
            f"{us(ours_median)} ({us(pct(samples['sync'], 0.99))}) / {us(theirs_median)} "
            f"({us(pct(samples['diskcache'], 0.99))})", store=store)


def bench_miss(cfg: Config, res: Results, stores: Sequence[str]) -> None:
    section("2. miss + store (a distinct argument per call)")
    samples: dict[str, list[int]] = {key: [] for key in (*stores, "diskcache")}
    wall = dict.fromkeys(samples, 0.0)
    with store_dir("miss") as tmp, contextlib.ExitStack() as stack:
        funcs: dict[str, Callable[[int], Any]] = {}
        for store in stores:
            sf = open_engine(stack.enter_context(store_url(store, tmp)))
            stack.callback(sf.close)
            funcs[store] = sf.tool(deterministic=True, tool_name="bench.miss")(payload)
        cache = diskcache.Cache(str(tmp / "diskcache"))
        stack.callback(cache.close)
        funcs["diskcache"] = cache.memoize()(payload)
        for func in funcs.values():
            func(-1)  # open connections, start the heartbeat thread
        for repeat in range(cfg.miss_repeats):
            base = (repeat + 1) * 10_000_000
            for key, func in funcs.items():
                clock, out = time.perf_counter_ns, samples[key]
                start = time.perf_counter()
                for i in range(base, base + cfg.miss_keys):
                    t0 = clock()
                    func(i)
                    out.append(clock() - t0)
                wall[key] += time.perf_counter() - start
    total = cfg.miss_keys * cfg.miss_repeats
    for key in samples:
        rate = total / wall[key]
        median, p99 = statistics.median(samples[key]), pct(samples[key], 0.99)
        res.numbers[f"{key}_miss_rate"] = rate
        label = "diskcache memoize miss + set" if key == "diskcache" else "singleflight miss + store"
        res.add("2 miss + store", f"{label}: calls/s; median / p99",
                f"{rate:,.0f}/s; {us(median)} / {us(p99)}", store="" if key == "diskcache" else key)


def profile(cfg: Config, store: str, top: int = 15) -> None:
    """cProfile of warm hits and of misses on ``store``, functions by own time (printed
    only). cProfile inflates many small calls: read the shares, not the absolute times.
    """
    with store_dir("profile") as tmp, store_url(store, tmp) as url:
        sf = open_engine(url)
        tool = sf.tool(deterministic=True, tool_name="bench.profile")(payload)
        tool(0)

        def call_all(args: Sequence[int]) -> None:
            for arg in args:
                tool(arg)

        hits, misses = [0] * (cfg.hit_iterations * 5), range(1, cfg.miss_keys + 1)
        for label, args in (("warm hits", hits), ("misses", misses)):
            section(f"profile ({store}): {len(args):,} {label}, top {top} functions by own time")
            profiler = cProfile.Profile()
            profiler.runcall(call_all, args)
            pstats.Stats(profiler, stream=sys.stdout).sort_stats("tottime").print_stats(top)
        sf.close()
