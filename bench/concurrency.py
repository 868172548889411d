"""Benchmarks 3-7: concurrent identical calls, in one process and across processes.

3 fan-out in one process, 4 processes x keys, 5 cross-process wake-up, 6 crash takeover,
7 failure fan-out. The process-side code is in workers.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import statistics
import threading
import time
from collections.abc import Callable
from typing import Any

from common import Config, Results, executions_label, ms, pct, section, store_dir
from workers import SPAWN, Peer, fanout_worker

from singleflight_agents import Singleflight


def bench_fanout(cfg: Config, res: Results) -> None:
    section("3. in-flight fan-out in one process (tool takes 50 ms)")
    with store_dir("fanout") as tmp:
        sf = Singleflight(tmp / "receipts.db")
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


def bench_processes(cfg: Config, res: Results, processes: int = 8, keys: int = 20) -> None:
    section(f"4. {processes} processes x {keys} keys, all concurrent (tool takes 20 ms)")
    executions, walls, last_starts, blocked = [], [], [], []
    for repeat in range(cfg.mp_repeats):
        with store_dir("procs") as tmp:
            log = tmp / "executions.log"
            names = [f"run{repeat}-key{k}" for k in range(keys)]
            pipes, workers = [], []
            for _ in range(processes):
                pipe, child = SPAWN.Pipe()
                args = (str(tmp / "receipts.db"), str(log), names, child)
                workers.append(SPAWN.Process(target=fanout_worker, args=args))
                workers[-1].start()
                child.close()  # so that a worker's death is EOFError here, not a hang
                pipes.append(pipe)
            for pipe in pipes:
                assert pipe.recv()[0] == "ready"
            start_at = time.time() + 0.3  # every worker starts at this instant
            for pipe in pipes:
                pipe.send(start_at)
            finished = []
            for pipe in pipes:
                if not pipe.poll(120):
                    raise TimeoutError("a fan-out worker did not finish")
                _, t_done, in_store = pipe.recv()
                finished.append(t_done)
                blocked.append(in_store)
            for worker in workers:
                worker.join()
            starts = [float(line.split()[0]) for line in log.read_text().splitlines()]
            executions.append(len(starts))
            last_starts.append(max(starts) - start_at)
            walls.append(max(finished) - start_at)
    ok = res.check(all(e == keys for e in executions), f"{processes}x{keys}: {executions}")
    res.numbers["mp_wall_s"] = statistics.median(walls)
    res.numbers["mp_last_start_s"] = statistics.median(last_starts)
    res.numbers["mp_blocked_median_s"] = statistics.median(blocked)
    res.add("4 processes", f"{processes} processes x {keys} keys: executions",
            executions_label(executions), f"exactly {keys}", ok)
    res.add("4 processes", "wall time, start to last process done (median; max)",
            f"{ms(statistics.median(walls))}; {ms(max(walls))} (ideal 20 ms)")
    res.add("4 processes", f"last of the {keys} executions started after (median)",
            ms(statistics.median(last_starts)))
    res.add("4 processes", "per process, event loop blocked in store calls (median; max)",
            f"{ms(statistics.median(blocked))}; {ms(max(blocked))}")


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
                    got, held = waiter.expect("result"), holder.expect("result")
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


def bench_failure(cfg: Config, res: Results) -> None:
    section("7. failure fan-out (holder's tool raises)")
    with store_dir("fail") as tmp:
        holder, waiter = Peer("holder", tmp / "receipts.db"), Peer("waiter", tmp / "receipts.db")
        try:
            # (label, options, what the waiter should end with, the time stamp that says
            # it learned of the failure)
            variants: list[tuple[str, dict[str, Any], tuple[str | None, str | None], str]] = [
                ("default options: until the waiter's re-execution starts", {},
                 ("executed", None), "t_start"),
                ("share_failures=True: until the waiter raises", {"share_failures": True},
                 (None, "SharedExecutionError"), "t_got"),
            ]
            for index, (label, options, expected, stamp) in enumerate(variants):
                latencies, skipped = [], 0
                for trial in range(cfg.failure_trials):
                    key = f"fail-{index}-{trial}"
                    holder.call("fail", key, **options)
                    holder.expect("started")
                    waiter.call("fail", key, **options)
                    got, held = waiter.expect("result"), holder.expect("result")
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
    _failure_in_process(cfg, res)


def _failure_in_process(cfg: Config, res: Results, waiters: int = 100) -> None:
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

        async def fan_out(key: str) -> float:
            learned = await asyncio.gather(*(caller(key) for _ in range(waiters)))
            return max(learned) - raised_at[-1]  # when the last of them knew

        lasts = [asyncio.run(fan_out(f"local-{r}")) for r in range(max(3, cfg.failure_trials))]
        sf.close()
    res.numbers["fail_local_median_s"] = statistics.median(lasts)
    res.add("7 failure", f"same process, {waiters} asyncio waiters: until the last raises "
            "(median / max)", f"{ms(statistics.median(lasts))} / {ms(max(lasts))}", "< 100 ms",
            max(lasts) < 0.1)
