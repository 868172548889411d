from __future__ import annotations

import asyncio
import importlib
import os
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from singleflight_agents import Singleflight
from singleflight_agents.flights import FLIGHTS

pytest_plugins = ["pytester"]

REDIS_URL = os.environ.get("SINGLEFLIGHT_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")
SECRET = "test-secret-" + "x" * 20


def redis_or_skip() -> str:
    """The test Redis URL, or a skip (a failure when SINGLEFLIGHT_REQUIRE_REDIS=1, as in CI)."""
    try:
        import redis

        redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2).ping()
    except Exception as exc:
        reason = f"no Redis server answers at {REDIS_URL} ({type(exc).__name__}); set " \
                 f"SINGLEFLIGHT_TEST_REDIS_URL or start redis-server"
        if os.environ.get("SINGLEFLIGHT_REQUIRE_REDIS") == "1":
            pytest.fail(reason + " (SINGLEFLIGHT_REQUIRE_REDIS=1)")
        pytest.skip(reason)
    return REDIS_URL


@pytest.fixture
def redis_url() -> Iterator[str]:
    """A Redis store URL with a prefix of this test's own, removed afterwards."""
    import redis

    prefix = f"sftest-{uuid.uuid4().hex[:12]}"
    yield f"{redis_or_skip()}?prefix={prefix}"
    client = redis.Redis.from_url(REDIS_URL)
    for key in client.scan_iter(match=f"{prefix}:*", count=1000):
        client.delete(key)
    client.close()


# A third backend runs the shared suite (docs/stores.md): the module that registers it, and a
# URL template with {name}, a name of each test's own.
EXTRA_BACKEND = os.environ.get("SINGLEFLIGHT_TEST_BACKEND")
EXTRA_STORE_URL = os.environ.get("SINGLEFLIGHT_TEST_STORE_URL")
if EXTRA_BACKEND:
    importlib.import_module(EXTRA_BACKEND)


STORES = ["sqlite", "redis"] + (["extra"] if EXTRA_STORE_URL else [])
# For modules whose tests each start a server process: the fast loop (-m "not slow") runs them
# on SQLite only; CI's full run on every store.
STORES_REDIS_SLOW = [pytest.param(s, marks=pytest.mark.slow) if s != "sqlite" else s
                     for s in STORES]


@pytest.fixture(params=STORES)
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Each store backend in turn: an SQLite file, a Redis prefix of this test's own, and
    the backend under test named by $SINGLEFLIGHT_TEST_STORE_URL."""
    return store_url_of(request, tmp_path)


def store_url_of(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return str(tmp_path / "receipts.db")
    if request.param == "extra":
        assert EXTRA_STORE_URL is not None
        return EXTRA_STORE_URL.format(name=f"sftest-{uuid.uuid4().hex[:12]}", tmp=tmp_path)
    url: str = request.getfixturevalue("redis_url")
    return url


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "receipts.db"


@pytest.fixture
def sf(store_url: str) -> Iterator[Singleflight]:
    engine = Singleflight(store=store_url, secret=SECRET)
    yield engine
    engine.close()


@pytest.fixture
def sqlite_sf(db_path: Path) -> Iterator[Singleflight]:
    """An engine on an SQLite file with its key file beside it (file-level tests)."""
    engine = Singleflight(db_path)
    yield engine
    engine.close()


@pytest.fixture
def chat_calls() -> list[Any]:
    """The real calls of the fake chat models of ``_fake_models`` in this test: emptied first."""
    from _fake_models import CHAT_CALLS

    CHAT_CALLS.clear()
    return CHAT_CALLS


@pytest.fixture
def procs() -> Iterator[list[Any]]:
    """Processes a test started; any still alive at teardown is killed."""
    started: list[Any] = []
    yield started
    for proc in started:
        if proc.is_alive():
            proc.kill()
        proc.join(10)


class SpyEngine(Singleflight):
    """An engine that tells a test how many async calls have made their first look:
    ``reached(n)`` is set once ``n`` have. From there to waiting on a flight an async call
    never yields to the loop, so a set event means every one of those callers has joined
    the flight (or had its result)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.entered = 0
        self._milestones: dict[int, asyncio.Event] = {}

    def reached(self, n: int) -> asyncio.Event:
        event = self._milestones.setdefault(n, asyncio.Event())
        if self.entered >= n:
            event.set()
        return event

    def _looked(self) -> None:
        self.entered += 1
        for n, event in self._milestones.items():
            if self.entered >= n:
                event.set()


@pytest.fixture
def spy(store_url: str) -> Iterator[SpyEngine]:
    """A :class:`SpyEngine` on each store in turn."""
    engine = SpyEngine(store=store_url, secret=SECRET)
    yield engine
    engine.close()


@pytest.fixture(autouse=True)
def _close_the_default_loop_left_behind() -> Iterator[None]:
    """``Runner.run_sync`` (openai-agents) and ``Agent.run_sync`` (pydantic-ai) make the thread's
    default event loop and leave it open, for their next call. Closed after each test, so that
    it is not collected in a later one as an "unclosed event loop" ResourceWarning (errors
    here: pyproject.toml)."""
    yield
    local = getattr(asyncio.get_event_loop_policy(), "_local", None)
    loop = getattr(local, "_loop", None)
    if loop is not None and not loop.is_running() and not loop.is_closed():
        loop.close()
        asyncio.set_event_loop(None)


# -- callers of one flight, held until every one joined it ------------------------------------


def joined_after(monkeypatch: pytest.MonkeyPatch, n: int) -> threading.Event:
    """An event set once ``n`` callers have joined a flight (owner included)."""
    joined, lock, count = threading.Event(), threading.Lock(), [0]
    original = FLIGHTS.join

    def counting(key: tuple[str, str]) -> Any:
        result = original(key)
        with lock:
            count[0] += 1
            if count[0] >= n:
                joined.set()
        return result

    monkeypatch.setattr(FLIGHTS, "join", counting)
    return joined


async def all_joined(joined: threading.Event) -> None:
    """Await ``joined`` (see :func:`joined_after`) without blocking the loop: an async
    call's first look may run in a store thread."""
    import asyncio

    assert await asyncio.to_thread(joined.wait, 30)


def run_together(target: Any, n: int, joined: threading.Event, release: threading.Event) -> None:
    """Run ``target`` in ``n`` threads; let the tool go once all of them joined the flight."""
    threads = [threading.Thread(target=target) for _ in range(n)]
    for thread in threads:
        thread.start()
    assert joined.wait(30)
    release.set()
    for thread in threads:
        thread.join(30)
