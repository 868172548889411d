"""The machine description and docs/performance.md, written from one run's results."""

from __future__ import annotations

import contextlib
import datetime
import importlib.metadata
import os
import platform
import sqlite3
from pathlib import Path

import diskcache
from common import Config, Results, ms, redis_info, us

import singleflight_agents


def machine(redis_url: str | None = None) -> dict[str, str]:
    """The machine and the software measured; the Redis server's version if ``redis_url``."""
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
        **({"Redis": redis_info(redis_url)} if redis_url else {}),
        "singleflight-agents": singleflight_agents.__version__,
        "diskcache": diskcache.__version__,
        "openai-agents / langchain-core (benchmark 9)": " / ".join(
            _version(name) for name in ("openai-agents", "langchain-core")),
        "Date": datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
        "Load average at start (1/5/15 min)": loadavg(),
    }


def _version(distribution: str) -> str:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def loadavg() -> str:
    try:
        return " / ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "unknown"


# The sections of docs/performance.md this module writes; any other `## ` section of the page
# (the chaos figures of bench/chaos.py) is hand-written and kept as it is, after these.
GENERATED_SECTIONS = ("Machine", "Results", "What the numbers say")


def kept_sections(path: Path) -> str:
    """The `## ` sections of the page at ``path`` that the run does not write, verbatim and
    in order ("" if none, or no page yet)."""
    if not path.exists():
        return ""
    kept, keep = [], False
    for line in path.read_text().splitlines(keepends=True):
        if line.startswith("## "):
            keep = line[3:].strip() not in GENERATED_SECTIONS
        if keep:
            kept.append(line)
    return "".join(kept).rstrip("\n")


def write_docs(path: Path, cfg: Config, res: Results, info: dict[str, str], elapsed: float,
               command: str) -> None:
    missed, failed = res.missed(), res.failures
    machine_lines = "\n".join(f"- **{key}**: {value}" for key, value in info.items())
    notes = "".join(f"\n{note}" for note in res.notes)
    text = f"""# Performance

Measured by `bench/run.py` on one machine, every peer in the same run. Reproduce with:

```
{command}
```

({cfg.name} mode, took {elapsed:.0f} s, load average at the end {loadavg()};
`python bench/run.py --quick` is a smoke run that writes no docs; `--profile` prints
cProfile tables of warm hits and misses; `--stores sqlite` leaves Redis out.)

The Store column says which store a row measured: `sqlite` is the default store (a file),
`redis` the Redis store on a server on this machine (`--redis-url`, a database and key
prefix of the benchmark's own, deleted afterwards). The stores take turns within each
benchmark, so both meet the same moments of the machine.{notes}

## Machine

{machine_lines}

## Results

{res.table()}

Targets missed: {"; ".join(missed) if missed else "none"}.
Correctness checks failed: {"; ".join(failed) if failed else "none"}.

## What the numbers say

{interpretation(res.numbers)}
"""
    if kept := kept_sections(path):
        text += f"\n{kept}\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    print(f"\nwrote {path}")


def _once(n: dict[str, float], store: str) -> str:
    if n.get(f"{store}_mp_exactly_once") == 1.0:
        return "ran each key exactly once"
    return "did NOT run each key exactly once (see the failed checks above)"


def _times(this: float, that: float) -> str:
    """How ``this`` compares to ``that``: "3.2x", "about the same as" or "1.5x faster than"."""
    ratio = this / that
    if 0.9 <= ratio <= 1.1:
        return "about the same as"
    return f"{ratio:.1f}x" if ratio > 1 else f"{1 / ratio:.1f}x faster than"


def _blocked(seconds: float) -> str:
    """A loop's blocked time; "none" below 0.05 ms (what ``ms`` would print as 0.0 ms)."""
    return "none" if seconds < 0.00005 else ms(seconds)


def interpretation(n: dict[str, float]) -> str:
    """Short prose with this run's numbers; a paragraph is left out if its bench did not run."""
    parts = [
        "The machine is a small shared VM: absolute times move by up to 2x between runs, so "
        "compare numbers taken in the same run, where the variants of a benchmark ran "
        "interleaved. Medians are the figures to read; p99 and max show the VM's hiccups."
    ]
    if "sqlite_sync_hit_median_ns" in n and "sqlite_hit_busy_median_ns" in n:
        ours, theirs = n["sqlite_sync_hit_median_ns"], n["hit_diskcache_median_ns"]
        parts.append(
            f"**Warm hit.** A repeated call with plain arguments (str, int, bool, None) finds "
            f"its key remembered per tool (other arguments are fingerprinted: canonical JSON, "
            f"SHA-256). SQLite is asked whether the file changed since this thread last read it "
            f"(`PRAGMA data_version`, so a write by another process is seen at once); if not, "
            f"the store hands back the receipt object it read before, which the engine "
            f"recognises as already checked (no HMAC again), and the hit decodes a fresh copy "
            f"of the value: {us(ours)} per sync call, {_times(ours, theirs)} diskcache's "
            f"{us(theirs)} (one SQLite read and an unpickle). `lru_cache` "
            f"({us(n['hit_lru_median_ns'])}) is the in-memory floor. Beside a process storing "
            f"{n['sqlite_hit_busy_writer_rate']:,.0f} receipts/s into the same store, whose "
            f"commits change the file, so that the first hit after each reads the row again "
            f"and compares it with the receipt checked before (equal: no HMAC): "
            f"{us(n['sqlite_hit_busy_median_ns'])} against "
            f"diskcache's {us(n['sqlite_hit_busy_diskcache_median_ns'])}. Next to a tool call "
            f"of milliseconds or more, either hit is noise.")
    if "sqlite_miss_rate" in n:
        ratio = n["diskcache_miss_rate"] / n["sqlite_miss_rate"]
        parts.append(
            f"**Miss + store.** A miss reads, takes a lease (a write transaction and a per-key "
            f"lock file) and then stores the signed receipt (a second transaction, which also "
            f"deletes the lease's row; the heartbeat thread stays up between misses): "
            f"{n['sqlite_miss_rate']:,.0f} calls/s against diskcache's "
            f"{n['diskcache_miss_rate']:,.0f}/s ({ratio:.1f}x). That buys exactly-once across "
            f"processes; two processes missing the same diskcache key both run the tool.")
    if "fanout_3_overhead_s" in n:
        overhead = n["fanout_3_overhead_s"]
        parts.append(
            f"**Fan-out in one process.** Identical concurrent calls join one in-memory "
            f"flight: every case executed once. The overhead grows with the callers, each of "
            f"which keys its call (the first fingerprints the arguments, the others find the "
            f"key remembered) and decodes its own copy (1,000 async callers: "
            f"{ms(overhead)}, about {overhead / 1000 * 1e6:.0f} µs each).")
    if "sqlite_mp_wall_s" in n:
        parts.append(
            f"**Processes.** 8 processes x 20 keys {_once(n, 'sqlite')}, in "
            f"{ms(n['sqlite_mp_wall_s'])} against the tool's 20 ms: the last execution started "
            f"{ms(n['sqlite_mp_last_start_s'])} after the common start: taking a lease is a "
            f"write transaction, and the processes queue for SQLite's single write lock on "
            f"{cores()} cores. They queue in store threads: an async call's lease and store "
            f"run off its event loop, and only its first look, a read of the local file, runs "
            f"on the loop (each loop spent a median "
            f"{_blocked(n['sqlite_mp_blocked_median_s'])} blocked in store calls in all).")
    if {"sqlite_wake_sync_median_s", "sqlite_crash_median_s",
            "sqlite_fail_xproc_0_median_s"} <= n.keys():
        parts.append(
            f"**Wake-up, crash, failure.** A waiter in another process blocks in `flock` on "
            f"the key's lock file, so the kernel wakes it as soon as the holder lets go: after "
            f"it finished ({ms(n['sqlite_wake_sync_median_s'])} median, the holder's write "
            f"included), was killed (takeover in {ms(n['sqlite_crash_median_s'])}, not after "
            f"the {n['sqlite_crash_lease_s']:g} s lease lapses) or failed "
            f"({ms(n['sqlite_fail_xproc_0_median_s'])} to the waiter's re-execution).")
    parts += _redis_interpretation(n)
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
    parts += _models_interpretation(n)
    return "\n\n".join(parts)


def _models_interpretation(n: dict[str, float]) -> list[str]:
    """Model turns from receipts against LangChain's InMemoryCache and the bare models."""
    if not {"models_sqlite_openai_median_ns", "models_sqlite_lc_median_ns",
            "models_inflight_sqlite_lc_calls", "models_eval_plain_calls"} <= n.keys():
        return []

    def on_redis(key: str) -> str:
        return f" ({us(n[key])} on Redis)" if key in n else ""

    bare, cached = n["models_lc_bare_median_ns"], n["models_lc_inmemory_median_ns"]
    if cached <= bare:
        peer = (f"an `InMemoryCache` hit costs {us(cached)}, no more than the bare fake model's "
                f"{us(bare)} (a hit skips the model's `_generate`)")
    else:
        peer = (f"an `InMemoryCache` hit costs {us(cached)}, {us(cached - bare)} over the bare "
                f"fake model's {us(bare)}")
    receipt_lc = n["models_sqlite_lc_median_ns"]
    shared_wall, cached_wall = (n["models_inflight_sqlite_lc_wall_s"],
                                n["models_inflight_lc_inmemory_wall_s"])
    warm = (
        f"**Model turns.** A turn served from a receipt is a tool hit plus the framework's "
        f"objects: the wrapper builds the request (messages or input items, settings, tool "
        f"schemas) as JSON, fingerprints it, reads the signed receipt (its HMAC checked on "
        f"the first read only, as for a tool hit), and rebuilds the response. OpenAI Agents "
        f"SDK: `get_response` from a receipt takes "
        f"{us(n['models_sqlite_openai_median_ns'])} on SQLite"
        f"{on_redis('models_redis_openai_median_ns')}, against "
        f"{us(n['models_openai_direct_median_ns'])} for the `ScriptedModel` called directly, "
        f"{us(n['models_sqlite_openai_overhead_ns'])} over that floor. LangChain: {peer}; "
        f"`receipt_chat_model` serves the turn in {us(receipt_lc)}"
        f"{on_redis('models_redis_lc_median_ns')}, {_times(receipt_lc, cached)} the "
        f"`InMemoryCache` hit. LangChain's cache is a dict in one process: unsigned, gone "
        f"with the process, shared with no other process or CI job. Either hit is a "
        f"fraction of a millisecond against a model call of hundreds of milliseconds.")
    inflight = (
        f"**Model turns in flight.** What the cache does not do is share a turn while it runs: "
        f"16 concurrent identical `ainvoke`s of a model that takes 50 ms made "
        f"{n['models_inflight_lc_inmemory_calls']:.0f} inner calls with `InMemoryCache` (all "
        f"missed before the first answer was stored) and "
        f"{n['models_inflight_lc_bare_calls']:.0f} without a cache, "
        f"{n['models_inflight_sqlite_lc_calls']:.0f} through `receipt_chat_model` and "
        f"{n['models_inflight_sqlite_openai_calls']:.0f} through `receipt_model` (16 "
        f"`get_response`s). The wall time is {_wall_compared(shared_wall, cached_wall)} "
        f"({ms(n['models_inflight_sqlite_lc_wall_s'])} against "
        f"{ms(n['models_inflight_lc_inmemory_wall_s'])}): the 16 calls ran in parallel, so "
        f"what sharing saves is 15 calls' tokens and rate limit, not time.")
    evals = (
        f"**An eval suite.** 20 cases of a two-turn agent (`Runner.run`: a tool call, then the "
        f"answer; the model takes 20 ms a turn), 5 distinct questions, run one after another: "
        f"{n['models_eval_plain_calls']:.0f} model calls and "
        f"{ms(n['models_eval_plain_wall_s'])} with the plain model; recording through "
        f"`receipt_model`, {n['models_eval_sqlite_cold_calls']:.0f} calls and "
        f"{ms(n['models_eval_sqlite_cold_wall_s'])} (each distinct turn once, the repeats "
        f"served from receipts); replayed by a second engine in `mode=\"replay\"`, as a CI job "
        f"would, {n['models_eval_sqlite_replay_calls']:.0f} calls and "
        f"{ms(n['models_eval_sqlite_replay_wall_s'])}, the agent loop and the tool still "
        f"running. With a real model the saving is the calls' seconds and tokens.")
    return [warm, inflight, evals]


def _wall_compared(shared: float, unshared: float) -> str:
    """How the wall time of a shared turn compares to unshared ones run in parallel."""
    ratio = shared / unshared
    if 0.9 <= ratio <= 1.1:
        return "about the same either way"
    return "no shorter with sharing" if ratio > 1 else "somewhat shorter with sharing"


def _redis_interpretation(n: dict[str, float]) -> list[str]:
    """The Redis store against SQLite, for the benchmarks that ran on both."""
    parts = []
    if {"redis_sync_hit_median_ns", "sqlite_sync_hit_median_ns", "hit_ping_median_ns",
            "redis_miss_rate", "sqlite_miss_rate"} <= n.keys():
        hit, ping = n["redis_sync_hit_median_ns"], n["hit_ping_median_ns"]
        parts.append(
            f"**Redis: hits and misses.** A call that reaches the server is a network round "
            f"trip; on this VM a bare `PING` over loopback takes {us(ping)}. A repeated warm "
            f"hit does not reach it: each process keeps the receipts it read, and a connection "
            f"with RESP3 client tracking receives the name of every receipt key written, "
            f"deleted or expired (see docs/stores.md). A hit takes in what that connection "
            f"received, without waiting, and gets the very Receipt object checked before: no "
            f"round trip, no HMAC check, the fresh copy of the value decoded as on SQLite: "
            f"{us(hit)}, {_times(hit, n['sqlite_sync_hit_median_ns'])} SQLite's "
            f"{us(n['sqlite_sync_hit_median_ns'])} ({_times(hit, n['hit_diskcache_median_ns'])} "
            f"diskcache's {us(n['hit_diskcache_median_ns'])}).{_redis_async_hit(n)}{_redis_busy_hit(n)} "
            f"A miss is three round "
            f"trips (the read, the lease script, which also returns the receipt, and the store "
            f"script; at most once a second the statistics): "
            f"{n['redis_miss_rate']:,.0f} calls/s against SQLite's "
            f"{n['sqlite_miss_rate']:,.0f}/s. Both are small next to a tool that calls a model "
            f"or an API; what Redis buys is one deduplication domain across machines.")
    if {"redis_mp_wall_s", "sqlite_mp_wall_s"} <= n.keys():
        parts.append(
            f"**Redis: processes.** 8 processes x 20 keys {_once(n, 'redis')} (the lease "
            f"is taken by a Lua script, one step on the server). The last execution started "
            f"{ms(n['redis_mp_last_start_s'])} after the common start (SQLite: "
            f"{ms(n['sqlite_mp_last_start_s'])}){_redis_mp_start(n)}; every store call of an "
            f"async call, its first look included, runs in a store thread, so no event loop "
            f"waits for a round trip. Time an event loop spent blocked in store calls, per "
            f"process: {_blocked(n['redis_mp_blocked_median_s'])} (median; SQLite: "
            f"{_blocked(n['sqlite_mp_blocked_median_s'])}). The last process was done after "
            f"{ms(n['redis_mp_wall_s'])} (SQLite: {ms(n['sqlite_mp_wall_s'])}).")
    if {"redis_wake_sync_median_s", "redis_crash_median_s", "sqlite_wake_sync_median_s",
            "sqlite_crash_median_s"} <= n.keys():
        lease = n["redis_crash_lease_s"]
        failure = (f", and a failure reaches a waiter re-executing in "
                   f"{ms(n['redis_fail_xproc_0_median_s'])}"
                   if "redis_fail_xproc_0_median_s" in n else "")
        parts.append(
            f"**Redis: wake-up and crash.** A holder publishes on the key's channel when it "
            f"stores, fails or gives up; each process has one pattern subscription, whose "
            f"thread wakes the waiter, which then reads the receipt: "
            f"{ms(n['redis_wake_sync_median_s'])} median for a sync waiter, "
            f"{ms(n['redis_wake_async_median_s'])} for an async one (SQLite: "
            f"{ms(n['sqlite_wake_sync_median_s'])} / {ms(n['sqlite_wake_async_median_s'])})"
            f"{failure}. {_lost_wakeups(n)} A killed holder publishes nothing and Redis "
            f"cannot tell it is dead, so its waiter takes over only when the lease lapses: the "
            f"holder renews every third "
            f"of `lease_seconds`, so that is between 2/3 and all of it after the kill. The "
            f"benchmark uses `lease_seconds={lease:g}` for Redis (SQLite: its default "
            f"{n['sqlite_crash_lease_s']:g} s, which it never waits out): takeover "
            f"{ms(n['redis_crash_median_s'])} median, {ms(n['redis_crash_max_s'])} at most, "
            f"against SQLite's {ms(n['sqlite_crash_median_s'])}. With the "
            f"default 10 s lease the same arithmetic gives 7 to 10 s (not measured here); "
            f"choose `lease_seconds` for the wait you accept after a crash.")
    return parts


def _redis_mp_start(n: dict[str, float]) -> str:
    """Whether Redis's processes started their last execution sooner than SQLite's."""
    if n["redis_mp_last_start_s"] <= n["sqlite_mp_last_start_s"]:
        return ": there is no single write lock to queue for"
    return (f", later, although there is no single write lock to queue for: the 8 processes "
            f"share {cores()} cores, and each key's store operations are round trips")


def _redis_async_hit(n: dict[str, float]) -> str:
    """The async warm hit on Redis, whose first look is made in a store thread."""
    if not {"redis_async_hit_median_ns", "sqlite_async_hit_median_ns"} <= n.keys():
        return ""
    return (f" An async hit on Redis: {us(n['redis_async_hit_median_ns'])} against "
            f"{us(n['sqlite_async_hit_median_ns'])} on SQLite (with ?offload=1 in the URL, its "
            f"first look goes to a store thread and pays for the hand-off there and back).")


def _redis_busy_hit(n: dict[str, float]) -> str:
    """The Redis warm hit beside a writer, whose every store sends this process a notice."""
    if "redis_hit_busy_median_ns" not in n:
        return ""
    return (f" Beside a process storing {n['redis_hit_busy_writer_rate']:,.0f} receipts/s "
            f"under the same prefix (each store sends this process a notice, which the next "
            f"hit takes in; the hit's own key is not among them): "
            f"{us(n['redis_hit_busy_median_ns'])} against "
            f"diskcache's {us(n['redis_hit_busy_diskcache_median_ns'])}.")


def _lost_wakeups(n: dict[str, float]) -> str:
    """Whether any Redis wake-up fell back on the waiter's one-second re-check."""
    slowest = max(n.get("redis_wake_sync_max_s", 0.0), n.get("redis_wake_async_max_s", 0.0))
    if slowest < 0.5:
        return (f"The slowest wake-up took {ms(slowest)}: none had to wait for the one-second "
                f"re-check that covers a lost notification.")
    return (f"The slowest wake-up took {ms(slowest)}: a notification was missed and the waiter "
            f"found out at its one-second re-check.")
