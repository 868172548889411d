"""What the run paid for, counted by the controller after every worker finished.

Two stand-ins let this example run anywhere, offline; each gets a line after the run:

``paid model calls: N``: the support agent's stand-in model appends a line per paid turn to a
log file; the controller names that file before any worker starts (workers inherit the
environment), so with ``pytest -n 4`` every worker logs to the same file and the count is the
run's, not one process's.

``provider requests: N``: the HTTP evals (``http_evals/``) build plain OpenAI and Anthropic
clients. Here the controller serves a stand-in provider on 127.0.0.1
(``singleflight_agents.demo_provider``) and points the SDKs at it with their own variables,
``OPENAI_BASE_URL`` and ``ANTHROPIC_BASE_URL``, which the workers inherit too. N is how many
requests reached it in the whole run: one per distinct call when recording, none in a replay.
With a real provider, drop ``_serve_provider`` and the SDKs go to their real APIs.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

from singleflight_agents.demo_provider import Provider, Server

_LOG = pytest.StashKey[str]()  # the log file, on the controller (or the only process)
_SERVER = pytest.StashKey[Server]()  # the stand-in provider, on the controller
_ENVIRON = pytest.StashKey[dict[str, str | None]]()  # the variables it replaced, to restore
# Seconds the stand-in takes per answer, as a (very fast) model would: what a replay saves.
PROVIDER_DELAY = 0.05


def pytest_configure(config: pytest.Config) -> None:
    if hasattr(config, "workerinput"):  # an xdist worker: it uses the controller's log and server
        return
    # Imported here, not at the top: a worker that runs only the HTTP evals never imports the
    # Agents SDK.
    import support_agent

    handle, log = tempfile.mkstemp(prefix="paid-turns-", suffix=".log")
    os.close(handle)
    os.environ[support_agent.PAID_CALLS_LOG_VARIABLE] = log
    config.stash[_LOG] = log
    _serve_provider(config)


def _serve_provider(config: pytest.Config) -> None:
    server = Server(Provider(delay=PROVIDER_DELAY)).__enter__()
    config.stash[_SERVER] = server
    urls = {"OPENAI_BASE_URL": server.url + "/v1", "ANTHROPIC_BASE_URL": server.url}
    config.stash[_ENVIRON] = {name: os.environ.get(name) for name in urls}
    os.environ.update(urls)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter, config: pytest.Config) -> None:
    log = config.stash.get(_LOG, None)
    if log is not None:  # the controller, after every worker finished
        import support_agent

        terminalreporter.write_line(f"paid model calls: {support_agent.paid_turns(log)}")
    server = config.stash.get(_SERVER, None)
    if server is not None:
        terminalreporter.write_line(f"provider requests: {len(server.provider.seen)}")


def pytest_unconfigure(config: pytest.Config) -> None:
    log = config.stash.get(_LOG, None)
    if log is not None:
        import support_agent

        os.environ.pop(support_agent.PAID_CALLS_LOG_VARIABLE, None)
        Path(log).unlink(missing_ok=True)
    server = config.stash.get(_SERVER, None)
    if server is not None:
        server.__exit__(None, None, None)
        for name, value in config.stash[_ENVIRON].items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
