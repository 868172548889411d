"""Shows how many turns the paid model was called for in the whole run (zero in a replay).

The stand-in model appends a line per paid turn to a log file; the controller names that file
before any worker starts (workers inherit the environment), so with ``pytest -n 4`` every
worker logs to the same file and the count is the run's, not one process's.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest
import support_agent

_LOG = pytest.StashKey[str]()  # the log file, on the controller (or the only process)


def pytest_configure(config: pytest.Config) -> None:
    if hasattr(config, "workerinput"):  # an xdist worker: it logs to the controller's file
        return
    handle, log = tempfile.mkstemp(prefix="paid-turns-", suffix=".log")
    os.close(handle)
    os.environ[support_agent.PAID_CALLS_LOG_VARIABLE] = log
    config.stash[_LOG] = log


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter, config: pytest.Config) -> None:
    log = config.stash.get(_LOG, None)
    if log is not None:  # the controller, after every worker finished
        terminalreporter.write_line(f"paid model calls: {support_agent.paid_turns(log)}")


def pytest_unconfigure(config: pytest.Config) -> None:
    log = config.stash.get(_LOG, None)
    if log is not None:
        os.environ.pop(support_agent.PAID_CALLS_LOG_VARIABLE, None)
        Path(log).unlink(missing_ok=True)

