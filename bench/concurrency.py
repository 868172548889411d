"""Benchmarks 3-7: concurrent identical calls, in one process and across processes.

3 fan-out in one process, 4 processes x keys, 5 cross-process wake-up, 6 crash takeover,
7 failure fan-out. 4-7 run on every store of the run, the stores taking turns trial by
trial; 3 and 7's in-process part are about the in-memory flight table and use SQLite. The
process-side code is in workers.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import statistics
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from common import (
    Config,
    Results,
    executions_label,
    ms,
    open_engine,
    pct,
    section,
    store_dir,
    store_url,
)
from workers import SPAWN, Peer, fanout_worker


def bench_fanout(cfg: Config, res: Results, stores: Sequence[str] = ()) -> None:
    section("3. in-flight fan-out in one process (tool takes 50 ms; SQLite store)")
    with store_dir("fanout") as tmp:
        sf = open_engine(str(tmp / "receipts.db"))
        executions = [0]  # bumped by the tools; reset before every run
        count_lock = threading.Lock()

        def count() -> None:
            with count_lock:
                executions[0] += 1

        @sf.tool(deterministic=True, tool_name="bench.fanout_async")
        async def slow_async(key: str) -> str:
            count()
            await asyncio.sleep(0.05)
            return key

        @sf.tool(deterministic=True, tool_name="bench.fanout_sync")
        def slow_sync(key: str) -> str:
            count()
            time.sleep(0.05)
            return key

        def tasks(tool: Callable[..., Any], n: int) -> Callable[[str], float]:
            async def gather(key: str) -> float:
                start = time.perf_counter()
                await asyncio.gather(*(sf.execute(tool, key) for _ in range(n)))
                return time.perf_counter() - start

            return lambda key: asyncio.run(gather(key))

        def threads(n: int) -> Callable[[str], float]:
            def run(key: str) -> float:
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

            return run

        cases = [(f"{n:,} asyncio caller{'s' if n > 1 else ''}, async tool", tasks(slow_async, n))
                 for n in (1, 10, 100, 1000)]
        cases += [("1,000 asyncio callers, sync tool", tasks(slow_sync, 1000)),
                  ("32 threads, sync tool", threads(32))]
        for index, (label, run) in enumerate(cases):
            per_run, walls = [], []
            for repeat in range(cfg.fanout_repeats):
                executions[0] = 0
                walls.append(run(f"case{index}-run{repeat}"))
                per_run.append(executions[0])
            ok = res.check(all(e == 1 for e in per_run), f"fan-out {label}: {per_run}")
            overhead = statistics.median(walls) - 0.05
            res.numbers[f"fanout_{index}_overhead_s"] = overhead
            res.add("3 fan-out", f"{label}: executions; overhead over 50 ms",
                    f"{executions_label(per_run)}; {ms(overhead)} (max {ms(max(walls) - 0.05)})",
                    "1 execution", ok)
        sf.close()


def bench_processes(cfg: Config, res: Results, stores: Sequence[str], processes: int = 8,
                    keys: int = 20) -> None:
    section(f"4. {processes} processes x {keys} keys, all concurrent (tool takes 20 ms)")
    runs: dict[str, list[tuple[int, float, float, list[float]]]] = {s: [] for s in stores}
    pipes, workers = [], []
    for _ in range(processes):  # one pool of processes for every run: spawning is slow
        pipe, child = SPAWN.Pipe()
        workers.append(SPAWN.Process(target=fanout_worker, args=(child,), daemon=True))
        workers[-1].start()
        child.close()  # so that a worker's death is EOFError here, not a hang
        pipes.append(pipe)
    try:
        for store in stores:  # untimed: the processes' first use of asyncio, of each store
            with store_dir("procs") as tmp, store_url(store, tmp) as url:
                _processes_once(pipes, url, tmp / "executions.log", ["warm-up"], lead=0.1)
        for repeat in range(cfg.mp_repeats):
            for store in stores:  # the stores take turns, repeat by repeat
                with store_dir("procs") as tmp, store_url(store, tmp) as url:
                    names = [f"run{repeat}-key{k}" for k in range(keys)]
                    runs[store].append(_processes_once(pipes, url, tmp / "executions.log", names))
    finally:
        for pipe in pipes:
            with contextlib.suppress(OSError):
                pipe.send(("stop",))
        for worker in workers:
            worker.join(10)
    for store, done in runs.items():
        executions = [run[0] for run in done]
        last_starts, walls = [run[1] for run in done], [run[2] for run in done]
        blocked = [seconds for run in done for seconds in run[3]]
        ok = res.check(all(e == keys for e in executions),
                       f"{store} {processes}x{keys}: executions {executions}")
        res.numbers[f"{store}_mp_exactly_once"] = float(ok)
        res.numbers[f"{store}_mp_wall_s"] = statistics.median(walls)
        res.numbers[f"{store}_mp_last_start_s"] = statistics.median(last_starts)
        res.numbers[f"{store}_mp_blocked_median_s"] = statistics.median(blocked)
        res.add("4 processes", f"{processes} processes x {keys} keys: executions",
                executions_label(executions), f"exactly {keys}", ok, store=store)
        res.add("4 processes", "wall time, start to last process done (median; max)",
                f"{ms(statistics.median(walls))}; {ms(max(walls))} (ideal 20 ms)", store=store)
        res.add("4 processes", f"last of the {keys} executions started after (median)",
                ms(statistics.median(last_starts)), store=store)
        res.add("4 processes", "per process, event loop blocked in store calls (median; max)",
                f"{ms(statistics.median(blocked))}; {ms(max(blocked))}", store=store)


def _processes_once(pipes: list[Any], url: str, log: Path, names: list[str],
                    lead: float = 0.3) -> tuple[int, float, float, list[float]]:
    """One run of every process calling every name at once, ``lead`` seconds after all are
    ready: (executions, last execution's start and last process's end after the common
    start, each process's blocked time)."""
    for pipe in pipes:
        pipe.send(("run", url, str(log), names))
    for pipe in pipes:
        assert pipe.recv()[0] == "ready"
    start_at = time.time() + lead  # every worker starts at this instant
    for pipe in pipes:
        pipe.send(start_at)
    finished, blocked = [], []
    for pipe in pipes:
        if not pipe.poll(120):
            raise TimeoutError("a fan-out worker did not finish")
        _, t_done, in_store = pipe.recv()
        finished.append(t_done)
        blocked.append(in_store)
    starts = [float(line.split()[0]) for line in log.read_text().splitlines()]
    return len(starts), max(starts) - start_at, max(finished) - start_at, blocked


@contextlib.contextmanager
def peers(stores: Sequence[str], name: str, *roles: str) -> Iterator[dict[str, list[Peer]]]:
    """For each store, a fresh store and one peer process on it per role."""
    with store_dir(name) as tmp, contextlib.ExitStack() as stack:
        by_store: dict[str, list[Peer]] = {}
        for store in stores:
            url = stack.enter_context(store_url(store, tmp / store))
            by_store[store] = []
            for role in roles:
                by_store[store].append(Peer(role, url, wait=False))
                stack.callback(by_store[store][-1].stop)
        Peer.all_started(*(peer for group in by_store.values() for peer in group))
        yield by_store


def bench_wakeup(cfg: Config, res: Results, stores: Sequence[str]) -> None:
    section("5. cross-process wake-up (holder finishes -> waiter in another process has it)")
    with peers(stores, "wake", "holder", "waiter") as pairs:
        for mode in ("sync", "async"):
            latencies: dict[str, list[float]] = {s: [] for s in stores}
            skipped = dict.fromkeys(stores, 0)
            for trial in range(cfg.wake_trials):
                for store, (holder, waiter) in pairs.items():  # the stores take turns
                    key = f"{mode}-{trial}"
                    holder.call("wake", key)
                    holder.expect("started")
                    waiter.call("wake" if mode == "sync" else "wake_async", key, mode)
                    got, held = waiter.expect("result"), holder.expect("result")
                    if got["source"] != "shared_wait":  # it did not wait: not a wake-up
                        skipped[store] += 1
                        continue
                    latencies[store].append(got["t_got"] - held["t_end"])
            for store, samples in latencies.items():
                median, p95 = statistics.median(samples), pct(samples, 0.95)
                res.numbers[f"{store}_wake_{mode}_median_s"] = median
                res.numbers[f"{store}_wake_{mode}_max_s"] = max(samples)
                note = f" ({skipped[store]} did not wait, left out)" if skipped[store] else ""
                res.add("5 wake-up", f"{mode} waiter, {len(samples)} trials: median / p95 (max)",
                        f"{ms(median)} / {ms(p95)} ({ms(max(samples))}){note}", "median < 5 ms",
                        median < 0.005, store=store)


# The holder's lease in the crash benchmark: SQLite's default, since a waiter there takes
# over when the kernel drops the dead holder's lock; Redis has no such signal, so its waiter
# takes over only when the lease lapses, and a short lease keeps that short.
CRASH_LEASE_SECONDS = {"sqlite": 10.0, "redis": 1.0}


def bench_crash(cfg: Config, res: Results, stores: Sequence[str]) -> None:
    section("6. crash takeover (holder SIGKILLed while executing)")
    latencies: dict[str, list[float]] = {s: [] for s in stores}
    takeovers: dict[str, list[bool]] = {s: [] for s in stores}
    with store_dir("crash") as tmp, contextlib.ExitStack() as stack:
        urls = {s: stack.enter_context(store_url(s, tmp / s)) for s in stores}
        waiters = {s: Peer("waiter", urls[s], wait=False) for s in stores}
        for waiter in waiters.values():
            stack.callback(waiter.stop)
        Peer.all_started(*waiters.values())
        for trial in range(cfg.crash_trials):
            holders = {s: Peer("holder", urls[s], wait=False) for s in stores}
            Peer.all_started(*holders.values())
            for store, waiter in waiters.items():  # the stores take turns
                key, lease = f"crash-{trial}", CRASH_LEASE_SECONDS.get(store, 10.0)
                holder = holders[store]
                holder.call("crash", key, lease_seconds=lease)
                holder.expect("started")
                waiter.call("crash", key, lease_seconds=lease)
                waiter.expect("calling")
                time.sleep(0.2)  # let the waiter block on the holder's lease
                killed_at = time.time()
                holder.kill()
                got = waiter.expect("result")
                latencies[store].append(got["t_got"] - killed_at)
                takeovers[store].append(bool(got["takeover"]))
    for store in stores:
        done, lease = takeovers[store], CRASH_LEASE_SECONDS.get(store, 10.0)
        ok = res.check(all(done), f"{store} crash takeover flags: {done}")
        median, worst = statistics.median(latencies[store]), max(latencies[store])
        res.numbers[f"{store}_crash_median_s"] = median
        res.numbers[f"{store}_crash_max_s"] = worst
        res.numbers[f"{store}_crash_lease_s"] = lease
        res.add("6 crash takeover", f"takeover=True in {sum(done)}/{len(done)} trials",
                f"{sum(done)}/{len(done)}", "all", ok, store=store)
        res.add("6 crash takeover", f"SIGKILL -> waiter done, lease_seconds={lease:g}: "
                "median / max", f"{ms(median)} / {ms(worst)}", "≤ 3 s", worst <= 3.0, store=store)


def bench_failure(cfg: Config, res: Results, stores: Sequence[str]) -> None:
    section("7. failure fan-out (holder's tool raises)")
    # (label, options, what the waiter should end with, the time stamp that says it learned
    # of the failure)
    variants: list[tuple[str, dict[str, Any], tuple[str | None, str | None], str]] = [
        ("default options: until the waiter's re-execution starts", {},
         ("executed", None), "t_start"),
        ("share_failures=True: until the waiter raises", {"share_failures": True},
         (None, "SharedExecutionError"), "t_got"),
    ]
    with peers(stores, "fail", "holder", "waiter") as pairs:
        for index, (label, options, expected, stamp) in enumerate(variants):
            latencies: dict[str, list[float]] = {s: [] for s in stores}
            skipped = dict.fromkeys(stores, 0)
            for trial in range(cfg.failure_trials):
                for store, (holder, waiter) in pairs.items():  # the stores take turns
                    key = f"fail-{index}-{trial}"
                    holder.call("fail", key, **options)
                    holder.expect("started")
                    waiter.call("fail", key, **options)
                    got, held = waiter.expect("result"), holder.expect("result")
                    if (got["source"], got["error"]) != expected or stamp not in got:
                        skipped[store] += 1
                        continue
                    latencies[store].append(got[stamp] - held["t_raise"])
            for store, samples in latencies.items():
                median = statistics.median(samples)
                res.numbers[f"{store}_fail_xproc_{index}_median_s"] = median
                note = f" ({skipped[store]} unexpected, left out)" if skipped[store] else ""
                res.add("7 failure", f"other process, {label}: median / max",
                        f"{ms(median)} / {ms(max(samples))}{note}", "< 100 ms",
                        max(samples) < 0.1, store=store)
    _failure_in_process(cfg, res)


def _failure_in_process(cfg: Config, res: Results, waiters: int = 100) -> None:
    with store_dir("fail-local") as tmp:
        sf = open_engine(str(tmp / "receipts.db"))
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

        async def fan_out(key: str) -> float:
            learned = await asyncio.gather(*(caller(key) for _ in range(waiters)))
            return max(learned) - raised_at[-1]  # when the last of them knew

        lasts = [asyncio.run(fan_out(f"local-{r}")) for r in range(max(3, cfg.failure_trials))]
        sf.close()
    res.numbers["fail_local_median_s"] = statistics.median(lasts)
    res.add("7 failure", f"same process, {waiters} asyncio waiters: until the last raises "
            "(median / max)", f"{ms(statistics.median(lasts))} / {ms(max(lasts))}", "< 100 ms",
            max(lasts) < 0.1)
