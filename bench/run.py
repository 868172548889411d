#!/usr/bin/env python
"""Benchmarks of singleflight-agents against its peers, on this machine, in one run.

    python bench/run.py            # full run (about two minutes); rewrites docs/performance.md
    python bench/run.py --quick    # smoke run (about a minute); writes no docs unless --docs PATH
    python bench/run.py --profile  # cProfile of warm hits and misses, printed; no benchmarks
    python bench/run.py --stores sqlite          # leave the Redis store out
    python bench/run.py --scale [--quick]        # bench/scale.py instead: costs against store size

The store-dependent benchmarks (1, 2, 4-7, 9) run on the SQLite store and on the Redis store
(--redis-url, default redis://127.0.0.1:6379/14; each benchmark under a prefix of its own,
deleted afterwards), interleaved in one run. Redis is left out, with the reason printed,
when no server answers.

The modules beside this file: common.py (run sizes, results, helpers), hits.py (1-2: warm
hit, miss), concurrency.py (3-7: fan-out, processes, wake-up, crash, failure), workers.py
(what runs in spawned processes), imports.py (8: import time), models.py (9: model turns
served from receipts against LangChain's InMemoryCache and the bare models), report.py (the
docs page; it keeps the page's hand-written sections, such as the chaos figures).

The exit status is 1 only if a correctness check failed (a tool executed more than
once, a crash was not taken over); missed performance targets are reported, not fatal.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

# bench/ is not a package: its modules import each other by plain name, so bench/ must be
# on sys.path. `python bench/run.py` puts it there already; this makes it explicit. Spawned
# worker processes get the parent's sys.path from multiprocessing, so they find workers.py.
sys.path.insert(0, str(Path(__file__).resolve().parent))

import common
import concurrency
import hits
import imports
import models
import report
from common import FULL, QUICK, REDIS_URL, RUN_TAG, STORES, Config, Results, store_list

DOCS = Path(__file__).resolve().parents[1] / "docs" / "performance.md"
BENCHES: dict[str, Callable[[Config, Results, list[str]], None]] = {
    "hit": hits.bench_warm_hit,
    "miss": hits.bench_miss,
    "fanout": concurrency.bench_fanout,
    "processes": concurrency.bench_processes,
    "wakeup": concurrency.bench_wakeup,
    "crash": concurrency.bench_crash,
    "failure": concurrency.bench_failure,
    "import": imports.bench_import,
    "models": models.bench_models,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke mode, about a minute")
    parser.add_argument("--only", nargs="+", choices=list(BENCHES), help="run only these")
    parser.add_argument("--profile", action="store_true",
                        help="print cProfile tables of warm hits and misses instead")
    parser.add_argument("--docs", type=Path, default=None,
                        help=f"write the report here (default in full mode: {DOCS})")
    parser.add_argument("--no-docs", action="store_true", help="write no report")
    parser.add_argument("--json", type=Path, help="also write the rows and numbers as JSON")
    parser.add_argument("--stores", type=store_list, default=list(STORES),
                        help="comma-separated stores to measure (default: sqlite,redis)")
    parser.add_argument("--redis-url", default=REDIS_URL,
                        help=f"the Redis server and database to use (default: {REDIS_URL})")
    parser.add_argument("--scale", action="store_true",
                        help="run bench/scale.py (costs against store size, issue 16) instead")
    args = parser.parse_args(argv)
    if args.scale:
        import scale

        return scale.main([*(["--quick"] if args.quick else []), "--redis-url", args.redis_url,
                           *(["--no-redis"] if "redis" not in args.stores else []),
                           *(["--json", str(args.json)] if args.json else [])])
    cfg = QUICK if args.quick else FULL
    common.REDIS_URL = args.redis_url
    res = Results()
    requested, stores = list(args.stores), list(args.stores)
    if "redis" in stores and (problem := common.redis_problem(args.redis_url)):
        stores.remove("redis")
        res.notes.append(f"Redis store not measured: {problem}")
        print(f"skipping the Redis store: {problem}")
    if not stores:
        print("no store left to measure")
        return 2
    if args.profile:
        hits.profile(cfg, stores[0])
        return 0

    info = report.machine(args.redis_url if "redis" in stores else None)
    print(f"singleflight-agents benchmarks ({cfg.name} mode)")
    for key, value in info.items():
        print(f"  {key}: {value}")
    started = time.perf_counter()
    try:
        for name, bench in BENCHES.items():
            if not args.only or name in args.only:
                began = time.perf_counter()
                bench(cfg, res, stores)
                print(f"  ({name}: {time.perf_counter() - began:.1f} s)", flush=True)
    finally:
        if "redis" in stores and (left := common.drop_redis_keys(f"sf-bench-{RUN_TAG}-*")):
            print(f"deleted {left} Redis keys the benchmarks left behind")
    elapsed = time.perf_counter() - started

    print(f"\n{res.table()}\n\n{cfg.name} mode took {elapsed:.1f} s")
    for note in res.notes:
        print(note)
    if res.failures:
        print("CORRECTNESS CHECKS FAILED: " + "; ".join(res.failures))
    docs = args.docs or (None if args.quick else DOCS)
    if docs and not args.no_docs:
        if args.only:
            print("not writing docs: --only ran a subset")
        else:
            command = "python bench/run.py" + (" --quick" if args.quick else "")
            if requested != list(STORES):
                command += " --stores " + ",".join(requested)
            report.write_docs(docs, cfg, res, info, elapsed, command)
    if args.json:
        rows = [dataclasses.asdict(row) for row in res.rows]
        args.json.write_text(json.dumps({"mode": cfg.name, "machine": info, "stores": stores,
                                         "rows": rows, "numbers": res.numbers,
                                         "failures": res.failures, "notes": res.notes},
                                        indent=2))
    return 1 if res.failures else 0


if __name__ == "__main__":
    sys.exit(main())
