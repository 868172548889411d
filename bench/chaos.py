#!/usr/bin/env python
"""Chaos benchmark: processes call tools through one store while random ones are SIGKILLed.

    python bench/chaos.py --minutes 2 --processes 16 --stores sqlite,redis

The long run of tests/test_chaos.py. The workers, the driver and the checks are in
tests/_chaos_workers.py, whose docstring states the invariant checked: no leased
execution overlaps a live holder's or starts while a stored receipt of its key is valid
(fallbacks are counted), every worker that was not killed finishes, every served value
or error comes from an execution of the same key. Each store runs for --minutes, on a
fresh SQLite file or a Redis prefix of its own (deleted afterwards); the figures are
printed per store. The exit status is 1 if any check failed.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

# The chaos machinery lives beside the tests; spawned workers import it by plain name,
# finding it through the sys.path they inherit from this process.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import _chaos_workers as chaos
from common import STORES, store_list

SECRET = "singleflight-agents chaos benchmark secret"


def drop_prefix(url: str, prefix: str) -> int:
    import redis

    client = redis.Redis.from_url(url, socket_connect_timeout=2, socket_timeout=10)
    try:
        names = list(client.scan_iter(match=f"{prefix}:*", count=1000))
        for start in range(0, len(names), 1000):
            client.delete(*names[start:start + 1000])
        return len(names)
    finally:
        client.close()


def run_store(store: str, args: argparse.Namespace) -> chaos.Report:
    with tempfile.TemporaryDirectory(prefix="sf-chaos-") as tmp:
        prefix = f"sf-chaos-{os.urandom(4).hex()}"
        url = (str(Path(tmp) / "receipts.db") if store == "sqlite"
               else f"{args.redis_url}?prefix={prefix}")
        try:
            return chaos.run(url, SECRET, tmp, processes=args.processes,
                             seconds=args.minutes * 60, seed=args.seed,
                             kill_every=(args.kill_min, args.kill_max), grace=30.0)
        finally:
            if store == "redis":
                drop_prefix(args.redis_url, prefix)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=1.0, help="per store (default 1)")
    parser.add_argument("--processes", type=int, default=16, help="worker processes (default 16)")
    parser.add_argument("--stores", type=store_list, default=list(STORES),
                        help="comma-separated stores (default: sqlite,redis)")
    parser.add_argument("--seed", type=int, default=1, help="seed of keys, latencies, victims")
    parser.add_argument("--kill-min", type=float, default=0.5, help="seconds between kills, min")
    parser.add_argument("--kill-max", type=float, default=1.0, help="seconds between kills, max")
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/14",
                        help="Redis server and database (default: redis://127.0.0.1:6379/14)")
    args = parser.parse_args(argv)
    print(f"chaos: {args.processes} processes x {args.minutes:g} min per store, 50 keys, "
          f"tools {chaos.LATENCY[0] * 1000:.0f}-{chaos.LATENCY[1] * 1000:.0f} ms failing "
          f"{chaos.FAILURE_RATE:.0%}, lease {chaos.LEASE_SECONDS} s, wait timeout "
          f"{chaos.WAIT_TIMEOUT_SECONDS} s ({chaos.IMPATIENT_WAIT} s on some keys), "
          f"a SIGKILL every {args.kill_min:g}-{args.kill_max:g} s, seed {args.seed}", flush=True)
    failed = False
    for store in args.stores:
        began = time.monotonic()
        report = run_store(store, args)
        print(report.figures())
        print(f"  (startup, shutdown and checks: {time.monotonic() - began - report.seconds:.1f} s; "
              f"load average {', '.join(f'{x:.1f}' for x in os.getloadavg())})", flush=True)
        for line in report.violations[:50]:
            print(f"  VIOLATION {line}")
        failed = failed or bool(report.violations)
    print("FAILED: see the violations above" if failed else "all checks passed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
