"""Benchmark 8: import time of singleflight_agents, in fresh interpreters.

The package loads its public names on first use (PEP 562), so there are two costs:
``import singleflight_agents`` alone, and ``from singleflight_agents import Singleflight``,
which loads the engine and the standard-library modules it needs. Each is timed as the
wall time of ``python -c CODE`` minus that of ``python -c pass``, bytecode cached, the
variants interleaved in a rotating order so that drift of the machine hits them alike.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence

from common import Config, Results, ms, section

PACKAGE = "import singleflight_agents"
ENGINE = "from singleflight_agents import Singleflight"


def bench_import(cfg: Config, res: Results, stores: Sequence[str] = ()) -> None:
    section("8. import time (fresh interpreter, minus `python -c pass`)")
    with tempfile.TemporaryDirectory(prefix="sf-bench-pycache-") as pycache:
        # As installed: bytecode cached (pip compiles it). The cache goes to a temporary
        # prefix, so nothing is written into the checkout.
        env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
        env["PYTHONPYCACHEPREFIX"] = pycache
        stdlib = stdlib_modules(ENGINE, env)
        codes = {"pass": "pass", "package": PACKAGE, "engine": ENGINE,
                 "stdlib": "import " + ", ".join(stdlib)}
        for code in codes.values():
            run_python(code, env)  # fill the bytecode cache (and check that the code runs)
        times: dict[str, list[float]] = {key: [] for key in codes}
        order = list(codes)
        for run in range(cfg.import_runs):
            for key in order[run % len(order):] + order[:run % len(order)]:
                times[key].append(run_python(codes[key], env))

    def over_pass(key: str) -> tuple[float, float]:
        """(median, min) of ``key``'s runs minus those of ``pass``: the min is the least
        disturbed run."""
        return (statistics.median(times[key]) - statistics.median(times["pass"]),
                min(times[key]) - min(times["pass"]))

    runs = cfg.import_runs
    package, engine, only_stdlib = over_pass("package"), over_pass("engine"), over_pass("stdlib")
    res.numbers.update(import_package_s=package[0], import_engine_s=engine[0],
                       import_engine_min_s=engine[1], import_stdlib_s=only_stdlib[0],
                       import_stdlib_min_s=only_stdlib[1], import_stdlib_count=len(stdlib),
                       import_pass_s=statistics.median(times["pass"]))
    res.add("8 import", f"`{PACKAGE}`: median of {runs} (min)",
            f"{ms(package[0])} (min {ms(package[1])})", "< 50 ms", package[0] < 0.05)
    res.add("8 import", f"`{ENGINE}` / its {len(stdlib)} stdlib modules alone: likewise",
            f"{ms(engine[0])} (min {ms(engine[1])}) / {ms(only_stdlib[0])} "
            f"(min {ms(only_stdlib[1])})")


def run_python(code: str, env: dict[str, str]) -> float:
    """Wall time of ``python -c code`` in a fresh interpreter, run outside the checkout."""
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], check=True, env=env, cwd=tempfile.gettempdir())
    return time.perf_counter() - start


def stdlib_modules(code: str, env: dict[str, str]) -> list[str]:
    """The modules outside the package that ``code`` loads into a bare interpreter, in the
    order they were loaded (the package has no dependencies: they are all stdlib)."""
    probe = ("import sys\nbefore = set(sys.modules)\n" + code + "\nprint(*(name for name in "
             "sys.modules if name not in before and name.partition('.')[0] != "
             "'singleflight_agents'))")
    done = subprocess.run([sys.executable, "-c", probe], check=True, env=env, text=True,
                          capture_output=True, cwd=tempfile.gettempdir())
    return done.stdout.split()
