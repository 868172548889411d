#!/usr/bin/env python
"""Benchmarks of singleflight-agents against its peers, on this machine, in one run.

    python bench/run.py            # full run (about a minute); rewrites docs/performance.md
    python bench/run.py --quick    # smoke run (< 30 s); writes no docs unless --docs PATH
    python bench/run.py --profile  # cProfile of warm hits and misses, printed; no benchmarks

The modules beside this file: common.py (run sizes, results, helpers), hits.py (1-2: warm
hit, miss), concurrency.py (3-7: fan-out, processes, wake-up, crash, failure), workers.py
(what runs in spawned processes), imports.py (8: import time), report.py (the docs page).

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

import concurrency
import hits
import imports
import report
from common import FULL, QUICK, Config, Results

DOCS = Path(__file__).resolve().parents[1] / "docs" / "performance.md"
BENCHES: dict[str, Callable[[Config, Results], None]] = {
    "hit": hits.bench_warm_hit,
    "miss": hits.bench_miss,
    "fanout": concurrency.bench_fanout,
    "processes": concurrency.bench_processes,
    "wakeup": concurrency.bench_wakeup,
    "crash": concurrency.bench_crash,
    "failure": concurrency.bench_failure,
    "import": imports.bench_import,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke mode, < 30 s")
    parser.add_argument("--only", nargs="+", choices=list(BENCHES), help="run only these")
    parser.add_argument("--profile", action="store_true",
                        help="print cProfile tables of warm hits and misses instead")
    parser.add_argument("--docs", type=Path, default=None,
                        help=f"write the report here (default in full mode: {DOCS})")
    parser.add_argument("--no-docs", action="store_true", help="write no report")
    parser.add_argument("--json", type=Path, help="also write the rows and numbers as JSON")
    args = parser.parse_args(argv)
    cfg = QUICK if args.quick else FULL
    if args.profile:
        hits.profile(cfg)
        return 0

    info = report.machine()
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
    docs = args.docs or (None if args.quick else DOCS)
    if docs and not args.no_docs:
        if args.only:
            print("not writing docs: --only ran a subset")
        else:
            command = "python bench/run.py" + (" --quick" if args.quick else "")
            report.write_docs(docs, cfg, res, info, elapsed, command)
    if args.json:
        rows = [dataclasses.asdict(row) for row in res.rows]
        args.json.write_text(json.dumps({"mode": cfg.name, "machine": info, "rows": rows,
                                         "numbers": res.numbers, "failures": res.failures},
                                        indent=2))
    return 1 if res.failures else 0


if __name__ == "__main__":
    sys.exit(main())
