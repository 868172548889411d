#!/usr/bin/env python
"""Scale and speed (issue 16): each cost against store size, diskcache's Cache.memoize and
SQLite beside in the same run.

    python bench/scale.py                  # 1k, 100k, 1M receipts (Redis 1k, 100k)
    python bench/scale.py --quick          # 1k, 10k (Redis too), fewer repeats
    python bench/scale.py --sizes 1000,100000 --redis-sizes 1000 --json out.json --markdown out.md
    python bench/run.py --only scale       # the same, from run.py

Per store size N (the SQLite store, diskcache and, at --redis-sizes, a Redis prefix of this
run's own, filled with N receipts of one tool; see scale_fill.py for how): warm hits on the
same key and on keys drawn uniformly from the N stored, interleaved with diskcache's memoize
hits (and the Redis store's beside SQLite's); misses + store against memoize miss + set; the
CLI's verify, export and import (wall time, peak RSS of the subprocess); the leases table's
share of the file; prune after every receipt expired (its reported bytes against os.stat).
Once per run: the Redis miss storm (16 and 8 processes x 200 keys, 5 ms tool) against
SQLite, the event loop's time blocked in store calls (4 processes), mode="off" memory, the
import time against diskcache's, and the pytest plugin's per-test overhead
(plugin_overhead.measure, when it exists).

Each cost's growth with N is classed from the measurements: the ratio of the largest size's
figure to the smallest's, and the exponent b of a least-squares fit figure ~ N^b (log-log):
flat if the ratio is under 1.3x, linear if b >= 0.7, logarithmic (sublinear) in between.
Progress goes to stderr; the tables to stdout.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import random
import re
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common
import diskcache
import imports
import report
from common import RUN_TAG, SECRET, ms, pct, store_url, us
from scale_fill import EXECUTIONS, decorate, open_filled, progress
from scale_workers import SPAWN, diskcache_filler, mode_off_memory, run_measured, storm_worker

CLI = Path(sys.executable).with_name("singleflight-agents")


@dataclass(frozen=True)
class Plan:
    name: str
    sizes: tuple[int, ...]
    redis_sizes: tuple[int, ...]
    hit_iterations: int  # per repeat and variant (an eighth on Redis)
    hit_repeats: int
    miss_keys: int  # per variant, in chunks that alternate
    engine_calls: int  # receipts of a fill made by real calls; the rest built and imported
    storm_repeats: int
    off_calls: int
    import_runs: int
    plugin_tests: int
    plugin_repeats: int


FULL = Plan("full", (1_000, 100_000, 1_000_000), (1_000, 100_000), 2_000, 15, 2_000, 10_000,
            3, 50_000, 15, 2_000, 3)
QUICK = Plan("quick", (1_000, 10_000), (1_000, 10_000), 300, 5, 400, 2_000, 1, 10_000, 5,
             300, 1)
REDIS_FEWER = 8


@dataclass
class Figure:
    """One row: a cost measured at each size (or once), with its peer and target."""

    name: str
    store: str
    target: str = ""
    per_size: bool = True
    values: dict[int, float] = field(default_factory=dict)  # size -> the figure (growth)
    texts: dict[int, str] = field(default_factory=dict)  # size -> the cell (0: once per run)


class Scale:
    def __init__(self, plan: Plan) -> None:
        self.plan = plan
        self.figures: dict[str, Figure] = {}
        self.notes: list[str] = []
        self.failures: list[str] = []

    def put(self, key: str, store: str, size: int, text: str, value: float | None = None,
            target: str = "", per_size: bool = True) -> None:
        fig = self.figures.setdefault(f"{store}|{key}", Figure(key, store, target, per_size))
        fig.texts[size] = text
        if value is not None:
            fig.values[size] = value
        label = f"[{store}] {key}" if store else key
        where = f"N={size:,}" if per_size else "once"
        print(f"  {label:<58} {where:<12} {text}", flush=True)


# -- growth ---------------------------------------------------------------------------


def growth(values: dict[int, float]) -> str:
    points = sorted((n, v) for n, v in values.items() if v > 0)
    if len(points) < 2:
        return ""
    (n0, v0), (n1, v1) = points[0], points[-1]
    ratio = v1 / v0
    xs, ys = [math.log(n) for n, _ in points], [math.log(v) for _, v in points]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sum(
        (x - mx) ** 2 for x in xs)
    kind = "flat" if ratio < 1.3 else "linear" if b >= 0.7 else "logarithmic"
    return f"{kind} ({short(n1)}/{short(n0)} {ratio:.2f}x, ~N^{b:.2f})"


def short(n: int) -> str:
    for unit, size in (("M", 1_000_000), ("k", 1_000)):
        if n >= size and n % size == 0:
            return f"{n // size}{unit}"
    return f"{n:,}"


def mb(nbytes: float) -> str:
    return f"{nbytes / 1e6:,.1f} MB"


# -- warm hits and misses, per size ----------------------------------------------------


def time_keys(func: Callable[[int], Any], keys: Sequence[int], out: list[int]) -> None:
    clock = time.perf_counter_ns
    for key in keys:
        start = clock()
        func(key)
        out.append(clock() - start)


def bench_hits(sc: Scale, n: int, tools: dict[str, Callable[[int], Any]]) -> None:
    """Same-key and random-key hits of every variant in ``tools`` (sqlite, diskcache, maybe
    redis), interleaved in a rotating order; each tool's body must not run."""
    plan, rng = sc.plan, random.Random(n)
    samples: dict[str, list[int]] = {}
    runs: list[Callable[[], None]] = []
    for store, func in tools.items():
        iterations = plan.hit_iterations // (REDIS_FEWER if store == "redis" else 1)
        for kind in ("same", "random"):
            out = samples.setdefault(f"{store}_{kind}", [])
            if kind == "same":
                func(7)
                runs.append(lambda f=func, k=iterations, o=out: time_keys(f, [7] * k, o))
            else:
                runs.append(lambda f=func, k=iterations, o=out: time_keys(
                    f, [rng.randrange(n) for _ in range(k)], o))
    before = EXECUTIONS[0]
    for repeat in range(plan.hit_repeats):
        turn = repeat % len(runs)
        for run in runs[turn:] + runs[:turn]:
            run()
    if EXECUTIONS[0] != before:
        sc.failures.append(f"N={n}: the tool ran {EXECUTIONS[0] - before} times during hits")
    med = {key: statistics.median(s) for key, s in samples.items()}
    p99 = {key: pct(s, 0.99) for key, s in samples.items()}
    dc_same, dc_rand = med["diskcache_same"], med["diskcache_random"]
    sq_same, sq_rand = med["sqlite_same"], med["sqlite_random"]
    sc.put("warm hit, same key, sync decorated: median (p99); diskcache memoize; ratio",
           "sqlite", n, f"{us(sq_same)} ({us(p99['sqlite_same'])}); dc {us(dc_same)} "
           f"({us(p99['diskcache_same'])}); {sq_same / dc_same:.2f}x", sq_same,
           "<= 0.5x diskcache")
    sc.put("warm hit, random key of the N: median (p99); / same-key hit", "sqlite", n,
           f"{us(sq_rand)} ({us(p99['sqlite_random'])}); {sq_rand / sq_same:.2f}x", sq_rand,
           "within 1.3x of same-key at 1M")
    sc.put("diskcache memoize hit, random key of the N: median; / its same-key; ours / it",
           "", n, f"{us(dc_rand)}; {dc_rand / dc_same:.2f}x; ours {sq_rand / dc_rand:.2f}x",
           dc_rand)
    if "redis" in tools:
        rd_same, rd_rand = med["redis_same"], med["redis_random"]
        sc.put("Redis warm hit, same key: median (p99); / SQLite same-run", "redis", n,
               f"{us(rd_same)} ({us(p99['redis_same'])}); {rd_same / sq_same:.2f}x", rd_same,
               "<= 3x the SQLite hit")
        sc.put("Redis warm hit, random key: median (p99); / SQLite random", "redis", n,
               f"{us(rd_rand)} ({us(p99['redis_random'])}); {rd_rand / sq_rand:.2f}x", rd_rand,
               "<= 3x the SQLite hit")


def bench_misses(sc: Scale, n: int, ours: Callable[[int], Any], theirs: Callable[[int], Any],
                 chunk: int = 100) -> None:
    """Miss + store on the filled store (new keys, past the N stored) against diskcache's
    memoize miss + set on its filled cache, in alternating chunks."""
    samples: dict[str, list[int]] = {"sqlite": [], "diskcache": []}
    base = 10 * n + 1_000_000_000
    pair = [("sqlite", ours), ("diskcache", theirs)]
    before = EXECUTIONS[0]
    for index, start in enumerate(range(base, base + sc.plan.miss_keys, chunk)):
        for key, func in pair if index % 2 else reversed(pair):
            time_keys(func, range(start, start + chunk), samples[key])
    ran = EXECUTIONS[0] - before
    if ran != sc.plan.miss_keys:
        sc.failures.append(f"N={n}: {ran} of {sc.plan.miss_keys} misses ran the tool")
    ours_m, theirs_m = (statistics.median(samples[k]) for k in ("sqlite", "diskcache"))
    sc.put("miss + store: median (p99); diskcache memoize miss + set; ratio", "sqlite", n,
           f"{us(ours_m)} ({us(pct(samples['sqlite'], 0.99))}); dc {us(theirs_m)} "
           f"({us(pct(samples['diskcache'], 0.99))}); {ours_m / theirs_m:.2f}x", ours_m,
           "<= 1.5x diskcache")


# -- the CLI, leases and prune, per size ------------------------------------------------


def cli_env(tmp: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONDONTWRITEBYTECODE",)}
    env["SINGLEFLIGHT_SECRET"] = SECRET  # the engine's key: the CLI checks with it
    env["PYTHONPYCACHEPREFIX"] = str(tmp / "pycache")
    return env


def bench_cli(sc: Scale, n: int, db: Path, tmp: Path, receipts: int) -> None:
    env, exported, imported = cli_env(tmp), tmp / "export.jsonl", tmp / "imported.db"
    commands = {"verify": [str(CLI), "verify", "--db", str(db)],
                "export": [str(CLI), "export", "--db", str(db), "-o", str(exported)],
                "import": [str(CLI), "import", "--db", str(imported), str(exported)]}
    for name, command in commands.items():
        progress(f"N={n:,}: singleflight-agents {name}")
        got = run_measured(command, env, tmp)
        if got["rc"] != 0:
            sc.failures.append(f"N={n}: {name} exited {got['rc']}: {got['output'][-500:]}")
        sc.put(f"CLI `{name}`: wall time (CPU)", "sqlite", n,
               f"{got['wall']:.2f} s ({got['cpu']:.2f} s)", got["wall"], "keep linear")
        sc.put(f"CLI `{name}`: peak RSS of the process", "sqlite", n, mb(got["maxrss"]),
               got["maxrss"], "flat (streaming)" if name != "verify" else "")
        said = [int(x.replace(",", "")) for x in re.findall(r"\d[\d,]*", got["output"])]
        if receipts not in said:
            sc.failures.append(f"N={n}: `{name}` did not report the {receipts:,} receipts "
                               f"stored: {got['output'][-300:]!r}")
    for path in (exported, imported):
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
    for extra in tmp.glob("imported.db*"):
        if extra.is_dir():
            shutil.rmtree(extra, ignore_errors=True)
        else:
            extra.unlink()


def bench_leases(sc: Scale, n: int, db: Path, engine_calls: int) -> int:
    """The leases table's rows and share of the file; how many receipts the store holds."""
    import sqlite3

    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        leases = conn.execute("SELECT count(*) FROM leases").fetchone()[0]
        receipts = conn.execute("SELECT count(*) FROM receipts").fetchone()[0]
        owner = dict(conn.execute("SELECT name, tbl_name FROM sqlite_master"))
        by_table: dict[str, int] = {}
        for name, size in conn.execute("SELECT name, sum(pgsize) FROM dbstat GROUP BY name"):
            table = owner.get(name, name)
            by_table[table] = by_table.get(table, 0) + size
    finally:
        conn.close()
    total = sum(by_table.values())
    lb, rb = by_table.get("leases", 0), by_table.get("receipts", 0)
    per_lease, per_receipt = (lb / leases if leases else 0.0), rb / max(receipts, 1)
    share_all_calls = per_lease / (per_lease + per_receipt) if leases else 0.0
    sc.put("leases table: rows; its share of the file (dbstat); share if every receipt came "
           "from a call", "sqlite", n,
           f"{leases:,} rows for {receipts:,} receipts; {lb / total:.0%} of {mb(total)}; "
           f"{share_all_calls:.0%} ({per_lease:.0f} B/lease, {per_receipt:.0f} B/receipt)",
           lb / total if total else None, "finished leases do not pile up")
    if n > engine_calls:
        sc.notes.append(f"N={n:,}: only the first {engine_calls:,} receipts came from calls "
                        f"(leases); the last column extrapolates to all N from bytes per row")
    return receipts


def bench_prune(sc: Scale, n: int, db: Path, tmp: Path) -> None:
    """The store's prune (what `singleflight-agents prune` prints from) with now set past
    every expiry, in a subprocess; its bytes against os.stat of the db and -wal after."""
    code = ("import json, sys, time\nfrom singleflight_agents.store.sqlite import SQLiteStore\n"
            "s = SQLiteStore(sys.argv[1])\nr = s.prune(time.time() + 20 * 365 * 86400)\n"
            "s.close()\nprint(json.dumps(r))")
    got = run_measured([sys.executable, "-c", code, str(db)], cli_env(tmp), tmp)
    if got["rc"] != 0:
        sc.failures.append(f"N={n}: prune exited {got['rc']}: {got['output'][-500:]}")
        return
    removed = json.loads(got["output"].strip().splitlines()[-1])
    real = sum(p.stat().st_size for p in (db, db.with_name(db.name + "-wal")) if p.exists())
    ok = removed.get("bytes_after") == real
    sc.put("prune, all expired: printed `A -> B bytes`; real db + -wal after; wall", "sqlite",
           n, f"{removed.get('bytes_before')} -> {removed.get('bytes_after')}; real {real:,} "
           f"({'true' if ok else 'WRONG'}); {removed.get('receipts'):,} receipts; "
           f"{got['wall']:.1f} s", got["wall"], "the true sizes")


# -- once per run ------------------------------------------------------------------------


def bench_storm(sc: Scale, stores: Sequence[str], keys: int = 200, tool_s: float = 0.005) -> None:
    counts = (16, 8, 4)
    pipes, procs = [], []
    progress(f"miss storm: starting {max(counts)} processes")
    for _ in range(max(counts)):
        pipe, child = SPAWN.Pipe()
        procs.append(SPAWN.Process(target=storm_worker, args=(child,), daemon=True))
        procs[-1].start()
        child.close()
        pipes.append(pipe)
    walls: dict[tuple[str, int], list[float]] = {}
    blocked: dict[tuple[str, int], list[float]] = {}
    try:
        for store in stores:  # warm-up, untimed
            _storm_once(sc, pipes[:4], store, ["warm-up"], tool_s)
        for repeat in range(sc.plan.storm_repeats):
            for count in counts:
                for store in (stores if repeat % 2 == 0 else list(reversed(stores))):
                    progress(f"miss storm: {count} processes x {keys} keys on {store}")
                    wall, stuck = _storm_once(sc, pipes[:count], store,
                                              [f"r{repeat}-k{k}" for k in range(keys)], tool_s)
                    walls.setdefault((store, count), []).append(wall)
                    blocked.setdefault((store, count), []).extend(stuck)
    finally:
        for pipe in pipes:
            with contextlib.suppress(OSError):
                pipe.send(("stop",))
        for proc in procs:
            proc.join(10)
    for count in counts:
        med = {s: statistics.median(walls[(s, count)]) for s in stores}
        spread = {s: f"{ms(min(walls[(s, count)]))}-{ms(max(walls[(s, count)]))}" for s in stores}
        if "redis" in stores:
            sc.put(f"miss storm, {count} processes x {keys} keys, 5 ms tool: wall median "
                   f"(range); / SQLite", "redis", 0,
                   f"{ms(med['redis'])} ({spread['redis']}); SQLite {ms(med['sqlite'])} "
                   f"({spread['sqlite']}); {med['redis'] / med['sqlite']:.2f}x", med["redis"],
                   "<= 1.5x SQLite" if count == 16 else "", per_size=False)
        else:
            sc.put(f"miss storm, {count} processes x {keys} keys, 5 ms tool: wall median",
                   "sqlite", 0, f"{ms(med['sqlite'])} ({spread['sqlite']})", med["sqlite"],
                   per_size=False)
        for store in stores:
            stuck = blocked[(store, count)]
            sc.put(f"event loop blocked in store calls, per process, {count} processes: "
                   "median (max)", store, 0,
                   f"{ms(statistics.median(stuck))} ({ms(max(stuck))})",
                   statistics.median(stuck), "never blocks on store I/O" if count == 4 else "",
                   per_size=False)


def _storm_once(sc: Scale, pipes: list[Any], store: str, names: list[str],
                tool_s: float) -> tuple[float, list[float]]:
    with common.store_dir("storm") as tmp, store_url(store, tmp) as url:
        log = tmp / "executions.log"
        for pipe in pipes:
            pipe.send(("run", url, str(log), names, tool_s))
        for pipe in pipes:
            assert pipe.recv()[0] == "ready"
        start_at = time.time() + 0.3
        for pipe in pipes:
            pipe.send(start_at)
        finished, stuck = [], []
        for pipe in pipes:
            if not pipe.poll(300):
                raise TimeoutError("a storm worker did not finish")
            _, t_done, in_store = pipe.recv()
            finished.append(t_done)
            stuck.append(in_store)
        executions = len(log.read_text().splitlines())
        if executions != len(names):
            sc.failures.append(f"storm {len(pipes)} processes on {store}: {executions} "
                               f"executions of {len(names)} keys")
        return max(finished) - start_at, stuck


def bench_mode_off(sc: Scale) -> None:
    calls = sc.plan.off_calls
    progress(f"mode=\"off\": {calls:,} distinct calls in a fresh process")
    with common.store_dir("off") as tmp:
        pipe, child = SPAWN.Pipe()
        proc = SPAWN.Process(target=mode_off_memory, args=(str(tmp / "off.db"), calls, child),
                             daemon=True)
        proc.start()
        child.close()
        got = pipe.recv()
        proc.join()
    grown = ", ".join(f"{k}: {v:,}" for k, v in got["grown"].items()) or "none"
    per_million = got["rss_growth"] * 1_000_000 / calls
    sc.put(f"mode=\"off\": RSS growth after {calls:,} distinct calls; per million; engine "
           "sets/dicts that grew", "sqlite", 0,
           f"{mb(got['rss_growth'])}; {mb(per_million)}/M; {grown}", got["rss_growth"],
           "bounded", per_size=False)


def bench_import_time(sc: Scale) -> None:
    progress("import time")
    with tempfile.TemporaryDirectory(prefix="sf-bench-pycache-") as pycache:
        env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
        env["PYTHONPYCACHEPREFIX"] = pycache
        codes = {"pass": "pass", "engine": imports.ENGINE, "diskcache": "import diskcache"}
        for code in codes.values():
            imports.run_python(code, env)
        times: dict[str, list[float]] = {k: [] for k in codes}
        order = list(codes)
        for run in range(sc.plan.import_runs):
            for key in order[run % 3:] + order[:run % 3]:
                times[key].append(imports.run_python(codes[key], env))
    base = statistics.median(times["pass"])
    ours, theirs = (statistics.median(times[k]) - base for k in ("engine", "diskcache"))
    sc.put(f"import `{imports.ENGINE}` over bare python: median of {sc.plan.import_runs}; "
           "`import diskcache`", "", 0, f"{ms(ours)}; diskcache {ms(theirs)}", ours,
           "<= 30 ms", per_size=False)


def bench_plugin(sc: Scale) -> None:
    import plugin_overhead

    if not hasattr(plugin_overhead, "measure"):
        sc.notes.append("plugin per-test overhead: not measured, bench/plugin_overhead.py has "
                        "no measure() yet (run it alone: python bench/plugin_overhead.py)")
        return
    progress(f"plugin overhead: {sc.plan.plugin_tests} tests, {sc.plan.plugin_repeats} repeats")
    rows = plugin_overhead.measure(tests=sc.plan.plugin_tests, repeats=sc.plan.plugin_repeats)
    for row in rows:
        sc.failures.extend(f"plugin: {failure}" for failure in row.get("failures") or ())
        sc.put(f"plugin per-test overhead, all hits, {row['mode']}: wall / CPU", "", 0,
               f"{row['overhead_ms_per_test']:+.2f} ms / {row['overhead_cpu_ms_per_test']:+.2f} "
               f"ms ({row['tests']:,} tests; baseline {row['baseline_s']:.1f} s, plugin "
               f"{row['plugin_s']:.1f} s)", row["overhead_ms_per_test"], "< 0.3 ms per test",
               per_size=False)


# -- the report --------------------------------------------------------------------------


def tables(sc: Scale, sizes: Sequence[int]) -> str:
    head = ["Figure", "Store", *(f"N={short(n)}" for n in sizes), "Growth", "Target"]
    body = []
    for fig in sc.figures.values():
        if fig.per_size and fig.texts:
            body.append([fig.name, fig.store, *(fig.texts.get(n, "") for n in sizes),
                         growth(fig.values), fig.target])
    once_head = ["Figure (once per run)", "Store", "Result", "Target"]
    once = [[f.name, f.store, f.texts.get(0, ""), f.target]
            for f in sc.figures.values() if not f.per_size]
    return markdown(head, body) + "\n\n" + markdown(once_head, once)


def markdown(head: list[str], body: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in [head, *body]) for i in range(len(head))]

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    return "\n".join([line(head), "|" + "|".join("-" * (w + 2) for w in widths) + "|",
                      *(line(row) for row in body)])


def sizes_arg(text: str) -> tuple[int, ...]:
    try:
        sizes = tuple(sorted({int(part.replace("_", "")) for part in text.split(",")
                              if part.strip()}))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of integers: {text!r}") from None
    if not sizes or sizes[0] < 1:
        raise argparse.ArgumentTypeError("sizes must be positive")
    return sizes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="1k and 10k, fewer repeats")
    parser.add_argument("--sizes", type=sizes_arg, help="store sizes (default 1000,100000,"
                        "1000000; --quick 1000,10000)")
    parser.add_argument("--redis-sizes", type=sizes_arg,
                        help="sizes measured on Redis too (default 1000,100000)")
    parser.add_argument("--redis-url", default=common.REDIS_URL)
    parser.add_argument("--no-redis", action="store_true", help="leave the Redis rows out")
    parser.add_argument("--plugin", action=argparse.BooleanOptionalAction, default=None,
                        help="measure the pytest plugin's overhead (default: not in --quick, "
                        "where it alone would take minutes)")
    parser.add_argument("--json", type=Path, help="also write the figures as JSON")
    parser.add_argument("--markdown", type=Path, help="also write the tables as Markdown")
    args = parser.parse_args(argv)
    plan = QUICK if args.quick else FULL
    sizes = args.sizes or plan.sizes
    common.REDIS_URL = args.redis_url
    redis_sizes = args.redis_sizes if args.redis_sizes is not None else plan.redis_sizes
    sc = Scale(plan)
    problem = "left out (--no-redis)" if args.no_redis else common.redis_problem(args.redis_url)
    if problem:
        redis_sizes = ()
        sc.notes.append(f"Redis not measured: {problem}")
    stores = ["sqlite"] + (["redis"] if not problem else [])
    info = report.machine(None if problem else args.redis_url)
    info.pop("openai-agents / langchain-core (benchmark 9)", None)
    print(f"singleflight-agents scale benchmark ({plan.name}): sizes "
          f"{', '.join(map(short, sizes))}; Redis {', '.join(map(short, redis_sizes)) or '-'}")
    for key, value in info.items():
        print(f"  {key}: {value}")
    started = time.perf_counter()
    fills: list[str] = []
    try:
        for n in sizes:
            began = time.perf_counter()
            print(f"\n== N = {n:,} receipts", flush=True)
            with common.store_dir(f"scale-{n}") as tmp:
                fills.append(f"N={n:,}: " + per_size(sc, n, n in redis_sizes, tmp))
            progress(f"N={n:,} done in {time.perf_counter() - began:.0f} s")
        print("\n== once per run", flush=True)
        bench_storm(sc, stores)
        bench_mode_off(sc)
        bench_import_time(sc)
        if args.plugin or (args.plugin is None and not args.quick):
            bench_plugin(sc)
        else:
            sc.notes.append("plugin per-test overhead: not measured in this run (--plugin "
                            "measures it: bench/plugin_overhead.py's measure())")
    finally:
        if not problem and (left := common.drop_redis_keys(f"sf-bench-{RUN_TAG}-*")):
            print(f"deleted {left} Redis keys left behind")
    elapsed = time.perf_counter() - started
    text = tables(sc, sizes)
    sc.notes[:0] = ["How the stores were filled: " + "; ".join(fills)]
    print(f"\n{text}\n\n{plan.name} run took {elapsed:.0f} s")
    for note in sc.notes:
        print(f"- {note}")
    for failure in sc.failures:
        print(f"CHECK FAILED: {failure}")
    if args.markdown:
        lines = [f"- {k}: {v}" for k, v in info.items()]
        args.markdown.write_text(
            f"Command: `python bench/scale.py{' --quick' if args.quick else ''}` "
            f"({elapsed:.0f} s)\n\n" + "\n".join(lines) + f"\n\n{text}\n\n"
            + "\n".join(f"- {note}" for note in sc.notes) + "\n")
    if args.json:
        args.json.write_text(json.dumps({
            "plan": plan.name, "sizes": sizes, "redis_sizes": redis_sizes, "machine": info,
            "elapsed_s": elapsed, "notes": sc.notes, "failures": sc.failures,
            "figures": [{"name": f.name, "store": f.store, "target": f.target,
                         "per_size": f.per_size, "values": f.values, "texts": f.texts,
                         "growth": growth(f.values) if f.per_size else ""}
                        for f in sc.figures.values()]}, indent=2))
    return 1 if sc.failures else 0


def per_size(sc: Scale, n: int, with_redis: bool, tmp: Path) -> str:
    """Every per-size row at ``n``; how the stores were filled."""
    plan = sc.plan
    pipe, child = SPAWN.Pipe()  # diskcache fills in another process, beside ours
    filler = SPAWN.Process(target=diskcache_filler, args=(str(tmp / "dc"), n, child),
                           daemon=True)
    filler.start()
    child.close()
    db = tmp / "receipts.db"
    with contextlib.ExitStack() as stack:
        sf, how = open_filled(str(db), n, plan.engine_calls, f"sqlite N={n:,}")
        stack.callback(sf.close)
        tools: dict[str, Callable[[int], Any]] = {"sqlite": decorate(sf)}
        if with_redis:
            url = stack.enter_context(store_url("redis", tmp))
            rsf, rhow = open_filled(url, n, min(plan.engine_calls, 1_000), f"redis N={n:,}")
            stack.callback(rsf.close)  # before its keys are dropped
            tools["redis"] = decorate(rsf)
            how += f"; Redis: {rhow}"
        dc_seconds = pipe.recv()
        filler.join()
        cache = stack.enter_context(diskcache.Cache(str(tmp / "dc")))
        tools["diskcache"] = cache.memoize()(common.payload)
        progress(f"N={n:,}: warm hits")
        bench_hits(sc, n, {k: tools[k] for k in ("sqlite", "diskcache", "redis") if k in tools})
        progress(f"N={n:,}: misses")
        bench_misses(sc, n, tools["sqlite"], tools["diskcache"])
    receipts = bench_leases(sc, n, db, plan.engine_calls)
    bench_cli(sc, n, db, tmp, receipts)
    bench_prune(sc, n, db, tmp)
    return how + f"; diskcache: cache.set of memoize's keys ({dc_seconds:.0f} s, beside)"


if __name__ == "__main__":
    sys.exit(main())
