"""The machine description and docs/performance.md, written from one run's results."""

from __future__ import annotations

import contextlib
import datetime
import os
import platform
import sqlite3
from pathlib import Path

import diskcache
from common import Config, Results, ms, us

import singleflight_agents


def machine() -> dict[str, str]:
    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {
        "CPU": f"{cpu}, {cores()} cores usable",
        "OS": f"{platform.system()} {platform.release()}",
        "Python": f"{platform.python_implementation()} {platform.python_version()}",
        "SQLite": sqlite3.sqlite_version,
        "singleflight-agents": singleflight_agents.__version__,
        "diskcache": diskcache.__version__,
        "Date": datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
        "Load average at start (1/5/15 min)": loadavg(),
    }


def cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def loadavg() -> str:
    try:
        return " / ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "unknown"


def write_docs(path: Path, cfg: Config, res: Results, info: dict[str, str], elapsed: float,
               command: str) -> None:
    missed, failed = res.missed(), res.failures
    machine_lines = "\n".join(f"- **{key}**: {value}" for key, value in info.items())
    text = f"""# Performance

Measured by `bench/run.py` on one machine, every peer in the same run. Reproduce with:

```
{command}
```

({cfg.name} mode, took {elapsed:.0f} s, load average at the end {loadavg()};
`python bench/run.py --quick` is a smoke run that writes no docs; `--profile` prints
cProfile tables of warm hits and misses.)

## Machine

{machine_lines}

## Results

{res.table()}

Targets missed: {"; ".join(missed) if missed else "none"}.
Correctness checks failed: {"; ".join(failed) if failed else "none"}.

## What the numbers say

{interpretation(res.numbers)}
"""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    print(f"\nwrote {path}")


def interpretation(n: dict[str, float]) -> str:
    """Short prose with this run's numbers; a paragraph is left out if its bench did not run."""
    parts = [
        "The machine is a small shared VM: absolute times move by up to 2x between runs, so "
        "compare numbers taken in the same run, where the variants of a benchmark ran "
        "interleaved. Medians are the figures to read; p99 and max show the VM's hiccups."
    ]
    if "hit_sync_median_ns" in n and "hit_busy_sync_median_ns" in n:
        ours, theirs = n["hit_sync_median_ns"], n["hit_diskcache_median_ns"]
        faster = f"{theirs / ours:.1f}x faster than" if ours <= theirs else f"{ours / theirs:.1f}x"
        parts.append(
            f"**Warm hit.** A hit fingerprints the arguments (canonical JSON, SHA-256), reads "
            f"the receipt from SQLite (so a write by another process is seen at once), checks "
            f"its HMAC unless already checked, and decodes a fresh copy of the value: "
            f"{us(ours)} per sync call, {faster} diskcache's {us(theirs)} (one SQLite read and "
            f"an unpickle). `lru_cache` ({us(n['hit_lru_median_ns'])}) is the in-memory floor. "
            f"Beside a process storing {n['hit_busy_writer_rate']:,.0f} receipts/s into the "
            f"same store: {us(n['hit_busy_sync_median_ns'])} against diskcache's "
            f"{us(n['hit_busy_diskcache_median_ns'])}. Next to a tool call of milliseconds or "
            f"more, either hit is noise.")
    if "miss_ours_rate" in n:
        ratio = n["miss_diskcache_rate"] / n["miss_ours_rate"]
        parts.append(
            f"**Miss + store.** A miss takes a lease (a write transaction and a per-key lock "
            f"file) and then stores the signed receipt (a second transaction): "
            f"{n['miss_ours_rate']:,.0f} calls/s against diskcache's "
            f"{n['miss_diskcache_rate']:,.0f}/s ({ratio:.1f}x). That buys exactly-once across "
            f"processes; two processes missing the same diskcache key both run the tool.")
    if "fanout_3_overhead_s" in n:
        overhead = n["fanout_3_overhead_s"]
        parts.append(
            f"**Fan-out in one process.** Identical concurrent calls join one in-memory "
            f"flight: every case executed once. The overhead grows with the callers, each of "
            f"which fingerprints its arguments and decodes its own copy (1,000 async callers: "
            f"{ms(overhead)}, about {overhead / 1000 * 1e6:.0f} µs each).")
    if "mp_wall_s" in n:
        parts.append(
            f"**Processes.** 8 processes x 20 keys ran each key exactly once, in "
            f"{ms(n['mp_wall_s'])} against the tool's 20 ms: the last execution started "
            f"{ms(n['mp_last_start_s'])} after the common start, because taking a lease is a "
            f"write transaction and the processes queue for SQLite's single write lock on "
            f"{cores()} cores (each event loop spent a median {ms(n['mp_blocked_median_s'])} "
            f"blocked in store calls).")
    if {"wake_sync_median_s", "crash_median_s", "fail_xproc_0_median_s"} <= n.keys():
        parts.append(
            f"**Wake-up, crash, failure.** A waiter in another process blocks in `flock` on "
            f"the key's lock file, so the kernel wakes it as soon as the holder lets go: after "
            f"it finished ({ms(n['wake_sync_median_s'])} median, the holder's write included), "
            f"was killed (takeover in {ms(n['crash_median_s'])}, not after the 10 s lease "
            f"lapses) or failed ({ms(n['fail_xproc_0_median_s'])} to the waiter's "
            f"re-execution).")
    if "import_package_s" in n:
        engine_min, stdlib_min = n["import_engine_min_s"], n["import_stdlib_min_s"]
        mostly = "most" if stdlib_min >= engine_min / 2 else "less than half"
        parts.append(
            f"**Import.** `import singleflight_agents` loads only the package's `__init__.py` "
            f"and `importlib` (the public names load on first use): "
            f"{ms(n['import_package_s'])} over a bare "
            f"interpreter, whose own start takes {ms(n['import_pass_s'])} here. The first "
            f"real use, `from singleflight_agents import Singleflight`, loads the engine: "
            f"{ms(n['import_engine_s'])}. The {n['import_stdlib_count']:.0f} standard-library "
            f"modules it loads take {ms(n['import_stdlib_s'])} imported alone; in the "
            f"fastest, least disturbed runs {ms(stdlib_min)} against {ms(engine_min)}: "
            f"{mostly} of the cost of first use is the standard library's.")
    return "\n\n".join(parts)
