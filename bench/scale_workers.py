"""What bench/scale.py runs in spawned processes (a fresh interpreter each, as workers.py's)
and in subprocesses: the diskcache fill, the miss-storm workers, the mode="off" memory probe,
and the CLI runner that measures a command's peak RSS."""

from __future__ import annotations

import gc
import os
import resource
import subprocess
import time
from pathlib import Path
from typing import Any

from common import payload
from workers import SPAWN, fanout_run

from singleflight_agents import Singleflight

TIME = "/usr/bin/time"  # GNU time: the child's own peak RSS
__all__ = ["SPAWN", "diskcache_filler", "mode_off_memory", "run_measured", "storm_worker"]


def diskcache_filler(path: str, n: int, conn: Any) -> None:
    """Fill a diskcache at ``path`` with ``n`` memoized entries; send the fill's seconds."""
    import diskcache
    from scale_fill import fill_diskcache

    started = time.perf_counter()
    with diskcache.Cache(path) as cache:
        fill_diskcache(cache, n)
    conn.send(time.perf_counter() - started)


def storm_worker(conn: Any) -> None:
    """One process of a miss storm, for several runs: each ("run", url, log, keys, tool_s)
    opens the store, says ready, waits for the start instant, calls every key at once
    (asyncio), and sends ("done", time, seconds the loop spent inside store calls)."""
    while (message := conn.recv())[0] == "run":
        _, url, log_path, keys, tool_s = message
        fanout_run(conn, url, log_path, keys, tool_s, "bench.scale_storm")


def _rss() -> int:
    """This process's resident set now, in bytes."""
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def mode_off_memory(path: str, calls: int, conn: Any) -> None:
    """``calls`` distinct calls of a tool in mode "off" on a fresh store: RSS growth, and the
    engine's sets and dicts that grew with them (attribute name -> length)."""
    sf = Singleflight(store=path, secret="singleflight-agents benchmark secret", mode="off")
    tool = sf.tool(deterministic=True, tool_name="bench.scale_off")(payload)
    for i in range(1000):  # warm: store open, tables made, caches at their working size
        tool(-1 - i)
    gc.collect()
    before = _rss()
    started = time.perf_counter()
    for i in range(calls):
        tool(i)
    elapsed = time.perf_counter() - started
    gc.collect()
    grown = {name: len(value) for name, value in vars(sf).items()
             if isinstance(value, set | dict) and len(value) >= calls // 2}
    conn.send({"rss_growth": _rss() - before, "seconds": elapsed, "grown": grown})
    sf.close()


def run_measured(command: list[str], env: dict[str, str], cwd: Path) -> dict[str, Any]:
    """Run ``command``; its wall time, peak RSS, exit status and output (stdout and stderr
    together, the last 2,000 characters).

    The peak RSS is /usr/bin/time's (%M): Linux starts a forked child's ru_maxrss at its
    parent's, so wait4 on a child of this big benchmark process would report ours."""
    stamp = time.monotonic_ns()
    out, rss = cwd / f"out-{stamp}.txt", cwd / f"rss-{stamp}.txt"
    with open(out, "w") as handle:
        started = time.perf_counter()
        proc = subprocess.Popen([TIME, "-f", "%M", "-o", str(rss), *command], stdout=handle,
                                stderr=subprocess.STDOUT, env=env, cwd=cwd)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - started
    proc.returncode = os.waitstatus_to_exitcode(status)
    text = out.read_text(errors="replace")
    out.unlink()
    maxrss = int(rss.read_text().split()[-1]) * 1024
    rss.unlink()
    return {"wall": wall, "maxrss": maxrss, "rc": proc.returncode,
            "output": text[-2000:], "cpu": usage.ru_utime + usage.ru_stime,
            "self_maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
